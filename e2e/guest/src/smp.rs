//! The multi-CPU part of the QEMU run: bringing up the application processors, their links to
//! `tdhost`, and the run of `e2e_proto::smp` on every vCPU.
//!
//! **Bring-up.** The boot vCPU copies the real-mode trampoline (boot.rs, `ap_trampoline`) to
//! [`TRAMPOLINE`] (below 1 MiB, page aligned), software-enables its local APIC and sends
//! INIT, then two STARTUP IPIs with vector `TRAMPOLINE >> 12` to all vCPUs but itself (the
//! MP-specification sequence; QEMU needs no delays between them, the image spins a little
//! after each anyway). Each AP runs the trampoline: real mode -> protected mode -> the
//! image's page tables, long mode -> its own stack -> [`ap_rust_start`], which loads the GDT, its
//! TSS and the IDT and reports in.
//!
//! **Links.** Each vCPU's requests go through its own mailbox (`e2e_proto::mailbox`) in guest
//! RAM, which `tdhost` reads through QEMU's memory-backend file: every vCPU can have a request
//! in flight at the same time. The #UD handler of a vCPU uses that vCPU's mailbox once
//! [`MAILBOXES`] is set.

use core::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, AtomicUsize, Ordering};

use accept::abi::Gpaw;
use accept::acceptor::{AcceptPolicy, Acceptor};
use accept::hw::HwTdcall;
use accept::Tdcall;
use e2e_proto::mailbox;
use e2e_proto::selftest::{Channel, WireMachine, WireTdcall};
use e2e_proto::smp::{self, Smp, SmpStorage};
use e2e_proto::wire::{self, Answer, Request, MAX_FRAME};

use crate::arch::{self, EXIT_FAIL, EXIT_PASS, LAPIC};
use crate::qemu::{BareMetal, Serial, TCG_TDX};
use crate::{println, trap};

/// Where the AP trampoline runs (STARTUP vector 0x08).
const TRAMPOLINE: u64 = 0x8000;
/// Spins to wait for the APs to report in (seconds under TCG).
const ONLINE_SPINS: u64 = 1 << 30;

/// Set once the vCPUs talk to `tdhost` through their mailboxes.
pub static MAILBOXES: AtomicBool = AtomicBool::new(false);
/// APs that reported in.
static ONLINE: AtomicUsize = AtomicUsize::new(0);
/// APs that finished the multi-CPU part.
static FINISHED: AtomicUsize = AtomicUsize::new(0);
/// The shared state, published by the boot vCPU once built.
static SHARED: AtomicPtr<Smp<'static>> = AtomicPtr::new(core::ptr::null_mut());
/// The storage the shared state borrows.
static STORAGE: SmpStorage = SmpStorage::new();

extern "C" {
    static ap_trampoline: u8;
    static ap_trampoline_end: u8;
}

/// vCPU `cpu`'s mailbox: one request in flight.
#[derive(Debug, Clone, Copy)]
pub struct Mailbox(pub usize);

impl Mailbox {
    fn at(&self, off: u64) -> u64 {
        mailbox::gpa(self.0 as u64) + off
    }

    fn seq(&self, off: u64) -> &'static AtomicU64 {
        // SAFETY: the mailbox page is in the image's identity-mapped, accepted memory
        // (`[0, 8 MiB)`, clear of the image itself), 8-byte aligned, used only through atomics
        // by this vCPU and by `tdhost` through the RAM file.
        unsafe { &*(self.at(off) as *const AtomicU64) }
    }
}

impl Channel for Mailbox {
    fn call(&mut self, req: Request) -> Answer {
        let mut out = [0u8; MAX_FRAME];
        let n = req.to_frame().encode(&mut out);
        let frame = self.at(mailbox::REQ_FRAME) as *mut u8;
        for (i, &b) in out[..n].iter().enumerate() {
            // SAFETY: `[REQ_FRAME, REQ_FRAME + MAX_FRAME)` of this vCPU's mailbox page (see
            // `seq`); the host reads it only after the sequence number below changes.
            unsafe { frame.add(i).write_volatile(b) };
        }
        let next = self.seq(mailbox::REQ_SEQ).load(Ordering::Relaxed) + 1;
        self.seq(mailbox::REQ_SEQ).store(next, Ordering::Release);
        while self.seq(mailbox::ANS_SEQ).load(Ordering::Acquire) != next {
            core::hint::spin_loop();
        }
        let mut buf = [0u8; MAX_FRAME];
        let answer = self.at(mailbox::ANS_FRAME) as *const u8;
        for (i, b) in buf.iter_mut().enumerate() {
            // SAFETY: `[ANS_FRAME, ANS_FRAME + MAX_FRAME)` of this vCPU's mailbox page, which the
            // host wrote before publishing `next`.
            *b = unsafe { answer.add(i).read_volatile() };
        }
        match wire::decode(&buf).map(|f| Answer::from_frame(&f)) {
            Ok(Ok(a)) => a,
            _ => Answer::Fatal(0xBAD),
        }
    }
}

fn lapic_write(reg: u64, value: u32) {
    // SAFETY: a register of the local APIC page, identity mapped uncached by boot.rs.
    unsafe { ((LAPIC + reg) as *mut u32).write_volatile(value) };
}

fn lapic_read(reg: u64) -> u32 {
    // SAFETY: as in `lapic_write`; reading the ICR or SVR has no side effect.
    unsafe { ((LAPIC + reg) as *const u32).read_volatile() }
}

fn spin(n: u64) {
    for _ in 0..n {
        core::hint::spin_loop();
    }
}

/// Sends one IPI to all vCPUs but this one and waits until the APIC has sent it.
fn ipi_all_but_self(low: u32) {
    const ICR_LOW: u64 = 0x300;
    const ICR_HIGH: u64 = 0x310;
    const SHORTHAND_ALL_BUT_SELF: u32 = 3 << 18;
    const DELIVERY_PENDING: u32 = 1 << 12;
    lapic_write(ICR_HIGH, 0);
    lapic_write(ICR_LOW, SHORTHAND_ALL_BUT_SELF | low);
    while lapic_read(ICR_LOW) & DELIVERY_PENDING != 0 {
        core::hint::spin_loop();
    }
}

/// INIT-SIPI-SIPI; returns the number of APs that reported in.
fn start_aps(want: usize) -> usize {
    // Symbols of the trampoline's code: only their addresses are taken.
    let (start, end) = (
        core::ptr::addr_of!(ap_trampoline) as usize,
        core::ptr::addr_of!(ap_trampoline_end) as usize,
    );
    // SAFETY: `[TRAMPOLINE, TRAMPOLINE + len)` (len < 4 KiB) is identity-mapped RAM of the
    // image's accepted memory that nothing else uses; the source is the image's code.
    unsafe {
        core::ptr::copy_nonoverlapping(start as *const u8, TRAMPOLINE as *mut u8, end - start);
    }
    const SVR: u64 = 0xF0;
    lapic_write(SVR, lapic_read(SVR) | 0x100 | 0xFF);
    const INIT: u32 = 5 << 8 | 1 << 14;
    const STARTUP: u32 = 6 << 8 | 1 << 14;
    ipi_all_but_self(INIT);
    spin(100_000);
    for _ in 0..2 {
        ipi_all_but_self(STARTUP | (TRAMPOLINE >> 12) as u32);
        spin(20_000);
    }
    for _ in 0..ONLINE_SPINS {
        if ONLINE.load(Ordering::Acquire) >= want {
            break;
        }
        core::hint::spin_loop();
    }
    ONLINE.load(Ordering::Acquire)
}

/// Entry of every AP (boot.rs `ap_start64`), on its own stack.
#[no_mangle]
extern "C" fn ap_rust_start(_arrival: u32) -> ! {
    let cpu = arch::cpu_index();
    arch::install_cpu(cpu);
    ONLINE.fetch_add(1, Ordering::AcqRel);
    let shared = loop {
        let p = SHARED.load(Ordering::Acquire);
        if !p.is_null() {
            break p;
        }
        core::hint::spin_loop();
    };
    // SAFETY: the boot vCPU published a pointer to state on its stack that it keeps alive
    // until every AP has counted itself in `FINISHED` (it never returns from `run`).
    let shared = unsafe { &*shared };
    run_cpu(cpu, shared);
    FINISHED.fetch_add(1, Ordering::AcqRel);
    loop {
        // SAFETY: this AP is done; `hlt` with interrupts off parks it for good.
        unsafe { core::arch::asm!("cli; hlt", options(nomem, nostack)) };
    }
}

fn run_cpu(cpu: usize, shared: &Smp<'_>) {
    match trap::path() {
        trap::Path::Trap => {
            let mut machine = WireMachine {
                chan: Mailbox(cpu),
                platform: BareMetal,
                td: HwTdcall,
            };
            shared.run_cpu(cpu, &mut machine);
        }
        trap::Path::Module => shared.run_cpu(cpu, &mut { TCG_TDX }),
        trap::Path::Wire => shared.run_cpu(cpu, &mut WireMachine::new(Mailbox(cpu), BareMetal)),
    }
}

fn fail(why: &str) -> ! {
    println!("TDMEM-GUEST-SMP-RESULT FAILED {why}");
    arch::exit(EXIT_FAIL)
}

/// The multi-CPU part, on the boot vCPU after the single-vCPU part. Never returns.
pub fn run() -> ! {
    let module = trap::path() == trap::Path::Module;
    // Under TCG-TDX nothing goes through the mailboxes but nothing traps either.
    MAILBOXES.store(!module, Ordering::Release);
    let gpaw = match trap::path() {
        trap::Path::Trap | trap::Path::Module => HwTdcall.vp_info(),
        trap::Path::Wire => WireTdcall::new(Mailbox(0)).vp_info(),
    }
    .map_or(Gpaw::Bits48, |i| i.gpaw);
    let want = smp::CPUS - 1;
    let online = start_aps(want);
    println!(
        "smp: {online} application processors online (INIT-SIPI-SIPI, trampoline at \
         {TRAMPOLINE:#x}); {} vCPUs, each with a mailbox at {:#x} + 4 KiB x vCPU",
        online + 1,
        mailbox::BASE
    );
    if online != want {
        fail("aps-missing");
    }
    let acceptor = Acceptor::new(gpaw, AcceptPolicy::default());
    let Some(shared) = Smp::new(&acceptor, &STORAGE) else {
        fail("no-tracker")
    };
    SHARED.store(
        core::ptr::addr_of!(shared) as *mut Smp<'static>,
        Ordering::Release,
    );
    run_cpu(0, &shared);
    while FINISHED.load(Ordering::Acquire) < want {
        core::hint::spin_loop();
    }
    let sum = shared.summary();
    let (handled, meanwhile) = shared.ve_verdicts();
    let mut traps = 0;
    let mut reexecuted = 0;
    for (cpu, st) in trap::STATS.iter().enumerate().take(smp::CPUS) {
        let t = st.traps.load(Ordering::Relaxed);
        let r = st.reexecuted.load(Ordering::Relaxed);
        println!("smp: cpu{cpu}: {t} TDCALL traps ({r} re-executed)");
        traps += t;
        reexecuted += r;
    }
    println!(
        "TDMEM-GUEST-SMP vcpus={} traps={traps} reexecuted={reexecuted} ve={} ve_handled={handled} \
         ve_accepted_meanwhile={meanwhile}",
        smp::CPUS,
        sum.ves
    );
    println!("TDMEM-GUEST-SMP-RESULT {sum}");
    let pass = sum.failed == 0 && sum.passed == smp::CPUS as u64 * Smp::TESTS_PER_CPU;
    let (counts, n) = shared.done_counts();
    let done = Request::Done {
        status: u64::from(!pass),
        counts,
        n,
    };
    // Under TCG-TDX the control link stays COM2, as in the single-vCPU part.
    let ack = if module {
        Serial.call(done)
    } else {
        Mailbox(0).call(done)
    };
    println!("tdhost: multi-CPU part done ({ack:?})");
    arch::exit(if pass { EXIT_PASS } else { EXIT_FAIL });
}
