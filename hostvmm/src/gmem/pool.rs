//! Simulated host physical memory: a pool that hands out naturally aligned folios of 4K, 2M or
//! 1G from one contiguous host physical range.
//!
//! The allocator is a small buddy-like scheme over per-level free sets: a request takes the
//! lowest free block of its level, else splits the lowest free larger block, else carves fresh
//! space; a freed block merges with its 511 siblings when they are all free. Frames that were
//! poisoned (a failed REMOVE or DEMOTE left them in the Secure-EPT) are *retired* when their
//! folio is freed: they are never put on a free list again, so they are never handed out again.
//!
//! It does not model NUMA, zeroing, contents or fragmentation policies beyond the above. Every
//! allocation attempt goes through a [`FailureInjector`] so that tests can make any given
//! allocation fail.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use accept::abi::PageLevel;

use super::stats::LevelCounts;

const PAGE_4K: u64 = PageLevel::Size4K.size();

/// A host physical address, 4K aligned.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Hpa(u64);

impl Hpa {
    /// Checked constructor: the address must be 4K aligned.
    ///
    /// # Errors
    /// [`PoolError::Misaligned`] when it is not.
    pub const fn try_new(addr: u64) -> Result<Hpa, PoolError> {
        if PageLevel::Size4K.is_aligned(addr) {
            Ok(Hpa(addr))
        } else {
            Err(PoolError::Misaligned(addr))
        }
    }

    /// The raw value.
    pub const fn as_u64(self) -> u64 {
        self.0
    }

    /// The 4K frame number.
    pub const fn pfn(self) -> u64 {
        self.0 >> 12
    }

    /// `self + bytes`; `None` on overflow or when `bytes` is not a multiple of 4K.
    pub const fn checked_add(self, bytes: u64) -> Option<Hpa> {
        if !PageLevel::Size4K.is_aligned(bytes) {
            return None;
        }
        match self.0.checked_add(bytes) {
            Some(v) => Some(Hpa(v)),
            None => None,
        }
    }

    /// True when aligned to `level`.
    pub const fn is_aligned(self, level: PageLevel) -> bool {
        level.is_aligned(self.0)
    }
}

impl fmt::Debug for Hpa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Hpa({:#x})", self.0)
    }
}

impl fmt::Display for Hpa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}", self.0)
    }
}

/// Errors of the folio pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PoolError {
    /// An address or size is not 4K aligned.
    #[error("{0:#x} is not 4K aligned")]
    Misaligned(u64),
    /// The pool's range is empty or `base + size` overflows.
    #[error("invalid pool range")]
    InvalidRange,
    /// No free block of the requested level is left.
    #[error("no free {level} folio left")]
    Exhausted {
        /// Requested level.
        level: PageLevel,
    },
    /// The allocation was made to fail by the pool's `FailureInjector` (feature `testing`).
    #[error("injected allocation failure ({level} folio)")]
    Injected {
        /// Requested level.
        level: PageLevel,
    },
    /// `free` was given a block that is not a live allocation of that level.
    #[error("{hpa} is not an allocated {level} folio")]
    NotAllocated {
        /// The address passed.
        hpa: Hpa,
        /// The level passed.
        level: PageLevel,
    },
}

/// Makes a chosen allocation attempt fail, and counts attempts.
///
/// Attempts are numbered from 0 in the order they happen; [`FailureInjector::fail_nth`] arms a
/// one-shot failure of the attempt `n` places from now.
#[cfg(feature = "testing")]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FailureInjector {
    attempts: u64,
    fail_at: Option<u64>,
    failures: u64,
}

#[cfg(feature = "testing")]
impl FailureInjector {
    /// Arms a one-shot failure of the `n`-th attempt from now (0 = the next one). Replaces any
    /// failure armed before. Saturates instead of overflowing.
    pub fn fail_nth(&mut self, n: u64) {
        self.fail_at = Some(self.attempts.saturating_add(n));
    }

    /// Disarms a pending failure.
    pub fn clear(&mut self) {
        self.fail_at = None;
    }

    /// True when a failure is armed and has not fired yet.
    pub fn is_armed(&self) -> bool {
        self.fail_at.is_some()
    }

    /// Attempts made so far.
    pub fn attempts(&self) -> u64 {
        self.attempts
    }

    /// Failures injected so far.
    pub fn failures(&self) -> u64 {
        self.failures
    }

    /// Records one attempt; false when this attempt must fail.
    pub(crate) fn attempt(&mut self) -> bool {
        let index = self.attempts;
        self.attempts = self.attempts.saturating_add(1);
        if self.fail_at == Some(index) {
            self.fail_at = None;
            self.failures = self.failures.saturating_add(1);
            false
        } else {
            true
        }
    }
}

/// Without the `testing` feature: every attempt succeeds.
#[cfg(not(feature = "testing"))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct FailureInjector {}

#[cfg(not(feature = "testing"))]
impl FailureInjector {
    /// Always true: nothing is injected.
    #[inline(always)]
    pub(crate) fn attempt(&mut self) -> bool {
        true
    }
}

/// Counters of a [`FolioPool`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PoolStats {
    /// Successful allocations by level.
    pub allocated: LevelCounts,
    /// Frees by level (of the folio as allocated, before any poison split).
    pub freed: LevelCounts,
    /// Failed allocations (exhausted or injected).
    pub failures: u64,
    /// 4K frames retired because they were poisoned: never handed out again.
    pub retired_frames: u64,
}

/// Comparable view of a pool's state (not its counters).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolSnapshot {
    /// Live allocations, by address.
    pub live: Vec<(Hpa, PageLevel)>,
    /// Number of free blocks per level.
    pub free_blocks: LevelCounts,
    /// First never-used address.
    pub fresh: Hpa,
    /// Retired (poisoned) frames.
    pub retired: Vec<Hpa>,
}

/// Live allocations as runs of adjacent folios of one level (`start -> (end, level)`): a pool
/// that hands out folios in address order keeps a TiB of 2M folios in a handful of runs
/// instead of a map entry per folio.
#[derive(Debug, Clone, Default)]
struct LiveRuns {
    runs: BTreeMap<u64, (u64, PageLevel)>,
    count: usize,
}

impl LiveRuns {
    /// Records a live folio (which must not overlap a live one).
    fn insert(&mut self, addr: u64, level: PageLevel) {
        let end = addr.saturating_add(level.size());
        let (mut start, mut stop) = (addr, end);
        if let Some((&s, &(e, l))) = self.runs.range(..addr).next_back() {
            if e == addr && l == level {
                start = s;
            }
        }
        if let Some(&(e, l)) = self.runs.get(&end) {
            if l == level {
                stop = e;
                self.runs.remove(&end);
            }
        }
        self.runs.insert(start, (stop, level));
        self.count += 1;
    }

    /// The level of the live folio starting at `addr`, if there is one.
    fn level_of(&self, addr: u64) -> Option<PageLevel> {
        let (&s, &(e, l)) = self.runs.range(..=addr).next_back()?;
        (addr < e && (addr - s) % l.size() == 0).then_some(l)
    }

    /// Forgets the live folio starting at `addr`; false when there is none.
    fn remove(&mut self, addr: u64) -> bool {
        let Some((&s, &(e, l))) = self.runs.range(..=addr).next_back() else {
            return false;
        };
        if addr >= e || (addr - s) % l.size() != 0 {
            return false;
        }
        self.runs.remove(&s);
        if s < addr {
            self.runs.insert(s, (addr, l));
        }
        let after = addr + l.size();
        if after < e {
            self.runs.insert(after, (e, l));
        }
        self.count -= 1;
        true
    }

    /// Every live folio, in address order.
    fn iter(&self) -> impl Iterator<Item = (u64, PageLevel)> + '_ {
        self.runs
            .iter()
            .flat_map(|(&s, &(e, l))| (s..e).step_by(l.size() as usize).map(move |a| (a, l)))
    }

    fn len(&self) -> usize {
        self.count
    }
}

/// A simulated physical range handing out naturally aligned folios.
///
/// Memory use is O(runs of live allocations + free blocks + retired frames), never O(range
/// size).
#[derive(Debug, Clone)]
pub struct FolioPool {
    end: u64,
    fresh: u64,
    free: [BTreeSet<u64>; 3],
    live: LiveRuns,
    retired: BTreeSet<u64>,
    injector: FailureInjector,
    stats: PoolStats,
}

impl FolioPool {
    /// A pool over `[base, base + size)`.
    ///
    /// # Errors
    /// [`PoolError::Misaligned`] when `base` or `size` is not 4K aligned,
    /// [`PoolError::InvalidRange`] when `size` is 0 or the end overflows.
    pub fn new(base: u64, size: u64) -> Result<FolioPool, PoolError> {
        Hpa::try_new(base)?;
        if !PageLevel::Size4K.is_aligned(size) {
            return Err(PoolError::Misaligned(size));
        }
        let end = base.checked_add(size).ok_or(PoolError::InvalidRange)?;
        if size == 0 {
            return Err(PoolError::InvalidRange);
        }
        Ok(FolioPool {
            end,
            fresh: base,
            free: Default::default(),
            live: LiveRuns::default(),
            retired: BTreeSet::new(),
            injector: FailureInjector::default(),
            stats: PoolStats::default(),
        })
    }

    /// Allocates one naturally aligned folio of `level`.
    ///
    /// # Errors
    /// [`PoolError::Injected`] when the injector fails this attempt, [`PoolError::Exhausted`]
    /// when no block of that level is free. A failed call changes nothing but counters.
    pub fn alloc(&mut self, level: PageLevel) -> Result<Hpa, PoolError> {
        if !self.injector.attempt() {
            self.stats.failures = self.stats.failures.saturating_add(1);
            return Err(PoolError::Injected { level });
        }
        let Some(addr) = self.take_block(level) else {
            self.stats.failures = self.stats.failures.saturating_add(1);
            return Err(PoolError::Exhausted { level });
        };
        self.live.insert(addr, level);
        self.stats.allocated.add(level, 1);
        Ok(Hpa(addr))
    }

    /// Frees a folio allocated at `level`. `poisoned` lists the indices of its 4K frames (in
    /// any order) that must never be reused: they are retired, the rest goes back to the free
    /// sets. Returns the number of frames newly retired.
    ///
    /// # Errors
    /// [`PoolError::NotAllocated`] when `hpa` is not a live allocation of `level`; nothing is
    /// changed then.
    pub fn free(&mut self, hpa: Hpa, level: PageLevel, poisoned: &[u64]) -> Result<u64, PoolError> {
        if self.live.level_of(hpa.0) != Some(level) {
            return Err(PoolError::NotAllocated { hpa, level });
        }
        self.live.remove(hpa.0);
        self.stats.freed.add(level, 1);
        let mut retired = 0;
        for &index in poisoned {
            if index >= level.pages_4k() {
                continue;
            }
            // In range: index < pages_4k, so the product is below the folio size.
            let frame = hpa.0 + index * PAGE_4K;
            if self.retired.insert(frame) {
                retired += 1;
            }
        }
        self.stats.retired_frames = self.stats.retired_frames.saturating_add(retired);
        self.release(hpa.0, level);
        Ok(retired)
    }

    /// True when the 4K frame at `hpa` was retired.
    pub fn is_retired(&self, hpa: Hpa) -> bool {
        self.retired.contains(&(hpa.0 & !PageLevel::Size4K.mask()))
    }

    /// True when any frame of `[hpa, hpa + level.size())` was retired.
    pub fn overlaps_retired(&self, hpa: Hpa, level: PageLevel) -> bool {
        self.block_has_retired(hpa.0, level)
    }

    /// Number of retired frames.
    pub fn retired_frames(&self) -> u64 {
        self.stats.retired_frames
    }

    /// Number of live allocations.
    pub fn live_folios(&self) -> usize {
        self.live.len()
    }

    /// Counters.
    pub fn stats(&self) -> PoolStats {
        self.stats
    }

    /// The allocation failure injector.
    #[cfg(feature = "testing")]
    pub fn injector(&self) -> &FailureInjector {
        &self.injector
    }

    /// The allocation failure injector, to arm failures.
    #[cfg(feature = "testing")]
    pub fn injector_mut(&mut self) -> &mut FailureInjector {
        &mut self.injector
    }

    /// A comparable view of the state.
    pub fn snapshot(&self) -> PoolSnapshot {
        let mut free_blocks = LevelCounts::default();
        for level in PageLevel::LARGEST_FIRST {
            free_blocks.add(level, self.free[level.index() as usize].len() as u64);
        }
        PoolSnapshot {
            live: self.live.iter().map(|(a, l)| (Hpa(a), l)).collect(),
            free_blocks,
            fresh: Hpa(self.fresh),
            retired: self.retired.iter().map(|&a| Hpa(a)).collect(),
        }
    }

    fn free_set(&mut self, level: PageLevel) -> &mut BTreeSet<u64> {
        &mut self.free[level.index() as usize]
    }

    fn take_block(&mut self, level: PageLevel) -> Option<u64> {
        if let Some(addr) = self.free_set(level).pop_first() {
            return Some(addr);
        }
        // Split the lowest free block of the nearest larger level.
        let mut larger = level.larger();
        while let Some(big) = larger {
            if let Some(addr) = self.free_set(big).pop_first() {
                let mut current = big;
                while current > level {
                    let Some(child) = current.smaller() else {
                        break;
                    };
                    for i in 1..512u64 {
                        let sibling = addr + i * child.size();
                        self.free_set(child).insert(sibling);
                    }
                    current = child;
                }
                return Some(addr);
            }
            larger = big.larger();
        }
        // Carve fresh space, giving the alignment gap back as smaller blocks.
        let aligned = self.fresh.checked_add(level.mask())? & !level.mask();
        let end = aligned.checked_add(level.size())?;
        if end > self.end {
            return None;
        }
        let mut gap = self.fresh;
        while gap < aligned {
            let block = PageLevel::LARGEST_FIRST
                .into_iter()
                .find(|l| l.is_aligned(gap) && gap + l.size() <= aligned)
                .unwrap_or(PageLevel::Size4K);
            self.insert_free(gap, block);
            gap += block.size();
        }
        self.fresh = end;
        Some(aligned)
    }

    fn block_has_retired(&self, addr: u64, level: PageLevel) -> bool {
        let end = addr.saturating_add(level.size());
        self.retired.range(addr..end).next().is_some()
    }

    /// Returns a block to the free sets, splitting around retired frames.
    fn release(&mut self, addr: u64, level: PageLevel) {
        if !self.block_has_retired(addr, level) {
            self.insert_free(addr, level);
            return;
        }
        if let Some(child) = level.smaller() {
            for i in 0..512u64 {
                self.release(addr + i * child.size(), child);
            }
        }
        // A retired 4K frame is dropped: never reused.
    }

    /// Inserts a free block, merging it with its siblings into the parent when all are free.
    fn insert_free(&mut self, addr: u64, level: PageLevel) {
        if let Some(parent) = level.larger() {
            let base = addr & !parent.mask();
            let end = base + parent.size();
            let free_siblings = self.free[level.index() as usize]
                .range(base..end)
                .filter(|&&a| a != addr)
                .count();
            if free_siblings == 511 {
                let set = self.free_set(level);
                let siblings: Vec<u64> = set.range(base..end).copied().collect();
                for s in siblings {
                    set.remove(&s);
                }
                self.insert_free(base, parent);
                return;
            }
        }
        self.free_set(level).insert(addr);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Folios handed out in address order are kept as one run, whatever their number; frees
    /// in the middle split it, and every folio stays individually checkable.
    #[test]
    fn live_folios_are_kept_as_runs() {
        let m2 = PageLevel::Size2M.size();
        let mut p = FolioPool::new(0, 1024 * m2).unwrap();
        let hpas: Vec<Hpa> = (0..1000)
            .map(|_| p.alloc(PageLevel::Size2M).unwrap())
            .collect();
        assert_eq!(p.live.runs.len(), 1);
        assert_eq!(p.live_folios(), 1000);
        p.free(hpas[500], PageLevel::Size2M, &[]).unwrap();
        assert_eq!(p.live.runs.len(), 2);
        assert!(p.free(hpas[500], PageLevel::Size2M, &[]).is_err());
        assert!(p.free(hpas[499], PageLevel::Size4K, &[]).is_err());
        assert_eq!(p.live_folios(), 999);
        assert_eq!(p.snapshot().live.len(), 999);
    }

    const M2: u64 = PageLevel::Size2M.size();
    const G1: u64 = PageLevel::Size1G.size();

    #[test]
    fn allocations_are_naturally_aligned_and_distinct() {
        let mut pool = FolioPool::new(0x1000, 4 * G1).unwrap();
        let a = pool.alloc(PageLevel::Size4K).unwrap();
        let b = pool.alloc(PageLevel::Size2M).unwrap();
        let c = pool.alloc(PageLevel::Size1G).unwrap();
        let d = pool.alloc(PageLevel::Size4K).unwrap();
        assert_eq!(a.as_u64(), 0x1000);
        assert!(b.is_aligned(PageLevel::Size2M));
        assert!(c.is_aligned(PageLevel::Size1G));
        // The alignment gap before the 2M folio is reused for the next 4K request.
        assert_eq!(d.as_u64(), 0x2000);
        assert_eq!(pool.stats().allocated.get(PageLevel::Size4K), 2);
    }

    #[test]
    fn freed_blocks_are_reused_and_merge() {
        let mut pool = FolioPool::new(0, M2).unwrap();
        let pages: Vec<Hpa> = (0..512)
            .map(|_| pool.alloc(PageLevel::Size4K).unwrap())
            .collect();
        assert!(matches!(
            pool.alloc(PageLevel::Size4K),
            Err(PoolError::Exhausted { .. })
        ));
        for p in &pages {
            pool.free(*p, PageLevel::Size4K, &[]).unwrap();
        }
        // All 512 merged back into one 2M block.
        assert_eq!(pool.snapshot().free_blocks.get(PageLevel::Size2M), 1);
        assert_eq!(pool.alloc(PageLevel::Size2M).unwrap().as_u64(), 0);
    }

    #[test]
    fn exhaustion_and_injection() {
        let mut pool = FolioPool::new(0, M2).unwrap();
        assert!(matches!(
            pool.alloc(PageLevel::Size1G),
            Err(PoolError::Exhausted { .. })
        ));
        pool.injector_mut().fail_nth(1);
        let before = pool.snapshot();
        pool.alloc(PageLevel::Size4K).unwrap();
        let mid = pool.snapshot();
        assert_ne!(before, mid);
        assert_eq!(
            pool.alloc(PageLevel::Size4K),
            Err(PoolError::Injected {
                level: PageLevel::Size4K
            })
        );
        assert_eq!(pool.snapshot(), mid);
        assert_eq!(pool.injector().failures(), 1);
        assert!(pool.alloc(PageLevel::Size4K).is_ok());
    }

    #[test]
    fn poisoned_frames_are_retired_and_never_reused() {
        let mut pool = FolioPool::new(0, M2).unwrap();
        let folio = pool.alloc(PageLevel::Size2M).unwrap();
        assert_eq!(pool.free(folio, PageLevel::Size2M, &[3, 3, 700]), Ok(1));
        assert_eq!(pool.retired_frames(), 1);
        assert!(pool.is_retired(Hpa(3 * PAGE_4K)));
        // The 2M block cannot come back whole; 511 clean 4K frames can.
        assert!(pool.alloc(PageLevel::Size2M).is_err());
        let mut got = 0;
        while let Ok(p) = pool.alloc(PageLevel::Size4K) {
            assert!(!pool.is_retired(p));
            got += 1;
        }
        assert_eq!(got, 511);
    }

    #[test]
    fn double_free_is_an_error() {
        let mut pool = FolioPool::new(0, M2).unwrap();
        let p = pool.alloc(PageLevel::Size4K).unwrap();
        pool.free(p, PageLevel::Size4K, &[]).unwrap();
        let snap = pool.snapshot();
        assert!(matches!(
            pool.free(p, PageLevel::Size4K, &[]),
            Err(PoolError::NotAllocated { .. })
        ));
        assert_eq!(pool.snapshot(), snap);
    }

    #[test]
    fn bad_configs() {
        assert_eq!(FolioPool::new(1, M2).err(), Some(PoolError::Misaligned(1)));
        assert_eq!(FolioPool::new(0, 0).err(), Some(PoolError::InvalidRange));
        assert_eq!(
            FolioPool::new(!0xFFF, M2).err(),
            Some(PoolError::InvalidRange)
        );
    }
}
