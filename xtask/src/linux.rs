//! `cargo xtask linux`: the differential conformance suite against unmodified Linux 6.12 code.
//!
//! 1. Installs Debian's `linux-source-6.12` when `/usr/src/linux-source-6.12.tar.xz` is missing.
//! 2. Extracts only [`FILES`] into `target/linux-6.12/` (never into the source tree: Linux is
//!    GPL-2.0, this project Apache-2.0 OR MIT, so no kernel file is committed).
//! 3. Runs `cargo test -p linux-conformance` with `TDMEM_LINUX_SRC` pointing there: the crate's
//!    build script compiles the files unmodified with its own shim headers and harness, and its
//!    tests run Linux and the engine side by side.
//! 4. Prints `linux: N passed, M failed`.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::apt::apt_get;
use crate::{cargo, e2e, run, run_counting};

/// The Debian package and the tarball it ships.
const PACKAGE: &str = "linux-source-6.12";
const TARBALL: &str = "/usr/src/linux-source-6.12.tar.xz";
/// The tarball's top directory.
const TOP: &str = "linux-source-6.12";

/// Every kernel file the suite compiles or includes (found with `gcc -M`).
pub const FILES: &[&str] = &[
    "drivers/firmware/efi/unaccepted_memory.c",
    "drivers/firmware/efi/libstub/unaccepted_memory.c",
    "drivers/firmware/efi/libstub/efistub.h",
    "arch/x86/coco/tdx/tdx-shared.c",
    "arch/x86/coco/tdx/tdx.c",
    "lib/find_bit.c",
    "include/linux/efi.h",
    "include/linux/find.h",
    "arch/x86/include/asm/shared/tdx.h",
    "arch/x86/include/uapi/asm/vmx.h",
];

/// Where the files are extracted.
fn source_dir() -> PathBuf {
    e2e::root().join("target").join("linux-6.12")
}

fn ensure_tarball() -> Result<()> {
    if Path::new(TARBALL).exists() {
        return Ok(());
    }
    let install = ["install", "-y", "-q", PACKAGE, "xz-utils"];
    if apt_get(&install).is_err() {
        // The package lists may be missing or stale on a fresh machine.
        apt_get(&["update", "-q"])?;
        apt_get(&install)?;
    }
    if !Path::new(TARBALL).exists() {
        bail!("{PACKAGE} is installed but {TARBALL} is missing");
    }
    Ok(())
}

fn extract(dir: &Path) -> Result<()> {
    if FILES.iter().all(|f| dir.join(f).is_file()) {
        return Ok(());
    }
    ensure_tarball()?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut c = Command::new("tar");
    c.arg("-xJf")
        .arg(TARBALL)
        .arg("-C")
        .arg(dir)
        .arg("--strip-components=1");
    for f in FILES {
        c.arg(format!("{TOP}/{f}"));
    }
    run(&format!("extracting {} kernel files", FILES.len()), c)
}

/// Runs the suite; returns (passed, failed).
pub fn linux() -> Result<(u64, u64)> {
    let dir = source_dir();
    extract(&dir)?;
    eprintln!(
        "==> cargo test -p linux-conformance (Linux 6.12 from {})",
        dir.display()
    );
    let mut c = cargo();
    c.args(["test", "-p", "linux-conformance"])
        .env("TDMEM_LINUX_SRC", &dir);
    let (passed, failed, status) = run_counting(c)?;
    println!("linux: {passed} passed, {failed} failed");
    if !status.success() || failed > 0 {
        bail!("the Linux conformance suite failed ({status})");
    }
    if passed == 0 {
        bail!("the Linux conformance suite ran no test (was the Linux code built?)");
    }
    Ok((passed, failed))
}
