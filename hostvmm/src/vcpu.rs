//! A vCPU of the TD: the loop a VMM runs around TDH.VP.ENTER, over the module emulator.
//!
//! Every guest instruction that the host half can see (a TDCALL or a memory access) runs the
//! same way: the vCPU enters the TD, the instruction runs in the module, the vCPU leaves the
//! TD unless the instruction exited (the module already took it out), and a TD exit is
//! handed to [`Host::handle_exit`]; after an EPT violation the guest re-executes the
//! instruction, after a VMCALL it reads the host's answer. [`Vcpu`] is that loop, once:
//!
//! - [`Vcpu::step`] makes exactly one attempt of an [`Insn`] and says what happened
//!   ([`Step`]): the instruction retired with its result, the host handled an exit and the
//!   guest re-executes, a 2M ACCEPT was interrupted, or it stopped ([`Stop`]: a #VE or #DF
//!   delivered to the guest, or a reason the TD cannot go on).
//! - [`Vcpu::run`] repeats `step` until the instruction retires or stops, with a bound on the
//!   exits one instruction may take ([`MAX_EXITS_PER_INSTRUCTION`]): a host that never lets
//!   the guest make progress is a [`Stop::Livelock`], not a hang.
//! - `Vcpu` implements the guest engine's [`Tdcall`], so the engine (`accept::acceptor`,
//!   `accept::convert`, `accept::tracker`, `accept::ve`) runs on it directly. A call that
//!   stops answers [`TD_KILLED`].
//!
//! What differs between VMMs and test harnesses is in [`VcpuHooks`] (every method has a
//! no-op default): a scheduling point before each attempt (which may also halt the vCPU or
//! make an interrupt pending), whether the vCPU stays inside the TD between instructions,
//! the cost of each TDCALL and of each handled exit (with the host work the exit did on this
//! thread, [`HostWork`]), how the host answers an exit, and what to note after each step.
//!
//! # Driving a guest engine
//!
//! A VMM developer builds the [`Host`], makes a `Vcpu` per vCPU index (on that vCPU's
//! thread; the host half is shared) and hands it to the guest engine:
//!
//! ```
//! use std::sync::Arc;
//!
//! use accept::abi::{GpaRange, Gpaw, PageLevel};
//! use accept::acceptor::{AcceptPolicy, Acceptor};
//! use hostvmm::kvm::YieldKicker;
//! use hostvmm::module::Access;
//! use hostvmm::vcpu::{Insn, Retired, Vcpu};
//! use hostvmm::vmm::{Host, HostConfig};
//!
//! let host = Host::new(HostConfig::new(64 << 20, 1), Arc::new(YieldKicker)).unwrap();
//! let mut vcpu = Vcpu::new(&host, 0);
//! let acceptor = Acceptor::new(Gpaw::Bits48, AcceptPolicy::default());
//! let range = GpaRange::new(0, 4 << 20).unwrap();
//! acceptor.accept_range(&mut vcpu, range).unwrap();
//!
//! // The first ACCEPT of each 2M range exited once (the host mapped it) and re-executed.
//! assert_eq!(host.stats().ept_violations, 2);
//! assert_eq!(
//!     host.module().leaf(range.start()).level,
//!     PageLevel::Size2M as u8
//! );
//! // A guest write to accepted memory retires at once.
//! let write = Insn::Access { gpa: 0x1000, access: Access::Write(7) };
//! assert_eq!(vcpu.run(write), Ok(Retired::Access(7)));
//! ```
//!
//! `docs/life-of-a-mapgpa.md` follows a MapGPA through this loop into the host half.

use std::fmt;

use accept::abi::{
    decode_page_info, page_info, vmcall, GhciStatus, Gpa, MapGpaOutcome, PageLevel, StatusCode,
    TdxStatus, VeInfo, VpInfo,
};
use accept::tdcall::Tdcall;

use crate::kvm::{self, MmuStats};
use crate::module::{Access, AccessOutcome, TdExit, TdcallOutcome, VcpuError, VmcallRegs};
use crate::vmm::{self, ExitAction, Host, VmmStats};

/// Bound on TD exits for one guest instruction (an ACCEPT or an access) before [`Vcpu::run`]
/// calls it a livelock. An honest host needs at most 3 (map, split, retry after a race).
pub const MAX_EXITS_PER_INSTRUCTION: u32 = 64;

/// What the [`Tdcall`] implementation answers when the instruction stopped (KVM would return
/// to userspace and the VMM would kill the TD; the guest never runs again).
pub const TD_KILLED: TdxStatus = StatusCode::NonRecoverableTd.status();

/// A guest instruction the host half sees.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Insn {
    /// TDG.MEM.PAGE.ACCEPT with this raw page-info operand (RCX).
    Accept {
        /// RCX: level in bits 2:0, GPA in 51:12 ([`page_info`]).
        page_info: u64,
    },
    /// `TDG.VP.VMCALL<MapGPA>`(`start`, `len`), R12 and R13 exposed.
    MapGpa {
        /// R12: the first GPA, shared bit set to convert to shared.
        start: u64,
        /// R13: the length in bytes.
        len: u64,
    },
    /// TDG.VP.VEINFO.GET.
    VeInfoGet,
    /// TDG.VP.INFO.
    VpInfo,
    /// A read or write of the 4K page holding `gpa`.
    Access {
        /// The GPA accessed (shared bit set for shared memory).
        gpa: u64,
        /// Read, or the token written.
        access: Access,
    },
}

impl Insn {
    /// TDG.MEM.PAGE.ACCEPT of `gpa` at `level`.
    pub const fn accept(gpa: Gpa, level: PageLevel) -> Insn {
        Insn::Accept {
            page_info: page_info(gpa, level),
        }
    }

    /// Whether the instruction is a TDCALL (everything but a memory access).
    pub const fn is_tdcall(&self) -> bool {
        !matches!(self, Insn::Access { .. })
    }

    /// For an ACCEPT with a valid operand, its page.
    pub const fn accept_page(&self) -> Option<(Gpa, PageLevel)> {
        match self {
            Insn::Accept { page_info } => match decode_page_info(*page_info, PageLevel::Size1G) {
                Ok(page) => Some(page),
                Err(_) => None,
            },
            _ => None,
        }
    }
}

/// The result of an instruction that retired.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retired {
    /// ACCEPT completed with this RAX (also OPERAND_BUSY after a host-priority timeout exit,
    /// which completes the TDCALL).
    Accept(TdxStatus),
    /// MapGPA: the host's answer (R10, R11), or the VMCALL's own failure in `tdcall`.
    MapGpa(MapGpaOutcome),
    /// VEINFO.GET's outputs or status.
    VeInfo(Result<VeInfo, TdxStatus>),
    /// VP.INFO's outputs or status.
    VpInfo(Result<VpInfo, TdxStatus>),
    /// A private access completed: the token read or written.
    Access(u64),
    /// An access to a shared GPA: host memory, not in the S-EPT.
    Shared {
        /// The GPA as accessed.
        gpa: u64,
    },
}

/// Why an instruction ended without retiring: an exception delivered to the guest (which
/// handles it and may execute the instruction again), or a reason the TD cannot go on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// #VE injected for a PENDING page; VE info is valid with these contents. The guest's
    /// handler runs, then the access re-executes ([`Vcpu::resume`]).
    Ve(VeInfo),
    /// #VE while VE info was still valid: the module delivered #DF.
    DoubleFault,
    /// The GPA is beyond the TD's GPA width (the guest's own page tables would fault).
    InvalidGpa,
    /// The host answered an exit with something other than [`ExitAction::Resume`].
    Host {
        /// The exit.
        exit: TdExit,
        /// The host's answer.
        action: ExitAction,
    },
    /// TD entry failed.
    Enter(VcpuError),
    /// The module refused the instruction.
    Module(VcpuError),
    /// Leaving the TD failed.
    Leave(VcpuError),
    /// More exits than the bound for one instruction ([`Vcpu::with_max_exits`]); the last
    /// one was not handled.
    Livelock {
        /// Exits taken, the unhandled one included.
        exits: u32,
    },
    /// [`VcpuHooks::before_attempt`] halted the vCPU.
    Halted,
}

/// What one attempt of an instruction led to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// The instruction retired.
    Retired(Retired),
    /// The TD exited, the host handled the exit and resumes the vCPU: the guest executes the
    /// same instruction again.
    Reexecute(TdExit),
    /// A 2M/1G ACCEPT saved its progress for a pending interrupt: the guest takes the
    /// interrupt and executes the same ACCEPT again.
    Interrupted,
    /// The instruction stopped.
    Stopped(Stop),
}

/// What [`VcpuHooks::before_attempt`] decides.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attempt {
    /// Make the attempt.
    Run,
    /// Make an interrupt pending on the vCPU, then make the attempt (a 2M ACCEPT saves its
    /// progress at the next slice, a MapGPA sees a pending event). It stays pending until an
    /// ACCEPT or MapGPA completes or is interrupted.
    Interrupt,
    /// Make no attempt: the step is [`Stop::Halted`].
    Halt,
}

/// The host work one exit did on the vCPU's thread: the calling thread's counters
/// ([`kvm::thread_stats`], [`vmm::thread_stats`]) before and after [`Host::handle_exit`], exact
/// also while other vCPUs' exits run at the same time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct HostWork {
    /// MMU counters of this thread before the exit.
    pub mmu_before: MmuStats,
    /// MMU counters of this thread after the exit.
    pub mmu_after: MmuStats,
    /// Exit-handler counters of this thread before the exit.
    pub vmm_before: VmmStats,
    /// Exit-handler counters of this thread after the exit.
    pub vmm_after: VmmStats,
}

/// What a [`Vcpu`]'s user adds to the loop. Every method has a default that does nothing (or
/// what the plain loop does), so `()` is the plain loop.
///
/// Order within one [`Vcpu::step`]: [`before_attempt`](VcpuHooks::before_attempt), TD entry,
/// [`tdcall`](VcpuHooks::tdcall) (TDCALLs only), the module call, then for an exit
/// [`exit_taken`](VcpuHooks::exit_taken) (exits the guest re-executes after, before the
/// livelock bound is checked), [`before_exit`](VcpuHooks::before_exit),
/// [`answer_exit`](VcpuHooks::answer_exit) (else [`Host::handle_exit`]),
/// [`exit_handled`](VcpuHooks::exit_handled);
/// last [`after_step`](VcpuHooks::after_step) with the outcome.
pub trait VcpuHooks {
    /// Before each attempt of `insn` (`attempt` 0 is the first of this instruction): a
    /// scheduling point, a check that the TD still runs, a decision to make an interrupt
    /// pending.
    fn before_attempt(&mut self, insn: &Insn, attempt: u32) -> Attempt {
        let _ = (insn, attempt);
        Attempt::Run
    }

    /// Whether the vCPU stays inside the TD between instructions (leaving only when an exit
    /// takes it out), as a vCPU running guest code does on hardware. By default it leaves
    /// after every instruction: guest code between calls runs outside.
    fn stays_inside(&self) -> bool {
        false
    }

    /// The vCPU is inside the TD and is about to execute the TDCALL `insn`.
    fn tdcall(&mut self, insn: &Insn) {
        let _ = insn;
    }

    /// `insn` exited with `exit`, its `exits`-th exit; the guest re-executes after it.
    fn exit_taken(&mut self, exit: &TdExit, exits: u32) {
        let _ = (exit, exits);
    }

    /// The host is about to handle `exit` (any exit, the VMCALL of a MapGPA included).
    fn before_exit(&mut self, host: &Host, exit: &TdExit) {
        let _ = (host, exit);
    }

    /// An answer to `exit` in place of the host's: `None` (the default) lets
    /// [`Host::handle_exit`] handle it. A VMCALL answered here gets no answer registers (the
    /// guest reads back its own request).
    fn answer_exit(&mut self, host: &Host, exit: &TdExit) -> Option<ExitAction> {
        let _ = (host, exit);
        None
    }

    /// The host handled `exit` with `action`, doing `work` on this thread.
    fn exit_handled(&mut self, exit: &TdExit, action: &ExitAction, work: &HostWork) {
        let _ = (exit, action, work);
    }

    /// One attempt of `insn` ended with `step`.
    fn after_step(&mut self, insn: &Insn, step: &Step) {
        let _ = (insn, step);
    }
}

/// The plain loop.
impl VcpuHooks for () {}

/// One vCPU of a [`Host`]'s TD, with the user's hooks `H`.
pub struct Vcpu<'h, H = ()> {
    host: &'h Host,
    id: usize,
    hooks: H,
    max_exits: u32,
    /// Exits and attempts of the instruction in progress.
    exits: u32,
    attempts: u32,
    /// Exits of the access a #VE stopped, for [`Vcpu::resume`].
    suspended_exits: u32,
    irq_pending: bool,
}

impl<H: fmt::Debug> fmt::Debug for Vcpu<'_, H> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Vcpu")
            .field("id", &self.id)
            .field("hooks", &self.hooks)
            .field("exits", &self.exits)
            .field("irq_pending", &self.irq_pending)
            .finish_non_exhaustive()
    }
}

impl<'h> Vcpu<'h> {
    /// vCPU `id` of `host`, with no hooks.
    pub fn new(host: &'h Host, id: usize) -> Vcpu<'h> {
        Vcpu::with_hooks(host, id, ())
    }
}

impl<'h, H: VcpuHooks> Vcpu<'h, H> {
    /// vCPU `id` of `host` with `hooks`.
    pub fn with_hooks(host: &'h Host, id: usize, hooks: H) -> Vcpu<'h, H> {
        Vcpu {
            host,
            id,
            hooks,
            max_exits: MAX_EXITS_PER_INSTRUCTION,
            exits: 0,
            attempts: 0,
            suspended_exits: 0,
            irq_pending: false,
        }
    }

    /// The bound on exits of one instruction ([`MAX_EXITS_PER_INSTRUCTION`] by default).
    #[must_use]
    pub fn with_max_exits(mut self, max_exits: u32) -> Vcpu<'h, H> {
        self.max_exits = max_exits;
        self
    }

    /// The vCPU's index.
    pub fn id(&self) -> usize {
        self.id
    }

    /// The host.
    pub fn host(&self) -> &'h Host {
        self.host
    }

    /// The hooks.
    pub fn hooks(&self) -> &H {
        &self.hooks
    }

    /// The hooks, mutable.
    pub fn hooks_mut(&mut self) -> &mut H {
        &mut self.hooks
    }

    /// Exits the instruction in progress has taken so far.
    pub fn exits(&self) -> u32 {
        self.exits
    }

    /// Whether an interrupt made pending by [`Attempt::Interrupt`] is still pending.
    pub fn interrupt_pending(&self) -> bool {
        self.irq_pending
    }

    /// The vCPU's program is over: it leaves the TD if it is inside.
    pub fn halt(&mut self) {
        let module = self.host.module();
        if module.vcpu_in_td(self.id) {
            let _ = module.vcpu_exit(self.id);
        }
    }

    /// One attempt of `insn`: enter the TD unless the vCPU is inside, execute, leave unless
    /// the instruction exited (or the hooks keep the vCPU inside), and hand an exit to the
    /// host. The instruction in progress ends when the step retires or stops it.
    pub fn step(&mut self, insn: Insn) -> Step {
        let step = self.attempt(insn);
        if let Step::Retired(_) | Step::Stopped(_) = step {
            if let Step::Stopped(Stop::Ve(_)) = step {
                self.suspended_exits = self.exits;
            }
            self.exits = 0;
            self.attempts = 0;
        }
        self.hooks.after_step(&insn, &step);
        step
    }

    /// Steps `insn` until it retires or stops.
    ///
    /// # Errors
    /// The [`Stop`]: [`Stop::Livelock`] past the bound on exits.
    pub fn run(&mut self, insn: Insn) -> Result<Retired, Stop> {
        loop {
            match self.step(insn) {
                Step::Retired(r) => return Ok(r),
                Step::Reexecute(_) | Step::Interrupted => {}
                Step::Stopped(s) => return Err(s),
            }
        }
    }

    /// As [`Vcpu::run`] for an access the guest executes again after its #VE handler ran:
    /// the exits it took before the #VE count towards the bound.
    ///
    /// # Errors
    /// As [`Vcpu::run`].
    pub fn resume(&mut self, insn: Insn) -> Result<Retired, Stop> {
        self.exits = std::mem::take(&mut self.suspended_exits);
        self.run(insn)
    }

    fn attempt(&mut self, insn: Insn) -> Step {
        let attempt = self.attempts;
        self.attempts = self.attempts.saturating_add(1);
        match self.hooks.before_attempt(&insn, attempt) {
            Attempt::Run => {}
            Attempt::Interrupt => {
                self.irq_pending = true;
                self.host.module().set_pending_interrupt(self.id, true);
            }
            Attempt::Halt => return Step::Stopped(Stop::Halted),
        }
        if let Err(e) = self.enter() {
            return Step::Stopped(Stop::Enter(e));
        }
        if insn.is_tdcall() {
            self.hooks.tdcall(&insn);
        }
        let module = self.host.module();
        let id = self.id;
        match insn {
            Insn::Accept { page_info } => match module.tdg_mem_page_accept(id, page_info) {
                Ok(TdcallOutcome::Completed(s)) => {
                    self.leave_then(Step::Retired(Retired::Accept(s)), true)
                }
                Ok(TdcallOutcome::Interrupted) => self.leave_then(Step::Interrupted, true),
                Ok(TdcallOutcome::Exit(exit)) => self.reexecute(&insn, exit),
                Err(e) => Step::Stopped(Stop::Module(e)),
            },
            Insn::MapGpa { start, len } => {
                let mut regs = VmcallRegs {
                    mask: vmcall::EXPOSE_REGS_MASK,
                    ..VmcallRegs::default()
                };
                regs.gpr[VmcallRegs::R11] = vmcall::MAP_GPA;
                regs.gpr[VmcallRegs::R12] = start;
                regs.gpr[VmcallRegs::R13] = len;
                match module.tdg_vp_vmcall(id, regs) {
                    Ok(TdcallOutcome::Exit(exit @ TdExit::Vmcall(_))) => {
                        let mut answer = regs;
                        let action = self.handle(exit, &mut answer);
                        self.take_interrupt();
                        match action {
                            ExitAction::Resume => Step::Retired(Retired::MapGpa(MapGpaOutcome {
                                tdcall: TdxStatus::SUCCESS,
                                status: GhciStatus::from_raw(answer.gpr[VmcallRegs::R10]),
                                resume_gpa: answer.gpr[VmcallRegs::R11],
                            })),
                            action => Step::Stopped(Stop::Host { exit, action }),
                        }
                    }
                    Ok(TdcallOutcome::Completed(tdcall)) => {
                        let failed = MapGpaOutcome {
                            tdcall,
                            status: GhciStatus::InvalidOperand,
                            resume_gpa: 0,
                        };
                        self.leave_then(Step::Retired(Retired::MapGpa(failed)), true)
                    }
                    Ok(TdcallOutcome::Interrupted) => self.leave_then(Step::Interrupted, true),
                    Ok(TdcallOutcome::Exit(exit)) => self.reexecute(&insn, exit),
                    Err(e) => Step::Stopped(Stop::Module(e)),
                }
            }
            Insn::VeInfoGet => match module.tdg_vp_veinfo_get(id) {
                Ok(r) => self.leave_then(Step::Retired(Retired::VeInfo(r)), false),
                Err(e) => Step::Stopped(Stop::Module(e)),
            },
            Insn::VpInfo => match module.tdg_vp_info(id) {
                Ok(r) => self.leave_then(Step::Retired(Retired::VpInfo(r)), false),
                Err(e) => Step::Stopped(Stop::Module(e)),
            },
            Insn::Access { gpa, access } => {
                let step = match module.guest_access(id, gpa, access) {
                    Ok(AccessOutcome::Exit(exit)) => return self.reexecute(&insn, exit),
                    Err(e) => return Step::Stopped(Stop::Module(e)),
                    Ok(AccessOutcome::Ok(token)) => Step::Retired(Retired::Access(token)),
                    Ok(AccessOutcome::Shared { gpa }) => Step::Retired(Retired::Shared { gpa }),
                    Ok(AccessOutcome::Ve(info)) => Step::Stopped(Stop::Ve(info)),
                    Ok(AccessOutcome::DoubleFault) => Step::Stopped(Stop::DoubleFault),
                    Ok(AccessOutcome::InvalidGpa) => Step::Stopped(Stop::InvalidGpa),
                };
                self.leave_then(step, false)
            }
        }
    }

    fn enter(&mut self) -> Result<(), VcpuError> {
        let module = self.host.module();
        if self.hooks.stays_inside() && module.vcpu_in_td(self.id) {
            return Ok(());
        }
        module.vcpu_enter(self.id)
    }

    /// Leaves the TD after an instruction that did not exit (unless the hooks keep the vCPU
    /// inside); an ACCEPT or MapGPA that ended also takes the pending interrupt.
    fn leave_then(&mut self, step: Step, takes_interrupt: bool) -> Step {
        let left = if self.hooks.stays_inside() {
            Ok(())
        } else {
            self.host.module().vcpu_exit(self.id)
        };
        if takes_interrupt {
            self.take_interrupt();
        }
        match left {
            Ok(()) => step,
            Err(e) => Step::Stopped(Stop::Leave(e)),
        }
    }

    fn take_interrupt(&mut self) {
        if self.irq_pending {
            self.irq_pending = false;
            self.host.module().set_pending_interrupt(self.id, false);
        }
    }

    /// An exit the guest re-executes after (or, for a host-priority timeout, that completed
    /// the ACCEPT): counted against the bound, then handled.
    fn reexecute(&mut self, insn: &Insn, exit: TdExit) -> Step {
        self.exits = self.exits.saturating_add(1);
        self.hooks.exit_taken(&exit, self.exits);
        if self.exits > self.max_exits {
            return Step::Stopped(Stop::Livelock { exits: self.exits });
        }
        let action = self.handle(exit, &mut VmcallRegs::default());
        match (action, exit.completed_status()) {
            (ExitAction::Resume, Some(s)) if matches!(insn, Insn::Accept { .. }) => {
                Step::Retired(Retired::Accept(s))
            }
            (ExitAction::Resume, _) => Step::Reexecute(exit),
            (action, _) => Step::Stopped(Stop::Host { exit, action }),
        }
    }

    /// Hands `exit` to the host on this thread, measuring the host work it did.
    fn handle(&mut self, exit: TdExit, regs: &mut VmcallRegs) -> ExitAction {
        self.hooks.before_exit(self.host, &exit);
        let mmu_before = kvm::thread_stats();
        let vmm_before = vmm::thread_stats();
        let pending_event = self.irq_pending;
        let action = match self.hooks.answer_exit(self.host, &exit) {
            Some(action) => action,
            None => self.host.handle_exit(exit, regs, &|| pending_event),
        };
        let work = HostWork {
            mmu_before,
            mmu_after: kvm::thread_stats(),
            vmm_before,
            vmm_after: vmm::thread_stats(),
        };
        self.hooks.exit_handled(&exit, &action, &work);
        action
    }
}

/// The guest engine's calls on this vCPU: each runs its instruction to the end
/// ([`Vcpu::run`]); one that stops answers [`TD_KILLED`].
impl<H: VcpuHooks> Tdcall for Vcpu<'_, H> {
    fn accept(&mut self, gpa: Gpa, level: PageLevel) -> TdxStatus {
        match self.run(Insn::accept(gpa, level)) {
            Ok(Retired::Accept(status)) => status,
            _ => TD_KILLED,
        }
    }

    fn map_gpa(&mut self, start: u64, len: u64) -> MapGpaOutcome {
        match self.run(Insn::MapGpa { start, len }) {
            Ok(Retired::MapGpa(outcome)) => outcome,
            _ => MapGpaOutcome {
                tdcall: TD_KILLED,
                status: GhciStatus::InvalidOperand,
                resume_gpa: 0,
            },
        }
    }

    fn ve_info(&mut self) -> Result<VeInfo, TdxStatus> {
        match self.run(Insn::VeInfoGet) {
            Ok(Retired::VeInfo(r)) => r,
            _ => Err(TD_KILLED),
        }
    }

    fn vp_info(&mut self) -> Result<VpInfo, TdxStatus> {
        match self.run(Insn::VpInfo) {
            Ok(Retired::VpInfo(r)) => r,
            _ => Err(TD_KILLED),
        }
    }

    fn cpu(&self) -> usize {
        self.id()
    }
}

#[cfg(test)]
mod tests;
