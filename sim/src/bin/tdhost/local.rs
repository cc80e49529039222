//! `tdhost --in-process`: the image's self-test run in this process against the same host code,
//! with no QEMU.

use std::sync::Arc;

use accept::abi::Gpaw;
use accept::acceptor::{AcceptPolicy, Acceptor};
use e2e_proto::selftest::{self, Channel, Platform, Scenario, VeHandler, WireMachine};
use e2e_proto::smp::{self, Smp, SmpStorage};
use e2e_proto::wire::{self, Answer, Request};

use crate::checks::SmpExtra;
use crate::exec::Exec;

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

pub(crate) fn in_process() -> bool {
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

/// The multi-CPU part in process: a thread per vCPU on a host of its own.
pub(crate) fn in_process_smp() -> bool {
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
