//! A simulated vCPU: the host library's [`Vcpu`] with the simulator's hooks ([`SimCpu`]), and
//! the guest's memory touches with its #VE handler.
//!
//! A TDCALL that needs the host (an ACCEPT that exits with an EPT violation, a MapGPA VMCALL) is
//! handled by the host half on this vCPU's thread and the TDCALL re-executes, exactly as after
//! a VM exit (the loop is `hostvmm::vcpu`): the guest engine only sees what a real guest would
//! see. Guest memory touches go through the emulator: FREE -> exit -> the host maps; PENDING ->
//! #VE delivered to the guest's handler (the real `accept::ve` handler) on this vCPU, then the
//! access retries.
//!
//! The hooks add the simulator's part: a scheduling point before each instruction, the modelled
//! cost of each TDCALL and of each exit (from this thread's host counters around the exit),
//! random interrupts and host interrupts, the bound on exits per instruction as an invariant,
//! and the belief notes the invariant checks compare the TD with.
//!
//! In deterministic mode the vCPU is inside the TD only for the duration of one module call;
//! guest code between calls runs "outside" (which is how a kicked vCPU behaves, and what makes
//! TLB tracking immediate under the deterministic scheduler). In parallel mode it stays inside
//! from its first call until an exit takes it out (EPT violation, VMCALL, the end of its
//! program), as on hardware: a TRACK while it still runs in the previous epoch is refused, and
//! the host kicks it.

use accept::abi::{Gpa, MapGpaOutcome, PageLevel, TdxStatus, VeInfo, VpInfo};
use accept::tdcall::Tdcall;
use accept::tracker::CpuHooks;
use accept::ve::{handle_ve, VeCpuState, VeVerdict};

use super::sched::{Rng, Scheduler, Switch};
use super::{SimTd, ViolationKind};
use hostvmm::kvm::MmuStats;
use hostvmm::module::{Access, TdExit};
use hostvmm::vcpu::{Attempt, HostWork, Insn, Retired, Step, Stop, Vcpu, VcpuHooks};
use hostvmm::vmm::{ExitAction, Host, VmmStats};

pub use hostvmm::vcpu::{MAX_EXITS_PER_INSTRUCTION, TD_KILLED};

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

/// The simulator's part of a vCPU ([`VcpuHooks`]): scheduling, modelled time, interrupts,
/// counters, belief notes and the reason the TD stopped.
#[derive(Debug)]
pub struct SimCpu<'a> {
    id: usize,
    td: &'a SimTd<'a>,
    rng: Rng,
    switch: Switch<'a>,
    stats: VcpuStats,
    fatal: Option<String>,
}

impl SimCpu<'_> {
    fn sched_point(&mut self) {
        self.switch.point(&self.td.sched, self.id, false);
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

    fn draw_interrupt(&mut self) -> Attempt {
        let per_mille = u64::from(self.td.config.irq_per_mille);
        if per_mille > 0 && self.rng.chance(per_mille, 1000) {
            Attempt::Interrupt
        } else {
            Attempt::Run
        }
    }

    /// Waits outside the TD while the host holds the vCPUs out (a SEAMCALL that kept getting
    /// BUSY, as KVM's `wait_for_sept_zap`). Never the case in deterministic mode, where host
    /// code runs between guest calls.
    fn gate(&mut self) {
        let host = &self.td.host;
        if !host.mmu().vcpus_held_out() {
            return;
        }
        if host.module().vcpu_in_td(self.id) {
            let _ = host.module().vcpu_exit(self.id);
        }
        while host.mmu().vcpus_held_out() {
            self.switch.point(&self.td.sched, self.id, true);
        }
    }

    /// Why the TD stops for `stop` of `insn`; the livelock is an invariant violation too.
    fn stopped(&mut self, insn: &Insn, stop: Stop) {
        let why = match stop {
            // The guest's own faults: `SimVcpu::touch` decides.
            Stop::Ve(_) | Stop::DoubleFault | Stop::InvalidGpa | Stop::Halted => return,
            Stop::Enter(e) => format!("vCPU enter: {e}"),
            Stop::Leave(e) => format!("vCPU exit: {e}"),
            Stop::Module(e) => {
                let call = match insn {
                    Insn::Accept { .. } => "ACCEPT",
                    Insn::MapGpa { .. } => "VMCALL",
                    Insn::VeInfoGet => "VEINFO.GET",
                    Insn::VpInfo => "VP.INFO",
                    Insn::Access { .. } => "guest access",
                };
                format!("{call}: {e}")
            }
            Stop::Host {
                action: ExitAction::KillTd,
                ..
            } => "PENDING_EPT_VIOLATION exit: the host kills the TD".to_string(),
            Stop::Host { action, .. } => match action {
                ExitAction::Fatal(e) => format!("host could not handle an exit: {e}"),
                other => format!("host answered an exit with {other:?}"),
            },
            Stop::Livelock { exits } => {
                let what = match (insn, insn.accept_page()) {
                    (_, Some((gpa, level))) => format!("ACCEPT {level} at {gpa}"),
                    (Insn::Access { gpa, .. }, _) => format!("access to {gpa:#x}"),
                    _ => format!("{insn:?}"),
                };
                self.td
                    .violation(ViolationKind::Livelock, format!("{what}: {exits} exits"));
                "livelock".to_string()
            }
        };
        self.die(why);
    }
}

impl VcpuHooks for SimCpu<'_> {
    /// A scheduling point before each instruction (each attempt of an access), the TD's
    /// liveness, a random interrupt before each ACCEPT or MapGPA attempt, and the gate.
    fn before_attempt(&mut self, insn: &Insn, attempt: u32) -> Attempt {
        let sched_first = !matches!(insn, Insn::VeInfoGet | Insn::VpInfo | Insn::Access { .. });
        if sched_first && attempt == 0 {
            self.sched_point();
        }
        if self.fatal.is_some() {
            return Attempt::Halt;
        }
        let decision = match insn {
            Insn::Access { .. } => {
                self.sched_point();
                Attempt::Run
            }
            Insn::Accept { .. } | Insn::MapGpa { .. } => self.draw_interrupt(),
            Insn::VeInfoGet | Insn::VpInfo => Attempt::Run,
        };
        self.gate();
        decision
    }

    fn stays_inside(&self) -> bool {
        self.td.config.mode == super::Mode::Parallel
    }

    fn tdcall(&mut self, _insn: &Insn) {
        self.charge(self.td.cost.tdcall);
    }

    fn exit_taken(&mut self, _exit: &TdExit, exits: u32) {
        self.stats.max_exits_per_instruction = self.stats.max_exits_per_instruction.max(exits);
    }

    fn before_exit(&mut self, host: &Host, _exit: &TdExit) {
        self.stats.exits += 1;
        let host_irq = u64::from(self.td.config.host_irq_per_mille);
        if host_irq > 0 && self.rng.chance(host_irq, 1000) {
            host.module().set_host_interrupt_pending(true);
        }
    }

    /// Charges the modelled cost of the host work this thread did for the exit (in parallel
    /// mode other vCPUs' exits run meanwhile).
    fn exit_handled(&mut self, _exit: &TdExit, _action: &ExitAction, work: &HostWork) {
        let cost = self.td.host_cost(
            &work.mmu_before,
            &work.mmu_after,
            &work.vmm_before,
            &work.vmm_after,
        );
        self.charge(cost);
    }

    fn after_step(&mut self, insn: &Insn, step: &Step) {
        match (insn, step) {
            (_, Step::Interrupted) => self.stats.interrupts += 1,
            (Insn::Accept { .. }, Step::Retired(Retired::Accept(status))) => {
                if let (true, Some((gpa, level))) = (status.is_success(), insn.accept_page()) {
                    self.charge(self.td.cost.zero_4k * level.pages_4k());
                    self.td.note_accept(gpa, level);
                }
            }
            (&Insn::MapGpa { start, len }, Step::Retired(Retired::MapGpa(outcome))) => {
                self.td.note_map_gpa(start, len, outcome);
            }
            (_, &Step::Stopped(stop)) => self.stopped(insn, stop),
            _ => {}
        }
    }
}

/// One simulated vCPU.
#[derive(Debug)]
pub struct SimVcpu<'a> {
    vcpu: Vcpu<'a, SimCpu<'a>>,
    ve_state: VeCpuState,
}

impl<'a> SimVcpu<'a> {
    pub(crate) fn new(td: &'a SimTd<'a>, id: usize, seed: u64, switch: Switch<'a>) -> SimVcpu<'a> {
        let cpu = SimCpu {
            id,
            td,
            rng: Rng::new(seed ^ (id as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)),
            switch,
            stats: VcpuStats::default(),
            fatal: None,
        };
        SimVcpu {
            vcpu: Vcpu::with_hooks(&td.host, id, cpu),
            ve_state: VeCpuState::new(),
        }
    }

    fn cpu(&mut self) -> &mut SimCpu<'a> {
        self.vcpu.hooks_mut()
    }

    /// This vCPU's index.
    pub fn id(&self) -> usize {
        self.vcpu.id()
    }

    /// Counters so far.
    pub fn stats(&self) -> VcpuStats {
        self.vcpu.hooks().stats
    }

    /// Why the TD stopped on this vCPU, if it did.
    pub fn fatal(&self) -> Option<&str> {
        self.vcpu.hooks().fatal.as_deref()
    }

    /// The vCPU's random generator (scenarios draw their choices from it).
    pub fn rng(&mut self) -> &mut Rng {
        &mut self.cpu().rng
    }

    /// Hooks for the lazy-accept tracker on this vCPU.
    pub fn hooks(&self) -> SimHooks<'a> {
        let cpu = self.vcpu.hooks();
        SimHooks {
            sched: &cpu.td.sched,
            id: cpu.id,
            switch: cpu.switch,
        }
    }

    /// The vCPU's program is over: it leaves the TD if it is inside.
    pub fn halt(&mut self) {
        self.vcpu.halt();
    }

    /// A scheduling point.
    pub fn sched_point(&mut self) {
        self.cpu().sched_point();
    }

    /// A step of a wait loop: lets the other vCPUs run.
    pub fn wait_point(&mut self) {
        let cpu = self.cpu();
        cpu.switch.point(&cpu.td.sched, cpu.id, true);
    }

    /// A guest read or write of the 4K page holding `gpa` (private, or shared with the shared
    /// bit set), with #VE handling and exits. Returns the token read (or written).
    ///
    /// # Errors
    /// Why the access could not complete (the TD is dead or the #VE handler refused).
    pub fn touch(&mut self, gpa: u64, access: Access) -> Result<u64, String> {
        let insn = Insn::Access { gpa, access };
        let mut result = self.vcpu.run(insn);
        loop {
            let td = self.vcpu.hooks().td;
            match result {
                Ok(Retired::Access(token)) => {
                    if let Access::Write(t) = access {
                        td.note_write(gpa, t);
                    }
                    return Ok(token);
                }
                Ok(Retired::Shared { gpa }) => return Ok(td.shared_access(gpa, access)),
                Ok(other) => self.cpu().die(format!("guest access: {other:?}")),
                Err(Stop::Ve(_)) => {
                    let cpu = self.cpu();
                    cpu.stats.ves += 1;
                    cpu.charge(td.cost.ve);
                    let mut hooks = self.hooks();
                    let id = self.id();
                    let tracker = td.guest().tracker;
                    let verdict =
                        handle_ve(id, &mut self.ve_state, &mut self.vcpu, &mut hooks, tracker);
                    match verdict {
                        VeVerdict::Handled { .. } | VeVerdict::AcceptedMeanwhile { .. } => {}
                        other => self.cpu().die(format!("#VE handler: {other:?}")),
                    }
                }
                Err(Stop::DoubleFault) => self.cpu().die("#DF: #VE while VE info was valid".into()),
                Err(Stop::InvalidGpa) => {
                    return Err(format!("GPA {gpa:#x} is beyond the GPA width"));
                }
                // The hooks noted why.
                Err(_) => {}
            }
            if let Some(f) = self.fatal() {
                return Err(f.to_string());
            }
            result = self.vcpu.resume(insn);
        }
    }
}

impl Tdcall for SimVcpu<'_> {
    fn accept(&mut self, gpa: Gpa, level: PageLevel) -> TdxStatus {
        let status = self.vcpu.accept(gpa, level);
        if status.is_success() {
            let cpu = self.vcpu.hooks();
            cpu.td.sched.phase_progress(cpu.id, level.size());
        }
        status
    }

    fn map_gpa(&mut self, start: u64, len: u64) -> MapGpaOutcome {
        self.vcpu.map_gpa(start, len)
    }

    fn ve_info(&mut self) -> Result<VeInfo, TdxStatus> {
        self.vcpu.ve_info()
    }

    fn vp_info(&mut self) -> Result<VpInfo, TdxStatus> {
        self.vcpu.vp_info()
    }

    fn cpu(&self) -> usize {
        self.vcpu.cpu()
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
