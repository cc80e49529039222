//! The patched QEMU of `cargo xtask e2e --tcg-tdx`: QEMU 10.0.2 from Debian's source tarball
//! (bookworm-backports), this project's TCG-TDX patch (`e2e/qemu-tcg-tdx/`), built for
//! `x86_64-softmmu` only, with everything else off, and cached.
//!
//! Steps, each skipped when its result is already there:
//!
//! 1. the build dependencies from Debian (`meson` and `python3-pycotap` from bookworm-backports,
//!    whose source entry it adds; `ninja-build`, `libglib2.0-dev`, `libpixman-1-dev`,
//!    `libfdt-dev`, `flex`, `bison`, `pkg-config`), when `ninja` or a recent enough `meson` is
//!    missing;
//! 2. the tarball `qemu_10.0.2+ds.orig.tar.xz` from deb.debian.org, checked against its
//!    SHA-256;
//! 3. unpacked into `target/tcg-tdx/qemu-10.0.2`, the patch applied with `git apply`;
//! 4. `configure --target-list=x86_64-softmmu --without-default-features ...` and
//!    `ninja qemu-system-x86_64`.
//!
//! The cache key is the tarball's hash and the patch's bytes: a changed patch rebuilds from a
//! fresh tree. The DFSG tarball carries no prebuilt firmware, so the build does not unpack the
//! EDK2 images and the run takes SeaBIOS and the option ROMs from Debian's `qemu-system-x86`.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::apt::{apt_get, privileged};
use crate::e2e::{have, root, target_dir};
use crate::run;

/// The upstream version patched.
pub(crate) const QEMU_VERSION: &str = "10.0.2";
/// Debian's DFSG source tarball of it.
const TARBALL: &str = "qemu_10.0.2+ds.orig.tar.xz";
const TARBALL_URL: &str =
    "http://deb.debian.org/debian/pool/main/q/qemu/qemu_10.0.2+ds.orig.tar.xz";
const TARBALL_SHA256: &str = "0901da33844a331bf8b3602b9c1fbd178e60b737c8e3ade678255bd090c9b9f1";
/// The patch, relative to the repository root.
pub(crate) const PATCH: &str = "e2e/qemu-tcg-tdx/tcg-tdx.patch";

/// Where the build lives.
fn work_dir() -> PathBuf {
    target_dir().join("tcg-tdx")
}

/// The patched `qemu-system-x86_64`, built (or taken from the cache).
pub(crate) fn patched_qemu() -> Result<PathBuf> {
    let work = work_dir();
    fs::create_dir_all(&work).context("creating target/tcg-tdx")?;
    let patch_path = root().join(PATCH);
    let patch = fs::read(&patch_path).with_context(|| format!("reading {PATCH}"))?;
    let key = format!("{TARBALL_SHA256}\n{:016x}\n", fnv1a(&patch));
    let src = work.join(format!("qemu-{QEMU_VERSION}"));
    let bin = src.join("build/qemu-system-x86_64");
    let stamp = work.join("stamp");
    if bin.exists() && fs::read_to_string(&stamp).ok().as_deref() == Some(key.as_str()) {
        eprintln!("==> patched QEMU: cached ({})", bin.display());
        return Ok(bin);
    }
    let _ = fs::remove_file(&stamp);
    build_deps()?;
    let tarball = work.join(TARBALL);
    if sha256(&tarball).ok().as_deref() != Some(TARBALL_SHA256) {
        let mut c = Command::new("curl");
        c.args(["-fsSL", "-o"]).arg(&tarball).arg(TARBALL_URL);
        run(&format!("download {TARBALL}"), c)?;
        let got = sha256(&tarball)?;
        if got != TARBALL_SHA256 {
            bail!("{TARBALL}: SHA-256 {got}, want {TARBALL_SHA256}");
        }
    }
    if src.exists() {
        fs::remove_dir_all(&src).context("removing the old QEMU tree")?;
    }
    let mut c = Command::new("tar");
    c.arg("xf").arg(&tarball).arg("-C").arg(&work);
    run("unpack QEMU", c)?;
    // The DFSG tarball has no EDK2 images to unpack (x86 here boots SeaBIOS from Debian).
    let meson = src.join("meson.build");
    let text = fs::read_to_string(&meson).context("reading QEMU's meson.build")?;
    let edk2 = "    unpack_edk2_blobs = bzip2.found()";
    if !text.contains(edk2) {
        bail!("QEMU's meson.build has no `{edk2}` line to turn off");
    }
    fs::write(&meson, text.replace(edk2, "    unpack_edk2_blobs = false"))
        .context("writing QEMU's meson.build")?;
    let mut c = Command::new("git");
    c.current_dir(&src).args(["apply", "-p1"]).arg(&patch_path);
    run("apply the TCG-TDX patch", c)?;
    let build = src.join("build");
    fs::create_dir_all(&build).context("creating QEMU's build directory")?;
    let mut c = Command::new("../configure");
    c.current_dir(&build).args([
        "--python=/usr/bin/python3",
        "--disable-download",
        "--target-list=x86_64-softmmu",
        "--without-default-features",
        "--enable-tcg",
        "--disable-kvm",
        "--disable-user",
        "--disable-tools",
        "--disable-guest-agent",
        "--disable-docs",
        "--disable-install-blobs",
        "--disable-rust",
        "--disable-werror",
    ]);
    run("configure QEMU (x86_64-softmmu, TCG only)", c)?;
    let jobs = std::thread::available_parallelism().map_or(2, |n| n.get());
    let mut c = Command::new("ninja");
    c.current_dir(&build)
        .arg(format!("-j{jobs}"))
        .arg("qemu-system-x86_64");
    run("build qemu-system-x86_64", c)?;
    if !bin.exists() {
        bail!("{} is missing after the build", bin.display());
    }
    fs::write(&stamp, key).context("writing the build stamp")?;
    Ok(bin)
}

/// Installs what building QEMU needs, when `ninja` or meson >= 1.5 is missing.
fn build_deps() -> Result<()> {
    let meson_ok = python_ok(
        "import mesonbuild.coredata as c, sys; \
         v=tuple(int(x) for x in c.version.split('.')[:2]); sys.exit(0 if v>=(1,5) else 1)",
    );
    let pycotap_ok = python_ok("import pycotap");
    if have("ninja") && have("curl") && meson_ok && pycotap_ok && have("flex") && have("bison") {
        return Ok(());
    }
    let sources = Path::new("/etc/apt/sources.list.d/tdmem-bookworm-backports.sources");
    let entry = "Types: deb deb-src\nURIs: http://deb.debian.org/debian\n\
                 Suites: bookworm-backports\nComponents: main\n\
                 Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n";
    if !sources.exists() {
        let mut c = privileged("tee");
        c.arg(sources).stdout(std::process::Stdio::null());
        c.stdin(std::process::Stdio::piped());
        let mut child = c.spawn().context("adding bookworm-backports")?;
        if let Some(mut stdin) = child.stdin.take() {
            use std::io::Write as _;
            stdin
                .write_all(entry.as_bytes())
                .context("writing the backports entry")?;
        }
        if !child.wait().context("adding bookworm-backports")?.success() {
            bail!("could not add {}", sources.display());
        }
    }
    apt_get(&["update"])?;
    apt_get(&[
        "install",
        "-y",
        "--no-install-recommends",
        "-t",
        "bookworm-backports",
        "meson",
        "python3-pycotap",
    ])?;
    apt_get(&[
        "install",
        "-y",
        "--no-install-recommends",
        "ninja-build",
        "libglib2.0-dev",
        "libpixman-1-dev",
        "libfdt-dev",
        "flex",
        "bison",
        "pkg-config",
        "python3-venv",
        "curl",
        "xz-utils",
        "gcc",
        "git",
    ])
}

/// Whether `/usr/bin/python3 -c code` succeeds (its errors kept off the log).
fn python_ok(code: &str) -> bool {
    Command::new("/usr/bin/python3")
        .args(["-c", code])
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The SHA-256 of `path`, from `sha256sum`.
fn sha256(path: &Path) -> Result<String> {
    let out = Command::new("sha256sum")
        .arg(path)
        .output()
        .context("running sha256sum")?;
    if !out.status.success() {
        bail!("sha256sum {} failed", path.display());
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string())
}

/// FNV-1a over `bytes`: the patch's part of the cache key.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cache_key_follows_the_patch_bytes() {
        assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325);
        assert_ne!(fnv1a(b"a"), fnv1a(b"b"));
    }

    #[test]
    fn the_patch_touches_only_the_tcg_tdx_hooks() {
        let patch = fs::read_to_string(root().join(PATCH)).expect("the patch");
        let files: Vec<&str> = patch
            .lines()
            .filter_map(|l| l.strip_prefix("+++ b/"))
            .collect();
        assert_eq!(
            files,
            [
                "target/i386/helper.h",
                "target/i386/tcg/system/excp_helper.c",
                "target/i386/tcg/system/meson.build",
                "target/i386/tcg/system/tdx-tcg.c",
                "target/i386/tcg/tdx-tcg.h",
                "target/i386/tcg/translate.c",
            ]
        );
        assert!(patch.contains("SPDX-License-Identifier: GPL-2.0-or-later"));
    }
}
