//! Randomized stress runs in parallel mode: scenarios, sizes, guest and host policies, guest
//! and host interrupts (benign fault injection: an interrupted ACCEPT is re-executed, an
//! interrupted DEMOTE or PROMOTE retried) and traffic scales drawn from one seed, one run after
//! another until the time is up or a run fails.
//!
//! A run fails when an invariant breaks, a vCPU stops with an error, or the run makes no
//! progress for [`HANG_AFTER`] (a deadlock or livelock: the run is then abandoned on its
//! thread). The failing configuration is returned as a [`ConfigRecord`] with the `tdsim run`
//! command that replays it; in parallel mode a replay runs the same configuration again, not
//! the same interleaving, so a rare race may need several replays (or `--mode deterministic`
//! for a reproducible run of the same configuration).
//!
//! This module only drives runs and adds their figures up; the `tdsim stress` command prints.

use std::collections::BTreeMap;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use accept::abi::PageLevel;

use super::report::{BusyCount, Contention};
use super::scenario::Scenario;
use super::sched::{Mode, Rng};
use super::{run, GuestPolicy, HostPolicy, Report, SimConfig};

/// A run that shows no result after this long is called a hang.
pub const HANG_AFTER: Duration = Duration::from_secs(120);

/// What to stress.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StressConfig {
    /// Stop starting runs after this long.
    pub duration: Duration,
    /// Seed of every random choice.
    pub seed: u64,
    /// vCPUs of every run; drawn per run (2 to 8) when `None`.
    pub vcpus: Option<u32>,
}

/// One run's configuration in a form that can be written out and replayed.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ConfigRecord {
    /// Scenario name.
    pub scenario: String,
    /// Guest memory in bytes.
    pub memory: u64,
    /// vCPUs.
    pub vcpus: u32,
    /// Seed.
    pub seed: u64,
    /// Guest policy name.
    pub guest_policy: String,
    /// Host policy name.
    pub host_policy: String,
    /// "2m" or "1g".
    pub max_accept_level: String,
    /// Guest interrupts per mille of TDCALLs.
    pub irq_per_mille: u32,
    /// Host interrupts per mille of exits.
    pub host_irq_per_mille: u32,
    /// Traffic scale.
    pub traffic: u32,
    /// Mode name.
    pub mode: String,
    /// The `tdsim run` command line that runs this configuration again.
    pub command: String,
}

impl ConfigRecord {
    /// The record of `c`.
    pub fn of(c: &SimConfig) -> ConfigRecord {
        let level = if c.max_accept_level == PageLevel::Size1G {
            "1g"
        } else {
            "2m"
        };
        let mib = c.memory >> 20;
        let command = format!(
            "tdsim run --scenario {} --memory {mib}M --vcpus {} --seed {} --guest-policy {} \
             --host-policy {} --max-accept-level {level} --irq-per-mille {} \
             --host-irq-per-mille {} --traffic {} --mode {}",
            c.scenario.name(),
            c.vcpus,
            c.seed,
            c.guest.name(),
            c.host.name(),
            c.irq_per_mille,
            c.host_irq_per_mille,
            c.traffic,
            c.mode.name()
        );
        ConfigRecord {
            scenario: c.scenario.name().to_string(),
            memory: c.memory,
            vcpus: c.vcpus,
            seed: c.seed,
            guest_policy: c.guest.name().to_string(),
            host_policy: c.host.name().to_string(),
            max_accept_level: level.to_string(),
            irq_per_mille: c.irq_per_mille,
            host_irq_per_mille: c.host_irq_per_mille,
            traffic: c.traffic,
            mode: c.mode.name().to_string(),
            command,
        }
    }
}

/// The configuration of run `index` of a stress pass: drawn from `rng`.
pub fn random_config(rng: &mut Rng, vcpus: Option<u32>) -> SimConfig {
    fn pick<T: Copy>(rng: &mut Rng, from: &[T]) -> T {
        from[rng.below(from.len() as u64) as usize]
    }
    let scenario = pick(rng, &Scenario::ALL.map(|(s, _, _)| s));
    let vcpus = vcpus.unwrap_or_else(|| pick(rng, &[2, 3, 4, 6, 8]));
    // Enough memory for every vCPU's ownership regions in the pool and the storm area.
    let floor = (u64::from(vcpus) * (32 << 20)).next_power_of_two();
    let memory = pick(rng, &[256u64 << 20, 512 << 20, 1 << 30, 2 << 30]).max(floor);
    let guest = pick(rng, &GuestPolicy::ALL.map(|(p, _)| p));
    let host = pick(rng, &HostPolicy::ALL.map(|(p, _)| p));
    let max_accept_level = if rng.chance(1, 5) {
        PageLevel::Size1G
    } else {
        PageLevel::Size2M
    };
    SimConfig {
        memory,
        vcpus,
        seed: rng.next_u64() >> 1,
        guest,
        host,
        max_accept_level,
        irq_per_mille: pick(rng, &[0, 20, 100]),
        host_irq_per_mille: pick(rng, &[0, 50, 200]),
        traffic: 1 + rng.below(3) as u32,
        mode: Mode::Parallel,
        ..SimConfig::new(scenario)
    }
}

/// One finished run of a stress pass.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct StressRun {
    /// Run number (from 0).
    pub index: u64,
    /// What ran.
    pub config: ConfigRecord,
    /// Its report; `None` when it hung or could not start.
    pub report: Option<Report>,
    /// Why it failed, if it did.
    pub failure: Option<String>,
    /// Wall time of the run.
    pub wall_ms: u64,
}

/// What a stress pass ran and saw.
#[derive(Debug, Clone, PartialEq, Default, serde::Serialize)]
pub struct StressSummary {
    /// The seed of the pass.
    pub seed: u64,
    /// Runs finished.
    pub runs: u64,
    /// Runs per scenario.
    pub by_scenario: BTreeMap<String, u64>,
    /// Runs per guest policy / host policy pair.
    pub by_policies: BTreeMap<String, u64>,
    /// Contention added up over every run.
    pub contention: Contention,
    /// Invariant violations over every run.
    pub invariant_violations: u64,
    /// The failing run, if any (the pass stops at the first).
    pub failure: Option<StressRun>,
    /// Wall time of the pass.
    pub wall_ms: u64,
}

impl StressSummary {
    fn add(&mut self, run: &StressRun) {
        self.runs += 1;
        *self
            .by_scenario
            .entry(run.config.scenario.clone())
            .or_insert(0) += 1;
        let pair = format!("{}/{}", run.config.guest_policy, run.config.host_policy);
        *self.by_policies.entry(pair).or_insert(0) += 1;
        if let Some(r) = &run.report {
            self.invariant_violations += r.invariant_violations as u64;
            let (t, k) = (&mut self.contention, &r.contention);
            t.seamcall_retries += k.seamcall_retries;
            t.accept_busy += k.accept_busy;
            t.track_refusals += k.track_refusals;
            t.tracking_not_done += k.tracking_not_done;
            t.kicks += k.kicks;
            t.hold_outs += k.hold_outs;
            t.fault_retries += k.fault_retries;
            t.fault_splits += k.fault_splits;
            t.paces += k.paces;
            for b in &k.seamcall_busy {
                match t
                    .seamcall_busy
                    .iter_mut()
                    .find(|x| x.call == b.call && x.operand == b.operand)
                {
                    Some(x) => x.count += b.count,
                    None => t.seamcall_busy.push(BusyCount { ..b.clone() }),
                }
            }
        }
    }

    /// True when no run failed.
    pub fn passed(&self) -> bool {
        self.failure.is_none()
    }
}

/// Runs one configuration on its own thread; `Err` when it shows no result within `hang`.
fn run_watched(config: SimConfig, hang: Duration) -> Result<Result<Report, String>, String> {
    let (tx, rx) = mpsc::channel();
    let spawned = std::thread::Builder::new()
        .name("stress-run".into())
        .spawn(move || {
            let r = run(&config, &|_, _| {}).map_err(|e| e.to_string());
            let _ = tx.send(r);
        });
    if let Err(e) = spawned {
        return Ok(Err(format!("could not start the run: {e}")));
    }
    rx.recv_timeout(hang)
        .map_err(|_| format!("no result after {} s: deadlock or livelock", hang.as_secs()))
}

/// Runs random configurations until `config.duration` has passed or one fails; calls `each`
/// after every run.
pub fn stress(config: &StressConfig, each: &mut dyn FnMut(&StressRun)) -> StressSummary {
    stress_with(config, HANG_AFTER, each)
}

/// As [`stress`], with the hang bound given.
pub fn stress_with(
    config: &StressConfig,
    hang: Duration,
    each: &mut dyn FnMut(&StressRun),
) -> StressSummary {
    let start = Instant::now();
    let mut rng = Rng::new(config.seed ^ 0x57E5_5000);
    let mut summary = StressSummary {
        seed: config.seed,
        ..StressSummary::default()
    };
    let mut index = 0;
    while start.elapsed() < config.duration {
        let c = random_config(&mut rng, config.vcpus);
        let t0 = Instant::now();
        let outcome = run_watched(c, hang);
        let wall_ms = t0.elapsed().as_millis() as u64;
        let (report, failure) = match outcome {
            Err(hung) => (None, Some(hung)),
            Ok(Err(e)) => (None, Some(e)),
            Ok(Ok(r)) => {
                let failure = (!r.passed()).then(|| {
                    let mut why = format!("{} invariant violations", r.invariant_violations);
                    for v in r.violations.iter().take(3) {
                        why.push_str(&format!("; {:?}: {}", v.kind, v.detail));
                    }
                    for e in r.errors.iter().take(3) {
                        why.push_str(&format!("; {e}"));
                    }
                    why
                });
                (Some(r), failure)
            }
        };
        let run = StressRun {
            index,
            config: ConfigRecord::of(&c),
            report,
            failure,
            wall_ms,
        };
        summary.add(&run);
        each(&run);
        index += 1;
        if run.failure.is_some() {
            summary.failure = Some(run);
            break;
        }
    }
    summary.wall_ms = start.elapsed().as_millis() as u64;
    summary
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configurations_are_drawn_from_the_seed_and_replayable() {
        let draw = |seed| {
            let mut rng = Rng::new(seed);
            (0..20)
                .map(|_| ConfigRecord::of(&random_config(&mut rng, None)))
                .collect::<Vec<_>>()
        };
        let a = draw(1);
        assert_eq!(a, draw(1));
        assert_ne!(a, draw(2));
        for r in &a {
            assert_eq!(r.mode, "parallel");
            assert!(r.command.contains(&format!("--seed {}", r.seed)));
            assert!(r.memory >= u64::from(r.vcpus) * (32 << 20));
        }
    }

    #[test]
    fn a_short_pass_runs_and_adds_up() {
        let mut seen = 0;
        let s = stress(
            &StressConfig {
                duration: Duration::from_millis(1),
                seed: 3,
                vcpus: Some(2),
            },
            &mut |_| seen += 1,
        );
        assert!(s.passed(), "{:?}", s.failure);
        assert_eq!(s.runs, 1);
        assert_eq!(seen, 1);
        assert_eq!(s.by_scenario.values().sum::<u64>(), 1);
    }
}
