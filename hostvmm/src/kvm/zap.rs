//! The zap path: private -> shared conversions and hole punches remove every private mapping
//! in a range. Huge leaves straddling its edges are demoted first; the rest are BLOCKed, one
//! TRACK, then REMOVEd. Leaves that cannot be removed are given up: left blocked and reported
//! as error pages, never split or unblocked again, and retired when a later fault finds them.
//!
//! Also the block-first mode of a zap ([`PrivateMmu::block_range`] and
//! [`PrivateMmu::unblock_leaves`]), which BLOCKs a range before the point of no return.
//!
//! Not here: recording error pages in the backing (the caller does, holding the backing's
//! lock), the DEMOTE sequence (`split.rs`) and the SEAMCALL retry loop (`seamcall.rs`).

use std::sync::PoisonError;

use accept::abi::{Gpa, GpaRange, PageLevel};

use super::split::AfterFailure;
use super::stats::Ev;
use super::{FaultError, PrivateMmu};

/// What one zap did.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ZapReport {
    /// Leaves removed.
    pub removed: u64,
    /// Huge leaves demoted because they straddled the range.
    pub demoted: u64,
    /// Leaves whose REMOVE or DEMOTE failed: their 4K pages must become error pages. The
    /// zap path does not record them itself (its caller, a guest_memfd conversion, holds the
    /// backing's lock and records them through its poison sink).
    pub poisoned: Vec<(Gpa, PageLevel)>,
}

/// Attempts at a zap-path split that could not start, before the leaf is given up.
const ZAP_SPLIT_TRIES: u32 = 3;

impl PrivateMmu {
    /// Removes every private mapping in `range` (private -> shared, hole punch). Huge leaves
    /// that straddle the range are demoted first, so that only the range loses its mappings.
    /// Cannot fail: leaves that cannot be removed are reported to the backing as error pages.
    pub fn zap(&self, range: GpaRange) -> ZapReport {
        let _w = self.lock_for_invalidation();
        let mut report = ZapReport::default();

        // Pass 1: demote the huge leaves straddling either edge (at most one per edge and
        // level: 1G then 2M). A leaf whose split fails is handled once, even when both edges
        // fall inside it.
        let mut failed: Vec<(Gpa, PageLevel)> = Vec::new();
        for edge in [range.start(), range.end()] {
            for level in [PageLevel::Size1G, PageLevel::Size2M] {
                if edge.is_aligned(level) {
                    continue;
                }
                let e = self.module.leaf(edge);
                if !(e.state.is_leaf() && e.level == level.index()) {
                    continue;
                }
                let base = edge.align_down(level);
                // A leaf an earlier zap gave up on holds error pages: splitting it would make
                // them reachable again. Try to remove it whole instead.
                if self.is_given_up(base, level) {
                    let r = self.block_track_remove(&[(base, level)]);
                    report.removed += r.removed;
                    if r.removed > 0 {
                        self.forget_given_up(base, level);
                    }
                    continue;
                }
                let straddles = base.as_u64() < range.end().as_u64()
                    && base.as_u64() + level.size() > range.start().as_u64();
                if !straddles || failed.contains(&(base, level)) {
                    continue;
                }
                // A split that could not even start (no S-EPT page, BLOCK refused) left the
                // leaf reachable: try again a few times before giving up on it.
                let mut result = self.demote(base, level, AfterFailure::KeepBlocked);
                for _ in 1..ZAP_SPLIT_TRIES {
                    if !result.as_ref().is_err_and(FaultError::left_unblocked) {
                        break;
                    }
                    result = self.demote(base, level, AfterFailure::KeepBlocked);
                }
                if result.as_ref().is_err_and(FaultError::left_unblocked)
                    && self.block(base, level).status.is_error()
                {
                    // Its pages become error pages but stay reachable: the TD must stop.
                    self.bug("a huge leaf could not be blocked after the point of no return");
                }
                match result {
                    Ok(()) => {
                        self.counters.inc(Ev::ZapDemotes);
                        report.demoted += 1;
                        if self.policy.merge {
                            self.add_merge_candidate(base.align_down(PageLevel::Size2M));
                        }
                    }
                    Err(_) => {
                        // Seed 000: the split failed; the whole leaf, left blocked, becomes
                        // error pages.
                        failed.push((base, level));
                        self.poison(base, level, &mut report);
                    }
                }
            }
        }

        // Pass 2: collect the leaves inside the range, largest first.
        let mut leaves = Vec::new();
        let mut cur = range.start();
        let end = range.end().as_u64();
        while cur.as_u64() < end {
            let e = self.module.leaf(cur);
            let level = PageLevel::from_index(e.level as u64).unwrap_or(PageLevel::Size4K);
            let step = if e.level > 2 {
                // The walk stopped at a FREE entry above 1G.
                1u64 << (12 + 9 * e.level as u32)
            } else {
                level.size()
            };
            let base = cur.as_u64() & !(step - 1);
            if e.state.is_leaf() && base >= range.start().as_u64() && base + step <= end {
                leaves.push((Gpa::new_truncate(base), level));
            }
            cur = Gpa::new_truncate(base.saturating_add(step));
        }
        let r = self.block_track_remove(&leaves);
        report.removed += r.removed;
        report.poisoned.extend(r.poisoned);
        report
    }

    /// The leaves that overlap `range` (including huge leaves straddling its edges), in
    /// address order.
    fn leaves_overlapping(&self, range: GpaRange) -> Vec<(Gpa, PageLevel)> {
        let mut leaves = Vec::new();
        let (start, end) = (range.start().as_u64(), range.end().as_u64());
        let mut cur = start;
        while cur < end {
            let e = self.module.leaf(Gpa::new_truncate(cur));
            let step = 1u64 << (12 + 9 * u32::from(e.level));
            let base = cur & !(step - 1);
            if e.state.is_leaf() {
                if let Some(level) = PageLevel::from_index(u64::from(e.level)) {
                    leaves.push((Gpa::new_truncate(base), level));
                }
            }
            cur = base.saturating_add(step);
        }
        leaves
    }

    /// Block-first mode of a zap (seed 002): BLOCKs every leaf overlapping `range` before the
    /// point of no return, so that the guest stops using it while nothing is destroyed yet.
    /// [`PrivateMmu::unblock_leaves`] undoes it on abort; [`PrivateMmu::zap`] completes it.
    ///
    /// # Errors
    /// The failing BLOCK's status; the leaves blocked before it are unblocked again.
    pub fn block_range(&self, range: GpaRange) -> Result<Vec<(Gpa, PageLevel)>, FaultError> {
        let _w = self.lock_for_invalidation();
        let mut blocked = Vec::new();
        for (gpa, level) in self.leaves_overlapping(range) {
            let r = self.block(gpa, level);
            if r.status.is_error() {
                self.unblock_locked(&blocked);
                return Err(FaultError::Seamcall {
                    call: "TDH.MEM.RANGE.BLOCK",
                    status: r.status,
                });
            }
            if r.status.is_success() {
                blocked.push((gpa, level));
            }
        }
        Ok(blocked)
    }

    /// Undoes [`PrivateMmu::block_range`]: TRACK, then UNBLOCK each leaf.
    pub fn unblock_leaves(&self, leaves: &[(Gpa, PageLevel)]) {
        let _w = self
            .mmu_lock
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        self.unblock_locked(leaves);
    }

    fn unblock_locked(&self, leaves: &[(Gpa, PageLevel)]) {
        if leaves.is_empty() {
            return;
        }
        if self.track().is_err() {
            log::warn!("TRACK failed; {} leaves stay blocked", leaves.len());
            return;
        }
        for &(gpa, level) in leaves {
            self.unblock(gpa, level);
        }
    }

    /// BLOCK every leaf, one TRACK, REMOVE every leaf. Failures become error pages, always
    /// on blocked leaves: a leaf that cannot even be BLOCKed (tried twice) would stay
    /// reachable by the guest, so the MMU is then bugged and the TD stops.
    pub(super) fn block_track_remove(&self, leaves: &[(Gpa, PageLevel)]) -> ZapReport {
        let mut report = ZapReport::default();
        let mut blocked = Vec::with_capacity(leaves.len());
        for &(gpa, level) in leaves {
            let mut r = self.block(gpa, level);
            if r.status.is_error() {
                r = self.block(gpa, level);
            }
            if r.status.is_error() {
                self.poison(gpa, level, &mut report);
                self.bug("a leaf could not be blocked after the point of no return");
            } else {
                blocked.push((gpa, level));
            }
        }
        if blocked.is_empty() {
            return report;
        }
        if self.track().is_err() && self.track().is_err() {
            for &(gpa, level) in &blocked {
                self.poison(gpa, level, &mut report);
            }
            return report;
        }
        for (gpa, level) in blocked {
            let r = self.call("REMOVE", || self.module.page_remove(gpa, level));
            if r.status.is_success() {
                self.counters.inc(Ev::remove(level));
                report.removed += 1;
            } else {
                self.poison(gpa, level, &mut report);
            }
        }
        report
    }

    fn poison(&self, gpa: Gpa, level: PageLevel, report: &mut ZapReport) {
        self.counters.inc(Ev::PoisonedLeaves);
        report.poisoned.push((gpa, level));
        self.given_up
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert((gpa.as_u64(), level.index()));
    }

    fn forget_given_up(&self, gpa: Gpa, level: PageLevel) {
        self.given_up
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&(gpa.as_u64(), level.index()));
    }

    /// Tries again to REMOVE a leaf an earlier zap gave up on (its pages stay error pages in
    /// the backing; only the Secure-EPT entry is reclaimed).
    pub(super) fn retire_given_up(&self, base: Gpa, level: PageLevel) {
        let _w = self.lock_for_invalidation();
        if self.block_track_remove(&[(base, level)]).removed > 0 {
            self.forget_given_up(base, level);
        }
    }

    pub(super) fn is_given_up(&self, gpa: Gpa, level: PageLevel) -> bool {
        self.given_up
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .contains(&(gpa.as_u64(), level.index()))
    }
}
