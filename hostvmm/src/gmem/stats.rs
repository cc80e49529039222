//! Counters of the guest_memfd model, for reports and tests.
//!
//! Counters only grow; they are kept out of [`super::GmemSnapshot`] so that a failed call
//! (which bumps a failure counter) still compares equal to the state before it.

use accept::abi::PageLevel;

/// One counter per page level.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LevelCounts {
    /// 4K.
    pub size_4k: u64,
    /// 2M.
    pub size_2m: u64,
    /// 1G.
    pub size_1g: u64,
}

impl LevelCounts {
    /// The counter of `level`.
    pub const fn get(&self, level: PageLevel) -> u64 {
        match level {
            PageLevel::Size4K => self.size_4k,
            PageLevel::Size2M => self.size_2m,
            PageLevel::Size1G => self.size_1g,
        }
    }

    /// Sum over all levels.
    pub const fn total(&self) -> u64 {
        self.size_4k
            .saturating_add(self.size_2m)
            .saturating_add(self.size_1g)
    }

    /// Adds `n` to the counter of `level` (saturating).
    pub fn add(&mut self, level: PageLevel, n: u64) {
        let c = match level {
            PageLevel::Size4K => &mut self.size_4k,
            PageLevel::Size2M => &mut self.size_2m,
            PageLevel::Size1G => &mut self.size_1g,
        };
        *c = c.saturating_add(n);
    }
}

/// Counters of one [`super::GuestMemfd`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct GmemStats {
    /// Folios allocated from the pool, by level.
    pub folios_allocated: LevelCounts,
    /// Folios freed back to the pool (all sub-pages gone), by level.
    pub folios_freed: LevelCounts,
    /// Conversions to shared that changed at least one page.
    pub conversions_to_shared: u64,
    /// Conversions to private that changed or deferred at least one page.
    pub conversions_to_private: u64,
    /// 4K pages committed shared by conversions.
    pub pages_to_shared: u64,
    /// 4K pages committed private by conversions (immediately or on the last reference drop).
    pub pages_to_private: u64,
    /// Conversions of ranges already in the target state (no invalidation).
    pub idempotent_conversions: u64,
    /// Conversions and hole punches refused with EAGAIN (a host-mapped or referenced page).
    pub eagain: u64,
    /// Conversions refused because a range-map node or record could not be allocated.
    pub no_memory: u64,
    /// Conversions and hole punches refused by the invalidation hook (and aborted).
    pub hook_failures: u64,
    /// 4K pages whose shared -> private commit was deferred to the last reference drop.
    pub deferred_pages: u64,
    /// Deferred commits completed by the last reference drop.
    pub deferred_completions: u64,
    /// Deferred commits cancelled by a conversion back to shared.
    pub deferred_cancelled: u64,
    /// 4K pages recorded as poisoned (failed REMOVE or DEMOTE), live or leaked.
    pub poisoned_pages: u64,
    /// Poisoned 4K frames leaked (retired in the pool) when their folio was freed.
    pub leaked_frames: u64,
    /// Poison reports for pages with no folio behind them (nothing to record).
    pub stray_poison_reports: u64,
    /// 4K pages released by hole punches.
    pub pages_punched: u64,
}
