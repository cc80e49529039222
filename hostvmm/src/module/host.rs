//! Host-side SEAMCALLs: PAGE.ADD, SEPT.ADD, PAGE.AUG, RANGE.BLOCK, MEM.TRACK, RANGE.UNBLOCK,
//! PAGE.REMOVE, PAGE.DEMOTE, PAGE.PROMOTE, SEPT.REMOVE and MR.FINALIZE, each following its
//! handler in `src/vmm_dispatcher/api_calls/` of the TDX module 1.5 source.
//!
//! The handlers share one order (`helpers.c` check_state_map_tdcs_and_lock,
//! verify_page_info_input, lock_sept_check_and_walk_private_gpa; `tdx_locks.h`
//! sept_lock_acquire_host): op-state from the module's lookup table, the page-info operand
//! and the GPA, the S-EPT tree lock in the mode the handler names, the walk (stopping at any
//! entry without permissions), the entry lock, the entry state from the module's state table,
//! blocked-and-tracked where the handler asks for it, then the host physical address operands,
//! a pending host interrupt for DEMOTE and PROMOTE, and the change. Failures about an S-EPT
//! entry report it in RCX/RDX in the architectural encoding ([`super::sept::Word::arch`]).

use std::sync::atomic::{AtomicU64, Ordering};

use accept::abi::{decode_page_info, operand, page_info, Gpa, PageLevel, StatusCode, TdxStatus};

use super::epoch::TrackRefused;
use super::fault::FaultResult;
use super::sept::{level_size, Tree, WalkEnd, Word, ENTRIES};
use super::sharex::{LockMode, SharexGuard};
use super::stats::CallKind;
use super::{lock, OpState, SeamcallResult, SeptState, TdxModule, OPERAND_R9, OP_RUNNABLE, TDR_PA};

/// `?` for handler bodies whose failures are answers themselves (`Err` holds the answer).
macro_rules! answer {
    ($e:expr) => {
        match $e {
            Ok(v) => v,
            Err(r) => return r,
        }
    };
}

fn invalid(op: u32) -> TdxStatus {
    StatusCode::OperandInvalid.with_operand(op)
}

fn rcx_status(code: StatusCode) -> TdxStatus {
    code.with_operand(operand::RCX)
}

/// A failure that reports an S-EPT entry: RCX the architectural entry, RDX its level and public
/// state (`sept_manager.c` set_arch_septe_details_in_vmm_regs).
fn details(status: TdxStatus, word: Word, level: u8) -> SeamcallResult {
    SeamcallResult {
        status,
        rcx: word.arch(level),
        rdx: u64::from(level) | (u64::from(word.state().public_state()) << 8),
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

/// The host side of the entry lock (`tdx_locks.h` sept_lock_acquire_host): a host call that
/// finds the entry locked sets its host-priority bit and fails; one that takes the lock clears
/// the bit. `Ok` holds the entry as read after locking, host-priority bit clear.
pub(crate) fn lock_entry_host(slot: &AtomicU64) -> Result<Word, Word> {
    match lock_entry(slot) {
        Ok(_) => {
            let prev = slot.fetch_and(!Word(0).with_hp().0, Ordering::AcqRel);
            Ok(Word(prev).without_hp().unlocked())
        }
        Err(w) => {
            slot.fetch_or(Word(0).with_hp().0, Ordering::AcqRel);
            Err(w)
        }
    }
}

/// Stores `word` with the lock bit clear (a new entry value that releases the lock, as the
/// module's atomic writes of a whole entry do; a host-priority bit set meanwhile is lost, as in
/// the module).
pub(crate) fn unlock_store(slot: &AtomicU64, word: Word) {
    slot.store(word.unlocked().0, Ordering::Release);
}

/// Releases the entry lock and keeps the rest of the entry (`tdx_locks.h` sept_lock_release).
pub(crate) fn release(slot: &AtomicU64) {
    slot.fetch_and(!Word(0).with_lock().0, Ordering::AcqRel);
}

fn valid_hpa(hpa: u64, align: u64) -> bool {
    hpa >> 52 == 0 && hpa & (align - 1) == 0
}

/// Whether the module's op-state lookup table (`op_state_lookup.c` seamcall_state_lookup)
/// allows `kind` in `op`: PAGE.ADD and MR.FINALIZE only while INITIALIZED; every other memory
/// SEAMCALL here (AUG included) both while INITIALIZED and RUNNABLE.
pub(crate) const fn op_state_allows(kind: CallKind, op: OpState) -> bool {
    match kind {
        CallKind::PageAdd | CallKind::Finalize => matches!(op, OpState::Initialized),
        _ => true,
    }
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

    /// Decodes a page-info operand as the module does (`helpers.c` verify_page_info_input:
    /// reserved bits, level in `min..=max`, alignment) and checks the GPA is private and within
    /// the GPA width (`helpers.c` check_gpa_validity). Both fail with OPERAND_INVALID|RCX.
    pub(crate) fn decode(&self, raw: u64, min: u8, max: u8) -> Result<(u64, u8), TdxStatus> {
        let bad = invalid(operand::RCX);
        let (gpa, level) = match PageLevel::from_index(u64::from(max)) {
            Some(max_level) => {
                let (g, l) = decode_page_info(raw, max_level)?;
                (g.as_u64(), l.index())
            }
            None => {
                // S-EPT levels 3 and 4 (SEPT.ADD, SEPT.REMOVE, BLOCK, UNBLOCK): same rules,
                // wider level range.
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

    /// The op-state check of `helpers.c` check_state_map_tdcs_and_lock: OP_STATE_INCORRECT,
    /// with no operand, when the lookup table refuses the call.
    fn check_op_state(&self, kind: CallKind) -> Result<(), SeamcallResult> {
        if op_state_allows(kind, self.op_state()) {
            Ok(())
        } else {
            Err(SeamcallResult::status(
                StatusCode::OpStateIncorrect.status(),
            ))
        }
    }

    /// Takes the S-EPT tree lock (BUSY|SEPT_TREE when a conflicting holder has it).
    pub(crate) fn tree_lock(&self, mode: LockMode) -> Result<SharexGuard<'_>, SeamcallResult> {
        self.sept_lock.try_lock(mode).ok_or(SeamcallResult::status(
            StatusCode::OperandBusy.with_operand(operand::SEPT_TREE),
        ))
    }

    /// The common preamble of the handlers on one S-EPT entry: op-state, page info (levels
    /// `min..=max`) and GPA, then the tree lock in `mode`.
    fn preamble(
        &self,
        kind: CallKind,
        page_info: u64,
        (min, max): (u8, u8),
        mode: LockMode,
    ) -> Result<(SharexGuard<'_>, u64, u8), SeamcallResult> {
        self.check_op_state(kind)?;
        let (gpa, level) = self
            .decode(page_info, min, max)
            .map_err(SeamcallResult::status)?;
        let guard = self.tree_lock(mode)?;
        Ok((guard, gpa, level))
    }

    fn take_host_interrupt(&self) -> bool {
        self.host_interrupt.swap(false, Ordering::AcqRel)
    }

    /// TLB tracking is checked only where the op-state asks for it (`op_state_lookup.c`
    /// state_flags_lookup: RUNNABLE yes, INITIALIZED no).
    fn tracking_required(&self) -> bool {
        self.runnable()
    }

    /// INTERRUPTED_RESTARTABLE with RCX and RDX restored to the call's inputs (page info and
    /// the TDR), as `tdh_mem_page_demote.c` and `tdh_mem_page_promote.c` restore them.
    fn interrupted(page_info: u64) -> SeamcallResult {
        SeamcallResult {
            status: StatusCode::InterruptedRestartable.status(),
            rcx: page_info,
            rdx: TDR_PA,
        }
    }

    // ---- TDH.MR.FINALIZE -------------------------------------------------------------------

    /// TDH.MR.FINALIZE (`tdh_mr_finalize.c` tdh_mr_finalize): op-state INITIALIZED ->
    /// RUNNABLE; OP_STATE_INCORRECT (no operand) when already runnable.
    pub fn finalize(&self) -> SeamcallResult {
        self.seamcall(CallKind::Finalize, None, || {
            match self.op_state.compare_exchange(
                super::OP_INITIALIZED,
                OP_RUNNABLE,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => SeamcallResult::status(TdxStatus::SUCCESS),
                Err(_) => SeamcallResult::status(StatusCode::OpStateIncorrect.status()),
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
    ///
    /// `tdh_mem_page_add.c` tdh_mem_page_add: the TDR is locked exclusively, which locks the
    /// tree implicitly (modelled as the tree lock taken exclusively, BUSY|RDX on conflict);
    /// op-state; page info and GPA; walk; state FREE; then R9, then R8. No entry lock.
    pub fn page_add_raw(&self, page_info: u64, hpa: u64, source_hpa: u64) -> SeamcallResult {
        self.seamcall(CallKind::PageAdd, Some(page_info), || {
            let Some(_guard) = self.sept_lock.try_lock(LockMode::Exclusive) else {
                return SeamcallResult::status(StatusCode::OperandBusy.with_operand(operand::RDX));
            };
            if let Err(r) = self.check_op_state(CallKind::PageAdd) {
                return r;
            }
            let (gpa, _) = match self.decode(page_info, 0, 0) {
                Ok(v) => v,
                Err(s) => return SeamcallResult::status(s),
            };
            let tree = self.read_tree();
            let end = tree.walk(gpa, 0, false);
            if !end.reached {
                return details(rcx_status(StatusCode::EptWalkFailed), end.word, end.level);
            }
            let Some(slot) = tree.slot(end.node, end.idx) else {
                return details(rcx_status(StatusCode::EptWalkFailed), end.word, end.level);
            };
            let word = Word(slot.load(Ordering::Acquire));
            if word.state() != SeptState::Free {
                return details(rcx_status(StatusCode::EptEntryStateIncorrect), word, 0);
            }
            if !valid_hpa(source_hpa, 4096) {
                return SeamcallResult::status(invalid(OPERAND_R9));
            }
            if !valid_hpa(hpa, 4096) {
                return SeamcallResult::status(invalid(operand::R8));
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

    // ---- the walk and entry lock shared by the handlers ------------------------------------

    /// Walks to the requested level: EPT_WALK_FAILED|RCX with the entry where the walk
    /// stopped (`helpers.c` lock_sept_check_and_walk_internal, SEPT_WALK_TO_LEVEL).
    fn walk_to(tree: &Tree, gpa: u64, level: u8) -> Result<WalkEnd, SeamcallResult> {
        let end = tree.walk(gpa, level, false);
        if end.reached && tree.slot(end.node, end.idx).is_some() {
            Ok(end)
        } else {
            Err(details(
                rcx_status(StatusCode::EptWalkFailed),
                end.word,
                end.level,
            ))
        }
    }

    /// Walks to the entry and takes its lock on the host side: BUSY|RCX with the entry as
    /// walked when another logical processor holds it (and its host-priority bit set).
    fn walk_and_lock(
        tree: &Tree,
        gpa: u64,
        level: u8,
    ) -> Result<(WalkEnd, &AtomicU64, Word), SeamcallResult> {
        let end = Self::walk_to(tree, gpa, level)?;
        let Some(slot) = tree.slot(end.node, end.idx) else {
            return Err(details(
                rcx_status(StatusCode::EptWalkFailed),
                end.word,
                level,
            ));
        };
        match lock_entry_host(slot) {
            Ok(word) => Ok((end, slot, word)),
            Err(_) => Err(details(
                rcx_status(StatusCode::OperandBusy),
                end.word,
                end.level,
            )),
        }
    }

    /// Walk, entry lock, then the handler's row of the state table (`sept_state_lookup.c`
    /// seamcall_sept_state_lookup): EPT_ENTRY_STATE_INCORRECT|RCX with the entry (lock
    /// released) when `allowed` refuses its state.
    fn lock_in_state(
        tree: &Tree,
        gpa: u64,
        level: u8,
        allowed: fn(SeptState) -> bool,
    ) -> Result<(WalkEnd, &AtomicU64, Word), SeamcallResult> {
        let (end, slot, word) = Self::walk_and_lock(tree, gpa, level)?;
        if allowed(word.state()) {
            Ok((end, slot, word))
        } else {
            release(slot);
            Err(details(
                rcx_status(StatusCode::EptEntryStateIncorrect),
                word,
                level,
            ))
        }
    }

    /// [`TdxModule::lock_in_state`], then blocked-and-tracked (lock released on failure).
    fn lock_blocked_tracked<'t>(
        &self,
        tree: &'t Tree,
        gpa: u64,
        level: u8,
        allowed: fn(SeptState) -> bool,
    ) -> Result<(WalkEnd, &'t AtomicU64, Word), SeamcallResult> {
        let (end, slot, word) = Self::lock_in_state(tree, gpa, level, allowed)?;
        if let Err(r) = self.check_blocked_tracked(tree, &end, word) {
            release(slot);
            return Err(r);
        }
        Ok((end, slot, word))
    }

    /// While the op-state needs TLB tracking: the entry must be blocked
    /// (GPA_RANGE_NOT_BLOCKED|RCX with details) and its block tracked (TLB_TRACKING_NOT_DONE
    /// with `tracking_operand`, no details). The same check in `tdh_mem_page_remove.c`,
    /// `tdh_mem_page_demote.c`, `tdh_mem_page_promote.c` and `tdh_mem_sept_remove.c`.
    fn check_blocked_tracked(
        &self,
        tree: &Tree,
        end: &WalkEnd,
        word: Word,
    ) -> Result<(), SeamcallResult> {
        if !self.tracking_required() {
            return Ok(());
        }
        if !word.state().is_blocked() {
            return Err(details(
                rcx_status(StatusCode::GpaRangeNotBlocked),
                word,
                end.level,
            ));
        }
        if !self.tracked(tree.bepoch(end.node, end.idx)) {
            return Err(SeamcallResult::status(rcx_status(
                StatusCode::TlbTrackingNotDone,
            )));
        }
        Ok(())
    }

    // ---- TDH.MEM.SEPT.ADD ------------------------------------------------------------------

    /// TDH.MEM.SEPT.ADD: the FREE entry of `gpa` at `level` (1..=3, or 4 with GPAW 52) becomes
    /// NL_MAPPED, pointing to the new S-EPT page `sept_hpa` with 512 FREE entries.
    pub fn sept_add(&self, gpa: Gpa, level: u8, sept_hpa: u64) -> SeamcallResult {
        self.sept_add_raw(gpa.as_u64() & !0xFFF | u64::from(level & 7), sept_hpa)
    }

    /// [`TdxModule::sept_add`] with a raw page-info operand (RCX) and S-EPT page (R8).
    ///
    /// `tdh_mem_sept_add.c` tdh_mem_sept_add (version 0) and process_l1_page: tree lock
    /// shared, entry lock, state FREE (NL_MAPPED passes the state table but version 0 refuses
    /// an existing page with EPT_ENTRY_STATE_INCORRECT), then R8.
    pub fn sept_add_raw(&self, page_info: u64, sept_hpa: u64) -> SeamcallResult {
        self.seamcall(CallKind::SeptAdd, Some(page_info), || {
            let top = self.config.gpaw.sept_levels() - 1;
            let (_guard, gpa, level) =
                answer!(self.preamble(CallKind::SeptAdd, page_info, (1, top), LockMode::Shared));
            let mut tree = self.write_tree();
            let (end, slot, word) = answer!(Self::walk_and_lock(&tree, gpa, level));
            if word.state() != SeptState::Free {
                release(slot);
                return details(rcx_status(StatusCode::EptEntryStateIncorrect), word, level);
            }
            if !valid_hpa(sept_hpa, 4096) {
                release(slot);
                return SeamcallResult::status(invalid(operand::R8));
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
    /// is not zeroed (ACCEPT does that). Level up to `max_aug_level`.
    pub fn page_aug(&self, gpa: Gpa, level: PageLevel, hpa: u64) -> SeamcallResult {
        self.page_aug_raw(page_info(gpa, level), hpa)
    }

    /// [`TdxModule::page_aug`] with a raw page-info operand (RCX) and HPA (R8).
    ///
    /// `tdh_mem_page_aug.c` tdh_mem_page_aug: allowed while INITIALIZED and RUNNABLE; tree
    /// lock shared; entry lock; state FREE; then R8 (aligned to the level).
    pub fn page_aug_raw(&self, page_info: u64, hpa: u64) -> SeamcallResult {
        self.seamcall(CallKind::PageAug, Some(page_info), || {
            let max = self.config.max_aug_level.index();
            let (_guard, gpa, level) =
                answer!(self.preamble(CallKind::PageAug, page_info, (0, max), LockMode::Shared));
            let tree = self.read_tree();
            let (_, slot, word) = answer!(Self::walk_and_lock(&tree, gpa, level));
            if word.state() != SeptState::Free {
                release(slot);
                return details(rcx_status(StatusCode::EptEntryStateIncorrect), word, level);
            }
            if !valid_hpa(hpa, level_size(level)) {
                release(slot);
                return SeamcallResult::status(invalid(operand::R8));
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

    /// [`TdxModule::range_block`] with a raw page-info operand; levels 0 up to the root's
    /// entries (3, or 4 with GPAW 52).
    ///
    /// `tdh_mem_range_block.c` tdh_mem_range_block and block_sept_entry: tree lock
    /// exclusive, entry lock, state table (NL_MAPPED, MAPPED, PENDING); a blocked entry gives
    /// the warning, anything else EPT_ENTRY_STATE_INCORRECT, both with details. Blocking a
    /// page table clears its permissions, so later walks stop there; a PENDING 2M entry loses
    /// its ACCEPT counter.
    pub fn range_block_raw(&self, page_info: u64) -> SeamcallResult {
        self.seamcall(CallKind::RangeBlock, Some(page_info), || {
            let top = self.config.gpaw.sept_levels() - 1;
            let (_guard, gpa, level) = answer!(self.preamble(
                CallKind::RangeBlock,
                page_info,
                (0, top),
                LockMode::Exclusive,
            ));
            let mut tree = self.write_tree();
            let (end, slot, word) = answer!(Self::walk_and_lock(&tree, gpa, level));
            let Some(blocked) = word.state().blocked() else {
                release(slot);
                let code = if word.state().is_blocked() {
                    StatusCode::GpaRangeAlreadyBlocked
                } else {
                    StatusCode::EptEntryStateIncorrect
                };
                return details(rcx_status(code), word, level);
            };
            unlock_store(slot, word.with_state(blocked).with_progress(0));
            let epoch = self.td_epoch();
            tree.set_bepoch(end.node, end.idx, epoch);
            SeamcallResult::status(TdxStatus::SUCCESS)
        })
    }

    // ---- TDH.MEM.TRACK ---------------------------------------------------------------------

    /// TDH.MEM.TRACK (`tdh_mem_track.c` tdh_mem_track): the epoch lock exclusive
    /// (OPERAND_BUSY|TD_EPOCH when a TD entry holds it), then increments TD_EPOCH, unless vCPUs
    /// are still counted in the previous epoch's parity (PREVIOUS_TLB_EPOCH_BUSY, no operand).
    pub fn mem_track(&self) -> SeamcallResult {
        self.seamcall(CallKind::MemTrack, None, || {
            if let Err(r) = self.check_op_state(CallKind::MemTrack) {
                return r;
            }
            match self.epochs.track() {
                Ok(()) => SeamcallResult::status(TdxStatus::SUCCESS),
                Err(TrackRefused::Busy) => {
                    SeamcallResult::status(StatusCode::OperandBusy.with_operand(operand::TD_EPOCH))
                }
                Err(TrackRefused::PreviousEpochBusy) => {
                    SeamcallResult::status(StatusCode::PreviousTlbEpochBusy.status())
                }
            }
        })
    }

    // ---- TDH.MEM.RANGE.UNBLOCK -------------------------------------------------------------

    /// TDH.MEM.RANGE.UNBLOCK: a blocked entry goes back to its unblocked state. While the TD is
    /// runnable the block must be tracked (TLB_TRACKING_NOT_DONE|SEPT_TREE otherwise).
    pub fn range_unblock(&self, gpa: Gpa, level: PageLevel) -> SeamcallResult {
        self.range_unblock_raw(page_info(gpa, level))
    }

    /// [`TdxModule::range_unblock`] with a raw page-info operand; levels 0 up to the root's
    /// entries.
    ///
    /// `tdh_mem_range_unblock.c` tdh_mem_range_unblock: tree lock exclusive, entry lock,
    /// state table (NL_BLOCKED, BLOCKED, PENDING_BLOCKED, else EPT_ENTRY_STATE_INCORRECT with
    /// details), tracking where the op-state needs it, then sept_unblock.
    pub fn range_unblock_raw(&self, page_info: u64) -> SeamcallResult {
        self.seamcall(CallKind::RangeUnblock, Some(page_info), || {
            let top = self.config.gpaw.sept_levels() - 1;
            let (_guard, gpa, level) = answer!(self.preamble(
                CallKind::RangeUnblock,
                page_info,
                (0, top),
                LockMode::Exclusive,
            ));
            let tree = self.write_tree();
            let (end, slot, word) = answer!(Self::lock_in_state(
                &tree,
                gpa,
                level,
                SeptState::is_blocked
            ));
            if self.tracking_required() && !self.tracked(tree.bepoch(end.node, end.idx)) {
                release(slot);
                return SeamcallResult::status(
                    StatusCode::TlbTrackingNotDone.with_operand(operand::SEPT_TREE),
                );
            }
            unlock_store(slot, word.with_state(word.state().unblocked()));
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
    ///
    /// `tdh_mem_page_remove.c` tdh_mem_page_remove: levels 0..=2, tree lock shared, entry
    /// lock, a leaf in the state table, blocked and tracked (TLB_TRACKING_NOT_DONE|RCX).
    pub fn page_remove_raw(&self, page_info: u64) -> SeamcallResult {
        self.seamcall(CallKind::PageRemove, Some(page_info), || {
            let (_guard, gpa, level) =
                answer!(self.preamble(CallKind::PageRemove, page_info, (0, 2), LockMode::Shared));
            let tree = self.read_tree();
            let (_, slot, word) =
                answer!(self.lock_blocked_tracked(&tree, gpa, level, SeptState::is_leaf));
            unlock_store(slot, Word::FREE);
            SeamcallResult {
                status: TdxStatus::SUCCESS,
                rcx: word.hpa(),
                rdx: 0,
            }
        })
    }

    // ---- TDH.MEM.PAGE.DEMOTE ---------------------------------------------------------------

    /// TDH.MEM.PAGE.DEMOTE of the 2M/1G leaf at `gpa`/`level` into 512 children on the new
    /// S-EPT page `sept_hpa`: the parent becomes NL_MAPPED, the children take the parent's
    /// unblocked state and contiguous HPAs; contents are preserved.
    pub fn page_demote(&self, gpa: Gpa, level: PageLevel, sept_hpa: u64) -> SeamcallResult {
        self.page_demote_raw(page_info(gpa, level), sept_hpa)
    }

    /// [`TdxModule::page_demote`] with a raw page-info operand (RCX) and S-EPT page (R8).
    ///
    /// `tdh_mem_page_demote.c` tdh_mem_page_demote: levels 1..=2, tree lock shared, entry
    /// lock, state table (MAPPED, BLOCKED, PENDING, PENDING_BLOCKED), blocked and tracked,
    /// then R8, then a pending host interrupt (INTERRUPTED_RESTARTABLE, RCX/RDX restored to
    /// the inputs, nothing changed), then the split (sept_split_entry).
    pub fn page_demote_raw(&self, page_info: u64, sept_hpa: u64) -> SeamcallResult {
        self.seamcall(CallKind::PageDemote, Some(page_info), || {
            let (_guard, gpa, level) =
                answer!(self.preamble(CallKind::PageDemote, page_info, (1, 2), LockMode::Shared));
            let mut tree = self.write_tree();
            let (end, slot, word) =
                answer!(self.lock_blocked_tracked(&tree, gpa, level, SeptState::is_leaf));
            if !valid_hpa(sept_hpa, 4096) {
                release(slot);
                return SeamcallResult::status(invalid(operand::R8));
            }
            if self.config.demote_interruptible && self.take_host_interrupt() {
                release(slot);
                return Self::interrupted(page_info);
            }
            let child_state = word.state().unblocked();
            let base = word.hpa();
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
    ///
    /// `tdh_mem_page_promote.c` tdh_mem_page_promote and is_sept_page_valid_for_merge:
    /// levels 1..=2, tree lock shared, entry lock, state table (NL_MAPPED, NL_BLOCKED),
    /// blocked and tracked, then every child locked on the host side in order (a locked child:
    /// BUSY|RCX with the parent's details) and compared with the first, then a pending host
    /// interrupt (INTERRUPTED_RESTARTABLE, RCX/RDX restored), then the merge.
    pub fn page_promote_raw(&self, page_info: u64) -> SeamcallResult {
        self.seamcall(CallKind::PagePromote, Some(page_info), || {
            let (_guard, gpa, level) =
                answer!(self.preamble(CallKind::PagePromote, page_info, (1, 2), LockMode::Shared));
            let mut tree = self.write_tree();
            let (end, slot, word) =
                answer!(self.lock_blocked_tracked(&tree, gpa, level, SeptState::is_non_leaf));
            let child = word.child();
            let outcome = Self::lock_children_for_merge(&tree, child, level);
            let locked = match outcome {
                Ok(n) => n,
                Err((n, code)) => {
                    Self::release_children(&tree, child, n);
                    release(slot);
                    return details(rcx_status(code), word, level);
                }
            };
            if self.take_host_interrupt() {
                Self::release_children(&tree, child, locked);
                release(slot);
                return Self::interrupted(page_info);
            }
            let first = tree.load(child, 0).unlocked();
            let freed = tree.free(child).map_or(0, |n| n.hpa);
            tree.store_mut(end.node, end.idx, Word::leaf(first.state(), first.hpa()));
            SeamcallResult {
                status: TdxStatus::SUCCESS,
                rcx: freed,
                rdx: 0,
            }
        })
    }

    /// Locks the children of the S-EPT page `child` one by one and checks them as
    /// `tdh_mem_page_promote.c` is_sept_page_valid_for_merge does: the first MAPPED or PENDING
    /// and aligned to the merged size, every other one identical but for the address. `Ok`
    /// holds the number locked (512); `Err` the number locked and the failure.
    fn lock_children_for_merge(
        tree: &Tree,
        child: usize,
        level: u8,
    ) -> Result<usize, (usize, StatusCode)> {
        let step = level_size(level - 1);
        let mut first = Word::FREE;
        for i in 0..ENTRIES {
            let Some(slot) = tree.slot(child, i) else {
                return Err((i, StatusCode::EptInvalidPromoteConditions));
            };
            let Ok(w) = lock_entry_host(slot) else {
                return Err((i, StatusCode::OperandBusy));
            };
            let w = w.with_progress(0);
            if i == 0 {
                let mapped_or_pending = matches!(w.state(), SeptState::Mapped | SeptState::Pending);
                if w.hpa() & (level_size(level) - 1) != 0 || !mapped_or_pending {
                    return Err((1, StatusCode::EptInvalidPromoteConditions));
                }
                first = w;
            } else {
                let expect = first.hpa().wrapping_add((i as u64).wrapping_mul(step));
                if w.state() != first.state() || w.hpa() != expect {
                    return Err((i + 1, StatusCode::EptInvalidPromoteConditions));
                }
            }
        }
        Ok(ENTRIES)
    }

    fn release_children(tree: &Tree, child: usize, n: usize) {
        for i in 0..n {
            if let Some(slot) = tree.slot(child, i) {
                release(slot);
            }
        }
    }

    // ---- TDH.MEM.SEPT.REMOVE ---------------------------------------------------------------

    /// TDH.MEM.SEPT.REMOVE: the blocked non-leaf at `gpa`/`level` whose 512 children are all
    /// FREE becomes FREE; the S-EPT page's HPA is returned in RCX.
    pub fn sept_remove(&self, gpa: Gpa, level: u8) -> SeamcallResult {
        self.sept_remove_raw(gpa.as_u64() & !0xFFF | u64::from(level & 7))
    }

    /// [`TdxModule::sept_remove`] with a raw page-info operand.
    ///
    /// `tdh_mem_sept_remove.c` tdh_mem_sept_remove (version 0): levels 1 up to the root's
    /// entries, tree lock exclusive, entry lock, state table (NL_MAPPED, NL_BLOCKED), blocked
    /// and tracked, then every child FREE (EPT_PAGE_NOT_FREE with the parent's details).
    pub fn sept_remove_raw(&self, page_info: u64) -> SeamcallResult {
        self.seamcall(CallKind::SeptRemove, Some(page_info), || {
            let top = self.config.gpaw.sept_levels() - 1;
            let (_guard, gpa, level) = answer!(self.preamble(
                CallKind::SeptRemove,
                page_info,
                (1, top),
                LockMode::Exclusive,
            ));
            let mut tree = self.write_tree();
            let (end, slot, word) =
                answer!(self.lock_blocked_tracked(&tree, gpa, level, SeptState::is_non_leaf));
            let child = word.child();
            if tree.words(child).any(|w| w.state() != SeptState::Free) {
                release(slot);
                return details(rcx_status(StatusCode::EptPageNotFree), word, level);
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
