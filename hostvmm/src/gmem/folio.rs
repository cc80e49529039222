//! One folio of a guest_memfd: a naturally aligned host block backing a naturally aligned GPA
//! block of the same size, with two per-4K bitmaps allocated together with it.
//!
//! - `present`: the sub-page is still in the file (not hole-punched). The folio goes back to
//!   the pool only when no sub-page is present (lazy hole punch: a punched or converted 4K
//!   page never splits the folio).
//! - `poison`: the sub-page's frame could not be removed from (or split in) the Secure-EPT. It is
//!   the side structure of seed 000: recording poison needs no allocation.
//!
//! A folio knows nothing of shareability; the same folio backs a page whether it is private or
//! shared (in-place conversion).

use accept::abi::PageLevel;

use super::pool::Hpa;

/// A fixed-size bitmap that allocates its words only while it is mixed: all-clear and all-set
/// maps (every folio's `present` and `poison` maps, nearly always) take 16 bytes and no heap.
/// At 2M folios this is what keeps a TiB of guest memory at a few tens of MB of host memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Bitmap {
    /// The words, `None` while every bit equals the others (`ones` is 0 or `bits`). Boxed so
    /// that the field is one pointer, not a `Vec`'s three words: most maps never allocate.
    #[allow(clippy::box_collection)]
    words: Option<Box<Vec<u64>>>,
    bits: u32,
    ones: u32,
}

impl Bitmap {
    /// A map of `bits` bits (at most `u32::MAX`, more are cut), all set or all clear.
    pub(crate) fn new(bits: u64, filled: bool) -> Bitmap {
        let bits = u32::try_from(bits).unwrap_or(u32::MAX);
        Bitmap {
            words: None,
            bits,
            ones: if filled { bits } else { 0 },
        }
    }

    fn len(&self) -> u64 {
        u64::from(self.bits)
    }

    pub(crate) fn get(&self, i: u64) -> bool {
        if i >= self.len() {
            return false;
        }
        match &self.words {
            None => self.ones != 0,
            Some(w) => w
                .get((i / 64) as usize)
                .is_some_and(|w| w & (1 << (i % 64)) != 0),
        }
    }

    /// The words, materialized from the uniform state.
    fn words_mut(&mut self) -> &mut Vec<u64> {
        let (bits, filled) = (self.len(), self.ones != 0);
        self.words.get_or_insert_with(|| {
            let n = bits.div_ceil(64) as usize;
            let mut words = vec![if filled { u64::MAX } else { 0 }; n];
            if filled && bits % 64 != 0 {
                if let Some(last) = words.last_mut() {
                    *last = (1u64 << (bits % 64)) - 1;
                }
            }
            Box::new(words)
        })
    }

    /// Drops the words when the map is uniform again.
    fn settle(&mut self) {
        if self.ones == 0 || self.ones == self.bits {
            self.words = None;
        }
    }

    /// Sets bit `i`; true when it was clear.
    pub(crate) fn set(&mut self, i: u64) -> bool {
        if i >= self.len() || self.get(i) {
            return false;
        }
        if let Some(w) = self.words_mut().get_mut((i / 64) as usize) {
            *w |= 1 << (i % 64);
            self.ones += 1;
            self.settle();
            return true;
        }
        false
    }

    /// Clears bit `i`; true when it was set.
    pub(crate) fn clear(&mut self, i: u64) -> bool {
        if !self.get(i) {
            return false;
        }
        if let Some(w) = self.words_mut().get_mut((i / 64) as usize) {
            *w &= !(1 << (i % 64));
            self.ones -= 1;
            self.settle();
            return true;
        }
        false
    }

    pub(crate) fn ones(&self) -> u64 {
        u64::from(self.ones)
    }

    /// True when any bit of `[start, end)` is set.
    pub(crate) fn any_in(&self, start: u64, end: u64) -> bool {
        let end = end.min(self.len());
        match &self.words {
            None => self.ones != 0 && start < end,
            Some(_) => self.ones > 0 && (start..end).any(|i| self.get(i)),
        }
    }

    /// Indices of set bits, ascending.
    pub(crate) fn iter_ones(&self) -> impl Iterator<Item = u64> + '_ {
        (0..self.len()).filter(move |&i| self.ones != 0 && self.get(i))
    }

    /// Indices of clear bits, ascending.
    pub(crate) fn iter_zeros(&self) -> impl Iterator<Item = u64> + '_ {
        (0..self.len()).filter(move |&i| self.ones != self.bits && !self.get(i))
    }
}

/// A folio backing `[base, base + level.size())` of the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Folio {
    pub(crate) hpa: Hpa,
    pub(crate) level: PageLevel,
    pub(crate) present: Bitmap,
    pub(crate) poison: Bitmap,
}

impl Folio {
    /// A freshly allocated folio: every sub-page present, none poisoned.
    pub(crate) fn new(hpa: Hpa, level: PageLevel) -> Folio {
        let pages = level.pages_4k();
        Folio {
            hpa,
            level,
            present: Bitmap::new(pages, true),
            poison: Bitmap::new(pages, false),
        }
    }

    /// The host address of sub-page `index`.
    pub(crate) fn hpa_of(&self, index: u64) -> Hpa {
        self.hpa
            .checked_add(index.min(self.level.pages_4k() - 1) << 12)
            .unwrap_or(self.hpa)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bitmap_basics() {
        let mut b = Bitmap::new(70, true);
        assert_eq!(b.ones(), 70);
        assert!(b.get(69) && !b.get(70));
        assert!(b.clear(3));
        assert!(!b.clear(3));
        assert!(!b.set(70));
        assert_eq!(b.ones(), 69);
        assert_eq!(b.iter_zeros().collect::<Vec<_>>(), vec![3]);
        assert!(b.set(3));
        assert!(b.words.is_none(), "uniform again: no words");
        let mut z = Bitmap::new(512, false);
        assert!(!z.any_in(0, 512));
        z.set(300);
        assert!(z.any_in(256, 512) && !z.any_in(0, 256));
        assert_eq!(z.iter_ones().collect::<Vec<_>>(), vec![300]);
        assert!(z.clear(300));
        assert!(z.words.is_none() && z.ones() == 0);
        assert_eq!(std::mem::size_of::<Bitmap>(), 16);
    }

    #[test]
    fn folio_addresses() {
        let f = Folio::new(Hpa::try_new(0x20_0000).unwrap(), PageLevel::Size2M);
        assert_eq!(f.hpa_of(1).as_u64(), 0x20_1000);
        assert_eq!(f.present.ones(), 512);
        assert_eq!(f.poison.ones(), 0);
    }
}
