//! Waking the application processors through the ACPI multiprocessor wakeup mailbox (ACPI 6.4,
//! MADT structure type 0x10), which TD firmware such as td-shim provides: each processor waits
//! on the mailbox until it is given its APIC ID and a wakeup vector, then jumps there in long
//! mode on the firmware's identity map.
//!
//! The wakeup vector ([`ap_wakeup_vector`]) takes the next worker index and its own stack, and
//! calls [`crate::ap_main`].

use core::sync::atomic::{AtomicU16, AtomicU32, AtomicU64, Ordering};

use crate::hob;

/// `EFI_ACPI_DESCRIPTION_HEADER` length; MADT entries start 8 bytes after it.
const SDT_HEADER: usize = 36;
const MADT_ENTRIES: usize = SDT_HEADER + 8;
/// MADT structure types.
const LOCAL_APIC: u8 = 0;
const LOCAL_X2APIC: u8 = 9;
const MP_WAKEUP: u8 = 0x10;
/// Mailbox command: jump to the wakeup vector.
const WAKEUP: u16 = 1;
/// Spins before an AP that does not acknowledge its wakeup is given up on.
const ACK_SPINS: u64 = 100_000_000;
/// Stack of each application processor.
const AP_STACK: usize = 64 * 1024;

/// The result [`halt_forever`] leaves for a debugger (0: success).
pub static RESULT: AtomicU64 = AtomicU64::new(u64::MAX);

/// Next worker index the wakeup vector hands out (the boot processor is 0).
#[no_mangle]
static AP_NEXT: AtomicU32 = AtomicU32::new(1);

#[repr(C, align(16))]
struct Stacks([u8; AP_STACK * crate::MAX_CPUS]);

#[no_mangle]
static mut AP_STACKS: Stacks = Stacks([0; AP_STACK * crate::MAX_CPUS]);

// The wakeup vector: worker index = AP_NEXT++, stack = the end of AP_STACKS[index - 1].
core::arch::global_asm!(
    r#"
    .section .text
    .global ap_wakeup_vector
ap_wakeup_vector:
    cli
    mov $1, %eax
    lock xaddl %eax, AP_NEXT(%rip)
    mov %eax, %edi
    mov %rax, %rcx
    imul ${stack}, %rcx
    lea AP_STACKS(%rip), %rsp
    add %rcx, %rsp
    call {entry}
2:
    jmp 2b
"#,
    stack = const AP_STACK,
    entry = sym ap_entry,
    options(att_syntax)
);

extern "C" {
    fn ap_wakeup_vector();
}

extern "sysv64" fn ap_entry(index: u64) -> ! {
    match usize::try_from(index) {
        Ok(i) if i < crate::MAX_CPUS => crate::ap_main(i),
        _ => halt_forever(u64::MAX),
    }
}

/// A MADT the firmware handed over in a GUID-extension HOB.
fn madt(list: &[u8]) -> Option<&[u8]> {
    hob::guid_extensions(list).find_map(|data| {
        let len = u32::from_le_bytes(data.get(4..8)?.try_into().ok()?) as usize;
        (data.get(..4)? == b"APIC").then(|| data.get(..len))?
    })
}

/// The MADT's structures as (type, bytes).
fn entries(madt: &[u8]) -> impl Iterator<Item = (u8, &[u8])> {
    let mut at = MADT_ENTRIES;
    core::iter::from_fn(move || {
        let kind = *madt.get(at)?;
        let len = usize::from(*madt.get(at + 1)?);
        let e = madt.get(at..at + len).filter(|_| len >= 2)?;
        at += len;
        Some((kind, e))
    })
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// APIC IDs of the enabled processors.
fn apic_ids(madt: &[u8]) -> impl Iterator<Item = u32> + '_ {
    entries(madt).filter_map(|(kind, e)| match kind {
        LOCAL_APIC if u32_at(e, 4)? & 1 == 1 => Some(u32::from(*e.get(3)?)),
        LOCAL_X2APIC if u32_at(e, 8)? & 1 == 1 => u32_at(e, 4),
        _ => None,
    })
}

/// Processors the MADT lists (1 when there is none: the boot processor alone).
pub fn cpus(list: &[u8]) -> usize {
    madt(list).map_or(1, |m| apic_ids(m).count().max(1))
}

/// This processor's x2APIC ID (CPUID leaf 0xB, EDX).
fn my_apic_id() -> u32 {
    // Leaf 0xB is answered by the TDX module without a #VE.
    core::arch::x86_64::__cpuid(0xb).edx
}

/// Wakes up to `cpus - 1` application processors; returns how many acknowledged.
pub fn wake_aps(list: &[u8], cpus: usize) -> usize {
    let Some(madt) = madt(list) else {
        return 0;
    };
    let Some(mailbox) = entries(madt)
        .filter(|&(kind, _)| kind == MP_WAKEUP)
        .find_map(|(_, e)| Some(u64::from_le_bytes(e.get(8..16)?.try_into().ok()?)))
    else {
        return 0;
    };
    if mailbox == 0 || !mailbox.is_multiple_of(4096) {
        return 0;
    }
    // SAFETY: the firmware reserved the 4K mailbox at this identity-mapped address for the OS
    // to write; its command word is 2-byte aligned, APIC ID 4 and vector 8.
    let (command, apic_id, vector) = unsafe {
        (
            &*(mailbox as *const AtomicU16),
            &*((mailbox + 4) as *const AtomicU32),
            &*((mailbox + 8) as *const AtomicU64),
        )
    };
    let me = my_apic_id();
    let mut woken = 0;
    for id in apic_ids(madt).filter(|&id| id != me).take(cpus - 1) {
        apic_id.store(id, Ordering::Relaxed);
        vector.store(ap_wakeup_vector as *const () as u64, Ordering::Relaxed);
        command.store(WAKEUP, Ordering::Release);
        // The processor clears the command once it has read the mailbox.
        let mut spins = 0;
        while command.load(Ordering::Acquire) != 0 && spins < ACK_SPINS {
            core::hint::spin_loop();
            spins += 1;
        }
        if spins == ACK_SPINS {
            break;
        }
        woken += 1;
    }
    woken
}

/// Records `code` in [`RESULT`] and stops this processor.
pub fn halt_forever(code: u64) -> ! {
    RESULT.store(code, Ordering::Release);
    loop {
        core::hint::spin_loop();
    }
}
