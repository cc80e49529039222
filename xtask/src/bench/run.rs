//! Building and running `tdsim` for the bench and reading what it writes (JSON reports,
//! timeline CSVs), and the details of the machine and checkout the report names.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};
use tdmem_sim::Report;

use super::matrix::{
    Key, Rep, HEADLINE_GIB, HEADLINE_VCPUS, HOSTS, SEED, SWITCH_EVERY, TIMELINE_EVERY,
};
use super::{target_dir, workspace_root};

/// Reads a `tdsim --json` report.
pub(super) fn read_report(path: &Path) -> Result<Report> {
    let text = fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text)
        .with_context(|| format!("parsing the tdsim report {}", path.display()))
}

/// What one boot-eager run of the concurrency section measured.
#[derive(Debug, Clone, Copy)]
pub(super) struct Boot {
    /// The run's wall time as `tdsim` reports it (ms).
    pub(super) wall_ms: u64,
    /// The process's wall time as the caller sees it, start to exit (ms).
    pub(super) outside_ms: u64,
    /// Peak resident memory (bytes).
    pub(super) rss: u64,
    /// Modelled time of the busiest vCPU (us).
    pub(super) modelled_us: u64,
}

/// One `tdsim run` of boot-eager (our policies) for the concurrency section.
pub(super) fn run_boot(
    tdsim: &Path,
    gib: u64,
    vcpus: u32,
    mode: &str,
    json: &Path,
) -> Result<Boot> {
    let start = std::time::Instant::now();
    let status = Command::new(tdsim)
        .args([
            "run",
            "--scenario",
            "boot-eager",
            "--memory",
            &format!("{gib}G"),
            "--vcpus",
            &vcpus.to_string(),
            "--seed",
            &SEED.to_string(),
            "--switch-every",
            &SWITCH_EVERY.to_string(),
            "--mode",
            mode,
            "--json",
        ])
        .arg(json)
        .stdout(Stdio::null())
        .status()
        .context("running tdsim")?;
    let outside_ms = u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX);
    if !status.success() {
        bail!("tdsim boot-eager {gib} GiB {vcpus} vCPUs {mode}: exit {status}");
    }
    let r = read_report(json)?;
    Ok(Boot {
        wall_ms: r.wall_ms,
        outside_ms,
        rss: r.peak_rss_bytes.unwrap_or(0),
        modelled_us: r.modelled_time_us,
    })
}

/// Wall time (ms, as the caller sees it) of `copies` independent 1-vCPU boot-eager runs of
/// `gib` GiB each, started together: what the machine gives `copies` threads that share
/// nothing.
pub(super) fn run_boot_copies(tdsim: &Path, gib: u64, copies: u32) -> Result<u64> {
    let start = std::time::Instant::now();
    let children = (0..copies)
        .map(|_| {
            Command::new(tdsim)
                .args(["run", "--scenario", "boot-eager", "--memory"])
                .arg(format!("{gib}G"))
                .args(["--vcpus", "1", "--mode", "parallel", "--seed"])
                .arg(SEED.to_string())
                .stdout(Stdio::null())
                .spawn()
                .context("running tdsim")
        })
        .collect::<Result<Vec<_>>>()?;
    for mut c in children {
        let status = c.wait().context("waiting for tdsim")?;
        if !status.success() {
            bail!("tdsim boot-eager {gib} GiB: exit {status}");
        }
    }
    Ok(u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX))
}

/// The 1-minute load average, as `/proc/loadavg` gives it.
pub(super) fn load_average() -> String {
    fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().map(str::to_string))
        .unwrap_or_else(|| "unknown".into())
}

pub(super) fn build_tdsim() -> Result<PathBuf> {
    let mut c = crate::cargo();
    c.current_dir(workspace_root()).args([
        "build",
        "--release",
        "-p",
        "tdmem-sim",
        "--bin",
        "tdsim",
    ]);
    crate::run("cargo build --release --bin tdsim", c)?;
    let bin = target_dir().join("release/tdsim");
    if !bin.exists() {
        bail!("{} not found after the build", bin.display());
    }
    Ok(bin)
}

pub(super) fn run_cell(tdsim: &Path, k: &Key, json_dir: &Path) -> Result<Rep> {
    let json = json_dir.join(k.file_name());
    let _ = fs::remove_file(&json);
    let status = Command::new(tdsim)
        .args(k.tdsim_args())
        .arg("--json")
        .arg(&json)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .with_context(|| format!("starting {}", k.command_line()))?;
    // Exit status 1 is a run with violations: still a result, reported as such.
    if !(status.success() || status.code() == Some(1)) {
        bail!("{} failed ({status})", k.command_line());
    }
    Ok(Rep::from_report(&read_report(&json)?))
}

/// One timeline row: (step, whole-TD huge, whole-TD optimal, pool huge, pool optimal).
pub(super) type Row = (u64, u64, u64, u64, u64);

pub(super) fn run_timeline(tdsim: &Path, host: &str, csv: &Path) -> Result<Vec<Row>> {
    let k = Key {
        scenario: "swiotlb",
        gib: HEADLINE_GIB,
        vcpus: HEADLINE_VCPUS,
        guest: "ours",
        host: HOSTS
            .iter()
            .find(|h| **h == host)
            .copied()
            .unwrap_or("ours"),
    };
    let status = Command::new(tdsim)
        .args(k.tdsim_args())
        .arg("--timeline")
        .arg(csv)
        .args(["--timeline-every", &TIMELINE_EVERY.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .context("starting tdsim --timeline")?;
    if !status.success() {
        bail!("{} --timeline failed ({status})", k.command_line());
    }
    let text = fs::read_to_string(csv).with_context(|| format!("reading {}", csv.display()))?;
    let mut rows = Vec::new();
    for line in text.lines().skip(1) {
        let f: Vec<u64> = line.split(',').filter_map(|x| x.parse().ok()).collect();
        if let [a, b, c, d, e] = f[..] {
            rows.push((a, b, c, d, e));
        }
    }
    Ok(rows)
}

/// The checked-out commit, when the tree is a git work tree.
pub(super) fn commit(root: &Path) -> String {
    Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .current_dir(root)
        .stderr(Stdio::null())
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .filter(|c| !c.is_empty())
        .unwrap_or_else(|| "unknown".into())
}

pub(super) fn nproc() -> usize {
    std::thread::available_parallelism().map_or(1, usize::from)
}

pub(super) fn cpu_model() -> String {
    fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into())
}
