//! The Linux-compatible EFI unaccepted-memory table (spec section 8): building one (firmware
//! side) and reading one (kernel side).
//!
//! Layout, little endian, as `struct efi_unaccepted_memory` of Linux `include/linux/efi.h`:
//!
//! | offset | field | meaning |
//! |---|---|---|
//! | 0 | `u32 version` | 1 |
//! | 4 | `u32 unit_size` | bytes per bitmap bit (2 MiB in practice) |
//! | 8 | `u64 phys_base` | GPA of bit 0's unit |
//! | 16 | `u64 size` | bitmap length in **bytes** (any value, not only multiples of 8) |
//! | 24 | `bitmap[]` | bit `i` (byte `i / 8`, bit `i % 8`) set = `[phys_base + i*unit, +unit)` is unaccepted |
//!
//! [`UnacceptedTable`] is a zero-copy view over a byte slice that validates the header and never
//! reads a byte past `size` (a consumer that read whole 64-bit words once read past the end when
//! `size` was not a multiple of 8). [`TableBuilder`] writes a table into a caller-provided buffer
//! and applies the registration rules of the Linux EFI stub
//! (`drivers/firmware/efi/libstub/unaccepted_memory.c`): a range shorter than two units, the
//! unaligned head and tail of a longer one, and any part outside the bitmap are not recorded but
//! handed back to be accepted at once.
//!
//! This module neither accepts memory nor tracks concurrent acceptance: see
//! [`crate::tracker`], which takes its initial state from a table view. It needs no allocator.

use core::fmt;

use crate::abi::{Gpa, GpaRange, PageLevel};

/// `LINUX_EFI_UNACCEPTED_MEM_TABLE_GUID`, d5d1de3c-105c-44f9-9ea9-bcef98120031, in the EFI
/// byte order (first three fields little endian) as it appears in the configuration table.
pub const UNACCEPTED_TABLE_GUID: [u8; 16] = [
    0x3c, 0xde, 0xd1, 0xd5, 0x5c, 0x10, 0xf9, 0x44, 0x9e, 0xa9, 0xbc, 0xef, 0x98, 0x12, 0x00, 0x31,
];

/// The only table version Linux knows.
pub const TABLE_VERSION: u32 = 1;

/// Header bytes before the bitmap (`sizeof(struct efi_unaccepted_memory)`).
pub const HEADER_LEN: usize = 24;

/// Offset of `version`.
pub const OFFSET_VERSION: usize = 0;
/// Offset of `unit_size`.
pub const OFFSET_UNIT_SIZE: usize = 4;
/// Offset of `phys_base`.
pub const OFFSET_PHYS_BASE: usize = 8;
/// Offset of `size`.
pub const OFFSET_SIZE: usize = 16;
/// Offset of the bitmap.
pub const OFFSET_BITMAP: usize = HEADER_LEN;

/// The unit size Linux's EFI stub uses (`EFI_UNACCEPTED_UNIT_SIZE`, one PMD).
pub const DEFAULT_UNIT_SIZE: u32 = 2 << 20;

/// Smallest unit this crate accepts: one 4K page.
pub const MIN_UNIT_SIZE: u32 = 4096;

/// One past the largest GPA any TD can have.
const GPA_LIMIT: u64 = 1 << Gpa::MAX_BITS;

/// Why a table could not be read or written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TableError {
    /// The buffer is shorter than the header.
    Truncated {
        /// Bytes available.
        len: usize,
    },
    /// `version` is not [`TABLE_VERSION`].
    Version(u32),
    /// `unit_size` is not a power of two of at least 4 KiB.
    UnitSize(u32),
    /// `phys_base` is not 4K aligned or not below 2^52.
    PhysBase(u64),
    /// `size` says the bitmap is longer than the bytes available after the header.
    BitmapTooLong {
        /// The header's `size`.
        size: u64,
        /// Bytes available after the header.
        available: usize,
    },
    /// `phys_base + size * 8 * unit_size` overflows or reaches past 2^52.
    Overflow,
    /// A range given to the builder lies (partly) inside a unit already recorded.
    Overlap {
        /// The unit's index.
        unit: u64,
    },
}

impl fmt::Display for TableError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TableError::Truncated { len } => {
                write!(
                    f,
                    "table of {len} bytes is shorter than its {HEADER_LEN}-byte header"
                )
            }
            TableError::Version(v) => write!(f, "unknown unaccepted table version {v}"),
            TableError::UnitSize(u) => write!(f, "unit size {u:#x} is not a power of two >= 4K"),
            TableError::PhysBase(b) => write!(f, "phys_base {b:#x} is misaligned or too large"),
            TableError::BitmapTooLong { size, available } => write!(
                f,
                "bitmap size {size} exceeds the {available} bytes after the header"
            ),
            TableError::Overflow => f.write_str("table span overflows the GPA space"),
            TableError::Overlap { unit } => write!(f, "unit {unit} recorded twice"),
        }
    }
}

fn read_u32(bytes: &[u8], at: usize) -> Option<u32> {
    let b = bytes.get(at..at.checked_add(4)?)?;
    Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

fn read_u64(bytes: &[u8], at: usize) -> Option<u64> {
    let b = bytes.get(at..at.checked_add(8)?)?;
    let mut w = [0u8; 8];
    w.copy_from_slice(b);
    Some(u64::from_le_bytes(w))
}

fn check_unit_size(unit_size: u32) -> Result<(), TableError> {
    if unit_size.is_power_of_two() && unit_size >= MIN_UNIT_SIZE {
        Ok(())
    } else {
        Err(TableError::UnitSize(unit_size))
    }
}

fn check_phys_base(phys_base: u64) -> Result<(), TableError> {
    if PageLevel::Size4K.is_aligned(phys_base) && phys_base < GPA_LIMIT {
        Ok(())
    } else {
        Err(TableError::PhysBase(phys_base))
    }
}

/// `phys_base + bitmap_len * 8 * unit_size`, checked to stay within 2^52.
fn span_end(phys_base: u64, unit_size: u32, bitmap_len: u64) -> Result<u64, TableError> {
    bitmap_len
        .checked_mul(8)
        .and_then(|units| units.checked_mul(u64::from(unit_size)))
        .and_then(|bytes| phys_base.checked_add(bytes))
        .filter(|&end| end <= GPA_LIMIT)
        .ok_or(TableError::Overflow)
}

/// A validated, read-only view of an unaccepted-memory table.
///
/// The view holds exactly the `size` bitmap bytes the header announces; bytes after them in the
/// source slice (allocation slack) are never looked at.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct UnacceptedTable<'a> {
    unit_size: u32,
    phys_base: u64,
    bitmap: &'a [u8],
}

impl fmt::Debug for UnacceptedTable<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UnacceptedTable")
            .field("unit_size", &self.unit_size)
            .field("phys_base", &format_args!("{:#x}", self.phys_base))
            .field("size", &self.bitmap.len())
            .finish()
    }
}

impl<'a> UnacceptedTable<'a> {
    /// Reads and validates the table at the start of `bytes`.
    ///
    /// `bytes` may be longer than the table; it must hold the header and `size` bitmap bytes.
    ///
    /// # Errors
    /// [`TableError::Truncated`], [`TableError::Version`], [`TableError::UnitSize`],
    /// [`TableError::PhysBase`], [`TableError::BitmapTooLong`] or [`TableError::Overflow`].
    pub fn parse(bytes: &'a [u8]) -> Result<UnacceptedTable<'a>, TableError> {
        let truncated = TableError::Truncated { len: bytes.len() };
        let version = read_u32(bytes, OFFSET_VERSION).ok_or(truncated)?;
        let unit_size = read_u32(bytes, OFFSET_UNIT_SIZE).ok_or(truncated)?;
        let phys_base = read_u64(bytes, OFFSET_PHYS_BASE).ok_or(truncated)?;
        let size = read_u64(bytes, OFFSET_SIZE).ok_or(truncated)?;
        if version != TABLE_VERSION {
            return Err(TableError::Version(version));
        }
        check_unit_size(unit_size)?;
        check_phys_base(phys_base)?;
        let available = bytes.len() - HEADER_LEN;
        let too_long = TableError::BitmapTooLong { size, available };
        let len = usize::try_from(size).map_err(|_| too_long)?;
        let end = OFFSET_BITMAP.checked_add(len).ok_or(too_long)?;
        let bitmap = bytes.get(OFFSET_BITMAP..end).ok_or(too_long)?;
        span_end(phys_base, unit_size, size)?;
        Ok(UnacceptedTable {
            unit_size,
            phys_base,
            bitmap,
        })
    }

    /// Bytes per unit (per bitmap bit).
    pub fn unit_size(&self) -> u64 {
        u64::from(self.unit_size)
    }

    /// GPA of unit 0.
    pub fn phys_base(&self) -> u64 {
        self.phys_base
    }

    /// The header's `size`: bitmap length in bytes.
    pub fn bitmap_len(&self) -> usize {
        self.bitmap.len()
    }

    /// The bitmap bytes (exactly `size` of them).
    pub fn bitmap(&self) -> &'a [u8] {
        self.bitmap
    }

    /// Number of units the bitmap covers (`size * 8`).
    pub fn units(&self) -> u64 {
        // Validated by `parse`: size * 8 * unit_size fits, so size * 8 does.
        self.bitmap.len() as u64 * 8
    }

    /// One past the last GPA the bitmap covers.
    pub fn end(&self) -> u64 {
        self.phys_base + self.units() * self.unit_size()
    }

    /// Whole length of the table in bytes (header plus bitmap).
    pub fn table_len(&self) -> usize {
        HEADER_LEN + self.bitmap.len()
    }

    /// True when unit `index` is marked unaccepted; false for indices past the bitmap.
    pub fn is_unit_unaccepted(&self, index: u64) -> bool {
        let Ok(byte) = usize::try_from(index / 8) else {
            return false;
        };
        self.bitmap
            .get(byte)
            .is_some_and(|b| b & (1 << (index % 8)) != 0)
    }

    /// The index of the unit holding `gpa`, `None` outside the bitmap.
    pub fn unit_of(&self, gpa: u64) -> Option<u64> {
        if gpa < self.phys_base || gpa >= self.end() {
            return None;
        }
        Some((gpa - self.phys_base) / self.unit_size())
    }

    /// True when `gpa` lies in a unit marked unaccepted. Memory outside the bitmap is accepted.
    pub fn is_unaccepted(&self, gpa: u64) -> bool {
        self.unit_of(gpa)
            .is_some_and(|unit| self.is_unit_unaccepted(unit))
    }

    /// True when any unit overlapping `[start, end)` is marked unaccepted.
    pub fn range_contains_unaccepted(&self, start: u64, end: u64) -> bool {
        let start = start.max(self.phys_base);
        let end = end.min(self.end());
        if start >= end {
            return false;
        }
        let first = (start - self.phys_base) / self.unit_size();
        let last = (end - 1 - self.phys_base) / self.unit_size();
        (first..=last).any(|u| self.is_unit_unaccepted(u))
    }

    /// Number of units marked unaccepted.
    pub fn unaccepted_units(&self) -> u64 {
        self.bitmap.iter().map(|b| u64::from(b.count_ones())).sum()
    }

    /// Bytes marked unaccepted.
    pub fn unaccepted_bytes(&self) -> u64 {
        self.unaccepted_units() * self.unit_size()
    }

    /// The unaccepted memory as maximal runs of consecutive set bits, in address order.
    pub fn unaccepted_ranges(&self) -> UnacceptedRanges<'a> {
        UnacceptedRanges {
            table: *self,
            next: 0,
        }
    }
}

/// Iterator over the unaccepted runs of a table; see [`UnacceptedTable::unaccepted_ranges`].
#[derive(Debug, Clone)]
pub struct UnacceptedRanges<'a> {
    table: UnacceptedTable<'a>,
    next: u64,
}

impl UnacceptedRanges<'_> {
    fn find_bit(&self, from: u64, set: bool) -> u64 {
        let units = self.table.units();
        let mut i = from;
        while i < units {
            // Skip whole bytes that cannot contain what we look for.
            if i % 8 == 0 {
                let byte = self
                    .table
                    .bitmap
                    .get((i / 8) as usize)
                    .copied()
                    .unwrap_or(0);
                let skip = if set { byte == 0 } else { byte == 0xFF };
                if skip {
                    i += 8;
                    continue;
                }
            }
            if self.table.is_unit_unaccepted(i) == set {
                return i;
            }
            i += 1;
        }
        units
    }
}

impl Iterator for UnacceptedRanges<'_> {
    type Item = GpaRange;

    fn next(&mut self) -> Option<GpaRange> {
        let first = self.find_bit(self.next, true);
        if first >= self.table.units() {
            self.next = first;
            return None;
        }
        let past = self.find_bit(first, false);
        self.next = past;
        let unit = self.table.unit_size();
        // In bounds by `parse` (the whole span is below 2^52 and 4K aligned).
        GpaRange::new(
            self.table.phys_base + first * unit,
            self.table.phys_base + past * unit,
        )
        .ok()
    }
}

/// Header values of a table sized for a set of ranges, as Linux's EFI stub sizes it: `phys_base`
/// is the lowest start rounded down to the unit, the bitmap reaches the highest end rounded up to
/// whole bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TableLayout {
    /// GPA of unit 0.
    pub phys_base: u64,
    /// Bytes per unit.
    pub unit_size: u32,
    /// Bitmap length in bytes (the header's `size`).
    pub bitmap_len: u64,
}

impl TableLayout {
    /// The layout covering every range of `ranges` (an empty bitmap for an empty list).
    ///
    /// # Errors
    /// [`TableError::UnitSize`] or [`TableError::Overflow`].
    pub fn for_ranges(ranges: &[GpaRange], unit_size: u32) -> Result<TableLayout, TableError> {
        check_unit_size(unit_size)?;
        let unit = u64::from(unit_size);
        let (Some(min), Some(max)) = (
            ranges.iter().map(|r| r.start().as_u64()).min(),
            ranges.iter().map(|r| r.end().as_u64()).max(),
        ) else {
            return Ok(TableLayout {
                phys_base: 0,
                unit_size,
                bitmap_len: 0,
            });
        };
        let phys_base = min & !(unit - 1);
        let bits_bytes = unit.checked_mul(8).ok_or(TableError::Overflow)?;
        let bitmap_len = (max - phys_base).div_ceil(bits_bytes);
        span_end(phys_base, unit_size, bitmap_len)?;
        Ok(TableLayout {
            phys_base,
            unit_size,
            bitmap_len,
        })
    }

    /// Whole table length in bytes.
    ///
    /// # Errors
    /// [`TableError::Overflow`] when it does not fit in `usize`.
    pub fn table_len(&self) -> Result<usize, TableError> {
        usize::try_from(self.bitmap_len)
            .ok()
            .and_then(|l| l.checked_add(HEADER_LEN))
            .ok_or(TableError::Overflow)
    }
}

/// Writes an unaccepted-memory table into a caller-provided buffer.
#[derive(Debug)]
pub struct TableBuilder<'b> {
    buf: &'b mut [u8],
    layout: TableLayout,
    end: u64,
}

impl<'b> TableBuilder<'b> {
    /// Writes the header of `layout` at the start of `buf` and clears its bitmap (all accepted).
    ///
    /// # Errors
    /// [`TableError::Truncated`] when `buf` is shorter than the table, [`TableError::UnitSize`],
    /// [`TableError::PhysBase`] (not aligned to the unit: unit boundaries must be the same
    /// whether counted from 0 or from `phys_base`, as Linux assumes) or
    /// [`TableError::Overflow`] for a bad layout.
    pub fn new(buf: &'b mut [u8], layout: TableLayout) -> Result<TableBuilder<'b>, TableError> {
        check_unit_size(layout.unit_size)?;
        check_phys_base(layout.phys_base)?;
        if layout.phys_base % u64::from(layout.unit_size) != 0 {
            return Err(TableError::PhysBase(layout.phys_base));
        }
        let end = span_end(layout.phys_base, layout.unit_size, layout.bitmap_len)?;
        let len = layout.table_len()?;
        let available = buf.len();
        let table = buf
            .get_mut(..len)
            .ok_or(TableError::Truncated { len: available })?;
        table[OFFSET_VERSION..OFFSET_VERSION + 4].copy_from_slice(&TABLE_VERSION.to_le_bytes());
        table[OFFSET_UNIT_SIZE..OFFSET_UNIT_SIZE + 4]
            .copy_from_slice(&layout.unit_size.to_le_bytes());
        table[OFFSET_PHYS_BASE..OFFSET_PHYS_BASE + 8]
            .copy_from_slice(&layout.phys_base.to_le_bytes());
        table[OFFSET_SIZE..OFFSET_SIZE + 8].copy_from_slice(&layout.bitmap_len.to_le_bytes());
        table[OFFSET_BITMAP..].fill(0);
        Ok(TableBuilder { buf, layout, end })
    }

    /// The layout being written.
    pub fn layout(&self) -> TableLayout {
        self.layout
    }

    /// Records `range` as unaccepted, following the Linux EFI stub's rules. Whatever cannot be
    /// recorded is passed to `accept_now`, in address order, for the caller to accept before
    /// hand-off:
    ///
    /// - a range shorter than two units, whole;
    /// - the unaligned head up to the first unit boundary and the unaligned tail after the last;
    /// - any part below `phys_base` or past the bitmap.
    ///
    /// Ranges must not overlap each other.
    ///
    /// # Errors
    /// [`TableError::Overlap`] when a unit to record is already recorded; nothing is changed
    /// and `accept_now` is not called.
    pub fn add_range(
        &mut self,
        range: GpaRange,
        mut accept_now: impl FnMut(GpaRange),
    ) -> Result<(), TableError> {
        let unit = u64::from(self.layout.unit_size);
        let mask = unit - 1;
        let (start, end) = (range.start().as_u64(), range.end().as_u64());
        if end - start < 2 * unit {
            accept_now(range);
            return Ok(());
        }
        // With two units or more, at least one whole unit lies between the rounded bounds.
        let body_start = (start + mask) & !mask;
        let body_end = end & !mask;
        let base = self.layout.phys_base;
        let rec_start = body_start.clamp(base, self.end);
        let rec_end = body_end.clamp(base, self.end);
        let first = (rec_start - base) / unit;
        let past = (rec_end - base) / unit;
        if let Some(unit) = (first..past).find(|&u| self.is_set(u)) {
            return Err(TableError::Overlap { unit });
        }
        let mut eager = |s: u64, e: u64| {
            if s < e {
                if let Ok(r) = GpaRange::new(s, e) {
                    accept_now(r);
                }
            }
        };
        // Head, then what lies below the bitmap, the recorded body, above it, and the tail.
        eager(start, body_start);
        eager(body_start, rec_start.min(body_end));
        eager(rec_end.max(body_start), body_end);
        eager(body_end, end);
        for u in first..past {
            self.set(u);
        }
        Ok(())
    }

    fn is_set(&self, unit: u64) -> bool {
        self.buf
            .get(OFFSET_BITMAP + (unit / 8) as usize)
            .is_some_and(|b| b & (1 << (unit % 8)) != 0)
    }

    fn set(&mut self, unit: u64) {
        if let Some(b) = self.buf.get_mut(OFFSET_BITMAP + (unit / 8) as usize) {
            *b |= 1 << (unit % 8);
        }
    }

    /// The finished table's length in bytes (header plus bitmap).
    pub fn finish(self) -> usize {
        HEADER_LEN + self.layout.bitmap_len as usize
    }
}

/// Builds a table for `ranges` (sized by [`TableLayout::for_ranges`]) into `buf`, passing what
/// must be accepted at once to `accept_now`. Returns the table length.
///
/// # Examples
///
/// Firmware leaves `[1 GiB, 1 GiB + 10 MiB + 4 KiB)` to the kernel in 2 MiB units: the 4 KiB
/// tail is not a whole unit and must be accepted now; the kernel reads the rest back.
///
/// ```
/// use tdmem_accept::unaccepted::{build_table, UnacceptedTable};
/// use tdmem_accept::GpaRange;
///
/// let lazy = [GpaRange::new(1 << 30, (1 << 30) + (10 << 20) + 0x1000)?];
/// let mut buf = [0u8; 64];
/// let mut now = Vec::new();
/// let len = build_table(&mut buf, &lazy, 2 << 20, |r| now.push(r))?;
/// assert_eq!(now, [GpaRange::new((1 << 30) + (10 << 20), (1 << 30) + (10 << 20) + 0x1000)?]);
///
/// let table = UnacceptedTable::parse(&buf[..len])?;
/// assert_eq!(table.unaccepted_bytes(), 10 << 20);
/// assert!(table.is_unaccepted((1 << 30) + (3 << 20)));
/// assert!(!table.is_unaccepted(0));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
///
/// # Errors
/// As [`TableLayout::for_ranges`], [`TableBuilder::new`] and [`TableBuilder::add_range`].
pub fn build_table(
    buf: &mut [u8],
    ranges: &[GpaRange],
    unit_size: u32,
    mut accept_now: impl FnMut(GpaRange),
) -> Result<usize, TableError> {
    let layout = TableLayout::for_ranges(ranges, unit_size)?;
    let mut builder = TableBuilder::new(buf, layout)?;
    for &r in ranges {
        builder.add_range(r, &mut accept_now)?;
    }
    Ok(builder.finish())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::vec;
    use std::vec::Vec;

    const K4: u64 = 4096;
    const M2: u64 = 2 << 20;

    fn r(s: u64, e: u64) -> GpaRange {
        GpaRange::new(s, e).unwrap()
    }

    /// The C layout of `struct efi_unaccepted_memory` on x86_64 (`unsigned long` = u64).
    #[repr(C)]
    struct EfiUnacceptedMemory {
        version: u32,
        unit_size: u32,
        phys_base: u64,
        size: u64,
        bitmap: [u64; 0],
    }

    #[test]
    fn offsets_match_the_c_struct() {
        use core::mem::{offset_of, size_of};
        assert_eq!(offset_of!(EfiUnacceptedMemory, version), OFFSET_VERSION);
        assert_eq!(offset_of!(EfiUnacceptedMemory, unit_size), OFFSET_UNIT_SIZE);
        assert_eq!(offset_of!(EfiUnacceptedMemory, phys_base), OFFSET_PHYS_BASE);
        assert_eq!(offset_of!(EfiUnacceptedMemory, size), OFFSET_SIZE);
        assert_eq!(offset_of!(EfiUnacceptedMemory, bitmap), OFFSET_BITMAP);
        assert_eq!(size_of::<EfiUnacceptedMemory>(), HEADER_LEN);
        let c = EfiUnacceptedMemory {
            version: 1,
            unit_size: DEFAULT_UNIT_SIZE,
            phys_base: 0x1_0000_0000,
            size: 3,
            bitmap: [],
        };
        let _ = c.bitmap;
        // The same header written field by field in C order, little endian.
        let mut c_bytes = Vec::new();
        c_bytes.extend_from_slice(&c.version.to_le_bytes());
        c_bytes.extend_from_slice(&c.unit_size.to_le_bytes());
        c_bytes.extend_from_slice(&c.phys_base.to_le_bytes());
        c_bytes.extend_from_slice(&c.size.to_le_bytes());
        let mut buf = [0xAAu8; 40];
        let layout = TableLayout {
            phys_base: c.phys_base,
            unit_size: c.unit_size,
            bitmap_len: c.size,
        };
        let len = TableBuilder::new(&mut buf, layout).unwrap().finish();
        assert_eq!(len, 27);
        assert_eq!(&buf[..HEADER_LEN], &c_bytes[..]);
        assert_eq!(&buf[24..27], &[0, 0, 0]);
        // Bytes past the table are untouched.
        assert!(buf[27..].iter().all(|&b| b == 0xAA));
    }

    #[test]
    fn golden_bytes() {
        // unit 2M, base 4G, units 0..2 and 9 unaccepted, size 2.
        let bytes: [u8; 26] = [
            1,
            0,
            0,
            0, // version
            0,
            0,
            0x20,
            0, // unit_size 0x200000
            0,
            0,
            0,
            0,
            1,
            0,
            0,
            0, // phys_base 0x1_0000_0000
            2,
            0,
            0,
            0,
            0,
            0,
            0,
            0, // size 2
            0b0000_0011,
            0b0000_0010,
        ];
        let t = UnacceptedTable::parse(&bytes).unwrap();
        assert_eq!(t.unit_size(), M2);
        assert_eq!(t.phys_base(), 1 << 32);
        assert_eq!(t.units(), 16);
        let ranges: Vec<_> = t.unaccepted_ranges().collect();
        assert_eq!(
            ranges,
            [
                r(1 << 32, (1 << 32) + 2 * M2),
                r((1 << 32) + 9 * M2, (1 << 32) + 10 * M2)
            ]
        );
        assert_eq!(t.unaccepted_bytes(), 3 * M2);
        assert!(t.is_unaccepted((1 << 32) + 9 * M2 + K4));
        assert!(!t.is_unaccepted((1 << 32) + 8 * M2));
        assert!(!t.is_unaccepted(0));
    }

    #[test]
    fn guid_bytes() {
        // d5d1de3c-105c-44f9-9ea9-bcef98120031
        assert_eq!(&UNACCEPTED_TABLE_GUID[..4], &0xd5d1_de3cu32.to_le_bytes());
        assert_eq!(&UNACCEPTED_TABLE_GUID[4..6], &0x105cu16.to_le_bytes());
        assert_eq!(&UNACCEPTED_TABLE_GUID[6..8], &0x44f9u16.to_le_bytes());
        assert_eq!(
            &UNACCEPTED_TABLE_GUID[8..],
            &[0x9e, 0xa9, 0xbc, 0xef, 0x98, 0x12, 0x00, 0x31]
        );
    }

    fn header(version: u32, unit: u32, base: u64, size: u64) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&version.to_le_bytes());
        v.extend_from_slice(&unit.to_le_bytes());
        v.extend_from_slice(&base.to_le_bytes());
        v.extend_from_slice(&size.to_le_bytes());
        v
    }

    #[test]
    fn bad_headers_are_refused() {
        assert_eq!(
            UnacceptedTable::parse(&[1, 0, 0]),
            Err(TableError::Truncated { len: 3 })
        );
        assert_eq!(
            UnacceptedTable::parse(&header(2, DEFAULT_UNIT_SIZE, 0, 0)),
            Err(TableError::Version(2))
        );
        for unit in [0, 2048, 3 << 20, 4097] {
            assert_eq!(
                UnacceptedTable::parse(&header(1, unit, 0, 0)),
                Err(TableError::UnitSize(unit))
            );
        }
        assert_eq!(
            UnacceptedTable::parse(&header(1, 4096, 0x800, 0)),
            Err(TableError::PhysBase(0x800))
        );
        assert_eq!(
            UnacceptedTable::parse(&header(1, 4096, 1 << 52, 0)),
            Err(TableError::PhysBase(1 << 52))
        );
        assert_eq!(
            UnacceptedTable::parse(&header(1, 4096, 0, u64::MAX)),
            Err(TableError::BitmapTooLong {
                size: u64::MAX,
                available: 0
            })
        );
        // Span overflow: a bitmap big enough to pass 2^52.
        let mut t = header(1, 1 << 31, (1 << 52) - (1 << 31), 1);
        t.push(0);
        assert_eq!(UnacceptedTable::parse(&t), Err(TableError::Overflow));
        // An empty bitmap is valid.
        let empty = header(1, 4096, 0, 0);
        let t = UnacceptedTable::parse(&empty).unwrap();
        assert_eq!(t.units(), 0);
        assert_eq!(t.unaccepted_ranges().count(), 0);
    }

    /// Regression for the consumer that read whole words past `size`: a 5-byte bitmap followed by
    /// bytes that must never be looked at. Every query must answer from the 5 bytes only.
    #[test]
    fn consumer_never_reads_past_size() {
        for size in 1..=9u64 {
            let mut bytes = header(1, DEFAULT_UNIT_SIZE, 0, size);
            bytes.extend(core::iter::repeat_n(0u8, size as usize));
            // Poison right after the bitmap: all bits set.
            let poisoned_len = bytes.len();
            bytes.extend_from_slice(&[0xFF; 16]);
            let t = UnacceptedTable::parse(&bytes).unwrap();
            assert_eq!(t.bitmap_len(), size as usize);
            assert_eq!(t.table_len(), poisoned_len);
            assert_eq!(t.unaccepted_units(), 0, "size {size}");
            assert_eq!(t.unaccepted_ranges().count(), 0, "size {size}");
            assert!(!t.range_contains_unaccepted(0, u64::MAX));
            assert!(!t.is_unit_unaccepted(size * 8));
            assert!(!t.is_unaccepted(size * 8 * M2));

            // The table is exactly as long as its header says: a slice cut right after the
            // bitmap parses too, and one byte less does not.
            assert!(UnacceptedTable::parse(&bytes[..poisoned_len]).is_ok());
            assert_eq!(
                UnacceptedTable::parse(&bytes[..poisoned_len - 1]),
                Err(TableError::BitmapTooLong {
                    size,
                    available: size as usize - 1
                })
            );
        }
    }

    #[test]
    fn last_partial_byte_is_read_bit_by_bit() {
        // 3 bytes: the last unit (23) is set.
        let mut bytes = header(1, 4096, 0x10_0000, 3);
        bytes.extend_from_slice(&[0, 0, 0x80]);
        let t = UnacceptedTable::parse(&bytes).unwrap();
        assert_eq!(
            t.unaccepted_ranges().collect::<Vec<_>>(),
            [r(0x10_0000 + 23 * K4, 0x10_0000 + 24 * K4)]
        );
        assert_eq!(t.end(), 0x10_0000 + 24 * K4);
    }

    /// What the Linux EFI stub would record and accept for one range (reference model).
    fn model(layout: TableLayout, start: u64, end: u64) -> (Vec<u64>, Vec<(u64, u64)>) {
        let unit = u64::from(layout.unit_size);
        let mut eager = Vec::new();
        let mut units = Vec::new();
        if end - start < 2 * unit {
            return (units, vec![(start, end)]);
        }
        // Page by page: a page is recorded iff its unit is wholly inside [start, end) and the
        // unit is inside the bitmap.
        let bitmap_end = layout.phys_base + layout.bitmap_len * 8 * unit;
        let mut p = start;
        while p < end {
            let u0 = p & !(unit - 1);
            let whole = u0 >= start && u0 + unit <= end;
            let inside = u0 >= layout.phys_base && u0 + unit <= bitmap_end;
            if whole && inside {
                let idx = (u0 - layout.phys_base) / unit;
                if units.last() != Some(&idx) {
                    units.push(idx);
                }
            } else {
                match eager.last_mut() {
                    Some((_, e)) if *e == p => *e += K4,
                    _ => eager.push((p, p + K4)),
                }
            }
            p += K4;
        }
        (units, eager)
    }

    proptest::proptest! {
        /// Build then parse, with odd unit sizes, bases and bitmap lengths: the recorded units
        /// and the eager ranges are exactly the Linux stub's, they never overlap, and together
        /// they cover every input page once.
        #[test]
        fn round_trip(
            unit_shift in 12u32..24,
            base_pages in 0u64..4096,
            gaps in proptest::collection::vec((0u64..3000, 1u64..6000), 1..6),
            extra_bitmap in 0u64..3,
        ) {
            let unit_size = 1u32 << unit_shift;
            let mut ranges = Vec::new();
            let mut at = base_pages * K4 + (1 << 32);
            for (gap, len) in gaps {
                let s = at + gap * K4;
                let e = s + len * K4;
                ranges.push(r(s, e));
                at = e;
            }
            let mut layout = TableLayout::for_ranges(&ranges, unit_size).unwrap();
            layout.bitmap_len += extra_bitmap;
            let mut buf = vec![0x5Au8; layout.table_len().unwrap() + 7];
            let mut eager = Vec::new();
            let mut b = TableBuilder::new(&mut buf, layout).unwrap();
            for &rg in &ranges {
                b.add_range(rg, |x| eager.push((x.start().as_u64(), x.end().as_u64()))).unwrap();
            }
            let len = b.finish();
            proptest::prop_assert_eq!(len, layout.table_len().unwrap());
            proptest::prop_assert!(buf[len..].iter().all(|&x| x == 0x5A));

            let mut want_units = Vec::new();
            let mut want_eager = Vec::new();
            for rg in &ranges {
                let (u, e) = model(layout, rg.start().as_u64(), rg.end().as_u64());
                want_units.extend(u);
                want_eager.extend(e);
            }
            proptest::prop_assert_eq!(&eager, &want_eager);

            let t = UnacceptedTable::parse(&buf).unwrap();
            proptest::prop_assert_eq!(t.unit_size(), u64::from(unit_size));
            proptest::prop_assert_eq!(t.phys_base(), layout.phys_base);
            proptest::prop_assert_eq!(t.bitmap_len() as u64, layout.bitmap_len);
            let got_units: Vec<u64> = (0..t.units()).filter(|&u| t.is_unit_unaccepted(u)).collect();
            proptest::prop_assert_eq!(&got_units, &want_units);

            // Coverage: recorded + eager = input, page for page, no overlap.
            let mut pages: Vec<u64> = Vec::new();
            for rg in t.unaccepted_ranges() {
                pages.extend((rg.start().as_u64()..rg.end().as_u64()).step_by(K4 as usize));
            }
            for (s, e) in &eager {
                pages.extend((*s..*e).step_by(K4 as usize));
            }
            pages.sort_unstable();
            let mut want_pages: Vec<u64> = Vec::new();
            for rg in &ranges {
                want_pages.extend((rg.start().as_u64()..rg.end().as_u64()).step_by(K4 as usize));
            }
            proptest::prop_assert_eq!(pages, want_pages);
        }
    }

    #[test]
    fn linux_registration_rules() {
        let layout = TableLayout {
            phys_base: 0,
            unit_size: M2 as u32,
            bitmap_len: 1,
        };
        let mut buf = [0u8; 25];
        let mut b = TableBuilder::new(&mut buf, layout).unwrap();
        let mut eager = Vec::new();
        // Just under two units: accepted whole, nothing recorded.
        b.add_range(r(K4, K4 + 2 * M2 - K4), |x| eager.push(x))
            .unwrap();
        assert_eq!(eager, [r(K4, 2 * M2)]);
        eager.clear();
        // Unaligned head and tail around two whole units, running past the bitmap (8 units).
        b.add_range(r(2 * M2 + K4, 20 * M2 + K4), |x| eager.push(x))
            .unwrap();
        assert_eq!(
            eager,
            [
                r(2 * M2 + K4, 3 * M2),
                r(8 * M2, 20 * M2),
                r(20 * M2, 20 * M2 + K4)
            ]
        );
        // Recording the same units again is refused, with no callback.
        let mut called = false;
        assert_eq!(
            b.add_range(r(3 * M2, 6 * M2), |_| called = true),
            Err(TableError::Overlap { unit: 3 })
        );
        assert!(!called);
        let len = b.finish();
        let t = UnacceptedTable::parse(&buf[..len]).unwrap();
        assert_eq!(t.bitmap(), &[0b1111_1000]);
    }

    #[test]
    fn builder_buffer_too_small() {
        let layout = TableLayout {
            phys_base: 0,
            unit_size: DEFAULT_UNIT_SIZE,
            bitmap_len: 10,
        };
        let mut buf = [0u8; 33];
        assert_eq!(
            TableBuilder::new(&mut buf, layout).map(|_| ()),
            Err(TableError::Truncated { len: 33 })
        );
        let odd_base = TableLayout {
            phys_base: M2 + K4,
            ..layout
        };
        let mut buf = [0u8; 64];
        assert_eq!(
            TableBuilder::new(&mut buf, odd_base).map(|_| ()),
            Err(TableError::PhysBase(M2 + K4))
        );
    }

    #[test]
    fn build_table_sizes_like_the_stub() {
        let ranges = [r(3 * M2 + K4, 12 * M2), r(40 * M2, 41 * M2 + K4)];
        let mut buf = [0u8; 64];
        let mut eager = Vec::new();
        let len = build_table(&mut buf, &ranges, DEFAULT_UNIT_SIZE, |x| eager.push(x)).unwrap();
        // The base rounds down to unit 3; 38 units and a page round up to 5 bitmap bytes.
        assert_eq!(len, HEADER_LEN + 5);
        let t = UnacceptedTable::parse(&buf).unwrap();
        assert_eq!(t.phys_base(), 3 * M2);
        assert_eq!(
            t.unaccepted_ranges().collect::<Vec<_>>(),
            [r(4 * M2, 12 * M2)]
        );
        assert_eq!(eager, [r(3 * M2 + K4, 4 * M2), r(40 * M2, 41 * M2 + K4)]);
    }
}
