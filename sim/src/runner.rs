//! Running a [`SimConfig`]: builds the host and the guest's shared state, runs the vCPUs and
//! the scenario, checks the invariants and assembles the [`Report`].

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use accept::abi::{GpaRange, PageLevel};
use accept::acceptor::Acceptor;
use accept::convert::Converter;
use accept::parallel::{BootJob, WorkerProgress};
use accept::tracker::{words_needed, LazyTracker};
use accept::unaccepted::{build_table, UnacceptedTable};
use hostvmm::vmm::{Host, HostConfig};

use crate::cost::CostTable;
use crate::sched::{self, Mode, Scheduler, Switch};
use crate::vcpu::{self, SimVcpu};
use crate::{
    lock, mapping_totals, optimal_in, report, scenario, Belief, GmemBackend, Guest, MappingTotals,
    ModuleKicker, Report, Sample, Sampler, SimConfig, SimError, SimTd, ViolationLog,
};

/// Parallel mode: the guest_memfd model's per-thread folio lists are refilled this many folios
/// at a time (128 MiB of 2M folios), so vCPU threads faulting at once meet at the folio pool's
/// lock once per batch rather than at every fault, as the kernel's per-CPU page lists make them.
/// Deterministic mode keeps the lists off: one thread gains nothing from them.
const PARALLEL_FOLIO_BATCH: usize = 64;

/// Marks a parallel-mode vCPU finished when dropped (also when its thread panics).
struct Finish<'s>(&'s Scheduler, usize);

impl Drop for Finish<'_> {
    fn drop(&mut self) {
        self.0.finish(self.1);
    }
}

/// Runs one simulation.
///
/// `progress(done, total)` is called from the vCPU threads as scenario steps complete.
///
/// # Errors
/// [`SimError`] for an unusable configuration. Invariant violations and a TD the host killed
/// are results, in the [`Report`].
pub fn run(config: &SimConfig, progress: &(dyn Fn(u64, u64) + Sync)) -> Result<Report, SimError> {
    run_with(config, progress, |_| {})
}

/// As [`run`], and lets `inspect` look at the finished TD (to draw it, for example) before it
/// is dropped.
///
/// # Errors
/// As [`run`].
pub fn run_with(
    config: &SimConfig,
    progress: &(dyn Fn(u64, u64) + Sync),
    inspect: impl FnOnce(&SimTd<'_>),
) -> Result<Report, SimError> {
    run_inner(config, progress, None, inspect)
}

/// As [`run_with`], and hands `sink` a [`Sample`] of the private mapping every `every` scenario
/// steps (counted over all vCPUs, taken by the vCPU that completes the step, which holds the
/// scheduler's baton) and once more at the end, after the host's final merge pass. Sampling
/// reads state only: the counts are those of the same run without it.
///
/// # Errors
/// As [`run`].
pub fn run_sampled(
    config: &SimConfig,
    progress: &(dyn Fn(u64, u64) + Sync),
    every: u64,
    sink: &(dyn Fn(Sample) + Sync),
    inspect: impl FnOnce(&SimTd<'_>),
) -> Result<Report, SimError> {
    run_inner(config, progress, Some(Sampler { every, sink }), inspect)
}

/// A host over the kernel's guest_memfd.
#[cfg(feature = "kernel-gmem")]
fn kernel_host(config: HostConfig, kicker: Arc<ModuleKicker>) -> Result<Host, SimError> {
    let backend = hostvmm::gmem::KernelBackend::new(config.memory, hostvmm::vmm::GUEST_HPA_BASE)
        .map_err(|e| SimError::Config(format!("--gmem kernel: {e}")))?;
    Ok(Host::with_backend(
        config,
        kicker,
        Arc::new(crossbeam_utils::sync::ShardedLock::new(backend)),
    )?)
}

/// Without the `kernel-gmem` feature there is no kernel backend.
#[cfg(not(feature = "kernel-gmem"))]
fn kernel_host(_config: HostConfig, _kicker: Arc<ModuleKicker>) -> Result<Host, SimError> {
    Err(SimError::Config(
        "--gmem kernel: hostvmm was built without the `kernel-gmem` feature".into(),
    ))
}

fn run_inner(
    config: &SimConfig,
    progress: &(dyn Fn(u64, u64) + Sync),
    sampler: Option<Sampler<'_>>,
    inspect: impl FnOnce(&SimTd<'_>),
) -> Result<Report, SimError> {
    let m2 = PageLevel::Size2M.size();
    if config.memory < 64 << 20 || config.memory % m2 != 0 {
        return Err(SimError::Config(format!(
            "memory must be a multiple of 2 MiB and at least 64 MiB, not {}",
            config.memory
        )));
    }
    if config.vcpus == 0 || config.vcpus > 512 {
        return Err(SimError::Config(format!("{} vCPUs", config.vcpus)));
    }
    let wall = Instant::now();
    let mut host_config = HostConfig::new(config.memory, config.vcpus);
    host_config.module.pending_ve = config.pending_ve && !config.guest.sept_ve_disable();
    host_config.module.max_accept_level = config.max_accept_level;
    host_config.mmu = config.host.mmu_policy();
    #[cfg(feature = "testing")]
    if config.sabotage == Some(crate::sabotage::Sabotage::IgnoreSplit) {
        host_config.mmu.fault_split = hostvmm::kvm::FaultSplit::Ignore;
    }
    let kicker = Arc::new(ModuleKicker::default());
    let host = match config.gmem {
        GmemBackend::Model => Host::new(host_config, kicker.clone())?,
        GmemBackend::Kernel => kernel_host(host_config, kicker.clone())?,
    };
    kicker.connect(host.module().clone());
    if config.mode == Mode::Parallel {
        if let Some(mut gmem) = host.model() {
            gmem.set_folio_batch(PARALLEL_FOLIO_BATCH);
        }
    }
    let gpaw = host_config.module.gpaw;

    // Firmware side: what is accepted eagerly, and the Linux-format table for the rest.
    let eager_end = config.scenario.eager_bytes(config.memory);
    let mut table_buf = vec![0u8; 64 + (config.memory / m2 / 8) as usize + 8];
    let table = if eager_end < config.memory {
        let lazy = GpaRange::new(eager_end, config.memory)
            .map_err(|e| SimError::Config(format!("lazy range: {e}")))?;
        let mut accept_now = Vec::new();
        let len = build_table(&mut table_buf, &[lazy], m2 as u32, |r| accept_now.push(r))
            .map_err(|e| SimError::Config(format!("unaccepted table: {e}")))?;
        if !accept_now.is_empty() {
            return Err(SimError::Config("unaligned lazy range".into()));
        }
        Some(
            UnacceptedTable::parse(&table_buf[..len])
                .map_err(|e| SimError::Config(format!("unaccepted table: {e}")))?,
        )
    } else {
        None
    };

    // Kernel side: the engine objects every vCPU shares.
    let acceptor = Acceptor::new(gpaw, config.guest.accept_policy());
    let converter = Converter::new(gpaw, config.guest.convert_policy());
    let units = table.as_ref().map_or(0, |t| t.units());
    let words: Vec<AtomicU64> = (0..words_needed(units).max(1))
        .map(|_| AtomicU64::new(0))
        .collect();
    let inflight: Vec<AtomicU64> = (0..config.vcpus).map(|_| AtomicU64::new(0)).collect();
    let tracker_config = config.guest.tracker_config();
    let tracker = match &table {
        Some(t) => LazyTracker::from_table(&acceptor, t, &words, &inflight, tracker_config),
        None => LazyTracker::new(
            &acceptor,
            eager_end,
            m2,
            0,
            &words,
            &inflight,
            tracker_config,
        ),
    }
    .map_err(|e| SimError::Config(format!("tracker: {e}")))?
    .already_accepted_is_private(config.guest.already_accepted_is_private());

    let td = SimTd {
        host,
        sched: Scheduler::new(
            config.mode,
            config.vcpus as usize,
            config.seed,
            config.switch_every,
        ),
        cost: CostTable::DEFAULT,
        config: *config,
        guest: Guest {
            acceptor: &acceptor,
            converter: &converter,
            tracker: &tracker,
            eager_end,
        },
        belief: Mutex::new(Belief::default()),
        accepted: crate::accepted::Accepted::default(),
        violations: Mutex::new(ViolationLog::default()),
        sampler,
    };
    let boot_ranges = [
        GpaRange::new(0, eager_end).map_err(|e| SimError::Config(format!("eager range: {e}")))?
    ];
    let boot_progress: Vec<WorkerProgress> =
        (0..config.vcpus).map(|_| WorkerProgress::new()).collect();
    let job = BootJob::new(&boot_ranges, &boot_progress);
    // The boot's work is known: every byte up to `eager_end` is accepted once.
    td.sched.begin_phase(eager_end);
    let plan = scenario::Plan::new(&td, &job);
    let n = config.vcpus as usize;
    let body = |id: usize, switch: Switch<'_>| {
        let mut v = SimVcpu::new(&td, id, config.seed, switch);
        let r = plan.run_vcpu(&mut v, progress);
        v.halt();
        if let Err(e) = r {
            if v.fatal().is_none() {
                log::error!("vCPU {id}: {e}");
            }
        }
        (v.stats(), v.fatal().map(str::to_string).or(plan.error(id)))
    };
    let outcomes: Vec<Option<(vcpu::VcpuStats, Option<String>)>> = match config.mode {
        Mode::Deterministic => sched::run_coroutines(&td.sched, n, body)?,
        Mode::Parallel => std::thread::scope(|scope| {
            let handles: Vec<_> = (0..n)
                .map(|id| {
                    let (body, sched) = (&body, &td.sched);
                    std::thread::Builder::new()
                        .name(format!("vcpu{id}"))
                        .spawn_scoped(scope, move || {
                            // Finished (or panicked), this vCPU no longer paces the others.
                            let _done = Finish(sched, id);
                            body(id, Switch::THREAD)
                        })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.ok().and_then(|h| h.join().ok()))
                .collect()
        }),
    };
    let results: Vec<(vcpu::VcpuStats, Option<String>)> = outcomes
        .into_iter()
        .map(|o| {
            o.unwrap_or_else(|| {
                (
                    vcpu::VcpuStats::default(),
                    Some("vCPU panicked or could not start".into()),
                )
            })
        })
        .collect();
    td.host.merge_pass();
    td.maybe_sample(plan.steps_done(), plan.pool(), true);
    // The end-of-run checks only read: in parallel mode they run on a thread per vCPU, as
    // many as the machine runs at once.
    let check_threads = match config.mode {
        Mode::Deterministic => 1,
        Mode::Parallel => n.min(std::thread::available_parallelism().map_or(1, |p| p.get())),
    };
    td.check_all_on(check_threads);
    let (private, huge) = mapping_totals(&td.host, config.memory, check_threads);
    let optimal = optimal_in(&td.accepted.to_set(), 0, config.memory);
    inspect(&td);
    let log = std::mem::take(&mut *lock(&td.violations));
    let totals = MappingTotals {
        private,
        huge,
        optimal,
    };
    let report = report::build(&td, &results, log, totals, wall.elapsed());
    // Tearing down a large TD's host state (S-EPT arena, folio maps) is pure freeing: it runs
    // behind the caller's back instead of in front of its next step.
    let SimTd { host, .. } = td;
    let teardown = std::thread::Builder::new().name("teardown".into());
    if let Err(e) = teardown.spawn(move || drop(host)) {
        log::debug!("teardown thread: {e}; freeing in place");
    }
    Ok(report)
}
