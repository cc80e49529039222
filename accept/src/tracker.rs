//! The lazy-accept tracker: which units of memory are still unaccepted, and acceptance of them
//! on demand from many vCPUs at once, each unit exactly once.
//!
//! Every unit (the unaccepted table's unit, 2 MiB in practice) has one of four states, two bits
//! packed 32 to a word in caller-provided storage:
//!
//! | state | meaning |
//! |---|---|
//! | [`UnitState::Accepted`] (0) | usable; zeroed storage means "everything accepted" |
//! | [`UnitState::Unaccepted`] (1) | the table's bit is set; nobody is accepting it |
//! | [`UnitState::Accepting`] (2) | one vCPU has claimed it (a compare-and-swap) and is accepting it |
//! | [`UnitState::Failed`] (3) | an acceptance stopped part way; the unit is never accepted again |
//!
//! A vCPU that needs a unit another vCPU is accepting waits for it (spinning a bounded number of
//! times through [`CpuHooks::relax`]) instead of accepting it too, and gets
//! [`TrackerError::WaitTimeout`] rather than hanging. There is no lock: nothing an interrupted
//! context holds can block an exception handler, and a handler that finds its *own* vCPU's
//! interrupted context accepting the unit gets [`TrackerError::Reentrant`] at once (each vCPU
//! records the unit it is accepting in its own in-flight slot; the slot holds the innermost
//! acceptance, so a handler nested two deep on a unit its outermost context claimed ends in the
//! bounded wait instead).
//!
//! A request claims every consecutive unaccepted unit it covers (a *run*) and hands the run to
//! the shared [`Acceptor`] in one go, as Linux hands each run of set bits to one
//! `arch_accept_memory()`: the acceptor takes the largest level the run's alignment and length
//! allow, so 512 set 2M units on a 1G boundary are one 1G ACCEPT where the module supports it.
//! When the acceptor fails, the units before the failing page are accepted, the units after it
//! go back to `Unaccepted`, and so does the failing unit when nothing of it was accepted; a unit
//! accepted part way is marked `Failed` and every later request for it fails with
//! [`TrackerError::UnitFailed`]. A page the module reports as accepted already
//! (`PAGE_ALREADY_ACCEPTED`) was made private by someone else (a conversion of memory the
//! tracker still counted as unaccepted): it is private and usable, so by default the unit is
//! accepted around it instead of failing ([`LazyTracker::already_accepted_is_private`]).
//!
//! [`LazyTracker::accept_range`] follows Linux `accept_memory()`
//! (`drivers/firmware/efi/unaccepted_memory.c`): memory outside the table is accepted already,
//! and a range that ends on a unit boundary also accepts the next unit, because
//! `load_unaligned_zeropad()` may read a few bytes past the end of a page. A zero-size request
//! accepts the unit holding its address, as Linux's does.
//!
//! Deliberate differences from Linux, each pinned by `cargo xtask linux`:
//! - Linux serializes every acceptance with one global spin lock taken with interrupts off and
//!   waits without bound for an overlapping caller; here each unit is claimed by a
//!   compare-and-swap, a vCPU only waits for the units another vCPU claimed, and the wait is
//!   bounded ([`TrackerConfig::max_wait_spins`]). The TDCALLs made are the same.
//! - Linux's `range_contains_unaccepted_memory()` steps by one unit from an unaligned start and
//!   can miss the last unit (and reports nothing for an unaligned zero-size range);
//!   [`LazyTracker::range_contains_unaccepted`] reports exactly the units
//!   [`LazyTracker::accept_range`] would accept, so a caller never skips needed acceptance.
//! - Linux panics on `PAGE_ALREADY_ACCEPTED`; see above.
//!
//! Memory a conversion is about to change must be accepted first, as in Linux, where every page
//! is accepted before it is handed out: [`LazyTracker::prepare_conversion`].
//!
//! Requirements on the embedder: the state words and in-flight slots live in accepted memory;
//! the interrupt-masking hook masks what could interrupt the vCPU between claiming a unit and
//! publishing it; NMI handlers do not touch lazily accepted memory (as in Linux).
//!
//! The tracker does not read the table after construction and does not change it: a kernel that
//! wants the table updated writes it back from [`LazyTracker::unit_state`].

use core::fmt;
use core::sync::atomic::{AtomicU64, Ordering};

use crate::abi::{AddrError, Gpa, GpaRange};
use crate::acceptor::{AcceptError, Acceptor};
use crate::tdcall::Tdcall;
use crate::unaccepted::{TableError, UnacceptedTable, MIN_UNIT_SIZE};

/// Default bound on wait iterations for a unit another vCPU is accepting.
///
/// A 2M ACCEPT zeroes 512 pages and may take the host an EPT-violation exit and an AUG first:
/// well under a millisecond on an idle host, tens of milliseconds under heavy load. 2^26 relax
/// iterations (PAUSE is 40 to 140 cycles) is on the order of seconds: far beyond any honest
/// acceptance, short of a hang.
pub const DEFAULT_MAX_WAIT_SPINS: u64 = 1 << 26;

/// Units per state word (two bits each).
pub const UNITS_PER_WORD: u64 = 32;

/// Most units one run claims (the in-flight slot packs the run's length in 23 bits).
pub const MAX_RUN_UNITS: u64 = (1 << 23) - 1;

/// Bits of an in-flight slot that hold the run's first unit plus one.
const SLOT_UNIT_BITS: u32 = 41;

/// An in-flight slot value: the run `[first, first + len)`.
const fn slot_value(first: u64, len: u64) -> u64 {
    (len << SLOT_UNIT_BITS) | (first + 1)
}

/// True when the in-flight slot value `slot` holds `unit`.
const fn slot_holds(slot: u64, unit: u64) -> bool {
    let first1 = slot & ((1 << SLOT_UNIT_BITS) - 1);
    let len = slot >> SLOT_UNIT_BITS;
    first1 != 0 && unit + 1 >= first1 && unit + 1 < first1 + len
}

/// The state of one unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum UnitState {
    /// Accepted (or never unaccepted).
    Accepted = 0,
    /// Marked unaccepted; nobody has claimed it.
    Unaccepted = 1,
    /// Claimed by a vCPU that is accepting it now.
    Accepting = 2,
    /// An acceptance failed part way; it is never retried.
    Failed = 3,
}

impl UnitState {
    fn from_bits(bits: u64) -> UnitState {
        match bits & 3 {
            0 => UnitState::Accepted,
            1 => UnitState::Unaccepted,
            2 => UnitState::Accepting,
            _ => UnitState::Failed,
        }
    }
}

/// A 64-bit word of unit states. Implemented for [`AtomicU64`]; the indirection lets tests run
/// the tracker under a model checker's atomics.
pub trait StateWord: Sync {
    /// Atomic load.
    fn load(&self, order: Ordering) -> u64;
    /// Atomic store.
    fn store(&self, value: u64, order: Ordering);
    /// Atomic compare-and-exchange (may fail spuriously).
    ///
    /// # Errors
    /// The current value when it is not `current` (or spuriously).
    fn compare_exchange_weak(
        &self,
        current: u64,
        new: u64,
        success: Ordering,
        failure: Ordering,
    ) -> Result<u64, u64>;
}

impl StateWord for AtomicU64 {
    fn load(&self, order: Ordering) -> u64 {
        AtomicU64::load(self, order)
    }
    fn store(&self, value: u64, order: Ordering) {
        AtomicU64::store(self, value, order)
    }
    fn compare_exchange_weak(
        &self,
        current: u64,
        new: u64,
        success: Ordering,
        failure: Ordering,
    ) -> Result<u64, u64> {
        AtomicU64::compare_exchange_weak(self, current, new, success, failure)
    }
}

/// What the tracker needs from the vCPU it runs on.
///
/// A kernel implements it with its own interrupt guard: asterinas ostd's `disable_local()`
/// returns a `DisabledLocalIrqGuard`, a kernel on the `x86_64` crate can save RFLAGS, `cli`, and
/// restore RFLAGS when its guard drops.
pub trait CpuHooks {
    /// Keeps this vCPU's interrupts masked until it is dropped (dropping restores the state
    /// found, so guards nest).
    type IrqGuard;

    /// Masks interrupts on this vCPU until the guard drops. The tracker holds the guard while
    /// this vCPU owns a unit it claimed: an interrupt handler on this vCPU must not find such a
    /// unit, or it would wait for itself.
    fn mask_interrupts(&mut self) -> Self::IrqGuard;

    /// One step of waiting for another vCPU (PAUSE by default).
    fn relax(&mut self) {
        core::hint::spin_loop();
    }
}

/// Hooks for a context that runs with interrupts already masked (an exception handler, early
/// firmware) or has none: masking does nothing, waiting is PAUSE.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoInterrupts;

impl CpuHooks for NoInterrupts {
    type IrqGuard = ();
    fn mask_interrupts(&mut self) {}
}

impl<H: CpuHooks + ?Sized> CpuHooks for &mut H {
    type IrqGuard = H::IrqGuard;
    fn mask_interrupts(&mut self) -> H::IrqGuard {
        (**self).mask_interrupts()
    }
    fn relax(&mut self) {
        (**self).relax()
    }
}

/// Tracker tuning.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TrackerConfig {
    /// Wait iterations for a unit another vCPU is accepting before [`TrackerError::WaitTimeout`].
    pub max_wait_spins: u64,
}

impl Default for TrackerConfig {
    fn default() -> Self {
        TrackerConfig {
            max_wait_spins: DEFAULT_MAX_WAIT_SPINS,
        }
    }
}

/// Why the tracker could not be built or a request could not be served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrackerError {
    /// The table (or the geometry given) is unusable.
    Table(TableError),
    /// The state storage has fewer words than the units need.
    Storage {
        /// Words needed.
        needed: usize,
        /// Words given.
        got: usize,
    },
    /// The vCPU index has no in-flight slot.
    NoSlot {
        /// The index given.
        vcpu: usize,
    },
    /// An address computation overflowed.
    Addr(AddrError),
    /// Another vCPU kept the unit in `Accepting` past the wait bound.
    WaitTimeout {
        /// Unit index.
        unit: u64,
        /// Its first GPA.
        gpa: Gpa,
    },
    /// This vCPU's interrupted context is accepting the unit: waiting would never end.
    Reentrant {
        /// Unit index.
        unit: u64,
        /// Its first GPA.
        gpa: Gpa,
    },
    /// An earlier acceptance of the unit failed part way; it is not retried.
    UnitFailed {
        /// Unit index.
        unit: u64,
        /// Its first GPA.
        gpa: Gpa,
    },
    /// Accepting the unit failed now.
    Accept {
        /// Unit index.
        unit: u64,
        /// The acceptor's error.
        error: AcceptError,
    },
}

impl fmt::Display for TrackerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TrackerError::Table(e) => write!(f, "unusable unaccepted table: {e}"),
            TrackerError::Storage { needed, got } => {
                write!(f, "state storage has {got} words, {needed} needed")
            }
            TrackerError::NoSlot { vcpu } => write!(f, "vCPU {vcpu} has no in-flight slot"),
            TrackerError::Addr(e) => write!(f, "address error: {e}"),
            TrackerError::WaitTimeout { unit, gpa } => {
                write!(f, "timed out waiting for unit {unit} at {gpa}")
            }
            TrackerError::Reentrant { unit, gpa } => write!(
                f,
                "unit {unit} at {gpa} is being accepted by this vCPU's interrupted context"
            ),
            TrackerError::UnitFailed { unit, gpa } => {
                write!(f, "unit {unit} at {gpa} failed an earlier acceptance")
            }
            TrackerError::Accept { unit, error } => {
                write!(f, "accepting unit {unit} failed: {error}")
            }
        }
    }
}

/// A snapshot of the tracker's counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TrackerStats {
    /// Bytes this tracker accepted.
    pub accepted_bytes: u64,
    /// Bytes still not accepted (unaccepted, being accepted, or failed).
    pub remaining_bytes: u64,
    /// Units this tracker accepted.
    pub units_accepted: u64,
    /// Requests that found a unit being accepted by another vCPU and waited for it.
    pub waits: u64,
}

/// The lazy-accept tracker. `Sync`: every vCPU shares one, each with its own [`Tdcall`], hooks
/// and vCPU index.
///
/// # Examples
///
/// Four 2 MiB units above 1 GiB, all unaccepted; an allocation of 8 KiB in the second unit
/// accepts that unit only, once.
///
/// ```
/// use core::sync::atomic::AtomicU64;
/// use tdmem_accept::acceptor::{AcceptPolicy, Acceptor};
/// use tdmem_accept::testing::FakeModule;
/// use tdmem_accept::tracker::{
///     words_needed, LazyTracker, NoInterrupts, TrackerConfig, UnitState,
/// };
/// use tdmem_accept::Gpaw;
///
/// const UNIT: u64 = 2 << 20;
/// let acceptor = Acceptor::new(Gpaw::Bits48, AcceptPolicy::default());
/// // Storage the tracker borrows for its lifetime: static or allocated once in a kernel.
/// let words: Vec<AtomicU64> = (0..words_needed(4)).map(|_| AtomicU64::new(0)).collect();
/// let slots = [AtomicU64::new(0)]; // one per vCPU
/// let tracker =
///     LazyTracker::new(&acceptor, 1 << 30, UNIT, 4, &words, &slots, TrackerConfig::default())?;
/// (0..4).for_each(|u| tracker.mark_unaccepted(u));
///
/// let mut module = FakeModule::new();
/// let start = (1 << 30) + UNIT + 0x1000;
/// tracker.accept_range(0, &mut module, &mut NoInterrupts, start, start + 0x2000)?;
/// tracker.accept_range(0, &mut module, &mut NoInterrupts, start, start + 0x2000)?;
///
/// assert_eq!(tracker.unit_state(1), UnitState::Accepted);
/// assert_eq!(tracker.unit_state(2), UnitState::Unaccepted);
/// assert_eq!(module.accept_calls().count(), 1, "one 2 MiB ACCEPT, once");
/// assert_eq!(tracker.remaining_bytes(), 3 * UNIT);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct LazyTracker<'a, W: StateWord = AtomicU64> {
    acceptor: &'a Acceptor,
    phys_base: u64,
    unit_size: u64,
    units: u64,
    words: &'a [W],
    inflight: &'a [AtomicU64],
    config: TrackerConfig,
    tolerate_already_accepted: bool,
    accepted_bytes: AtomicU64,
    remaining_bytes: AtomicU64,
    units_accepted: AtomicU64,
    waits: AtomicU64,
}

impl<W: StateWord> fmt::Debug for LazyTracker<'_, W> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LazyTracker")
            .field("phys_base", &format_args!("{:#x}", self.phys_base))
            .field("unit_size", &format_args!("{:#x}", self.unit_size))
            .field("units", &self.units)
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

/// Words of state storage needed for `units` units.
pub const fn words_needed(units: u64) -> usize {
    units.div_ceil(UNITS_PER_WORD) as usize
}

fn shift_of(unit: u64) -> u32 {
    ((unit % UNITS_PER_WORD) * 2) as u32
}

impl<'a, W: StateWord> LazyTracker<'a, W> {
    /// A tracker for `units` units of `unit_size` bytes from `phys_base`, all accepted, with its
    /// states in `words` (at least [`words_needed`]`(units)`, overwritten) and one in-flight slot
    /// per vCPU in `inflight` (overwritten). Mark units unaccepted with
    /// [`LazyTracker::mark_unaccepted`] before sharing it.
    ///
    /// # Errors
    /// [`TrackerError::Table`] for a bad unit size or base, or a span past 2^52;
    /// [`TrackerError::Storage`] when `words` is too short.
    pub fn new(
        acceptor: &'a Acceptor,
        phys_base: u64,
        unit_size: u64,
        units: u64,
        words: &'a [W],
        inflight: &'a [AtomicU64],
        config: TrackerConfig,
    ) -> Result<LazyTracker<'a, W>, TrackerError> {
        let unit32 = u32::try_from(unit_size)
            .map_err(|_| TrackerError::Table(TableError::UnitSize(u32::MAX)))?;
        if !unit32.is_power_of_two() || unit32 < MIN_UNIT_SIZE {
            return Err(TrackerError::Table(TableError::UnitSize(unit32)));
        }
        if phys_base % u64::from(MIN_UNIT_SIZE) != 0 || phys_base >> Gpa::MAX_BITS != 0 {
            return Err(TrackerError::Table(TableError::PhysBase(phys_base)));
        }
        units
            .checked_mul(unit_size)
            .and_then(|b| phys_base.checked_add(b))
            .filter(|&end| end <= 1 << Gpa::MAX_BITS)
            .ok_or(TrackerError::Table(TableError::Overflow))?;
        let needed = words_needed(units);
        let words = words.get(..needed).ok_or(TrackerError::Storage {
            needed,
            got: words.len(),
        })?;
        for w in words {
            w.store(0, Ordering::Relaxed);
        }
        for s in inflight {
            s.store(0, Ordering::Relaxed);
        }
        Ok(LazyTracker {
            acceptor,
            phys_base,
            unit_size,
            units,
            words,
            inflight,
            config,
            tolerate_already_accepted: true,
            accepted_bytes: AtomicU64::new(0),
            remaining_bytes: AtomicU64::new(0),
            units_accepted: AtomicU64::new(0),
            waits: AtomicU64::new(0),
        })
    }

    /// A tracker whose initial state is `table`'s bitmap.
    ///
    /// # Errors
    /// As [`LazyTracker::new`].
    pub fn from_table(
        acceptor: &'a Acceptor,
        table: &UnacceptedTable<'_>,
        words: &'a [W],
        inflight: &'a [AtomicU64],
        config: TrackerConfig,
    ) -> Result<LazyTracker<'a, W>, TrackerError> {
        let t = LazyTracker::new(
            acceptor,
            table.phys_base(),
            table.unit_size(),
            table.units(),
            words,
            inflight,
            config,
        )?;
        for (byte_index, &byte) in table.bitmap().iter().enumerate() {
            for bit in 0..8 {
                if byte & (1 << bit) != 0 {
                    t.mark_unaccepted(byte_index as u64 * 8 + bit);
                }
            }
        }
        Ok(t)
    }

    /// Whether a page the module reports as accepted already counts as accepted (true, the
    /// default: only a guest acceptance makes a page accepted, so the page is private and
    /// usable) or fails the unit (false: Linux, which panics).
    #[must_use]
    pub fn already_accepted_is_private(mut self, yes: bool) -> Self {
        self.tolerate_already_accepted = yes;
        self
    }

    /// Marks an accepted unit unaccepted (construction time; a no-op for other states or an
    /// index past the end).
    pub fn mark_unaccepted(&self, unit: u64) {
        if self.transition(unit, UnitState::Accepted, UnitState::Unaccepted) {
            self.remaining_bytes
                .fetch_add(self.unit_size, Ordering::Relaxed);
        }
    }

    /// The acceptor used for every unit.
    pub fn acceptor(&self) -> &'a Acceptor {
        self.acceptor
    }

    /// GPA of unit 0.
    pub fn phys_base(&self) -> u64 {
        self.phys_base
    }

    /// Bytes per unit.
    pub fn unit_size(&self) -> u64 {
        self.unit_size
    }

    /// Number of units.
    pub fn units(&self) -> u64 {
        self.units
    }

    /// One past the last tracked GPA.
    pub fn end(&self) -> u64 {
        self.phys_base + self.units * self.unit_size
    }

    /// The unit holding `gpa`, `None` outside the tracked span (memory there is accepted).
    pub fn unit_of(&self, gpa: u64) -> Option<u64> {
        if gpa < self.phys_base || gpa >= self.end() {
            return None;
        }
        Some((gpa - self.phys_base) / self.unit_size)
    }

    /// The GPA range of unit `unit`.
    ///
    /// # Errors
    /// [`TrackerError::Addr`] for an index past the end.
    pub fn unit_range(&self, unit: u64) -> Result<GpaRange, TrackerError> {
        if unit >= self.units {
            return Err(TrackerError::Addr(AddrError::Overflow));
        }
        // Within the span validated by `new`.
        let start = self.phys_base + unit * self.unit_size;
        GpaRange::from_len(start, self.unit_size).map_err(TrackerError::Addr)
    }

    /// The state of unit `unit`; [`UnitState::Accepted`] past the end.
    pub fn unit_state(&self, unit: u64) -> UnitState {
        self.word(unit).map_or(UnitState::Accepted, |w| {
            UnitState::from_bits(w.load(Ordering::Acquire) >> shift_of(unit))
        })
    }

    /// The state of the unit holding `gpa`; [`UnitState::Accepted`] outside the tracked span.
    pub fn state_of(&self, gpa: u64) -> UnitState {
        self.unit_of(gpa)
            .map_or(UnitState::Accepted, |u| self.unit_state(u))
    }

    /// Bytes this tracker has accepted.
    pub fn accepted_bytes(&self) -> u64 {
        self.accepted_bytes.load(Ordering::Relaxed)
    }

    /// Bytes not accepted yet.
    pub fn remaining_bytes(&self) -> u64 {
        self.remaining_bytes.load(Ordering::Relaxed)
    }

    /// All counters.
    pub fn stats(&self) -> TrackerStats {
        TrackerStats {
            accepted_bytes: self.accepted_bytes(),
            remaining_bytes: self.remaining_bytes(),
            units_accepted: self.units_accepted.load(Ordering::Relaxed),
            waits: self.waits.load(Ordering::Relaxed),
        }
    }

    /// True when `[start, end)`, or its guard unit when `end` is unit aligned (as
    /// [`LazyTracker::accept_range`] counts it), overlaps a unit that is not accepted. A
    /// zero-size range checks the unit holding `start`.
    pub fn range_contains_unaccepted(&self, start: u64, end: u64) -> bool {
        match self.unit_span(start, end, true) {
            Some((first, past)) => (first..past).any(|u| self.unit_state(u) != UnitState::Accepted),
            None => false,
        }
    }

    fn word(&self, unit: u64) -> Option<&W> {
        if unit >= self.units {
            return None;
        }
        self.words.get((unit / UNITS_PER_WORD) as usize)
    }

    /// CAS unit `unit` from `from` to `to`; false when it was not in `from`.
    fn transition(&self, unit: u64, from: UnitState, to: UnitState) -> bool {
        let Some(w) = self.word(unit) else {
            return false;
        };
        let shift = shift_of(unit);
        let mut cur = w.load(Ordering::Relaxed);
        loop {
            if UnitState::from_bits(cur >> shift) != from {
                return false;
            }
            let new = (cur & !(3 << shift)) | ((to as u64) << shift);
            match w.compare_exchange_weak(cur, new, Ordering::AcqRel, Ordering::Relaxed) {
                Ok(_) => return true,
                Err(now) => cur = now,
            }
        }
    }

    /// Units overlapping `[start, end)` as `[first, past)`, with Linux's guard unit when
    /// `guard` and `end` is unit aligned; `None` when nothing is tracked there. An empty range
    /// covers the unit holding `start` (with `guard`, the unit at an aligned `start`).
    fn unit_span(&self, start: u64, end: u64, guard: bool) -> Option<(u64, u64)> {
        // A range ending exactly at `phys_base` still has its guard unit (unit 0).
        if start > end || end < self.phys_base || start >= self.end() {
            return None;
        }
        let start = start.max(self.phys_base) - self.phys_base;
        let mut end = end.min(self.end()) - self.phys_base;
        if guard && end % self.unit_size == 0 {
            end = end.saturating_add(self.unit_size);
        }
        let first = start / self.unit_size;
        let past = end.div_ceil(self.unit_size).min(self.units);
        Some((first, past))
    }

    /// Accepts every unaccepted unit overlapping `[start, end)` (byte addresses, any alignment),
    /// plus the next unit when `end` is unit aligned, waiting for units other vCPUs are
    /// accepting. Each run of consecutive unaccepted units is accepted at once, at the largest
    /// levels it allows. Memory outside the tracked span needs nothing. `vcpu` is this vCPU's
    /// index into the in-flight slots.
    ///
    /// # Errors
    /// The first unit that could not be made accepted stops the call: see [`TrackerError`].
    pub fn accept_range<T: Tdcall + ?Sized, H: CpuHooks + ?Sized>(
        &self,
        vcpu: usize,
        tdcall: &mut T,
        hooks: &mut H,
        start: u64,
        end: u64,
    ) -> Result<(), TrackerError> {
        let Some((first, past)) = self.unit_span(start, end, true) else {
            return Ok(());
        };
        self.accept_units(vcpu, tdcall, hooks, first, past)
    }

    /// Accepts every unit `range` overlaps (no guard unit), before the range is converted:
    /// a conversion must never meet a page the tracker would accept later (Linux accepts every
    /// page before handing it out, so its conversions never do).
    ///
    /// # Errors
    /// As [`LazyTracker::accept_range`].
    pub fn prepare_conversion<T: Tdcall + ?Sized, H: CpuHooks + ?Sized>(
        &self,
        vcpu: usize,
        tdcall: &mut T,
        hooks: &mut H,
        range: GpaRange,
    ) -> Result<(), TrackerError> {
        let Some((first, past)) =
            self.unit_span(range.start().as_u64(), range.end().as_u64(), false)
        else {
            return Ok(());
        };
        self.accept_units(vcpu, tdcall, hooks, first, past)
    }

    fn accept_units<T: Tdcall + ?Sized, H: CpuHooks + ?Sized>(
        &self,
        vcpu: usize,
        tdcall: &mut T,
        hooks: &mut H,
        first: u64,
        past: u64,
    ) -> Result<(), TrackerError> {
        let mut unit = first;
        while unit < past {
            unit = self.accept_run(vcpu, tdcall, hooks, unit, past)?;
        }
        Ok(())
    }

    /// Makes unit `unit` accepted: accepts it if it is unaccepted, waits if another vCPU is
    /// accepting it, returns at once if it is accepted (or past the end).
    ///
    /// # Errors
    /// [`TrackerError::NoSlot`], [`TrackerError::Reentrant`], [`TrackerError::WaitTimeout`],
    /// [`TrackerError::UnitFailed`] or [`TrackerError::Accept`].
    pub fn accept_unit<T: Tdcall + ?Sized, H: CpuHooks + ?Sized>(
        &self,
        vcpu: usize,
        tdcall: &mut T,
        hooks: &mut H,
        unit: u64,
    ) -> Result<(), TrackerError> {
        self.accept_run(vcpu, tdcall, hooks, unit, unit.saturating_add(1))
            .map(|_| ())
    }

    /// Makes `unit` accepted; when it is unaccepted, claims with it the unaccepted units that
    /// follow it below `past` and accepts them together. Returns the first unit not handled.
    fn accept_run<T: Tdcall + ?Sized, H: CpuHooks + ?Sized>(
        &self,
        vcpu: usize,
        tdcall: &mut T,
        hooks: &mut H,
        unit: u64,
        past: u64,
    ) -> Result<u64, TrackerError> {
        let slot = self
            .inflight
            .get(vcpu)
            .ok_or(TrackerError::NoSlot { vcpu })?;
        let next = unit.saturating_add(1);
        let mut spins = 0u64;
        let mut waited = false;
        loop {
            match self.unit_state(unit) {
                UnitState::Accepted => return Ok(next),
                UnitState::Failed => {
                    return Err(TrackerError::UnitFailed {
                        unit,
                        gpa: self.unit_gpa(unit),
                    })
                }
                UnitState::Unaccepted => {
                    let irq = hooks.mask_interrupts();
                    if self.transition(unit, UnitState::Unaccepted, UnitState::Accepting) {
                        let mut end = next;
                        while end < past
                            && end - unit < MAX_RUN_UNITS
                            && self.transition(end, UnitState::Unaccepted, UnitState::Accepting)
                        {
                            end += 1;
                        }
                        // Only this vCPU touches its slot, hence Relaxed. Slots nest: a
                        // handler on this vCPU restores what it found.
                        let outer = slot.swap(slot_value(unit, end - unit), Ordering::Relaxed);
                        let result = self.accept_claimed(tdcall, unit, end);
                        slot.store(outer, Ordering::Relaxed);
                        drop(irq);
                        return result.map(|()| end);
                    }
                    drop(irq);
                }
                UnitState::Accepting => {
                    if slot_holds(slot.load(Ordering::Relaxed), unit) {
                        return Err(TrackerError::Reentrant {
                            unit,
                            gpa: self.unit_gpa(unit),
                        });
                    }
                    if !waited {
                        waited = true;
                        self.waits.fetch_add(1, Ordering::Relaxed);
                    }
                    spins += 1;
                    if spins > self.config.max_wait_spins {
                        return Err(TrackerError::WaitTimeout {
                            unit,
                            gpa: self.unit_gpa(unit),
                        });
                    }
                    hooks.relax();
                }
            }
        }
    }

    fn unit_gpa(&self, unit: u64) -> Gpa {
        Gpa::new_truncate(
            unit.checked_mul(self.unit_size)
                .and_then(|o| o.checked_add(self.phys_base))
                .unwrap_or(0),
        )
    }

    /// Accepts the run `[first, past)` this vCPU has claimed and publishes the outcome of each
    /// unit.
    fn accept_claimed<T: Tdcall + ?Sized>(
        &self,
        tdcall: &mut T,
        first: u64,
        past: u64,
    ) -> Result<(), TrackerError> {
        let range = match (self.unit_range(first), self.unit_range(past - 1)) {
            (Ok(a), Ok(b)) => {
                GpaRange::new(a.start().as_u64(), b.end().as_u64()).map_err(TrackerError::Addr)
            }
            (Err(e), _) | (_, Err(e)) => Err(e),
        };
        let range = match range {
            Ok(r) => r,
            Err(e) => {
                for u in first..past {
                    self.transition(u, UnitState::Accepting, UnitState::Unaccepted);
                }
                return Err(e);
            }
        };
        let result = self
            .acceptor
            .accept_range_with(tdcall, range, self.tolerate_already_accepted);
        // The units wholly before the failing page are accepted (the acceptor's progress is
        // strictly increasing); the rest are not, or only in part.
        let (done, failed) = match &result {
            Ok(()) => (past, None),
            Err(error) => {
                let at = error.gpa().map_or(first, |g| {
                    self.unit_of(g.as_u64())
                        .unwrap_or(first)
                        .clamp(first, past - 1)
                });
                (at, Some((at, error)))
            }
        };
        if done > first {
            for u in first..done {
                self.transition(u, UnitState::Accepting, UnitState::Accepted);
            }
            let bytes = (done - first) * self.unit_size;
            self.accepted_bytes.fetch_add(bytes, Ordering::Relaxed);
            self.remaining_bytes.fetch_sub(bytes, Ordering::Relaxed);
            self.units_accepted
                .fetch_add(done - first, Ordering::Relaxed);
        }
        let Some((at, error)) = failed else {
            return Ok(());
        };
        // The failing unit: untouched when the failure is at its first page and is not the
        // module saying that page is accepted already.
        let untouched = error
            .gpa()
            .is_none_or(|g| Ok(g) == self.unit_range(at).map(|r| r.start()))
            && !matches!(error, AcceptError::AlreadyAccepted { .. });
        let next = if untouched {
            UnitState::Unaccepted
        } else {
            UnitState::Failed
        };
        self.transition(at, UnitState::Accepting, next);
        for u in at + 1..past {
            self.transition(u, UnitState::Accepting, UnitState::Unaccepted);
        }
        // No logging here: this path runs in exception context, where a logger's lock may be
        // held by the interrupted code. The caller gets the error.
        Err(TrackerError::Accept {
            unit: at,
            error: *error,
        })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::abi::{Gpaw, MapGpaOutcome, PageLevel, StatusCode, TdxStatus, VeInfo, VpInfo};
    use crate::acceptor::AcceptPolicy;
    use crate::unaccepted::{TableBuilder, TableLayout};
    use std::vec;
    use std::vec::Vec;

    pub(crate) const M2: u64 = 2 << 20;
    const K4: u64 = 4096;

    /// A module whose ACCEPT answers by a shared rule and logs calls into a shared list.
    pub(crate) struct Logged<'l, F: Fn(Gpa, PageLevel) -> TdxStatus> {
        pub rule: &'l F,
        pub log: &'l std::sync::Mutex<Vec<(u64, PageLevel)>>,
    }

    impl<F: Fn(Gpa, PageLevel) -> TdxStatus> Tdcall for Logged<'_, F> {
        fn accept(&mut self, gpa: Gpa, level: PageLevel) -> TdxStatus {
            let status = (self.rule)(gpa, level);
            if status.is_success() {
                self.log.lock().unwrap().push((gpa.as_u64(), level));
            }
            status
        }
        fn map_gpa(&mut self, _: u64, _: u64) -> MapGpaOutcome {
            unreachable!("not used")
        }
        fn ve_info(&mut self) -> Result<VeInfo, TdxStatus> {
            Err(StatusCode::NoValidVeInfo.status())
        }
        fn vp_info(&mut self) -> Result<VpInfo, TdxStatus> {
            Err(StatusCode::OperandInvalid.status())
        }
    }

    fn ok(_: Gpa, _: PageLevel) -> TdxStatus {
        TdxStatus::SUCCESS
    }

    fn acceptor_2m() -> Acceptor {
        Acceptor::new(
            Gpaw::Bits48,
            AcceptPolicy {
                max_level: PageLevel::Size2M,
                ..AcceptPolicy::default()
            },
        )
    }

    fn storage(units: u64, vcpus: usize) -> (Vec<AtomicU64>, Vec<AtomicU64>) {
        (
            (0..words_needed(units))
                .map(|_| AtomicU64::new(0))
                .collect(),
            (0..vcpus).map(|_| AtomicU64::new(0)).collect(),
        )
    }

    /// A table with base `base`, `units` units of 2M, all unaccepted but those in `accepted`.
    fn table_bytes(base: u64, units: u64, accepted: &[u64]) -> Vec<u8> {
        let layout = TableLayout {
            phys_base: base,
            unit_size: M2 as u32,
            bitmap_len: units.div_ceil(8),
        };
        let mut buf = vec![0u8; layout.table_len().unwrap()];
        let len = TableBuilder::new(&mut buf, layout).unwrap().finish();
        for u in 0..units {
            if !accepted.contains(&u) {
                buf[24 + (u / 8) as usize] |= 1 << (u % 8);
            }
        }
        buf.truncate(len);
        buf
    }

    #[test]
    fn from_table_and_single_vcpu_accept_with_guard_unit() {
        let base = 1 << 32;
        let bytes = table_bytes(base, 10, &[3]);
        let table = UnacceptedTable::parse(&bytes).unwrap();
        let a = acceptor_2m();
        let (words, slots) = storage(table.units(), 1);
        let t =
            LazyTracker::from_table(&a, &table, &words, &slots, TrackerConfig::default()).unwrap();
        // 10 units recorded, the bitmap covers 16; unit 3 accepted.
        assert_eq!(t.units(), 16);
        assert_eq!(t.remaining_bytes(), 9 * M2);
        assert_eq!(t.unit_state(3), UnitState::Accepted);
        assert_eq!(t.unit_state(12), UnitState::Accepted);

        let log = std::sync::Mutex::new(Vec::new());
        let mut td = Logged {
            rule: &ok,
            log: &log,
        };
        // [base + 4K, base + 2M) ends on a unit boundary: unit 0 and the guard unit 1.
        t.accept_range(0, &mut td, &mut NoInterrupts, base + K4, base + M2)
            .unwrap();
        assert_eq!(
            *log.lock().unwrap(),
            [(base, PageLevel::Size2M), (base + M2, PageLevel::Size2M)]
        );
        assert_eq!(t.accepted_bytes(), 2 * M2);
        assert_eq!(t.remaining_bytes(), 7 * M2);
        // Already accepted: no call. Unit 3 is accepted from the start.
        t.accept_range(0, &mut td, &mut NoInterrupts, base, base + K4)
            .unwrap();
        t.accept_range(
            0,
            &mut td,
            &mut NoInterrupts,
            base + 3 * M2,
            base + 3 * M2 + K4,
        )
        .unwrap();
        assert_eq!(log.lock().unwrap().len(), 2);
        // Outside the span: nothing to do.
        t.accept_range(0, &mut td, &mut NoInterrupts, 0, base - M2)
            .unwrap();
        t.accept_range(0, &mut td, &mut NoInterrupts, base + 20 * M2, u64::MAX)
            .unwrap();
        assert_eq!(log.lock().unwrap().len(), 2);
        // Ending exactly at phys_base: unit 0 is the guard (accepted already here).
        assert!(!t.range_contains_unaccepted(base - K4, base));
        assert!(t.range_contains_unaccepted(base - K4, base + 2 * M2));
        // A range running to the end: units 2, 4..9.
        t.accept_range(0, &mut td, &mut NoInterrupts, base, u64::MAX)
            .unwrap();
        assert_eq!(t.remaining_bytes(), 0);
        assert_eq!(t.stats().units_accepted, 9);
        assert!(!t.range_contains_unaccepted(0, u64::MAX));
    }

    /// Linux's guard rule at the edges: a range ending at `phys_base` accepts unit 0; an
    /// unaligned end has no guard; the last unit has no unit after it.
    #[test]
    fn guard_unit_at_the_edges() {
        let a = acceptor_2m();
        let (words, slots) = storage(4, 1);
        let base = 64 * M2;
        let t =
            LazyTracker::new(&a, base, M2, 4, &words, &slots, TrackerConfig::default()).unwrap();
        for u in 0..4 {
            t.mark_unaccepted(u);
        }
        let log = std::sync::Mutex::new(Vec::new());
        let mut td = Logged {
            rule: &ok,
            log: &log,
        };
        assert!(t.range_contains_unaccepted(base - M2, base));
        t.accept_range(0, &mut td, &mut NoInterrupts, base - M2, base)
            .unwrap();
        assert_eq!(*log.lock().unwrap(), [(base, PageLevel::Size2M)]);
        // Unaligned end inside unit 1: unit 1 only.
        t.accept_range(
            0,
            &mut td,
            &mut NoInterrupts,
            base + M2 + K4,
            base + M2 + M2 / 2,
        )
        .unwrap();
        assert_eq!(log.lock().unwrap().len(), 2);
        assert_eq!(t.unit_state(2), UnitState::Unaccepted);
        // The last unit, ending at the end of the span: no unit after it.
        t.accept_range(0, &mut td, &mut NoInterrupts, base + 3 * M2, base + 4 * M2)
            .unwrap();
        assert_eq!(log.lock().unwrap().len(), 3);
        assert_eq!(t.unit_state(2), UnitState::Unaccepted);
        assert_eq!(t.remaining_bytes(), M2);
    }

    #[test]
    fn host_mapped_4k_inside_a_unit_still_largest_first() {
        let a = acceptor_2m();
        let (words, slots) = storage(2, 1);
        let t = LazyTracker::new(&a, 0, M2, 2, &words, &slots, TrackerConfig::default()).unwrap();
        t.mark_unaccepted(0);
        let rule = |_: Gpa, level: PageLevel| {
            if level == PageLevel::Size2M {
                StatusCode::PageSizeMismatch.with_operand(1)
            } else {
                TdxStatus::SUCCESS
            }
        };
        let log = std::sync::Mutex::new(Vec::new());
        let mut td = Logged {
            rule: &rule,
            log: &log,
        };
        t.accept_unit(0, &mut td, &mut NoInterrupts, 0).unwrap();
        assert_eq!(log.lock().unwrap().len(), 512);
        assert_eq!(a.stats().level(PageLevel::Size2M).size_mismatch, 1);
    }

    #[test]
    fn failures_revert_or_poison() {
        let a = acceptor_2m();
        let (words, slots) = storage(3, 1);
        let t = LazyTracker::new(&a, 0, M2, 3, &words, &slots, TrackerConfig::default()).unwrap();
        for u in 0..3 {
            t.mark_unaccepted(u);
        }
        let log = std::sync::Mutex::new(Vec::new());
        // Unit 0: the first call fails before anything is accepted -> back to unaccepted.
        let walk = |_: Gpa, _: PageLevel| StatusCode::EptWalkFailed.status();
        let mut td = Logged {
            rule: &walk,
            log: &log,
        };
        let e = t.accept_unit(0, &mut td, &mut NoInterrupts, 0).unwrap_err();
        assert!(matches!(e, TrackerError::Accept { unit: 0, .. }));
        assert_eq!(t.unit_state(0), UnitState::Unaccepted);
        let mut good = Logged {
            rule: &ok,
            log: &log,
        };
        t.accept_unit(0, &mut good, &mut NoInterrupts, 0).unwrap();
        assert_eq!(t.unit_state(0), UnitState::Accepted);

        // Unit 1: already accepted by the module. By default that is evidence the page is
        // private (a conversion accepted it): the unit is accepted.
        let already = |_: Gpa, _: PageLevel| StatusCode::PageAlreadyAccepted.with_operand(1);
        let mut td = Logged {
            rule: &already,
            log: &log,
        };
        t.accept_unit(0, &mut td, &mut NoInterrupts, 1).unwrap();
        assert_eq!(t.unit_state(1), UnitState::Accepted);

        // Unit 2: host mapped 4K and the 3rd sub-page fails -> partly accepted -> poisoned.
        let partial = |g: Gpa, level: PageLevel| match level {
            PageLevel::Size2M => StatusCode::PageSizeMismatch.with_operand(1),
            _ if g.as_u64() == 2 * M2 + 2 * K4 => StatusCode::EptWalkFailed.status(),
            _ => TdxStatus::SUCCESS,
        };
        let mut td = Logged {
            rule: &partial,
            log: &log,
        };
        t.accept_unit(0, &mut td, &mut NoInterrupts, 2).unwrap_err();
        assert_eq!(t.unit_state(2), UnitState::Failed);
        assert_eq!(t.remaining_bytes(), M2);
        assert_eq!(t.accepted_bytes(), 2 * M2);
    }

    /// As Linux (which panics): a strict tracker fails the unit on ALREADY_ACCEPTED, and never
    /// calls for it again.
    #[test]
    fn strict_tracker_poisons_on_already_accepted() {
        let a = acceptor_2m();
        let (words, slots) = storage(2, 1);
        let t = LazyTracker::new(&a, 0, M2, 2, &words, &slots, TrackerConfig::default())
            .unwrap()
            .already_accepted_is_private(false);
        t.mark_unaccepted(1);
        let log = std::sync::Mutex::new(Vec::new());
        let already = |_: Gpa, _: PageLevel| StatusCode::PageAlreadyAccepted.with_operand(1);
        let mut td = Logged {
            rule: &already,
            log: &log,
        };
        t.accept_unit(0, &mut td, &mut NoInterrupts, 1).unwrap_err();
        assert_eq!(t.unit_state(1), UnitState::Failed);
        let mut good = Logged {
            rule: &ok,
            log: &log,
        };
        assert_eq!(
            t.accept_unit(0, &mut good, &mut NoInterrupts, 1),
            Err(TrackerError::UnitFailed {
                unit: 1,
                gpa: Gpa::new_truncate(M2)
            })
        );
    }

    /// Runs of units go to the acceptor at once: 513 units from a 1G boundary (a request that
    /// ends on a unit boundary includes its guard unit) are one 1G and one 2M ACCEPT on a
    /// module that takes 1G, as Linux's `accept_memory()` makes them.
    #[test]
    fn runs_are_accepted_at_the_largest_level() {
        let a = Acceptor::new(Gpaw::Bits48, AcceptPolicy::OURS);
        let units = 1024;
        let (words, slots) = storage(units, 1);
        let t =
            LazyTracker::new(&a, 0, M2, units, &words, &slots, TrackerConfig::default()).unwrap();
        for u in 0..units {
            t.mark_unaccepted(u);
        }
        let log = std::sync::Mutex::new(Vec::new());
        let mut td = Logged {
            rule: &ok,
            log: &log,
        };
        t.accept_range(0, &mut td, &mut NoInterrupts, 0, 1 << 30)
            .unwrap();
        assert_eq!(
            *log.lock().unwrap(),
            [(0, PageLevel::Size1G), (1 << 30, PageLevel::Size2M)]
        );
        assert_eq!(t.stats().units_accepted, 513);
        // A zero-size request accepts the unit holding its address, as Linux's does.
        t.accept_range(0, &mut td, &mut NoInterrupts, 600 * M2 + 5, 600 * M2 + 5)
            .unwrap();
        assert_eq!(t.unit_state(600), UnitState::Accepted);
        assert!(t.range_contains_unaccepted(601 * M2, 601 * M2));
        // A failure part way through a run: the units before it are accepted, the failing one
        // (untouched) and the ones after it go back to unaccepted.
        let fail_at = |g: Gpa, _: PageLevel| {
            if g.as_u64() == 700 * M2 {
                StatusCode::EptWalkFailed.status()
            } else {
                TdxStatus::SUCCESS
            }
        };
        let mut td = Logged {
            rule: &fail_at,
            log: &log,
        };
        let e = t
            .accept_range(0, &mut td, &mut NoInterrupts, 698 * M2, 702 * M2 - 1)
            .unwrap_err();
        assert!(matches!(e, TrackerError::Accept { unit: 700, .. }));
        assert_eq!(t.unit_state(699), UnitState::Accepted);
        assert_eq!(t.unit_state(700), UnitState::Unaccepted);
        assert_eq!(t.unit_state(701), UnitState::Unaccepted);
    }

    #[test]
    fn bad_construction() {
        let a = acceptor_2m();
        let (words, slots) = storage(32, 1);
        let cfg = TrackerConfig::default();
        assert_eq!(
            LazyTracker::new(&a, 0, M2, 33, &words, &slots, cfg).map(|_| ()),
            Err(TrackerError::Storage { needed: 2, got: 1 })
        );
        assert_eq!(
            LazyTracker::new(&a, 0, 3 * K4, 1, &words, &slots, cfg).map(|_| ()),
            Err(TrackerError::Table(TableError::UnitSize(3 * K4 as u32)))
        );
        assert_eq!(
            LazyTracker::new(&a, 0x800, M2, 1, &words, &slots, cfg).map(|_| ()),
            Err(TrackerError::Table(TableError::PhysBase(0x800)))
        );
        assert_eq!(
            LazyTracker::new(&a, (1 << 52) - M2, M2, 2, &words, &slots, cfg).map(|_| ()),
            Err(TrackerError::Table(TableError::Overflow))
        );
        let t = LazyTracker::new(&a, 0, M2, 1, &words, &slots, cfg).unwrap();
        t.mark_unaccepted(0);
        let log = std::sync::Mutex::new(Vec::new());
        let mut td = Logged {
            rule: &ok,
            log: &log,
        };
        assert_eq!(
            t.accept_unit(5, &mut td, &mut NoInterrupts, 0),
            Err(TrackerError::NoSlot { vcpu: 5 })
        );
    }

    /// A bounded wait: a unit left in `Accepting` by a vCPU that never finishes.
    #[test]
    fn waiting_is_bounded() {
        let a = acceptor_2m();
        let (words, slots) = storage(1, 2);
        let cfg = TrackerConfig { max_wait_spins: 50 };
        let t = LazyTracker::new(&a, 0, M2, 1, &words, &slots, cfg).unwrap();
        t.mark_unaccepted(0);
        assert!(t.transition(0, UnitState::Unaccepted, UnitState::Accepting));
        let log = std::sync::Mutex::new(Vec::new());
        let mut td = Logged {
            rule: &ok,
            log: &log,
        };
        struct Count(u64);
        impl CpuHooks for Count {
            type IrqGuard = ();
            fn mask_interrupts(&mut self) {}
            fn relax(&mut self) {
                self.0 += 1;
            }
        }
        let mut hooks = Count(0);
        assert_eq!(
            t.accept_unit(1, &mut td, &mut hooks, 0),
            Err(TrackerError::WaitTimeout {
                unit: 0,
                gpa: Gpa::new_truncate(0)
            })
        );
        assert_eq!(hooks.0, 50);
        assert!(log.lock().unwrap().is_empty());
        assert_eq!(t.stats().waits, 1);
    }

    /// Interrupts are masked exactly while a unit is claimed.
    #[test]
    fn claim_is_inside_the_masked_section() {
        struct Unmask<'x>(&'x core::cell::Cell<u32>);
        impl Drop for Unmask<'_> {
            fn drop(&mut self) {
                self.0.set(self.0.get() - 1);
            }
        }
        struct Irq<'x> {
            masked: &'x core::cell::Cell<u32>,
        }
        impl<'x> CpuHooks for Irq<'x> {
            type IrqGuard = Unmask<'x>;
            fn mask_interrupts(&mut self) -> Unmask<'x> {
                self.masked.set(self.masked.get() + 1);
                Unmask(self.masked)
            }
        }
        let masked = core::cell::Cell::new(0);
        let a = acceptor_2m();
        let (words, slots) = storage(1, 1);
        let t = LazyTracker::new(&a, 0, M2, 1, &words, &slots, TrackerConfig::default()).unwrap();
        t.mark_unaccepted(0);
        let seen = core::cell::Cell::new(0u32);
        let rule = |_: Gpa, _: PageLevel| {
            seen.set(masked.get());
            TdxStatus::SUCCESS
        };
        let log = std::sync::Mutex::new(Vec::new());
        let mut td = Logged {
            rule: &rule,
            log: &log,
        };
        t.accept_unit(0, &mut td, &mut Irq { masked: &masked }, 0)
            .unwrap();
        assert_eq!(seen.get(), 1, "ACCEPT ran with interrupts masked");
        assert_eq!(masked.get(), 0, "and they were restored");
    }

    /// Seeded stress with real threads: many vCPUs request overlapping random ranges; every
    /// unit is accepted exactly once and every request returns.
    #[test]
    fn stress_threads_exactly_once() {
        const UNITS: u64 = 64;
        const VCPUS: usize = 8;
        for seed in 0..20u64 {
            let a = acceptor_2m();
            let (words, slots) = storage(UNITS, VCPUS);
            let t = LazyTracker::new(&a, 0, M2, UNITS, &words, &slots, TrackerConfig::default())
                .unwrap();
            for u in 0..UNITS {
                if (u * 7 + seed) % 5 != 0 {
                    t.mark_unaccepted(u);
                }
            }
            let initially = t.remaining_bytes();
            let log = std::sync::Mutex::new(Vec::new());
            std::thread::scope(|s| {
                for v in 0..VCPUS {
                    let (t, log) = (&t, &log);
                    s.spawn(move || {
                        let mut rng = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ v as u64;
                        let mut td = Logged { rule: &ok, log };
                        for _ in 0..40 {
                            rng ^= rng << 13;
                            rng ^= rng >> 7;
                            rng ^= rng << 17;
                            let start = (rng % (UNITS * M2)) & !(K4 - 1);
                            let len = (rng >> 32) % (8 * M2) + 1;
                            struct Yield;
                            impl CpuHooks for Yield {
                                type IrqGuard = ();
                                fn mask_interrupts(&mut self) {}
                                fn relax(&mut self) {
                                    std::thread::yield_now();
                                }
                            }
                            t.accept_range(v, &mut td, &mut Yield, start, start + len)
                                .unwrap();
                        }
                    });
                }
            });
            let mut calls = log.into_inner().unwrap();
            let n = calls.len();
            calls.sort_unstable();
            calls.dedup();
            assert_eq!(calls.len(), n, "a unit accepted twice (seed {seed})");
            assert_eq!(t.accepted_bytes(), n as u64 * M2);
            assert_eq!(t.accepted_bytes() + t.remaining_bytes(), initially);
        }
    }
}

/// Model-checked runs of the tracker under shuttle's scheduler: every interleaving point is an
/// atomic operation on the unit states.
#[cfg(test)]
mod model {
    use super::tests::{Logged, M2};
    use super::*;
    use crate::abi::{Gpaw, PageLevel, StatusCode, TdxStatus};
    use crate::acceptor::AcceptPolicy;
    use shuttle::sync::atomic::AtomicU64 as ShuttleU64;
    use std::sync::Arc;
    use std::vec::Vec;

    impl StateWord for ShuttleU64 {
        fn load(&self, order: Ordering) -> u64 {
            ShuttleU64::load(self, order)
        }
        fn store(&self, value: u64, order: Ordering) {
            ShuttleU64::store(self, value, order)
        }
        fn compare_exchange_weak(
            &self,
            current: u64,
            new: u64,
            success: Ordering,
            failure: Ordering,
        ) -> Result<u64, u64> {
            ShuttleU64::compare_exchange_weak(self, current, new, success, failure)
        }
    }

    struct Yield;
    impl CpuHooks for Yield {
        type IrqGuard = ();
        fn mask_interrupts(&mut self) {}
        fn relax(&mut self) {
            shuttle::thread::yield_now();
        }
    }

    /// Shared fixture leaked per execution (shuttle threads need `'static`).
    struct World {
        tracker: LazyTracker<'static, ShuttleU64>,
        log: std::sync::Mutex<Vec<(u64, PageLevel)>>,
    }

    fn world(units: u64, vcpus: usize, unaccepted: impl Fn(u64) -> bool) -> &'static World {
        let acceptor: &'static Acceptor =
            std::boxed::Box::leak(std::boxed::Box::new(Acceptor::new(
                Gpaw::Bits48,
                AcceptPolicy {
                    max_level: PageLevel::Size2M,
                    ..AcceptPolicy::default()
                },
            )));
        let words: &'static [ShuttleU64] = std::boxed::Box::leak(
            (0..words_needed(units))
                .map(|_| ShuttleU64::new(0))
                .collect::<Vec<_>>()
                .into_boxed_slice(),
        );
        let slots: &'static [AtomicU64] = std::boxed::Box::leak(
            (0..vcpus)
                .map(|_| AtomicU64::new(0))
                .collect::<Vec<_>>()
                .into_boxed_slice(),
        );
        let cfg = TrackerConfig {
            max_wait_spins: 100_000,
        };
        let tracker = LazyTracker::new(acceptor, 0, M2, units, words, slots, cfg).unwrap();
        for u in (0..units).filter(|&u| unaccepted(u)) {
            tracker.mark_unaccepted(u);
        }
        std::boxed::Box::leak(std::boxed::Box::new(World {
            tracker,
            log: std::sync::Mutex::new(Vec::new()),
        }))
    }

    fn ok(_: Gpa, _: PageLevel) -> TdxStatus {
        TdxStatus::SUCCESS
    }

    /// Three vCPUs with overlapping ranges over units that straddle one state word: no unit is
    /// accepted twice, none is left unaccepted, nobody times out.
    fn exactly_once_no_stuck_waiter() {
        // 34 units: two state words, the ranges cross the word boundary.
        let w = world(34, 3, |u| u % 3 != 1);
        let ranges = [(29, 33), (30, 34), (28, 31)];
        let handles: Vec<_> = ranges
            .iter()
            .enumerate()
            .map(|(v, &(s, e))| {
                shuttle::thread::spawn(move || {
                    let mut td = Logged {
                        rule: &ok,
                        log: &w.log,
                    };
                    // Unit-aligned end: the guard unit is included too.
                    w.tracker
                        .accept_range(v, &mut td, &mut Yield, s * M2 + 4096, e * M2)
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap().unwrap();
        }
        let mut log = w.log.lock().unwrap().clone();
        let n = log.len();
        log.sort_unstable();
        log.dedup();
        assert_eq!(log.len(), n, "a unit was accepted twice");
        for u in 28..34 {
            assert_eq!(w.tracker.unit_state(u), UnitState::Accepted, "unit {u}");
        }
        assert_eq!(w.tracker.accepted_bytes(), n as u64 * M2);
    }

    #[test]
    fn shuttle_random_exactly_once_no_stuck_waiter() {
        shuttle::check_random(exactly_once_no_stuck_waiter, 5000);
    }

    /// The same under the PCT scheduler, which targets bugs of small preemption depth.
    #[test]
    fn shuttle_pct_exactly_once_no_stuck_waiter() {
        shuttle::check_pct(exactly_once_no_stuck_waiter, 3000, 3);
    }

    /// A first attempt fails without accepting anything: the unit goes back to unaccepted and
    /// exactly one of the waiters accepts it; every vCPU returns (Ok or the one error).
    #[test]
    fn shuttle_failed_claim_releases_waiters() {
        shuttle::check_random(
            || {
                let w = world(2, 3, |_| true);
                let failed_once = Arc::new(std::sync::atomic::AtomicBool::new(false));
                let handles: Vec<_> = (0..3)
                    .map(|v| {
                        let failed_once = failed_once.clone();
                        shuttle::thread::spawn(move || {
                            let rule = move |g: Gpa, _: PageLevel| {
                                if g.as_u64() == 0
                                    && !failed_once.swap(true, std::sync::atomic::Ordering::Relaxed)
                                {
                                    StatusCode::EptWalkFailed.status()
                                } else {
                                    TdxStatus::SUCCESS
                                }
                            };
                            let mut td = Logged {
                                rule: &rule,
                                log: &w.log,
                            };
                            w.tracker.accept_unit(v, &mut td, &mut Yield, 0)
                        })
                    })
                    .collect();
                let results: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
                let errors = results.iter().filter(|r| r.is_err()).count();
                assert_eq!(errors, 1, "{results:?}");
                assert!(results
                    .iter()
                    .all(|r| matches!(r, Ok(()) | Err(TrackerError::Accept { unit: 0, .. }))));
                assert_eq!(*w.log.lock().unwrap(), [(0, PageLevel::Size2M)]);
                assert_eq!(w.tracker.unit_state(0), UnitState::Accepted);
            },
            2000,
        );
    }
}
