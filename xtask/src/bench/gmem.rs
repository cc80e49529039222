//! The guest_memfd section of BENCHMARKS.md: conversion and hole-punch rates of the
//! guest_memfd model and of the kernel's guest_memfd (`/dev/kvm`), measured in one run by
//! `tests/src/bin/gmem_bench.rs`. `cargo xtask bench --only gmem` rewrites just this section.

use std::fmt::Write as _;
use std::fs;
use std::process::Stdio;

use anyhow::{bail, Context, Result};

use super::run::load_average;
use super::{splice_section, workspace_root};
use crate::cargo;

const BEGIN: &str = "<!-- gmem:begin -->";
const END: &str = "<!-- gmem:end -->";

/// Runs the measurement and returns the section, markers included.
pub(super) fn section() -> Result<String> {
    eprintln!("==> gmem_bench (model and kernel guest_memfd)");
    let load = load_average();
    let out = cargo()
        .args([
            "run",
            "--release",
            "-q",
            "-p",
            "tdmem-tests",
            "--bin",
            "gmem_bench",
        ])
        .stderr(Stdio::inherit())
        .output()
        .context("starting gmem_bench")?;
    if !out.status.success() {
        bail!("gmem_bench failed ({})", out.status);
    }
    let table = String::from_utf8_lossy(&out.stdout);
    let mut s = String::new();
    let _ = writeln!(s, "{BEGIN}");
    let _ = writeln!(
        s,
        "## Conversion backends: the guest_memfd model and the kernel's guest_memfd\n"
    );
    let _ = writeln!(
        s,
        "The same conversions on both conversion backends, in one run of \
         `tests/src/bin/gmem_bench.rs`: the backend's own work only (a hook that zaps nothing, \
         so the private MMU and the emulator cost nothing here). The kernel backend keeps private \
         memory in a real guest_memfd and shared memory in a memfd, converting with \
         `fallocate` and `FALLOC_FL_PUNCH_HOLE`; the model only updates its range maps. Wall \
         time, best of 5 rounds, load average {load} before the run (the ratio is the figure to \
         read on a busy machine); regenerate with `cargo xtask bench --only gmem`.\n"
    );
    s.push_str(table.trim_end());
    let _ = writeln!(s, "\n{END}");
    Ok(s)
}

/// `text` with its guest_memfd section replaced by `section`.
pub(super) fn splice(text: &str, section: &str) -> String {
    splice_section(text, BEGIN, END, section)
}

/// `cargo xtask bench --only gmem`.
pub(super) fn bench_gmem() -> Result<()> {
    let section = section()?;
    let path = workspace_root().join("BENCHMARKS.md");
    let old = fs::read_to_string(&path).unwrap_or_default();
    fs::write(&path, splice(&old, &section)).context("writing BENCHMARKS.md")?;
    eprintln!("==> guest_memfd section of BENCHMARKS.md written");
    Ok(())
}
