//! A vCPU whose TDCALLs execute and whose accesses to pending pages raise #VE by themselves:
//! in a real TD (feature `tdx`) or under the patched QEMU of `cargo xtask e2e --tcg-tdx`.

use accept::hw::HwTdcall;
use e2e_proto::selftest::{Machine, TouchError, VeHandler};

use crate::println;

/// The self-test's machine on such a vCPU: `accept::hw` and plain loads and stores.
#[derive(Debug, Clone, Copy)]
pub struct RealTd {
    /// Where the unaccepted table may be written: `[start, end)`.
    pub table: (u64, u64),
}

/// The bytes at `[gpa, gpa + len)` when they lie inside `[start, end)`.
pub fn ram(gpa: u64, len: usize, (start, end): (u64, u64)) -> Option<&'static mut [u8]> {
    if gpa < start || gpa.checked_add(len as u64)? > end {
        return None;
    }
    // SAFETY: identity-mapped RAM the boot plan reserved for the table (callers name the
    // range); the self-test asks for it once and keeps no other reference to it.
    Some(unsafe { core::slice::from_raw_parts_mut(gpa as *mut u8, len) })
}

impl Machine for RealTd {
    type Td = HwTdcall;

    fn tdcall(&mut self) -> HwTdcall {
        HwTdcall
    }

    fn touch(
        &mut self,
        gpa: u64,
        write: Option<u64>,
        ve: &mut dyn VeHandler,
    ) -> Result<u64, TouchError> {
        // SAFETY: `gpa` is 8-byte aligned private memory of the scenario, identity mapped (by
        // boot.rs, or by td-shim), used by nothing else. A pending page raises #VE here, which
        // the armed handler accepts before the access is retried.
        Ok(unsafe { crate::real_touch(gpa, write, ve) })
    }

    fn memory(&mut self, gpa: u64, len: usize) -> Option<&mut [u8]> {
        ram(gpa, len, self.table)
    }

    fn log(&mut self, args: core::fmt::Arguments<'_>) {
        println!("{args}");
    }
}
