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

/// A fixed-size bitmap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Bitmap {
    words: Vec<u64>,
    bits: u64,
    ones: u64,
}

impl Bitmap {
    pub(crate) fn new(bits: u64, filled: bool) -> Bitmap {
        let n = bits.div_ceil(64) as usize;
        let mut words = vec![if filled { u64::MAX } else { 0 }; n];
        if filled && bits % 64 != 0 {
            if let Some(last) = words.last_mut() {
                *last = (1u64 << (bits % 64)) - 1;
            }
        }
        Bitmap {
            words,
            bits,
            ones: if filled { bits } else { 0 },
        }
    }

    pub(crate) fn get(&self, i: u64) -> bool {
        i < self.bits
            && self
                .words
                .get((i / 64) as usize)
                .is_some_and(|w| w & (1 << (i % 64)) != 0)
    }

    /// Sets bit `i`; true when it was clear.
    pub(crate) fn set(&mut self, i: u64) -> bool {
        if i >= self.bits || self.get(i) {
            return false;
        }
        if let Some(w) = self.words.get_mut((i / 64) as usize) {
            *w |= 1 << (i % 64);
            self.ones += 1;
            return true;
        }
        false
    }

    /// Clears bit `i`; true when it was set.
    pub(crate) fn clear(&mut self, i: u64) -> bool {
        if !self.get(i) {
            return false;
        }
        if let Some(w) = self.words.get_mut((i / 64) as usize) {
            *w &= !(1 << (i % 64));
            self.ones -= 1;
            return true;
        }
        false
    }

    pub(crate) fn ones(&self) -> u64 {
        self.ones
    }

    /// True when any bit of `[start, end)` is set.
    pub(crate) fn any_in(&self, start: u64, end: u64) -> bool {
        self.ones > 0 && (start..end.min(self.bits)).any(|i| self.get(i))
    }

    /// Indices of set bits, ascending.
    pub(crate) fn iter_ones(&self) -> impl Iterator<Item = u64> + '_ {
        self.words.iter().enumerate().flat_map(|(wi, &w)| {
            (0..64u64)
                .filter(move |b| w & (1 << b) != 0)
                .map(move |b| wi as u64 * 64 + b)
        })
    }

    /// Indices of clear bits, ascending.
    pub(crate) fn iter_zeros(&self) -> impl Iterator<Item = u64> + '_ {
        (0..self.bits).filter(move |&i| !self.get(i))
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
        let mut z = Bitmap::new(512, false);
        assert!(!z.any_in(0, 512));
        z.set(300);
        assert!(z.any_in(256, 512) && !z.any_in(0, 256));
        assert_eq!(z.iter_ones().collect::<Vec<_>>(), vec![300]);
    }

    #[test]
    fn folio_addresses() {
        let f = Folio::new(Hpa::try_new(0x20_0000).unwrap(), PageLevel::Size2M);
        assert_eq!(f.hpa_of(1).as_u64(), 0x20_1000);
        assert_eq!(f.present.ones(), 512);
        assert_eq!(f.poison.ones(), 0);
    }
}
