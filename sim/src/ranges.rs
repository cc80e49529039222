//! A set of 4K-aligned GPA intervals, coalesced: O(intervals) memory.

use std::collections::BTreeMap;

/// Half-open intervals `[start, end)`, disjoint and non-adjacent.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RangeSet {
    map: BTreeMap<u64, u64>,
}

impl RangeSet {
    /// An empty set.
    pub fn new() -> RangeSet {
        RangeSet::default()
    }

    /// True when any byte of `[start, end)` is in the set.
    pub fn overlaps(&self, start: u64, end: u64) -> bool {
        if start >= end {
            return false;
        }
        if let Some((_, &e)) = self.map.range(..=start).next_back() {
            if e > start {
                return true;
            }
        }
        self.map.range(start..end).next().is_some()
    }

    /// True when every byte of `[start, end)` is in the set.
    pub fn contains(&self, start: u64, end: u64) -> bool {
        if start >= end {
            return true;
        }
        matches!(self.map.range(..=start).next_back(), Some((_, &e)) if e >= end)
    }

    /// Adds `[start, end)`.
    pub fn insert(&mut self, mut start: u64, mut end: u64) {
        if start >= end {
            return;
        }
        if let Some((&s, &e)) = self.map.range(..=start).next_back() {
            if e >= start {
                start = s;
                end = end.max(e);
            }
        }
        let inside: Vec<(u64, u64)> = self.map.range(start..=end).map(|(&s, &e)| (s, e)).collect();
        for (s, e) in inside {
            self.map.remove(&s);
            end = end.max(e);
        }
        self.map.insert(start, end);
    }

    /// Removes `[start, end)`.
    pub fn remove(&mut self, start: u64, end: u64) {
        if start >= end {
            return;
        }
        let mut touched: Vec<(u64, u64)> = Vec::new();
        if let Some((&s, &e)) = self.map.range(..start).next_back() {
            if e > start {
                touched.push((s, e));
            }
        }
        touched.extend(self.map.range(start..end).map(|(&s, &e)| (s, e)));
        for (s, e) in touched {
            self.map.remove(&s);
            if s < start {
                self.map.insert(s, start);
            }
            if e > end {
                self.map.insert(end, e);
            }
        }
    }

    /// The intervals, in order.
    pub fn iter(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.map.iter().map(|(&s, &e)| (s, e))
    }

    /// Total bytes.
    pub fn bytes(&self) -> u64 {
        self.iter().map(|(s, e)| e - s).sum()
    }

    /// Number of intervals.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn insert_remove_coalesce() {
        let mut s = RangeSet::new();
        s.insert(0, 10);
        s.insert(20, 30);
        s.insert(10, 20);
        assert_eq!(s.iter().collect::<Vec<_>>(), [(0, 30)]);
        s.remove(5, 25);
        assert_eq!(s.iter().collect::<Vec<_>>(), [(0, 5), (25, 30)]);
        assert!(s.overlaps(4, 6));
        assert!(!s.overlaps(5, 25));
        assert!(s.contains(25, 30));
        assert!(!s.contains(0, 6));
        assert_eq!(s.bytes(), 10);
        s.insert(2, 27);
        assert_eq!(s.iter().collect::<Vec<_>>(), [(0, 30)]);
    }

    proptest::proptest! {
        #[test]
        fn matches_a_bitmap(ops in proptest::collection::vec((proptest::bool::ANY, 0u64..64, 0u64..64), 0..40)) {
            let mut s = RangeSet::new();
            let mut bits = [false; 64];
            for (add, a, b) in ops {
                let (lo, hi) = (a.min(b), a.max(b));
                if add { s.insert(lo, hi) } else { s.remove(lo, hi) }
                for x in bits.iter_mut().take(hi as usize).skip(lo as usize) { *x = add; }
            }
            for (i, &b) in bits.iter().enumerate() {
                proptest::prop_assert_eq!(s.contains(i as u64, i as u64 + 1), b);
            }
            let runs: Vec<_> = s.iter().collect();
            for w in runs.windows(2) { proptest::prop_assert!(w[0].1 < w[1].0); }
        }
    }
}
