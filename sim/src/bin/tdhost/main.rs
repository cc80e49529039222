//! `tdhost`: the host half for the bare-metal test image, which runs under QEMU TCG (no TDX).
//!
//! The image's TDCALLs and memory touches arrive as frames of `e2e_proto::wire` on a Unix
//! socket (QEMU connects its second serial port to it). Each request runs against
//! [`hostvmm::vmm::Host`] (the TDX-module emulator, guest_memfd and private MMU) exactly as a
//! vCPU's instruction would: the vCPU enters the TD, the module answers, and a TD exit goes to
//! the host's exit handlers, after which the image is told to re-execute the instruction. A #VE
//! the module injects becomes an "inject #VE" answer, which the image raises through its IDT.
//!
//! `tdhost --in-process` runs the same self-test (`e2e_proto::selftest`) inside this process
//! against the same host code, with no QEMU: the requests and so every count are the same, which
//! `cargo xtask e2e` checks.
//!
//! With `--mailbox RAM-FILE` (QEMU's guest RAM as a shared file), once the single-vCPU part is
//! done, `tdhost` serves the multi-CPU part (`e2e_proto::smp`) on a host of its own with one
//! vCPU per image vCPU: a thread per vCPU polls that vCPU's mailbox (`e2e_proto::mailbox`) in
//! the file and answers its requests as that vCPU's instructions, so every vCPU can have a
//! request in flight at once. At vCPU 0's DONE it checks the multi-CPU invariants (S-EPT well
//! formed, every 2M unit accepted exactly once and MAPPED, the module's ACCEPT, #VE and MapGPA
//! counts equal to what the vCPUs report) and prints `TDMEM-HOST-SMP-RESULT ok|FAILED ...`.
//! `--in-process` runs that part too, with a thread per vCPU.
//!
//! With `--tcg-tdx VCPU-SOCKET`, `tdhost` serves the patched QEMU of `cargo xtask e2e
//! --tcg-tdx` instead (docs/tcg-tdx.md): QEMU executes the image's TDCALLs and checks its
//! accesses against the Secure-EPT over one link per vCPU on that socket, and `--socket` carries
//! only the image's hello and DONEs (`tcgtdx.rs`).
//!
//! Without `--socket`, `tdhost` runs in process: `tdhost` alone is `tdhost --in-process`.
//!
//! At the end (the image's DONE request) the host checks invariants (S-EPT tree well formed, no
//! host fault errors, no error pages, the image's ACCEPT and #VE counts equal the module's,
//! accepted memory MAPPED, never-touched memory FREE) and prints a report:
//! `TDMEM-HOST-COUNTS {json}` (a `HostCounts`, with `tdsim`'s key names where the
//! quantity is the same) and `TDMEM-HOST-RESULT ok|FAILED ...`. `RUST_LOG` (e.g. `warn`) shows
//! the host half's log on stderr.
//!
//! Page contents: the image's RAM is QEMU's and is really read and written; the emulator keeps
//! its own model of each page's content (a token per 4K page, zeroed by ACCEPT). A touch
//! carries the token the image writes, and the answer carries the token the model holds, so the
//! self-test checks the model's zeroing and persistence, not QEMU's RAM.

mod checks;
mod exec;
mod local;
mod serve;
mod tcgtdx;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Parser;

/// Exit codes and the default run, for `--help`.
const AFTER_HELP: &str = "\
Default run: without --socket, tdhost runs the self-test in process (as --in-process).

Exit codes:
  0  the self-test passed and every host invariant held
  1  the self-test failed, an invariant was violated, or serving failed (timeout, socket, file)
  2  bad arguments, or the host could not be built";

/// The host half for the bare-metal test image: serves its TDCALLs and memory touches, or runs
/// the same self-test in process.
#[derive(Debug, Parser)]
#[command(name = "tdhost", version, after_help = AFTER_HELP)]
struct Cli {
    /// Serve the image on this Unix socket (QEMU's second serial port connects to it).
    #[arg(long, value_name = "PATH", conflicts_with = "in_process")]
    socket: Option<PathBuf>,
    /// After the single-vCPU part, serve the multi-CPU part through the per-vCPU mailboxes in
    /// QEMU's guest RAM file.
    #[arg(long, value_name = "RAM-FILE", requires = "socket")]
    mailbox: Option<PathBuf>,
    /// Serve the patched QEMU of `cargo xtask e2e --tcg-tdx` (its TCG executes TDCALL and
    /// checks accesses against the Secure-EPT): its vCPUs connect on this Unix socket (QEMU's
    /// `TDMEM_TCG_TDX`), the image's control link stays on --socket.
    #[arg(
        long,
        value_name = "VCPU-SOCKET",
        requires = "socket",
        conflicts_with = "mailbox"
    )]
    tcg_tdx: Option<PathBuf>,
    /// Whole-run bound when serving QEMU, in seconds.
    #[arg(long, value_name = "SECS", default_value_t = 150,
          value_parser = clap::value_parser!(u64).range(1..))]
    timeout: u64,
    /// Run the self-test (both parts) in this process against the same host code, no QEMU.
    #[arg(long)]
    in_process: bool,
}

/// Runs what `cli` asks for; true when everything passed.
fn run(cli: &Cli) -> bool {
    let Some(path) = &cli.socket else {
        return local::in_process();
    };
    let timeout = Duration::from_secs(cli.timeout);
    if let Some(vcpus) = &cli.tcg_tdx {
        return tcgtdx::serve_tcg_tdx(path, vcpus, timeout).unwrap_or_else(|e| {
            eprintln!("tdhost: {e}");
            false
        });
    }
    let deadline = Instant::now() + timeout;
    let single = serve::serve(path, timeout);
    let multi = match (&single, &cli.mailbox) {
        (Ok(true), Some(ram)) => serve::serve_smp(ram, deadline),
        _ => Ok(true),
    };
    match (single, multi) {
        (Ok(a), Ok(b)) => a && b,
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("tdhost: {e}");
            false
        }
    }
}

fn main() -> ExitCode {
    env_logger::Builder::from_default_env().init();
    let cli = Cli::parse();
    if run(&cli) {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

#[cfg(test)]
mod tests {
    use clap::error::ErrorKind;
    use clap::CommandFactory;

    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("tdhost").chain(args.iter().copied()))
    }

    #[test]
    fn the_cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn a_timeout_that_is_not_a_number_is_rejected() {
        let e = parse(&["--socket", "s", "--timeout", "abc"]).expect_err("abc is no timeout");
        assert_eq!(e.kind(), ErrorKind::ValueValidation);
        assert!(e.to_string().contains("--timeout"), "{e}");
        assert_eq!(e.exit_code(), 2);
        assert!(parse(&["--socket", "s", "--timeout", "0"]).is_err());
    }

    #[test]
    fn the_default_run_is_in_process_with_a_150_s_timeout() {
        let cli = parse(&[]).expect("no arguments");
        assert!(cli.socket.is_none() && cli.mailbox.is_none());
        assert_eq!(cli.timeout, 150);
    }

    #[test]
    fn serving_qemu_takes_a_socket_a_mailbox_and_a_timeout() {
        let cli = parse(&["--socket", "/tmp/s", "--mailbox", "ram", "--timeout", "120"])
            .expect("the e2e command line");
        assert_eq!(cli.socket, Some(PathBuf::from("/tmp/s")));
        assert_eq!(cli.mailbox, Some(PathBuf::from("ram")));
        assert_eq!(cli.timeout, 120);
    }

    #[test]
    fn tcg_tdx_takes_a_vcpu_socket_besides_the_control_socket() {
        let cli = parse(&["--socket", "/tmp/c", "--tcg-tdx", "/tmp/v"]).expect("tcg-tdx");
        assert_eq!(cli.tcg_tdx, Some(PathBuf::from("/tmp/v")));
        assert!(parse(&["--tcg-tdx", "/tmp/v"]).is_err());
        assert!(parse(&["--socket", "c", "--tcg-tdx", "v", "--mailbox", "ram"]).is_err());
    }

    #[test]
    fn a_mailbox_needs_a_socket_and_in_process_excludes_one() {
        assert!(parse(&["--mailbox", "ram"]).is_err());
        assert!(parse(&["--in-process", "--socket", "s"]).is_err());
        assert!(parse(&["--bogus"]).is_err());
    }

    #[test]
    fn help_lists_every_option_the_exit_codes_and_the_default_run() {
        let help = Cli::command().render_long_help().to_string();
        for want in [
            "--socket",
            "--mailbox",
            "--timeout",
            "--in-process",
            "--tcg-tdx",
            "--version",
            "Exit codes",
            "Default run",
            "[default: 150]",
        ] {
            assert!(help.contains(want), "{want} missing from:\n{help}");
        }
    }

    #[test]
    fn multi_cpu_part_passes_in_process() {
        assert!(local::in_process_smp());
    }
}
