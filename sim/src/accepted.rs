//! What the guest believes accepted, sharded by GiB.
//!
//! Every successful ACCEPT records its range here and checks it was not accepted already. In
//! parallel mode the vCPUs accept different GiBs at once (parallel boot acceptance hands each
//! its own), so the set is split into shards by GiB slice, each behind its own lock on its own
//! cache line; a range never needs more than the shards of the slices it covers.

use std::ops::Range;
use std::sync::{Mutex, MutexGuard, PoisonError};

use crossbeam_utils::CachePadded;
use rangemap::RangeSet;

/// log2 of a slice (1 GiB): an ACCEPT, at most 1G and aligned, lies in one slice.
const SLICE_SHIFT: u32 = 30;
/// Shards: slice `i` goes to shard `i % SHARDS`.
const SHARDS: u64 = 64;

/// A set of GPA ranges, sharded by slice.
#[derive(Debug)]
pub(crate) struct Accepted {
    shards: Box<[CachePadded<Mutex<RangeSet<u64>>>]>,
}

impl Default for Accepted {
    fn default() -> Self {
        Accepted {
            shards: (0..SHARDS)
                .map(|_| CachePadded::new(Mutex::new(RangeSet::new())))
                .collect(),
        }
    }
}

/// `[s, e)` cut at slice boundaries.
fn pieces(s: u64, e: u64) -> impl Iterator<Item = Range<u64>> {
    let mut cur = s;
    std::iter::from_fn(move || {
        if cur >= e {
            return None;
        }
        let slice_end = ((cur >> SLICE_SHIFT) + 1)
            .checked_shl(SLICE_SHIFT)
            .unwrap_or(u64::MAX);
        let end = slice_end.min(e);
        let piece = cur..end;
        cur = end;
        Some(piece)
    })
}

impl Accepted {
    fn shard(&self, at: u64) -> MutexGuard<'_, RangeSet<u64>> {
        let i = ((at >> SLICE_SHIFT) % SHARDS) as usize;
        self.shards[i]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether the range covers at least as many slices as there are shards (then walking the
    /// shards is cheaper than walking the slices).
    fn wide(s: u64, e: u64) -> bool {
        (e.saturating_sub(s) >> SLICE_SHIFT) >= SHARDS
    }

    /// Adds `[s, e)`; true when any of it was in the set already.
    pub(crate) fn insert(&self, s: u64, e: u64) -> bool {
        let mut overlapped = false;
        for p in pieces(s, e) {
            let mut shard = self.shard(p.start);
            overlapped |= shard.overlaps(&p);
            shard.insert(p);
        }
        overlapped
    }

    /// Takes `[s, e)` out.
    pub(crate) fn remove(&self, s: u64, e: u64) {
        if s >= e {
            return;
        }
        if Self::wide(s, e) {
            for shard in self.shards.iter() {
                shard
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .remove(s..e);
            }
        } else {
            for p in pieces(s, e) {
                self.shard(p.start).remove(p);
            }
        }
    }

    /// The parts of the set inside `[s, e)`, ascending and coalesced.
    pub(crate) fn clip(&self, s: u64, e: u64) -> Vec<(u64, u64)> {
        let mut out = RangeSet::new();
        if s < e {
            if Self::wide(s, e) {
                for shard in self.shards.iter() {
                    let shard = shard.lock().unwrap_or_else(PoisonError::into_inner);
                    for r in shard.overlapping(&(s..e)) {
                        out.insert(r.start.max(s)..r.end.min(e));
                    }
                }
            } else {
                for p in pieces(s, e) {
                    for r in self.shard(p.start).overlapping(&p) {
                        out.insert(r.start.max(p.start)..r.end.min(p.end));
                    }
                }
            }
        }
        out.iter().map(|r| (r.start, r.end)).collect()
    }

    /// The whole set, coalesced across slices.
    pub(crate) fn to_set(&self) -> RangeSet<u64> {
        let mut out = RangeSet::new();
        for shard in self.shards.iter() {
            for r in shard.lock().unwrap_or_else(PoisonError::into_inner).iter() {
                out.insert(r.clone());
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const G: u64 = 1 << 30;
    const M2: u64 = 2 << 20;

    #[test]
    fn a_range_across_slices_coalesces_and_overlaps_are_seen() {
        let a = Accepted::default();
        assert!(!a.insert(G - M2, G + M2));
        // Slices 1 and 65 share a shard without merging.
        assert!(!a.insert(65 * G, 65 * G + M2));
        assert!(a.insert(G, G + 4096));
        assert_eq!(a.clip(0, 2 * G), vec![(G - M2, G + M2)]);
        assert_eq!(
            a.to_set().iter().cloned().collect::<Vec<_>>(),
            vec![G - M2..G + M2, 65 * G..65 * G + M2]
        );
        // A wide remove walks the shards.
        a.remove(0, 100 * G);
        assert!(a.to_set().is_empty());
    }

    #[test]
    fn clip_matches_a_plain_set() {
        let a = Accepted::default();
        let mut plain = RangeSet::new();
        let mut x = 12345u64;
        for _ in 0..400 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let s = ((x >> 20) % (80 * G)) & !4095;
            let len = ((x >> 8) % (3 * G)).max(4096) & !4095;
            if x & 1 == 0 {
                a.insert(s, s + len);
                plain.insert(s..s + len);
            } else {
                a.remove(s, s + len);
                plain.remove(s..s + len);
            }
        }
        assert_eq!(a.to_set(), plain);
        for (s, e) in [
            (0, 80 * G),
            (3 * G + 5, 9 * G),
            (0, 200 * G),
            (7 * G, 7 * G + M2),
        ] {
            let want: Vec<(u64, u64)> = plain
                .overlapping(&(s..e))
                .map(|r| (r.start.max(s), r.end.min(e)))
                .collect();
            assert_eq!(a.clip(s, e), want, "clip {s:#x}..{e:#x}");
        }
    }
}
