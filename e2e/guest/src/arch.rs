//! x86 plumbing: port I/O, the 16550 UARTs, the TSS (an IST stack for #DF), the IDT, and the
//! `isa-debug-exit` device QEMU uses to return the image's verdict as its exit status.

use core::arch::asm;
use core::cell::UnsafeCell;
use core::fmt;
use core::sync::atomic::{AtomicUsize, Ordering};

/// COM1: the human-readable log.
pub const COM1: u16 = 0x3F8;
/// COM2: the link to `tdhost`.
#[cfg(not(feature = "tdx"))]
pub const COM2: u16 = 0x2F8;
/// QEMU `-device isa-debug-exit,iobase=0xf4,iosize=4`.
const DEBUG_EXIT: u16 = 0xF4;
/// Value written to the debug-exit port on success (QEMU exits with `(v << 1) | 1` = 33).
pub const EXIT_PASS: u8 = 0x10;
/// On failure (QEMU exit status 35).
pub const EXIT_FAIL: u8 = 0x11;

/// Most vCPUs the image runs on (QEMU `-smp 4`).
pub const MAX_CPUS: usize = 4;
/// The local APIC's registers (xAPIC MMIO, mapped uncached by boot.rs).
#[cfg(not(feature = "tdx"))]
pub const LAPIC: u64 = 0xFEE0_0000;

/// This vCPU's index: its local APIC ID (QEMU numbers them 0..N). Always 0 in a TD, where the
/// image runs on the boot vCPU only.
pub fn cpu_index() -> usize {
    #[cfg(not(feature = "tdx"))]
    {
        // SAFETY: the APIC ID register (offset 0x20) of the local APIC page, identity mapped
        // uncached by boot.rs; reading it has no side effect.
        let id = unsafe { ((LAPIC + 0x20) as *const u32).read_volatile() } >> 24;
        id as usize
    }
    #[cfg(feature = "tdx")]
    {
        0
    }
}

/// The vCPU printing on COM1 (`usize::MAX`: none), so lines of several vCPUs do not mix.
static LOG_OWNER: AtomicUsize = AtomicUsize::new(usize::MAX);

/// Holds COM1 for one line. Re-entrant on the same vCPU (an exception taken while printing).
#[derive(Debug)]
pub struct LogLock {
    held: bool,
}

impl LogLock {
    /// Waits for COM1.
    pub fn acquire() -> LogLock {
        let me = cpu_index();
        if LOG_OWNER.load(Ordering::Relaxed) == me {
            return LogLock { held: false };
        }
        while LOG_OWNER
            .compare_exchange_weak(usize::MAX, me, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            core::hint::spin_loop();
        }
        LogLock { held: true }
    }
}

impl Drop for LogLock {
    fn drop(&mut self) {
        if self.held {
            LOG_OWNER.store(usize::MAX, Ordering::Release);
        }
    }
}

/// A cell for globals written during single-vCPU setup, or indexed by vCPU.
pub struct Global<T>(UnsafeCell<T>);

// SAFETY: every access is either during setup on the boot vCPU before the others start, or
// to a per-vCPU element (indexed by `cpu_index`) from that vCPU or from an exception it entered
// synchronously (`int 20`, #UD), never concurrently.
unsafe impl<T> Sync for Global<T> {}

impl<T> Global<T> {
    /// A global with this value.
    pub const fn new(v: T) -> Global<T> {
        Global(UnsafeCell::new(v))
    }

    /// Raw access.
    pub fn get(&self) -> *mut T {
        self.0.get()
    }
}

/// Set on the module path of the QEMU run (`trap::Path::Module`): port I/O goes through
/// TDG.VP.VMCALL<Instruction.IO>, as in a TD, and the patched QEMU hands it to its devices.
#[cfg(not(feature = "tdx"))]
pub static PORT_IO_BY_TDVMCALL: core::sync::atomic::AtomicBool =
    core::sync::atomic::AtomicBool::new(false);

#[cfg(not(feature = "tdx"))]
fn port_io_by_tdvmcall() -> bool {
    PORT_IO_BY_TDVMCALL.load(core::sync::atomic::Ordering::Relaxed)
}

/// Writes a byte to an I/O port.
pub fn outb(port: u16, value: u8) {
    #[cfg(not(feature = "tdx"))]
    if port_io_by_tdvmcall() {
        tdx_tdcall::tdx::tdvmcall_io_write_8(port, value);
    } else {
        // SAFETY: port I/O to the UARTs and the debug-exit device only; no memory is touched.
        unsafe {
            asm!("out dx, al", in("dx") port, in("al") value, options(nomem, nostack, preserves_flags));
        }
    }
    #[cfg(feature = "tdx")]
    // Inside a TD, port I/O is a TDVMCALL<Instruction.IO> (an `out` would raise #VE).
    tdx_tdcall::tdx::tdvmcall_io_write_8(port, value);
}

/// Reads a byte from an I/O port.
pub fn inb(port: u16) -> u8 {
    #[cfg(not(feature = "tdx"))]
    {
        if port_io_by_tdvmcall() {
            return tdx_tdcall::tdx::tdvmcall_io_read_8(port);
        }
        let value: u8;
        // SAFETY: port I/O to the UARTs only; no memory is touched.
        unsafe {
            asm!("in al, dx", out("al") value, in("dx") port, options(nomem, nostack, preserves_flags));
        }
        value
    }
    #[cfg(feature = "tdx")]
    {
        tdx_tdcall::tdx::tdvmcall_io_read_8(port)
    }
}

/// Programs a 16550 for 115200 8N1 with FIFOs (QEMU ignores the rate for a socket or file).
pub fn uart_init(base: u16) {
    outb(base + 1, 0x00); // no interrupts
    outb(base + 3, 0x80); // DLAB
    outb(base, 0x01); // divisor 1
    outb(base + 1, 0x00);
    outb(base + 3, 0x03); // 8N1
    outb(base + 2, 0xC7); // FIFOs on, cleared
    outb(base + 4, 0x03); // DTR, RTS
}

/// Sends one byte, waiting for room.
pub fn uart_put(base: u16, b: u8) {
    while inb(base + 5) & 0x20 == 0 {
        core::hint::spin_loop();
    }
    outb(base, b);
}

/// Receives one byte, waiting for it.
#[cfg(not(feature = "tdx"))]
pub fn uart_get(base: u16) -> u8 {
    while inb(base + 5) & 0x01 == 0 {
        core::hint::spin_loop();
    }
    inb(base)
}

/// The COM1 log as a `fmt::Write`.
#[derive(Debug, Clone, Copy)]
pub struct Log;

impl fmt::Write for Log {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for b in s.bytes() {
            if b == b'\n' {
                uart_put(COM1, b'\r');
            }
            uart_put(COM1, b);
        }
        Ok(())
    }
}

/// Prints a line on COM1.
#[macro_export]
macro_rules! println {
    ($($arg:tt)*) => {{
        use core::fmt::Write as _;
        let _line = $crate::arch::LogLock::acquire();
        let _ = writeln!($crate::arch::Log, $($arg)*);
    }};
}

/// Ends the run: QEMU exits with `(code << 1) | 1`. Outside QEMU (a TD), halts.
pub fn exit(code: u8) -> ! {
    outb(DEBUG_EXIT, code);
    loop {
        // SAFETY: `hlt` with interrupts disabled stops this vCPU; nothing else runs.
        unsafe { asm!("cli; hlt", options(nomem, nostack)) };
    }
}

/// Registers saved by the exception stubs (boot.rs), lowest address first.
#[repr(C)]
#[derive(Debug)]
pub struct Frame {
    /// General registers, in reverse push order.
    pub r15: u64,
    pub r14: u64,
    pub r13: u64,
    pub r12: u64,
    pub r11: u64,
    pub r10: u64,
    pub r9: u64,
    pub r8: u64,
    pub rbp: u64,
    pub rdi: u64,
    pub rsi: u64,
    pub rdx: u64,
    pub rcx: u64,
    pub rbx: u64,
    pub rax: u64,
    /// Vector pushed by the stub.
    pub vector: u64,
    /// Error code (0 when the CPU pushes none).
    pub error: u64,
    /// CPU-pushed frame.
    pub rip: u64,
    pub cs: u64,
    pub rflags: u64,
    pub rsp: u64,
    pub ss: u64,
}

#[repr(C, packed)]
struct Tss {
    reserved0: u32,
    rsp: [u64; 3],
    reserved1: u64,
    ist: [u64; 7],
    reserved2: u64,
    reserved3: u16,
    iomap_base: u16,
}

#[repr(C, align(16))]
#[derive(Clone, Copy)]
struct Gate([u64; 2]);

const TSS_INIT: Tss = Tss {
    reserved0: 0,
    rsp: [0; 3],
    reserved1: 0,
    ist: [0; 7],
    reserved2: 0,
    reserved3: 0,
    iomap_base: 104,
};
static TSS: Global<[Tss; MAX_CPUS]> = Global::new([TSS_INIT; MAX_CPUS]);
static IDT: Global<[Gate; 256]> = Global::new([Gate([0, 0]); 256]);

/// A #DF stack.
#[repr(C, align(16))]
struct DfStack([u8; 16384]);

static DF_STACKS: Global<[DfStack; MAX_CPUS]> =
    Global::new([const { DfStack([0; 16384]) }; MAX_CPUS]);

extern "C" {
    static isr_table: [u64; 32];
    static mut gdt64: [u64; GDT_SLOTS];
}

/// Null, code 0x08, data 0x10, then a TSS descriptor (two slots) per vCPU from 0x18.
const GDT_SLOTS: usize = 3 + 2 * MAX_CPUS;
/// Vector of #DF, which runs on IST1.
const DF_VECTOR: usize = 8;

/// Loads the boot vCPU's GDT (code 0x08, data 0x10, TSS 0x18; td-shim's GDT has no TSS slot
/// for us), its TSS (IST1 = its #DF stack) and builds and loads the IDT, whose vectors 0-31 go
/// to the stubs.
pub fn install_idt() {
    // SAFETY: single-threaded setup on the boot vCPU; `IDT` is a static that lives forever and
    // `isr_table` holds the 32 stub addresses; selector 0x08 is the 64-bit code segment.
    unsafe {
        let idt = IDT.get();
        let table = core::ptr::addr_of!(isr_table);
        for v in 0..32 {
            let h = (*table)[v];
            let ist = if v == DF_VECTOR { 1 } else { 0 };
            let low = (h & 0xFFFF)
                | (0x08 << 16)
                | (ist << 32)
                | (0x8E << 40)
                | (((h >> 16) & 0xFFFF) << 48);
            (*idt)[v] = Gate([low, h >> 32]);
        }
    }
    install_cpu(0);
}

/// Loads the image's GDT, vCPU `cpu`'s TSS and the IDT (built by [`install_idt`]) on this vCPU.
pub fn install_cpu(cpu: usize) {
    let cpu = cpu.min(MAX_CPUS - 1);
    // SAFETY: each vCPU writes only its own TSS and its own two GDT slots (3 + 2 cpu), once,
    // before it takes any exception; `gdt64` is the live GDT (boot.rs), writable, with
    // `GDT_SLOTS` slots; the TSS and #DF stacks are statics that live forever; selector 0x08
    // is the 64-bit code segment and 0x10 the data segment.
    unsafe {
        let tss = core::ptr::addr_of_mut!((*TSS.get())[cpu]);
        let df = core::ptr::addr_of_mut!((*DF_STACKS.get())[cpu]);
        (*tss).ist[0] = df as u64 + core::mem::size_of::<DfStack>() as u64;
        let base = tss as u64;
        let limit = (core::mem::size_of::<Tss>() - 1) as u64;
        let low = (limit & 0xFFFF)
            | ((base & 0xFF_FFFF) << 16)
            | (0x89 << 40)
            | (((limit >> 16) & 0xF) << 48)
            | (((base >> 24) & 0xFF) << 56);
        let gdt = core::ptr::addr_of_mut!(gdt64);
        (*gdt)[3 + 2 * cpu] = low;
        (*gdt)[4 + 2 * cpu] = base >> 32;
        let gdt_base = gdt as u64;
        let gdtr: [u16; 5] = [
            (GDT_SLOTS * 8 - 1) as u16,
            gdt_base as u16,
            (gdt_base >> 16) as u16,
            (gdt_base >> 32) as u16,
            (gdt_base >> 48) as u16,
        ];
        // Load it and reload CS (far return) and the data segments.
        asm!(
            "lgdt [{gdtr}]",
            "push 0x08",
            "lea {tmp}, [rip + 2f]",
            "push {tmp}",
            "retfq",
            "2:",
            "mov {tmp:e}, 0x10",
            "mov ds, {tmp:e}",
            "mov es, {tmp:e}",
            "mov ss, {tmp:e}",
            gdtr = in(reg) gdtr.as_ptr(),
            tmp = out(reg) _,
        );
        asm!("ltr {0:x}", in(reg) (0x18 + 16 * cpu) as u16, options(nostack));
        let ptr: [u16; 5] = {
            let base = IDT.get() as u64;
            [
                (256 * 16 - 1) as u16,
                base as u16,
                (base >> 16) as u16,
                (base >> 32) as u16,
                (base >> 48) as u16,
            ]
        };
        asm!("lidt [{0}]", in(reg) ptr.as_ptr(), options(nostack));
    }
}

/// CR2 (the faulting address of a #PF).
pub fn cr2() -> u64 {
    let v: u64;
    // SAFETY: reading CR2 has no side effect.
    unsafe { asm!("mov {0}, cr2", out(reg) v, options(nomem, nostack, preserves_flags)) };
    v
}

/// Raises vector 20 (#VE) through the IDT with a software interrupt.
#[cfg(not(feature = "tdx"))]
pub fn int20() {
    // SAFETY: vector 20's gate is installed (install_idt) and its handler returns with iretq
    // after restoring every register.
    unsafe { asm!("int 20") };
}
