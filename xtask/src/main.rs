//! `cargo xtask`: everything that is not plain `cargo test`.
//!
//! - `cargo xtask test`: the project's test command (what the README and CI run).
//! - `cargo xtask ci`: everything CI checks: toolchain setup, fmt, clippy, docs, the bare-metal
//!   builds of `accept`, then `test`.

use std::process::Command;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

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
}

/// The bare-metal target the guest engine must build for (firmware and kernels).
const FIRMWARE_TARGET: &str = "x86_64-unknown-none";

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

fn test() -> Result<()> {
    let mut c = cargo();
    c.args(["test", "--workspace"]);
    run("cargo test --workspace", c)
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

    for features in [None, Some("hw")] {
        let mut c = cargo();
        c.args(["clippy", "-p", "accept", "--target", FIRMWARE_TARGET]);
        if let Some(f) = features {
            c.args(["--features", f]);
        }
        c.args(["--", "-D", "warnings"]);
        run(
            &format!("accept for {FIRMWARE_TARGET} (features: {features:?})"),
            c,
        )?;
    }

    let mut c = cargo();
    c.args(["doc", "--workspace", "--no-deps"]);
    c.env("RUSTDOCFLAGS", "-D warnings");
    run("cargo doc", c)?;

    test()
}

fn main() -> Result<()> {
    match Cli::parse().cmd {
        Cmd::Test => test(),
        Cmd::Ci => ci(),
    }
}
