//! The guest_memfd model's per-thread folio lists (`GuestMemfd::set_folio_batch`): what a user
//! of the fault path sees with them on.

use accept::abi::{Gpa, GpaRange, PageLevel};
use hostvmm::gmem::{FolioPool, GmemConfig, GmemError, GuestMemfd, NoopHook, PoolError};

const M2: u64 = PageLevel::Size2M.size();

fn gpa(v: u64) -> Gpa {
    Gpa::try_new(v).unwrap()
}

/// A 2M-folio file of `folios` folios over a pool of exactly as many.
fn memfd(folios: u64, batch: usize) -> GuestMemfd {
    let pool = FolioPool::new(1 << 32, folios * M2).unwrap();
    let mut g = GuestMemfd::new(GmemConfig::new(folios * M2, PageLevel::Size2M), pool).unwrap();
    g.set_folio_batch(batch);
    g
}

/// Threads that fault a whole file at once over a pool with not one folio to spare all get
/// their pages, each folio once: batches that took what other threads needed are drained back.
#[test]
fn threads_faulting_a_file_whose_pool_has_nothing_to_spare_all_succeed() {
    const THREADS: u64 = 4;
    const EACH: u64 = 48;
    for _ in 0..20 {
        let g = memfd(THREADS * EACH, 64);
        let hpas: Vec<u64> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..THREADS)
                .map(|t| {
                    let g = &g;
                    s.spawn(move || {
                        (0..EACH)
                            .map(|i| {
                                let at = gpa((t * EACH + i) * M2);
                                g.fault_pfn_shared(at).map(|(pfn, _)| pfn.hpa.as_u64())
                            })
                            .collect::<Result<Vec<_>, _>>()
                    })
                })
                .collect();
            handles
                .into_iter()
                .flat_map(|h| h.join().unwrap().unwrap())
                .collect()
        });
        let mut distinct = hpas.clone();
        distinct.sort_unstable();
        distinct.dedup();
        assert_eq!(distinct.len() as u64, THREADS * EACH);
        assert_eq!(g.listed_folios(), 0);
        assert_eq!(g.with_pool(FolioPool::live_folios) as u64, THREADS * EACH);
        assert_eq!(
            g.stats().folios_allocated.get(PageLevel::Size2M),
            THREADS * EACH
        );
    }
}

/// Folios waiting on a list count as live in the pool until the lists are turned off, which
/// gives them back; a fault past the pool's end still fails with NoMemory.
#[test]
fn listed_folios_are_live_in_the_pool_until_given_back() {
    let pool = FolioPool::new(1 << 32, 16 * M2).unwrap();
    let mut g = GuestMemfd::new(GmemConfig::new(32 * M2, PageLevel::Size2M), pool).unwrap();
    g.set_folio_batch(8);
    assert_eq!(g.folio_batch(), 8);
    let first = g.fault_pfn_shared(gpa(0)).unwrap().0.hpa;
    let second = g.fault_pfn_shared(gpa(M2)).unwrap().0.hpa;
    // The list hands folios out in the pool's address order.
    assert_eq!(second.as_u64(), first.as_u64() + M2);
    assert_eq!(g.listed_folios(), 6);
    assert_eq!(g.with_pool(FolioPool::live_folios), 8);
    g.set_folio_batch(0);
    assert_eq!(g.listed_folios(), 0);
    assert_eq!(g.with_pool(FolioPool::live_folios), 2);
    // Lists back on: the rest of the pool, then NoMemory.
    g.set_folio_batch(8);
    for i in 2..16 {
        g.fault_pfn_shared(gpa(i * M2)).unwrap();
    }
    assert!(matches!(
        g.fault_pfn_shared(gpa(16 * M2)),
        Err(GmemError::NoMemory {
            source: PoolError::Exhausted { .. },
            ..
        })
    ));
}

/// A hole punch gives its folio to the pool, where a later fault on another thread's list finds
/// it once the pool is otherwise empty.
#[test]
fn a_punched_folio_is_found_again_through_the_lists() {
    let mut g = memfd(4, 2);
    for i in 0..4 {
        g.fault_pfn_shared(gpa(i * M2)).unwrap();
    }
    g.punch_hole(GpaRange::new(M2, 2 * M2).unwrap(), &mut NoopHook)
        .unwrap();
    assert_eq!(g.with_pool(FolioPool::live_folios), 3);
    let again = std::thread::scope(|s| s.spawn(|| g.fault_pfn_shared(gpa(M2))).join().unwrap());
    assert!(again.is_ok());
    assert_eq!(g.with_pool(FolioPool::live_folios), 4);
}
