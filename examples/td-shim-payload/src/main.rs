//! Integration recipe: a td-shim payload that accepts boot memory on every vCPU and hands the
//! rest to the kernel (docs/integration.md, "A td-shim payload").
//!
//! td-shim enters the payload in long mode, on its identity map, with the TD HOB list address
//! as the first argument. The payload then:
//!
//! 1. reads the HOB list into a [`BootPlan`]: what it accepts now, what the kernel accepts
//!    lazily, where the unaccepted-memory table goes;
//! 2. wakes every application processor through the ACPI multiprocessor wakeup mailbox
//!    ([`mp`]); each runs one worker of the [`BootJob`], largest pages first, while the boot
//!    processor accepts the unaligned edges and then works too;
//! 3. writes the table into memory that is now accepted, for the kernel to find.
//!
//! Every TDCALL goes through `tdmem_accept::hw::HwTdcall`, so the payload links exactly one
//! `tdx-tdcall` (td-shim's, through a `[patch]`, see docs/integration.md).
#![no_std]
#![no_main]

mod hob;
mod mp;

use core::sync::atomic::{AtomicU64, Ordering};

use tdmem_accept::acceptor::{AcceptPolicy, Acceptor};
use tdmem_accept::hw::HwTdcall;
use tdmem_accept::parallel::{BootJob, WorkerProgress};
use tdmem_accept::{GpaRange, Gpaw, Tdcall};
use tdmem_firmware::plan::{BootPlan, PlanConfig, MAX_RANGES};

/// Filler for the range array.
const EMPTY: GpaRange = match GpaRange::new(0, 0x1000) {
    Ok(r) => r,
    Err(_) => panic!("the first page is a valid range"),
};

/// Most CPUs this payload brings into the job.
pub const MAX_CPUS: usize = 64;

/// The boot job the application processors read (published before they are woken).
static JOB: AtomicU64 = AtomicU64::new(0);
/// The acceptor they share (published with the job).
static ACCEPTOR: AtomicU64 = AtomicU64::new(0);

/// What went wrong; [`mp::halt_forever`] leaves it in `mp::RESULT` for a debugger.
#[derive(Debug, Clone, Copy)]
enum Failure {
    VpInfo = 1,
    Hob = 2,
    Plan = 3,
    Accept = 4,
    Table = 5,
}

/// td-shim's payload entry.
///
/// # Safety
/// `hob` is the address of td-shim's HOB list, identity mapped, which nothing writes while
/// the payload runs.
#[no_mangle]
pub unsafe extern "sysv64" fn _start(hob: u64, _payload_base: u64) -> ! {
    // SAFETY: the entry contract above.
    let result = unsafe { boot(hob) };
    mp::halt_forever(result.err().map_or(0, |f| f as u64))
}

/// The boot sequence.
///
/// # Safety
/// As [`_start`].
unsafe fn boot(hob_addr: u64) -> Result<(), Failure> {
    let mut tdcall = HwTdcall;
    let gpaw: Gpaw = tdcall.vp_info().map_err(|_| Failure::VpInfo)?.gpaw;

    // SAFETY: the entry contract: the HOB list is mapped and stays unchanged.
    let list = unsafe { hob::list(hob_addr) }.ok_or(Failure::Hob)?;
    let reserved = [hob::range(hob_addr, list.len()), hob::image_range()];
    let config = PlanConfig {
        reserved: &reserved,
        ..PlanConfig::default()
    };
    let plan = BootPlan::from_hob(list, &config).map_err(|_| Failure::Plan)?;

    // Eager acceptance on every CPU, largest pages first.
    let acceptor = Acceptor::new(gpaw, AcceptPolicy::default());
    let mut ranges = [EMPTY; MAX_RANGES];
    let n = plan.eager().copy_to(&mut ranges);
    let progress: [WorkerProgress; MAX_CPUS] = [const { WorkerProgress::new() }; MAX_CPUS];
    // The job and the acceptor live in this frame until every woken processor has left the
    // job (the wait below), and the processors only read them through shared references.
    let cpus = mp::cpus(list).min(MAX_CPUS);
    let job = BootJob::new(&ranges[..n], &progress[..cpus]);
    JOB.store(&job as *const BootJob<'_> as u64, Ordering::Release);
    ACCEPTOR.store(&acceptor as *const Acceptor as u64, Ordering::Release);
    let woken = mp::wake_aps(list, cpus);

    job.run_edges(&mut tdcall, &acceptor)
        .map_err(|_| Failure::Accept)?;
    let bsp = job.run(0, &mut tdcall, &acceptor);
    // The job and acceptor must outlive every worker: wait for all of them to leave.
    while job.workers_exited() < 1 + woken as u64 {
        core::hint::spin_loop();
    }
    if bsp.is_err() || !job.is_complete() {
        return Err(Failure::Accept);
    }

    // The table, in memory the job just accepted, for the kernel.
    if let Some(t) = plan.table() {
        let len = usize::try_from(t.len).map_err(|_| Failure::Table)?;
        // SAFETY: the plan placed the table in accepted private memory clear of the payload
        // and the HOB list; nothing else refers to it.
        let buf = unsafe { core::slice::from_raw_parts_mut(t.gpa as *mut u8, len) };
        plan.write_table(buf).map_err(|_| Failure::Table)?;
    }
    Ok(())
}

/// An application processor's part: worker `index` (1-based; the boot processor is 0).
pub(crate) fn ap_main(index: usize) -> ! {
    let job = JOB.load(Ordering::Acquire) as *const BootJob<'static>;
    let acceptor = ACCEPTOR.load(Ordering::Acquire) as *const Acceptor;
    // SAFETY: `boot` published both before waking this processor and keeps them alive until
    // this worker has returned from `run` (it counts exits before leaving its frame).
    let (job, acceptor) = unsafe { (&*job, &*acceptor) };
    let mut tdcall = HwTdcall;
    let _ = job.run(index, &mut tdcall, acceptor);
    mp::halt_forever(0)
}

/// `tdx-tdcall` links `alloc`, so the image needs a global allocator although nothing here
/// allocates; a td-shim payload normally has a heap of its own and uses that instead.
struct NoAlloc;

// SAFETY: `alloc` returns null (allocation failure), which the contract allows; `dealloc` is
// never given a pointer because none is handed out.
unsafe impl core::alloc::GlobalAlloc for NoAlloc {
    unsafe fn alloc(&self, _layout: core::alloc::Layout) -> *mut u8 {
        core::ptr::null_mut()
    }
    unsafe fn dealloc(&self, _ptr: *mut u8, _layout: core::alloc::Layout) {}
}

#[global_allocator]
static ALLOC: NoAlloc = NoAlloc;

#[panic_handler]
fn panic(_: &core::panic::PanicInfo<'_>) -> ! {
    mp::halt_forever(u64::MAX)
}
