//! The bare-metal test image of tdmem.
//!
//! Two ways to run it, one binary format (an ELF linked at 1 MiB):
//!
//! - **QEMU TCG** (default build): `qemu-system-x86_64 -kernel image` boots it through the PVH
//!   note (boot.rs). TCG has no TDX: the engine's real TDCALL backend (`accept::hw`) executes
//!   the TDCALL instruction, TCG raises #UD, and the #UD handler (trap.rs) sends the register
//!   block to `tdhost` over COM2 (`e2e_proto::wire`), which runs the TDX-module emulator and
//!   the host half; the handler writes the output registers back and steps over it. Memory
//!   touches of the self-test are requests too. If TDCALL does not trap (checked once at
//!   start), each TDCALL is a request instead (`WireTdcall`); the log says which path ran.
//!   When `tdhost` answers "inject #VE", the image executes `int 20`: a real exception
//!   delivered through IDT gate 20 to the #VE handler (a software interrupt, not a
//!   hardware-raised #VE; the log says so), which reads VE info and accepts with further
//!   TDCALLs, returns with `iretq`, and the access is retried. After this single-vCPU part the
//!   image starts the other vCPUs (smp.rs: INIT-SIPI-SIPI, `-smp 4`) and all of them run the
//!   multi-CPU self-test (`e2e_proto::smp`), each over its own shared-memory mailbox.
//! - **QEMU with the TCG-TDX patch** (default build, `cargo xtask e2e --tcg-tdx`): the probe
//!   TDCALL executes and a module answers it (`tdcall: path=module`): TDCALLs run for real
//!   through `accept::hw`, served by the module emulator in `tdhost`, and every access to
//!   private memory is checked against its Secure-EPT, so a touch is a plain load or store that
//!   raises #VE by itself on a pending page. COM2 carries only the hello and the DONEs.
//! - **td-shim payload** (feature `tdx`): td-shim jumps to the ELF entry in long mode with the
//!   TD HOB list; TDCALLs are real (`accept::hw`), the plan comes from the HOB list, and the #VE
//!   test touches a pending page for real, so the TDX module raises #VE through the same gate.
//!
//! COM1 carries the log and the machine-readable result lines `TDMEM-GUEST-RESULT ...` and
//! `TDMEM-GUEST-SMP-RESULT ...`; QEMU's
//! `isa-debug-exit` device turns the verdict into QEMU's exit status (33 = pass).
#![no_std]
#![no_main]

mod arch;
mod boot;
mod realtd;
#[cfg(not(feature = "tdx"))]
mod smp;
#[cfg(feature = "tdx")]
mod tdx;
#[cfg(not(feature = "tdx"))]
mod trap;

use core::panic::PanicInfo;
use core::sync::atomic::{AtomicU64, Ordering};

use accept::ve::VeVerdict;
use e2e_proto::selftest::VeHandler;

use arch::{Frame, Global, EXIT_FAIL, EXIT_PASS};

/// Per vCPU, the #VE handler the current touch armed (`None` outside a touch).
static VE_HANDLER: Global<[Option<*mut (dyn VeHandler + 'static)>; arch::MAX_CPUS]> =
    Global::new([None; arch::MAX_CPUS]);
/// #VEs delivered through the IDT, all vCPUs.
static VE_ENTRIES: AtomicU64 = AtomicU64::new(0);

/// This vCPU's #VE handler slot.
fn ve_slot() -> *mut Option<*mut (dyn VeHandler + 'static)> {
    let cpu = arch::cpu_index().min(arch::MAX_CPUS - 1);
    // SAFETY: in bounds; only the address of this vCPU's element is taken.
    unsafe { core::ptr::addr_of_mut!((*VE_HANDLER.get())[cpu]) }
}

/// Arms the #VE gate with `handler` for the duration of `f`.
pub fn with_ve_handler<R>(handler: &mut dyn VeHandler, f: impl FnOnce() -> R) -> R {
    // SAFETY: the lifetime is erased only for the duration of `f`; the pointer is cleared
    // before `handler`'s borrow ends, and only the #VE entry on this vCPU reads it (from its
    // own slot), while `f` runs.
    let ptr: *mut (dyn VeHandler + 'static) = unsafe { core::mem::transmute(handler) };
    // SAFETY: this vCPU's slot; no #VE can be in flight on this vCPU while it is written.
    unsafe { *ve_slot() = Some(ptr) };
    let r = f();
    // SAFETY: as above.
    unsafe { *ve_slot() = None };
    r
}

/// A real load (and store, with `write`) of the 8-byte word at `gpa`, with `handler` armed for
/// the #VE the access raises when its page is pending: the handler accepts the page, `iretq`
/// returns to the access, and the CPU runs it again. Returns the word read.
///
/// # Safety
/// `gpa` must be 8-byte aligned guest RAM, identity mapped, that nothing else references.
pub unsafe fn real_touch(gpa: u64, write: Option<u64>, handler: &mut dyn VeHandler) -> u64 {
    let p = gpa as *mut u64;
    with_ve_handler(handler, || {
        // SAFETY: the caller's contract.
        unsafe {
            if let Some(v) = write {
                p.write_volatile(v);
            }
            p.read_volatile()
        }
    })
}

/// Called by the exception stubs (boot.rs) with the saved registers.
#[no_mangle]
extern "C" fn exception_dispatch(frame: &mut Frame) {
    match frame.vector {
        20 => ve_entry(frame),
        #[cfg(not(feature = "tdx"))]
        6 => qemu::ud(frame),
        8 => {
            println!("#DF: double fault at rip={:#x} (on IST1)", frame.rip);
            println!("TDMEM-GUEST-RESULT FAILED double-fault");
            arch::exit(EXIT_FAIL);
        }
        v => {
            println!(
                "exception {v} error={:#x} rip={:#x} cr2={:#x}",
                frame.error,
                frame.rip,
                arch::cr2()
            );
            println!("TDMEM-GUEST-RESULT FAILED exception-{v}");
            arch::exit(EXIT_FAIL);
        }
    }
}

/// Who raised the #VE, for the log.
fn ve_source() -> &'static str {
    #[cfg(feature = "tdx")]
    return "raised by the TDX module";
    #[cfg(not(feature = "tdx"))]
    match trap::path() {
        trap::Path::Module => {
            "raised by the access itself: the module emulator injected it at QEMU's TLB fill"
        }
        _ => "software `int 20` on tdhost's inject-#VE answer",
    }
}

fn ve_entry(frame: &mut Frame) {
    let n = VE_ENTRIES.fetch_add(1, Ordering::Relaxed) + 1;
    println!(
        "ve: cpu{}: #VE #{n} entered through IDT gate 20, rip={:#x} rsp={:#x} ({})",
        arch::cpu_index(),
        frame.rip,
        frame.rsp,
        ve_source()
    );
    // SAFETY: the slot holds a live handler while a touch is in progress (with_ve_handler),
    // and nothing else uses that handler until this returns.
    let handler = unsafe { *ve_slot() };
    let Some(handler) = handler else {
        println!("ve: no handler armed: unexpected #VE");
        println!("TDMEM-GUEST-RESULT FAILED unexpected-ve");
        arch::exit(EXIT_FAIL);
    };
    // SAFETY: see above; the pointer came from a `&mut dyn VeHandler` that outlives the touch.
    let verdict = unsafe { (*handler).handle() };
    match verdict {
        VeVerdict::Handled { gpa, unit } => {
            println!("ve: VEINFO.GET gpa={gpa}, accepted unit {unit}; iretq, access retried")
        }
        VeVerdict::AcceptedMeanwhile { gpa, .. } => {
            println!("ve: {gpa} accepted meanwhile; iretq, access retried")
        }
        other => {
            println!("ve: fatal verdict {other:?}");
            println!("TDMEM-GUEST-RESULT FAILED ve-verdict");
            arch::exit(EXIT_FAIL);
        }
    }
}

#[cfg(not(feature = "tdx"))]
mod qemu {
    //! The QEMU TCG run: the serial transport to `tdhost` and the bare-metal platform.

    use accept::hw::HwTdcall;
    use e2e_proto::selftest::{self, Channel, Platform, Scenario, Summary, VeHandler, WireMachine};
    use e2e_proto::wire::{self, Answer, Decoder, Request, MAX_FRAME};

    use crate::arch::{self, Frame, COM2, EXIT_FAIL};
    use crate::realtd::RealTd;
    use crate::{println, trap};

    /// The link to `tdhost` on COM2: one frame out, one frame back.
    #[derive(Debug, Clone, Copy)]
    pub struct Serial;

    impl Channel for Serial {
        fn call(&mut self, req: Request) -> Answer {
            let mut out = [0u8; MAX_FRAME];
            let n = req.to_frame().encode(&mut out);
            for &b in &out[..n] {
                arch::uart_put(COM2, b);
            }
            let mut dec = Decoder::new();
            loop {
                match dec.push(arch::uart_get(COM2)) {
                    None => continue,
                    Some(Ok(f)) => return Answer::from_frame(&f).unwrap_or(Answer::Fatal(0xBAD)),
                    Some(Err(_)) => return Answer::Fatal(0xBAD),
                }
            }
        }
    }

    /// Real RAM, a real IDT.
    #[derive(Debug)]
    pub(crate) struct BareMetal;

    impl Platform for BareMetal {
        fn access(&mut self, gpa: u64, write: Option<u64>) {
            let p = gpa as *mut u64;
            // SAFETY: `gpa` is 8-byte aligned RAM below 1 GiB (identity mapped by boot.rs,
            // inside QEMU's 512 MiB), outside the image ([0, 8 MiB)), and the self-test uses
            // it for nothing else.
            unsafe {
                match write {
                    Some(v) => p.write_volatile(v),
                    None => {
                        let _ = p.read_volatile();
                    }
                }
            }
        }

        fn raise_ve(&mut self, handler: &mut dyn VeHandler) {
            crate::with_ve_handler(handler, arch::int20);
        }

        fn memory(&mut self, gpa: u64, len: usize) -> Option<&mut [u8]> {
            crate::realtd::ram(gpa, len, TABLE_RAM)
        }

        fn log(&mut self, args: core::fmt::Arguments<'_>) {
            println!("{args}");
        }
    }

    /// Under the patched QEMU of `cargo xtask e2e --tcg-tdx`: TDCALL executes (QEMU hands it
    /// to the module emulator in `tdhost`) and every access to private memory is checked
    /// against its Secure-EPT, so a touch of a pending page raises #VE by itself.
    pub(crate) const TCG_TDX: RealTd = RealTd { table: TABLE_RAM };

    /// Where the boot plan may put the unaccepted table: RAM above the image.
    const TABLE_RAM: (u64, u64) = (selftest::IMAGE_END, selftest::MEMORY);

    /// The #UD gate: a TDCALL is served over this vCPU's link (COM2 for the single-vCPU part,
    /// then the vCPU's mailbox).
    pub fn ud(frame: &mut Frame) {
        let cpu = arch::cpu_index();
        if crate::smp::MAILBOXES.load(core::sync::atomic::Ordering::Acquire) {
            trap::ud(cpu, frame, &mut crate::smp::Mailbox(cpu));
        } else {
            trap::ud(cpu, frame, &mut Serial);
        }
    }

    pub fn run() -> ! {
        arch::uart_init(COM2);
        let mut chan = Serial;
        match chan.call(Request::Hello {
            version: wire::VERSION,
        }) {
            Answer::Ack => println!("tdhost: connected on COM2"),
            other => {
                println!("tdhost: bad hello answer {other:?}");
                println!("TDMEM-GUEST-RESULT FAILED no-host");
                arch::exit(EXIT_FAIL);
            }
        }
        let sum: Summary = match trap::probe() {
            trap::Path::Trap => {
                println!(
                    "tdcall: path=trap (TDCALL 66 0F 01 CC raised #UD; accept::hw runs, the #UD \
                     handler serves each TDCALL)"
                );
                let mut machine = WireMachine {
                    chan,
                    platform: BareMetal,
                    td: HwTdcall,
                };
                selftest::run(&mut machine, &Scenario::QEMU_E2E)
            }
            trap::Path::Module => {
                arch::PORT_IO_BY_TDVMCALL.store(true, core::sync::atomic::Ordering::Relaxed);
                println!(
                    "tdcall: path=module (TDCALL 66 0F 01 CC executed: QEMU serves it from the \
                     module emulator; accesses are checked against its Secure-EPT; port I/O \
                     through TDG.VP.VMCALL<Instruction.IO>)"
                );
                selftest::run(&mut { TCG_TDX }, &Scenario::QEMU_E2E)
            }
            trap::Path::Wire => {
                println!("tdcall: path=wire (TDCALL did not raise #UD: each TDCALL is a request)");
                let mut machine = WireMachine::new(chan, BareMetal);
                selftest::run(&mut machine, &Scenario::QEMU_E2E)
            }
        };
        let st = &trap::STATS[0];
        println!(
            "TDMEM-GUEST-TRAPS cpu=0 traps={} reexecuted={}",
            st.traps.load(core::sync::atomic::Ordering::Relaxed),
            st.reexecuted.load(core::sync::atomic::Ordering::Relaxed)
        );
        println!("TDMEM-GUEST-RESULT {sum}");
        let (counts, n) = sum.counts();
        let pass = sum.failed == 0 && sum.passed > 0;
        let ack = chan.call(Request::Done {
            status: u64::from(!pass),
            counts,
            n,
        });
        println!("tdhost: done ({ack:?})");
        if !pass {
            arch::exit(EXIT_FAIL);
        }
        crate::smp::run()
    }
}

/// PVH entry (boot.rs), in long mode on the image's stack.
#[no_mangle]
extern "C" fn rust_start(_start_info: u64) -> ! {
    arch::uart_init(arch::COM1);
    println!("tdmem e2e image: PVH entry, long mode, identity map of 1 GiB");
    arch::install_idt();
    println!("IDT loaded: #VE gate 20, #DF gate 8 on IST1, vectors 0-31 fatal otherwise");
    #[cfg(not(feature = "tdx"))]
    qemu::run();
    #[cfg(feature = "tdx")]
    {
        println!("built for a TD (feature tdx): boot it as a td-shim payload, not via PVH");
        println!("TDMEM-GUEST-RESULT FAILED wrong-entry");
        arch::exit(EXIT_FAIL);
    }
}

/// td-shim payload entry (boot.rs): `hob` is the TD HOB list.
#[no_mangle]
extern "C" fn payload_start(hob: u64, _payload: u64) -> ! {
    arch::uart_init(arch::COM1);
    println!("tdmem e2e image: td-shim payload entry, HOB list at {hob:#x}");
    arch::install_idt();
    println!("IDT loaded: #VE gate 20, #DF gate 8 on IST1");
    #[cfg(feature = "tdx")]
    tdx::run(hob);
    #[cfg(not(feature = "tdx"))]
    {
        println!("built without feature tdx: the payload entry needs the real TDCALL backend");
        println!("TDMEM-GUEST-RESULT FAILED wrong-entry");
        arch::exit(EXIT_FAIL);
    }
}

/// `td-shim-interface` (the HOB layouts) links `alloc` for parts of it this image never calls,
/// so the binary needs a global allocator. None of the image's code allocates: this one always
/// fails, which would end in the panic handler.
struct NoAlloc;

// SAFETY: `alloc` returns null (allocation failure), which the contract allows; `dealloc` is
// never given a pointer because none is ever handed out.
unsafe impl core::alloc::GlobalAlloc for NoAlloc {
    unsafe fn alloc(&self, _layout: core::alloc::Layout) -> *mut u8 {
        core::ptr::null_mut()
    }
    unsafe fn dealloc(&self, _ptr: *mut u8, _layout: core::alloc::Layout) {}
}

#[global_allocator]
static ALLOC: NoAlloc = NoAlloc;

#[panic_handler]
fn panic(info: &PanicInfo<'_>) -> ! {
    println!("panic: {info}");
    println!("TDMEM-GUEST-RESULT FAILED panic");
    arch::exit(EXIT_FAIL)
}

/// Keeps `EXIT_PASS` referenced in every build.
const _: u8 = EXIT_PASS;
