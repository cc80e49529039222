//! Conformance of the TDX-module emulator with `docs/tdx-module-memory.md`: one test per row of
//! section 4 (transitions), per case of section 5 (ACCEPT walk) and section 6 (guest access),
//! plus the page-info rules of section 1 and the VMCALL exit of section 7. Each test names the
//! rule it checks; the rule text is repeated in its assertion messages.

mod module_support;

use accept::abi::{
    operand, page_info, Gpaw, StatusCode as C, TdxStatus, EXIT_REASON_EPT_VIOLATION,
};
use hostvmm::module::{
    Access, AccessOutcome, CallKind, CallOutcome, ExitType, FaultResult, FaultRule, ModuleConfig,
    OpState, SeptState as S, TdExit, TdcallOutcome as T, VmcallRegs, ATTR_SEPT_VE_DISABLE,
};
use module_support::{gpa, size, st, Td, G1, K4, M2};

const OK: T = T::Completed(TdxStatus::SUCCESS);
const INVALID_RCX: u64 = 0xC000_0100_0000_0001;
const HPA_2M: u64 = 0x1_0000_0000;
const HPA_4K: u64 = 0x2_0000_3000;

macro_rules! rules {
    ($($name:ident: $rule:literal => $body:expr;)*) => {$(
        #[test]
        fn $name() {
            let body: fn(&'static str) = $body;
            body($rule);
        }
    )*};
}

/// The ACCEPT-type exit the guest must see, with the vCPU now outside the TD.
fn accept_exit(td: &Td, out: T, req: u8, walk: u8, state: S, leaf: bool, rule: &str) {
    match out {
        T::Exit(TdExit::EptViolation { ext, .. }) => {
            assert_eq!(ext.exit_type(), ExitType::Accept, "{rule}");
            assert_eq!(ext.req_level(), req, "{rule}: requested level");
            assert_eq!(ext.walk_level(), walk, "{rule}: walk level");
            assert_eq!(ext.state(), state.public_state(), "{rule}: state");
            assert_eq!(ext.is_leaf(), leaf, "{rule}: is-leaf");
        }
        other => panic!("{rule}: expected an ACCEPT exit, got {other:?}"),
    }
    assert!(!td.m.vcpu_in_td(0), "{rule}: the exit takes the vCPU out");
}

fn exit_type(out: AccessOutcome) -> Option<ExitType> {
    match out {
        AccessOutcome::Exit(TdExit::EptViolation { ext, .. }) => Some(ext.exit_type()),
        _ => None,
    }
}

rules! {
    // ---- §1 page info -------------------------------------------------------------------
    s1_page_info_reserved_bits_are_operand_invalid_rcx:
        "§1: reserved page-info bits 11:3 -> OPERAND_INVALID|RCX" => |rule| {
        let td = Td::runnable();
        td.path(0, 0);
        let r = td.m.page_aug_raw(0x8, HPA_4K);
        assert_eq!(r.status.raw(), INVALID_RCX, "{rule}");
        let r = td.m.page_aug_raw(1 << 60, HPA_4K);
        assert_eq!(r.status.raw(), INVALID_RCX, "{rule}: bits 63:52");
    };
    s1_page_info_misaligned_gpa_is_operand_invalid_rcx:
        "§1: GPA not aligned to the level -> OPERAND_INVALID|RCX" => |rule| {
        let td = Td::runnable();
        let r = td.m.page_aug_raw(0x1000 | 1, HPA_2M);
        assert_eq!(r.status.raw(), INVALID_RCX, "{rule}");
    };
    s1_page_info_level_out_of_range_is_operand_invalid_rcx:
        "§1: a level outside the call's range -> OPERAND_INVALID|RCX" => |rule| {
        let td = Td::runnable();
        assert_eq!(td.m.page_aug(gpa(0), G1, 0).status.raw(), INVALID_RCX, "{rule}: AUG 1G");
        assert_eq!(td.m.page_demote(gpa(0), K4, 0x1000).status.raw(), INVALID_RCX, "{rule}: DEMOTE 4K");
        assert_eq!(td.m.sept_add(gpa(0), 0, 0x1000).status.raw(), INVALID_RCX, "{rule}: SEPT.ADD 0");
        assert_eq!(td.m.sept_add(gpa(0), 4, 0x1000).status.raw(), INVALID_RCX, "{rule}: SEPT.ADD 4 at GPAW 48");
        assert_eq!(td.m.page_remove_raw(3).status.raw(), INVALID_RCX, "{rule}: level 3");
    };
    s1_private_call_rejects_shared_bit_and_gpa_beyond_gpaw:
        "§1: check_gpa_validity: shared bit or bits above GPAW -> OPERAND_INVALID|RCX" => |rule| {
        let td = Td::runnable();
        assert_eq!(td.m.page_aug(gpa(1 << 47), K4, HPA_4K).status.raw(), INVALID_RCX, "{rule}: shared bit");
        assert_eq!(td.m.page_aug(gpa(1 << 49), K4, HPA_4K).status.raw(), INVALID_RCX, "{rule}: beyond GPAW");
        assert_eq!(td.m.range_block(gpa(1 << 47), K4).status.raw(), INVALID_RCX, "{rule}: BLOCK shared");
    };
    s1_hpa_operand_is_checked:
        "§1 (model): an HPA not aligned to the page, or above 2^52 -> OPERAND_INVALID|R8" => |rule| {
        let td = Td::runnable();
        td.path(0, 1);
        assert_eq!(td.m.page_aug(gpa(0), M2, 0x1000).status, st(C::OperandInvalid, operand::R8), "{rule}");
        assert_eq!(td.m.sept_add(gpa(0), 1, 1 << 53).status, st(C::OperandInvalid, operand::R8), "{rule}");
    };

    // ---- §4 TDH.MR.FINALIZE and op-states ---------------------------------------------
    s4_finalize_moves_initialized_to_runnable_once:
        "§4: TDH.MR.FINALIZE: INITIALIZED -> RUNNABLE; again -> OP_STATE_INCORRECT, no operand \
         (helpers.c check_any_td_state_map_tdcs_and_lock)" => |rule| {
        let td = Td::building(ModuleConfig::default());
        assert_eq!(td.m.op_state(), OpState::Initialized, "{rule}");
        assert!(td.m.finalize().status.is_success(), "{rule}");
        assert_eq!(td.m.op_state(), OpState::Runnable, "{rule}");
        assert_eq!(td.m.finalize().status, C::OpStateIncorrect.status(), "{rule}");
    };

    // ---- §4 PAGE.ADD --------------------------------------------------------------------
    s4_page_add_free_to_mapped_copies_and_measures:
        "§4 PAGE.ADD (4K, build): FREE -> MAPPED, content copied, measured" => |rule| {
        let td = Td::building(ModuleConfig::default());
        td.path(0x5000, 0);
        td.m.write_content(0x9_0000_0000, 0xABCD);
        let before = td.m.mrtd();
        let r = td.m.page_add(gpa(0x5000), HPA_4K, 0x9_0000_0000);
        assert!(r.status.is_success(), "{rule}");
        let e = td.m.entry(gpa(0x5000), K4).expect("entry");
        assert_eq!((e.state, e.hpa), (S::Mapped, HPA_4K), "{rule}");
        assert_eq!(td.m.read_content(HPA_4K), 0xABCD, "{rule}: content copied");
        assert_ne!(td.m.mrtd(), before, "{rule}: measured");
    };
    s4_page_add_only_before_finalize:
        "§4 PAGE.ADD: only in op-state INITIALIZED (op_state_lookup.c seamcall_state_lookup), \
         else OP_STATE_INCORRECT with no operand" => |rule| {
        let td = Td::runnable();
        td.path(0, 0);
        let r = td.m.page_add(gpa(0), HPA_4K, 0);
        assert_eq!(r.status, C::OpStateIncorrect.status(), "{rule}");
    };
    s4_page_add_not_free_is_state_incorrect_with_entry:
        "§4 PAGE.ADD: not FREE -> EPT_ENTRY_STATE_INCORRECT|RCX, RCX/RDX = entry" => |rule| {
        let td = Td::building(ModuleConfig::default());
        td.path(0, 0);
        assert!(td.m.page_add(gpa(0), HPA_4K, 0).status.is_success());
        let r = td.m.page_add(gpa(0), HPA_4K + 0x1000, 0);
        assert_eq!(r.status, st(C::EptEntryStateIncorrect, operand::RCX), "{rule}");
        assert_eq!((r.rdx_level(), r.rdx_state()), (0, S::Mapped.public_state()), "{rule}");
        assert_eq!(r.rcx & 0x000F_FFFF_FFFF_F000, HPA_4K, "{rule}: RCX holds the entry");
    };
    s4_page_add_walk_short_is_ept_walk_failed:
        "§4 PAGE.ADD: no S-EPT path -> EPT_WALK_FAILED|RCX, RDX = level where the walk stopped" => |rule| {
        let td = Td::building(ModuleConfig::default());
        let r = td.m.page_add(gpa(0x5000), HPA_4K, 0);
        assert_eq!(r.status, st(C::EptWalkFailed, operand::RCX), "{rule}");
        assert_eq!((r.rdx_level(), r.rdx_state()), (3, 0), "{rule}");
    };

    // ---- §4 PAGE.AUG --------------------------------------------------------------------
    s4_page_aug_free_to_pending_not_zeroed:
        "§4 PAGE.AUG (4K, 2M): FREE -> PENDING; page NOT zeroed" => |rule| {
        let td = Td::runnable();
        td.m.write_content(HPA_4K, 77);
        td.m.write_content(HPA_2M + 0x3000, 78);
        assert!(td.aug(0x1000, K4, HPA_4K).status.is_success(), "{rule}: 4K");
        assert!(td.aug(0x40_0000, M2, HPA_2M).status.is_success(), "{rule}: 2M");
        assert_eq!(td.m.entry(gpa(0x1000), K4).map(|e| e.state), Some(S::Pending), "{rule}");
        assert_eq!(td.m.entry(gpa(0x40_0000), M2).map(|e| (e.state, e.hpa)), Some((S::Pending, HPA_2M)), "{rule}");
        assert_eq!(td.m.read_content(HPA_4K), 77, "{rule}: not zeroed");
        assert_eq!(td.m.read_content(HPA_2M + 0x3000), 78, "{rule}: not zeroed");
    };
    s4_page_aug_not_free_is_state_incorrect:
        "§4 PAGE.AUG: not FREE -> EPT_ENTRY_STATE_INCORRECT|RCX with the entry in RCX/RDX" => |rule| {
        let td = Td::runnable();
        assert!(td.aug(0, M2, HPA_2M).status.is_success());
        let r = td.m.page_aug(gpa(0), M2, HPA_2M);
        assert_eq!(r.status, st(C::EptEntryStateIncorrect, operand::RCX), "{rule}");
        assert_eq!((r.rdx_level(), r.rdx_state()), (1, S::Pending.public_state()), "{rule}");
        td.path(0x20_0000, 0);
        let r = td.m.page_aug(gpa(0x20_0000), M2, HPA_2M);
        assert_eq!(r.status, st(C::EptEntryStateIncorrect, operand::RCX), "{rule}: over NL_MAPPED");
        assert_eq!(r.rdx_state(), S::NlMapped.public_state(), "{rule}");
    };
    s4_page_aug_walk_short_is_ept_walk_failed:
        "§4 PAGE.AUG: walk short -> EPT_WALK_FAILED (host must SEPT.ADD first)" => |rule| {
        let td = Td::runnable();
        td.path(0, 1);
        let r = td.m.page_aug(gpa(0x1000), K4, HPA_4K);
        assert_eq!(r.status, st(C::EptWalkFailed, operand::RCX), "{rule}");
        assert_eq!((r.rdx_level(), r.rdx_state()), (1, 0), "{rule}");
        assert!(td.aug(0, M2, HPA_2M).status.is_success());
        let r = td.m.page_aug(gpa(0x1000), K4, HPA_4K);
        assert_eq!(r.status, st(C::EptWalkFailed, operand::RCX), "{rule}: 4K inside a 2M leaf");
        assert_eq!((r.rdx_level(), r.rdx_state()), (1, S::Pending.public_state()), "{rule}");
    };
    s4_page_aug_is_allowed_before_finalize:
        "§4 PAGE.AUG: allowed while INITIALIZED as well as RUNNABLE (op_state_lookup.c \
         seamcall_state_lookup, row TDH.MEM.PAGE.AUG)" => |rule| {
        let td = Td::building(ModuleConfig::default());
        td.path(0, 0);
        assert!(td.m.page_aug(gpa(0), K4, HPA_4K).status.is_success(), "{rule}");
        assert_eq!(td.m.leaf(gpa(0)).state, S::Pending, "{rule}");
    };
    s4_page_aug_level_is_a_capability:
        "§4 PAGE.AUG: 1G only with max_aug_level 1G" => |rule| {
        let td = Td::with(ModuleConfig { max_aug_level: G1, ..ModuleConfig::default() });
        assert!(td.aug(0x4000_0000, G1, 0x40_0000_0000).status.is_success(), "{rule}");
        assert_eq!(td.m.entry(gpa(0x4000_0000), G1).map(|e| e.state), Some(S::Pending), "{rule}");
    };

    // ---- §4 SEPT.ADD --------------------------------------------------------------------
    s4_sept_add_free_to_nl_mapped_with_free_children:
        "§4 SEPT.ADD (level >= 1): FREE -> NL_MAPPED with 512 FREE children" => |rule| {
        let td = Td::runnable();
        assert_eq!(td.m.sept_nodes(), 1, "{rule}: root only");
        td.path(0, 0);
        assert_eq!(td.m.sept_nodes(), 4, "{rule}: one node per level");
        let e = td.m.walk(gpa(0), 1);
        assert_eq!((e.level, e.state), (1, S::NlMapped), "{rule}");
        for i in [0u64, 1, 511] {
            assert_eq!(td.m.entry(gpa(i * 0x1000), K4).map(|e| e.state), Some(S::Free), "{rule}");
        }
    };
    s4_sept_add_not_free_is_state_incorrect:
        "§4 SEPT.ADD: not FREE -> EPT_ENTRY_STATE_INCORRECT|RCX" => |rule| {
        let td = Td::runnable();
        td.path(0, 1);
        let r = td.m.sept_add(gpa(0), 2, td.sept_page());
        assert_eq!(r.status, st(C::EptEntryStateIncorrect, operand::RCX), "{rule}");
        assert_eq!((r.rdx_level(), r.rdx_state()), (2, S::NlMapped.public_state()), "{rule}");
    };
    s4_sept_add_walk_short_is_ept_walk_failed:
        "§4 SEPT.ADD: parent missing -> EPT_WALK_FAILED|RCX" => |rule| {
        let td = Td::runnable();
        let r = td.m.sept_add(gpa(0), 1, td.sept_page());
        assert_eq!(r.status, st(C::EptWalkFailed, operand::RCX), "{rule}");
        assert_eq!(r.rdx_level(), 3, "{rule}");
    };
    s4_sept_is_five_levels_for_gpaw_52:
        "§4 SEPT.ADD: GPAW 52 gives a 5-level tree (level 4 entries in the root)" => |rule| {
        let td = Td::with(ModuleConfig { gpaw: Gpaw::Bits52, ..ModuleConfig::default() });
        let high = 1u64 << 50;
        td.path(high, 0);
        assert_eq!(td.m.sept_nodes(), 5, "{rule}");
        assert!(td.m.page_aug(gpa(high), K4, HPA_4K).status.is_success(), "{rule}");
        assert_eq!(td.m.page_aug(gpa(1 << 51), K4, HPA_4K).status.raw(), INVALID_RCX, "{rule}: shared bit 51");
    };

    // ---- §4 RANGE.BLOCK -----------------------------------------------------------------
    s4_range_block_blocks_and_records_epoch:
        "§4 RANGE.BLOCK: NL_MAPPED/MAPPED/PENDING -> NL_BLOCKED/BLOCKED/PENDING_BLOCKED" => |rule| {
        let td = Td::runnable();
        td.mapped(0, M2, HPA_2M);
        assert!(td.aug(0x20_0000, M2, HPA_2M + size(1)).status.is_success());
        td.path(0x40_0000, 0);
        for (addr, level, want) in [
            (0, M2, S::Blocked),
            (0x20_0000, M2, S::PendingBlocked),
            (0x40_0000, M2, S::NlBlocked),
        ] {
            assert!(td.m.range_block(gpa(addr), level).status.is_success(), "{rule}");
            assert_eq!(td.m.entry(gpa(addr), level).map(|e| e.state), Some(want), "{rule}");
        }
    };
    s4_range_block_twice_is_already_blocked_warning:
        "§4 RANGE.BLOCK: already blocked -> GPA_RANGE_ALREADY_BLOCKED (warning)" => |rule| {
        let td = Td::runnable();
        td.mapped(0, M2, HPA_2M);
        assert!(td.m.range_block(gpa(0), M2).status.is_success());
        let r = td.m.range_block(gpa(0), M2);
        assert!(r.status.is(C::GpaRangeAlreadyBlocked), "{rule}");
        assert!(!r.status.is_error(), "{rule}: a warning");
        assert_eq!(r.rdx_state(), S::Blocked.public_state(), "{rule}");
    };
    s4_range_block_free_is_state_incorrect:
        "§4 RANGE.BLOCK: FREE -> EPT_ENTRY_STATE_INCORRECT|RCX" => |rule| {
        let td = Td::runnable();
        td.path(0, 1);
        assert_eq!(td.m.range_block(gpa(0), M2).status, st(C::EptEntryStateIncorrect, operand::RCX), "{rule}");
    };

    // ---- §4 MEM.TRACK -------------------------------------------------------------------
    s4_mem_track_increments_epoch:
        "§4 MEM.TRACK: epoch += 1" => |rule| {
        let td = Td::runnable();
        assert_eq!(td.m.td_epoch(), 1, "{rule}");
        assert!(td.m.mem_track().status.is_success(), "{rule}");
        assert_eq!(td.m.td_epoch(), 2, "{rule}");
    };
    s4_mem_track_busy_while_a_vcpu_runs_in_the_previous_epoch:
        "§4 MEM.TRACK: PREVIOUS_TLB_EPOCH_BUSY while a vCPU still runs in the previous epoch" => |rule| {
        let td = Td::runnable();
        assert!(td.m.mem_track().status.is_success());
        // vCPU 0 entered in epoch 1, which is now the previous epoch.
        let r = td.m.mem_track();
        assert_eq!(r.status, C::PreviousTlbEpochBusy.status(), "{rule}");
        assert_eq!(td.m.td_epoch(), 2, "{rule}: no change");
        td.m.vcpu_exit(0).expect("exit");
        assert!(td.m.mem_track().status.is_success(), "{rule}: after the vCPU exits");
    };

    // ---- §4 RANGE.UNBLOCK ---------------------------------------------------------------
    s4_range_unblock_needs_tracking:
        "§4 RANGE.UNBLOCK: needs TLB tracking done (TLB_TRACKING_NOT_DONE|SEPT_TREE)" => |rule| {
        let td = Td::runnable();
        td.mapped(0, M2, HPA_2M);
        assert!(td.m.range_block(gpa(0), M2).status.is_success());
        let r = td.m.range_unblock(gpa(0), M2);
        assert_eq!(r.status, st(C::TlbTrackingNotDone, operand::SEPT_TREE), "{rule}");
        assert!(td.m.mem_track().status.is_success());
        let r = td.m.range_unblock(gpa(0), M2);
        assert_eq!(r.status, st(C::TlbTrackingNotDone, operand::SEPT_TREE), "{rule}: vCPU not yet kicked");
        td.kick_all();
        assert!(td.m.range_unblock(gpa(0), M2).status.is_success(), "{rule}");
        assert_eq!(td.m.entry(gpa(0), M2).map(|e| e.state), Some(S::Mapped), "{rule}");
    };
    s4_range_unblock_restores_each_unblocked_state:
        "§4 RANGE.UNBLOCK: *_BLOCKED -> back to the unblocked state" => |rule| {
        let td = Td::runnable();
        assert!(td.aug(0, M2, HPA_2M).status.is_success());
        td.path(0x20_0000, 0);
        td.block_track(0, M2);
        td.block_track(0x20_0000, M2);
        assert!(td.m.range_unblock(gpa(0), M2).status.is_success(), "{rule}");
        assert!(td.m.range_unblock(gpa(0x20_0000), M2).status.is_success(), "{rule}");
        assert_eq!(td.m.entry(gpa(0), M2).map(|e| e.state), Some(S::Pending), "{rule}");
        assert_eq!(td.m.entry(gpa(0x20_0000), M2).map(|e| e.state), Some(S::NlMapped), "{rule}");
        assert_eq!(td.m.range_unblock(gpa(0), M2).status, st(C::EptEntryStateIncorrect, operand::RCX), "{rule}: not blocked (model)");
    };
    s4_range_unblock_skips_tracking_before_finalize:
        "§4: before finalize UNBLOCK skips the tracked check" => |rule| {
        let td = Td::building(ModuleConfig::default());
        td.path(0, 0);
        assert!(td.m.page_add(gpa(0), HPA_4K, 0).status.is_success());
        assert!(td.m.range_block(gpa(0), K4).status.is_success());
        assert!(td.m.range_unblock(gpa(0), K4).status.is_success(), "{rule}");
    };

    // ---- §4 PAGE.REMOVE -----------------------------------------------------------------
    s4_page_remove_blocked_tracked_leaf_to_free_not_zeroed:
        "§4 PAGE.REMOVE (4K..1G): blocked+tracked leaf -> FREE; HPA in RCX; page not zeroed" => |rule| {
        let td = Td::runnable();
        td.mapped(0, M2, HPA_2M);
        assert_eq!(td.m.guest_access(0, 0x5000, Access::Write(42)), Ok(AccessOutcome::Ok(42)));
        td.block_track(0, M2);
        let r = td.m.page_remove(gpa(0), M2);
        assert!(r.status.is_success(), "{rule}");
        assert_eq!(r.rcx, HPA_2M, "{rule}: RCX = removed HPA");
        assert_eq!(td.m.entry(gpa(0), M2).map(|e| e.state), Some(S::Free), "{rule}");
        assert_eq!(td.m.read_content(HPA_2M + 0x5000), 42, "{rule}: not zeroed");
    };
    s4_page_remove_every_leaf_state_once_blocked:
        "§4 PAGE.REMOVE: from MAPPED/BLOCKED/PENDING/PENDING_BLOCKED (blocked first while running)" => |rule| {
        let td = Td::runnable();
        td.mapped(0, K4, HPA_4K);
        assert!(td.aug(0x1000, K4, HPA_4K + 0x1000).status.is_success());
        td.block_track(0, K4);
        td.block_track(0x1000, K4);
        assert!(td.m.page_remove(gpa(0), K4).status.is_success(), "{rule}: BLOCKED");
        assert!(td.m.page_remove(gpa(0x1000), K4).status.is_success(), "{rule}: PENDING_BLOCKED");
        let td = Td::building(ModuleConfig::default());
        td.path(0, 0);
        assert!(td.m.page_add(gpa(0), HPA_4K, 0).status.is_success());
        assert!(td.m.page_remove(gpa(0), K4).status.is_success(), "{rule}: MAPPED before finalize");
    };
    s4_page_remove_not_blocked_while_running:
        "§4 PAGE.REMOVE: not blocked -> GPA_RANGE_NOT_BLOCKED" => |rule| {
        let td = Td::runnable();
        td.mapped(0, M2, HPA_2M);
        assert!(td.aug(0x20_0000, M2, HPA_2M + size(1)).status.is_success());
        for addr in [0, 0x20_0000] {
            let r = td.m.page_remove(gpa(addr), M2);
            assert_eq!(r.status, st(C::GpaRangeNotBlocked, operand::RCX), "{rule}");
            assert_eq!(r.rdx_level(), 1, "{rule}");
        }
    };
    s4_page_remove_not_tracked:
        "§4 PAGE.REMOVE: blocked but not tracked -> TLB_TRACKING_NOT_DONE" => |rule| {
        let td = Td::runnable();
        td.mapped(0, M2, HPA_2M);
        assert!(td.m.range_block(gpa(0), M2).status.is_success());
        let r = td.m.page_remove(gpa(0), M2);
        assert_eq!(r.status, st(C::TlbTrackingNotDone, operand::RCX), "{rule}");
        assert!(td.m.mem_track().status.is_success());
        let r = td.m.page_remove(gpa(0), M2);
        assert_eq!(r.status, st(C::TlbTrackingNotDone, operand::RCX), "{rule}: a vCPU still in the blocking epoch");
    };
    s4_page_remove_non_leaf_is_state_incorrect:
        "§4 PAGE.REMOVE: a non-leaf or FREE entry -> EPT_ENTRY_STATE_INCORRECT" => |rule| {
        let td = Td::runnable();
        td.path(0, 0);
        assert_eq!(td.m.page_remove(gpa(0), M2).status, st(C::EptEntryStateIncorrect, operand::RCX), "{rule}");
        assert_eq!(td.m.page_remove(gpa(0), K4).status, st(C::EptEntryStateIncorrect, operand::RCX), "{rule}");
    };

    // ---- §4 PAGE.DEMOTE -----------------------------------------------------------------
    s4_page_demote_splits_into_unblocked_contiguous_children:
        "§4 PAGE.DEMOTE (2M): BLOCKED -> NL_MAPPED, 512 MAPPED children, contiguous HPAs, content kept" => |rule| {
        let td = Td::runnable();
        td.mapped(0, M2, HPA_2M);
        assert_eq!(td.m.guest_access(0, 0x7000, Access::Write(9)), Ok(AccessOutcome::Ok(9)));
        td.block_track(0, M2);
        let sept = td.sept_page();
        assert!(td.m.page_demote(gpa(0), M2, sept).status.is_success(), "{rule}");
        let parent = td.m.entry(gpa(0), M2).expect("parent");
        assert_eq!((parent.state, parent.hpa), (S::NlMapped, sept), "{rule}");
        for i in 0..512u64 {
            let e = td.m.entry(gpa(i << 12), K4).expect("child");
            assert_eq!((e.state, e.hpa), (S::Mapped, HPA_2M + (i << 12)), "{rule}: child {i}");
        }
        assert_eq!(td.m.guest_access(0, 0x7000, Access::Read), Ok(AccessOutcome::Ok(9)), "{rule}: content kept");
    };
    s4_page_demote_pending_blocked_gives_pending_children:
        "§4 PAGE.DEMOTE: PENDING_BLOCKED -> 512 PENDING children" => |rule| {
        let td = Td::runnable();
        assert!(td.aug(0, M2, HPA_2M).status.is_success());
        td.block_track(0, M2);
        assert!(td.m.page_demote(gpa(0), M2, td.sept_page()).status.is_success(), "{rule}");
        assert_eq!(td.m.entry(gpa(0x1FF000), K4).map(|e| e.state), Some(S::Pending), "{rule}");
    };
    s4_page_demote_1g:
        "§4 PAGE.DEMOTE (1G): 512 2M children" => |rule| {
        let td = Td::with(ModuleConfig { max_aug_level: G1, ..ModuleConfig::default() });
        assert!(td.aug(0, G1, 0x40_0000_0000).status.is_success());
        td.block_track(0, G1);
        assert!(td.m.page_demote(gpa(0), G1, td.sept_page()).status.is_success(), "{rule}");
        let e = td.m.entry(gpa(0x3FE0_0000), M2).expect("child");
        assert_eq!((e.state, e.hpa), (S::Pending, 0x40_0000_0000 + 0x3FE0_0000), "{rule}");
    };
    s4_page_demote_must_be_blocked_and_tracked:
        "§4 PAGE.DEMOTE: must be blocked (GPA_RANGE_NOT_BLOCKED) and tracked (TLB_TRACKING_NOT_DONE)" => |rule| {
        let td = Td::runnable();
        td.mapped(0, M2, HPA_2M);
        let r = td.m.page_demote(gpa(0), M2, td.sept_page());
        assert_eq!(r.status, st(C::GpaRangeNotBlocked, operand::RCX), "{rule}");
        assert!(td.m.range_block(gpa(0), M2).status.is_success());
        let r = td.m.page_demote(gpa(0), M2, td.sept_page());
        assert_eq!(r.status, st(C::TlbTrackingNotDone, operand::RCX), "{rule}");
        assert_eq!(td.m.sept_nodes(), 3, "{rule}: no change");
    };
    s4_page_demote_interrupted_restartable_no_change:
        "§4 PAGE.DEMOTE: may return INTERRUPTED_RESTARTABLE with no change (capability)" => |rule| {
        let td = Td::runnable();
        td.mapped(0, M2, HPA_2M);
        td.block_track(0, M2);
        td.m.set_host_interrupt_pending(true);
        let r = td.m.page_demote(gpa(0), M2, td.sept_page());
        assert_eq!(r.status, C::InterruptedRestartable.status(), "{rule}");
        assert_eq!(td.m.entry(gpa(0), M2).map(|e| e.state), Some(S::Blocked), "{rule}: no change");
        assert!(td.m.page_demote(gpa(0), M2, td.sept_page()).status.is_success(), "{rule}: restart");
        let td = Td::with(ModuleConfig { demote_interruptible: false, ..ModuleConfig::default() });
        td.mapped(0, M2, HPA_2M);
        td.block_track(0, M2);
        td.m.set_host_interrupt_pending(true);
        assert!(td.m.page_demote(gpa(0), M2, td.sept_page()).status.is_success(), "{rule}: not interruptible");
    };
    s4_page_demote_non_leaf_is_state_incorrect:
        "§4 PAGE.DEMOTE: from a non-leaf or FREE entry -> EPT_ENTRY_STATE_INCORRECT" => |rule| {
        let td = Td::runnable();
        td.path(0, 0);
        assert_eq!(td.m.page_demote(gpa(0), M2, td.sept_page()).status, st(C::EptEntryStateIncorrect, operand::RCX), "{rule}");
    };
    s4_page_demote_before_finalize_needs_no_block:
        "§4: before finalize DEMOTE skips the blocked-and-tracked checks" => |rule| {
        let td = Td::building(ModuleConfig::default());
        td.path(0, 0);
        assert!(td.m.page_add(gpa(0), HPA_4K, 0).status.is_success());
        td.path(0x20_0000, 1);
        // Build a 2M MAPPED leaf by promoting 512 PAGE.ADDed pages, then demote it back.
        td.path(0x20_0000, 0);
        for i in 0..512u64 {
            assert!(td.m.page_add(gpa(0x20_0000 + (i << 12)), HPA_2M + (i << 12), 0).status.is_success());
        }
        assert!(td.m.page_promote(gpa(0x20_0000), M2).status.is_success(), "{rule}: PROMOTE unblocked");
        assert!(td.m.page_demote(gpa(0x20_0000), M2, td.sept_page()).status.is_success(), "{rule}: DEMOTE unblocked");
    };

    // ---- §4 PAGE.PROMOTE ----------------------------------------------------------------
    s4_page_promote_uniform_mapped_children:
        "§4 PAGE.PROMOTE (2M): NL_BLOCKED (tracked) -> child 0's leaf unblocked; S-EPT page in RCX" => |rule| {
        let td = Td::runnable();
        let sept = td.sept_page();
        td.path(0, 1);
        assert!(td.m.sept_add(gpa(0), 1, sept).status.is_success());
        for i in 0..512u64 {
            td.mapped(i << 12, K4, HPA_2M + (i << 12));
        }
        let nodes = td.m.sept_nodes();
        td.block_track(0, M2);
        let r = td.m.page_promote(gpa(0), M2);
        assert!(r.status.is_success(), "{rule}");
        assert_eq!(r.rcx, sept, "{rule}: freed S-EPT page");
        let e = td.m.entry(gpa(0), M2).expect("leaf");
        assert_eq!((e.state, e.hpa), (S::Mapped, HPA_2M), "{rule}");
        assert_eq!(td.m.sept_nodes(), nodes - 1, "{rule}");
    };
    s4_page_promote_uniform_pending_children:
        "§4 PAGE.PROMOTE: all PENDING children -> PENDING leaf" => |rule| {
        let td = Td::runnable();
        for i in 0..512u64 {
            assert!(td.aug(i << 12, K4, HPA_2M + (i << 12)).status.is_success());
        }
        td.block_track(0, M2);
        assert!(td.m.page_promote(gpa(0), M2).status.is_success(), "{rule}");
        assert_eq!(td.m.entry(gpa(0), M2).map(|e| e.state), Some(S::Pending), "{rule}");
    };
    s4_page_promote_mixed_children_is_invalid:
        "§4 PAGE.PROMOTE: children not all MAPPED or all PENDING -> EPT_INVALID_PROMOTE_CONDITIONS" => |rule| {
        let td = Td::runnable();
        for i in 0..512u64 {
            assert!(td.aug(i << 12, K4, HPA_2M + (i << 12)).status.is_success());
        }
        assert_eq!(td.accept(0, 0x3000, K4), OK);
        td.block_track(0, M2);
        let r = td.m.page_promote(gpa(0), M2);
        assert_eq!(r.status, st(C::EptInvalidPromoteConditions, operand::RCX), "{rule}");
        assert_eq!(td.m.entry(gpa(0), M2).map(|e| e.state), Some(S::NlBlocked), "{rule}: no change");
    };
    s4_page_promote_free_child_is_invalid:
        "§4 PAGE.PROMOTE: a FREE child -> EPT_INVALID_PROMOTE_CONDITIONS" => |rule| {
        let td = Td::runnable();
        for i in 0..511u64 {
            assert!(td.aug(i << 12, K4, HPA_2M + (i << 12)).status.is_success());
        }
        td.block_track(0, M2);
        assert_eq!(td.m.page_promote(gpa(0), M2).status, st(C::EptInvalidPromoteConditions, operand::RCX), "{rule}");
    };
    s4_page_promote_non_contiguous_or_misaligned_is_invalid:
        "§4 PAGE.PROMOTE: HPAs not contiguous or not 2M aligned -> EPT_INVALID_PROMOTE_CONDITIONS" => |rule| {
        let td = Td::runnable();
        for i in 0..512u64 {
            let hpa = if i == 7 { 0x7_0000_0000 } else { HPA_2M + (i << 12) };
            assert!(td.aug(i << 12, K4, hpa).status.is_success());
            assert!(td.aug(0x20_0000 + (i << 12), K4, HPA_2M + 0x1000 + (i << 12)).status.is_success());
        }
        td.block_track(0, M2);
        td.block_track(0x20_0000, M2);
        assert_eq!(td.m.page_promote(gpa(0), M2).status, st(C::EptInvalidPromoteConditions, operand::RCX), "{rule}: gap");
        assert_eq!(td.m.page_promote(gpa(0x20_0000), M2).status, st(C::EptInvalidPromoteConditions, operand::RCX), "{rule}: misaligned");
    };
    s4_page_promote_must_be_blocked_and_tracked:
        "§4 PAGE.PROMOTE: from NL_BLOCKED only, tracked" => |rule| {
        let td = Td::runnable();
        for i in 0..512u64 {
            assert!(td.aug(i << 12, K4, HPA_2M + (i << 12)).status.is_success());
        }
        assert_eq!(td.m.page_promote(gpa(0), M2).status, st(C::GpaRangeNotBlocked, operand::RCX), "{rule}");
        assert!(td.m.range_block(gpa(0), M2).status.is_success());
        assert_eq!(td.m.page_promote(gpa(0), M2).status, st(C::TlbTrackingNotDone, operand::RCX), "{rule}");
        assert_eq!(td.m.page_promote(gpa(0x1000), K4).status.raw(), INVALID_RCX, "{rule}: 4K");
        assert_eq!(td.m.page_promote(gpa(0x20_0000), M2).status, st(C::EptEntryStateIncorrect, operand::RCX), "{rule}: FREE");
    };
    s4_page_promote_interrupted_restartable:
        "§4 PAGE.PROMOTE: INTERRUPTED_RESTARTABLE with no change" => |rule| {
        let td = Td::runnable();
        for i in 0..512u64 {
            assert!(td.aug(i << 12, K4, HPA_2M + (i << 12)).status.is_success());
        }
        td.block_track(0, M2);
        td.m.set_host_interrupt_pending(true);
        assert_eq!(td.m.page_promote(gpa(0), M2).status, C::InterruptedRestartable.status(), "{rule}");
        assert_eq!(td.m.entry(gpa(0), M2).map(|e| e.state), Some(S::NlBlocked), "{rule}");
        assert!(td.m.page_promote(gpa(0), M2).status.is_success(), "{rule}: restart");
    };

    // ---- §4 SEPT.REMOVE -----------------------------------------------------------------
    s4_sept_remove_empty_blocked_node_to_free:
        "§4 SEPT.REMOVE: NL_BLOCKED (tracked) with FREE children -> FREE; page HPA in RCX" => |rule| {
        let td = Td::runnable();
        td.path(0, 1);
        let sept = td.sept_page();
        assert!(td.m.sept_add(gpa(0), 1, sept).status.is_success());
        assert_eq!(td.m.sept_remove(gpa(0), 1).status, st(C::GpaRangeNotBlocked, operand::RCX), "{rule}: not blocked");
        td.block_track(0, M2);
        let r = td.m.sept_remove(gpa(0), 1);
        assert!(r.status.is_success(), "{rule}");
        assert_eq!(r.rcx, sept, "{rule}");
        assert_eq!(td.m.entry(gpa(0), M2).map(|e| e.state), Some(S::Free), "{rule}");
    };
    s4_sept_remove_with_live_children_is_page_not_free:
        "§4 SEPT.REMOVE: any child not FREE -> EPT_PAGE_NOT_FREE" => |rule| {
        let td = Td::runnable();
        assert!(td.aug(0x5000, K4, HPA_4K).status.is_success());
        td.block_track(0, M2);
        assert_eq!(td.m.sept_remove(gpa(0), 1).status, st(C::EptPageNotFree, operand::RCX), "{rule}");
    };
    s4_sept_remove_needs_tracking:
        "§4 SEPT.REMOVE: blocked but not tracked -> TLB_TRACKING_NOT_DONE" => |rule| {
        let td = Td::runnable();
        td.path(0, 0);
        assert!(td.m.range_block(gpa(0), M2).status.is_success());
        assert_eq!(td.m.sept_remove(gpa(0), 1).status, st(C::TlbTrackingNotDone, operand::RCX), "{rule}");
        assert_eq!(td.m.sept_remove(gpa(0x20_0000), 1).status, st(C::EptEntryStateIncorrect, operand::RCX), "{rule}: FREE");
    };

    // ---- §4 ACCEPT row and locking ------------------------------------------------------
    s4_accept_pending_to_mapped_zeroed:
        "§4 TDG.MEM.PAGE.ACCEPT (4K, 2M): PENDING -> MAPPED, page zeroed" => |rule| {
        let td = Td::runnable();
        td.m.write_content(HPA_2M + 0x2000, 5);
        td.m.write_content(HPA_4K, 6);
        assert!(td.aug(0, M2, HPA_2M).status.is_success());
        assert!(td.aug(0x4000_0000, K4, HPA_4K).status.is_success());
        assert_eq!(td.accept(0, 0, M2), OK, "{rule}");
        assert_eq!(td.accept(0, 0x4000_0000, K4), OK, "{rule}");
        assert_eq!(td.m.entry(gpa(0), M2).map(|e| e.state), Some(S::Mapped), "{rule}");
        assert_eq!(td.m.read_content(HPA_2M + 0x2000), 0, "{rule}: zeroed");
        assert_eq!(td.m.read_content(HPA_4K), 0, "{rule}: zeroed");
        assert_eq!(td.m.stats().zeroed_4k, 513, "{rule}: 512 + 1 4K zeroings");
    };
    s4_host_call_on_a_locked_entry_is_busy:
        "§4 locking: a host call that finds the entry locked -> OPERAND_BUSY|RCX (or |SEPT_TREE)" => |rule| {
        let td = Td::runnable();
        assert!(td.aug(0, M2, HPA_2M).status.is_success());
        td.path(0x20_0000, 1);
        let guard = td.m.hold_entry_lock(gpa(0), 1).expect("lock");
        let r = td.m.page_aug(gpa(0), M2, HPA_2M);
        assert_eq!(r.status.raw(), 0x8000_0200_0000_0001, "{rule}: same entry");
        assert_eq!(r.rdx_state(), S::Pending.public_state(), "{rule}");
        assert!(td.m.page_aug(gpa(0x20_0000), M2, HPA_2M + size(1)).status.is_success(), "{rule}: other entries proceed");
        assert_eq!(td.m.range_block(gpa(0), M2).status.raw(), 0x8000_0200_0000_0092, "{rule}: exclusive calls see the tree busy");
        drop(guard);
        let r = td.m.range_block(gpa(0), M2); assert!(r.status.is_success(), "{rule}: after release {r:x?}");
    };

    // ---- §5 ACCEPT walk cases -----------------------------------------------------------
    s5_pending_leaf_at_requested_level_is_accepted:
        "§5: PENDING leaf at the requested level -> zero, MAPPED, RAX 0" => |rule| {
        let td = Td::runnable();
        assert!(td.aug(0x20_0000, M2, HPA_2M).status.is_success());
        assert_eq!(td.accept(0, 0x20_0000, M2), OK, "{rule}");
        let e = td.m.entry(gpa(0x20_0000), M2).expect("leaf");
        assert_eq!((e.state, e.accept_progress), (S::Mapped, 0), "{rule}");
    };
    s5_mapped_leaf_at_requested_level_is_already_accepted:
        "§5: MAPPED leaf at the requested level -> PAGE_ALREADY_ACCEPTED + its level" => |rule| {
        let td = Td::runnable();
        td.mapped(0, M2, HPA_2M);
        td.mapped(0x20_0000, K4, HPA_4K);
        assert_eq!(td.accept(0, 0, M2), T::Completed(st(C::PageAlreadyAccepted, 1)), "{rule}");
        assert_eq!(td.accept(0, 0x20_0000, K4), T::Completed(st(C::PageAlreadyAccepted, 0)), "{rule}");
    };
    s5_mapped_larger_leaf_is_already_accepted_at_its_level:
        "§5: MAPPED leaf at a larger level -> PAGE_ALREADY_ACCEPTED + that leaf's level" => |rule| {
        let td = Td::runnable();
        td.mapped(0, M2, HPA_2M);
        let out = td.accept(0, 0x3000, K4);
        assert_eq!(out, T::Completed(st(C::PageAlreadyAccepted, 1)), "{rule}");
        if let T::Completed(s) = out { assert!(!s.is_error(), "{rule}: a warning"); }
    };
    s5_non_leaf_at_requested_level_is_page_size_mismatch:
        "§5: NL_MAPPED at the requested level (host mapped smaller) -> PAGE_SIZE_MISMATCH + level" => |rule| {
        let td = Td::runnable();
        assert!(td.aug(0x3000, K4, HPA_4K).status.is_success());
        let out = td.accept(0, 0, M2);
        assert_eq!(out, T::Completed(TdxStatus::from_raw(0xC000_0B0B_0000_0001)), "{rule}");
    };
    s5_blocked_non_leaf_at_requested_level_is_page_size_mismatch:
        "§5: any non-free non-leaf at the requested level (NL_BLOCKED too) -> PAGE_SIZE_MISMATCH + level" => |rule| {
        let td = Td::runnable();
        td.path(0, 0);
        assert!(td.m.range_block(gpa(0), M2).status.is_success());
        assert_eq!(td.accept(0, 0, M2), T::Completed(st(C::PageSizeMismatch, 1)), "{rule}");
        accept_exit(&td, td.accept(0, 0x1000, K4), 0, 1, S::NlBlocked, false, rule);
    };
    s5_accept_slices_are_configurable:
        "§5 (model): the slice size sets how much a 2M accept zeroes between interrupt checks" => |rule| {
        let td = Td::with(ModuleConfig { accept_slice_chunks: 64, ..ModuleConfig::default() });
        assert!(td.aug(0, M2, HPA_2M).status.is_success());
        td.m.set_pending_interrupt(0, true);
        assert_eq!(td.accept(0, 0, M2), T::Interrupted, "{rule}");
        assert_eq!(td.m.entry(gpa(0), M2).map(|e| e.accept_progress), Some(64), "{rule}");
        assert_eq!(td.m.stats().zeroed_4k, 64, "{rule}");
    };
    s5_larger_pending_leaf_exits_with_accept_qualification:
        "§5: larger leaf PENDING (guest asks 4K, host mapped 2M) -> ACCEPT-type EPT-violation exit with the requested level" => |rule| {
        let td = Td::runnable();
        assert!(td.aug(0, M2, HPA_2M).status.is_success());
        let out = td.accept(0, 0x5000, K4);
        accept_exit(&td, out, 0, 1, S::Pending, true, rule);
        if let T::Exit(TdExit::EptViolation { gpa, .. }) = out {
            assert_eq!(gpa, 0x5000, "{rule}: R8 = GPA");
        }
        // The host demotes; the guest re-executes and succeeds.
        td.block_track(0, M2);
        assert!(td.m.page_demote(gpa(0), M2, td.sept_page()).status.is_success());
        td.m.vcpu_enter(0).expect("resume");
        assert_eq!(td.accept(0, 0x5000, K4), OK, "{rule}: re-executed after DEMOTE");
    };
    s5_larger_blocked_leaf_exits:
        "§5: larger leaf BLOCKED -> ACCEPT-type EPT-violation exit" => |rule| {
        let td = Td::runnable();
        td.mapped(0, M2, HPA_2M);
        assert!(td.m.range_block(gpa(0), M2).status.is_success());
        accept_exit(&td, td.accept(0, 0x5000, K4), 0, 1, S::Blocked, true, rule);
    };
    s5_free_entry_at_level_exits_then_host_augs:
        "§5: FREE entry -> ACCEPT-type exit; the host AUGs and the ACCEPT re-executes" => |rule| {
        let td = Td::runnable();
        td.path(0, 1);
        accept_exit(&td, td.accept(0, 0, M2), 1, 1, S::Free, false, rule);
        assert!(td.m.page_aug(gpa(0), M2, HPA_2M).status.is_success());
        td.m.vcpu_enter(0).expect("resume");
        assert_eq!(td.accept(0, 0, M2), OK, "{rule}");
    };
    s5_walk_stopping_above_at_missing_entry_exits:
        "§5: the walk stops above the level at a FREE/missing entry -> ACCEPT-type exit at that level" => |rule| {
        let td = Td::runnable();
        accept_exit(&td, td.accept(0, 0x4000_0000, K4), 0, 3, S::Free, false, rule);
        td.m.vcpu_enter(0).expect("resume");
        td.path(0, 2);
        accept_exit(&td, td.accept(0, 0x1000, K4), 0, 2, S::Free, false, rule);
    };
    s5_blocked_at_level_exits_not_already_accepted:
        "§5: BLOCKED / PENDING_BLOCKED at the level -> EPT-violation exit (not ALREADY_ACCEPTED)" => |rule| {
        let td = Td::runnable();
        td.mapped(0, M2, HPA_2M);
        assert!(td.aug(0x20_0000, M2, HPA_2M + size(1)).status.is_success());
        assert!(td.m.range_block(gpa(0), M2).status.is_success());
        assert!(td.m.range_block(gpa(0x20_0000), M2).status.is_success());
        accept_exit(&td, td.accept(0, 0, M2), 1, 1, S::Blocked, true, rule);
        td.m.vcpu_enter(0).expect("resume");
        accept_exit(&td, td.accept(0, 0x20_0000, M2), 1, 1, S::PendingBlocked, true, rule);
    };
    s5_entry_locked_by_the_host_is_busy:
        "§5: entry locked by the host -> OPERAND_BUSY|RCX (0x8000020000000001), guest retries" => |rule| {
        let td = Td::runnable();
        assert!(td.aug(0, M2, HPA_2M).status.is_success());
        let guard = td.m.hold_entry_lock(gpa(0), 1).expect("lock");
        assert_eq!(td.accept(0, 0, M2), T::Completed(TdxStatus::from_raw(0x8000_0200_0000_0001)), "{rule}");
        drop(guard);
        assert_eq!(td.accept(0, 0, M2), OK, "{rule}: the retry succeeds");
    };
    s5_accept_1g_rejected_by_every_public_module:
        "§5: level 1G -> OPERAND_INVALID|RCX with the default capability (2M)" => |rule| {
        let td = Td::runnable();
        assert_eq!(td.accept(0, 0, G1), T::Completed(TdxStatus::from_raw(INVALID_RCX)), "{rule}");
    };
    s5_accept_1g_with_the_future_capability:
        "§5: max accept level 1G (future module) -> 1G PENDING accepted" => |rule| {
        let td = Td::with(ModuleConfig { max_accept_level: G1, max_aug_level: G1, ..ModuleConfig::default() });
        assert!(td.aug(0, G1, 0x40_0000_0000).status.is_success());
        assert_eq!(td.accept(0, 0, G1), OK, "{rule}");
        assert_eq!(td.m.stats().zeroed_4k, 262_144, "{rule}: modelled zeroing cost");
    };
    s5_accept_2m_is_interruptible_and_resumes:
        "§5: 2M accept zeroes in slices; a pending interrupt saves progress, the guest re-executes" => |rule| {
        let td = Td::runnable();
        assert!(td.aug(0, M2, HPA_2M).status.is_success());
        td.m.set_pending_interrupt(0, true);
        assert_eq!(td.accept(0, 0, M2), T::Interrupted, "{rule}");
        let e = td.m.entry(gpa(0), M2).expect("leaf");
        assert_eq!((e.state, e.accept_progress, e.locked), (S::Pending, 1, false), "{rule}");
        assert_eq!(td.accept(0, 0, M2), OK, "{rule}: re-executed");
        assert_eq!(td.m.stats().zeroed_4k, 512, "{rule}: 512 4K zeroings in all");
        assert_eq!(td.m.stats().get(CallKind::Accept, CallOutcome::Interrupted), 1, "{rule}");
    };
    s5_block_resets_the_accept_counter:
        "§5: BLOCK/REMOVE/DEMOTE reset the 2M accept counter" => |rule| {
        let td = Td::runnable();
        assert!(td.aug(0, M2, HPA_2M).status.is_success());
        td.m.set_pending_interrupt(0, true);
        assert_eq!(td.accept(0, 0, M2), T::Interrupted);
        assert!(td.m.range_block(gpa(0), M2).status.is_success());
        assert_eq!(td.m.entry(gpa(0), M2).map(|e| e.accept_progress), Some(0), "{rule}");
    };

    // ---- §6 guest access ----------------------------------------------------------------
    s6_access_to_mapped_completes:
        "§6: MAPPED -> the access completes" => |rule| {
        let td = Td::runnable();
        td.mapped(0, K4, HPA_4K);
        assert_eq!(td.m.guest_access(0, 0x10, Access::Write(3)), Ok(AccessOutcome::Ok(3)), "{rule}");
        assert_eq!(td.m.guest_access(0, 0x20, Access::Read), Ok(AccessOutcome::Ok(3)), "{rule}");
    };
    s6_access_to_pending_injects_ve_with_ve_info:
        "§6: PENDING with #VE enabled -> #VE, VE_INFO exit reason 48, GLA, full GPA, valid" => |rule| {
        let td = Td::runnable();
        assert!(td.aug(0, M2, HPA_2M).status.is_success());
        let out = td.m.guest_access(0, 0x1234, Access::Read).expect("inside");
        let AccessOutcome::Ve(info) = out else { panic!("{rule}: {out:?}") };
        assert_eq!(info.exit_reason, EXIT_REASON_EPT_VIOLATION, "{rule}");
        assert_eq!((info.gpa, info.gla), (0x1234, 0x1234), "{rule}");
        assert!(td.m.ve_info_valid(0), "{rule}: valid");
        assert!(td.m.vcpu_in_td(0), "{rule}: no exit");
    };
    s6_ve_while_ve_info_valid_is_double_fault:
        "§6: a #VE while VE_INFO is still valid -> #DF" => |rule| {
        let td = Td::runnable();
        assert!(td.aug(0, M2, HPA_2M).status.is_success());
        assert!(matches!(td.m.guest_access(0, 0, Access::Read), Ok(AccessOutcome::Ve(_))));
        assert_eq!(td.m.guest_access(0, 0x1000, Access::Read), Ok(AccessOutcome::DoubleFault), "{rule}");
        assert!(td.m.tdg_vp_veinfo_get(0).expect("inside").is_ok());
        assert!(matches!(td.m.guest_access(0, 0x1000, Access::Read), Ok(AccessOutcome::Ve(_))), "{rule}: after reading VE_INFO");
    };
    s6_veinfo_get_returns_and_clears:
        "§6: TDG.VP.VEINFO.GET returns the info and clears valid; nothing valid -> NO_VALID_VE_INFO" => |rule| {
        let td = Td::runnable();
        assert_eq!(td.m.tdg_vp_veinfo_get(0), Ok(Err(TdxStatus::from_raw(0xC000_0704_0000_0000))), "{rule}");
        assert!(td.aug(0, K4, HPA_4K).status.is_success());
        let Ok(AccessOutcome::Ve(info)) = td.m.guest_access(0, 0x10, Access::Write(1)) else { panic!("{rule}") };
        assert_eq!(td.m.tdg_vp_veinfo_get(0), Ok(Ok(info)), "{rule}");
        assert!(!td.m.ve_info_valid(0), "{rule}: cleared");
        assert!(td.m.tdg_vp_veinfo_get(0).expect("inside").is_err(), "{rule}");
    };
    s6_access_to_pending_with_ve_disabled_exits:
        "§6: PENDING with SEPT_VE_DISABLE -> PENDING_EPT_VIOLATION (type 6) exit" => |rule| {
        let td = Td::with(ModuleConfig { pending_ve: false, ..ModuleConfig::default() });
        assert!(td.aug(0, K4, HPA_4K).status.is_success());
        let out = td.m.guest_access(0, 0x10, Access::Read).expect("inside");
        assert_eq!(exit_type(out), Some(ExitType::PendingEptViolation), "{rule}");
        assert!(!td.m.vcpu_in_td(0), "{rule}: exited");
    };
    s6_access_to_free_or_blocked_exits_type_none:
        "§6: FREE/BLOCKED private page (or no S-EPT path) -> EPT-violation exit, type NONE" => |rule| {
        let td = Td::runnable();
        let out = td.m.guest_access(0, 0x9000_0000, Access::Read).expect("inside");
        assert_eq!(exit_type(out), Some(ExitType::None), "{rule}: missing");
        td.m.vcpu_enter(0).expect("resume");
        td.mapped(0, K4, HPA_4K);
        assert!(td.m.range_block(gpa(0), K4).status.is_success());
        let out = td.m.guest_access(0, 0, Access::Write(1)).expect("inside");
        assert_eq!(exit_type(out), Some(ExitType::None), "{rule}: blocked");
        td.m.vcpu_enter(0).expect("resume");
        td.path(0x1000, 0);
        let out = td.m.guest_access(0, 0x1000, Access::Read).expect("inside");
        assert_eq!(exit_type(out), Some(ExitType::None), "{rule}: FREE");
    };
    s6_fault_then_aug_then_ve:
        "§6: FREE access exits; the host AUGs; the re-access takes #VE" => |rule| {
        let td = Td::runnable();
        td.path(0, 1);
        assert!(matches!(td.m.guest_access(0, 0x10, Access::Read), Ok(AccessOutcome::Exit(_))), "{rule}");
        assert!(td.m.page_aug(gpa(0), M2, HPA_2M).status.is_success());
        td.m.vcpu_enter(0).expect("resume");
        assert!(matches!(td.m.guest_access(0, 0x10, Access::Read), Ok(AccessOutcome::Ve(_))), "{rule}");
    };
    s6_shared_gpa_is_not_in_the_sept:
        "§6: a shared GPA is host memory, not an S-EPT access" => |rule| {
        let td = Td::runnable();
        let shared = (1 << 47) | 0x1000;
        assert_eq!(td.m.guest_access(0, shared, Access::Read), Ok(AccessOutcome::Shared { gpa: shared }), "{rule}");
        assert_eq!(td.m.guest_access(0, 1 << 50, Access::Read), Ok(AccessOutcome::InvalidGpa), "{rule}: beyond GPAW");
    };
    s6_vp_info_reports_gpaw_and_ve_attribute:
        "§1/§6: TDG.VP.INFO: GPAW and SEPT_VE_DISABLE" => |rule| {
        let td = Td::with(ModuleConfig { pending_ve: false, vcpus: 3, ..ModuleConfig::default() });
        let info = td.m.tdg_vp_info(0).expect("inside").expect("info");
        assert_eq!(info.gpaw, Gpaw::Bits48, "{rule}");
        assert_eq!(info.attributes & ATTR_SEPT_VE_DISABLE, ATTR_SEPT_VE_DISABLE, "{rule}");
        assert_eq!((info.num_vcpus, info.vcpu_index), (3, 0), "{rule}");
    };

    // ---- §7 VMCALL ----------------------------------------------------------------------
    s7_vmcall_exits_with_the_exposed_registers:
        "§7: TDG.VP.VMCALL is a TD exit carrying the registers RCX exposes" => |rule| {
        let td = Td::runnable();
        let mut regs = VmcallRegs { mask: 0xFFCC, gpr: [0; 16] };
        regs.gpr[VmcallRegs::R11] = 0x10001;
        regs.gpr[VmcallRegs::R12] = 0x1000;
        regs.gpr[0] = 99;
        let out = td.m.tdg_vp_vmcall(0, regs).expect("inside");
        let T::Exit(TdExit::Vmcall(seen)) = out else { panic!("{rule}: {out:?}") };
        assert_eq!(seen.gpr[VmcallRegs::R11], 0x10001, "{rule}");
        assert_eq!(seen.gpr[VmcallRegs::R12], 0x1000, "{rule}");
        assert_eq!(seen.gpr[0], 0, "{rule}: RAX is not exposed");
        assert!(!td.m.vcpu_in_td(0), "{rule}: exited");
        td.m.vcpu_enter(0).expect("resume");
        let bad = VmcallRegs { mask: 0x10, gpr: [0; 16] };
        assert_eq!(td.m.tdg_vp_vmcall(0, bad), Ok(T::Completed(TdxStatus::from_raw(INVALID_RCX))), "{rule}: RSP exposed");
    };

    // ---- epochs, vCPUs, faults, counters ------------------------------------------------
    s4_epoch_parity_counts_vcpu_entries:
        "§4 epoch tracking: entry counts the vCPU in the current parity, exit uncounts it" => |rule| {
        let td = Td::runnable();
        assert_eq!(td.m.epoch_refcounts(), [0, 1], "{rule}");
        assert!(td.m.mem_track().status.is_success());
        td.m.vcpu_enter(1).expect("enter");
        assert_eq!(td.m.epoch_refcounts(), [1, 1], "{rule}");
        td.m.vcpu_exit(0).expect("exit");
        assert_eq!(td.m.epoch_refcounts(), [1, 0], "{rule}");
        assert!(td.m.vcpu_enter(1).is_err(), "{rule}: already inside");
        assert!(td.m.tdg_vp_info(0).is_err(), "{rule}: guest calls need the vCPU inside");
        assert!(td.m.vcpu_enter(9).is_err(), "{rule}: no such vCPU");
    };
    s4_kick_moves_running_vcpus_to_the_current_epoch:
        "§4 epoch tracking: a kick (exit + re-entry) completes the tracking of earlier blocks" => |rule| {
        let td = Td::runnable();
        td.m.vcpu_enter(1).expect("enter");
        td.mapped(0, M2, HPA_2M);
        assert!(td.m.range_block(gpa(0), M2).status.is_success());
        assert!(td.m.mem_track().status.is_success());
        assert_eq!(td.m.page_remove(gpa(0), M2).status, st(C::TlbTrackingNotDone, operand::RCX), "{rule}");
        td.m.vcpu_kick(0).expect("kick");
        assert_eq!(td.m.page_remove(gpa(0), M2).status, st(C::TlbTrackingNotDone, operand::RCX), "{rule}: vCPU 1 not kicked");
        td.m.kick_all();
        assert!(td.m.vcpu_in_td(0) && td.m.vcpu_in_td(1), "{rule}: kicked vCPUs keep running");
        assert!(td.m.page_remove(gpa(0), M2).status.is_success(), "{rule}");
    };
    sept_memory_scales_with_mappings_not_td_size:
        "issue: a 1 TiB TD mapped at 2M fits in a few MiB of S-EPT" => |rule| {
        let td = Td::runnable();
        for g in (0..1u64 << 40).step_by(1 << 30) {
            td.path(g, 1);
        }
        assert_eq!(td.m.sept_nodes(), 1 + 2 + 1024, "{rule}");
        for g in [0u64, 0x20_0000, 0x7F_FFE0_0000, 0xFF_FFE0_0000] {
            assert!(td.m.page_aug(gpa(g), M2, HPA_2M).status.is_success(), "{rule}");
        }
        assert_eq!(td.m.sept_nodes(), 1027, "{rule}: leaves cost no nodes");
        assert!(td.m.footprint_bytes() <= 5 << 20, "{rule}: {} bytes", td.m.footprint_bytes());
    };
    counters_by_level:
        "counters: calls with a page-info operand are also counted by level" => |rule| {
        let td = Td::runnable();
        td.mapped(0, M2, HPA_2M);
        td.mapped(0x4000_0000, K4, HPA_4K);
        let s = td.m.stats();
        let ok = CallOutcome::Status(C::Success);
        assert_eq!(s.get_at(CallKind::Accept, M2, ok), 1, "{rule}");
        assert_eq!(s.get_at(CallKind::Accept, K4, ok), 1, "{rule}");
        assert_eq!(s.get_at(CallKind::PageAug, M2, ok), 1, "{rule}");
        assert_eq!(s.get(CallKind::Accept, ok), 2, "{rule}");
    };
    faults_are_injected_deterministically:
        "fault injection: the nth matching call returns the chosen result" => |rule| {
        let td = Td::runnable();
        td.path(0, 0);
        td.m.inject(FaultRule { call: CallKind::PageAug, gpa: None, skip: 1, count: 1, result: FaultResult::Busy });
        assert!(td.m.page_aug(gpa(0), K4, HPA_4K).status.is_success(), "{rule}: skipped");
        assert_eq!(td.m.page_aug(gpa(0x1000), K4, HPA_4K + 0x1000).status, st(C::OperandBusy, operand::RCX), "{rule}");
        assert!(td.m.page_aug(gpa(0x1000), K4, HPA_4K + 0x1000).status.is_success(), "{rule}: exhausted");
        td.m.inject(FaultRule::once(CallKind::Accept, FaultResult::InterruptedRestartable));
        assert_eq!(td.accept(0, 0, K4), T::Interrupted, "{rule}");
        td.m.inject(FaultRule::once(CallKind::PageRemove, FaultResult::Status(C::EptWalkFailed.with_operand(1))));
        assert_eq!(td.m.page_remove(gpa(0), K4).status, st(C::EptWalkFailed, 1), "{rule}");
        assert_eq!(td.m.entry(gpa(0), K4).map(|e| e.state), Some(S::Pending), "{rule}: nothing ran");
        assert_eq!(td.m.stats().injected, 3, "{rule}");
    };
    counters_are_exact:
        "counters: every call counted by kind and outcome" => |rule| {
        let td = Td::runnable();
        td.mapped(0, M2, HPA_2M);
        let _ = td.m.page_aug(gpa(0), M2, HPA_2M);
        let s = td.m.stats();
        assert_eq!(s.status(CallKind::SeptAdd, C::Success), 2, "{rule}");
        assert_eq!(s.status(CallKind::PageAug, C::Success), 1, "{rule}");
        assert_eq!(s.status(CallKind::PageAug, C::EptEntryStateIncorrect), 1, "{rule}");
        assert_eq!(s.status(CallKind::Accept, C::Success), 1, "{rule}");
        assert_eq!(s.total(CallKind::Finalize), 1, "{rule}");
        assert_eq!(td.m.check_tree(), Ok(()), "{rule}");
        let _ = page_info;
    };
}
