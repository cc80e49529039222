//! The boot acceptance plan: which unaccepted memory the firmware accepts before hand-off, which
//! it leaves to the kernel through the Linux unaccepted-memory table, and where that table goes.
//!
//! [`BootPlan::new`] takes the unaccepted ranges (from a TD HOB list through
//! [`BootPlan::from_hob`], or a plain list), each one a descriptor as Linux sees it, and a
//! [`PlanConfig`], and decides per descriptor:
//!
//! 1. **Eager**: everything below [`PlanConfig::eager_below`] (the kernel, initrd and early
//!    allocations live there), plus what the Linux EFI stub would refuse to record
//!    (`drivers/firmware/efi/libstub/unaccepted_memory.c` `process_unaccepted_memory()`): a
//!    descriptor shorter than two units and the unaligned head and tail of a longer one; and a
//!    unit-aligned body shorter than two units, which the stub would accept again (its
//!    `< 2 * unit_size` rule) while its bit stays set, so that the kernel's first lazy
//!    acceptance of it gets `PAGE_ALREADY_ACCEPTED` and panics. The eager list feeds
//!    [`tdmem_accept::parallel::BootJob`]: vCPUs share its 2M/1G chunks through one atomic cursor,
//!    each chunk accepted at the largest level the module and the host allow.
//! 2. **Lazy**: the unit-aligned bodies of at least two units, one bit per unit in the table.
//! 3. **Table placement**: the table must live in memory that is accepted before the kernel
//!    reads it and that nobody else uses: the highest 4K-aligned spot below
//!    [`PlanConfig::table_below`] inside eagerly accepted memory or already-accepted system
//!    memory, clear of [`PlanConfig::reserved`] (firmware, payload, HOB list). The firmware
//!    records it as `EfiACPIReclaimMemory` ([`BootPlan::table_allocation`]) and publishes its
//!    GPA under [`tdmem_accept::unaccepted::UNACCEPTED_TABLE_GUID`].
//!
//! # The hand-off contract
//!
//! The table goes with one memory map: [`BootPlan::memory_map`]. In it, exactly the lazy
//! ranges are `EfiUnacceptedMemoryType` (each unit aligned and at least two units long) and the
//! eager ranges are `EfiConventionalMemory` (they are accepted before hand-off). The Linux EFI
//! stub runs `process_unaccepted_memory()` on every unaccepted descriptor even when the firmware
//! installed the table: on this map it accepts nothing and sets only bits that are set already.
//! The table covers every unaccepted descriptor (the stub writes past a table that ends below
//! one), and its `phys_base` and size are what the stub computes from that map when no table
//! is installed (`allocate_unaccepted_bitmap()`): the unit-rounded lowest start and highest
//! end. A memory map that lists eagerly accepted memory as unaccepted is *not* this contract:
//! the stub or the kernel would accept it again, and Linux panics on `PAGE_ALREADY_ACCEPTED`.
//! `cargo xtask linux` runs the stub on what this module produces.
//!
//! The plan itself needs no allocator: lists have a fixed capacity ([`MAX_RANGES`]). It does
//! not accept anything; [`BootPlan::write_table`] writes the table once the memory under it is
//! accepted.

use core::fmt;

use td_shim_interface::td_uefi_pi::pi::hob::{
    Header, MemoryAllocation, MemoryAllocationHeader, HOB_TYPE_MEMORY_ALLOCATION,
};
use tdmem_accept::abi::{GpaRange, PageLevel};
use tdmem_accept::unaccepted::{TableBuilder, TableError, TableLayout, DEFAULT_UNIT_SIZE};

use crate::hob::{self, HobError, ResourceKind};

/// Capacity of every range list in a plan.
pub const MAX_RANGES: usize = 64;

/// UEFI memory type `EfiACPIReclaimMemory`, which Linux expects for the unaccepted table.
pub const EFI_ACPI_RECLAIM_MEMORY: u32 = 9;

/// UEFI memory type `EfiConventionalMemory`: accepted, free memory.
pub const EFI_CONVENTIONAL_MEMORY: u32 = 7;

/// UEFI memory type `EfiUnacceptedMemoryType` (UEFI 2.9).
pub const EFI_UNACCEPTED_MEMORY: u32 = 15;

/// One entry of the memory map that goes with the table (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MapEntry {
    /// [`EFI_UNACCEPTED_MEMORY`] or [`EFI_CONVENTIONAL_MEMORY`].
    pub memory_type: u32,
    /// The range.
    pub range: GpaRange,
}

impl MapEntry {
    /// The UEFI descriptor's `NumberOfPages` (4 KiB pages).
    pub const fn pages(&self) -> u64 {
        self.range.len() / 4096
    }
}

/// A fixed-capacity list of non-overlapping ranges kept in address order.
#[derive(Clone, Copy)]
pub struct RangeList {
    items: [Option<GpaRange>; MAX_RANGES],
    len: usize,
}

impl Default for RangeList {
    fn default() -> Self {
        RangeList::new()
    }
}

impl fmt::Debug for RangeList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

impl RangeList {
    /// An empty list.
    pub const fn new() -> RangeList {
        RangeList {
            items: [None; MAX_RANGES],
            len: 0,
        }
    }

    /// Number of ranges.
    pub const fn len(&self) -> usize {
        self.len
    }

    /// True when empty.
    pub const fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The ranges in address order.
    pub fn iter(&self) -> impl Iterator<Item = GpaRange> + '_ {
        self.items[..self.len].iter().flatten().copied()
    }

    /// Total bytes.
    pub fn bytes(&self) -> u64 {
        self.iter().map(GpaRange::len).sum()
    }

    /// Copies the ranges into `out` (e.g. the slice a [`tdmem_accept::parallel::BootJob`] borrows),
    /// returning how many were written.
    pub fn copy_to(&self, out: &mut [GpaRange]) -> usize {
        let mut n = 0;
        for (slot, r) in out.iter_mut().zip(self.iter()) {
            *slot = r;
            n += 1;
        }
        n
    }

    /// True when `range` lies inside one range of the list.
    pub fn covers(&self, range: GpaRange) -> bool {
        self.iter()
            .any(|r| r.start() <= range.start() && range.end() <= r.end())
    }

    /// Inserts `[start, end)` (no-op when empty), merging with touching neighbours.
    ///
    /// # Errors
    /// [`PlanError::Overlap`] when it overlaps a range already present, [`PlanError::TooMany`]
    /// when the list is full, [`PlanError::Range`] for a bad range.
    pub fn insert(&mut self, start: u64, end: u64) -> Result<(), PlanError> {
        self.insert_with(start, end, true)
    }

    /// Inserts `[start, end)` as its own entry (no-op when empty), even when it touches a
    /// neighbour: a list of descriptors.
    ///
    /// # Errors
    /// As [`RangeList::insert`].
    pub fn insert_descriptor(&mut self, start: u64, end: u64) -> Result<(), PlanError> {
        self.insert_with(start, end, false)
    }

    fn insert_with(&mut self, start: u64, end: u64, merge: bool) -> Result<(), PlanError> {
        if start >= end {
            return Ok(());
        }
        let range = GpaRange::new(start, end).map_err(PlanError::Range)?;
        let mut at = self.len;
        for (i, r) in self.iter().enumerate() {
            if range.start() < r.end() && r.start() < range.end() {
                return Err(PlanError::Overlap(range));
            }
            if range.end() <= r.start() {
                at = i;
                break;
            }
        }
        // Merge with the previous and/or next range when they touch.
        let prev_touch =
            merge && at > 0 && self.get(at - 1).is_some_and(|p| p.end() == range.start());
        let next_touch = merge && self.get(at).is_some_and(|n| n.start() == range.end());
        match (prev_touch, next_touch) {
            (true, true) => {
                let (p, n) = (self.get(at - 1), self.get(at));
                if let (Some(p), Some(n)) = (p, n) {
                    self.items[at - 1] = Some(join(p, n)?);
                    self.remove(at);
                }
            }
            (true, false) => {
                if let Some(p) = self.get(at - 1) {
                    self.items[at - 1] = Some(join(p, range)?);
                }
            }
            (false, true) => {
                if let Some(n) = self.get(at) {
                    self.items[at] = Some(join(range, n)?);
                }
            }
            (false, false) => {
                if self.len == MAX_RANGES {
                    return Err(PlanError::TooMany);
                }
                self.items.copy_within(at..self.len, at + 1);
                self.items[at] = Some(range);
                self.len += 1;
            }
        }
        Ok(())
    }

    fn get(&self, i: usize) -> Option<GpaRange> {
        if i < self.len {
            self.items[i]
        } else {
            None
        }
    }

    fn remove(&mut self, i: usize) {
        self.items.copy_within(i + 1..self.len, i);
        self.len -= 1;
        self.items[self.len] = None;
    }
}

fn join(a: GpaRange, b: GpaRange) -> Result<GpaRange, PlanError> {
    GpaRange::new(a.start().as_u64(), b.end().as_u64()).map_err(PlanError::Range)
}

/// Why no plan could be made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlanError {
    /// The HOB list is malformed.
    Hob(HobError),
    /// Two unaccepted ranges overlap.
    Overlap(GpaRange),
    /// More ranges than [`MAX_RANGES`].
    TooMany,
    /// A range or configured bound is not 4K aligned / out of range.
    Range(tdmem_accept::abi::AddrError),
    /// `eager_below` is not a multiple of the unit size, or the unit size is bad.
    Config,
    /// The unaccepted-table layout failed.
    Table(TableError),
    /// No accepted memory can hold the table.
    NoRoomForTable {
        /// Bytes needed.
        len: u64,
    },
    /// Writing the table gave back a range to accept that the plan did not have as eager (a
    /// plan / table rule mismatch; the table is not usable).
    Mismatch(GpaRange),
}

impl fmt::Display for PlanError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PlanError::Hob(e) => write!(f, "HOB list: {e}"),
            PlanError::Overlap(r) => write!(f, "unaccepted range {r} overlaps another"),
            PlanError::TooMany => write!(f, "more than {MAX_RANGES} ranges"),
            PlanError::Range(e) => write!(f, "range: {e}"),
            PlanError::Config => f.write_str("bad plan configuration"),
            PlanError::Table(e) => write!(f, "unaccepted table: {e:?}"),
            PlanError::NoRoomForTable { len } => {
                write!(f, "no accepted memory for a {len}-byte unaccepted table")
            }
            PlanError::Mismatch(r) => write!(f, "table builder handed back {r}, not in the plan"),
        }
    }
}

impl From<HobError> for PlanError {
    fn from(e: HobError) -> Self {
        PlanError::Hob(e)
    }
}

/// How to split unaccepted memory between firmware and kernel.
#[derive(Debug, Clone, Copy)]
pub struct PlanConfig<'r> {
    /// Unaccepted memory below this GPA is accepted eagerly (a multiple of `unit_size`).
    pub eager_below: u64,
    /// Table unit (2 MiB, as Linux and every firmware use).
    pub unit_size: u32,
    /// The table is placed below this GPA (4 GiB keeps it reachable for 32-bit consumers).
    pub table_below: u64,
    /// Ranges the table must not overlap (firmware, payload, HOB list, stacks).
    pub reserved: &'r [GpaRange],
}

impl Default for PlanConfig<'_> {
    fn default() -> Self {
        PlanConfig {
            eager_below: 512 << 20,
            unit_size: DEFAULT_UNIT_SIZE,
            table_below: 4 << 30,
            reserved: &[],
        }
    }
}

/// Where the unaccepted table lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TablePlacement {
    /// GPA of the table (4K aligned).
    pub gpa: u64,
    /// Table bytes (header + bitmap).
    pub len: u64,
    /// Its layout.
    pub layout: TableLayout,
}

/// The result: eager ranges, lazy ranges and the table's place.
///
/// # Examples
///
/// 4 GiB of unaccepted memory above 1 MiB, the first 512 MiB accepted now, the rest left to
/// the kernel in the table the plan places in memory accepted now.
///
/// ```
/// use tdmem_accept::GpaRange;
/// use tdmem_firmware::plan::{BootPlan, PlanConfig};
///
/// let unaccepted = [GpaRange::new(0x10_0000, 0x1_0000_0000)?];
/// let plan = BootPlan::new(&unaccepted, &[], &PlanConfig::default())?;
///
/// assert_eq!(plan.eager().bytes(), (512 << 20) - 0x10_0000);
/// assert_eq!(plan.lazy().bytes(), (4 << 30) - (512 << 20));
/// let table = plan.table().expect("a place for the table");
/// assert!(table.gpa < 512 << 20, "in memory accepted at boot");
///
/// // Once the eager ranges are accepted, the table is written there:
/// let mut bytes = vec![0u8; table.len as usize];
/// let len = plan.write_table(&mut bytes)?;
/// assert_eq!(len as u64, table.len);
/// // ... and the kernel gets the memory map that goes with it:
/// assert!(plan.memory_map().count() >= 2);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone, Copy)]
pub struct BootPlan {
    eager: RangeList,
    lazy: RangeList,
    table: Option<TablePlacement>,
    unit_size: u32,
}

impl BootPlan {
    /// A plan from a TD HOB list: `EFI_RESOURCE_MEMORY_UNACCEPTED` descriptors are the
    /// unaccepted memory; `EFI_RESOURCE_SYSTEM_MEMORY` descriptors are accepted memory that may
    /// also hold the table.
    ///
    /// # Errors
    /// [`PlanError`].
    pub fn from_hob(list: &[u8], config: &PlanConfig<'_>) -> Result<BootPlan, PlanError> {
        let mut unaccepted = RangeList::new();
        let mut accepted = RangeList::new();
        for res in hob::resources(list)? {
            let res = res?;
            let (s, e) = (res.range.start().as_u64(), res.range.end().as_u64());
            match res.kind {
                ResourceKind::Unaccepted => unaccepted.insert_descriptor(s, e)?,
                ResourceKind::SystemMemory => accepted.insert(s, e)?,
                ResourceKind::Other(_) => {}
            }
        }
        BootPlan::compute(&unaccepted, &accepted, config)
    }

    /// A plan from a plain list of unaccepted ranges (not overlapping) and of accepted memory
    /// that may hold the table.
    ///
    /// # Errors
    /// [`PlanError`].
    pub fn new(
        unaccepted: &[GpaRange],
        accepted: &[GpaRange],
        config: &PlanConfig<'_>,
    ) -> Result<BootPlan, PlanError> {
        let mut u = RangeList::new();
        for r in unaccepted {
            u.insert_descriptor(r.start().as_u64(), r.end().as_u64())?;
        }
        let mut a = RangeList::new();
        for r in accepted {
            a.insert(r.start().as_u64(), r.end().as_u64())?;
        }
        BootPlan::compute(&u, &a, config)
    }

    fn compute(
        unaccepted: &RangeList,
        accepted: &RangeList,
        config: &PlanConfig<'_>,
    ) -> Result<BootPlan, PlanError> {
        let unit32 = config.unit_size;
        if !unit32.is_power_of_two() || unit32 < 4096 {
            return Err(PlanError::Config);
        }
        let unit = u64::from(unit32);
        if config.eager_below % unit != 0 {
            return Err(PlanError::Config);
        }
        let mask = unit - 1;
        let mut eager = RangeList::new();
        let mut lazy = RangeList::new();
        // Per descriptor, as the stub works.
        for r in unaccepted.iter() {
            let (s, e) = (r.start().as_u64(), r.end().as_u64());
            let cut = config.eager_below.clamp(s, e);
            eager.insert(s, cut)?;
            if cut == e {
                continue;
            }
            // The EFI stub's rules (see `TableBuilder::add_range`), and a body of at least two
            // units, which the stub never accepts again.
            let body_start = (cut + mask) & !mask;
            let body_end = e & !mask;
            if e - cut < 2 * unit || body_end < body_start.saturating_add(2 * unit) {
                eager.insert(cut, e)?;
                continue;
            }
            eager.insert(cut, body_start)?;
            lazy.insert_descriptor(body_start, body_end)?;
            eager.insert(body_end, e)?;
        }
        let mut plan = BootPlan {
            eager,
            lazy,
            table: None,
            unit_size: unit32,
        };
        if !plan.lazy.is_empty() {
            let mut bodies = [GpaRange::new(0, 4096).map_err(PlanError::Range)?; MAX_RANGES];
            let n = plan.lazy.copy_to(&mut bodies);
            let layout = TableLayout::for_ranges(&bodies[..n], unit32).map_err(PlanError::Table)?;
            let len = layout.table_len().map_err(PlanError::Table)? as u64;
            let gpa = place(len, &plan.eager, accepted, config)?;
            plan.table = Some(TablePlacement { gpa, len, layout });
        }
        Ok(plan)
    }

    /// What the firmware accepts before hand-off, in address order.
    pub fn eager(&self) -> &RangeList {
        &self.eager
    }

    /// What the table records as unaccepted, in address order.
    pub fn lazy(&self) -> &RangeList {
        &self.lazy
    }

    /// The table's place, `None` when nothing is left unaccepted.
    pub fn table(&self) -> Option<TablePlacement> {
        self.table
    }

    /// Table unit size.
    pub fn unit_size(&self) -> u32 {
        self.unit_size
    }

    /// Writes the table into `buf` (the bytes at [`TablePlacement::gpa`], accepted first),
    /// returning its length (0 when the plan has no table).
    ///
    /// # Errors
    /// [`PlanError::Table`] when `buf` is short; [`PlanError::Mismatch`] when the table rules
    /// hand back memory to accept that the plan does not accept eagerly.
    pub fn write_table(&self, buf: &mut [u8]) -> Result<usize, PlanError> {
        let Some(t) = self.table else {
            return Ok(0);
        };
        let mut builder = TableBuilder::new(buf, t.layout).map_err(PlanError::Table)?;
        let mut mismatch = None;
        // Every lazy descriptor is unit aligned and at least two units long: the stub's rules
        // record all of it and accept nothing.
        for r in self.lazy.iter() {
            builder
                .add_range(r, |now| {
                    mismatch.get_or_insert(now);
                })
                .map_err(PlanError::Table)?;
        }
        if let Some(r) = mismatch {
            return Err(PlanError::Mismatch(r));
        }
        Ok(builder.finish())
    }

    /// The memory map that goes with the table, in address order: the lazy ranges as
    /// [`EFI_UNACCEPTED_MEMORY`], the eager ranges as [`EFI_CONVENTIONAL_MEMORY`]. Touching
    /// ranges stay separate entries. The firmware's other memory (accepted system memory,
    /// reservations, the table itself) is not in it and keeps its own types.
    pub fn memory_map(&self) -> impl Iterator<Item = MapEntry> + '_ {
        let mut lazy = self.lazy.iter().peekable();
        let mut eager = self.eager.iter().peekable();
        core::iter::from_fn(move || {
            let take_lazy = match (lazy.peek(), eager.peek()) {
                (Some(l), Some(e)) => l.start() < e.start(),
                (Some(_), None) => true,
                (None, Some(_)) => false,
                (None, None) => return None,
            };
            let (memory_type, range) = if take_lazy {
                (EFI_UNACCEPTED_MEMORY, lazy.next()?)
            } else {
                (EFI_CONVENTIONAL_MEMORY, eager.next()?)
            };
            Some(MapEntry { memory_type, range })
        })
    }

    /// The memory-allocation HOB that reserves the table as `EfiACPIReclaimMemory`, for the HOB
    /// list (or memory map) the payload hands on; `None` when there is no table.
    pub fn table_allocation(&self) -> Option<MemoryAllocation> {
        let t = self.table?;
        Some(MemoryAllocation {
            header: Header {
                r#type: HOB_TYPE_MEMORY_ALLOCATION,
                length: core::mem::size_of::<MemoryAllocation>() as u16,
                reserved: 0,
            },
            alloc_descriptor: MemoryAllocationHeader {
                name: tdmem_accept::unaccepted::UNACCEPTED_TABLE_GUID,
                memory_base_address: t.gpa,
                memory_length: t.len.next_multiple_of(PageLevel::Size4K.size()),
                memory_type: EFI_ACPI_RECLAIM_MEMORY,
                reserved: [0; 4],
            },
        })
    }
}

/// The highest 4K-aligned `[gpa, gpa + len)` below `config.table_below`, inside one range of
/// `eager` or `accepted`, overlapping no reserved range.
fn place(
    len: u64,
    eager: &RangeList,
    accepted: &RangeList,
    config: &PlanConfig<'_>,
) -> Result<u64, PlanError> {
    let size = len.next_multiple_of(4096);
    let mut best: Option<u64> = None;
    for r in eager.iter().chain(accepted.iter()) {
        let lo = r.start().as_u64();
        let mut hi = r.end().as_u64().min(config.table_below);
        // Walk down past reserved ranges that overlap the candidate.
        while hi >= lo.saturating_add(size) && hi - size >= lo {
            let at = hi - size;
            match config
                .reserved
                .iter()
                .filter(|x| x.start().as_u64() < hi && at < x.end().as_u64())
                .map(|x| x.start().as_u64())
                .min()
            {
                None => {
                    if best.is_none_or(|b| at > b) {
                        best = Some(at);
                    }
                    break;
                }
                Some(blocked) => hi = blocked & !4095,
            }
        }
    }
    best.ok_or(PlanError::NoRoomForTable { len })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hob::build::HobWriter;
    use td_shim_interface::td_uefi_pi::pi::hob::{
        RESOURCE_MEMORY_UNACCEPTED, RESOURCE_SYSTEM_MEMORY,
    };
    use tdmem_accept::unaccepted::UnacceptedTable;

    const K4: u64 = 4096;
    const M: u64 = 1 << 20;
    const G: u64 = 1 << 30;

    fn r(s: u64, e: u64) -> GpaRange {
        GpaRange::new(s, e).unwrap()
    }

    fn list(l: &RangeList) -> std::vec::Vec<(u64, u64)> {
        l.iter()
            .map(|r| (r.start().as_u64(), r.end().as_u64()))
            .collect()
    }

    #[test]
    fn range_list_merges_and_rejects_overlap() {
        let mut l = RangeList::new();
        l.insert(4 * M, 6 * M).unwrap();
        l.insert(0, 2 * M).unwrap();
        l.insert(2 * M, 4 * M).unwrap();
        assert_eq!(list(&l), [(0, 6 * M)]);
        l.insert(8 * M, 10 * M).unwrap();
        assert_eq!(list(&l), [(0, 6 * M), (8 * M, 10 * M)]);
        assert_eq!(
            l.insert(5 * M, 9 * M),
            Err(PlanError::Overlap(r(5 * M, 9 * M)))
        );
        l.insert(7 * M, 7 * M).unwrap();
        assert_eq!(l.len(), 2);
        assert!(l.covers(r(8 * M, 9 * M)));
        assert!(!l.covers(r(5 * M, 9 * M)));
        let mut full = RangeList::new();
        for i in 0..MAX_RANGES as u64 {
            full.insert(i * 2 * M, i * 2 * M + M).unwrap();
        }
        assert_eq!(full.insert(G, G + M), Err(PlanError::TooMany));
    }

    #[test]
    fn splits_eager_low_memory_lazy_bodies_and_eager_edges() {
        let cfg = PlanConfig {
            eager_below: 64 * M,
            ..PlanConfig::default()
        };
        // One range crossing eager_below with an unaligned tail, a short range, an unaligned head.
        let unaccepted = [
            r(2 * M, 100 * M + 12 * K4),
            r(200 * M, 203 * M),
            r(300 * M + K4, 310 * M),
        ];
        let plan = BootPlan::new(&unaccepted, &[], &cfg).unwrap();
        assert_eq!(
            list(plan.eager()),
            [
                (2 * M, 64 * M),
                (100 * M, 100 * M + 12 * K4),
                (200 * M, 203 * M),
                (300 * M + K4, 302 * M)
            ]
        );
        assert_eq!(list(plan.lazy()), [(64 * M, 100 * M), (302 * M, 310 * M)]);
        // Every unaccepted byte is in exactly one of the two lists.
        let total: u64 = unaccepted.iter().map(|r| r.len()).sum();
        assert_eq!(plan.eager().bytes() + plan.lazy().bytes(), total);
    }

    /// Regression: a descriptor whose aligned body is one unit is accepted eagerly: the EFI
    /// stub would accept a one-unit descriptor again and leave its bit set. Touching
    /// descriptors keep their own rules, and the memory map has one entry per piece.
    #[test]
    fn one_unit_bodies_are_eager_and_descriptors_stay_apart() {
        let cfg = PlanConfig {
            eager_below: 0,
            ..PlanConfig::default()
        };
        let unaccepted = [r(M, 5 * M), r(8 * M, 9 * M), r(9 * M, 14 * M)];
        let plan = BootPlan::new(&unaccepted, &[], &cfg).unwrap();
        assert_eq!(list(plan.lazy()), [(10 * M, 14 * M)]);
        assert_eq!(list(plan.eager()), [(M, 5 * M), (8 * M, 10 * M)]);
        let map: std::vec::Vec<_> = plan
            .memory_map()
            .map(|e| (e.memory_type, e.range.start().as_u64(), e.pages()))
            .collect();
        assert_eq!(
            map,
            [
                (EFI_CONVENTIONAL_MEMORY, M, 4 * M / K4),
                (EFI_CONVENTIONAL_MEMORY, 8 * M, 2 * M / K4),
                (EFI_UNACCEPTED_MEMORY, 10 * M, 4 * M / K4),
            ]
        );
        let t = plan.table().unwrap();
        assert_eq!(t.layout.phys_base, 10 * M);
    }

    #[test]
    fn table_is_written_in_accepted_memory_and_matches_the_lazy_list() {
        let cfg = PlanConfig {
            eager_below: 64 * M,
            ..PlanConfig::default()
        };
        let plan = BootPlan::new(&[r(0, 4 * G + 3 * M)], &[], &cfg).unwrap();
        let t = plan.table().unwrap();
        // Highest spot inside eager memory below table_below: the eager tail above 4G is out,
        // so the top of [0, 64M).
        assert_eq!(t.gpa, 64 * M - K4);
        assert!(plan.eager().covers(r(t.gpa, t.gpa + K4)));
        let mut buf = [0u8; 4096];
        let n = plan.write_table(&mut buf).unwrap();
        assert_eq!(n as u64, t.len);
        let table = UnacceptedTable::parse(&buf[..n]).unwrap();
        assert_eq!(table.phys_base(), 64 * M);
        assert_eq!(table.unaccepted_bytes(), plan.lazy().bytes());
        assert_eq!(plan.lazy().bytes(), 4 * G + 2 * M - 64 * M);
        assert!(!table.is_unaccepted(4 * G + 2 * M));
        let hob = plan.table_allocation().unwrap();
        assert_eq!(hob.alloc_descriptor.memory_base_address, t.gpa);
        assert_eq!(hob.alloc_descriptor.memory_type, EFI_ACPI_RECLAIM_MEMORY);
    }

    #[test]
    fn table_avoids_reserved_memory_and_may_use_system_memory() {
        let reserved = [r(56 * M, 64 * M)];
        let cfg = PlanConfig {
            eager_below: 64 * M,
            reserved: &reserved,
            ..PlanConfig::default()
        };
        let plan = BootPlan::new(&[r(32 * M, 128 * M)], &[], &cfg).unwrap();
        assert_eq!(plan.table().unwrap().gpa, 56 * M - K4);

        // All eager memory reserved: the table goes to accepted system memory.
        let reserved = [r(0, 64 * M)];
        let cfg = PlanConfig {
            eager_below: 64 * M,
            reserved: &reserved,
            ..PlanConfig::default()
        };
        let plan = BootPlan::new(&[r(32 * M, 128 * M)], &[r(0, 32 * M)], &cfg);
        assert!(matches!(plan, Err(PlanError::NoRoomForTable { .. })));
        let plan = BootPlan::new(&[r(32 * M, 128 * M)], &[r(G, G + M)], &cfg).unwrap();
        assert_eq!(plan.table().unwrap().gpa, G + M - K4);
    }

    #[test]
    fn no_table_when_everything_is_eager() {
        let plan = BootPlan::new(&[r(0, 64 * M)], &[], &PlanConfig::default()).unwrap();
        assert!(plan.table().is_none());
        assert!(plan.table_allocation().is_none());
        assert_eq!(plan.write_table(&mut []).unwrap(), 0);
        assert_eq!(plan.eager().bytes(), 64 * M);
    }

    #[test]
    fn bad_config_is_refused() {
        let cfg = PlanConfig {
            eager_below: 3 * M,
            ..PlanConfig::default()
        };
        assert_eq!(
            BootPlan::new(&[r(0, 8 * M)], &[], &cfg).err(),
            Some(PlanError::Config)
        );
        let cfg = PlanConfig {
            unit_size: 3000,
            ..PlanConfig::default()
        };
        assert_eq!(
            BootPlan::new(&[r(0, 8 * M)], &[], &cfg).err(),
            Some(PlanError::Config)
        );
    }

    #[test]
    fn plan_from_a_td_hob_list() {
        // The shape of a td-shim TD HOB: accepted low memory (TD build), unaccepted above.
        let mut buf = [0u8; 512];
        let mut w = HobWriter::new(&mut buf).unwrap();
        w.resource(RESOURCE_SYSTEM_MEMORY, 7, 0, 16 * M).unwrap();
        w.resource(RESOURCE_MEMORY_UNACCEPTED, 7, 16 * M, 2 * G - 16 * M)
            .unwrap();
        w.resource(RESOURCE_MEMORY_UNACCEPTED, 7, 4 * G, 2 * G)
            .unwrap();
        let len = w.finish().unwrap();
        let cfg = PlanConfig {
            eager_below: 256 * M,
            ..PlanConfig::default()
        };
        let plan = BootPlan::from_hob(&buf[..len], &cfg).unwrap();
        assert_eq!(list(plan.eager()), [(16 * M, 256 * M)]);
        assert_eq!(list(plan.lazy()), [(256 * M, 2 * G), (4 * G, 6 * G)]);
        let t = plan.table().unwrap();
        assert_eq!(t.layout.phys_base, 256 * M);
        assert_eq!(t.gpa, 256 * M - K4);
        let mut table = [0u8; 4096];
        let n = plan.write_table(&mut table).unwrap();
        let view = UnacceptedTable::parse(&table[..n]).unwrap();
        assert_eq!(view.unaccepted_bytes(), 2 * G - 256 * M + 2 * G);
        assert!(!view.is_unaccepted(3 * G));

        // A broken list is an error, not a plan.
        assert!(matches!(
            BootPlan::from_hob(&buf[..len - 8], &cfg),
            Err(PlanError::Hob(HobError::NoEnd))
        ));
        // Overlapping unaccepted descriptors are refused.
        let mut buf = [0u8; 512];
        let mut w = HobWriter::new(&mut buf).unwrap();
        w.resource(RESOURCE_MEMORY_UNACCEPTED, 7, 0, 4 * M).unwrap();
        w.resource(RESOURCE_MEMORY_UNACCEPTED, 7, 2 * M, 4 * M)
            .unwrap();
        let len = w.finish().unwrap();
        assert!(matches!(
            BootPlan::from_hob(&buf[..len], &cfg),
            Err(PlanError::Overlap(_))
        ));
    }

    #[test]
    fn eager_list_runs_as_a_boot_job() {
        let plan = BootPlan::new(
            &[r(K4, 3 * G)],
            &[],
            &PlanConfig {
                eager_below: 2 * G + 4 * M,
                ..PlanConfig::default()
            },
        )
        .unwrap();
        let mut ranges = [r(0, K4); 4];
        let n = plan.eager().copy_to(&mut ranges);
        let progress = [tdmem_accept::parallel::WorkerProgress::new()];
        let job = tdmem_accept::parallel::BootJob::new(&ranges[..n], &progress);
        // [4K, 2M) edge, 511 2M chunks, one 1G chunk, two 2M chunks.
        assert_eq!(job.edge_bytes(), 2 * M - K4);
        assert_eq!(job.total_chunks(), 511 + 1 + 2);
    }
}
