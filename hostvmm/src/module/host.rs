//! Host-side SEAMCALLs (spec §4): PAGE.ADD, SEPT.ADD, PAGE.AUG, RANGE.BLOCK, MEM.TRACK,
//! RANGE.UNBLOCK, PAGE.REMOVE, PAGE.DEMOTE, PAGE.PROMOTE, SEPT.REMOVE and MR.FINALIZE.
//!
//! Each call follows the public module's order of checks: fault hook, op-state, operands
//! (page info, then HPAs), tree lock, walk (EPT_WALK_FAILED when it stops above the requested
//! level), entry lock, entry state, blocked-and-tracked, then the change. Failures that concern
//! an S-EPT entry return it in RCX/RDX as the module does; tracking failures return no details.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{RwLockReadGuard, RwLockWriteGuard, TryLockError};

use accept::abi::{decode_page_info, operand, page_info, Gpa, PageLevel, StatusCode, TdxStatus};

use super::fault::FaultResult;
use super::sept::{level_size, Tree, WalkEnd, Word, ENTRIES};
use super::stats::CallKind;
use super::{entry_info, lock, SeamcallResult, SeptState, TdxModule, OPERAND_R9, OP_RUNNABLE};

fn invalid(op: u32) -> TdxStatus {
    StatusCode::OperandInvalid.with_operand(op)
}

fn rcx_status(code: StatusCode) -> TdxStatus {
    code.with_operand(operand::RCX)
}

/// A failure that reports the entry where the walk ended.
fn at_entry(status: TdxStatus, tree: &Tree, end: &WalkEnd) -> SeamcallResult {
    let info = entry_info(tree, end.level, end.word);
    SeamcallResult {
        status,
        rcx: info.raw(),
        rdx: info.rdx(),
    }
}

/// Takes the entry lock bit. `Err` holds the word found locked.
pub(crate) fn lock_entry(slot: &AtomicU64) -> Result<Word, Word> {
    let mut cur = slot.load(Ordering::Acquire);
    loop {
        if Word(cur).locked() {
            return Err(Word(cur));
        }
        match slot.compare_exchange_weak(
            cur,
            Word(cur).with_lock().0,
            Ordering::AcqRel,
            Ordering::Acquire,
        ) {
            Ok(_) => return Ok(Word(cur)),
            Err(actual) => cur = actual,
        }
    }
}

/// Stores `word` with the lock bit clear (releases the entry lock).
pub(crate) fn unlock_store(slot: &AtomicU64, word: Word) {
    slot.store(word.unlocked().0, Ordering::Release);
}

fn valid_hpa(hpa: u64, align: u64) -> bool {
    hpa >> 52 == 0 && hpa & (align - 1) == 0
}

impl TdxModule {
    /// Runs a SEAMCALL body behind the fault hook and counts its outcome.
    fn seamcall(
        &self,
        kind: CallKind,
        gpa: Option<u64>,
        body: impl FnOnce() -> SeamcallResult,
    ) -> SeamcallResult {
        let result = match self.faults.check(kind, gpa) {
            Some(fault) => {
                self.counters.injected();
                let busy_operand = match kind {
                    CallKind::MemTrack => operand::TD_EPOCH,
                    CallKind::Finalize => operand::TDR,
                    _ => operand::RCX,
                };
                SeamcallResult::status(match fault {
                    FaultResult::Busy => StatusCode::OperandBusy.with_operand(busy_operand),
                    FaultResult::InterruptedRestartable => {
                        StatusCode::InterruptedRestartable.status()
                    }
                    FaultResult::Status(s) => s,
                })
            }
            None => body(),
        };
        self.counters.status(kind, gpa, result.status);
        result
    }

    /// Decodes a page-info operand as the module does (reserved bits, level in `min..=max`,
    /// alignment) and checks the GPA is private and within the GPA width.
    pub(crate) fn decode(&self, raw: u64, min: u8, max: u8) -> Result<(u64, u8), TdxStatus> {
        let bad = invalid(operand::RCX);
        let (gpa, level) = match PageLevel::from_index(u64::from(max)) {
            Some(max_level) => {
                let (g, l) = decode_page_info(raw, max_level)?;
                (g.as_u64(), l.index())
            }
            None => {
                // S-EPT levels 3 and 4 (SEPT.ADD / SEPT.REMOVE): same rules, wider level range.
                let level = (raw & 7) as u8;
                let gpa = raw & !0xFFF;
                if raw & 0xFF8 != 0 || raw >> Gpa::MAX_BITS != 0 || level > max {
                    return Err(bad);
                }
                if gpa & (level_size(level) - 1) != 0 {
                    return Err(bad);
                }
                (gpa, level)
            }
        };
        let gpaw = self.config.gpaw;
        if level < min || gpa & gpaw.shared_bit() != 0 || gpa >> gpaw.width() != 0 {
            return Err(bad);
        }
        Ok((gpa, level))
    }

    pub(crate) fn tree_shared(&self) -> Result<RwLockReadGuard<'_, Tree>, TdxStatus> {
        match self.tree.try_read() {
            Ok(g) => Ok(g),
            Err(TryLockError::Poisoned(p)) => Ok(p.into_inner()),
            Err(TryLockError::WouldBlock) => {
                Err(StatusCode::OperandBusy.with_operand(operand::SEPT_TREE))
            }
        }
    }

    /// The preamble of a SEAMCALL on one S-EPT entry: decode the page-info operand (levels
    /// `min..=max`), take the tree lock exclusively, walk to the entry.
    fn walk_exclusive(
        &self,
        page_info: u64,
        min: u8,
        max: u8,
    ) -> Result<(RwLockWriteGuard<'_, Tree>, WalkEnd, u64, u8), SeamcallResult> {
        let (gpa, level) = self
            .decode(page_info, min, max)
            .map_err(SeamcallResult::status)?;
        let tree = self.tree_exclusive().map_err(SeamcallResult::status)?;
        let end = tree.walk(gpa, level, true);
        Ok((tree, end, gpa, level))
    }

    /// As [`TdxModule::walk_exclusive`], with the tree lock shared.
    fn walk_shared(
        &self,
        page_info: u64,
        min: u8,
        max: u8,
    ) -> Result<(RwLockReadGuard<'_, Tree>, WalkEnd, u64, u8), SeamcallResult> {
        let (gpa, level) = self
            .decode(page_info, min, max)
            .map_err(SeamcallResult::status)?;
        let tree = self.tree_shared().map_err(SeamcallResult::status)?;
        let end = tree.walk(gpa, level, true);
        Ok((tree, end, gpa, level))
    }

    fn tree_exclusive(&self) -> Result<RwLockWriteGuard<'_, Tree>, TdxStatus> {
        match self.tree.try_write() {
            Ok(g) => Ok(g),
            Err(TryLockError::Poisoned(p)) => Ok(p.into_inner()),
            Err(TryLockError::WouldBlock) => {
                Err(StatusCode::OperandBusy.with_operand(operand::SEPT_TREE))
            }
        }
    }

    fn take_host_interrupt(&self) -> bool {
        self.host_interrupt.swap(false, Ordering::AcqRel)
    }

    // ---- TDH.MR.FINALIZE -------------------------------------------------------------------

    /// TDH.MR.FINALIZE: op-state INITIALIZED -> RUNNABLE.
    ///
    /// Fails with OP_STATE_INCORRECT|OP_STATE when already runnable.
    pub fn finalize(&self) -> SeamcallResult {
        self.seamcall(CallKind::Finalize, None, || {
            match self.op_state.compare_exchange(
                super::OP_INITIALIZED,
                OP_RUNNABLE,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => SeamcallResult::status(TdxStatus::SUCCESS),
                Err(_) => SeamcallResult::status(
                    StatusCode::OpStateIncorrect.with_operand(operand::OP_STATE),
                ),
            }
        })
    }

    // ---- TDH.MEM.PAGE.ADD ------------------------------------------------------------------

    /// TDH.MEM.PAGE.ADD of the 4K page at `gpa`: maps `hpa` MAPPED with the content of
    /// `source_hpa` copied into it. Build phase only.
    pub fn page_add(&self, gpa: Gpa, hpa: u64, source_hpa: u64) -> SeamcallResult {
        self.page_add_raw(page_info(gpa, PageLevel::Size4K), hpa, source_hpa)
    }

    /// [`TdxModule::page_add`] with a raw page-info operand (RCX), target HPA (R8) and source
    /// HPA (R9).
    pub fn page_add_raw(&self, page_info: u64, hpa: u64, source_hpa: u64) -> SeamcallResult {
        self.seamcall(CallKind::PageAdd, Some(page_info), || {
            if self.runnable() {
                return SeamcallResult::status(
                    StatusCode::OpStateIncorrect.with_operand(operand::OP_STATE),
                );
            }
            let (gpa, _) = match self.decode(page_info, 0, 0) {
                Ok(v) => v,
                Err(s) => return SeamcallResult::status(s),
            };
            if !valid_hpa(hpa, 4096) {
                return SeamcallResult::status(invalid(operand::R8));
            }
            if !valid_hpa(source_hpa, 4096) {
                return SeamcallResult::status(invalid(OPERAND_R9));
            }
            let tree = match self.tree_shared() {
                Ok(t) => t,
                Err(s) => return SeamcallResult::status(s),
            };
            let end = tree.walk(gpa, 0, true);
            if !end.reached {
                return at_entry(rcx_status(StatusCode::EptWalkFailed), &tree, &end);
            }
            let Some(slot) = tree.slot(end.node, end.idx) else {
                return at_entry(rcx_status(StatusCode::EptWalkFailed), &tree, &end);
            };
            let word = match lock_entry(slot) {
                Ok(w) => w,
                Err(w) => {
                    let e = WalkEnd { word: w, ..end };
                    return at_entry(rcx_status(StatusCode::OperandBusy), &tree, &e);
                }
            };
            if word.state() != SeptState::Free {
                unlock_store(slot, word);
                let e = WalkEnd { word, ..end };
                return at_entry(rcx_status(StatusCode::EptEntryStateIncorrect), &tree, &e);
            }
            let token = self.contents.read(source_hpa);
            self.contents.write(hpa, token);
            {
                // FNV-1a over (GPA, token): a stand-in for the MRTD extension.
                let mut m = lock(&self.mrtd);
                for v in [gpa, token] {
                    for b in v.to_le_bytes() {
                        *m = (*m ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
                    }
                }
            }
            unlock_store(slot, Word::leaf(SeptState::Mapped, hpa));
            SeamcallResult::status(TdxStatus::SUCCESS)
        })
    }

    // ---- TDH.MEM.SEPT.ADD ------------------------------------------------------------------

    /// TDH.MEM.SEPT.ADD: the FREE entry of `gpa` at `level` (1..=3, or 4 with GPAW 52) becomes
    /// NL_MAPPED, pointing to the new S-EPT page `sept_hpa` with 512 FREE entries.
    pub fn sept_add(&self, gpa: Gpa, level: u8, sept_hpa: u64) -> SeamcallResult {
        self.sept_add_raw(gpa.as_u64() & !0xFFF | u64::from(level & 7), sept_hpa)
    }

    /// [`TdxModule::sept_add`] with a raw page-info operand.
    pub fn sept_add_raw(&self, page_info: u64, sept_hpa: u64) -> SeamcallResult {
        self.seamcall(CallKind::SeptAdd, Some(page_info), || {
            let top = self.config.gpaw.sept_levels() - 1;
            let (gpa, level) = match self.decode(page_info, 1, top) {
                Ok(v) => v,
                Err(s) => return SeamcallResult::status(s),
            };
            if !valid_hpa(sept_hpa, 4096) {
                return SeamcallResult::status(invalid(operand::R8));
            }
            let mut tree = match self.tree_exclusive() {
                Ok(t) => t,
                Err(s) => return SeamcallResult::status(s),
            };
            let end = tree.walk(gpa, level, true);
            if !end.reached {
                return at_entry(rcx_status(StatusCode::EptWalkFailed), &tree, &end);
            }
            if end.word.state() != SeptState::Free {
                return at_entry(rcx_status(StatusCode::EptEntryStateIncorrect), &tree, &end);
            }
            let child = tree.alloc_empty(level - 1, sept_hpa);
            tree.store_mut(
                end.node,
                end.idx,
                Word::non_leaf(SeptState::NlMapped, child),
            );
            SeamcallResult::status(TdxStatus::SUCCESS)
        })
    }

    // ---- TDH.MEM.PAGE.AUG ------------------------------------------------------------------

    /// TDH.MEM.PAGE.AUG: the FREE entry of `gpa` at `level` becomes PENDING on `hpa`. The page
    /// is not zeroed (ACCEPT does that). Runnable TDs only; level up to `max_aug_level`.
    pub fn page_aug(&self, gpa: Gpa, level: PageLevel, hpa: u64) -> SeamcallResult {
        self.page_aug_raw(page_info(gpa, level), hpa)
    }

    /// [`TdxModule::page_aug`] with a raw page-info operand (RCX) and HPA (R8).
    pub fn page_aug_raw(&self, page_info: u64, hpa: u64) -> SeamcallResult {
        self.seamcall(CallKind::PageAug, Some(page_info), || {
            if !self.runnable() {
                return SeamcallResult::status(
                    StatusCode::OpStateIncorrect.with_operand(operand::OP_STATE),
                );
            }
            let (gpa, level) = match self.decode(page_info, 0, self.config.max_aug_level.index()) {
                Ok(v) => v,
                Err(s) => return SeamcallResult::status(s),
            };
            if !valid_hpa(hpa, level_size(level)) {
                return SeamcallResult::status(invalid(operand::R8));
            }
            let tree = match self.tree_shared() {
                Ok(t) => t,
                Err(s) => return SeamcallResult::status(s),
            };
            let end = tree.walk(gpa, level, true);
            let Some(slot) = tree.slot(end.node, end.idx).filter(|_| end.reached) else {
                return at_entry(rcx_status(StatusCode::EptWalkFailed), &tree, &end);
            };
            let word = match lock_entry(slot) {
                Ok(w) => w,
                Err(w) => {
                    let e = WalkEnd { word: w, ..end };
                    return at_entry(rcx_status(StatusCode::OperandBusy), &tree, &e);
                }
            };
            if word.state() != SeptState::Free {
                unlock_store(slot, word);
                let e = WalkEnd { word, ..end };
                return at_entry(rcx_status(StatusCode::EptEntryStateIncorrect), &tree, &e);
            }
            unlock_store(slot, Word::leaf(SeptState::Pending, hpa));
            SeamcallResult::status(TdxStatus::SUCCESS)
        })
    }

    // ---- TDH.MEM.RANGE.BLOCK ---------------------------------------------------------------

    /// TDH.MEM.RANGE.BLOCK: NL_MAPPED/MAPPED/PENDING at `gpa`/`level` become blocked and record
    /// BEPOCH = TD_EPOCH. Already blocked: GPA_RANGE_ALREADY_BLOCKED (a warning).
    pub fn range_block(&self, gpa: Gpa, level: PageLevel) -> SeamcallResult {
        self.range_block_raw(page_info(gpa, level))
    }

    /// [`TdxModule::range_block`] with a raw page-info operand.
    pub fn range_block_raw(&self, page_info: u64) -> SeamcallResult {
        self.seamcall(CallKind::RangeBlock, Some(page_info), || {
            let (mut tree, end, _, _) = match self.walk_exclusive(page_info, 0, 2) {
                Ok(v) => v,
                Err(r) => return r,
            };
            if !end.reached {
                return at_entry(rcx_status(StatusCode::EptWalkFailed), &tree, &end);
            }
            let state = end.word.state();
            if state.is_blocked() {
                return at_entry(rcx_status(StatusCode::GpaRangeAlreadyBlocked), &tree, &end);
            }
            let Some(blocked) = state.blocked() else {
                return at_entry(rcx_status(StatusCode::EptEntryStateIncorrect), &tree, &end);
            };
            // BLOCK clears a partial ACCEPT's progress counter (spec §5).
            let word = end.word.with_state(blocked).with_progress(0);
            tree.store_mut(end.node, end.idx, word);
            let epoch = self.td_epoch();
            tree.set_bepoch(end.node, end.idx, epoch);
            SeamcallResult::status(TdxStatus::SUCCESS)
        })
    }

    // ---- TDH.MEM.TRACK ---------------------------------------------------------------------

    /// TDH.MEM.TRACK: increments TD_EPOCH, unless vCPUs are still counted in the previous
    /// epoch's parity (PREVIOUS_TLB_EPOCH_BUSY).
    pub fn mem_track(&self) -> SeamcallResult {
        self.seamcall(CallKind::MemTrack, None, || {
            let mut e = lock(&self.epoch);
            let prev = e.td_epoch.wrapping_sub(1);
            if e.refcount[(prev & 1) as usize] != 0 {
                return SeamcallResult::status(StatusCode::PreviousTlbEpochBusy.status());
            }
            e.td_epoch = e.td_epoch.saturating_add(1);
            SeamcallResult::status(TdxStatus::SUCCESS)
        })
    }

    // ---- TDH.MEM.RANGE.UNBLOCK -------------------------------------------------------------

    /// TDH.MEM.RANGE.UNBLOCK: a blocked entry goes back to its unblocked state. While the TD is
    /// runnable the block must be tracked (TLB_TRACKING_NOT_DONE|SEPT_TREE otherwise).
    pub fn range_unblock(&self, gpa: Gpa, level: PageLevel) -> SeamcallResult {
        self.range_unblock_raw(page_info(gpa, level))
    }

    /// [`TdxModule::range_unblock`] with a raw page-info operand.
    pub fn range_unblock_raw(&self, page_info: u64) -> SeamcallResult {
        self.seamcall(CallKind::RangeUnblock, Some(page_info), || {
            let (mut tree, end, _, _) = match self.walk_exclusive(page_info, 0, 2) {
                Ok(v) => v,
                Err(r) => return r,
            };
            if !end.reached {
                return at_entry(rcx_status(StatusCode::EptWalkFailed), &tree, &end);
            }
            // Model: an entry that is not blocked gives EPT_ENTRY_STATE_INCORRECT.
            if !end.word.state().is_blocked() {
                return at_entry(rcx_status(StatusCode::EptEntryStateIncorrect), &tree, &end);
            }
            if self.runnable() && !self.tracked(tree.bepoch(end.node, end.idx)) {
                return SeamcallResult::status(
                    StatusCode::TlbTrackingNotDone.with_operand(operand::SEPT_TREE),
                );
            }
            let word = end.word.with_state(end.word.state().unblocked());
            tree.store_mut(end.node, end.idx, word);
            SeamcallResult::status(TdxStatus::SUCCESS)
        })
    }

    // ---- TDH.MEM.PAGE.REMOVE ---------------------------------------------------------------

    /// TDH.MEM.PAGE.REMOVE: a leaf at `gpa`/`level` becomes FREE; the page is not zeroed and
    /// its HPA is returned in RCX. While runnable it must be blocked (GPA_RANGE_NOT_BLOCKED)
    /// and tracked (TLB_TRACKING_NOT_DONE).
    pub fn page_remove(&self, gpa: Gpa, level: PageLevel) -> SeamcallResult {
        self.page_remove_raw(page_info(gpa, level))
    }

    /// [`TdxModule::page_remove`] with a raw page-info operand.
    pub fn page_remove_raw(&self, page_info: u64) -> SeamcallResult {
        self.seamcall(CallKind::PageRemove, Some(page_info), || {
            let (tree, end, _, _) = match self.walk_shared(page_info, 0, 2) {
                Ok(v) => v,
                Err(r) => return r,
            };
            let Some(slot) = tree.slot(end.node, end.idx).filter(|_| end.reached) else {
                return at_entry(rcx_status(StatusCode::EptWalkFailed), &tree, &end);
            };
            let word = match lock_entry(slot) {
                Ok(w) => w,
                Err(w) => {
                    let e = WalkEnd { word: w, ..end };
                    return at_entry(rcx_status(StatusCode::OperandBusy), &tree, &e);
                }
            };
            let e = WalkEnd { word, ..end };
            if !word.state().is_leaf() {
                unlock_store(slot, word);
                return at_entry(rcx_status(StatusCode::EptEntryStateIncorrect), &tree, &e);
            }
            if self.runnable() {
                if !word.state().is_blocked() {
                    unlock_store(slot, word);
                    return at_entry(rcx_status(StatusCode::GpaRangeNotBlocked), &tree, &e);
                }
                if !self.tracked(tree.bepoch(end.node, end.idx)) {
                    unlock_store(slot, word);
                    return SeamcallResult::status(rcx_status(StatusCode::TlbTrackingNotDone));
                }
            }
            unlock_store(slot, Word::FREE);
            SeamcallResult {
                status: TdxStatus::SUCCESS,
                rcx: word.hpa(),
                rdx: 0,
            }
        })
    }

    // ---- blocked-and-tracked for the structural calls --------------------------------------

    /// While runnable: the entry must be blocked (else GPA_RANGE_NOT_BLOCKED with details) and
    /// tracked (else TLB_TRACKING_NOT_DONE). Before finalize these checks are skipped.
    fn check_blocked_tracked(&self, tree: &Tree, end: &WalkEnd) -> Result<(), SeamcallResult> {
        if !self.runnable() {
            return Ok(());
        }
        if !end.word.state().is_blocked() {
            return Err(at_entry(
                rcx_status(StatusCode::GpaRangeNotBlocked),
                tree,
                end,
            ));
        }
        if !self.tracked(tree.bepoch(end.node, end.idx)) {
            return Err(SeamcallResult::status(rcx_status(
                StatusCode::TlbTrackingNotDone,
            )));
        }
        Ok(())
    }

    // ---- TDH.MEM.PAGE.DEMOTE ---------------------------------------------------------------

    /// TDH.MEM.PAGE.DEMOTE of the 2M/1G leaf at `gpa`/`level` into 512 children on the new
    /// S-EPT page `sept_hpa`: the parent becomes NL_MAPPED, the children take the parent's
    /// unblocked state and contiguous HPAs; contents are preserved.
    pub fn page_demote(&self, gpa: Gpa, level: PageLevel, sept_hpa: u64) -> SeamcallResult {
        self.page_demote_raw(page_info(gpa, level), sept_hpa)
    }

    /// [`TdxModule::page_demote`] with a raw page-info operand (RCX) and S-EPT page (R8).
    pub fn page_demote_raw(&self, page_info: u64, sept_hpa: u64) -> SeamcallResult {
        self.seamcall(CallKind::PageDemote, Some(page_info), || {
            let (gpa, level) = match self.decode(page_info, 1, 2) {
                Ok(v) => v,
                Err(s) => return SeamcallResult::status(s),
            };
            if !valid_hpa(sept_hpa, 4096) {
                return SeamcallResult::status(invalid(operand::R8));
            }
            let mut tree = match self.tree_exclusive() {
                Ok(t) => t,
                Err(s) => return SeamcallResult::status(s),
            };
            let end = tree.walk(gpa, level, true);
            if !end.reached {
                return at_entry(rcx_status(StatusCode::EptWalkFailed), &tree, &end);
            }
            if !end.word.state().is_leaf() {
                return at_entry(rcx_status(StatusCode::EptEntryStateIncorrect), &tree, &end);
            }
            if let Err(r) = self.check_blocked_tracked(&tree, &end) {
                return r;
            }
            if self.config.demote_interruptible && self.take_host_interrupt() {
                return SeamcallResult::status(StatusCode::InterruptedRestartable.status());
            }
            let child_state = end.word.state().unblocked();
            let base = end.word.hpa();
            let step = level_size(level - 1);
            let words = (0..ENTRIES as u64)
                .map(|i| Word::leaf(child_state, base.wrapping_add(i.wrapping_mul(step))));
            let child = tree.alloc_words(level - 1, sept_hpa, words);
            tree.store_mut(
                end.node,
                end.idx,
                Word::non_leaf(SeptState::NlMapped, child),
            );
            SeamcallResult::status(TdxStatus::SUCCESS)
        })
    }

    // ---- TDH.MEM.PAGE.PROMOTE --------------------------------------------------------------

    /// TDH.MEM.PAGE.PROMOTE of the blocked non-leaf at `gpa`/`level` (2M/1G): when its 512
    /// children are all MAPPED or all PENDING on contiguous HPAs aligned to `level`, it becomes
    /// one unblocked leaf and the S-EPT page is freed (its HPA in RCX).
    pub fn page_promote(&self, gpa: Gpa, level: PageLevel) -> SeamcallResult {
        self.page_promote_raw(page_info(gpa, level))
    }

    /// [`TdxModule::page_promote`] with a raw page-info operand.
    pub fn page_promote_raw(&self, page_info: u64) -> SeamcallResult {
        self.seamcall(CallKind::PagePromote, Some(page_info), || {
            let (mut tree, end, _, level) = match self.walk_exclusive(page_info, 1, 2) {
                Ok(v) => v,
                Err(r) => return r,
            };
            if !end.reached {
                return at_entry(rcx_status(StatusCode::EptWalkFailed), &tree, &end);
            }
            if !end.word.state().is_non_leaf() {
                return at_entry(rcx_status(StatusCode::EptEntryStateIncorrect), &tree, &end);
            }
            if let Err(r) = self.check_blocked_tracked(&tree, &end) {
                return r;
            }
            let child = end.word.child();
            let first = tree.load(child, 0);
            let state = first.state();
            let base = first.hpa();
            let step = level_size(level - 1);
            let uniform = matches!(state, SeptState::Mapped | SeptState::Pending)
                && base & (level_size(level) - 1) == 0
                && tree.words(child).zip(0u64..).all(|(w, i)| {
                    w.state() == state && w.hpa() == base.wrapping_add(i.wrapping_mul(step))
                });
            if !uniform {
                return at_entry(
                    rcx_status(StatusCode::EptInvalidPromoteConditions),
                    &tree,
                    &end,
                );
            }
            if self.take_host_interrupt() {
                return SeamcallResult::status(StatusCode::InterruptedRestartable.status());
            }
            let freed = tree.free(child).map_or(0, |n| n.hpa);
            tree.store_mut(end.node, end.idx, Word::leaf(state, base));
            SeamcallResult {
                status: TdxStatus::SUCCESS,
                rcx: freed,
                rdx: 0,
            }
        })
    }

    // ---- TDH.MEM.SEPT.REMOVE ---------------------------------------------------------------

    /// TDH.MEM.SEPT.REMOVE: the blocked non-leaf at `gpa`/`level` whose 512 children are all
    /// FREE becomes FREE; the S-EPT page's HPA is returned in RCX.
    pub fn sept_remove(&self, gpa: Gpa, level: u8) -> SeamcallResult {
        self.sept_remove_raw(gpa.as_u64() & !0xFFF | u64::from(level & 7))
    }

    /// [`TdxModule::sept_remove`] with a raw page-info operand.
    pub fn sept_remove_raw(&self, page_info: u64) -> SeamcallResult {
        self.seamcall(CallKind::SeptRemove, Some(page_info), || {
            let top = self.config.gpaw.sept_levels() - 1;
            let (mut tree, end, _, _) = match self.walk_exclusive(page_info, 1, top) {
                Ok(v) => v,
                Err(r) => return r,
            };
            if !end.reached {
                return at_entry(rcx_status(StatusCode::EptWalkFailed), &tree, &end);
            }
            if !end.word.state().is_non_leaf() {
                return at_entry(rcx_status(StatusCode::EptEntryStateIncorrect), &tree, &end);
            }
            if let Err(r) = self.check_blocked_tracked(&tree, &end) {
                return r;
            }
            let child = end.word.child();
            if tree.words(child).any(|w| w.state() != SeptState::Free) {
                return at_entry(rcx_status(StatusCode::EptPageNotFree), &tree, &end);
            }
            let freed = tree.free(child).map_or(0, |n| n.hpa);
            tree.store_mut(end.node, end.idx, Word::FREE);
            SeamcallResult {
                status: TdxStatus::SUCCESS,
                rcx: freed,
                rdx: 0,
            }
        })
    }
}
