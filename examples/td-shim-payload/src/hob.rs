//! The few facts the payload reads off td-shim's HOB list itself: its length, the ranges the
//! unaccepted table must not overlap, and the ACPI tables td-shim hands over in GUID-extension
//! HOBs (`tdmem_firmware::hob` reads the memory descriptors).

use tdmem_accept::GpaRange;

/// Offset of `EfiEndOfHobList` in the PHIT, the list's first HOB (UEFI PI, vol. 3).
const PHIT_END_OFFSET: u64 = 48;
/// Largest HOB list accepted (td-shim's is a few KiB).
const MAX_HOB: u64 = 1 << 20;
/// `EFI_HOB_TYPE_GUID_EXTENSION`.
const HOB_GUID_EXTENSION: u16 = 4;
/// `EFI_HOB_TYPE_END_OF_HOB_LIST`.
const HOB_END: u16 = 0xffff;
/// Generic HOB header (type, length, reserved) plus the extension's GUID.
const GUID_HOB_DATA: usize = 8 + 16;

/// The HOB list as bytes, from the PHIT's end pointer.
///
/// # Safety
/// `addr` is td-shim's HOB list, identity mapped and unchanged while the slice lives.
pub unsafe fn list(addr: u64) -> Option<&'static [u8]> {
    if addr == 0 || !addr.is_multiple_of(8) {
        return None;
    }
    // SAFETY: the PHIT is the first HOB of the list the caller vouches for.
    let end = unsafe { ((addr + PHIT_END_OFFSET) as *const u64).read_unaligned() };
    let len = end.checked_sub(addr).filter(|&l| l > 0 && l <= MAX_HOB)?;
    // SAFETY: as above; `len` is bounded and the list ends at `end`.
    Some(unsafe { core::slice::from_raw_parts(addr as *const u8, len as usize) })
}

/// `[addr, addr + len)` rounded out to 4K.
pub fn range(addr: u64, len: usize) -> GpaRange {
    let start = addr & !0xfff;
    let end = (addr + len as u64 + 0xfff) & !0xfff;
    GpaRange::new(start, end).unwrap_or(super::EMPTY)
}

/// The payload image, from the linker's `__ehdr_start` to `_end`.
pub fn image_range() -> GpaRange {
    extern "C" {
        static __ehdr_start: u8;
        static _end: u8;
    }
    // Linker-defined symbols: only their addresses are taken.
    let (start, end) = (
        core::ptr::addr_of!(__ehdr_start) as u64,
        core::ptr::addr_of!(_end) as u64,
    );
    range(start, end.saturating_sub(start) as usize)
}

/// The data of every GUID-extension HOB.
pub fn guid_extensions(list: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut at = 0usize;
    core::iter::from_fn(move || loop {
        let header = list.get(at..at + 8)?;
        let kind = u16::from_le_bytes([header[0], header[1]]);
        let len = usize::from(u16::from_le_bytes([header[2], header[3]]));
        if kind == HOB_END || len < 8 {
            return None;
        }
        let hob = list.get(at..at + len)?;
        at += len;
        if kind == HOB_GUID_EXTENSION && len > GUID_HOB_DATA {
            return Some(&hob[GUID_HOB_DATA..]);
        }
    })
}
