//! [`KernelBackend`]: the kernel's guest_memfd behind the host half (feature `kernel-gmem`).
//!
//! Private memory lives in a real guest_memfd and shared memory in a memfd
//! ([`tdmem_gmem_kernel::KernelGuestMemfd`]); shareability is tracked by the VMM, as QEMU and
//! Cloud Hypervisor do on kernels without in-place conversion. A conversion follows the seam's
//! all-or-nothing order: allocate the side taken up (`fallocate`), prepare the invalidation,
//! then, past the point of no return, zap the private mappings and punch the side given up.
//!
//! Host addresses are synthetic: the page at offset `o` is `hpa_base + o`, so the emulator's
//! page-content model and the private MMU work unchanged. A 2 MiB range that is uniformly
//! private and free of error pages may be mapped at 2 MiB; a real KVM does so only with huge
//! folios (guest_memfd's hugetlb support). Error pages are kept by the backend and never handed
//! out again. Host references to shared pages (seed 004) are not modelled: the VMM maps shared
//! memory itself and converts nothing it has mapped.

use std::collections::BTreeSet;

use accept::abi::{Gpa, GpaRange, PageLevel};
use accept::convert::Visibility;
use tdmem_gmem_kernel::{KernelGmemError, KernelGuestMemfd};

use super::backend::ConversionBackend;
use super::error::{ConvertError, GmemError};
use super::hook::{InvalidateCtx, InvalidateHook, InvalidateReason};
use super::memfd::{ConvertMode, ConvertReport, PfnInfo, PunchReport};
use super::pool::Hpa;
use super::ranges::Shareability;

const PAGE: u64 = PageLevel::Size4K.size();
const M2: u64 = PageLevel::Size2M.size();

fn side(s: Shareability) -> Visibility {
    match s {
        Shareability::Private => Visibility::Private,
        Shareability::Shared => Visibility::Shared,
    }
}

fn shareability(v: Visibility) -> Shareability {
    match v {
        Visibility::Private => Shareability::Private,
        Visibility::Shared => Shareability::Shared,
    }
}

fn gpa(v: u64) -> Gpa {
    Gpa::new_truncate(v)
}

/// The kernel's guest_memfd as a [`ConversionBackend`].
#[derive(Debug)]
pub struct KernelBackend {
    mem: KernelGuestMemfd,
    hpa_base: u64,
    poisoned: BTreeSet<u64>,
    /// 2 MiB blocks whose private backing is allocated.
    populated: BTreeSet<u64>,
}

impl KernelBackend {
    /// A TD memory of `size` bytes in the kernel, all private, nothing allocated, host
    /// addresses from `hpa_base` (2 MiB aligned).
    ///
    /// # Errors
    /// [`KernelGmemError::Unsupported`] where `/dev/kvm` has no guest_memfd; the kernel's
    /// error otherwise.
    pub fn new(size: u64, hpa_base: u64) -> Result<KernelBackend, KernelGmemError> {
        Ok(KernelBackend {
            mem: KernelGuestMemfd::new(size)?,
            hpa_base: hpa_base & !(M2 - 1),
            poisoned: BTreeSet::new(),
            populated: BTreeSet::new(),
        })
    }

    /// The kernel memory itself (for the host's reads and writes of shared pages).
    pub fn memory(&self) -> &KernelGuestMemfd {
        &self.mem
    }

    /// The kernel memory, mutably.
    pub fn memory_mut(&mut self) -> &mut KernelGuestMemfd {
        &mut self.mem
    }

    fn check(&self, range: GpaRange) -> Result<(), ConvertError> {
        if range.end().as_u64() > self.mem.size() {
            return Err(ConvertError::OutOfRange {
                range,
                size: self.mem.size(),
            });
        }
        Ok(())
    }

    fn page_of(&self, at: Gpa) -> Result<u64, GmemError> {
        let a = at.as_u64();
        if a >= self.mem.size() {
            return Err(GmemError::OutOfRange {
                gpa: at,
                size: self.mem.size(),
            });
        }
        Ok(a & !(PAGE - 1))
    }

    fn private_page(&self, at: Gpa) -> Result<u64, GmemError> {
        let page = self.page_of(at)?;
        if self.mem.visibility(page) != Some(Visibility::Private) {
            return Err(GmemError::WrongShareability {
                gpa: gpa(page),
                expected: Shareability::Private,
            });
        }
        if self.poisoned.contains(&page) {
            return Err(GmemError::Poisoned { gpa: gpa(page) });
        }
        Ok(page)
    }

    /// Whether the 2 MiB block at `base` may be mapped whole: inside the file, uniformly
    /// private, no error page.
    fn huge_ok(&self, base: u64) -> bool {
        let Ok(block) = GpaRange::from_len(base, M2) else {
            return false;
        };
        block.end().as_u64() <= self.mem.size()
            && self.mem.is_uniform(block, Visibility::Private)
            && self.poisoned.range(base..base + M2).next().is_none()
    }

    /// The runs of `range` not on `to`, each clipped to `range`.
    fn changing(&self, range: GpaRange, to: Shareability) -> Vec<GpaRange> {
        let (s, e) = (range.start().as_u64(), range.end().as_u64());
        self.mem
            .runs()
            .into_iter()
            .filter(|&(a, b, v)| a < e && b > s && shareability(v) != to)
            .filter_map(|(a, b, _)| GpaRange::new(a.max(s), b.min(e)).ok())
            .collect()
    }

    /// Runs the hook's two phases over `runs`: prepare all (aborting all prepared, in reverse,
    /// on a failure), then invalidate all, recording the pages it could not zap.
    fn invalidate(
        &mut self,
        runs: &[GpaRange],
        ctx: InvalidateCtx,
        hook: &mut dyn InvalidateHook,
    ) -> Result<u64, ConvertError> {
        for (i, &run) in runs.iter().enumerate() {
            if let Err(source) = hook.prepare(run, ctx) {
                for &r in runs[..=i].iter().rev() {
                    hook.abort(r, ctx);
                }
                return Err(ConvertError::HookFailed {
                    offset: run.start(),
                    source,
                });
            }
        }
        let mut poisoned = 0;
        for &run in runs {
            let set = &mut self.poisoned;
            hook.invalidate(run, ctx, &mut |g: Gpa| {
                if set.insert(g.as_u64() & !(PAGE - 1)) {
                    poisoned += 1;
                }
            });
        }
        Ok(poisoned)
    }
}

fn backend_error(offset: Gpa, e: KernelGmemError) -> ConvertError {
    match e {
        KernelGmemError::NoSpace { .. } => ConvertError::NoMemory { offset },
        e => ConvertError::Backend {
            offset,
            reason: e.to_string(),
        },
    }
}

impl ConversionBackend for KernelBackend {
    fn size(&self) -> u64 {
        self.mem.size()
    }

    fn shareability(&self, at: Gpa) -> Result<Shareability, GmemError> {
        let page = self.page_of(at)?;
        self.mem
            .visibility(page)
            .map(shareability)
            .ok_or(GmemError::OutOfRange {
                gpa: at,
                size: self.mem.size(),
            })
    }

    fn is_uniform(&self, range: GpaRange, state: Shareability) -> bool {
        self.mem.is_uniform(range, side(state))
    }

    fn ranges(&self) -> Vec<(GpaRange, Shareability)> {
        self.mem
            .runs()
            .into_iter()
            .filter_map(|(a, b, v)| GpaRange::new(a, b).ok().map(|r| (r, shareability(v))))
            .collect()
    }

    fn convert(
        &mut self,
        range: GpaRange,
        to: Shareability,
        mode: ConvertMode,
        hook: &mut dyn InvalidateHook,
    ) -> Result<ConvertReport, ConvertError> {
        self.check(range)?;
        let runs = self.changing(range, to);
        let pages: u64 = runs.iter().map(|r| r.len() / PAGE).sum();
        if runs.is_empty() {
            return Ok(ConvertReport::noop(to));
        }
        // 1. Allocate the side taken up: the only step the kernel can refuse.
        let reservation = self
            .mem
            .reserve(range, side(to))
            .map_err(|e| backend_error(range.start(), e))?;
        // 2. Prepare the invalidation; 3. past the point of no return, zap and punch.
        let ctx = InvalidateCtx {
            reason: match to {
                Shareability::Shared => InvalidateReason::ToShared,
                Shareability::Private => InvalidateReason::ToPrivate,
            },
            block_first: mode.block_first,
        };
        let poisoned = match self.invalidate(&runs, ctx, hook) {
            Ok(p) => p,
            Err(e) => {
                self.mem.cancel(reservation);
                return Err(e);
            }
        };
        if let Err(e) = self.mem.commit(reservation) {
            log::warn!("converting {range}: {e} (the page stays allocated on the old side)");
        }
        if to == Shareability::Shared {
            for r in &runs {
                let first = r.start().as_u64() & !(M2 - 1);
                let blocks: Vec<u64> = self
                    .populated
                    .range(first..r.end().as_u64())
                    .copied()
                    .collect();
                for b in blocks {
                    self.populated.remove(&b);
                }
            }
        }
        Ok(ConvertReport {
            to,
            invalidated: runs,
            pages_committed: pages,
            deferred: Vec::new(),
            cancelled: 0,
            poisoned,
        })
    }

    fn punch_hole(
        &mut self,
        range: GpaRange,
        hook: &mut dyn InvalidateHook,
    ) -> Result<PunchReport, ConvertError> {
        self.check(range)?;
        let ctx = InvalidateCtx {
            reason: InvalidateReason::PunchHole,
            block_first: false,
        };
        let poisoned = self.invalidate(&[range], ctx, hook)?;
        if let Err(e) = self.mem.punch_hole(range) {
            log::warn!("punching {range}: {e}");
        }
        let (s, e) = (range.start().as_u64(), range.end().as_u64());
        let blocks: Vec<u64> = self.populated.range(s & !(M2 - 1)..e).copied().collect();
        for b in blocks {
            self.populated.remove(&b);
        }
        Ok(PunchReport {
            invalidated: vec![range],
            pages_released: range.len() / PAGE,
            folios_freed: 0,
            frames_leaked: self.poisoned.range(s..e).count() as u64,
            poisoned,
        })
    }

    fn get_pfn(&mut self, at: Gpa) -> Result<PfnInfo, GmemError> {
        let page = self.private_page(at)?;
        let block = page & !(M2 - 1);
        let (base, level) = if self.huge_ok(block) {
            (block, PageLevel::Size2M)
        } else {
            (page, PageLevel::Size4K)
        };
        if !self.populated.contains(&block) {
            let range =
                GpaRange::from_len(base, level.size()).map_err(|_| GmemError::OutOfRange {
                    gpa: at,
                    size: self.mem.size(),
                })?;
            self.mem.populate(range).map_err(|e| {
                log::warn!("guest_memfd allocation at {at} failed: {e}");
                GmemError::NoMemory {
                    gpa: at,
                    source: super::pool::PoolError::Exhausted { level },
                }
            })?;
            if level == PageLevel::Size2M {
                self.populated.insert(block);
            }
        }
        let hpa = Hpa::try_new(self.hpa_base + page)
            .map_err(|source| GmemError::NoMemory { gpa: at, source })?;
        Ok(PfnInfo {
            hpa,
            folio_level: level,
            folio_base: gpa(base),
        })
    }

    fn max_private_level(&self, at: Gpa) -> Result<PageLevel, GmemError> {
        let page = self.private_page(at)?;
        Ok(if self.huge_ok(page & !(M2 - 1)) {
            PageLevel::Size2M
        } else {
            PageLevel::Size4K
        })
    }

    fn poison(&mut self, at: Gpa) -> Result<bool, GmemError> {
        let page = self.page_of(at)?;
        Ok(self.poisoned.insert(page))
    }

    fn is_poisoned(&self, at: Gpa) -> bool {
        self.poisoned.contains(&(at.as_u64() & !(PAGE - 1)))
    }

    fn poisoned_pages(&self) -> u64 {
        self.poisoned.len() as u64
    }
}
