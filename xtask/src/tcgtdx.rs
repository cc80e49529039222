//! `cargo xtask e2e --tcg-tdx`: the bare-metal image as a TD under the patched QEMU, whose TCG
//! executes TDCALL and checks every guest access against `tdhost`'s Secure-EPT (docs/tcg-tdx.md).
//!
//! It builds the image and `tdhost`, builds (or reuses) the patched QEMU
//! ([`crate::qemu_build`]), starts `tdhost --socket <control> --tcg-tdx <vcpus>` and QEMU with
//! `TDMEM_TCG_TDX=<vcpus>` on [`crate::e2e::VCPUS`] vCPUs, and passes when:
//!
//! - QEMU exits with the image's pass code, and `tdhost` succeeds;
//! - the image's TDCALLs took the module path (they executed: no #UD, no request per call);
//! - both parts' self-tests passed and `tdhost`'s invariants held for both;
//! - at least one #VE was raised by an access itself (QEMU's TLB fill), none by `int 20`, and
//!   the #VEs the image took equal those the module injected.
//!
//! It ends with `e2e: mode=tcg-tdx vcpus=N tdcalls=T ve=V accesses=A ... ok`.

use std::fs;
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};

use crate::e2e::{
    field, finish, image_and_tdhost, image_args, line_after, smp_reports, spawn_tdhost, target_dir,
    RUN_TIMEOUT, VCPUS,
};
use crate::qemu_build::{patched_qemu, QEMU_VERSION};

/// Where Debian's `qemu-system-x86` keeps the firmware the DFSG build lacks (SeaBIOS, the PVH
/// option ROM).
const FIRMWARE_DIRS: [&str; 2] = ["/usr/share/qemu", "/usr/share/seabios"];

/// `cargo xtask e2e --tcg-tdx`.
pub(crate) fn e2e_tcg_tdx() -> Result<()> {
    let start = Instant::now();
    // Debian's QEMU, installed here, brings the firmware the patched build boots with.
    let (image, tdhost) = image_and_tdhost()?;
    let build_start = Instant::now();
    let qemu = patched_qemu()?;
    let build_time = build_start.elapsed();
    let logs = target_dir().join("e2e-tcg-tdx");
    fs::create_dir_all(&logs).context("creating target/e2e-tcg-tdx")?;
    let sock_dir = std::env::temp_dir().join(format!("tdmem-tcg-tdx-{}", std::process::id()));
    fs::create_dir_all(&sock_dir).context("creating the socket directory")?;
    let control = sock_dir.join("control.sock");
    let vcpus = sock_dir.join("vcpus.sock");
    let serial_log = logs.join("serial.log");
    let host_log_path = logs.join("host.log");
    let _ = fs::remove_file(&serial_log);
    let host = spawn_tdhost(
        &tdhost,
        &[
            "--socket".as_ref(),
            control.as_os_str(),
            "--tcg-tdx".as_ref(),
            vcpus.as_os_str(),
        ],
        &host_log_path,
        &[&control, &vcpus],
    )?;
    let deadline = Instant::now() + RUN_TIMEOUT;
    eprintln!(
        "==> TDMEM_TCG_TDX={} {} -accel tcg,thread=multi -smp {VCPUS} -kernel {}",
        vcpus.display(),
        qemu.display(),
        image.display()
    );
    let mut cmd = Command::new(&qemu);
    cmd.env("TDMEM_TCG_TDX", &vcpus);
    for dir in FIRMWARE_DIRS {
        cmd.args(["-L", dir]);
    }
    cmd.args(["-machine", "q35", "-vga", "none", "-nic", "none"]);
    image_args(&mut cmd, &image, &serial_log, &control);
    let qemu_child = match cmd.spawn() {
        Ok(q) => q,
        Err(e) => {
            let mut host = host;
            let _ = host.kill();
            return Err(e).context("starting the patched QEMU");
        }
    };
    let (serial, host_log) = finish(
        qemu_child,
        host,
        deadline,
        &sock_dir,
        &serial_log,
        &host_log_path,
    )?;
    let verdict = check(&serial, &host_log)?;
    println!(
        "e2e: mode=tcg-tdx vcpus={} tdcalls={} ve={} accesses={} ve_accepted_meanwhile={} \
         qemu={QEMU_VERSION}+tcg-tdx qemu_build={:.0}s smp_invariants=ok time={:.1}s ok",
        verdict.vcpus,
        verdict.tdcalls,
        verdict.ve,
        verdict.accesses,
        verdict.meanwhile,
        build_time.as_secs_f64(),
        start.elapsed().as_secs_f64()
    );
    Ok(())
}

/// What a passing run reported.
#[derive(Debug, PartialEq, Eq)]
struct Verdict {
    vcpus: u64,
    tdcalls: u64,
    ve: u64,
    accesses: u64,
    meanwhile: u64,
}

/// Checks the image's and `tdhost`'s logs of a TCG-TDX run.
fn check(serial: &str, host_log: &str) -> Result<Verdict> {
    if !serial.contains("tdcall: path=module") {
        bail!("the image's TDCALLs did not execute (no `tdcall: path=module` line)");
    }
    let guest = line_after(serial, "TDMEM-GUEST-RESULT ").context("no TDMEM-GUEST-RESULT line")?;
    if !guest.contains("failed=0") || guest.starts_with("FAILED") {
        bail!("the single-vCPU self-test failed: {guest}");
    }
    let result = line_after(host_log, "TDMEM-HOST-RESULT ").context("no TDMEM-HOST-RESULT line")?;
    if !result.starts_with("ok mode=tcg-tdx") {
        bail!("tdhost reports for the single-vCPU part: {result}");
    }
    let (smp_guest, smp) = smp_reports(serial, host_log, "TCG-TDX run")?;
    let crossed =
        line_after(host_log, "TDMEM-HOST-TCG-TDX ").context("no TDMEM-HOST-TCG-TDX line")?;
    let ve = field(guest, "ve").unwrap_or(0) + field(smp_guest, "ve").unwrap_or(0);
    let injected = field(crossed, "ve_injected").unwrap_or(u64::MAX);
    let raised = serial.matches("raised by the access itself").count() as u64;
    if raised == 0 || serial.contains("software `int 20`") {
        bail!("want every #VE raised by an access: {raised} were, or some came from `int 20`");
    }
    if ve != injected || raised != ve {
        bail!(
            "#VEs: the image took {ve} ({raised} logged as raised by the access), the module \
             injected {injected}"
        );
    }
    let verdict = Verdict {
        vcpus: field(smp, "vcpus").unwrap_or(0),
        tdcalls: field(crossed, "tdcalls").unwrap_or(0),
        ve,
        accesses: field(crossed, "accesses").unwrap_or(0),
        meanwhile: field(smp, "ve_accepted_meanwhile").unwrap_or(0),
    };
    if verdict.vcpus < u64::from(VCPUS) || verdict.tdcalls == 0 || verdict.accesses == 0 {
        bail!("want {VCPUS} vCPUs, TDCALLs and access checks: {verdict:?}");
    }
    Ok(verdict)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SERIAL: &str = "\
tdcall: path=module (TDCALL 66 0F 01 CC executed)
ve: cpu0: #VE #1 entered through IDT gate 20, rip=0x1 rsp=0x2 (raised by the access itself: x)
TDMEM-GUEST-RESULT passed=7 failed=0 ve=1
ve: cpu2: #VE #2 entered through IDT gate 20, rip=0x1 rsp=0x2 (raised by the access itself: x)
TDMEM-GUEST-SMP vcpus=4 traps=0 reexecuted=0 ve=1 ve_handled=1 ve_accepted_meanwhile=0
TDMEM-GUEST-SMP-RESULT passed=20 failed=0 ve=1
";
    const HOST: &str = "\
TDMEM-HOST-RESULT ok mode=tcg-tdx invariants=ok
TDMEM-HOST-SMP-RESULT ok mode=tcg-tdx invariants=ok
TDMEM-HOST-TCG-TDX tdcalls=300 accesses=5000 ve_injected=2
";

    #[test]
    fn a_passing_run_is_read() {
        assert_eq!(
            check(SERIAL, HOST).expect("passes"),
            Verdict {
                vcpus: 4,
                tdcalls: 300,
                ve: 2,
                accesses: 5000,
                meanwhile: 0
            }
        );
    }

    #[test]
    fn a_ve_from_int_20_or_a_count_mismatch_fails() {
        let int20 = SERIAL.replacen(
            "raised by the access itself: x",
            "software `int 20` on tdhost's inject-#VE answer",
            1,
        );
        assert!(check(&int20, HOST).is_err());
        let more = HOST.replace("ve_injected=2", "ve_injected=3");
        assert!(check(SERIAL, &more).is_err());
        let trap = SERIAL.replace("path=module", "path=trap");
        assert!(check(&trap, HOST).is_err());
        let failed = HOST.replace("SMP-RESULT ok", "SMP-RESULT FAILED");
        assert!(check(SERIAL, &failed).is_err());
    }
}
