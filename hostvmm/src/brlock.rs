//! A reader-writer lock for state that readers on many threads take at once (the private MMU's
//! lock, taken for read by every fault).
//!
//! One `RwLock` would make every reader write the same reader count, so vCPU threads faulting
//! in parallel would pass that cache line back and forth at every fault. Here each thread reads
//! through its own stripe (stripes sit on cache lines of their own), and a writer takes every
//! stripe, in order. Readers are cheap and writers cost one lock per stripe: the right trade
//! for a lock taken for write only by zaps, splits and merges.

use std::sync::{PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

use crossbeam_utils::CachePadded;

use crate::counters::stripe_of_thread;

/// Stripes: enough for the vCPU threads of a parallel run on a small host to read without
/// sharing one.
const STRIPES: usize = 8;

/// A reader-writer lock over no data (it orders the MMU's flows), striped for readers.
#[derive(Debug)]
pub struct StripedRwLock {
    stripes: Box<[CachePadded<RwLock<()>>]>,
}

/// Shared access: held by one stripe.
#[derive(Debug)]
pub struct ReadGuard<'a> {
    _stripe: RwLockReadGuard<'a, ()>,
}

/// Exclusive access: every stripe held.
#[derive(Debug)]
pub struct WriteGuard<'a> {
    _stripes: Vec<RwLockWriteGuard<'a, ()>>,
}

impl Default for StripedRwLock {
    fn default() -> Self {
        StripedRwLock {
            stripes: (0..STRIPES)
                .map(|_| CachePadded::new(RwLock::new(())))
                .collect(),
        }
    }
}

impl StripedRwLock {
    /// An unlocked lock.
    pub fn new() -> StripedRwLock {
        StripedRwLock::default()
    }

    /// Shared access, excluding writers only.
    pub fn read(&self) -> ReadGuard<'_> {
        let stripe = &self.stripes[stripe_of_thread(self.stripes.len())];
        ReadGuard {
            _stripe: stripe.read().unwrap_or_else(PoisonError::into_inner),
        }
    }

    /// Exclusive access: waits for every reader and writer to leave.
    pub fn write(&self) -> WriteGuard<'_> {
        WriteGuard {
            _stripes: self
                .stripes
                .iter()
                .map(|s| s.write().unwrap_or_else(PoisonError::into_inner))
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

    #[test]
    fn a_writer_excludes_readers_on_every_stripe() {
        let lock = StripedRwLock::new();
        let inside = AtomicBool::new(false);
        let overlaps = AtomicU64::new(0);
        std::thread::scope(|s| {
            // More reader threads than stripes, so every stripe has readers.
            for _ in 0..(2 * STRIPES) {
                s.spawn(|| {
                    for _ in 0..2000 {
                        let _r = lock.read();
                        if inside.load(Ordering::SeqCst) {
                            overlaps.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                });
            }
            s.spawn(|| {
                for _ in 0..200 {
                    let _w = lock.write();
                    inside.store(true, Ordering::SeqCst);
                    std::hint::spin_loop();
                    inside.store(false, Ordering::SeqCst);
                }
            });
        });
        assert_eq!(overlaps.into_inner(), 0);
    }
}
