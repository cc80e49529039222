//! Range acceptance: TDG.MEM.PAGE.ACCEPT over `[start, end)`, largest level first.
//!
//! For each chunk the [`Acceptor`] picks the largest level (1G, 2M, 4K) that the chunk's
//! alignment, the remaining length and the learned module limit allow, then handles the
//! outcomes of spec section 5:
//!
//! - `PAGE_SIZE_MISMATCH` (the host mapped smaller): that chunk only is accepted one level down;
//!   the next chunk tries the large level again.
//! - `OPERAND_INVALID|RCX` at 1G: the module caps ACCEPT at 2M (every 1.5.x module does). The
//!   acceptor learns it once and never wastes another 1G call.
//! - `OPERAND_BUSY`: retried, at most [`AcceptPolicy::busy_retries`] times per call.
//! - `PAGE_ALREADY_ACCEPTED`: an error carrying the GPA by default (lazy-accept tracking broke,
//!   or the host removed and re-added the page); [`AcceptPolicy::tolerate_already_accepted`]
//!   turns it into success for firmware hand-off.
//!
//! Progress is strictly increasing, so a failure at GPA `g` means `[start, g)` is accepted and
//! `[g, end)` is not known to be. The acceptor is `Sync`: vCPUs share one (and its learned cap and
//! counters), each calling it with its own [`Tdcall`].
//!
//! It does not decide *which* memory to accept (see the lazy-accept tracker) and never retries a
//! call after the module says the page was accepted.

use core::fmt;
use core::sync::atomic::{AtomicU64, AtomicU8, Ordering};

use crate::abi::{operand, AddrError, Gpa, GpaRange, Gpaw, PageLevel, StatusCode, TdxStatus};
use crate::tdcall::Tdcall;

/// Default bound on consecutive `OPERAND_BUSY` answers for one ACCEPT call.
///
/// BUSY means the host holds the entry lock for one SEAMCALL; a few hundred re-executions cover
/// any honest host, while a host that answers BUSY forever cannot hold the vCPU.
pub const DEFAULT_BUSY_RETRIES: u32 = 256;

/// How the acceptor behaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AcceptPolicy {
    /// Largest level ever tried. `Size1G` by default: a module without 1G accept answers
    /// `OPERAND_INVALID` once and the acceptor learns.
    pub max_level: PageLevel,
    /// Treat `PAGE_ALREADY_ACCEPTED` as success (firmware hand-off of memory whose state is
    /// not tracked precisely). Off by default.
    pub tolerate_already_accepted: bool,
    /// Consecutive `OPERAND_BUSY` answers tolerated per ACCEPT call.
    pub busy_retries: u32,
    /// Remember that the module refused 1G (`OPERAND_INVALID|RCX`) and stop trying it.
    pub learn_level_cap: bool,
    /// Treat *any* failure above 4K as "try the next level down" for that chunk, as Linux's
    /// `try_accept_one` does, instead of only `PAGE_SIZE_MISMATCH` and a refused 1G.
    pub fall_back_on_any_error: bool,
}

impl Default for AcceptPolicy {
    fn default() -> Self {
        AcceptPolicy::OURS
    }
}

impl AcceptPolicy {
    /// This engine: 1G -> 2M -> 4K, learns the module's cap, BUSY retried, strict about
    /// `PAGE_ALREADY_ACCEPTED`.
    pub const OURS: AcceptPolicy = AcceptPolicy {
        max_level: PageLevel::Size1G,
        tolerate_already_accepted: false,
        busy_retries: DEFAULT_BUSY_RETRIES,
        learn_level_cap: true,
        fall_back_on_any_error: false,
    };

    /// Behaves like Linux (`arch/x86/coco/tdx/tdx.c` `try_accept_one`): 1G -> 2M -> 4K for
    /// every chunk, any error at a level means "try smaller", nothing learned, no BUSY retry, an
    /// error at 4K (including `PAGE_ALREADY_ACCEPTED`) is fatal. A baseline for comparison,
    /// written from that behaviour.
    pub const LINUX: AcceptPolicy = AcceptPolicy {
        max_level: PageLevel::Size1G,
        tolerate_already_accepted: false,
        busy_retries: 0,
        learn_level_cap: false,
        fall_back_on_any_error: true,
    };

    /// Behaves like td-shim (`td_accept_pages`): 2M runs else 4K, never 1G,
    /// `PAGE_ALREADY_ACCEPTED` counts as success, BUSY retried 5 times. A baseline.
    pub const TD_SHIM: AcceptPolicy = AcceptPolicy {
        max_level: PageLevel::Size2M,
        tolerate_already_accepted: true,
        busy_retries: 5,
        learn_level_cap: false,
        fall_back_on_any_error: false,
    };

    /// Behaves like asterinas mainline: 4K accepts only. A baseline.
    pub const ASTERINAS: AcceptPolicy = AcceptPolicy {
        max_level: PageLevel::Size4K,
        tolerate_already_accepted: false,
        busy_retries: DEFAULT_BUSY_RETRIES,
        learn_level_cap: false,
        fall_back_on_any_error: false,
    };

    /// Behaves like OVMF (`TdAcceptPages`): 2M for the aligned body, 4K for the head and tail,
    /// `PAGE_SIZE_MISMATCH` -> 512 accepts one level down. A baseline.
    pub const OVMF: AcceptPolicy = AcceptPolicy {
        max_level: PageLevel::Size2M,
        tolerate_already_accepted: false,
        busy_retries: DEFAULT_BUSY_RETRIES,
        learn_level_cap: false,
        fall_back_on_any_error: false,
    };
}

/// Why an acceptance stopped. Every variant carries the GPA and level of the failing call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AcceptError {
    /// The range is not acceptable as given (nothing was called).
    InvalidRange(AddrError),
    /// The module says the page is already accepted (and the policy does not tolerate it).
    AlreadyAccepted {
        /// Page whose acceptance was refused.
        gpa: Gpa,
        /// Level asked.
        level: PageLevel,
        /// EPT level of the mapped leaf the module found (status bits 31:0).
        mapped_level: u32,
    },
    /// The module answered `OPERAND_BUSY` more often than the policy allows.
    Busy {
        /// Page being accepted.
        gpa: Gpa,
        /// Level asked.
        level: PageLevel,
        /// Calls made.
        tries: u32,
    },
    /// A status the spec does not allow here (e.g. `PAGE_SIZE_MISMATCH` at 4K,
    /// `OPERAND_INVALID` at 2M or 4K, an unknown code).
    Module {
        /// Page being accepted.
        gpa: Gpa,
        /// Level asked.
        level: PageLevel,
        /// What the module returned.
        status: TdxStatus,
    },
}

impl AcceptError {
    /// The GPA of the failing call: everything from the range start up to it was accepted.
    pub fn gpa(&self) -> Option<Gpa> {
        match *self {
            AcceptError::InvalidRange(_) => None,
            AcceptError::AlreadyAccepted { gpa, .. }
            | AcceptError::Busy { gpa, .. }
            | AcceptError::Module { gpa, .. } => Some(gpa),
        }
    }
}

impl fmt::Display for AcceptError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AcceptError::InvalidRange(e) => write!(f, "invalid range: {e}"),
            AcceptError::AlreadyAccepted { gpa, level, .. } => {
                write!(f, "{level} page at {gpa} was already accepted")
            }
            AcceptError::Busy { gpa, level, tries } => {
                write!(f, "{level} page at {gpa} still busy after {tries} calls")
            }
            AcceptError::Module { gpa, level, status } => {
                write!(f, "ACCEPT of {level} page at {gpa} failed: {status}")
            }
        }
    }
}

/// Counters for one level (exact, monotonic).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LevelStats {
    /// ACCEPT TDCALLs made at this level.
    pub calls: u64,
    /// Calls that returned SUCCESS.
    pub accepted: u64,
    /// Calls that returned PAGE_SIZE_MISMATCH.
    pub size_mismatch: u64,
    /// Calls that returned OPERAND_BUSY.
    pub busy: u64,
    /// Calls that returned PAGE_ALREADY_ACCEPTED.
    pub already_accepted: u64,
    /// Calls that returned OPERAND_INVALID (1G on a module capped at 2M, or a host fault).
    pub invalid: u64,
    /// Calls that returned anything else.
    pub other: u64,
}

/// A snapshot of an [`Acceptor`]'s counters, indexed by [`PageLevel::index`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct AcceptStats {
    /// Per level: 4K, 2M, 1G.
    pub levels: [LevelStats; 3],
    /// Bytes accepted by SUCCESS outcomes.
    pub bytes_accepted: u64,
}

impl AcceptStats {
    /// Counters of one level.
    pub fn level(&self, level: PageLevel) -> &LevelStats {
        &self.levels[level.index() as usize]
    }

    /// ACCEPT TDCALLs made at all levels.
    pub fn total_calls(&self) -> u64 {
        self.levels.iter().map(|l| l.calls).sum()
    }
}

#[derive(Default)]
struct AtomicLevelStats {
    calls: AtomicU64,
    accepted: AtomicU64,
    size_mismatch: AtomicU64,
    busy: AtomicU64,
    already_accepted: AtomicU64,
    invalid: AtomicU64,
    other: AtomicU64,
}

impl AtomicLevelStats {
    /// Adds this stripe's counts to `out`.
    fn add_to(&self, out: &mut LevelStats) {
        let add = |sum: &mut u64, c: &AtomicU64| *sum = sum.wrapping_add(c.load(Ordering::Relaxed));
        add(&mut out.calls, &self.calls);
        add(&mut out.accepted, &self.accepted);
        add(&mut out.size_mismatch, &self.size_mismatch);
        add(&mut out.busy, &self.busy);
        add(&mut out.already_accepted, &self.already_accepted);
        add(&mut out.invalid, &self.invalid);
        add(&mut out.other, &self.other);
    }
}

/// Counter stripes of an [`Acceptor`]: a vCPU counts in stripe [`Tdcall::cpu`] modulo this, so
/// vCPUs accepting at once (a parallel boot) do not all write one cache line at every ACCEPT,
/// as a kernel's per-CPU counters do not. Sums are exact whatever vCPUs share a stripe.
const STRIPES: usize = 8;

/// One stripe of the counters, on cache lines of its own.
#[derive(Default)]
#[repr(align(128))]
struct Stripe {
    levels: [AtomicLevelStats; 3],
    bytes_accepted: AtomicU64,
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// Accepts GPA ranges through a [`Tdcall`]. Shareable across vCPUs.
///
/// # Examples
///
/// A module that accepts at most 2 MiB (every 1.5 release) and a host that mapped one 2 MiB
/// range at 4 KiB: the engine learns the cap from one refused 1 GiB call and falls back to 4 KiB
/// for that chunk only.
///
/// ```
/// use tdmem_accept::acceptor::{AcceptPolicy, Acceptor};
/// use tdmem_accept::testing::FakeModule;
/// use tdmem_accept::{GpaRange, Gpaw, PageLevel};
///
/// let mut module = FakeModule::new().with_host_4k(0x4020_0000);
/// let acceptor = Acceptor::new(Gpaw::Bits48, AcceptPolicy::default());
/// acceptor.accept_range(&mut module, GpaRange::new(0x4000_0000, 0x8000_0000)?)?;
///
/// assert_eq!(acceptor.level_cap(), PageLevel::Size2M);
/// let stats = acceptor.stats();
/// assert_eq!(stats.level(PageLevel::Size1G).calls, 1);
/// assert_eq!(stats.level(PageLevel::Size2M).accepted, 511);
/// assert_eq!(stats.level(PageLevel::Size4K).accepted, 512);
/// assert_eq!(module.accepted_bytes(), 1 << 30);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct Acceptor {
    gpaw: Gpaw,
    policy: AcceptPolicy,
    /// Largest level the module has not refused, as `PageLevel::index`.
    cap: AtomicU8,
    stripes: [Stripe; STRIPES],
}

impl fmt::Debug for Acceptor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Acceptor")
            .field("gpaw", &self.gpaw)
            .field("policy", &self.policy)
            .field("cap", &self.level_cap())
            .finish_non_exhaustive()
    }
}

/// The outcome of one unit's ACCEPT once BUSY retries are done.
enum UnitOutcome {
    /// Accepted now (`true`), or found already accepted and tolerated (`false`).
    Done(bool),
    /// Accept the unit one level down.
    Split,
}

impl Acceptor {
    /// An acceptor for a TD with GPA width `gpaw`.
    pub fn new(gpaw: Gpaw, policy: AcceptPolicy) -> Acceptor {
        Acceptor {
            gpaw,
            policy,
            cap: AtomicU8::new(policy.max_level.index()),
            stripes: Default::default(),
        }
    }

    /// The TD's GPA width.
    pub fn gpaw(&self) -> Gpaw {
        self.gpaw
    }

    /// The policy.
    pub fn policy(&self) -> AcceptPolicy {
        self.policy
    }

    /// The largest level the acceptor will try now (the policy's, lowered by what it learned).
    pub fn level_cap(&self) -> PageLevel {
        PageLevel::from_index(self.cap.load(Ordering::Relaxed) as u64).unwrap_or(PageLevel::Size4K)
    }

    /// Counters so far.
    pub fn stats(&self) -> AcceptStats {
        let mut out = AcceptStats::default();
        for stripe in &self.stripes {
            for (sum, level) in out.levels.iter_mut().zip(&stripe.levels) {
                level.add_to(sum);
            }
            out.bytes_accepted = out
                .bytes_accepted
                .wrapping_add(stripe.bytes_accepted.load(Ordering::Relaxed));
        }
        out
    }

    /// Checks that `range` is private GPA space of this TD.
    ///
    /// # Errors
    /// [`AddrError::CrossesSharedBit`] when any part of it has the shared bit set.
    pub fn check_private(&self, range: GpaRange) -> Result<(), AddrError> {
        if range.is_private_space(self.gpaw) {
            Ok(())
        } else {
            Err(AddrError::CrossesSharedBit)
        }
    }

    /// The largest level usable for a chunk starting at `gpa` with `remaining` bytes left.
    pub fn chunk_level(&self, gpa: Gpa, remaining: u64) -> PageLevel {
        let cap = self.level_cap();
        for level in PageLevel::LARGEST_FIRST {
            if level <= cap && gpa.is_aligned(level) && remaining >= level.size() {
                return level;
            }
        }
        PageLevel::Size4K
    }

    /// Accepts every page of `range`, largest level first.
    ///
    /// # Errors
    /// See [`AcceptError`]; on error, `[range.start, error.gpa())` has been accepted.
    pub fn accept_range<T: Tdcall + ?Sized>(
        &self,
        tdcall: &mut T,
        range: GpaRange,
    ) -> Result<(), AcceptError> {
        self.accept_range_with(tdcall, range, self.policy.tolerate_already_accepted)
    }

    /// As [`Acceptor::accept_range`], with `PAGE_ALREADY_ACCEPTED` tolerated or not for this
    /// call only (a rollback accepts pages the host may or may not have converted).
    ///
    /// # Errors
    /// See [`AcceptError`]; on error, `[range.start, error.gpa())` has been accepted.
    pub fn accept_range_with<T: Tdcall + ?Sized>(
        &self,
        tdcall: &mut T,
        range: GpaRange,
        tolerate_already_accepted: bool,
    ) -> Result<(), AcceptError> {
        self.accept_range_counted(tdcall, range, tolerate_already_accepted)
            .map(|_| ())
    }

    /// As [`Acceptor::accept_range_with`], returning how many bytes were accepted by this call
    /// (the rest were found already accepted and tolerated).
    ///
    /// # Errors
    /// See [`AcceptError`]; on error, `[range.start, error.gpa())` has been accepted.
    pub fn accept_range_counted<T: Tdcall + ?Sized>(
        &self,
        tdcall: &mut T,
        range: GpaRange,
        tolerate_already_accepted: bool,
    ) -> Result<u64, AcceptError> {
        self.accept_range_visit(tdcall, range, tolerate_already_accepted, |_, _| {})
    }

    /// As [`Acceptor::accept_range_counted`], telling `visit` about every page in address
    /// order: `(page, true)` when this call accepted it, `(page, false)` when the module said it
    /// was accepted already (tolerated). A conversion uses it to learn which pages were private
    /// before the call.
    ///
    /// # Errors
    /// See [`AcceptError`]; on error, `[range.start, error.gpa())` has been visited.
    pub fn accept_range_visit<T: Tdcall + ?Sized>(
        &self,
        tdcall: &mut T,
        range: GpaRange,
        tolerate_already_accepted: bool,
        mut visit: impl FnMut(GpaRange, bool),
    ) -> Result<u64, AcceptError> {
        self.check_private(range)
            .map_err(AcceptError::InvalidRange)?;
        let end = range.end().as_u64();
        let mut cur = range.start();
        let mut fresh = 0;
        while cur.as_u64() < end {
            let level = self.chunk_level(cur, end - cur.as_u64());
            fresh +=
                self.accept_unit_with(tdcall, cur, level, tolerate_already_accepted, &mut visit)?;
            // Cannot overflow: cur + level.size() <= end <= 2^52.
            cur = cur
                .checked_add(level.size())
                .map_err(AcceptError::InvalidRange)?;
        }
        Ok(fresh)
    }

    /// Accepts one naturally aligned page of `level` (and, if the host mapped smaller, its
    /// sub-pages, in order).
    ///
    /// # Errors
    /// See [`AcceptError`].
    pub fn accept_unit<T: Tdcall + ?Sized>(
        &self,
        tdcall: &mut T,
        gpa: Gpa,
        level: PageLevel,
    ) -> Result<(), AcceptError> {
        self.accept_unit_with(
            tdcall,
            gpa,
            level,
            self.policy.tolerate_already_accepted,
            &mut |_, _| {},
        )
        .map(|_| ())
    }

    /// Accepts one unit; returns the bytes accepted now (not found already accepted).
    fn accept_unit_with<T: Tdcall + ?Sized>(
        &self,
        tdcall: &mut T,
        gpa: Gpa,
        level: PageLevel,
        tolerate: bool,
        visit: &mut dyn FnMut(GpaRange, bool),
    ) -> Result<u64, AcceptError> {
        if !gpa.is_aligned(level) {
            return Err(AcceptError::InvalidRange(AddrError::Misaligned(
                gpa.as_u64(),
            )));
        }
        match self.accept_one(tdcall, gpa, level, tolerate)? {
            UnitOutcome::Done(fresh) => {
                if let Ok(r) = GpaRange::from_len(gpa.as_u64(), level.size()) {
                    visit(r, fresh);
                }
                Ok(if fresh { level.size() } else { 0 })
            }
            UnitOutcome::Split => {
                // `Split` is only returned above 4K.
                let Some(smaller) = level.smaller() else {
                    return Ok(0);
                };
                let mut sub = gpa;
                let mut fresh = 0;
                for _ in 0..(level.size() / smaller.size()) {
                    // The level below may itself be mismatched (1G -> 2M -> 4K).
                    fresh += self.accept_unit_with(tdcall, sub, smaller, tolerate, visit)?;
                    sub = sub
                        .checked_add(smaller.size())
                        .map_err(AcceptError::InvalidRange)?;
                }
                Ok(fresh)
            }
        }
    }

    /// One ACCEPT with BUSY retries, outcome decoded.
    fn accept_one<T: Tdcall + ?Sized>(
        &self,
        tdcall: &mut T,
        gpa: Gpa,
        level: PageLevel,
        tolerate: bool,
    ) -> Result<UnitOutcome, AcceptError> {
        let stripe = &self.stripes[tdcall.cpu() % STRIPES];
        let stats = &stripe.levels[level.index() as usize];
        let mut tries = 0u32;
        loop {
            tries += 1;
            bump(&stats.calls);
            let status = tdcall.accept(gpa, level);
            if self.policy.fall_back_on_any_error
                && level > PageLevel::Size4K
                && !status.is_success()
            {
                let counter = match status.code() {
                    StatusCode::PageSizeMismatch => &stats.size_mismatch,
                    StatusCode::OperandBusy => &stats.busy,
                    StatusCode::PageAlreadyAccepted => &stats.already_accepted,
                    StatusCode::OperandInvalid => &stats.invalid,
                    _ => &stats.other,
                };
                bump(counter);
                return Ok(UnitOutcome::Split);
            }
            match status.code() {
                StatusCode::Success => {
                    bump(&stats.accepted);
                    stripe
                        .bytes_accepted
                        .fetch_add(level.size(), Ordering::Relaxed);
                    return Ok(UnitOutcome::Done(true));
                }
                StatusCode::PageAlreadyAccepted => {
                    bump(&stats.already_accepted);
                    if tolerate {
                        return Ok(UnitOutcome::Done(false));
                    }
                    return Err(AcceptError::AlreadyAccepted {
                        gpa,
                        level,
                        mapped_level: status.operand(),
                    });
                }
                StatusCode::PageSizeMismatch if level > PageLevel::Size4K => {
                    bump(&stats.size_mismatch);
                    return Ok(UnitOutcome::Split);
                }
                StatusCode::OperandBusy => {
                    bump(&stats.busy);
                    if tries > self.policy.busy_retries {
                        return Err(AcceptError::Busy { gpa, level, tries });
                    }
                }
                StatusCode::OperandInvalid
                    if level == PageLevel::Size1G && status.operand() == operand::RCX =>
                {
                    // The module does not accept 1G pages: learn it for every later chunk.
                    bump(&stats.invalid);
                    if self.policy.learn_level_cap {
                        self.cap
                            .fetch_min(PageLevel::Size2M.index(), Ordering::Relaxed);
                    }
                    return Ok(UnitOutcome::Split);
                }
                code => {
                    if code == StatusCode::OperandInvalid {
                        bump(&stats.invalid);
                    } else if code == StatusCode::PageSizeMismatch {
                        bump(&stats.size_mismatch);
                    } else {
                        bump(&stats.other);
                    }
                    return Err(AcceptError::Module { gpa, level, status });
                }
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::vec::Vec;

    const G: u64 = 1 << 30;
    const M2: u64 = 2 << 20;
    const K4: u64 = 4096;

    use crate::testing::ScriptedAccept as Script;

    /// vCPUs accepting at once count in the stripes of their CPUs, some of them sharing one
    /// (1, 9 and 17 modulo 8), and the counters still sum exactly.
    #[test]
    fn counts_of_vcpus_accepting_at_once_on_many_cpus_are_exact() {
        let a = Acceptor::new(Gpaw::Bits48, AcceptPolicy::default());
        let cpus = [0usize, 1, 9, 17, 3, usize::MAX];
        std::thread::scope(|s| {
            for (i, &cpu) in cpus.iter().enumerate() {
                let a = &a;
                s.spawn(move || {
                    let base = i as u64 * G;
                    // No 1G ACCEPT on this module: 2M pages.
                    let module = Script::new(|_, level| match level {
                        PageLevel::Size1G => StatusCode::PageSizeMismatch.status(),
                        _ => TdxStatus::SUCCESS,
                    });
                    let mut vcpu = crate::tdcall::OnCpu::new(module, cpu);
                    a.accept_range(&mut vcpu, GpaRange::new(base, base + G).unwrap())
                        .unwrap();
                });
            }
        });
        let st = a.stats();
        let n = cpus.len() as u64;
        assert_eq!(st.level(PageLevel::Size1G).calls, n);
        assert_eq!(st.level(PageLevel::Size1G).size_mismatch, n);
        assert_eq!(st.level(PageLevel::Size2M).calls, n * 512);
        assert_eq!(st.level(PageLevel::Size2M).accepted, n * 512);
        assert_eq!(st.total_calls(), n * 513);
        assert_eq!(st.bytes_accepted, n * G);
        // CPUs 1, 9 and 17 counted in stripe 1; no CPU maps to stripe 2.
        let accepted = |i: usize| a.stripes[i].levels[1].accepted.load(Ordering::Relaxed);
        assert_eq!(accepted(1), 3 * 512);
        assert_eq!(accepted(2), 0);
    }

    /// The ACCEPT calls of `t`, as raw GPAs.
    fn calls<F: FnMut(Gpa, PageLevel) -> TdxStatus>(t: &Script<F>) -> Vec<(u64, PageLevel)> {
        t.calls().iter().map(|&(g, l)| (g.as_u64(), l)).collect()
    }

    /// A module that caps at 2M, like every public 1.5.x module.
    fn cap_2m(_: Gpa, level: PageLevel) -> TdxStatus {
        if level == PageLevel::Size1G {
            StatusCode::OperandInvalid.with_operand(operand::RCX)
        } else {
            TdxStatus::SUCCESS
        }
    }

    fn range(start: u64, end: u64) -> GpaRange {
        GpaRange::new(start, end).unwrap()
    }

    fn acceptor() -> Acceptor {
        Acceptor::new(Gpaw::Bits48, AcceptPolicy::default())
    }

    #[test]
    fn picks_largest_level_alignment_and_length_allow() {
        let a = acceptor();
        let mut t = Script::new(|_, _| TdxStatus::SUCCESS);
        // 4K head up to 2M, 2M up to 1G, one 1G, 2M tail, 4K tail.
        let start = G - M2 - K4;
        let end = 2 * G + M2 + K4;
        a.accept_range(&mut t, range(start, end)).unwrap();
        assert_eq!(
            calls(&t),
            [
                (start, PageLevel::Size4K),
                (G - M2, PageLevel::Size2M),
                (G, PageLevel::Size1G),
                (2 * G, PageLevel::Size2M),
                (2 * G + M2, PageLevel::Size4K),
            ]
        );
        assert_eq!(a.stats().bytes_accepted, end - start);
    }

    #[test]
    fn learns_the_2m_cap_once() {
        let a = acceptor();
        let mut t = Script::new(cap_2m);
        a.accept_range(&mut t, range(0, 4 * G)).unwrap();
        let s = a.stats();
        // One refused 1G call, then 2048 2M calls: no wasted TDCALL per GiB.
        assert_eq!(s.level(PageLevel::Size1G).calls, 1);
        assert_eq!(s.level(PageLevel::Size1G).invalid, 1);
        assert_eq!(s.level(PageLevel::Size2M).accepted, 4 * 512);
        assert_eq!(s.total_calls(), 1 + 4 * 512);
        assert_eq!(a.level_cap(), PageLevel::Size2M);
        assert_eq!(s.bytes_accepted, 4 * G);
    }

    #[test]
    fn size_mismatch_falls_back_for_that_chunk_only() {
        let a = Acceptor::new(
            Gpaw::Bits48,
            AcceptPolicy {
                max_level: PageLevel::Size2M,
                ..AcceptPolicy::default()
            },
        );
        // The host mapped the second 2M range at 4K.
        let mut t = Script::new(|gpa, level| {
            if level == PageLevel::Size2M && gpa.as_u64() == M2 {
                StatusCode::PageSizeMismatch.with_operand(1)
            } else {
                TdxStatus::SUCCESS
            }
        });
        a.accept_range(&mut t, range(0, 3 * M2)).unwrap();
        let s = a.stats();
        assert_eq!(s.level(PageLevel::Size2M).calls, 3);
        assert_eq!(s.level(PageLevel::Size2M).size_mismatch, 1);
        assert_eq!(s.level(PageLevel::Size4K).accepted, 512);
        // Sub-pages in order, and the third chunk is tried at 2M again.
        assert_eq!(calls(&t)[2], (M2, PageLevel::Size4K));
        assert_eq!(calls(&t)[3], (M2 + K4, PageLevel::Size4K));
        assert_eq!(*calls(&t).last().unwrap(), (2 * M2, PageLevel::Size2M));
        assert_eq!(s.bytes_accepted, 3 * M2);
    }

    #[test]
    fn mismatch_at_1g_and_2m_descends_two_levels() {
        let a = acceptor();
        let mut t = Script::new(|gpa, level| match level {
            PageLevel::Size1G => StatusCode::PageSizeMismatch.with_operand(2),
            PageLevel::Size2M if gpa.as_u64() == 0 => StatusCode::PageSizeMismatch.with_operand(1),
            _ => TdxStatus::SUCCESS,
        });
        a.accept_range(&mut t, range(0, G)).unwrap();
        let s = a.stats();
        assert_eq!(s.level(PageLevel::Size1G).size_mismatch, 1);
        assert_eq!(s.level(PageLevel::Size2M).accepted, 511);
        assert_eq!(s.level(PageLevel::Size4K).accepted, 512);
        // A mismatch is not a refusal: the cap stays at 1G.
        assert_eq!(a.level_cap(), PageLevel::Size1G);
    }

    #[test]
    fn size_mismatch_at_4k_is_a_module_error() {
        let a = acceptor();
        let mismatch = StatusCode::PageSizeMismatch.with_operand(0);
        let mut t = Script::new(|_, _| mismatch);
        let err = a.accept_range(&mut t, range(0, K4)).unwrap_err();
        assert_eq!(
            err,
            AcceptError::Module {
                gpa: Gpa::new_truncate(0),
                level: PageLevel::Size4K,
                status: mismatch
            }
        );
    }

    #[test]
    fn busy_is_retried_then_bounded() {
        let a = acceptor();
        let mut n = 0;
        let mut t = Script::new(|_, _| {
            n += 1;
            if n <= 3 {
                StatusCode::OperandBusy.with_operand(operand::RCX)
            } else {
                TdxStatus::SUCCESS
            }
        });
        a.accept_range(&mut t, range(0, K4)).unwrap();
        assert_eq!(a.stats().level(PageLevel::Size4K).busy, 3);

        let a = Acceptor::new(
            Gpaw::Bits48,
            AcceptPolicy {
                busy_retries: 10,
                ..AcceptPolicy::default()
            },
        );
        let mut t = Script::new(|_, _| StatusCode::OperandBusy.with_operand(operand::RCX));
        let err = a.accept_range(&mut t, range(M2, 2 * M2)).unwrap_err();
        assert_eq!(
            err,
            AcceptError::Busy {
                gpa: Gpa::new_truncate(M2),
                level: PageLevel::Size2M,
                tries: 11
            }
        );
        assert_eq!(calls(&t).len(), 11);
    }

    #[test]
    fn already_accepted_is_an_error_with_the_gpa_by_default() {
        let a = acceptor();
        let mut t = Script::new(|gpa, _| {
            if gpa.as_u64() == 2 * K4 {
                StatusCode::PageAlreadyAccepted.with_operand(0)
            } else {
                TdxStatus::SUCCESS
            }
        });
        let err = a.accept_range(&mut t, range(0, 4 * K4)).unwrap_err();
        assert_eq!(err.gpa(), Some(Gpa::new_truncate(2 * K4)));
        assert!(matches!(err, AcceptError::AlreadyAccepted { .. }));
        // It stopped there: the page after was not touched.
        assert_eq!(calls(&t).len(), 3);
    }

    #[test]
    fn already_accepted_tolerated_on_opt_in() {
        let a = Acceptor::new(
            Gpaw::Bits48,
            AcceptPolicy {
                tolerate_already_accepted: true,
                ..AcceptPolicy::default()
            },
        );
        let mut t = Script::new(|_, _| StatusCode::PageAlreadyAccepted.with_operand(1));
        a.accept_range(&mut t, range(0, M2)).unwrap();
        let s = a.stats();
        assert_eq!(s.level(PageLevel::Size2M).already_accepted, 1);
        assert_eq!(s.bytes_accepted, 0);
    }

    #[test]
    fn operand_invalid_below_1g_and_unknown_codes_are_errors() {
        for status in [
            StatusCode::OperandInvalid.with_operand(operand::RCX),
            TdxStatus::from_raw(0xC000_0DEA_0000_0000),
            StatusCode::EptWalkFailed.status(),
        ] {
            let a = acceptor();
            let mut t = Script::new(|_, _| status);
            let err = a.accept_range(&mut t, range(M2, 2 * M2)).unwrap_err();
            assert_eq!(
                err,
                AcceptError::Module {
                    gpa: Gpa::new_truncate(M2),
                    level: PageLevel::Size2M,
                    status
                }
            );
            assert_eq!(a.level_cap(), PageLevel::Size1G);
        }
    }

    #[test]
    fn shared_ranges_are_refused_before_any_call() {
        let a = acceptor();
        let mut t = Script::new(|_, _| TdxStatus::SUCCESS);
        let shared = Gpaw::Bits48.shared_bit();
        let err = a
            .accept_range(&mut t, range(shared - K4, shared + K4))
            .unwrap_err();
        assert_eq!(err, AcceptError::InvalidRange(AddrError::CrossesSharedBit));
        assert!(calls(&t).is_empty());
        // The same range is private space for a 52-bit TD.
        let a = Acceptor::new(Gpaw::Bits52, AcceptPolicy::default());
        a.accept_range(&mut t, range(shared - K4, shared + K4))
            .unwrap();
    }

    #[test]
    fn error_midway_reports_the_accepted_prefix() {
        let a = acceptor();
        let bad = 5 * M2;
        let mut t = Script::new(|gpa, level| {
            if level == PageLevel::Size1G {
                cap_2m(gpa, level)
            } else if gpa.as_u64() == bad {
                StatusCode::EptEntryStateIncorrect.status()
            } else {
                TdxStatus::SUCCESS
            }
        });
        let err = a.accept_range(&mut t, range(0, G)).unwrap_err();
        assert_eq!(err.gpa(), Some(Gpa::new_truncate(bad)));
        assert_eq!(a.stats().bytes_accepted, bad);
    }

    #[test]
    fn linux_baseline_falls_back_on_any_error_and_never_learns() {
        let a = Acceptor::new(Gpaw::Bits48, AcceptPolicy::LINUX);
        // A 2M-capped module, and BUSY once on the first 2M call.
        let mut busy_once = true;
        let mut t = Script::new(|gpa, level| match level {
            PageLevel::Size1G => StatusCode::OperandInvalid.with_operand(operand::RCX),
            PageLevel::Size2M if gpa.as_u64() == 0 && busy_once => {
                busy_once = false;
                StatusCode::OperandBusy.with_operand(operand::RCX)
            }
            _ => TdxStatus::SUCCESS,
        });
        a.accept_range(&mut t, range(0, 2 * G)).unwrap();
        let s = a.stats();
        // One refused 1G call per GiB: nothing learned.
        assert_eq!(s.level(PageLevel::Size1G).calls, 2);
        // BUSY at 2M is not retried: that chunk went 4K.
        assert_eq!(s.level(PageLevel::Size2M).busy, 1);
        assert_eq!(s.level(PageLevel::Size4K).accepted, 512);
        assert_eq!(s.bytes_accepted, 2 * G);
        // ALREADY_ACCEPTED is fatal once it reaches 4K.
        let mut t = Script::new(|_, _| StatusCode::PageAlreadyAccepted.status());
        let err = a.accept_range(&mut t, range(0, M2)).unwrap_err();
        assert!(matches!(
            err,
            AcceptError::AlreadyAccepted {
                level: PageLevel::Size4K,
                ..
            }
        ));
    }

    #[test]
    fn baseline_presets_keep_their_levels() {
        for (policy, top) in [
            (AcceptPolicy::TD_SHIM, PageLevel::Size2M),
            (AcceptPolicy::OVMF, PageLevel::Size2M),
            (AcceptPolicy::ASTERINAS, PageLevel::Size4K),
        ] {
            let a = Acceptor::new(Gpaw::Bits48, policy);
            let mut t = Script::new(|_, _| TdxStatus::SUCCESS);
            a.accept_range(&mut t, range(G - K4, 2 * G + K4)).unwrap();
            assert!(calls(&t).iter().all(|&(_, l)| l <= top), "{policy:?}");
            assert!(calls(&t).iter().any(|&(_, l)| l == top), "{policy:?}");
        }
        // td-shim tolerates ALREADY_ACCEPTED.
        let a = Acceptor::new(Gpaw::Bits48, AcceptPolicy::TD_SHIM);
        let mut t = Script::new(|_, _| StatusCode::PageAlreadyAccepted.status());
        a.accept_range(&mut t, range(0, M2)).unwrap();
    }

    proptest::proptest! {
        /// Whatever mix of host mapping sizes, every 4K page of the range is accepted exactly
        /// once and nothing outside it is touched.
        #[test]
        fn every_page_accepted_exactly_once(
            start_pages in 0u64..2048,
            len_pages in 1u64..4096,
            host_4k_mask in proptest::collection::vec(proptest::bool::ANY, 8),
            cap_at_2m in proptest::bool::ANY,
        ) {
            let start = start_pages * K4 + G - 1024 * K4;
            let end = start + len_pages * K4;
            let a = acceptor();
            // The host maps 2M range i at 4K when host_4k_mask[i % 8].
            let mut t = Script::new(|gpa, level| {
                let i = (gpa.as_u64() / M2) as usize % 8;
                match level {
                    PageLevel::Size1G if cap_at_2m => StatusCode::OperandInvalid.with_operand(operand::RCX),
                    PageLevel::Size1G => StatusCode::PageSizeMismatch.with_operand(1),
                    PageLevel::Size2M if host_4k_mask[i] => StatusCode::PageSizeMismatch.with_operand(0),
                    _ => TdxStatus::SUCCESS,
                }
            });
            a.accept_range(&mut t, range(start, end)).unwrap();
            let mut pages: Vec<u64> = Vec::new();
            let mut last_end = start;
            let accepted: Vec<(u64, PageLevel)> = calls(&t).iter().copied()
                .filter(|&(gpa, level)| match level {
                    PageLevel::Size1G => false,
                    PageLevel::Size2M => !host_4k_mask[(gpa / M2) as usize % 8],
                    PageLevel::Size4K => true,
                }).collect();
            for (gpa, level) in accepted {
                proptest::prop_assert_eq!(gpa, last_end, "in order, no gap, no overlap");
                last_end = gpa + level.size();
                for p in 0..level.pages_4k() { pages.push(gpa / K4 + p); }
            }
            proptest::prop_assert_eq!(last_end, end);
            proptest::prop_assert_eq!(pages.len() as u64, len_pages);
            proptest::prop_assert_eq!(a.stats().bytes_accepted, end - start);
        }
    }
}
