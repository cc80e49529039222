//! The private MMU's counters: atomics bumped by every flow and read as an [`MmuStats`]
//! snapshot, and a map of the BUSY answers retried, by SEAMCALL and operand.
//!
//! Not here: what is counted when (each flow bumps its own counters).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};

use super::PrivateMmu;

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

#[derive(Default)]
pub(super) struct Counters {
    pub(super) faults: AtomicU64,
    pub(super) maps: [AtomicU64; 3],
    pub(super) sept_adds: AtomicU64,
    pub(super) fault_splits: AtomicU64,
    pub(super) ignored_splits: AtomicU64,
    pub(super) inhibits: AtomicU64,
    pub(super) zap_demotes: AtomicU64,
    pub(super) removes: [AtomicU64; 3],
    pub(super) promotes: AtomicU64,
    pub(super) promote_refused: AtomicU64,
    pub(super) tracks: AtomicU64,
    pub(super) kicks: AtomicU64,
    pub(super) busy_retries: AtomicU64,
    pub(super) poisoned_leaves: AtomicU64,
    pub(super) invalidation_retries: AtomicU64,
    pub(super) hp_timeouts: AtomicU64,
    pub(super) track_refusals: AtomicU64,
    pub(super) tracking_not_done: AtomicU64,
    pub(super) hold_outs: AtomicU64,
    /// BUSY-like answers by (SEAMCALL, raw operand and status detail bits).
    pub(super) busy_by: Mutex<std::collections::BTreeMap<(&'static str, u32), u64>>,
}

pub(super) fn inc(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

fn get(c: &AtomicU64) -> u64 {
    c.load(Ordering::Relaxed)
}

impl Counters {
    pub(super) fn snapshot(&self) -> MmuStats {
        MmuStats {
            faults: get(&self.faults),
            maps: [get(&self.maps[0]), get(&self.maps[1]), get(&self.maps[2])],
            sept_adds: get(&self.sept_adds),
            fault_splits: get(&self.fault_splits),
            ignored_splits: get(&self.ignored_splits),
            inhibits: get(&self.inhibits),
            zap_demotes: get(&self.zap_demotes),
            removes: [
                get(&self.removes[0]),
                get(&self.removes[1]),
                get(&self.removes[2]),
            ],
            promotes: get(&self.promotes),
            promote_refused: get(&self.promote_refused),
            tracks: get(&self.tracks),
            kicks: get(&self.kicks),
            busy_retries: get(&self.busy_retries),
            poisoned_leaves: get(&self.poisoned_leaves),
            invalidation_retries: get(&self.invalidation_retries),
            hp_timeouts: get(&self.hp_timeouts),
            track_refusals: get(&self.track_refusals),
            tracking_not_done: get(&self.tracking_not_done),
            hold_outs: get(&self.hold_outs),
        }
    }
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
