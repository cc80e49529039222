//! `TDG.VP.VMCALL<MapGPA>` with RETRY handling, and whole private <-> shared conversions.
//!
//! [`Converter::map_gpa`] asks the host to change the visibility of `[start, end)`. Hosts answer
//! RETRY routinely (KVM converts in 2 MiB chunks and returns whenever the vCPU has a pending
//! event), with R11 = the GPA to resume from. The resume GPA is trusted only if it carries the
//! same shared bit as the request, is 4K aligned and lies in `[current, end)`; progress resets the
//! no-progress counter; [`ConvertPolicy::no_progress_retries`] bounds a host that never advances.
//! Misaligned, empty, overflowing or shared-bit-crossing ranges are refused before any call.
//!
//! [`Converter::convert`] orders the whole conversion as Linux does, through [`ConvertHooks`]:
//!
//! - private -> shared: page-table change, TLB flush, then MapGPA(shared);
//! - shared -> private: MapGPA(private), ACCEPT largest level first, then page-table change and
//!   TLB flush.
//!
//! On failure it reports which sub-range is in which [`RangeState`] and, unless the policy turns
//! it off, rolls back to the original visibility (a MapGPA back, re-accepting what had been
//! given up, restoring the page tables). Content of pages that crossed to the other side is not
//! preserved (TDX never preserves it across a conversion); content of pages the host never
//! converted is.
//!
//! Not here: deciding which memory to convert, and the host side of MapGPA.

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

/// Conversion behaviour.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConvertPolicy {
    /// Consecutive RETRY answers without progress tolerated by one MapGPA loop.
    pub no_progress_retries: u32,
    /// Roll a failed conversion back to the original visibility.
    pub rollback: bool,
}

impl Default for ConvertPolicy {
    fn default() -> Self {
        ConvertPolicy {
            no_progress_retries: DEFAULT_NO_PROGRESS_RETRIES,
            rollback: true,
        }
    }
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

/// What the embedder does around a conversion: its page tables and TLB.
pub trait ConvertHooks {
    /// Makes the guest's mappings of `range` use `to` (shared: map through the shared alias, or
    /// set the shared bit in the PTEs; private: the reverse). Must be all-or-nothing: on error,
    /// nothing was changed.
    ///
    /// # Errors
    /// The embedder's error; the conversion then reports it.
    fn set_visibility(&mut self, range: GpaRange, to: Visibility) -> Result<(), HookError>;

    /// Flushes the TLB (and, where the platform needs it, caches) for `range`.
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

/// A range split into at most two consecutive parts with their states.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RangeStates {
    parts: [Option<(GpaRange, RangeState)>; 2],
}

impl RangeStates {
    /// The whole range in one state.
    pub const fn whole(range: GpaRange, state: RangeState) -> RangeStates {
        RangeStates {
            parts: [Some((range, state)), None],
        }
    }

    /// `[start, at)` in `head`, `[at, end)` in `tail`; empty parts are dropped.
    pub fn split(range: GpaRange, at: Gpa, head: RangeState, tail: RangeState) -> RangeStates {
        let h = range.head(at).map(|r| (r, head));
        let t = range.tail(at).map(|r| (r, tail));
        match (h, t) {
            (Some(h), t) => RangeStates {
                parts: [Some(h), t],
            },
            (None, t) => RangeStates { parts: [t, None] },
        }
    }

    /// The parts, in address order.
    pub fn iter(&self) -> impl Iterator<Item = (GpaRange, RangeState)> + '_ {
        self.parts.iter().flatten().copied()
    }

    /// The state of the part holding `gpa`, if any.
    pub fn state_of(&self, gpa: Gpa) -> Option<RangeState> {
        self.iter().find(|(r, _)| r.contains(gpa)).map(|(_, s)| s)
    }
}

/// Which step of a conversion failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConvertCause {
    /// The range was refused before anything was done.
    InvalidRange(AddrError),
    /// The page-table hook failed.
    PageTable(HookError),
    /// The MapGPA loop failed.
    MapGpa(MapGpaError),
    /// Accepting the range (shared -> private) failed.
    Accept(AcceptError),
}

impl fmt::Display for ConvertCause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConvertCause::InvalidRange(e) => write!(f, "invalid range: {e}"),
            ConvertCause::PageTable(e) => write!(f, "page-table change failed ({})", e.0),
            ConvertCause::MapGpa(e) => write!(f, "{e}"),
            ConvertCause::Accept(e) => write!(f, "{e}"),
        }
    }
}

/// What happened to the rollback of a failed conversion.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rollback {
    /// Nothing had changed; nothing to undo.
    NotNeeded,
    /// The policy turned rollback off.
    Disabled,
    /// The range is back in its original visibility.
    Complete,
    /// The rollback itself failed; the states are what could be established.
    Failed(ConvertCause),
}

/// A failed conversion: the first cause, what the rollback did, and the resulting states.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConvertFailure {
    /// The range asked for.
    pub range: GpaRange,
    /// The visibility asked for.
    pub to: Visibility,
    /// The first failure.
    pub cause: ConvertCause,
    /// What rollback did.
    pub rollback: Rollback,
    /// The state of every part of the range now.
    pub states: RangeStates,
}

impl fmt::Display for ConvertFailure {
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
                    let valid = resume & self.gpaw.shared_bit() == bit
                        && addr & 0xFFF == 0
                        && addr >= cur
                        && addr < end;
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
    /// # Errors
    /// [`ConvertFailure`] with the first cause, the rollback outcome and the resulting states.
    pub fn convert<T: Tdcall + ?Sized, H: ConvertHooks + ?Sized>(
        &self,
        tdcall: &mut T,
        acceptor: &Acceptor,
        range: GpaRange,
        to: Visibility,
        hooks: &mut H,
    ) -> Result<(), ConvertFailure> {
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
                if f.rollback == Rollback::Complete {
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
    ) -> Result<(), ConvertFailure> {
        let to = Visibility::Shared;
        let failure = |cause, rollback, states| ConvertFailure {
            range,
            to,
            cause,
            rollback,
            states,
        };
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
    ) -> Result<(), ConvertFailure> {
        let to = Visibility::Private;
        let failure = |cause, rollback, states| ConvertFailure {
            range,
            to,
            cause,
            rollback,
            states,
        };
        // Each step's failure: the cause and the states if nothing is rolled back.
        let (cause, states) = 'steps: {
            if let Err(e) = self.map_gpa(tdcall, range, to) {
                let states =
                    RangeStates::split(range, e.at, RangeState::HostConverted, RangeState::Unknown);
                break 'steps (ConvertCause::MapGpa(e), states);
            }
            if let Err(e) = acceptor.accept_range(tdcall, range) {
                let states = RangeStates::whole(range, RangeState::HostConverted);
                break 'steps (ConvertCause::Accept(e), states);
            }
            if let Err(e) = hooks.set_visibility(range, to) {
                let states = RangeStates::whole(range, RangeState::HostConverted);
                break 'steps (ConvertCause::PageTable(e), states);
            }
            hooks.flush_tlb(range);
            return Ok(());
        };
        if !self.policy.rollback {
            return Err(failure(cause, Rollback::Disabled, states));
        }
        // The guest's page tables still map the shared alias: a MapGPA back to shared restores
        // the original visibility (accepted pages are given up; they held no data yet).
        match self.map_gpa(tdcall, range, Visibility::Shared) {
            Ok(()) => Err(failure(
                cause,
                Rollback::Complete,
                RangeStates::whole(range, RangeState::Original),
            )),
            Err(e) => Err(failure(
                cause,
                Rollback::Failed(ConvertCause::MapGpa(e)),
                RangeStates::whole(range, RangeState::Unknown),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
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
                rollback: true,
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
        let f = c
            .convert(&mut t, &a, r, Visibility::Shared, &mut h)
            .unwrap_err();
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
        c.convert(&mut t, &a, r, Visibility::Shared, &mut h)
            .unwrap();
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
        c.convert(&mut t, &a, r, Visibility::Private, &mut h)
            .unwrap();
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
        let f = c
            .convert(&mut t, &a, r, Visibility::Shared, &mut h)
            .unwrap_err();
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
        let f = c
            .convert(&mut t, &a, r, Visibility::Shared, &mut h)
            .unwrap_err();
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
        let f = c
            .convert(&mut t, &a, r, Visibility::Shared, &mut h)
            .unwrap_err();
        assert_eq!(f.rollback, Rollback::Complete);
        assert_eq!(f.states, RangeStates::whole(r, RangeState::Restored));
    }

    #[test]
    fn to_shared_page_table_failure_changes_nothing() {
        let c = conv();
        let a = Acceptor::new(Gpaw::Bits48, AcceptPolicy::default());
        let (mut t, mut h, log) = setup(chunked(), accept_all(), Some(Visibility::Shared));
        let r = range(0, M2);
        let f = c
            .convert(&mut t, &a, r, Visibility::Shared, &mut h)
            .unwrap_err();
        assert_eq!(f.cause, ConvertCause::PageTable(HookError(-12)));
        assert_eq!(f.rollback, Rollback::NotNeeded);
        assert_eq!(f.states, RangeStates::whole(r, RangeState::Original));
        assert!(log.borrow().is_empty());
    }

    #[test]
    fn to_private_accept_failure_rolls_back_with_mapgpa_shared() {
        let c = conv();
        let a = Acceptor::new(
            Gpaw::Bits48,
            AcceptPolicy {
                max_level: PageLevel::Size2M,
                ..AcceptPolicy::default()
            },
        );
        let accept: AcceptRule = Box::new(|gpa, _| {
            if gpa.as_u64() == M2 {
                StatusCode::PageAlreadyAccepted.status()
            } else {
                TdxStatus::SUCCESS
            }
        });
        let (mut t, mut h, log) = setup(Box::new(|_, _| ok()), accept, None);
        let r = range(0, 2 * M2);
        let f = c
            .convert(&mut t, &a, r, Visibility::Private, &mut h)
            .unwrap_err();
        assert!(matches!(
            f.cause,
            ConvertCause::Accept(AcceptError::AlreadyAccepted { .. })
        ));
        assert_eq!(f.rollback, Rollback::Complete);
        assert_eq!(f.states, RangeStates::whole(r, RangeState::Original));
        assert_eq!(*log.borrow().last().unwrap(), Ev::MapGpa(SHARED48, 2 * M2));
        // The page tables were never switched.
        assert!(!log.borrow().iter().any(|e| matches!(e, Ev::SetVis(..))));
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
        let f = c
            .convert(&mut t, &a, r, Visibility::Private, &mut h)
            .unwrap_err();
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
        let f = c
            .convert(&mut t, &a, r, Visibility::Private, &mut h)
            .unwrap_err();
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
        let f = c
            .convert(&mut t, &a, r, Visibility::Private, &mut h)
            .unwrap_err();
        assert!(matches!(
            f.rollback,
            Rollback::Failed(ConvertCause::MapGpa(_))
        ));
        assert_eq!(f.states, RangeStates::whole(r, RangeState::Unknown));
    }
}
