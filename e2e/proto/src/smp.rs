//! The multi-CPU part of the self-test: [`CPUS`] vCPUs run the engine together on
//! `[BASE, END)`, memory nobody accepted before.
//!
//! Every vCPU calls [`Smp::run_cpu`] with its own [`Machine`]; the steps are separated by
//! barriers, and inside a step the vCPUs really run at once:
//!
//! 1. `boot_job`: one [`BootJob`] over `[BASE, EAGER_END)`, a worker per vCPU.
//! 2. `lazy_overlap`: each vCPU asks the [`LazyTracker`] for a 24 MiB range that overlaps its
//!    neighbours' ranges; each then writes a token into its range, and the next vCPU reads it.
//! 3. `ve_race`: for each of [`VE_UNITS`] units, one vCPU accepts the unit through the tracker
//!    while another, as soon as it sees the unit claimed, touches a page of it; when the touch
//!    finds the page pending, the module injects #VE on the second vCPU, whose handler waits
//!    for the first vCPU's acceptance (or, if it comes first, accepts the unit itself).
//! 4. `convert_race`: vCPU 3 converts [`CONVERT`] (two units the overlap step accepted) to
//!    shared and back while vCPUs 0-2 lazily accept every remaining unit, each starting at a
//!    different place, vCPU 1 right above the converted range. The tracker keeps the converted
//!    units accepted (the conversion accepts them again), so nobody else accepts them.
//! 5. `data`: every token written is read back by another vCPU; the converted page reads 0.
//!
//! The outcome of each race depends on timing; what is checked does not: every step succeeds,
//! every unit ends accepted, no token is lost, and (on the host) the module accepted each unit
//! exactly once and its counts equal the image's.

use core::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use accept::abi::{GpaRange, PageLevel};
use accept::acceptor::Acceptor;
use accept::convert::{ConvertPolicy, Converter, Visibility};
use accept::parallel::{BootJob, WorkerProgress};
use accept::tracker::{words_needed, LazyTracker, NoInterrupts, TrackerConfig, UnitState};

use crate::selftest::{Machine, NoPageTables, Summary, Ve};
use crate::wire::MAX_ARGS;

/// vCPUs taking part.
pub const CPUS: usize = 4;
/// Start of the memory the multi-CPU part accepts.
pub const BASE: u64 = 256 << 20;
/// `[BASE, EAGER_END)` is accepted by the boot job.
pub const EAGER_END: u64 = 320 << 20;
/// End of the memory the multi-CPU part accepts.
pub const END: u64 = 512 << 20;
/// Unit of the lazy tracker.
pub const UNIT: u64 = 2 << 20;
/// Units of the lazy tracker.
pub const LAZY_UNITS: u64 = (END - EAGER_END) / UNIT;
/// First unit of the #VE race.
pub const VE_RACE: u64 = 400 << 20;
/// Units raced in the #VE step.
pub const VE_UNITS: u64 = 8;
/// The range converted while others accept lazily: two units the overlap step accepted, right
/// below the unit where vCPU 1 starts accepting in the same step.
pub const CONVERT: (u64, u64) = (EAGER_END + (44 << 20), EAGER_END + (48 << 20));
/// Length of each vCPU's range in the overlap step.
const OVERLAP_LEN: u64 = 24 << 20;
/// Distance between two vCPUs' ranges in the overlap step.
const OVERLAP_STEP: u64 = 8 << 20;
/// Tracker wait bound: a unit another vCPU accepts takes a round trip to the host.
const WAIT_SPINS: u64 = 1 << 36;
/// Tracker state words.
const WORDS: usize = words_needed(LAZY_UNITS);

/// Storage the shared state borrows: put it somewhere every vCPU can reach.
#[derive(Debug)]
pub struct SmpStorage {
    ranges: [GpaRange; 1],
    progress: [WorkerProgress; CPUS],
    words: [AtomicU64; WORDS],
    inflight: [AtomicU64; CPUS],
}

impl SmpStorage {
    /// Fresh storage.
    pub const fn new() -> SmpStorage {
        SmpStorage {
            ranges: [crate::selftest::range(BASE, EAGER_END)],
            progress: [const { WorkerProgress::new() }; CPUS],
            words: [const { AtomicU64::new(0) }; WORDS],
            inflight: [const { AtomicU64::new(0) }; CPUS],
        }
    }
}

impl Default for SmpStorage {
    fn default() -> Self {
        SmpStorage::new()
    }
}

/// A reusable spinning barrier.
#[derive(Debug, Default)]
struct Barrier {
    arrived: AtomicUsize,
    generation: AtomicUsize,
}

impl Barrier {
    fn wait(&self, n: usize) {
        let generation = self.generation.load(Ordering::Acquire);
        if self.arrived.fetch_add(1, Ordering::AcqRel) + 1 == n {
            self.arrived.store(0, Ordering::Relaxed);
            self.generation.fetch_add(1, Ordering::AcqRel);
        } else {
            while self.generation.load(Ordering::Acquire) == generation {
                core::hint::spin_loop();
            }
        }
    }
}

/// The state the vCPUs share.
#[derive(Debug)]
pub struct Smp<'s> {
    acceptor: &'s Acceptor,
    job: BootJob<'s>,
    tracker: LazyTracker<'s>,
    barrier: Barrier,
    passed: AtomicU64,
    failed: AtomicU64,
    ves: AtomicU64,
    ve_handled: AtomicU64,
    ve_meanwhile: AtomicU64,
    map_gpa: AtomicU64,
    map_gpa_retries: AtomicU64,
}

/// The token vCPU `cpu` writes in step `step`.
const fn token(step: u64, cpu: usize) -> u64 {
    0x5A00_0000 | (step << 8) | cpu as u64
}

/// The page vCPU `cpu` writes its overlap-step token to.
const fn overlap_page(cpu: usize) -> u64 {
    EAGER_END + cpu as u64 * OVERLAP_STEP + (cpu as u64 + 1) * 0x1000
}

/// The page touched in unit `k` of the #VE race.
const fn race_page(k: u64) -> u64 {
    VE_RACE + k * UNIT + 0x5000
}

impl<'s> Smp<'s> {
    /// The shared state: a boot job over `[BASE, EAGER_END)` and a tracker with every unit of
    /// `[EAGER_END, END)` unaccepted. `None` when the tracker cannot be built.
    pub fn new(acceptor: &'s Acceptor, storage: &'s SmpStorage) -> Option<Smp<'s>> {
        let tracker = LazyTracker::new(
            acceptor,
            EAGER_END,
            UNIT,
            LAZY_UNITS,
            &storage.words,
            &storage.inflight,
            TrackerConfig {
                max_wait_spins: WAIT_SPINS,
            },
        )
        .ok()?;
        for unit in 0..LAZY_UNITS {
            tracker.mark_unaccepted(unit);
        }
        Some(Smp {
            acceptor,
            job: BootJob::new(&storage.ranges, &storage.progress),
            tracker,
            barrier: Barrier::default(),
            passed: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            ves: AtomicU64::new(0),
            ve_handled: AtomicU64::new(0),
            ve_meanwhile: AtomicU64::new(0),
            map_gpa: AtomicU64::new(0),
            map_gpa_retries: AtomicU64::new(0),
        })
    }

    fn check<M: Machine + ?Sized>(
        &self,
        m: &mut M,
        cpu: usize,
        name: &str,
        ok: bool,
        detail: core::fmt::Arguments<'_>,
    ) {
        let counter = if ok { &self.passed } else { &self.failed };
        counter.fetch_add(1, Ordering::Relaxed);
        m.log(format_args!(
            "cpu{cpu}: test smp_{name}: {} ({detail})",
            if ok { "ok" } else { "FAILED" }
        ));
    }

    fn sync(&self) {
        self.barrier.wait(CPUS);
    }

    /// vCPU `cpu`'s part of every step. All [`CPUS`] vCPUs must call it, each with its own
    /// machine; it returns when all have finished.
    pub fn run_cpu<M: Machine + ?Sized>(&self, cpu: usize, m: &mut M) {
        let mut td = m.tdcall();
        let mut ve = Ve::new(cpu, m.tdcall(), &self.tracker);

        // 1. The boot job, a worker per vCPU.
        let edges = if cpu == 0 {
            self.job.run_edges(&mut td, self.acceptor).map(|_| ())
        } else {
            Ok(())
        };
        self.sync();
        let work = self.job.run(cpu, &mut td, self.acceptor);
        self.sync();
        self.check(
            m,
            cpu,
            "boot_job",
            edges.is_ok() && work.is_ok() && self.job.is_complete(),
            format_args!("worker {work:?}, {} chunks in all", self.job.total_chunks()),
        );

        // 2. Overlapping lazy ranges; a token in each, read back by the next vCPU.
        let start = EAGER_END + cpu as u64 * OVERLAP_STEP;
        let lazy =
            self.tracker
                .accept_range(cpu, &mut td, &mut NoInterrupts, start, start + OVERLAP_LEN);
        let wrote = m.touch(overlap_page(cpu), Some(token(2, cpu)), &mut ve);
        self.sync();
        let next = (cpu + 1) % CPUS;
        let read = m.touch(overlap_page(next), None, &mut ve);
        self.check(
            m,
            cpu,
            "lazy_overlap",
            lazy.is_ok() && wrote == Ok(token(2, cpu)) && read == Ok(token(2, next)),
            format_args!(
                "[{start:#x}, {:#x}): {lazy:?}; cpu{next}'s token {read:?}",
                start + OVERLAP_LEN
            ),
        );
        self.sync();

        // 3. #VE on one vCPU for a unit another is accepting.
        let before = ve.count;
        let mut ok = true;
        for k in 0..VE_UNITS {
            let acceptor_cpu = (k as usize) % CPUS;
            let toucher = (acceptor_cpu + 1 + (k as usize / CPUS)) % CPUS;
            let unit = VE_RACE + k * UNIT;
            if cpu == acceptor_cpu {
                ok &= self
                    .tracker
                    .accept_range(cpu, &mut td, &mut NoInterrupts, unit, unit + 0x1000)
                    .is_ok();
            } else if cpu == toucher {
                // Touch once the other vCPU has claimed the unit, so that the #VE usually
                // arrives while it is accepting (or just after).
                for _ in 0..WAIT_SPINS {
                    if self.tracker.state_of(unit) != UnitState::Unaccepted {
                        break;
                    }
                    core::hint::spin_loop();
                }
                ok &= m.touch(race_page(k), Some(token(3, cpu)), &mut ve) == Ok(token(3, cpu));
            }
        }
        let took = ve.count - before;
        self.sync();
        self.check(
            m,
            cpu,
            "ve_race",
            ok,
            format_args!("{took} #VE taken, last verdict {:?}", ve.last),
        );

        // 4. A conversion racing lazy acceptance of everything left.
        let conv = Converter::new(self.acceptor.gpaw(), ConvertPolicy::default());
        let mut ok = true;
        if cpu == 3 {
            let range = crate::selftest::range(CONVERT.0, CONVERT.1);
            let wrote = m.touch(CONVERT.0 + 0x1000, Some(token(4, cpu)), &mut ve);
            let mut hooks = NoPageTables { platform: &mut *m };
            let shared = crate::selftest::convert_owned(
                &conv,
                &mut td,
                self.acceptor,
                range,
                Visibility::Shared,
                &mut hooks,
            );
            let back = crate::selftest::convert_owned(
                &conv,
                &mut td,
                self.acceptor,
                range,
                Visibility::Private,
                &mut hooks,
            );
            ok = wrote == Ok(token(4, cpu)) && shared.is_ok() && back.is_ok();
            let cs = conv.stats();
            self.map_gpa.fetch_add(cs.map_gpa_calls, Ordering::Relaxed);
            self.map_gpa_retries
                .fetch_add(cs.map_gpa_retries, Ordering::Relaxed);
        }
        let span = END - EAGER_END;
        let from = EAGER_END + (cpu as u64 * span / CPUS as u64) / UNIT * UNIT;
        let a = self
            .tracker
            .accept_range(cpu, &mut td, &mut NoInterrupts, from, END);
        let b = self
            .tracker
            .accept_range(cpu, &mut td, &mut NoInterrupts, EAGER_END, from);
        ok &= a.is_ok() && b.is_ok();
        self.sync();
        let remaining = self.tracker.remaining_bytes();
        self.check(
            m,
            cpu,
            "convert_race",
            ok && remaining == 0,
            format_args!("lazy from {from:#x}: {a:?} {b:?}, {remaining} bytes left unaccepted"),
        );

        // 5. Every token read back by another vCPU; the converted page reads 0.
        let mut ok = true;
        let peer = (cpu + 2) % CPUS;
        ok &= m.touch(overlap_page(peer), None, &mut ve) == Ok(token(2, peer));
        for k in 0..VE_UNITS {
            let acceptor_cpu = (k as usize) % CPUS;
            let toucher = (acceptor_cpu + 1 + (k as usize / CPUS)) % CPUS;
            if toucher != cpu {
                ok &= m.touch(race_page(k), None, &mut ve) == Ok(token(3, toucher));
            }
        }
        let converted = m.touch(CONVERT.0 + 0x1000, None, &mut ve);
        ok &= converted == Ok(0);
        let all = (0..LAZY_UNITS)
            .all(|u| self.tracker.state_of(EAGER_END + u * UNIT) == UnitState::Accepted);
        self.check(
            m,
            cpu,
            "data",
            ok && all,
            format_args!(
                "tokens read back, converted page {converted:?}, all units accepted {all}"
            ),
        );

        self.ves.fetch_add(ve.count, Ordering::Relaxed);
        self.ve_handled.fetch_add(ve.handled, Ordering::Relaxed);
        self.ve_meanwhile.fetch_add(ve.meanwhile, Ordering::Relaxed);
        self.sync();
    }

    /// The counts of the whole run, once every vCPU has returned from [`Smp::run_cpu`].
    pub fn summary(&self) -> Summary {
        let st = self.acceptor.stats();
        let mut accepted = [0; 3];
        for (i, l) in PageLevel::LARGEST_FIRST.iter().rev().enumerate() {
            accepted[i] = st.level(*l).accepted;
        }
        Summary {
            passed: self.passed.load(Ordering::Relaxed),
            failed: self.failed.load(Ordering::Relaxed),
            accepted,
            accept_calls: st.total_calls(),
            ves: self.ves.load(Ordering::Relaxed),
            map_gpa: (
                self.map_gpa.load(Ordering::Relaxed),
                self.map_gpa_retries.load(Ordering::Relaxed),
            ),
            lazy_units: self.tracker.stats().units_accepted,
            eager_bytes: EAGER_END - BASE,
        }
    }

    /// #VEs whose handler accepted the unit, and #VEs that found it accepted by another vCPU.
    pub fn ve_verdicts(&self) -> (u64, u64) {
        (
            self.ve_handled.load(Ordering::Relaxed),
            self.ve_meanwhile.load(Ordering::Relaxed),
        )
    }

    /// The counts DONE carries: the [`Summary`] counts, then the #VE verdicts
    /// ([`Smp::ve_verdicts`]).
    pub fn done_counts(&self) -> ([u64; MAX_ARGS - 1], usize) {
        let (mut counts, n) = self.summary().counts();
        let (handled, meanwhile) = self.ve_verdicts();
        counts[n] = handled;
        counts[n + 1] = meanwhile;
        (counts, n + 2)
    }

    /// Tests each vCPU runs.
    pub const TESTS_PER_CPU: u64 = 5;
}
