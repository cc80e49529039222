//! The run inside a real TD as a td-shim payload (feature `tdx`): TDCALLs through
//! `accept::hw`, the memory map from the TD HOB list td-shim hands over, and real memory
//! touches, so the #VE of the pending-page test is raised by the TDX module and enters through
//! IDT gate 20.
//!
//! Needs: td-shim's identity map of guest memory (td-shim maps all memory it reports), at
//! least 512 MiB of memory td-shim left unaccepted (`EFI_RESOURCE_MEMORY_UNACCEPTED` in the
//! HOB list), and the TD created with #VE on pending pages enabled (QEMU `tdx-guest`
//! `sept-ve-disable=off`). Not runnable without TDX hardware; see docs/e2e.md.

use accept::abi::GpaRange;
use e2e_proto::selftest::{self, Scenario};
use td_shim_ext::hob::{self, ResourceKind};
use td_shim_ext::plan::{RangeList, MAX_RANGES};

use crate::arch::{self, EXIT_FAIL, EXIT_PASS};
use crate::println;
use crate::realtd::RealTd;

/// Largest HOB list accepted (td-shim's is a few KiB).
const MAX_HOB: u64 = 1 << 20;
/// Offset of `EfiEndOfHobList` in the PHIT.
const PHIT_END_OFFSET: u64 = 48;
/// Unaccepted memory the scenario needs.
const NEED: u64 = 512 << 20;

extern "C" {
    static __image_start: u8;
    static __image_end: u8;
}

fn fail(why: &str) -> ! {
    println!("TDMEM-GUEST-RESULT FAILED {why}");
    arch::exit(EXIT_FAIL)
}

/// Runs the self-test from the HOB list at `hob`.
pub fn run(hob: u64) -> ! {
    // SAFETY: td-shim passes the HOB list address; its PHIT's EfiEndOfHobList bounds it.
    let end = unsafe { ((hob + PHIT_END_OFFSET) as *const u64).read_volatile() };
    let len = end.saturating_sub(hob).min(MAX_HOB);
    // SAFETY: `[hob, hob + len)` is the HOB list td-shim built in accepted memory; read only.
    let list = unsafe { core::slice::from_raw_parts(hob as *const u8, len as usize) };
    let (mut unaccepted, mut accepted) = (RangeList::new(), RangeList::new());
    let Ok(resources) = hob::resources(list) else {
        fail("bad-hob")
    };
    for r in resources {
        let Ok(r) = r else { fail("bad-hob") };
        let (s, e) = (r.range.start().as_u64(), r.range.end().as_u64());
        let added = match r.kind {
            ResourceKind::Unaccepted => unaccepted.insert(s, e),
            ResourceKind::SystemMemory => accepted.insert(s, e),
            ResourceKind::Other(_) => Ok(()),
        };
        if added.is_err() {
            fail("bad-hob-ranges");
        }
    }
    println!("HOB: unaccepted {unaccepted:?}, accepted {accepted:?}");
    let Some(big) = unaccepted.iter().max_by_key(|r| r.len()) else {
        fail("no-unaccepted-memory")
    };
    let start = big.start().as_u64().next_multiple_of(2 << 20);
    if big.end().as_u64().saturating_sub(start) < NEED {
        fail("less-than-512MiB-unaccepted");
    }
    let mut u = [big; MAX_RANGES];
    let nu = unaccepted.copy_to(&mut u);
    let mut a = [big; MAX_RANGES];
    let na = accepted.copy_to(&mut a);
    // Linker symbols: only their addresses are taken.
    let (img_s, img_e) = (
        core::ptr::addr_of!(__image_start) as u64,
        core::ptr::addr_of!(__image_end) as u64,
    );
    let align = |x: u64| x & !0xFFF;
    let reserved = [
        GpaRange::new(align(img_s), align(img_e) + 0x1000).unwrap_or(big),
        GpaRange::new(align(hob), align(hob + len) + 0x1000).unwrap_or(big),
    ];
    let eager_below = start + (64 << 20);
    let sc = Scenario {
        unaccepted: &u[..nu],
        accepted: &a[..na],
        reserved: &reserved,
        eager_below,
        eager_probe: eager_below - (8 << 20),
        lazy_gpa: eager_below + (36 << 20),
        ve_gpa: eager_below + (136 << 20) + 0x3000,
        convert: (start + (16 << 20), start + (20 << 20)),
    };
    // The boot plan placed the table in accepted memory clear of the image and the HOB list.
    let sum = selftest::run(
        &mut RealTd {
            table: (0, u64::MAX),
        },
        &sc,
    );
    println!("TDMEM-GUEST-RESULT {sum}");
    arch::exit(if sum.failed == 0 && sum.passed > 0 {
        EXIT_PASS
    } else {
        EXIT_FAIL
    })
}
