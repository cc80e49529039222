//! The TDCALL trap path of the QEMU run: the engine's real TDCALL backend (`accept::hw`, the
//! `tdx-tdcall` crate's `td_call` and `td_vmcall`) executes the TDCALL instruction
//! (`66 0F 01 CC`), which QEMU TCG does not implement and answers with #UD (vector 6). The #UD
//! handler stands in for the TDX module's entry:
//!
//! 1. it checks that the four bytes at RIP are the TDCALL opcode (anything else, such as the
//!    `ud2` `td_vmcall` executes when RAX comes back non-zero, is a real #UD and fails the run);
//! 2. it turns the register block into one request to `tdhost` over this vCPU's link: the leaf
//!    in RAX selects TDG.VP.INFO, TDG.VP.VEINFO.GET, TDG.MEM.PAGE.ACCEPT (RCX page info) or
//!    `TDG.VP.VMCALL<MapGPA>` (R11 sub-function, R12 start, R13 length);
//! 3. on a retired call it writes the output registers into the saved frame as the module
//!    would (RAX status, RCX, RDX, R8-R11; for TDG.VP.VMCALL RAX 0 and the VMM's R10/R11) and
//!    steps RIP over the 4-byte instruction; on "re-execute" (the TD exited and the host handled
//!    the exit) it leaves RIP alone, so `iretq` runs the TDCALL again and it traps again
//!    (more than `MAX_REEXEC` times in a row ends the run, as on the wire path);
//! 4. a host that killed the TD ends the run.
//!
//! What it does not model: a TDCALL interrupted by an external interrupt, and the register
//! scrubbing the module does on TDG.VP.VMCALL for registers outside the exposure mask.

use core::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};

use accept::abi::{leaf, operand, StatusCode};
use e2e_proto::selftest::{Channel, MAX_REEXEC};
use e2e_proto::wire::{decode_tdcall, Answer, Decoded};

use crate::arch::{self, Frame, EXIT_FAIL};
use crate::println;

/// The TDCALL instruction's encoding.
pub const TDCALL_OPCODE: [u8; 4] = [0x66, 0x0F, 0x01, 0xCC];

/// The trap path's counters for one vCPU.
#[derive(Debug)]
pub struct TrapStats {
    /// TDCALLs that trapped and were served (each re-execution counts again).
    pub traps: AtomicU64,
    /// Traps answered "re-execute".
    pub reexecuted: AtomicU64,
    /// "Re-execute" answers in a row for the current TDCALL.
    in_a_row: AtomicU64,
}

impl TrapStats {
    const fn new() -> TrapStats {
        TrapStats {
            traps: AtomicU64::new(0),
            reexecuted: AtomicU64::new(0),
            in_a_row: AtomicU64::new(0),
        }
    }
}

/// Per-vCPU trap counters.
pub static STATS: [TrapStats; arch::MAX_CPUS] = [const { TrapStats::new() }; arch::MAX_CPUS];
/// How this image's TDCALLs reach a TDX module, found by [`probe`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Path {
    /// TDCALL raises #UD (QEMU TCG): `accept::hw` runs and the #UD handler serves each call.
    Trap,
    /// TDCALL executes and a module answers it (the patched QEMU of `--tcg-tdx`): `accept::hw`
    /// runs, accesses raise #VE by themselves.
    Module,
    /// Neither: each TDCALL is a request on the link (`WireTdcall`).
    Wire,
}

/// [`Path`] as found by [`probe`] (0 before it ran: wire).
static PATH: AtomicU8 = AtomicU8::new(0);

/// The path [`probe`] found.
pub fn path() -> Path {
    match PATH.load(Ordering::Acquire) {
        1 => Path::Trap,
        2 => Path::Module,
        _ => Path::Wire,
    }
}

/// Set while [`probe`] runs: the next TDCALL trap is answered locally.
static PROBING: AtomicBool = AtomicBool::new(false);
/// Set by the trap handler when it saw the probe's TDCALL.
static PROBED: AtomicBool = AtomicBool::new(false);

/// Executes one TDCALL (TDG.VP.INFO) and finds out what answered it: the #UD handler (QEMU
/// TCG, which answers this one locally), a module (TDG.VP.INFO succeeded: the patched QEMU of
/// `--tcg-tdx`), or nothing usable.
pub fn probe() -> Path {
    PROBING.store(true, Ordering::SeqCst);
    let mut args = tdx_tdcall::TdcallArgs {
        rax: leaf::VP_INFO,
        ..Default::default()
    };
    let status = tdx_tdcall::td_call(&mut args);
    PROBING.store(false, Ordering::SeqCst);
    let path = if PROBED.load(Ordering::SeqCst) {
        Path::Trap
    } else if status == 0 && args.rcx & 0x3F != 0 {
        Path::Module
    } else {
        Path::Wire
    };
    let code = match path {
        Path::Trap => 1,
        Path::Module => 2,
        Path::Wire => 0,
    };
    PATH.store(code, Ordering::Release);
    path
}

/// Whether the instruction at `rip` is TDCALL.
fn is_tdcall(rip: u64) -> bool {
    // SAFETY: `rip` is the address of the instruction that faulted, in the image's code
    // (identity mapped, readable); an instruction that decoded far enough to raise #UD has at
    // least its opcode bytes there, and 4 bytes past any code address stay inside the mapping.
    let bytes = unsafe { core::ptr::read_unaligned(rip as *const [u8; 4]) };
    bytes == TDCALL_OPCODE
}

/// The #UD entry. Returns only when the trap was a TDCALL that has been served.
pub fn ud(cpu: usize, frame: &mut Frame, chan: &mut impl Channel) {
    if !is_tdcall(frame.rip) {
        println!(
            "cpu{cpu}: #UD at rip={:#x}: not a TDCALL (a ud2, such as td_vmcall's check of RAX)",
            frame.rip
        );
        println!("TDMEM-GUEST-RESULT FAILED invalid-opcode");
        arch::exit(EXIT_FAIL);
    }
    if PROBING.load(Ordering::SeqCst) {
        PROBED.store(true, Ordering::SeqCst);
        frame.rax = StatusCode::OperandInvalid.with_operand(operand::RAX).raw();
        frame.rip += TDCALL_OPCODE.len() as u64;
        return;
    }
    if let Some(s) = STATS.get(cpu) {
        s.traps.fetch_add(1, Ordering::Relaxed);
    }
    let vmcall = frame.rax & 0xFFFF == leaf::VP_VMCALL;
    let req = match decode_tdcall(frame.rax, frame.rcx, frame.r11, frame.r12, frame.r13) {
        Decoded::Request(req) => req,
        Decoded::Local(r) => {
            frame.rax = r.rax;
            if vmcall {
                frame.r10 = r.r10;
            }
            frame.rip += TDCALL_OPCODE.len() as u64;
            return;
        }
    };
    let answer = chan.call(req);
    if let (Answer::Regs(_), Some(s)) = (answer, STATS.get(cpu)) {
        s.in_a_row.store(0, Ordering::Relaxed);
    }
    match answer {
        Answer::Regs(r) if vmcall => {
            frame.rax = r.rax;
            frame.r10 = r.r10;
            frame.r11 = r.r11;
            frame.rip += TDCALL_OPCODE.len() as u64;
        }
        Answer::Regs(r) => {
            frame.rax = r.rax;
            frame.rcx = r.rcx;
            frame.rdx = r.rdx;
            frame.r8 = r.r8;
            frame.r9 = r.r9;
            frame.r10 = r.r10;
            frame.r11 = r.r11;
            frame.rip += TDCALL_OPCODE.len() as u64;
        }
        Answer::Reexecute => {
            let in_a_row = STATS.get(cpu).map_or(0, |s| {
                s.reexecuted.fetch_add(1, Ordering::Relaxed);
                s.in_a_row.fetch_add(1, Ordering::Relaxed) + 1
            });
            if in_a_row > u64::from(MAX_REEXEC) {
                println!("cpu{cpu}: TDCALL {req:?} re-executed {in_a_row} times: host livelock");
                println!("TDMEM-GUEST-RESULT FAILED livelock");
                arch::exit(EXIT_FAIL);
            }
        }
        other => {
            println!(
                "cpu{cpu}: TDCALL {req:?} at rip={:#x}: host answered {other:?}",
                frame.rip
            );
            println!("TDMEM-GUEST-RESULT FAILED host-killed-td");
            arch::exit(EXIT_FAIL);
        }
    }
}
