//! Drives vCPU 0 of a [`Host`] the way a vCPU loop does: enter the TD, make one call or access,
//! leave it unless the outcome was an exit (the module already took the vCPU out), and hand
//! exits to [`Host::handle_exit`].
//!
//! The guest side is modelled as the engine behaves: BUSY answers to ACCEPT are retried, an
//! interrupted 2M ACCEPT is re-executed. The loop is bounded: a host that never lets the guest
//! make progress shows up as [`GuestError::Livelock`], not as a hang.

use accept::abi::{page_info, vmcall, GhciStatus, Gpa, PageLevel, StatusCode, TdxStatus, VeInfo};
use hostvmm::module::{Access, AccessOutcome, SeptState, TdcallOutcome, VmcallRegs};
use hostvmm::vmm::{ExitAction, Host};

/// 4 KiB.
pub const K4: u64 = 4096;
/// 2 MiB.
pub const M2: u64 = 2 << 20;
/// The shared bit of a 48-bit GPA width.
pub const SHARED: u64 = 1 << 47;

/// Bound on exits, BUSY answers and re-executions of one guest operation.
pub const GUEST_STEPS: u32 = 256;
/// Bound on RETRY answers to one guest MapGPA request.
pub const MAP_GPA_TRIES: u32 = 64;

/// What stopped a guest operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestError {
    /// The host answered an exit with something other than "resume".
    Host(ExitAction),
    /// No progress within [`GUEST_STEPS`] steps.
    Livelock,
}

/// What a guest access ended with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Touch {
    /// The access completed: the token read or written.
    Ok(u64),
    /// A #VE for a pending page (VE info is valid until read).
    Ve(VeInfo),
}

fn never() -> bool {
    false
}

fn resume(h: &Host, exit: hostvmm::module::TdExit) -> Result<(), GuestError> {
    let mut regs = VmcallRegs::default();
    match h.handle_exit(exit, &mut regs, &never) {
        ExitAction::Resume => Ok(()),
        other => Err(GuestError::Host(other)),
    }
}

/// TDG.MEM.PAGE.ACCEPT of `gpa` at `level` until it completes with a status that is not BUSY.
///
/// # Errors
/// [`GuestError`] when the host fails an exit or the guest cannot make progress.
pub fn accept(h: &Host, gpa: u64, level: PageLevel) -> Result<TdxStatus, GuestError> {
    let m = h.module();
    for _ in 0..GUEST_STEPS {
        m.vcpu_enter(0).expect("vCPU 0 enters");
        match m
            .tdg_mem_page_accept(0, page_info(Gpa::new_truncate(gpa), level))
            .expect("vCPU 0 is in the TD")
        {
            TdcallOutcome::Completed(s) => {
                m.vcpu_exit(0).expect("vCPU 0 leaves");
                if s.is(StatusCode::OperandBusy) {
                    continue;
                }
                return Ok(s);
            }
            TdcallOutcome::Interrupted => m.vcpu_exit(0).expect("vCPU 0 leaves"),
            TdcallOutcome::Exit(exit) => resume(h, exit)?,
        }
    }
    Err(GuestError::Livelock)
}

/// A guest access to `gpa`, re-executed after every exit the host resolves.
///
/// # Errors
/// [`GuestError`]; an access to a shared or invalid GPA is a test bug and panics.
pub fn touch(h: &Host, gpa: u64, access: Access) -> Result<Touch, GuestError> {
    let m = h.module();
    for _ in 0..GUEST_STEPS {
        m.vcpu_enter(0).expect("vCPU 0 enters");
        let out = m.guest_access(0, gpa, access).expect("vCPU 0 is in the TD");
        match out {
            AccessOutcome::Ok(t) => {
                m.vcpu_exit(0).expect("vCPU 0 leaves");
                return Ok(Touch::Ok(t));
            }
            AccessOutcome::Ve(info) => {
                m.vcpu_exit(0).expect("vCPU 0 leaves");
                return Ok(Touch::Ve(info));
            }
            AccessOutcome::Exit(exit) => resume(h, exit)?,
            other => panic!("unexpected access outcome {other:?} at {gpa:#x}"),
        }
    }
    Err(GuestError::Livelock)
}

/// TDG.VP.VEINFO.GET on vCPU 0.
pub fn ve_info(h: &Host) -> Result<VeInfo, TdxStatus> {
    let m = h.module();
    m.vcpu_enter(0).expect("vCPU 0 enters");
    let r = m.tdg_vp_veinfo_get(0).expect("vCPU 0 is in the TD");
    m.vcpu_exit(0).expect("vCPU 0 leaves");
    r
}

/// Writes `token` to the accepted page at `gpa`; `None` when the access did not complete.
pub fn write(h: &Host, gpa: u64, token: u64) -> Option<()> {
    match touch(h, gpa, Access::Write(token)) {
        Ok(Touch::Ok(_)) => Some(()),
        Ok(Touch::Ve(_)) => {
            let _ = ve_info(h);
            None
        }
        Err(_) => None,
    }
}

/// Reads the token of the accepted page at `gpa`; `None` when the access did not complete.
pub fn read(h: &Host, gpa: u64) -> Option<u64> {
    match touch(h, gpa, Access::Read) {
        Ok(Touch::Ok(t)) => Some(t),
        Ok(Touch::Ve(_)) => {
            let _ = ve_info(h);
            None
        }
        Err(_) => None,
    }
}

/// One `TDG.VP.VMCALL<MapGPA>` exit handled by the host (no pending event).
pub fn map_gpa_once(h: &Host, start: u64, len: u64) -> (GhciStatus, u64) {
    let mut regs = VmcallRegs::default();
    regs.gpr[VmcallRegs::R11] = vmcall::MAP_GPA;
    regs.gpr[VmcallRegs::R12] = start;
    regs.gpr[VmcallRegs::R13] = len;
    h.handle_map_gpa(&mut regs, &never);
    (
        GhciStatus::from_raw(regs.gpr[VmcallRegs::R10]),
        regs.gpr[VmcallRegs::R11],
    )
}

/// MapGPA of `[start, start + len)` (shared bit in `start` = to shared) resumed from R11 on
/// RETRY as the engine does, at most [`MAP_GPA_TRIES`] calls. Returns the last status and the
/// number of calls made.
pub fn map_gpa(h: &Host, start: u64, len: u64) -> (GhciStatus, u32) {
    let bit = start & SHARED;
    let end = (start & !SHARED) + len;
    let mut cur = start;
    for n in 1..=MAP_GPA_TRIES {
        let (s, r) = map_gpa_once(h, cur, end - (cur & !SHARED));
        match s {
            GhciStatus::Retry if r & SHARED == bit && (r & !SHARED) < end => {
                if (r & !SHARED) >= (cur & !SHARED) {
                    cur = r;
                }
            }
            other => return (other, n),
        }
    }
    (GhciStatus::Retry, MAP_GPA_TRIES)
}

/// The leaf of `gpa` as (level, state).
pub fn leaf(h: &Host, gpa: u64) -> (u8, SeptState) {
    let e = h.module().leaf(Gpa::new_truncate(gpa));
    (e.level, e.state)
}

/// The token of a page the S-EPT maps (any leaf state), read without a guest access.
pub fn content(h: &Host, gpa: u64) -> Option<u64> {
    let e = h.module().leaf(Gpa::new_truncate(gpa));
    e.state
        .is_leaf()
        .then(|| h.module().read_content(e.page_hpa(gpa)))
}
