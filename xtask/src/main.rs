//! `cargo xtask`: everything that is not plain `cargo test`.
//!
//! - `cargo xtask test`: the project's test command (what the README and CI run).
//! - `cargo xtask ci`: everything CI checks: toolchain setup, fmt, clippy, docs, the bare-metal
//!   builds of `accept`, then `test`, then `e2e` and `e2e --tcg-tdx`, then a short fuzzing
//!   pass.
//! - `cargo xtask e2e [--tdx | --tcg-tdx]`: the bare-metal test image under QEMU against
//!   `tdhost` (with `--tdx`, as a td-shim payload in a real TD; with `--tcg-tdx`, as a TD under
//!   QEMU with this project's TCG-TDX patch); see `e2e.rs`, `tcgtdx.rs`, docs/e2e.md and
//!   docs/tcg-tdx.md.
//! - `cargo xtask linux`: the differential conformance suite against unmodified Linux 6.12
//!   code (see `linux.rs`; part of `ci`).
//! - `cargo xtask bench`: the benchmark matrix with `tdsim`, written to `BENCHMARKS.md` and
//!   `bench/` (see `bench/mod.rs`; not part of `ci`).

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

mod apt;
mod bench;
mod e2e;
mod linux;
mod publish;
mod qemu_build;
mod recipes;
mod tcgtdx;

#[derive(Parser)]
#[command(about = "tdmem build and test tasks")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the workspace tests (the README's test command).
    Test,
    /// Run every CI check: setup, fmt, clippy, docs, bare-metal builds, tests.
    Ci,
    /// A short bounded fuzzing pass over every fuzz target (needs a nightly toolchain).
    Fuzz,
    /// Boot the bare-metal test image under QEMU TCG against tdhost (or, with --tdx, in a TD).
    E2e {
        /// Run the image as a td-shim payload in a real TD (skips when the host has no TDX).
        #[arg(long, conflicts_with = "tcg_tdx")]
        tdx: bool,
        /// Run the image as a TD under QEMU 10 with this project's TCG-TDX patch (built and
        /// cached in target/tcg-tdx): TDCALL executes, accesses are checked against the
        /// Secure-EPT of tdhost's module emulator.
        #[arg(long)]
        tcg_tdx: bool,
    },
    /// Run the benchmark matrix with tdsim and write BENCHMARKS.md and bench/.
    Bench(bench::BenchArgs),
    /// Run the differential conformance suite against unmodified Linux 6.12 code.
    Linux,
}

/// The bare-metal target the guest engine must build for (firmware and kernels).
const FIRMWARE_TARGET: &str = "x86_64-unknown-none";

/// The guest engine's package (directory `accept/`).
const GUEST_ENGINE: &str = "tdmem-accept";

/// The firmware glue's package (directory `td-shim-ext/`).
const FIRMWARE_GLUE: &str = "tdmem-firmware";

fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

fn run(what: &str, mut cmd: Command) -> Result<()> {
    eprintln!("==> {what}");
    let status = cmd.status().with_context(|| format!("starting {what}"))?;
    if !status.success() {
        bail!("{what} failed ({status})");
    }
    Ok(())
}

/// Runs `cargo test --workspace`, passing its output through, and closes with one line that
/// totals every test binary's result ("tests: N passed, M failed").
fn test() -> Result<()> {
    test_counts().map(|_| ())
}

/// The test run of [`test()`], returning the totals.
fn test_counts() -> Result<(u64, u64)> {
    eprintln!("==> cargo test --workspace");
    let mut c = cargo();
    c.args(["test", "--workspace"]);
    let (passed, failed, status) = run_counting(c)?;
    println!("tests: {passed} passed, {failed} failed");
    if !status.success() {
        bail!("cargo test failed ({status})");
    }
    if passed == 0 {
        bail!("cargo test ran no test");
    }
    Ok((passed, failed))
}

/// Runs a `cargo test` command, passing its output through, and totals its libtest summaries.
fn run_counting(mut cmd: Command) -> Result<(u64, u64, std::process::ExitStatus)> {
    let mut child = cmd
        .stdout(Stdio::piped())
        .spawn()
        .context("starting cargo test")?;
    let (mut passed, mut failed) = (0u64, 0u64);
    if let Some(out) = child.stdout.take() {
        for line in BufReader::new(out).lines() {
            let line = line.context("reading cargo test output")?;
            println!("{line}");
            if let Some((p, f)) = parse_result(&line) {
                passed += p;
                failed += f;
            }
        }
    }
    let status = child.wait().context("waiting for cargo test")?;
    Ok((passed, failed, status))
}

/// Parses libtest's "test result: ok. 12 passed; 0 failed; ..." line.
fn parse_result(line: &str) -> Option<(u64, u64)> {
    let rest = line.strip_prefix("test result: ")?;
    let mut passed = None;
    let mut failed = None;
    for part in rest.split(['.', ';']) {
        let mut words = part.split_whitespace();
        if let (Some(n), Some(what)) = (words.next(), words.next()) {
            match what {
                "passed" => passed = n.parse().ok(),
                "failed" => failed = n.parse().ok(),
                _ => {}
            }
        }
    }
    Some((passed?, failed?))
}

fn ci() -> Result<()> {
    // rust-toolchain.toml names the target, but rustup only installs listed targets when it
    // installs the toolchain itself; make sure it is there on machines that already had stable.
    let mut c = Command::new("rustup");
    c.args(["target", "add", FIRMWARE_TARGET]);
    run("rustup target add", c)?;

    let mut c = cargo();
    c.args(["fmt", "--all", "--", "--check"]);
    run("cargo fmt --check", c)?;

    let mut c = cargo();
    c.args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]);
    run("cargo clippy", c)?;

    for features in [None, Some("hw"), Some("hw,x86_64")] {
        // A real build (code generation and the TDCALL assembly), then clippy.
        for tool in ["build", "clippy"] {
            let mut c = cargo();
            c.args([tool, "-p", GUEST_ENGINE, "--target", FIRMWARE_TARGET]);
            if let Some(f) = features {
                c.args(["--features", f]);
            }
            if tool == "clippy" {
                c.args(["--", "-D", "warnings"]);
            }
            run(
                &format!(
                    "cargo {tool} -p {GUEST_ENGINE} --target {FIRMWARE_TARGET} (features: {features:?})"
                ),
                c,
            )?;
        }
    }

    // The bare-metal image is its own workspace: format and lint it too.
    let mut c = cargo();
    c.current_dir(e2e::root().join("e2e/guest"))
        .args(["fmt", "--all", "--", "--check"]);
    run("cargo fmt --check (e2e/guest)", c)?;
    let mut c = cargo();
    c.current_dir("e2e/guest")
        .args([
            "clippy",
            "--release",
            "--target",
            FIRMWARE_TARGET,
            "--",
            "-D",
            "warnings",
        ])
        .env("CARGO_TARGET_DIR", "../../target/e2e-guest")
        .env_remove("RUSTFLAGS");
    run("cargo clippy (e2e/guest)", c)?;

    let mut c = cargo();
    c.args(["doc", "--workspace", "--no-deps"]);
    c.env("RUSTDOCFLAGS", "-D warnings");
    run("cargo doc", c)?;

    publish::check()?;
    recipes::check()?;

    let (passed, failed) = test_counts()?;
    linux::linux()?;
    // A short bounded stress pass: random parallel-mode runs, non-zero on any violation.
    let mut c = cargo();
    c.args("run --release -p tdmem-sim --bin tdsim -- stress --seconds 25".split(' '));
    run("tdsim stress --seconds 25", c)?;
    e2e::e2e(e2e::Mode::Qemu)?;
    // The image as a TD under the patched QEMU (built here, about 6 minutes on 2 cores, or
    // taken from target/tcg-tdx).
    e2e::e2e(e2e::Mode::TcgTdx)?;
    fuzz_pass()?;
    // The test totals again, as the run's last line.
    println!("tests: {passed} passed, {failed} failed");
    Ok(())
}

/// A short bounded fuzzing pass over every target (`fuzz/ci.sh`), when a nightly toolchain is
/// there (cargo-fuzz needs one); cargo-fuzz is installed from crates.io when missing.
fn fuzz_pass() -> Result<()> {
    let nightly = Command::new("cargo")
        .args(["+nightly", "--version"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !nightly {
        eprintln!("==> fuzz pass skipped: no nightly toolchain for cargo-fuzz");
        return Ok(());
    }
    let have_fuzz = Command::new("cargo")
        .args(["+nightly", "fuzz", "--version"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !have_fuzz {
        let mut c = Command::new("cargo");
        c.args(["install", "cargo-fuzz", "--locked"]);
        run("cargo install cargo-fuzz", c)?;
    }
    let mut c = Command::new("sh");
    c.arg(e2e::root().join("fuzz/ci.sh"))
        .env("FUZZ_SECONDS", "15")
        .env_remove("CARGO")
        .env_remove("RUSTUP_TOOLCHAIN");
    run("fuzz pass (15 s per target)", c)
}

fn main() -> Result<()> {
    match Cli::parse().cmd {
        Cmd::Test => test(),
        Cmd::Ci => ci(),
        Cmd::Fuzz => fuzz_pass(),
        Cmd::E2e { tdx, tcg_tdx } => e2e::e2e(match (tdx, tcg_tdx) {
            (true, _) => e2e::Mode::Tdx,
            (false, true) => e2e::Mode::TcgTdx,
            (false, false) => e2e::Mode::Qemu,
        }),
        Cmd::Bench(a) => bench::bench(&a),
        Cmd::Linux => linux::linux().map(|_| ()),
    }
}

#[cfg(test)]
mod tests {
    use super::parse_result;

    #[test]
    fn parses_libtest_summaries() {
        assert_eq!(
            parse_result("test result: ok. 33 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 0.08s"),
            Some((33, 0))
        );
        assert_eq!(
            parse_result("test result: FAILED. 18 passed; 1 failed; 0 ignored; 0 measured"),
            Some((18, 1))
        );
        assert_eq!(parse_result("running 3 tests"), None);
    }
}
