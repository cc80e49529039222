//! Private MMU flows against the module emulator, checking S-EPT states and SEAMCALL counts.

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::sync::Mutex;

use accept::abi::{page_info, GpaRange, StatusCode};

use super::*;
use crate::module::{
    Access, AccessOutcome, CallKind, CallOutcome, ExtExitQual, ModuleConfig, SeptState,
    TdcallOutcome,
};

const K4: u64 = 4096;
/// Guest memory is backed at HPA = GPA + this (contiguous, 1G aligned).
const HPA_BASE: u64 = 1 << 40;

/// Contiguous backing: 2M folios everywhere, minus the shared pages.
#[derive(Default)]
struct Backing {
    shared: Mutex<BTreeSet<u64>>,
    poisoned: Mutex<Vec<(u64, PageLevel)>>,
}

impl PrivateBacking for Backing {
    fn get_pfn(&self, gpa: Gpa) -> Result<Pfn, BackingError> {
        let shared = self.shared.lock().unwrap();
        if shared.contains(&gpa.as_u64()) {
            return Err(BackingError::Shared);
        }
        let base = gpa.align_down(PageLevel::Size2M).as_u64();
        let uniform = shared.range(base..base + M2).next().is_none();
        Ok(Pfn {
            hpa: HPA_BASE + gpa.as_u64(),
            max_level: if uniform {
                PageLevel::Size2M
            } else {
                PageLevel::Size4K
            },
        })
    }

    fn poison(&self, gpa: Gpa, level: PageLevel) {
        self.poisoned.lock().unwrap().push((gpa.as_u64(), level));
    }
}

struct Td {
    module: Arc<TdxModule>,
    backing: Arc<Backing>,
    mmu: PrivateMmu,
}

fn td(policy: MmuPolicy) -> Td {
    td_kicked_by(policy, Arc::new(YieldKicker))
}

fn td_kicked_by(policy: MmuPolicy, kicker: Arc<dyn Kicker>) -> Td {
    let module = Arc::new(
        TdxModule::new(ModuleConfig {
            vcpus: 2,
            ..ModuleConfig::default()
        })
        .unwrap(),
    );
    assert!(module.finalize().status.is_success());
    let backing = Arc::new(Backing::default());
    let mmu = PrivateMmu::new(
        module.clone(),
        backing.clone(),
        kicker,
        policy,
        SeptPagePool::new(1 << 44, 1 << 20),
    );
    Td {
        module,
        backing,
        mmu,
    }
}

fn g(a: u64) -> Gpa {
    Gpa::new_truncate(a)
}

impl Td {
    /// The guest's ACCEPT on vCPU 0, as a vCPU loop runs it: exits go to the MMU, the TDCALL
    /// re-executes; at most `max_exits` exits.
    fn accept(&self, gpa: u64, level: PageLevel, max_exits: u32) -> (TdxStatus, u32) {
        let mut exits = 0;
        loop {
            self.module.vcpu_enter(0).unwrap();
            let out = self
                .module
                .tdg_mem_page_accept(0, page_info(g(gpa), level))
                .unwrap();
            leave(&self.module, matches!(out, TdcallOutcome::Exit(_)));
            match out {
                TdcallOutcome::Completed(s) => return (s, exits),
                TdcallOutcome::Interrupted => {}
                TdcallOutcome::Exit(TdExit::EptViolation { gpa, ext, .. }) => {
                    exits += 1;
                    assert!(exits <= max_exits, "livelock: {exits} exits");
                    self.mmu.handle_ept_violation(gpa, ext).unwrap();
                }
                TdcallOutcome::Exit(other) => panic!("unexpected exit {other:?}"),
            }
        }
    }

    /// A guest access on vCPU 0 with exits handled; returns the final outcome (Ok or #VE).
    fn access(&self, gpa: u64, access: Access) -> AccessOutcome {
        for _ in 0..4 {
            self.module.vcpu_enter(0).unwrap();
            let out = self.module.guest_access(0, gpa, access).unwrap();
            leave(&self.module, matches!(out, AccessOutcome::Exit(_)));
            match out {
                AccessOutcome::Exit(TdExit::EptViolation { gpa, ext, .. }) => {
                    self.mmu.handle_ept_violation(gpa, ext).unwrap();
                }
                other => return other,
            }
        }
        panic!("access to {gpa:#x} never completed");
    }

    fn leaf(&self, gpa: u64) -> (u8, SeptState) {
        let e = self.module.leaf(g(gpa));
        (e.level, e.state)
    }

    fn seamcalls(&self, kind: CallKind) -> u64 {
        self.module
            .stats()
            .get(kind, CallOutcome::Status(StatusCode::Success))
    }
}

use crate::module::TdExit;

/// Leaves the TD after a guest step, unless the step already exited to the host.
fn leave(module: &TdxModule, exited: bool) {
    if !exited {
        module.vcpu_exit(0).unwrap();
    }
}

#[test]
fn accept_2m_on_free_memory_maps_2m_in_one_exit() {
    let t = td(MmuPolicy::OURS);
    let (s, exits) = t.accept(4 * M2, PageLevel::Size2M, 1);
    assert!(s.is_success());
    assert_eq!(exits, 1);
    assert_eq!(t.leaf(4 * M2 + K4), (1, SeptState::Mapped));
    // The 1G and 512G levels were added once each.
    assert_eq!(t.mmu.stats().sept_adds, 2);
    assert_eq!(t.mmu.stats().maps, [0, 1, 0]);
    assert_eq!(t.seamcalls(CallKind::PageAug), 1);
}

#[test]
fn mainline_4k_host_turns_a_2m_accept_into_512_exits() {
    let t = td(MmuPolicy::KVM_4K);
    let (s, exits) = t.accept(0, PageLevel::Size2M, 1);
    // The host mapped 4K: the module says PAGE_SIZE_MISMATCH and the guest must go 4K.
    assert!(s.is(StatusCode::PageSizeMismatch));
    assert_eq!(exits, 1);
    let mut total = 0;
    for i in 0..512 {
        let (s, exits) = t.accept(i * K4, PageLevel::Size4K, 1);
        assert!(s.is_success(), "{s:?}");
        total += exits;
    }
    // The first 4K page was mapped by the 2M request's exit.
    assert_eq!(total, 511);
    assert_eq!(t.mmu.stats().maps, [512, 0, 0]);
}

#[test]
fn ve_split_path_demotes_a_pending_2m_leaf_for_a_4k_accept() {
    let t = td(MmuPolicy::OURS);
    // The guest touches memory before accepting it: the host maps 2M PENDING, the guest
    // gets #VE.
    let out = t.access(M2 + 5 * K4, Access::Read);
    assert!(matches!(out, AccessOutcome::Ve(_)), "{out:?}");
    assert_eq!(t.leaf(M2), (1, SeptState::Pending));
    // A guest that accepts 4K from its #VE handler: ACCEPT exit, DEMOTE, ACCEPT again.
    t.module.vcpu_enter(0).unwrap();
    t.module.tdg_vp_veinfo_get(0).unwrap().unwrap();
    t.module.vcpu_exit(0).unwrap();
    let (s, exits) = t.accept(M2 + 5 * K4, PageLevel::Size4K, 1);
    assert!(s.is_success());
    assert_eq!(exits, 1);
    assert_eq!(t.leaf(M2 + 5 * K4), (0, SeptState::Mapped));
    assert_eq!(t.leaf(M2), (0, SeptState::Pending));
    assert_eq!(t.mmu.stats().fault_splits, 1);
    assert_eq!(t.seamcalls(CallKind::PageDemote), 1);
    // Once the guest accepts the other 511 pages, the merge pass restores the 2M leaf.
    for i in 0..512 {
        if i != 5 {
            let (s, exits) = t.accept(M2 + i * K4, PageLevel::Size4K, 0);
            assert!(s.is_success());
            assert_eq!(exits, 0);
        }
    }
    assert_eq!(t.mmu.merge_pass(), 1);
    assert_eq!(t.leaf(M2), (1, SeptState::Mapped));
    assert_eq!(
        t.mmu.sept_pool().in_use(),
        2,
        "the demoted S-EPT page came back"
    );
}

#[test]
fn ignoring_the_split_request_livelocks_the_guest() {
    let t = td(MmuPolicy {
        fault_split: FaultSplit::Ignore,
        ..MmuPolicy::OURS
    });
    t.access(0, Access::Read);
    for _ in 0..10 {
        t.module.vcpu_enter(0).unwrap();
        let out = t
            .module
            .tdg_mem_page_accept(0, page_info(g(0), PageLevel::Size4K))
            .unwrap();
        leave(&t.module, matches!(out, TdcallOutcome::Exit(_)));
        let TdcallOutcome::Exit(TdExit::EptViolation { gpa, ext, .. }) = out else {
            panic!("expected an exit, got {out:?}");
        };
        assert_eq!(
            t.mmu.handle_ept_violation(gpa, ext),
            Ok(FaultOutcome::Ignored)
        );
    }
    assert_eq!(t.mmu.stats().ignored_splits, 10);
}

#[test]
fn one_way_inhibit_maps_the_range_4k_forever() {
    let t = td(MmuPolicy::KVM_HUGEPAGE);
    t.access(0, Access::Read);
    let (s, exits) = t.accept(0, PageLevel::Size4K, 2);
    assert!(s.is_success());
    assert_eq!(exits, 2, "inhibit (zap), then a 4K map");
    assert_eq!(t.mmu.stats().inhibits, 1);
    // Every other page of the range now costs an exit, and a 2M accept is refused.
    let (s, _) = t.accept(0, PageLevel::Size2M, 1);
    assert!(s.is(StatusCode::PageSizeMismatch));
    let (s, exits) = t.accept(K4, PageLevel::Size4K, 1);
    assert!(s.is_success());
    assert_eq!(exits, 1);
}

#[test]
fn zap_of_a_4k_hole_demotes_once_and_keeps_the_rest() {
    let t = td(MmuPolicy::OURS);
    let (s, _) = t.accept(0, PageLevel::Size2M, 1);
    assert!(s.is_success());
    for i in 0..512u64 {
        assert_eq!(
            t.access(i * K4, Access::Write(1000 + i)),
            AccessOutcome::Ok(1000 + i)
        );
    }
    let hole = GpaRange::new(7 * K4, 8 * K4).unwrap();
    t.backing.shared.lock().unwrap().insert(7 * K4);
    let r = t.mmu.zap(hole);
    assert_eq!(
        r,
        ZapReport {
            removed: 1,
            demoted: 1,
            poisoned: Vec::new()
        }
    );
    assert_eq!(t.leaf(7 * K4), (0, SeptState::Free));
    assert_eq!(t.leaf(8 * K4), (0, SeptState::Mapped));
    // Content of the other pages survives the DEMOTE.
    assert_eq!(t.access(8 * K4, Access::Read), AccessOutcome::Ok(1008));
    assert_eq!(t.seamcalls(CallKind::PageDemote), 1);
    assert_eq!(t.seamcalls(CallKind::PageRemove), 1);

    // Back to private: the guest accepts 4K, the host maps 4K, the merge pass promotes.
    t.backing.shared.lock().unwrap().remove(&(7 * K4));
    t.mmu.note_private(hole);
    let (s, exits) = t.accept(7 * K4, PageLevel::Size4K, 1);
    assert!(s.is_success());
    assert_eq!(exits, 1);
    assert_eq!(t.mmu.merge_pass(), 1);
    assert_eq!(t.leaf(0), (1, SeptState::Mapped));
    assert_eq!(t.access(8 * K4, Access::Read), AccessOutcome::Ok(1008));
    assert_eq!(t.access(7 * K4, Access::Read), AccessOutcome::Ok(0));
    assert_eq!(t.mmu.stats().promotes, 1);
}

#[test]
fn merge_waits_until_every_child_is_accepted() {
    let t = td(MmuPolicy::OURS);
    t.accept(0, PageLevel::Size2M, 1);
    t.mmu.zap(GpaRange::new(0, K4).unwrap());
    t.mmu.note_private(GpaRange::new(0, K4).unwrap());
    // Mapped 4K PENDING by a plain access, not yet accepted: children are mixed.
    assert!(matches!(t.access(0, Access::Read), AccessOutcome::Ve(_)));
    assert_eq!(t.mmu.merge_pass(), 0);
    assert_eq!(t.mmu.merge_backlog(), 1);
    assert_eq!(t.leaf(K4), (0, SeptState::Mapped), "nothing left blocked");
    t.module.vcpu_enter(0).unwrap();
    t.module.tdg_vp_veinfo_get(0).unwrap().unwrap();
    t.module.vcpu_exit(0).unwrap();
    t.accept(0, PageLevel::Size4K, 0);
    assert_eq!(t.mmu.merge_pass(), 1);
    assert_eq!(t.mmu.merge_backlog(), 0);
}

#[test]
fn zap_of_whole_huge_leaves_removes_at_their_level() {
    let t = td(MmuPolicy::OURS);
    for i in 0..4 {
        t.accept(i * M2, PageLevel::Size2M, 1);
    }
    let r = t.mmu.zap(GpaRange::new(M2, 3 * M2).unwrap());
    assert_eq!(r.removed, 2);
    assert_eq!(r.demoted, 0);
    assert_eq!(t.mmu.stats().removes, [0, 2, 0]);
    assert_eq!(t.leaf(0), (1, SeptState::Mapped));
    assert_eq!(t.leaf(3 * M2), (1, SeptState::Mapped));
    assert_eq!(t.leaf(M2).1, SeptState::Free);
}

#[test]
fn a_remove_that_keeps_failing_becomes_error_pages() {
    use crate::module::{FaultResult, FaultRule};
    let t = td(MmuPolicy::OURS);
    t.accept(0, PageLevel::Size2M, 1);
    t.module.inject(FaultRule::once(
        CallKind::PageRemove,
        FaultResult::Status(StatusCode::EptEntryStateIncorrect.status()),
    ));
    let r = t.mmu.zap(GpaRange::new(0, M2).unwrap());
    assert_eq!(r.poisoned, [(g(0), PageLevel::Size2M)]);
    assert_eq!(t.mmu.stats().poisoned_leaves, 1);
}

#[test]
fn busy_answers_are_retried() {
    use crate::module::{FaultResult, FaultRule};
    let t = td(MmuPolicy::OURS);
    t.module.inject(FaultRule {
        count: 5,
        ..FaultRule::once(CallKind::PageAug, FaultResult::Busy)
    });
    let (s, exits) = t.accept(0, PageLevel::Size2M, 1);
    assert!(s.is_success());
    assert_eq!(exits, 1);
    assert_eq!(t.mmu.stats().busy_retries, 5);
}

#[test]
fn shared_and_out_of_range_gpas_are_not_private_faults() {
    let t = td(MmuPolicy::OURS);
    let shared = 1u64 << 47;
    assert_eq!(
        t.mmu.handle_ept_violation(shared | K4, ExtExitQual::NONE),
        Err(FaultError::NotPrivate(shared | K4))
    );
    assert_eq!(
        t.mmu.handle_ept_violation(1 << 50, ExtExitQual::NONE),
        Err(FaultError::NotPrivate(1 << 50))
    );
    t.backing.shared.lock().unwrap().insert(3 * K4);
    assert_eq!(
        t.mmu.handle_ept_violation(3 * K4, ExtExitQual::NONE),
        Err(FaultError::Backing(BackingError::Shared))
    );
}

/// Regression: a zap whose split failed gives the huge leaf up (its pages become error
/// pages); nothing may split it later, which would make the error pages reachable again. It is
/// removed whole instead, now or by a later zap or fault, so that it does not block its GPAs
/// forever (the soak found a guest looping on such a leaf after its folio was replaced).
#[test]
fn a_leaf_given_up_by_a_zap_is_removed_whole_never_split() {
    use crate::module::{FaultResult, FaultRule};
    let t = td(MmuPolicy::OURS);
    t.accept(0, PageLevel::Size2M, 1);
    // Both edges of [4K, 8K) fall in the 2M leaf: the first split fails, the second edge
    // must not split it.
    t.module.inject(FaultRule::once(
        CallKind::PageDemote,
        FaultResult::Status(StatusCode::OperandInvalid.with_operand(1)),
    ));
    let r = t.mmu.zap(GpaRange::new(K4, 2 * K4).unwrap());
    assert_eq!(r.demoted, 0);
    assert_eq!(r.poisoned, [(g(0), PageLevel::Size2M)]);
    assert_eq!(r.removed, 1, "removed whole at the second edge");
    assert_eq!(t.leaf(0).1, SeptState::Free);

    // Same, with the REMOVE failing too: the leaf stays blocked, and the next zap touching it
    // removes it without splitting it.
    t.accept(2 * M2, PageLevel::Size2M, 1);
    t.module.inject(FaultRule::once(
        CallKind::PageDemote,
        FaultResult::Status(StatusCode::OperandInvalid.with_operand(1)),
    ));
    t.module.inject(FaultRule::once(
        CallKind::PageRemove,
        FaultResult::Status(StatusCode::OperandInvalid.with_operand(1)),
    ));
    let r = t
        .mmu
        .zap(GpaRange::new(2 * M2 + K4, 2 * M2 + 2 * K4).unwrap());
    assert_eq!((r.demoted, r.removed), (0, 0));
    assert_eq!(t.leaf(2 * M2), (1, SeptState::Blocked));
    let r = t
        .mmu
        .zap(GpaRange::new(2 * M2 + 8 * K4, 2 * M2 + 9 * K4).unwrap());
    assert_eq!((r.demoted, r.removed), (0, 1));
    assert_eq!(t.leaf(2 * M2).1, SeptState::Free);
    assert_eq!(t.mmu.bugged(), None);
}

/// AUG below a blocked page table fails with EPT_WALK_FAILED at the NL_BLOCKED entry
/// (`sept_manager.c` secure_ept_walk); the fault path retries instead of failing the TD.
#[test]
fn a_fault_below_a_blocked_page_table_retries() {
    let t = td(MmuPolicy::OURS);
    let (s, _) = t.accept(0, PageLevel::Size4K, 1);
    assert!(s.is_success());
    assert_eq!(
        t.leaf(0),
        (0, SeptState::Mapped),
        "a 4K page under a 2M page table"
    );
    assert!(t
        .module
        .range_block(g(0), PageLevel::Size2M)
        .status
        .is_success());
    let ext = ExtExitQual::accept(0, 1, SeptState::NlBlocked, false);
    assert_eq!(
        t.mmu.handle_ept_violation(K4, ext).expect("no error"),
        FaultOutcome::Retry
    );
    assert_eq!(
        t.module.walk(g(K4), 0).state,
        SeptState::Free,
        "nothing mapped"
    );
}

/// A vCPU that sits in a guest call holding an entry lock (and the tree lock shared) until it
/// is kicked: the kick takes effect when the call ends, as an IPI does.
struct KickReleases {
    kicked: std::sync::atomic::AtomicBool,
    released: std::sync::atomic::AtomicBool,
}

impl Kicker for KickReleases {
    fn kick_all(&self) {
        self.kicked.store(true, Ordering::Release);
        while !self.released.load(Ordering::Acquire) {
            std::thread::yield_now();
        }
    }
}

/// Regression (found by `tdsim stress` in parallel mode): a zap's BLOCK kept getting
/// BUSY|SEPT_TREE from guest calls on other vCPUs until the retry bound ran out, and the MMU
/// declared itself bugged. Now, as KVM's tdh_do_no_vcpus(), after a few BUSY answers it holds
/// the vCPUs out of the TD, kicks them and retries.
#[test]
fn a_busy_block_holds_the_vcpus_out_kicks_them_and_succeeds() {
    let kicker = Arc::new(KickReleases {
        kicked: false.into(),
        released: false.into(),
    });
    let t = td_kicked_by(MmuPolicy::OURS, kicker.clone());
    let module = t.module.clone();
    assert_eq!(t.accept(0, PageLevel::Size2M, 4).0, TdxStatus::SUCCESS);
    let range = GpaRange::from_len(0, M2).unwrap();
    let held = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        let (k, module, held) = (kicker.clone(), &module, &held);
        s.spawn(move || {
            let guard = module.hold_entry_lock(g(0), 2).expect("the 1G-level entry");
            held.store(true, Ordering::Release);
            // Without the kick the MMU gives up long before this (and the test then fails on
            // its assertions instead of hanging).
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
            while !k.kicked.load(Ordering::Acquire) && std::time::Instant::now() < deadline {
                std::thread::yield_now();
            }
            drop(guard);
            k.released.store(true, Ordering::Release);
        });
        while !held.load(Ordering::Acquire) {
            std::thread::yield_now();
        }
        let before = t.mmu.stats();
        let report = t.mmu.zap(range);
        assert_eq!(report.removed, 1);
        assert!(report.poisoned.is_empty());
        let after = t.mmu.stats();
        assert_eq!(after.hold_outs - before.hold_outs, 1);
        assert!(after.busy_retries - before.busy_retries >= u64::from(BUSY_BEFORE_HOLD_OUT));
    });
    assert_eq!(t.mmu.bugged(), None);
    assert!(!t.mmu.vcpus_held_out());
    assert_eq!(t.module.leaf(g(0)).state, SeptState::Free);
}

/// Regression (its count was missing from `tdsim stress`'s breakdown): a TRACK that meets the
/// epoch lock held by a TD entry is answered OPERAND_BUSY|TD_EPOCH, retried until the entry is
/// done, and counted by call and operand like every other BUSY.
#[test]
fn a_track_that_meets_a_td_entry_is_retried_and_counted_as_busy_td_epoch() {
    let t = td(MmuPolicy::OURS);
    let module = t.module.clone();
    assert_eq!(t.accept(0, PageLevel::Size2M, 4).0, TdxStatus::SUCCESS);
    let range = GpaRange::from_len(0, M2).unwrap();
    let held = std::sync::atomic::AtomicBool::new(false);
    let release = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        let (module, held, release) = (&module, &held, &release);
        s.spawn(move || {
            let guard = module.hold_epoch_lock();
            held.store(true, Ordering::Release);
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
            while !release.load(Ordering::Acquire) && std::time::Instant::now() < deadline {
                std::thread::yield_now();
            }
            drop(guard);
        });
        while !held.load(Ordering::Acquire) {
            std::thread::yield_now();
        }
        assert!(module.mem_track().status.is(StatusCode::OperandBusy));
        assert_eq!(
            module.mem_track().status.operand(),
            accept::abi::operand::TD_EPOCH
        );
        // Let the zap's TRACK through after it has been refused a few times.
        s.spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(5));
            release.store(true, Ordering::Release);
        });
        let report = t.mmu.zap(range);
        assert_eq!(report.removed, 1);
    });
    let busy = t.mmu.busy_by_operand();
    assert!(
        busy.iter()
            .any(|&(call, op, n)| call == "TRACK" && op == accept::abi::operand::TD_EPOCH && n > 0),
        "{busy:?}"
    );
    assert_eq!(t.mmu.bugged(), None);
    assert_eq!(t.module.leaf(g(0)).state, SeptState::Free);
}
