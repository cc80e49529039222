//! A catalogue of hostile-host behaviours, each run against the real guest engine and the real
//! host half, with the verdict a correct guest must reach.
//!
//! Every [`Behaviour`] builds a fresh small TD (a [`Lab`]: a [`Host`] of [`LAB_MEMORY`] with
//! one vCPU; the first [`LAB_EAGER_END`] bytes accepted at boot by the [`Acceptor`], the rest
//! tracked by a [`LazyTracker`] in 2 MiB units, a few of them accepted, and private tokens
//! written into pages the guest owns), then misbehaves in one of two ways:
//!
//! - as the guest engine sees it: the lab's vCPU ([`Vcpu`], the engine's [`Tdcall`]) answers
//!   some calls itself instead of the honest host (rewriting MapGPA's R10/R11, answering ACCEPT
//!   with chosen statuses, replacing VE info), or handles EPT-violation exits by never mapping;
//! - through the host's own interfaces: direct SEAMCALLs on [`Host::module`] (BLOCK, TRACK,
//!   REMOVE then AUG to re-add a page; DEMOTE and PROMOTE between the guest's ACCEPTs; holding an
//!   S-EPT entry lock as a concurrent SEAMCALL would).
//!
//! The guest's answer is reduced to a [`Verdict`]: the operation completed, or it stopped with a
//! precise engine error (and, for a conversion, what the rollback did). A [`Row`] passes when
//! the observed verdict equals the expected one, no private token the guest still owns changed
//! (read back through the module's content model: a page re-accepted by mistake reads zero),
//! and the guest made no more TDCALLs than the behaviour's bound (the lab's vCPU refuses to go
//! on past it, so an engine loop shows as a failed row instead of a hang).
//!
//! Some rows model what no real host can do with a correct TDX module (the module's answers to
//! ACCEPT and VEINFO.GET are trusted; a host cannot inject #VE): they stand for a module bug or
//! a broken transport, and show that the engine still stops precisely. Each entry says so.
//! Interleavings with the host are at call granularity (the host acts between two guest calls),
//! which keeps every row deterministic.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::fmt;
use std::rc::Rc;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use accept::abi::{
    page_info, vmcall, GhciStatus, Gpa, GpaRange, MapGpaOutcome, PageLevel, StatusCode, TdxStatus,
    VeInfo, VpInfo, EXIT_REASON_EPT_VIOLATION,
};
use accept::acceptor::{AcceptError, AcceptPolicy, Acceptor};
use accept::convert::{
    ConvertCause, ConvertFailure, ConvertHooks, ConvertPolicy, Converter, HookError, MapGpaError,
    MapGpaErrorKind, RangeState, Rollback, Visibility,
};
use accept::tdcall::Tdcall;
use accept::tracker::{
    words_needed, LazyTracker, NoInterrupts, TrackerConfig, TrackerError, UnitState,
};
use accept::ve::{handle_ve, VeCpuState, VeFatal, VeVerdict};

use super::vcpu::{MAX_EXITS_PER_INSTRUCTION, TD_KILLED};
use crate::gmem::Shareability;
use crate::kvm::YieldKicker;
use crate::module::{
    Access, AccessOutcome, EntryLockGuard, ExtExitQual, SeptState, TdExit, TdcallOutcome,
    VmcallRegs,
};
use crate::vmm::{ExitAction, Host, HostConfig, SharedBackend};

const K4: u64 = 4096;
const M2: u64 = 2 << 20;
/// The shared bit of the lab's TD (GPAW 48).
const SHARED: u64 = 1 << 47;

/// Guest memory of every lab TD.
pub const LAB_MEMORY: u64 = 64 * M2;
/// End of the memory the firmware accepts at boot; lazily accepted memory follows.
pub const LAB_EAGER_END: u64 = 8 * M2;
/// Lazily accepted units (2 MiB) the lab accepts during setup, from the first one.
const LAB_LAZY_ACCEPTED: u64 = 2;
/// Pages holding private tokens from setup on: boot memory and two lazily accepted units.
const BYSTANDERS: [u64; 5] = [
    0x5000,
    M2 + 0x9000,
    7 * M2 + 0x2000,
    LAB_EAGER_END + 0x3000,
    LAB_EAGER_END + M2 + 0x7000,
];
/// The private range the MapGPA rows convert to shared (boot memory, no bystander in it).
const CONV: (u64, u64) = (2 * M2, 4 * M2);
/// The range the to-private rows first make shared, then convert back under a hostile host.
const PRIV: (u64, u64) = (4 * M2, 6 * M2);
/// Pages of [`CONV`]'s second half that hold tokens in the rows where the host fails midway:
/// the host never converted them, so the engine promises their content.
const CONV_TAIL_TOKENS: [u64; 2] = [3 * M2 + 0x1000, 3 * M2 + 0x6_3000];
/// Bound on rounds of one guest access (each round may take a #VE).
const MAX_ACCESS_ROUNDS: u32 = 8;

/// GPA of lazily accepted unit `unit`.
const fn unit_gpa(unit: u64) -> u64 {
    LAB_EAGER_END + unit * M2
}

// ---- verdicts ------------------------------------------------------------------------------

/// Where and why the guest stopped: the engine's error, reduced to what identifies it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// MapGPA RETRY with an R11 the engine refused (`MapGpaErrorKind::BadResume`).
    BadResume {
        /// First GPA whose state is unknown.
        at: u64,
        /// R11 as the host wrote it.
        resume: u64,
    },
    /// MapGPA RETRY without progress past the bound (`MapGpaErrorKind::NoProgress`).
    NoProgress {
        /// First GPA whose state is unknown.
        at: u64,
        /// Answers without progress.
        tries: u32,
    },
    /// MapGPA answered a GHCI error (`MapGpaErrorKind::Host`).
    Host {
        /// First GPA whose state is unknown.
        at: u64,
        /// R10.
        status: GhciStatus,
    },
    /// The MapGPA TDCALL itself failed (`MapGpaErrorKind::Tdcall`).
    Tdcall {
        /// First GPA whose state is unknown.
        at: u64,
        /// RAX's class.
        code: StatusCode,
    },
    /// The engine refused the range before any call.
    InvalidRange,
    /// The page-table hook failed.
    PageTable,
    /// ACCEPT stayed `OPERAND_BUSY` past the bound (`AcceptError::Busy`).
    Busy {
        /// Page being accepted.
        gpa: u64,
        /// Level asked.
        level: PageLevel,
        /// Calls made.
        tries: u32,
    },
    /// ACCEPT answered `PAGE_ALREADY_ACCEPTED` (`AcceptError::AlreadyAccepted`).
    AlreadyAccepted {
        /// Page whose acceptance was refused.
        gpa: u64,
        /// Level asked.
        level: PageLevel,
    },
    /// ACCEPT answered a status the spec does not allow there (`AcceptError::Module`).
    Module {
        /// Page being accepted.
        gpa: u64,
        /// Level asked.
        level: PageLevel,
        /// The status's class.
        code: StatusCode,
    },
    /// The tracker refused a unit whose earlier acceptance failed part way.
    UnitFailed {
        /// Unit index.
        unit: u64,
    },
    /// Any other tracker error.
    Tracker,
    /// #VE on an accepted page: the host re-added it (`VeFatal::ReAdded`).
    ReAdded {
        /// The faulting GPA.
        gpa: u64,
    },
    /// #VE on a private page outside unaccepted memory (`VeFatal::Untracked`).
    Untracked {
        /// The faulting GPA.
        gpa: u64,
    },
    /// #VE on this vCPU's own acceptance (`VeFatal::Reentrant`).
    Reentrant {
        /// Unit index.
        unit: u64,
    },
    /// Not an EPT violation on a private GPA (`VeVerdict::NotMine`).
    NotMine {
        /// VE info's GPA.
        gpa: u64,
    },
    /// VEINFO.GET found nothing valid (`VeVerdict::NoVeInfo`).
    NoVeInfo {
        /// The module's status class.
        code: StatusCode,
    },
    /// The host stopped the TD: an exit it would not or could not handle (KVM returns to
    /// userspace and the VMM kills the TD), or an instruction that needed more than
    /// [`MAX_EXITS_PER_INSTRUCTION`] exits.
    Killed,
    /// #VE while VE info was valid.
    DoubleFault,
    /// An access kept taking #VEs.
    VeLoop,
    /// The guest's result contradicts the TD's state (see the row's detail).
    Inconsistent,
}

/// A status class for a reader: its name, or its class bits in hex when the spec has none.
struct Code(StatusCode);

impl fmt::Display for Code {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            StatusCode::Unknown(bits) => write!(f, "Unknown({bits:#x})"),
            code => write!(f, "{code:?}"),
        }
    }
}

/// A GHCI status for a reader: its name, or the raw R10 in hex.
struct Ghci(GhciStatus);

impl fmt::Display for Ghci {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            GhciStatus::Unknown(raw) => write!(f, "Unknown({raw:#x})"),
            status => write!(f, "{status:?}"),
        }
    }
}

impl fmt::Display for Stop {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Stop::BadResume { at, resume } => write!(f, "BadResume(R11 {resume:#x}) at {at:#x}"),
            Stop::NoProgress { at, tries } => write!(f, "NoProgress({tries}) at {at:#x}"),
            Stop::Host { at, status } => write!(f, "Host({}) at {at:#x}", Ghci(*status)),
            Stop::Tdcall { at, code } => write!(f, "Tdcall({}) at {at:#x}", Code(*code)),
            Stop::InvalidRange => write!(f, "InvalidRange"),
            Stop::PageTable => write!(f, "PageTable"),
            Stop::Busy { gpa, level, tries } => write!(f, "Busy({tries}) {level} {gpa:#x}"),
            Stop::AlreadyAccepted { gpa, level } => write!(f, "AlreadyAccepted {level} {gpa:#x}"),
            Stop::Module { gpa, level, code } => {
                write!(f, "Module({}) {level} {gpa:#x}", Code(*code))
            }
            Stop::UnitFailed { unit } => write!(f, "UnitFailed({unit})"),
            Stop::Tracker => write!(f, "Tracker"),
            Stop::ReAdded { gpa } => write!(f, "Fatal(ReAdded) {gpa:#x}"),
            Stop::Untracked { gpa } => write!(f, "Fatal(Untracked) {gpa:#x}"),
            Stop::Reentrant { unit } => write!(f, "Fatal(Reentrant) unit {unit}"),
            Stop::NotMine { gpa } => write!(f, "NotMine {gpa:#x}"),
            Stop::NoVeInfo { code } => write!(f, "NoVeInfo({})", Code(*code)),
            Stop::Killed => write!(f, "TD stopped by the host"),
            Stop::DoubleFault => write!(f, "#DF"),
            Stop::VeLoop => write!(f, "#VE loop"),
            Stop::Inconsistent => write!(f, "inconsistent"),
        }
    }
}

/// What the guest made of a behaviour.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The operation completed and the TD's state agrees (data intact, sides as asked).
    Completes,
    /// The guest stopped with this error.
    Stops(Stop),
    /// A conversion failed with this cause and was rolled back completely (every part in its
    /// original visibility).
    RolledBack(Stop),
    /// A conversion failed, and so did its rollback: the parts are reported unknown.
    RollbackFailed {
        /// The first failure.
        cause: Stop,
        /// The rollback's failure.
        rollback: Stop,
    },
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Verdict::Completes => write!(f, "completes"),
            Verdict::Stops(s) => write!(f, "{s}"),
            Verdict::RolledBack(s) => write!(f, "{s}; rolled back"),
            Verdict::RollbackFailed { cause, rollback } => {
                write!(f, "{cause}; rollback failed: {rollback}")
            }
        }
    }
}

fn stop_of_map(e: MapGpaError) -> Stop {
    let at = e.at.as_u64();
    match e.kind {
        MapGpaErrorKind::InvalidRange(_) => Stop::InvalidRange,
        MapGpaErrorKind::Tdcall(s) => Stop::Tdcall { at, code: s.code() },
        MapGpaErrorKind::Host(status) => Stop::Host { at, status },
        MapGpaErrorKind::BadResume { resume } => Stop::BadResume { at, resume },
        MapGpaErrorKind::NoProgress { tries } => Stop::NoProgress { at, tries },
    }
}

fn stop_of_accept(e: AcceptError) -> Stop {
    match e {
        AcceptError::InvalidRange(_) => Stop::InvalidRange,
        AcceptError::AlreadyAccepted { gpa, level, .. } => Stop::AlreadyAccepted {
            gpa: gpa.as_u64(),
            level,
        },
        AcceptError::Busy { gpa, level, tries } => Stop::Busy {
            gpa: gpa.as_u64(),
            level,
            tries,
        },
        AcceptError::Module { gpa, level, status } => Stop::Module {
            gpa: gpa.as_u64(),
            level,
            code: status.code(),
        },
    }
}

fn stop_of_tracker(e: TrackerError) -> Stop {
    match e {
        TrackerError::Accept { error, .. } => stop_of_accept(error),
        TrackerError::UnitFailed { unit, .. } => Stop::UnitFailed { unit },
        TrackerError::Reentrant { unit, .. } => Stop::Reentrant { unit },
        _ => Stop::Tracker,
    }
}

fn stop_of_cause(c: ConvertCause) -> Stop {
    match c {
        ConvertCause::InvalidRange(_) => Stop::InvalidRange,
        ConvertCause::PageTable(_) => Stop::PageTable,
        ConvertCause::MapGpa(e) => stop_of_map(e),
        ConvertCause::Accept(e) => stop_of_accept(e),
    }
}

/// The verdict of a #VE handler answer; `None` for "retry the access".
fn stop_of_ve(v: VeVerdict) -> Option<Stop> {
    match v {
        VeVerdict::Handled { .. } | VeVerdict::AcceptedMeanwhile { .. } => None,
        VeVerdict::NotMine(info) => Some(Stop::NotMine { gpa: info.gpa }),
        VeVerdict::NoVeInfo(s) => Some(Stop::NoVeInfo { code: s.code() }),
        VeVerdict::Fatal(VeFatal::ReAdded { info, .. }) => Some(Stop::ReAdded { gpa: info.gpa }),
        VeVerdict::Fatal(VeFatal::Untracked { info }) => Some(Stop::Untracked { gpa: info.gpa }),
        VeVerdict::Fatal(VeFatal::Reentrant { unit, .. }) => Some(Stop::Reentrant { unit }),
        VeVerdict::Fatal(VeFatal::Accept { error, .. }) => Some(stop_of_tracker(error)),
    }
}

// ---- the lab's vCPU ------------------------------------------------------------------------

/// How the host answers an EPT-violation exit instead of its fault path.
pub type ExitHook<'g> = Box<dyn FnMut(&Host, TdExit) -> ExitAction + 'g>;
/// The host's answer to MapGPA(`start`, `len`) instead of the honest one (which it may call).
pub type MapHook<'g> = Box<dyn FnMut(&mut Honest<'g>, u64, u64) -> MapGpaOutcome + 'g>;
/// The answer to ACCEPT instead of the honest one (which it may call).
pub type AcceptHook<'g> = Box<dyn FnMut(&mut Honest<'g>, Gpa, PageLevel) -> TdxStatus + 'g>;
/// The answer to VEINFO.GET instead of the module's (which it may call).
pub type VeHook<'g> = Box<dyn FnMut(&mut Honest<'g>) -> Result<VeInfo, TdxStatus> + 'g>;

/// The honest path: vCPU 0 of the lab's TD entering the module, with exits handled by the host
/// (or by an [`ExitHook`]) and re-executed as after a VM exit.
pub struct Honest<'g> {
    host: &'g Host,
    killed: Option<String>,
    exits: u64,
    exit_hook: Option<ExitHook<'g>>,
}

impl fmt::Debug for Honest<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Honest")
            .field("killed", &self.killed)
            .field("exits", &self.exits)
            .finish_non_exhaustive()
    }
}

impl<'g> Honest<'g> {
    /// The host.
    pub fn host(&self) -> &'g Host {
        self.host
    }

    fn kill(&mut self, why: String) {
        if self.killed.is_none() {
            self.killed = Some(why);
        }
    }

    fn enter(&mut self) -> bool {
        if self.killed.is_some() {
            return false;
        }
        match self.host.module().vcpu_enter(0) {
            Ok(()) => true,
            Err(e) => {
                self.kill(format!("vCPU enter: {e}"));
                false
            }
        }
    }

    fn leave(&mut self) {
        if let Err(e) = self.host.module().vcpu_exit(0) {
            self.kill(format!("vCPU exit: {e}"));
        }
    }

    /// Lets the host handle an EPT-violation exit; false when the TD is stopped.
    fn exit(&mut self, exit: TdExit, count: &mut u32) -> bool {
        self.exits += 1;
        *count += 1;
        if *count > MAX_EXITS_PER_INSTRUCTION {
            self.kill(format!("{count} exits for one instruction"));
            return false;
        }
        let action = match self.exit_hook.as_mut() {
            Some(hook) => hook(self.host, exit),
            None => self
                .host
                .handle_exit(exit, &mut VmcallRegs::default(), &|| false),
        };
        match action {
            ExitAction::Resume => true,
            ExitAction::Fatal(e) => {
                self.kill(format!("the host could not handle an exit: {e}"));
                false
            }
            ExitAction::KillTd => {
                self.kill("the host killed the TD".into());
                false
            }
        }
    }

    /// A guest access to the 4K page of `gpa`, exits handled; `Err` when the TD stopped.
    fn access(&mut self, gpa: u64, access: Access) -> Result<AccessOutcome, Stop> {
        let mut count = 0u32;
        loop {
            if !self.enter() {
                return Err(Stop::Killed);
            }
            let out = match self.host.module().guest_access(0, gpa, access) {
                Ok(o) => o,
                Err(e) => {
                    self.kill(format!("access: {e}"));
                    return Err(Stop::Killed);
                }
            };
            match out {
                AccessOutcome::Exit(exit) => {
                    if !self.exit(exit, &mut count) {
                        return Err(Stop::Killed);
                    }
                }
                other => {
                    self.leave();
                    return Ok(other);
                }
            }
        }
    }
}

impl Tdcall for Honest<'_> {
    fn accept(&mut self, gpa: Gpa, level: PageLevel) -> TdxStatus {
        let mut count = 0u32;
        loop {
            if !self.enter() {
                return TD_KILLED;
            }
            let out = match self
                .host
                .module()
                .tdg_mem_page_accept(0, page_info(gpa, level))
            {
                Ok(o) => o,
                Err(e) => {
                    self.kill(format!("ACCEPT: {e}"));
                    return TD_KILLED;
                }
            };
            match out {
                TdcallOutcome::Completed(status) => {
                    self.leave();
                    return status;
                }
                TdcallOutcome::Interrupted => self.leave(),
                TdcallOutcome::Exit(exit) => {
                    if !self.exit(exit, &mut count) {
                        return TD_KILLED;
                    }
                }
            }
        }
    }

    fn map_gpa(&mut self, start: u64, len: u64) -> MapGpaOutcome {
        let killed = MapGpaOutcome {
            tdcall: TD_KILLED,
            status: GhciStatus::InvalidOperand,
            resume_gpa: 0,
        };
        if !self.enter() {
            return killed;
        }
        let mut regs = VmcallRegs {
            mask: vmcall::EXPOSE_REGS_MASK,
            ..VmcallRegs::default()
        };
        regs.gpr[VmcallRegs::R11] = vmcall::MAP_GPA;
        regs.gpr[VmcallRegs::R12] = start;
        regs.gpr[VmcallRegs::R13] = len;
        match self.host.module().tdg_vp_vmcall(0, regs) {
            Ok(TdcallOutcome::Exit(exit @ TdExit::Vmcall(_))) => {
                let mut answer = regs;
                match self.host.handle_exit(exit, &mut answer, &|| false) {
                    ExitAction::Resume => MapGpaOutcome {
                        tdcall: TdxStatus::SUCCESS,
                        status: GhciStatus::from_raw(answer.gpr[VmcallRegs::R10]),
                        resume_gpa: answer.gpr[VmcallRegs::R11],
                    },
                    other => {
                        self.kill(format!("MapGPA exit: {other:?}"));
                        killed
                    }
                }
            }
            Ok(TdcallOutcome::Completed(status)) => {
                self.leave();
                MapGpaOutcome {
                    tdcall: status,
                    status: GhciStatus::InvalidOperand,
                    resume_gpa: 0,
                }
            }
            other => {
                self.leave();
                self.kill(format!("VMCALL: {other:?}"));
                killed
            }
        }
    }

    fn ve_info(&mut self) -> Result<VeInfo, TdxStatus> {
        if !self.enter() {
            return Err(TD_KILLED);
        }
        let r = self.host.module().tdg_vp_veinfo_get(0);
        self.leave();
        r.unwrap_or(Err(TD_KILLED))
    }

    fn vp_info(&mut self) -> Result<VpInfo, TdxStatus> {
        if !self.enter() {
            return Err(TD_KILLED);
        }
        let r = self.host.module().tdg_vp_info(0);
        self.leave();
        r.unwrap_or(Err(TD_KILLED))
    }
}

/// The lab's vCPU as the guest engine sees it: the honest path, with optional hostile answers,
/// and a count of TDCALLs against a bound (past it every call answers [`TD_KILLED`]).
pub struct Vcpu<'g> {
    honest: Honest<'g>,
    calls: u64,
    limit: u64,
    exceeded: bool,
    map_hook: Option<MapHook<'g>>,
    accept_hook: Option<AcceptHook<'g>>,
    ve_hook: Option<VeHook<'g>>,
}

impl fmt::Debug for Vcpu<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Vcpu")
            .field("honest", &self.honest)
            .field("calls", &self.calls)
            .field("limit", &self.limit)
            .finish_non_exhaustive()
    }
}

impl<'g> Vcpu<'g> {
    fn new(host: &'g Host) -> Vcpu<'g> {
        Vcpu {
            honest: Honest {
                host,
                killed: None,
                exits: 0,
                exit_hook: None,
            },
            calls: 0,
            limit: u64::MAX,
            exceeded: false,
            map_hook: None,
            accept_hook: None,
            ve_hook: None,
        }
    }

    /// Answers MapGPA with `hook` from now on.
    pub fn on_map_gpa(&mut self, hook: MapHook<'g>) {
        self.map_hook = Some(hook);
    }

    /// Answers ACCEPT with `hook` from now on.
    pub fn on_accept(&mut self, hook: AcceptHook<'g>) {
        self.accept_hook = Some(hook);
    }

    /// Answers VEINFO.GET with `hook` from now on.
    pub fn on_ve_info(&mut self, hook: VeHook<'g>) {
        self.ve_hook = Some(hook);
    }

    /// Handles EPT-violation exits with `hook` from now on.
    pub fn on_exit(&mut self, hook: ExitHook<'g>) {
        self.honest.exit_hook = Some(hook);
    }

    /// Back to the honest host (drops whatever the hooks hold, such as entry locks).
    pub fn honest_again(&mut self) {
        self.map_hook = None;
        self.accept_hook = None;
        self.ve_hook = None;
        self.honest.exit_hook = None;
    }

    fn count(&mut self) -> bool {
        self.calls += 1;
        if self.calls > self.limit {
            self.exceeded = true;
            return false;
        }
        true
    }
}

impl Tdcall for Vcpu<'_> {
    fn accept(&mut self, gpa: Gpa, level: PageLevel) -> TdxStatus {
        if !self.count() {
            return TD_KILLED;
        }
        match self.accept_hook.as_mut() {
            Some(hook) => hook(&mut self.honest, gpa, level),
            None => self.honest.accept(gpa, level),
        }
    }

    fn map_gpa(&mut self, start: u64, len: u64) -> MapGpaOutcome {
        if !self.count() {
            return MapGpaOutcome {
                tdcall: TD_KILLED,
                status: GhciStatus::InvalidOperand,
                resume_gpa: 0,
            };
        }
        match self.map_hook.as_mut() {
            Some(hook) => hook(&mut self.honest, start, len),
            None => self.honest.map_gpa(start, len),
        }
    }

    fn ve_info(&mut self) -> Result<VeInfo, TdxStatus> {
        if !self.count() {
            return Err(TD_KILLED);
        }
        match self.ve_hook.as_mut() {
            Some(hook) => hook(&mut self.honest),
            None => self.honest.ve_info(),
        }
    }

    fn vp_info(&mut self) -> Result<VpInfo, TdxStatus> {
        if !self.count() {
            return Err(TD_KILLED);
        }
        self.honest.vp_info()
    }
}

/// The guest's page tables in the lab: switching visibility always works.
struct PageTables;

impl ConvertHooks for PageTables {
    type Error = HookError;
    fn set_visibility(&mut self, _range: GpaRange, _to: Visibility) -> Result<(), HookError> {
        Ok(())
    }
    fn flush_tlb(&mut self, _range: GpaRange) {}
}

// ---- the lab -------------------------------------------------------------------------------

/// One small TD with the guest engine's objects, its vCPU and the guest's private tokens.
pub struct Lab<'g> {
    host: &'g Host,
    acceptor: &'g Acceptor,
    converter: &'g Converter,
    tracker: &'g LazyTracker<'g>,
    /// The guest's vCPU (with the behaviour's hooks).
    pub cpu: Vcpu<'g>,
    ve_state: VeCpuState,
    /// Expected token of every private page the guest owns, by 4K GPA.
    shadow: BTreeMap<u64, u64>,
    bad_reads: u64,
    next_token: u64,
    notes: Vec<String>,
}

impl fmt::Debug for Lab<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Lab")
            .field("cpu", &self.cpu)
            .field("shadow", &self.shadow.len())
            .finish_non_exhaustive()
    }
}

fn g(addr: u64) -> Gpa {
    Gpa::new_truncate(addr)
}

fn range(start: u64, end: u64) -> GpaRange {
    GpaRange::new(start, end).expect("every lab range is a valid constant")
}

fn retry(resume: u64) -> MapGpaOutcome {
    MapGpaOutcome {
        tdcall: TdxStatus::SUCCESS,
        status: GhciStatus::Retry,
        resume_gpa: resume,
    }
}

fn answer(status: GhciStatus) -> MapGpaOutcome {
    MapGpaOutcome {
        tdcall: TdxStatus::SUCCESS,
        status,
        resume_gpa: 0,
    }
}

impl<'g> Lab<'g> {
    /// The host half.
    pub fn host(&self) -> &'g Host {
        self.host
    }

    /// Adds a line to the row's detail.
    pub fn note(&mut self, text: String) {
        self.notes.push(text);
    }

    fn setup(&mut self) -> Result<(), String> {
        let acceptor = self.acceptor;
        acceptor
            .accept_range(&mut self.cpu, range(0, LAB_EAGER_END))
            .map_err(|e| format!("boot acceptance: {e}"))?;
        let tracker = self.tracker;
        tracker
            .accept_range(
                0,
                &mut self.cpu,
                &mut NoInterrupts,
                LAB_EAGER_END,
                unit_gpa(LAB_LAZY_ACCEPTED),
            )
            .map_err(|e| format!("lazy acceptance: {e}"))?;
        for gpa in BYSTANDERS {
            self.write(gpa)
                .map_err(|e| format!("write {gpa:#x}: {e}"))?;
        }
        Ok(())
    }

    /// A guest access with #VE handling through the engine's handler.
    fn touch(&mut self, gpa: u64, access: Access) -> Result<u64, Stop> {
        let tracker = self.tracker;
        for _ in 0..MAX_ACCESS_ROUNDS {
            match self.cpu.honest.access(gpa, access)? {
                AccessOutcome::Ok(token) => return Ok(token),
                AccessOutcome::Ve(_) => {
                    let v = handle_ve(
                        0,
                        &mut self.ve_state,
                        &mut self.cpu,
                        &mut NoInterrupts,
                        tracker,
                    );
                    self.note(format!("#VE at {gpa:#x}: {v:?}"));
                    if let Some(stop) = stop_of_ve(v) {
                        return Err(stop);
                    }
                }
                AccessOutcome::DoubleFault => return Err(Stop::DoubleFault),
                AccessOutcome::Shared { .. } | AccessOutcome::InvalidGpa => {
                    return Err(Stop::Inconsistent)
                }
                AccessOutcome::Exit(_) => return Err(Stop::Killed),
            }
        }
        Err(Stop::VeLoop)
    }

    /// Writes a fresh token to the private page of `gpa`; the guest owns it from now on.
    ///
    /// # Errors
    /// Where the access stopped.
    pub fn write(&mut self, gpa: u64) -> Result<u64, Stop> {
        self.next_token += 1;
        let token = 0x7000_0000_0000_0000 | (gpa & !0xFFF) | (self.next_token & 0xFFF);
        self.touch(gpa, Access::Write(token))?;
        self.shadow.insert(gpa & !0xFFF, token);
        Ok(token)
    }

    /// Reads the private page of `gpa`; a value other than the token the guest wrote is
    /// counted as lost data.
    ///
    /// # Errors
    /// Where the access stopped.
    pub fn read(&mut self, gpa: u64) -> Result<u64, Stop> {
        let value = self.touch(gpa, Access::Read)?;
        if let Some(&token) = self.shadow.get(&(gpa & !0xFFF)) {
            if token != value {
                self.bad_reads += 1;
                self.note(format!("read {value:#x} at {gpa:#x}, wrote {token:#x}"));
            }
        }
        Ok(value)
    }

    /// Private pages whose token is gone: not in a leaf any more, or another content (a page
    /// accepted again reads zero), plus wrong values the guest read.
    fn lost(&mut self) -> u64 {
        let module = self.host.module();
        let mut lost = self.bad_reads;
        for (&page, &token) in &self.shadow {
            let leaf = module.leaf(g(page));
            let found = leaf
                .state
                .is_leaf()
                .then(|| module.read_content(leaf.page_hpa(page)));
            if found != Some(token) {
                lost += 1;
                self.notes
                    .push(format!("{page:#x}: wrote {token:#x}, found {found:?}"));
            }
        }
        lost
    }

    /// The host half's own invariants after the behaviour: the Secure-EPT tree is well formed,
    /// and no GPA the guest_memfd holds shared has a private leaf (no GPA is both).
    fn host_consistent(&mut self) -> bool {
        let mut ok = true;
        if let Err(e) = self.host.module().check_tree() {
            self.note(format!("{e}"));
            ok = false;
        }
        let shared: Vec<GpaRange> = self
            .host
            .gmem()
            .ranges()
            .into_iter()
            .filter(|(_, s)| *s == Shareability::Shared)
            .map(|(r, _)| r)
            .collect();
        let module = self.host.module();
        for r in shared {
            let mut cur = r.start().as_u64();
            while cur < r.end().as_u64() {
                let leaf = module.leaf(g(cur));
                if leaf.state.is_leaf() {
                    self.notes.push(format!(
                        "{cur:#x} is shared and has a {:?} private leaf",
                        leaf.state
                    ));
                    ok = false;
                    break;
                }
                cur += K4;
            }
        }
        ok
    }

    /// Runs a conversion through the engine and checks the TD agrees with its verdict.
    fn convert(&mut self, (start, end): (u64, u64), to: Visibility) -> Verdict {
        let (converter, acceptor) = (self.converter, self.acceptor);
        let r = range(start, end);
        let result = converter.convert(&mut self.cpu, acceptor, r, to, &mut PageTables);
        let verdict = self.verdict_of_convert(r, to, result);
        if verdict == Verdict::Completes {
            if let Err(e) = self.check_side(r, to) {
                self.note(e);
                return Verdict::Stops(Stop::Inconsistent);
            }
        }
        verdict
    }

    fn verdict_of_convert(
        &mut self,
        r: GpaRange,
        to: Visibility,
        result: Result<(), ConvertFailure>,
    ) -> Verdict {
        let f = match result {
            Ok(()) => return Verdict::Completes,
            Err(f) => f,
        };
        self.note(format!("{f}; states {:?}", f.states));
        let cause = stop_of_cause(f.cause);
        match f.rollback {
            Rollback::NotNeeded | Rollback::Disabled => Verdict::Stops(cause),
            Rollback::Complete => {
                // Back on the original side everywhere; parts the host had converted come back
                // zeroed and say so (Restored): the guest no longer expects their old content.
                for (part, state) in f.states.iter() {
                    match state {
                        RangeState::Original => {}
                        RangeState::Restored => {
                            let (s, e) = (part.start().as_u64(), part.end().as_u64());
                            let gone: Vec<u64> = self.shadow.range(s..e).map(|(&k, _)| k).collect();
                            for k in gone {
                                self.shadow.remove(&k);
                            }
                        }
                        _ => return Verdict::Stops(Stop::Inconsistent),
                    }
                }
                if let Err(e) = self.check_side(r, to.other()) {
                    self.note(format!("after the rollback: {e}"));
                    return Verdict::Stops(Stop::Inconsistent);
                }
                Verdict::RolledBack(cause)
            }
            Rollback::Failed(c) => Verdict::RollbackFailed {
                cause,
                rollback: stop_of_cause(c),
            },
        }
    }

    /// Checks that `r` is entirely on side `side` in the host half: shared in the guest_memfd
    /// with no private leaf, or private and MAPPED (accepted).
    fn check_side(&self, r: GpaRange, side: Visibility) -> Result<(), String> {
        let module = self.host.module();
        let gmem_side = match side {
            Visibility::Shared => Shareability::Shared,
            Visibility::Private => Shareability::Private,
        };
        if !self.host.gmem().is_uniform(r, gmem_side) {
            return Err(format!("{r} is not all {gmem_side:?} in the guest_memfd"));
        }
        let mut cur = r.start().as_u64();
        while cur < r.end().as_u64() {
            let leaf = module.leaf(g(cur));
            let ok = match side {
                Visibility::Shared => !leaf.state.is_leaf(),
                Visibility::Private => leaf.state == SeptState::Mapped,
            };
            if !ok {
                return Err(format!(
                    "{cur:#x} is {:?} at level {} but should be {side:?}",
                    leaf.state, leaf.level
                ));
            }
            cur += K4;
        }
        Ok(())
    }

    /// Accepts lazily tracked `[start, end)` as the kernel does on allocation.
    fn accept_lazy(&mut self, start: u64, end: u64) -> Verdict {
        let tracker = self.tracker;
        match tracker.accept_range(0, &mut self.cpu, &mut NoInterrupts, start, end) {
            Ok(()) => Verdict::Completes,
            Err(e) => {
                self.note(format!("{e}"));
                Verdict::Stops(stop_of_tracker(e))
            }
        }
    }

    /// Delivers a #VE whose VE info the host chose, and returns the handler's verdict.
    fn forged_ve(&mut self, info: VeInfo) -> VeVerdict {
        let mut once = Some(info);
        self.cpu.on_ve_info(Box::new(move |h| match once.take() {
            Some(info) => Ok(info),
            None => h.ve_info(),
        }));
        let tracker = self.tracker;
        let v = handle_ve(
            0,
            &mut self.ve_state,
            &mut self.cpu,
            &mut NoInterrupts,
            tracker,
        );
        self.cpu.ve_hook = None;
        self.note(format!("#VE handler: {v:?}"));
        v
    }

    // ---- host-side SEAMCALL sequences ----

    /// The host maps the 2M range of `gpa` PENDING through its fault path, as after a guest
    /// touch.
    fn host_map_2m(&self, gpa: u64) -> Result<(), String> {
        self.host
            .fault(gpa, ExtExitQual::NONE)
            .map_err(|e| format!("fault at {gpa:#x}: {e}"))?;
        let leaf = self.host.module().leaf(g(gpa));
        if leaf.level != 1 || leaf.state != SeptState::Pending {
            return Err(format!("{gpa:#x} mapped as {leaf:?}"));
        }
        Ok(())
    }

    fn seamcall(&self, what: &str, status: TdxStatus) -> Result<(), String> {
        if status.is_success() {
            Ok(())
        } else {
            Err(format!("{what}: {status}"))
        }
    }

    /// BLOCK, TRACK, DEMOTE of the 2M leaf at `base`.
    fn host_demote(&self, base: u64) -> Result<(), String> {
        let m = self.host.module();
        let level = PageLevel::Size2M;
        self.seamcall("BLOCK", m.range_block(g(base), level).status)?;
        self.seamcall("TRACK", m.mem_track().status)?;
        let page = self.host.mmu().sept_pool().alloc().ok_or("no S-EPT page")?;
        self.seamcall("DEMOTE", m.page_demote(g(base), level, page).status)
    }

    /// BLOCK, TRACK, PROMOTE of the 2M range at `base`; on failure UNBLOCK and report the
    /// PROMOTE status.
    fn host_promote(&self, base: u64) -> Result<(), TdxStatus> {
        let m = self.host.module();
        let level = PageLevel::Size2M;
        let b = m.range_block(g(base), level).status;
        if !b.is_success() {
            return Err(b);
        }
        let t = m.mem_track().status;
        if !t.is_success() {
            return Err(t);
        }
        let r = m.page_promote(g(base), level);
        if r.status.is_success() {
            self.host.mmu().sept_pool().free(r.rcx);
            return Ok(());
        }
        let _ = m.range_unblock(g(base), level);
        Err(r.status)
    }

    /// BLOCK, TRACK, REMOVE of the leaf at `base`, then AUG of the same host page: a fresh
    /// PENDING page where an accepted one was (its old content still in it: AUG does not zero).
    fn host_remove_readd(&self, base: u64, level: PageLevel) -> Result<(), String> {
        let m = self.host.module();
        let hpa = m.leaf(g(base)).page_hpa(base);
        self.seamcall("BLOCK", m.range_block(g(base), level).status)?;
        self.seamcall("TRACK", m.mem_track().status)?;
        self.seamcall("REMOVE", m.page_remove(g(base), level).status)?;
        self.seamcall("AUG", m.page_aug(g(base), level, hpa).status)
    }
}

// ---- the catalogue -------------------------------------------------------------------------

/// One hostile behaviour.
pub struct Behaviour {
    /// Name, as `tdsim hostile NAME` takes it.
    pub name: &'static str,
    /// What the host does.
    pub description: &'static str,
    /// Why the expected verdict is the right one.
    pub why: &'static str,
    /// The verdict a correct guest reaches.
    pub expected: Verdict,
    /// Most TDCALLs the guest may make during the behaviour.
    pub bound: u64,
    /// Runs the behaviour in a prepared lab and returns what the guest made of it.
    pub run: fn(&mut Lab<'_>) -> Verdict,
}

impl fmt::Debug for Behaviour {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Behaviour")
            .field("name", &self.name)
            .field("expected", &self.expected)
            .field("bound", &self.bound)
            .finish_non_exhaustive()
    }
}

/// A to-shared conversion of [`CONV`] whose first MapGPA converts the first 2 MiB chunk and
/// answers RETRY with `resume(start)`; later calls are honest.
fn first_retry_lies(lab: &mut Lab<'_>, resume: fn(u64) -> u64) -> Verdict {
    let mut first = true;
    lab.cpu.on_map_gpa(Box::new(move |h, start, len| {
        if first && start & SHARED != 0 {
            first = false;
            let _ = h.map_gpa(start, len.min(M2));
            return retry(resume(start));
        }
        h.map_gpa(start, len)
    }));
    lab.convert(CONV, Visibility::Shared)
}

/// Makes [`PRIV`] shared through the honest host (the guest's own earlier conversion).
fn share_priv(lab: &mut Lab<'_>) -> Result<(), Verdict> {
    match lab.convert(PRIV, Visibility::Shared) {
        Verdict::Completes => Ok(()),
        other => Err(other),
    }
}

fn write_tail_tokens(lab: &mut Lab<'_>) -> Result<(), Verdict> {
    for gpa in CONV_TAIL_TOKENS {
        lab.write(gpa).map_err(Verdict::Stops)?;
    }
    Ok(())
}

fn run_retry_before_start(lab: &mut Lab<'_>) -> Verdict {
    first_retry_lies(lab, |start| start - K4)
}

fn run_retry_past_end(lab: &mut Lab<'_>) -> Verdict {
    first_retry_lies(lab, |_| CONV.1 | SHARED)
}

fn run_retry_without_shared_bit(lab: &mut Lab<'_>) -> Verdict {
    first_retry_lies(lab, |start| (start & !SHARED) + M2)
}

fn run_retry_other_high_bit(lab: &mut Lab<'_>) -> Verdict {
    first_retry_lies(lab, |start| (start + M2) | (1 << 46))
}

fn run_retry_misaligned(lab: &mut Lab<'_>) -> Verdict {
    first_retry_lies(lab, |start| start + M2 + 8)
}

fn run_retry_at_start_forever(lab: &mut Lab<'_>) -> Verdict {
    lab.cpu.on_map_gpa(Box::new(|_, start, _| retry(start)));
    lab.convert(CONV, Visibility::Shared)
}

fn run_retry_shared_bit_on_private(lab: &mut Lab<'_>) -> Verdict {
    if let Err(v) = share_priv(lab) {
        return v;
    }
    let mut first = true;
    lab.cpu.on_map_gpa(Box::new(move |h, start, len| {
        if first && start & SHARED == 0 {
            first = false;
            let _ = h.map_gpa(start, len.min(M2));
            return retry((start + M2) | SHARED);
        }
        h.map_gpa(start, len)
    }));
    lab.convert(PRIV, Visibility::Private)
}

fn run_retry_backwards(lab: &mut Lab<'_>) -> Verdict {
    if let Err(v) = write_tail_tokens(lab) {
        return v;
    }
    let mut calls = 0u32;
    lab.cpu.on_map_gpa(Box::new(move |h, start, len| {
        if start & SHARED == 0 {
            return h.map_gpa(start, len);
        }
        calls += 1;
        match calls {
            1 => {
                let _ = h.map_gpa(start, M2);
                retry(start + M2)
            }
            2 => retry((CONV.0 + K4) | SHARED),
            _ => h.map_gpa(start, len),
        }
    }));
    lab.convert(CONV, Visibility::Shared)
}

fn run_retry_one_page_at_a_time(lab: &mut Lab<'_>) -> Verdict {
    lab.cpu.on_map_gpa(Box::new(|h, start, len| {
        let out = h.map_gpa(start, K4);
        if out.status != GhciStatus::Success || len == K4 {
            return out;
        }
        retry(start + K4)
    }));
    lab.convert((CONV.0, CONV.0 + 64 * K4), Visibility::Shared)
}

fn run_retry_stall_within_bound(lab: &mut Lab<'_>) -> Verdict {
    let mut stalls = 0u32;
    lab.cpu.on_map_gpa(Box::new(move |h, start, len| {
        if stalls < accept::convert::DEFAULT_NO_PROGRESS_RETRIES {
            stalls += 1;
            return retry(start);
        }
        stalls = 0;
        let out = h.map_gpa(start, len.min(M2));
        if out.status != GhciStatus::Success || len <= M2 {
            return out;
        }
        retry(start + M2)
    }));
    lab.convert(CONV, Visibility::Shared)
}

fn run_map_success_not_shared(lab: &mut Lab<'_>) -> Verdict {
    let mut first = true;
    lab.cpu.on_map_gpa(Box::new(move |h, start, len| {
        if first && start & SHARED != 0 {
            first = false;
            return answer(GhciStatus::Success);
        }
        h.map_gpa(start, len)
    }));
    let r = range(CONV.0, CONV.1);
    let (converter, acceptor) = (lab.converter, lab.acceptor);
    let shared = converter.convert(
        &mut lab.cpu,
        acceptor,
        r,
        Visibility::Shared,
        &mut PageTables,
    );
    if let Err(f) = shared {
        lab.note(format!("{f}"));
        return Verdict::Stops(Stop::Inconsistent);
    }
    // The host did nothing: no GPA is both shared and private on the host side.
    if let Err(e) = lab.check_side(r, Visibility::Private) {
        lab.note(format!("after the fake conversion: {e}"));
        return Verdict::Stops(Stop::Inconsistent);
    }
    lab.note("the fake to-shared conversion left the range private and accepted".into());
    // The guest takes the range back: its strict ACCEPT finds the pages accepted.
    lab.convert(CONV, Visibility::Private)
}

fn run_map_success_not_private(lab: &mut Lab<'_>) -> Verdict {
    if let Err(v) = share_priv(lab) {
        return v;
    }
    let mut first = true;
    lab.cpu.on_map_gpa(Box::new(move |h, start, len| {
        if first && start & SHARED == 0 {
            first = false;
            return answer(GhciStatus::Success);
        }
        h.map_gpa(start, len)
    }));
    let v = lab.convert(PRIV, Visibility::Private);
    if let Some(why) = &lab.cpu.honest.killed {
        let why = why.clone();
        lab.note(why);
    }
    v
}

fn midway<'g>(status: GhciStatus, private: bool) -> MapHook<'g> {
    let mut calls = 0u32;
    Box::new(move |h, start, len| {
        if (start & SHARED == 0) != private {
            return h.map_gpa(start, len);
        }
        calls += 1;
        match calls {
            1 => {
                let _ = h.map_gpa(start, M2);
                retry(start + M2)
            }
            2 => answer(status),
            _ => h.map_gpa(start, len),
        }
    })
}

fn run_map_gpa_inuse_midway(lab: &mut Lab<'_>) -> Verdict {
    if let Err(v) = write_tail_tokens(lab) {
        return v;
    }
    lab.cpu.on_map_gpa(midway(GhciStatus::GpaInUse, false));
    lab.convert(CONV, Visibility::Shared)
}

fn run_map_invalid_operand_midway(lab: &mut Lab<'_>) -> Verdict {
    if let Err(v) = share_priv(lab) {
        return v;
    }
    lab.cpu.on_map_gpa(midway(GhciStatus::InvalidOperand, true));
    lab.convert(PRIV, Visibility::Private)
}

fn run_map_unknown_status(lab: &mut Lab<'_>) -> Verdict {
    let mut first = true;
    lab.cpu.on_map_gpa(Box::new(move |h, start, len| {
        if first {
            first = false;
            return answer(GhciStatus::Unknown(0x42));
        }
        h.map_gpa(start, len)
    }));
    lab.convert(CONV, Visibility::Shared)
}

fn run_map_vmcall_fails(lab: &mut Lab<'_>) -> Verdict {
    let mut first = true;
    lab.cpu.on_map_gpa(Box::new(move |h, start, len| {
        if first {
            first = false;
            return MapGpaOutcome {
                tdcall: StatusCode::OperandInvalid.with_operand(1),
                status: GhciStatus::Success,
                resume_gpa: 0,
            };
        }
        h.map_gpa(start, len)
    }));
    lab.convert(CONV, Visibility::Shared)
}

fn run_map_converts_all_then_fails(lab: &mut Lab<'_>) -> Verdict {
    // Tokens in the range being given up: not the guest's any more, but the report says
    // what happened to them.
    let mut given_up = Vec::new();
    for gpa in CONV_TAIL_TOKENS {
        match lab.write(gpa) {
            Ok(token) => given_up.push((gpa, token)),
            Err(s) => return Verdict::Stops(s),
        }
        lab.shadow.remove(&gpa);
    }
    let mut first = true;
    lab.cpu.on_map_gpa(Box::new(move |h, start, len| {
        if first && start & SHARED != 0 {
            first = false;
            let _ = h.map_gpa(start, len);
            return answer(GhciStatus::GpaInUse);
        }
        h.map_gpa(start, len)
    }));
    let v = lab.convert(CONV, Visibility::Shared);
    let module = lab.host.module();
    let zeroed = given_up
        .iter()
        .filter(|&&(gpa, token)| {
            let leaf = module.leaf(g(gpa));
            module.read_content(leaf.page_hpa(gpa)) != token
        })
        .count();
    lab.note(format!(
        "{zeroed} of {} tokens written in the range before the conversion read differently after \
         the rollback (the host converted those pages; the engine reports them Restored: content gone)",
        given_up.len()
    ));
    v
}

fn run_convert_past_top_of_memory(lab: &mut Lab<'_>) -> Verdict {
    lab.convert((LAB_MEMORY - M2, LAB_MEMORY + M2), Visibility::Shared)
}

/// The memory hole of the hole row: no guest memory the host can convert.
const HOLE: (u64, u64) = (20 * M2, 21 * M2);

fn run_convert_across_memory_hole(lab: &mut Lab<'_>) -> Verdict {
    // The host converts chunk by chunk up to the hole, reports that progress with RETRY, then
    // refuses at the hole (its memslot lookup fails).
    lab.cpu.on_map_gpa(Box::new(|h, start, len| {
        let bit = start & SHARED;
        let addr = start & !SHARED;
        let end = addr + len;
        if end <= HOLE.0 || addr >= HOLE.1 {
            return h.map_gpa(start, len);
        }
        if addr < HOLE.0 {
            let out = h.map_gpa(start, HOLE.0 - addr);
            if out.status != GhciStatus::Success {
                return out;
            }
            return retry(HOLE.0 | bit);
        }
        answer(GhciStatus::InvalidOperand)
    }));
    lab.convert((HOLE.0 - M2, HOLE.1 + M2), Visibility::Shared)
}

fn run_accept_size_mismatch_every_level(lab: &mut Lab<'_>) -> Verdict {
    lab.cpu.on_accept(Box::new(|_, _, level| {
        StatusCode::PageSizeMismatch.with_operand(u32::from(level.index()))
    }));
    let v = lab.accept_lazy(unit_gpa(4), unit_gpa(4) + K4);
    lab.note(format!("unit 4 is {:?}", lab.tracker.unit_state(4)));
    v
}

fn run_accept_busy_forever(lab: &mut Lab<'_>) -> Verdict {
    let gpa = unit_gpa(5);
    if let Err(e) = lab.host_map_2m(gpa) {
        lab.note(e);
        return Verdict::Stops(Stop::Inconsistent);
    }
    let host = lab.host;
    let Some(guard) = host.module().hold_entry_lock(g(gpa), 1) else {
        lab.note("entry lock not taken".into());
        return Verdict::Stops(Stop::Inconsistent);
    };
    let v = lab.accept_lazy(gpa, gpa + K4);
    drop(guard);
    v
}

fn run_accept_busy_then_free(lab: &mut Lab<'_>) -> Verdict {
    let gpa = unit_gpa(6);
    if let Err(e) = lab.host_map_2m(gpa) {
        lab.note(e);
        return Verdict::Stops(Stop::Inconsistent);
    }
    let host = lab.host;
    let mut guard: Option<EntryLockGuard<'_>> = host.module().hold_entry_lock(g(gpa), 1);
    if guard.is_none() {
        lab.note("entry lock not taken".into());
        return Verdict::Stops(Stop::Inconsistent);
    }
    let mut calls = 0u32;
    lab.cpu.on_accept(Box::new(move |h, gpa, level| {
        calls += 1;
        if calls == 200 {
            drop(guard.take());
        }
        h.accept(gpa, level)
    }));
    let v = lab.accept_lazy(gpa, gpa + K4);
    lab.cpu.honest_again();
    if v != Verdict::Completes {
        return v;
    }
    match lab.write(gpa + 0x4000).and_then(|_| lab.read(gpa + 0x4000)) {
        Ok(_) => Verdict::Completes,
        Err(s) => Verdict::Stops(s),
    }
}

fn run_accept_already_accepted_lie(lab: &mut Lab<'_>) -> Verdict {
    lab.cpu.on_accept(Box::new(|_, _, level| {
        StatusCode::PageAlreadyAccepted.with_operand(u32::from(level.index()))
    }));
    let gpa = unit_gpa(7);
    let v = lab.accept_lazy(gpa, gpa + K4);
    lab.cpu.honest_again();
    let again = lab.accept_lazy(gpa, gpa + K4);
    lab.note(format!("a later request for the unit: {again}"));
    if again != v {
        return Verdict::Stops(Stop::Inconsistent);
    }
    v
}

fn run_accept_unknown_status(lab: &mut Lab<'_>) -> Verdict {
    lab.cpu.on_accept(Box::new(|_, _, _| {
        TdxStatus::from_raw(0xC000_0B99_0000_0000)
    }));
    let gpa = unit_gpa(8);
    lab.accept_lazy(gpa, gpa + K4)
}

fn run_ept_storm_on_accept(lab: &mut Lab<'_>) -> Verdict {
    lab.cpu.on_exit(Box::new(|_, _| ExitAction::Resume));
    let gpa = unit_gpa(9);
    let v = lab.accept_lazy(gpa, gpa + K4);
    lab.note(format!("{} exits", lab.cpu.honest.exits));
    v
}

fn run_ept_storm_on_access(lab: &mut Lab<'_>) -> Verdict {
    lab.cpu.on_exit(Box::new(|_, _| ExitAction::Resume));
    let gpa = unit_gpa(10) + 0x5000;
    let v = match lab.read(gpa) {
        Ok(_) => Verdict::Completes,
        Err(s) => Verdict::Stops(s),
    };
    lab.note(format!("{} exits", lab.cpu.honest.exits));
    v
}

fn run_remove_readd_2m(lab: &mut Lab<'_>) -> Verdict {
    let page = BYSTANDERS[3];
    if let Err(e) = lab.host_remove_readd(page & !(M2 - 1), PageLevel::Size2M) {
        lab.note(e);
        return Verdict::Stops(Stop::Inconsistent);
    }
    match lab.read(page) {
        Ok(_) => Verdict::Completes,
        Err(s) => Verdict::Stops(s),
    }
}

fn run_remove_readd_4k_boot(lab: &mut Lab<'_>) -> Verdict {
    let page = BYSTANDERS[0];
    let r = lab
        .host_demote(0)
        .and_then(|()| lab.host_remove_readd(page, PageLevel::Size4K));
    if let Err(e) = r {
        lab.note(e);
        return Verdict::Stops(Stop::Inconsistent);
    }
    match lab.read(page) {
        Ok(_) => Verdict::Completes,
        Err(s) => Verdict::Stops(s),
    }
}

/// Maps lazy unit `unit` 2M PENDING and DEMOTEs it to 512 PENDING 4K pages.
fn demoted_pending(lab: &mut Lab<'_>, unit: u64) -> Result<u64, Verdict> {
    let gpa = unit_gpa(unit);
    let r = lab.host_map_2m(gpa).and_then(|()| lab.host_demote(gpa));
    if let Err(e) = r {
        lab.note(e);
        return Err(Verdict::Stops(Stop::Inconsistent));
    }
    Ok(gpa)
}

/// Writes and reads back tokens in a few pages of the 2M range at `base`.
fn use_range(lab: &mut Lab<'_>, base: u64) -> Verdict {
    for off in [0, 0x1000, 0x10_0000, M2 - K4] {
        if let Err(s) = lab.write(base + off) {
            return Verdict::Stops(s);
        }
    }
    for off in [0, 0x1000, 0x10_0000, M2 - K4] {
        if let Err(s) = lab.read(base + off) {
            return Verdict::Stops(s);
        }
    }
    Verdict::Completes
}

fn run_demote_pending_before_accept(lab: &mut Lab<'_>) -> Verdict {
    let gpa = match demoted_pending(lab, 11) {
        Ok(g) => g,
        Err(v) => return v,
    };
    let v = lab.accept_lazy(gpa, gpa + K4);
    if v != Verdict::Completes {
        return v;
    }
    use_range(lab, gpa)
}

fn run_promote_during_4k_accepts(lab: &mut Lab<'_>) -> Verdict {
    let gpa = match demoted_pending(lab, 12) {
        Ok(g) => g,
        Err(v) => return v,
    };
    let host = lab.host;
    let promotes = Rc::new(Cell::new((0u32, 0u32)));
    let counts = promotes.clone();
    lab.cpu.on_accept(Box::new(move |h, at, level| {
        if level == PageLevel::Size4K {
            let m = host.module();
            let blocked = m.range_block(g(gpa), PageLevel::Size2M).status;
            if blocked.is_success() && m.mem_track().status.is_success() {
                let r = m.page_promote(g(gpa), PageLevel::Size2M);
                let (ok, refused) = counts.get();
                if r.status.is_success() {
                    host.mmu().sept_pool().free(r.rcx);
                    counts.set((ok + 1, refused));
                } else {
                    counts.set((ok, refused + 1));
                    let _ = m.range_unblock(g(gpa), PageLevel::Size2M);
                }
            }
        }
        h.accept(at, level)
    }));
    let v = lab.accept_lazy(gpa, gpa + K4);
    lab.cpu.honest_again();
    let (ok, refused) = promotes.get();
    lab.note(format!(
        "host PROMOTE during the accepts: {ok} merged, {refused} refused"
    ));
    if v != Verdict::Completes {
        return v;
    }
    let v = use_range(lab, gpa);
    if v != Verdict::Completes {
        return v;
    }
    // Everything accepted: the host merges the range back; the data must survive it.
    if let Err(s) = lab.host_promote(gpa) {
        lab.note(format!("final PROMOTE: {s}"));
        return Verdict::Stops(Stop::Inconsistent);
    }
    let leaf = lab.host.module().leaf(g(gpa));
    lab.note(format!("final leaf level {} {:?}", leaf.level, leaf.state));
    Verdict::Completes
}

fn run_demote_promote_during_accepts(lab: &mut Lab<'_>) -> Verdict {
    let host = lab.host;
    let victim = BYSTANDERS[4] & !(M2 - 1);
    // Host steps done and failed.
    let counts = Rc::new(Cell::new((0u32, 0u32)));
    let seen = counts.clone();
    lab.cpu.on_accept(Box::new(move |h, at, level| {
        let (step, failures) = seen.get();
        let m = host.module();
        let ok = if step % 2 == 0 {
            let page = host.mmu().sept_pool().alloc();
            m.range_block(g(victim), PageLevel::Size2M)
                .status
                .is_success()
                && m.mem_track().status.is_success()
                && page.is_some_and(|p| {
                    m.page_demote(g(victim), PageLevel::Size2M, p)
                        .status
                        .is_success()
                })
        } else {
            m.range_block(g(victim), PageLevel::Size2M)
                .status
                .is_success()
                && m.mem_track().status.is_success()
                && {
                    let r = m.page_promote(g(victim), PageLevel::Size2M);
                    if r.status.is_success() {
                        host.mmu().sept_pool().free(r.rcx);
                    }
                    r.status.is_success()
                }
        };
        seen.set((step + 1, failures + u32::from(!ok)));
        h.accept(at, level)
    }));
    let v = lab.accept_lazy(unit_gpa(13), unit_gpa(17));
    lab.cpu.honest_again();
    let (steps, failures) = counts.get();
    lab.note(format!(
        "host DEMOTE/PROMOTE steps between the ACCEPTs: {steps}, failed: {failures}"
    ));
    if failures > 0 {
        return Verdict::Stops(Stop::Inconsistent);
    }
    if v != Verdict::Completes {
        return v;
    }
    match lab.read(BYSTANDERS[4]) {
        Ok(_) => use_range(lab, unit_gpa(14)),
        Err(s) => Verdict::Stops(s),
    }
}

fn ept_ve(gpa: u64) -> VeInfo {
    VeInfo {
        exit_reason: EXIT_REASON_EPT_VIOLATION,
        exit_qualification: 0x182,
        gla: gpa,
        gpa,
        ..VeInfo::default()
    }
}

fn verdict_of_ve(lab: &mut Lab<'_>, v: VeVerdict, gpa: u64) -> Verdict {
    match stop_of_ve(v) {
        Some(s) => Verdict::Stops(s),
        // Return from the #VE: the access is retried.
        None => match lab.read(gpa) {
            Ok(_) => Verdict::Completes,
            Err(s) => Verdict::Stops(s),
        },
    }
}

fn run_ve_never_pending_boot(lab: &mut Lab<'_>) -> Verdict {
    let gpa = BYSTANDERS[0];
    let v = lab.forged_ve(ept_ve(gpa));
    verdict_of_ve(lab, v, gpa)
}

fn run_ve_never_pending_lazy_once(lab: &mut Lab<'_>) -> Verdict {
    let gpa = BYSTANDERS[3];
    let v = lab.forged_ve(ept_ve(gpa));
    verdict_of_ve(lab, v, gpa)
}

fn run_ve_never_pending_lazy_twice(lab: &mut Lab<'_>) -> Verdict {
    let gpa = BYSTANDERS[3];
    let first = lab.forged_ve(ept_ve(gpa));
    if stop_of_ve(first).is_some() {
        return verdict_of_ve(lab, first, gpa);
    }
    let v = lab.forged_ve(ept_ve(gpa));
    verdict_of_ve(lab, v, gpa)
}

fn run_ve_shared_gpa(lab: &mut Lab<'_>) -> Verdict {
    let gpa = BYSTANDERS[0] | SHARED;
    let v = lab.forged_ve(ept_ve(gpa));
    verdict_of_ve(lab, v, BYSTANDERS[0])
}

fn run_ve_info_not_valid(lab: &mut Lab<'_>) -> Verdict {
    // A #VE the module did not raise: VEINFO.GET finds nothing valid.
    let tracker = lab.tracker;
    let v = handle_ve(
        0,
        &mut lab.ve_state,
        &mut lab.cpu,
        &mut NoInterrupts,
        tracker,
    );
    lab.note(format!("#VE handler: {v:?}"));
    match stop_of_ve(v) {
        Some(s) => Verdict::Stops(s),
        None => Verdict::Completes,
    }
}

fn run_ve_beyond_gpa_width(lab: &mut Lab<'_>) -> Verdict {
    let v = lab.forged_ve(ept_ve(1 << 50));
    verdict_of_ve(lab, v, BYSTANDERS[0])
}

fn run_ve_not_ept_violation(lab: &mut Lab<'_>) -> Verdict {
    let info = VeInfo {
        exit_reason: 10,
        ..ept_ve(BYSTANDERS[0])
    };
    let v = lab.forged_ve(info);
    verdict_of_ve(lab, v, BYSTANDERS[0])
}

fn run_ve_forged_on_unaccepted_unit(lab: &mut Lab<'_>) -> Verdict {
    let gpa = unit_gpa(17) + 0x8000;
    let v = lab.forged_ve(ept_ve(gpa));
    let v = verdict_of_ve(lab, v, gpa);
    if v == Verdict::Completes && lab.tracker.unit_state(17) != UnitState::Accepted {
        return Verdict::Stops(Stop::Inconsistent);
    }
    v
}

const CONV_SHARED: u64 = CONV.0 | SHARED;
const BUSY_TRIES: u32 = accept::acceptor::DEFAULT_BUSY_RETRIES + 1;
const NO_PROGRESS: u32 = accept::convert::DEFAULT_NO_PROGRESS_RETRIES + 1;

/// Every behaviour, in catalogue order.
pub fn catalogue() -> &'static [Behaviour] {
    &CATALOGUE
}

static CATALOGUE: [Behaviour; 39] = [
    // ---- MapGPA ----
    Behaviour {
        name: "retry-before-start",
        description: "To-shared MapGPA: the host converts the first 2 MiB, then answers RETRY with R11 one page before the start of the request.",
        why: "R11 outside [current, end) is refused (BadResume) before anything is trusted; the rollback maps the whole range private again and re-accepts it, tolerating pages the host never converted.",
        expected: Verdict::RolledBack(Stop::BadResume { at: CONV.0, resume: CONV_SHARED - K4 }),
        bound: 12,
        run: run_retry_before_start,
    },
    Behaviour {
        name: "retry-past-end",
        description: "To-shared MapGPA: the host converts the first 2 MiB, then answers RETRY with R11 = the end of the range.",
        why: "A resume GPA at or past the end is outside [current, end): BadResume, then a complete rollback.",
        expected: Verdict::RolledBack(Stop::BadResume { at: CONV.0, resume: CONV.1 | SHARED }),
        bound: 12,
        run: run_retry_past_end,
    },
    Behaviour {
        name: "retry-at-start-forever",
        description: "Every MapGPA (both directions) is answered RETRY with R11 = the GPA it was asked for; nothing is ever converted.",
        why: "RETRY without progress is bounded (DEFAULT_NO_PROGRESS_RETRIES + 1 answers); the rollback MapGPA meets the same host and stops the same way, so the range is reported unknown, in 34 TDCALLs in all.",
        expected: Verdict::RollbackFailed {
            cause: Stop::NoProgress { at: CONV.0, tries: NO_PROGRESS },
            rollback: Stop::NoProgress { at: CONV.0, tries: NO_PROGRESS },
        },
        bound: 2 * NO_PROGRESS as u64,
        run: run_retry_at_start_forever,
    },
    Behaviour {
        name: "retry-without-shared-bit",
        description: "To-shared MapGPA: after the first 2 MiB the host answers RETRY with the next GPA but without the shared bit.",
        why: "R11 must carry the shared bit exactly as sent, or the loop would move to the other alias: BadResume, complete rollback.",
        expected: Verdict::RolledBack(Stop::BadResume { at: CONV.0, resume: CONV.0 + M2 }),
        bound: 12,
        run: run_retry_without_shared_bit,
    },
    Behaviour {
        name: "retry-other-high-bit",
        description: "To-shared MapGPA: after the first 2 MiB the host answers RETRY with the next GPA, the shared bit and bit 46 set.",
        why: "An R11 beyond the request (another high bit) is outside [current, end): BadResume, complete rollback.",
        expected: Verdict::RolledBack(Stop::BadResume { at: CONV.0, resume: (CONV_SHARED + M2) | (1 << 46) }),
        bound: 12,
        run: run_retry_other_high_bit,
    },
    Behaviour {
        name: "retry-shared-bit-on-private",
        description: "To-private MapGPA: after the first 2 MiB the host answers RETRY with the next GPA carrying the shared bit.",
        why: "The resume GPA of a private request must not carry the shared bit: BadResume; the rollback maps the range shared again.",
        expected: Verdict::RolledBack(Stop::BadResume { at: PRIV.0, resume: (PRIV.0 + M2) | SHARED }),
        bound: 8,
        run: run_retry_shared_bit_on_private,
    },
    Behaviour {
        name: "retry-misaligned",
        description: "To-shared MapGPA: after the first 2 MiB the host answers RETRY with an R11 that is not 4K aligned.",
        why: "A misaligned resume GPA is refused: BadResume, complete rollback.",
        expected: Verdict::RolledBack(Stop::BadResume { at: CONV.0, resume: CONV_SHARED + M2 + 8 }),
        bound: 12,
        run: run_retry_misaligned,
    },
    Behaviour {
        name: "retry-backwards",
        description: "To-shared MapGPA: the host converts 2 MiB and reports it (RETRY at start + 2M), then answers RETRY with a GPA before that progress.",
        why: "Going backwards is outside [current, end): BadResume at the reported progress. The rollback re-accepts the converted first half strictly and the second half tolerantly: the tokens in the second half, never converted, survive.",
        expected: Verdict::RolledBack(Stop::BadResume { at: CONV.0 + M2, resume: CONV_SHARED + K4 }),
        bound: 12,
        run: run_retry_backwards,
    },
    Behaviour {
        name: "retry-one-page-at-a-time",
        description: "To-shared MapGPA of 256 KiB: the host converts one 4K page per call and answers RETRY with the next page.",
        why: "Slow but honest: each answer makes progress, which resets the no-progress count; the conversion completes in one call per page.",
        expected: Verdict::Completes,
        bound: 64,
        run: run_retry_one_page_at_a_time,
    },
    Behaviour {
        name: "retry-stall-within-bound",
        description: "To-shared MapGPA: before each 2 MiB chunk the host answers RETRY without progress as often as the bound allows, then converts the chunk.",
        why: "Stalls up to the bound are tolerated and progress resets the count: the conversion completes.",
        expected: Verdict::Completes,
        bound: 2 * NO_PROGRESS as u64,
        run: run_retry_stall_within_bound,
    },
    Behaviour {
        name: "map-success-not-shared",
        description: "To-shared MapGPA answered SUCCESS without converting anything; later the guest converts the range back to private.",
        why: "The guest cannot see the lie through MapGPA, and nothing leaks: the host did nothing, so no GPA is both shared and private and the private pages stay accepted. Converting back, the guest's ACCEPT gets PAGE_ALREADY_ACCEPTED, which only a guest acceptance can cause: the pages are private already, so the conversion completes and gives nothing to the host.",
        expected: Verdict::Completes,
        bound: 8,
        run: run_map_success_not_shared,
    },
    Behaviour {
        name: "map-success-not-private",
        description: "To-private MapGPA answered SUCCESS without converting; the memory stays shared on the host.",
        why: "The guest's ACCEPT exits to a host that cannot map private memory it keeps shared: the VMM stops the TD (KVM returns the fault to userspace). The engine reports the ACCEPT failure; what the host holds is not known, so the rollback gives nothing back (it could destroy a private page) and says so.",
        expected: Verdict::RollbackFailed {
            cause: Stop::Module { gpa: PRIV.0, level: PageLevel::Size2M, code: StatusCode::NonRecoverableTd },
            rollback: Stop::Module { gpa: PRIV.0, level: PageLevel::Size2M, code: StatusCode::NonRecoverableTd },
        },
        bound: 8,
        run: run_map_success_not_private,
    },
    Behaviour {
        name: "map-gpa-inuse-midway",
        description: "To-shared MapGPA: the host converts 2 MiB, reports it with RETRY, then answers GPA_INUSE.",
        why: "GHCI errors stop the loop with the converted prefix known. The rollback re-accepts the prefix strictly and the rest tolerantly; the tokens in the part the host never converted survive.",
        expected: Verdict::RolledBack(Stop::Host { at: CONV.0 + M2, status: GhciStatus::GpaInUse }),
        bound: 12,
        run: run_map_gpa_inuse_midway,
    },
    Behaviour {
        name: "map-invalid-operand-midway",
        description: "To-private MapGPA: the host converts 2 MiB, reports it with RETRY, then answers INVALID_OPERAND.",
        why: "The loop stops at the reported progress; the to-private rollback accepts the converted prefix to learn what it held, gives back exactly what it made private, and maps the part the host never converted shared again.",
        expected: Verdict::RolledBack(Stop::Host { at: PRIV.0 + M2, status: GhciStatus::InvalidOperand }),
        bound: 8,
        run: run_map_invalid_operand_midway,
    },
    Behaviour {
        name: "map-unknown-status",
        description: "To-shared MapGPA answered with R10 = 0x42, a status the GHCI does not define.",
        why: "Unknown statuses are errors kept raw, never success or retry: Host(Unknown), complete rollback.",
        expected: Verdict::RolledBack(Stop::Host { at: CONV.0, status: GhciStatus::Unknown(0x42) }),
        bound: 8,
        run: run_map_unknown_status,
    },
    Behaviour {
        name: "map-vmcall-fails",
        description: "The MapGPA TDG.VP.VMCALL itself fails (RAX = OPERAND_INVALID) once.",
        why: "A failed TDCALL is its own error (Tdcall), not a GHCI status; the rollback then succeeds.",
        expected: Verdict::RolledBack(Stop::Tdcall { at: CONV.0, code: StatusCode::OperandInvalid }),
        bound: 8,
        run: run_map_vmcall_fails,
    },
    Behaviour {
        name: "map-converts-all-then-fails",
        description: "To-shared MapGPA: the host converts the whole range, then answers GPA_INUSE as if it had done nothing.",
        why: "The guest cannot know which pages were converted; the rollback maps the range private and accepts it tolerating ALREADY_ACCEPTED, which fresh-accepts what the host converted. The range comes back private and accepted (its content was being given up by the conversion anyway); nothing outside it changes.",
        expected: Verdict::RolledBack(Stop::Host { at: CONV.0, status: GhciStatus::GpaInUse }),
        bound: 8,
        run: run_map_converts_all_then_fails,
    },
    Behaviour {
        name: "convert-past-top-of-memory",
        description: "The guest converts a range crossing the top of guest memory to shared; the host refuses it (INVALID_OPERAND).",
        why: "The host validates the whole request, so nothing is converted; the engine cannot know that from a GHCI error, reports the cause, and its rollback MapGPA is refused the same way: the range is reported unknown, and no memory outside it is touched.",
        expected: Verdict::RollbackFailed {
            cause: Stop::Host { at: LAB_MEMORY - M2, status: GhciStatus::InvalidOperand },
            rollback: Stop::Host { at: LAB_MEMORY - M2, status: GhciStatus::InvalidOperand },
        },
        bound: 4,
        run: run_convert_past_top_of_memory,
    },
    Behaviour {
        name: "convert-across-memory-hole",
        description: "The guest converts a range crossing a 2 MiB hole in guest memory to shared: the host converts up to the hole, reports it with RETRY, then answers INVALID_OPERAND.",
        why: "The loop stops at the hole with the prefix known; the rollback meets the same hole and stops there, so the states are reported unknown rather than guessed.",
        expected: Verdict::RollbackFailed {
            cause: Stop::Host { at: HOLE.0, status: GhciStatus::InvalidOperand },
            rollback: Stop::Host { at: HOLE.0, status: GhciStatus::InvalidOperand },
        },
        bound: 6,
        run: run_convert_across_memory_hole,
    },
    // ---- ACCEPT ----
    Behaviour {
        name: "accept-size-mismatch-every-level",
        description: "Every ACCEPT, at 2M and at 4K, is answered PAGE_SIZE_MISMATCH (not reachable with a correct module: there is no level below 4K).",
        why: "A 2M mismatch falls back to 4K for that chunk only; a mismatch at 4K is outside the spec and stops at once with the status, after 2 calls. Nothing was accepted, so the unit goes back to unaccepted.",
        expected: Verdict::Stops(Stop::Module { gpa: unit_gpa(4), level: PageLevel::Size4K, code: StatusCode::PageSizeMismatch }),
        bound: 2,
        run: run_accept_size_mismatch_every_level,
    },
    Behaviour {
        name: "accept-busy-forever",
        description: "The host maps a lazy unit 2M PENDING and holds its S-EPT entry lock forever, as a SEAMCALL that never ends would: every ACCEPT gets OPERAND_BUSY.",
        why: "BUSY is retried DEFAULT_BUSY_RETRIES times per call, then the engine stops with Busy instead of spinning; the unit stays unaccepted.",
        expected: Verdict::Stops(Stop::Busy { gpa: unit_gpa(5), level: PageLevel::Size2M, tries: BUSY_TRIES }),
        bound: BUSY_TRIES as u64,
        run: run_accept_busy_forever,
    },
    Behaviour {
        name: "accept-busy-then-free",
        description: "The host holds the entry lock of a 2M PENDING unit through the guest's first 199 ACCEPTs, then releases it.",
        why: "BUSY within the bound is a transient race: the ACCEPT that follows succeeds and the memory is usable.",
        expected: Verdict::Completes,
        bound: 200,
        run: run_accept_busy_then_free,
    },
    Behaviour {
        name: "accept-already-accepted-lie",
        description: "ACCEPT of a never-accepted unit answered PAGE_ALREADY_ACCEPTED (not reachable with a correct module).",
        why: "Only a guest ACCEPT makes a page accepted, so the tracker takes ALREADY_ACCEPTED as the page being private (a conversion may have accepted it behind the tracker) and counts the unit accepted instead of making it unusable; a later request does nothing. A module that lies here is outside the trust model (the TDX module is trusted); a strict tracker (Linux's policy) stops with the GPA and fails the unit.",
        expected: Verdict::Completes,
        bound: 1,
        run: run_accept_already_accepted_lie,
    },
    Behaviour {
        name: "accept-unknown-status",
        description: "ACCEPT answered with a status class the spec does not define (0xC0000B99...).",
        why: "Unknown statuses are kept raw and stop the acceptance at that page; they are never taken as success or retried.",
        expected: Verdict::Stops(Stop::Module { gpa: unit_gpa(8), level: PageLevel::Size2M, code: StatusCode::Unknown(0xC000_0B99) }),
        bound: 1,
        run: run_accept_unknown_status,
    },
    Behaviour {
        name: "ept-storm-on-accept",
        description: "The host answers every ACCEPT EPT-violation exit by resuming the guest without mapping anything.",
        why: "The guest's ACCEPT never retires: the loop is in the host, not the guest (one TDCALL). The simulator, like a VMM that gives up, stops the TD after MAX_EXITS_PER_INSTRUCTION exits; the engine reports the failed ACCEPT precisely and accepted nothing twice.",
        expected: Verdict::Stops(Stop::Module { gpa: unit_gpa(9), level: PageLevel::Size2M, code: StatusCode::NonRecoverableTd }),
        bound: 1,
        run: run_ept_storm_on_accept,
    },
    Behaviour {
        name: "ept-storm-on-access",
        description: "The guest touches lazily accepted memory the host never mapped; the host answers every EPT-violation exit without mapping.",
        why: "No #VE is ever raised, so the engine is never entered (0 TDCALLs); the access is stopped after MAX_EXITS_PER_INSTRUCTION exits and the TD is stopped.",
        expected: Verdict::Stops(Stop::Killed),
        bound: 0,
        run: run_ept_storm_on_access,
    },
    // ---- Secure-EPT ----
    Behaviour {
        name: "remove-readd-2m",
        description: "The host BLOCKs, TRACKs and REMOVEs an accepted 2M private page holding guest data, then AUGs a fresh PENDING page there; the guest reads it.",
        why: "The first #VE on an accepted unit may be a race with another vCPU (AcceptedMeanwhile, retry the access); the repeat on the same page is ReAdded. The page is never accepted again, so its content is not zeroed behind the guest's back.",
        expected: Verdict::Stops(Stop::ReAdded { gpa: BYSTANDERS[3] }),
        bound: 2,
        run: run_remove_readd_2m,
    },
    Behaviour {
        name: "remove-readd-4k-boot",
        description: "The host DEMOTEs a boot-accepted 2M page, REMOVEs one 4K page holding guest data and AUGs it back PENDING; the guest reads it.",
        why: "A pending page outside the unaccepted memory was accepted at boot: Untracked, no ACCEPT, the data is not zeroed.",
        expected: Verdict::Stops(Stop::Untracked { gpa: BYSTANDERS[0] }),
        bound: 1,
        run: run_remove_readd_4k_boot,
    },
    Behaviour {
        name: "demote-pending-before-accept",
        description: "The host maps a lazy unit 2M PENDING, then DEMOTEs it to 512 PENDING 4K pages just before the guest's 2M ACCEPT.",
        why: "PAGE_SIZE_MISMATCH at 2M makes that unit accept at 4K (512 calls); the memory is then usable.",
        expected: Verdict::Completes,
        bound: 513,
        run: run_demote_pending_before_accept,
    },
    Behaviour {
        name: "promote-during-4k-accepts",
        description: "As demote-pending-before-accept, and before every 4K ACCEPT the host tries to PROMOTE the range (BLOCK, TRACK, PROMOTE, UNBLOCK on failure); the first try merges it back to 2M PENDING under the guest.",
        why: "A 4K ACCEPT inside a 2M PENDING leaf exits and the host's fault path DEMOTEs again; later PROMOTE attempts fail on mixed children. The acceptance completes, and a final PROMOTE of the fully accepted range keeps the guest's data.",
        expected: Verdict::Completes,
        bound: 513,
        run: run_promote_during_4k_accepts,
    },
    Behaviour {
        name: "demote-promote-during-accepts",
        description: "While the guest accepts five lazy units, the host alternately DEMOTEs and PROMOTEs an accepted 2M page holding guest data, between the guest's ACCEPTs.",
        why: "DEMOTE and PROMOTE of MAPPED pages preserve content and acceptance: the guest's ACCEPTs complete and its data reads back.",
        expected: Verdict::Completes,
        bound: 5,
        run: run_demote_promote_during_accepts,
    },
    // ---- #VE ----
    Behaviour {
        name: "ve-never-pending-boot",
        description: "A #VE (EPT violation) for a boot-accepted page the guest never left pending (VE info from a module bug or forged).",
        why: "A pending page outside unaccepted memory can only be a re-added page: Untracked, stop; no ACCEPT that could zero data.",
        expected: Verdict::Stops(Stop::Untracked { gpa: BYSTANDERS[0] }),
        bound: 1,
        run: run_ve_never_pending_boot,
    },
    Behaviour {
        name: "ve-never-pending-lazy-once",
        description: "One #VE for a page of a lazily accepted unit that is MAPPED.",
        why: "Indistinguishable from another vCPU finishing the unit's acceptance after the #VE was raised: AcceptedMeanwhile, no ACCEPT, the retried access reads the guest's data.",
        expected: Verdict::Completes,
        bound: 1,
        run: run_ve_never_pending_lazy_once,
    },
    Behaviour {
        name: "ve-never-pending-lazy-twice",
        description: "Two #VEs for the same page of a lazily accepted unit that is MAPPED.",
        why: "The repeat on the page already answered AcceptedMeanwhile is ReAdded: stop rather than accept again.",
        expected: Verdict::Stops(Stop::ReAdded { gpa: BYSTANDERS[3] }),
        bound: 2,
        run: run_ve_never_pending_lazy_twice,
    },
    Behaviour {
        name: "ve-shared-gpa",
        description: "An EPT-violation #VE whose GPA has the shared bit set.",
        why: "Shared GPAs are not the acceptance engine's (MMIO, shared buffers): NotMine with the VE info for the embedder, nothing accepted.",
        expected: Verdict::Stops(Stop::NotMine { gpa: BYSTANDERS[0] | SHARED }),
        bound: 1,
        run: run_ve_shared_gpa,
    },
    Behaviour {
        name: "ve-info-not-valid",
        description: "A #VE whose TDG.VP.VEINFO.GET finds no valid VE info.",
        why: "NoVeInfo with the module's status; the handler decides nothing from stale data.",
        expected: Verdict::Stops(Stop::NoVeInfo { code: StatusCode::NoValidVeInfo }),
        bound: 1,
        run: run_ve_info_not_valid,
    },
    Behaviour {
        name: "ve-beyond-gpa-width",
        description: "An EPT-violation #VE whose GPA lies above the TD's GPA width.",
        why: "Not a private GPA of this TD: NotMine, nothing accepted.",
        expected: Verdict::Stops(Stop::NotMine { gpa: 1 << 50 }),
        bound: 1,
        run: run_ve_beyond_gpa_width,
    },
    Behaviour {
        name: "ve-not-ept-violation",
        description: "A #VE with exit reason 10 (CPUID) and the GPA of a private page.",
        why: "Only exit reason 48 is the engine's: NotMine, whatever the GPA.",
        expected: Verdict::Stops(Stop::NotMine { gpa: BYSTANDERS[0] }),
        bound: 1,
        run: run_ve_not_ept_violation,
    },
    Behaviour {
        name: "ve-forged-on-unaccepted-unit",
        description: "A #VE for a page of a unit that is still unaccepted and that the host never mapped.",
        why: "The handler accepts the unit once, as for a real #VE (the ACCEPT exits and the host maps it): the worst a lying #VE can do there is make the guest accept its own memory early.",
        expected: Verdict::Completes,
        bound: 2,
        run: run_ve_forged_on_unaccepted_unit,
    },
];

// ---- running ---------------------------------------------------------------------------------

fn ser_display<T: fmt::Display, S: serde::Serializer>(v: &T, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(v)
}

/// The result of one behaviour.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Row {
    /// Behaviour name.
    pub name: &'static str,
    /// Expected verdict.
    #[serde(serialize_with = "ser_display")]
    pub expected: Verdict,
    /// Observed verdict.
    #[serde(serialize_with = "ser_display")]
    pub observed: Verdict,
    /// Private pages the guest owned whose content changed or vanished, plus wrong reads.
    pub private_data_lost: u64,
    /// TDCALLs the guest made during the behaviour.
    pub tdcalls: u64,
    /// The behaviour's bound on TDCALLs.
    pub bound: u64,
    /// Observed == expected, nothing lost, within the bound, and the host half's invariants
    /// hold (well-formed Secure-EPT; no GPA both shared and mapped private).
    pub passed: bool,
    /// What happened, for a reader.
    pub detail: String,
}

/// Runs one behaviour in a fresh lab.
pub fn run_behaviour(b: &Behaviour) -> Row {
    run_behaviour_on(b, None)
}

/// Makes the conversion backend of a behaviour's host (see [`run_all_on`]).
pub type BackendFactory<'f> = &'f dyn Fn(&HostConfig) -> Result<SharedBackend, String>;

/// Runs behaviour `b` on a host whose conversion backend `backend` makes (`None`: the
/// guest_memfd model).
pub fn run_behaviour_on(b: &Behaviour, backend: Option<BackendFactory<'_>>) -> Row {
    let fail = |detail: String| Row {
        name: b.name,
        expected: b.expected,
        observed: Verdict::Stops(Stop::Inconsistent),
        private_data_lost: 0,
        tdcalls: 0,
        bound: b.bound,
        passed: false,
        detail,
    };
    let config = HostConfig::new(LAB_MEMORY, 1);
    let host = match backend {
        None => Host::new(config, Arc::new(YieldKicker)).map_err(|e| e.to_string()),
        Some(make) => make(&config).and_then(|b| {
            Host::with_backend(config, Arc::new(YieldKicker), b).map_err(|e| e.to_string())
        }),
    };
    let host = match host {
        Ok(h) => h,
        Err(e) => return fail(format!("host: {e}")),
    };
    let gpaw = host.config().module.gpaw;
    let acceptor = Acceptor::new(gpaw, AcceptPolicy::OURS);
    let converter = Converter::new(gpaw, ConvertPolicy::default());
    let units = (LAB_MEMORY - LAB_EAGER_END) / M2;
    let words: Vec<AtomicU64> = (0..words_needed(units))
        .map(|_| AtomicU64::new(0))
        .collect();
    let inflight = [AtomicU64::new(0)];
    let tracker = match LazyTracker::new(
        &acceptor,
        LAB_EAGER_END,
        M2,
        units,
        &words,
        &inflight,
        TrackerConfig {
            max_wait_spins: 1024,
        },
    ) {
        Ok(t) => t,
        Err(e) => return fail(format!("tracker: {e}")),
    };
    for u in 0..units {
        tracker.mark_unaccepted(u);
    }
    let mut lab = Lab {
        host: &host,
        acceptor: &acceptor,
        converter: &converter,
        tracker: &tracker,
        cpu: Vcpu::new(&host),
        ve_state: VeCpuState::new(),
        shadow: BTreeMap::new(),
        bad_reads: 0,
        next_token: 0,
        notes: Vec::new(),
    };
    if let Err(e) = lab.setup() {
        return fail(format!("setup: {e}"));
    }
    lab.cpu.calls = 0;
    lab.cpu.limit = b.bound;
    let observed = (b.run)(&mut lab);
    lab.cpu.honest_again();
    let tdcalls = lab.cpu.calls;
    let exceeded = lab.cpu.exceeded;
    if exceeded {
        lab.note(format!("more than {} TDCALLs: stopped", b.bound));
    }
    let lost = lab.lost();
    let host_ok = lab.host_consistent();
    Row {
        name: b.name,
        expected: b.expected,
        observed,
        private_data_lost: lost,
        tdcalls,
        bound: b.bound,
        passed: observed == b.expected && lost == 0 && !exceeded && host_ok,
        detail: lab.notes.join("; "),
    }
}

/// Runs the behaviour called `name`, if there is one.
pub fn run_one(name: &str) -> Option<Row> {
    catalogue()
        .iter()
        .find(|b| b.name == name)
        .map(run_behaviour)
}

/// Runs the whole catalogue.
pub fn run_all() -> Vec<Row> {
    catalogue().iter().map(run_behaviour).collect()
}

/// Runs the whole catalogue with each host's conversion backend made by `backend`.
pub fn run_all_on(backend: BackendFactory<'_>) -> Vec<Row> {
    catalogue()
        .iter()
        .map(|b| run_behaviour_on(b, Some(backend)))
        .collect()
}

/// Width of the table [`table`] prints (an 100-column terminal).
pub const TABLE_WIDTH: usize = 100;

/// Splits `text` into lines of at most `width` characters, at spaces where it can.
fn wrap(text: &str, width: usize) -> Vec<String> {
    let width = width.max(8);
    let mut lines = Vec::new();
    let mut cur = String::new();
    for word in text.split(' ') {
        let mut word = word.to_string();
        while word.chars().count() > width {
            if !cur.is_empty() {
                lines.push(std::mem::take(&mut cur));
            }
            let head: String = word.chars().take(width).collect();
            word = word.chars().skip(width).collect();
            lines.push(head);
        }
        let extra = usize::from(!cur.is_empty());
        if cur.chars().count() + extra + word.chars().count() > width {
            lines.push(std::mem::take(&mut cur));
        }
        if !cur.is_empty() {
            cur.push(' ');
        }
        cur.push_str(&word);
    }
    if !cur.is_empty() || lines.is_empty() {
        lines.push(cur);
    }
    lines
}

/// The rows as a table no wider than [`TABLE_WIDTH`]: behaviour, result, private data lost,
/// TDCALLs / bound, and the verdict (once when observed as expected; both, labelled, when not),
/// wrapped under its own column.
pub fn table(rows: &[Row]) -> String {
    let name_w = rows
        .iter()
        .map(|r| r.name.len())
        .chain(["behaviour".len()])
        .max()
        .unwrap_or(9);
    let calls_w = rows
        .iter()
        .map(|r| format!("{}/{}", r.tdcalls, r.bound).len())
        .chain(["tdcalls".len()])
        .max()
        .unwrap_or(7);
    let prefix = format!("{:<name_w$}  {:<6}  {:>4}  {:>calls_w$}  ", "", "", "", "").len();
    let verdict_w = TABLE_WIDTH.saturating_sub(prefix);
    let mut out = format!(
        "{:<name_w$}  {:<6}  {:>4}  {:>calls_w$}  verdict\n",
        "behaviour", "result", "lost", "tdcalls"
    );
    out.push_str(&format!(
        "{}  {}  {}  {}  {}\n",
        "-".repeat(name_w),
        "-".repeat(6),
        "-".repeat(4),
        "-".repeat(calls_w),
        "-".repeat(verdict_w.min(40))
    ));
    for r in rows {
        let verdict = if r.observed == r.expected {
            r.observed.to_string()
        } else {
            format!("expected {}; observed {}", r.expected, r.observed)
        };
        let lines = wrap(&verdict, verdict_w);
        out.push_str(&format!(
            "{:<name_w$}  {:<6}  {:>4}  {:>calls_w$}  {}\n",
            r.name,
            if r.passed { "pass" } else { "FAIL" },
            r.private_data_lost,
            format!("{}/{}", r.tdcalls, r.bound),
            lines.first().map_or("", String::as_str)
        ));
        for l in lines.iter().skip(1) {
            out.push_str(&format!("{:prefix$}{l}\n", ""));
        }
    }
    let passed = rows.iter().filter(|r| r.passed).count();
    let lost: u64 = rows.iter().map(|r| r.private_data_lost).sum();
    out.push_str(&format!(
        "{passed}/{} behaviours pass; private data lost: {lost}\n",
        rows.len()
    ));
    out
}

/// The catalogue as Markdown: each behaviour, its expected verdict and why.
pub fn markdown() -> String {
    let mut out = String::new();
    for b in catalogue() {
        out.push_str(&format!(
            "### `{}`\n\n{}\n\n- Expected: `{}` (at most {} TDCALLs)\n- Why: {}\n\n",
            b.name, b.description, b.expected, b.bound, b.why
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn behaviour(expected: Verdict, bound: u64, run: fn(&mut Lab<'_>) -> Verdict) -> Behaviour {
        Behaviour {
            name: "test",
            description: "",
            why: "",
            expected,
            bound,
            run,
        }
    }

    fn careless_reaccept(lab: &mut Lab<'_>) -> Verdict {
        let base = BYSTANDERS[3] & !(M2 - 1);
        if lab.host_remove_readd(base, PageLevel::Size2M).is_err() {
            return Verdict::Stops(Stop::Inconsistent);
        }
        // A guest that does not track what it accepted accepts the re-added page again.
        let acceptor = lab.acceptor;
        match acceptor.accept_unit(&mut lab.cpu, g(base), PageLevel::Size2M) {
            Ok(()) => Verdict::Completes,
            Err(e) => Verdict::Stops(stop_of_accept(e)),
        }
    }

    #[test]
    fn a_silent_reaccept_is_counted_as_lost_data() {
        let row = run_behaviour(&behaviour(Verdict::Completes, 1, careless_reaccept));
        assert_eq!(row.observed, Verdict::Completes);
        assert_eq!(row.private_data_lost, 1, "{}", row.detail);
        assert!(!row.passed);
    }

    fn shared_but_mapped(lab: &mut Lab<'_>) -> Verdict {
        let r = range(BYSTANDERS[0] & !0xFFF, (BYSTANDERS[0] & !0xFFF) + K4);
        let _ = lab.host.gmem().convert(
            r,
            Shareability::Shared,
            Default::default(),
            &mut crate::gmem::NoopHook,
        );
        Verdict::Completes
    }

    #[test]
    fn a_gpa_both_shared_and_private_fails_the_row() {
        let row = run_behaviour(&behaviour(Verdict::Completes, 0, shared_but_mapped));
        assert_eq!(row.observed, Verdict::Completes);
        assert!(!row.passed);
        assert!(row.detail.contains("private leaf"), "{}", row.detail);
    }

    #[test]
    fn a_guest_past_the_bound_fails_the_row() {
        let row = run_behaviour(&behaviour(
            CATALOGUE[2].expected,
            10,
            run_retry_at_start_forever,
        ));
        assert!(row.tdcalls > 10);
        assert!(!row.passed);
        assert!(
            row.detail.contains("more than 10 TDCALLs"),
            "{}",
            row.detail
        );
    }

    #[test]
    fn another_verdict_fails_the_row() {
        let row = run_behaviour(&behaviour(Verdict::Completes, 12, run_retry_before_start));
        assert_eq!(row.observed, CATALOGUE[0].expected);
        assert!(!row.passed);
    }

    #[test]
    fn names_are_unique_and_documented() {
        let mut names: Vec<_> = catalogue().iter().map(|b| b.name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), catalogue().len());
        let md = markdown();
        for b in catalogue() {
            assert!(md.contains(&format!("### `{}`", b.name)));
            assert!(!b.description.is_empty() && !b.why.is_empty());
        }
    }

    #[test]
    fn the_table_has_a_line_per_row_and_a_summary() {
        let rows = vec![run_one("ve-shared-gpa").expect("in the catalogue")];
        let t = table(&rows);
        let row = t.lines().nth(2).expect("the row");
        assert!(
            row.starts_with("ve-shared-gpa") && row.contains(" pass "),
            "{row}"
        );
        assert!(t.ends_with("1/1 behaviours pass; private data lost: 0\n"));
    }

    #[test]
    fn the_table_fits_an_100_column_terminal() {
        let rows = run_all();
        let t = table(&rows);
        for line in t.lines() {
            assert!(
                line.chars().count() <= TABLE_WIDTH,
                "{} columns: {line}",
                line.len()
            );
        }
        assert_eq!(
            t.lines().filter(|l| l.contains(" pass ")).count(),
            rows.iter().filter(|r| r.passed).count()
        );
    }

    #[test]
    fn wrap_breaks_at_spaces_and_splits_long_words() {
        assert_eq!(wrap("aaaa bbb cc", 8), ["aaaa bbb", "cc"]);
        assert_eq!(wrap("abcdefghijkl", 8), ["abcdefgh", "ijkl"]);
        assert_eq!(wrap("", 8), [""]);
    }
}
