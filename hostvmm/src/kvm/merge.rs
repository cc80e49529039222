//! The merge pass: 2M ranges split earlier are kept as candidates, and a range whose 512
//! children are all MAPPED (or all PENDING) over one contiguous, huge private folio is
//! PROMOTEd back to one leaf (BLOCK, TRACK, kick, PROMOTE; UNBLOCK if the module refuses).
//!
//! Not here: when candidates are added (the fault and zap paths, and the VMM through
//! [`PrivateMmu::note_private`]) or when a pass runs (the VMM's choice).

use std::sync::atomic::Ordering;
use std::sync::PoisonError;

use accept::abi::{Gpa, GpaRange, PageLevel};

use super::stats::Ev;
use super::{PrivateMmu, M2};
use crate::module::SeptState;

/// What a merge attempt found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MergeOutcome {
    /// PROMOTEd to a 2M leaf.
    Promoted,
    /// Not (yet) mergeable: children not uniform, not contiguous, or the backing not huge.
    NotReady,
    /// Nothing to merge: already huge, or nothing mapped.
    Nothing,
}

impl PrivateMmu {
    /// Tries to PROMOTE the 2M range at `base` back to one leaf.
    pub fn try_merge(&self, base: Gpa) -> MergeOutcome {
        let base = base.align_down(PageLevel::Size2M);
        // The backing must hold the whole range in one private folio. Asked before taking the
        // MMU lock (lock order: backing, then MMU); a zap meanwhile bumps the sequence.
        let seq = self.invalidate_seq.load(Ordering::Acquire);
        match self.backing.get_pfn(base) {
            Ok(p) if p.max_level >= PageLevel::Size2M => {}
            _ => return MergeOutcome::NotReady,
        }
        let _w = self
            .mmu_lock
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        if self.invalidate_seq.load(Ordering::Acquire) != seq {
            return MergeOutcome::NotReady;
        }
        let Some(e) = self.module.entry(base, PageLevel::Size2M) else {
            return MergeOutcome::Nothing;
        };
        if e.state != SeptState::NlMapped {
            return MergeOutcome::Nothing;
        }
        // Check the children (as KVM would with its mirror table) before blocking anything.
        let first = self.module.leaf(base);
        if first.level != 0
            || !(first.state == SeptState::Mapped || first.state == SeptState::Pending)
            || first.hpa & (M2 - 1) != 0
        {
            return MergeOutcome::NotReady;
        }
        for i in 1..512u64 {
            let c = self
                .module
                .leaf(Gpa::new_truncate(base.as_u64() + i * 4096));
            if c.level != 0 || c.state != first.state || c.hpa != first.hpa + i * 4096 {
                return MergeOutcome::NotReady;
            }
        }
        self.invalidate_seq.fetch_add(1, Ordering::AcqRel);
        let b = self.block(base, PageLevel::Size2M);
        if b.status.is_error() {
            return MergeOutcome::NotReady;
        }
        if self.track().is_err() {
            self.restore(base, PageLevel::Size2M);
            return MergeOutcome::NotReady;
        }
        let r = self.call("PROMOTE", || {
            self.module.page_promote(base, PageLevel::Size2M)
        });
        if r.status.is_success() {
            self.pool.free(r.rcx);
            self.counters.inc(Ev::Promotes);
            MergeOutcome::Promoted
        } else {
            self.counters.inc(Ev::PromoteRefused);
            self.restore(base, PageLevel::Size2M);
            MergeOutcome::NotReady
        }
    }

    /// Tries to merge every candidate 2M range (split earlier); keeps those not ready yet.
    /// Returns the number promoted. Does nothing when the policy does not merge.
    pub fn merge_pass(&self) -> u64 {
        if !self.policy.merge {
            return 0;
        }
        let candidates: Vec<u64> = self
            .merge_candidates
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .copied()
            .collect();
        let mut promoted = 0;
        for base in candidates {
            let outcome = self.try_merge(Gpa::new_truncate(base));
            if outcome != MergeOutcome::NotReady {
                self.merge_candidates
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .remove(&base);
            }
            if outcome == MergeOutcome::Promoted {
                promoted += 1;
            }
        }
        promoted
    }

    /// Adds a 2M range as a merge candidate (the VMM does this when a range turns private).
    pub fn note_private(&self, range: GpaRange) {
        if !self.policy.merge {
            return;
        }
        let mut c = self
            .merge_candidates
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let mut base = range.start().align_down(PageLevel::Size2M).as_u64();
        while base < range.end().as_u64() {
            c.insert(base);
            base += M2;
        }
    }

    pub(super) fn add_merge_candidate(&self, base: Gpa) {
        self.merge_candidates
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(base.as_u64());
    }

    /// Number of 2M ranges waiting to be merged.
    pub fn merge_backlog(&self) -> usize {
        self.merge_candidates
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }
}
