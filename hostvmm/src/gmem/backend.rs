//! The conversion-backend seam: what the VMM's MapGPA handler and the private MMU ask of the
//! memory behind a TD.
//!
//! [`ConversionBackend`] is everything the host half needs: shareability (to validate and to
//! check invariants), all-or-nothing conversion and hole punching with the private MMU's
//! invalidation as the [`InvalidateHook`], the fault path's page lookup, and error pages.
//! [`GuestMemfd`], the guest_memfd model, is one implementation; a KVM_SET_MEMORY_ATTRIBUTES +
//! guest_memfd handler, a real kernel guest_memfd, or a recording wrapper
//! ([`RecordingBackend`]) are others, and run under every scenario and the hostile catalogue
//! through `Host::with_backend`.

use accept::abi::{Gpa, GpaRange, PageLevel};

use super::error::{ConvertError, GmemError};
use super::hook::{InvalidateCtx, InvalidateHook};
use super::memfd::{ConvertMode, ConvertReport, GuestMemfd, PfnInfo, PunchReport};
use super::ranges::Shareability;

/// The memory behind one TD, as the host half uses it.
///
/// The contract an implementation keeps, which the host half relies on:
/// - `convert` and `punch_hole` are all-or-nothing: every check and allocation happens before
///   `hook.invalidate`, the point of no return; an error means nothing changed and
///   `hook.abort` was called for every `hook.prepare` that succeeded;
/// - pages reported through the `poison` callback of `hook.invalidate` are never handed out
///   again by `get_pfn`;
/// - `get_pfn` answers only for private pages; the HPA it gives stays the page's until the
///   page is converted or punched.
pub trait ConversionBackend: Send + Sync {
    /// Bytes of guest memory (GPAs `[0, size)`).
    fn size(&self) -> u64;

    /// The shareability of the page holding `at`.
    ///
    /// # Errors
    /// [`GmemError::OutOfRange`].
    fn shareability(&self, at: Gpa) -> Result<Shareability, GmemError>;

    /// Whether all of `range` is `state`.
    fn is_uniform(&self, range: GpaRange, state: Shareability) -> bool;

    /// The shareability runs, in GPA order.
    fn ranges(&self) -> Vec<(GpaRange, Shareability)>;

    /// Converts `range` to `to`, all-or-nothing, zapping through `hook`.
    ///
    /// # Errors
    /// [`ConvertError`]; nothing changed.
    fn convert(
        &mut self,
        range: GpaRange,
        to: Shareability,
        mode: ConvertMode,
        hook: &mut dyn InvalidateHook,
    ) -> Result<ConvertReport, ConvertError>;

    /// Punches `range` out (fallocate PUNCH_HOLE), zapping its private mappings through `hook`.
    ///
    /// # Errors
    /// [`ConvertError`]; nothing changed.
    fn punch_hole(
        &mut self,
        range: GpaRange,
        hook: &mut dyn InvalidateHook,
    ) -> Result<PunchReport, ConvertError>;

    /// The private page holding `at`, allocating its backing (`kvm_gmem_get_pfn`).
    ///
    /// # Errors
    /// [`GmemError`]: shared, poisoned, out of memory, or a conversion pending on it.
    fn get_pfn(&mut self, at: Gpa) -> Result<PfnInfo, GmemError>;

    /// The largest level the private mapping around `at` may use: uniformly private and in one
    /// folio.
    ///
    /// # Errors
    /// As [`ConversionBackend::get_pfn`].
    fn max_private_level(&self, at: Gpa) -> Result<PageLevel, GmemError>;

    /// What the fault path asks in one step: [`ConversionBackend::get_pfn`], then
    /// [`ConversionBackend::max_private_level`] of the same page. A backend whose lookups are
    /// costly answers both from one lookup.
    ///
    /// # Errors
    /// As [`ConversionBackend::get_pfn`].
    fn fault_pfn(&mut self, at: Gpa) -> Result<(PfnInfo, PageLevel), GmemError> {
        let pfn = self.get_pfn(at)?;
        Ok((pfn, self.max_private_level(at)?))
    }

    /// [`ConversionBackend::fault_pfn`] through a shared reference, for a backend whose fault
    /// path may run on several vCPUs at once (the kernel's `kvm_gmem_get_pfn` takes the
    /// invalidation lock shared). The host then holds the backend's lock shared for it, and
    /// exclusive for everything else. `None` (the default): the backend has no such path, and
    /// the host calls [`ConversionBackend::fault_pfn`] under the exclusive lock.
    fn fault_pfn_shared(&self, _at: Gpa) -> Option<Result<(PfnInfo, PageLevel), GmemError>> {
        None
    }

    /// Records the page holding `at` as an error page; `Ok(true)` when it was not one yet.
    ///
    /// # Errors
    /// [`GmemError`] for a page outside the memory or never populated.
    fn poison(&mut self, at: Gpa) -> Result<bool, GmemError>;

    /// Whether the page holding `at` is an error page.
    fn is_poisoned(&self, at: Gpa) -> bool;

    /// Error pages recorded so far.
    fn poisoned_pages(&self) -> u64;

    /// Pages whose conversion to private waits for the host's last reference (seed 004);
    /// 0 for a backend that never defers.
    fn pending_count(&self) -> usize {
        0
    }
}

impl ConversionBackend for GuestMemfd {
    fn size(&self) -> u64 {
        GuestMemfd::size(self)
    }
    fn shareability(&self, at: Gpa) -> Result<Shareability, GmemError> {
        GuestMemfd::shareability(self, at)
    }
    fn is_uniform(&self, range: GpaRange, state: Shareability) -> bool {
        GuestMemfd::is_uniform(self, range, state)
    }
    fn ranges(&self) -> Vec<(GpaRange, Shareability)> {
        GuestMemfd::ranges(self)
    }
    fn convert(
        &mut self,
        range: GpaRange,
        to: Shareability,
        mode: ConvertMode,
        hook: &mut dyn InvalidateHook,
    ) -> Result<ConvertReport, ConvertError> {
        GuestMemfd::convert(self, range, to, mode, hook)
    }
    fn punch_hole(
        &mut self,
        range: GpaRange,
        hook: &mut dyn InvalidateHook,
    ) -> Result<PunchReport, ConvertError> {
        GuestMemfd::punch_hole(self, range, hook)
    }
    fn get_pfn(&mut self, at: Gpa) -> Result<PfnInfo, GmemError> {
        GuestMemfd::get_pfn(self, at)
    }
    fn max_private_level(&self, at: Gpa) -> Result<PageLevel, GmemError> {
        GuestMemfd::max_private_level(self, at)
    }
    fn fault_pfn(&mut self, at: Gpa) -> Result<(PfnInfo, PageLevel), GmemError> {
        GuestMemfd::fault_pfn(self, at)
    }
    fn fault_pfn_shared(&self, at: Gpa) -> Option<Result<(PfnInfo, PageLevel), GmemError>> {
        Some(GuestMemfd::fault_pfn_shared(self, at))
    }
    fn poison(&mut self, at: Gpa) -> Result<bool, GmemError> {
        GuestMemfd::poison(self, at)
    }
    fn is_poisoned(&self, at: Gpa) -> bool {
        GuestMemfd::is_poisoned(self, at)
    }
    fn poisoned_pages(&self) -> u64 {
        GuestMemfd::poisoned_pages(self)
    }
    fn pending_count(&self) -> usize {
        GuestMemfd::pending_count(self)
    }
}

/// A call a [`RecordingBackend`] saw, with its outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackendCall {
    /// A conversion and whether it succeeded.
    Convert {
        /// The range.
        range: GpaRange,
        /// The target.
        to: Shareability,
        /// `Ok` or the error.
        result: Result<(), ConvertError>,
    },
    /// A hole punch and whether it succeeded.
    PunchHole {
        /// The range.
        range: GpaRange,
        /// `Ok` or the error.
        result: Result<(), ConvertError>,
    },
    /// A page recorded as an error page.
    Poison {
        /// The page.
        at: Gpa,
    },
}

/// A backend that records every conversion, hole punch and error page, and passes each call
/// to the backend it wraps. It checks the seam's contract as calls go: a conversion that
/// reports success leaves its range uniform in the target state
/// ([`RecordingBackend::contract_violations`]).
#[derive(Debug)]
pub struct RecordingBackend<B> {
    inner: B,
    calls: Vec<BackendCall>,
    violations: Vec<String>,
}

impl<B: ConversionBackend> RecordingBackend<B> {
    /// Wraps `inner`.
    pub fn new(inner: B) -> RecordingBackend<B> {
        RecordingBackend {
            inner,
            calls: Vec::new(),
            violations: Vec::new(),
        }
    }

    /// The calls so far.
    pub fn calls(&self) -> &[BackendCall] {
        &self.calls
    }

    /// Broken promises seen so far (empty for a correct backend).
    pub fn contract_violations(&self) -> &[String] {
        &self.violations
    }

    /// The wrapped backend.
    pub fn inner(&self) -> &B {
        &self.inner
    }
}

/// A hook that passes every call on and remembers whether `invalidate` ran.
struct Watch<'h> {
    hook: &'h mut dyn InvalidateHook,
    invalidated: bool,
}

impl InvalidateHook for Watch<'_> {
    fn prepare(
        &mut self,
        range: GpaRange,
        ctx: InvalidateCtx,
    ) -> Result<(), super::hook::HookError> {
        self.hook.prepare(range, ctx)
    }
    fn abort(&mut self, range: GpaRange, ctx: InvalidateCtx) {
        self.hook.abort(range, ctx)
    }
    fn invalidate(&mut self, range: GpaRange, ctx: InvalidateCtx, poison: &mut dyn FnMut(Gpa)) {
        self.invalidated = true;
        self.hook.invalidate(range, ctx, poison)
    }
}

impl<B: ConversionBackend> ConversionBackend for RecordingBackend<B> {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn shareability(&self, at: Gpa) -> Result<Shareability, GmemError> {
        self.inner.shareability(at)
    }
    fn is_uniform(&self, range: GpaRange, state: Shareability) -> bool {
        self.inner.is_uniform(range, state)
    }
    fn ranges(&self) -> Vec<(GpaRange, Shareability)> {
        self.inner.ranges()
    }
    fn convert(
        &mut self,
        range: GpaRange,
        to: Shareability,
        mode: ConvertMode,
        hook: &mut dyn InvalidateHook,
    ) -> Result<ConvertReport, ConvertError> {
        let before = self.inner.ranges();
        let mut watch = Watch {
            hook,
            invalidated: false,
        };
        let result = self.inner.convert(range, to, mode, &mut watch);
        match &result {
            Ok(_) if !self.inner.is_uniform(range, to) && self.inner.pending_count() == 0 => {
                self.violations.push(format!(
                    "convert {range} to {to:?} succeeded but is not uniform"
                ));
            }
            Err(e) if self.inner.ranges() != before => {
                self.violations.push(format!(
                    "convert {range} failed ({e}) but changed shareability"
                ));
            }
            Err(e) if watch.invalidated => {
                self.violations.push(format!(
                    "convert {range} failed ({e}) after the point of no return"
                ));
            }
            _ => {}
        }
        self.calls.push(BackendCall::Convert {
            range,
            to,
            result: result.as_ref().map(|_| ()).map_err(Clone::clone),
        });
        result
    }
    fn punch_hole(
        &mut self,
        range: GpaRange,
        hook: &mut dyn InvalidateHook,
    ) -> Result<PunchReport, ConvertError> {
        let result = self.inner.punch_hole(range, hook);
        self.calls.push(BackendCall::PunchHole {
            range,
            result: result.as_ref().map(|_| ()).map_err(Clone::clone),
        });
        result
    }
    fn get_pfn(&mut self, at: Gpa) -> Result<PfnInfo, GmemError> {
        self.inner.get_pfn(at)
    }
    fn fault_pfn(&mut self, at: Gpa) -> Result<(PfnInfo, PageLevel), GmemError> {
        self.inner.fault_pfn(at)
    }
    fn fault_pfn_shared(&self, at: Gpa) -> Option<Result<(PfnInfo, PageLevel), GmemError>> {
        self.inner.fault_pfn_shared(at)
    }
    fn max_private_level(&self, at: Gpa) -> Result<PageLevel, GmemError> {
        self.inner.max_private_level(at)
    }
    fn poison(&mut self, at: Gpa) -> Result<bool, GmemError> {
        let r = self.inner.poison(at);
        if r == Ok(true) {
            self.calls.push(BackendCall::Poison { at });
        }
        r
    }
    fn is_poisoned(&self, at: Gpa) -> bool {
        self.inner.is_poisoned(at)
    }
    fn poisoned_pages(&self) -> u64 {
        self.inner.poisoned_pages()
    }
    fn pending_count(&self) -> usize {
        self.inner.pending_count()
    }
}
