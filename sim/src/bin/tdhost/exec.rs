//! The host side of the link: the host half plus counters of what crossed it, answering each
//! request as the instruction of one vCPU.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use accept::abi::{vmcall, Gpa, PageLevel};
use e2e_proto::selftest::{Summary, IMAGE_END, MEMORY};
use e2e_proto::wire::{self, Answer, Regs, Request};
use hostvmm::kvm::YieldKicker;
use hostvmm::module::{Access, AccessOutcome, TdExit, TdcallOutcome, VmcallRegs};
use hostvmm::vmm::{ExitAction, Host, HostConfig};

/// The host side: the host half plus counters of what crossed the link.
/// Shared by every vCPU's server thread: the host half is thread-safe, the counters are behind
/// locks.
pub(crate) struct Exec {
    pub(crate) host: Host,
    pub(crate) requests: Mutex<BTreeMap<&'static str, u64>>,
    pub(crate) answers: Mutex<BTreeMap<&'static str, u64>>,
    pub(crate) summary: Mutex<Option<(u64, Summary)>>,
}

/// Locks `m`, also when another thread panicked while holding it.
pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Exec {
    /// A host for `vcpus` vCPUs with the image's memory built.
    pub(crate) fn new(vcpus: u32) -> Exec {
        let host = match Host::new(HostConfig::new(MEMORY, vcpus), Arc::new(YieldKicker)) {
            Ok(h) => h,
            Err(e) => {
                eprintln!("tdhost: cannot build the host: {e}");
                std::process::exit(2);
            }
        };
        let mut exec = Exec {
            host,
            requests: Mutex::new(BTreeMap::new()),
            answers: Mutex::new(BTreeMap::new()),
            summary: Mutex::new(None),
        };
        exec.build_image_memory();
        exec
    }

    /// The image's own memory `[0, IMAGE_END)` is private and accepted before the image runs.
    /// `Host` models a finalized TD (no PAGE.ADD), so this stands in for the TD build: the
    /// host accepts it in 2M pages through the normal fault path (counted like everything
    /// else, and the same in both modes).
    fn build_image_memory(&mut self) {
        let mut gpa = 0;
        while gpa < IMAGE_END {
            let info = accept::abi::page_info(Gpa::new_truncate(gpa), PageLevel::Size2M);
            loop {
                match self.accept(0, info) {
                    Answer::Reexecute => continue,
                    Answer::Regs(r) if r.rax == 0 => break,
                    other => {
                        eprintln!("tdhost: image memory at {gpa:#x}: {other:?}");
                        std::process::exit(2);
                    }
                }
            }
            gpa += PageLevel::Size2M.size();
        }
        lock(&self.requests).clear();
        lock(&self.answers).clear();
    }

    fn enter(&self, vcpu: usize) -> bool {
        self.host.module().vcpu_enter(vcpu).is_ok()
    }

    fn leave(&self, vcpu: usize, exited: bool) {
        if !exited {
            let _ = self.host.module().vcpu_exit(vcpu);
        }
    }

    /// Hands a TD exit to the host: the instruction re-executes, or the TD dies.
    fn exit(&self, exit: TdExit) -> Answer {
        let mut regs = VmcallRegs::default();
        match self.host.handle_exit(exit, &mut regs, &|| false) {
            ExitAction::Resume => Answer::Reexecute,
            ExitAction::Fatal(e) => {
                eprintln!("tdhost: exit {exit:?}: {e}");
                Answer::Fatal(1)
            }
            ExitAction::KillTd => Answer::Fatal(2),
        }
    }

    fn accept(&self, vcpu: usize, page_info: u64) -> Answer {
        if !self.enter(vcpu) {
            return Answer::Fatal(3);
        }
        let out = self.host.module().tdg_mem_page_accept(vcpu, page_info);
        self.leave(vcpu, matches!(out, Ok(TdcallOutcome::Exit(_))));
        match out {
            Ok(TdcallOutcome::Completed(s)) => Answer::Regs(Regs {
                rax: s.raw(),
                ..Regs::default()
            }),
            Ok(TdcallOutcome::Interrupted) => Answer::Reexecute,
            Ok(TdcallOutcome::Exit(e)) => self.exit(e),
            Err(_) => Answer::Fatal(3),
        }
    }

    /// Answers one request of vCPU `vcpu`.
    pub(crate) fn answer(&self, vcpu: usize, req: Request) -> Answer {
        let name = match req {
            Request::Hello { .. } => "hello",
            Request::VpInfo => "vp_info",
            Request::VeInfo => "veinfo_get",
            Request::Accept { .. } => "accept",
            Request::MapGpa { .. } => "map_gpa",
            Request::Touch { .. } => "touch",
            Request::Done { .. } => "done",
        };
        *lock(&self.requests).entry(name).or_default() += 1;
        let a = self.answer_inner(vcpu, req);
        let kind = match a {
            Answer::Regs(_) => "retired",
            Answer::Reexecute => "reexecute",
            Answer::InjectVe => "inject_ve",
            Answer::InjectDf => "inject_df",
            Answer::Ack => "ack",
            Answer::Fatal(_) => "fatal",
        };
        *lock(&self.answers).entry(kind).or_default() += 1;
        a
    }

    fn answer_inner(&self, vcpu: usize, req: Request) -> Answer {
        let m = self.host.module().clone();
        match req {
            Request::Hello { version } if version == wire::VERSION => Answer::Ack,
            Request::Hello { .. } => Answer::Fatal(9),
            Request::Done { status, counts, n } => {
                *lock(&self.summary) = Some((status, Summary::from_counts(&counts[..n])));
                Answer::Ack
            }
            Request::Accept { page_info } => self.accept(vcpu, page_info),
            Request::VpInfo | Request::VeInfo => {
                if !self.enter(vcpu) {
                    return Answer::Fatal(3);
                }
                let regs = if req == Request::VpInfo {
                    m.tdg_vp_info(vcpu).map(|r| match r {
                        Ok(i) => Regs {
                            rcx: u64::from(i.gpaw.width()),
                            rdx: i.attributes,
                            r8: u64::from(i.num_vcpus) | (u64::from(i.max_vcpus) << 32),
                            r9: u64::from(i.vcpu_index),
                            ..Regs::default()
                        },
                        Err(s) => Regs {
                            rax: s.raw(),
                            ..Regs::default()
                        },
                    })
                } else {
                    m.tdg_vp_veinfo_get(vcpu).map(|r| match r {
                        Ok(v) => Regs {
                            rcx: u64::from(v.exit_reason),
                            rdx: v.exit_qualification,
                            r8: v.gla,
                            r9: v.gpa,
                            r10: u64::from(v.instruction_length)
                                | (u64::from(v.instruction_info) << 32),
                            ..Regs::default()
                        },
                        Err(s) => Regs {
                            rax: s.raw(),
                            ..Regs::default()
                        },
                    })
                };
                self.leave(vcpu, false);
                regs.map_or(Answer::Fatal(3), Answer::Regs)
            }
            Request::MapGpa { start, len } => {
                if !self.enter(vcpu) {
                    return Answer::Fatal(3);
                }
                let mut regs = VmcallRegs {
                    mask: vmcall::EXPOSE_REGS_MASK,
                    ..VmcallRegs::default()
                };
                regs.gpr[VmcallRegs::R10] = 0;
                regs.gpr[VmcallRegs::R11] = vmcall::MAP_GPA;
                regs.gpr[VmcallRegs::R12] = start;
                regs.gpr[VmcallRegs::R13] = len;
                let out = m.tdg_vp_vmcall(vcpu, regs);
                self.leave(vcpu, matches!(out, Ok(TdcallOutcome::Exit(_))));
                match out {
                    Ok(TdcallOutcome::Exit(exit @ TdExit::Vmcall(_))) => {
                        let mut answer = VmcallRegs::default();
                        match self.host.handle_exit(exit, &mut answer, &|| false) {
                            // The VMCALL retires with the host's R10/R11.
                            ExitAction::Resume => Answer::Regs(Regs {
                                r10: answer.gpr[VmcallRegs::R10],
                                r11: answer.gpr[VmcallRegs::R11],
                                ..Regs::default()
                            }),
                            _ => Answer::Fatal(4),
                        }
                    }
                    Ok(TdcallOutcome::Exit(e)) => self.exit(e),
                    Ok(TdcallOutcome::Completed(s)) => Answer::Regs(Regs {
                        rax: s.raw(),
                        ..Regs::default()
                    }),
                    Ok(TdcallOutcome::Interrupted) => Answer::Reexecute,
                    Err(_) => Answer::Fatal(3),
                }
            }
            Request::Touch { gpa, write } => {
                if !self.enter(vcpu) {
                    return Answer::Fatal(3);
                }
                let access = write.map_or(Access::Read, Access::Write);
                let out = m.guest_access(vcpu, gpa, access);
                self.leave(vcpu, matches!(out, Ok(AccessOutcome::Exit(_))));
                match out {
                    Ok(AccessOutcome::Ok(token)) => Answer::Regs(Regs {
                        rcx: token,
                        ..Regs::default()
                    }),
                    Ok(AccessOutcome::Shared { .. }) => Answer::Regs(Regs::default()),
                    Ok(AccessOutcome::Ve(_)) => Answer::InjectVe,
                    Ok(AccessOutcome::DoubleFault) => Answer::InjectDf,
                    Ok(AccessOutcome::Exit(e)) => self.exit(e),
                    Ok(AccessOutcome::InvalidGpa) | Err(_) => Answer::Fatal(5),
                }
            }
        }
    }
}
