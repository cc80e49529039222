//! The integration recipes of docs/integration.md that are code: each is its own workspace under
//! `examples/`, built and linted for the bare-metal target so the recipe cannot rot.

use anyhow::Result;

use crate::{cargo, run, FIRMWARE_TARGET};

/// The recipe crates, relative to the repository root.
const RECIPES: &[&str] = &["examples/td-shim-payload"];

/// Builds and lints every recipe for [`FIRMWARE_TARGET`].
pub fn check() -> Result<()> {
    for dir in RECIPES {
        let mut c = cargo();
        c.current_dir(dir).args(["fmt", "--all", "--", "--check"]);
        run(&format!("cargo fmt --check ({dir})"), c)?;
        for tool in ["build", "clippy"] {
            let mut c = cargo();
            c.current_dir(dir)
                .args([tool, "--release", "--target", FIRMWARE_TARGET])
                .env("CARGO_TARGET_DIR", "../../target/examples")
                .env_remove("RUSTFLAGS");
            if tool == "clippy" {
                c.args(["--", "-D", "warnings"]);
            }
            run(&format!("cargo {tool} ({dir}, {FIRMWARE_TARGET})"), c)?;
        }
    }
    Ok(())
}
