//! Model checking (shuttle) of conversions running concurrently with acceptance.
//!
//! The guest engine runs unchanged: [`Converter::convert`] on one vCPU (private -> shared ->
//! private, which re-accepts), [`LazyTracker::accept_range`] and [`Acceptor::accept_range`] on
//! others. The module and the host are a model behind a `shuttle::sync::Mutex`: each 4K page is
//! pending (offered, not accepted), accepted, or shared; MapGPA converts in 2 MiB chunks and
//! answers RETRY between them, so that every chunk boundary is a scheduling point; ACCEPT
//! answers as the module does (ALREADY_ACCEPTED, PAGE_SIZE_MISMATCH for a 2M request over a
//! range the host holds at 4K, an EPT failure for a shared page).
//!
//! Checked over thousands of schedules (random and PCT): no page is ever asked to be accepted
//! twice, every call returns, conversions complete, and the final states agree: the model,
//! the tracker and the converted range.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tdmem_sim::convert::convert_simulated;

use accept::abi::{
    GhciStatus, Gpa, GpaRange, Gpaw, MapGpaOutcome, PageLevel, StatusCode, TdxStatus, VeInfo,
    VpInfo,
};
use accept::acceptor::{AcceptPolicy, Acceptor};
use accept::convert::{ConvertHooks, ConvertPolicy, Converter, HookError, Visibility};
use accept::tracker::{words_needed, CpuHooks, LazyTracker, StateWord, TrackerConfig, UnitState};
use accept::Tdcall;
use shuttle::sync::Mutex;

const K4: u64 = 4096;
const M2: u64 = 2 << 20;
const UNITS: u64 = 4;
const SHARED: u64 = 1 << 47;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Page {
    Pending,
    Accepted,
    Shared,
}

#[derive(Debug)]
struct Model {
    pages: Vec<Page>,
    /// 2M units the host maps at 4K (a sub-2M conversion went through them).
    split: Vec<bool>,
    /// Successful ACCEPTs: (gpa, level).
    accepted: Vec<(u64, PageLevel)>,
    /// ACCEPTs of a page already accepted, or of a shared page: the engine must never ask.
    bad_requests: Vec<String>,
}

/// One vCPU's view of the modelled module and host.
struct Td {
    model: Arc<Mutex<Model>>,
}

impl Tdcall for Td {
    fn accept(&mut self, gpa: Gpa, level: PageLevel) -> TdxStatus {
        let mut m = self.model.lock().expect("model");
        let first = (gpa.as_u64() / K4) as usize;
        let n = level.pages_4k() as usize;
        let Some(pages) = m.pages.get(first..first + n) else {
            return StatusCode::OperandInvalid.with_operand(1);
        };
        if pages.contains(&Page::Shared) {
            m.bad_requests
                .push(format!("ACCEPT {gpa} {level:?} of a shared page"));
            return StatusCode::EptWalkFailed.with_operand(1);
        }
        if level == PageLevel::Size1G {
            return StatusCode::OperandInvalid.with_operand(1);
        }
        if level == PageLevel::Size2M && m.split[first / 512] {
            return StatusCode::PageSizeMismatch.with_operand(1);
        }
        if pages.contains(&Page::Accepted) {
            m.bad_requests
                .push(format!("ACCEPT {gpa} {level:?} of an accepted page"));
            return StatusCode::PageAlreadyAccepted.with_operand(u32::from(level.index()));
        }
        for p in &mut m.pages[first..first + n] {
            *p = Page::Accepted;
        }
        m.accepted.push((gpa.as_u64(), level));
        TdxStatus::SUCCESS
    }

    fn map_gpa(&mut self, start: u64, len: u64) -> MapGpaOutcome {
        let bit = start & SHARED;
        let addr = start & !SHARED;
        let end = addr + len;
        let chunk_end = ((addr / M2) + 1) * M2;
        let stop = chunk_end.min(end);
        {
            let mut m = self.model.lock().expect("model");
            let to = if bit != 0 {
                Page::Shared
            } else {
                Page::Pending
            };
            if addr % M2 != 0 || stop % M2 != 0 {
                m.split[(addr / M2) as usize] = true;
            }
            for p in (addr / K4)..(stop / K4) {
                let page = &mut m.pages[p as usize];
                // Converting to private a page that is private already changes nothing.
                if to == Page::Shared || *page == Page::Shared {
                    *page = to;
                }
            }
        }
        let (status, resume) = if stop < end {
            (GhciStatus::Retry, stop | bit)
        } else {
            (GhciStatus::Success, 0)
        };
        MapGpaOutcome {
            tdcall: TdxStatus::SUCCESS,
            status,
            resume_gpa: resume,
        }
    }

    fn ve_info(&mut self) -> Result<VeInfo, TdxStatus> {
        Err(StatusCode::NoValidVeInfo.status())
    }

    fn vp_info(&mut self) -> Result<VpInfo, TdxStatus> {
        Err(StatusCode::OperandInvalid.status())
    }
}

/// Page tables: nothing to do but to be a scheduling point.
struct Hooks;

impl ConvertHooks for Hooks {
    type Error = HookError;
    fn set_visibility(&mut self, _range: GpaRange, _to: Visibility) -> Result<(), HookError> {
        shuttle::thread::yield_now();
        Ok(())
    }

    fn flush_tlb(&mut self, _range: GpaRange) {}
}

/// The tracker's state words as shuttle atomics.
struct Word(shuttle::sync::atomic::AtomicU64);

impl StateWord for Word {
    fn load(&self, order: Ordering) -> u64 {
        self.0.load(order)
    }
    fn store(&self, value: u64, order: Ordering) {
        self.0.store(value, order)
    }
    fn compare_exchange_weak(
        &self,
        current: u64,
        new: u64,
        success: Ordering,
        failure: Ordering,
    ) -> Result<u64, u64> {
        self.0.compare_exchange_weak(current, new, success, failure)
    }
}

struct Cpu;

impl CpuHooks for Cpu {
    type IrqGuard = ();
    fn mask_interrupts(&mut self) {}
    fn relax(&mut self) {
        shuttle::thread::yield_now();
    }
}

struct World {
    model: Arc<Mutex<Model>>,
    acceptor: Acceptor,
    converter: Converter,
    tracker: LazyTracker<'static, Word>,
}

fn leak<T>(v: Vec<T>) -> &'static [T] {
    Box::leak(v.into_boxed_slice())
}

/// Units `< accepted_units` are accepted at boot; the others are pending and unaccepted in the
/// tracker.
fn world(accepted_units: u64, vcpus: usize) -> &'static World {
    let acceptor = Acceptor::new(
        Gpaw::Bits48,
        AcceptPolicy {
            max_level: PageLevel::Size2M,
            ..AcceptPolicy::OURS
        },
    );
    let pages = (0..UNITS * 512)
        .map(|p| {
            if p / 512 < accepted_units {
                Page::Accepted
            } else {
                Page::Pending
            }
        })
        .collect();
    let model = Arc::new(Mutex::new(Model {
        pages,
        split: vec![false; UNITS as usize],
        accepted: Vec::new(),
        bad_requests: Vec::new(),
    }));
    let acceptor: &'static Acceptor = Box::leak(Box::new(acceptor));
    let words = leak(
        (0..words_needed(UNITS))
            .map(|_| Word(shuttle::sync::atomic::AtomicU64::new(0)))
            .collect(),
    );
    let slots = leak((0..vcpus).map(|_| AtomicU64::new(0)).collect());
    let tracker = LazyTracker::new(
        acceptor,
        0,
        M2,
        UNITS,
        words,
        slots,
        TrackerConfig {
            max_wait_spins: 100_000,
        },
    )
    .expect("tracker");
    for u in accepted_units..UNITS {
        tracker.mark_unaccepted(u);
    }
    Box::leak(Box::new(World {
        model,
        acceptor: Acceptor::new(
            Gpaw::Bits48,
            AcceptPolicy {
                max_level: PageLevel::Size2M,
                ..AcceptPolicy::OURS
            },
        ),
        converter: Converter::new(Gpaw::Bits48, ConvertPolicy::default()),
        tracker,
    }))
}

fn td(w: &World) -> Td {
    Td {
        model: w.model.clone(),
    }
}

fn range(s: u64, e: u64) -> GpaRange {
    GpaRange::new(s, e).expect("range")
}

fn assert_no_page_accepted_twice(m: &Model) {
    let mut log = m.accepted.clone();
    let n = log.len();
    log.sort_unstable();
    log.dedup();
    assert_eq!(log.len(), n, "a page was accepted twice: {:?}", m.accepted);
}

fn check_final(w: &World) {
    let m = w.model.lock().expect("model");
    assert!(m.bad_requests.is_empty(), "{:?}", m.bad_requests);
    assert_no_page_accepted_twice(&m);
    for (i, p) in m.pages.iter().enumerate() {
        assert_eq!(*p, Page::Accepted, "page {:#x}", i as u64 * K4);
    }
    for u in 0..UNITS {
        assert_eq!(w.tracker.unit_state(u), UnitState::Accepted, "unit {u}");
    }
}

/// vCPU 0 converts a sub-2M range of accepted unit 1 to shared and back (which re-accepts it
/// at 4K); vCPUs 1 and 2 lazily accept ranges that overlap the converted one and the
/// unaccepted units 2 and 3.
fn convert_while_lazily_accepting() {
    let w = world(2, 3);
    let a = range(M2 + 16 * K4, M2 + 48 * K4);
    let t0 = shuttle::thread::spawn(move || {
        let mut t = td(w);
        convert_simulated(
            &w.converter,
            &mut t,
            &w.acceptor,
            a,
            Visibility::Shared,
            &mut Hooks,
        )
        .map_err(|e| e.to_string())?;
        convert_simulated(
            &w.converter,
            &mut t,
            &w.acceptor,
            a,
            Visibility::Private,
            &mut Hooks,
        )
        .map_err(|e| e.to_string())
    });
    let t1 = shuttle::thread::spawn(move || {
        w.tracker
            .accept_range(1, &mut td(w), &mut Cpu, M2 - K4, 3 * M2 + 5)
            .map_err(|e| e.to_string())
    });
    let t2 = shuttle::thread::spawn(move || {
        w.tracker
            .accept_range(2, &mut td(w), &mut Cpu, M2 + 20 * K4, 4 * M2 - K4)
            .map_err(|e| e.to_string())
    });
    for h in [t0, t1, t2] {
        h.join().expect("join").expect("vCPU");
    }
    check_final(w);
    // The converted range was accepted again at 4K (the host split that unit), units 2 and 3
    // once each at 2M.
    let m = w.model.lock().expect("model");
    assert_eq!(
        m.accepted
            .iter()
            .filter(|&&(_, l)| l == PageLevel::Size2M)
            .count(),
        2
    );
    assert_eq!(m.accepted.len(), 2 + 32);
}

/// Two vCPUs convert adjacent sub-ranges of the same 2M unit (shared and back) while a third
/// lazily accepts units 2 and 3 through the tracker.
fn adjacent_conversions_and_accept() {
    let w = world(2, 3);
    let conv = |s: u64, e: u64| {
        shuttle::thread::spawn(move || {
            let mut t = td(w);
            let r = range(s, e);
            convert_simulated(
                &w.converter,
                &mut t,
                &w.acceptor,
                r,
                Visibility::Shared,
                &mut Hooks,
            )
            .map_err(|e| e.to_string())?;
            convert_simulated(
                &w.converter,
                &mut t,
                &w.acceptor,
                r,
                Visibility::Private,
                &mut Hooks,
            )
            .map_err(|e| e.to_string())
        })
    };
    let t0 = conv(0, 8 * K4);
    let t1 = conv(8 * K4, 24 * K4);
    let t2 = shuttle::thread::spawn(move || {
        w.tracker
            .accept_range(2, &mut td(w), &mut Cpu, 2 * M2 + K4, 2 * M2 + 2 * K4)
            .map_err(|e| e.to_string())?;
        w.tracker
            .accept_range(2, &mut td(w), &mut Cpu, 3 * M2, 3 * M2 + K4)
            .map_err(|e| e.to_string())
    });
    for h in [t0, t1, t2] {
        h.join().expect("join").expect("vCPU");
    }
    check_final(w);
}

/// vCPU 0 converts a sub-2M range of unit 2, which the tracker still counts as unaccepted, to
/// shared and back, after making it accepted through the tracker as a conversion must
/// (`LazyTracker::prepare_conversion`, as Linux accepts memory before handing it out); vCPU 1
/// lazily accepts the same unit at the same time. Nobody asks for a page twice or for a shared
/// page, and the unit ends accepted.
fn convert_unaccepted_unit_while_lazily_accepting_it() {
    let w = world(2, 2);
    let a = range(2 * M2 + 16 * K4, 2 * M2 + 48 * K4);
    let t0 = shuttle::thread::spawn(move || {
        let mut t = td(w);
        w.tracker
            .prepare_conversion(0, &mut t, &mut Cpu, a)
            .map_err(|e| e.to_string())?;
        convert_simulated(
            &w.converter,
            &mut t,
            &w.acceptor,
            a,
            Visibility::Shared,
            &mut Hooks,
        )
        .map_err(|e| e.to_string())?;
        convert_simulated(
            &w.converter,
            &mut t,
            &w.acceptor,
            a,
            Visibility::Private,
            &mut Hooks,
        )
        .map_err(|e| e.to_string())
    });
    let t1 = shuttle::thread::spawn(move || {
        w.tracker
            .accept_range(
                1,
                &mut td(w),
                &mut Cpu,
                2 * M2 + 100 * K4,
                2 * M2 + 101 * K4,
            )
            .map_err(|e| e.to_string())
    });
    for h in [t0, t1] {
        h.join().expect("join").expect("vCPU");
    }
    assert_eq!(w.tracker.unit_state(2), UnitState::Accepted);
    w.tracker
        .accept_range(0, &mut td(w), &mut Cpu, 0, 4 * M2 - K4)
        .expect("the rest");
    check_final(w);
}

#[test]
fn shuttle_random_convert_unaccepted_unit_while_lazily_accepting_it() {
    shuttle::check_random(convert_unaccepted_unit_while_lazily_accepting_it, 2000);
}

#[test]
fn shuttle_pct_convert_unaccepted_unit_while_lazily_accepting_it() {
    shuttle::check_pct(convert_unaccepted_unit_while_lazily_accepting_it, 1000, 3);
}

/// Regression (issue 14, defect 1): memory the tracker still counts as unaccepted is converted
/// to shared and back without the tracker (the conversion accepts it); the next lazy
/// acceptance of the unit, and a #VE elsewhere in it, find those pages accepted. The unit must
/// not become unusable: it is accepted around them, and no page is accepted twice.
#[test]
fn conversion_behind_the_trackers_back_leaves_the_unit_usable() {
    shuttle::check_random(
        || {
            let w = world(2, 1);
            let a = range(2 * M2 + 16 * K4, 2 * M2 + 48 * K4);
            let mut t = td(w);
            for to in [Visibility::Shared, Visibility::Private] {
                convert_simulated(&w.converter, &mut t, &w.acceptor, a, to, &mut Hooks)
                    .expect("converted");
            }
            w.tracker
                .accept_range(0, &mut t, &mut Cpu, 2 * M2 + 20 * K4, 2 * M2 + 21 * K4)
                .expect("the unit is accepted around the converted pages");
            // A #VE elsewhere in the unit goes through the tracker too.
            w.tracker
                .accept_unit(0, &mut t, &mut Cpu, 2)
                .expect("the unit is usable");
            assert_eq!(w.tracker.unit_state(2), UnitState::Accepted);
            {
                let m = w.model.lock().expect("model");
                // The only refused requests are ALREADY_ACCEPTED for the converted pages.
                assert!(
                    m.bad_requests
                        .iter()
                        .all(|r| r.contains("of an accepted page")),
                    "{:?}",
                    m.bad_requests
                );
                assert_eq!(m.bad_requests.len(), 32);
                assert_no_page_accepted_twice(&m);
            }
            w.model.lock().expect("model").bad_requests.clear();
            w.tracker
                .accept_range(0, &mut t, &mut Cpu, 0, 4 * M2 - K4)
                .expect("the rest");
            check_final(w);
        },
        1,
    );
}

#[test]
fn shuttle_random_convert_while_lazily_accepting() {
    shuttle::check_random(convert_while_lazily_accepting, 2000);
}

#[test]
fn shuttle_pct_convert_while_lazily_accepting() {
    shuttle::check_pct(convert_while_lazily_accepting, 1000, 3);
}

#[test]
fn shuttle_random_adjacent_conversions_and_accept() {
    shuttle::check_random(adjacent_conversions_and_accept, 2000);
}

#[test]
fn shuttle_pct_adjacent_conversions_and_accept() {
    shuttle::check_pct(adjacent_conversions_and_accept, 1000, 3);
}

/// Negative control: without the tracker, two vCPUs accepting the same unit do ask for a page
/// twice, and the model sees it.
#[test]
#[should_panic(expected = "accepted page")]
fn shuttle_model_catches_a_double_accept_without_the_tracker() {
    shuttle::check_random(
        || {
            let w = world(2, 2);
            let hs: Vec<_> = (0..2)
                .map(|_| {
                    shuttle::thread::spawn(move || {
                        let _ = w.acceptor.accept_range(&mut td(w), range(2 * M2, 3 * M2));
                    })
                })
                .collect();
            for h in hs {
                h.join().expect("join");
            }
            check_final(w);
        },
        100,
    );
}

/// Regression (issue 14, defect 2): a to-private conversion over a range that is not wholly
/// shared (private pages after the shared ones). The private pages answer ALREADY_ACCEPTED:
/// they were private, so they are kept, the conversion completes, and nothing is given to the
/// host (the old rollback made the whole range shared, destroying them).
#[test]
fn to_private_over_a_partly_private_range_keeps_the_private_pages() {
    shuttle::check_random(
        || {
            let w = world(UNITS, 1);
            let mut t = td(w);
            let shared_part = range(M2, M2 + 8 * K4);
            convert_simulated(
                &w.converter,
                &mut t,
                &w.acceptor,
                shared_part,
                Visibility::Shared,
                &mut Hooks,
            )
            .expect("to shared");
            let whole = range(M2, M2 + 16 * K4);
            convert_simulated(
                &w.converter,
                &mut t,
                &w.acceptor,
                whole,
                Visibility::Private,
                &mut Hooks,
            )
            .expect("the private pages count as converted");
            let mut m = w.model.lock().expect("model");
            // The private pages were asked once each and answered ALREADY_ACCEPTED.
            assert_eq!(m.bad_requests.len(), 8, "{:?}", m.bad_requests);
            m.bad_requests.clear();
            assert!(m.pages.iter().all(|&p| p == Page::Accepted));
            assert_no_page_accepted_twice(&m);
        },
        1,
    );
}
