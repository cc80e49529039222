//! The vCPU loop: the outcome of one step for each instruction kind, the livelock bound, the
//! order of the hooks, and the guest engine's acceptance running on a `Vcpu`.

use accept::abi::{GpaRange, Gpaw};
use accept::acceptor::{AcceptPolicy, Acceptor};

use super::*;
use crate::gmem::Shareability;
use crate::module::{CallKind, SeptState};
use crate::testutil::{g, host, K4, M2, SHARED};

fn range(start: u64, end: u64) -> GpaRange {
    GpaRange::new(start, end).unwrap()
}

fn leaf(h: &Host, gpa: u64) -> (u8, SeptState) {
    let e = h.module().leaf(g(gpa));
    (e.level, e.state)
}

fn read(gpa: u64) -> Insn {
    Insn::Access {
        gpa,
        access: Access::Read,
    }
}

#[test]
fn accept_exits_once_then_retires() {
    let h = host();
    let mut v = Vcpu::new(&h, 0);
    let insn = Insn::accept(g(M2), PageLevel::Size4K);
    assert!(matches!(
        v.step(insn),
        Step::Reexecute(TdExit::EptViolation { gpa, .. }) if gpa == M2
    ));
    assert_eq!(v.exits(), 1);
    assert!(!h.module().vcpu_in_td(0), "the exit took the vCPU out");
    assert_eq!(
        v.step(insn),
        Step::Retired(Retired::Accept(TdxStatus::SUCCESS))
    );
    assert_eq!(v.exits(), 0, "a retired instruction ends its count");
    assert!(!h.module().vcpu_in_td(0), "the vCPU left after the call");
    assert_eq!(leaf(&h, M2), (0, SeptState::Mapped));
    // Again: already accepted, no exit.
    let again = v.step(insn);
    assert!(
        matches!(again, Step::Retired(Retired::Accept(s)) if s.is(StatusCode::PageAlreadyAccepted)),
        "{again:?}"
    );
    assert_eq!(h.stats().ept_violations, 1);
}

#[test]
fn map_gpa_retires_with_the_hosts_answer() {
    let h = host();
    let mut v = Vcpu::new(&h, 0);
    let step = v.step(Insn::MapGpa {
        start: SHARED | M2,
        len: M2,
    });
    assert_eq!(
        step,
        Step::Retired(Retired::MapGpa(MapGpaOutcome {
            tdcall: TdxStatus::SUCCESS,
            status: GhciStatus::Success,
            resume_gpa: 0,
        }))
    );
    assert!(h.gmem().is_uniform(range(M2, 2 * M2), Shareability::Shared));
    // A misaligned request: the host's answer, still a retired VMCALL.
    let step = v.step(Insn::MapGpa {
        start: 0x1001,
        len: K4,
    });
    assert!(matches!(
        step,
        Step::Retired(Retired::MapGpa(MapGpaOutcome {
            status: GhciStatus::AlignError,
            ..
        }))
    ));
    assert_eq!(h.stats().map_gpa_calls, 2);
    assert!(!h.module().vcpu_in_td(0));
}

#[test]
fn info_calls_retire_without_exits() {
    let h = host();
    let mut v = Vcpu::new(&h, 0);
    match v.step(Insn::VeInfoGet) {
        Step::Retired(Retired::VeInfo(Err(s))) => assert!(s.is(StatusCode::NoValidVeInfo)),
        other => panic!("{other:?}"),
    }
    match v.step(Insn::VpInfo) {
        Step::Retired(Retired::VpInfo(Ok(info))) => assert_eq!(info.vcpu_index, 0),
        other => panic!("{other:?}"),
    }
    assert!(!h.module().vcpu_in_td(0));
    assert_eq!(h.stats().ept_violations, 0);
}

#[test]
fn access_steps_through_exit_ve_and_double_fault() {
    let h = host();
    let mut v = Vcpu::new(&h, 0);
    let gpa = 3 * M2 + 5 * K4;
    // FREE: the host maps the 2M range PENDING and the access re-executes into a #VE.
    assert!(matches!(v.step(read(gpa)), Step::Reexecute(_)));
    let info = match v.step(read(gpa)) {
        Step::Stopped(Stop::Ve(info)) => info,
        other => panic!("{other:?}"),
    };
    assert_eq!(info.gpa, gpa & !0xFFF);
    assert_eq!(leaf(&h, gpa), (1, SeptState::Pending));
    // VE info still valid: a second #VE is a #DF.
    assert_eq!(v.step(read(gpa)), Step::Stopped(Stop::DoubleFault));
    assert!(!h.module().vcpu_in_td(0));
    // The guest reads VE info, accepts the 2M page, and the access completes.
    assert_eq!(v.run(Insn::VeInfoGet), Ok(Retired::VeInfo(Ok(info))));
    assert_eq!(
        v.run(Insn::accept(g(3 * M2), PageLevel::Size2M)),
        Ok(Retired::Accept(TdxStatus::SUCCESS))
    );
    let write = Insn::Access {
        gpa,
        access: Access::Write(0x77),
    };
    assert_eq!(v.step(write), Step::Retired(Retired::Access(0x77)));
    assert_eq!(v.step(read(gpa)), Step::Retired(Retired::Access(0x77)));
    // Shared memory is the host's; beyond the GPA width the guest's page tables fault.
    assert_eq!(
        v.step(read(SHARED | gpa)),
        Step::Retired(Retired::Shared { gpa: SHARED | gpa })
    );
    assert_eq!(v.step(read(1 << 50)), Step::Stopped(Stop::InvalidGpa));
    assert!(!h.module().vcpu_in_td(0));
}

/// Makes an interrupt pending before every attempt.
#[derive(Debug)]
struct Interrupting;

impl VcpuHooks for Interrupting {
    fn before_attempt(&mut self, _insn: &Insn, _attempt: u32) -> Attempt {
        Attempt::Interrupt
    }
}

#[test]
fn an_interrupt_stops_a_2m_accept_which_resumes() {
    let h = host();
    let mut v = Vcpu::with_hooks(&h, 0, Interrupting);
    let insn = Insn::accept(g(0), PageLevel::Size2M);
    assert!(matches!(v.step(insn), Step::Reexecute(_)));
    assert!(v.interrupt_pending(), "an exit keeps the interrupt pending");
    assert_eq!(v.step(insn), Step::Interrupted);
    assert!(!v.interrupt_pending(), "the guest took the interrupt");
    assert!(h.module().leaf(g(0)).accept_progress > 0);
    let mut interrupts = 1;
    let status = loop {
        match v.step(insn) {
            Step::Interrupted => interrupts += 1,
            Step::Retired(Retired::Accept(s)) => break s,
            other => panic!("{other:?}"),
        }
    };
    assert_eq!(status, TdxStatus::SUCCESS);
    assert!(interrupts > 1, "every slice saw a pending interrupt");
    assert_eq!(leaf(&h, 0), (1, SeptState::Mapped));
    // A pending interrupt is a pending event: MapGPA yields after its first 2M chunk.
    let step = v.step(Insn::MapGpa {
        start: SHARED | (10 * M2),
        len: 4 * M2,
    });
    let retry = MapGpaOutcome {
        tdcall: TdxStatus::SUCCESS,
        status: GhciStatus::Retry,
        resume_gpa: SHARED | (11 * M2),
    };
    assert_eq!(step, Step::Retired(Retired::MapGpa(retry)));
    assert!(!v.interrupt_pending(), "the guest took the interrupt");
}

/// A host that answers every exit with "resume" and changes nothing.
#[derive(Debug, Default)]
struct Storm {
    taken: u32,
    handled: u32,
}

impl VcpuHooks for Storm {
    fn exit_taken(&mut self, _exit: &TdExit, exits: u32) {
        self.taken += 1;
        assert_eq!(
            exits, self.taken,
            "exits are numbered within the instruction"
        );
    }
    fn answer_exit(&mut self, _host: &Host, _exit: &TdExit) -> Option<ExitAction> {
        self.handled += 1;
        Some(ExitAction::Resume)
    }
}

#[test]
fn run_stops_a_livelock_at_the_bound() {
    let h = host();
    let mut v = Vcpu::with_hooks(&h, 0, Storm::default());
    let insn = Insn::accept(g(0), PageLevel::Size4K);
    assert_eq!(
        v.run(insn),
        Err(Stop::Livelock {
            exits: MAX_EXITS_PER_INSTRUCTION + 1
        })
    );
    assert_eq!(v.hooks().taken, MAX_EXITS_PER_INSTRUCTION + 1);
    assert_eq!(
        v.hooks().handled,
        MAX_EXITS_PER_INSTRUCTION,
        "the exit past the bound is not handled"
    );
    assert_eq!(v.exits(), 0, "the stop ended the instruction");
    let mut v = Vcpu::with_hooks(&h, 0, Storm::default()).with_max_exits(2);
    assert_eq!(v.run(read(0)), Err(Stop::Livelock { exits: 3 }));
    assert_eq!(v.hooks().handled, 2);
    assert!(!h.module().vcpu_in_td(0));
}

#[test]
fn resume_counts_the_exits_before_the_ve() {
    let h = host();
    let gpa = 5 * M2;
    let mut v = Vcpu::new(&h, 0).with_max_exits(1);
    assert!(matches!(v.run(read(gpa)), Err(Stop::Ve(_))));
    assert_eq!(v.exits(), 0);
    assert!(matches!(v.run(Insn::VeInfoGet), Ok(Retired::VeInfo(Ok(_)))));
    // The host takes the page away; the access executes again and exits again.
    h.punch_hole(range(gpa, gpa + M2)).unwrap();
    assert_eq!(leaf(&h, gpa).1, SeptState::Free);
    assert_eq!(v.resume(read(gpa)), Err(Stop::Livelock { exits: 2 }));
    // Run afresh, the same access is a new instruction: one exit, then the #VE.
    assert!(matches!(v.run(read(gpa)), Err(Stop::Ve(_))));
}

/// Records every hook call.
#[derive(Debug, Default)]
struct Recorder {
    log: Vec<String>,
    work: Vec<HostWork>,
    halt: bool,
    kill: bool,
}

impl VcpuHooks for Recorder {
    fn before_attempt(&mut self, insn: &Insn, attempt: u32) -> Attempt {
        self.log
            .push(format!("before {attempt} tdcall={}", insn.is_tdcall()));
        if self.halt {
            Attempt::Halt
        } else {
            Attempt::Run
        }
    }
    fn tdcall(&mut self, _insn: &Insn) {
        self.log.push("tdcall".into());
    }
    fn exit_taken(&mut self, _exit: &TdExit, exits: u32) {
        self.log.push(format!("exit_taken {exits}"));
    }
    fn before_exit(&mut self, _host: &Host, exit: &TdExit) {
        let kind = match exit {
            TdExit::EptViolation { .. } => "ept",
            TdExit::Vmcall(_) => "vmcall",
            TdExit::HostPriorityBusyTimeout { .. } => "hp",
        };
        self.log.push(format!("before_exit {kind}"));
    }
    fn answer_exit(&mut self, _host: &Host, _exit: &TdExit) -> Option<ExitAction> {
        self.log.push("answer_exit".into());
        self.kill.then_some(ExitAction::KillTd)
    }
    fn exit_handled(&mut self, _exit: &TdExit, action: &ExitAction, work: &HostWork) {
        self.log.push(format!("exit_handled {action:?}"));
        self.work.push(*work);
    }
    fn after_step(&mut self, _insn: &Insn, step: &Step) {
        let kind = match step {
            Step::Retired(_) => "retired",
            Step::Reexecute(_) => "reexecute",
            Step::Interrupted => "interrupted",
            Step::Stopped(_) => "stopped",
        };
        self.log.push(format!("after {kind}"));
    }
}

#[test]
fn hooks_are_called_in_order() {
    let h = host();
    let mut v = Vcpu::with_hooks(&h, 0, Recorder::default());
    assert_eq!(
        v.run(Insn::accept(g(M2), PageLevel::Size4K)),
        Ok(Retired::Accept(TdxStatus::SUCCESS))
    );
    assert!(matches!(v.run(read(M2)), Ok(Retired::Access(_))));
    assert!(matches!(
        v.run(Insn::MapGpa {
            start: SHARED | (2 * M2),
            len: K4
        }),
        Ok(Retired::MapGpa(_))
    ));
    let log: Vec<&str> = v.hooks().log.iter().map(String::as_str).collect();
    assert_eq!(
        log,
        [
            "before 0 tdcall=true",
            "tdcall",
            "exit_taken 1",
            "before_exit ept",
            "answer_exit",
            "exit_handled Resume",
            "after reexecute",
            "before 1 tdcall=true",
            "tdcall",
            "after retired",
            "before 0 tdcall=false",
            "after retired",
            "before 0 tdcall=true",
            "tdcall",
            "before_exit vmcall",
            "answer_exit",
            "exit_handled Resume",
            "after retired",
        ]
    );
    // The host work of each exit, measured on this thread.
    let work = &v.hooks().work;
    assert_eq!(work.len(), 2);
    let d = |w: &HostWork| {
        (
            w.vmm_after.ept_violations - w.vmm_before.ept_violations,
            w.vmm_after.map_gpa_calls - w.vmm_before.map_gpa_calls,
        )
    };
    assert_eq!(d(&work[0]), (1, 0));
    assert_eq!(d(&work[1]), (0, 1));
}

#[test]
fn a_halt_or_a_killing_host_stops_the_instruction() {
    let h = host();
    let mut v = Vcpu::with_hooks(
        &h,
        0,
        Recorder {
            halt: true,
            ..Recorder::default()
        },
    );
    let insn = Insn::accept(g(0), PageLevel::Size4K);
    assert_eq!(v.run(insn), Err(Stop::Halted));
    assert_eq!(h.module().stats().total(CallKind::Accept), 0, "no attempt");
    v.hooks_mut().halt = false;
    v.hooks_mut().kill = true;
    let stop = v.run(insn);
    assert!(
        matches!(
            stop,
            Err(Stop::Host {
                action: ExitAction::KillTd,
                exit: TdExit::EptViolation { .. }
            })
        ),
        "{stop:?}"
    );
    // The engine sees a dead TD.
    assert_eq!(v.accept(g(0), PageLevel::Size4K), TD_KILLED);
    assert_eq!(v.map_gpa(SHARED, K4).tdcall, TD_KILLED);
    assert!(!h.module().vcpu_in_td(0));
}

/// Keeps the vCPU inside the TD between instructions.
#[derive(Debug)]
struct Inside;

impl VcpuHooks for Inside {
    fn stays_inside(&self) -> bool {
        true
    }
}

#[test]
fn a_vcpu_may_stay_inside_between_instructions() {
    let h = host();
    let mut v = Vcpu::with_hooks(&h, 0, Inside);
    assert!(matches!(v.run(Insn::VpInfo), Ok(Retired::VpInfo(Ok(_)))));
    assert!(h.module().vcpu_in_td(0));
    assert!(matches!(
        v.run(Insn::VeInfoGet),
        Ok(Retired::VeInfo(Err(_)))
    ));
    // An exit takes it out; the re-execution enters again and it stays.
    assert_eq!(
        v.run(Insn::accept(g(0), PageLevel::Size4K)),
        Ok(Retired::Accept(TdxStatus::SUCCESS))
    );
    assert!(h.module().vcpu_in_td(0));
    v.halt();
    assert!(!h.module().vcpu_in_td(0));
}

/// Counts the exits the host handled.
#[derive(Debug, Default)]
struct Exits(u32);

impl VcpuHooks for Exits {
    fn exit_handled(&mut self, _exit: &TdExit, _action: &ExitAction, _work: &HostWork) {
        self.0 += 1;
    }
}

#[test]
fn the_guest_engine_accepts_a_range_on_a_vcpu() {
    let h = host();
    let mut v = Vcpu::with_hooks(&h, 0, Exits::default());
    let acceptor = Acceptor::new(Gpaw::Bits48, AcceptPolicy::default());
    // Two 2M pages and three 4K pages: one exit each (the host maps at the accept level).
    let r = range(0, 2 * M2 + 3 * K4);
    acceptor.accept_range(&mut v, r).unwrap();
    assert_eq!(v.hooks().0, 5);
    assert_eq!(h.stats().ept_violations, 5);
    assert_eq!(leaf(&h, 0), (1, SeptState::Mapped));
    assert_eq!(leaf(&h, M2), (1, SeptState::Mapped));
    assert_eq!(leaf(&h, 2 * M2 + 2 * K4), (0, SeptState::Mapped));
    assert_eq!(leaf(&h, 2 * M2 + 3 * K4).1, SeptState::Free);
    // Accepting it again (tolerating accepted pages) makes no exit.
    acceptor.accept_range_with(&mut v, r, true).unwrap();
    assert_eq!(v.hooks().0, 5);
    assert_eq!(v.vp_info().map(|i| i.vcpu_index), Ok(0));
}
