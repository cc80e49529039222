//! The differential suite: unmodified Linux 6.12 code and this project's engine and firmware
//! glue on the same inputs, against the same module. Built only by `cargo xtask linux`
//! (`cfg(linux_code)`); see the crate docs and the README ("Linux conformance").
//!
//! Each test either shows Linux and the engine equal (same TDCALLs in the same order, same
//! outcome, same table) or pins a deliberate difference: it expects the difference, so a change
//! on either side shows up here.
#![cfg(linux_code)]

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use tdmem_sim::convert::convert_simulated;

use accept::abi::{GhciStatus, GpaRange, Gpaw, PageLevel, StatusCode, TdxStatus};
use accept::acceptor::{AcceptError, AcceptPolicy, Acceptor};
use accept::convert::{
    ConvertHooks, ConvertPolicy, Converter, HookError, MapGpaErrorKind, Visibility,
};
use accept::tracker::{words_needed, LazyTracker, NoInterrupts, UnitState};
use accept::unaccepted::{build_table, UnacceptedTable};
use accept::Tdcall;
use linux_conformance::emu::Emu;
use linux_conformance::linux::{
    Descriptor, Session, EFI_CONVENTIONAL_MEMORY, EFI_UNACCEPTED_MEMORY,
};
use linux_conformance::model::{Call, PageModel};
use linux_conformance::{Rng, G1, K4, M2, SHARED};
use td_shim_ext::plan::EFI_UNACCEPTED_MEMORY as PLAN_UNACCEPTED;
use td_shim_ext::{BootPlan, PlanConfig};
use tdmem_sim::scenario::Scenario;
use tdmem_sim::{GuestPolicy, SimConfig};

type Shared<T> = Arc<Mutex<T>>;

fn shared<T>(t: T) -> Shared<T> {
    Arc::new(Mutex::new(t))
}

fn range(s: u64, e: u64) -> GpaRange {
    GpaRange::new(s, e).expect("test range")
}

/// The `linux` guest policy of `tdsim` and the benchmarks: every comparison with Linux below
/// goes through it, so what is shown equal is what the baseline runs.
const LINUX: GuestPolicy = GuestPolicy::Linux;

fn linux_acceptor() -> Acceptor {
    Acceptor::new(Gpaw::Bits48, LINUX.accept_policy())
}

fn linux_converter() -> Converter {
    Converter::new(Gpaw::Bits48, LINUX.convert_policy())
}

/// Storage for a tracker of `units` units and `vcpus` vCPUs.
struct Storage {
    words: Vec<AtomicU64>,
    slots: Vec<AtomicU64>,
}

impl Storage {
    fn new(units: u64, vcpus: usize) -> Storage {
        Storage {
            words: (0..words_needed(units).max(1))
                .map(|_| AtomicU64::new(0))
                .collect(),
            slots: (0..vcpus).map(|_| AtomicU64::new(0)).collect(),
        }
    }
}

/// A tracker over `table` as the `linux` policy configures it (strict about ALREADY_ACCEPTED,
/// as Linux is; waits without bound).
fn tracker<'a>(acceptor: &'a Acceptor, table: &[u8], storage: &'a Storage) -> LazyTracker<'a> {
    let t = UnacceptedTable::parse(table).expect("table parses");
    LazyTracker::from_table(
        acceptor,
        &t,
        &storage.words,
        &storage.slots,
        LINUX.tracker_config(),
    )
    .expect("tracker")
    .already_accepted_is_private(LINUX.already_accepted_is_private())
}

/// The units a table marks unaccepted.
fn unaccepted_units(table: &[u8]) -> Vec<u64> {
    let t = UnacceptedTable::parse(table).expect("table parses");
    (0..t.units())
        .filter(|&u| t.is_unit_unaccepted(u))
        .collect()
}

/// The units a tracker has not accepted.
fn tracker_units(t: &LazyTracker<'_>) -> Vec<u64> {
    (0..t.units())
        .filter(|&u| t.unit_state(u) != UnitState::Accepted)
        .collect()
}

/// A table of `units` 2M units from `base`, each set with probability 1/`one_in`... in runs.
fn random_table(rng: &mut Rng, base: u64, units: u64) -> Vec<u8> {
    let mut ranges = Vec::new();
    let mut u = 0;
    while u < units {
        let run = 1 + rng.below(40);
        if rng.one_in(2) {
            let end = (u + run).min(units);
            ranges.push(range(base + u * M2, base + end * M2));
        }
        u += run + 1;
    }
    if ranges.is_empty() {
        ranges.push(range(base, base + M2));
    }
    let mut buf = vec![0u8; 64 + units as usize];
    let n = build_table(&mut buf, &ranges, M2 as u32, |_| {}).expect("aligned ranges");
    buf.truncate(n);
    buf
}

// ---------------------------------------------------------------------------------------------
// The EFI stub (drivers/firmware/efi/libstub/unaccepted_memory.c) on memory maps and tables.
// ---------------------------------------------------------------------------------------------

/// A random memory map: unaccepted descriptors of every shape (shorter than a unit, unaligned
/// head and tail, exactly aligned, touching), with conventional memory between some.
fn random_map(rng: &mut Rng) -> Vec<Descriptor> {
    let mut map = Vec::new();
    let mut at = rng.below(64) * M2
        + if rng.one_in(2) {
            rng.below(512) * K4
        } else {
            0
        };
    for _ in 0..1 + rng.below(8) {
        let len = match rng.below(4) {
            0 => (1 + rng.below(600)) * K4,
            1 => (1 + rng.below(4)) * M2,
            _ => (1 + rng.below(3000)) * K4 + rng.below(6) * M2,
        };
        let t = if rng.one_in(5) {
            EFI_CONVENTIONAL_MEMORY
        } else {
            EFI_UNACCEPTED_MEMORY
        };
        map.push((t, at, len / K4));
        at += len;
        if rng.one_in(2) {
            at += rng.below(8) * M2 + rng.below(512) * K4;
        }
    }
    map
}

fn unaccepted_descriptors(map: &[Descriptor]) -> Vec<GpaRange> {
    map.iter()
        .filter(|d| d.0 == EFI_UNACCEPTED_MEMORY)
        .map(|&(_, s, n)| range(s, s + n * K4))
        .collect()
}

/// With no table from the firmware, the stub builds the same table `build_table` builds and
/// accepts the same ranges eagerly, on 300 random memory maps.
#[test]
fn stub_builds_the_table_build_table_builds() {
    let mut rng = Rng::new(14);
    for case in 0..300 {
        let map = random_map(&mut rng);
        let ranges = unaccepted_descriptors(&map);
        let model = shared(PageModel::new(PageLevel::Size1G));
        let mut s = Session::new(model.clone());
        let out = s.stub_setup(&map, None).expect("the stub runs");
        let mut buf = vec![0u8; 1 << 16];
        let mut ours_now = Vec::new();
        let ours = if ranges.is_empty() {
            None
        } else {
            let n = build_table(&mut buf, &ranges, M2 as u32, |r| {
                ours_now.push((r.start().as_u64(), r.end().as_u64()))
            })
            .expect("table");
            Some(buf[..n].to_vec())
        };
        assert_eq!(out.table.map(|t| t.bytes()), ours, "case {case}: {map:x?}");
        assert_eq!(out.accepted, ours_now, "case {case}: {map:x?}");
    }
}

/// A random boot plan: descriptors of every shape, some touching, an eager prefix.
fn random_plan(rng: &mut Rng) -> (Vec<GpaRange>, BootPlan) {
    loop {
        let map = random_map(rng);
        let ranges = unaccepted_descriptors(&map);
        let cfg = PlanConfig {
            eager_below: rng.below(8) * M2,
            table_below: 1 << 40,
            ..PlanConfig::default()
        };
        // Accepted memory for the table, far from the map.
        let accepted = [range(1 << 36, (1 << 36) + M2)];
        if let Ok(plan) = BootPlan::new(&ranges, &accepted, &cfg) {
            return (ranges, plan);
        }
    }
}

fn plan_map(plan: &BootPlan) -> Vec<Descriptor> {
    plan.memory_map()
        .map(|e| {
            let t = if e.memory_type == PLAN_UNACCEPTED {
                EFI_UNACCEPTED_MEMORY
            } else {
                EFI_CONVENTIONAL_MEMORY
            };
            (t, e.range.start().as_u64(), e.pages())
        })
        .collect()
}

fn plan_table(plan: &BootPlan) -> Option<Vec<u8>> {
    let mut buf = vec![0u8; 1 << 16];
    let n = plan.write_table(&mut buf).expect("table");
    (n > 0).then(|| buf[..n].to_vec())
}

/// The hand-off contract: on the memory map that goes with the table, the stub (which runs on
/// every unaccepted descriptor even when the firmware installed the table) accepts nothing and
/// leaves the table as the firmware wrote it, on 300 random plans.
#[test]
fn stub_on_the_plan_accepts_nothing_and_keeps_the_table() {
    let mut rng = Rng::new(1414);
    for case in 0..300 {
        let (_, plan) = random_plan(&mut rng);
        let map = plan_map(&plan);
        let table = plan_table(&plan);
        let mut s = Session::new(shared(PageModel::new(PageLevel::Size1G)));
        let out = s.stub_setup(&map, table.as_deref()).expect("the stub runs");
        assert_eq!(out.accepted, [], "case {case}: {map:x?}");
        assert_eq!(out.table.map(|t| t.bytes()), table, "case {case}");
    }
}

/// Without the firmware's table, the stub builds from the plan's memory map exactly the table
/// the plan wrote: the same `phys_base`, size and bits.
#[test]
fn stub_without_the_firmware_table_builds_the_plans_table() {
    let mut rng = Rng::new(2);
    for case in 0..300 {
        let (_, plan) = random_plan(&mut rng);
        let map = plan_map(&plan);
        let mut s = Session::new(shared(PageModel::new(PageLevel::Size1G)));
        let out = s.stub_setup(&map, None).expect("the stub runs");
        assert_eq!(out.accepted, [], "case {case}");
        assert_eq!(
            out.table.map(|t| t.bytes()),
            plan_table(&plan),
            "case {case}"
        );
    }
}

/// Every unaccepted descriptor of the plan's map is unit aligned, at least two units long and
/// inside the table (the stub writes past a table that ends below a descriptor), and the eager
/// and lazy lists cover every unaccepted byte once.
#[test]
fn plan_maps_keep_the_stubs_preconditions() {
    let mut rng = Rng::new(3);
    for _ in 0..300 {
        let (ranges, plan) = random_plan(&mut rng);
        let total: u64 = ranges.iter().map(|r| r.len()).sum();
        assert_eq!(plan.eager().bytes() + plan.lazy().bytes(), total);
        let Some(t) = plan.table() else {
            assert!(plan.lazy().is_empty());
            continue;
        };
        let end = t.layout.phys_base + t.layout.bitmap_len * 8 * M2;
        for e in plan
            .memory_map()
            .filter(|e| e.memory_type == PLAN_UNACCEPTED)
        {
            let (s, l) = (e.range.start().as_u64(), e.range.len());
            assert!(s % M2 == 0 && l % M2 == 0 && l >= 2 * M2, "{e:?}");
            assert!(s >= t.layout.phys_base && s + l <= end, "{e:?}");
        }
    }
}

/// Why bodies shorter than two units are accepted eagerly, with Linux's own code: a one-unit
/// unaccepted descriptor whose bit the firmware set is accepted by the stub and its bit left
/// set, and the kernel's first acceptance there panics on PAGE_ALREADY_ACCEPTED. The plan for
/// the same memory leaves no such descriptor.
#[test]
fn one_unit_lazy_descriptor_panics_linux_and_the_plan_never_makes_one() {
    let model = shared(PageModel::new(PageLevel::Size1G));
    let mut s = Session::new(model.clone());
    let map = [(EFI_UNACCEPTED_MEMORY, 2 * M2, M2 / K4)];
    let mut buf = vec![0u8; 64];
    let n = build_table(&mut buf, &[range(2 * M2, 3 * M2)], M2 as u32, |_| {}).expect("table");
    // The table as a firmware with a one-unit lazy range would write it.
    buf[24] = 0b1;
    let out = s.stub_setup(&map, Some(&buf[..n])).expect("the stub runs");
    assert_eq!(out.accepted, [(2 * M2, 3 * M2)]);
    let table = out.table.expect("the firmware's table").bytes();
    assert_eq!(unaccepted_units(&table), [0]);
    s.set_kernel_table(Some(&table));
    let err = s.accept_memory(2 * M2, K4).expect_err("Linux panics");
    assert!(err.0.contains("Failed to accept memory"), "{err:?}");

    // The plan for a descriptor [1M, 5M) (a one-unit aligned body): everything eager.
    let plan = BootPlan::new(
        &[range(M2 / 2, 5 * M2 / 2)],
        &[range(1 << 36, (1 << 36) + M2)],
        &PlanConfig {
            eager_below: 0,
            ..PlanConfig::default()
        },
    )
    .expect("plan");
    assert!(plan.lazy().is_empty() && plan.table().is_none());
    drop(s);
    let mut s2 = Session::new(shared(PageModel::new(PageLevel::Size1G)));
    let out = s2
        .stub_setup(&plan_map(&plan), None)
        .expect("the stub runs");
    assert_eq!(out.accepted, []);
    assert_eq!(out.table, None);
}

/// Touching HOB descriptors: the plan applies the stub's rules per descriptor, and the stub on
/// the plan's map agrees, from a TD HOB list.
#[test]
fn touching_hob_descriptors_through_the_stub() {
    use td_shim_ext::hob::build::HobWriter;
    let mut buf = [0u8; 1024];
    let mut w = HobWriter::new(&mut buf).expect("hob");
    // [0, 16M) accepted; then touching descriptors: 3M, 1M + 4K, 7M, 64M + 12K.
    w.resource(0, 7, 0, 16 << 20).expect("hob");
    let mut at = 16 << 20;
    for len in [3 << 20, (1 << 20) + 4096, 7 << 20, (64 << 20) + 12 * 4096] {
        w.resource(7, 7, at, len).expect("hob");
        at += len;
    }
    let len = w.finish().expect("hob");
    let plan = BootPlan::from_hob(
        &buf[..len],
        &PlanConfig {
            eager_below: 0,
            ..PlanConfig::default()
        },
    )
    .expect("plan");
    let map = plan_map(&plan);
    let table = plan_table(&plan);
    let mut s = Session::new(shared(PageModel::new(PageLevel::Size1G)));
    let with = s.stub_setup(&map, table.as_deref()).expect("the stub runs");
    assert_eq!(with.accepted, []);
    assert_eq!(with.table.map(|t| t.bytes()), table);
    let without = s.stub_setup(&map, None).expect("the stub runs");
    assert_eq!(without.table.map(|t| t.bytes()), table);
}

// ---------------------------------------------------------------------------------------------
// The kernel's lazy acceptance (drivers/firmware/efi/unaccepted_memory.c) against the tracker.
// ---------------------------------------------------------------------------------------------

/// Runs the same requests through Linux's `accept_memory()` and the tracker, each against its
/// own scripted module, and checks the same ACCEPTs in the same order and the same table.
fn same_lazy_acceptance(
    table: &[u8],
    requests: &[(u64, u64)],
    acceptor: &Acceptor,
    max_level: PageLevel,
) -> (PageModel, PageModel) {
    let linux = shared(PageModel::new(max_level));
    let mut s = Session::new(linux.clone());
    s.set_kernel_table(Some(table));
    let storage = Storage::new(UnacceptedTable::parse(table).expect("table").units(), 1);
    let t = tracker(acceptor, table, &storage);
    let mut ours = PageModel::new(max_level);
    for &(start, size) in requests {
        s.accept_memory(start, size).expect("Linux accepts");
        t.accept_range(0, &mut ours, &mut NoInterrupts, start, start + size)
            .expect("the tracker accepts");
        let l = linux.lock().expect("model");
        assert_eq!(
            l.calls, ours.calls,
            "after accept_memory({start:#x}, {size:#x})"
        );
    }
    let k = s.kernel_table().expect("table");
    assert_eq!(unaccepted_units(&k), tracker_units(&t));
    drop(s);
    let l = Arc::try_unwrap(linux)
        .ok()
        .and_then(|m| m.into_inner().ok())
        .expect("the session is gone");
    (l, ours)
}

fn random_request(rng: &mut Rng, base: u64, span: u64) -> (u64, u64) {
    let start = match rng.below(4) {
        0 => base + rng.below(span / M2) * M2,
        1 => base.saturating_sub(rng.below(4) * M2) + rng.below(span / K4) * K4,
        _ => base + rng.below(span),
    };
    let size = match rng.below(5) {
        0 => 0,
        1 => rng.below(4) * M2,
        2 => (base + rng.below(span / M2) * M2).saturating_sub(start),
        _ => rng.below(span / 4),
    };
    (start, size)
}

/// 200 random tables and request sequences (unaligned, zero-size, guard-unit, outside the
/// table): Linux's `accept_memory()` and the tracker with the Linux acceptor make the same
/// ACCEPTs in the same order and leave the same table, on a module that takes 1G.
#[test]
fn accept_memory_equals_the_tracker_on_random_requests() {
    let mut rng = Rng::new(5);
    let acceptor = linux_acceptor();
    for _ in 0..200 {
        let base = rng.below(4) * G1 + rng.below(8) * M2;
        let units = 8 + rng.below(1200);
        let table = random_table(&mut rng, base, units);
        let requests: Vec<_> = (0..1 + rng.below(8))
            .map(|_| random_request(&mut rng, base, units * M2))
            .collect();
        same_lazy_acceptance(&table, &requests, &acceptor, PageLevel::Size1G);
    }
}

/// As above on a module capped at 2M, the usual case.
#[test]
fn accept_memory_equals_the_tracker_on_a_2m_module() {
    let mut rng = Rng::new(6);
    let acceptor = linux_acceptor();
    for _ in 0..100 {
        let units = 8 + rng.below(1200);
        let table = random_table(&mut rng, 0, units);
        let requests: Vec<_> = (0..1 + rng.below(6))
            .map(|_| random_request(&mut rng, 0, units * M2))
            .collect();
        same_lazy_acceptance(&table, &requests, &acceptor, PageLevel::Size2M);
    }
}

fn all_set(units: u64) -> Vec<u8> {
    let mut buf = vec![0u8; 64 + units as usize];
    let n = build_table(&mut buf, &[range(0, units * M2)], M2 as u32, |_| {}).expect("table");
    buf.truncate(n);
    buf
}

/// `accept_memory(0, 1G)` over 1024 set units: the request's guard unit makes it 513 units,
/// one run, accepted as 1x1G + 1x2M by both.
#[test]
fn runs_are_accepted_at_1g_as_linux_does() {
    let (l, ours) = same_lazy_acceptance(
        &all_set(1024),
        &[(0, G1)],
        &linux_acceptor(),
        PageLevel::Size1G,
    );
    assert_eq!(
        l.successes(),
        [(0, PageLevel::Size1G), (G1, PageLevel::Size2M)]
    );
    assert_eq!(ours.successes(), l.successes());
}

/// The guard unit: a request ending on a unit boundary also accepts the next unit, at the
/// table's start and end too.
#[test]
fn guard_unit_as_linux() {
    let (l, _) = same_lazy_acceptance(
        &all_set(8),
        &[(0, M2), (6 * M2, 2 * M2), (4 * M2 + K4, M2 - K4)],
        &linux_acceptor(),
        PageLevel::Size2M,
    );
    assert_eq!(
        l.successes(),
        [
            (0, PageLevel::Size2M),
            (M2, PageLevel::Size2M),
            (6 * M2, PageLevel::Size2M),
            (7 * M2, PageLevel::Size2M),
            (4 * M2, PageLevel::Size2M),
            (5 * M2, PageLevel::Size2M),
        ]
    );
}

/// Zero-size requests accept the unit holding the address (at a unit boundary: that unit), as
/// `accept_memory(start, 0)` does.
#[test]
fn zero_size_requests_as_linux() {
    let (l, _) = same_lazy_acceptance(
        &all_set(8),
        &[(3 * M2, 0), (5 * M2 + 12 * K4, 0), (8 * M2, 0)],
        &linux_acceptor(),
        PageLevel::Size2M,
    );
    assert_eq!(
        l.successes(),
        [(3 * M2, PageLevel::Size2M), (5 * M2, PageLevel::Size2M)]
    );
}

/// Requests below the table, ending exactly at its start (guard unit 0), and past its end.
#[test]
fn requests_outside_the_table_as_linux() {
    let base = 64 * M2;
    let mut buf = vec![0u8; 64];
    let n = build_table(&mut buf, &[range(base, base + 8 * M2)], M2 as u32, |_| {}).expect("table");
    let (l, _) = same_lazy_acceptance(
        &buf[..n],
        &[
            (0, 10 * M2),
            (base - 4 * M2, 4 * M2),
            (base + 7 * M2 + K4, 100 * M2),
            (base + 20 * M2, M2),
        ],
        &linux_acceptor(),
        PageLevel::Size2M,
    );
    assert_eq!(
        l.successes(),
        [
            (base, PageLevel::Size2M),
            (base + 7 * M2, PageLevel::Size2M)
        ]
    );
}

/// This engine's acceptor instead of Linux's: the same pages are accepted, but a module that
/// refuses 1G is asked once, not once per 1G-aligned run (pinned difference: the acceptor
/// learns the cap).
#[test]
fn our_acceptor_learns_the_1g_cap_linux_asks_every_time() {
    let table = all_set(2048);
    let requests = [(0, G1 - M2), (G1, G1 - M2), (2 * G1, G1 - M2)];
    let linux = shared(PageModel::new(PageLevel::Size2M));
    let mut s = Session::new(linux.clone());
    s.set_kernel_table(Some(&table));
    let ours_acceptor = Acceptor::new(Gpaw::Bits48, AcceptPolicy::OURS);
    let storage = Storage::new(2048, 1);
    let t = tracker(&ours_acceptor, &table, &storage);
    let mut ours = PageModel::new(PageLevel::Size2M);
    for (start, size) in requests {
        s.accept_memory(start, size).expect("Linux accepts");
        t.accept_range(0, &mut ours, &mut NoInterrupts, start, start + size)
            .expect("the tracker accepts");
    }
    let l = linux.lock().expect("model");
    assert_eq!(l.successes(), ours.successes());
    let refused_1g = |m: &PageModel| {
        m.accepts()
            .iter()
            .filter(|a| a.1 == PageLevel::Size1G)
            .count()
    };
    assert_eq!(refused_1g(&l), 3);
    assert_eq!(refused_1g(&ours), 1);
}

/// `range_contains_unaccepted_memory()` against the tracker on random tables and ranges: equal,
/// except where Linux's loop, stepping one unit from an unaligned start, skips the last unit
/// (or checks nothing for an unaligned zero-size range). There the tracker says "unaccepted"
/// and the unit Linux skipped is unaccepted indeed (pinned difference).
#[test]
fn range_contains_unaccepted_as_linux_but_never_misses_a_unit() {
    let mut rng = Rng::new(7);
    let acceptor = linux_acceptor();
    let mut linux_skips = 0;
    for _ in 0..300 {
        let base = rng.below(8) * M2;
        let units = 4 + rng.below(100);
        let table = random_table(&mut rng, base, units);
        let mut s = Session::new(shared(PageModel::new(PageLevel::Size2M)));
        s.set_kernel_table(Some(&table));
        let storage = Storage::new(UnacceptedTable::parse(&table).expect("t").units(), 1);
        let t = tracker(&acceptor, &table, &storage);
        for _ in 0..20 {
            let (start, size) = random_request(&mut rng, base, units * M2);
            let l = s.range_contains_unaccepted(start, size);
            let o = t.range_contains_unaccepted(start, start + size);
            if l != o {
                assert!(
                    o && !l,
                    "Linux {l}, tracker {o} for ({start:#x}, {size:#x})"
                );
                assert!(start % M2 != 0, "only from an unaligned start");
                linux_skips += 1;
            }
        }
    }
    assert!(linux_skips > 0, "the difference is exercised");
    // The smallest case: [1M, 2M + 4K) reaches into unit 1, which Linux never tests.
    let table = {
        let mut buf = all_set(8);
        buf[24] = 0b10;
        buf
    };
    let mut s = Session::new(shared(PageModel::new(PageLevel::Size2M)));
    s.set_kernel_table(Some(&table));
    let storage = Storage::new(8, 1);
    let t = tracker(&acceptor, &table, &storage);
    assert!(!s.range_contains_unaccepted(M2 / 2, M2 / 2 + K4));
    assert!(t.range_contains_unaccepted(M2 / 2, M2 + K4));
}

/// Overlapping callers one after the other: the second accepts only what the first left.
#[test]
fn overlapping_callers_in_turn_as_linux() {
    let (l, _) = same_lazy_acceptance(
        &all_set(64),
        &[
            (0, 5 * M2 + K4),
            (3 * M2, 9 * M2),
            (2 * M2, 0),
            (0, 64 * M2),
        ],
        &linux_acceptor(),
        PageLevel::Size2M,
    );
    let units: Vec<_> = l.successes().iter().map(|s| s.0 / M2).collect();
    assert_eq!(units, (0..64).collect::<Vec<_>>());
}

/// Overlapping callers at once: four threads run Linux's `accept_memory()` (its own spin lock
/// and accepting list), then four threads run the tracker, on overlapping ranges. Neither ever
/// accepts a page twice, and both end with the same pages accepted.
#[test]
fn overlapping_callers_at_once_never_accept_twice() {
    let table = all_set(256);
    let requests: Vec<(u64, u64)> = (0..4u64).map(|i| (i * 40 * M2 + K4, 100 * M2)).collect();
    let linux = shared(PageModel::new(PageLevel::Size1G));
    let mut s = Session::new(linux.clone());
    s.set_kernel_table(Some(&table));
    let handle = s.concurrent();
    std::thread::scope(|scope| {
        for &(start, size) in &requests {
            scope.spawn(move || handle.accept_memory(start, size).expect("Linux accepts"));
        }
    });
    let acceptor = linux_acceptor();
    let storage = Storage::new(256, 4);
    let t = tracker(&acceptor, &table, &storage);
    let ours = shared(PageModel::new(PageLevel::Size1G));
    std::thread::scope(|scope| {
        for (vcpu, &(start, size)) in requests.iter().enumerate() {
            let (t, ours) = (&t, ours.clone());
            scope.spawn(move || {
                let mut m = Locked(ours);
                t.accept_range(vcpu, &mut m, &mut NoInterrupts, start, start + size)
                    .expect("the tracker accepts");
            });
        }
    });
    let l = linux.lock().expect("model");
    let o = ours.lock().expect("model");
    for m in [&*l, &*o] {
        assert!(m.accepts().iter().all(|a| a.2 == 0), "no failed ACCEPT");
    }
    assert_eq!(l.accepted_ranges(), o.accepted_ranges());
    assert_eq!(
        unaccepted_units(&s.kernel_table().expect("table")),
        tracker_units(&t)
    );
}

/// A shared module as one vCPU's `Tdcall`.
struct Locked(Shared<PageModel>);

impl Tdcall for Locked {
    fn accept(&mut self, gpa: accept::Gpa, level: PageLevel) -> TdxStatus {
        self.0.lock().expect("model").accept(gpa, level)
    }
    fn map_gpa(&mut self, start: u64, len: u64) -> accept::abi::MapGpaOutcome {
        self.0.lock().expect("model").map_gpa(start, len)
    }
    fn ve_info(&mut self) -> Result<accept::abi::VeInfo, TdxStatus> {
        self.0.lock().expect("model").ve_info()
    }
    fn vp_info(&mut self) -> Result<accept::abi::VpInfo, TdxStatus> {
        self.0.lock().expect("model").vp_info()
    }
}

/// A page accepted behind the table's back: Linux panics ("TDX: Failed to accept memory"), the
/// strict tracker (the `linux` policy) fails the unit, this engine's default tracker counts the
/// page private and accepts the rest of the unit (pinned difference).
#[test]
fn already_accepted_page_in_a_lazy_unit() {
    let table = all_set(4);
    let setup = |m: &mut PageModel| {
        m.split_2m(M2);
        m.preaccept(M2 + 5 * K4, M2 + 6 * K4);
    };
    let mut lm = PageModel::new(PageLevel::Size2M);
    setup(&mut lm);
    let linux = shared(lm);
    let mut s = Session::new(linux.clone());
    s.set_kernel_table(Some(&table));
    let err = s.accept_memory(M2, K4).expect_err("Linux panics");
    assert!(err.0.contains("Failed to accept memory"), "{err:?}");

    let acceptor = linux_acceptor();
    let storage = Storage::new(4, 1);
    let strict = tracker(&acceptor, &table, &storage);
    let mut m = PageModel::new(PageLevel::Size2M);
    setup(&mut m);
    strict
        .accept_range(0, &mut m, &mut NoInterrupts, M2, M2 + K4)
        .expect_err("strict");
    assert_eq!(strict.unit_state(1), UnitState::Failed);
    assert_eq!(
        m.accepts(),
        linux.lock().expect("model").accepts(),
        "the same calls up to the failure"
    );

    let ours = Acceptor::new(Gpaw::Bits48, AcceptPolicy::OURS);
    let storage = Storage::new(4, 1);
    let t = tracker(&ours, &table, &storage).already_accepted_is_private(true);
    let mut m = PageModel::new(PageLevel::Size2M);
    setup(&mut m);
    t.accept_range(0, &mut m, &mut NoInterrupts, M2, M2 + K4)
        .expect("counted private");
    assert_eq!(t.unit_state(1), UnitState::Accepted);
    assert_eq!(m.accepted_bytes(), M2);
}

// ---------------------------------------------------------------------------------------------
// tdx_accept_memory() (arch/x86/coco/tdx/tdx-shared.c) against the acceptor.
// ---------------------------------------------------------------------------------------------

/// A random module: a 1G or 2M cap, regions the host maps at 4K, pages accepted already, and
/// sometimes a scripted failure (BUSY, an unknown status, an EPT walk failure).
fn random_module(rng: &mut Rng, start: u64, end: u64) -> PageModel {
    let cap = if rng.one_in(2) {
        PageLevel::Size1G
    } else {
        PageLevel::Size2M
    };
    let mut m = PageModel::new(cap);
    for _ in 0..rng.below(4) {
        m.split_2m(start + rng.below((end - start) / K4) * K4);
    }
    if rng.one_in(4) {
        let p = start + rng.below((end - start) / K4) * K4;
        m.preaccept(p, p + K4);
    }
    if rng.one_in(3) {
        let at = start + rng.below((end - start) / K4) * K4;
        let status = match rng.below(3) {
            0 => StatusCode::OperandBusy.with_operand(1),
            1 => TdxStatus::from_raw(0xC000_0B99_0000_0000),
            _ => StatusCode::EptWalkFailed.with_operand(1),
        };
        let level = PageLevel::from_index(rng.below(3)).unwrap_or(PageLevel::Size4K);
        m.script_accept(Box::new(move |g, l| {
            (g == at && l == level).then_some(status)
        }));
    }
    m
}

fn random_accept_range(rng: &mut Rng) -> (u64, u64) {
    let start = match rng.below(3) {
        0 => rng.below(4) * G1,
        1 => rng.below(2048) * M2,
        _ => rng.below(1 << 20) * K4,
    };
    let len = match rng.below(3) {
        0 => (1 + rng.below(3)) * G1 + rng.below(3) * M2,
        1 => (1 + rng.below(600)) * M2,
        _ => (1 + rng.below(2000)) * K4,
    };
    (start, start + len)
}

/// 400 random ranges and modules: `tdx_accept_memory()` and `AcceptPolicy::LINUX` make the same
/// ACCEPTs in the same order and succeed or fail together.
#[test]
fn tdx_accept_memory_equals_the_linux_preset() {
    let mut rng = Rng::new(8);
    for case in 0..400 {
        let (start, end) = random_accept_range(&mut rng);
        let seed = rng.next_u64();
        let linux = shared(random_module(&mut Rng::new(seed), start, end));
        let s = Session::new(linux.clone());
        let l_ok = s.tdx_accept_memory(start, end);
        let mut ours = random_module(&mut Rng::new(seed), start, end);
        let o = linux_acceptor().accept_range(&mut ours, range(start, end));
        let l = linux.lock().expect("model");
        assert_eq!(l.calls, ours.calls, "case {case}: [{start:#x}, {end:#x})");
        assert_eq!(l_ok, o.is_ok(), "case {case}: {o:?}");
    }
}

/// BUSY: Linux treats it as any failure (a smaller level, then failure at 4K); the Linux preset
/// does the same; this engine retries it (pinned difference).
#[test]
fn busy_fails_linux_and_is_retried_by_ours() {
    let busy_once = || {
        let mut m = PageModel::new(PageLevel::Size2M);
        let mut answered = false;
        m.script_accept(Box::new(move |g, l| {
            (g == 0 && l == PageLevel::Size4K && !std::mem::replace(&mut answered, true))
                .then(|| StatusCode::OperandBusy.with_operand(1))
        }));
        m.split_2m(0);
        m
    };
    let linux = shared(busy_once());
    let s = Session::new(linux.clone());
    assert!(!s.tdx_accept_memory(0, M2));
    let mut preset = busy_once();
    assert!(matches!(
        linux_acceptor().accept_range(&mut preset, range(0, M2)),
        Err(AcceptError::Busy { .. })
    ));
    assert_eq!(linux.lock().expect("model").calls, preset.calls);
    let mut ours = busy_once();
    Acceptor::new(Gpaw::Bits48, AcceptPolicy::OURS)
        .accept_range(&mut ours, range(0, M2))
        .expect("BUSY is retried");
    assert_eq!(ours.accepted_bytes(), M2);
}

/// ALREADY_ACCEPTED at 4K fails Linux, the preset and this engine alike; at 2M Linux and the
/// preset try 4K.
#[test]
fn already_accepted_fails_everyone_at_4k() {
    let pre = || {
        let mut m = PageModel::new(PageLevel::Size2M);
        m.preaccept(3 * K4, 4 * K4);
        m
    };
    let linux = shared(pre());
    let s = Session::new(linux.clone());
    assert!(!s.tdx_accept_memory(0, M2));
    let mut preset = pre();
    assert!(linux_acceptor()
        .accept_range(&mut preset, range(0, M2))
        .is_err());
    assert_eq!(linux.lock().expect("model").calls, preset.calls);
    assert_eq!(preset.accepted_bytes(), 4 * K4);
    let mut ours = pre();
    assert!(matches!(
        Acceptor::new(Gpaw::Bits48, AcceptPolicy::OURS).accept_range(&mut ours, range(0, M2)),
        Err(AcceptError::AlreadyAccepted { .. })
    ));
}

/// On the emulator (a 2M module): Linux and the preset leave the same S-EPT behind.
#[test]
fn tdx_accept_memory_on_the_emulator() {
    let mem = 64 * M2;
    let (start, end) = (M2 - 3 * K4, 40 * M2 + 5 * K4);
    let linux = shared(Emu::new(mem, PageLevel::Size2M));
    let s = Session::new(linux.clone());
    assert!(s.tdx_accept_memory(start, end));
    let mut ours = Emu::new(mem, PageLevel::Size2M);
    linux_acceptor()
        .accept_range(&mut ours, range(start, end))
        .expect("accepted");
    let l = linux.lock().expect("emulator");
    assert_eq!(l.calls, ours.calls);
    for p in (0..mem).step_by(K4 as usize) {
        assert_eq!(l.leaf(p), ours.leaf(p), "{p:#x}");
    }
}

// ---------------------------------------------------------------------------------------------
// tdx_map_gpa() (arch/x86/coco/tdx/tdx.c) against the converter, with scripted hosts.
// ---------------------------------------------------------------------------------------------

/// A host answering MapGPA from a script of `(R10, R11 as a function of R12)`.
type Answer = (GhciStatus, fn(u64, u64, u64) -> u64);

/// R11 choices: progress by 2M (aligned), progress to an unaligned GPA, no progress, before
/// the start, at the end, past the end, without the shared bit, with another high bit.
const R11: [fn(u64, u64, u64) -> u64; 8] = [
    |r12, len, _| ((r12 & !SHARED) + M2).min((r12 & !SHARED) + len - K4) | (r12 & SHARED),
    |r12, len, _| ((r12 & !SHARED) + len / 2 + 8) | (r12 & SHARED),
    |r12, _, _| r12,
    |r12, _, _| r12.wrapping_sub(K4),
    |r12, len, _| r12 + len,
    |r12, len, _| r12 + len + M2,
    |r12, len, _| (r12 & !SHARED) + len / 2,
    |r12, _, bit| r12 | bit | (1 << 46),
];

fn scripted_host(script: Vec<Answer>) -> PageModel {
    let mut m = PageModel::new(PageLevel::Size2M);
    let mut i = 0;
    m.script_map_gpa(Box::new(move |r12, len| {
        let (status, r11) = script
            .get(i)
            .copied()
            .unwrap_or((GhciStatus::Success, |_, _, _| 0));
        i += 1;
        (status, r11(r12, len, SHARED))
    }));
    m
}

fn random_script(rng: &mut Rng) -> Vec<Answer> {
    (0..1 + rng.below(10))
        .map(|_| match rng.below(10) {
            0 => (GhciStatus::Success, R11[0]),
            1 => (GhciStatus::GpaInUse, R11[0]),
            2 => (GhciStatus::InvalidOperand, R11[0]),
            _ => (GhciStatus::Retry, R11[rng.below(8) as usize]),
        })
        .collect()
}

fn map_calls(m: &PageModel) -> MapCalls {
    m.calls
        .iter()
        .filter_map(|c| match *c {
            Call::MapGpa {
                start,
                len,
                status,
                resume,
            } => Some((start, len, status, resume)),
            Call::Accept { .. } => None,
        })
        .collect()
}

/// MapGPA calls as (R12, R13, R10, R11).
type MapCalls = Vec<(u64, u64, u64, u64)>;

/// Runs `tdx_map_gpa()` and a converter's MapGPA loop on the same scripted host: Linux's
/// outcome and calls, the converter's outcome and module.
fn both_map_gpa(
    script: &[Answer],
    start: u64,
    end: u64,
    to: Visibility,
    policy: ConvertPolicy,
) -> ((bool, MapCalls), (Result<(), MapGpaErrorKind>, PageModel)) {
    let linux = shared(scripted_host(script.to_vec()));
    let s = Session::new(linux.clone());
    let l_ok = s
        .tdx_map_gpa(start, end, to == Visibility::Private)
        .expect("no panic");
    drop(s);
    let mut ours = scripted_host(script.to_vec());
    let c = Converter::new(Gpaw::Bits48, policy);
    let o = c
        .map_gpa(&mut ours, range(start, end), to)
        .map_err(|e| e.kind);
    let l = map_calls(&linux.lock().expect("model"));
    ((l_ok, l), (o, ours))
}

/// 400 random scripted hosts, both directions: `tdx_map_gpa()` and `ConvertPolicy::LINUX` make
/// the same MapGPA calls (R12, R13) and succeed or fail together.
#[test]
fn tdx_map_gpa_equals_the_linux_preset_on_random_hosts() {
    let mut rng = Rng::new(9);
    for case in 0..400 {
        let script = random_script(&mut rng);
        let start = rng.below(64) * M2 + rng.below(4) * K4;
        let end = start + (1 + rng.below(16)) * M2;
        let to = if rng.one_in(2) {
            Visibility::Shared
        } else {
            Visibility::Private
        };
        let ((l_ok, l), (o, ours)) = both_map_gpa(&script, start, end, to, LINUX.convert_policy());
        assert_eq!(l, map_calls(&ours), "case {case}");
        assert_eq!(l_ok, o.is_ok(), "case {case}: {o:?}");
    }
}

/// Three RETRY answers without progress end Linux's loop after three calls; the preset stops at
/// the same call; this engine tolerates 16 (pinned difference).
#[test]
fn three_answers_without_progress() {
    let stall: Vec<Answer> = vec![(GhciStatus::Retry, R11[2]); 40];
    let ((l_ok, l), (o, _)) = both_map_gpa(
        &stall,
        0,
        4 * M2,
        Visibility::Shared,
        LINUX.convert_policy(),
    );
    assert!(!l_ok);
    assert_eq!(l.len(), 3);
    assert_eq!(o, Err(MapGpaErrorKind::NoProgress { tries: 3 }));
    let (_, (o, ours)) = both_map_gpa(&stall, 0, 4 * M2, Visibility::Shared, ConvertPolicy::OURS);
    assert_eq!(o, Err(MapGpaErrorKind::NoProgress { tries: 17 }));
    assert_eq!(map_calls(&ours).len(), 17);
}

/// An R11 inside the range that is not 4K aligned: Linux resumes from it, and so does the
/// preset; this engine refuses it (pinned difference: the next request would be misaligned).
#[test]
fn unaligned_resume_gpa() {
    let script: Vec<Answer> = vec![(GhciStatus::Retry, R11[1]), (GhciStatus::Success, R11[0])];
    let ((l_ok, l), (o, ours)) = both_map_gpa(
        &script,
        0,
        4 * M2,
        Visibility::Shared,
        LINUX.convert_policy(),
    );
    assert!(l_ok && o.is_ok());
    assert_eq!(l, map_calls(&ours));
    assert_eq!(l[1].0, (2 * M2 + 8) | SHARED);
    let (_, (o, _)) = both_map_gpa(&script, 0, 4 * M2, Visibility::Shared, ConvertPolicy::OURS);
    assert!(matches!(o, Err(MapGpaErrorKind::BadResume { .. })));
}

/// R11 before the start, at or past the end, without the shared bit of a to-shared request, or
/// with another high bit: refused by Linux, the preset and this engine, after one call.
#[test]
fn resume_gpa_outside_the_range_fails_everyone() {
    for (i, f) in R11.iter().enumerate().skip(3) {
        for to in [Visibility::Shared, Visibility::Private] {
            let script: Vec<Answer> = vec![(GhciStatus::Retry, *f)];
            let ((l_ok, l), (o, ours)) =
                both_map_gpa(&script, 2 * M2, 6 * M2, to, LINUX.convert_policy());
            if i == 6 && to == Visibility::Private {
                // No shared bit on a private request is a valid resume GPA.
                assert!(l_ok && o.is_ok());
                continue;
            }
            assert!(!l_ok, "R11 choice {i} {to:?}");
            assert!(
                matches!(o, Err(MapGpaErrorKind::BadResume { .. })),
                "{i} {o:?}"
            );
            assert_eq!(l, map_calls(&ours));
            let (_, (o, _)) = both_map_gpa(&script, 2 * M2, 6 * M2, to, ConvertPolicy::OURS);
            assert!(
                matches!(o, Err(MapGpaErrorKind::BadResume { .. })),
                "{i} {o:?}"
            );
        }
    }
}

/// A GHCI error, or a status the GHCI does not define, fails both at once.
#[test]
fn host_errors_fail_both() {
    for status in [
        GhciStatus::GpaInUse,
        GhciStatus::InvalidOperand,
        GhciStatus::AlignError,
        GhciStatus::Unknown(0x42),
    ] {
        let script: Vec<Answer> = vec![(GhciStatus::Retry, R11[0]), (status, R11[0])];
        let ((l_ok, l), (o, ours)) = both_map_gpa(
            &script,
            0,
            4 * M2,
            Visibility::Shared,
            LINUX.convert_policy(),
        );
        assert!(!l_ok);
        assert_eq!(o, Err(MapGpaErrorKind::Host(status)));
        assert_eq!(l, map_calls(&ours));
    }
}

/// Page tables and caches for conversions on the scripted module: nothing to do.
struct NoPageTables;

impl ConvertHooks for NoPageTables {
    type Error = HookError;
    fn set_visibility(&mut self, _: GpaRange, _: Visibility) -> Result<(), HookError> {
        Ok(())
    }
    fn flush_tlb(&mut self, _: GpaRange) {}
}

/// A shared -> private conversion: Linux's `tdx_enc_status_changed(enc = true)` is
/// `tdx_map_gpa()` then `tdx_accept_memory()`; the converter with the Linux presets makes the
/// same TDCALLs in the same order, on random ranges and hosts that split some regions.
#[test]
fn to_private_conversion_makes_linuxs_tdcalls() {
    let mut rng = Rng::new(10);
    for case in 0..100 {
        let start = rng.below(64) * M2 + rng.below(512) * K4;
        let end = start + (1 + rng.below(2000)) * K4;
        let splits: Vec<u64> = (0..rng.below(3))
            .map(|_| start + rng.below(end - start))
            .collect();
        let host = || {
            let mut m = PageModel::new(PageLevel::Size2M);
            for &p in &splits {
                m.split_2m(p);
            }
            m.script_map_gpa(Box::new(|r12, len| {
                let addr = r12 & !SHARED;
                let next = (addr + M2) & !(M2 - 1);
                if next >= addr + len {
                    (GhciStatus::Success, 0)
                } else {
                    (GhciStatus::Retry, next | (r12 & SHARED))
                }
            }));
            m
        };
        let linux = shared(host());
        let s = Session::new(linux.clone());
        let l_ok =
            s.tdx_map_gpa(start, end, true).expect("no panic") && s.tdx_accept_memory(start, end);
        drop(s);
        let mut ours = host();
        let c = linux_converter();
        let o = convert_simulated(
            &c,
            &mut ours,
            &linux_acceptor(),
            range(start, end),
            Visibility::Private,
            &mut NoPageTables,
        );
        assert_eq!(
            linux.lock().expect("model").calls,
            ours.calls,
            "case {case}"
        );
        assert_eq!(l_ok, o.is_ok(), "case {case}");
    }
}

/// A private -> shared conversion: `tdx_map_gpa(enc = false)` only, with the shared bit in R12;
/// the converter makes the same MapGPA calls and no ACCEPT.
#[test]
fn to_shared_conversion_makes_linuxs_tdcalls() {
    let script: Vec<Answer> = vec![
        (GhciStatus::Retry, R11[0]),
        (GhciStatus::Retry, R11[2]),
        (GhciStatus::Retry, R11[0]),
        (GhciStatus::Success, R11[0]),
    ];
    let linux = shared(scripted_host(script.clone()));
    let s = Session::new(linux.clone());
    assert!(s.tdx_map_gpa(M2, 5 * M2, false).expect("no panic"));
    drop(s);
    let mut ours = scripted_host(script);
    convert_simulated(
        &linux_converter(),
        &mut ours,
        &linux_acceptor(),
        range(M2, 5 * M2),
        Visibility::Shared,
        &mut NoPageTables,
    )
    .expect("converted");
    let l = linux.lock().expect("model");
    assert_eq!(l.calls, ours.calls);
    assert_eq!(
        map_calls(&l)[0],
        (M2 | SHARED, 4 * M2, 1, (2 * M2) | SHARED)
    );
    assert!(ours.accepts().is_empty());
}

/// On the emulator: a range converted to shared and back by Linux's functions and by the
/// converter with the Linux presets, on two fresh TDs: the same calls and the same S-EPT.
#[test]
fn conversions_on_the_emulator() {
    let mem = 32 * M2;
    let (start, end) = (3 * M2 + 4 * K4, 9 * M2 + 8 * K4);
    let linux = shared(Emu::new(mem, PageLevel::Size2M));
    {
        let mut l = linux.lock().expect("emulator");
        linux_acceptor()
            .accept_range(&mut *l, range(0, mem))
            .expect("boot");
        l.calls.clear();
    }
    let s = Session::new(linux.clone());
    assert!(s.tdx_map_gpa(start, end, false).expect("no panic"));
    assert!(s.tdx_map_gpa(start, end, true).expect("no panic"));
    assert!(s.tdx_accept_memory(start, end));
    drop(s);
    let mut ours = Emu::new(mem, PageLevel::Size2M);
    linux_acceptor()
        .accept_range(&mut ours, range(0, mem))
        .expect("boot");
    ours.calls.clear();
    let c = linux_converter();
    for to in [Visibility::Shared, Visibility::Private] {
        convert_simulated(
            &c,
            &mut ours,
            &linux_acceptor(),
            range(start, end),
            to,
            &mut NoPageTables,
        )
        .expect("converted");
    }
    let l = linux.lock().expect("emulator");
    assert_eq!(l.calls, ours.calls);
    for p in (0..mem).step_by(K4 as usize) {
        assert_eq!(l.leaf(p), ours.leaf(p), "{p:#x}");
    }
}

// ---------------------------------------------------------------------------------------------
// End to end: the firmware's plan and table, the stub, and Linux's lazy acceptance, on the
// emulator.
// ---------------------------------------------------------------------------------------------

/// `td-shim-ext` plans a 1 GiB TD with unaligned descriptors; the firmware accepts the eager
/// list with this engine; the Linux stub runs on the plan's map and table; then Linux's
/// `accept_memory()` serves random allocations and finally all memory. On a second emulator the
/// tracker serves the same allocations from the same table. Both make the same ACCEPTs, no
/// ACCEPT fails, every page ends accepted, and the S-EPTs are equal.
#[test]
fn linux_lazy_acceptance_consumes_the_plan_table_on_the_emulator() {
    let mem = 512 * M2;
    let descriptors = [
        range(0, 37 * M2 + 5 * K4),
        range(37 * M2 + 5 * K4, 38 * M2),
        range(38 * M2, 300 * M2 + 12 * K4),
        range(300 * M2 + 12 * K4, mem),
    ];
    let plan = BootPlan::new(
        &descriptors,
        &[],
        &PlanConfig {
            eager_below: 16 * M2,
            ..PlanConfig::default()
        },
    )
    .expect("plan");
    let table = plan_table(&plan).expect("lazy memory");
    let boot = |emu: &mut Emu| {
        let a = Acceptor::new(Gpaw::Bits48, AcceptPolicy::OURS);
        for r in plan.eager().iter() {
            a.accept_range(emu, r).expect("eager");
        }
        emu.calls.clear();
    };
    let mut rng = Rng::new(11);
    let mut allocations: Vec<(u64, u64)> = (0..40)
        .map(|_| {
            let start = rng.below(mem / K4) * K4;
            (start, (1 + rng.below(1024)) * K4)
        })
        .collect();
    allocations.push((0, mem));

    let mut l_emu = Emu::new(mem, PageLevel::Size2M);
    boot(&mut l_emu);
    let linux = shared(l_emu);
    let mut s = Session::new(linux.clone());
    let out = s
        .stub_setup(&plan_map(&plan), Some(&table))
        .expect("the stub runs");
    assert_eq!(out.accepted, []);
    let kernel_table = out.table.expect("the firmware's table").bytes();
    s.set_kernel_table(Some(&kernel_table));
    for &(start, size) in &allocations {
        s.accept_memory(start, size).expect("Linux accepts");
    }
    assert!(unaccepted_units(&s.kernel_table().expect("table")).is_empty());
    drop(s);

    let mut ours = Emu::new(mem, PageLevel::Size2M);
    boot(&mut ours);
    let acceptor = linux_acceptor();
    let storage = Storage::new(UnacceptedTable::parse(&table).expect("t").units(), 1);
    let t = tracker(&acceptor, &table, &storage);
    for &(start, size) in &allocations {
        t.accept_range(0, &mut ours, &mut NoInterrupts, start, start + size)
            .expect("the tracker accepts");
    }
    assert!(tracker_units(&t).is_empty());

    let l = linux.lock().expect("emulator");
    assert_eq!(l.calls, ours.calls);
    assert!(l.accepts().iter().all(|a| a.2 == 0), "no ACCEPT failed");
    for p in (0..mem).step_by(K4 as usize) {
        let leaf = l.leaf(p);
        assert_eq!(leaf, ours.leaf(p), "{p:#x}");
        assert_eq!(
            leaf.1,
            hostvmm::module::SeptState::Mapped,
            "{p:#x} accepted"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// The `linux` baseline of tdsim.
// ---------------------------------------------------------------------------------------------

/// The `linux` guest policy is made of exactly the presets the tests above show equal to
/// Linux, and it runs every scenario as Linux would: no #VE on pending pages (SEPT_VE_DISABLE),
/// memory accepted before it is touched, never an ACCEPT of an accepted page.
#[test]
fn the_tdsim_linux_policy_is_the_checked_baseline() {
    assert_eq!(LINUX.accept_policy(), AcceptPolicy::LINUX);
    assert_eq!(LINUX.convert_policy(), ConvertPolicy::LINUX);
    assert!(!LINUX.already_accepted_is_private());
    assert!(LINUX.sept_ve_disable());
    assert_eq!(LINUX.tracker_config().max_wait_spins, u64::MAX);
    for (scenario, name, _) in Scenario::ALL {
        let config = SimConfig {
            memory: 256 << 20,
            vcpus: 4,
            guest: LINUX,
            ..SimConfig::new(scenario)
        };
        let r = tdmem_sim::run(&config, &|_, _| {}).expect("valid configuration");
        assert!(r.passed(), "{name}:\n{}", r.summary());
        assert_eq!(
            r.counts.ve_injected, 0,
            "{name}: Linux runs without #VE on pending pages"
        );
        assert_eq!(r.counts.accept_already_accepted, 0, "{name}");
    }
}
