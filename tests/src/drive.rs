//! Drives vCPU 0 of a [`Host`] through the host library's vCPU loop
//! ([`hostvmm::vcpu::Vcpu`]): enter the TD, make one call or access, leave it unless the
//! outcome was an exit (the module already took the vCPU out), and hand exits to
//! [`Host::handle_exit`].
//!
//! The guest side is modelled as the engine behaves: BUSY answers to ACCEPT are retried, an
//! interrupted 2M ACCEPT is re-executed. The loop is bounded: a host that never lets the guest
//! make progress shows up as [`GuestError::Livelock`], not as a hang.

use accept::abi::{GhciStatus, Gpa, PageLevel, StatusCode, TdxStatus, VeInfo};
use hostvmm::module::{Access, SeptState};
use hostvmm::vcpu::{Insn, Retired, Step, Stop, Vcpu};
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

/// Steps `insn` on vCPU 0 until `answer` takes the step, re-executing after every exit the
/// host resolves and every interrupted ACCEPT, at most [`GUEST_STEPS`] steps.
fn steps<T>(
    h: &Host,
    insn: Insn,
    mut answer: impl FnMut(Step) -> Option<T>,
) -> Result<T, GuestError> {
    // The bound is on steps, exits included.
    let mut vcpu = Vcpu::new(h, 0).with_max_exits(GUEST_STEPS);
    for _ in 0..GUEST_STEPS {
        match vcpu.step(insn) {
            Step::Reexecute(_) | Step::Interrupted => {}
            Step::Stopped(Stop::Host { action, .. }) => return Err(GuestError::Host(action)),
            step => {
                if let Some(t) = answer(step) {
                    return Ok(t);
                }
            }
        }
    }
    Err(GuestError::Livelock)
}

/// TDG.MEM.PAGE.ACCEPT of `gpa` at `level` until it completes with a status that is not BUSY.
///
/// # Errors
/// [`GuestError`] when the host fails an exit or the guest cannot make progress.
pub fn accept(h: &Host, gpa: u64, level: PageLevel) -> Result<TdxStatus, GuestError> {
    steps(
        h,
        Insn::accept(Gpa::new_truncate(gpa), level),
        |step| match step {
            Step::Retired(Retired::Accept(s)) => (!s.is(StatusCode::OperandBusy)).then_some(s),
            other => panic!("vCPU 0: ACCEPT at {gpa:#x}: {other:?}"),
        },
    )
}

/// A guest access to `gpa`, re-executed after every exit the host resolves.
///
/// # Errors
/// [`GuestError`]; an access to a shared or invalid GPA is a test bug and panics.
pub fn touch(h: &Host, gpa: u64, access: Access) -> Result<Touch, GuestError> {
    steps(h, Insn::Access { gpa, access }, |step| match step {
        Step::Retired(Retired::Access(t)) => Some(Touch::Ok(t)),
        Step::Stopped(Stop::Ve(info)) => Some(Touch::Ve(info)),
        other => panic!("unexpected access outcome {other:?} at {gpa:#x}"),
    })
}

/// TDG.VP.VEINFO.GET on vCPU 0.
pub fn ve_info(h: &Host) -> Result<VeInfo, TdxStatus> {
    match Vcpu::new(h, 0).run(Insn::VeInfoGet) {
        Ok(Retired::VeInfo(r)) => r,
        other => panic!("vCPU 0: VEINFO.GET: {other:?}"),
    }
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
    let answer = steps(h, Insn::MapGpa { start, len }, |step| match step {
        Step::Retired(Retired::MapGpa(o)) => Some((o.status, o.resume_gpa)),
        other => panic!("vCPU 0: MapGPA: {other:?}"),
    });
    answer.unwrap_or_else(|e| panic!("vCPU 0: MapGPA: {e:?}"))
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
