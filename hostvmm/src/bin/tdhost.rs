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
use std::os::unix::net::UnixListener;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use accept::abi::{vmcall, Gpa, PageLevel, StatusCode};
use e2e_proto::selftest::{
    self, Channel, Platform, Scenario, Summary, VeHandler, WireMachine, IMAGE_END, MEMORY,
};
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
struct Exec {
    host: Host,
    requests: BTreeMap<&'static str, u64>,
    answers: BTreeMap<&'static str, u64>,
    summary: Option<(u64, Summary)>,
}

impl Exec {
    fn new() -> Exec {
        let host = match Host::new(HostConfig::new(MEMORY, 1), Arc::new(YieldKicker)) {
            Ok(h) => h,
            Err(e) => {
                eprintln!("tdhost: cannot build the host: {e}");
                std::process::exit(2);
            }
        };
        let mut exec = Exec {
            host,
            requests: BTreeMap::new(),
            answers: BTreeMap::new(),
            summary: None,
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
                match self.accept(info) {
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
        self.requests.clear();
        self.answers.clear();
    }

    fn enter(&self) -> bool {
        self.host.module().vcpu_enter(0).is_ok()
    }

    fn leave(&self, exited: bool) {
        if !exited {
            let _ = self.host.module().vcpu_exit(0);
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

    fn accept(&mut self, page_info: u64) -> Answer {
        if !self.enter() {
            return Answer::Fatal(3);
        }
        let out = self.host.module().tdg_mem_page_accept(0, page_info);
        self.leave(matches!(out, Ok(TdcallOutcome::Exit(_))));
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

    fn answer(&mut self, req: Request) -> Answer {
        let name = match req {
            Request::Hello { .. } => "hello",
            Request::VpInfo => "vp_info",
            Request::VeInfo => "veinfo_get",
            Request::Accept { .. } => "accept",
            Request::MapGpa { .. } => "map_gpa",
            Request::Touch { .. } => "touch",
            Request::Done { .. } => "done",
        };
        *self.requests.entry(name).or_default() += 1;
        let a = self.answer_inner(req);
        let kind = match a {
            Answer::Regs(_) => "retired",
            Answer::Reexecute => "reexecute",
            Answer::InjectVe => "inject_ve",
            Answer::InjectDf => "inject_df",
            Answer::Ack => "ack",
            Answer::Fatal(_) => "fatal",
        };
        *self.answers.entry(kind).or_default() += 1;
        a
    }

    fn answer_inner(&mut self, req: Request) -> Answer {
        let m = self.host.module().clone();
        match req {
            Request::Hello { version } if version == wire::VERSION => Answer::Ack,
            Request::Hello { .. } => Answer::Fatal(9),
            Request::Done { status, counts, n } => {
                self.summary = Some((status, Summary::from_counts(&counts[..n])));
                Answer::Ack
            }
            Request::Accept { page_info } => self.accept(page_info),
            Request::VpInfo | Request::VeInfo => {
                if !self.enter() {
                    return Answer::Fatal(3);
                }
                let regs = if req == Request::VpInfo {
                    m.tdg_vp_info(0).map(|r| match r {
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
                    m.tdg_vp_veinfo_get(0).map(|r| match r {
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
                self.leave(false);
                regs.map_or(Answer::Fatal(3), Answer::Regs)
            }
            Request::MapGpa { start, len } => {
                if !self.enter() {
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
                let out = m.tdg_vp_vmcall(0, regs);
                self.leave(matches!(out, Ok(TdcallOutcome::Exit(_))));
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
                if !self.enter() {
                    return Answer::Fatal(3);
                }
                let access = write.map_or(Access::Read, Access::Write);
                let out = m.guest_access(0, gpa, access);
                self.leave(matches!(out, Ok(AccessOutcome::Exit(_))));
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
            map(&self.requests),
            map(&self.answers),
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

    /// Invariant checks at the end of a run; returns the violations.
    fn check(&self) -> Vec<String> {
        let mut bad = Vec::new();
        let m = self.host.module();
        if let Err(e) = m.check_tree() {
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
        let Some((status, s)) = self.summary else {
            bad.push("the image never reported DONE".into());
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

    fn report(&self, mode: &str) -> bool {
        if let Some((_, s)) = self.summary {
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
struct Direct(Arc<std::sync::Mutex<Exec>>);

impl Channel for Direct {
    fn call(&mut self, req: Request) -> Answer {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .answer(req)
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
    let exec = Arc::new(std::sync::Mutex::new(Exec::new()));
    let mut chan = Direct(exec.clone());
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
    let exec = exec
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    exec.report("in-process")
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
    let mut exec = Exec::new();
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
                        Ok(req) => exec.answer(req),
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
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--in-process" => in_proc = true,
            "--socket" => socket = it.next().cloned(),
            "--timeout" => timeout = it.next().and_then(|t| t.parse().ok()).unwrap_or(timeout),
            _ => {
                eprintln!("usage: tdhost (--socket PATH [--timeout SECS] | --in-process)");
                return ExitCode::from(2);
            }
        }
    }
    let ok = if in_proc {
        in_process()
    } else if let Some(path) = socket {
        match serve(&path, Duration::from_secs(timeout)) {
            Ok(ok) => ok,
            Err(e) => {
                eprintln!("tdhost: {e}");
                false
            }
        }
    } else {
        eprintln!("usage: tdhost (--socket PATH [--timeout SECS] | --in-process)");
        return ExitCode::from(2);
    };
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
