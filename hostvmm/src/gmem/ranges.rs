//! Shareability of a guest_memfd kept as coalesced ranges, like the maple tree of the proposed
//! in-place conversion series.
//!
//! A [`ShareabilityMap`] covers `[0, size)` with maximal runs of one [`Shareability`]: adjacent
//! runs always differ, so memory is O(number of runs), never O(pages). [`ShareabilityMap::nodes_needed`]
//! tells in advance exactly how many new nodes an update inserts, so that a conversion can
//! preallocate them before its point of no return. It knows nothing of folios or references.

use std::collections::BTreeMap;

/// Whether a page belongs to the guest (private) or may be touched by the host (shared).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, PartialOrd, Ord)]
pub enum Shareability {
    /// Private: only the guest, through the Secure-EPT.
    #[default]
    Private,
    /// Shared: the host may map and reference it.
    Shared,
}

impl Shareability {
    /// The other state.
    pub const fn other(self) -> Shareability {
        match self {
            Shareability::Private => Shareability::Shared,
            Shareability::Shared => Shareability::Private,
        }
    }
}

/// Coalesced half-open runs `[start, end)` of one shareability covering `[0, size)`.
///
/// Offsets are plain byte offsets; callers validate bounds (out-of-range queries answer `None`
/// or `false`, out-of-range updates do nothing).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShareabilityMap {
    size: u64,
    /// Start of each run -> its state; a run ends at the next key (or `size`).
    starts: BTreeMap<u64, Shareability>,
}

impl ShareabilityMap {
    /// A map of `size` bytes, all `initial`. A zero size gives an empty map.
    pub fn new(size: u64, initial: Shareability) -> ShareabilityMap {
        let mut starts = BTreeMap::new();
        if size > 0 {
            starts.insert(0, initial);
        }
        ShareabilityMap { size, starts }
    }

    /// Size covered.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Number of runs (= nodes).
    pub fn len(&self) -> usize {
        self.starts.len()
    }

    /// True when the map covers nothing.
    pub fn is_empty(&self) -> bool {
        self.starts.is_empty()
    }

    /// The state at `offset`, `None` at or beyond `size`.
    pub fn get(&self, offset: u64) -> Option<Shareability> {
        self.run_at(offset).map(|(_, _, v)| v)
    }

    /// The run `(start, end, state)` containing `offset`.
    pub fn run_at(&self, offset: u64) -> Option<(u64, u64, Shareability)> {
        if offset >= self.size {
            return None;
        }
        let (&start, &v) = self.starts.range(..=offset).next_back()?;
        let end = self
            .starts
            .range(offset.checked_add(1)?..)
            .next()
            .map_or(self.size, |(&k, _)| k);
        Some((start, end, v))
    }

    /// All runs in order.
    pub fn iter(&self) -> impl Iterator<Item = (u64, u64, Shareability)> + '_ {
        self.runs_in(0, self.size)
    }

    /// The runs overlapping `[start, end)`, clipped to it.
    pub fn runs_in(
        &self,
        start: u64,
        end: u64,
    ) -> impl Iterator<Item = (u64, u64, Shareability)> + '_ {
        let end = end.min(self.size);
        let first = self.run_at(start).filter(|_| start < end);
        let rest_from = first.map_or(end, |(_, e, _)| e);
        let rest = self
            .starts
            .range(rest_from..end.max(rest_from))
            .map(move |(&s, &v)| {
                let e = self
                    .starts
                    .range(s.saturating_add(1)..)
                    .next()
                    .map_or(self.size, |(&k, _)| k);
                (s, e.min(end), v)
            });
        first
            .map(move |(_, e, v)| (start, e.min(end), v))
            .into_iter()
            .chain(rest)
    }

    /// True when `[start, end)` is non-empty, inside the map and entirely `state`.
    pub fn is_uniform(&self, start: u64, end: u64, state: Shareability) -> bool {
        if start >= end || end > self.size {
            return false;
        }
        matches!(self.run_at(start), Some((_, e, v)) if v == state && e >= end)
    }

    /// Exactly how many new nodes [`ShareabilityMap::set`] would insert for the same arguments.
    pub fn nodes_needed(&self, start: u64, end: u64, state: Shareability) -> usize {
        if start >= end || end > self.size {
            return 0;
        }
        let before = start.checked_sub(1).and_then(|b| self.get(b));
        let after = self.get(end);
        let mut need = 0;
        if before != Some(state) && !self.starts.contains_key(&start) {
            need += 1;
        }
        if after.is_some_and(|a| a != state) && !self.starts.contains_key(&end) {
            need += 1;
        }
        need
    }

    /// Sets `[start, end)` to `state`, coalescing with the neighbours. Returns the number of
    /// new nodes inserted (equal to [`ShareabilityMap::nodes_needed`] before the call). An empty
    /// or out-of-range request does nothing.
    pub fn set(&mut self, start: u64, end: u64, state: Shareability) -> usize {
        if start >= end || end > self.size {
            return 0;
        }
        let need = self.nodes_needed(start, end, state);
        let before = start.checked_sub(1).and_then(|b| self.get(b));
        let after = self.get(end);
        let stale: Vec<u64> = self.starts.range(start..=end).map(|(&k, _)| k).collect();
        for k in stale {
            self.starts.remove(&k);
        }
        if before != Some(state) {
            self.starts.insert(start, state);
        }
        if let Some(a) = after {
            if a != state {
                self.starts.insert(end, a);
            }
        }
        need
    }

    /// Checks the representation: starts at 0, keys inside, adjacent runs differ.
    pub fn is_well_formed(&self) -> bool {
        if self.size == 0 {
            return self.starts.is_empty();
        }
        if self.starts.keys().next() != Some(&0) {
            return false;
        }
        if self.starts.keys().any(|&k| k >= self.size) {
            return false;
        }
        self.starts
            .values()
            .zip(self.starts.values().skip(1))
            .all(|(a, b)| a != b)
    }
}

#[cfg(test)]
mod tests {
    use super::Shareability::{Private as P, Shared as S};
    use super::*;
    use proptest::prelude::*;

    const K: u64 = 4096;

    fn runs(m: &ShareabilityMap) -> Vec<(u64, u64, Shareability)> {
        m.iter().collect()
    }

    #[test]
    fn split_and_coalesce() {
        let mut m = ShareabilityMap::new(16 * K, P);
        assert_eq!(m.nodes_needed(4 * K, 5 * K, S), 2);
        assert_eq!(m.set(4 * K, 5 * K, S), 2);
        assert_eq!(
            runs(&m),
            vec![(0, 4 * K, P), (4 * K, 5 * K, S), (5 * K, 16 * K, P)]
        );
        // Extending the shared run at its end moves the boundary: a new key at 6K, 5K goes.
        assert_eq!(m.nodes_needed(5 * K, 6 * K, S), 1);
        m.set(5 * K, 6 * K, S);
        assert_eq!(
            runs(&m),
            vec![(0, 4 * K, P), (4 * K, 6 * K, S), (6 * K, 16 * K, P)]
        );
        // Back to private: everything coalesces into one run.
        assert_eq!(m.set(4 * K, 6 * K, P), 0);
        assert_eq!(runs(&m), vec![(0, 16 * K, P)]);
        assert_eq!(m.len(), 1);
        assert!(m.is_well_formed());
    }

    #[test]
    fn edges_and_out_of_range() {
        let mut m = ShareabilityMap::new(8 * K, P);
        assert_eq!(m.set(0, 8 * K, S), 0);
        assert_eq!(runs(&m), vec![(0, 8 * K, S)]);
        assert_eq!(m.set(7 * K, 8 * K, P), 1);
        assert_eq!(m.set(0, K, P), 1);
        assert_eq!(m.len(), 3);
        assert_eq!(m.set(0, 9 * K, S), 0);
        assert_eq!(m.len(), 3);
        assert_eq!(m.get(8 * K), None);
        assert!(!m.is_uniform(K, 9 * K, S));
        assert!(m.is_uniform(K, 7 * K, S));
        assert!(!m.is_uniform(0, 2 * K, S));
        assert_eq!(
            m.runs_in(K / 2, 7 * K + 100).collect::<Vec<_>>(),
            vec![(K / 2, K, P), (K, 7 * K, S), (7 * K, 7 * K + 100, P)]
        );
        assert_eq!(m.runs_in(5 * K, 5 * K).count(), 0);
    }

    proptest! {
        #[test]
        fn matches_a_page_array(ops in proptest::collection::vec((0u64..64, 1u64..16, any::<bool>()), 1..40)) {
            let pages = 64u64;
            let mut m = ShareabilityMap::new(pages * K, P);
            let mut model = vec![P; pages as usize];
            for (start, len, shared) in ops {
                let end = (start + len).min(pages);
                let v = if shared { S } else { P };
                let need = m.nodes_needed(start * K, end * K, v);
                let before = m.len();
                prop_assert_eq!(m.set(start * K, end * K, v), need);
                prop_assert!(m.len() <= before + need);
                for p in start..end {
                    model[p as usize] = v;
                }
                prop_assert!(m.is_well_formed());
                for (p, &mv) in model.iter().enumerate() {
                    prop_assert_eq!(m.get(p as u64 * K), Some(mv));
                }
                let transitions = model.windows(2).filter(|w| w[0] != w[1]).count();
                prop_assert_eq!(m.len(), transitions + 1);
            }
        }
    }
}
