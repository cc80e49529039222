//! Property tests of the TDX-module emulator: random sequences of host and guest calls never
//! reach a state `docs/tdx-module-memory.md` forbids. After every call the tree invariants
//! hold, and the outcome is checked against an oracle built only from the public API:
//! - PROMOTE succeeds only over 512 uniform children (all MAPPED or all PENDING, contiguous,
//!   aligned HPAs) of a blocked and tracked entry;
//! - REMOVE, DEMOTE, PROMOTE and SEPT.REMOVE succeed while running only on a blocked and
//!   tracked entry;
//! - a page's content (by HPA) changes only through a guest write to it or an ACCEPT of it
//!   (which zeroes); DEMOTE/PROMOTE/BLOCK/REMOVE never change content;
//! - a guest access completes only on a MAPPED page, and reads what was last written.

mod module_support;

use std::collections::HashMap;

use accept::abi::{page_info, PageLevel, StatusCode, TdxStatus};
use hostvmm::module::{
    Access, AccessOutcome, EntryInfo, ModuleConfig, SeptState, TdcallOutcome, TdxModule,
};
use module_support::{gpa, size, Td, K4, M2};
use proptest::prelude::*;

const REGIONS: u64 = 2;
const PAGES: [u64; 5] = [0, 1, 2, 3, 511];

fn region_gpa(r: u8) -> u64 {
    u64::from(r) * size(1)
}

fn base(r: u8) -> u64 {
    0x1_0000_0000 + u64::from(r) * 0x100_0000
}

/// HPA for an AUG: variant 0 is contiguous and aligned (promotable), 1 is not.
fn hpa_for(r: u8, page: Option<u16>, variant: bool) -> u64 {
    match (page, variant) {
        (None, false) => base(r),
        (None, true) => base(r) + 0x20_0000,
        (Some(p), false) => base(r) + u64::from(p) * 0x1000,
        (Some(p), true) => base(r) + 0x40_0000 + u64::from(p) * 0x2000,
    }
}

#[derive(Debug, Clone)]
enum Op {
    SeptAdd {
        r: u8,
    },
    /// AUG every 4K page of the region on contiguous HPAs, optionally ACCEPT them all.
    Fill {
        r: u8,
        accept: bool,
    },
    /// BLOCK, TRACK and kick every vCPU.
    Zap {
        r: u8,
        page: Option<u16>,
    },
    Aug {
        r: u8,
        page: Option<u16>,
        variant: bool,
    },
    Block {
        r: u8,
        page: Option<u16>,
    },
    Unblock {
        r: u8,
        page: Option<u16>,
    },
    Remove {
        r: u8,
        page: Option<u16>,
    },
    Track,
    Kick {
        v: usize,
    },
    Enter {
        v: usize,
    },
    Demote {
        r: u8,
    },
    Promote {
        r: u8,
    },
    SeptRemove {
        r: u8,
    },
    Accept {
        v: usize,
        r: u8,
        page: Option<u16>,
    },
    Access {
        v: usize,
        r: u8,
        page: u16,
        write: Option<u64>,
    },
    VeInfo {
        v: usize,
    },
    Interrupt {
        v: usize,
    },
}

fn page_strategy() -> impl Strategy<Value = Option<u16>> {
    prop_oneof![
        2 => Just(None),
        3 => prop::sample::select(vec![0u16, 1, 2, 3, 511]).prop_map(Some),
    ]
}

fn op_strategy() -> impl Strategy<Value = Op> {
    let r = 0..REGIONS as u8;
    let v = 0usize..2;
    prop_oneof![
        2 => r.clone().prop_map(|r| Op::SeptAdd { r }),
        1 => (r.clone(), any::<bool>()).prop_map(|(r, accept)| Op::Fill { r, accept }),
        3 => (r.clone(), page_strategy()).prop_map(|(r, page)| Op::Zap { r, page }),
        4 => (r.clone(), page_strategy(), any::<bool>())
            .prop_map(|(r, page, variant)| Op::Aug { r, page, variant }),
        3 => (r.clone(), page_strategy()).prop_map(|(r, page)| Op::Block { r, page }),
        1 => (r.clone(), page_strategy()).prop_map(|(r, page)| Op::Unblock { r, page }),
        2 => (r.clone(), page_strategy()).prop_map(|(r, page)| Op::Remove { r, page }),
        2 => Just(Op::Track),
        2 => v.clone().prop_map(|v| Op::Kick { v }),
        2 => v.clone().prop_map(|v| Op::Enter { v }),
        2 => r.clone().prop_map(|r| Op::Demote { r }),
        2 => r.clone().prop_map(|r| Op::Promote { r }),
        1 => r.clone().prop_map(|r| Op::SeptRemove { r }),
        4 => (v.clone(), r.clone(), page_strategy())
            .prop_map(|(v, r, page)| Op::Accept { v, r, page }),
        4 => (v.clone(), r.clone(), prop::sample::select(vec![0u16, 1, 2, 3, 511]),
              prop::option::of(1u64..1000))
            .prop_map(|(v, r, page, write)| Op::Access { v, r, page, write }),
        1 => v.clone().prop_map(|v| Op::VeInfo { v }),
        1 => v.prop_map(|v| Op::Interrupt { v }),
    ]
}

fn addr_level(r: u8, page: Option<u16>) -> (u64, PageLevel) {
    match page {
        None => (region_gpa(r), M2),
        Some(p) => (region_gpa(r) + u64::from(p) * 0x1000, K4),
    }
}

/// Per tracked 4K page: the leaf that maps it (or None) and the content at its HPA.
type Snapshot = HashMap<u64, (Option<EntryInfo>, u64)>;

fn snapshot(m: &TdxModule) -> Snapshot {
    let mut s = HashMap::new();
    for r in 0..REGIONS as u8 {
        for p in PAGES {
            let g = region_gpa(r) + p * 0x1000;
            let e = m.leaf(gpa(g));
            let v = if e.state.is_leaf() {
                (Some(e), m.read_content(e.page_hpa(g)))
            } else {
                (None, 0)
            };
            s.insert(g, v);
        }
    }
    s
}

struct Oracle {
    bepoch: HashMap<(u64, u8), u64>,
}

impl Oracle {
    fn tracked(&self, m: &TdxModule, addr: u64, level: u8) -> bool {
        let Some(&b) = self.bepoch.get(&(addr, level)) else {
            return false;
        };
        let epoch = m.td_epoch();
        let rc = m.epoch_refcounts();
        b + 1 < epoch || (b + 1 == epoch && rc[(b & 1) as usize] == 0)
    }
}

fn uniform_children(m: &TdxModule, addr: u64) -> bool {
    let first = m.walk(gpa(addr), 0);
    if first.level != 0
        || !matches!(first.state, SeptState::Mapped | SeptState::Pending)
        || first.hpa % size(1) != 0
    {
        return false;
    }
    (0..512u64).all(|i| {
        let e = m.walk(gpa(addr + i * 0x1000), 0);
        e.level == 0 && e.state == first.state && e.hpa == first.hpa + i * 0x1000
    })
}

fn run(ops: &[Op], pending_ve: bool) -> Result<(), TestCaseError> {
    let td = Td::with(ModuleConfig {
        vcpus: 2,
        pending_ve,
        accept_slice_chunks: 128,
        ..ModuleConfig::default()
    });
    let m = &td.m;
    // Stale host data in every page the host may hand out: ACCEPT must zero it.
    for r in 0..REGIONS as u8 {
        for h in [base(r), base(r) + 0x20_0000, base(r) + 0x40_0000] {
            for p in 0..8u64 {
                m.write_content(h + p * 0x1000, 0xDEAD_0000 + p);
            }
        }
        for p in PAGES {
            m.write_content(base(r) + p * 0x1000, 0xBEEF_0000 + p);
        }
    }
    for r in 0..REGIONS as u8 {
        td.path(region_gpa(r), 1);
    }
    let mut oracle = Oracle {
        bepoch: HashMap::new(),
    };
    for op in ops {
        let before = snapshot(m);
        let epoch_before = m.td_epoch();
        let mut written: Option<(u64, u64)> = None;
        let mut accepted: Option<(u64, PageLevel)> = None;
        let mut accepted_pages: Vec<u64> = Vec::new();
        match op.clone() {
            Op::SeptAdd { r } => {
                let _ = m.sept_add(gpa(region_gpa(r)), 1, td.sept_page());
            }
            Op::Fill { r, accept } => {
                for p in 0..512u64 {
                    let a = region_gpa(r) + p * 0x1000;
                    let _ = m.page_aug(gpa(a), K4, base(r) + p * 0x1000);
                    if accept {
                        if !m.vcpu_in_td(0) {
                            let _ = m.vcpu_enter(0);
                        }
                        if let Ok(TdcallOutcome::Completed(s)) =
                            m.tdg_mem_page_accept(0, page_info(gpa(a), K4))
                        {
                            if s.is_success() && PAGES.contains(&p) {
                                accepted_pages.push(a);
                            }
                        }
                    }
                }
            }
            Op::Zap { r, page } => {
                let (a, l) = addr_level(r, page);
                if m.range_block(gpa(a), l).status.is_success() {
                    oracle.bepoch.insert((a, l.index()), epoch_before);
                }
                let _ = m.mem_track();
                for v in 0..2 {
                    if m.vcpu_exit(v).is_ok() {
                        let _ = m.vcpu_enter(v);
                    }
                }
            }
            Op::Aug { r, page, variant } => {
                let (a, l) = addr_level(r, page);
                let _ = m.page_aug(gpa(a), l, hpa_for(r, page, variant));
            }
            Op::Block { r, page } => {
                let (a, l) = addr_level(r, page);
                if m.range_block(gpa(a), l).status.is_success() {
                    oracle.bepoch.insert((a, l.index()), epoch_before);
                }
            }
            Op::Unblock { r, page } => {
                let (a, l) = addr_level(r, page);
                let tracked = oracle.tracked(m, a, l.index());
                let res = m.range_unblock(gpa(a), l);
                if res.status.is_success() {
                    prop_assert!(tracked, "UNBLOCK succeeded untracked: {op:?}");
                }
            }
            Op::Remove { r, page } => {
                let (a, l) = addr_level(r, page);
                let e = m.walk(gpa(a), l.index());
                let tracked = oracle.tracked(m, a, l.index());
                let res = m.page_remove(gpa(a), l);
                if res.status.is_success() {
                    prop_assert!(
                        e.level == l.index() && e.state.is_leaf() && e.state.is_blocked(),
                        "REMOVE of a non-blocked entry succeeded: {e:?}"
                    );
                    prop_assert!(tracked, "REMOVE succeeded without tracking");
                    prop_assert_eq!(res.rcx, e.hpa);
                }
            }
            Op::Track => {
                let _ = m.mem_track();
            }
            Op::Kick { v } => {
                if m.vcpu_exit(v).is_ok() {
                    let _ = m.vcpu_enter(v);
                }
            }
            Op::Enter { v } => {
                let _ = m.vcpu_enter(v);
            }
            Op::Demote { r } => {
                let a = region_gpa(r);
                let e = m.walk(gpa(a), 1);
                let tracked = oracle.tracked(m, a, 1);
                let res = m.page_demote(gpa(a), M2, td.sept_page());
                if res.status.is_success() {
                    prop_assert!(
                        e.level == 1 && e.state.is_leaf() && e.state.is_blocked() && tracked,
                        "DEMOTE of {e:?} succeeded (tracked {tracked})"
                    );
                }
            }
            Op::Promote { r } => {
                let a = region_gpa(r);
                let e = m.walk(gpa(a), 1);
                let uniform = uniform_children(m, a);
                let tracked = oracle.tracked(m, a, 1);
                let res = m.page_promote(gpa(a), M2);
                if res.status.is_success() {
                    prop_assert!(uniform, "PROMOTE over mixed children succeeded");
                    prop_assert!(
                        e.state == SeptState::NlBlocked && tracked,
                        "PROMOTE of {e:?} succeeded (tracked {tracked})"
                    );
                } else if e.state == SeptState::NlBlocked && tracked && uniform {
                    prop_assert!(false, "PROMOTE refused a valid merge: {:?}", res.status);
                }
            }
            Op::SeptRemove { r } => {
                let a = region_gpa(r);
                let e = m.walk(gpa(a), 1);
                let tracked = oracle.tracked(m, a, 1);
                if m.sept_remove(gpa(a), 1).status.is_success() {
                    prop_assert!(e.state == SeptState::NlBlocked && tracked);
                }
            }
            Op::Accept { v, r, page } => {
                let (a, l) = addr_level(r, page);
                let e = m.walk(gpa(a), l.index());
                if let Ok(out) = m.tdg_mem_page_accept(v, page_info(gpa(a), l)) {
                    match out {
                        TdcallOutcome::Completed(s) if s == TdxStatus::SUCCESS => {
                            prop_assert!(
                                e.level == l.index() && e.state == SeptState::Pending,
                                "ACCEPT succeeded on {e:?}"
                            );
                            accepted = Some((a, l));
                        }
                        TdcallOutcome::Completed(s) if s.is(StatusCode::PageAlreadyAccepted) => {
                            prop_assert_eq!(e.state, SeptState::Mapped);
                        }
                        TdcallOutcome::Interrupted => accepted = Some((a, l)),
                        _ => {}
                    }
                }
            }
            Op::Access { v, r, page, write } => {
                let g = region_gpa(r) + u64::from(page) * 0x1000;
                let e = m.leaf(gpa(g));
                let access = write.map_or(Access::Read, Access::Write);
                if let Ok(AccessOutcome::Ok(t)) = m.guest_access(v, g, access) {
                    prop_assert_eq!(e.state, SeptState::Mapped, "access completed on {:?}", e);
                    if write.is_none() {
                        prop_assert_eq!(t, before[&g].1, "read a stale token");
                    } else {
                        written = Some((g, t));
                    }
                }
            }
            Op::VeInfo { v } => {
                let _ = m.tdg_vp_veinfo_get(v);
            }
            Op::Interrupt { v } => m.set_pending_interrupt(v, true),
        }
        m.check_tree()
            .map_err(|e| TestCaseError::fail(format!("{e} after {op:?}")))?;
        // Content rules, per tracked page.
        let after = snapshot(m);
        for (g, (eb, cb)) in &before {
            let Some(eb) = eb else { continue };
            let hpa = eb.page_hpa(*g);
            let now = m.read_content(hpa);
            let in_accept = accepted.is_some_and(|(a, l)| *g >= a && *g < a + l.size())
                || accepted_pages.contains(g);
            if written.is_some_and(|(w, _)| w == *g) {
                prop_assert_eq!(now, written.map_or(0, |(_, t)| t));
            } else if in_accept && eb.state == SeptState::Pending {
                prop_assert!(
                    now == *cb || now == 0,
                    "ACCEPT wrote neither zero nor nothing"
                );
                if let (Some(ea), _) = &after[g] {
                    if ea.state == SeptState::Mapped {
                        prop_assert_eq!(now, 0, "ACCEPT did not zero {:#x}", g);
                    }
                }
            } else {
                prop_assert_eq!(now, *cb, "content of {:#x} changed by {:?}", g, op);
            }
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn random_call_sequences_respect_the_spec(
        ops in prop::collection::vec(op_strategy(), 1..80),
        pending_ve in any::<bool>(),
    ) {
        run(&ops, pending_ve)?;
    }
}

/// The full split/merge cycle the private MMU relies on, as a fixed sequence: contents follow
/// the HPA through DEMOTE and PROMOTE.
#[test]
fn demote_then_promote_preserves_contents() {
    let td = Td::runnable();
    let m = &td.m;
    td.mapped(0, M2, base(0));
    for p in 0..512u64 {
        let _ = m.guest_access(0, p * 0x1000, Access::Write(p + 1));
    }
    td.block_track(0, M2);
    assert!(m
        .page_demote(gpa(0), M2, td.sept_page())
        .status
        .is_success());
    td.block_track(0, M2);
    assert!(m.page_promote(gpa(0), M2).status.is_success());
    for p in 0..512u64 {
        assert_eq!(
            m.guest_access(0, p * 0x1000, Access::Read),
            Ok(AccessOutcome::Ok(p + 1))
        );
    }
}

/// A host thread AUGs while a vCPU thread ACCEPTs the same pages: losers see BUSY or an exit
/// and retry; every page ends MAPPED and zeroed exactly once.
#[test]
fn concurrent_aug_and_accept_converge() {
    let td = Td::runnable();
    td.path(0, 0);
    let m = &td.m;
    std::thread::scope(|s| {
        s.spawn(|| {
            for p in 0..512u64 {
                loop {
                    let r = m.page_aug(gpa(p * 0x1000), K4, base(0) + p * 0x1000);
                    if !r.status.is(StatusCode::OperandBusy) {
                        break;
                    }
                }
            }
        });
        s.spawn(|| {
            for p in 0..512u64 {
                loop {
                    if !m.vcpu_in_td(0) {
                        m.vcpu_enter(0).expect("enter");
                    }
                    match m.tdg_mem_page_accept(0, page_info(gpa(p * 0x1000), K4)) {
                        Ok(TdcallOutcome::Completed(s)) if s.is_success() => break,
                        Ok(_) => std::thread::yield_now(),
                        Err(e) => panic!("{e}"),
                    }
                }
            }
        });
    });
    for p in 0..512u64 {
        assert_eq!(
            m.entry(gpa(p * 0x1000), K4).map(|e| e.state),
            Some(SeptState::Mapped)
        );
    }
    assert_eq!(m.stats().zeroed_4k, 512);
    assert_eq!(m.check_tree(), Ok(()));
}

/// Retries a SEAMCALL while it is BUSY (tree lock, entry lock or host priority), kicking the
/// vCPUs while TLB tracking is not done, as a host VMM does.
fn retry(m: &TdxModule, call: impl Fn() -> hostvmm::module::SeamcallResult) -> TdxStatus {
    for _ in 0..1_000_000 {
        let r = call().status;
        if r.is(StatusCode::OperandBusy)
            || r.is(StatusCode::TlbTrackingNotDone)
            || r.is(StatusCode::PreviousTlbEpochBusy)
        {
            m.kick_all();
            std::thread::yield_now();
            continue;
        }
        return r;
    }
    panic!("a SEAMCALL stayed busy");
}

/// A host thread maps, blocks, tracks, removes and re-maps 2M pages while two vCPU threads
/// ACCEPT them, with a short host-priority timeout: shared and exclusive tree-lock holders,
/// entry locks and host priority (`tdx_locks.h`) interleave on real threads without deadlock,
/// every call ends in a status, no lock is left held and the tree stays well formed.
#[test]
fn host_and_guests_on_many_threads_never_deadlock() {
    let td = Td::with(ModuleConfig {
        vcpus: 2,
        ..ModuleConfig::default()
    });
    td.m.set_hp_lock_timeout(2);
    for r in 0..4u64 {
        td.path(r * size(1), 1);
    }
    let m = &td.m;
    let done = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        s.spawn(|| {
            for round in 0..60u64 {
                for r in 0..4u64 {
                    let g = gpa(r * size(1));
                    let hpa = base(0) + ((round * 4 + r) % 16) * size(1);
                    match m.walk(g, 1).state {
                        SeptState::Free => {
                            retry(m, || m.page_aug(g, M2, hpa));
                        }
                        SeptState::Mapped | SeptState::Pending => {
                            retry(m, || m.range_block(g, M2));
                            retry(m, || m.mem_track());
                            let st = retry(m, || m.page_remove(g, M2));
                            assert!(st.is_success(), "REMOVE: {st:?}");
                        }
                        other => panic!("unexpected state {other:?}"),
                    }
                }
            }
            done.store(true, std::sync::atomic::Ordering::Release);
        });
        for vcpu in 0..2usize {
            let done = &done;
            s.spawn(move || {
                let mut r = 0u64;
                while !done.load(std::sync::atomic::Ordering::Acquire) {
                    if !m.vcpu_in_td(vcpu) {
                        m.vcpu_enter(vcpu).expect("enter");
                    }
                    let info = page_info(gpa((r % 4) * size(1)), M2);
                    let _ = m.tdg_mem_page_accept(vcpu, info).expect("inside");
                    if m.vcpu_in_td(vcpu) {
                        m.vcpu_exit(vcpu).expect("exit");
                    }
                    r += 1;
                    std::thread::yield_now();
                }
            });
        }
    });
    assert_eq!(m.check_tree(), Ok(()));
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// A hostile host or guest can pass any register value: no call panics, every failure is a
    /// status, and the tree stays well formed.
    #[test]
    fn arbitrary_operands_never_panic(
        calls in prop::collection::vec((0u8..14, any::<u64>(), any::<u64>(), 0usize..3), 1..60),
    ) {
        let td = Td::runnable();
        let m = &td.m;
        td.path(0, 0);
        for (call, a, b, v) in calls {
            // Bias half of the operands towards the mapped region so that calls get past decoding.
            let info = if a & 1 == 0 { a & 0x3F_F007 } else { a };
            match call {
                0 => drop(m.page_add_raw(info, b, a)),
                1 => drop(m.sept_add_raw(info, b)),
                2 => drop(m.page_aug_raw(info, b & 0x3F_F000)),
                3 => drop(m.range_block_raw(info)),
                4 => drop(m.range_unblock_raw(info)),
                5 => drop(m.page_remove_raw(info)),
                6 => drop(m.page_demote_raw(info, b)),
                7 => drop(m.page_promote_raw(info)),
                8 => drop(m.sept_remove_raw(info)),
                9 => drop(m.mem_track()),
                10 => drop(m.tdg_mem_page_accept(v, info)),
                11 => drop(m.guest_access(v, a, Access::Write(b))),
                12 => drop(m.tdg_vp_vmcall(v, hostvmm::module::VmcallRegs { mask: b, gpr: [a; 16] })),
                _ => {
                    let _ = m.vcpu_enter(v);
                    let _ = m.tdg_vp_veinfo_get(v);
                }
            }
            m.check_tree().map_err(|e| TestCaseError::fail(e.to_string()))?;
        }
    }
}
