//! The folios of one guest_memfd, sharded by GPA.
//!
//! Faults on different GiBs of the file (parallel boot acceptance hands each vCPU its own) find
//! and allocate their folios in different shards, under different locks on different cache
//! lines, as the kernel's page cache locks per folio. Paths that own the file (`&mut self`:
//! conversions, hole punches, poison) reach the shards without locking. Within a shard, folios
//! sit in runs of 64 adjacent slots, one allocation per run.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Mutex, MutexGuard, PoisonError};

use accept::abi::PageLevel;
use crossbeam_utils::CachePadded;

use crate::gmem::folio::Folio;

/// log2 of the GPA span of one shard's slice (1 GiB): a folio of any level lies in one slice.
const SLICE_SHIFT: u32 = 30;
/// Shards: slice `i` goes to shard `i % SHARDS`.
const SHARDS: usize = 64;
/// Folios in one run: a shard keeps adjacent folios in runs of this many slots.
const RUN: usize = 64;

/// `RUN` adjacent folio slots, and how many are taken.
struct Run {
    taken: usize,
    slots: [Option<Folio>; RUN],
}

impl Run {
    fn new() -> Box<Run> {
        Box::new(Run {
            taken: 0,
            slots: std::array::from_fn(|_| None),
        })
    }
}

/// One shard: runs by run number (folio base >> (folio shift + log2 RUN)).
///
/// A map entry per folio cost about 100 bytes per folio (B-tree nodes filled about half by
/// ascending inserts), most of the simulator's memory at 1 TiB; a run holds 64 folios in one
/// allocation, about 50 bytes each when full.
type Map = BTreeMap<u64, Box<Run>>;

/// Folios by base GPA.
pub(crate) struct Folios {
    /// log2 of the folio size: every folio of one file has the file's folio level.
    shift: u32,
    shards: Box<[CachePadded<Mutex<Map>>]>,
}

impl fmt::Debug for Folios {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Folios")
            .field("len", &self.len())
            .finish_non_exhaustive()
    }
}

fn index(base: u64) -> usize {
    ((base >> SLICE_SHIFT) % SHARDS as u64) as usize
}

fn lock(m: &Mutex<Map>) -> MutexGuard<'_, Map> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Folios {
    /// No folio; folios will be of `level`.
    pub(crate) fn new(level: PageLevel) -> Folios {
        Folios {
            shift: level.size().trailing_zeros(),
            shards: (0..SHARDS)
                .map(|_| CachePadded::new(Mutex::new(Map::new())))
                .collect(),
        }
    }

    /// The run number and slot of the folio at `base`.
    fn place(&self, base: u64) -> (u64, usize) {
        debug_assert_eq!(
            base & ((1u64 << self.shift) - 1),
            0,
            "misaligned folio base"
        );
        let n = base >> self.shift;
        (n / RUN as u64, (n % RUN as u64) as usize)
    }

    /// The base of slot `slot` of run `run`.
    fn base_of(&self, run: u64, slot: usize) -> u64 {
        (run * RUN as u64 + slot as u64) << self.shift
    }

    fn shard(&self, base: u64) -> MutexGuard<'_, Map> {
        lock(&self.shards[index(base)])
    }

    fn shard_mut(&mut self, base: u64) -> &mut Map {
        self.shards[index(base)]
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// `f` of the folio at `base`, if any.
    pub(crate) fn read<R>(&self, base: u64, f: impl FnOnce(Option<&Folio>) -> R) -> R {
        let (run, slot) = self.place(base);
        f(self
            .shard(base)
            .get(&run)
            .and_then(|r| r.slots[slot].as_ref()))
    }

    /// The folio at `base`, if any.
    pub(crate) fn get_mut(&mut self, base: u64) -> Option<&mut Folio> {
        let (run, slot) = self.place(base);
        self.shard_mut(base)
            .get_mut(&run)
            .and_then(|r| r.slots[slot].as_mut())
    }

    /// Whether a folio sits at `base`.
    pub(crate) fn contains(&self, base: u64) -> bool {
        self.read(base, |f| f.is_some())
    }

    /// Adds the folio at `base` (replacing one that sat there).
    pub(crate) fn insert(&mut self, base: u64, folio: Folio) {
        let (run, slot) = self.place(base);
        put(
            self.shard_mut(base).entry(run).or_insert_with(Run::new),
            slot,
            folio,
        );
    }

    /// Takes the folio at `base` out.
    pub(crate) fn remove(&mut self, base: u64) -> Option<Folio> {
        let (run, slot) = self.place(base);
        let map = self.shard_mut(base);
        let r = map.get_mut(&run)?;
        let folio = r.slots[slot].take()?;
        r.taken -= 1;
        if r.taken == 0 {
            map.remove(&run);
        }
        Some(folio)
    }

    /// `f` of the folio at `base`, made by `make` first when there is none (under the shard's
    /// lock, so two faults on one folio allocate it once).
    ///
    /// # Errors
    /// What `make` returned; nothing is inserted then.
    pub(crate) fn with_or_insert<R, E>(
        &self,
        base: u64,
        make: impl FnOnce() -> Result<Folio, E>,
        f: impl FnOnce(&mut Folio) -> R,
    ) -> Result<R, E> {
        let (run, slot) = self.place(base);
        let mut shard = self.shard(base);
        if let Some(folio) = shard.get_mut(&run).and_then(|r| r.slots[slot].as_mut()) {
            return Ok(f(folio));
        }
        let folio = make()?;
        Ok(f(put(
            shard.entry(run).or_insert_with(Run::new),
            slot,
            folio,
        )))
    }

    /// Number of folios.
    pub(crate) fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| lock(s).values().map(|r| r.taken).sum::<usize>())
            .sum()
    }

    /// Bases of the folios of `map` in `[start, end)`.
    fn bases_of(&self, map: &Map, start: u64, end: u64, out: &mut Vec<u64>) {
        let (first, _) = self.place(start >> self.shift << self.shift);
        let last = (end.saturating_sub(1) >> self.shift) / RUN as u64;
        for (&run, r) in map.range(first..=last) {
            for (slot, folio) in r.slots.iter().enumerate() {
                let base = self.base_of(run, slot);
                if folio.is_some() && base >= start && base < end {
                    out.push(base);
                }
            }
        }
    }

    /// Bases of the folios in `[start, end)`, ascending.
    pub(crate) fn bases_in(&self, start: u64, end: u64) -> Vec<u64> {
        let mut out = Vec::new();
        if end <= start {
            return out;
        }
        if end.saturating_sub(start) >> SLICE_SHIFT >= SHARDS as u64 {
            for s in self.shards.iter() {
                self.bases_of(&lock(s), start, end, &mut out);
            }
        } else {
            let mut slice = start >> SLICE_SHIFT;
            while slice << SLICE_SHIFT < end {
                let lo = (slice << SLICE_SHIFT).max(start);
                let hi = ((slice + 1) << SLICE_SHIFT).min(end);
                self.bases_of(&self.shard(lo), lo, hi, &mut out);
                slice += 1;
            }
        }
        out.sort_unstable();
        out
    }

    /// `f` of every folio, in ascending base order.
    pub(crate) fn for_each(&self, mut f: impl FnMut(u64, &Folio)) {
        let guards: Vec<MutexGuard<'_, Map>> = self.shards.iter().map(|s| lock(s)).collect();
        let mut all: Vec<(u64, &Folio)> = guards
            .iter()
            .flat_map(|g| {
                g.iter().flat_map(|(&run, r)| {
                    r.slots
                        .iter()
                        .enumerate()
                        .filter_map(move |(slot, folio)| Some((run, slot, folio.as_ref()?)))
                })
            })
            .map(|(run, slot, folio)| (self.base_of(run, slot), folio))
            .collect();
        all.sort_unstable_by_key(|&(b, _)| b);
        for (b, folio) in all {
            f(b, folio);
        }
    }
}

/// Puts `folio` in `slot` of `run`, counting it unless it replaces one.
fn put(run: &mut Run, slot: usize, folio: Folio) -> &mut Folio {
    if run.slots[slot].is_none() {
        run.taken += 1;
    }
    run.slots[slot].insert(folio)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gmem::pool::Hpa;
    use accept::abi::PageLevel;

    const G: u64 = 1 << 30;
    const M2: u64 = 2 << 20;

    fn folio(hpa: u64) -> Folio {
        Folio::new(Hpa::try_new(hpa).unwrap(), PageLevel::Size2M)
    }

    #[test]
    fn ranges_and_order_span_shards() {
        let mut f = Folios::new(PageLevel::Size2M);
        // Slices 0 and 64 share shard 0; slice 1 is shard 1.
        for base in [64 * G + M2, 0, G, 64 * G, G + 5 * M2] {
            f.insert(base, folio(base + (1 << 40)));
        }
        assert_eq!(f.len(), 5);
        assert_eq!(f.bases_in(0, 2 * G), vec![0, G, G + 5 * M2]);
        assert_eq!(f.bases_in(M2, G + 5 * M2), vec![G]);
        assert_eq!(
            f.bases_in(0, 100 * G),
            vec![0, G, G + 5 * M2, 64 * G, 64 * G + M2]
        );
        let mut seen = Vec::new();
        f.for_each(|b, _| seen.push(b));
        assert_eq!(seen, f.bases_in(0, u64::MAX));
        assert!(f.remove(64 * G).is_some());
        assert!(!f.contains(64 * G));
        assert!(f.contains(64 * G + M2));
    }

    fn runs(f: &Folios) -> usize {
        f.shards.iter().map(|s| lock(s).len()).sum()
    }

    /// Adjacent folios share a run; a run goes when its last folio does; a folio put where one
    /// sits replaces it; every level finds its folios again.
    #[test]
    fn runs_hold_adjacent_folios_and_go_when_empty() {
        const K4: u64 = 4096;
        let mut f = Folios::new(PageLevel::Size4K);
        for base in [0, K4, 63 * K4, 64 * K4] {
            f.insert(
                base,
                Folio::new(Hpa::try_new(base).unwrap(), PageLevel::Size4K),
            );
        }
        assert_eq!((f.len(), runs(&f)), (4, 2));
        f.insert(
            K4,
            Folio::new(Hpa::try_new(1 << 40).unwrap(), PageLevel::Size4K),
        );
        assert_eq!(f.len(), 4);
        assert_eq!(f.read(K4, |x| x.map(|x| x.hpa.as_u64())), Some(1 << 40));
        assert_eq!(f.bases_in(K4, 65 * K4), vec![K4, 63 * K4, 64 * K4]);
        for base in [0, K4, 63 * K4] {
            assert!(f.remove(base).is_some());
        }
        assert!(f.remove(0).is_none());
        assert_eq!((f.len(), runs(&f)), (1, 1));

        let mut g = Folios::new(PageLevel::Size1G);
        for base in [0, G, 64 * G, 65 * G] {
            g.insert(
                base,
                Folio::new(Hpa::try_new(base).unwrap(), PageLevel::Size1G),
            );
        }
        assert_eq!(g.bases_in(0, u64::MAX), vec![0, G, 64 * G, 65 * G]);
        assert!(g.get_mut(64 * G).is_some());
        assert!(!g.contains(2 * G));
    }

    #[test]
    fn one_allocation_per_folio_under_concurrent_faults() {
        let f = Folios::new(PageLevel::Size2M);
        let made = std::sync::atomic::AtomicU64::new(0);
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for i in 0..256u64 {
                        let base = (i % 16) * G + (i % 3) * M2;
                        let r: Result<u64, ()> = f.with_or_insert(
                            base,
                            || {
                                made.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                                Ok(folio(base + (1 << 40)))
                            },
                            |folio| folio.hpa.as_u64(),
                        );
                        assert_eq!(r, Ok(base + (1 << 40)));
                    }
                });
            }
        });
        assert_eq!(made.into_inner(), 48);
        assert_eq!(f.len(), 48);
    }
}
