//! The fault path: an EPT-violation TD exit on a private GPA becomes an AUG at the largest level
//! the policy, the backing, the module and the guest's ACCEPT level allow, with SEPT.ADD of
//! missing levels first.
//!
//! When the guest accepts smaller than an existing PENDING huge leaf, the policy's
//! [`FaultSplit`] decides: DEMOTE the leaf, inhibit huge mappings for its range one way, or
//! ignore the request. A fault on a leaf an earlier zap gave up on retires that leaf.
//!
//! Not here: the DEMOTE sequence itself (`split.rs`), removing leaves (`zap.rs`) and the
//! SEAMCALL retry loop (`seamcall.rs`).

use std::sync::atomic::Ordering;
use std::sync::PoisonError;

use accept::abi::{Gpa, PageLevel, StatusCode};

use super::split::AfterFailure;
use super::stats::Ev;
use super::{BackingError, FaultError, FaultSplit, PrivateMmu};
use crate::module::{ExitType, ExtExitQual, SeptState};

/// What the fault path did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultOutcome {
    /// Mapped a PENDING leaf at this level.
    Mapped(PageLevel),
    /// Split a huge leaf so that a smaller ACCEPT can proceed.
    Split,
    /// Zapped a huge PENDING leaf and inhibited huge mappings for its range.
    Inhibited,
    /// Nothing to do now (another vCPU mapped it, or a zap is in flight): resume the guest.
    Retry,
    /// The policy ignores the guest's smaller ACCEPT: resume the guest unchanged.
    Ignored,
}

impl PrivateMmu {
    /// Handles an EPT-violation TD exit on `gpa` with extended qualification `ext`.
    ///
    /// # Errors
    /// [`FaultError`]: the guest cannot make progress on this GPA (the VMM decides what to do:
    /// KVM would return the error to userspace).
    pub fn handle_ept_violation(
        &self,
        gpa: u64,
        ext: ExtExitQual,
    ) -> Result<FaultOutcome, FaultError> {
        self.counters.inc(Ev::Faults);
        if let Some(why) = self.bugged() {
            return Err(FaultError::Bugged(why));
        }
        let gpaw = self.module.config().gpaw;
        let g = Gpa::try_new(gpa & !0xFFF).map_err(|_| FaultError::NotPrivate(gpa))?;
        if g.is_shared(gpaw) || g.exceeds(gpaw) {
            return Err(FaultError::NotPrivate(gpa));
        }
        let requested = match ext.exit_type() {
            ExitType::Accept => PageLevel::from_index(ext.req_level() as u64),
            _ => None,
        };

        // Look the page up before taking the MMU lock (as KVM does), then make sure no
        // invalidation ran meanwhile.
        let seq = self.invalidate_seq.load(Ordering::Acquire);
        let pfn = match self.backing.get_pfn(g) {
            Err(BackingError::Pending) => return Ok(FaultOutcome::Retry),
            other => other?,
        };
        let guard = self.mmu_lock.read().unwrap_or_else(PoisonError::into_inner);
        if self.invalidate_seq.load(Ordering::Acquire) != seq {
            self.counters.inc(Ev::InvalidationRetries);
            return Ok(FaultOutcome::Retry);
        }

        let leaf = self.module.leaf(g);
        if leaf.state.is_leaf() {
            let leaf_level = PageLevel::from_index(leaf.level as u64).unwrap_or(PageLevel::Size4K);
            let base = g.align_down(leaf_level);
            return match requested {
                Some(req) if req < leaf_level && leaf.state == SeptState::Pending => {
                    drop(guard);
                    self.fault_split(g, leaf_level)
                }
                // A leaf an earlier zap gave up on, while the backing has a usable page here
                // again (the error pages' folio was punched out and replaced): retire it.
                _ if leaf.state.is_blocked() && self.is_given_up(base, leaf_level) => {
                    drop(guard);
                    self.retire_given_up(base, leaf_level);
                    Ok(FaultOutcome::Retry)
                }
                // Blocked (a zap or merge in flight) or mapped by another vCPU meanwhile.
                _ => Ok(FaultOutcome::Retry),
            };
        }

        // Choose the level.
        let mut level = self
            .policy
            .max_level
            .min(pfn.max_level)
            .min(self.module.config().max_aug_level);
        if self.policy.honour_accept_level {
            if let Some(req) = requested {
                level = level.min(req);
            }
        }
        if level > PageLevel::Size4K && self.is_inhibited(g) {
            level = PageLevel::Size4K;
        }
        // Never map over smaller mappings already present under the huge entry.
        loop {
            let e = self.module.walk(g, level.index());
            if e.level == level.index() && e.state.is_non_leaf() {
                match level.smaller() {
                    Some(s) => level = s,
                    None => return Ok(FaultOutcome::Retry),
                }
            } else {
                break;
            }
        }
        let base = g.align_down(level);
        let hpa = pfn.hpa - (g.as_u64() - base.as_u64());
        if hpa & level.mask() != 0 {
            // The backing page is not aligned for a huge mapping: map 4K.
            level = PageLevel::Size4K;
        }
        let base = g.align_down(level);
        let hpa = pfn.hpa - (g.as_u64() - base.as_u64());
        self.ensure_levels(base, level)?;
        let r = self.call("AUG", || self.module.page_aug(base, level, hpa));
        if r.status.is_success() {
            self.counters.inc(Ev::map(level));
            if level == PageLevel::Size4K && self.policy.merge && pfn.max_level >= PageLevel::Size2M
            {
                self.add_merge_candidate(g.align_down(PageLevel::Size2M));
            }
            return Ok(FaultOutcome::Mapped(level));
        }
        if r.status.is(StatusCode::EptEntryStateIncorrect) {
            // Another vCPU mapped it first.
            return Ok(FaultOutcome::Retry);
        }
        if r.status.is(StatusCode::EptWalkFailed)
            && r.rdx_state() == SeptState::NlBlocked.public_state()
        {
            // The module's walk stops at a blocked page table (`sept_manager.c`
            // secure_ept_walk): a merge holds it blocked until PROMOTE or UNBLOCK.
            return Ok(FaultOutcome::Retry);
        }
        Err(FaultError::Seamcall {
            call: "TDH.MEM.PAGE.AUG",
            status: r.status,
        })
    }

    /// SEPT.ADD every missing non-leaf level above `level` for `gpa`.
    fn ensure_levels(&self, gpa: Gpa, level: PageLevel) -> Result<(), FaultError> {
        loop {
            let e = self.module.walk(gpa, level.index());
            if e.level <= level.index() {
                return Ok(());
            }
            if e.state != SeptState::Free {
                // A leaf or blocked entry above: the caller will retry.
                return Ok(());
            }
            let page = self.pool.alloc().ok_or(FaultError::NoSeptPage)?;
            // The entry at `e.level` becomes non-leaf; its GPA must be aligned to that level.
            let entry_size = 1u64 << (12 + 9 * u32::from(e.level));
            let entry_gpa = Gpa::new_truncate(gpa.as_u64() & !(entry_size - 1));
            let r = self.call("SEPT.ADD", || {
                self.module.sept_add(entry_gpa, e.level, page)
            });
            if r.status.is_success() {
                self.counters.inc(Ev::SeptAdds);
                continue;
            }
            self.pool.free(page);
            if r.status.is(StatusCode::EptEntryStateIncorrect) {
                // Added by another vCPU.
                continue;
            }
            return Err(FaultError::Seamcall {
                call: "TDH.MEM.SEPT.ADD",
                status: r.status,
            });
        }
    }

    fn is_inhibited(&self, gpa: Gpa) -> bool {
        // Set before the first insertion, under the MMU lock this fault holds for read.
        if !self.any_inhibited.load(Ordering::Acquire) {
            return false;
        }
        self.inhibited
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .contains(&gpa.align_down(PageLevel::Size2M).as_u64())
    }

    /// The guest asked to accept smaller than the PENDING `level` leaf holding `gpa`.
    fn fault_split(&self, gpa: Gpa, level: PageLevel) -> Result<FaultOutcome, FaultError> {
        match self.policy.fault_split {
            FaultSplit::Ignore => {
                self.counters.inc(Ev::IgnoredSplits);
                Ok(FaultOutcome::Ignored)
            }
            FaultSplit::Demote => {
                let _w = self.lock_for_invalidation();
                let base = gpa.align_down(level);
                // Re-check under the exclusive lock: another vCPU may have split it already.
                let e = self.module.leaf(gpa);
                if !(e.state == SeptState::Pending && e.level == level.index()) {
                    return Ok(FaultOutcome::Retry);
                }
                self.demote(base, level, AfterFailure::Restore)?;
                self.counters.inc(Ev::FaultSplits);
                if self.policy.merge {
                    self.add_merge_candidate(base);
                }
                Ok(FaultOutcome::Split)
            }
            FaultSplit::Inhibit => {
                let _w = self.lock_for_invalidation();
                let base = gpa.align_down(level);
                self.any_inhibited.store(true, Ordering::Release);
                self.inhibited
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .insert(base.as_u64());
                let e = self.module.leaf(gpa);
                let mut poisoned = Vec::new();
                if e.state == SeptState::Pending && e.level == level.index() {
                    // A PENDING leaf holds no guest data: removing it loses nothing.
                    poisoned = self.block_track_remove(&[(base, level)]).poisoned;
                }
                drop(_w);
                // Recorded outside the MMU lock: the backing's lock comes first in lock order.
                for (gpa, level) in poisoned {
                    self.backing.poison(gpa, level);
                }
                self.counters.inc(Ev::Inhibits);
                Ok(FaultOutcome::Inhibited)
            }
        }
    }
}
