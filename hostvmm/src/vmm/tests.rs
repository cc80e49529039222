//! The design's flows from the host's side: S-EPT states, folios and exact SEAMCALL counts.

use accept::abi::{page_info, StatusCode, TdxStatus};

use super::*;
use crate::kvm::YieldKicker;
use crate::module::{Access, AccessOutcome, CallKind, CallOutcome, TdcallOutcome};
use crate::testutil::{g, host, K4, M2, SHARED};

fn never() -> bool {
    false
}

/// One vCPU step, with exits handled by the host, as a vCPU loop runs it.
fn accept(h: &Host, gpa: u64, level: PageLevel) -> (TdxStatus, u32) {
    accept_on(h, 0, gpa, level)
}

/// [`accept`] on vCPU `vcpu`, through the vCPU loop ([`crate::vcpu::Vcpu`]).
fn accept_on(h: &Host, vcpu: usize, gpa: u64, level: PageLevel) -> (TdxStatus, u32) {
    use crate::vcpu::{Insn, Retired, Step, Vcpu};
    let mut v = Vcpu::new(h, vcpu).with_max_exits(8);
    let insn = Insn::Accept {
        page_info: page_info(g(gpa), level),
    };
    let mut exits = 0;
    loop {
        match v.step(insn) {
            Step::Retired(Retired::Accept(s)) => return (s, exits),
            Step::Reexecute(_) => exits += 1,
            Step::Interrupted => {}
            other => panic!("ACCEPT {level} at {gpa:#x}: {other:?}"),
        }
    }
}

fn access(h: &Host, gpa: u64, a: Access) -> AccessOutcome {
    let m = h.module();
    m.vcpu_enter(0).unwrap();
    let out = m.guest_access(0, gpa, a).unwrap();
    if !matches!(out, AccessOutcome::Exit(_)) {
        m.vcpu_exit(0).unwrap();
    }
    out
}

fn map_gpa(h: &Host, start: u64, len: u64, pending: &dyn Fn() -> bool) -> (GhciStatus, u64) {
    let mut regs = VmcallRegs::default();
    regs.gpr[VmcallRegs::R11] = vmcall::MAP_GPA;
    regs.gpr[VmcallRegs::R12] = start;
    regs.gpr[VmcallRegs::R13] = len;
    h.handle_map_gpa(&mut regs, pending);
    (
        GhciStatus::from_raw(regs.gpr[VmcallRegs::R10]),
        regs.gpr[VmcallRegs::R11],
    )
}

fn ok(h: &Host, kind: CallKind) -> u64 {
    h.module()
        .stats()
        .get(kind, CallOutcome::Status(StatusCode::Success))
}

fn leaf(h: &Host, gpa: u64) -> (u8, crate::module::SeptState) {
    let e = h.module().leaf(g(gpa));
    (e.level, e.state)
}

use crate::module::SeptState;

#[test]
fn map_gpa_validates_like_the_ghci() {
    let h = host();
    assert_eq!(map_gpa(&h, 0x1001, K4, &never).0, GhciStatus::AlignError);
    assert_eq!(map_gpa(&h, 0, 0, &never).0, GhciStatus::AlignError);
    assert_eq!(map_gpa(&h, 0, K4 + 1, &never).0, GhciStatus::AlignError);
    // Beyond guest memory, crossing the shared bit, overflowing, bits above the GPA width.
    assert_eq!(
        map_gpa(&h, 63 * M2, 2 * M2, &never).0,
        GhciStatus::InvalidOperand
    );
    assert_eq!(
        map_gpa(&h, SHARED - K4, 2 * K4, &never).0,
        GhciStatus::InvalidOperand
    );
    assert_eq!(
        map_gpa(&h, !0xFFF, 2 * K4, &never).0,
        GhciStatus::InvalidOperand
    );
    assert_eq!(
        map_gpa(&h, 1 << 50, K4, &never).0,
        GhciStatus::InvalidOperand
    );
    assert_eq!(h.stats().map_gpa_errors, 7);
    assert_eq!(
        h.model()
            .expect("the guest_memfd model")
            .stats()
            .conversions_to_shared,
        0
    );
}

#[test]
fn map_gpa_converts_in_2m_chunks_and_yields_to_pending_events() {
    let h = host();
    // A pending event after every chunk: RETRY with the next GPA, shared bit as sent.
    let (s, r) = map_gpa(&h, SHARED | K4, 3 * M2, &|| true);
    assert_eq!((s, r), (GhciStatus::Retry, SHARED | M2));
    let (s, r) = map_gpa(&h, r, 3 * M2 + K4 - M2, &|| true);
    assert_eq!((s, r), (GhciStatus::Retry, SHARED | (2 * M2)));
    let (s, _) = map_gpa(&h, r, 3 * M2 + K4 - 2 * M2, &never);
    assert_eq!(s, GhciStatus::Success);
    assert_eq!(h.stats().map_gpa_chunks, 4);
    assert!(h.gmem().is_uniform(
        GpaRange::new(K4, 3 * M2 + K4).unwrap(),
        Shareability::Shared
    ));
    // Private side: no shared bit in R11.
    let (s, r) = map_gpa(&h, K4, 2 * M2, &|| true);
    assert_eq!((s, r), (GhciStatus::Retry, M2));
}

#[test]
fn shared_hole_in_a_huge_page_and_back_restores_the_2m_mapping() {
    let h = host();
    let (s, exits) = accept(&h, 0, PageLevel::Size2M);
    assert!(s.is_success());
    assert_eq!(exits, 1);
    for i in 0..512 {
        access(&h, i * K4, Access::Write(i + 1));
    }
    let folios = h.model().expect("the guest_memfd model").folio_count();

    // Private -> shared for one 4K page (a bounce buffer): DEMOTE once, REMOVE one page.
    assert_eq!(
        map_gpa(&h, SHARED | (9 * K4), K4, &never).0,
        GhciStatus::Success
    );
    assert_eq!(leaf(&h, 9 * K4), (0, SeptState::Free));
    assert_eq!(leaf(&h, 10 * K4), (0, SeptState::Mapped));
    assert_eq!(ok(&h, CallKind::PageDemote), 1);
    assert_eq!(ok(&h, CallKind::PageRemove), 1);
    assert_eq!(
        h.model().expect("the guest_memfd model").folio_count(),
        folios,
        "the folio is not split (seed 001)"
    );
    assert_eq!(access(&h, 10 * K4, Access::Read), AccessOutcome::Ok(11));

    // Shared -> private, the guest accepts 4K, the merge pass PROMOTEs.
    assert_eq!(map_gpa(&h, 9 * K4, K4, &never).0, GhciStatus::Success);
    let (s, exits) = accept(&h, 9 * K4, PageLevel::Size4K);
    assert!(s.is_success());
    assert_eq!(exits, 1);
    assert_eq!(h.merge_pass(), 1);
    assert_eq!(leaf(&h, 0), (1, SeptState::Mapped));
    assert_eq!(ok(&h, CallKind::PagePromote), 1);
    assert_eq!(ok(&h, CallKind::PageAug), 2);
    assert_eq!(access(&h, 10 * K4, Access::Read), AccessOutcome::Ok(11));
    assert_eq!(access(&h, 9 * K4, Access::Read), AccessOutcome::Ok(0));
    assert_eq!(
        h.model().expect("the guest_memfd model").folio_count(),
        folios
    );
}

#[test]
fn shared_to_private_with_a_host_mapping_retries_at_that_page() {
    let h = host();
    assert_eq!(map_gpa(&h, SHARED, M2, &never).0, GhciStatus::Success);
    h.model()
        .expect("the guest_memfd model")
        .host_map(g(5 * K4))
        .unwrap();
    let (s, r) = map_gpa(&h, 0, M2, &never);
    assert_eq!((s, r), (GhciStatus::Retry, 5 * K4));
    assert_eq!(h.stats().map_gpa_eagain, 1);
    // Nothing was converted (all-or-nothing per chunk).
    assert!(h
        .gmem()
        .is_uniform(GpaRange::new(0, M2).unwrap(), Shareability::Shared));
    h.model()
        .expect("the guest_memfd model")
        .host_unmap(g(5 * K4))
        .unwrap();
    assert_eq!(map_gpa(&h, 0, M2, &never).0, GhciStatus::Success);
}

#[test]
fn shared_to_private_with_a_transient_reference_completes_when_it_drops() {
    let h = host();
    assert_eq!(map_gpa(&h, SHARED, M2, &never).0, GhciStatus::Success);
    let token = h
        .model()
        .expect("the guest_memfd model")
        .get_ref(g(3 * K4))
        .unwrap();
    assert_eq!(map_gpa(&h, 0, M2, &never).0, GhciStatus::Success);
    // Until the reference drops, the guest's accept of that page only gets "retry".
    let m = h.module();
    m.vcpu_enter(0).unwrap();
    let TdcallOutcome::Exit(exit) = m
        .tdg_mem_page_accept(0, page_info(g(3 * K4), PageLevel::Size4K))
        .unwrap()
    else {
        panic!("expected an exit");
    };
    let mut regs = VmcallRegs::default();
    assert_eq!(h.handle_exit(exit, &mut regs, &never), ExitAction::Resume);
    assert_eq!(leaf(&h, 3 * K4).1, SeptState::Free);
    h.model()
        .expect("the guest_memfd model")
        .put_ref(token)
        .unwrap();
    let (s, _) = accept(&h, 3 * K4, PageLevel::Size4K);
    assert!(s.is_success());
}

#[test]
fn a_failed_remove_during_conversion_becomes_error_pages() {
    use crate::module::{FaultResult, FaultRule};
    let h = host();
    accept(&h, 0, PageLevel::Size2M);
    h.module().inject(FaultRule::once(
        CallKind::PageRemove,
        FaultResult::Status(StatusCode::EptEntryStateIncorrect.status()),
    ));
    assert_eq!(map_gpa(&h, SHARED, M2, &never).0, GhciStatus::Success);
    assert_eq!(h.gmem().poisoned_pages(), 512);
    assert!(h.gmem().is_poisoned(g(K4)));
    // Converted back, those pages are never handed to the guest again.
    assert_eq!(map_gpa(&h, 0, M2, &never).0, GhciStatus::Success);
    let m = h.module();
    m.vcpu_enter(0).unwrap();
    // The S-EPT still holds the blocked leaf the REMOVE failed on: the accept exits and the
    // host refuses to map an error page.
    let out = m
        .tdg_mem_page_accept(0, page_info(g(K4), PageLevel::Size4K))
        .unwrap();
    let TdcallOutcome::Exit(exit) = out else {
        panic!("expected an exit, got {out:?}");
    };
    let mut regs = VmcallRegs::default();
    assert_eq!(
        h.handle_exit(exit, &mut regs, &never),
        ExitAction::Fatal(FaultError::Backing(BackingError::Poisoned))
    );
    assert_eq!(h.mmu().stats().maps[0], 0, "no poisoned page was mapped");
}

#[test]
fn unknown_vmcalls_are_unsupported() {
    let h = host();
    let mut regs = VmcallRegs::default();
    regs.gpr[VmcallRegs::R11] = 0x10002;
    let action = h.handle_exit(TdExit::Vmcall(regs), &mut regs, &never);
    assert_eq!(action, ExitAction::Resume);
    assert_eq!(
        GhciStatus::from_raw(regs.gpr[VmcallRegs::R10]),
        GhciStatus::SubfuncUnsupported
    );
}

#[test]
fn block_first_conversion_aborts_cleanly_when_a_later_block_fails() {
    use crate::module::{FaultResult, FaultRule};
    let mut config = HostConfig::new(64 * M2, 1);
    config.map_gpa.block_first = true;
    let h = Host::new(config, Arc::new(YieldKicker)).unwrap();
    accept(&h, 0, PageLevel::Size2M);
    access(&h, 5 * K4, Access::Write(55));
    // Page 100 is already shared: converting [0, 2M) has two runs, of 100 and 411 4K leaves.
    assert_eq!(
        map_gpa(&h, SHARED | (100 * K4), K4, &never).0,
        GhciStatus::Success
    );
    let before = h.model().expect("the guest_memfd model").snapshot();
    // Every BLOCK of the first run succeeds, the first BLOCK of the second run fails.
    h.module().inject(FaultRule {
        skip: 100,
        ..FaultRule::once(
            CallKind::RangeBlock,
            FaultResult::Status(StatusCode::EptEntryStateIncorrect.status()),
        )
    });
    let unblocks = ok(&h, CallKind::RangeUnblock);
    let (s, r) = map_gpa(&h, SHARED, M2, &never);
    assert_eq!(
        (s, r),
        (GhciStatus::Retry, SHARED),
        "aborted before the point of no return"
    );
    assert_eq!(h.model().expect("the guest_memfd model").snapshot(), before);
    // The first run was unblocked again: the guest still reads its data.
    assert_eq!(ok(&h, CallKind::RangeUnblock) - unblocks, 100);
    assert_eq!(leaf(&h, 5 * K4), (0, SeptState::Mapped));
    assert_eq!(access(&h, 5 * K4, Access::Read), AccessOutcome::Ok(55));
    // Retried, it completes.
    assert_eq!(map_gpa(&h, SHARED, M2, &never).0, GhciStatus::Success);
    assert_eq!(leaf(&h, 5 * K4).1, SeptState::Free);
}

/// A TD exit with TDX_HOST_PRIORITY_BUSY_TIMEOUT (`tdx_td_dispatcher.c` tdx_td_dispatcher) maps
/// nothing: the host re-enters the vCPU, whose TDCALL completed with OPERAND_BUSY.
#[test]
fn host_priority_timeout_exits_re_enter_the_guest() {
    let h = host();
    let mut regs = VmcallRegs::default();
    let busy = StatusCode::OperandBusy.with_operand(accept::abi::operand::RCX);
    let exit = TdExit::HostPriorityBusyTimeout { guest_status: busy };
    assert_eq!(h.handle_exit(exit, &mut regs, &never), ExitAction::Resume);
    assert_eq!(h.mmu().stats().hp_timeouts, 1);
    assert_eq!(h.mmu().stats().faults, 0, "no fault handling");
    assert_eq!(exit.completed_status(), Some(busy));
}

/// Regression: the simulator charged a vCPU the difference of the host's global counters
/// around its exit, so in parallel mode it paid for the other vCPUs' exits handled meanwhile.
/// The per-thread counts see only the calling thread's work.
#[test]
fn thread_stats_count_only_the_calling_threads_exits() {
    let h = Host::new(HostConfig::new(64 * M2, 2), Arc::new(YieldKicker)).unwrap();
    let (mmu0, vmm0) = (crate::kvm::thread_stats(), thread_stats());
    let pages = [24u64, 8];
    let (mine, theirs) = std::thread::scope(|s| {
        let work = |vcpu: usize| {
            let h = &h;
            move || {
                let (m0, v0) = (crate::kvm::thread_stats(), thread_stats());
                for i in 0..pages[vcpu] {
                    let gpa = (2 * i + vcpu as u64) * M2;
                    assert_eq!(
                        accept_on(h, vcpu, gpa, PageLevel::Size2M).0,
                        TdxStatus::SUCCESS
                    );
                }
                let (m1, v1) = (crate::kvm::thread_stats(), thread_stats());
                (
                    m1.maps[1] - m0.maps[1],
                    v1.ept_violations - v0.ept_violations,
                )
            }
        };
        let other = s.spawn(work(1));
        let mine = work(0)();
        (mine, other.join().unwrap())
    });
    assert_eq!(mine, (24, 24));
    assert_eq!(theirs, (8, 8));
    assert_eq!(
        h.mmu().stats().maps[1],
        32,
        "the shared counters hold both threads' maps"
    );
    assert_eq!(h.stats().ept_violations, 32);
    // This thread's counts moved by its own 24 exits only.
    assert_eq!(crate::kvm::thread_stats().maps[1] - mmu0.maps[1], 24);
    assert_eq!(thread_stats().ept_violations - vmm0.ept_violations, 24);
}
