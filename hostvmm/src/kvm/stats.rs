//! The private MMU's counters: striped atomics bumped by every flow (and counted per thread,
//! [`thread_stats`]) and read as an [`MmuStats`] snapshot, and a map of the BUSY answers
//! retried, by SEAMCALL and operand.
//!
//! Not here: what is counted when (each flow bumps its own counters).

use std::sync::{Mutex, PoisonError};

use accept::abi::PageLevel;

use super::PrivateMmu;
use crate::counters::{Local, Striped};

/// Exact counters of the MMU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct MmuStats {
    /// EPT-violation exits handled.
    pub faults: u64,
    /// Leaves mapped by AUG, per level (4K, 2M, 1G).
    pub maps: [u64; 3],
    /// SEPT.ADD calls that added a level.
    pub sept_adds: u64,
    /// Fault-path splits (DEMOTE for a smaller ACCEPT).
    pub fault_splits: u64,
    /// Fault-path requests ignored by policy.
    pub ignored_splits: u64,
    /// One-way inhibits of huge mappings.
    pub inhibits: u64,
    /// DEMOTEs in the zap path (leaves straddling a zapped range).
    pub zap_demotes: u64,
    /// Leaves removed, per level.
    pub removes: [u64; 3],
    /// Successful PROMOTEs.
    pub promotes: u64,
    /// PROMOTEs refused by the module (range unblocked again).
    pub promote_refused: u64,
    /// TDH.MEM.TRACK calls that advanced the epoch.
    pub tracks: u64,
    /// Kicks while waiting for tracking.
    pub kicks: u64,
    /// BUSY or INTERRUPTED answers retried.
    pub busy_retries: u64,
    /// Leaves whose REMOVE or DEMOTE failed, recorded as error pages.
    pub poisoned_leaves: u64,
    /// Faults that found a zap in flight and asked the guest to retry.
    pub invalidation_retries: u64,
    /// TD exits with TDX_HOST_PRIORITY_BUSY_TIMEOUT (the vCPU is re-entered).
    pub hp_timeouts: u64,
    /// TDH.MEM.TRACK answers PREVIOUS_TLB_EPOCH_BUSY (a vCPU still in the previous epoch):
    /// each is followed by a kick and a retry.
    pub track_refusals: u64,
    /// SEAMCALLs answered TLB_TRACKING_NOT_DONE (a vCPU inside the TD has not left the epoch
    /// of the BLOCK yet): each is followed by a kick and a retry.
    pub tracking_not_done: u64,
    /// Times a SEAMCALL that kept getting BUSY held the vCPUs out of the TD and kicked them.
    pub hold_outs: u64,
}

/// What the MMU counts: one index per counter of [`MmuStats`], in its order.
#[derive(Debug, Clone, Copy)]
pub(super) enum Ev {
    Faults,
    Map4K,
    Map2M,
    Map1G,
    SeptAdds,
    FaultSplits,
    IgnoredSplits,
    Inhibits,
    ZapDemotes,
    Remove4K,
    Remove2M,
    Remove1G,
    Promotes,
    PromoteRefused,
    Tracks,
    Kicks,
    BusyRetries,
    PoisonedLeaves,
    InvalidationRetries,
    HpTimeouts,
    TrackRefusals,
    TrackingNotDone,
    HoldOuts,
}

const N: usize = Ev::HoldOuts as usize + 1;

impl Ev {
    /// The leaf-mapped counter of `level`.
    pub(super) fn map(level: PageLevel) -> Ev {
        match level {
            PageLevel::Size4K => Ev::Map4K,
            PageLevel::Size2M => Ev::Map2M,
            PageLevel::Size1G => Ev::Map1G,
        }
    }

    /// The leaf-removed counter of `level`.
    pub(super) fn remove(level: PageLevel) -> Ev {
        match level {
            PageLevel::Size4K => Ev::Remove4K,
            PageLevel::Size2M => Ev::Remove2M,
            PageLevel::Size1G => Ev::Remove1G,
        }
    }
}

thread_local! {
    static THREAD: Local<N> = Local::new();
}

#[derive(Default)]
pub(super) struct Counters {
    counts: Striped<N>,
    /// BUSY-like answers by (SEAMCALL, raw operand and status detail bits).
    pub(super) busy_by: Mutex<std::collections::BTreeMap<(&'static str, u32), u64>>,
}

impl Counters {
    pub(super) fn inc(&self, e: Ev) {
        self.counts.add(e as usize, 1);
        // Gone only while the thread is being torn down: nothing reads its counts then.
        let _ = THREAD.try_with(|t| t.add(e as usize, 1));
    }

    pub(super) fn snapshot(&self) -> MmuStats {
        MmuStats::from_counts(self.counts.sum())
    }
}

impl MmuStats {
    fn from_counts(c: [u64; N]) -> MmuStats {
        let g = |e: Ev| c[e as usize];
        MmuStats {
            faults: g(Ev::Faults),
            maps: [g(Ev::Map4K), g(Ev::Map2M), g(Ev::Map1G)],
            sept_adds: g(Ev::SeptAdds),
            fault_splits: g(Ev::FaultSplits),
            ignored_splits: g(Ev::IgnoredSplits),
            inhibits: g(Ev::Inhibits),
            zap_demotes: g(Ev::ZapDemotes),
            removes: [g(Ev::Remove4K), g(Ev::Remove2M), g(Ev::Remove1G)],
            promotes: g(Ev::Promotes),
            promote_refused: g(Ev::PromoteRefused),
            tracks: g(Ev::Tracks),
            kicks: g(Ev::Kicks),
            busy_retries: g(Ev::BusyRetries),
            poisoned_leaves: g(Ev::PoisonedLeaves),
            invalidation_retries: g(Ev::InvalidationRetries),
            hp_timeouts: g(Ev::HpTimeouts),
            track_refusals: g(Ev::TrackRefusals),
            tracking_not_done: g(Ev::TrackingNotDone),
            hold_outs: g(Ev::HoldOuts),
        }
    }
}

/// The events of every [`PrivateMmu`] that the calling thread caused since it started. Read it
/// before and after a call (an exit handled on a vCPU's thread) to learn what that call did,
/// while other threads work on the same MMU.
pub fn thread_stats() -> MmuStats {
    MmuStats::from_counts(THREAD.try_with(Local::get).unwrap_or([0; N]))
}

impl PrivateMmu {
    /// Counters so far.
    pub fn stats(&self) -> MmuStats {
        self.counters.snapshot()
    }

    /// BUSY and INTERRUPTED answers the MMU retried, by SEAMCALL and by the status's operand
    /// (low 32 bits: which operand was busy, with any detail bits the module sets, such as a
    /// host-priority marker), in that order.
    pub fn busy_by_operand(&self) -> Vec<(&'static str, u32, u64)> {
        self.counters
            .busy_by
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .map(|(&(call, op), &n)| (call, op, n))
            .collect()
    }
}
