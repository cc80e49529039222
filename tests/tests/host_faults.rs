//! Fault injection at every step of every host flow, observed as a guest and a VMM would:
//!
//! - `OPERAND_BUSY` and `INTERRUPTED_RESTARTABLE` on any call are retried transparently: the
//!   final S-EPT states, page contents and guest_memfd are those of a run without injection;
//! - allocation failures (S-EPT page pool, folio pool, range-map nodes) come before the point
//!   of no return: nothing changes, MapGPA answers RETRY, a later retry succeeds;
//! - hard errors of SEAMCALLs either leave the TD able to redo the step, or (after the point of
//!   no return) turn the affected pages into error pages that are never mapped again, while
//!   the rest of the TD keeps its data and keeps accepting memory.

use std::collections::BTreeMap;
use std::sync::Arc;

use accept::abi::{operand, GhciStatus, Gpa, GpaRange, PageLevel, StatusCode, TdxStatus};
use hostvmm::gmem::GmemSnapshot;
use hostvmm::kvm::{BackingError, FaultError, YieldKicker};
use hostvmm::module::{CallKind, FaultResult, FaultRule, SeptState};
use hostvmm::vmm::{ExitAction, Host, HostConfig};
use tdmem_tests::drive::{
    self, accept, content, leaf, map_gpa, map_gpa_once, read, touch, write, GuestError, Touch, K4,
    M2, SHARED,
};

thread_local! {
    /// Convert in block-first mode (seed 002's option) on hosts built by this test's thread.
    static BLOCK_FIRST: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

fn host() -> Host {
    let mut cfg = HostConfig::new(32 * M2, 1);
    cfg.map_gpa.block_first = BLOCK_FIRST.with(|b| b.get());
    Host::new(cfg, Arc::new(YieldKicker)).expect("host")
}

/// A GPA far from every flow's range, to show that the TD keeps running.
const ELSEWHERE: u64 = 20 * M2;

/// The injectable SEAMCALLs and the guest ACCEPT.
const KINDS: [CallKind; 9] = [
    CallKind::SeptAdd,
    CallKind::PageAug,
    CallKind::RangeBlock,
    CallKind::MemTrack,
    CallKind::RangeUnblock,
    CallKind::PageRemove,
    CallKind::PageDemote,
    CallKind::PagePromote,
    CallKind::Accept,
];

/// Calls whose hard failure is swept.
const HARD_KINDS: [CallKind; 7] = [
    CallKind::PageDemote,
    CallKind::PageRemove,
    CallKind::PagePromote,
    CallKind::RangeBlock,
    CallKind::MemTrack,
    CallKind::PageAug,
    CallKind::SeptAdd,
];

/// Hard statuses: a generic operand error and a wrong-state error (which some paths read as
/// "another vCPU got there first").
fn hard_statuses() -> [TdxStatus; 2] {
    [
        StatusCode::OperandInvalid.with_operand(operand::RCX),
        StatusCode::EptEntryStateIncorrect.status(),
    ]
}

fn token(gpa: u64, generation: u64) -> u64 {
    0x7000_0000_0000 | (generation << 32) | (gpa >> 12)
}

fn ok_accept(s: TdxStatus) -> bool {
    s.is_success() || s.is(StatusCode::PageAlreadyAccepted)
}

/// Expected guest data: page -> last token written.
type Tokens = BTreeMap<u64, u64>;

/// A host flow: `setup` runs without injection; `run` is the part faults are injected into.
/// `run` is idempotent so that it can be re-driven to completion after a failure.
struct Flow {
    name: &'static str,
    setup: fn(&Host, &mut Tokens),
    run: fn(&Host, &mut Tokens) -> Result<(), String>,
    /// Pages whose S-EPT state is compared between runs.
    watch: &'static [u64],
}

fn step(what: &str, r: Result<TdxStatus, GuestError>) -> Result<(), String> {
    match r {
        Ok(s) if ok_accept(s) => Ok(()),
        Ok(s) => Err(format!("{what}: status {s:?}")),
        Err(e) => Err(format!("{what}: {e:?}")),
    }
}

fn map(h: &Host, start: u64, len: u64) -> Result<(), String> {
    match map_gpa(h, start, len) {
        (GhciStatus::Success, _) => Ok(()),
        (s, n) => Err(format!("MapGPA {start:#x}+{len:#x}: {s:?} after {n} calls")),
    }
}

fn put(h: &Host, t: &mut Tokens, gpa: u64, generation: u64) -> Result<(), String> {
    let tok = token(gpa, generation);
    write(h, gpa, tok).ok_or_else(|| format!("write {gpa:#x} did not complete"))?;
    t.insert(gpa, tok);
    Ok(())
}

// ---- the flows ---------------------------------------------------------------------------------

fn no_setup(_: &Host, _: &mut Tokens) {}

/// Guest ACCEPT 2M on untouched memory: EPT-violation exit, SEPT.ADD x2, AUG 2M.
fn run_accept_2m(h: &Host, t: &mut Tokens) -> Result<(), String> {
    step("accept 2M", accept(h, 0, PageLevel::Size2M))?;
    for p in [0, K4, 511 * K4] {
        put(h, t, p, 1)?;
    }
    Ok(())
}

/// Guest ACCEPT 4K: the host honours the level and AUGs 4K.
fn run_accept_4k(h: &Host, t: &mut Tokens) -> Result<(), String> {
    step("accept 4K", accept(h, 5 * K4, PageLevel::Size4K))?;
    put(h, t, 5 * K4, 1)
}

/// The #VE split path: a plain access maps 2M PENDING, the #VE handler accepts 4K, the MMU
/// DEMOTEs.
fn run_ve_split(h: &Host, t: &mut Tokens) -> Result<(), String> {
    if leaf(h, 3 * K4).1 != SeptState::Mapped {
        match touch(h, 3 * K4, hostvmm::module::Access::Read) {
            Ok(Touch::Ve(_)) => {
                drive::ve_info(h).map_err(|s| format!("VEINFO.GET: {s:?}"))?;
            }
            Ok(Touch::Ok(_)) => {}
            Err(e) => return Err(format!("touch: {e:?}")),
        }
        step("accept 4K after #VE", accept(h, 3 * K4, PageLevel::Size4K))?;
    }
    put(h, t, 3 * K4, 1)
}

fn setup_2m_with_data(h: &Host, t: &mut Tokens) {
    assert!(ok_accept(accept(h, 0, PageLevel::Size2M).expect("accept")));
    for i in 0..512 {
        put(h, t, i * K4, 0).expect("write");
    }
}

/// Private -> shared of a 4K hole in a MAPPED 2M leaf: BLOCK, TRACK, DEMOTE, BLOCK, TRACK,
/// REMOVE.
fn run_to_shared(h: &Host, t: &mut Tokens) -> Result<(), String> {
    map(h, SHARED | (9 * K4), K4)?;
    t.remove(&(9 * K4));
    Ok(())
}

fn setup_hole(h: &Host, t: &mut Tokens) {
    setup_2m_with_data(h, t);
    run_to_shared(h, t).expect("to shared");
}

/// Shared -> private, re-accept 4K, merge pass (BLOCK, TRACK, PROMOTE).
fn run_to_private_merge(h: &Host, t: &mut Tokens) -> Result<(), String> {
    map(h, 9 * K4, K4)?;
    step("re-accept 4K", accept(h, 9 * K4, PageLevel::Size4K))?;
    if !t.contains_key(&(9 * K4)) {
        put(h, t, 9 * K4, 2)?;
    }
    h.merge_pass();
    Ok(())
}

fn punch(h: &Host, s: u64, e: u64) -> Result<(), String> {
    let range = GpaRange::new(s, e).expect("range");
    h.punch_hole(range)
        .map(|_| ())
        .map_err(|e| format!("punch {range}: {e}"))
}

fn setup_punch(h: &Host, t: &mut Tokens) {
    setup_hole(h, t);
    map(h, SHARED | M2, M2).expect("second 2M shared");
    for p in [9 * K4, M2, M2 + K4] {
        let mut g = h.model().expect("the guest_memfd model");
        g.host_map(Gpa::new_truncate(p)).expect("host map");
        g.host_unmap(Gpa::new_truncate(p)).expect("host unmap");
    }
}

/// Host hole punch of shared ranges: a 4K page of a folio that stays, and a whole folio.
fn run_punch(h: &Host, _t: &mut Tokens) -> Result<(), String> {
    punch(h, 9 * K4, 10 * K4)?;
    punch(h, M2, 2 * M2)
}

const WATCH_2M: &[u64] = &[0, K4, 8 * K4, 9 * K4, 10 * K4, 511 * K4];

fn flows() -> Vec<Flow> {
    vec![
        Flow {
            name: "accept 2M",
            setup: no_setup,
            run: run_accept_2m,
            watch: WATCH_2M,
        },
        Flow {
            name: "accept 4K",
            setup: no_setup,
            run: run_accept_4k,
            watch: &[0, 4 * K4, 5 * K4, 6 * K4],
        },
        Flow {
            name: "#VE split",
            setup: no_setup,
            run: run_ve_split,
            watch: &[0, 2 * K4, 3 * K4, 4 * K4],
        },
        Flow {
            name: "private->shared 4K hole",
            setup: setup_2m_with_data,
            run: run_to_shared,
            watch: WATCH_2M,
        },
        Flow {
            name: "shared->private + merge",
            setup: setup_hole,
            run: run_to_private_merge,
            watch: WATCH_2M,
        },
        Flow {
            name: "hole punch",
            setup: setup_punch,
            run: run_punch,
            watch: &[0, 9 * K4, M2, M2 + K4],
        },
    ]
}

// ---- observation ---------------------------------------------------------------------------

/// What must be identical with and without transparent faults.
#[derive(Debug, PartialEq, Eq)]
struct Observed {
    leaves: Vec<(u64, u8, SeptState, Option<u64>)>,
    gmem: GmemSnapshot,
    poisoned: u64,
}

fn observe(h: &Host, watch: &[u64], t: &Tokens) -> Observed {
    let mut pages: Vec<u64> = watch.iter().copied().chain(t.keys().copied()).collect();
    pages.sort_unstable();
    pages.dedup();
    let gmem = h.model().expect("the guest_memfd model").snapshot();
    let poisoned = h.gmem().poisoned_pages();
    Observed {
        leaves: pages
            .into_iter()
            .map(|p| {
                let (l, s) = leaf(h, p);
                let c = (s == SeptState::Mapped).then(|| content(h, p)).flatten();
                (p, l, s, c)
            })
            .collect(),
        gmem,
        poisoned,
    }
}

/// Calls of each kind `f` makes on a fresh host after `setup`.
fn calls_in_run(flow: &Flow) -> Vec<(CallKind, u64)> {
    let h = host();
    let mut t = Tokens::new();
    (flow.setup)(&h, &mut t);
    let before = h.module().stats();
    (flow.run)(&h, &mut t).unwrap_or_else(|e| panic!("{}: baseline: {e}", flow.name));
    let after = h.module().stats();
    KINDS
        .iter()
        .map(|&k| (k, after.total(k) - before.total(k)))
        .filter(|&(_, n)| n > 0)
        .collect()
}

fn baseline(flow: &Flow) -> (Observed, Tokens) {
    let h = host();
    let mut t = Tokens::new();
    (flow.setup)(&h, &mut t);
    (flow.run)(&h, &mut t).unwrap_or_else(|e| panic!("{}: baseline: {e}", flow.name));
    (observe(&h, flow.watch, &t), t)
}

/// The user-visible contract after any failure, once the flow was re-driven: the S-EPT is well
/// formed, no error page is mapped or pending, every page the guest still owns privately reads
/// back its last token, and the TD still accepts and uses other memory.
fn check_td(h: &Host, t: &Tokens, what: &str) -> u64 {
    h.module()
        .check_tree()
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    let poisoned = h.gmem().poisoned_pages();
    for (&p, &tok) in t {
        let g = Gpa::new_truncate(p);
        let is_poisoned = h.gmem().is_poisoned(g);
        let private = h.gmem().shareability(g).ok() == Some(hostvmm::gmem::Shareability::Private);
        let (_, state) = leaf(h, p);
        if is_poisoned {
            assert!(
                !matches!(state, SeptState::Mapped | SeptState::Pending),
                "{what}: error page {p:#x} is still {state:?}"
            );
            continue;
        }
        if private {
            assert_eq!(read(h, p), Some(tok), "{what}: data of {p:#x} lost");
        }
    }
    assert!(
        ok_accept(
            accept(h, ELSEWHERE, PageLevel::Size2M)
                .unwrap_or_else(|e| panic!("{what}: the TD cannot accept other memory: {e:?}"))
        ),
        "{what}: accept elsewhere"
    );
    write(h, ELSEWHERE + K4, 42).expect("write elsewhere");
    assert_eq!(read(h, ELSEWHERE + K4), Some(42), "{what}: elsewhere");
    poisoned
}

// ---- transparent faults --------------------------------------------------------------------

#[test]
fn busy_and_interrupted_at_every_call_of_every_flow_are_transparent() {
    let mut injected = 0u64;
    for flow in flows() {
        let (want, _) = baseline(&flow);
        for (kind, n) in calls_in_run(&flow) {
            for skip in 0..n {
                for result in [FaultResult::Busy, FaultResult::InterruptedRestartable] {
                    let what = format!("{}: {result:?} on {kind:?} call #{skip}", flow.name);
                    let h = host();
                    let mut t = Tokens::new();
                    (flow.setup)(&h, &mut t);
                    h.module().inject(FaultRule {
                        call: kind,
                        gpa: None,
                        skip,
                        count: 1,
                        result,
                    });
                    (flow.run)(&h, &mut t).unwrap_or_else(|e| panic!("{what}: {e}"));
                    assert_eq!(h.module().stats().injected, 1, "{what}: rule fired");
                    assert_eq!(observe(&h, flow.watch, &t), want, "{what}");
                    h.module().check_tree().expect("tree");
                    injected += 1;
                }
            }
        }
    }
    assert!(injected > 50, "only {injected} injections");
}

#[test]
fn a_demote_interrupted_by_a_host_interrupt_is_restarted() {
    for flow in flows()
        .iter()
        .filter(|f| f.name.contains("hole") || f.name == "#VE split")
    {
        let (want, _) = baseline(flow);
        let h = host();
        let mut t = Tokens::new();
        (flow.setup)(&h, &mut t);
        h.module().set_host_interrupt_pending(true);
        (flow.run)(&h, &mut t).expect(flow.name);
        assert_eq!(observe(&h, flow.watch, &t), want, "{}", flow.name);
    }
}

// ---- allocation failures before the point of no return -------------------------------------

#[test]
fn sept_pool_failure_in_a_conversion_answers_retry_and_changes_nothing() {
    let (want, _) = baseline(&flows()[3]);
    let h = host();
    let mut t = Tokens::new();
    setup_2m_with_data(&h, &mut t);
    let before = h.model().expect("the guest_memfd model").snapshot();
    h.mmu().sept_pool().fail_next(1);
    assert_eq!(
        map_gpa_once(&h, SHARED | (9 * K4), K4),
        (GhciStatus::Retry, SHARED | (9 * K4))
    );
    assert_eq!(h.model().expect("the guest_memfd model").snapshot(), before);
    assert_eq!(leaf(&h, 9 * K4), (1, SeptState::Mapped));
    run_to_shared(&h, &mut t).expect("the retry succeeds");
    assert_eq!(observe(&h, WATCH_2M, &t), want);
    check_td(&h, &t, "sept pool");
}

#[test]
fn sept_pool_failure_in_the_fault_path_is_reported_and_the_retry_maps() {
    for flow in flows().iter().take(3) {
        let (want, _) = baseline(flow);
        for n in 0..3 {
            let what = format!("{}: S-EPT page allocation #{n} fails", flow.name);
            let h = host();
            let mut t = Tokens::new();
            (flow.setup)(&h, &mut t);
            // Fail the n-th allocation: let n through by allocating and freeing them.
            let pool = h.mmu().sept_pool();
            let held: Vec<u64> = (0..n).map_while(|_| pool.alloc()).collect();
            for p in held.iter().rev() {
                pool.free(*p);
            }
            pool.fail_next(1);
            if let Err(e) = (flow.run)(&h, &mut t) {
                assert!(
                    e.contains("NoSeptPage"),
                    "{what}: unexpected failure {e} (the only allowed one is NoSeptPage)"
                );
                (flow.run)(&h, &mut t).unwrap_or_else(|e| panic!("{what}: retry: {e}"));
            }
            assert_eq!(observe(&h, flow.watch, &t).leaves, want.leaves, "{what}");
            check_td(&h, &t, &what);
        }
    }
}

#[test]
fn folio_pool_failure_in_the_fault_path_maps_nothing_and_the_retry_succeeds() {
    for flow in flows().iter().take(3) {
        let (want, _) = baseline(flow);
        let h = host();
        let mut t = Tokens::new();
        (flow.setup)(&h, &mut t);
        let before = h.model().expect("the guest_memfd model").snapshot();
        h.model()
            .expect("the guest_memfd model")
            .pool_mut()
            .injector_mut()
            .fail_nth(0);
        let e = (flow.run)(&h, &mut t).expect_err(flow.name);
        assert!(e.contains("NoMemory"), "{}: {e}", flow.name);
        let mut after = h.model().expect("the guest_memfd model").snapshot();
        // The failed allocation is counted, not kept.
        after.pool = before.pool.clone();
        assert_eq!(after, before, "{}", flow.name);
        for &p in flow.watch {
            assert_eq!(leaf(&h, p).1, SeptState::Free, "{}: {p:#x}", flow.name);
        }
        (flow.run)(&h, &mut t).unwrap_or_else(|e| panic!("{}: retry: {e}", flow.name));
        assert_eq!(observe(&h, flow.watch, &t), want, "{}", flow.name);
    }
}

#[test]
fn node_allocation_failure_in_map_gpa_answers_retry_and_changes_nothing() {
    for (i, flow) in flows().iter().enumerate().skip(3).take(1) {
        let (want, _) = baseline(flow);
        // Attempts the conversion makes.
        let attempts = {
            let h = host();
            let mut t = Tokens::new();
            (flow.setup)(&h, &mut t);
            let a = h
                .model()
                .expect("the guest_memfd model")
                .node_injector()
                .attempts();
            (flow.run)(&h, &mut t).expect("run");
            let b = h
                .model()
                .expect("the guest_memfd model")
                .node_injector()
                .attempts();
            b - a
        };
        assert!(attempts > 0, "{}: the conversion allocates", flow.name);
        for n in 0..attempts {
            let h = host();
            let mut t = Tokens::new();
            (flow.setup)(&h, &mut t);
            let before = h.model().expect("the guest_memfd model").snapshot();
            h.model()
                .expect("the guest_memfd model")
                .node_injector_mut()
                .fail_nth(n);
            let (start, len) = if i == 3 {
                (SHARED | (9 * K4), K4)
            } else {
                (9 * K4, K4)
            };
            assert_eq!(
                map_gpa_once(&h, start, len),
                (GhciStatus::Retry, start),
                "{}: node #{n}",
                flow.name
            );
            assert_eq!(
                h.model().expect("the guest_memfd model").snapshot(),
                before,
                "{}: node #{n}",
                flow.name
            );
            (flow.run)(&h, &mut t).unwrap_or_else(|e| panic!("{}: retry: {e}", flow.name));
            assert_eq!(observe(&h, flow.watch, &t), want, "{}", flow.name);
        }
    }
}

#[test]
fn node_allocation_failure_to_private_answers_retry_and_changes_nothing() {
    // A private run inside a shared 2M range needs range-map nodes.
    let setup = |h: &Host| map(h, SHARED | M2, M2).expect("shared");
    let run = |h: &Host| -> Result<(), String> {
        map(h, M2 + 8 * K4, 2 * K4)?;
        step("accept", accept(h, M2 + 8 * K4, PageLevel::Size4K))?;
        step("accept", accept(h, M2 + 9 * K4, PageLevel::Size4K))
    };
    let want = {
        let h = host();
        setup(&h);
        run(&h).expect("baseline");
        observe(
            &h,
            &[M2, M2 + 8 * K4, M2 + 9 * K4, M2 + 10 * K4],
            &Tokens::new(),
        )
    };
    let attempts = {
        let h = host();
        setup(&h);
        let a = h
            .model()
            .expect("the guest_memfd model")
            .node_injector()
            .attempts();
        run(&h).expect("run");
        let b = h
            .model()
            .expect("the guest_memfd model")
            .node_injector()
            .attempts();
        b - a
    };
    assert!(attempts > 0);
    for n in 0..attempts {
        let h = host();
        setup(&h);
        let before = h.model().expect("the guest_memfd model").snapshot();
        h.model()
            .expect("the guest_memfd model")
            .node_injector_mut()
            .fail_nth(n);
        assert_eq!(
            map_gpa_once(&h, M2 + 8 * K4, 2 * K4),
            (GhciStatus::Retry, M2 + 8 * K4)
        );
        assert_eq!(h.model().expect("the guest_memfd model").snapshot(), before);
        run(&h).expect("retry");
        let got = observe(
            &h,
            &[M2, M2 + 8 * K4, M2 + 9 * K4, M2 + 10 * K4],
            &Tokens::new(),
        );
        assert_eq!(got, want, "node #{n}");
    }
}

#[test]
fn sept_pool_failure_in_a_hole_punch_changes_nothing() {
    let h = host();
    let mut t = Tokens::new();
    setup_punch(&h, &mut t);
    let before = h.model().expect("the guest_memfd model").snapshot();
    h.mmu().sept_pool().fail_next(1);
    assert!(punch(&h, 9 * K4, 10 * K4).is_err());
    assert_eq!(h.model().expect("the guest_memfd model").snapshot(), before);
    run_punch(&h, &mut t).expect("retry");
    check_td(&h, &t, "punch");
}

// ---- hard failures -------------------------------------------------------------------------

/// One hard failure: returns whether the run saw it, and the error pages it left.
fn hard_run(flow: &Flow, kind: CallKind, skip: u64, status: TdxStatus) -> (bool, u64) {
    let what = format!(
        "{}: {kind:?} call #{skip} fails with {:#x}",
        flow.name,
        status.raw()
    );
    let h = host();
    let mut t = Tokens::new();
    (flow.setup)(&h, &mut t);
    h.module().inject(FaultRule {
        call: kind,
        gpa: None,
        skip,
        count: 1,
        result: FaultResult::Status(status),
    });
    let first = (flow.run)(&h, &mut t);
    h.module().clear_faults();
    h.module()
        .check_tree()
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    let poisoned = h.gmem().poisoned_pages();
    // Re-drive the flow; pages that became error pages may keep it from completing.
    let second = (flow.run)(&h, &mut t);
    if let Err(e) = &second {
        assert!(
            poisoned > 0 || h.gmem().poisoned_pages() > 0,
            "{what}: the flow cannot complete after the fault, and nothing was poisoned: {e}"
        );
    }
    check_td(&h, &t, &what);
    let poisoned = h.gmem().poisoned_pages();
    (first.is_err(), poisoned)
}

/// Sweeps every hard failure of the flow but those of `skip_kinds`.
fn hard_sweep(flow: &Flow, skip_kinds: &[CallKind]) {
    for (kind, n) in calls_in_run(flow) {
        if !HARD_KINDS.contains(&kind) || skip_kinds.contains(&kind) {
            continue;
        }
        for skip in 0..n {
            for status in hard_statuses() {
                let (failed, poisoned) = hard_run(flow, kind, skip, status);
                eprintln!(
                    "{}: {kind:?} #{skip} {:#x}: guest-visible failure {failed}, error pages {poisoned}",
                    flow.name,
                    status.raw()
                );
            }
        }
    }
}

#[test]
fn hard_failures_in_the_accept_fault_paths() {
    for flow in flows().iter().take(2) {
        hard_sweep(flow, &[]);
    }
}

/// Regression (fault-path split): a TRACK or DEMOTE that fails after the BLOCK used to leave
/// the 2M leaf PENDING_BLOCKED, and the guest's retried ACCEPT exited forever. The MMU now
/// tracks again and unblocks, so the retry makes progress.
#[test]
fn hard_failures_in_the_ve_split_path() {
    hard_sweep(&flows()[2], &[]);
}

/// Regressions (zap path): a BLOCK that failed used to leave its leaf MAPPED while its pages
/// became error pages (the MMU now tries again and, failing that, stops the TD rather than
/// leave an error page reachable); and a huge leaf spanning both edges of the range used to be
/// handled once per edge, so a failed split at the first edge was undone by a successful one
/// at the second, leaving 511 error pages mapped (each straddling leaf is now handled once and
/// a failed split leaves it blocked).
#[test]
fn hard_failures_in_private_to_shared_leave_no_error_page_mapped() {
    hard_sweep(&flows()[3], &[]);
}

/// Regression (merge): a TRACK that failed after the BLOCK of a split 2M range used to leave it
/// NL_BLOCKED (2 MiB of guest data unreachable). The MMU now tracks again and unblocks.
#[test]
fn hard_failures_in_shared_to_private_and_merge() {
    hard_sweep(&flows()[4], &[]);
}

/// Block-first conversions BLOCK before the point of no return: a failed BLOCK aborts the
/// conversion (RETRY, nothing changed) instead of reaching the point of no return.
#[test]
fn block_first_a_failed_block_answers_retry_and_changes_nothing() {
    BLOCK_FIRST.with(|b| b.set(true));
    let h = host();
    let mut t = Tokens::new();
    setup_2m_with_data(&h, &mut t);
    let before = h.model().expect("the guest_memfd model").snapshot();
    h.module().inject(FaultRule::once(
        CallKind::RangeBlock,
        FaultResult::Status(StatusCode::OperandInvalid.with_operand(operand::RCX)),
    ));
    assert_eq!(
        map_gpa_once(&h, SHARED | (9 * K4), K4),
        (GhciStatus::Retry, SHARED | (9 * K4))
    );
    assert_eq!(h.model().expect("the guest_memfd model").snapshot(), before);
    assert_eq!(leaf(&h, 9 * K4), (1, SeptState::Mapped));
    run_to_shared(&h, &mut t).expect("the retry succeeds");
    assert_eq!(h.gmem().poisoned_pages(), 0);
    check_td(&h, &t, "block first");
}

/// Block-first mode under every hard failure of the private -> shared flow.
#[test]
fn block_first_hard_failures_in_private_to_shared() {
    BLOCK_FIRST.with(|b| b.set(true));
    hard_sweep(&flows()[3], &[]);
}

#[test]
fn a_refused_promote_keeps_the_data_and_a_later_pass_merges() {
    let h = host();
    let mut t = Tokens::new();
    setup_hole(&h, &mut t);
    h.module().inject(FaultRule::once(
        CallKind::PagePromote,
        FaultResult::Status(StatusCode::EptInvalidPromoteConditions.status()),
    ));
    run_to_private_merge(&h, &mut t).expect("run");
    assert_eq!(leaf(&h, 0).0, 0, "still split");
    assert_eq!(h.mmu().stats().promote_refused, 1);
    check_td(&h, &t, "refused promote");
    assert_eq!(h.merge_pass(), 1);
    assert_eq!(leaf(&h, 0), (1, SeptState::Mapped));
    check_td(&h, &t, "merged later");
}

#[test]
fn a_failed_remove_poisons_exactly_the_converted_page() {
    let h = host();
    let mut t = Tokens::new();
    setup_2m_with_data(&h, &mut t);
    h.module().inject(FaultRule::once(
        CallKind::PageRemove,
        FaultResult::Status(StatusCode::OperandInvalid.with_operand(operand::RCX)),
    ));
    run_to_shared(&h, &mut t)
        .expect("MapGPA succeeds: the failure is after the point of no return");
    assert_eq!(h.gmem().poisoned_pages(), 1);
    assert!(h.gmem().is_poisoned(Gpa::new_truncate(9 * K4)));
    // Converted back, the error page is never mapped again; its neighbours keep their data.
    map(&h, 9 * K4, K4).expect("to private");
    assert_eq!(
        accept(&h, 9 * K4, PageLevel::Size4K),
        Err(GuestError::Host(ExitAction::Fatal(FaultError::Backing(
            BackingError::Poisoned
        ))))
    );
    assert_eq!(h.mmu().stats().maps[0], 0);
    check_td(&h, &t, "remove");
}

#[test]
fn a_failed_zap_demote_poisons_the_leaf_and_the_td_keeps_running() {
    let h = host();
    let mut t = Tokens::new();
    setup_2m_with_data(&h, &mut t);
    h.module().inject(FaultRule::once(
        CallKind::PageDemote,
        FaultResult::Status(StatusCode::OperandInvalid.with_operand(operand::RCX)),
    ));
    run_to_shared(&h, &mut t).expect("MapGPA succeeds");
    assert_eq!(h.gmem().poisoned_pages(), 512);
    assert_eq!(h.mmu().stats().poisoned_leaves, 1);
    let n = check_td(&h, &t, "demote");
    assert_eq!(n, 512);
}

/// Regression (fault-path split, DEMOTE case): the guest's 4K ACCEPT after a failed DEMOTE
/// makes progress (the leaf holds no data yet).
#[test]
fn a_failed_fault_path_demote_lets_the_guest_retry() {
    let h = host();
    assert!(matches!(
        touch(&h, 3 * K4, hostvmm::module::Access::Read),
        Ok(Touch::Ve(_))
    ));
    drive::ve_info(&h).expect("VE info");
    h.module().inject(FaultRule::once(
        CallKind::PageDemote,
        FaultResult::Status(StatusCode::OperandInvalid.with_operand(operand::RCX)),
    ));
    assert!(matches!(
        accept(&h, 3 * K4, PageLevel::Size4K),
        Err(GuestError::Host(ExitAction::Fatal(_)))
    ));
    // The split was undone: the leaf is PENDING again, not left blocked.
    assert_eq!(leaf(&h, 3 * K4), (1, SeptState::Pending));
    // The VMM resumes the vCPU; the guest re-executes its ACCEPT.
    assert_eq!(
        accept(&h, 3 * K4, PageLevel::Size4K),
        Ok(TdxStatus::SUCCESS),
        "the guest cannot make progress"
    );
}
