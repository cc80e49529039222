//! A deterministic scheduler for vCPU threads: exactly one runs at a time, and control passes
//! only at scheduling points (every TDCALL and guest memory access, and every step of a guest
//! wait loop), to a vCPU chosen by a seeded random generator. The same seed gives the same
//! interleaving, hence the same counts, on any machine.
//!
//! Host code runs inside the slice of the vCPU whose exit it handles and never reaches a
//! scheduling point, so no host lock is ever held across a switch and no vCPU is ever inside
//! the TD when another one runs: TLB tracking always completes without waiting.

use std::sync::{Condvar, Mutex, PoisonError};

/// SplitMix64: a small, fast, seedable generator (Steele, Lea, Flood 2014).
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator from `seed`.
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A value in `[0, n)` (0 when `n` is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next_u64() % n
        }
    }

    /// True with probability `num / den`.
    pub fn chance(&mut self, num: u64, den: u64) -> bool {
        self.below(den) < num
    }
}

#[derive(Debug)]
struct State {
    current: usize,
    live: Vec<bool>,
    rng: Rng,
    switches: u64,
}

/// The baton: which vCPU thread may run.
#[derive(Debug)]
pub struct Scheduler {
    state: Mutex<State>,
    cv: Condvar,
    /// A scheduling point switches with probability 1 / `switch_every`.
    switch_every: u64,
}

impl Scheduler {
    /// A scheduler for `vcpus` threads; vCPU 0 runs first.
    pub fn new(vcpus: usize, seed: u64, switch_every: u64) -> Scheduler {
        Scheduler {
            state: Mutex::new(State {
                current: 0,
                live: vec![true; vcpus],
                rng: Rng::new(seed ^ 0x5EED_5C4E_D01E),
                switches: 0,
            }),
            cv: Condvar::new(),
            switch_every: switch_every.max(1),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Blocks until it is `me`'s turn.
    pub fn wait_turn(&self, me: usize) {
        let mut s = self.lock();
        while s.current != me {
            s = self.cv.wait(s).unwrap_or_else(PoisonError::into_inner);
        }
    }

    /// A scheduling point of `me` (which must hold the baton): maybe hands the baton to another
    /// live vCPU and waits for it to come back. `force` always switches when another vCPU is
    /// live (wait loops use it).
    pub fn yield_now(&self, me: usize, force: bool) {
        let mut s = self.lock();
        let others = s
            .live
            .iter()
            .enumerate()
            .filter(|&(i, &l)| l && i != me)
            .count() as u64;
        if others == 0 {
            return;
        }
        let switch_every = self.switch_every;
        if !force && !s.rng.chance(1, switch_every) {
            return;
        }
        let pick = s.rng.below(others);
        let next = s
            .live
            .iter()
            .enumerate()
            .filter(|&(i, &l)| l && i != me)
            .nth(pick as usize)
            .map_or(me, |(i, _)| i);
        s.current = next;
        s.switches += 1;
        self.cv.notify_all();
        while s.current != me {
            s = self.cv.wait(s).unwrap_or_else(PoisonError::into_inner);
        }
    }

    /// `me` is done: hands the baton to another live vCPU, if any.
    pub fn finish(&self, me: usize) {
        let mut s = self.lock();
        if let Some(l) = s.live.get_mut(me) {
            *l = false;
        }
        let live: Vec<usize> = s
            .live
            .iter()
            .enumerate()
            .filter(|&(_, &l)| l)
            .map(|(i, _)| i)
            .collect();
        if !live.is_empty() {
            let pick = s.rng.below(live.len() as u64) as usize;
            s.current = live[pick];
            s.switches += 1;
        }
        self.cv.notify_all();
    }

    /// Baton hand-overs so far.
    pub fn switches(&self) -> u64 {
        self.lock().switches
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn trace(seed: u64) -> Vec<usize> {
        let s = Arc::new(Scheduler::new(4, seed, 2));
        let log = Arc::new(Mutex::new(Vec::new()));
        std::thread::scope(|scope| {
            for me in 0..4 {
                let (s, log) = (s.clone(), log.clone());
                scope.spawn(move || {
                    s.wait_turn(me);
                    for _ in 0..50 {
                        log.lock().unwrap().push(me);
                        s.yield_now(me, false);
                    }
                    s.finish(me);
                });
            }
        });
        Arc::try_unwrap(log).unwrap().into_inner().unwrap()
    }

    #[test]
    fn same_seed_same_interleaving() {
        let a = trace(7);
        assert_eq!(a.len(), 200);
        assert_eq!(a, trace(7));
        assert_ne!(a, trace(8));
        // Every vCPU ran.
        for me in 0..4 {
            assert_eq!(a.iter().filter(|&&x| x == me).count(), 50);
        }
    }
}
