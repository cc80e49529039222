//! All-or-nothing conversions of the guest_memfd model (seed 002): an allocation failure at
//! every allocation point, EAGAIN at every host-mapped offset and a hook failure at every
//! prepare leave the state exactly as it was, and each error names its offset.

use accept::abi::{Gpa, GpaRange, PageLevel};
use hostvmm::gmem::{
    ConvertError, ConvertMode, ConvertPhase, FolioPool, GmemConfig, GuestMemfd, HookCall,
    HookError, InvalidateReason, NoopHook, RecordingHook, RefToken, Shareability,
};

const K4: u64 = PageLevel::Size4K.size();
const M2: u64 = PageLevel::Size2M.size();

fn gpa(v: u64) -> Gpa {
    Gpa::try_new(v).unwrap()
}

fn range(s: u64, e: u64) -> GpaRange {
    GpaRange::new(s, e).unwrap()
}

fn memfd(size: u64, level: PageLevel) -> GuestMemfd {
    let pool = FolioPool::new(1 << 34, 256 * M2).unwrap();
    GuestMemfd::new(GmemConfig::new(size, level), pool).unwrap()
}

/// A fragmented file: runs of both states, populated folios, host mappings and transient
/// references on shared pages.
fn fragmented() -> (GuestMemfd, Vec<RefToken>) {
    let mut g = memfd(16 * M2, PageLevel::Size2M);
    let mode = ConvertMode::default();
    for (s, e) in [
        (K4, 3 * K4),
        (M2 - K4, M2 + 5 * K4),
        (3 * M2, 5 * M2),
        (7 * M2 + 8 * K4, 7 * M2 + 9 * K4),
        (9 * M2, 12 * M2),
    ] {
        g.convert(range(s, e), Shareability::Shared, mode, &mut NoopHook)
            .unwrap();
    }
    for p in [0, M2 + 8 * K4, 6 * M2, 7 * M2] {
        g.get_pfn(gpa(p)).unwrap();
    }
    for p in [2 * K4, M2 + 2 * K4, 4 * M2 + 3 * K4, 10 * M2] {
        g.host_map(gpa(p)).unwrap();
    }
    let refs = [M2 + 4 * K4, 3 * M2, 9 * M2 + K4]
        .into_iter()
        .map(|p| g.get_ref(gpa(p)).unwrap())
        .collect();
    (g, refs)
}

/// Conversions that cross runs of both states, mapped and referenced pages, folio edges.
fn conversions() -> Vec<(GpaRange, Shareability)> {
    vec![
        (range(0, 16 * M2), Shareability::Private),
        (range(0, 8 * M2), Shareability::Shared),
        (range(K4, 4 * M2 + 4 * K4), Shareability::Private),
        (
            range(6 * M2 + 5 * K4, 6 * M2 + 6 * K4),
            Shareability::Shared,
        ),
        (range(M2 - K4, 10 * M2 + K4), Shareability::Shared),
        (range(0, 16 * M2), Shareability::Private),
    ]
}

/// What [`sweep`] went through before the conversion succeeded.
#[derive(Debug, Default)]
struct Sweep {
    /// Allocation points (each failed once).
    points: u64,
    /// EAGAIN offsets, in the order reported.
    eagain: Vec<Gpa>,
    /// Prepare calls failed (= runs handed to the hook).
    prepares: usize,
}

fn aborted_runs(hook: &RecordingHook) -> Vec<GpaRange> {
    hook.calls
        .iter()
        .filter_map(|c| match c {
            HookCall::Abort(r, _) => Some(*r),
            _ => None,
        })
        .collect()
}

fn prepared_runs(hook: &RecordingHook) -> Vec<GpaRange> {
    hook.calls
        .iter()
        .filter_map(|c| match c {
            HookCall::Prepare(r, _) => Some(*r),
            _ => None,
        })
        .collect()
}

/// Drives one conversion through every failure it can meet, asserting after each that nothing
/// changed and that the error names an offset in the range, then lets it succeed:
/// A. fail allocation point 0, 1, 2, ... (with the hook failing, so that a pass does not commit);
/// B. EAGAIN at each host-mapped page, lowest first (the test unmaps it and retries);
/// C. fail prepare 0, 1, 2, ... (every prepared run is aborted, in reverse).
fn sweep(g: &mut GuestMemfd, r: GpaRange, to: Shareability, block_first: bool) -> Sweep {
    let mode = ConvertMode { block_first };
    let mut out = Sweep::default();
    let failing_hook = |k: usize| {
        let mut hook = RecordingHook::new();
        hook.fail_prepare_at = Some(k);
        hook.fail_with = Some(HookError::Busy);
        hook
    };
    // A.
    let mut result = loop {
        let before = g.snapshot();
        g.node_injector_mut().fail_nth(out.points);
        let mut hook = failing_hook(0);
        let result = g.convert(r, to, mode, &mut hook);
        let armed = g.node_injector().is_armed();
        g.node_injector_mut().clear();
        match result {
            Err(ConvertError::NoMemory { offset }) => {
                assert!(r.contains(offset), "{offset} outside {r}");
                assert_eq!(
                    g.snapshot(),
                    before,
                    "allocation failure {} changed state",
                    out.points
                );
                assert!(
                    hook.calls.is_empty(),
                    "hook called before preallocation finished"
                );
                out.points += 1;
            }
            other => {
                assert!(armed, "the armed allocation failure must not have fired");
                if other.is_err() {
                    assert_eq!(g.snapshot(), before);
                }
                break other;
            }
        }
    };
    // B.
    while let Err(ConvertError::Again { offset }) = result {
        assert_eq!(to, Shareability::Private);
        assert!(r.contains(offset));
        assert!(g.host_refs(offset).maps > 0);
        if let Some(prev) = out.eagain.last() {
            assert!(*prev < offset, "EAGAIN offsets come lowest first");
        }
        out.eagain.push(offset);
        while g.host_refs(offset).maps > 0 {
            g.host_unmap(offset).unwrap();
        }
        let before = g.snapshot();
        let mut hook = failing_hook(0);
        result = g.convert(r, to, mode, &mut hook);
        if result.is_err() {
            assert_eq!(g.snapshot(), before);
        }
    }
    // C.
    loop {
        match result {
            Ok(report) => {
                assert_eq!(report.invalidated.len(), out.prepares);
                return out;
            }
            Err(ConvertError::HookFailed { offset, ref source }) => {
                assert_eq!(*source, HookError::Busy);
                assert!(r.contains(offset));
                out.prepares += 1;
            }
            Err(e) => panic!("unexpected {e}"),
        }
        let before = g.snapshot();
        let mut hook = failing_hook(out.prepares);
        result = g.convert(r, to, mode, &mut hook);
        match &result {
            Err(ConvertError::HookFailed { offset, .. }) => {
                assert_eq!(
                    g.snapshot(),
                    before,
                    "hook failure {} changed state",
                    out.prepares
                );
                let prepared = prepared_runs(&hook);
                assert_eq!(prepared.len(), out.prepares + 1);
                assert_eq!(prepared[out.prepares].start(), *offset);
                for c in &hook.calls {
                    if let HookCall::Prepare(_, ctx) = c {
                        assert_eq!(ctx.block_first, block_first);
                    }
                }
                let mut expect = prepared;
                expect.reverse();
                assert_eq!(aborted_runs(&hook), expect, "every prepared run is aborted");
                assert!(hook.invalidated().is_empty());
            }
            Ok(report) => {
                assert_eq!(hook.invalidated(), report.invalidated);
                assert!(aborted_runs(&hook).is_empty());
            }
            Err(e) => panic!("unexpected {e}"),
        }
    }
}

#[test]
fn every_failure_point_leaves_state_unchanged() {
    for block_first in [false, true] {
        let (mut g, _refs) = fragmented();
        let mut points = 0;
        let mut eagain = 0;
        let mut prepares = 0;
        for (r, to) in conversions() {
            let s = sweep(&mut g, r, to, block_first);
            points += s.points;
            eagain += s.eagain.len();
            prepares += s.prepares;
            // Done: the range is in the target state, except pages waiting for references.
            for (run, state) in g.ranges() {
                if state != to && run.start() < r.end() && r.start() < run.end() {
                    let mut p = run.start().as_u64().max(r.start().as_u64());
                    while p < run.end().as_u64().min(r.end().as_u64()) {
                        assert!(g.is_pending(gpa(p)), "{p:#x} neither converted nor pending");
                        p += K4;
                    }
                }
            }
        }
        assert!(points >= 10, "allocation points exercised: {points}");
        assert_eq!(eagain, 4, "each mapped page reported once");
        assert!(prepares >= 10, "prepares exercised: {prepares}");
        assert_eq!(g.stats().no_memory, points);
        assert_eq!(g.stats().hook_failures as usize, prepares);
    }
}

#[test]
fn allocation_points_are_exhausted_for_each_conversion() {
    let (mut g, _refs) = fragmented();
    // Unmap everything so that phase 2 passes and phase 1 is swept alone.
    for (p, h) in g.snapshot().host_refs {
        for _ in 0..h.maps {
            g.host_unmap(p).unwrap();
        }
    }
    let mut total = 0;
    for (r, to) in conversions() {
        let s = sweep(&mut g, r, to, false);
        assert!(s.eagain.is_empty());
        total += s.points;
    }
    assert!(
        total >= 10,
        "the scenario must exercise allocation points, got {total}"
    );
    assert_eq!(g.stats().no_memory, total);
}

#[test]
fn eagain_names_each_mapped_offset() {
    let (mut g, _refs) = fragmented();
    let mapped: Vec<Gpa> = g
        .snapshot()
        .host_refs
        .iter()
        .filter(|(_, h)| h.maps > 0)
        .map(|(p, _)| *p)
        .collect();
    let s = sweep(&mut g, range(0, 16 * M2), Shareability::Private, false);
    assert_eq!(s.eagain, mapped);
    assert_eq!(g.stats().eagain, mapped.len() as u64);
    // The referenced pages were deferred, everything else is private.
    assert_eq!(g.pending_count(), 3);
}

#[test]
fn hook_failures_in_both_modes_abort_cleanly() {
    for block_first in [false, true] {
        let (mut g, _refs) = fragmented();
        let s = sweep(&mut g, range(0, 16 * M2), Shareability::Shared, block_first);
        assert!(s.prepares >= 4);
        assert!(g.is_uniform(range(0, 16 * M2), Shareability::Shared));
        assert_eq!(g.range_count(), 1);
    }
}

#[test]
fn idempotent_conversion_calls_no_hook() {
    let (mut g, _refs) = fragmented();
    let before = g.snapshot();
    let mut hook = RecordingHook::new();
    let report = g
        .convert(
            range(3 * M2, 5 * M2),
            Shareability::Shared,
            ConvertMode::default(),
            &mut hook,
        )
        .unwrap();
    assert!(report.is_noop());
    assert!(hook.calls.is_empty());
    assert_eq!(g.snapshot(), before);
    assert_eq!(g.stats().idempotent_conversions, 1);
}

#[test]
fn hook_sees_only_changing_runs_with_the_right_reason() {
    let (mut g, _refs) = fragmented();
    let mut hook = RecordingHook::new();
    let report = g
        .convert(
            range(0, 2 * M2),
            Shareability::Shared,
            ConvertMode { block_first: true },
            &mut hook,
        )
        .unwrap();
    let expected = vec![
        range(0, K4),
        range(3 * K4, M2 - K4),
        range(M2 + 5 * K4, 2 * M2),
    ];
    assert_eq!(report.invalidated, expected);
    assert_eq!(hook.invalidated(), expected);
    for c in &hook.calls {
        if let HookCall::Invalidate(_, ctx) | HookCall::Prepare(_, ctx) = c {
            assert_eq!(ctx.reason, InvalidateReason::ToShared);
            assert!(ctx.block_first);
        }
    }
    // Folios are kept: no split, no free.
    assert_eq!(g.stats().folios_freed.total(), 0);
    assert_eq!(report.pages_committed, 1 + (M2 / K4 - 4) + (M2 / K4 - 5));
}

#[test]
fn invalidation_poison_is_recorded_and_commit_still_happens() {
    let mut g = memfd(2 * M2, PageLevel::Size2M);
    g.get_pfn(gpa(0)).unwrap();
    let mut hook = RecordingHook::new();
    hook.poison_pages.insert(5 * K4);
    hook.poison_pages.insert(M2 + K4); // no folio there: a stray report
    let report = g
        .convert(
            range(0, 2 * M2),
            Shareability::Shared,
            ConvertMode::default(),
            &mut hook,
        )
        .unwrap();
    assert_eq!(report.poisoned, 1);
    assert!(g.is_uniform(range(0, 2 * M2), Shareability::Shared));
    assert!(g.is_poisoned(gpa(5 * K4)));
    assert!(g.host_map(gpa(5 * K4)).is_err());
    assert_eq!(g.stats().stray_poison_reports, 1);
    assert_eq!(g.poisoned_pages(), 1);
}

#[test]
fn out_of_range_is_a_validation_error() {
    let mut g = memfd(2 * M2, PageLevel::Size2M);
    let before = g.snapshot();
    let err = g
        .convert(
            range(M2, 3 * M2),
            Shareability::Shared,
            ConvertMode::default(),
            &mut NoopHook,
        )
        .unwrap_err();
    assert_eq!(err.phase(), ConvertPhase::Validate);
    assert_eq!(err.offset(), None);
    assert_eq!(g.snapshot(), before);
    assert!(g.punch_hole(range(M2, 3 * M2), &mut NoopHook).is_err());
}
