//! Exact counters of every SEAMCALL, TDCALL and guest memory access, by kind and outcome.
//!
//! Counters are relaxed atomics, striped over threads: cheap on the hot path and exact once
//! the callers have joined.

use accept::abi::{PageLevel, StatusCode, TdxStatus};

use crate::counters::Striped;

/// A module call, host (SEAMCALL) or guest (TDCALL).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CallKind {
    /// TDH.MEM.PAGE.ADD.
    PageAdd,
    /// TDH.MEM.SEPT.ADD.
    SeptAdd,
    /// TDH.MEM.PAGE.AUG.
    PageAug,
    /// TDH.MEM.RANGE.BLOCK.
    RangeBlock,
    /// TDH.MEM.TRACK.
    MemTrack,
    /// TDH.MEM.RANGE.UNBLOCK.
    RangeUnblock,
    /// TDH.MEM.PAGE.REMOVE.
    PageRemove,
    /// TDH.MEM.PAGE.DEMOTE.
    PageDemote,
    /// TDH.MEM.PAGE.PROMOTE.
    PagePromote,
    /// TDH.MEM.SEPT.REMOVE.
    SeptRemove,
    /// TDH.MR.FINALIZE.
    Finalize,
    /// TDG.MEM.PAGE.ACCEPT.
    Accept,
    /// TDG.VP.VEINFO.GET.
    VeInfoGet,
    /// TDG.VP.INFO.
    VpInfo,
    /// TDG.VP.VMCALL.
    VpVmcall,
}

impl CallKind {
    /// Every kind, in counter order.
    pub const ALL: [CallKind; 15] = [
        CallKind::PageAdd,
        CallKind::SeptAdd,
        CallKind::PageAug,
        CallKind::RangeBlock,
        CallKind::MemTrack,
        CallKind::RangeUnblock,
        CallKind::PageRemove,
        CallKind::PageDemote,
        CallKind::PagePromote,
        CallKind::SeptRemove,
        CallKind::Finalize,
        CallKind::Accept,
        CallKind::VeInfoGet,
        CallKind::VpInfo,
        CallKind::VpVmcall,
    ];

    const fn index(self) -> usize {
        self as usize
    }

    /// True for host-side SEAMCALLs.
    pub const fn is_seamcall(self) -> bool {
        (self as usize) <= CallKind::Finalize as usize
    }
}

/// How a call ended, for counting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CallOutcome {
    /// Completed with a status of this class.
    Status(StatusCode),
    /// A TD exit to the host (ACCEPT EPT violation, VMCALL).
    TdExit,
    /// A 2M ACCEPT interrupted by a pending interrupt (re-executed by the guest).
    Interrupted,
}

/// The named status classes, in counter order; `Unknown` classes share one bucket after them.
const CODES: [StatusCode; 25] = [
    StatusCode::Success,
    StatusCode::NonRecoverableTd,
    StatusCode::InterruptedResumable,
    StatusCode::InterruptedRestartable,
    StatusCode::OperandInvalid,
    StatusCode::OperandAddrRangeError,
    StatusCode::OperandBusy,
    StatusCode::PreviousTlbEpochBusy,
    StatusCode::OpStateIncorrect,
    StatusCode::NoValidVeInfo,
    StatusCode::EptWalkFailed,
    StatusCode::EptEntryFree,
    StatusCode::EptEntryNotFree,
    StatusCode::EptEntryNotPresent,
    StatusCode::EptEntryNotLeaf,
    StatusCode::EptEntryLeaf,
    StatusCode::GpaRangeNotBlocked,
    StatusCode::GpaRangeAlreadyBlocked,
    StatusCode::TlbTrackingNotDone,
    StatusCode::EptInvalidPromoteConditions,
    StatusCode::PageAlreadyAccepted,
    StatusCode::PageSizeMismatch,
    StatusCode::GpaRangeBlocked,
    StatusCode::EptEntryStateIncorrect,
    StatusCode::EptPageNotFree,
];
const UNKNOWN: usize = CODES.len();
const EXIT: usize = UNKNOWN + 1;
const INTERRUPTED: usize = UNKNOWN + 2;
const BUCKETS: usize = UNKNOWN + 3;
/// 4K, 2M, 1G.
const LEVELS: usize = 3;

fn bucket(outcome: CallOutcome) -> usize {
    match outcome {
        CallOutcome::Status(code) => CODES.iter().position(|c| *c == code).unwrap_or(UNKNOWN),
        CallOutcome::TdExit => EXIT,
        CallOutcome::Interrupted => INTERRUPTED,
    }
}

fn outcome_of(bucket: usize) -> CallOutcome {
    match bucket {
        EXIT => CallOutcome::TdExit,
        INTERRUPTED => CallOutcome::Interrupted,
        b => CallOutcome::Status(
            CODES
                .get(b)
                .copied()
                .unwrap_or(StatusCode::Unknown(u32::MAX)),
        ),
    }
}

/// Outcome of a guest memory access, for counting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AccessKind {
    /// The page was MAPPED: the access completed.
    Ok,
    /// #VE injected (pending page, #VE enabled).
    Ve,
    /// #VE while VE info was still valid: double fault.
    DoubleFault,
    /// EPT-violation TD exit (type NONE).
    EptExit,
    /// PENDING_EPT_VIOLATION TD exit (pending page, #VE disabled).
    PendingExit,
    /// Shared GPA: not in the S-EPT.
    Shared,
    /// GPA beyond the TD's GPA width.
    Invalid,
}

impl AccessKind {
    /// Every kind, in counter order.
    pub const ALL: [AccessKind; 7] = [
        AccessKind::Ok,
        AccessKind::Ve,
        AccessKind::DoubleFault,
        AccessKind::EptExit,
        AccessKind::PendingExit,
        AccessKind::Shared,
        AccessKind::Invalid,
    ];
}

// One striped counter set: per-call outcomes, then per call and level, then accesses, then
// the three scalars.
const CALLS: usize = CallKind::ALL.len() * BUCKETS;
const BY_LEVEL: usize = CALLS;
const ACCESS: usize = BY_LEVEL + CallKind::ALL.len() * LEVELS * BUCKETS;
const ZEROED: usize = ACCESS + AccessKind::ALL.len();
const INJECTED: usize = ZEROED + 1;
const HP_TIMEOUTS: usize = INJECTED + 1;
const N: usize = HP_TIMEOUTS + 1;

/// The module's counters, striped over the calling threads (vCPUs and host threads call the
/// module at once; see `crate::counters`).
#[derive(Debug, Default)]
pub(crate) struct Counters(Striped<N>);

impl Counters {
    pub(crate) fn new() -> Counters {
        Counters::default()
    }

    /// Counts a call; `page_info` is its raw page-info operand, if it has one (its level, when
    /// 4K, 2M or 1G, is counted too).
    pub(crate) fn call(&self, kind: CallKind, page_info: Option<u64>, outcome: CallOutcome) {
        let b = bucket(outcome);
        self.0.add(kind.index() * BUCKETS + b, 1);
        if let Some(level) = page_info.map(|p| (p & 7) as usize).filter(|&l| l < LEVELS) {
            self.0
                .add(BY_LEVEL + (kind.index() * LEVELS + level) * BUCKETS + b, 1);
        }
    }

    pub(crate) fn status(&self, kind: CallKind, page_info: Option<u64>, status: TdxStatus) {
        self.call(kind, page_info, CallOutcome::Status(status.code()));
    }

    pub(crate) fn access(&self, kind: AccessKind) {
        self.0.add(ACCESS + kind as usize, 1);
    }

    pub(crate) fn zeroed(&self, pages: u64) {
        self.0.add(ZEROED, pages);
    }

    pub(crate) fn injected(&self) {
        self.0.add(INJECTED, 1);
    }

    pub(crate) fn hp_timeout(&self) {
        self.0.add(HP_TIMEOUTS, 1);
    }

    pub(crate) fn snapshot(&self) -> Stats {
        let c = self.0.sum();
        Stats {
            calls: c[..BY_LEVEL].to_vec(),
            by_level: c[BY_LEVEL..ACCESS].to_vec(),
            access: std::array::from_fn(|i| c[ACCESS + i]),
            zeroed_4k: c[ZEROED],
            injected: c[INJECTED],
            hp_timeouts: c[HP_TIMEOUTS],
        }
    }
}

/// A snapshot of the module's counters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stats {
    calls: Vec<u64>,
    by_level: Vec<u64>,
    access: [u64; 7],
    /// 4K zeroings done by ACCEPT (a 2M ACCEPT counts 512), the modelled cost unit.
    pub zeroed_4k: u64,
    /// Calls answered by a fault-injection rule.
    pub injected: u64,
    /// TD exits with TDX_HOST_PRIORITY_BUSY_TIMEOUT.
    pub hp_timeouts: u64,
}

impl Stats {
    /// Calls of `kind` that ended with `outcome`.
    pub fn get(&self, kind: CallKind, outcome: CallOutcome) -> u64 {
        self.calls
            .get(kind.index() * BUCKETS + bucket(outcome))
            .copied()
            .unwrap_or(0)
    }

    /// Calls of `kind` at page level `level` (from the page-info operand) that ended with
    /// `outcome`. SEPT.ADD/SEPT.REMOVE at levels 3 and 4 are counted only in [`Stats::get`].
    pub fn get_at(&self, kind: CallKind, level: PageLevel, outcome: CallOutcome) -> u64 {
        let i = (kind.index() * LEVELS + usize::from(level.index())) * BUCKETS + bucket(outcome);
        self.by_level.get(i).copied().unwrap_or(0)
    }

    /// Calls of `kind` that completed with a status of class `code`.
    pub fn status(&self, kind: CallKind, code: StatusCode) -> u64 {
        self.get(kind, CallOutcome::Status(code))
    }

    /// All calls of `kind`.
    pub fn total(&self, kind: CallKind) -> u64 {
        let start = kind.index() * BUCKETS;
        self.calls
            .get(start..start + BUCKETS)
            .map_or(0, |s| s.iter().sum())
    }

    /// Guest accesses that ended as `kind`.
    pub fn access(&self, kind: AccessKind) -> u64 {
        self.access[kind as usize]
    }

    /// Every non-zero call counter as (kind, outcome, count).
    pub fn nonzero(&self) -> Vec<(CallKind, CallOutcome, u64)> {
        let mut out = Vec::new();
        for kind in CallKind::ALL {
            for b in 0..BUCKETS {
                let n = self.calls.get(kind.index() * BUCKETS + b).copied();
                if let Some(n) = n.filter(|&n| n != 0) {
                    out.push((kind, outcome_of(b), n));
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_by_kind_and_outcome() {
        let c = Counters::new();
        c.status(CallKind::PageAug, Some(0x20_0001), TdxStatus::SUCCESS);
        c.status(
            CallKind::PageAug,
            Some(0),
            StatusCode::OperandBusy.with_operand(1),
        );
        c.call(CallKind::Accept, Some(7), CallOutcome::TdExit);
        c.status(
            CallKind::Accept,
            None,
            TdxStatus::from_raw(0xC000_0DEA_0000_0000),
        );
        let s = c.snapshot();
        assert_eq!(s.total(CallKind::PageAug), 2);
        assert_eq!(s.status(CallKind::PageAug, StatusCode::OperandBusy), 1);
        assert_eq!(s.get(CallKind::Accept, CallOutcome::TdExit), 1);
        assert_eq!(s.total(CallKind::Accept), 2);
        assert_eq!(s.nonzero().len(), 4);
        let ok = CallOutcome::Status(StatusCode::Success);
        assert_eq!(s.get_at(CallKind::PageAug, PageLevel::Size2M, ok), 1);
        assert_eq!(s.get_at(CallKind::PageAug, PageLevel::Size4K, ok), 0);
        assert_eq!(
            s.get_at(CallKind::Accept, PageLevel::Size4K, CallOutcome::TdExit),
            0
        );
        assert!(CallKind::Finalize.is_seamcall());
        assert!(!CallKind::Accept.is_seamcall());
    }
}
