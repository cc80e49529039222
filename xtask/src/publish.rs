//! Checks that the guest crates can be published and that the guest engine's default build has
//! no dependency: `cargo publish --dry-run` of both crates together (the firmware glue depends on
//! the engine's version, which the dry run resolves from the engine packaged beside it), and
//! `cargo tree -e normal` of the engine.

use anyhow::{bail, Context, Result};

use crate::{cargo, run, FIRMWARE_GLUE, GUEST_ENGINE};

/// Runs both checks.
pub fn check() -> Result<()> {
    let mut c = cargo();
    c.args([
        "publish",
        "--dry-run",
        "--allow-dirty",
        "-p",
        GUEST_ENGINE,
        "-p",
        FIRMWARE_GLUE,
    ]);
    run("cargo publish --dry-run (guest crates)", c)?;

    eprintln!("==> cargo tree -e normal -p {GUEST_ENGINE}");
    let out = cargo()
        .args([
            "tree",
            "-e",
            "normal",
            "-p",
            GUEST_ENGINE,
            "--prefix",
            "none",
        ])
        .output()
        .context("starting cargo tree")?;
    if !out.status.success() {
        bail!("cargo tree failed ({})", out.status);
    }
    let tree = String::from_utf8_lossy(&out.stdout);
    let deps = dependencies(&tree);
    if !deps.is_empty() {
        bail!("{GUEST_ENGINE}'s default build depends on {deps:?}; it must depend on nothing");
    }
    eprintln!("{GUEST_ENGINE}: no dependency in the default build");
    Ok(())
}

/// The packages `cargo tree --prefix none` lists besides the root (its first line).
fn dependencies(tree: &str) -> Vec<&str> {
    tree.lines()
        .skip(1)
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::dependencies;

    #[test]
    fn root_alone_has_no_dependencies() {
        assert!(dependencies("tdmem-accept v0.1.0 (/x/accept)\n").is_empty());
    }

    #[test]
    fn lists_what_follows_the_root() {
        let tree = "tdmem-accept v0.1.0 (/x)\nx86_64 v0.15.5\n";
        assert_eq!(dependencies(tree), ["x86_64 v0.15.5"]);
    }
}
