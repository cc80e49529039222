//! `tdsim`: the simulated TD. Runs a scenario with vCPU threads executing the real guest engine
//! against the host half and prints what happened.
//!
//! `tdsim` alone runs the default scenario (`mixed`, 16 GiB, 8 vCPUs); `tdsim run ...` chooses
//! (`--mode parallel` for one OS thread per vCPU); `tdsim scenarios` lists them; `tdsim stress`
//! runs random parallel-mode configurations for a while. The exit status is 0 only when every
//! invariant held, 1 when one did not, 2 when the run could not start.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Mutex;

use clap::{Args, Parser, Subcommand};
use tdmem_sim::scenario::Scenario;
use tdmem_sim::{svg, AcceptLevel, GmemBackend, GuestPolicy, HostPolicy, Mode, SimConfig};

/// mimalloc rather than glibc's allocator: see the `mimalloc` feature in `Cargo.toml`.
#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

const MAIN_HELP: &str =
    "Without a command, tdsim runs the default scenario: `tdsim run` with its defaults
(mixed, 16 GiB, 8 vCPUs, seed 1, guest and host policy ours, deterministic mode, gmem model).

Exit codes:
  0  every invariant held (every run, every behaviour)
  1  an invariant was broken, a run failed or a hostile behaviour was not caught
  2  the run could not start: bad arguments, unusable configuration, an unwritable output,
     or `--gmem kernel` where /dev/kvm offers no guest_memfd";

const RUN_HELP: &str =
    "Defaults: mixed, 16 GiB, 8 vCPUs, seed 1, guest and host policy ours, max accept level 2m,
#VE on pending pages, traffic 1, switch every 4, irq 20/1000, host irq 0/1000, deterministic
mode, gmem model. `--json -` writes the report to stdout and the summary to stderr; the report
holds every input, so `tdsim run` can repeat it.

Exit codes:
  0  every invariant held
  1  an invariant was broken or a vCPU stopped with an error
  2  the run could not start: bad arguments, unusable configuration, an unwritable output,
     or `--gmem kernel` where /dev/kvm offers no guest_memfd";

const SCENARIOS_HELP: &str = "Exit codes:
  0  always";

const HOSTILE_HELP: &str = "Default: every behaviour of the catalogue.

Exit codes:
  0  every behaviour was caught as expected
  1  a behaviour was not
  2  unknown behaviour name or an unwritable output";

const STRESS_HELP: &str =
    "Default: 60 s of random parallel-mode runs from seed 1, 2 to 8 vCPUs each.

Exit codes:
  0  every run passed
  1  a run failed (its configuration is written to --failure)
  2  an unwritable output";

#[derive(Parser)]
#[command(
    name = "tdsim",
    version,
    about = "A simulated Intel TDX TD: guest acceptance engine against the host half",
    after_help = MAIN_HELP
)]
struct Cli {
    #[command(subcommand)]
    cmd: Option<Cmd>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run one scenario.
    #[command(after_help = RUN_HELP)]
    Run(RunArgs),
    /// List the scenarios and policies.
    #[command(after_help = SCENARIOS_HELP)]
    Scenarios,
    /// Run the hostile-host catalogue (or one behaviour of it) and print the verdicts.
    #[command(after_help = HOSTILE_HELP)]
    Hostile(HostileArgs),
    /// Run randomized scenarios in parallel mode until the time is up; exit non-zero on the
    /// first failing run and write its configuration for replay.
    #[command(after_help = STRESS_HELP)]
    Stress(StressArgs),
}

#[derive(Args)]
struct StressArgs {
    /// Stop starting new runs after this many seconds.
    #[arg(long, default_value_t = 60)]
    seconds: u64,
    /// Seed of every random choice (the pass is the same sequence of configurations).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// vCPUs of every run (drawn per run from 2 to 8 when absent).
    #[arg(long)]
    vcpus: Option<u32>,
    /// Write the pass's summary (runs, contention, any failure) as JSON here (`-`: stdout,
    /// and the progress lines go to stderr).
    #[arg(long)]
    json: Option<PathBuf>,
    /// Where to write a failing run's configuration (with its replay command).
    #[arg(long, default_value = "tdsim-stress-failure.json")]
    failure: PathBuf,
}

/// Where the human-readable lines go: stdout, or stderr when the JSON goes to stdout.
#[derive(Clone, Copy)]
struct Human {
    to_stderr: bool,
}

impl Human {
    fn new(json: Option<&PathBuf>) -> Human {
        Human {
            to_stderr: json.is_some_and(|p| is_stdout(p)),
        }
    }

    fn say(self, text: impl std::fmt::Display) {
        if self.to_stderr {
            eprintln!("{text}");
        } else {
            println!("{text}");
        }
    }
}

fn is_stdout(path: &std::path::Path) -> bool {
    path.as_os_str() == "-"
}

/// Writes `value` as pretty JSON to `path`, or to stdout for `-`.
fn write_json(path: &std::path::Path, value: &impl serde::Serialize) -> Result<(), String> {
    let text = serde_json::to_string_pretty(value).map_err(|e| e.to_string())?;
    if is_stdout(path) {
        println!("{text}");
        Ok(())
    } else {
        std::fs::write(path, text).map_err(|e| format!("{}: {e}", path.display()))
    }
}

fn stress_cmd(a: &StressArgs) -> Result<bool, String> {
    use tdmem_sim::stress;
    let out = Human::new(a.json.as_ref());
    let cfg = stress::StressConfig {
        duration: std::time::Duration::from_secs(a.seconds),
        seed: a.seed,
        vcpus: a.vcpus,
    };
    out.say(format_args!(
        "tdsim stress: {} s of random parallel-mode runs, seed {}",
        a.seconds, a.seed
    ));
    let summary = stress::stress(&cfg, &mut |r| {
        let c = &r.config;
        let verdict = match &r.failure {
            None => "ok".to_string(),
            Some(f) => format!("FAILED: {f}"),
        };
        let k = r.report.as_ref().map(|rep| &rep.contention);
        out.say(format_args!(
            "  #{:<4} {:<13} {:>5} MiB {:>2} vCPUs guest {:<9} host {:<12} {} irq {:>3}/{:>3} x{} {:>6} ms  busy {:>4} kicks {:>3} {}",
            r.index,
            c.scenario,
            c.memory >> 20,
            c.vcpus,
            c.guest_policy,
            c.host_policy,
            c.max_accept_level,
            c.irq_per_mille,
            c.host_irq_per_mille,
            c.traffic,
            r.wall_ms,
            k.map_or(0, |k| k.seamcall_retries + k.accept_busy),
            k.map_or(0, |k| k.kicks),
            verdict
        ));
    });
    let k = &summary.contention;
    out.say(format_args!(
        "{} runs in {:.1} s, {} invariant violations",
        summary.runs,
        summary.wall_ms as f64 / 1e3,
        summary.invariant_violations
    ));
    let scen: Vec<String> = summary
        .by_scenario
        .iter()
        .map(|(s, n)| format!("{s} {n}"))
        .collect();
    out.say(format_args!("  scenarios   {}", scen.join(", ")));
    out.say(format_args!("  contention  {k}"));
    if let Some(path) = &a.json {
        write_json(path, &summary)?;
    }
    if let Some(f) = &summary.failure {
        let text = serde_json::to_string_pretty(&f.config).map_err(|e| e.to_string())?;
        std::fs::write(&a.failure, text).map_err(|e| format!("{}: {e}", a.failure.display()))?;
        out.say(format_args!(
            "FAILED run #{}: {}
  configuration written to {}
  replay: {}",
            f.index,
            f.failure.as_deref().unwrap_or("?"),
            a.failure.display(),
            f.config.command
        ));
        // A hung run is still on its thread: leave without waiting for it.
        std::process::exit(1);
    }
    Ok(true)
}

#[derive(Args)]
struct HostileArgs {
    /// One behaviour's name; all of them when absent.
    name: Option<String>,
    /// Write the rows as JSON here (`-`: stdout, and the table goes to stderr).
    #[arg(long)]
    json: Option<PathBuf>,
}

fn hostile_cmd(a: &HostileArgs) -> Result<bool, String> {
    use tdmem_sim::hostile;
    let rows = match &a.name {
        Some(name) => vec![hostile::run_one(name)
            .ok_or_else(|| format!("unknown behaviour {name:?} (see `tdsim hostile`)"))?],
        None => hostile::run_all(),
    };
    let out = Human::new(a.json.as_ref());
    let table = hostile::table(&rows);
    out.say(table.trim_end_matches('\n'));
    for r in rows.iter().filter(|r| !r.passed || a.name.is_some()) {
        out.say(format_args!("{}: {}", r.name, r.detail));
    }
    if let Some(path) = &a.json {
        write_json(path, &rows)?;
    }
    Ok(rows.iter().all(|r| r.passed))
}

#[derive(Args)]
struct RunArgs {
    /// Scenario (see `tdsim scenarios`).
    #[arg(long, value_enum, default_value_t = Scenario::Mixed)]
    scenario: Scenario,
    /// Guest memory, e.g. 16G, 512M, 1T (binary units).
    #[arg(long, default_value = "16G", value_parser = parse_size)]
    memory: u64,
    /// vCPUs.
    #[arg(long, default_value_t = 8)]
    vcpus: u32,
    /// Seed of every random choice.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Guest policy.
    #[arg(long, value_enum, default_value_t = GuestPolicy::Ours)]
    guest_policy: GuestPolicy,
    /// Host policy.
    #[arg(long, value_enum, default_value_t = HostPolicy::Ours)]
    host_policy: HostPolicy,
    /// The module's largest ACCEPT level: 2m (every public module) or 1g (a future one).
    #[arg(long, value_enum, default_value_t = AcceptLevel::M2)]
    max_accept_level: AcceptLevel,
    /// Run with #VE on pending pages disabled (SEPT_VE_DISABLE), as every existing guest does.
    #[arg(long)]
    no_pending_ve: bool,
    /// Scale the scenario's traffic.
    #[arg(long, default_value_t = 1)]
    traffic: u32,
    /// A scheduling point hands the baton to another vCPU with probability 1/N (smaller N
    /// explores more interleavings, larger N runs faster).
    #[arg(long, default_value_t = 4)]
    switch_every: u64,
    /// Per-mille chance of a pending interrupt at each TDCALL.
    #[arg(long, default_value_t = 20)]
    irq_per_mille: u32,
    /// Per-mille chance of a pending host interrupt at each exit (DEMOTE and PROMOTE answer
    /// INTERRUPTED_RESTARTABLE and are retried).
    #[arg(long, default_value_t = 0)]
    host_irq_per_mille: u32,
    /// deterministic: coroutines on one thread, exact seed-reproducible counts; parallel: one
    /// OS thread per vCPU, all running at once (real contention, counts vary).
    #[arg(long, value_enum, default_value_t = Mode::Deterministic)]
    mode: Mode,
    /// The host half's conversion backend: model (the in-memory guest_memfd model) or kernel
    /// (the kernel's guest_memfd from /dev/kvm; exit code 2 where there is none).
    #[arg(long, value_enum, default_value_t = GmemBackend::Model)]
    gmem: GmemBackend,
    /// Write the report as JSON here (`-`: stdout, and the summary goes to stderr).
    #[arg(long)]
    json: Option<PathBuf>,
    /// Draw the TD's memory as SVG here.
    #[arg(long)]
    svg: Option<PathBuf>,
    /// Record the private mapping during the run as CSV here: one row every
    /// `--timeline-every` scenario steps and one at the end (step, huge-mapped and optimal
    /// private bytes, over the whole TD and over the bounce-buffer pool).
    #[arg(long)]
    timeline: Option<PathBuf>,
    /// Scenario steps between two timeline rows.
    #[arg(long, default_value_t = 8)]
    timeline_every: u64,
}

impl Default for RunArgs {
    fn default() -> Self {
        RunArgs {
            scenario: Scenario::Mixed,
            memory: 16 << 30,
            vcpus: 8,
            seed: 1,
            guest_policy: GuestPolicy::Ours,
            host_policy: HostPolicy::Ours,
            max_accept_level: AcceptLevel::M2,
            no_pending_ve: false,
            traffic: 1,
            switch_every: 4,
            irq_per_mille: 20,
            host_irq_per_mille: 0,
            mode: Mode::Deterministic,
            gmem: GmemBackend::Model,
            json: None,
            svg: None,
            timeline: None,
            timeline_every: 8,
        }
    }
}

fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim().to_ascii_lowercase();
    let t = t.trim_end_matches("ib").trim_end_matches('b');
    let (num, shift) = match t.chars().last() {
        Some('k') => (&t[..t.len() - 1], 10),
        Some('m') => (&t[..t.len() - 1], 20),
        Some('g') => (&t[..t.len() - 1], 30),
        Some('t') => (&t[..t.len() - 1], 40),
        _ => (t, 0),
    };
    let n: u64 = num.parse().map_err(|_| format!("not a size: {s}"))?;
    n.checked_mul(1 << shift)
        .ok_or_else(|| format!("too large: {s}"))
}

fn config(a: &RunArgs) -> SimConfig {
    SimConfig {
        memory: a.memory,
        vcpus: a.vcpus,
        seed: a.seed,
        guest: a.guest_policy,
        host: a.host_policy,
        pending_ve: !a.no_pending_ve,
        max_accept_level: a.max_accept_level.level(),
        traffic: a.traffic,
        switch_every: a.switch_every,
        irq_per_mille: a.irq_per_mille,
        host_irq_per_mille: a.host_irq_per_mille,
        mode: a.mode,
        gmem: a.gmem,
        ..SimConfig::new(a.scenario)
    }
}

fn run_cmd(a: &RunArgs) -> Result<bool, String> {
    let cfg = config(a);
    let bar = std::io::stderr().is_terminal().then(|| {
        let b = indicatif::ProgressBar::new(1);
        b.set_style(
            indicatif::ProgressStyle::with_template("{spinner} {msg} [{bar:40}] {pos}/{len} steps")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        b.set_message(format!("{} ", cfg.scenario));
        b
    });
    let last = Mutex::new(0u64);
    let progress = |done: u64, total: u64| {
        if let Some(b) = &bar {
            let mut l = last
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if done > *l {
                *l = done;
                b.set_length(total);
                b.set_position(done);
            }
        }
    };
    let mut svg_out = None;
    let samples = Mutex::new(Vec::new());
    let sink = |s: tdmem_sim::Sample| {
        samples
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(s);
    };
    let inspect = |td: &tdmem_sim::SimTd<'_>| {
        if a.svg.is_some() {
            svg_out = Some(svg::render(
                td.host(),
                cfg.memory,
                &format!(
                    "{} — {} GiB, {} vCPUs, guest {}, host {}, seed {}",
                    cfg.scenario,
                    cfg.memory >> 30,
                    cfg.vcpus,
                    cfg.guest.name(),
                    cfg.host.name(),
                    cfg.seed
                ),
            ));
        }
    };
    let report = match &a.timeline {
        Some(_) => tdmem_sim::run_sampled(&cfg, &progress, a.timeline_every.max(1), &sink, inspect),
        None => tdmem_sim::run_with(&cfg, &progress, inspect),
    }
    .map_err(|e| e.to_string())?;
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    Human::new(a.json.as_ref()).say(report.summary());
    if let Some(path) = &a.json {
        write_json(path, &report)?;
    }
    if let (Some(path), Some(svg)) = (&a.svg, svg_out) {
        std::fs::write(path, svg).map_err(|e| format!("{}: {e}", path.display()))?;
    }
    if let Some(path) = &a.timeline {
        let mut csv = String::from(
            "step,huge_private_bytes,optimal_huge_private_bytes,pool_huge_bytes,pool_optimal_bytes\n",
        );
        for s in samples
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
        {
            csv.push_str(&format!(
                "{},{},{},{},{}\n",
                s.step,
                s.huge_private_bytes,
                s.optimal_huge_private_bytes,
                s.pool_huge_bytes,
                s.pool_optimal_bytes
            ));
        }
        std::fs::write(path, csv).map_err(|e| format!("{}: {e}", path.display()))?;
    }
    Ok(report.passed())
}

fn main() -> ExitCode {
    // `RUST_LOG` (e.g. `warn`) shows the host half's log records on stderr.
    env_logger::Builder::from_default_env().init();
    let cli = Cli::parse();
    let result = match cli.cmd {
        None => run_cmd(&RunArgs::default()),
        Some(Cmd::Run(a)) => run_cmd(&a),
        Some(Cmd::Hostile(a)) => hostile_cmd(&a),
        Some(Cmd::Stress(a)) => stress_cmd(&a),
        Some(Cmd::Scenarios) => {
            println!("scenarios:");
            for (_, name, what) in Scenario::ALL {
                println!("  {name:<14} {what}");
            }
            let g: Vec<_> = GuestPolicy::ALL.iter().map(|(_, n)| *n).collect();
            let h: Vec<_> = HostPolicy::ALL.iter().map(|(_, n)| *n).collect();
            println!("guest policies: {}", g.join(", "));
            println!("host policies:  {}", h.join(", "));
            Ok(true)
        }
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("tdsim: {e}");
            ExitCode::from(2)
        }
    }
}
