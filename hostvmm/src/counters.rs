//! Event counters bumped by many threads at once, and the same counts per thread.
//!
//! Every exit handler bumps a few counters. With one atomic per counter, vCPU threads running
//! in parallel would pass the counters' cache lines back and forth at every exit, which costs
//! more than the work counted. So each set of counters is striped: a thread bumps the stripe
//! chosen for it (stripes sit on cache lines of their own), and a snapshot sums the stripes.
//! Sums are exact whatever threads share a stripe.
//!
//! A caller that wants to know what its own thread caused (the simulator charges each vCPU the
//! host work of its own exits) reads a per-thread copy of the counts instead: [`Local`]. Those
//! counts are per thread and per counter family, over every instance of the family the thread
//! touched, so they are meant to be read as the difference between two reads around one call.

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

/// Stripes per counter set: enough that the vCPU threads of a parallel run on a small host
/// rarely share one, few enough that a snapshot stays cheap.
const STRIPES: usize = 16;

/// One stripe of `N` counters, on cache lines of its own.
#[repr(align(128))]
struct Stripe<const N: usize>([AtomicU64; N]);

impl<const N: usize> Default for Stripe<N> {
    fn default() -> Self {
        Stripe(std::array::from_fn(|_| AtomicU64::new(0)))
    }
}

/// `N` counters, striped over threads.
pub(crate) struct Striped<const N: usize> {
    stripes: Box<[Stripe<N>]>,
}

impl<const N: usize> Default for Striped<N> {
    fn default() -> Self {
        Striped {
            stripes: (0..STRIPES).map(|_| Stripe::default()).collect(),
        }
    }
}

impl<const N: usize> std::fmt::Debug for Striped<N> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.sum()).finish()
    }
}

thread_local! {
    /// This thread's stripe, handed out round robin as threads first bump a counter (the
    /// vCPU threads of a run, started one after the other, get different stripes).
    static STRIPE: usize = {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        NEXT.fetch_add(1, Ordering::Relaxed) % STRIPES
    };
}

/// This thread's stripe (also used by other striped structures of the crate).
pub(crate) fn my_stripe() -> usize {
    STRIPE.try_with(|s| *s).unwrap_or(0)
}

impl<const N: usize> Striped<N> {
    /// Adds `n` to counter `i` (ignored when `i` is out of range).
    pub(crate) fn add(&self, i: usize, n: u64) {
        if let Some(c) = self
            .stripes
            .get(my_stripe())
            .and_then(|stripe| stripe.0.get(i))
        {
            c.fetch_add(n, Ordering::Relaxed);
        }
    }

    /// The counts summed over the stripes.
    pub(crate) fn sum(&self) -> [u64; N] {
        let mut out = [0u64; N];
        for stripe in self.stripes.iter() {
            for (o, c) in out.iter_mut().zip(stripe.0.iter()) {
                *o = o.wrapping_add(c.load(Ordering::Relaxed));
            }
        }
        out
    }
}

/// A thread's own counts of one counter family: a `thread_local!` of these, bumped next to the
/// shared [`Striped`] counters.
#[derive(Debug)]
pub(crate) struct Local<const N: usize>([Cell<u64>; N]);

impl<const N: usize> Local<N> {
    /// All zero.
    pub(crate) fn new() -> Local<N> {
        Local(std::array::from_fn(|_| Cell::new(0)))
    }

    /// Adds `n` to counter `i` (ignored when `i` is out of range).
    pub(crate) fn add(&self, i: usize, n: u64) {
        if let Some(c) = self.0.get(i) {
            c.set(c.get().wrapping_add(n));
        }
    }

    /// The counts.
    pub(crate) fn get(&self) -> [u64; N] {
        std::array::from_fn(|i| self.0[i].get())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn sums_are_exact_across_threads_sharing_stripes() {
        let c = Arc::new(Striped::<3>::default());
        // More threads than stripes, so some share one.
        let threads: Vec<_> = (0..(2 * STRIPES as u64))
            .map(|t| {
                let c = Arc::clone(&c);
                std::thread::spawn(move || {
                    for _ in 0..1000 {
                        c.add(0, 1);
                        c.add(2, t);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let n = 2 * STRIPES as u64;
        assert_eq!(c.sum(), [1000 * n, 0, 1000 * (n * (n - 1) / 2)]);
        c.add(3, 1);
        assert_eq!(
            c.sum()[0],
            1000 * n,
            "an index out of range changes nothing"
        );
    }

    #[test]
    fn local_counts_are_the_threads_own() {
        thread_local! { static L: Local<2> = Local::new(); }
        L.with(|l| l.add(1, 5));
        let other = std::thread::spawn(|| {
            L.with(|l| l.add(1, 7));
            L.with(Local::get)
        })
        .join()
        .unwrap();
        assert_eq!(other, [0, 7]);
        assert_eq!(L.with(Local::get), [0, 5]);
    }
}
