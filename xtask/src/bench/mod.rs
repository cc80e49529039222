//! `cargo xtask bench`: the side-by-side benchmark matrix, written to `BENCHMARKS.md` and
//! `bench/`.
//!
//! Builds the release `tdsim` and runs it once per cell of the matrix (guest policy x host
//! policy x scenario x memory size x vCPUs) with `--json`, so every number in the report comes
//! from the binary users run. Cells too slow to simulate on a small machine are either
//! extrapolated from the 64 GiB counts (boot-eager only, where counts scale linearly with
//! memory; labelled as such) or skipped with the reason in the table. It then runs `swiotlb`
//! with `--timeline` under each host policy and draws two SVG plots.
//!
//! What it does not do: measure anything on TDX hardware. Counts are exact for the seed;
//! modelled times are arithmetic over counts with the simulator's cost table; wall times are
//! the simulator's own run time on this machine.
//!
//! This file holds the command's options and the run of the whole matrix; the parts are:
//! - `matrix`: the cells (guest x host x scenario x size x vCPUs), which of them run and how,
//!   and the numbers kept from each report;
//! - `run`: building and running `tdsim`, reading its reports, and the machine's details;
//! - `report`: the Markdown of BENCHMARKS.md;
//! - `concurrency`: the concurrency section (`--only concurrency`);
//! - `gmem`: the guest_memfd section (`--only gmem`);
//! - `plot`: the two SVG plots in `bench/`.

mod concurrency;
mod gmem;
mod matrix;
mod plot;
mod report;
mod run;

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use anyhow::{bail, Context, Result};

use concurrency::{bench_concurrency, concurrency_section, splice_concurrency};
use matrix::{how, How, Key, Rep, GUESTS, HEADLINE_VCPUS, HOSTS, SCENARIOS, WALL_REPEATS};
use plot::{plot_boot_time, plot_timeline};
use report::{report, Ctx};
use run::{build_tdsim, run_cell, run_timeline};

/// Options of `cargo xtask bench`.
#[derive(clap::Args, Debug)]
pub(crate) struct BenchArgs {
    /// Memory sizes in GiB (comma-separated).
    #[arg(long, value_delimiter = ',', default_values_t = [4u64, 64, 1024])]
    sizes: Vec<u64>,
    /// vCPU counts (comma-separated).
    #[arg(long, value_delimiter = ',', default_values_t = [1u32, 8, 64])]
    vcpus: Vec<u32>,
    /// Cells simulated at once (1 gives the cleanest wall times).
    #[arg(long, default_value_t = 1)]
    jobs: usize,
    /// Run one part only and update its section of BENCHMARKS.md: `concurrency` (1 TiB
    /// boot-eager wall time in deterministic mode at 1, 8, 64 vCPUs and in parallel mode at 1,
    /// 2, 8 threads, and peak RSS per memory size; a few minutes) or `gmem` (conversion and
    /// hole-punch rates of the guest_memfd model and the kernel's guest_memfd; seconds).
    #[arg(long)]
    only: Option<String>,
    /// Runs of each concurrency cell (the fastest wall time is reported).
    #[arg(long, default_value_t = 3)]
    repeats: u32,
}

/// `text` with the section between the markers `begin` and `end` replaced by `section`, which
/// carries the markers itself (appended when absent).
fn splice_section(text: &str, begin: &str, end_marker: &str, section: &str) -> String {
    match (text.find(begin), text.find(end_marker)) {
        (Some(b), Some(e)) if b < e => {
            let end = e + end_marker.len();
            let rest = text[end..].strip_prefix('\n').unwrap_or(&text[end..]);
            format!("{}{section}{rest}", &text[..b])
        }
        _ => format!("{}\n{section}", text.trim_end()),
    }
}

/// The workspace this xtask belongs to.
fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
}

/// Cargo's target directory (`CARGO_TARGET_DIR` or `target/` of the workspace).
fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"))
}

/// Runs the matrix and writes `BENCHMARKS.md` and `bench/`.
pub(crate) fn bench(args: &BenchArgs) -> Result<()> {
    match args.only.as_deref() {
        None => {}
        Some("concurrency") => return bench_concurrency(args),
        Some("gmem") => return gmem::bench_gmem(),
        Some(other) => bail!("--only takes `concurrency` or `gmem`, not {other:?}"),
    }
    let started = Instant::now();
    let root = workspace_root();
    let tdsim = build_tdsim()?;
    let json_dir = target_dir().join("bench");
    fs::create_dir_all(&json_dir).context("creating the bench output directory")?;
    let out_dir = root.join("bench");
    fs::create_dir_all(&out_dir).context("creating bench/")?;

    let mut sizes = args.sizes.clone();
    sizes.sort_unstable();
    sizes.dedup();
    let mut vcpus = args.vcpus.clone();
    vcpus.sort_unstable();
    vcpus.dedup();
    let mut cells: Vec<(Key, How)> = Vec::new();
    for scenario in SCENARIOS {
        for &gib in &sizes {
            for &v in &vcpus {
                for guest in GUESTS {
                    for host in HOSTS {
                        let k = Key {
                            scenario,
                            gib,
                            vcpus: v,
                            guest,
                            host,
                        };
                        if let Some(h) = how(&k, &sizes) {
                            cells.push((k, h));
                        }
                    }
                }
            }
        }
    }
    let to_run: Vec<&Key> = cells
        .iter()
        .filter(|(_, h)| *h == How::Run)
        .map(|(k, _)| k)
        .collect();
    eprintln!(
        "==> {} cells: {} simulated, {} extrapolated, {} skipped ({} at a time)",
        cells.len(),
        to_run.len(),
        cells
            .iter()
            .filter(|(_, h)| matches!(h, How::Extrapolated { .. }))
            .count(),
        cells
            .iter()
            .filter(|(_, h)| matches!(h, How::Skipped(_)))
            .count(),
        args.jobs.max(1)
    );
    let results: Mutex<BTreeMap<Key, Rep>> = Mutex::new(BTreeMap::new());
    let failures: Mutex<Vec<String>> = Mutex::new(Vec::new());
    let next = AtomicUsize::new(0);
    let done = AtomicUsize::new(0);
    std::thread::scope(|s| {
        for _ in 0..args.jobs.max(1) {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(k) = to_run.get(i) else {
                    return;
                };
                let t = Instant::now();
                let r = run_cell(&tdsim, k, &json_dir);
                let n = done.fetch_add(1, Ordering::Relaxed) + 1;
                eprintln!(
                    "[{n}/{}] {} {} GiB {} vCPUs {}/{}: {:.1} s",
                    to_run.len(),
                    k.scenario,
                    k.gib,
                    k.vcpus,
                    k.guest,
                    k.host,
                    t.elapsed().as_secs_f64()
                );
                match r {
                    Ok(rep) => {
                        results
                            .lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner)
                            .insert((*k).clone(), rep);
                    }
                    Err(e) => failures
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .push(format!("{e:#}")),
                }
            });
        }
    });
    let mut results = results
        .into_inner()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let failures = failures
        .into_inner()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    for (k, h) in &cells {
        if let How::Extrapolated { from_gib } = h {
            let src = Key {
                gib: *from_gib,
                ..k.clone()
            };
            if let Some(r) = results.get(&src).cloned() {
                results.insert(k.clone(), r.extrapolate(*from_gib, k.gib, k.vcpus));
            }
        }
    }

    // The 1 TiB acceptance cells again, for their wall time on a machine that may be busy.
    let mut walls_1t: Vec<(u32, Vec<u64>)> = Vec::new();
    for v in [1u32, HEADLINE_VCPUS] {
        let k = Key {
            scenario: "boot-eager",
            gib: 1024,
            vcpus: v,
            guest: "ours",
            host: "ours",
        };
        let Some(first) = results.get(&k).and_then(|r| r.wall_ms) else {
            continue;
        };
        eprintln!("==> {WALL_REPEATS} more runs of {}", k.command_line());
        let mut walls = vec![first];
        for _ in 0..WALL_REPEATS {
            if let Some(ms) = run_cell(&tdsim, &k, &json_dir)?.wall_ms {
                walls.push(ms);
            }
        }
        walls_1t.push((v, walls));
    }

    eprintln!("==> swiotlb timelines");
    let mut timelines = Vec::new();
    for host in HOSTS {
        let csv = out_dir.join(format!("swiotlb_timeline_{host}.csv"));
        timelines.push((host, run_timeline(&tdsim, host, &csv)?));
    }

    let boot_svg = plot_boot_time(&cells, &results)?;
    fs::write(out_dir.join("boot_time_vs_memory.svg"), boot_svg)
        .context("writing bench/boot_time_vs_memory.svg")?;
    let tl_svg = plot_timeline(&timelines)?;
    fs::write(out_dir.join("swiotlb_huge_ratio.svg"), tl_svg)
        .context("writing bench/swiotlb_huge_ratio.svg")?;

    let md = report(&Ctx {
        root: &root,
        args,
        sizes: &sizes,
        cells: &cells,
        results: &results,
        timelines: &timelines,
        walls_1t: &walls_1t,
        failures: &failures,
        elapsed_s: started.elapsed().as_secs_f64(),
    });
    let md = splice_concurrency(&md, &concurrency_section(&tdsim, args.repeats)?);
    let md = gmem::splice(&md, &gmem::section()?);
    fs::write(root.join("BENCHMARKS.md"), md).context("writing BENCHMARKS.md")?;
    eprintln!(
        "==> BENCHMARKS.md and bench/ written in {:.0} s",
        started.elapsed().as_secs_f64()
    );
    if !failures.is_empty() {
        bail!("{} cells failed: {}", failures.len(), failures.join("; "));
    }
    Ok(())
}
