//! A simulated vCPU: the guest engine's [`Tdcall`] on top of the module emulator and the host.
//!
//! A TDCALL that needs the host (an ACCEPT that exits with an EPT violation, a MapGPA VMCALL) is
//! handled by the host half on this vCPU's thread and the TDCALL re-executes, exactly as after
//! a VM exit: the guest engine only sees what a real guest would see. Guest memory touches go
//! through the emulator: FREE -> exit -> the host maps; PENDING -> #VE delivered to the guest's
//! handler (the real `accept::ve` handler) on this vCPU, then the access retries.
//!
//! In deterministic mode the vCPU is inside the TD only for the duration of one module call;
//! guest code between calls runs "outside" (which is how a kicked vCPU behaves, and what makes
//! TLB tracking immediate under the deterministic scheduler). In parallel mode it stays inside
//! from its first call until an exit takes it out (EPT violation, VMCALL, the end of its
//! program), as on hardware: a TRACK while it still runs in the previous epoch is refused, and
//! the host kicks it.

use accept::abi::{
    page_info, vmcall, GhciStatus, Gpa, MapGpaOutcome, PageLevel, StatusCode, TdxStatus, VeInfo,
    VpInfo,
};
use accept::tdcall::Tdcall;
use accept::tracker::CpuHooks;
use accept::ve::{handle_ve, VeCpuState, VeVerdict};

use super::sched::{Rng, Scheduler, Switch};
use super::{SimTd, ViolationKind};
use hostvmm::kvm::MmuStats;
use hostvmm::module::{Access, AccessOutcome, TdExit, TdcallOutcome, VmcallRegs};
use hostvmm::vmm::{ExitAction, VmmStats};

/// Bound on TD exits for one guest instruction (an ACCEPT or an access) before the simulator
/// calls it a livelock. An honest host needs at most 3 (map, split, retry after a race).
pub const MAX_EXITS_PER_INSTRUCTION: u32 = 64;

/// Status the simulator returns to the guest engine when the host stopped the TD (KVM would
/// return to userspace and the VMM would kill the TD; the guest never runs again).
pub const TD_KILLED: TdxStatus = StatusCode::NonRecoverableTd.status();

/// Counters of one vCPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct VcpuStats {
    /// TD exits taken (EPT violations and VMCALLs).
    pub exits: u64,
    /// #VEs taken.
    pub ves: u64,
    /// Interrupts taken inside an interruptible ACCEPT.
    pub interrupts: u64,
    /// Most exits any single instruction needed.
    pub max_exits_per_instruction: u32,
    /// Modelled time on this vCPU, in nanoseconds.
    pub modelled_ns: u64,
}

/// The guest's CPU hooks on a simulated vCPU: masking is a no-op (the simulator delivers no
/// asynchronous interrupt to guest code), waiting hands over to another vCPU (deterministic
/// mode) or yields the OS thread (parallel mode).
#[derive(Debug)]
pub struct SimHooks<'a> {
    sched: &'a Scheduler,
    id: usize,
    switch: Switch<'a>,
}

impl CpuHooks for SimHooks<'_> {
    type IrqGuard = ();
    fn mask_interrupts(&mut self) {}
    fn relax(&mut self) {
        self.switch.point(self.sched, self.id, true);
    }
}

/// One simulated vCPU.
#[derive(Debug)]
pub struct SimVcpu<'a> {
    id: usize,
    td: &'a SimTd<'a>,
    rng: Rng,
    switch: Switch<'a>,
    ve_state: VeCpuState,
    irq_pending: bool,
    stats: VcpuStats,
    fatal: Option<String>,
}

impl<'a> SimVcpu<'a> {
    pub(crate) fn new(td: &'a SimTd<'a>, id: usize, seed: u64, switch: Switch<'a>) -> SimVcpu<'a> {
        SimVcpu {
            id,
            td,
            rng: Rng::new(seed ^ (id as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)),
            switch,
            ve_state: VeCpuState::new(),
            irq_pending: false,
            stats: VcpuStats::default(),
            fatal: None,
        }
    }

    /// This vCPU's index.
    pub fn id(&self) -> usize {
        self.id
    }

    /// Counters so far.
    pub fn stats(&self) -> VcpuStats {
        self.stats
    }

    /// Why the TD stopped on this vCPU, if it did.
    pub fn fatal(&self) -> Option<&str> {
        self.fatal.as_deref()
    }

    /// The vCPU's random generator (scenarios draw their choices from it).
    pub fn rng(&mut self) -> &mut Rng {
        &mut self.rng
    }

    /// Hooks for the lazy-accept tracker on this vCPU.
    pub fn hooks(&self) -> SimHooks<'a> {
        SimHooks {
            sched: &self.td.sched,
            id: self.id,
            switch: self.switch,
        }
    }

    /// The vCPU's program is over: it leaves the TD if it is inside.
    pub fn halt(&mut self) {
        let module = self.td.host.module();
        if module.vcpu_in_td(self.id) {
            let _ = module.vcpu_exit(self.id);
        }
    }

    /// A scheduling point.
    pub fn sched_point(&mut self) {
        self.switch.point(&self.td.sched, self.id, false);
    }

    /// A step of a wait loop: lets the other vCPUs run.
    pub fn wait_point(&mut self) {
        self.switch.point(&self.td.sched, self.id, true);
    }

    fn die(&mut self, why: String) {
        if self.fatal.is_none() {
            self.fatal = Some(why);
        }
    }

    fn charge(&mut self, ns: u64) {
        self.stats.modelled_ns = self.stats.modelled_ns.saturating_add(ns);
        self.td.sched.set_clock(self.id, self.stats.modelled_ns);
    }

    fn maybe_interrupt(&mut self) {
        let per_mille = u64::from(self.td.config.irq_per_mille);
        if per_mille > 0 && self.rng.chance(per_mille, 1000) {
            self.irq_pending = true;
            self.td.host.module().set_pending_interrupt(self.id, true);
        }
    }

    fn take_interrupt(&mut self) {
        if self.irq_pending {
            self.irq_pending = false;
            self.td.host.module().set_pending_interrupt(self.id, false);
        }
    }

    fn stays_inside(&self) -> bool {
        self.td.config.mode == super::Mode::Parallel
    }

    /// Waits outside the TD while the host holds the vCPUs out (a SEAMCALL that kept getting
    /// BUSY, as KVM's `wait_for_sept_zap`). Never the case in deterministic mode, where host
    /// code runs between guest calls.
    fn gate(&mut self) {
        if !self.td.host.mmu().vcpus_held_out() {
            return;
        }
        self.halt();
        while self.td.host.mmu().vcpus_held_out() {
            self.wait_point();
        }
    }

    fn enter(&mut self) -> bool {
        self.gate();
        let module = self.td.host.module();
        if self.stays_inside() && module.vcpu_in_td(self.id) {
            return true;
        }
        match module.vcpu_enter(self.id) {
            Ok(()) => true,
            Err(e) => {
                self.die(format!("vCPU enter: {e}"));
                false
            }
        }
    }

    fn leave(&mut self) {
        if self.stays_inside() {
            return;
        }
        if let Err(e) = self.td.host.module().vcpu_exit(self.id) {
            self.die(format!("vCPU exit: {e}"));
        }
    }

    /// Lets the host handle an exit on this vCPU's thread, charging its modelled cost.
    fn host_exit(&mut self, exit: TdExit, regs: &mut VmcallRegs) -> ExitAction {
        self.stats.exits += 1;
        let host = &self.td.host;
        // This thread's own counts: in parallel mode other vCPUs' exits run meanwhile.
        let mmu0 = hostvmm::kvm::thread_stats();
        let vmm0 = hostvmm::vmm::thread_stats();
        let irq = self.irq_pending;
        let host_irq = u64::from(self.td.config.host_irq_per_mille);
        if host_irq > 0 && self.rng.chance(host_irq, 1000) {
            host.module().set_host_interrupt_pending(true);
        }
        let action = host.handle_exit(exit, regs, &|| irq);
        let cost = self.td.host_cost(
            &mmu0,
            &hostvmm::kvm::thread_stats(),
            &vmm0,
            &hostvmm::vmm::thread_stats(),
        );
        self.charge(cost);
        action
    }

    fn exit_fatal(&mut self, action: ExitAction) {
        match action {
            ExitAction::Resume => {}
            ExitAction::Fatal(e) => self.die(format!("host could not handle an exit: {e}")),
            ExitAction::KillTd => {
                self.die("PENDING_EPT_VIOLATION exit: the host kills the TD".to_string())
            }
        }
    }

    /// A guest read or write of the 4K page holding `gpa` (private, or shared with the shared
    /// bit set), with #VE handling and exits. Returns the token read (or written).
    ///
    /// # Errors
    /// Why the access could not complete (the TD is dead or the #VE handler refused).
    pub fn touch(&mut self, gpa: u64, access: Access) -> Result<u64, String> {
        let mut exits = 0u32;
        loop {
            if let Some(f) = &self.fatal {
                return Err(f.clone());
            }
            self.sched_point();
            if !self.enter() {
                continue;
            }
            let out = match self.td.host.module().guest_access(self.id, gpa, access) {
                Ok(out) => out,
                Err(e) => {
                    self.die(format!("guest access: {e}"));
                    continue;
                }
            };
            match out {
                AccessOutcome::Ok(token) => {
                    self.leave();
                    if let Access::Write(t) = access {
                        self.td.note_write(gpa, t);
                    }
                    return Ok(token);
                }
                AccessOutcome::Ve(_) => {
                    self.leave();
                    self.stats.ves += 1;
                    self.charge(self.td.cost.ve);
                    let tracker = self.td.guest().tracker;
                    let mut state = self.ve_state;
                    let mut hooks = self.hooks();
                    let verdict = handle_ve(self.id, &mut state, self, &mut hooks, tracker);
                    self.ve_state = state;
                    match verdict {
                        VeVerdict::Handled { .. } | VeVerdict::AcceptedMeanwhile { .. } => {}
                        other => self.die(format!("#VE handler: {other:?}")),
                    }
                }
                AccessOutcome::DoubleFault => {
                    self.die("#DF: #VE while VE info was valid".into());
                }
                AccessOutcome::Exit(exit) => {
                    exits += 1;
                    self.note_exits(exits);
                    if exits > MAX_EXITS_PER_INSTRUCTION {
                        self.td.violation(
                            ViolationKind::Livelock,
                            format!("access to {gpa:#x}: {exits} exits"),
                        );
                        self.die("livelock".into());
                        continue;
                    }
                    let mut regs = VmcallRegs::default();
                    let action = self.host_exit(exit, &mut regs);
                    self.exit_fatal(action);
                }
                AccessOutcome::Shared { gpa } => {
                    self.leave();
                    return Ok(self.td.shared_access(gpa, access));
                }
                AccessOutcome::InvalidGpa => {
                    self.leave();
                    return Err(format!("GPA {gpa:#x} is beyond the GPA width"));
                }
            }
        }
    }

    fn note_exits(&mut self, exits: u32) {
        self.stats.max_exits_per_instruction = self.stats.max_exits_per_instruction.max(exits);
    }
}

impl Tdcall for SimVcpu<'_> {
    fn accept(&mut self, gpa: Gpa, level: PageLevel) -> TdxStatus {
        self.sched_point();
        let mut exits = 0u32;
        loop {
            if self.fatal.is_some() {
                return TD_KILLED;
            }
            self.maybe_interrupt();
            if !self.enter() {
                return TD_KILLED;
            }
            self.charge(self.td.cost.tdcall);
            let out = self
                .td
                .host
                .module()
                .tdg_mem_page_accept(self.id, page_info(gpa, level));
            let out = match out {
                Ok(o) => o,
                Err(e) => {
                    self.die(format!("ACCEPT: {e}"));
                    return TD_KILLED;
                }
            };
            match out {
                TdcallOutcome::Completed(status) => {
                    self.leave();
                    self.take_interrupt();
                    if status.is_success() {
                        self.charge(self.td.cost.zero_4k * level.pages_4k());
                        self.td.note_accept(gpa, level);
                    }
                    return status;
                }
                TdcallOutcome::Interrupted => {
                    // The guest takes the interrupt and re-executes the same TDCALL.
                    self.leave();
                    self.stats.interrupts += 1;
                    self.take_interrupt();
                }
                TdcallOutcome::Exit(exit) => {
                    exits += 1;
                    self.note_exits(exits);
                    if exits > MAX_EXITS_PER_INSTRUCTION {
                        self.td.violation(
                            ViolationKind::Livelock,
                            format!("ACCEPT {level} at {gpa}: {exits} exits"),
                        );
                        self.die("livelock".into());
                        return TD_KILLED;
                    }
                    let mut regs = VmcallRegs::default();
                    let action = self.host_exit(exit, &mut regs);
                    self.exit_fatal(action);
                    if let Some(status) = exit.completed_status() {
                        return status;
                    }
                }
            }
        }
    }

    fn map_gpa(&mut self, start: u64, len: u64) -> MapGpaOutcome {
        self.sched_point();
        let killed = MapGpaOutcome {
            tdcall: TD_KILLED,
            status: GhciStatus::InvalidOperand,
            resume_gpa: 0,
        };
        if self.fatal.is_some() || !self.enter() {
            return killed;
        }
        self.maybe_interrupt();
        let mut regs = VmcallRegs {
            mask: vmcall::EXPOSE_REGS_MASK,
            ..VmcallRegs::default()
        };
        regs.gpr[VmcallRegs::R11] = vmcall::MAP_GPA;
        regs.gpr[VmcallRegs::R12] = start;
        regs.gpr[VmcallRegs::R13] = len;
        self.charge(self.td.cost.tdcall);
        let out = match self.td.host.module().tdg_vp_vmcall(self.id, regs) {
            Ok(o) => o,
            Err(e) => {
                self.die(format!("VMCALL: {e}"));
                return killed;
            }
        };
        let result = match out {
            TdcallOutcome::Exit(exit @ TdExit::Vmcall(_)) => {
                let mut answer = regs;
                let action = self.host_exit(exit, &mut answer);
                self.exit_fatal(action);
                MapGpaOutcome {
                    tdcall: TdxStatus::SUCCESS,
                    status: GhciStatus::from_raw(answer.gpr[VmcallRegs::R10]),
                    resume_gpa: answer.gpr[VmcallRegs::R11],
                }
            }
            TdcallOutcome::Completed(status) => {
                self.leave();
                MapGpaOutcome {
                    tdcall: status,
                    status: GhciStatus::InvalidOperand,
                    resume_gpa: 0,
                }
            }
            other => {
                self.leave();
                self.die(format!("VMCALL: unexpected {other:?}"));
                killed
            }
        };
        self.take_interrupt();
        self.td.note_map_gpa(start, len, &result);
        result
    }

    fn ve_info(&mut self) -> Result<VeInfo, TdxStatus> {
        if self.fatal.is_some() || !self.enter() {
            return Err(TD_KILLED);
        }
        self.charge(self.td.cost.tdcall);
        let r = self.td.host.module().tdg_vp_veinfo_get(self.id);
        self.leave();
        r.unwrap_or(Err(TD_KILLED))
    }

    fn vp_info(&mut self) -> Result<VpInfo, TdxStatus> {
        if self.fatal.is_some() || !self.enter() {
            return Err(TD_KILLED);
        }
        self.charge(self.td.cost.tdcall);
        let r = self.td.host.module().tdg_vp_info(self.id);
        self.leave();
        r.unwrap_or(Err(TD_KILLED))
    }
}

/// The modelled host cost between two counter snapshots.
pub(crate) fn host_cost(
    cost: &super::cost::CostTable,
    m0: &MmuStats,
    m1: &MmuStats,
    v0: &VmmStats,
    v1: &VmmStats,
) -> u64 {
    let d = |a: u64, b: u64| b.saturating_sub(a);
    let exits = d(v0.ept_violations, v1.ept_violations);
    let demotes = d(m0.fault_splits, m1.fault_splits) + d(m0.zap_demotes, m1.zap_demotes);
    let promotes = d(m0.promotes, m1.promotes);
    let removes: u64 = (0..3).map(|i| d(m0.removes[i], m1.removes[i])).sum();
    let small = d(m0.sept_adds, m1.sept_adds) + d(m0.tracks, m1.tracks) + removes;
    let chunks = d(v0.map_gpa_chunks, v1.map_gpa_chunks);
    // One EPT exit includes its AUG, whatever the level (AUG does not zero the page).
    exits * cost.ept_exit
        + demotes * (cost.demote + 2 * cost.seamcall)
        + promotes * (cost.promote + 2 * cost.seamcall)
        + small * cost.seamcall
        + chunks * cost.map_gpa_chunk
}
