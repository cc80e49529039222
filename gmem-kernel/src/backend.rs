//! [`KernelGuestMemfd`]: one TD's memory in the kernel, private in a guest_memfd and shared in a
//! memfd, with the shareability the VMM tracks.

use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd, FromRawFd, OwnedFd};

use accept::abi::GpaRange;
use accept::convert::Visibility;
use kvm_bindings::{kvm_create_guest_memfd, KVM_CAP_GUEST_MEMFD};
use kvm_ioctls::{Kvm, VmFd};
use rangemap::RangeMap;

use crate::error::{KernelGmemError, Op};
use crate::sys::{self, Mapping};

/// `KVM_CAP_GUEST_MEMFD_FLAGS` (Linux `include/uapi/linux/kvm.h`): the flags
/// `KVM_CREATE_GUEST_MEMFD` takes.
pub const KVM_CAP_GUEST_MEMFD_FLAGS: u64 = 244;
/// `KVM_CAP_MEMORY_ATTRIBUTES`: in-place conversion through `KVM_SET_MEMORY_ATTRIBUTES`.
pub const KVM_CAP_MEMORY_ATTRIBUTES: u64 = 233;
/// `GUEST_MEMFD_FLAG_MMAP`: the file may be mapped by the host.
pub const GUEST_MEMFD_FLAG_MMAP: u64 = 1 << 0;
/// `GUEST_MEMFD_FLAG_INIT_SHARED`: a mappable file starts shared.
pub const GUEST_MEMFD_FLAG_INIT_SHARED: u64 = 1 << 1;

/// What this machine's KVM offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capabilities {
    /// `KVM_CREATE_GUEST_MEMFD` works on the default VM type.
    pub guest_memfd: bool,
    /// The guest_memfd flags the kernel takes (`GUEST_MEMFD_FLAG_*`).
    pub guest_memfd_flags: u64,
    /// `KVM_CAP_MEMORY_ATTRIBUTES` (0: no in-place conversion; the VMM tracks shareability).
    pub memory_attributes: u64,
}

impl Capabilities {
    /// Asks `/dev/kvm`.
    ///
    /// # Errors
    /// [`KernelGmemError::Unsupported`] when `/dev/kvm` cannot be opened or a VM created.
    pub fn probe() -> Result<Capabilities, KernelGmemError> {
        let (_kvm, vm) = open_vm()?;
        Ok(Capabilities::of(&vm))
    }

    fn of(vm: &VmFd) -> Capabilities {
        let raw = |cap: u64| vm.check_extension_raw(cap as _);
        Capabilities {
            guest_memfd: raw(u64::from(KVM_CAP_GUEST_MEMFD)) > 0,
            guest_memfd_flags: u64::try_from(raw(KVM_CAP_GUEST_MEMFD_FLAGS)).unwrap_or(0),
            memory_attributes: u64::try_from(raw(KVM_CAP_MEMORY_ATTRIBUTES)).unwrap_or(0),
        }
    }
}

fn open_vm() -> Result<(Kvm, VmFd), KernelGmemError> {
    let kvm = Kvm::new().map_err(|e| KernelGmemError::Unsupported(format!("/dev/kvm: {e}")))?;
    let vm = kvm
        .create_vm()
        .map_err(|e| KernelGmemError::Unsupported(format!("KVM_CREATE_VM: {e}")))?;
    Ok((kvm, vm))
}

/// The first phase of a conversion ([`KernelGuestMemfd::reserve`]): the parts that change
/// side, with their new side already allocated.
#[derive(Debug, Clone, PartialEq, Eq)]
#[must_use = "a reservation is committed or cancelled"]
pub struct Reservation {
    to: Visibility,
    runs: Vec<(u64, u64)>,
}

impl Reservation {
    /// The parts that change side, as `(start, end)`.
    pub fn runs(&self) -> &[(u64, u64)] {
        &self.runs
    }

    /// The side they move to.
    pub fn to(&self) -> Visibility {
        self.to
    }
}

/// Counters of the kernel calls made.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KernelGmemStats {
    /// `fallocate` calls that allocated private (guest_memfd) backing.
    pub private_allocs: u64,
    /// `fallocate` calls that allocated shared (memfd) backing.
    pub shared_allocs: u64,
    /// Holes punched in the guest_memfd.
    pub private_punches: u64,
    /// Holes punched in the memfd.
    pub shared_punches: u64,
    /// Bytes converted, either way.
    pub bytes_converted: u64,
    /// Conversions that completed.
    pub conversions: u64,
}

/// One TD's guest memory in the kernel: GPAs `[0, size)` are offsets of both files.
///
/// Private pages live in a guest_memfd, which the host cannot read (mapping it is allowed only
/// with `GUEST_MEMFD_FLAG_MMAP`, and touching a private page then raises SIGBUS); shared pages
/// live in an ordinary memfd that the host maps and reads. A conversion allocates the side
/// being taken up first, so that a failure (`ENOSPC`) changes nothing, then punches the side
/// being given up: its content is gone, as on hardware.
#[derive(Debug)]
pub struct KernelGuestMemfd {
    _kvm: Kvm,
    _vm: VmFd,
    private: File,
    shared: File,
    shared_map: Mapping,
    size: u64,
    caps: Capabilities,
    sides: RangeMap<u64, Visibility>,
    stats: KernelGmemStats,
}

impl KernelGuestMemfd {
    /// A TD memory of `size` bytes (a multiple of 4K), all private, nothing allocated yet.
    ///
    /// # Errors
    /// [`KernelGmemError::Unsupported`] without guest_memfd; the kernel's error for the
    /// files and the mapping.
    pub fn new(size: u64) -> Result<KernelGuestMemfd, KernelGmemError> {
        let (kvm, vm) = open_vm()?;
        let caps = Capabilities::of(&vm);
        if !caps.guest_memfd {
            return Err(KernelGmemError::Unsupported(
                "KVM_CAP_GUEST_MEMFD is 0".into(),
            ));
        }
        if size == 0 || size % 4096 != 0 {
            return Err(KernelGmemError::Invalid {
                op: Op::CreateGuestMemfd,
                offset: 0,
                len: size,
            });
        }
        // Mappable when the kernel allows it, but never initially shared: private pages stay
        // out of the host's reach.
        let flags = caps.guest_memfd_flags & GUEST_MEMFD_FLAG_MMAP;
        let fd = vm
            .create_guest_memfd(kvm_create_guest_memfd {
                size,
                flags,
                reserved: [0; 6],
            })
            .map_err(|e| KernelGmemError::from_io(Op::CreateGuestMemfd, 0, size, e.into()))?;
        // SAFETY: KVM_CREATE_GUEST_MEMFD returned a new descriptor nobody else owns.
        let private = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
        let shared = sys::memfd(c"tdmem-shared", size)
            .map_err(|e| KernelGmemError::from_io(Op::CreateMemfd, 0, size, e))?;
        let len = usize::try_from(size).map_err(|_| KernelGmemError::OutOfRange {
            start: 0,
            end: size,
            size,
        })?;
        let shared_map = Mapping::new(&shared, len)
            .map_err(|e| KernelGmemError::from_io(Op::Map, 0, size, e))?;
        let mut sides = RangeMap::new();
        sides.insert(0..size, Visibility::Private);
        Ok(KernelGuestMemfd {
            _kvm: kvm,
            _vm: vm,
            private,
            shared,
            shared_map,
            size,
            caps,
            sides,
            stats: KernelGmemStats::default(),
        })
    }

    /// Its size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// What the kernel offered when it was created.
    pub fn capabilities(&self) -> Capabilities {
        self.caps
    }

    /// Counters so far.
    pub fn stats(&self) -> KernelGmemStats {
        self.stats
    }

    /// The guest_memfd, for `KVM_SET_USER_MEMORY_REGION2`.
    pub fn private_fd(&self) -> BorrowedFd<'_> {
        self.private.as_fd()
    }

    /// The side the byte at `offset` is on.
    pub fn visibility(&self, offset: u64) -> Option<Visibility> {
        self.sides.get(&offset).copied()
    }

    /// Whether all of `range` is on side `side`.
    pub fn is_uniform(&self, range: GpaRange, side: Visibility) -> bool {
        let (s, e) = (range.start().as_u64(), range.end().as_u64());
        s < e
            && e <= self.size
            && self.sides.gaps(&(s..e)).next().is_none()
            && self.sides.overlapping(&(s..e)).all(|(_, v)| *v == side)
    }

    fn check(&self, range: GpaRange) -> Result<(u64, u64), KernelGmemError> {
        let (s, e) = (range.start().as_u64(), range.end().as_u64());
        if s >= e || e > self.size {
            return Err(KernelGmemError::OutOfRange {
                start: s,
                end: e,
                size: self.size,
            });
        }
        Ok((s, e))
    }

    fn file(&self, side: Visibility) -> &File {
        match side {
            Visibility::Private => &self.private,
            Visibility::Shared => &self.shared,
        }
    }

    fn allocate(&mut self, side: Visibility, s: u64, e: u64) -> Result<(), KernelGmemError> {
        sys::fallocate(self.file(side), false, s, e - s)
            .map_err(|err| KernelGmemError::from_io(Op::Allocate, s, e - s, err))?;
        match side {
            Visibility::Private => self.stats.private_allocs += 1,
            Visibility::Shared => self.stats.shared_allocs += 1,
        }
        Ok(())
    }

    fn punch(&mut self, side: Visibility, s: u64, e: u64) -> Result<(), KernelGmemError> {
        sys::fallocate(self.file(side), true, s, e - s)
            .map_err(|err| KernelGmemError::from_io(Op::PunchHole, s, e - s, err))?;
        match side {
            Visibility::Private => self.stats.private_punches += 1,
            Visibility::Shared => self.stats.shared_punches += 1,
        }
        Ok(())
    }

    /// Allocates backing for `range` on the side each part is on (the guest is about to use
    /// it; guest_memfd allocates lazily otherwise).
    ///
    /// # Errors
    /// [`KernelGmemError::OutOfRange`]; the kernel's `fallocate` error ([`KernelGmemError::NoSpace`],
    /// [`KernelGmemError::Invalid`] for a misaligned range).
    pub fn populate(&mut self, range: GpaRange) -> Result<(), KernelGmemError> {
        let (s, e) = self.check(range)?;
        let runs: Vec<(u64, u64, Visibility)> = self
            .sides
            .overlapping(&(s..e))
            .map(|(r, v)| (r.start.max(s), r.end.min(e), *v))
            .collect();
        for (a, b, side) in runs {
            self.allocate(side, a, b)?;
        }
        Ok(())
    }

    /// The shareability runs `(start, end, side)` in offset order.
    pub fn runs(&self) -> Vec<(u64, u64, Visibility)> {
        self.sides
            .iter()
            .map(|(r, v)| (r.start, r.end, *v))
            .collect()
    }

    /// First phase of a conversion of `range` to `to`: allocates backing on the `to` side for
    /// every part now on the other side. Nothing is visible yet: [`KernelGuestMemfd::commit`]
    /// completes the conversion, [`KernelGuestMemfd::cancel`] undoes this.
    ///
    /// # Errors
    /// [`KernelGmemError::OutOfRange`]; the kernel's `fallocate` error, after punching again
    /// what this call allocated (nothing changed).
    pub fn reserve(
        &mut self,
        range: GpaRange,
        to: Visibility,
    ) -> Result<Reservation, KernelGmemError> {
        let (s, e) = self.check(range)?;
        let from = to.other();
        let runs: Vec<(u64, u64)> = self
            .sides
            .overlapping(&(s..e))
            .filter(|(_, v)| **v == from)
            .map(|(r, _)| (r.start.max(s), r.end.min(e)))
            .collect();
        for (i, &(a, b)) in runs.iter().enumerate() {
            if let Err(err) = self.allocate(to, a, b) {
                for &(x, y) in &runs[..i] {
                    // Undo: these pages were not in use on the `to` side before.
                    let _ = self.punch(to, x, y);
                }
                return Err(err);
            }
        }
        Ok(Reservation { to, runs })
    }

    /// Second phase: the point of no return. The parts move to the reservation's side and the
    /// side they leave is punched out (its content is gone, as on hardware).
    ///
    /// # Errors
    /// The kernel's error for a hole punch that failed; the conversion is complete anyway (the
    /// page stays allocated on the side given up until the file is punched or closed).
    pub fn commit(&mut self, reservation: Reservation) -> Result<(), KernelGmemError> {
        let Reservation { to, runs } = reservation;
        let mut first_err = None;
        for &(a, b) in &runs {
            self.sides.insert(a..b, to);
            self.stats.bytes_converted += b - a;
            if let Err(e) = self.punch(to.other(), a, b) {
                first_err.get_or_insert(e);
            }
        }
        self.stats.conversions += 1;
        first_err.map_or(Ok(()), Err)
    }

    /// Undoes [`KernelGuestMemfd::reserve`]: punches the backing it allocated.
    pub fn cancel(&mut self, reservation: Reservation) {
        for &(a, b) in &reservation.runs {
            let _ = self.punch(reservation.to, a, b);
        }
    }

    /// Converts `range` to `to` ([`KernelGuestMemfd::reserve`], then
    /// [`KernelGuestMemfd::commit`]). Parts already on `to` keep their content.
    ///
    /// All-or-nothing: when allocation fails, nothing changed.
    ///
    /// # Errors
    /// [`KernelGmemError::OutOfRange`]; the kernel's `fallocate` error.
    pub fn convert(&mut self, range: GpaRange, to: Visibility) -> Result<(), KernelGmemError> {
        let r = self.reserve(range, to)?;
        self.commit(r)
    }

    /// Punches `range` out of both files (the guest gave the memory back).
    ///
    /// # Errors
    /// [`KernelGmemError::OutOfRange`]; the kernel's error.
    pub fn punch_hole(&mut self, range: GpaRange) -> Result<(), KernelGmemError> {
        let (s, e) = self.check(range)?;
        self.punch(Visibility::Private, s, e)?;
        self.punch(Visibility::Shared, s, e)
    }

    fn shared_span(&self, offset: u64, len: usize) -> Result<usize, KernelGmemError> {
        let end = offset
            .checked_add(len as u64)
            .filter(|&e| e <= self.size && len > 0)
            .ok_or(KernelGmemError::OutOfRange {
                start: offset,
                end: offset.saturating_add(len as u64),
                size: self.size,
            })?;
        let range = GpaRange::new(offset & !0xfff, (end + 0xfff) & !0xfff).map_err(|_| {
            KernelGmemError::OutOfRange {
                start: offset,
                end,
                size: self.size,
            }
        })?;
        if !self.is_uniform(range, Visibility::Shared) {
            return Err(KernelGmemError::NotShared { start: offset, end });
        }
        usize::try_from(offset).map_err(|_| KernelGmemError::OutOfRange {
            start: offset,
            end,
            size: self.size,
        })
    }

    /// Reads shared memory at `offset` through the host's mapping.
    ///
    /// # Errors
    /// [`KernelGmemError::NotShared`] when any byte is private; [`KernelGmemError::OutOfRange`].
    pub fn read_shared(&self, offset: u64, buf: &mut [u8]) -> Result<(), KernelGmemError> {
        let at = self.shared_span(offset, buf.len())?;
        // SAFETY: `shared_span` checked the bytes are inside the memfd mapping and shared, so
        // backed by memfd pages the host may read.
        unsafe { self.shared_map.read(at, buf) };
        Ok(())
    }

    /// Writes shared memory at `offset` through the host's mapping.
    ///
    /// # Errors
    /// As [`KernelGuestMemfd::read_shared`].
    pub fn write_shared(&mut self, offset: u64, data: &[u8]) -> Result<(), KernelGmemError> {
        let at = self.shared_span(offset, data.len())?;
        // SAFETY: as in `read_shared`; `&mut self` excludes other host accesses through this
        // value.
        unsafe { self.shared_map.write(at, data) };
        Ok(())
    }

    /// Maps the guest_memfd itself (possible only where the kernel offers
    /// `GUEST_MEMFD_FLAG_MMAP`). Touching a private page through it raises SIGBUS: this is how
    /// a test shows that private memory is out of the host's reach.
    ///
    /// # Errors
    /// [`KernelGmemError::Unsupported`] without the flag; the kernel's `mmap` error.
    pub fn map_private(&self) -> Result<Mapping, KernelGmemError> {
        if self.caps.guest_memfd_flags & GUEST_MEMFD_FLAG_MMAP == 0 {
            return Err(KernelGmemError::Unsupported(
                "guest_memfd cannot be mapped (no GUEST_MEMFD_FLAG_MMAP)".into(),
            ));
        }
        let len = self.shared_map.len();
        Mapping::new(&self.private, len)
            .map_err(|e| KernelGmemError::from_io(Op::Map, 0, self.size, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kernels_einval_for_a_misaligned_offset_is_invalid() {
        let mut b = match KernelGuestMemfd::new(2 << 20) {
            Ok(b) => b,
            Err(e) => {
                eprintln!("SKIPPED: {e}");
                return;
            }
        };
        let err = b
            .allocate(Visibility::Private, 100, 4096)
            .expect_err("guest_memfd takes page-aligned offsets only");
        assert!(
            matches!(
                err,
                KernelGmemError::Invalid {
                    op: Op::Allocate,
                    offset: 100,
                    ..
                }
            ),
            "{err:?}"
        );
    }
}
