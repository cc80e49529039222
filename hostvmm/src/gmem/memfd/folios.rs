//! The folios of one guest_memfd, sharded by GPA.
//!
//! Faults on different GiBs of the file (parallel boot acceptance hands each vCPU its own) find
//! and allocate their folios in different shards, under different locks on different cache
//! lines, as the kernel's page cache locks per folio. Paths that own the file (`&mut self`:
//! conversions, hole punches, poison) reach the shards without locking.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Mutex, MutexGuard, PoisonError};

use crossbeam_utils::CachePadded;

use crate::gmem::folio::Folio;

/// log2 of the GPA span of one shard's slice (1 GiB): a folio of any level lies in one slice.
const SLICE_SHIFT: u32 = 30;
/// Shards: slice `i` goes to shard `i % SHARDS`.
const SHARDS: usize = 64;

type Map = BTreeMap<u64, Folio>;

/// Folios by base GPA.
pub(crate) struct Folios {
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
    /// No folio.
    pub(crate) fn new() -> Folios {
        Folios {
            shards: (0..SHARDS)
                .map(|_| CachePadded::new(Mutex::new(Map::new())))
                .collect(),
        }
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
        f(self.shard(base).get(&base))
    }

    /// The folio at `base`, if any.
    pub(crate) fn get_mut(&mut self, base: u64) -> Option<&mut Folio> {
        self.shard_mut(base).get_mut(&base)
    }

    /// Whether a folio sits at `base`.
    pub(crate) fn contains(&self, base: u64) -> bool {
        self.read(base, |f| f.is_some())
    }

    /// Adds the folio at `base`.
    pub(crate) fn insert(&mut self, base: u64, folio: Folio) {
        self.shard_mut(base).insert(base, folio);
    }

    /// Takes the folio at `base` out.
    pub(crate) fn remove(&mut self, base: u64) -> Option<Folio> {
        self.shard_mut(base).remove(&base)
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
        let mut shard = self.shard(base);
        let folio = match shard.entry(base) {
            std::collections::btree_map::Entry::Occupied(o) => o.into_mut(),
            std::collections::btree_map::Entry::Vacant(v) => v.insert(make()?),
        };
        Ok(f(folio))
    }

    /// Number of folios.
    pub(crate) fn len(&self) -> usize {
        self.shards.iter().map(|s| lock(s).len()).sum()
    }

    /// Bases of the folios in `[start, end)`, ascending.
    pub(crate) fn bases_in(&self, start: u64, end: u64) -> Vec<u64> {
        let mut out: Vec<u64> = if end.saturating_sub(start) >> SLICE_SHIFT >= SHARDS as u64 {
            self.shards
                .iter()
                .flat_map(|s| {
                    lock(s)
                        .range(start..end)
                        .map(|(&b, _)| b)
                        .collect::<Vec<_>>()
                })
                .collect()
        } else {
            let mut out = Vec::new();
            let mut slice = start >> SLICE_SHIFT;
            while slice << SLICE_SHIFT < end {
                let lo = (slice << SLICE_SHIFT).max(start);
                let hi = ((slice + 1) << SLICE_SHIFT).min(end);
                out.extend(self.shard(lo).range(lo..hi).map(|(&b, _)| b));
                slice += 1;
            }
            out
        };
        out.sort_unstable();
        out
    }

    /// `f` of every folio, in ascending base order.
    pub(crate) fn for_each(&self, mut f: impl FnMut(u64, &Folio)) {
        let guards: Vec<MutexGuard<'_, Map>> = self.shards.iter().map(|s| lock(s)).collect();
        let mut all: Vec<(u64, &Folio)> = guards
            .iter()
            .flat_map(|g| g.iter().map(|(&b, f)| (b, f)))
            .collect();
        all.sort_unstable_by_key(|&(b, _)| b);
        for (b, folio) in all {
            f(b, folio);
        }
    }
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
        let mut f = Folios::new();
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

    #[test]
    fn one_allocation_per_folio_under_concurrent_faults() {
        let f = Folios::new();
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
