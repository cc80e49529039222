//! `TDG.VP.VMCALL<MapGPA>` with RETRY handling, and whole private <-> shared conversions.
//!
//! [`Converter::map_gpa`] asks the host to change the visibility of `[start, end)`. Hosts answer
//! RETRY routinely (KVM converts in 2 MiB chunks and returns whenever the vCPU has a pending
//! event), with R11 = the GPA to resume from. With [`ResumeCheck::Strict`] (this engine) the
//! resume GPA is trusted only if it carries the same shared bit as the request, is 4K aligned
//! and lies in `[current, end)`; progress resets the no-progress counter;
//! [`ConvertPolicy::no_progress_retries`] bounds a host that never advances. Misaligned, empty,
//! overflowing or shared-bit-crossing ranges are refused before any call.
//!
//! [`Converter::convert`] orders the whole conversion as Linux 6.12 does
//! (`arch/x86/mm/pat/set_memory.c` `__set_memory_enc_pgtable()` with the TDX callbacks of
//! `arch/x86/coco/tdx/tdx.c`), through [`ConvertHooks`]:
//!
//! | step | Linux, private -> shared | here |
//! |---|---|---|
//! | 1 | `cpa_flush()` with cache flush (`tdx_cache_flush_required()`, `tdx_tlb_flush_required(false)`) | [`ConvertHooks::flush_caches`] |
//! | 2 | `__change_page_attr_set_clr()` | [`ConvertHooks::set_visibility`] |
//! | 3 | `cpa_flush()` (TLB) | [`ConvertHooks::flush_tlb`] |
//! | 4 | `enc_status_change_finish()`: `tdx_map_gpa()` | [`Converter::map_gpa`] |
//!
//! | step | Linux, shared -> private | here |
//! |---|---|---|
//! | 1 | `enc_status_change_prepare()`: `tdx_map_gpa()`, `tdx_accept_memory()` | [`Converter::map_gpa`], [`Acceptor`] |
//! | 2 | `__change_page_attr_set_clr()` | [`ConvertHooks::set_visibility`] |
//! | 3 | `cpa_flush()` (TLB) | [`ConvertHooks::flush_tlb`] |
//!
//! The cache flush comes first because the private alias is about to be unmapped: dirty lines
//! of private (encrypted) memory written back after the page is shared would overwrite the
//! host's view with ciphertext, and stale lines would be read back later through the wrong key.
//!
//! To private, a page the module reports `PAGE_ALREADY_ACCEPTED` was private before the call
//! (a caller converted a range that was not wholly shared): it keeps its content, counts as
//! converted, and is never given back to the host by a rollback.
//!
//! On failure it reports which sub-range is in which [`RangeState`] and, unless the policy turns
//! it off, rolls back to the original visibility: to shared, a MapGPA back and a re-accept of
//! what had been given up; to private, a MapGPA back to shared of exactly the pages this call
//! accepted (the ones it made private), never of pages it found accepted. Content of pages that
//! crossed to the other side is not preserved (TDX never preserves it across a conversion);
//! content of pages the host never converted is. Pending pages cannot be told apart from
//! formerly shared ones (both answer SUCCESS to ACCEPT and hold no content), so they are taken
//! as shared.
//!
//! [`ConvertPolicy::LINUX`] behaves as Linux's `tdx_map_gpa()` and `tdx_enc_status_changed()`
//! (checked against the compiled Linux code by `cargo xtask linux`): three RETRY answers without
//! progress end the loop, any R11 in `[start, end)` is taken (aligned or not), no rollback.
//! Deliberate differences of [`ConvertPolicy::OURS`], each pinned by a differential test:
//! R11 must be 4K aligned (an unaligned resume GPA makes the next request misaligned, which a
//! GHCI host must refuse), 16 answers without progress are tolerated, and failures roll back.
//!
//! Not here: deciding which memory to convert, and the host side of MapGPA. Memory that a lazy
//! acceptance tracker still counts as unaccepted is accepted through the tracker before it is
//! converted ([`crate::tracker::LazyTracker::prepare_conversion`]), as Linux accepts every page
//! before it hands it out.

use core::fmt;
use core::sync::atomic::{AtomicU64, Ordering};

use crate::abi::{AddrError, GhciStatus, Gpa, GpaRange, Gpaw, TdxStatus};
use crate::acceptor::{AcceptError, Acceptor};
use crate::tdcall::Tdcall;

/// Default bound on consecutive RETRY answers that make no progress.
///
/// An honest host advances R11 after each chunk; a few answers at the same GPA cover a host that
/// had to drop a chunk for a transient reason, and stop a host that never advances.
pub const DEFAULT_NO_PROGRESS_RETRIES: u32 = 16;

/// Which side a GPA range is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Visibility {
    /// Private: encrypted, accepted through the Secure-EPT, shared bit clear.
    Private,
    /// Shared: host-visible, accessed with the shared bit set.
    Shared,
}

impl Visibility {
    /// The other side.
    pub const fn other(self) -> Visibility {
        match self {
            Visibility::Private => Visibility::Shared,
            Visibility::Shared => Visibility::Private,
        }
    }

    /// The bit MapGPA's R12 carries for this side.
    pub const fn gpa_bit(self, gpaw: Gpaw) -> u64 {
        match self {
            Visibility::Private => 0,
            Visibility::Shared => gpaw.shared_bit(),
        }
    }
}

/// Which RETRY resume GPAs (R11) a MapGPA loop accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ResumeCheck {
    /// Same shared bit as sent, 4K aligned, in `[current, end)`.
    Strict,
    /// As Linux's `tdx_map_gpa()`: in `[start, end)` with the shared bit counted as part of the
    /// address (so it must match), any alignment.
    Linux,
}

/// Conversion behaviour.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConvertPolicy {
    /// Consecutive RETRY answers without progress tolerated by one MapGPA loop (the next one
    /// ends it).
    pub no_progress_retries: u32,
    /// Roll a failed conversion back to the original visibility.
    pub rollback: bool,
    /// Which resume GPAs are accepted.
    pub resume_check: ResumeCheck,
}

impl Default for ConvertPolicy {
    fn default() -> Self {
        ConvertPolicy::OURS
    }
}

impl ConvertPolicy {
    /// This engine: strict resume checks, 16 answers without progress, rollback.
    pub const OURS: ConvertPolicy = ConvertPolicy {
        no_progress_retries: DEFAULT_NO_PROGRESS_RETRIES,
        rollback: true,
        resume_check: ResumeCheck::Strict,
    };

    /// Linux 6.12 (`tdx_map_gpa()`: `max_retries_per_page = 3`, so the third answer without
    /// progress fails; R11 only range-checked; no rollback). A baseline, shown equal to the
    /// compiled Linux code by `cargo xtask linux`.
    pub const LINUX: ConvertPolicy = ConvertPolicy {
        no_progress_retries: 2,
        rollback: false,
        resume_check: ResumeCheck::Linux,
    };
}

/// Why a MapGPA loop stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MapGpaErrorKind {
    /// The range was refused before any call.
    InvalidRange(AddrError),
    /// The TDCALL itself failed (RAX not SUCCESS).
    Tdcall(TdxStatus),
    /// The host returned a GHCI error (or a status the GHCI does not define).
    Host(GhciStatus),
    /// RETRY with an R11 outside `[current, end)`, misaligned, or with another shared bit.
    BadResume {
        /// R11 as the host wrote it.
        resume: u64,
    },
    /// RETRY without progress more often than the policy allows.
    NoProgress {
        /// Consecutive answers without progress.
        tries: u32,
    },
}

impl fmt::Display for MapGpaErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MapGpaErrorKind::InvalidRange(e) => write!(f, "invalid range: {e}"),
            MapGpaErrorKind::Tdcall(s) => write!(f, "TDG.VP.VMCALL failed: {s}"),
            MapGpaErrorKind::Host(s) => write!(f, "host answered {s:?}"),
            MapGpaErrorKind::BadResume { resume } => {
                write!(
                    f,
                    "host asked to resume at {resume:#x}, outside the request"
                )
            }
            MapGpaErrorKind::NoProgress { tries } => {
                write!(f, "host made no progress in {tries} RETRY answers")
            }
        }
    }
}

/// A failed MapGPA loop: `[range.start, at)` was converted (the host said so through RETRY),
/// `[at, range.end)` is in an unknown state (it was part of a request the host did not finish).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MapGpaError {
    /// What went wrong.
    pub kind: MapGpaErrorKind,
    /// First GPA (private alias) whose state is not known.
    pub at: Gpa,
}

impl fmt::Display for MapGpaError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MapGPA stopped at {}: {}", self.at, self.kind)
    }
}

/// A failure reported by an embedder hook. The code is the embedder's own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HookError(pub i32);

/// What the embedder does around a conversion: its caches, page tables and TLB. The order of
/// the calls is Linux's (see the module docs).
pub trait ConvertHooks {
    /// The embedder's own error for a page-table change it could not make (a kernel's error
    /// type; [`HookError`] carries a C-style code; `core::convert::Infallible` for hooks that
    /// cannot fail). A failed conversion carries it in [`ConvertCause::PageTable`], and may
    /// report it twice (first cause and rollback), hence `Clone`.
    type Error: Clone + fmt::Debug;

    /// Writes back and invalidates the caches for `range` through its current (private)
    /// mapping, before a private -> shared change (Linux: `cpa_flush()` with
    /// `enc_cache_flush_required()`, CLFLUSH per line or WBINVD). A kernel must do it: TDX
    /// keeps no cache coherence across the key change. The default does nothing, which is
    /// right only where caches do not exist (an emulator, a test double).
    fn flush_caches(&mut self, range: GpaRange) {
        let _ = range;
    }

    /// Makes the guest's mappings of `range` use `to` (shared: map through the shared alias, or
    /// set the shared bit in the PTEs; private: the reverse). Must be all-or-nothing: on error,
    /// nothing was changed.
    ///
    /// # Errors
    /// The embedder's error; the conversion then reports it.
    fn set_visibility(&mut self, range: GpaRange, to: Visibility) -> Result<(), Self::Error>;

    /// Flushes the TLB for `range` on every CPU that may hold a translation of it: a TLB
    /// shootdown (Linux: `flush_tlb_kernel_range()` from `cpa_flush()`), not only this CPU's.
    /// When it returns, no CPU may reach the range through the mapping `set_visibility`
    /// replaced.
    fn flush_tlb(&mut self, range: GpaRange);
}

/// The state of part of a range after a failed conversion.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RangeState {
    /// As before the call: usable exactly as before.
    Original,
    /// Fully in the target state.
    Converted,
    /// The host has the target visibility but the guest side is not finished (pages not
    /// accepted, or page tables not switched): usable on neither side.
    HostConverted,
    /// Back in the original visibility after a rollback, but the host had converted it: its
    /// content is gone (the re-accept zeroed it).
    Restored,
    /// Not known: the host was asked and did not answer conclusively.
    Unknown,
}

/// Most parts a [`RangeStates`] holds; a report that would need more ends in one
/// [`RangeState::Unknown`] part.
pub const MAX_PARTS: usize = 4;

/// A range split into consecutive parts (at most [`MAX_PARTS`]) with their states.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RangeStates {
    start: u64,
    /// End of each part; parts `[len, MAX_PARTS)` are unused.
    ends: [u64; MAX_PARTS],
    states: [RangeState; MAX_PARTS],
    len: u8,
}

impl RangeStates {
    const fn empty(start: u64) -> RangeStates {
        RangeStates {
            start,
            ends: [start; MAX_PARTS],
            states: [RangeState::Unknown; MAX_PARTS],
            len: 0,
        }
    }

    /// The whole range in one state.
    pub const fn whole(range: GpaRange, state: RangeState) -> RangeStates {
        let mut out = RangeStates::empty(range.start().as_u64());
        out.ends[0] = range.end().as_u64();
        out.states[0] = state;
        out.len = 1;
        out
    }

    /// `[start, at)` in `head`, `[at, end)` in `tail`; empty parts are dropped.
    pub fn split(range: GpaRange, at: Gpa, head: RangeState, tail: RangeState) -> RangeStates {
        let mut out = RangeStates::empty(range.start().as_u64());
        if let Some(h) = range.head(at) {
            out.push(h, head);
        }
        if let Some(t) = range.tail(at) {
            out.push(t, tail);
        }
        out
    }

    /// Appends `range` (which must start where the last part ends) in `state`, merging with
    /// the last part when the states are equal. When full, the last part grows to cover
    /// `range` and becomes [`RangeState::Unknown`]; returns false then.
    fn push(&mut self, range: GpaRange, state: RangeState) -> bool {
        let n = usize::from(self.len);
        let end = range.end().as_u64();
        if n == 0 {
            // Unused slots hold the start, so that equal reports compare equal.
            *self = RangeStates::empty(range.start().as_u64());
        } else if self.states[n - 1] == state {
            self.ends[n - 1] = end;
            return true;
        } else if n == MAX_PARTS {
            self.ends[n - 1] = end;
            self.states[n - 1] = RangeState::Unknown;
            return false;
        }
        self.ends[n] = end;
        self.states[n] = state;
        self.len += 1;
        true
    }

    /// The parts, in address order.
    pub fn iter(&self) -> impl Iterator<Item = (GpaRange, RangeState)> + '_ {
        (0..usize::from(self.len)).filter_map(move |i| {
            let s = if i == 0 { self.start } else { self.ends[i - 1] };
            GpaRange::new(s, self.ends[i])
                .ok()
                .map(|r| (r, self.states[i]))
        })
    }

    /// The state of the part holding `gpa`, if any.
    pub fn state_of(&self, gpa: Gpa) -> Option<RangeState> {
        self.iter().find(|(r, _)| r.contains(gpa)).map(|(_, s)| s)
    }
}

/// Which step of a conversion failed. `E` is the hooks' error ([`ConvertHooks::Error`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConvertCause<E = HookError> {
    /// The range was refused before anything was done.
    InvalidRange(AddrError),
    /// The page-table hook failed, with the embedder's error.
    PageTable(E),
    /// The MapGPA loop failed.
    MapGpa(MapGpaError),
    /// Accepting the range (shared -> private) failed.
    Accept(AcceptError),
}

impl<E: fmt::Display> fmt::Display for ConvertCause<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConvertCause::InvalidRange(e) => write!(f, "invalid range: {e}"),
            ConvertCause::PageTable(e) => write!(f, "page-table change failed: {e}"),
            ConvertCause::MapGpa(e) => write!(f, "{e}"),
            ConvertCause::Accept(e) => write!(f, "{e}"),
        }
    }
}

/// What happened to the rollback of a failed conversion.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rollback<E = HookError> {
    /// Nothing had changed; nothing to undo.
    NotNeeded,
    /// The policy turned rollback off.
    Disabled,
    /// The range is back in its original visibility.
    Complete,
    /// The rollback itself failed; the states are what could be established.
    Failed(ConvertCause<E>),
}

/// A failed conversion: the first cause, what the rollback did, and the resulting states. `E`
/// is the hooks' error ([`ConvertHooks::Error`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConvertFailure<E = HookError> {
    /// The range asked for.
    pub range: GpaRange,
    /// The visibility asked for.
    pub to: Visibility,
    /// The first failure.
    pub cause: ConvertCause<E>,
    /// What rollback did.
    pub rollback: Rollback<E>,
    /// The state of every part of the range now.
    pub states: RangeStates,
}

impl<E: fmt::Display + fmt::Debug> fmt::Display for ConvertFailure<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "conversion of {} to {:?} failed: {}; rollback {:?}",
            self.range, self.to, self.cause, self.rollback
        )
    }
}

/// Counters of a [`Converter`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ConvertStats {
    /// MapGPA TDCALLs made.
    pub map_gpa_calls: u64,
    /// RETRY answers received.
    pub map_gpa_retries: u64,
    /// Conversions that completed.
    pub conversions: u64,
    /// Conversions that failed.
    pub failures: u64,
    /// Rollbacks that completed.
    pub rollbacks: u64,
}

/// Runs MapGPA loops and conversions for one TD. Shareable across vCPUs.
///
/// # Examples
///
/// A bounce buffer goes shared and comes back private. The hooks are the kernel's page tables;
/// this one only records what it was asked.
///
/// ```
/// use tdmem_accept::acceptor::{AcceptPolicy, Acceptor};
/// use tdmem_accept::convert::{ConvertHooks, ConvertPolicy, Converter, HookError, Visibility};
/// use tdmem_accept::testing::FakeModule;
/// use tdmem_accept::{Gpa, GpaRange, Gpaw};
///
/// #[derive(Default)]
/// struct PageTables {
///     shared: Vec<GpaRange>,
/// }
///
/// impl ConvertHooks for PageTables {
///     type Error = HookError;
///     fn flush_caches(&mut self, _range: GpaRange) { /* CLFLUSH each line, or WBINVD */ }
///     fn set_visibility(&mut self, range: GpaRange, to: Visibility) -> Result<(), HookError> {
///         match to {
///             Visibility::Shared => self.shared.push(range),
///             Visibility::Private => self.shared.retain(|r| *r != range),
///         }
///         Ok(())
///     }
///     fn flush_tlb(&mut self, _range: GpaRange) { /* shoot down every CPU's TLB */ }
/// }
///
/// let mut module = FakeModule::new();
/// let acceptor = Acceptor::new(Gpaw::Bits48, AcceptPolicy::default());
/// let converter = Converter::new(Gpaw::Bits48, ConvertPolicy::default());
/// let buffer = GpaRange::new(0x10_0000, 0x10_4000)?;
/// acceptor.accept_range(&mut module, buffer)?;
///
/// let mut pt = PageTables::default();
/// // SAFETY: the fake has no memory behind the GPAs; a kernel would own `buffer` here.
/// unsafe { converter.convert(&mut module, &acceptor, buffer, Visibility::Shared, &mut pt) }?;
/// assert!(module.is_shared(Gpa::try_new(0x10_1000)?));
/// assert_eq!(pt.shared, [buffer]);
///
/// // SAFETY: as above.
/// unsafe { converter.convert(&mut module, &acceptor, buffer, Visibility::Private, &mut pt) }?;
/// assert!(module.is_accepted(Gpa::try_new(0x10_1000)?));
/// assert!(pt.shared.is_empty());
/// assert_eq!(converter.stats().conversions, 2);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct Converter {
    gpaw: Gpaw,
    policy: ConvertPolicy,
    map_gpa_calls: AtomicU64,
    map_gpa_retries: AtomicU64,
    conversions: AtomicU64,
    failures: AtomicU64,
    rollbacks: AtomicU64,
}

impl fmt::Debug for Converter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Converter")
            .field("gpaw", &self.gpaw)
            .field("policy", &self.policy)
            .field("stats", &self.stats())
            .finish()
    }
}

impl Converter {
    /// A converter for a TD with GPA width `gpaw`.
    pub fn new(gpaw: Gpaw, policy: ConvertPolicy) -> Converter {
        Converter {
            gpaw,
            policy,
            map_gpa_calls: AtomicU64::new(0),
            map_gpa_retries: AtomicU64::new(0),
            conversions: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            rollbacks: AtomicU64::new(0),
        }
    }

    /// Counters so far.
    pub fn stats(&self) -> ConvertStats {
        ConvertStats {
            map_gpa_calls: self.map_gpa_calls.load(Ordering::Relaxed),
            map_gpa_retries: self.map_gpa_retries.load(Ordering::Relaxed),
            conversions: self.conversions.load(Ordering::Relaxed),
            failures: self.failures.load(Ordering::Relaxed),
            rollbacks: self.rollbacks.load(Ordering::Relaxed),
        }
    }

    fn check_range(&self, range: GpaRange) -> Result<(), AddrError> {
        if range.is_private_space(self.gpaw) {
            Ok(())
        } else {
            Err(AddrError::CrossesSharedBit)
        }
    }

    /// Builds a range from raw bounds as a conversion caller would pass them, checking them the
    /// way the GHCI host does (4K alignment, no overflow, private GPA space).
    ///
    /// # Errors
    /// The first violated rule.
    pub fn range(&self, start: u64, len: u64) -> Result<GpaRange, AddrError> {
        let range = GpaRange::from_len(start, len)?;
        self.check_range(range)?;
        Ok(range)
    }

    /// `TDG.VP.VMCALL<MapGPA>` over `range` (private aliases) to `to`, resuming on RETRY.
    ///
    /// # Errors
    /// [`MapGpaError`]: `[range.start, at)` was converted, `[at, end)` is unknown.
    pub fn map_gpa<T: Tdcall + ?Sized>(
        &self,
        tdcall: &mut T,
        range: GpaRange,
        to: Visibility,
    ) -> Result<(), MapGpaError> {
        if let Err(e) = self.check_range(range) {
            return Err(MapGpaError {
                kind: MapGpaErrorKind::InvalidRange(e),
                at: range.start(),
            });
        }
        let bit = to.gpa_bit(self.gpaw);
        let end = range.end().as_u64();
        let mut cur = range.start().as_u64();
        let mut stalled = 0u32;
        loop {
            self.map_gpa_calls.fetch_add(1, Ordering::Relaxed);
            let out = tdcall.map_gpa(cur | bit, end - cur);
            let fail = |kind| MapGpaError {
                kind,
                at: Gpa::new_truncate(cur),
            };
            if !out.tdcall.is_success() {
                return Err(fail(MapGpaErrorKind::Tdcall(out.tdcall)));
            }
            match out.status {
                GhciStatus::Success => return Ok(()),
                GhciStatus::Retry => {
                    self.map_gpa_retries.fetch_add(1, Ordering::Relaxed);
                    let resume = out.resume_gpa;
                    // The resume GPA must carry the shared bit exactly as sent; strip it only
                    // after checking, so a host cannot move the loop to the other alias.
                    let addr = resume & !bit;
                    let same_side = resume & self.gpaw.shared_bit() == bit;
                    let valid = match self.policy.resume_check {
                        ResumeCheck::Strict => {
                            same_side && addr & 0xFFF == 0 && addr >= cur && addr < end
                        }
                        // Linux compares R11 with `start | bit` and `end | bit`.
                        ResumeCheck::Linux => same_side && addr >= cur && addr < end,
                    };
                    if !valid {
                        return Err(fail(MapGpaErrorKind::BadResume { resume }));
                    }
                    if addr > cur {
                        cur = addr;
                        stalled = 0;
                    } else {
                        stalled += 1;
                        if stalled > self.policy.no_progress_retries {
                            return Err(fail(MapGpaErrorKind::NoProgress { tries: stalled }));
                        }
                    }
                }
                status => return Err(fail(MapGpaErrorKind::Host(status))),
            }
        }
    }

    /// Converts `range` to `to`: page tables, TLB, MapGPA and (to private) ACCEPT, in Linux's
    /// order, rolling back on failure.
    ///
    /// # Safety
    ///
    /// The engine never reads or writes the range itself; it changes who can see it, which
    /// erases or exposes memory behind the back of every reference into it. The caller
    /// guarantees, and the engine cannot check:
    ///
    /// - **Ownership.** Nothing else uses the range during the call: no other CPU reads or
    ///   writes it, no device DMAs to it, no other conversion or lazy acceptance covers it
    ///   (for memory the lazy tracker covers, call `LazyTracker::prepare_conversion` first).
    /// - **Private -> shared exposes.** Afterwards the host can read and write the range. Put
    ///   nothing there that the host must not see, and treat what is read back as host input.
    /// - **Shared -> private erases.** ACCEPT zeroes every page the host converted; no
    ///   reference may rely on the range's old content.
    /// - **Mappings.** The hooks switch every mapping of the range the kernel has (the direct
    ///   map and any alias), flush caches before a private -> shared change, and shoot down
    ///   the TLB on every CPU ([`ConvertHooks::flush_tlb`]).
    /// - **After a failure** only the parts [`ConvertFailure::states`] reports `Original` may be
    ///   used as before; `Restored` parts are zeroed; `HostConverted` and `Unknown` parts must
    ///   not be used until a later conversion settles them.
    ///
    /// Hence an `unsafe fn`, as asterinas ostd's `unprotect_gpa_range` is. In a simulated TD
    /// (no real memory behind the GPAs) the points hold trivially.
    ///
    /// # Errors
    /// [`ConvertFailure`] with the first cause, the rollback outcome and the resulting states.
    #[allow(unsafe_code)]
    pub unsafe fn convert<T: Tdcall + ?Sized, H: ConvertHooks + ?Sized>(
        &self,
        tdcall: &mut T,
        acceptor: &Acceptor,
        range: GpaRange,
        to: Visibility,
        hooks: &mut H,
    ) -> Result<(), ConvertFailure<H::Error>> {
        let result = match self.check_range(range) {
            Err(e) => Err(ConvertFailure {
                range,
                to,
                cause: ConvertCause::InvalidRange(e),
                rollback: Rollback::NotNeeded,
                states: RangeStates::whole(range, RangeState::Original),
            }),
            Ok(()) => match to {
                Visibility::Shared => self.to_shared(tdcall, acceptor, range, hooks),
                Visibility::Private => self.to_private(tdcall, acceptor, range, hooks),
            },
        };
        match &result {
            Ok(()) => self.conversions.fetch_add(1, Ordering::Relaxed),
            Err(f) => {
                if matches!(f.rollback, Rollback::Complete) {
                    self.rollbacks.fetch_add(1, Ordering::Relaxed);
                }
                self.failures.fetch_add(1, Ordering::Relaxed)
            }
        };
        result
    }

    fn to_shared<T: Tdcall + ?Sized, H: ConvertHooks + ?Sized>(
        &self,
        tdcall: &mut T,
        acceptor: &Acceptor,
        range: GpaRange,
        hooks: &mut H,
    ) -> Result<(), ConvertFailure<H::Error>> {
        let to = Visibility::Shared;
        let failure = |cause, rollback, states| ConvertFailure {
            range,
            to,
            cause,
            rollback,
            states,
        };
        hooks.flush_caches(range);
        if let Err(e) = hooks.set_visibility(range, to) {
            return Err(failure(
                ConvertCause::PageTable(e),
                Rollback::NotNeeded,
                RangeStates::whole(range, RangeState::Original),
            ));
        }
        hooks.flush_tlb(range);
        let Err(err) = self.map_gpa(tdcall, range, to) else {
            return Ok(());
        };
        let cause = ConvertCause::MapGpa(err);
        if !self.policy.rollback {
            // The page tables already point at the shared alias.
            return Err(failure(
                cause,
                Rollback::Disabled,
                RangeStates::split(range, err.at, RangeState::Converted, RangeState::Unknown),
            ));
        }
        // Back to private: MapGPA the whole range, re-accept what the host converted (strictly:
        // it must be pending now), accept what it may not have converted tolerating
        // ALREADY_ACCEPTED (those pages kept their content), then restore the page tables.
        let lost = RangeStates::whole(range, RangeState::Unknown);
        if let Err(e) = self.map_gpa(tdcall, range, Visibility::Private) {
            return Err(failure(
                cause,
                Rollback::Failed(ConvertCause::MapGpa(e)),
                lost,
            ));
        }
        if let Some(prefix) = range.head(err.at) {
            if let Err(e) = acceptor.accept_range_with(tdcall, prefix, false) {
                return Err(failure(
                    cause,
                    Rollback::Failed(ConvertCause::Accept(e)),
                    lost,
                ));
            }
        }
        // Whether the host had converted part of the rest after all (a page accepted fresh
        // rather than found accepted): its content is gone too.
        let mut rest_lost = false;
        if let Some(rest) = range.tail(err.at) {
            match acceptor.accept_range_counted(tdcall, rest, true) {
                Ok(fresh) => rest_lost = fresh > 0,
                Err(e) => {
                    return Err(failure(
                        cause,
                        Rollback::Failed(ConvertCause::Accept(e)),
                        lost,
                    ))
                }
            }
        }
        if let Err(e) = hooks.set_visibility(range, Visibility::Private) {
            return Err(failure(
                cause,
                Rollback::Failed(ConvertCause::PageTable(e)),
                RangeStates::whole(range, RangeState::HostConverted),
            ));
        }
        hooks.flush_tlb(range);
        let rest = if rest_lost {
            RangeState::Restored
        } else {
            RangeState::Original
        };
        Err(failure(
            cause,
            Rollback::Complete,
            RangeStates::split(range, err.at, RangeState::Restored, rest),
        ))
    }

    fn to_private<T: Tdcall + ?Sized, H: ConvertHooks + ?Sized>(
        &self,
        tdcall: &mut T,
        acceptor: &Acceptor,
        range: GpaRange,
        hooks: &mut H,
    ) -> Result<(), ConvertFailure<H::Error>> {
        let to = Visibility::Private;
        let failure = |cause, rollback, states| ConvertFailure {
            range,
            to,
            cause,
            rollback,
            states,
        };
        // What ACCEPT said about each page: accepted now (it was shared or pending: this call
        // made it private) or found accepted (it was private: not ours to give back).
        let mut seen = Seen::new(range);
        let (cause, mapped_to) = 'steps: {
            if let Err(e) = self.map_gpa(tdcall, range, to) {
                break 'steps (ConvertCause::MapGpa(e), e.at);
            }
            if let Err(e) =
                acceptor.accept_range_visit(tdcall, range, true, |r, fresh| seen.note(r, fresh))
            {
                break 'steps (ConvertCause::Accept(e), range.end());
            }
            if let Err(e) = hooks.set_visibility(range, to) {
                break 'steps (ConvertCause::PageTable(e), range.end());
            }
            hooks.flush_tlb(range);
            return Ok(());
        };
        if !self.policy.rollback {
            // [start, mapped_to) is private on the host, the page tables are not switched:
            // pages found accepted were private before (Original), the rest is host-converted.
            let mut states = RangeStates::whole(range, RangeState::Unknown);
            if let Some(head) = range.head(mapped_to) {
                states = seen.states(
                    head,
                    RangeState::HostConverted,
                    RangeState::Original,
                    RangeState::HostConverted,
                );
                if let Some(tail) = range.tail(mapped_to) {
                    states.push(tail, RangeState::Unknown);
                }
            }
            return Err(failure(cause, Rollback::Disabled, states));
        }
        // The MapGPA loop stopped early: learn what [start, at) held by accepting it.
        if let Some(head) = range.head(mapped_to) {
            if seen.end() < head.end() {
                if let Some(rest) = head.tail(seen.end()) {
                    // Errors leave the rest of the head unknown (not visited).
                    let _ = acceptor
                        .accept_range_visit(tdcall, rest, true, |r, fresh| seen.note(r, fresh));
                }
            }
        }
        // Give back exactly the pages this call made private.
        let mut states = RangeStates::empty(range.start().as_u64());
        let mut rollback_err = None;
        for (part, fresh) in seen.runs() {
            if !fresh {
                states.push(part, RangeState::Original);
                continue;
            }
            match self.map_gpa(tdcall, part, Visibility::Shared) {
                Ok(()) => {
                    states.push(part, RangeState::Restored);
                }
                Err(e) => {
                    rollback_err.get_or_insert(ConvertCause::MapGpa(e));
                    states.push(part, RangeState::Unknown);
                }
            }
        }
        // Not visited: what the host did there is not known, and giving it back could destroy
        // a private page. When nothing visited was private and the host never converted the
        // rest (MapGPA stopped before it), the rest is still shared.
        if let Some(rest) = range.tail(seen.end()) {
            let untouched = seen.end() == mapped_to && seen.all_fresh();
            if untouched && mapped_to < range.end() {
                match self.map_gpa(tdcall, rest, Visibility::Shared) {
                    Ok(()) => {
                        states.push(rest, RangeState::Original);
                    }
                    Err(e) => {
                        rollback_err.get_or_insert(ConvertCause::MapGpa(e));
                        states.push(rest, RangeState::Unknown);
                    }
                }
            } else {
                rollback_err.get_or_insert(cause.clone());
                states.push(rest, RangeState::Unknown);
            }
        }
        let rollback = match rollback_err {
            None if !seen.overflowed => Rollback::Complete,
            None => Rollback::Failed(cause.clone()),
            Some(c) => Rollback::Failed(c),
        };
        Err(failure(cause, rollback, states))
    }
}

/// Most runs of "accepted now" / "found accepted" pages a to-private conversion remembers; a
/// range that alternates more often is reported as [`RangeState::Unknown`] past the last run.
const MAX_RUNS: usize = 8;

/// The pages of a to-private conversion that ACCEPT has answered for, as runs from the start.
struct Seen {
    runs: [(u64, bool); MAX_RUNS],
    len: usize,
    end: u64,
    overflowed: bool,
}

impl Seen {
    fn new(range: GpaRange) -> Seen {
        Seen {
            runs: [(0, false); MAX_RUNS],
            len: 0,
            end: range.start().as_u64(),
            overflowed: false,
        }
    }

    /// One accepted page, `fresh` when this call accepted it. Pages come in address order.
    fn note(&mut self, page: GpaRange, fresh: bool) {
        if self.overflowed || page.start().as_u64() != self.end {
            self.overflowed = true;
            return;
        }
        let same = self.len > 0 && self.runs[self.len - 1].1 == fresh;
        if !same {
            if self.len == MAX_RUNS {
                self.overflowed = true;
                return;
            }
            self.runs[self.len] = (page.start().as_u64(), fresh);
            self.len += 1;
        }
        self.end = page.end().as_u64();
    }

    /// End of the pages answered for.
    fn end(&self) -> Gpa {
        Gpa::new_truncate(self.end)
    }

    fn all_fresh(&self) -> bool {
        self.runs[..self.len].iter().all(|&(_, f)| f)
    }

    /// The runs as ranges.
    fn runs(&self) -> impl Iterator<Item = (GpaRange, bool)> + '_ {
        (0..self.len).filter_map(move |i| {
            let (s, fresh) = self.runs[i];
            let e = self
                .runs
                .get(i + 1)
                .filter(|_| i + 1 < self.len)
                .map_or(self.end, |r| r.0);
            GpaRange::new(s, e).ok().map(|r| (r, fresh))
        })
    }

    /// States of `within` (from the start): runs accepted now in `fresh`, found accepted in
    /// `found`, not answered for in `unvisited`.
    fn states(
        &self,
        within: GpaRange,
        fresh: RangeState,
        found: RangeState,
        unvisited: RangeState,
    ) -> RangeStates {
        let mut out = RangeStates::empty(within.start().as_u64());
        for (r, f) in self.runs() {
            if let Ok(r) = GpaRange::new(
                r.start().as_u64(),
                r.end().as_u64().min(within.end().as_u64()),
            ) {
                out.push(r, if f { fresh } else { found });
            }
        }
        if let Some(rest) = within.tail(self.end()) {
            out.push(rest, unvisited);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// [`Converter::convert`] on the fakes of these tests.
    #[allow(unsafe_code)]
    fn convert_on<T: Tdcall + ?Sized, H: ConvertHooks + ?Sized>(
        c: &Converter,
        tdcall: &mut T,
        acceptor: &Acceptor,
        range: GpaRange,
        to: Visibility,
        hooks: &mut H,
    ) -> Result<(), ConvertFailure<H::Error>> {
        // SAFETY: no memory stands behind the fakes' GPAs, so nothing can see it erased or
        // exposed, and nothing else converts it.
        unsafe { c.convert(tdcall, acceptor, range, to, hooks) }
    }
    use crate::abi::{MapGpaOutcome, PageLevel, StatusCode, VeInfo, VpInfo};
    use crate::acceptor::AcceptPolicy;
    use std::boxed::Box;
    use std::cell::RefCell;
    use std::rc::Rc;
    use std::vec;
    use std::vec::Vec;

    const M2: u64 = 2 << 20;
    const K4: u64 = 4096;
    const SHARED48: u64 = 1 << 47;

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Ev {
        SetVis(u64, u64, Visibility),
        Flush(u64, u64),
        MapGpa(u64, u64),
        Accept(u64, PageLevel),
    }

    type Log = Rc<RefCell<Vec<Ev>>>;
    type MapRule = Box<dyn FnMut(u64, u64) -> MapGpaOutcome>;
    type AcceptRule = Box<dyn FnMut(Gpa, PageLevel) -> TdxStatus>;

    struct Fake {
        log: Log,
        map: MapRule,
        accept: AcceptRule,
    }

    impl Tdcall for Fake {
        fn accept(&mut self, gpa: Gpa, level: PageLevel) -> TdxStatus {
            self.log.borrow_mut().push(Ev::Accept(gpa.as_u64(), level));
            (self.accept)(gpa, level)
        }
        fn map_gpa(&mut self, start: u64, len: u64) -> MapGpaOutcome {
            self.log.borrow_mut().push(Ev::MapGpa(start, len));
            (self.map)(start, len)
        }
        fn ve_info(&mut self) -> Result<VeInfo, TdxStatus> {
            Err(StatusCode::NoValidVeInfo.status())
        }
        fn vp_info(&mut self) -> Result<VpInfo, TdxStatus> {
            Err(StatusCode::OperandInvalid.status())
        }
    }

    struct Hooks {
        log: Log,
        fail: Option<Visibility>,
    }

    impl ConvertHooks for Hooks {
        type Error = HookError;
        fn set_visibility(&mut self, range: GpaRange, to: Visibility) -> Result<(), HookError> {
            if self.fail == Some(to) {
                return Err(HookError(-12));
            }
            let r = (range.start().as_u64(), range.end().as_u64());
            self.log.borrow_mut().push(Ev::SetVis(r.0, r.1, to));
            Ok(())
        }
        fn flush_tlb(&mut self, range: GpaRange) {
            let r = (range.start().as_u64(), range.end().as_u64());
            self.log.borrow_mut().push(Ev::Flush(r.0, r.1));
        }
    }

    fn out(status: GhciStatus, resume: u64) -> MapGpaOutcome {
        MapGpaOutcome {
            tdcall: TdxStatus::SUCCESS,
            status,
            resume_gpa: resume,
        }
    }

    fn ok() -> MapGpaOutcome {
        out(GhciStatus::Success, 0)
    }

    /// A host like KVM: converts one 2 MiB chunk per call and answers RETRY with the next GPA,
    /// shared bit as sent.
    fn chunked() -> MapRule {
        Box::new(|start, len| {
            let bit = start & SHARED48;
            let addr = start & !SHARED48;
            let next = (addr + M2) & !(M2 - 1);
            if next >= addr + len {
                ok()
            } else {
                out(GhciStatus::Retry, next | bit)
            }
        })
    }

    fn fake(map: MapRule) -> (Fake, Log) {
        let log = Log::default();
        let f = Fake {
            log: log.clone(),
            map,
            accept: Box::new(|_, _| TdxStatus::SUCCESS),
        };
        (f, log)
    }

    fn conv() -> Converter {
        Converter::new(Gpaw::Bits48, ConvertPolicy::default())
    }

    fn range(start: u64, end: u64) -> GpaRange {
        GpaRange::new(start, end).unwrap()
    }

    fn maps(log: &Log) -> Vec<(u64, u64)> {
        log.borrow()
            .iter()
            .filter_map(|e| match *e {
                Ev::MapGpa(s, l) => Some((s, l)),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn one_call_and_the_shared_bit_in_r12() {
        let c = conv();
        let (mut t, log) = fake(Box::new(|_, _| ok()));
        c.map_gpa(&mut t, range(M2, 2 * M2), Visibility::Shared)
            .unwrap();
        c.map_gpa(&mut t, range(M2, 2 * M2), Visibility::Private)
            .unwrap();
        assert_eq!(maps(&log), [(M2 | SHARED48, M2), (M2, M2)]);

        let c = Converter::new(Gpaw::Bits52, ConvertPolicy::default());
        let (mut t, log) = fake(Box::new(|_, _| ok()));
        c.map_gpa(&mut t, range(M2, 2 * M2), Visibility::Shared)
            .unwrap();
        assert_eq!(maps(&log), [(M2 | (1 << 51), M2)]);
    }

    #[test]
    fn retry_resumes_inside_the_range() {
        let c = conv();
        let (mut t, log) = fake(chunked());
        // 4K head, three 2M chunks, 4K tail.
        let r = range(M2 - K4, 4 * M2 + K4);
        c.map_gpa(&mut t, r, Visibility::Shared).unwrap();
        let m = maps(&log);
        assert_eq!(m.len(), 5);
        assert_eq!(m[0], ((M2 - K4) | SHARED48, 3 * M2 + 2 * K4));
        assert_eq!(m[1], (M2 | SHARED48, 3 * M2 + K4));
        assert_eq!(m[4], ((4 * M2) | SHARED48, K4));
        assert_eq!(c.stats().map_gpa_retries, 4);
        assert_eq!(c.stats().map_gpa_calls, 5);
    }

    fn bad_resume(to: Visibility, resume: impl Fn(u64) -> u64 + 'static) -> MapGpaError {
        let c = conv();
        let mut first = true;
        let (mut t, _) = fake(Box::new(move |start, _| {
            if first {
                first = false;
                // Progress once, to GPA 2M + 4K, to make "current" differ from "start".
                return out(GhciStatus::Retry, (M2 + K4) | (start & SHARED48));
            }
            out(GhciStatus::Retry, resume(start))
        }));
        c.map_gpa(&mut t, range(M2, 4 * M2), to).unwrap_err()
    }

    #[test]
    fn retry_outside_the_range_or_with_another_bit_is_refused() {
        let cur = M2 + K4;
        type Resume = fn(u64) -> u64;
        let cases: [(Visibility, Resume); 8] = [
            // Before the current position (but inside the original range).
            (Visibility::Private, |_| M2),
            // Before the range.
            (Visibility::Shared, |_| SHARED48),
            // At and past the end.
            (Visibility::Private, |_| 4 * M2),
            (Visibility::Shared, |_| (5 * M2) | SHARED48),
            // Without the shared bit on a shared request.
            (Visibility::Shared, |_| M2 + 2 * K4),
            // With the shared bit on a private request.
            (Visibility::Private, |_| (M2 + 2 * K4) | SHARED48),
            // With another high bit.
            (Visibility::Shared, |_| (M2 + 2 * K4) | SHARED48 | (1 << 46)),
            // Misaligned.
            (Visibility::Private, |_| M2 + 2 * K4 + 8),
        ];
        for (to, resume) in cases {
            let expected = resume(0);
            let err = bad_resume(to, resume);
            assert_eq!(
                err,
                MapGpaError {
                    kind: MapGpaErrorKind::BadResume { resume: expected },
                    at: Gpa::new_truncate(cur)
                },
                "{to:?} {expected:#x}"
            );
        }
    }

    #[test]
    fn no_progress_is_bounded_and_progress_resets_the_count() {
        let c = Converter::new(
            Gpaw::Bits48,
            ConvertPolicy {
                no_progress_retries: 3,
                ..ConvertPolicy::OURS
            },
        );
        let (mut t, log) = fake(Box::new(|start, _| out(GhciStatus::Retry, start)));
        let err = c
            .map_gpa(&mut t, range(0, M2), Visibility::Shared)
            .unwrap_err();
        assert_eq!(err.kind, MapGpaErrorKind::NoProgress { tries: 4 });
        assert_eq!(maps(&log).len(), 4);

        // Three stalls, one 4K step, three stalls, ...: never more than the bound in a row.
        let mut n = 0u64;
        let (mut t, _) = fake(Box::new(move |start, len| {
            n += 1;
            if n % 4 != 0 {
                out(GhciStatus::Retry, start)
            } else if len == K4 {
                ok()
            } else {
                out(GhciStatus::Retry, start + K4)
            }
        }));
        c.map_gpa(&mut t, range(0, 8 * K4), Visibility::Shared)
            .unwrap();
    }

    #[test]
    fn host_errors_midway_report_the_converted_prefix() {
        for status in [
            GhciStatus::InvalidOperand,
            GhciStatus::GpaInUse,
            GhciStatus::AlignError,
            GhciStatus::SubfuncUnsupported,
            GhciStatus::Unknown(0x42),
        ] {
            let c = conv();
            let mut calls = 0;
            let (mut t, _) = fake(Box::new(move |start, _| {
                calls += 1;
                if calls == 1 {
                    out(GhciStatus::Retry, start + M2)
                } else {
                    out(status, 0)
                }
            }));
            let err = c
                .map_gpa(&mut t, range(0, 4 * M2), Visibility::Private)
                .unwrap_err();
            assert_eq!(
                err,
                MapGpaError {
                    kind: MapGpaErrorKind::Host(status),
                    at: Gpa::new_truncate(M2)
                }
            );
        }
        // The TDCALL itself failing.
        let c = conv();
        let bad = StatusCode::OperandInvalid.with_operand(1);
        let (mut t, _) = fake(Box::new(move |_, _| MapGpaOutcome {
            tdcall: bad,
            status: GhciStatus::Success,
            resume_gpa: 0,
        }));
        let err = c
            .map_gpa(&mut t, range(0, M2), Visibility::Private)
            .unwrap_err();
        assert_eq!(err.kind, MapGpaErrorKind::Tdcall(bad));
    }

    #[test]
    fn bad_ranges_are_refused_before_any_call() {
        let c = conv();
        assert_eq!(c.range(0x1001, K4), Err(AddrError::Misaligned(0x1001)));
        assert_eq!(c.range(0, K4 + 1), Err(AddrError::Misaligned(K4 + 1)));
        assert_eq!(c.range(0, 0), Err(AddrError::EmptyRange));
        assert_eq!(c.range(!0xFFF, 2 * K4), Err(AddrError::Overflow));
        assert_eq!(
            c.range(SHARED48 - K4, 2 * K4),
            Err(AddrError::CrossesSharedBit)
        );
        let (mut t, log) = fake(chunked());
        let a = Acceptor::new(Gpaw::Bits48, AcceptPolicy::default());
        let mut h = Hooks {
            log: log.clone(),
            fail: None,
        };
        let r = range(SHARED48 - K4, SHARED48 + K4);
        let f = convert_on(&c, &mut t, &a, r, Visibility::Shared, &mut h).unwrap_err();
        assert_eq!(
            f.cause,
            ConvertCause::InvalidRange(AddrError::CrossesSharedBit)
        );
        assert_eq!(f.states, RangeStates::whole(r, RangeState::Original));
        let err = c.map_gpa(&mut t, r, Visibility::Shared).unwrap_err();
        assert_eq!(
            err.kind,
            MapGpaErrorKind::InvalidRange(AddrError::CrossesSharedBit)
        );
        assert!(log.borrow().is_empty());
    }

    fn setup(map: MapRule, accept: AcceptRule, fail: Option<Visibility>) -> (Fake, Hooks, Log) {
        let log = Log::default();
        let t = Fake {
            log: log.clone(),
            map,
            accept,
        };
        let h = Hooks {
            log: log.clone(),
            fail,
        };
        (t, h, log)
    }

    fn accept_all() -> AcceptRule {
        Box::new(|_, level| {
            if level == PageLevel::Size1G {
                StatusCode::OperandInvalid.with_operand(1)
            } else {
                TdxStatus::SUCCESS
            }
        })
    }

    #[test]
    fn private_to_shared_orders_page_tables_then_mapgpa() {
        let c = conv();
        let a = Acceptor::new(Gpaw::Bits48, AcceptPolicy::default());
        let (mut t, mut h, log) = setup(chunked(), accept_all(), None);
        let r = range(0, 2 * M2);
        convert_on(&c, &mut t, &a, r, Visibility::Shared, &mut h).unwrap();
        assert_eq!(
            *log.borrow(),
            vec![
                Ev::SetVis(0, 2 * M2, Visibility::Shared),
                Ev::Flush(0, 2 * M2),
                Ev::MapGpa(SHARED48, 2 * M2),
                Ev::MapGpa(M2 | SHARED48, M2),
            ]
        );
        assert_eq!(c.stats().conversions, 1);
    }

    #[test]
    fn shared_to_private_orders_mapgpa_accept_then_page_tables() {
        let c = conv();
        let a = Acceptor::new(
            Gpaw::Bits48,
            AcceptPolicy {
                max_level: PageLevel::Size2M,
                ..AcceptPolicy::default()
            },
        );
        let (mut t, mut h, log) = setup(chunked(), accept_all(), None);
        let r = range(M2, 2 * M2 + K4);
        convert_on(&c, &mut t, &a, r, Visibility::Private, &mut h).unwrap();
        assert_eq!(
            *log.borrow(),
            vec![
                Ev::MapGpa(M2, M2 + K4),
                Ev::MapGpa(2 * M2, K4),
                Ev::Accept(M2, PageLevel::Size2M),
                Ev::Accept(2 * M2, PageLevel::Size4K),
                Ev::SetVis(M2, 2 * M2 + K4, Visibility::Private),
                Ev::Flush(M2, 2 * M2 + K4),
            ]
        );
    }

    /// MapGPA converts the first 2M chunk, then fails.
    fn fails_after_first_chunk(status: GhciStatus) -> MapRule {
        let mut calls = 0;
        Box::new(move |start, _| {
            calls += 1;
            if calls == 1 {
                out(GhciStatus::Retry, start + M2)
            } else if calls == 2 {
                out(status, 0)
            } else {
                ok()
            }
        })
    }

    #[test]
    fn to_shared_failure_without_rollback_reports_converted_and_unknown() {
        let c = Converter::new(
            Gpaw::Bits48,
            ConvertPolicy {
                rollback: false,
                ..ConvertPolicy::default()
            },
        );
        let a = Acceptor::new(Gpaw::Bits48, AcceptPolicy::default());
        let (mut t, mut h, _) = setup(
            fails_after_first_chunk(GhciStatus::GpaInUse),
            accept_all(),
            None,
        );
        let r = range(0, 4 * M2);
        let f = convert_on(&c, &mut t, &a, r, Visibility::Shared, &mut h).unwrap_err();
        assert_eq!(f.rollback, Rollback::Disabled);
        let parts: Vec<_> = f.states.iter().collect();
        assert_eq!(
            parts,
            [
                (range(0, M2), RangeState::Converted),
                (range(M2, 4 * M2), RangeState::Unknown)
            ]
        );
        assert_eq!(
            f.states.state_of(Gpa::new_truncate(M2 - K4)),
            Some(RangeState::Converted)
        );
    }

    #[test]
    fn to_shared_failure_rolls_back_and_reaccepts_the_converted_prefix() {
        let c = conv();
        let a = Acceptor::new(
            Gpaw::Bits48,
            AcceptPolicy {
                max_level: PageLevel::Size2M,
                ..AcceptPolicy::default()
            },
        );
        // Pages the host did not convert are still accepted.
        let accept: AcceptRule = Box::new(|gpa, _| {
            if gpa.as_u64() >= M2 {
                StatusCode::PageAlreadyAccepted.with_operand(1)
            } else {
                TdxStatus::SUCCESS
            }
        });
        let (mut t, mut h, log) = setup(
            fails_after_first_chunk(GhciStatus::InvalidOperand),
            accept,
            None,
        );
        let r = range(0, 3 * M2);
        let f = convert_on(&c, &mut t, &a, r, Visibility::Shared, &mut h).unwrap_err();
        assert_eq!(f.rollback, Rollback::Complete);
        // The converted prefix is back but zeroed; the rest never left and kept its content.
        assert_eq!(
            f.states,
            RangeStates::split(
                r,
                Gpa::new_truncate(M2),
                RangeState::Restored,
                RangeState::Original
            )
        );
        assert!(matches!(
            f.cause,
            ConvertCause::MapGpa(MapGpaError {
                kind: MapGpaErrorKind::Host(GhciStatus::InvalidOperand),
                ..
            })
        ));
        assert_eq!(
            log.borrow()[4..],
            [
                Ev::MapGpa(0, 3 * M2),
                Ev::Accept(0, PageLevel::Size2M),
                Ev::Accept(M2, PageLevel::Size2M),
                Ev::Accept(2 * M2, PageLevel::Size2M),
                Ev::SetVis(0, 3 * M2, Visibility::Private),
                Ev::Flush(0, 3 * M2),
            ]
        );
        assert_eq!(c.stats().rollbacks, 1);
        assert_eq!(c.stats().failures, 1);
    }

    /// Regression: a host that converts the whole range and then answers an error at the
    /// start. The rollback finds every page pending (accepted fresh, not already accepted), so
    /// the whole range is reported restored with its content gone, not original.
    #[test]
    fn to_shared_rollback_reports_content_lost_where_the_host_converted_anyway() {
        let c = conv();
        let a = Acceptor::new(Gpaw::Bits48, AcceptPolicy::default());
        let mut calls = 0;
        let map: MapRule = Box::new(move |_, _| {
            calls += 1;
            if calls == 1 {
                out(GhciStatus::GpaInUse, 0)
            } else {
                ok()
            }
        });
        let (mut t, mut h, _) = setup(map, accept_all(), None);
        let r = range(0, 2 * M2);
        let f = convert_on(&c, &mut t, &a, r, Visibility::Shared, &mut h).unwrap_err();
        assert_eq!(f.rollback, Rollback::Complete);
        assert_eq!(f.states, RangeStates::whole(r, RangeState::Restored));
    }

    #[test]
    fn to_shared_page_table_failure_changes_nothing() {
        let c = conv();
        let a = Acceptor::new(Gpaw::Bits48, AcceptPolicy::default());
        let (mut t, mut h, log) = setup(chunked(), accept_all(), Some(Visibility::Shared));
        let r = range(0, M2);
        let f = convert_on(&c, &mut t, &a, r, Visibility::Shared, &mut h).unwrap_err();
        assert_eq!(f.cause, ConvertCause::PageTable(HookError(-12)));
        assert_eq!(f.rollback, Rollback::NotNeeded);
        assert_eq!(f.states, RangeStates::whole(r, RangeState::Original));
        assert!(log.borrow().is_empty());
    }

    fn acceptor_2m() -> Acceptor {
        Acceptor::new(
            Gpaw::Bits48,
            AcceptPolicy {
                max_level: PageLevel::Size2M,
                ..AcceptPolicy::default()
            },
        )
    }

    fn shared_maps(log: &Log) -> Vec<(u64, u64)> {
        maps(log)
            .into_iter()
            .filter(|&(s, _)| s & SHARED48 != 0)
            .collect()
    }

    /// Regression: a private page inside a to-private request answers ALREADY_ACCEPTED. It was
    /// private: the conversion completes and nothing is given to the host.
    #[test]
    fn to_private_keeps_a_private_page_inside_the_range() {
        let c = conv();
        let a = acceptor_2m();
        let accept: AcceptRule = Box::new(|gpa, _| {
            if gpa.as_u64() == M2 {
                StatusCode::PageAlreadyAccepted.status()
            } else {
                TdxStatus::SUCCESS
            }
        });
        let (mut t, mut h, log) = setup(Box::new(|_, _| ok()), accept, None);
        let r = range(0, 3 * M2);
        convert_on(&c, &mut t, &a, r, Visibility::Private, &mut h).unwrap();
        assert!(shared_maps(&log).is_empty());
        assert!(log
            .borrow()
            .contains(&Ev::SetVis(0, 3 * M2, Visibility::Private)));
    }

    /// Regression: a to-private rollback gives back exactly what the call made private; the
    /// private page it found stays private, the part never visited is reported unknown.
    #[test]
    fn to_private_rollback_gives_back_only_what_it_made_private() {
        let c = conv();
        let a = acceptor_2m();
        let accept: AcceptRule = Box::new(|gpa, _| match gpa.as_u64() {
            g if g == M2 => StatusCode::PageAlreadyAccepted.status(),
            g if g == 2 * M2 => StatusCode::EptWalkFailed.with_operand(1),
            _ => TdxStatus::SUCCESS,
        });
        let (mut t, mut h, log) = setup(Box::new(|_, _| ok()), accept, None);
        let r = range(0, 4 * M2);
        let f = convert_on(&c, &mut t, &a, r, Visibility::Private, &mut h).unwrap_err();
        assert!(matches!(
            f.cause,
            ConvertCause::Accept(AcceptError::Module { .. })
        ));
        assert_eq!(shared_maps(&log), [(SHARED48, M2)]);
        let parts: Vec<_> = f.states.iter().collect();
        assert_eq!(
            parts,
            [
                (range(0, M2), RangeState::Restored),
                (range(M2, 2 * M2), RangeState::Original),
                (range(2 * M2, 4 * M2), RangeState::Unknown),
            ]
        );
        assert!(matches!(f.rollback, Rollback::Failed(_)));
        // The page tables were never switched.
        assert!(!log.borrow().iter().any(|e| matches!(e, Ev::SetVis(..))));
    }

    /// A MapGPA that stops part way: the host-converted head is accepted to learn what it
    /// held, then given back; the rest, never converted, is given back too.
    #[test]
    fn to_private_map_gpa_failure_rolls_back_both_parts() {
        let c = conv();
        let a = acceptor_2m();
        let (mut t, mut h, log) = setup(
            fails_after_first_chunk(GhciStatus::GpaInUse),
            accept_all(),
            None,
        );
        let r = range(0, 4 * M2);
        let f = convert_on(&c, &mut t, &a, r, Visibility::Private, &mut h).unwrap_err();
        assert_eq!(f.rollback, Rollback::Complete);
        let parts: Vec<_> = f.states.iter().collect();
        assert_eq!(
            parts,
            [
                (range(0, M2), RangeState::Restored),
                (range(M2, 4 * M2), RangeState::Original),
            ]
        );
        assert_eq!(shared_maps(&log)[0], (SHARED48, M2));
    }

    #[test]
    fn to_shared_flushes_caches_before_the_page_tables() {
        struct Order(Vec<&'static str>);
        impl ConvertHooks for Order {
            type Error = HookError;
            fn flush_caches(&mut self, _: GpaRange) {
                self.0.push("caches");
            }
            fn set_visibility(&mut self, _: GpaRange, _: Visibility) -> Result<(), HookError> {
                self.0.push("page tables");
                Ok(())
            }
            fn flush_tlb(&mut self, _: GpaRange) {
                self.0.push("tlb");
            }
        }
        let c = conv();
        let a = acceptor_2m();
        let (mut t, _) = fake(Box::new(|_, _| ok()));
        let mut h = Order(Vec::new());
        convert_on(&c, &mut t, &a, range(0, M2), Visibility::Shared, &mut h).unwrap();
        assert_eq!(h.0, ["caches", "page tables", "tlb"]);
    }

    #[test]
    fn to_private_failures_without_rollback_report_states() {
        let c = Converter::new(
            Gpaw::Bits48,
            ConvertPolicy {
                rollback: false,
                ..ConvertPolicy::default()
            },
        );
        let a = Acceptor::new(Gpaw::Bits48, AcceptPolicy::default());
        let r = range(0, 4 * M2);
        // MapGPA fails after one chunk.
        let (mut t, mut h, _) = setup(
            fails_after_first_chunk(GhciStatus::GpaInUse),
            accept_all(),
            None,
        );
        let f = convert_on(&c, &mut t, &a, r, Visibility::Private, &mut h).unwrap_err();
        assert_eq!(
            f.states,
            RangeStates::split(
                r,
                Gpa::new_truncate(M2),
                RangeState::HostConverted,
                RangeState::Unknown
            )
        );
        // The page-table hook fails after a complete accept.
        let (mut t, mut h, _) = setup(chunked(), accept_all(), Some(Visibility::Private));
        let f = convert_on(&c, &mut t, &a, r, Visibility::Private, &mut h).unwrap_err();
        assert_eq!(f.cause, ConvertCause::PageTable(HookError(-12)));
        assert_eq!(f.states, RangeStates::whole(r, RangeState::HostConverted));
    }

    #[test]
    fn failed_rollback_is_reported_as_unknown() {
        let c = conv();
        let a = Acceptor::new(Gpaw::Bits48, AcceptPolicy::default());
        let (mut t, mut h, _) = setup(
            Box::new(|_, _| out(GhciStatus::GpaInUse, 0)),
            accept_all(),
            None,
        );
        let r = range(0, M2);
        let f = convert_on(&c, &mut t, &a, r, Visibility::Private, &mut h).unwrap_err();
        assert!(matches!(
            f.rollback,
            Rollback::Failed(ConvertCause::MapGpa(_))
        ));
        assert_eq!(f.states, RangeStates::whole(r, RangeState::Unknown));
    }
}
