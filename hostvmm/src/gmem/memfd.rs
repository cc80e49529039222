//! [`GuestMemfd`]: one TD's guest_memfd, offsets equal to private GPAs.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};

use accept::abi::{Gpa, GpaRange, PageLevel};

use super::error::{ConvertError, GmemError};
use super::folio::Folio;
use super::hook::{InvalidateCtx, InvalidateHook, InvalidateReason};
use super::pool::{FailureInjector, FolioPool, Hpa, PoolSnapshot};
use super::ranges::{Shareability, ShareabilityMap};
use super::stats::{GmemStats, LevelCounts};
use crate::counters::Striped;

mod convert;
mod folios;
mod lists;

use folios::Folios;
use lists::FolioLists;

const PAGE: u64 = PageLevel::Size4K.size();

/// Range-map nodes a deferred-commit record carries for its own completion: committing one
/// page inside a run splits it at most in three.
const NODES_PER_DEFERRED_PAGE: usize = 2;

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// How to create a [`GuestMemfd`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GmemConfig {
    /// Size in bytes: the file covers GPAs `[0, size)`. A multiple of `folio_level`.
    pub size: u64,
    /// The folio size (the largest mapping the file can back).
    pub folio_level: PageLevel,
    /// Shareability of every page at creation.
    pub initial: Shareability,
}

impl GmemConfig {
    /// `size` bytes of `folio_level` folios, all private.
    pub const fn new(size: u64, folio_level: PageLevel) -> GmemConfig {
        GmemConfig {
            size,
            folio_level,
            initial: Shareability::Private,
        }
    }
}

/// What the private fault path gets for a GPA (like `kvm_gmem_get_pfn`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PfnInfo {
    /// Host address of the 4K page containing the GPA: `folio hpa + (page - folio_base)`.
    pub hpa: Hpa,
    /// Level of the backing folio.
    pub folio_level: PageLevel,
    /// GPA of the first byte of the folio.
    pub folio_base: Gpa,
}

/// Options of a conversion.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ConvertMode {
    /// Ask the hook to BLOCK in `prepare` (and UNBLOCK in `abort`) before the destructive step.
    pub block_first: bool,
}

/// What a successful conversion did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConvertReport {
    /// The target state.
    pub to: Shareability,
    /// Runs handed to the hook (pages whose state differed from the target), in order.
    pub invalidated: Vec<GpaRange>,
    /// 4K pages committed to the target state now.
    pub pages_committed: u64,
    /// Pages whose commit to private waits for the last transient host reference (seed 004).
    pub deferred: Vec<Gpa>,
    /// Deferred commits cancelled (pending pages converted back to shared).
    pub cancelled: u64,
    /// Pages the hook reported as not zapped, now poisoned.
    pub poisoned: u64,
}

impl ConvertReport {
    pub(crate) fn noop(to: Shareability) -> ConvertReport {
        ConvertReport {
            to,
            invalidated: Vec::new(),
            pages_committed: 0,
            deferred: Vec::new(),
            cancelled: 0,
            poisoned: 0,
        }
    }

    /// True when the range was already in the target state: nothing was invalidated.
    pub fn is_noop(&self) -> bool {
        self.invalidated.is_empty() && self.cancelled == 0
    }
}

/// What a successful hole punch did.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PunchReport {
    /// Runs handed to the hook (the folio-backed parts of the range), in order.
    pub invalidated: Vec<GpaRange>,
    /// 4K pages removed from the file.
    pub pages_released: u64,
    /// Folios freed (all their sub-pages gone).
    pub folios_freed: u64,
    /// Poisoned frames leaked with the freed folios.
    pub frames_leaked: u64,
    /// Pages the hook reported as not zapped, now poisoned.
    pub poisoned: u64,
}

/// Host users of one shared page.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct HostRefs {
    /// VMM mappings ([`GuestMemfd::host_map`]): block conversion to private with EAGAIN.
    pub maps: u32,
    /// Transient references ([`GuestMemfd::get_ref`]): defer a conversion to private.
    pub refs: u32,
}

/// A transient host reference (e.g. in-flight I/O) to one shared page. Give it back with
/// [`GuestMemfd::put_ref`]; dropping it instead leaks the reference.
#[must_use = "a reference must be released with put_ref"]
#[derive(Debug, PartialEq, Eq)]
pub struct RefToken {
    memfd: u64,
    gpa: Gpa,
}

impl RefToken {
    /// The referenced page.
    pub fn gpa(&self) -> Gpa {
        self.gpa
    }
}

/// Outcome of [`GuestMemfd::put_ref`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefRelease {
    /// Other transient references remain.
    StillReferenced,
    /// The last transient reference is gone; nothing was waiting on it.
    Released,
    /// The last transient reference is gone and the pending conversion of the page to private
    /// was committed.
    ConversionCompleted,
}

/// A folio as queries see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FolioInfo {
    /// GPA of its first byte.
    pub base: Gpa,
    /// Host address of its first byte.
    pub hpa: Hpa,
    /// Its level.
    pub level: PageLevel,
    /// Sub-pages still in the file.
    pub present_pages: u64,
    /// Poisoned sub-pages.
    pub poisoned_pages: u64,
}

/// A folio in a [`GmemSnapshot`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FolioSnapshot {
    /// Its info.
    pub info: FolioInfo,
    /// Sub-pages punched out (not present).
    pub absent: Vec<Gpa>,
    /// Poisoned sub-pages.
    pub poisoned: Vec<Gpa>,
}

/// The comparable state of a [`GuestMemfd`], counters excluded: equal before and after any
/// failed call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GmemSnapshot {
    /// Shareability runs.
    pub ranges: Vec<(GpaRange, Shareability)>,
    /// Live folios by base.
    pub folios: Vec<FolioSnapshot>,
    /// Host users by page.
    pub host_refs: Vec<(Gpa, HostRefs)>,
    /// Pages with a deferred conversion to private.
    pub pending: Vec<Gpa>,
    /// The pool.
    pub pool: PoolSnapshot,
}

/// A guest_memfd covering GPAs `[0, size)` of one TD.
///
/// Memory use is O(shareability runs + allocated folios + pages with host users), never
/// O(size): a 1 TiB file costs nothing until it is touched.
#[derive(Debug)]
pub struct GuestMemfd {
    id: u64,
    size: u64,
    folio_level: PageLevel,
    attrs: ShareabilityMap,
    folios: Folios,
    host: BTreeMap<u64, HostRefs>,
    /// Pages whose commit to private waits for the last transient reference. Each record was
    /// allocated with the range-map nodes its completion needs.
    pending: BTreeSet<u64>,
    /// Taken by the fault path for an allocation, under the file's shared lock.
    pool: Mutex<FolioPool>,
    /// Per-thread lists of folios taken from the pool in batches (off unless set).
    lists: FolioLists,
    /// Folios allocated (all at `folio_level`): counted by the fault path without the stats.
    allocated: Striped<1>,
    nodes: FailureInjector,
    stats: GmemStats,
}

fn gpa(v: u64) -> Gpa {
    Gpa::new_truncate(v)
}

/// Records poison for the page containing `at`. No allocation: the bitmap came with the folio.
fn record_poison(
    folios: &mut Folios,
    stats: &mut GmemStats,
    level: PageLevel,
    size: u64,
    at: Gpa,
) -> bool {
    let page = at.as_u64() & !PageLevel::Size4K.mask();
    let base = page & !level.mask();
    match folios.get_mut(base) {
        Some(folio) if page < size => {
            if folio.poison.set((page - base) / PAGE) {
                stats.poisoned_pages = stats.poisoned_pages.saturating_add(1);
                true
            } else {
                false
            }
        }
        _ => {
            stats.stray_poison_reports = stats.stray_poison_reports.saturating_add(1);
            false
        }
    }
}

/// Calls `prepare` for every run; on failure aborts all prepared runs (the failing one
/// included) in reverse order.
fn prepare_all<H: InvalidateHook + ?Sized>(
    hook: &mut H,
    runs: &[GpaRange],
    ctx: InvalidateCtx,
) -> Result<(), ConvertError> {
    for (i, run) in runs.iter().enumerate() {
        if let Err(source) = hook.prepare(*run, ctx) {
            for r in runs.get(..=i).unwrap_or_default().iter().rev() {
                hook.abort(*r, ctx);
            }
            return Err(ConvertError::HookFailed {
                offset: run.start(),
                source,
            });
        }
    }
    Ok(())
}

impl GuestMemfd {
    /// A guest_memfd drawing its folios from `pool`.
    ///
    /// # Errors
    /// [`GmemError::InvalidConfig`] when the size is 0, not a multiple of the folio size, or
    /// beyond 2^52.
    pub fn new(config: GmemConfig, pool: FolioPool) -> Result<GuestMemfd, GmemError> {
        if config.size == 0 {
            return Err(GmemError::InvalidConfig("size is 0"));
        }
        if !config.folio_level.is_aligned(config.size) {
            return Err(GmemError::InvalidConfig(
                "size is not a multiple of the folio size",
            ));
        }
        if config.size > 1 << Gpa::MAX_BITS {
            return Err(GmemError::InvalidConfig("size is beyond the GPA space"));
        }
        Ok(GuestMemfd {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            size: config.size,
            folio_level: config.folio_level,
            attrs: ShareabilityMap::new(config.size, config.initial),
            folios: Folios::new(config.folio_level),
            host: BTreeMap::new(),
            pending: BTreeSet::new(),
            pool: Mutex::new(pool),
            lists: FolioLists::new(0),
            allocated: Striped::default(),
            nodes: FailureInjector::default(),
            stats: GmemStats::default(),
        })
    }

    // ---- queries -------------------------------------------------------------------------

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The folio level.
    pub fn folio_level(&self) -> PageLevel {
        self.folio_level
    }

    fn page_of(&self, at: Gpa) -> Result<u64, GmemError> {
        if at.as_u64() >= self.size {
            return Err(GmemError::OutOfRange {
                gpa: at,
                size: self.size,
            });
        }
        Ok(at.as_u64() & !PageLevel::Size4K.mask())
    }

    fn folio_base(&self, page: u64) -> u64 {
        page & !self.folio_level.mask()
    }

    /// The committed shareability of the page containing `at` (a page with a pending
    /// conversion to private is still shared).
    ///
    /// # Errors
    /// [`GmemError::OutOfRange`].
    pub fn shareability(&self, at: Gpa) -> Result<Shareability, GmemError> {
        let page = self.page_of(at)?;
        self.attrs.get(page).ok_or(GmemError::OutOfRange {
            gpa: at,
            size: self.size,
        })
    }

    /// True when `range` is inside the file and entirely `state`.
    pub fn is_uniform(&self, range: GpaRange, state: Shareability) -> bool {
        self.attrs
            .is_uniform(range.start().as_u64(), range.end().as_u64(), state)
    }

    /// Number of shareability runs (what the range map's memory is proportional to).
    pub fn range_count(&self) -> usize {
        self.attrs.len()
    }

    /// The shareability runs, in order.
    pub fn ranges(&self) -> Vec<(GpaRange, Shareability)> {
        self.attrs
            .iter()
            .filter_map(|(s, e, v)| GpaRange::new(s, e).ok().map(|r| (r, v)))
            .collect()
    }

    /// True when the page containing `at` waits for its last transient reference to become
    /// private.
    pub fn is_pending(&self, at: Gpa) -> bool {
        self.pending
            .contains(&(at.as_u64() & !PageLevel::Size4K.mask()))
    }

    /// Number of pages with a pending conversion to private.
    pub fn pending_count(&self) -> usize {
        self.pending.len()
    }

    /// Host users of the page containing `at`.
    pub fn host_refs(&self, at: Gpa) -> HostRefs {
        self.host
            .get(&(at.as_u64() & !PageLevel::Size4K.mask()))
            .copied()
            .unwrap_or_default()
    }

    /// The folio backing `at`, if allocated.
    pub fn folio(&self, at: Gpa) -> Option<FolioInfo> {
        let page = self.page_of(at).ok()?;
        let base = self.folio_base(page);
        self.folios.read(base, |f| {
            f.map(|f| FolioInfo {
                base: gpa(base),
                hpa: f.hpa,
                level: f.level,
                present_pages: f.present.ones(),
                poisoned_pages: f.poison.ones(),
            })
        })
    }

    /// Number of live folios.
    pub fn folio_count(&self) -> usize {
        self.folios.len()
    }

    /// True when the page containing `at` is backed by a poisoned frame.
    pub fn is_poisoned(&self, at: Gpa) -> bool {
        let Ok(page) = self.page_of(at) else {
            return false;
        };
        let base = self.folio_base(page);
        self.folios.read(base, |f| {
            f.is_some_and(|f| f.poison.get((page - base) / PAGE))
        })
    }

    /// 4K pages ever recorded as poisoned (in live folios or leaked).
    pub fn poisoned_pages(&self) -> u64 {
        self.stats.poisoned_pages
    }

    /// Poisoned pages in live folios.
    pub fn live_poisoned_pages(&self) -> u64 {
        let mut n = 0;
        self.folios.for_each(|_, f| n += f.poison.ones());
        n
    }

    /// Host addresses of every poisoned frame in live folios.
    pub fn live_poisoned_frames(&self) -> Vec<Hpa> {
        let mut out = Vec::new();
        self.folios
            .for_each(|_, f| out.extend(f.poison.iter_ones().map(|i| f.hpa_of(i))));
        out
    }

    /// Counters.
    pub fn stats(&self) -> GmemStats {
        let mut s = self.stats;
        s.folios_allocated = LevelCounts::default();
        let [allocated] = self.allocated.sum();
        s.folios_allocated.add(self.folio_level, allocated);
        s
    }

    /// `f` of the folio pool. (The fault path allocates from the pool through a shared
    /// reference, so the pool sits behind a lock held only for the call of `f`.) With per-thread
    /// folio lists on ([`GuestMemfd::set_folio_batch`]), the folios waiting on the lists count
    /// as live in the pool.
    pub fn with_pool<R>(&self, f: impl FnOnce(&FolioPool) -> R) -> R {
        f(&self.pool.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// The folio pool, e.g. to arm an allocation failure. With per-thread folio lists on, an
    /// armed failure fires at the pool's next allocation, which is a list's refill, not every
    /// fault: at the refill's first folio the fault fails; at a later one the batch ends short.
    pub fn pool_mut(&mut self) -> &mut FolioPool {
        self.pool.get_mut().unwrap_or_else(PoisonError::into_inner)
    }

    /// Turns the per-thread folio lists on (`batch` > 0) or off (0), giving the folios on the
    /// lists back to the pool first.
    ///
    /// With lists on, the fault path takes a folio from its thread's list and refills an empty
    /// list with `batch` folios at once, as the kernel's per-CPU page lists do: threads that
    /// fault at once (a parallel boot) then meet at the pool's lock once per `batch` folios
    /// instead of at every fault. A pool that runs dry takes the other lists' folios back
    /// before the fault fails. Off by default: a single-threaded user gets the pool's exact
    /// accounting and failure injection at every fault.
    pub fn set_folio_batch(&mut self, batch: usize) {
        let pool = self.pool.get_mut().unwrap_or_else(PoisonError::into_inner);
        self.lists.drain_into_mut(pool, self.folio_level);
        self.lists = FolioLists::new(batch);
    }

    /// The refill batch of the per-thread folio lists (0: off).
    pub fn folio_batch(&self) -> usize {
        self.lists.batch()
    }

    /// Folios waiting on the per-thread lists: allocated from the pool, not yet in the file.
    pub fn listed_folios(&self) -> usize {
        self.lists.len()
    }

    /// The injector of range-map node and deferred-record allocations (conversion phase 1).
    #[cfg(feature = "testing")]
    pub fn node_injector(&self) -> &FailureInjector {
        &self.nodes
    }

    /// The injector of range-map node and deferred-record allocations, to arm a failure.
    #[cfg(feature = "testing")]
    pub fn node_injector_mut(&mut self) -> &mut FailureInjector {
        &mut self.nodes
    }

    /// The comparable state.
    pub fn snapshot(&self) -> GmemSnapshot {
        GmemSnapshot {
            ranges: self.ranges(),
            folios: {
                let mut out = Vec::new();
                self.folios.for_each(|base, f| {
                    out.push(FolioSnapshot {
                        info: FolioInfo {
                            base: gpa(base),
                            hpa: f.hpa,
                            level: f.level,
                            present_pages: f.present.ones(),
                            poisoned_pages: f.poison.ones(),
                        },
                        absent: f
                            .present
                            .iter_zeros()
                            .map(|i| gpa(base + i * PAGE))
                            .collect(),
                        poisoned: f.poison.iter_ones().map(|i| gpa(base + i * PAGE)).collect(),
                    })
                });
                out
            },
            host_refs: self.host.iter().map(|(&p, &h)| (gpa(p), h)).collect(),
            pending: self.pending.iter().map(|&p| gpa(p)).collect(),
            pool: self.with_pool(FolioPool::snapshot),
        }
    }

    // ---- fault path ----------------------------------------------------------------------

    /// A new folio for `page` from the pool (counted).
    fn new_folio(&self, page: u64) -> Result<Folio, GmemError> {
        // With the lists off this is the pool's own allocation.
        let hpa = self
            .lists
            .alloc(&self.pool, self.folio_level)
            .map_err(|source| GmemError::NoMemory {
                gpa: gpa(page),
                source,
            })?;
        self.allocated.add(0, 1);
        Ok(Folio::new(hpa, self.folio_level))
    }

    /// Allocates the folio of `page` if needed.
    fn populate(&mut self, page: u64) -> Result<&mut Folio, GmemError> {
        let base = self.folio_base(page);
        if !self.folios.contains(base) {
            let folio = self.new_folio(page)?;
            self.folios.insert(base, folio);
        }
        self.folios
            .get_mut(base)
            .ok_or(GmemError::NotPopulated { gpa: gpa(page) })
    }

    /// Common checks of the fault path and host users: state, pending, poison; then populate.
    fn use_page(&mut self, at: Gpa, expected: Shareability) -> Result<(u64, Hpa), GmemError> {
        let page = self.page_of(at)?;
        if self.pending.contains(&page) {
            return Err(GmemError::ConversionPending { gpa: gpa(page) });
        }
        if self.attrs.get(page) != Some(expected) {
            return Err(GmemError::WrongShareability {
                gpa: gpa(page),
                expected,
            });
        }
        if self.is_poisoned(at) {
            return Err(GmemError::Poisoned { gpa: gpa(page) });
        }
        let base = self.folio_base(page);
        let folio = self.populate(page)?;
        let index = (page - base) / PAGE;
        folio.present.set(index);
        Ok((base, folio.hpa_of(index)))
    }

    /// The host page backing the private GPA `at`, allocating its folio on first use (like
    /// `kvm_gmem_get_pfn`). The page is re-added to the file if it had been punched out.
    ///
    /// # Errors
    /// [`GmemError::OutOfRange`]; [`GmemError::ConversionPending`] while a conversion to
    /// private waits for references (retry later); [`GmemError::WrongShareability`] when the
    /// page is shared; [`GmemError::Poisoned`]; [`GmemError::NoMemory`] when the pool fails.
    /// Nothing changes on error.
    pub fn get_pfn(&mut self, at: Gpa) -> Result<PfnInfo, GmemError> {
        let (base, hpa) = self.use_page(at, Shareability::Private)?;
        Ok(PfnInfo {
            hpa,
            folio_level: self.folio_level,
            folio_base: gpa(base),
        })
    }

    /// The largest level L (at most the folio level) such that the L-aligned range around `at`
    /// is inside one folio, entirely private and free of poisoned pages: the largest private
    /// mapping the MMU may install (or PROMOTE to) there.
    ///
    /// # Errors
    /// [`GmemError::OutOfRange`], [`GmemError::ConversionPending`],
    /// [`GmemError::WrongShareability`] (the page is shared), [`GmemError::Poisoned`].
    pub fn max_private_level(&self, at: Gpa) -> Result<PageLevel, GmemError> {
        let (page, run) = self.private_page(at)?;
        let base = self.folio_base(page);
        self.folios.read(base, |folio| {
            if folio.is_some_and(|f| f.poison.get((page - base) / PAGE)) {
                return Err(GmemError::Poisoned { gpa: gpa(page) });
            }
            Ok(self.largest_level(page, run, base, folio))
        })
    }

    /// [`GuestMemfd::get_pfn`] and [`GuestMemfd::max_private_level`] of the same page, from one
    /// lookup of the attributes and of the folio (the fault path's question). Nothing changes on
    /// error.
    ///
    /// # Errors
    /// As [`GuestMemfd::get_pfn`].
    pub fn fault_pfn(&mut self, at: Gpa) -> Result<(PfnInfo, PageLevel), GmemError> {
        self.fault_pfn_shared(at)
    }

    /// [`GuestMemfd::fault_pfn`] through a shared reference: faults on different folios run
    /// at once (the kernel's `kvm_gmem_get_pfn` holds the invalidation lock shared and locks
    /// one folio). Only the folio's shard and, to allocate, the pool are locked.
    ///
    /// # Errors
    /// As [`GuestMemfd::get_pfn`].
    pub fn fault_pfn_shared(&self, at: Gpa) -> Result<(PfnInfo, PageLevel), GmemError> {
        let (page, run) = self.private_page(at)?;
        let base = self.folio_base(page);
        let index = (page - base) / PAGE;
        self.folios.with_or_insert(
            base,
            || self.new_folio(page),
            |folio| {
                if folio.poison.get(index) {
                    return Err(GmemError::Poisoned { gpa: gpa(page) });
                }
                folio.present.set(index);
                let pfn = PfnInfo {
                    hpa: folio.hpa_of(index),
                    folio_level: self.folio_level,
                    folio_base: gpa(base),
                };
                Ok((pfn, self.largest_level(page, run, base, Some(folio))))
            },
        )?
    }

    /// The private, not pending page holding `at`, and its run of private pages.
    fn private_page(&self, at: Gpa) -> Result<(u64, Range<u64>), GmemError> {
        let page = self.page_of(at)?;
        if self.pending.contains(&page) {
            return Err(GmemError::ConversionPending { gpa: gpa(page) });
        }
        match self.attrs.run_at(page) {
            Some((start, end, Shareability::Private)) => Ok((page, start..end)),
            _ => Err(GmemError::WrongShareability {
                gpa: gpa(page),
                expected: Shareability::Private,
            }),
        }
    }

    /// The largest level whose aligned range around the private `page` lies in its private
    /// `run` and, free of poison, in the folio at `base`.
    fn largest_level(
        &self,
        page: u64,
        run: Range<u64>,
        base: u64,
        folio: Option<&Folio>,
    ) -> PageLevel {
        let mut best = PageLevel::Size4K;
        for level in [PageLevel::Size2M, PageLevel::Size1G] {
            if level > self.folio_level {
                break;
            }
            let start = page & !level.mask();
            let Some(end) = start.checked_add(level.size()) else {
                break;
            };
            if start < run.start || end > run.end {
                break;
            }
            if let Some(f) = folio {
                let first = (start - base) / PAGE;
                if f.poison.any_in(first, first + level.pages_4k()) {
                    break;
                }
            }
            best = level;
        }
        best
    }

    /// Records that the frame backing `at` could not be removed from (or split in) the
    /// Secure-EPT: it is poisoned, never handed out again, and leaked when its folio is freed.
    /// Returns true when newly poisoned. Needs no allocation.
    ///
    /// # Errors
    /// [`GmemError::OutOfRange`]; [`GmemError::NotPopulated`] when no folio backs `at`.
    pub fn poison(&mut self, at: Gpa) -> Result<bool, GmemError> {
        let page = self.page_of(at)?;
        if !self.folios.contains(self.folio_base(page)) {
            return Err(GmemError::NotPopulated { gpa: gpa(page) });
        }
        Ok(record_poison(
            &mut self.folios,
            &mut self.stats,
            self.folio_level,
            self.size,
            at,
        ))
    }

    // ---- host users ----------------------------------------------------------------------

    fn host_entry(&mut self, page: u64) -> &mut HostRefs {
        self.host.entry(page).or_default()
    }

    /// Maps the shared page containing `at` into the VMM (allocating its folio on first use).
    /// While mapped, converting it to private fails with EAGAIN at its offset.
    ///
    /// # Errors
    /// As [`GuestMemfd::get_pfn`], with the page required shared;
    /// [`GmemError::RefOverflow`].
    pub fn host_map(&mut self, at: Gpa) -> Result<Hpa, GmemError> {
        let page = self.page_of(at)?;
        if self.host_refs(at).maps == u32::MAX {
            return Err(GmemError::RefOverflow { gpa: gpa(page) });
        }
        let (_, hpa) = self.use_page(at, Shareability::Shared)?;
        let entry = self.host_entry(page);
        entry.maps += 1;
        Ok(hpa)
    }

    /// Drops one VMM mapping of the page containing `at`.
    ///
    /// # Errors
    /// [`GmemError::NotMapped`] when the page has no VMM mapping.
    pub fn host_unmap(&mut self, at: Gpa) -> Result<(), GmemError> {
        let page = at.as_u64() & !PageLevel::Size4K.mask();
        let Some(entry) = self.host.get_mut(&page).filter(|e| e.maps > 0) else {
            return Err(GmemError::NotMapped { gpa: gpa(page) });
        };
        entry.maps -= 1;
        if *entry == HostRefs::default() {
            self.host.remove(&page);
        }
        Ok(())
    }

    /// Takes a transient reference (in-flight I/O) to the shared page containing `at`. A
    /// conversion of the page to private is accepted meanwhile but committed only when the last
    /// reference is put.
    ///
    /// # Errors
    /// As [`GuestMemfd::host_map`].
    pub fn get_ref(&mut self, at: Gpa) -> Result<RefToken, GmemError> {
        let page = self.page_of(at)?;
        if self.host_refs(at).refs == u32::MAX {
            return Err(GmemError::RefOverflow { gpa: gpa(page) });
        }
        self.use_page(at, Shareability::Shared)?;
        self.host_entry(page).refs += 1;
        Ok(RefToken {
            memfd: self.id,
            gpa: gpa(page),
        })
    }

    /// Puts a transient reference. When it was the last one and a conversion to private was
    /// waiting for it, commits the page private (this cannot fail: the record of the pending
    /// conversion carries the range-map nodes it needs).
    ///
    /// # Errors
    /// [`GmemError::ForeignToken`] for a token of another guest_memfd;
    /// [`GmemError::NotReferenced`] when the page holds no reference (cannot happen with tokens
    /// of this guest_memfd).
    pub fn put_ref(&mut self, token: RefToken) -> Result<RefRelease, GmemError> {
        if token.memfd != self.id {
            return Err(GmemError::ForeignToken);
        }
        let page = token.gpa.as_u64();
        let Some(entry) = self.host.get_mut(&page).filter(|e| e.refs > 0) else {
            return Err(GmemError::NotReferenced { gpa: token.gpa });
        };
        entry.refs -= 1;
        if entry.refs > 0 {
            return Ok(RefRelease::StillReferenced);
        }
        if *entry == HostRefs::default() {
            self.host.remove(&page);
        }
        if !self.pending.remove(&page) {
            return Ok(RefRelease::Released);
        }
        let used = self.attrs.set(page, page + PAGE, Shareability::Private);
        debug_assert!(used <= NODES_PER_DEFERRED_PAGE);
        self.stats.deferred_completions = self.stats.deferred_completions.saturating_add(1);
        self.stats.pages_to_private = self.stats.pages_to_private.saturating_add(1);
        Ok(RefRelease::ConversionCompleted)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gmem::{NoopHook, PoolError};

    const M2: u64 = PageLevel::Size2M.size();

    fn memfd(size: u64, level: PageLevel) -> GuestMemfd {
        let pool = FolioPool::new(1 << 32, 64 * M2).unwrap();
        GuestMemfd::new(GmemConfig::new(size, level), pool).unwrap()
    }

    fn range(s: u64, e: u64) -> GpaRange {
        GpaRange::new(s, e).unwrap()
    }

    #[test]
    fn config_is_checked() {
        let pool = || FolioPool::new(0, M2).unwrap();
        for size in [0, PAGE, M2 + PAGE, (1 << 52) + M2] {
            assert!(matches!(
                GuestMemfd::new(GmemConfig::new(size, PageLevel::Size2M), pool()),
                Err(GmemError::InvalidConfig(_))
            ));
        }
    }

    #[test]
    fn huge_file_costs_nothing_until_touched() {
        let mut g = memfd(1 << 40, PageLevel::Size1G);
        assert_eq!(g.range_count(), 1);
        assert_eq!(g.folio_count(), 0);
        let r = range(1 << 39, (1 << 39) + PAGE);
        g.convert(
            r,
            Shareability::Shared,
            ConvertMode::default(),
            &mut NoopHook,
        )
        .unwrap();
        assert_eq!(g.range_count(), 3);
        assert_eq!(g.folio_count(), 0);
    }

    #[test]
    fn concurrent_shared_faults_allocate_each_folio_once() {
        let g = memfd(32 * M2, PageLevel::Size2M);
        // Four threads fault every 4K page of 32 folios, in different orders, through a
        // shared reference (as the host's fault path does under the shared lock).
        let seen: Vec<Vec<(u64, u64)>> = std::thread::scope(|s| {
            let threads: Vec<_> = (0..4u64)
                .map(|t| {
                    let g = &g;
                    s.spawn(move || {
                        let mut out = Vec::new();
                        for i in 0..(32 * 512u64) {
                            let page = (i * (2 * t + 1) + t * 977) % (32 * 512);
                            let (pfn, level) = g.fault_pfn_shared(gpa(page * PAGE)).unwrap();
                            assert_eq!(level, PageLevel::Size2M);
                            out.push((page, pfn.hpa.as_u64()));
                        }
                        out
                    })
                })
                .collect();
            threads.into_iter().map(|t| t.join().unwrap()).collect()
        });
        // Every thread saw the same host page for each GPA, contiguous within its folio.
        let mut hpa_of = std::collections::BTreeMap::new();
        for (page, hpa) in seen.into_iter().flatten() {
            assert_eq!(*hpa_of.entry(page).or_insert(hpa), hpa, "page {page}");
        }
        for (&page, &hpa) in &hpa_of {
            let first = hpa_of[&(page & !511)];
            assert_eq!(hpa, first + (page % 512) * PAGE);
        }
        assert_eq!(g.folio_count(), 32);
        assert_eq!(g.stats().folios_allocated.get(PageLevel::Size2M), 32);
        assert_eq!(g.with_pool(FolioPool::live_folios), 32);
    }

    #[test]
    fn get_pfn_is_contiguous_in_the_folio() {
        let mut g = memfd(4 * M2, PageLevel::Size2M);
        let a = g.get_pfn(gpa(M2)).unwrap();
        let b = g.get_pfn(gpa(M2 + 7 * PAGE + 12)).unwrap();
        assert_eq!(a.folio_base, gpa(M2));
        assert_eq!(b.hpa.as_u64(), a.hpa.as_u64() + 7 * PAGE);
        assert_eq!(a.folio_level, PageLevel::Size2M);
        assert_eq!(g.stats().folios_allocated.get(PageLevel::Size2M), 1);
        assert_eq!(g.max_private_level(gpa(M2)), Ok(PageLevel::Size2M));
        assert!(matches!(
            g.get_pfn(gpa(4 * M2)),
            Err(GmemError::OutOfRange { .. })
        ));
    }

    #[test]
    fn fault_path_refuses_shared_and_pool_failures_change_nothing() {
        let mut g = memfd(4 * M2, PageLevel::Size2M);
        g.convert(
            range(0, M2),
            Shareability::Shared,
            ConvertMode::default(),
            &mut NoopHook,
        )
        .unwrap();
        assert_eq!(
            g.get_pfn(gpa(0)),
            Err(GmemError::WrongShareability {
                gpa: gpa(0),
                expected: Shareability::Private
            })
        );
        assert!(matches!(
            g.host_map(gpa(M2)),
            Err(GmemError::WrongShareability { .. })
        ));
        let before = g.snapshot();
        g.pool_mut().injector_mut().fail_nth(0);
        assert_eq!(
            g.get_pfn(gpa(M2)),
            Err(GmemError::NoMemory {
                gpa: gpa(M2),
                source: PoolError::Injected {
                    level: PageLevel::Size2M
                }
            })
        );
        assert_eq!(g.snapshot(), before);
    }

    #[test]
    fn host_map_and_refs_are_counted() {
        let mut g = memfd(2 * M2, PageLevel::Size2M);
        g.convert(
            range(0, M2),
            Shareability::Shared,
            ConvertMode::default(),
            &mut NoopHook,
        )
        .unwrap();
        g.host_map(gpa(PAGE)).unwrap();
        g.host_map(gpa(PAGE)).unwrap();
        let t = g.get_ref(gpa(PAGE)).unwrap();
        assert_eq!(g.host_refs(gpa(PAGE)), HostRefs { maps: 2, refs: 1 });
        g.host_unmap(gpa(PAGE)).unwrap();
        g.host_unmap(gpa(PAGE)).unwrap();
        assert_eq!(
            g.host_unmap(gpa(PAGE)),
            Err(GmemError::NotMapped { gpa: gpa(PAGE) })
        );
        assert_eq!(g.put_ref(t), Ok(RefRelease::Released));
        assert!(g.snapshot().host_refs.is_empty());
        let mut other = memfd(M2, PageLevel::Size2M);
        other
            .convert(
                range(0, M2),
                Shareability::Shared,
                ConvertMode::default(),
                &mut NoopHook,
            )
            .unwrap();
        let foreign = other.get_ref(gpa(0)).unwrap();
        assert_eq!(g.put_ref(foreign), Err(GmemError::ForeignToken));
    }

    #[test]
    fn poison_blocks_the_page_and_the_huge_level() {
        let mut g = memfd(2 * M2, PageLevel::Size2M);
        assert_eq!(
            g.poison(gpa(0)),
            Err(GmemError::NotPopulated { gpa: gpa(0) })
        );
        g.get_pfn(gpa(0)).unwrap();
        assert_eq!(g.poison(gpa(3 * PAGE)), Ok(true));
        assert_eq!(g.poison(gpa(3 * PAGE)), Ok(false));
        assert_eq!(
            g.get_pfn(gpa(3 * PAGE)),
            Err(GmemError::Poisoned { gpa: gpa(3 * PAGE) })
        );
        assert_eq!(g.max_private_level(gpa(0)), Ok(PageLevel::Size4K));
        assert_eq!(g.poisoned_pages(), 1);
        assert_eq!(g.live_poisoned_pages(), 1);
    }

    #[test]
    fn punch_hole_frees_only_whole_folios_and_leaks_poison() {
        let mut g = memfd(2 * M2, PageLevel::Size2M);
        let hpa = g.get_pfn(gpa(0)).unwrap().hpa;
        g.poison(gpa(PAGE)).unwrap();
        let r = g.punch_hole(range(0, M2 / 2), &mut NoopHook).unwrap();
        assert_eq!(r.pages_released, 256);
        assert_eq!(r.folios_freed, 0);
        assert_eq!(g.folio(gpa(0)).map(|f| f.present_pages), Some(256));
        // Re-faulting a punched page reuses the same folio.
        assert_eq!(
            g.get_pfn(gpa(2 * PAGE)).unwrap().hpa.as_u64(),
            hpa.as_u64() + 2 * PAGE
        );
        let r = g.punch_hole(range(0, 2 * M2), &mut NoopHook).unwrap();
        assert_eq!((r.folios_freed, r.frames_leaked), (1, 1));
        assert_eq!(g.folio_count(), 0);
        assert!(g.with_pool(|p| p.is_retired(hpa.checked_add(PAGE).unwrap())));
        assert_eq!(g.stats().leaked_frames, 1);
        assert_eq!(g.stats().folios_freed.get(PageLevel::Size2M), 1);
    }
}
