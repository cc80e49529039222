//! The concurrency section of BENCHMARKS.md: 1 TiB boot-eager wall time in deterministic and
//! parallel mode by vCPUs, and the simulator's peak memory by TD size. `cargo xtask bench
//! --only concurrency` rewrites just this section.

use std::fmt::Write as _;
use std::fs;
use std::path::Path;

use anyhow::{Context, Result};

use super::matrix::SEED;
use super::run::{
    build_tdsim, commit, cpu_model, load_average, nproc, run_boot, run_boot_copies, Boot,
};
use super::{splice_section, target_dir, workspace_root, BenchArgs};

/// Markers around the concurrency section of BENCHMARKS.md.
const CONC_BEGIN: &str = "<!-- concurrency:begin -->";
const CONC_END: &str = "<!-- concurrency:end -->";

/// Measures the concurrency section: wall times by mode and vCPUs at 1 TiB, peak RSS by size.
pub(super) fn concurrency_section(tdsim: &Path, repeats: u32) -> Result<String> {
    let json = target_dir().join("bench/concurrency.json");
    if let Some(d) = json.parent() {
        fs::create_dir_all(d).context("creating target/bench")?;
    }
    let mut o = String::new();
    let _ = writeln!(o, "{CONC_BEGIN}");
    let _ = writeln!(
        o,
        "## Concurrency: deterministic and parallel mode, peak memory
"
    );
    let _ = writeln!(
        o,
        "1 TiB boot-eager, our policies, seed {SEED}, \
         `tdsim run --scenario boot-eager --memory 1024G --vcpus V --mode M`. Deterministic mode runs every vCPU as a coroutine on one thread (exact counts); \
         parallel mode runs one OS thread per vCPU. Targets (issue 13): deterministic 8 vCPUs \
         within 1.3x of 1 vCPU; parallel 2 threads at least 1.6x the 1-thread speed on 2 \
         cores. Measured on {} logical CPUs, {}, commit {}, load average {} before the \
         run (wall times mean little on a busy machine); regenerate with \
         `cargo xtask bench --only concurrency`.\n\nDeterministic mode, wall time as `tdsim` \
         reports it, fastest of {repeats} runs:\n",
        nproc(),
        cpu_model(),
        commit(&workspace_root()),
        load_average()
    );
    let _ = writeln!(
        o,
        "| vCPUs | wall (s) | vs 1 vCPU | modelled (s) | peak RSS (MiB) |"
    );
    let _ = writeln!(o, "|---:|---:|---:|---:|---:|");
    let mut base = None;
    for v in [1u32, 8, 64] {
        let mut best: Option<Boot> = None;
        for _ in 0..repeats.max(1) {
            eprintln!("==> 1 TiB boot-eager, deterministic, {v} vCPUs");
            let r = run_boot(tdsim, 1024, v, "deterministic", &json)?;
            best = Some(match best {
                Some(b) if b.wall_ms <= r.wall_ms => b,
                _ => r,
            });
        }
        let Some(b) = best else {
            continue;
        };
        let base_wall = *base.get_or_insert(b.wall_ms);
        let _ = writeln!(
            o,
            "| {v} | {:.2} | {:.2}x | {:.2} | {:.0} |",
            b.wall_ms as f64 / 1e3,
            b.wall_ms as f64 / base_wall.max(1) as f64,
            b.modelled_us as f64 / 1e6,
            b.rss as f64 / f64::from(1u32 << 20)
        );
    }
    o.push_str(&parallel_rounds(tdsim, repeats, &json)?);
    let _ = writeln!(
        o,
        "
Peak resident memory of the simulator (`VmHWM`, reported by `tdsim` as \
         `peak_rss_bytes`) for a TD accepted and mapped at 2M, deterministic mode, 1 vCPU \
         (target: at most 64 MiB per TiB):\n"
    );
    let _ = writeln!(o, "| memory | peak RSS (MiB) | per TiB (MiB) | wall (s) |");
    let _ = writeln!(o, "|---:|---:|---:|---:|");
    for gib in [64u64, 256, 1024, 4096] {
        eprintln!("==> peak RSS at {gib} GiB");
        let b = run_boot(tdsim, gib, 1, "deterministic", &json)?;
        let mib = b.rss as f64 / f64::from(1u32 << 20);
        let _ = writeln!(
            o,
            "| {gib} GiB | {mib:.0} | {:.0} | {:.2} |",
            mib * 1024.0 / gib as f64,
            b.wall_ms as f64 / 1e3
        );
    }
    let _ = writeln!(o, "{CONC_END}");
    Ok(o)
}

/// One configuration of the parallel-mode rounds.
struct Config {
    what: &'static str,
    /// Independent processes started together (1: one run).
    copies: u32,
    /// vCPU threads of each process.
    vcpus: u32,
    /// Guest memory of each process (GiB).
    gib: u64,
}

/// Parallel mode against what the machine gives threads that share nothing, 1 TiB of work in
/// every configuration.
const ROUND: [Config; 4] = [
    Config {
        what: "parallel mode, 1 thread",
        copies: 1,
        vcpus: 1,
        gib: 1024,
    },
    Config {
        what: "parallel mode, 2 threads",
        copies: 1,
        vcpus: 2,
        gib: 1024,
    },
    Config {
        what: "parallel mode, 8 threads",
        copies: 1,
        vcpus: 8,
        gib: 1024,
    },
    Config {
        what: "2 independent 1-vCPU processes, 512 GiB each (the ceiling)",
        copies: 2,
        vcpus: 1,
        gib: 512,
    },
];

/// The median of `v` (0 when empty).
fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// Runs `repeats` rounds of [`ROUND`] and writes the parallel-mode table.
///
/// Every configuration runs once per round, back to back, and every time is the process's wall
/// time from outside. On a shared machine whose speed drifts from minute to minute, a ratio of
/// two runs of one round compares like with like; the fastest of each configuration, taken from
/// different rounds, need not.
fn parallel_rounds(tdsim: &Path, repeats: u32, json: &Path) -> Result<String> {
    let mut rounds: Vec<[u64; ROUND.len()]> = Vec::new();
    let mut last: [Option<Boot>; ROUND.len()] = [None; ROUND.len()];
    for round in 0..repeats.max(1) {
        let mut times = [0u64; ROUND.len()];
        for (i, c) in ROUND.iter().enumerate() {
            eprintln!("==> round {}: {}", round + 1, c.what);
            times[i] = if c.copies == 1 {
                let b = run_boot(tdsim, c.gib, c.vcpus, "parallel", json)?;
                last[i] = Some(b);
                b.outside_ms
            } else {
                run_boot_copies(tdsim, c.gib, c.copies)?
            };
        }
        rounds.push(times);
    }
    let mut o = String::new();
    let _ = writeln!(
        o,
        "\nParallel mode (one OS thread per vCPU), beside what this machine gives two threads \
         that share nothing: two independent 1-vCPU processes on 512 GiB each, started \
         together (the same total work). Measured in {} rounds; each round runs every row once, \
         back to back; times are of the whole process, from outside. *Median speed-up* is the \
         median over rounds of the 1-thread time divided by the row's time in the same round; \
         *fastest* compares the fastest run of each row, which may come from different \
         rounds. Modelled time and peak RSS are from the last round.\n",
        rounds.len()
    );
    let _ = writeln!(
        o,
        "| configuration | fastest (s) | median (s) | speed-up, fastest | median speed-up | \
         modelled (s) | peak RSS (MiB) |"
    );
    let _ = writeln!(o, "|---|---:|---:|---:|---:|---:|---:|");
    let column = |i: usize| rounds.iter().map(|r| r[i] as f64 / 1e3).collect::<Vec<_>>();
    let fastest = |i: usize| column(i).into_iter().fold(f64::INFINITY, f64::min);
    for (i, c) in ROUND.iter().enumerate() {
        let paired = median(
            rounds
                .iter()
                .map(|r| r[0] as f64 / r[i].max(1) as f64)
                .collect(),
        );
        let (modelled, rss) = last[i].map_or(("-".to_string(), "-".to_string()), |b| {
            (
                format!("{:.2}", b.modelled_us as f64 / 1e6),
                format!("{:.0}", b.rss as f64 / f64::from(1u32 << 20)),
            )
        });
        let _ = writeln!(
            o,
            "| {} | {:.2} | {:.2} | {:.2}x | {:.2}x | {modelled} | {rss} |",
            c.what,
            fastest(i),
            median(column(i)),
            fastest(0) / fastest(i).max(1e-3),
            paired,
        );
    }
    let share = median(
        rounds
            .iter()
            .map(|r| r[3] as f64 / r[1].max(1) as f64)
            .collect(),
    );
    let _ = writeln!(
        o,
        "\nIn the median round, 2 threads of one TD ran at {:.0}% of the speed of the two \
         independent processes (the ceiling's time divided by the 2-thread time).\n",
        share * 100.0
    );
    Ok(o)
}

/// `text` with its concurrency section replaced by `section` (appended when absent).
pub(super) fn splice_concurrency(text: &str, section: &str) -> String {
    splice_section(text, CONC_BEGIN, CONC_END, section)
}

/// `cargo xtask bench --only concurrency`.
pub(super) fn bench_concurrency(args: &BenchArgs) -> Result<()> {
    let tdsim = build_tdsim()?;
    let section = concurrency_section(&tdsim, args.repeats)?;
    let path = workspace_root().join("BENCHMARKS.md");
    let old = fs::read_to_string(&path).unwrap_or_default();
    fs::write(&path, splice_concurrency(&old, &section)).context("writing BENCHMARKS.md")?;
    eprintln!("==> concurrency section of BENCHMARKS.md written");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_median_is_the_middle_or_the_mean_of_the_two_middles() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
        assert_eq!(median(Vec::new()), 0.0);
    }

    #[test]
    fn the_concurrency_section_is_replaced_in_place_or_appended() {
        let sec = format!("{CONC_BEGIN}\nnew\n{CONC_END}\n");
        let old = format!("# B\n\n{CONC_BEGIN}\nold\n{CONC_END}\n## After\n");
        assert_eq!(
            splice_concurrency(&old, &sec),
            format!("# B\n\n{CONC_BEGIN}\nnew\n{CONC_END}\n## After\n")
        );
        assert_eq!(splice_concurrency("# B\n", &sec), format!("# B\n{sec}"));
    }
}
