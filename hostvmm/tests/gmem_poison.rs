//! Error pages (seed 000) across randomized runs of faults, conversions, hole punches, host
//! users, poison reports and other users of the same pool: a poisoned frame is never handed out
//! again, failed calls change nothing, and every count matches.

use std::collections::BTreeSet;

use accept::abi::{Gpa, GpaRange, PageLevel};
use hostvmm::gmem::{
    ConvertMode, FolioPool, GmemConfig, GuestMemfd, Hpa, RecordingHook, RefToken, Shareability,
};
use proptest::prelude::*;

const K4: u64 = PageLevel::Size4K.size();
const M2: u64 = PageLevel::Size2M.size();
const PAGES: u64 = 4 * M2 / K4;

#[derive(Debug, Clone)]
enum Op {
    Fault(u64),
    HostMap(u64),
    HostUnmap(u64),
    GetRef(u64),
    PutRef(usize),
    Convert {
        start: u64,
        len: u64,
        shared: bool,
        block_first: bool,
        poison: Vec<u64>,
    },
    Punch {
        start: u64,
        len: u64,
        poison: Vec<u64>,
    },
    Poison(u64),
    ForeignAlloc(bool),
    ForeignFree(usize),
    /// The host drops every mapping and reference.
    ReleaseAll,
}

/// Pages clustered on a few hot spots so that operations collide.
fn page() -> impl Strategy<Value = u64> {
    prop_oneof![
        0..PAGES,
        (0..4u64, 0..8u64).prop_map(|(f, i)| f * 512 + i),
        (0..4u64, 0..8u64).prop_map(|(f, i)| f * 512 + 504 + i),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    let len = prop_oneof![1..4u64, 1..600u64, Just(512u64), Just(PAGES)];
    prop_oneof![
        4 => page().prop_map(Op::Fault),
        2 => page().prop_map(Op::HostMap),
        1 => page().prop_map(Op::HostUnmap),
        2 => page().prop_map(Op::GetRef),
        2 => any::<usize>().prop_map(Op::PutRef),
        4 => (page(), len.clone(), any::<bool>(), any::<bool>(), proptest::collection::vec(0..600u64, 0..3))
            .prop_map(|(start, len, shared, block_first, poison)| Op::Convert { start, len, shared, block_first, poison }),
        2 => (page(), len, proptest::collection::vec(0..600u64, 0..3))
            .prop_map(|(start, len, poison)| Op::Punch { start, len, poison }),
        2 => page().prop_map(Op::Poison),
        2 => any::<bool>().prop_map(Op::ForeignAlloc),
        1 => any::<usize>().prop_map(Op::ForeignFree),
        1 => Just(Op::ReleaseAll),
    ]
}

fn gpa(page: u64) -> Gpa {
    Gpa::try_new(page * K4).unwrap()
}

fn range(start: u64, len: u64) -> GpaRange {
    let end = (start + len).min(PAGES);
    GpaRange::new(start * K4, end.max(start + 1) * K4).unwrap()
}

struct Run {
    g: GuestMemfd,
    refs: Vec<RefToken>,
    foreign: Vec<(Hpa, PageLevel)>,
    /// Every frame ever seen poisoned.
    ever_poisoned: BTreeSet<Hpa>,
    /// Poison events reported by the calls (new poison only).
    poison_events: u64,
}

impl Run {
    fn new(level: PageLevel) -> Run {
        // A pool barely larger than the file, so that frames get reused.
        let pool = FolioPool::new(1 << 30, 6 * M2).unwrap();
        let g = GuestMemfd::new(GmemConfig::new(4 * M2, level), pool).unwrap();
        Run {
            g,
            refs: Vec::new(),
            foreign: Vec::new(),
            ever_poisoned: BTreeSet::new(),
            poison_events: 0,
        }
    }

    fn handed_out(&self, hpa: Hpa, level: PageLevel) {
        let end = Hpa::try_new(hpa.as_u64() + level.size()).unwrap();
        assert!(
            self.ever_poisoned.range(hpa..end).next().is_none(),
            "poisoned frame handed out again in {hpa}+{level}"
        );
        assert!(!self.g.with_pool(|p| p.overlaps_retired(hpa, level)));
    }

    fn hook(&self, poison: &[u64], start: u64) -> RecordingHook {
        let mut hook = RecordingHook::new();
        hook.poison_pages = poison.iter().map(|p| (start + p) * K4).collect();
        hook
    }

    /// The fault path's one-step lookup agrees with `get_pfn` and `max_private_level`.
    fn fault_pfn(&mut self, p: u64) -> bool {
        let level = self.g.max_private_level(gpa(p));
        match self.g.fault_pfn(gpa(p)) {
            Ok((info, got)) => {
                self.handed_out(info.hpa, PageLevel::Size4K);
                assert_eq!(level, Ok(got), "max_private_level of page {p}");
                let after = self.g.snapshot();
                assert_eq!(self.g.get_pfn(gpa(p)), Ok(info), "get_pfn of page {p}");
                assert_eq!(
                    self.g.snapshot(),
                    after,
                    "get_pfn after fault_pfn changed the file"
                );
                false
            }
            Err(e) => {
                assert_eq!(self.g.get_pfn(gpa(p)), Err(e), "get_pfn of page {p}");
                true
            }
        }
    }

    fn apply(&mut self, op: &Op) {
        let before = self.g.snapshot();
        let failed = match op {
            Op::Fault(p) if p % 2 == 1 => self.fault_pfn(*p),
            Op::Fault(p) => match self.g.get_pfn(gpa(*p)) {
                Ok(info) => {
                    self.handed_out(info.hpa, PageLevel::Size4K);
                    assert!(!self.g.is_poisoned(gpa(*p)));
                    false
                }
                Err(_) => true,
            },
            Op::HostMap(p) => match self.g.host_map(gpa(*p)) {
                Ok(hpa) => {
                    self.handed_out(hpa, PageLevel::Size4K);
                    false
                }
                Err(_) => true,
            },
            Op::HostUnmap(p) => self.g.host_unmap(gpa(*p)).is_err(),
            Op::GetRef(p) => match self.g.get_ref(gpa(*p)) {
                Ok(t) => {
                    self.refs.push(t);
                    false
                }
                Err(_) => true,
            },
            Op::PutRef(i) => {
                if self.refs.is_empty() {
                    return;
                }
                let t = self.refs.swap_remove(i % self.refs.len());
                self.g.put_ref(t).unwrap();
                false
            }
            Op::Convert {
                start,
                len,
                shared,
                block_first,
                poison,
            } => {
                let to = if *shared {
                    Shareability::Shared
                } else {
                    Shareability::Private
                };
                let mut hook = self.hook(poison, *start);
                let mode = ConvertMode {
                    block_first: *block_first,
                };
                match self.g.convert(range(*start, *len), to, mode, &mut hook) {
                    Ok(report) => {
                        self.poison_events += report.poisoned;
                        false
                    }
                    Err(_) => true,
                }
            }
            Op::Punch { start, len, poison } => {
                let mut hook = self.hook(poison, *start);
                match self.g.punch_hole(range(*start, *len), &mut hook) {
                    Ok(report) => {
                        self.poison_events += report.poisoned;
                        false
                    }
                    Err(_) => true,
                }
            }
            Op::Poison(p) => match self.g.poison(gpa(*p)) {
                Ok(newly) => {
                    self.poison_events += u64::from(newly);
                    false
                }
                Err(_) => true,
            },
            Op::ForeignAlloc(huge) => {
                let level = if *huge {
                    PageLevel::Size2M
                } else {
                    PageLevel::Size4K
                };
                if let Ok(hpa) = self.g.pool_mut().alloc(level) {
                    self.handed_out(hpa, level);
                    self.foreign.push((hpa, level));
                }
                return;
            }
            Op::ReleaseAll => {
                self.release_all();
                return;
            }
            Op::ForeignFree(i) => {
                if !self.foreign.is_empty() {
                    let (hpa, level) = self.foreign.swap_remove(i % self.foreign.len());
                    self.g.pool_mut().free(hpa, level, &[]).unwrap();
                }
                return;
            }
        };
        if failed {
            assert_eq!(self.g.snapshot(), before, "a failed {op:?} changed state");
        }
    }

    fn release_all(&mut self) {
        while let Some(t) = self.refs.pop() {
            self.g.put_ref(t).unwrap();
        }
        for (p, h) in self.g.snapshot().host_refs {
            for _ in 0..h.maps {
                self.g.host_unmap(p).unwrap();
            }
        }
    }

    fn check(&mut self) {
        // Frames poisoned and freed within one call are only seen retired.
        let live: BTreeSet<Hpa> = self.g.live_poisoned_frames().into_iter().collect();
        self.ever_poisoned.extend(live.iter().copied());
        self.ever_poisoned
            .extend(self.g.with_pool(FolioPool::snapshot).retired);
        let st = self.g.stats();
        let pool = self.g.with_pool(FolioPool::clone);
        assert_eq!(st.poisoned_pages, self.poison_events);
        assert_eq!(st.poisoned_pages, self.g.poisoned_pages());
        assert_eq!(
            st.poisoned_pages,
            self.g.live_poisoned_pages() + st.leaked_frames
        );
        assert_eq!(st.leaked_frames, pool.retired_frames());
        // Distinct frames: a poisoned frame was never reused and poisoned again.
        assert_eq!(self.ever_poisoned.len() as u64, st.poisoned_pages);
        for hpa in &self.ever_poisoned {
            assert!(
                live.contains(hpa) || pool.is_retired(*hpa),
                "{hpa} poisoned, neither live nor retired"
            );
        }
        for f in self.g.snapshot().folios {
            assert!(!pool.overlaps_retired(f.info.hpa, f.info.level));
        }
        assert_eq!(
            st.folios_allocated.total() - st.folios_freed.total(),
            self.g.folio_count() as u64
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn poisoned_frames_never_come_back(huge in any::<bool>(), ops in proptest::collection::vec(op(), 1..80)) {
        let level = if huge { PageLevel::Size2M } else { PageLevel::Size4K };
        let mut run = Run::new(level);
        for op in &ops {
            run.apply(op);
            run.check();
        }
        // Truncate everything: all folios go, every poisoned frame is leaked, none reused.
        run.release_all();
        let all = GpaRange::new(0, 4 * M2).unwrap();
        run.g.punch_hole(all, &mut RecordingHook::new()).unwrap();
        run.check();
        prop_assert_eq!(run.g.folio_count(), 0);
        prop_assert_eq!(run.g.stats().leaked_frames, run.g.stats().poisoned_pages);
        // Drain the pool: nothing it hands out is poisoned.
        while let Ok(hpa) = run.g.pool_mut().alloc(PageLevel::Size4K) {
            run.handed_out(hpa, PageLevel::Size4K);
        }
    }
}

#[test]
fn a_poisoned_2m_folio_leaks_one_frame_and_recycles_the_rest() {
    let mut run = Run::new(PageLevel::Size2M);
    run.apply(&Op::Fault(0));
    run.apply(&Op::Poison(7));
    run.apply(&Op::Poison(300));
    run.check();
    run.apply(&Op::Punch {
        start: 0,
        len: 512,
        poison: vec![],
    });
    run.check();
    assert_eq!(run.g.stats().leaked_frames, 2);
    let mut n = 0;
    while let Ok(hpa) = run.g.pool_mut().alloc(PageLevel::Size4K) {
        run.handed_out(hpa, PageLevel::Size4K);
        n += 1;
    }
    assert_eq!(n, 6 * 512 - 2);
}

#[test]
fn long_deterministic_run_exercises_poison_leaks_and_reuse() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;

    let mut runner = TestRunner::deterministic();
    for level in [PageLevel::Size4K, PageLevel::Size2M] {
        let mut run = Run::new(level);
        let mut handed = 0u64;
        for _ in 0..700 {
            let op = op().new_tree(&mut runner).unwrap().current();
            if matches!(op, Op::Fault(_)) {
                handed += 1;
            }
            run.apply(&op);
            run.check();
        }
        let st = run.g.stats();
        assert!(st.poisoned_pages >= 5, "{level}: {st:?}");
        assert!(st.leaked_frames >= 1, "{level}: {st:?}");
        assert!(st.folios_freed.total() >= 3, "{level}: {st:?}");
        assert!(handed > 100);
    }
}
