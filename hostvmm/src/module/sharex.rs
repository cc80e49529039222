//! The module's shared/exclusive locks taken with try semantics (`tdx_locks.h`
//! acquire_sharex_lock_sh / acquire_sharex_lock_ex): the S-EPT tree lock (the TDCS
//! `secure_ept_lock`) and the TD epoch lock (`epoch_tracking.epoch_lock`). A holder in a
//! conflicting mode makes the call fail with OPERAND_BUSY instead of waiting; the caller names
//! the operand.
//!
//! In the module such a lock is one word: every shared acquire and release is an atomic
//! read-modify-write of it. Here PAGE.AUG and TDG.MEM.PAGE.ACCEPT take the tree lock shared on
//! every call, and every TD entry takes the epoch lock shared, so with several vCPU threads the
//! single word's cache line would move between cores at every call and cost more than the
//! calls. The shared holders are therefore counted in
//! stripes (one per thread, on cache lines of their own, as Linux's per-CPU reader-writer
//! semaphores count readers), and an exclusive acquire claims the lock and then checks that no
//! stripe counts a holder.
//!
//! The outcomes are the module's: a conflict between a shared and an exclusive acquire leaves
//! exactly one of them holding the lock and the other refused, never both refused and never
//! both holding. A shared acquirer that arrives while an exclusive one is still checking the
//! stripes waits for that check (a few loads) and then holds the lock if the check failed
//! because of it, or is refused if the exclusive acquire succeeded.

use std::sync::atomic::{AtomicU64, Ordering};

use crossbeam_utils::CachePadded;

use crate::counters::my_stripe;

/// Stripes of shared-holder counts (threads share a stripe beyond this; counts stay exact).
const STRIPES: usize = 16;

/// No exclusive acquire in progress or held.
const FREE: u64 = 0;
/// An exclusive acquirer has claimed the lock and is checking the shared counts.
const CLAIMING: u64 = 1;
/// Held exclusively.
const HELD: u64 = 2;

/// Spins of a shared acquirer waiting for a claim to resolve before it yields its thread.
const CLAIM_SPINS: u32 = 64;

/// The mode a sharex lock is taken in (`TDX_LOCK_SHARED` / `TDX_LOCK_EXCLUSIVE`; for the tree
/// lock, the mode a handler names in its call to lock_sept_check_and_walk_private_gpa).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LockMode {
    Shared,
    Exclusive,
}

/// A sharex lock; see the module docs.
#[derive(Debug)]
pub(crate) struct SharexLock {
    /// [`FREE`], [`CLAIMING`] or [`HELD`].
    exclusive: CachePadded<AtomicU64>,
    /// Shared holders, by stripe.
    shared: Box<[CachePadded<AtomicU64>]>,
}

impl Default for SharexLock {
    fn default() -> Self {
        SharexLock {
            exclusive: CachePadded::new(AtomicU64::new(FREE)),
            shared: (0..STRIPES)
                .map(|_| CachePadded::new(AtomicU64::new(0)))
                .collect(),
        }
    }
}

impl SharexLock {
    /// Takes the lock in `mode`, or `None` when a holder in a conflicting mode has it.
    pub(crate) fn try_lock(&self, mode: LockMode) -> Option<SharexGuard<'_>> {
        match mode {
            LockMode::Shared => self.try_shared(),
            LockMode::Exclusive => self.try_exclusive(),
        }
    }

    fn try_shared(&self) -> Option<SharexGuard<'_>> {
        let stripe = my_stripe() % STRIPES;
        let count = self.shared.get(stripe)?;
        // Counted first, then the exclusive word read: an exclusive acquirer that claims after
        // this read sees the count (all four accesses are sequentially consistent).
        count.fetch_add(1, Ordering::SeqCst);
        let mut spins = 0u32;
        loop {
            match self.exclusive.load(Ordering::SeqCst) {
                FREE => {
                    return Some(SharexGuard {
                        lock: self,
                        mode: LockMode::Shared,
                        stripe,
                    })
                }
                CLAIMING => {
                    // The claim fails if it sees this count, succeeds if it checked this stripe
                    // before the count: wait for it to say which.
                    spins += 1;
                    if spins < CLAIM_SPINS {
                        std::hint::spin_loop();
                    } else {
                        std::thread::yield_now();
                    }
                }
                _ => {
                    count.fetch_sub(1, Ordering::Release);
                    return None;
                }
            }
        }
    }

    fn try_exclusive(&self) -> Option<SharexGuard<'_>> {
        if self
            .exclusive
            .compare_exchange(FREE, CLAIMING, Ordering::SeqCst, Ordering::Relaxed)
            .is_err()
        {
            return None;
        }
        if self.shared.iter().any(|c| c.load(Ordering::SeqCst) != 0) {
            self.exclusive.store(FREE, Ordering::SeqCst);
            return None;
        }
        self.exclusive.store(HELD, Ordering::SeqCst);
        Some(SharexGuard {
            lock: self,
            mode: LockMode::Exclusive,
            stripe: 0,
        })
    }
}

/// A held sharex lock; released on drop (on any thread).
#[derive(Debug)]
pub(crate) struct SharexGuard<'a> {
    lock: &'a SharexLock,
    mode: LockMode,
    /// The stripe a shared hold is counted in.
    stripe: usize,
}

impl Drop for SharexGuard<'_> {
    fn drop(&mut self) {
        match self.mode {
            LockMode::Exclusive => self.lock.exclusive.store(FREE, Ordering::Release),
            LockMode::Shared => {
                if let Some(c) = self.lock.shared.get(self.stripe) {
                    c.fetch_sub(1, Ordering::Release);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::sync::Barrier;

    #[test]
    fn shared_holders_coexist_and_keep_an_exclusive_acquire_out() {
        let lock = SharexLock::default();
        let a = lock.try_lock(LockMode::Shared).expect("first shared");
        let b = lock.try_lock(LockMode::Shared).expect("second shared");
        assert!(lock.try_lock(LockMode::Exclusive).is_none());
        drop(a);
        assert!(lock.try_lock(LockMode::Exclusive).is_none());
        drop(b);
        let x = lock
            .try_lock(LockMode::Exclusive)
            .expect("exclusive once free");
        assert!(lock.try_lock(LockMode::Shared).is_none());
        assert!(lock.try_lock(LockMode::Exclusive).is_none());
        drop(x);
        assert!(lock.try_lock(LockMode::Shared).is_some());
    }

    #[test]
    fn a_refused_acquire_leaves_no_trace() {
        let lock = SharexLock::default();
        let x = lock.try_lock(LockMode::Exclusive).expect("exclusive");
        for _ in 0..3 {
            assert!(lock.try_lock(LockMode::Shared).is_none());
        }
        drop(x);
        let s = lock.try_lock(LockMode::Shared).expect("shared");
        assert!(lock.try_lock(LockMode::Exclusive).is_none());
        drop(s);
        assert!(lock.try_lock(LockMode::Exclusive).is_some());
    }

    #[test]
    fn a_guard_released_on_another_thread_releases_its_own_stripe() {
        let lock = SharexLock::default();
        let g = lock.try_lock(LockMode::Shared).expect("shared");
        std::thread::scope(|s| {
            s.spawn(move || drop(g));
        });
        assert!(lock.try_lock(LockMode::Exclusive).is_some());
    }

    /// Two threads race a shared and an exclusive acquire many times: each round exactly one
    /// of them holds the lock, and no two holders ever overlap.
    #[test]
    fn a_shared_exclusive_race_has_exactly_one_winner() {
        const ROUNDS: usize = 5_000;
        let lock = SharexLock::default();
        let barrier = Barrier::new(2);
        let inside = AtomicUsize::new(0);
        let (mut shared_wins, mut exclusive_wins) = (0usize, 0usize);
        let won = |mode: LockMode| -> Vec<bool> {
            (0..ROUNDS)
                .map(|_| {
                    barrier.wait();
                    let g = lock.try_lock(mode);
                    let holding = g.is_some();
                    if holding {
                        assert_eq!(inside.fetch_add(1, Ordering::SeqCst), 0, "two holders");
                        inside.fetch_sub(1, Ordering::SeqCst);
                    }
                    barrier.wait();
                    drop(g);
                    barrier.wait();
                    holding
                })
                .collect()
        };
        let (s, x) = std::thread::scope(|scope| {
            let s = scope.spawn(|| won(LockMode::Shared));
            let x = scope.spawn(|| won(LockMode::Exclusive));
            (
                s.join().expect("shared side"),
                x.join().expect("exclusive side"),
            )
        });
        for (round, (s, x)) in s.iter().zip(&x).enumerate() {
            assert!(s ^ x, "round {round}: shared {s}, exclusive {x}");
            shared_wins += usize::from(*s);
            exclusive_wins += usize::from(*x);
        }
        assert_eq!(shared_wins + exclusive_wins, ROUNDS);
    }
}
