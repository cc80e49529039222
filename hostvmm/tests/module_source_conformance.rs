//! Conformance of the TDX-module emulator with the module source itself (intel/tdx-module,
//! branch `tdx_1.5`, tag TDX_1.5.01): each test names, in its doc comment, the source file and
//! function whose behaviour it checks. These are the behaviours the digest in
//! `docs/tdx-module-memory.md` got wrong or left open; `module_conformance.rs` keeps the rows
//! the digest gets right.

mod module_support;

use accept::abi::{
    operand, page_info, PageLevel, StatusCode as C, TdxStatus, EXIT_REASON_EPT_VIOLATION,
};
use hostvmm::module::{
    Access, AccessOutcome, ModuleConfig, SeamcallResult, SeptState as S, TdExit,
    TdcallOutcome as T, TdcallRegs, TdxModule, VmcallRegs, ATTR_SEPT_VE_DISABLE,
    HOST_PRIORITY_BUSY_TIMEOUT, TDR_PA,
};
use module_support::{gpa, size, st, Td, K4, M2};

const OK: T = T::Completed(TdxStatus::SUCCESS);
const HPA_2M: u64 = 0x1_0000_0000;
const HPA_4K: u64 = 0x2_0000_3000;
const SVE: u64 = 1 << 63;
/// Memory type WB (bits 5:3 = 6), IPAT (bit 6) and PS (bit 7) of every leaf.
const LEAF_ATTRS: u64 = 0xF0;
const BUSY_RCX: TdxStatus = C::OperandBusy.with_operand(operand::RCX);
const BUSY_TREE: TdxStatus = C::OperandBusy.with_operand(operand::SEPT_TREE);

fn rdx(level: u8, state: S) -> u64 {
    u64::from(level) | (u64::from(state.public_state()) << 8)
}

/// A 4K PENDING page at `addr` whose 2M page table has been blocked and tracked.
fn blocked_table_with_child(td: &Td, addr: u64) {
    assert!(td.aug(addr, K4, HPA_4K).status.is_success());
    td.block_track(addr & !(size(1) - 1), M2);
}

// ---- walks stop at a blocked page table -----------------------------------------------------

/// `sept_manager.c` secure_ept_walk stops at an entry without RWX, and `tdh_mem_range_block.c`
/// block_sept_entry clears a page table's RWX: host calls below a blocked page table fail in
/// `helpers.c` lock_sept_check_and_walk_internal with EPT_WALK_FAILED and the blocked entry
/// (level 1, NL_BLOCKED, architectural RCX 0) in RCX/RDX.
#[test]
fn walks_stop_at_a_blocked_page_table() {
    let td = Td::runnable();
    blocked_table_with_child(&td, 0x1000);
    let walk_failed = SeamcallResult {
        status: st(C::EptWalkFailed, operand::RCX),
        rcx: 0,
        rdx: rdx(1, S::NlBlocked),
    };
    assert_eq!(
        td.m.page_aug(gpa(0x2000), K4, HPA_4K + 0x1000),
        walk_failed,
        "AUG"
    );
    assert_eq!(
        td.m.range_block(gpa(0x1000), K4),
        walk_failed,
        "BLOCK of a child"
    );
    assert_eq!(
        td.m.page_remove(gpa(0x1000), K4),
        walk_failed,
        "REMOVE of a child"
    );
    assert_eq!(
        td.m.range_unblock(gpa(0x1000), K4),
        walk_failed,
        "UNBLOCK of a child"
    );
    // The guest's walk stops there too: ACCEPT exits with the blocked entry.
    let out = td.accept(0, 0x1000, K4);
    let T::Exit(TdExit::EptViolation { ext, .. }) = out else {
        panic!("ACCEPT below a blocked page table: {out:?}");
    };
    assert_eq!(
        (ext.walk_level(), ext.state(), ext.is_leaf()),
        (1, 0x81, false)
    );
}

/// Teardown in the order the source allows (`tdh_mem_page_remove.c`, then
/// `tdh_mem_sept_remove.c` tdh_mem_sept_remove): children are blocked and removed while their
/// page table is still mapped; only then is the table blocked and removed.
#[test]
fn teardown_removes_children_before_blocking_their_table() {
    let td = Td::runnable();
    assert!(td.aug(0x1000, K4, HPA_4K).status.is_success());
    td.block_track(0x1000, K4);
    assert!(td.m.page_remove(gpa(0x1000), K4).status.is_success());
    td.block_track(0, M2);
    let r = td.m.sept_remove(gpa(0), 1);
    assert!(r.status.is_success(), "{r:x?}");
    assert_eq!(td.m.walk(gpa(0), 1).state, S::Free);
}

// ---- op-state ---------------------------------------------------------------------------------

/// `op_state_lookup.c` seamcall_state_lookup: every memory SEAMCALL here but PAGE.ADD is allowed
/// while the TD is INITIALIZED; a call the table refuses gets TDX_OP_STATE_INCORRECT with no
/// operand (`helpers.c` check_any_td_state_map_tdcs_and_lock).
#[test]
fn op_state_follows_the_lookup_table() {
    let td = Td::building(ModuleConfig::default());
    assert!(
        td.aug(0, M2, HPA_2M).status.is_success(),
        "AUG while INITIALIZED"
    );
    assert!(td.m.range_block(gpa(0), M2).status.is_success(), "BLOCK");
    assert!(td.m.mem_track().status.is_success(), "TRACK");
    assert!(
        td.m.range_unblock(gpa(0), M2).status.is_success(),
        "UNBLOCK"
    );
    assert!(
        td.m.page_demote(gpa(0), M2, td.sept_page())
            .status
            .is_success(),
        "DEMOTE"
    );
    assert!(td.m.page_promote(gpa(0), M2).status.is_success(), "PROMOTE");
    assert!(td.m.page_remove(gpa(0), M2).status.is_success(), "REMOVE");
    assert!(
        td.m.sept_remove(gpa(0), 2).status.is_success(),
        "SEPT.REMOVE"
    );
    assert!(td.m.finalize().status.is_success());
    let refused = SeamcallResult::status(C::OpStateIncorrect.status());
    assert_eq!(
        td.m.page_add(gpa(0), HPA_4K, 0),
        refused,
        "PAGE.ADD once RUNNABLE"
    );
    assert_eq!(td.m.finalize(), refused, "FINALIZE twice");
}

// ---- order of input checks --------------------------------------------------------------------

/// `tdh_mem_page_aug.c` tdh_mem_page_aug checks the target HPA (R8) only after the walk, the
/// entry lock and the state: with a bad HPA and a bad S-EPT entry, the S-EPT answer wins.
#[test]
fn aug_checks_the_hpa_after_the_sept() {
    let td = Td::runnable();
    let bad_hpa = HPA_2M + 0x1000; // not 2M aligned
    let r = td.m.page_aug(gpa(0), M2, bad_hpa);
    assert_eq!(r.status, st(C::EptWalkFailed, operand::RCX), "walk first");
    assert!(td.aug(0, M2, HPA_2M).status.is_success());
    let r = td.m.page_aug(gpa(0), M2, bad_hpa);
    assert_eq!(
        r.status,
        st(C::EptEntryStateIncorrect, operand::RCX),
        "state second"
    );
    let r = td.aug(0x20_0000, M2, bad_hpa);
    assert_eq!(r.status, st(C::OperandInvalid, operand::R8), "then R8");
}

/// `tdh_mem_page_demote.c` tdh_mem_page_demote checks the new S-EPT page (R8) after the state
/// and the blocked-and-tracked checks; `tdh_mem_sept_add.c` process_l1_page after the state.
#[test]
fn demote_and_sept_add_check_r8_after_the_sept() {
    let td = Td::runnable();
    assert!(td.aug(0, M2, HPA_2M).status.is_success());
    let bad = 0x1234; // not 4K aligned
    let r = td.m.page_demote(gpa(0), M2, bad);
    assert_eq!(
        r.status,
        st(C::GpaRangeNotBlocked, operand::RCX),
        "not blocked before R8"
    );
    td.block_track(0, M2);
    let r = td.m.page_demote(gpa(0), M2, bad);
    assert_eq!(r.status, st(C::OperandInvalid, operand::R8));
    let top = td.top();
    let r = td.m.sept_add(gpa(0), top, bad);
    assert_eq!(
        r.status,
        st(C::EptEntryStateIncorrect, operand::RCX),
        "existing table first"
    );
    assert_eq!(r.rcx, 7, "a mapped page table: RWX only");
    let r = td.m.sept_add(gpa(1 << 39), top, bad);
    assert_eq!(r.status, st(C::OperandInvalid, operand::R8));
}

/// `tdh_mem_page_add.c` tdh_mem_page_add: walk, state, then the source page (R9), then the
/// target page (R8).
#[test]
fn page_add_checks_r9_then_r8_after_the_sept() {
    let td = Td::building(ModuleConfig::default());
    let r = td.m.page_add(gpa(0), 0x1, 0x1);
    assert_eq!(r.status, st(C::EptWalkFailed, operand::RCX));
    td.path(0, 0);
    let r = td.m.page_add(gpa(0), 0x1, 0x1);
    assert_eq!(r.status, st(C::OperandInvalid, 9), "R9 before R8");
    let r = td.m.page_add(gpa(0), 0x1, 0x1000);
    assert_eq!(r.status, st(C::OperandInvalid, operand::R8));
}

// ---- BLOCK / UNBLOCK levels ---------------------------------------------------------------------

/// `tdh_mem_range_block.c` tdh_mem_range_block and `tdh_mem_range_unblock.c`
/// tdh_mem_range_unblock take levels 0 up to the S-EPT's top (verify_page_info_input with the
/// EPTP's page-walk length), so a 512 GiB page table can be blocked.
#[test]
fn block_and_unblock_take_levels_up_to_the_root() {
    let td = Td::runnable();
    td.path(0, 0);
    let top = td.top();
    let info = page_info(gpa(0), PageLevel::Size4K) | u64::from(top);
    assert!(
        td.m.range_block_raw(info).status.is_success(),
        "BLOCK level {top}"
    );
    assert_eq!(td.m.walk(gpa(0), top).state, S::NlBlocked);
    td.track();
    assert!(
        td.m.range_unblock_raw(info).status.is_success(),
        "UNBLOCK level {top}"
    );
    let above = page_info(gpa(0), PageLevel::Size4K) | u64::from(top + 1);
    assert_eq!(
        td.m.range_block_raw(above).status,
        st(C::OperandInvalid, operand::RCX)
    );
}

// ---- INTERRUPTED_RESTARTABLE ------------------------------------------------------------------

/// `tdh_mem_page_demote.c` tdh_mem_page_demote and `tdh_mem_page_promote.c`
/// tdh_mem_page_promote restore RCX and RDX to their inputs (page info, TDR) when a host
/// interrupt stops them, and change nothing.
#[test]
fn interrupted_demote_and_promote_give_back_their_inputs() {
    let td = Td::runnable();
    assert!(td.aug(0, M2, HPA_2M).status.is_success());
    td.block_track(0, M2);
    let info = page_info(gpa(0), M2);
    td.m.set_host_interrupt_pending(true);
    let r = td.m.page_demote(gpa(0), M2, td.sept_page());
    let restartable = SeamcallResult {
        status: C::InterruptedRestartable.status(),
        rcx: info,
        rdx: TDR_PA,
    };
    assert_eq!(r, restartable, "DEMOTE");
    assert_eq!(td.m.walk(gpa(0), 1).state, S::PendingBlocked, "unchanged");
    assert!(td
        .m
        .page_demote(gpa(0), M2, td.sept_page())
        .status
        .is_success());
    td.block_track(0, M2);
    td.m.set_host_interrupt_pending(true);
    assert_eq!(td.m.page_promote(gpa(0), M2), restartable, "PROMOTE");
    assert_eq!(td.m.walk(gpa(0), 1).state, S::NlBlocked, "unchanged");
}

// ---- the ACCEPT lock protocol and host priority --------------------------------------------

/// `tdg_mem_page_accept.c` check_tdaccept_failure takes the entry lock (`tdx_locks.h`
/// sept_lock_acquire_guest) before it looks at the entry's state, so ACCEPT on a locked entry
/// is BUSY whatever the state, MAPPED included.
#[test]
fn accept_locks_before_checking_the_state() {
    let td = Td::runnable();
    td.mapped(0, K4, HPA_4K);
    let guard = td.m.hold_entry_lock(gpa(0), 0).expect("lock");
    assert_eq!(
        td.accept(0, 0, K4),
        T::Completed(BUSY_RCX),
        "MAPPED but locked"
    );
    drop(guard);
    assert_eq!(
        td.accept(0, 0, K4),
        T::Completed(st(C::PageAlreadyAccepted, 0))
    );
    // A walk that stops above the level exits without taking any lock.
    td.path(0x20_0000, 1);
    let _guard = td.m.hold_entry_lock(gpa(0x20_0000), 1).expect("lock");
    assert!(matches!(td.accept(0, 0x20_0000, K4), T::Exit(_)));
}

/// `tdx_locks.h` sept_lock_acquire_host: a host call that loses the entry lock sets the
/// host-priority bit; sept_lock_acquire_guest then refuses the guest (OPERAND_BUSY, as
/// `tdx_td_dispatcher.c` reports TDX_OPERAND_BUSY_HOST_PRIORITY to the guest) until a host call
/// takes the lock, which clears the bit.
#[test]
fn a_host_call_losing_the_lock_gets_priority_over_the_guest() {
    let td = Td::runnable();
    assert!(td.aug(0, K4, HPA_4K).status.is_success());
    let guard = td.m.hold_entry_lock(gpa(0), 0).expect("lock");
    assert_eq!(
        td.m.page_aug(gpa(0), K4, HPA_4K).status,
        BUSY_RCX,
        "host loses the race"
    );
    drop(guard);
    for _ in 0..3 {
        assert_eq!(td.accept(0, 0, K4), T::Completed(BUSY_RCX), "host priority");
    }
    assert_eq!(td.m.leaf(gpa(0)).state, S::Pending);
    // The host gets through (BLOCK, UNBLOCK), which clears the mark.
    td.block_track(0, K4);
    assert!(td.m.range_unblock(gpa(0), K4).status.is_success());
    assert_eq!(td.accept(0, 0, K4), OK);
}

/// `tdx_td_dispatcher.c` tdx_td_dispatcher: a guest refused by host priority for longer than the
/// timeout exits to the host with TDX_HOST_PRIORITY_BUSY_TIMEOUT (`td_exit.c`
/// async_tdexit_internal), its TDCALL completed with OPERAND_BUSY; another outcome resets the
/// count.
#[test]
fn a_guest_refused_too_long_exits_with_host_priority_busy_timeout() {
    let td = Td::runnable();
    td.m.set_hp_lock_timeout(2);
    assert!(td.aug(0, K4, HPA_4K).status.is_success());
    let guard = td.m.hold_entry_lock(gpa(0), 0).expect("lock");
    assert_eq!(
        td.m.range_block(gpa(0), K4).status,
        BUSY_TREE,
        "BLOCK is exclusive"
    );
    assert_eq!(
        td.m.page_remove(gpa(0), K4).status,
        BUSY_RCX,
        "REMOVE marks the entry"
    );
    drop(guard);
    assert_eq!(td.accept(0, 0, K4), T::Completed(BUSY_RCX));
    assert_eq!(td.accept(0, 0, K4), T::Completed(BUSY_RCX));
    let out = td.accept(0, 0, K4);
    assert_eq!(
        out,
        T::Exit(TdExit::HostPriorityBusyTimeout {
            guest_status: BUSY_RCX
        })
    );
    assert_eq!(
        TdExit::HostPriorityBusyTimeout {
            guest_status: BUSY_RCX
        }
        .completed_status(),
        Some(BUSY_RCX)
    );
    assert!(!td.m.vcpu_in_td(0), "the vCPU has left the TD");
    assert_eq!(td.m.stats().hp_timeouts, 1);
    assert_eq!(HOST_PRIORITY_BUSY_TIMEOUT.raw(), 0x9000_0205_0000_0000);
    td.m.vcpu_enter(0).expect("re-enter");
    assert_eq!(
        td.accept(0, 0, K4),
        T::Completed(BUSY_RCX),
        "count restarted"
    );
}

// ---- tree-lock modes ----------------------------------------------------------------------------

/// The S-EPT tree lock modes of the handlers (lock_sept_check_and_walk_private_gpa's lock
/// argument): shared in `tdh_mem_page_aug.c`, `tdh_mem_page_remove.c`,
/// `tdh_mem_page_demote.c`, `tdh_mem_page_promote.c`, `tdh_mem_sept_add.c`; exclusive in
/// `tdh_mem_range_block.c`, `tdh_mem_range_unblock.c`, `tdh_mem_sept_remove.c`. While another
/// logical processor holds it shared, only the exclusive callers see BUSY|SEPT_TREE.
#[test]
fn tree_lock_modes_follow_the_source() {
    let td = Td::runnable();
    assert!(td.aug(0, M2, HPA_2M).status.is_success());
    assert!(td.aug(0x40_0000, M2, HPA_2M + size(1)).status.is_success());
    td.block_track(0x40_0000, M2);
    td.path(0x60_0000, 0);
    let _held =
        td.m.hold_entry_lock(gpa(0x80_0000), 1)
            .expect("lock a FREE entry");
    // Shared callers proceed.
    assert!(
        td.m.page_aug(gpa(0x20_0000), M2, HPA_2M + 2 * size(1))
            .status
            .is_success(),
        "AUG"
    );
    assert!(
        td.m.page_demote(gpa(0x40_0000), M2, td.sept_page())
            .status
            .is_success(),
        "DEMOTE"
    );
    assert!(
        td.m.sept_add(gpa(0x1_0000_0000), 2, td.sept_page())
            .status
            .is_success(),
        "SEPT.ADD"
    );
    let r = td.m.page_remove(gpa(0x40_0000), K4).status;
    assert_eq!(
        r,
        st(C::GpaRangeNotBlocked, operand::RCX),
        "REMOVE gets to the entry"
    );
    // Exclusive callers are refused.
    assert_eq!(td.m.range_block(gpa(0), M2).status, BUSY_TREE, "BLOCK");
    assert_eq!(td.m.range_unblock(gpa(0), M2).status, BUSY_TREE, "UNBLOCK");
    assert_eq!(
        td.m.sept_remove(gpa(0x60_0000), 1).status,
        BUSY_TREE,
        "SEPT.REMOVE"
    );
}

/// `tdh_mem_page_promote.c` is_sept_page_valid_for_merge locks every child on the host side:
/// a child locked elsewhere makes PROMOTE BUSY|RCX with the parent's details.
#[test]
fn promote_locks_every_child() {
    let td = Td::runnable();
    assert!(td.aug(0, M2, HPA_2M).status.is_success());
    td.block_track(0, M2);
    assert!(td
        .m
        .page_demote(gpa(0), M2, td.sept_page())
        .status
        .is_success());
    td.block_track(0, M2);
    let guard = td.m.hold_entry_lock(gpa(0x5000), 0).expect("lock a child");
    let r = td.m.page_promote(gpa(0), M2);
    assert_eq!((r.status, r.rdx), (BUSY_RCX, rdx(1, S::NlBlocked)));
    drop(guard);
    assert!(td.m.page_promote(gpa(0), M2).status.is_success());
    assert_eq!(td.m.walk(gpa(0), 1).state, S::Pending);
}

// ---- exit qualification --------------------------------------------------------------------

/// `td_other_exits.c` tdx_ept_violation_exit_to_vmm clears exit-qualification bits 12:7 (GLA
/// valid, translated, ...) before a TD exit; a #VE (`td_ept_violation.c`
/// td_ept_violation_exit, tdx_inject_ve) carries the qualification whole.
#[test]
fn td_exits_clear_exit_qualification_bits_a_ve_keeps() {
    let td = Td::runnable();
    td.path(0, 0);
    let out = td.m.guest_access(0, 0x1000, Access::Read).expect("inside");
    let AccessOutcome::Exit(TdExit::EptViolation {
        exit_qualification, ..
    }) = out
    else {
        panic!("{out:?}");
    };
    assert_eq!(exit_qualification, 1, "read, bits 12:7 clear");
    td.m.vcpu_enter(0).expect("enter");
    let out =
        td.m.guest_access(0, 0x2000, Access::Write(1))
            .expect("inside");
    let AccessOutcome::Exit(TdExit::EptViolation {
        exit_qualification, ..
    }) = out
    else {
        panic!("{out:?}");
    };
    assert_eq!(exit_qualification, 2, "write, bits 12:7 clear");
    td.m.vcpu_enter(0).expect("enter");
    assert!(td.aug(0x3000, K4, HPA_4K).status.is_success());
    let out = td.m.guest_access(0, 0x3000, Access::Read).expect("inside");
    let AccessOutcome::Ve(ve) = out else {
        panic!("{out:?}");
    };
    assert_eq!(
        ve.exit_qualification & 0x181,
        0x181,
        "the #VE keeps GLA valid/translated"
    );
}

// ---- TDG.VP.INFO ------------------------------------------------------------------------------

/// `tdg_vp_info.c` tdg_vp_info returns the TD's attributes (fixed at TD creation) in RDX,
/// whatever the PENDING_VE_DISABLE control is changed to later; R8 counts vCPUs, R10 has
/// TDG.SYS.RD available, R11 is 0.
#[test]
fn vp_info_reports_the_immutable_attributes() {
    for (created_with_ve, attrs) in [(true, 0), (false, ATTR_SEPT_VE_DISABLE)] {
        let td = Td::with(ModuleConfig {
            pending_ve: created_with_ve,
            vcpus: 3,
            ..ModuleConfig::default()
        });
        td.m.set_pending_ve(!created_with_ve);
        let regs = td.m.tdg_vp_info_raw(0).expect("inside");
        let expected = TdcallRegs {
            rax: 0,
            rcx: 48,
            rdx: attrs,
            r8: 3 | (3 << 32),
            r9: 0,
            r10: 1,
            r11: 0,
        };
        assert_eq!(regs, expected);
    }
}

// ---- RCX/RDX encoding -------------------------------------------------------------------------

/// `sept_manager.c` set_arch_septe_details_in_vmm_regs: FREE is SVE alone, a non-leaf RWX
/// only, a leaf HPA | RWX (MAPPED only) | WB | IPAT | PS | SVE, and a partly accepted 2M entry
/// shows its ACCEPT counter in bits 20:12; RDX is level | public state << 8.
#[test]
fn failures_report_the_architectural_entry() {
    let td = Td::runnable();
    td.path(0, 0);
    let r = td.m.page_remove(gpa(0), K4);
    assert_eq!((r.rcx, r.rdx), (SVE, rdx(0, S::Free)), "FREE");
    let r = td.m.page_aug(gpa(0), M2, HPA_2M);
    assert_eq!((r.rcx, r.rdx), (7, rdx(1, S::NlMapped)), "non-leaf");
    assert!(td.m.page_aug(gpa(0), K4, HPA_4K).status.is_success());
    let r = td.m.page_aug(gpa(0), K4, HPA_4K);
    assert_eq!(
        (r.rcx, r.rdx),
        (HPA_4K | LEAF_ATTRS | SVE, rdx(0, S::Pending)),
        "PENDING"
    );
    assert_eq!(td.accept(0, 0, K4), OK);
    let r = td.m.page_aug(gpa(0), K4, HPA_4K);
    assert_eq!(
        (r.rcx, r.rdx),
        (HPA_4K | 7 | LEAF_ATTRS | SVE, rdx(0, S::Mapped)),
        "MAPPED"
    );
    td.block_track(0, K4);
    let r = td.m.page_aug(gpa(0), K4, HPA_4K);
    assert_eq!(
        (r.rcx, r.rdx),
        (HPA_4K | LEAF_ATTRS | SVE, rdx(0, S::Blocked)),
        "BLOCKED"
    );
    // A 2M ACCEPT interrupted after one 4K chunk.
    assert!(td.aug(0x20_0000, M2, HPA_2M).status.is_success());
    td.m.set_pending_interrupt(0, true);
    assert_eq!(td.accept(0, 0x20_0000, M2), T::Interrupted);
    td.m.vcpu_enter(0).ok();
    let r = td.m.page_aug(gpa(0x20_0000), M2, HPA_2M);
    assert_eq!(
        r.rcx,
        HPA_2M | (1 << 12) | LEAF_ATTRS | SVE,
        "ACCEPT counter 1"
    );
    assert_eq!(r.rdx, rdx(1, S::Pending));
}

// ---- TDG.VP.VEINFO.GET ------------------------------------------------------------------------

/// `tdg_vp_veinfo_get.c` tdg_vp_veinfo_get zeroes RCX, RDX, R8, R9 and R10 before it checks
/// VE_INFO, so with nothing valid the outputs are 0 with NO_VALID_VE_INFO.
#[test]
fn veinfo_get_with_nothing_valid_returns_zeroed_outputs() {
    let td = Td::runnable();
    let regs = td.m.tdg_vp_veinfo_get_raw(0).expect("inside");
    assert_eq!(
        regs,
        TdcallRegs {
            rax: C::NoValidVeInfo.status().raw(),
            ..TdcallRegs::default()
        }
    );
    assert!(td.aug(0x3000, K4, HPA_4K).status.is_success());
    let out = td.m.guest_access(0, 0x3000, Access::Read).expect("inside");
    assert!(matches!(out, AccessOutcome::Ve(_)));
    let regs = td.m.tdg_vp_veinfo_get_raw(0).expect("inside");
    assert_eq!(
        (regs.rax, regs.rcx),
        (0, u64::from(EXIT_REASON_EPT_VIOLATION))
    );
    assert_eq!((regs.r8, regs.r9), (0x3000, 0x3000));
    assert_eq!(
        td.m.tdg_vp_veinfo_get_raw(0).expect("inside").rax,
        C::NoValidVeInfo.status().raw()
    );
}

/// The module stays usable from many OS threads at once.
#[test]
fn module_is_send_and_sync() {
    fn check<X: Send + Sync>() {}
    check::<TdxModule>();
}

/// `tdg_vp_vmcall.c` tdg_vp_vmcall refuses RCX with RAX, RCX or RSP selected or bits 63:32 set
/// (OPERAND_INVALID|RCX); bits 31:16 select XMM registers and are accepted.
#[test]
fn vmcall_accepts_the_xmm_select_bits() {
    let td = Td::runnable();
    let regs = VmcallRegs {
        mask: 0x00FF_FFCC,
        gpr: [0; 16],
    };
    let out = td.m.tdg_vp_vmcall(0, regs).expect("inside");
    assert!(matches!(out, T::Exit(TdExit::Vmcall(_))), "{out:?}");
    td.m.vcpu_enter(0).expect("enter");
    let bad = VmcallRegs {
        mask: 1 << 32 | 0xFFCC,
        gpr: [0; 16],
    };
    let out = td.m.tdg_vp_vmcall(0, bad).expect("inside");
    assert_eq!(out, T::Completed(st(C::OperandInvalid, operand::RCX)));
}
