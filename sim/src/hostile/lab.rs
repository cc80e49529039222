//! The lab: one small TD with the guest engine's objects and the private tokens it owns, the
//! scripted vCPU through which a behaviour answers the engine's calls, and the host-side
//! SEAMCALL sequences behaviours run between the guest's calls.

use std::collections::BTreeMap;
use std::fmt;

use accept::abi::{GhciStatus, Gpa, GpaRange, MapGpaOutcome, PageLevel, TdxStatus, VeInfo, VpInfo};
use accept::acceptor::Acceptor;
use accept::convert::{
    ConvertFailure, ConvertHooks, Converter, HookError, RangeState, Rollback, Visibility,
};
use accept::tdcall::Tdcall;
use accept::tracker::{LazyTracker, NoInterrupts};
use accept::ve::{handle_ve, VeCpuState, VeVerdict};

use super::verdict::{stop_of_cause, stop_of_tracker, stop_of_ve, Stop, Verdict};
use super::{unit_gpa, BYSTANDERS, K4, LAB_EAGER_END, LAB_LAZY_ACCEPTED, MAX_ACCESS_ROUNDS};
use hostvmm::gmem::Shareability;
use hostvmm::module::{Access, ExtExitQual, SeptState, TdExit};
use hostvmm::vcpu::{
    Attempt, Insn, Retired, Step, Stop as HostStop, Vcpu as HostVcpu, VcpuHooks, TD_KILLED,
};
use hostvmm::vmm::{ExitAction, Host};

/// How the host answers an EPT-violation exit instead of its fault path.
pub type ExitHook<'g> = Box<dyn FnMut(&Host, TdExit) -> ExitAction + 'g>;
/// The host's answer to MapGPA(`start`, `len`) instead of the honest one (which it may call).
pub type MapHook<'g> = Box<dyn FnMut(&mut Honest<'g>, u64, u64) -> MapGpaOutcome + 'g>;
/// The answer to ACCEPT instead of the honest one (which it may call).
pub type AcceptHook<'g> = Box<dyn FnMut(&mut Honest<'g>, Gpa, PageLevel) -> TdxStatus + 'g>;
/// The answer to VEINFO.GET instead of the module's (which it may call).
pub type VeHook<'g> = Box<dyn FnMut(&mut Honest<'g>) -> Result<VeInfo, TdxStatus> + 'g>;

/// The honest path: vCPU 0 of the lab's TD on the host library's vCPU loop, with exits handled
/// by the host (or by an [`ExitHook`]) and re-executed as after a VM exit.
pub type Honest<'g> = HostVcpu<'g, LabExits<'g>>;

/// The lab's part of the honest path: the [`ExitHook`], the exits counted and why the TD
/// stopped.
pub struct LabExits<'g> {
    pub(super) killed: Option<String>,
    pub(super) exits: u64,
    pub(super) exit_hook: Option<ExitHook<'g>>,
}

impl fmt::Debug for LabExits<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LabExits")
            .field("killed", &self.killed)
            .field("exits", &self.exits)
            .finish_non_exhaustive()
    }
}

impl LabExits<'_> {
    pub(super) fn kill(&mut self, why: String) {
        if self.killed.is_none() {
            self.killed = Some(why);
        }
    }
}

impl VcpuHooks for LabExits<'_> {
    fn before_attempt(&mut self, _insn: &Insn, _attempt: u32) -> Attempt {
        if self.killed.is_some() {
            Attempt::Halt
        } else {
            Attempt::Run
        }
    }

    fn exit_taken(&mut self, _exit: &TdExit, _exits: u32) {
        self.exits += 1;
    }

    /// EPT violations go to the [`ExitHook`] when there is one; a MapGPA VMCALL always to the
    /// host (its answer is what [`MapHook`]s rewrite).
    fn answer_exit(&mut self, host: &Host, exit: &TdExit) -> Option<ExitAction> {
        let hook = self.exit_hook.as_mut()?;
        (!matches!(exit, TdExit::Vmcall(_))).then(|| hook(host, *exit))
    }

    fn after_step(&mut self, insn: &Insn, step: &Step) {
        let &Step::Stopped(stop) = step else {
            return;
        };
        let why = match (insn, stop) {
            // The guest's own faults: `Lab::touch` decides.
            (_, HostStop::Ve(_) | HostStop::DoubleFault | HostStop::InvalidGpa) => return,
            (_, HostStop::Halted) => return,
            (_, HostStop::Enter(e)) => format!("vCPU enter: {e}"),
            (_, HostStop::Leave(e)) => format!("vCPU exit: {e}"),
            (_, HostStop::Livelock { exits }) => format!("{exits} exits for one instruction"),
            (Insn::MapGpa { .. }, HostStop::Host { action, .. }) => {
                format!("MapGPA exit: {action:?}")
            }
            (_, HostStop::Host { action, .. }) => match action {
                ExitAction::Fatal(e) => format!("the host could not handle an exit: {e}"),
                _ => "the host killed the TD".into(),
            },
            (Insn::Accept { .. }, HostStop::Module(e)) => format!("ACCEPT: {e}"),
            (Insn::Access { .. }, HostStop::Module(e)) => format!("access: {e}"),
            (_, HostStop::Module(e)) => format!("VMCALL: {e:?}"),
        };
        self.kill(why);
    }
}

/// The lab's vCPU as the guest engine sees it: the honest path, with optional hostile answers,
/// and a count of TDCALLs against a bound (past it every call answers [`TD_KILLED`]).
pub struct Vcpu<'g> {
    pub(super) honest: Honest<'g>,
    pub(super) calls: u64,
    pub(super) limit: u64,
    pub(super) exceeded: bool,
    pub(super) map_hook: Option<MapHook<'g>>,
    pub(super) accept_hook: Option<AcceptHook<'g>>,
    pub(super) ve_hook: Option<VeHook<'g>>,
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
    pub(super) fn new(host: &'g Host) -> Vcpu<'g> {
        Vcpu {
            honest: HostVcpu::with_hooks(
                host,
                0,
                LabExits {
                    killed: None,
                    exits: 0,
                    exit_hook: None,
                },
            ),
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
        self.honest.hooks_mut().exit_hook = Some(hook);
    }

    /// Back to the honest host (drops whatever the hooks hold, such as entry locks).
    pub fn honest_again(&mut self) {
        self.map_hook = None;
        self.accept_hook = None;
        self.ve_hook = None;
        self.honest.hooks_mut().exit_hook = None;
    }

    pub(super) fn count(&mut self) -> bool {
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
pub(super) struct PageTables;

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
    pub(super) host: &'g Host,
    pub(super) acceptor: &'g Acceptor,
    pub(super) converter: &'g Converter,
    pub(super) tracker: &'g LazyTracker<'g>,
    /// The guest's vCPU (with the behaviour's hooks).
    pub cpu: Vcpu<'g>,
    pub(super) ve_state: VeCpuState,
    /// Expected token of every private page the guest owns, by 4K GPA.
    pub(super) shadow: BTreeMap<u64, u64>,
    pub(super) bad_reads: u64,
    pub(super) next_token: u64,
    pub(super) notes: Vec<String>,
}

impl fmt::Debug for Lab<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Lab")
            .field("cpu", &self.cpu)
            .field("shadow", &self.shadow.len())
            .finish_non_exhaustive()
    }
}

pub(super) fn g(addr: u64) -> Gpa {
    Gpa::new_truncate(addr)
}

pub(super) fn range(start: u64, end: u64) -> GpaRange {
    GpaRange::new(start, end).expect("every lab range is a valid constant")
}

pub(super) fn retry(resume: u64) -> MapGpaOutcome {
    MapGpaOutcome {
        tdcall: TdxStatus::SUCCESS,
        status: GhciStatus::Retry,
        resume_gpa: resume,
    }
}

pub(super) fn answer(status: GhciStatus) -> MapGpaOutcome {
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

    pub(super) fn setup(&mut self) -> Result<(), String> {
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
    pub(super) fn touch(&mut self, gpa: u64, access: Access) -> Result<u64, Stop> {
        for _ in 0..MAX_ACCESS_ROUNDS {
            match self.cpu.honest.run(Insn::Access { gpa, access }) {
                Ok(Retired::Access(token)) => return Ok(token),
                Err(HostStop::Ve(_)) => {
                    let v = self.run_ve_handler();
                    self.note(format!("#VE at {gpa:#x}: {v:?}"));
                    if let Some(stop) = stop_of_ve(v) {
                        return Err(stop);
                    }
                }
                Err(HostStop::DoubleFault) => return Err(Stop::DoubleFault),
                Ok(_) | Err(HostStop::InvalidGpa) => return Err(Stop::Inconsistent),
                Err(_) => return Err(Stop::Killed),
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
    pub(super) fn lost(&mut self) -> u64 {
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
    pub(super) fn host_consistent(&mut self) -> bool {
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
    pub(super) fn convert(&mut self, (start, end): (u64, u64), to: Visibility) -> Verdict {
        let (converter, acceptor) = (self.converter, self.acceptor);
        let r = range(start, end);
        let result = crate::convert::convert_simulated(
            converter,
            &mut self.cpu,
            acceptor,
            r,
            to,
            &mut PageTables,
        );
        let verdict = self.verdict_of_convert(r, to, result);
        if verdict == Verdict::Completes {
            if let Err(e) = self.check_side(r, to) {
                self.note(e);
                return Verdict::Stops(Stop::Inconsistent);
            }
        }
        verdict
    }

    pub(super) fn verdict_of_convert(
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
    pub(super) fn check_side(&self, r: GpaRange, side: Visibility) -> Result<(), String> {
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
    pub(super) fn accept_lazy(&mut self, start: u64, end: u64) -> Verdict {
        let tracker = self.tracker;
        match tracker.accept_range(0, &mut self.cpu, &mut NoInterrupts, start, end) {
            Ok(()) => Verdict::Completes,
            Err(e) => {
                self.note(format!("{e}"));
                Verdict::Stops(stop_of_tracker(e))
            }
        }
    }

    /// The guest's #VE handler (the engine's `handle_ve`) on vCPU 0, as after a #VE.
    pub(super) fn run_ve_handler(&mut self) -> VeVerdict {
        let tracker = self.tracker;
        handle_ve(
            0,
            &mut self.ve_state,
            &mut self.cpu,
            &mut NoInterrupts,
            tracker,
        )
    }

    /// Delivers a #VE whose VE info the host chose, and returns the handler's verdict.
    pub(super) fn forged_ve(&mut self, info: VeInfo) -> VeVerdict {
        let mut once = Some(info);
        self.cpu.on_ve_info(Box::new(move |h| match once.take() {
            Some(info) => Ok(info),
            None => h.ve_info(),
        }));
        let v = self.run_ve_handler();
        self.cpu.ve_hook = None;
        self.note(format!("#VE handler: {v:?}"));
        v
    }

    // ---- host-side SEAMCALL sequences ----

    /// The host maps the 2M range of `gpa` PENDING through its fault path, as after a guest
    /// touch.
    pub(super) fn host_map_2m(&self, gpa: u64) -> Result<(), String> {
        self.host
            .fault(gpa, ExtExitQual::NONE)
            .map_err(|e| format!("fault at {gpa:#x}: {e}"))?;
        let leaf = self.host.module().leaf(g(gpa));
        if leaf.level != 1 || leaf.state != SeptState::Pending {
            return Err(format!("{gpa:#x} mapped as {leaf:?}"));
        }
        Ok(())
    }

    pub(super) fn seamcall(&self, what: &str, status: TdxStatus) -> Result<(), String> {
        if status.is_success() {
            Ok(())
        } else {
            Err(format!("{what}: {status}"))
        }
    }

    /// BLOCK, TRACK, DEMOTE of the 2M leaf at `base`.
    pub(super) fn host_demote(&self, base: u64) -> Result<(), String> {
        let m = self.host.module();
        let level = PageLevel::Size2M;
        self.seamcall("BLOCK", m.range_block(g(base), level).status)?;
        self.seamcall("TRACK", m.mem_track().status)?;
        let page = self.host.mmu().sept_pool().alloc().ok_or("no S-EPT page")?;
        self.seamcall("DEMOTE", m.page_demote(g(base), level, page).status)
    }

    /// BLOCK, TRACK, PROMOTE of the 2M range at `base`; on failure UNBLOCK and report the
    /// PROMOTE status.
    pub(super) fn host_promote(&self, base: u64) -> Result<(), TdxStatus> {
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
    pub(super) fn host_remove_readd(&self, base: u64, level: PageLevel) -> Result<(), String> {
        let m = self.host.module();
        let hpa = m.leaf(g(base)).page_hpa(base);
        self.seamcall("BLOCK", m.range_block(g(base), level).status)?;
        self.seamcall("TRACK", m.mem_track().status)?;
        self.seamcall("REMOVE", m.page_remove(g(base), level).status)?;
        self.seamcall("AUG", m.page_aug(g(base), level, hpa).status)
    }
}
