//! The report of a run: exact counts, mapping quality, invariant results, modelled and wall
//! time. Counts are exact and deterministic for a seed; `modelled_time_us` is arithmetic over
//! counts with [`super::cost::CostTable`], not a measurement; `wall_ms` is the simulator's own
//! run time on this machine.

use std::fmt::Write as _;
use std::time::Duration;

use accept::abi::{PageLevel, StatusCode};
use serde::{Deserialize, Serialize};

use super::cost::CostTable;
use super::scenario::Scenario;
use super::vcpu::VcpuStats;
use super::{
    AcceptLevel, GmemBackend, GuestPolicy, HostPolicy, MappingTotals, Mode, SimConfig, SimTd,
    Violation, ViolationKind, ViolationLog,
};
use hostvmm::kvm::MmuStats;
use hostvmm::module::{AccessKind, CallKind, CallOutcome, Stats};

/// ACCEPT TDCALLs the guest made, by level.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ByLevel {
    /// 4K.
    #[serde(rename = "4k")]
    pub k4: u64,
    /// 2M.
    #[serde(rename = "2m")]
    pub m2: u64,
    /// 1G.
    #[serde(rename = "1g")]
    pub g1: u64,
}

/// SEAMCALLs by kind (every call, whatever its outcome).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Seamcalls {
    /// TDH.MEM.PAGE.ADD.
    pub add: u64,
    /// TDH.MEM.SEPT.ADD.
    pub sept_add: u64,
    /// TDH.MEM.PAGE.AUG.
    pub aug: u64,
    /// TDH.MEM.RANGE.BLOCK.
    pub block: u64,
    /// TDH.MEM.TRACK.
    pub track: u64,
    /// TDH.MEM.RANGE.UNBLOCK.
    pub unblock: u64,
    /// TDH.MEM.PAGE.REMOVE.
    pub remove: u64,
    /// TDH.MEM.PAGE.DEMOTE.
    pub demote: u64,
    /// TDH.MEM.PAGE.PROMOTE.
    pub promote: u64,
}

impl Seamcalls {
    /// The SEAMCALL counts of a module's statistics.
    pub fn from_stats(stats: &Stats) -> Seamcalls {
        let total = |k: CallKind| stats.total(k);
        Seamcalls {
            add: total(CallKind::PageAdd),
            sept_add: total(CallKind::SeptAdd),
            aug: total(CallKind::PageAug),
            block: total(CallKind::RangeBlock),
            track: total(CallKind::MemTrack),
            unblock: total(CallKind::RangeUnblock),
            remove: total(CallKind::PageRemove),
            demote: total(CallKind::PageDemote),
            promote: total(CallKind::PagePromote),
        }
    }
}

/// Exact counts of a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Counts {
    /// ACCEPT TDCALLs the guest engine issued (a re-execution after an exit is the same call).
    pub accept_calls: u64,
    /// The same, by level.
    pub accept_by_level: ByLevel,
    /// ACCEPTs answered PAGE_SIZE_MISMATCH.
    pub accept_size_mismatch: u64,
    /// ACCEPTs answered PAGE_ALREADY_ACCEPTED.
    pub accept_already_accepted: u64,
    /// ACCEPTs answered OPERAND_BUSY.
    pub accept_busy: u64,
    /// ACCEPT executions the module ran (including re-executions after exits and interrupts).
    pub accept_executions: u64,
    /// EPT-violation exits the host handled.
    pub ept_violation_exits: u64,
    /// #VEs injected.
    pub ve_injected: u64,
    /// Interrupts taken inside interruptible ACCEPTs.
    pub accept_interrupted: u64,
    /// MapGPA TDCALLs the guest issued.
    pub map_gpa_calls: u64,
    /// RETRY answers to them.
    pub map_gpa_retries: u64,
    /// SEAMCALLs by kind.
    pub seamcalls: Seamcalls,
    /// Fault-path splits (DEMOTE for a smaller ACCEPT).
    pub fault_splits: u64,
    /// Zap-path splits (DEMOTE of a leaf straddling a conversion).
    pub zap_splits: u64,
    /// Merges (PROMOTE back to 2M).
    pub merges: u64,
    /// Error pages recorded.
    pub poisoned_pages: u64,
}

/// BUSY answers a SEAMCALL got, for one operand.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BusyCount {
    /// The SEAMCALL (as the private MMU names it).
    pub call: String,
    /// The status's low 32 bits: the busy operand, with any detail bits the module sets.
    pub operand: u32,
    /// Answers.
    pub count: u64,
}

/// What the vCPUs and the host ran into from each other. Mostly zero in deterministic mode
/// (no vCPU is inside the TD while host code runs); real contention in parallel mode.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Contention {
    /// BUSY (and INTERRUPTED) answers to the private MMU's SEAMCALLs, by call and operand.
    pub seamcall_busy: Vec<BusyCount>,
    /// All of those, retried.
    pub seamcall_retries: u64,
    /// ACCEPT executions answered OPERAND_BUSY (an entry locked by the host, including host
    /// priority), which the guest engine retries.
    pub accept_busy: u64,
    /// TDH.MEM.TRACK refused while a vCPU was still in the previous TLB epoch.
    pub track_refusals: u64,
    /// SEAMCALLs refused with TLB_TRACKING_NOT_DONE (a vCPU still in the TD in the epoch of
    /// the BLOCK).
    pub tracking_not_done: u64,
    /// vCPU kicks (every vCPU in the TD exits and re-enters).
    pub kicks: u64,
    /// Times a SEAMCALL that kept getting BUSY held every vCPU out of the TD and retried.
    pub hold_outs: u64,
    /// Faults that raced a zap, split or merge and let the guest retry.
    pub fault_retries: u64,
    /// Fault-path splits (DEMOTE for a smaller ACCEPT).
    pub fault_splits: u64,
    /// Parallel mode: times a vCPU waited for a slower one to catch up in modelled time.
    pub paces: u64,
}

impl std::fmt::Display for Contention {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let busy: Vec<String> = self
            .seamcall_busy
            .iter()
            .map(|b| format!("{} op {:#x}: {}", b.call, b.operand, b.count))
            .collect();
        write!(
            f,
            "{} SEAMCALL BUSY retried [{}], {} ACCEPT BUSY, {} TRACK refused, {} tracking not done, {} kicks, {} hold-outs, {} fault retries, {} fault-path splits, {} paces",
            self.seamcall_retries,
            busy.join(", "),
            self.accept_busy,
            self.track_refusals,
            self.tracking_not_done,
            self.kicks,
            self.hold_outs,
            self.fault_retries,
            self.fault_splits,
            self.paces
        )
    }
}

/// Peak resident set of this process so far (`VmHWM` of `/proc/self/status`), in bytes;
/// `None` where the file does not exist.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line
        .trim_start_matches("VmHWM:")
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    kb.checked_mul(1024)
}

/// One vCPU's figures.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VcpuReport {
    /// Index.
    pub vcpu: usize,
    /// Counters.
    #[serde(flatten)]
    pub stats: VcpuStats,
    /// Why the TD stopped on this vCPU, if it did.
    pub fatal: Option<String>,
}

/// The version of the report's JSON layout, in its `schema_version` key. Raised whenever a
/// key is renamed, removed or changes meaning (adding a key does not raise it).
pub const SCHEMA_VERSION: u32 = 2;

/// The report of one run. Its inputs (scenario to gmem backend) rebuild the run's
/// [`SimConfig`] ([`Report::config`]) and command line ([`Report::command`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// The JSON layout's version ([`SCHEMA_VERSION`]).
    pub schema_version: u32,
    /// Scenario name.
    pub scenario: String,
    /// How the vCPUs ran: "deterministic" (exact, seed-reproducible counts) or "parallel"
    /// (one OS thread per vCPU; counts vary from run to run).
    pub mode: String,
    /// Guest memory.
    pub memory_bytes: u64,
    /// vCPUs.
    pub vcpus: u32,
    /// Seed.
    pub seed: u64,
    /// Guest policy name.
    pub guest_policy: String,
    /// Host policy name.
    pub host_policy: String,
    /// The module's largest ACCEPT level: "2m" or "1g".
    pub max_accept_level: String,
    /// #VE on pending pages as configured (`false` for `--no-pending-ve`; a Linux guest runs
    /// with SEPT_VE_DISABLE whatever this says).
    pub pending_ve: bool,
    /// Scale of the scenario's traffic.
    pub traffic: u32,
    /// Deterministic mode: a scheduling point switches vCPU with probability 1 / this.
    pub switch_every: u64,
    /// Per-mille chance of a pending guest interrupt at each TDCALL.
    pub irq_per_mille: u32,
    /// Per-mille chance of a pending host interrupt at each exit.
    pub host_irq_per_mille: u32,
    /// The conversion backend: "model" or "kernel".
    pub gmem: String,
    /// The cost table that turned counts into modelled time (nanoseconds per event).
    pub cost_table: CostTable,
    /// Exact counts.
    pub counts: Counts,
    /// Private bytes mapped and accepted (MAPPED leaves).
    pub private_bytes: u64,
    /// Of those, bytes in 2M (or larger) leaves.
    pub huge_private_bytes: u64,
    /// Bytes in 2M-aligned ranges the guest holds entirely private and accepted: the most a
    /// host could map huge.
    pub optimal_huge_private_bytes: u64,
    /// Invariant violations (all of them counted).
    pub invariant_violations: usize,
    /// Violations by invariant.
    pub violations_by_kind: Vec<(ViolationKind, usize)>,
    /// The first violations, in full.
    pub violations: Vec<Violation>,
    /// Modelled time of the run's critical path: the busiest vCPU (microseconds, modelled).
    pub modelled_time_us: u64,
    /// Simulator wall time (milliseconds, measured).
    pub wall_ms: u64,
    /// vCPU switches of the deterministic scheduler (0 in parallel mode).
    pub schedule_switches: u64,
    /// Contention between vCPUs and the host.
    pub contention: Contention,
    /// Peak resident set of the simulator process at the end of the run (bytes, measured;
    /// includes earlier runs in the same process).
    pub peak_rss_bytes: Option<u64>,
    /// Per vCPU.
    pub per_vcpu: Vec<VcpuReport>,
    /// Errors that stopped a vCPU's program or the TD.
    pub errors: Vec<String>,
}

impl Report {
    /// The configuration that produced this report (no sabotage).
    ///
    /// # Errors
    /// A name in the report that this build does not know.
    pub fn config(&self) -> Result<SimConfig, String> {
        let scenario = Scenario::from_name(&self.scenario)
            .ok_or_else(|| format!("unknown scenario {:?}", self.scenario))?;
        Ok(SimConfig {
            memory: self.memory_bytes,
            vcpus: self.vcpus,
            seed: self.seed,
            guest: GuestPolicy::from_name(&self.guest_policy)
                .ok_or_else(|| format!("unknown guest policy {:?}", self.guest_policy))?,
            host: HostPolicy::from_name(&self.host_policy)
                .ok_or_else(|| format!("unknown host policy {:?}", self.host_policy))?,
            pending_ve: self.pending_ve,
            max_accept_level: AcceptLevel::from_name(&self.max_accept_level)
                .ok_or_else(|| format!("unknown accept level {:?}", self.max_accept_level))?
                .level(),
            irq_per_mille: self.irq_per_mille,
            host_irq_per_mille: self.host_irq_per_mille,
            switch_every: self.switch_every,
            traffic: self.traffic,
            mode: Mode::from_name(&self.mode)
                .ok_or_else(|| format!("unknown mode {:?}", self.mode))?,
            gmem: GmemBackend::from_name(&self.gmem)
                .ok_or_else(|| format!("unknown gmem backend {:?}", self.gmem))?,
            ..SimConfig::new(scenario)
        })
    }

    /// The `tdsim run` arguments that repeat this run (every input spelled out).
    pub fn command(&self) -> String {
        format!(
            "tdsim run --scenario {} --memory {}M --vcpus {} --seed {} --guest-policy {} \
             --host-policy {} --max-accept-level {}{} --traffic {} --switch-every {} \
             --irq-per-mille {} --host-irq-per-mille {} --mode {} --gmem {}",
            self.scenario,
            self.memory_bytes >> 20,
            self.vcpus,
            self.seed,
            self.guest_policy,
            self.host_policy,
            self.max_accept_level,
            if self.pending_ve {
                ""
            } else {
                " --no-pending-ve"
            },
            self.traffic,
            self.switch_every,
            self.irq_per_mille,
            self.host_irq_per_mille,
            self.mode,
            self.gmem
        )
    }

    /// True when the run had no violation and no error.
    pub fn passed(&self) -> bool {
        self.invariant_violations == 0 && self.errors.is_empty()
    }

    /// Huge-mapped private bytes as a share of the optimum (1.0 when nothing could be huge).
    pub fn huge_ratio(&self) -> f64 {
        if self.optimal_huge_private_bytes == 0 {
            1.0
        } else {
            self.huge_private_bytes as f64 / self.optimal_huge_private_bytes as f64
        }
    }

    /// A short human summary.
    pub fn summary(&self) -> String {
        let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
        let c = &self.counts;
        let s = &c.seamcalls;
        let mut out = String::new();
        let _ = writeln!(
            out,
            "tdsim: {} on a {:.1} GiB TD with {} vCPUs, {} mode (seed {}, guest {}, host {})",
            self.scenario,
            gib(self.memory_bytes),
            self.vcpus,
            self.mode,
            self.seed,
            self.guest_policy,
            self.host_policy
        );
        let _ = writeln!(
            out,
            "  ACCEPT   {} calls (4K {}, 2M {}, 1G {}), {} size mismatch, {} already accepted, {} busy, {} interrupted",
            c.accept_calls,
            c.accept_by_level.k4,
            c.accept_by_level.m2,
            c.accept_by_level.g1,
            c.accept_size_mismatch,
            c.accept_already_accepted,
            c.accept_busy,
            c.accept_interrupted
        );
        let _ = writeln!(
            out,
            "  exits    {} EPT violations, {} #VE, {} MapGPA calls ({} RETRY)",
            c.ept_violation_exits, c.ve_injected, c.map_gpa_calls, c.map_gpa_retries
        );
        let _ = writeln!(
            out,
            "  host     AUG {}, SEPT.ADD {}, BLOCK {}, TRACK {}, REMOVE {}, DEMOTE {} ({} fault-path, {} zap), PROMOTE {} ({} merges), poisoned pages {}",
            s.aug,
            s.sept_add,
            s.block,
            s.track,
            s.remove,
            s.demote,
            c.fault_splits,
            c.zap_splits,
            s.promote,
            c.merges,
            c.poisoned_pages
        );
        let _ = writeln!(
            out,
            "  memory   {:.2} GiB private, {:.2} GiB of it in 2M leaves, {:.1}% of the {:.2} GiB a host could map huge",
            gib(self.private_bytes),
            gib(self.huge_private_bytes),
            self.huge_ratio() * 100.0,
            gib(self.optimal_huge_private_bytes)
        );
        let _ = writeln!(
            out,
            "  time     {:.3} s modelled (busiest vCPU, cost table), {:.3} s simulator wall time",
            self.modelled_time_us as f64 / 1e6,
            self.wall_ms as f64 / 1e3
        );
        let _ = writeln!(out, "  contend  {}", self.contention);
        if let Some(rss) = self.peak_rss_bytes {
            let _ = writeln!(
                out,
                "  rss      {:.1} MiB peak (simulator process)",
                rss as f64 / f64::from(1u32 << 20)
            );
        }
        let _ = write!(
            out,
            "  checks   {} invariant violations",
            self.invariant_violations
        );
        for (k, n) in &self.violations_by_kind {
            let _ = write!(out, ", {k:?} {n}");
        }
        for e in &self.errors {
            let _ = write!(out, "\n  error    {e}");
        }
        out
    }
}

pub(crate) fn build(
    td: &SimTd<'_>,
    results: &[(VcpuStats, Option<String>)],
    log: ViolationLog,
    totals: MappingTotals,
    wall: Duration,
) -> Report {
    let config = td.config();
    let host = td.host();
    let module = host.module().stats();
    let mmu: MmuStats = host.mmu().stats();
    let vmm = host.stats();
    let g = td.guest();
    let acc = g.acceptor.stats();
    let conv = g.converter.stats();
    let lvl = |l: PageLevel| acc.level(l).calls;
    let sum = |f: fn(&accept::acceptor::LevelStats) -> u64| acc.levels.iter().map(f).sum::<u64>();
    let total = |k: CallKind| module.total(k);
    let counts = Counts {
        accept_calls: acc.total_calls(),
        accept_by_level: ByLevel {
            k4: lvl(PageLevel::Size4K),
            m2: lvl(PageLevel::Size2M),
            g1: lvl(PageLevel::Size1G),
        },
        accept_size_mismatch: sum(|l| l.size_mismatch),
        accept_already_accepted: sum(|l| l.already_accepted),
        accept_busy: sum(|l| l.busy),
        accept_executions: total(CallKind::Accept),
        ept_violation_exits: vmm.ept_violations,
        ve_injected: module.access(AccessKind::Ve),
        accept_interrupted: module.get(CallKind::Accept, CallOutcome::Interrupted),
        map_gpa_calls: conv.map_gpa_calls,
        map_gpa_retries: conv.map_gpa_retries,
        seamcalls: Seamcalls::from_stats(&module),
        fault_splits: mmu.fault_splits,
        zap_splits: mmu.zap_demotes,
        merges: module.status(CallKind::PagePromote, StatusCode::Success),
        poisoned_pages: host.gmem().poisoned_pages(),
    };
    let per_vcpu: Vec<VcpuReport> = results
        .iter()
        .enumerate()
        .map(|(i, (s, f))| VcpuReport {
            vcpu: i,
            stats: *s,
            fatal: f.clone(),
        })
        .collect();
    let errors: Vec<String> = per_vcpu
        .iter()
        .filter_map(|v| v.fatal.as_ref().map(|f| format!("vCPU {}: {f}", v.vcpu)))
        .collect();
    Report {
        schema_version: SCHEMA_VERSION,
        scenario: config.scenario.name().to_string(),
        mode: config.mode.name().to_string(),
        memory_bytes: config.memory,
        vcpus: config.vcpus,
        seed: config.seed,
        guest_policy: config.guest.name().to_string(),
        host_policy: config.host.name().to_string(),
        max_accept_level: AcceptLevel::name_of(config.max_accept_level).to_string(),
        pending_ve: config.pending_ve,
        traffic: config.traffic,
        switch_every: config.switch_every,
        irq_per_mille: config.irq_per_mille,
        host_irq_per_mille: config.host_irq_per_mille,
        gmem: config.gmem.name().to_string(),
        cost_table: td.cost,
        counts,
        private_bytes: totals.private,
        huge_private_bytes: totals.huge,
        optimal_huge_private_bytes: totals.optimal,
        invariant_violations: log.count,
        violations_by_kind: log.by_kind.into_iter().collect(),
        violations: log.kept,
        modelled_time_us: per_vcpu
            .iter()
            .map(|v| v.stats.modelled_ns)
            .max()
            .unwrap_or(0)
            / 1000,
        wall_ms: wall.as_millis() as u64,
        schedule_switches: td.sched.switches(),
        contention: Contention {
            seamcall_busy: host
                .mmu()
                .busy_by_operand()
                .into_iter()
                .map(|(call, operand, count)| BusyCount {
                    call: call.to_string(),
                    operand,
                    count,
                })
                .collect(),
            seamcall_retries: mmu.busy_retries,
            accept_busy: module.status(CallKind::Accept, StatusCode::OperandBusy),
            track_refusals: mmu.track_refusals,
            tracking_not_done: mmu.tracking_not_done,
            kicks: mmu.kicks,
            hold_outs: mmu.hold_outs,
            fault_retries: mmu.invalidation_retries,
            fault_splits: mmu.fault_splits,
            paces: td.sched.paces(),
        },
        peak_rss_bytes: peak_rss_bytes(),
        per_vcpu,
        errors,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_report_round_trips_and_rebuilds_its_configuration() {
        let config = SimConfig {
            memory: 64 << 20,
            vcpus: 2,
            seed: 7,
            guest: GuestPolicy::TdShim,
            host: HostPolicy::KvmHugepage,
            pending_ve: false,
            max_accept_level: accept::abi::PageLevel::Size1G,
            irq_per_mille: 30,
            host_irq_per_mille: 10,
            switch_every: 3,
            traffic: 2,
            ..SimConfig::new(Scenario::Swiotlb)
        };
        let report = crate::run(&config, &|_, _| {}).expect("valid configuration");
        assert_eq!(report.schema_version, SCHEMA_VERSION);
        assert_eq!(report.cost_table, CostTable::DEFAULT);
        let text = serde_json::to_string(&report).expect("serializes");
        let back: Report = serde_json::from_str(&text).expect("deserializes");
        assert_eq!(back, report);
        assert_eq!(back.config(), Ok(config));
        assert_eq!(
            report.command(),
            "tdsim run --scenario swiotlb --memory 64M --vcpus 2 --seed 7 --guest-policy td-shim \
             --host-policy kvm-hugepage --max-accept-level 1g --no-pending-ve --traffic 2 \
             --switch-every 3 --irq-per-mille 30 --host-irq-per-mille 10 --mode deterministic \
             --gmem model"
        );
    }
}
