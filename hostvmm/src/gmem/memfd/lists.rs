//! Per-CPU folio lists of one guest_memfd: the fault path's folio allocations without a shared
//! lock at every fault.
//!
//! Every fault that populates the file allocates a folio. With one pool behind one lock, the
//! vCPU threads of a parallel boot pass that lock and the pool's state between their cores at
//! every 2M ACCEPT. The kernel's page allocator answers the same problem with per-CPU page lists
//! (`struct per_cpu_pages` in `mm/page_alloc.c`): an allocation takes a page from its CPU's
//! list, and an empty list is refilled with a batch from the zone under the zone lock
//! (`rmqueue_pcplist`, `rmqueue_bulk`). When the zone runs dry the allocator gives every CPU's
//! list back to the zone and tries again (`drain_all_pages`). This file does the same, with a
//! list per thread stripe ([`crate::counters::my_stripe`]) instead of per CPU.
//!
//! Off by default ([`super::GuestMemfd::set_folio_batch`]): with lists, folios waiting on a list
//! count as live in the pool, and a failure armed in the pool's injector fires at the next
//! refill rather than at the next fault.

use std::sync::{Mutex, MutexGuard, PoisonError};

use accept::abi::PageLevel;
use crossbeam_utils::CachePadded;

use crate::gmem::pool::{FolioPool, Hpa, PoolError};

/// Lists: as many as the crate's counter stripes, so the vCPU threads of a run on a small host
/// each have their own.
const LISTS: usize = 16;

/// A thread's list: folios still free, the next one to hand out last.
type List = Vec<Hpa>;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The per-thread folio lists of a file.
#[derive(Debug)]
pub(crate) struct FolioLists {
    /// Folios a refill takes from the pool (0: lists off, every fault goes to the pool).
    batch: usize,
    lists: Box<[CachePadded<Mutex<List>>]>,
}

impl FolioLists {
    /// Lists refilled `batch` folios at a time; 0 turns them off.
    pub(crate) fn new(batch: usize) -> FolioLists {
        let lists = if batch == 0 { 0 } else { LISTS };
        FolioLists {
            batch,
            lists: (0..lists)
                .map(|_| CachePadded::new(Mutex::new(List::new())))
                .collect(),
        }
    }

    /// The refill batch (0: off).
    pub(crate) fn batch(&self) -> usize {
        self.batch
    }

    /// A folio of `level` for the calling thread: with the lists off, from the pool; else from
    /// its list, else from the pool, taking `batch - 1` more for the list at the same time. When the pool is exhausted, every list
    /// is given back to the pool under the pool's lock and one folio taken (no batch): a
    /// folio that is free anywhere is found.
    ///
    /// # Errors
    /// The pool's error when it has no folio left even with the lists drained, or when an
    /// injected failure fires.
    pub(crate) fn alloc(
        &self,
        pool: &Mutex<FolioPool>,
        level: PageLevel,
    ) -> Result<Hpa, PoolError> {
        self.alloc_on(crate::counters::my_stripe(), pool, level)
    }

    /// [`FolioLists::alloc`] from list `index` (modulo the number of lists).
    ///
    /// Lock order: the pool, then a list. A list alone is locked to take a folio.
    fn alloc_on(
        &self,
        index: usize,
        pool: &Mutex<FolioPool>,
        level: PageLevel,
    ) -> Result<Hpa, PoolError> {
        let Some(mine) = self.lists.get(index % LISTS) else {
            return lock(pool).alloc(level);
        };
        if let Some(hpa) = lock(mine).pop() {
            return Ok(hpa);
        }
        let mut pool = lock(pool);
        match pool.alloc(level) {
            Ok(first) => {
                let mut more = Vec::with_capacity(self.batch.saturating_sub(1));
                for _ in 1..self.batch {
                    match pool.alloc(level) {
                        Ok(hpa) => more.push(hpa),
                        // A short batch is still a batch; the next refill meets the failure.
                        Err(_) => break,
                    }
                }
                // Handed out in the pool's order: the lowest address next.
                lock(mine).extend(more.into_iter().rev());
                Ok(first)
            }
            Err(PoolError::Exhausted { .. }) => {
                for list in self.lists.iter() {
                    for hpa in std::mem::take(&mut *lock(list)) {
                        free_listed(&mut pool, hpa, level);
                    }
                }
                pool.alloc(level)
            }
            Err(e) => Err(e),
        }
    }

    /// Gives every list's folios (all of `level`) back to `pool`, owning both.
    pub(crate) fn drain_into_mut(&mut self, pool: &mut FolioPool, level: PageLevel) {
        for list in self.lists.iter_mut() {
            let list = list.get_mut().unwrap_or_else(PoisonError::into_inner);
            for hpa in list.drain(..) {
                free_listed(pool, hpa, level);
            }
        }
    }

    /// Folios waiting on the lists.
    pub(crate) fn len(&self) -> usize {
        self.lists.iter().map(|l| lock(l).len()).sum()
    }
}

/// Frees a listed folio: a live allocation of the pool at `level`, never mapped, so clean.
fn free_listed(pool: &mut FolioPool, hpa: Hpa, level: PageLevel) {
    if let Err(e) = pool.free(hpa, level, &[]) {
        log::error!("folio on a per-thread list: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const M2: u64 = PageLevel::Size2M.size();

    fn pool(folios: u64) -> Mutex<FolioPool> {
        Mutex::new(FolioPool::new(0, folios * M2).unwrap())
    }

    /// `n` folios from list `index`, as addresses.
    fn take(lists: &FolioLists, index: usize, pool: &Mutex<FolioPool>, n: usize) -> Vec<u64> {
        (0..n)
            .map(|_| {
                let hpa = lists.alloc_on(index, pool, PageLevel::Size2M).unwrap();
                hpa.as_u64()
            })
            .collect()
    }

    /// A thread's folios come in the pool's address order, a refill takes a batch, and the
    /// folios left on the list are live in the pool until drained.
    #[test]
    fn a_list_hands_out_in_address_order_and_drains_back() {
        let pool = pool(64);
        let lists = FolioLists::new(8);
        let got = take(&lists, 0, &pool, 3);
        assert_eq!(got, [0, M2, 2 * M2]);
        assert_eq!(lists.len(), 5);
        assert_eq!(lock(&pool).live_folios(), 8);
        let mut pool = pool.into_inner().unwrap();
        let mut lists = lists;
        lists.drain_into_mut(&mut pool, PageLevel::Size2M);
        assert_eq!(lists.len(), 0);
        assert_eq!(pool.live_folios(), 3);
    }

    /// When the pool runs dry while another thread's list still holds folios, the allocation
    /// drains the lists and succeeds; only a pool with nothing anywhere fails.
    #[test]
    fn an_empty_pool_takes_back_the_other_lists_before_failing() {
        let pool = pool(4);
        let lists = FolioLists::new(4);
        // Another thread (list 1) refills its list with all four folios and uses one.
        lists.alloc_on(1, &pool, PageLevel::Size2M).unwrap();
        assert_eq!(lists.len(), 3);
        // List 0 finds the pool empty, drains list 1 and takes one folio; its next refill
        // takes the other two.
        let mine = take(&lists, 0, &pool, 3);
        assert_eq!(mine, [M2, 2 * M2, 3 * M2]);
        assert_eq!(lists.len(), 0);
        assert_eq!(lock(&pool).live_folios(), 4);
        assert_eq!(
            lists.alloc_on(1, &pool, PageLevel::Size2M),
            Err(PoolError::Exhausted {
                level: PageLevel::Size2M
            })
        );
    }

    /// Threads that together need every folio of the pool all get theirs, each a different one,
    /// however their refills and drains interleave: a refill's batch is on its list before the
    /// pool's lock is let go, so a drain under that lock sees every folio not handed out.
    #[test]
    fn threads_that_need_the_whole_pool_all_get_distinct_folios() {
        const THREADS: usize = 4;
        const EACH: u64 = 16;
        for _ in 0..200 {
            let pool = pool(THREADS as u64 * EACH);
            // A batch larger than a thread's share: the first refills take what others need.
            let lists = FolioLists::new(24);
            let got: Vec<Vec<u64>> = std::thread::scope(|s| {
                let handles: Vec<_> = (0..THREADS)
                    .map(|t| {
                        let (lists, pool) = (&lists, &pool);
                        s.spawn(move || {
                            (0..EACH)
                                .map(|_| lists.alloc_on(t, pool, PageLevel::Size2M))
                                .collect::<Result<Vec<_>, _>>()
                        })
                    })
                    .collect();
                handles
                    .into_iter()
                    .map(|h| {
                        h.join()
                            .unwrap()
                            .unwrap()
                            .iter()
                            .map(|h| h.as_u64())
                            .collect()
                    })
                    .collect()
            });
            let mut all: Vec<u64> = got.into_iter().flatten().collect();
            all.sort_unstable();
            all.dedup();
            assert_eq!(all.len(), THREADS * EACH as usize);
            assert_eq!(lists.len(), 0);
        }
    }

    /// With the lists off, every allocation goes to the pool.
    #[test]
    fn batch_zero_is_the_pool_itself() {
        let pool = pool(4);
        let lists = FolioLists::new(0);
        lists.alloc(&pool, PageLevel::Size2M).unwrap();
        assert_eq!(lists.len(), 0);
        assert_eq!(lock(&pool).live_folios(), 1);
    }
}
