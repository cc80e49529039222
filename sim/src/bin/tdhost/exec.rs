//! The host side of the link: the host half plus counters of what crossed it, answering each
//! request as one attempt of the instruction on one vCPU (`hostvmm::vcpu::Vcpu::step`).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use accept::abi::{Gpa, PageLevel, TdxStatus};
use e2e_proto::selftest::{Summary, IMAGE_END, MEMORY};
use e2e_proto::wire::{self, Answer, Regs, Request};
use hostvmm::kvm::YieldKicker;
use hostvmm::module::{Access, SeptState};
use hostvmm::vcpu::{Insn, Retired, Step, Stop, Vcpu};
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

    /// One attempt of `insn` on vCPU `vcpu` as the instruction the image executes: the
    /// retired call's registers, re-execute after a handled exit, an exception to inject, or
    /// the TD's end.
    fn exec(&self, vcpu: usize, insn: Insn) -> Answer {
        let regs = |rax: TdxStatus| Regs {
            rax: rax.raw(),
            ..Regs::default()
        };
        match Vcpu::new(&self.host, vcpu).step(insn) {
            Step::Retired(Retired::Accept(s)) => Answer::Regs(regs(s)),
            // The VMCALL retires with the host's R10/R11, or fails with its own status.
            Step::Retired(Retired::MapGpa(o)) if o.tdcall.is_success() => Answer::Regs(Regs {
                r10: o.status.raw(),
                r11: o.resume_gpa,
                ..Regs::default()
            }),
            Step::Retired(Retired::MapGpa(o)) => Answer::Regs(regs(o.tdcall)),
            Step::Retired(Retired::VpInfo(Ok(i))) => Answer::Regs(Regs {
                rcx: u64::from(i.gpaw.width()),
                rdx: i.attributes,
                r8: u64::from(i.num_vcpus) | (u64::from(i.max_vcpus) << 32),
                r9: u64::from(i.vcpu_index),
                ..Regs::default()
            }),
            Step::Retired(Retired::VeInfo(Ok(v))) => Answer::Regs(Regs {
                rcx: u64::from(v.exit_reason),
                rdx: v.exit_qualification,
                r8: v.gla,
                r9: v.gpa,
                r10: u64::from(v.instruction_length) | (u64::from(v.instruction_info) << 32),
                ..Regs::default()
            }),
            Step::Retired(Retired::VpInfo(Err(s)) | Retired::VeInfo(Err(s))) => {
                Answer::Regs(regs(s))
            }
            Step::Retired(Retired::Access(token)) => Answer::Regs(Regs {
                rcx: token,
                ..Regs::default()
            }),
            Step::Retired(Retired::Shared { .. }) => Answer::Regs(Regs::default()),
            Step::Reexecute(_) | Step::Interrupted => Answer::Reexecute,
            Step::Stopped(Stop::Ve(_)) => Answer::InjectVe,
            Step::Stopped(Stop::DoubleFault) => Answer::InjectDf,
            Step::Stopped(Stop::Host { .. }) if matches!(insn, Insn::MapGpa { .. }) => {
                Answer::Fatal(4)
            }
            Step::Stopped(Stop::Host {
                exit,
                action: ExitAction::Fatal(e),
            }) => {
                eprintln!("tdhost: exit {exit:?}: {e}");
                Answer::Fatal(1)
            }
            Step::Stopped(Stop::Host { .. }) => Answer::Fatal(2),
            Step::Stopped(Stop::InvalidGpa | Stop::Module(_)) if !insn.is_tdcall() => {
                Answer::Fatal(5)
            }
            Step::Stopped(_) => Answer::Fatal(3),
        }
    }

    fn accept(&self, vcpu: usize, page_info: u64) -> Answer {
        self.exec(vcpu, Insn::Accept { page_info })
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
            Request::Attach { .. } => "attach",
            Request::Tdcall { .. } => "tdcall",
            Request::Access { .. } => "access",
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
        match req {
            Request::Hello { version } if version == wire::VERSION => Answer::Ack,
            Request::Hello { .. } => Answer::Fatal(9),
            Request::Done { status, counts, n } => {
                *lock(&self.summary) = Some((status, Summary::from_counts(&counts[..n])));
                Answer::Ack
            }
            Request::Accept { page_info } => self.accept(vcpu, page_info),
            Request::VpInfo => self.exec(vcpu, Insn::VpInfo),
            Request::VeInfo => self.exec(vcpu, Insn::VeInfoGet),
            Request::MapGpa { start, len } => self.exec(vcpu, Insn::MapGpa { start, len }),
            Request::Touch { gpa, write } => {
                let access = write.map_or(Access::Read, Access::Write);
                self.exec(vcpu, Insn::Access { gpa, access })
            }
            Request::Attach { version, .. } if version == wire::VERSION => Answer::Ack,
            Request::Attach { .. } => Answer::Fatal(9),
            // R11, R12 and R13 are registers 6, 7 and 8 of the block (RAX, RCX, RDX, R8...).
            Request::Tdcall { regs } => {
                match wire::decode_tdcall(regs[0], regs[1], regs[6], regs[7], regs[8]) {
                    wire::Decoded::Request(req) => self.answer_inner(vcpu, req),
                    wire::Decoded::Local(r) => Answer::Regs(r),
                }
            }
            // A probe only looks: RAX 0 when the page is MAPPED, 1 when not.
            Request::Access {
                gpa, probe: true, ..
            } => {
                let leaf = self.host.module().leaf(Gpa::new_truncate(gpa));
                Answer::Regs(Regs {
                    rax: u64::from(leaf.state != SeptState::Mapped),
                    ..Regs::default()
                })
            }
            // The page's content is QEMU's RAM here, not the model's token: a store is checked
            // as a write (VE info and exit qualification say so) of a token nobody reads.
            Request::Access { gpa, write, .. } => self.exec(
                vcpu,
                Insn::Access {
                    gpa,
                    access: if write {
                        Access::Write(0)
                    } else {
                        Access::Read
                    },
                },
            ),
        }
    }
}
