//! How vCPUs share the machine. Two modes ([`Mode`]):
//!
//! - **Deterministic** (the default): every vCPU is a stackful coroutine on the caller's
//!   thread ([`run_coroutines`]), and control passes only at scheduling points (every TDCALL and
//!   guest memory access, and every step of a guest wait loop). At each point the current vCPU
//!   hands over to a random other vCPU with probability 1 / `switch_every` (seeded), and to the
//!   vCPU that is furthest behind in modelled time when it has run more than [`QUANTUM_NS`]
//!   ahead of it. So the same seed gives the same interleaving, hence the same counts, on any
//!   machine; the vCPUs' modelled clocks advance together as on real parallel hardware; and a
//!   switch is a coroutine switch (no OS thread hand-off), so the run's cost does not grow with
//!   the number of vCPUs. Host code runs inside the slice of the vCPU whose exit it handles and
//!   never reaches a scheduling point, so no host lock is ever held across a switch and no vCPU
//!   is ever inside the TD when another one runs: TLB tracking always completes without
//!   waiting.
//! - **Parallel**: one OS thread per vCPU, all running at once, no baton. Lock contention,
//!   BUSY answers, TRACK refusals and the races between faults, zaps, merges and acceptance
//!   happen for real; counts are not reproducible. The only coordination is on modelled time:
//!   a vCPU more than a window ([`PARALLEL_QUANTUM_NS`], growing with the run) ahead of the
//!   slowest live vCPU yields its OS thread until that one catches up (vCPUs in a wait loop
//!   move their clock forward instead of holding the others back). Without it, the OS's time slicing (8 threads on 2 cores) would decide which
//!   vCPU does the work and the modelled time would describe the host machine, not the TD.
//!
//! The scheduler's own bookkeeping is O(log N) per switch: a switch picks the vCPU with the
//! smallest key from an ordered set, or a random one from a vector.

use std::collections::BTreeSet;
use std::fmt;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};

use corosensei::stack::DefaultStack;
use corosensei::{CoroutineResult, ScopedCoroutine, ScopedCoroutineRef, Yielder};

/// How far (modelled nanoseconds) a vCPU may run ahead of the vCPU furthest behind before the
/// deterministic scheduler switches to that one: a few 2M ACCEPTs (~210 us modelled each), so
/// that time-driven switches stay rare, and small against any run whose balance matters (0.1%
/// of 64 GiB of boot acceptance on 8 vCPUs).
pub const QUANTUM_NS: u64 = 1_000_000;

/// How far (modelled nanoseconds) a vCPU may run ahead of the slowest live vCPU in parallel
/// mode before it waits, at least. Several 2M ACCEPTs, so that two threads of equal speed
/// rarely wait for each other (a smaller window makes them take turns); small against any run
/// whose balance matters (0.5% of 16 GiB of boot acceptance on 8 vCPUs).
pub const PARALLEL_QUANTUM_NS: u64 = 1_000_000;

/// The window also grows with the run: `1 / PARALLEL_WINDOW_FRACTION` of the slowest vCPU's
/// modelled clock (0.5%). A window of a few microseconds of wall time makes a thread that
/// stalls briefly (a page fault, an interrupt) hold the other back at every stall, and its
/// waiting slows the one it waits for when both share a physical core; a window that is a
/// fixed fraction of the run keeps the vCPUs' modelled clocks as close, relative to the run,
/// at every size.
pub const PARALLEL_WINDOW_FRACTION: u64 = 200;

/// Parallel mode, during a phase whose work is known ([`Scheduler::begin_phase`]): the window
/// also reaches `1 / PARALLEL_HORIZON_DIVISOR` of the modelled time the phase still needs, as
/// estimated from the work done so far. Early in a boot the vCPUs' clocks may then drift far
/// apart, so a host thread that runs slow for a while holds the others back only when the
/// work runs out; the window closes to the one above as it does, so the vCPUs still end the
/// phase within that of each other.
pub const PARALLEL_HORIZON_DIVISOR: u64 = 2;

/// Parallel mode: a paced vCPU yields its thread this many times, then sleeps between looks.
const PACE_SPINS: u32 = 8;

/// Stack of one vCPU coroutine (the guest engine and the host half run on it).
pub const COROUTINE_STACK: usize = 1 << 20;

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

/// How the vCPUs of a run execute.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, clap::ValueEnum)]
pub enum Mode {
    /// Coroutines on one thread, seeded interleaving, exact counts.
    #[default]
    Deterministic,
    /// One OS thread per vCPU, all at once.
    Parallel,
}

impl Mode {
    /// Both modes with their command-line names.
    pub const ALL: [(Mode, &'static str); 2] = [
        (Mode::Deterministic, "deterministic"),
        (Mode::Parallel, "parallel"),
    ];

    /// The command-line name.
    pub fn name(self) -> &'static str {
        match self {
            Mode::Deterministic => "deterministic",
            Mode::Parallel => "parallel",
        }
    }

    /// Parses a command-line name.
    pub fn from_name(name: &str) -> Option<Mode> {
        Mode::ALL.iter().find(|(_, n)| *n == name).map(|(m, _)| *m)
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Debug)]
struct State {
    /// The vCPU that runs; `None` once every vCPU finished.
    current: Option<usize>,
    /// Live vCPUs (order is part of the seeded choice).
    live: Vec<usize>,
    /// Index of each vCPU in `live` (`usize::MAX` once finished).
    pos: Vec<usize>,
    /// Live vCPUs other than the current one, by scheduling key.
    ready: BTreeSet<(u64, usize)>,
    /// Each vCPU's key as of its last switch-out.
    keys: Vec<u64>,
    /// Added to a vCPU's modelled clock to make its key (time spent waiting counts as run).
    lag: Vec<u64>,
    /// The current vCPU switches to the vCPU furthest behind once its key passes this.
    limit: u64,
    rng: Rng,
}

impl State {
    fn limit_now(&self) -> u64 {
        self.ready
            .first()
            .map_or(u64::MAX, |&(k, _)| k.saturating_add(QUANTUM_NS))
    }

    /// A random live vCPU other than `me` (which must be live), `None` when alone.
    fn random_other(&mut self, me: usize) -> Option<usize> {
        let n = self.live.len() as u64;
        if n < 2 {
            return None;
        }
        let mine = self.pos.get(me).copied().unwrap_or(usize::MAX);
        let mut i = self.rng.below(n - 1) as usize;
        if i >= mine {
            i += 1;
        }
        self.live.get(i).copied()
    }

    fn switch(&mut self, me: usize, my_key: u64, next: usize) {
        if let Some(k) = self.keys.get_mut(me) {
            *k = my_key;
        }
        self.ready.insert((my_key, me));
        let next_key = self.keys.get(next).copied().unwrap_or(0);
        self.ready.remove(&(next_key, next));
        self.current = Some(next);
        self.limit = self.limit_now();
    }
}

/// Decides which vCPU runs (deterministic mode) and counts switches. `Sync`; in parallel mode
/// it decides nothing.
#[derive(Debug)]
pub struct Scheduler {
    mode: Mode,
    state: Mutex<State>,
    /// Per vCPU: modelled clock and, in parallel mode, pacing state.
    slots: Vec<Slot>,
    /// A scheduling point switches at random with probability 1 / `switch_every`.
    switch_every: u64,
    switches: AtomicU64,
    /// Parallel mode: times a vCPU yielded its thread to let a slower one catch up.
    paces: AtomicU64,
    /// Work of the current phase in all (0: no phase whose work is known).
    phase_total: AtomicU64,
}

/// One vCPU's scheduling state, on a cache line of its own: a vCPU writes its clock at every
/// charged event, and in parallel mode the others read it.
#[derive(Debug, Default)]
#[repr(align(64))]
struct Slot {
    /// Modelled clock (ns), kept current by the vCPU.
    clock: AtomicU64,
    /// Parallel mode: added to the clock to make the key (`u64::MAX` once finished).
    lag: AtomicU64,
    /// Parallel mode: the vCPU may run until its key passes this without looking again.
    limit: AtomicU64,
    /// Parallel mode: the vCPU is in a wait loop (it holds nobody back).
    waiting: AtomicBool,
    /// Work of the current phase this vCPU has done (the phase's unit).
    done: AtomicU64,
}

impl Scheduler {
    /// A scheduler for `vcpus` vCPUs; in deterministic mode vCPU 0 runs first.
    pub fn new(mode: Mode, vcpus: usize, seed: u64, switch_every: u64) -> Scheduler {
        let ready = (1..vcpus).map(|i| (0, i)).collect();
        let mut state = State {
            current: (vcpus > 0).then_some(0),
            live: (0..vcpus).collect(),
            pos: (0..vcpus).collect(),
            ready,
            keys: vec![0; vcpus],
            lag: vec![0; vcpus],
            limit: 0,
            rng: Rng::new(seed ^ 0x5EED_5C4E_D01E),
        };
        state.limit = state.limit_now();
        Scheduler {
            mode,
            state: Mutex::new(state),
            slots: (0..vcpus).map(|_| Slot::default()).collect(),
            switch_every: switch_every.max(1),
            switches: AtomicU64::new(0),
            paces: AtomicU64::new(0),
            phase_total: AtomicU64::new(0),
        }
    }

    /// Starts a phase of `total` units of work shared by the vCPUs (a boot's bytes to accept),
    /// whose progress they report with [`Scheduler::phase_progress`]. Parallel mode paces the
    /// vCPUs more loosely while much of it is left (see [`PARALLEL_HORIZON_DIVISOR`]).
    pub fn begin_phase(&self, total: u64) {
        for s in &self.slots {
            s.done.store(0, Ordering::Relaxed);
        }
        self.phase_total.store(total, Ordering::Release);
    }

    /// Ends the current phase: pacing goes back to the run-relative window.
    pub fn end_phase(&self) {
        self.phase_total.store(0, Ordering::Release);
    }

    /// `me` did `units` of the current phase's work (nothing when no phase runs).
    pub fn phase_progress(&self, me: usize, units: u64) {
        if self.phase_total.load(Ordering::Relaxed) == 0 {
            return;
        }
        if let Some(s) = self.slots.get(me) {
            // Only `me` writes its slot.
            let done = s.done.load(Ordering::Relaxed);
            s.done.store(done.saturating_add(units), Ordering::Relaxed);
        }
    }

    /// The extra pacing window of the current phase at the slowest clock `clock`: the modelled
    /// time the rest of the phase needs, estimated from the work done so far, divided by
    /// [`PARALLEL_HORIZON_DIVISOR`]; 0 without a phase, before any work and once it is done.
    fn horizon(&self, clock: u64) -> u64 {
        let total = self.phase_total.load(Ordering::Acquire);
        let done = self.slots.iter().fold(0u64, |d, s| {
            d.saturating_add(s.done.load(Ordering::Relaxed))
        });
        if total == 0 || done == 0 || done >= total {
            return 0;
        }
        let left = u128::from(clock) * u128::from(total - done) / u128::from(done);
        u64::try_from(left / u128::from(PARALLEL_HORIZON_DIVISOR)).unwrap_or(u64::MAX)
    }

    fn key(&self, i: usize) -> u64 {
        let lag = self
            .slots
            .get(i)
            .map_or(u64::MAX, |s| s.lag.load(Ordering::Relaxed));
        self.clock(i).saturating_add(lag)
    }

    /// The smallest key of the live vCPUs other than `me` that are not in a wait loop
    /// (`u64::MAX` when there is none).
    fn min_other_key(&self, me: usize) -> u64 {
        self.slots
            .iter()
            .enumerate()
            .filter(|&(i, s)| i != me && !s.waiting.load(Ordering::Relaxed))
            .map(|(_, s)| {
                s.clock
                    .load(Ordering::Relaxed)
                    .saturating_add(s.lag.load(Ordering::Relaxed))
            })
            .min()
            .unwrap_or(u64::MAX)
    }

    /// A scheduling point of `me` in parallel mode: paces `me` against the slowest live vCPU.
    fn parallel_point(&self, me: usize, wait: bool) {
        let key = self.key(me);
        let Some(slot) = self.slots.get(me) else {
            return;
        };
        if slot.waiting.load(Ordering::Relaxed) != wait {
            slot.waiting.store(wait, Ordering::Relaxed);
        }
        if wait {
            // A waiting vCPU's time passes too: it must not hold back those it waits for.
            let others = self.min_other_key(me);
            if others != u64::MAX && others > key {
                slot.lag.fetch_add(others - key, Ordering::Relaxed);
            }
            std::thread::yield_now();
            return;
        }
        let limit = slot.limit.load(Ordering::Relaxed);
        if key <= limit {
            return;
        }
        let mut spins = 0u32;
        loop {
            let others = self.min_other_key(me);
            let base = PARALLEL_QUANTUM_NS.max(others / PARALLEL_WINDOW_FRACTION);
            let window = base.max(self.horizon(others));
            let limit = others.saturating_add(window);
            if key <= limit {
                // Look again after `base` more at the latest: the horizon narrows as the
                // phase's work runs out.
                slot.limit
                    .store(limit.min(key.saturating_add(base)), Ordering::Relaxed);
                return;
            }
            self.paces.fetch_add(1, Ordering::Relaxed);
            spins += 1;
            if spins < PACE_SPINS {
                std::thread::yield_now();
            } else {
                // More threads than cores: let the slow vCPU's thread have one.
                std::thread::sleep(std::time::Duration::from_micros(20));
            }
        }
    }

    /// Parallel mode: times a vCPU waited for a slower one to catch up in modelled time.
    pub fn paces(&self) -> u64 {
        self.paces.load(Ordering::Relaxed)
    }

    /// The mode.
    pub fn mode(&self) -> Mode {
        self.mode
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Records `me`'s modelled clock (nanoseconds).
    pub fn set_clock(&self, me: usize, ns: u64) {
        if let Some(s) = self.slots.get(me) {
            s.clock.store(ns, Ordering::Relaxed);
        }
    }

    fn clock(&self, me: usize) -> u64 {
        self.slots
            .get(me)
            .map_or(0, |s| s.clock.load(Ordering::Relaxed))
    }

    /// The vCPU that runs now (deterministic mode); `None` once all finished.
    pub fn current(&self) -> Option<usize> {
        self.lock().current
    }

    /// A scheduling point of `me`, which must be the current vCPU. Returns true when `me` must
    /// suspend because another vCPU runs now. `wait` marks a step of a wait loop: `me` then
    /// always hands over (when another vCPU is live), and its key moves past the vCPU it hands
    /// over to, so that the vCPUs it waits for run before it is resumed. Always false in
    /// parallel mode.
    pub fn yield_point(&self, me: usize, wait: bool) -> bool {
        if self.mode == Mode::Parallel {
            self.parallel_point(me, wait);
            return false;
        }
        let clock = self.clock(me);
        let mut s = self.lock();
        let lag = s.lag.get(me).copied().unwrap_or(0);
        let mut key = clock.saturating_add(lag);
        let random = !wait && s.live.len() > 1 && s.rng.chance(1, self.switch_every);
        let next = if random {
            s.random_other(me)
        } else if wait || key > s.limit {
            s.ready.first().map(|&(_, i)| i)
        } else {
            None
        };
        let Some(next) = next else {
            return false;
        };
        if wait {
            // Waiting: resume after the vCPU taking over has run a quantum.
            let next_key = s.keys.get(next).copied().unwrap_or(0);
            let target = next_key.saturating_add(QUANTUM_NS);
            if target > key {
                if let Some(l) = s.lag.get_mut(me) {
                    *l = l.saturating_add(target - key);
                }
                key = target;
            }
        }
        s.switch(me, key, next);
        self.switches.fetch_add(1, Ordering::Relaxed);
        true
    }

    /// `me` is done: the vCPU furthest behind runs next, if any is live. In parallel mode, `me`
    /// stops holding the others back.
    pub fn finish(&self, me: usize) {
        if let Some(s) = self.slots.get(me) {
            s.lag.store(u64::MAX, Ordering::Relaxed);
        }
        let mut s = self.lock();
        let Some(&i) = s.pos.get(me) else {
            return;
        };
        if i == usize::MAX {
            return;
        }
        s.live.swap_remove(i);
        if let Some(&moved) = s.live.get(i) {
            s.pos[moved] = i;
        }
        s.pos[me] = usize::MAX;
        let key = s.keys.get(me).copied().unwrap_or(0);
        s.ready.remove(&(key, me));
        if s.current == Some(me) {
            s.current = s.ready.pop_first().map(|(_, i)| i);
            s.limit = s.limit_now();
            if s.current.is_some() {
                self.switches.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Switches so far (deterministic mode).
    pub fn switches(&self) -> u64 {
        self.switches.load(Ordering::Relaxed)
    }
}

/// A vCPU's way to hand over the machine: in deterministic mode the coroutine's yielder,
/// in parallel mode nothing (the OS schedules).
#[derive(Clone, Copy)]
pub struct Switch<'y>(Option<&'y Yielder<(), ()>>);

impl fmt::Debug for Switch<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.is_some() {
            "Switch(coroutine)"
        } else {
            "Switch(thread)"
        })
    }
}

impl Switch<'_> {
    /// The switch of an OS thread (parallel mode).
    pub const THREAD: Switch<'static> = Switch(None);

    /// A scheduling point of vCPU `me`: in deterministic mode, suspends when `sched` says
    /// another vCPU runs now; in parallel mode, paces `me` (see the module docs).
    pub fn point(&self, sched: &Scheduler, me: usize, wait: bool) {
        match self.0 {
            Some(y) => {
                if sched.yield_point(me, wait) {
                    y.suspend(());
                }
            }
            None => {
                sched.yield_point(me, wait);
            }
        }
    }
}

type Coro<'a, R> = ScopedCoroutine<'a, (), (), R, DefaultStack>;
type CoroRef<'s, R> = ScopedCoroutineRef<'s, (), (), R, DefaultStack>;

/// Opens the scope of every coroutine (nested), then runs `body` over all of them.
fn in_scopes<R, T>(
    mut coros: Vec<Coro<'_, R>>,
    mut refs: Vec<CoroRef<'_, R>>,
    body: impl FnOnce(&mut [CoroRef<'_, R>]) -> T,
) -> T {
    match coros.pop() {
        None => {
            refs.reverse();
            body(&mut refs)
        }
        Some(c) => c.scope(move |r| {
            let mut refs = refs;
            refs.push(r);
            in_scopes(coros, refs, body)
        }),
    }
}

/// Why the deterministic run could not start.
#[derive(Debug, thiserror::Error)]
#[error("no stack for a vCPU coroutine: {0}")]
pub struct StackError(#[from] std::io::Error);

/// Runs `body(id, switch)` for every vCPU `id` in `0..vcpus` as coroutines on this thread,
/// switching as `sched` (deterministic mode) decides. Returns each body's result, `None` for a
/// body that panicked.
///
/// # Errors
/// [`StackError`] when a coroutine stack cannot be mapped.
pub fn run_coroutines<R, F>(
    sched: &Scheduler,
    vcpus: usize,
    body: F,
) -> Result<Vec<Option<R>>, StackError>
where
    F: for<'y> Fn(usize, Switch<'y>) -> R,
{
    let body = &body;
    let mut coros = Vec::with_capacity(vcpus);
    for id in 0..vcpus {
        let stack = DefaultStack::new(COROUTINE_STACK)?;
        coros.push(Coro::with_stack(stack, move |y: &Yielder<(), ()>, ()| {
            body(id, Switch(Some(y)))
        }));
    }
    let mut out: Vec<Option<R>> = (0..vcpus).map(|_| None).collect();
    in_scopes(coros, Vec::with_capacity(vcpus), |refs| {
        while let Some(cur) = sched.current() {
            let Some(co) = refs.get_mut(cur) else {
                sched.finish(cur);
                continue;
            };
            match catch_unwind(AssertUnwindSafe(|| co.as_mut().resume(()))) {
                Ok(CoroutineResult::Yield(())) => {}
                Ok(CoroutineResult::Return(r)) => {
                    if let Some(slot) = out.get_mut(cur) {
                        *slot = Some(r);
                    }
                    sched.finish(cur);
                }
                Err(_) => sched.finish(cur),
            }
        }
    });
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trace(seed: u64) -> Vec<usize> {
        let s = Scheduler::new(Mode::Deterministic, 4, seed, 2);
        let log = Mutex::new(Vec::new());
        let done = run_coroutines(&s, 4, |me, sw| {
            for _ in 0..50 {
                log.lock().unwrap().push(me);
                sw.point(&s, me, false);
            }
            me
        })
        .unwrap();
        assert_eq!(done, vec![Some(0), Some(1), Some(2), Some(3)]);
        log.into_inner().unwrap()
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

    /// vCPUs whose steps cost different modelled time still advance their clocks together: the
    /// vCPU furthest behind runs once another is a quantum ahead.
    #[test]
    fn clocks_advance_together() {
        let n = 8;
        let s = Scheduler::new(Mode::Deterministic, n, 3, 1_000_000);
        let spread = Mutex::new(0u64);
        run_coroutines(&s, n, |me, sw| {
            let step = 1_000 * (me as u64 + 1);
            let mut clock = 0;
            while clock < 50_000_000 {
                clock += step;
                s.set_clock(me, clock);
                let lo = (0..n).map(|i| s.clock(i)).min().unwrap_or(0);
                let mut m = spread.lock().unwrap();
                *m = (*m).max(clock - lo);
                drop(m);
                sw.point(&s, me, false);
            }
        })
        .unwrap();
        assert!(spread.into_inner().unwrap() <= QUANTUM_NS + 8_000);
    }

    /// A vCPU in a wait loop lets the one it waits for finish, whatever the seed.
    #[test]
    fn waiting_lets_the_others_run() {
        let s = Scheduler::new(Mode::Deterministic, 3, 5, 4);
        let flag = AtomicU64::new(0);
        let r = run_coroutines(&s, 3, |me, sw| {
            if me == 2 {
                for i in 0..1000 {
                    s.set_clock(me, i * 10_000);
                    sw.point(&s, me, false);
                }
                flag.store(1, Ordering::Release);
            } else {
                while flag.load(Ordering::Acquire) == 0 {
                    sw.point(&s, me, true);
                }
            }
        })
        .unwrap();
        assert!(r.iter().all(Option::is_some));
    }

    /// Parallel mode: threads of different speeds keep their modelled clocks within the window
    /// (a quantum, or 0.5% of the slowest clock once that is more; plus one step) of each other,
    /// and a finished vCPU holds nobody back.
    #[test]
    fn parallel_threads_are_paced_on_modelled_time() {
        let n = 4;
        let s = Scheduler::new(Mode::Parallel, n, 1, 4);
        let beyond = AtomicU64::new(0);
        let widest = AtomicU64::new(0);
        std::thread::scope(|scope| {
            for me in 0..n {
                let (s, beyond, widest) = (&s, &beyond, &widest);
                scope.spawn(move || {
                    let step = 1_000 * (me as u64 + 1);
                    // Long enough that the window grows past the quantum.
                    let total = if me == 0 { 1_000_000 } else { 600_000_000 };
                    let mut clock = 0;
                    while clock < total {
                        clock += 10 * step;
                        s.set_clock(me, clock);
                        Switch::THREAD.point(s, me, false);
                        let lo = (0..n).map(|i| s.key(i)).min().unwrap_or(0);
                        let window = PARALLEL_QUANTUM_NS.max(lo / PARALLEL_WINDOW_FRACTION);
                        let spread = clock.saturating_sub(lo);
                        widest.fetch_max(spread, Ordering::Relaxed);
                        if spread > window + 10 * step {
                            beyond.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    s.finish(me);
                });
            }
        });
        assert_eq!(beyond.into_inner(), 0);
        // The window did grow: clocks drifted further apart than one quantum.
        assert!(widest.into_inner() > PARALLEL_QUANTUM_NS);
    }

    /// Parallel mode during a phase whose work is known: a vCPU whose thread runs faster may
    /// drift further ahead than the run-relative window while much work is left, and the
    /// vCPUs still end the phase within twice that window (plus one unit) of each other, since
    /// the window closes as the shared work runs out (a vCPU looks again after one window).
    #[test]
    fn a_phase_lets_clocks_drift_while_work_is_left_and_ends_balanced() {
        const UNIT_NS: u64 = 200_000;
        const UNITS: u64 = 10_000;
        let n = 2;
        let s = Scheduler::new(Mode::Parallel, n, 1, 4);
        s.begin_phase(UNITS);
        let next = AtomicU64::new(0);
        let widest = AtomicU64::new(0);
        let clocks: Vec<u64> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..n)
                .map(|me| {
                    let (s, next, widest) = (&s, &next, &widest);
                    scope.spawn(move || {
                        let mut clock = 0;
                        while next.fetch_add(1, Ordering::Relaxed) < UNITS {
                            // vCPU 0's thread is slower: it spins longer per unit.
                            for _ in 0..if me == 0 { 2_000 } else { 500 } {
                                std::hint::spin_loop();
                            }
                            clock += UNIT_NS;
                            s.set_clock(me, clock);
                            s.phase_progress(me, 1);
                            Switch::THREAD.point(s, me, false);
                            let lo = (0..n).map(|i| s.key(i)).min().unwrap_or(0);
                            widest.fetch_max(clock.saturating_sub(lo), Ordering::Relaxed);
                        }
                        s.finish(me);
                        clock
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        s.end_phase();
        let (lo, hi) = (clocks[0].min(clocks[1]), clocks[0].max(clocks[1]));
        let window = PARALLEL_QUANTUM_NS.max(lo / PARALLEL_WINDOW_FRACTION);
        assert!(
            hi - lo <= 2 * window + UNIT_NS,
            "clocks {clocks:?} end {} apart, window {window}",
            hi - lo
        );
        // Somewhere in the phase the faster vCPU was further ahead than that window.
        assert!(widest.into_inner() > 2 * window);
    }

    #[test]
    fn a_panicking_vcpu_does_not_stop_the_others() {
        let s = Scheduler::new(Mode::Deterministic, 3, 1, 2);
        let r = run_coroutines(&s, 3, |me, sw| {
            sw.point(&s, me, false);
            if me == 1 {
                panic!("vCPU 1 fails");
            }
            sw.point(&s, me, false);
            me
        })
        .unwrap();
        assert_eq!(r, vec![Some(0), None, Some(2)]);
    }
}
