//! The invalidation hook: how a guest_memfd tells the MMUs mapping it to let go of a range.
//!
//! A conversion or hole punch calls, for each affected run of pages:
//! 1. [`InvalidateHook::prepare`] before the point of no return. It may fail (the private MMU
//!    cannot allocate the Secure-EPT pages a split needs; BLOCK failed). On failure the
//!    operation calls [`InvalidateHook::abort`] for every range it prepared, *including the one
//!    that failed*, in reverse order, and changes nothing.
//! 2. [`InvalidateHook::invalidate`]: the point of no return. It cannot fail; pages it could
//!    not zap (a REMOVE or DEMOTE that failed) are reported through the poison sink, and the
//!    guest_memfd records them as poisoned.
//!
//! This module also has two ready implementations: [`NoopHook`] and, with the `testing`
//! feature, `RecordingHook` (for tests: records calls, fails a chosen prepare, reports chosen
//! pages as poisoned). It does not contain the private MMU itself.

#[cfg(feature = "testing")]
use std::collections::BTreeSet;

use accept::abi::{Gpa, GpaRange, TdxStatus};

/// Why a range is being invalidated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum InvalidateReason {
    /// Private -> shared: the private Secure-EPT mappings must go (destructive for TDX).
    ToShared,
    /// Shared -> private: the shared mappings must go.
    ToPrivate,
    /// Hole punch: every mapping must go and the backing is released.
    PunchHole,
}

/// What a hook call is part of.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct InvalidateCtx {
    /// Why.
    pub reason: InvalidateReason,
    /// BLOCK the range in `prepare` (and UNBLOCK it in `abort`), rather than only
    /// preallocating.
    pub block_first: bool,
}

/// A failure of [`InvalidateHook::prepare`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HookError {
    /// The hook could not allocate what it needs (e.g. Secure-EPT pages for a DEMOTE).
    #[error("the invalidation hook is out of memory")]
    NoMemory,
    /// A SEAMCALL (e.g. TDH.MEM.RANGE.BLOCK) failed with this status.
    #[error("SEAMCALL failed: {0}")]
    Seamcall(TdxStatus),
    /// Contention: try again later.
    #[error("the invalidation hook is busy")]
    Busy,
}

/// The consumer of invalidations: typically the private MMU (and the shared MMU) of the TD.
pub trait InvalidateHook {
    /// Prepares to invalidate `range`: preallocates, and BLOCKs when `ctx.block_first`.
    ///
    /// # Errors
    /// Any [`HookError`]; the operation is then aborted and changes nothing.
    fn prepare(&mut self, range: GpaRange, ctx: InvalidateCtx) -> Result<(), HookError>;

    /// Undoes whatever `prepare` did for `range` (UNBLOCK, free preallocations). Also called
    /// for the range whose `prepare` failed.
    fn abort(&mut self, range: GpaRange, ctx: InvalidateCtx);

    /// Zaps every mapping of `range`. Cannot fail: each 4K page that could not be zapped is
    /// reported once through `poison`.
    fn invalidate(&mut self, range: GpaRange, ctx: InvalidateCtx, poison: &mut dyn FnMut(Gpa));
}

/// A hook with nothing mapped: every call succeeds and does nothing.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NoopHook;

impl InvalidateHook for NoopHook {
    fn prepare(&mut self, _range: GpaRange, _ctx: InvalidateCtx) -> Result<(), HookError> {
        Ok(())
    }

    fn abort(&mut self, _range: GpaRange, _ctx: InvalidateCtx) {}

    fn invalidate(&mut self, _range: GpaRange, _ctx: InvalidateCtx, _poison: &mut dyn FnMut(Gpa)) {}
}

/// One call seen by a [`RecordingHook`].
#[cfg(feature = "testing")]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HookCall {
    /// `prepare(range)`.
    Prepare(GpaRange, InvalidateCtx),
    /// `abort(range)`.
    Abort(GpaRange, InvalidateCtx),
    /// `invalidate(range)`.
    Invalidate(GpaRange, InvalidateCtx),
}

/// A scriptable hook for tests: records calls, fails the n-th `prepare`, and reports the
/// configured pages as poisoned when an invalidated range covers them.
#[cfg(feature = "testing")]
#[derive(Debug, Clone, Default)]
pub struct RecordingHook {
    /// Every call, in order.
    pub calls: Vec<HookCall>,
    /// Fail the `prepare` call with this index (counted over the hook's life) with `fail_with`.
    pub fail_prepare_at: Option<usize>,
    /// The error a failing `prepare` returns.
    pub fail_with: Option<HookError>,
    /// Pages (4K aligned GPAs) reported as poisoned when invalidated. Reported each time.
    pub poison_pages: BTreeSet<u64>,
    prepares: usize,
}

#[cfg(feature = "testing")]
impl RecordingHook {
    /// A hook that fails nothing and poisons nothing.
    pub fn new() -> RecordingHook {
        RecordingHook::default()
    }

    /// Number of `prepare` calls so far.
    pub fn prepares(&self) -> usize {
        self.prepares
    }

    /// The ranges invalidated so far.
    pub fn invalidated(&self) -> Vec<GpaRange> {
        self.calls
            .iter()
            .filter_map(|c| match c {
                HookCall::Invalidate(r, _) => Some(*r),
                _ => None,
            })
            .collect()
    }
}

#[cfg(feature = "testing")]
impl InvalidateHook for RecordingHook {
    fn prepare(&mut self, range: GpaRange, ctx: InvalidateCtx) -> Result<(), HookError> {
        self.calls.push(HookCall::Prepare(range, ctx));
        let index = self.prepares;
        self.prepares = self.prepares.saturating_add(1);
        if self.fail_prepare_at == Some(index) {
            return Err(self.fail_with.clone().unwrap_or(HookError::NoMemory));
        }
        Ok(())
    }

    fn abort(&mut self, range: GpaRange, ctx: InvalidateCtx) {
        self.calls.push(HookCall::Abort(range, ctx));
    }

    fn invalidate(&mut self, range: GpaRange, ctx: InvalidateCtx, poison: &mut dyn FnMut(Gpa)) {
        self.calls.push(HookCall::Invalidate(range, ctx));
        let (s, e) = (range.start().as_u64(), range.end().as_u64());
        for &page in self.poison_pages.range(s..e) {
            if let Ok(gpa) = Gpa::try_new(page) {
                poison(gpa);
            }
        }
    }
}
