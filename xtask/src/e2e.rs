//! `cargo xtask e2e`: the bare-metal test image under QEMU TCG against `tdhost`, and
//! `cargo xtask e2e --tdx`: the same image as a td-shim payload in a real TD.
//!
//! The TCG run builds the image (`e2e/guest`, `x86_64-unknown-none`) and `tdhost`, installs
//! QEMU (Debian `qemu-system-x86`) when `qemu-system-x86_64` is missing, runs the self-test
//! in process (`tdhost --in-process`), then starts `tdhost` on a Unix socket and QEMU with the
//! image on [`VCPUS`] vCPUs under multi-threaded TCG (COM1 -> serial log, COM2 -> the socket,
//! guest RAM in a shared file whose per-vCPU mailboxes `tdhost` serves). It fails unless QEMU
//! exits with the image's pass code; `tdhost` reports success with its invariants holding for
//! both parts; the single-vCPU part's guest result line and host counts equal the in-process
//! run's; and the multi-CPU part ran on at least 4 vCPUs with TDCALLs through the #UD trap
//! path. It ends with the line `e2e: vcpus=N tdcall_traps=T ve=V ... ok`. Both processes are
//! killed on timeout. Logs: `target/e2e/serial.log`, `target/e2e/host.log`,
//! `target/e2e/in-process.log`.
//!
//! The TDX run needs a host whose `kvm_intel` has TDX enabled; elsewhere it says so and skips.
//! `cargo xtask e2e --tcg-tdx` runs the image as a TD under a patched QEMU instead (`tcgtdx.rs`).
//! docs/e2e.md has the manual procedure.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::{cargo, run, FIRMWARE_TARGET};

/// QEMU's exit status when the image writes its pass code to `isa-debug-exit` ((0x10 << 1) | 1).
const QEMU_PASS: i32 = 33;
/// Whole-run bound for QEMU and `tdhost` each.
pub(crate) const RUN_TIMEOUT: Duration = Duration::from_secs(120);
/// Guest memory, as `e2e_proto::selftest::MEMORY`.
const GUEST_MEMORY: &str = "512M";
/// vCPUs of the QEMU run, as `e2e_proto::smp::CPUS`.
pub(crate) const VCPUS: u32 = 4;
/// Where `kvm_intel` says whether TDX is enabled.
const TDX_PARAM: &str = "/sys/module/kvm_intel/parameters/tdx";
/// td-shim's public repository.
const TD_SHIM_REPO: &str = "https://github.com/confidential-containers/td-shim";

pub(crate) fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

pub(crate) fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target"))
}

/// Builds the image; `tdx` selects the real TDCALL backend (a PIE for td-shim's loader).
fn build_image(tdx: bool) -> Result<PathBuf> {
    let dir = target_dir().join("e2e-guest");
    let mut c = cargo();
    c.current_dir(root().join("e2e/guest"))
        .args(["build", "--release", "--target", FIRMWARE_TARGET])
        .env("CARGO_TARGET_DIR", &dir)
        .env_remove("CARGO_ENCODED_RUSTFLAGS");
    if tdx {
        c.args(["--features", "tdx"])
            .env("RUSTFLAGS", "-C relocation-model=pie");
    } else {
        // e2e/guest/.cargo/config.toml sets relocation-model=static; RUSTFLAGS would override it.
        c.env_remove("RUSTFLAGS");
    }
    run("build the bare-metal image", c)?;
    Ok(dir.join(FIRMWARE_TARGET).join("release/tdmem-e2e-guest"))
}

fn build_tdhost() -> Result<PathBuf> {
    let mut c = cargo();
    c.current_dir(root())
        .args(["build", "-p", "tdmem-sim", "--bin", "tdhost"]);
    run("build tdhost", c)?;
    Ok(target_dir().join("debug/tdhost"))
}

pub(crate) fn have(cmd: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {cmd}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Installs Debian's `qemu-system-x86` when `qemu-system-x86_64` is missing.
fn ensure_qemu() -> Result<()> {
    if have("qemu-system-x86_64") {
        return Ok(());
    }
    crate::apt::apt_get(&["update"])?;
    crate::apt::apt_get(&[
        "install",
        "-y",
        "--no-install-recommends",
        "qemu-system-x86",
    ])?;
    if !have("qemu-system-x86_64") {
        bail!("qemu-system-x86_64 is still missing after installing qemu-system-x86");
    }
    Ok(())
}

/// Waits for `child` until `deadline`; kills it (and reports a timeout) after.
fn wait_until(child: &mut Child, deadline: Instant, what: &str) -> Result<ExitStatus> {
    loop {
        if let Some(status) = child
            .try_wait()
            .with_context(|| format!("waiting for {what}"))?
        {
            return Ok(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "{what} timed out after {}s and was killed",
                RUN_TIMEOUT.as_secs()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The text after `prefix` on the first line that starts with it.
pub(crate) fn line_after<'a>(text: &'a str, prefix: &str) -> Option<&'a str> {
    text.lines()
        .find_map(|l| l.trim_end_matches('\r').strip_prefix(prefix))
}

/// The number after `key=` in `line`.
pub(crate) fn field(line: &str, key: &str) -> Option<u64> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
        .and_then(|v| v.parse().ok())
}

/// The multi-CPU part's report lines, checked: `(guest result, guest SMP line)`.
pub(crate) fn smp_reports<'a>(
    guest_log: &'a str,
    host_log: &str,
    what: &str,
) -> Result<(&'a str, &'a str)> {
    let guest = line_after(guest_log, "TDMEM-GUEST-SMP-RESULT ")
        .with_context(|| format!("{what}: no TDMEM-GUEST-SMP-RESULT line"))?;
    if !guest.contains("failed=0") || guest.starts_with("FAILED") {
        bail!("{what}: the multi-CPU self-test failed: {guest}");
    }
    let result = line_after(host_log, "TDMEM-HOST-SMP-RESULT ")
        .with_context(|| format!("{what}: no TDMEM-HOST-SMP-RESULT line"))?;
    if !result.starts_with("ok") {
        bail!("{what}: tdhost reports for the multi-CPU part: {result}");
    }
    let smp = line_after(guest_log, "TDMEM-GUEST-SMP ").unwrap_or("");
    Ok((guest, smp))
}

/// What one run reported.
struct Reports {
    guest: String,
    /// `tdhost`'s `TDMEM-HOST-COUNTS` object.
    counts: serde_json::Value,
}

/// The JSON object on `tdhost`'s `TDMEM-HOST-COUNTS` line.
fn host_counts(line: &str, what: &str) -> Result<serde_json::Value> {
    let counts: serde_json::Value = serde_json::from_str(line)
        .with_context(|| format!("{what}: TDMEM-HOST-COUNTS is not JSON: {line}"))?;
    if !counts.is_object() || counts.get("tdcalls").is_none() {
        bail!("{what}: TDMEM-HOST-COUNTS is not tdhost's counts object: {line}");
    }
    Ok(counts)
}

fn reports(guest_log: &str, host_log: &str, what: &str) -> Result<Reports> {
    let guest = line_after(guest_log, "TDMEM-GUEST-RESULT ")
        .with_context(|| format!("{what}: no TDMEM-GUEST-RESULT line"))?;
    if !guest.contains("failed=0") || guest.starts_with("FAILED") {
        bail!("{what}: the image's self-test failed: {guest}");
    }
    let result = line_after(host_log, "TDMEM-HOST-RESULT ")
        .with_context(|| format!("{what}: no TDMEM-HOST-RESULT line"))?;
    if !result.starts_with("ok") {
        bail!("{what}: tdhost reports: {result}");
    }
    let counts = line_after(host_log, "TDMEM-HOST-COUNTS ")
        .with_context(|| format!("{what}: no TDMEM-HOST-COUNTS line"))?;
    Ok(Reports {
        guest: guest.to_string(),
        counts: host_counts(counts, what)?,
    })
}

/// Where `cargo xtask e2e` runs the test image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Under QEMU TCG against `tdhost`, TDCALL trapped (the default).
    Qemu,
    /// As a td-shim payload in a real TD (`--tdx`).
    Tdx,
    /// As a TD under QEMU with the TCG-TDX patch (`--tcg-tdx`).
    TcgTdx,
}

/// `cargo xtask e2e [--tdx | --tcg-tdx]`.
pub fn e2e(mode: Mode) -> Result<()> {
    match mode {
        Mode::Qemu => e2e_qemu(),
        Mode::Tdx => e2e_tdx(),
        Mode::TcgTdx => crate::tcgtdx::e2e_tcg_tdx(),
    }
}

/// What both QEMU runs need first: the bare-metal target, the image (TDCALL trapped or
/// executed, whichever the machine does), `tdhost`, and Debian's QEMU (the ordinary run's
/// emulator; the firmware of the patched one). Returns the image and `tdhost`.
pub(crate) fn image_and_tdhost() -> Result<(PathBuf, PathBuf)> {
    let mut c = Command::new("rustup");
    c.args(["target", "add", FIRMWARE_TARGET]);
    run("rustup target add", c)?;
    let image = build_image(false)?;
    let tdhost = build_tdhost()?;
    ensure_qemu()?;
    Ok((image, tdhost))
}

/// The default run: the image under QEMU TCG against `tdhost`, checked against the same
/// self-test run in process.
fn e2e_qemu() -> Result<()> {
    let start = Instant::now();
    let (image, tdhost) = image_and_tdhost()?;
    let logs = target_dir().join("e2e");
    fs::create_dir_all(&logs).context("creating target/e2e")?;

    // 1. The same self-test in process: the reference counts.
    eprintln!("==> tdhost --in-process");
    let out = Command::new(&tdhost)
        .arg("--in-process")
        .output()
        .context("running tdhost --in-process")?;
    let in_log = String::from_utf8_lossy(&out.stdout).into_owned();
    fs::write(logs.join("in-process.log"), &in_log).context("writing in-process.log")?;
    if !out.status.success() {
        eprintln!("{in_log}");
        bail!("tdhost --in-process failed ({})", out.status);
    }
    let reference = reports(&in_log, &in_log, "in-process run")?;
    smp_reports(&in_log, &in_log, "in-process run")?;

    // 2. QEMU TCG + tdhost over a Unix socket (short path: sun_path holds 108 bytes).
    let sock_dir = std::env::temp_dir().join(format!("tdmem-e2e-{}", std::process::id()));
    fs::create_dir_all(&sock_dir).context("creating the socket directory")?;
    let sock = sock_dir.join("host.sock");
    let serial_log = logs.join("serial.log");
    let host_log_path = logs.join("host.log");
    // Guest RAM: a sparse file QEMU maps shared and tdhost reads the mailboxes from.
    let ram = logs.join("guest-ram");
    let _ = fs::remove_file(&serial_log);
    let _ = fs::remove_file(&ram);
    let mut host = spawn_tdhost(
        &tdhost,
        &[
            "--socket".as_ref(),
            sock.as_os_str(),
            "--mailbox".as_ref(),
            ram.as_os_str(),
        ],
        &host_log_path,
        &[&sock],
    )?;
    let deadline = Instant::now() + RUN_TIMEOUT;
    eprintln!(
        "==> qemu-system-x86_64 -accel tcg,thread=multi -smp {VCPUS} -kernel {}",
        image.display()
    );
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args(["-machine", "q35,memory-backend=ram", "-object"])
        .arg(format!(
            "memory-backend-file,id=ram,size={GUEST_MEMORY},mem-path={},share=on",
            ram.display()
        ));
    image_args(&mut cmd, &image, &serial_log, &sock);
    let qemu = cmd.spawn();
    let qemu = match qemu {
        Ok(q) => q,
        Err(e) => {
            let _ = host.kill();
            return Err(e).context("starting qemu-system-x86_64");
        }
    };
    let logs = finish(qemu, host, deadline, &sock_dir, &serial_log, &host_log_path);
    let _ = fs::remove_file(&ram);
    let (serial, host_log) = logs?;
    let got = reports(&serial, &host_log, "QEMU run")?;
    if got.guest != reference.guest {
        bail!(
            "guest results differ:\n  QEMU:       {}\n  in-process: {}",
            got.guest,
            reference.guest
        );
    }
    if got.counts != reference.counts {
        bail!(
            "host counts differ:\n  QEMU:       {}\n  in-process: {}",
            got.counts,
            reference.counts
        );
    }
    if !serial.contains("entered through IDT gate 20") {
        bail!("the serial log shows no #VE entered through the IDT");
    }
    let (smp_guest, smp) = smp_reports(&serial, &host_log, "QEMU run")?;
    let vcpus = field(smp, "vcpus").unwrap_or(0);
    let traps = field(smp, "traps").unwrap_or(0);
    let path = if serial.contains("tdcall: path=trap") {
        "trap"
    } else {
        "wire"
    };
    if vcpus < 4 || traps == 0 || path != "trap" {
        bail!(
            "the multi-CPU part ran on {vcpus} vCPUs with {traps} TDCALL traps (path {path}); \
             want at least 4 vCPUs and TDCALLs through the #UD trap"
        );
    }
    let ve = field(&got.guest, "ve").unwrap_or(0) + field(smp_guest, "ve").unwrap_or(0);
    println!("e2e: guest   {}", got.guest);
    println!("e2e: host    {}", got.counts);
    println!("e2e: smp     {smp_guest}");
    println!(
        "e2e: vcpus={vcpus} tdcall_traps={traps} ve={ve} ve_accepted_meanwhile={} tdcall_path={path} \
         single_vcpu=equal-to-in-process smp_invariants=ok time={:.1}s ok",
        field(smp, "ve_accepted_meanwhile").unwrap_or(0),
        start.elapsed().as_secs_f64()
    );
    Ok(())
}

/// The QEMU arguments both runs share: multi-threaded TCG on [`VCPUS`] vCPUs and
/// [`GUEST_MEMORY`], no display, the image as a PVH kernel, COM1 into `serial_log`, COM2 to
/// `tdhost`'s socket `sock`, and `isa-debug-exit` for the verdict.
pub(crate) fn image_args(cmd: &mut Command, image: &Path, serial_log: &Path, sock: &Path) {
    cmd.args(["-accel", "tcg,thread=multi", "-cpu", "max", "-smp"])
        .arg(VCPUS.to_string())
        .args(["-m", GUEST_MEMORY])
        .args(["-display", "none", "-monitor", "none", "-no-reboot"])
        .arg("-kernel")
        .arg(image)
        .arg("-serial")
        .arg(format!("file:{}", serial_log.display()))
        .arg("-chardev")
        .arg(format!("socket,id=tdhost,path={}", sock.display()))
        .args(["-serial", "chardev:tdhost"])
        .args(["-device", "isa-debug-exit,iobase=0xf4,iosize=0x04"]);
}

/// Starts `tdhost` with `args` (and the run's timeout), its output into `log`, and waits up to
/// 10 s for it to create every socket in `sockets`.
pub(crate) fn spawn_tdhost(
    tdhost: &Path,
    args: &[&std::ffi::OsStr],
    log: &Path,
    sockets: &[&Path],
) -> Result<Child> {
    eprintln!(
        "==> tdhost {}",
        args.iter()
            .map(|a| a.to_string_lossy())
            .collect::<Vec<_>>()
            .join(" ")
    );
    let out = fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
    let mut host = Command::new(tdhost)
        .args(args)
        .args(["--timeout", &RUN_TIMEOUT.as_secs().to_string()])
        .stdout(out.try_clone().context("tdhost's log")?)
        .stderr(out)
        .spawn()
        .context("starting tdhost")?;
    let ready = Instant::now() + Duration::from_secs(10);
    while !sockets.iter().all(|s| s.exists()) {
        if Instant::now() > ready || host.try_wait().ok().flatten().is_some() {
            let _ = host.kill();
            bail!("tdhost did not open {sockets:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(host)
}

/// Waits for QEMU (until `deadline`) and then `tdhost` (10 s more at most), removes
/// `sock_dir`, prints both logs, and fails unless QEMU exited with the image's pass code and
/// `tdhost` succeeded. Returns the serial log and `tdhost`'s log.
pub(crate) fn finish(
    mut qemu: Child,
    mut host: Child,
    deadline: Instant,
    sock_dir: &Path,
    serial_log: &Path,
    host_log_path: &Path,
) -> Result<(String, String)> {
    let qemu_status = wait_until(&mut qemu, deadline, "QEMU");
    if qemu_status.is_err() {
        let _ = host.kill();
    }
    // tdhost reports as soon as the image's last DONE is answered; if QEMU stopped without
    // one (a failed image), do not wait for tdhost's own timeout.
    let host_deadline = (Instant::now() + Duration::from_secs(10)).min(deadline);
    let host_status = wait_until(&mut host, host_deadline, "tdhost");
    let _ = fs::remove_dir_all(sock_dir);
    let serial = fs::read_to_string(serial_log).unwrap_or_default();
    let host_log = fs::read_to_string(host_log_path).unwrap_or_default();
    println!("---- QEMU serial log ({}) ----", serial_log.display());
    print!("{serial}");
    println!("---- tdhost report ({}) ----", host_log_path.display());
    print!("{host_log}");
    println!("----");
    let qemu_status = qemu_status?;
    let host_status = host_status?;
    if qemu_status.code() != Some(QEMU_PASS) {
        bail!("QEMU exited with {qemu_status}, not the image's pass code {QEMU_PASS}");
    }
    if !host_status.success() {
        bail!("tdhost failed ({host_status})");
    }
    Ok((serial, host_log))
}

/// Whether this host's KVM has TDX enabled, with the reason when not.
fn tdx_available() -> std::result::Result<(), String> {
    match fs::read_to_string(TDX_PARAM) {
        Ok(v) if matches!(v.trim(), "Y" | "y" | "1") => Ok(()),
        Ok(v) => Err(format!("{TDX_PARAM} is {:?}", v.trim())),
        Err(e) => Err(format!("{TDX_PARAM}: {e}")),
    }
}

/// `cargo xtask e2e --tdx`: the image as a td-shim payload in a real TD.
fn e2e_tdx() -> Result<()> {
    if let Err(why) = tdx_available() {
        println!("e2e --tdx: TDX is unavailable on this host ({why}): skipped.");
        println!("e2e --tdx: see docs/e2e.md, \"Running on a TDX host\", for the procedure.");
        return Ok(());
    }
    let image = build_image(true)?;
    let work = target_dir().join("e2e-tdx");
    fs::create_dir_all(&work).context("creating target/e2e-tdx")?;
    let shim = work.join("td-shim");
    if !shim.join("Cargo.toml").exists() {
        let mut c = Command::new("git");
        c.args([
            "clone",
            "--depth",
            "1",
            "--recurse-submodules",
            TD_SHIM_REPO,
        ])
        .arg(&shim);
        run("clone td-shim", c)?;
    }
    // td-shim's own scripts: toolchain pieces (nasm, clang, llvm-ar) and its patched deps.
    let mut c = Command::new("bash");
    c.current_dir(&shim).arg("sh_script/preparation.sh");
    run("td-shim preparation.sh", c)?;
    let payload = work.join("tdmem-e2e-guest");
    fs::copy(&image, &payload).context("copying the image")?;
    let final_bin = work.join("final-tdmem.bin");
    let mut c = cargo();
    c.current_dir(&shim)
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_TARGET_DIR")
        .env("CC_x86_64_unknown_none", "clang")
        .env("AR_x86_64_unknown_none", "llvm-ar")
        .env("AS", "nasm")
        .args(["image", "--release", "-t", "executable", "-p"])
        .arg(&payload)
        .arg("-o")
        .arg(&final_bin);
    run("td-shim cargo image (payload: the test image)", c)?;
    let serial_log = work.join("serial.log");
    let _ = fs::remove_file(&serial_log);
    let mut qemu = Command::new(std::env::var("QEMU").unwrap_or("qemu-system-x86_64".into()))
        .args(tdx_qemu_args(&final_bin, &serial_log))
        .spawn()
        .context("starting QEMU with TDX")?;
    // The image prints its result, then writes the debug-exit port (a TDVMCALL<IO> in a TD)
    // and halts; stop QEMU once the result line is there, whichever comes first.
    let deadline = Instant::now() + RUN_TIMEOUT;
    let serial = loop {
        let serial = fs::read_to_string(&serial_log).unwrap_or_default();
        let exited = qemu.try_wait().context("waiting for QEMU")?.is_some();
        if exited || line_after(&serial, "TDMEM-GUEST-RESULT ").is_some() {
            let _ = qemu.kill();
            let _ = qemu.wait();
            break serial;
        }
        if Instant::now() > deadline {
            let _ = qemu.kill();
            let _ = qemu.wait();
            bail!("the TD did not report within {}s", RUN_TIMEOUT.as_secs());
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    print!("{serial}");
    let result = line_after(&serial, "TDMEM-GUEST-RESULT ").context("no TDMEM-GUEST-RESULT")?;
    if !result.contains("failed=0") || result.starts_with("FAILED") {
        bail!("TDX run failed: {result}");
    }
    println!("e2e --tdx: pass: {result}");
    Ok(())
}

/// QEMU's command line for the TD (docs/e2e.md shows the same).
fn tdx_qemu_args(final_bin: &Path, serial_log: &Path) -> Vec<String> {
    let mut a: Vec<String> = [
        "-accel",
        "kvm",
        "-m",
        "2G",
        "-smp",
        "1",
        "-cpu",
        "host,pmu=off,-kvm-steal-time",
        "-object",
        "memory-backend-ram,id=ram1,size=2G,private=on",
        "-object",
        "tdx-guest,id=tdx0,sept-ve-disable=off",
        "-machine",
        "q35,confidential-guest-support=tdx0,kernel-irqchip=split,memory-backend=ram1",
        "-display",
        "none",
        "-monitor",
        "none",
        "-no-reboot",
        "-no-hpet",
        "-device",
        "isa-debug-exit,iobase=0xf4,iosize=0x04",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    a.push("-bios".into());
    a.push(final_bin.display().to_string());
    a.push("-serial".into());
    a.push(format!("file:{}", serial_log.display()));
    a
}

#[cfg(test)]
mod tests {
    use super::{field, host_counts, line_after};

    #[test]
    fn finds_report_lines() {
        let log = "boot\r\nTDMEM-GUEST-RESULT passed=7 failed=0\r\nmore\n";
        assert_eq!(
            line_after(log, "TDMEM-GUEST-RESULT "),
            Some("passed=7 failed=0")
        );
        assert_eq!(line_after(log, "TDMEM-HOST-RESULT "), None);
    }

    #[test]
    fn reads_host_counts() {
        let counts = host_counts(r#"{"tdcalls":3,"ve_injected":1}"#, "t").expect("counts");
        assert_eq!(counts["ve_injected"], 1);
        // Key order does not matter when two runs are compared.
        let same = host_counts(r#"{"ve_injected":1,"tdcalls":3}"#, "t").expect("counts");
        assert_eq!(counts, same);
        assert!(host_counts("tdcalls=3", "t").is_err());
        assert!(host_counts("[1]", "t").is_err());
    }

    #[test]
    fn reads_fields() {
        let line = "vcpus=4 traps=328 reexecuted=155 ve=4";
        assert_eq!(field(line, "vcpus"), Some(4));
        assert_eq!(field(line, "traps"), Some(328));
        assert_eq!(field(line, "ve"), Some(4));
        assert_eq!(field(line, "v"), None);
    }
}
