//! Page contents, modelled as one `u64` token per 4K host page.
//!
//! Contents are keyed by host physical address, so they follow the page through DEMOTE and
//! PROMOTE (which keep HPAs) and survive REMOVE (which does not zero). A 2M chunk of host memory
//! costs nothing until a non-zero token is written into it; zeroing a whole chunk (a 2M ACCEPT)
//! drops it, which is O(1). Token 0 means "all zero bytes".
//!
//! The store is sharded by 128 MiB slices of host memory so that vCPU threads touching
//! different memory do not contend: the guest_memfd's per-thread folio lists hand each thread
//! 64 consecutive 2M folios at a time, and a shard per 2M chunk would have had both threads of
//! a parallel boot sweep every shard in step.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard, PoisonError};

use crossbeam_utils::CachePadded;

const CHUNK_SHIFT: u32 = 21;
const CHUNK_PAGES: usize = 512;
const SHARDS: usize = 64;
/// log2 of the chunks in one shard's slice (64 chunks: 128 MiB).
const SLICE_CHUNKS_SHIFT: u32 = 6;

type Chunk = Box<[u64; CHUNK_PAGES]>;

/// Sparse token store for host memory.
#[derive(Debug)]
pub(crate) struct Contents {
    /// One cache line each, so that vCPUs zeroing pages of different shards share nothing.
    shards: Vec<CachePadded<Mutex<HashMap<u64, Chunk>>>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Contents {
    pub(crate) fn new() -> Contents {
        Contents {
            shards: (0..SHARDS)
                .map(|_| CachePadded::new(Mutex::new(HashMap::new())))
                .collect(),
        }
    }

    fn shard(&self, chunk: u64) -> MutexGuard<'_, HashMap<u64, Chunk>> {
        // `SHARDS` is a power of two; the index is always in range.
        let i = ((chunk >> SLICE_CHUNKS_SHIFT) as usize) & (SHARDS - 1);
        lock(&self.shards[i])
    }

    /// The token of the 4K page containing `hpa`.
    pub(crate) fn read(&self, hpa: u64) -> u64 {
        let chunk = hpa >> CHUNK_SHIFT;
        let page = ((hpa >> 12) as usize) & (CHUNK_PAGES - 1);
        self.shard(chunk).get(&chunk).map_or(0, |c| c[page])
    }

    /// Writes the token of the 4K page containing `hpa`.
    pub(crate) fn write(&self, hpa: u64, token: u64) {
        let chunk = hpa >> CHUNK_SHIFT;
        let page = ((hpa >> 12) as usize) & (CHUNK_PAGES - 1);
        let mut shard = self.shard(chunk);
        if token == 0 {
            if let Some(c) = shard.get_mut(&chunk) {
                c[page] = 0;
            }
            return;
        }
        shard
            .entry(chunk)
            .or_insert_with(|| Box::new([0; CHUNK_PAGES]))[page] = token;
    }

    /// Zeroes `pages` 4K pages from `hpa` (4K aligned). Whole chunks are dropped in O(1).
    pub(crate) fn zero(&self, hpa: u64, pages: u64) {
        let mut page = hpa >> 12;
        let Some(end) = page.checked_add(pages) else {
            return;
        };
        while page < end {
            let chunk = page >> (CHUNK_SHIFT - 12);
            let first = (page as usize) & (CHUNK_PAGES - 1);
            let chunk_end = (chunk + 1) << (CHUNK_SHIFT - 12);
            let stop = end.min(chunk_end);
            let n = (stop - page) as usize;
            let mut shard = self.shard(chunk);
            if n == CHUNK_PAGES {
                shard.remove(&chunk);
            } else if let Some(c) = shard.get_mut(&chunk) {
                c[first..first + n].fill(0);
                if c.iter().all(|&t| t == 0) {
                    shard.remove(&chunk);
                }
            }
            page = stop;
        }
    }

    /// Number of 2M chunks holding at least one non-zero token (memory footprint of contents).
    pub(crate) fn chunks(&self) -> usize {
        self.shards.iter().map(|s| lock(s).len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_is_the_default_and_zeroing_drops_chunks() {
        let c = Contents::new();
        assert_eq!(c.read(0x20_0000), 0);
        c.write(0x20_1000, 7);
        c.write(0x40_0000, 9);
        assert_eq!(c.read(0x20_1000), 7);
        assert_eq!(c.read(0x20_1FFF), 7);
        assert_eq!(c.chunks(), 2);
        c.zero(0x20_0000, 512);
        assert_eq!(c.read(0x20_1000), 0);
        assert_eq!(c.chunks(), 1);
        c.zero(0x3F_F000, 2);
        assert_eq!(c.read(0x40_0000), 0);
        assert_eq!(c.chunks(), 0);
        c.zero(!0xFFF, u64::MAX);
    }
}
