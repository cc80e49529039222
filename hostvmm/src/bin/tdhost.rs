//! `tdhost`: the host half for the bare-metal test image, which runs under QEMU TCG (no TDX).
//!
//! The image's TDCALLs and memory touches arrive as frames of `e2e_proto::wire` on a Unix
//! socket (QEMU connects its second serial port to it). Each request runs against
//! [`hostvmm::vmm::Host`] (the TDX-module emulator, guest_memfd and private MMU) exactly as a
//! vCPU's instruction would: the vCPU enters the TD, the module answers, and a TD exit goes to
//! the host's exit handlers, after which the image is told to re-execute the instruction. A #VE
//! the module injects becomes an "inject #VE" answer, which the image raises through its IDT.
//!
//! `tdhost --in-process` runs the same self-test (`e2e_proto::selftest`) inside this process
//! against the same host code, with no QEMU: the requests and so every count are the same, which
//! `cargo xtask e2e` checks.
//!
//! With `--mailbox RAM-FILE` (QEMU's guest RAM as a shared file), once the single-vCPU part is
//! done, `tdhost` serves the multi-CPU part (`e2e_proto::smp`) on a host of its own with one
//! vCPU per image vCPU: a thread per vCPU polls that vCPU's mailbox (`e2e_proto::mailbox`) in
//! the file and answers its requests as that vCPU's instructions, so every vCPU can have a
//! request in flight at once. At vCPU 0's DONE it checks the multi-CPU invariants (S-EPT well
//! formed, every 2M unit accepted exactly once and MAPPED, the module's ACCEPT, #VE and MapGPA
//! counts equal to what the vCPUs report) and prints `TDMEM-HOST-SMP-RESULT ok|FAILED ...`.
//! `--in-process` runs that part too, with a thread per vCPU.
//!
//! At the end (the image's DONE request) the host checks invariants (S-EPT tree well formed, no
//! host fault errors, no error pages, the image's ACCEPT and #VE counts equal the module's,
//! accepted memory MAPPED, never-touched memory FREE) and prints a report:
//! `TDMEM-HOST-COUNTS {json}` and `TDMEM-HOST-RESULT ok|FAILED ...`.
//!
//! Page contents: the image's RAM is QEMU's and is really read and written; the emulator keeps
//! its own model of each page's content (a token per 4K page, zeroed by ACCEPT). A touch
//! carries the token the image writes, and the answer carries the token the model holds, so the
//! self-test checks the model's zeroing and persistence, not QEMU's RAM.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixListener;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use accept::abi::{vmcall, Gpa, Gpaw, PageLevel, StatusCode};
use accept::acceptor::{AcceptPolicy, Acceptor};
use e2e_proto::mailbox;
use e2e_proto::selftest::{
    self, Channel, Platform, Scenario, Summary, VeHandler, WireMachine, IMAGE_END, MEMORY,
};
use e2e_proto::smp::{self, Smp, SmpStorage};
use e2e_proto::wire::{self, Answer, Decoder, Regs, Request};
use hostvmm::kvm::YieldKicker;
use hostvmm::module::{
    Access, AccessKind, AccessOutcome, CallKind, CallOutcome, SeptState, TdExit, TdcallOutcome,
    VmcallRegs,
};
use hostvmm::vmm::{ExitAction, Host, HostConfig};

/// Number of tests in `e2e_proto::selftest::run`.
const TESTS: u64 = 7;

/// The host side: the host half plus counters of what crossed the link.
/// Shared by every vCPU's server thread: the host half is thread-safe, the counters are behind
/// locks.
struct Exec {
    host: Host,
    requests: Mutex<BTreeMap<&'static str, u64>>,
    answers: Mutex<BTreeMap<&'static str, u64>>,
    summary: Mutex<Option<(u64, Summary)>>,
}

/// Locks `m`, also when another thread panicked while holding it.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Exec {
    /// A host for `vcpus` vCPUs with the image's memory built.
    fn new(vcpus: u32) -> Exec {
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
    fn answer(&self, vcpu: usize, req: Request) -> Answer {
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

    /// The counts both modes must agree on, as one JSON object.
    fn counts_json(&self) -> String {
        let st = self.host.module().stats();
        let mut calls = Vec::new();
        for kind in CallKind::ALL {
            let total = st.total(kind);
            if total != 0 {
                calls.push(format!("\"{kind:?}\":{total}"));
            }
        }
        let accepts: Vec<String> = [PageLevel::Size4K, PageLevel::Size2M]
            .iter()
            .map(|&l| {
                format!(
                    "\"{l:?}\":{{\"ok\":{},\"exit\":{},\"interrupted\":{}}}",
                    st.get_at(
                        CallKind::Accept,
                        l,
                        CallOutcome::Status(StatusCode::Success)
                    ),
                    st.get_at(CallKind::Accept, l, CallOutcome::TdExit),
                    st.get_at(CallKind::Accept, l, CallOutcome::Interrupted)
                )
            })
            .collect();
        let map = |m: &BTreeMap<&str, u64>| {
            m.iter()
                .map(|(k, v)| format!("\"{k}\":{v}"))
                .collect::<Vec<_>>()
                .join(",")
        };
        let vmm = self.host.stats();
        let mmu = self.host.mmu().stats();
        let seamcalls: u64 = CallKind::ALL
            .iter()
            .filter(|k| k.is_seamcall())
            .map(|&k| st.total(k))
            .sum();
        let tdcalls: u64 = CallKind::ALL
            .iter()
            .filter(|k| !k.is_seamcall())
            .map(|&k| st.total(k))
            .sum();
        format!(
            "{{\"tdcalls\":{tdcalls},\"seamcalls\":{seamcalls},\"calls\":{{{}}},\"accept\":{{{}}},\
             \"ve_injected\":{},\"requests\":{{{}}},\"answers\":{{{}}},\"ept_violations\":{},\
             \"map_gpa_calls\":{},\"map_gpa_chunks\":{},\"map_gpa_retries\":{},\"mmu_maps\":{:?},\
             \"demotes\":{},\"promotes\":{},\"zeroed_4k\":{}}}",
            calls.join(","),
            accepts.join(","),
            st.access(AccessKind::Ve),
            map(&lock(&self.requests)),
            map(&lock(&self.answers)),
            vmm.ept_violations,
            vmm.map_gpa_calls,
            vmm.map_gpa_chunks,
            vmm.map_gpa_retries,
            mmu.maps,
            mmu.fault_splits + mmu.zap_demotes,
            mmu.promotes,
            st.zeroed_4k
        )
    }

    /// The checks every run shares: the S-EPT tree well formed, no host fault errors, no error
    /// pages, and the image's DONE. Returns the violations and the image's summary.
    fn check_host(&self) -> (Vec<String>, Option<(u64, Summary)>) {
        let mut bad = Vec::new();
        if let Err(e) = self.host.module().check_tree() {
            bad.push(e.to_string());
        }
        let vmm = self.host.stats();
        if vmm.fault_errors != 0 {
            bad.push(format!("{} host fault errors", vmm.fault_errors));
        }
        let poisoned = self.host.gmem().poisoned_pages();
        if poisoned != 0 {
            bad.push(format!("{poisoned} error pages"));
        }
        let summary = *lock(&self.summary);
        if summary.is_none() {
            bad.push("the image never reported DONE".into());
        }
        (bad, summary)
    }

    /// Invariant checks at the end of a run; returns the violations.
    fn check(&self) -> Vec<String> {
        let (mut bad, summary) = self.check_host();
        let m = self.host.module();
        let Some((status, s)) = summary else {
            return bad;
        };
        if status != 0 || s.failed != 0 || s.passed != TESTS {
            bad.push(format!(
                "image self-test: status {status}, {} passed, {} failed (want {TESTS})",
                s.passed, s.failed
            ));
        }
        let st = m.stats();
        let ok = CallOutcome::Status(StatusCode::Success);
        // The image's accepted 2M pages, plus the image memory accepted at setup.
        let setup_2m = IMAGE_END / PageLevel::Size2M.size();
        let module_2m = st.get_at(CallKind::Accept, PageLevel::Size2M, ok);
        if module_2m != s.accepted[1] + setup_2m {
            bad.push(format!(
                "2M accepts: module {module_2m}, image {} + setup {setup_2m}",
                s.accepted[1]
            ));
        }
        let module_4k = st.get_at(CallKind::Accept, PageLevel::Size4K, ok);
        if module_4k != s.accepted[0] {
            bad.push(format!(
                "4K accepts: module {module_4k}, image {}",
                s.accepted[0]
            ));
        }
        if st.access(AccessKind::Ve) != s.ves {
            bad.push(format!(
                "#VE: module injected {}, image took {}",
                st.access(AccessKind::Ve),
                s.ves
            ));
        }
        // Accepted memory is MAPPED; memory nobody asked for is FREE.
        let mapped = |gpa: u64| m.leaf(Gpa::new_truncate(gpa)).state == SeptState::Mapped;
        let mut gpa = 0;
        while gpa < selftest::EAGER_BELOW {
            if !mapped(gpa) {
                bad.push(format!("{gpa:#x} (eagerly accepted) is not MAPPED"));
            }
            gpa += 4096 * 61;
        }
        for g in [selftest::LAZY_GPA, selftest::VE_GPA, selftest::CONVERT.0] {
            if !mapped(g) {
                bad.push(format!("{g:#x} (accepted by the image) is not MAPPED"));
            }
        }
        for g in [300 << 20, MEMORY - 4096] {
            let leaf = m.leaf(Gpa::new_truncate(g));
            if leaf.state != SeptState::Free {
                bad.push(format!("{g:#x} (never touched) is {:?}", leaf.state));
            }
        }
        bad
    }

    /// Invariant checks of the multi-CPU part (a host of its own); returns the violations.
    fn check_smp(&self, extra: &SmpExtra) -> Vec<String> {
        let (mut bad, summary) = self.check_host();
        let m = self.host.module();
        let vmm = self.host.stats();
        let Some((status, s)) = summary else {
            return bad;
        };
        let tests = smp::CPUS as u64 * Smp::TESTS_PER_CPU;
        if status != 0 || s.failed != 0 || s.passed != tests {
            bad.push(format!(
                "multi-CPU self-test: status {status}, {} passed, {} failed (want {tests})",
                s.passed, s.failed
            ));
        }
        let st = m.stats();
        let ok = CallOutcome::Status(StatusCode::Success);
        let setup_2m = IMAGE_END / PageLevel::Size2M.size();
        let module_2m = st.get_at(CallKind::Accept, PageLevel::Size2M, ok);
        let module_4k = st.get_at(CallKind::Accept, PageLevel::Size4K, ok);
        if module_2m != s.accepted[1] + setup_2m || module_4k != s.accepted[0] {
            bad.push(format!(
                "ACCEPTs: module 2M {module_2m} 4K {module_4k}, vCPUs 2M {} 4K {} + setup 2M \
                 {setup_2m}",
                s.accepted[1], s.accepted[0]
            ));
        }
        // Every unit exactly once: each 2M unit of [BASE, END) once, the converted units once
        // more after the conversion, nothing at 4K.
        let units = (smp::END - smp::BASE) / smp::UNIT;
        let reaccepted = (smp::CONVERT.1 - smp::CONVERT.0) / smp::UNIT;
        if s.accepted[1] != units + reaccepted || s.accepted[0] != 0 {
            bad.push(format!(
                "accepted exactly once: want {units} units + {reaccepted} after the \
                 conversion at 2M, the vCPUs accepted {} at 2M and {} at 4K",
                s.accepted[1], s.accepted[0]
            ));
        }
        if st.access(AccessKind::Ve) != s.ves {
            bad.push(format!(
                "#VE: module injected {}, vCPUs took {}",
                st.access(AccessKind::Ve),
                s.ves
            ));
        }
        if vmm.map_gpa_calls != s.map_gpa.0 {
            bad.push(format!(
                "MapGPA: host served {}, vCPUs made {}",
                vmm.map_gpa_calls, s.map_gpa.0
            ));
        }
        if extra.ve_handled + extra.ve_meanwhile > s.ves {
            bad.push(format!(
                "#VE verdicts {} + {} exceed the #VEs taken {}",
                extra.ve_handled, extra.ve_meanwhile, s.ves
            ));
        }
        let mut gpa = smp::BASE;
        while gpa < smp::END {
            for at in [gpa, gpa + smp::UNIT - 4096] {
                let leaf = m.leaf(Gpa::new_truncate(at));
                if leaf.state != SeptState::Mapped {
                    bad.push(format!(
                        "{at:#x} (accepted by the vCPUs) is {:?}",
                        leaf.state
                    ));
                }
            }
            gpa += smp::UNIT;
        }
        bad
    }

    /// Prints the multi-CPU report; true when every invariant holds.
    fn report_smp(&self, mode: &str, extra: &SmpExtra) -> bool {
        let st = self.host.module().stats();
        let tdcalls: u64 = CallKind::ALL
            .iter()
            .filter(|k| !k.is_seamcall())
            .map(|&k| st.total(k))
            .sum();
        let requests: u64 = lock(&self.requests).values().sum();
        if let Some((_, s)) = *lock(&self.summary) {
            println!("TDMEM-HOST-SMP-GUEST-SUMMARY {s}");
        }
        println!(
            "TDMEM-HOST-SMP vcpus={} requests={requests} tdcalls={tdcalls} ve_injected={} \
             ve_handled={} ve_accepted_meanwhile={} ept_violations={}",
            smp::CPUS,
            st.access(AccessKind::Ve),
            extra.ve_handled,
            extra.ve_meanwhile,
            self.host.stats().ept_violations
        );
        let bad = self.check_smp(extra);
        if bad.is_empty() {
            println!("TDMEM-HOST-SMP-RESULT ok mode={mode} invariants=ok");
            true
        } else {
            for b in &bad {
                println!("invariant violated: {b}");
            }
            println!(
                "TDMEM-HOST-SMP-RESULT FAILED mode={mode} violations={}",
                bad.len()
            );
            false
        }
    }

    fn report(&self, mode: &str) -> bool {
        if let Some((_, s)) = *lock(&self.summary) {
            println!("TDMEM-HOST-GUEST-SUMMARY {s}");
        }
        println!("TDMEM-HOST-COUNTS {}", self.counts_json());
        let bad = self.check();
        if bad.is_empty() {
            println!("TDMEM-HOST-RESULT ok mode={mode} invariants=ok");
            true
        } else {
            for b in &bad {
                println!("invariant violated: {b}");
            }
            println!(
                "TDMEM-HOST-RESULT FAILED mode={mode} violations={}",
                bad.len()
            );
            false
        }
    }
}

/// In-process channel: the same host code, no QEMU.
#[derive(Clone)]
struct Direct(Arc<Exec>, usize);

impl Channel for Direct {
    fn call(&mut self, req: Request) -> Answer {
        self.0.answer(self.1, req)
    }
}

/// In-process platform: no RAM of its own besides the table buffer; #VE is a direct call.
struct Process {
    table: Vec<u8>,
}

impl Platform for Process {
    fn access(&mut self, _gpa: u64, _write: Option<u64>) {}

    fn raise_ve(&mut self, handler: &mut dyn VeHandler) {
        let v = handler.handle();
        println!("ve: #VE delivered (in process, direct call): {v:?}");
    }

    fn memory(&mut self, _gpa: u64, len: usize) -> Option<&mut [u8]> {
        self.table.resize(len, 0);
        Some(&mut self.table)
    }

    fn log(&mut self, args: std::fmt::Arguments<'_>) {
        println!("{args}");
    }
}

fn in_process() -> bool {
    let exec = Arc::new(Exec::new(1));
    let mut chan = Direct(exec.clone(), 0);
    let _ = chan.call(Request::Hello {
        version: wire::VERSION,
    });
    let mut machine = WireMachine::new(chan.clone(), Process { table: Vec::new() });
    let sum = selftest::run(&mut machine, &Scenario::QEMU_E2E);
    println!("TDMEM-GUEST-RESULT {sum}");
    let (counts, n) = sum.counts();
    let _ = chan.call(Request::Done {
        status: u64::from(sum.failed != 0),
        counts,
        n,
    });
    let single = exec.report("in-process");
    let multi = in_process_smp();
    single && multi
}

/// What the multi-CPU DONE carries after the [`Summary`] counts.
#[derive(Debug, Default, Clone, Copy)]
struct SmpExtra {
    ve_handled: u64,
    ve_meanwhile: u64,
}

impl SmpExtra {
    /// Index of the first extra count in DONE's counts.
    const AT: usize = 11;

    fn from_done(req: &Request) -> Option<SmpExtra> {
        match *req {
            Request::Done { counts, n, .. } if n >= Self::AT + 2 => Some(SmpExtra {
                ve_handled: counts[Self::AT],
                ve_meanwhile: counts[Self::AT + 1],
            }),
            _ => None,
        }
    }
}

/// The multi-CPU part in process: a thread per vCPU on a host of its own.
fn in_process_smp() -> bool {
    let exec = Arc::new(Exec::new(smp::CPUS as u32));
    let acceptor = Acceptor::new(Gpaw::Bits48, AcceptPolicy::default());
    let storage = SmpStorage::new();
    let Some(shared) = Smp::new(&acceptor, &storage) else {
        println!("TDMEM-HOST-SMP-RESULT FAILED mode=in-process no-tracker");
        return false;
    };
    std::thread::scope(|scope| {
        for cpu in 0..smp::CPUS {
            let (exec, shared) = (exec.clone(), &shared);
            scope.spawn(move || {
                let mut m = WireMachine::new(Direct(exec, cpu), Process { table: Vec::new() });
                shared.run_cpu(cpu, &mut m);
            });
        }
    });
    let sum = shared.summary();
    println!("TDMEM-GUEST-SMP-RESULT {sum}");
    let (counts, n) = shared.done_counts();
    let done = Request::Done {
        status: u64::from(sum.failed != 0),
        counts,
        n,
    };
    let _ = exec.answer(0, done);
    exec.report_smp(
        "in-process",
        &SmpExtra::from_done(&done).unwrap_or_default(),
    )
}

/// Serves vCPU `vcpu`'s mailbox in `mem` (QEMU's guest RAM file) until `stop` is set or the
/// deadline passes. Returns the DONE request when this vCPU sent it.
fn serve_mailbox(
    exec: &Exec,
    mem: &std::fs::File,
    vcpu: usize,
    stop: &AtomicBool,
    deadline: Instant,
) -> Result<Option<Request>, String> {
    let base = mailbox::gpa(vcpu as u64);
    let read_u64 = |at: u64| -> Result<u64, String> {
        let mut b = [0u8; 8];
        mem.read_exact_at(&mut b, at)
            .map_err(|e| format!("mailbox {vcpu}: {e}"))?;
        Ok(u64::from_le_bytes(b))
    };
    let mut last = read_u64(base + mailbox::ANS_SEQ)?;
    let mut idle = 0u32;
    let mut frame = [0u8; wire::MAX_FRAME];
    let mut out = [0u8; wire::MAX_FRAME];
    while !stop.load(Ordering::Acquire) {
        // The image bumps the number by one per request; any other value is a store in
        // progress.
        if read_u64(base + mailbox::REQ_SEQ)? != last + 1 {
            idle = idle.saturating_add(1);
            if idle < 256 {
                std::thread::yield_now();
            } else {
                if Instant::now() > deadline {
                    return Err(format!("mailbox {vcpu}: timeout"));
                }
                std::thread::sleep(Duration::from_micros(50));
            }
            continue;
        }
        idle = 0;
        last += 1;
        mem.read_exact_at(&mut frame, base + mailbox::REQ_FRAME)
            .map_err(|e| format!("mailbox {vcpu}: {e}"))?;
        let req = wire::decode(&frame).and_then(|f| Request::from_frame(&f));
        let answer = match req {
            Ok(req) => exec.answer(vcpu, req),
            Err(e) => {
                eprintln!("tdhost: vCPU {vcpu}: bad request {e:?}");
                Answer::Fatal(8)
            }
        };
        let len = answer.to_frame().encode(&mut out);
        mem.write_all_at(&out[..len], base + mailbox::ANS_FRAME)
            .and_then(|()| mem.write_all_at(&last.to_le_bytes(), base + mailbox::ANS_SEQ))
            .map_err(|e| format!("mailbox {vcpu}: {e}"))?;
        if let Ok(done @ Request::Done { .. }) = req {
            stop.store(true, Ordering::Release);
            return Ok(Some(done));
        }
    }
    Ok(None)
}

/// The multi-CPU part over the mailboxes in QEMU's guest RAM file `path`: a server thread per
/// vCPU on a host of its own, until vCPU 0 sends DONE.
fn serve_smp(path: &str, deadline: Instant) -> Result<bool, String> {
    let mem = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| format!("{path}: {e}"))?;
    let exec = Exec::new(smp::CPUS as u32);
    let stop = AtomicBool::new(false);
    eprintln!("tdhost: serving {} vCPU mailboxes in {path}", smp::CPUS);
    let results: Vec<Result<Option<Request>, String>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..smp::CPUS)
            .map(|vcpu| {
                let (exec, mem, stop) = (&exec, &mem, &stop);
                scope.spawn(move || {
                    let r = serve_mailbox(exec, mem, vcpu, stop, deadline);
                    if r.is_err() {
                        stop.store(true, Ordering::Release);
                    }
                    r
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err("server thread panicked".into()))
            })
            .collect()
    });
    let mut extra = SmpExtra::default();
    for r in results {
        if let Some(done) = r? {
            extra = SmpExtra::from_done(&done).unwrap_or_default();
        }
    }
    Ok(exec.report_smp("qemu", &extra))
}

fn serve(path: &str, timeout: Duration) -> Result<bool, String> {
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path).map_err(|e| format!("bind {path}: {e}"))?;
    eprintln!("tdhost: listening on {path}");
    let deadline = Instant::now() + timeout;
    listener
        .set_nonblocking(true)
        .map_err(|e| format!("{path}: {e}"))?;
    let mut stream = loop {
        match listener.accept() {
            Ok((s, _)) => break s,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() > deadline {
                    return Err("no connection before the timeout".into());
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(format!("accept: {e}")),
        }
    };
    stream
        .set_nonblocking(false)
        .and_then(|()| stream.set_read_timeout(Some(Duration::from_millis(200))))
        .map_err(|e| format!("socket: {e}"))?;
    eprintln!("tdhost: image connected");
    let exec = Exec::new(1);
    let mut dec = Decoder::new();
    let mut buf = [0u8; 4096];
    let mut out = [0u8; wire::MAX_FRAME];
    let mut bad_bytes = 0u64;
    'run: loop {
        if Instant::now() > deadline {
            eprintln!("tdhost: timeout");
            break;
        }
        let n = match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut =>
            {
                continue
            }
            Err(e) => return Err(format!("read: {e}")),
        };
        for &b in &buf[..n] {
            match dec.push(b) {
                None => {}
                Some(Err(_)) => bad_bytes += 1,
                Some(Ok(frame)) => {
                    let answer = match Request::from_frame(&frame) {
                        Ok(req) => exec.answer(0, req),
                        Err(e) => {
                            eprintln!("tdhost: bad request {e:?}");
                            Answer::Fatal(8)
                        }
                    };
                    let len = answer.to_frame().encode(&mut out);
                    stream
                        .write_all(&out[..len])
                        .map_err(|e| format!("write: {e}"))?;
                    if matches!(frame.op, wire::op::DONE) {
                        break 'run;
                    }
                }
            }
        }
    }
    if bad_bytes != 0 {
        eprintln!("tdhost: {bad_bytes} bytes outside frames");
    }
    Ok(exec.report("qemu"))
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut socket = None;
    let mut timeout = 150;
    let mut in_proc = false;
    let mut mailboxes = None;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--in-process" => in_proc = true,
            "--socket" => socket = it.next().cloned(),
            "--mailbox" => mailboxes = it.next().cloned(),
            "--timeout" => timeout = it.next().and_then(|t| t.parse().ok()).unwrap_or(timeout),
            _ => {
                eprintln!(
                    "usage: tdhost (--socket PATH [--mailbox RAM-FILE] [--timeout SECS] | \
                     --in-process)"
                );
                return ExitCode::from(2);
            }
        }
    }
    let ok = if in_proc {
        in_process()
    } else if let Some(path) = socket {
        let deadline = Instant::now() + Duration::from_secs(timeout);
        let single = serve(&path, Duration::from_secs(timeout));
        let multi = match (&single, mailboxes) {
            (Ok(true), Some(ram)) => serve_smp(&ram, deadline),
            _ => Ok(true),
        };
        match (single, multi) {
            (Ok(a), Ok(b)) => a && b,
            (Err(e), _) | (_, Err(e)) => {
                eprintln!("tdhost: {e}");
                false
            }
        }
    } else {
        eprintln!(
            "usage: tdhost (--socket PATH [--mailbox RAM-FILE] [--timeout SECS] | --in-process)"
        );
        return ExitCode::from(2);
    };
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multi_cpu_part_passes_in_process() {
        assert!(in_process_smp());
    }

    /// The image's end of a mailbox, written as the image does: frame, then the number.
    fn guest_call(mem: &std::fs::File, vcpu: u64, seq: u64, req: Request) -> Answer {
        let base = mailbox::gpa(vcpu);
        let mut out = [0u8; wire::MAX_FRAME];
        let n = req.to_frame().encode(&mut out);
        mem.write_all_at(&out[..n], base + mailbox::REQ_FRAME)
            .and_then(|()| mem.write_all_at(&seq.to_le_bytes(), base + mailbox::REQ_SEQ))
            .expect("write the request");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let mut b = [0u8; 8];
            mem.read_exact_at(&mut b, base + mailbox::ANS_SEQ)
                .expect("read the answer number");
            if u64::from_le_bytes(b) == seq {
                break;
            }
            assert!(Instant::now() < deadline, "no answer to request {seq}");
            std::thread::sleep(Duration::from_millis(1));
        }
        let mut frame = [0u8; wire::MAX_FRAME];
        mem.read_exact_at(&mut frame, base + mailbox::ANS_FRAME)
            .expect("read the answer");
        Answer::from_frame(&wire::decode(&frame).expect("a frame")).expect("an answer")
    }

    #[test]
    fn a_mailbox_is_served_as_its_own_vcpu_until_done() {
        let path = std::env::temp_dir().join(format!("tdhost-mailbox-{}", std::process::id()));
        let mem = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .expect("create the RAM file");
        mem.set_len(IMAGE_END).expect("size the RAM file");
        let exec = Exec::new(smp::CPUS as u32);
        let stop = AtomicBool::new(false);
        let done = std::thread::scope(|scope| {
            let server = scope.spawn(|| {
                let deadline = Instant::now() + Duration::from_secs(30);
                serve_mailbox(&exec, &mem, 2, &stop, deadline)
            });
            let hello = Request::Hello {
                version: wire::VERSION,
            };
            assert_eq!(guest_call(&mem, 2, 1, hello), Answer::Ack);
            // TDG.VP.INFO answered as vCPU 2 of four.
            match guest_call(&mem, 2, 2, Request::VpInfo) {
                Answer::Regs(r) => {
                    assert_eq!((r.rax, r.rcx & 0x3F, r.r9), (0, 48, 2));
                    assert_eq!(r.r8 & 0xFFFF_FFFF, smp::CPUS as u64);
                }
                other => panic!("VP.INFO: {other:?}"),
            }
            let done = Request::Done {
                status: 0,
                counts: [0; wire::MAX_ARGS - 1],
                n: 0,
            };
            assert_eq!(guest_call(&mem, 2, 3, done), Answer::Ack);
            server.join().expect("server thread")
        });
        let _ = std::fs::remove_file(&path);
        assert!(matches!(done, Ok(Some(Request::Done { .. }))), "{done:?}");
        assert!(stop.load(Ordering::Acquire));
        assert_eq!(lock(&exec.requests).get("vp_info"), Some(&1));
    }
}
