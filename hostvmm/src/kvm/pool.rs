//! The pool of host pages the private MMU hands to the module as S-EPT pages (SEPT.ADD,
//! DEMOTE), separate from guest memory, with failure injection for tests (feature `testing`).
//!
//! Not here: when pages are taken or returned (the fault, split and merge flows).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};

/// A pool of host pages for S-EPT pages (SEPT.ADD, DEMOTE), separate from guest memory.
#[derive(Debug)]
pub struct SeptPagePool {
    next: AtomicU64,
    end: u64,
    free: Mutex<Vec<u64>>,
    #[cfg(feature = "testing")]
    fail_next: AtomicU64,
    allocated: AtomicU64,
}

impl SeptPagePool {
    /// A pool handing out 4K pages from `[base, base + pages * 4K)`.
    pub fn new(base: u64, pages: u64) -> SeptPagePool {
        SeptPagePool {
            next: AtomicU64::new(base),
            end: base.saturating_add(pages.saturating_mul(4096)),
            free: Mutex::new(Vec::new()),
            #[cfg(feature = "testing")]
            fail_next: AtomicU64::new(0),
            allocated: AtomicU64::new(0),
        }
    }

    /// Makes the next `n` allocations fail (fault injection).
    #[cfg(feature = "testing")]
    pub fn fail_next(&self, n: u64) {
        self.fail_next.store(n, Ordering::Relaxed);
    }

    /// A page, or `None` when the pool is exhausted (or a failure is injected).
    pub fn alloc(&self) -> Option<u64> {
        #[cfg(feature = "testing")]
        if self
            .fail_next
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
            .is_ok()
        {
            return None;
        }
        let page = match self
            .free
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop()
        {
            Some(p) => p,
            None => {
                let p = self.next.fetch_add(4096, Ordering::Relaxed);
                if p >= self.end {
                    self.next.fetch_sub(4096, Ordering::Relaxed);
                    return None;
                }
                p
            }
        };
        self.allocated.fetch_add(1, Ordering::Relaxed);
        Some(page)
    }

    /// Returns a page.
    pub fn free(&self, page: u64) {
        self.allocated.fetch_sub(1, Ordering::Relaxed);
        self.free
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(page);
    }

    /// Pages handed out and not returned.
    pub fn in_use(&self) -> u64 {
        self.allocated.load(Ordering::Relaxed)
    }
}
