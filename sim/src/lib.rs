//! The simulated TD: vCPU threads that run the real guest engine (`accept`) against the real
//! host half ([`hostvmm::vmm::Host`]), with scenarios, invariants and reports. This crate
//! (`tdmem-sim`) also holds the binaries `tdsim` (the simulator's command line) and `tdhost`
//! (the host half serving the bare-metal test image, `docs/e2e.md`), and depends on `hostvmm`
//! with its `testing` and `serde` features.
//!
//! - [`SimConfig`] describes a run: scenario, memory size, vCPUs, seed, guest and host
//!   policies, module capabilities.
//! - [`run`] builds the host and the guest's shared state (acceptor, converter, lazy-accept
//!   tracker over a Linux-format unaccepted table), runs the vCPUs ([`sched`]: coroutines on
//!   one thread in [`Mode::Deterministic`], one OS thread each in [`Mode::Parallel`]), runs the
//!   scenario ([`scenario`]) and checks the invariants, returning a [`Report`].
//! - Deterministic runs are exact: the same configuration and seed give identical counts.
//!   Parallel runs are not; they exist for real contention, and [`stress`] loops them.
//!
//! What the guest believes (pages it accepted, pages it gave to the host, the content it wrote)
//! is tracked next to the TD and checked against the module's Secure-EPT and the guest_memfd:
//! no page accepted twice; no GPA both mapped private and shared; every page the guest believes
//! private-accepted is MAPPED; private content survives DEMOTE/PROMOTE; poisoned pages are never
//! mapped again; no livelock (bounded exits per instruction).
//!
//! Also here: [`hostile`], the catalogue of hostile-host behaviours (`docs/hostile.md`);
//! [`cost`], the cost table behind modelled time; [`svg`], the drawing of a TD's memory;
//! [`convert`], the one `unsafe` call of the guest engine's conversion. Features:
//! `kernel-gmem` (default, passed to `hostvmm`) for `--gmem kernel`; `testing` for
//! `sabotage`, deliberate breakages that show each invariant check can fail.

// No unsafe code but one block: the call of the guest engine's `unsafe fn` conversion
// ([`convert`]), whose contract a simulated TD keeps trivially.
#![deny(unsafe_code)]

mod accepted;
mod config;
pub mod convert;
pub mod cost;
pub mod hostile;
pub mod report;
mod runner;
#[cfg(feature = "testing")]
pub mod sabotage;
pub mod scenario;
pub mod sched;
pub mod stress;
pub mod svg;
pub mod vcpu;

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use accept::abi::{GhciStatus, Gpa, GpaRange, MapGpaOutcome, PageLevel};
use accept::acceptor::Acceptor;
use accept::convert::Converter;
use accept::tracker::LazyTracker;
use rangemap::RangeSet;

use accepted::Accepted;

use hostvmm::kvm::{Kicker, MmuStats};
use hostvmm::module::{Access, SeptState, TdxModule};
use hostvmm::vmm::{Host, VmmStats};

pub use config::{AcceptLevel, GmemBackend, GuestPolicy, HostPolicy, SimConfig};
use cost::CostTable;
pub use report::{Report, SCHEMA_VERSION};
pub use runner::{run, run_sampled, run_with};
pub use sched::Mode;
use sched::Scheduler;

/// A broken invariant.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub enum ViolationKind {
    /// A page was accepted twice without being given up in between.
    DoubleAccept,
    /// A GPA is shared in the guest_memfd and mapped private in the Secure-EPT.
    PrivateAndShared,
    /// A page the guest believes private-accepted is not MAPPED.
    AcceptedNotMapped,
    /// Private content the guest wrote is gone or changed.
    ContentLost,
    /// A poisoned page is mapped again.
    PoisonReused,
    /// An instruction needed more exits than the bound.
    Livelock,
    /// The Secure-EPT tree is malformed.
    Tree,
}

/// One violation, with where it was seen.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Violation {
    /// Which invariant.
    pub kind: ViolationKind,
    /// What was seen.
    pub detail: String,
}

/// What went wrong with a run itself (not an invariant: the configuration).
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    /// Unusable configuration.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The host could not be built.
    #[error("host: {0}")]
    Host(#[from] hostvmm::vmm::HostError),
    /// The deterministic scheduler could not start its coroutines.
    #[error("scheduler: {0}")]
    Stack(#[from] sched::StackError),
}

/// KVM's kick as the simulator does it: every vCPU inside the TD exits and re-enters
/// ([`TdxModule::kick_all`]), waiting for a guest call in progress to finish, as an IPI takes
/// effect at an instruction boundary.
#[derive(Debug, Default)]
pub struct ModuleKicker {
    module: std::sync::OnceLock<Arc<TdxModule>>,
}

impl ModuleKicker {
    /// Connects the kicker to the module once the host is built.
    pub fn connect(&self, module: Arc<TdxModule>) {
        let _ = self.module.set(module);
    }
}

impl Kicker for ModuleKicker {
    fn kick_all(&self) {
        match self.module.get() {
            Some(m) => m.kick_all(),
            None => std::thread::yield_now(),
        }
    }
}

/// What the guest believes, next to the TD.
#[derive(Debug, Default)]
struct Belief {
    shared: RangeSet<u64>,
    /// Expected token of private 4K pages the guest wrote.
    shadow: BTreeMap<u64, u64>,
    /// Host memory behind shared pages (the model of shared memory: a token per page).
    shared_mem: HashMap<u64, u64>,
}

/// The guest-side engine objects, shared by every vCPU.
#[derive(Debug)]
pub struct Guest<'g> {
    /// The acceptor.
    pub acceptor: &'g Acceptor,
    /// The converter.
    pub converter: &'g Converter,
    /// The kernel's lazy-accept tracker.
    pub tracker: &'g LazyTracker<'g>,
    /// End of what the firmware accepts eagerly (start of lazily accepted memory).
    pub eager_end: u64,
}

/// One simulated TD: host, scheduler, guest engine objects, and the guest's belief.
pub struct SimTd<'g> {
    host: Host,
    sched: Scheduler,
    cost: CostTable,
    config: SimConfig,
    guest: Guest<'g>,
    belief: Mutex<Belief>,
    /// What the guest believes accepted: beside `belief`, sharded, since every ACCEPT writes it.
    accepted: Accepted,
    violations: Mutex<ViolationLog>,
    sampler: Option<Sampler<'g>>,
}

type Pairs = Vec<(u64, u64)>;

/// Every violation counted, the first ones kept in full.
#[derive(Debug, Default)]
pub(crate) struct ViolationLog {
    pub(crate) kept: Vec<Violation>,
    pub(crate) count: usize,
    pub(crate) by_kind: BTreeMap<ViolationKind, usize>,
}

/// Private mapping totals at the end of a run.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct MappingTotals {
    /// MAPPED bytes.
    pub(crate) private: u64,
    /// Of those, bytes in 2M+ leaves.
    pub(crate) huge: u64,
    /// Bytes in 2M ranges the guest holds entirely private and accepted.
    pub(crate) optimal: u64,
}

/// The private mapping at one point of a run (see [`run_sampled`]): whole-TD figures as in the
/// [`Report`], and the same for the scenario's bounce-buffer pool (zero when it has none).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub struct Sample {
    /// Scenario steps completed by all vCPUs together when the sample was taken.
    pub step: u64,
    /// Bytes in MAPPED leaves of 2M or larger.
    pub huge_private_bytes: u64,
    /// Bytes in 2M-aligned ranges the guest holds entirely private and accepted.
    pub optimal_huge_private_bytes: u64,
    /// `huge_private_bytes` inside the bounce-buffer pool.
    pub pool_huge_bytes: u64,
    /// `optimal_huge_private_bytes` inside the bounce-buffer pool.
    pub pool_optimal_bytes: u64,
}

/// Where samples go, and how often (every `every` scenario steps).
#[derive(Clone, Copy)]
struct Sampler<'s> {
    every: u64,
    sink: &'s (dyn Fn(Sample) + Sync),
}

impl fmt::Debug for SimTd<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SimTd")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// Violations kept in full in a report (all are counted).
const MAX_KEPT_VIOLATIONS: usize = 64;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl<'g> SimTd<'g> {
    /// The host half.
    pub fn host(&self) -> &Host {
        &self.host
    }

    /// The run's configuration.
    pub fn config(&self) -> &SimConfig {
        &self.config
    }

    /// The guest engine objects.
    pub fn guest(&self) -> &Guest<'g> {
        &self.guest
    }

    pub(crate) fn host_cost(
        &self,
        m0: &MmuStats,
        m1: &MmuStats,
        v0: &VmmStats,
        v1: &VmmStats,
    ) -> u64 {
        vcpu::host_cost(&self.cost, m0, m1, v0, v1)
    }

    /// Records a violation.
    pub fn violation(&self, kind: ViolationKind, detail: String) {
        log::warn!("invariant {kind:?}: {detail}");
        let mut v = lock(&self.violations);
        v.count += 1;
        *v.by_kind.entry(kind).or_insert(0) += 1;
        if v.kept.len() < MAX_KEPT_VIOLATIONS {
            v.kept.push(Violation { kind, detail });
        }
    }

    fn shared_bit(&self) -> u64 {
        self.config_gpaw().shared_bit()
    }

    fn config_gpaw(&self) -> accept::abi::Gpaw {
        self.host.config().module.gpaw
    }

    pub(crate) fn note_accept(&self, gpa: Gpa, level: PageLevel) {
        let (s, e) = (gpa.as_u64(), gpa.as_u64() + level.size());
        if self.accepted.insert(s, e) {
            self.violation(
                ViolationKind::DoubleAccept,
                format!("{level} ACCEPT of {gpa} succeeded over accepted pages"),
            );
        }
    }

    pub(crate) fn note_map_gpa(&self, start: u64, len: u64, out: &MapGpaOutcome) {
        if !out.tdcall.is_success() {
            return;
        }
        let bit = start & self.shared_bit();
        let s = start & !self.shared_bit();
        let Some(end) = s.checked_add(len) else {
            return;
        };
        let done = match out.status {
            GhciStatus::Success => end,
            GhciStatus::Retry => {
                let r = out.resume_gpa & !self.shared_bit();
                if r >= s && r <= end {
                    r
                } else {
                    s
                }
            }
            _ => s,
        };
        if done == s {
            // Nothing converted (and `RangeSet` takes no empty range).
            return;
        }
        let mut b = lock(&self.belief);
        if bit != 0 {
            self.accepted.remove(s, done);
            b.shared.insert(s..done);
            let keys: Vec<u64> = b.shadow.range(s..done).map(|(&k, _)| k).collect();
            for k in keys {
                b.shadow.remove(&k);
            }
        } else {
            b.shared.remove(s..done);
            let keys: Vec<u64> = b
                .shared_mem
                .keys()
                .copied()
                .filter(|&k| k >= s && k < done)
                .collect();
            for k in keys {
                b.shared_mem.remove(&k);
            }
        }
    }

    pub(crate) fn note_write(&self, gpa: u64, token: u64) {
        if gpa & self.shared_bit() == 0 {
            lock(&self.belief).shadow.insert(gpa & !0xFFF, token);
        }
    }

    pub(crate) fn shared_access(&self, gpa: u64, access: Access) -> u64 {
        let page = gpa & !self.shared_bit() & !0xFFF;
        let mut b = lock(&self.belief);
        match access {
            Access::Read => b.shared_mem.get(&page).copied().unwrap_or(0),
            Access::Write(t) => {
                b.shared_mem.insert(page, t);
                t
            }
        }
    }

    /// Takes a [`Sample`] after `step` scenario steps when sampling is on and due; `pool` is the
    /// scenario's bounce-buffer pool (empty when it has none).
    pub(crate) fn maybe_sample(&self, step: u64, pool: (u64, u64), last: bool) {
        let Some(s) = self.sampler else {
            return;
        };
        if !last && step % s.every.max(1) != 0 {
            return;
        }
        let memory = self.config.memory;
        let (pool_lo, pool_hi) = (pool.0.min(memory), pool.1.min(memory));
        let (optimal, pool_optimal) = {
            let accepted = self.accepted.to_set();
            (
                optimal_in(&accepted, 0, memory),
                optimal_in(&accepted, pool_lo, pool_hi),
            )
        };
        let (_, huge) = mapping_totals_in(&self.host, 0, memory);
        let (_, pool_huge) = mapping_totals_in(&self.host, pool_lo, pool_hi);
        (s.sink)(Sample {
            step,
            huge_private_bytes: huge,
            optimal_huge_private_bytes: optimal,
            pool_huge_bytes: pool_huge,
            pool_optimal_bytes: pool_optimal,
        });
    }

    /// Bytes the guest believes private-accepted.
    pub fn accepted_bytes(&self) -> u64 {
        self.accepted.to_set().iter().map(|r| r.end - r.start).sum()
    }

    /// Checks the part of the invariants that concern `range` (cheap enough after each step).
    pub fn check_range(&self, range: GpaRange) {
        let (accepted, shared, shadow): (Pairs, Pairs, Pairs) = {
            let b = lock(&self.belief);
            let (s, e) = (range.start().as_u64(), range.end().as_u64());
            let clip = |set: &RangeSet<u64>| {
                set.iter()
                    .filter(|r| r.end > s && r.start < e)
                    .map(|r| (r.start.max(s), r.end.min(e)))
                    .collect::<Vec<_>>()
            };
            (
                self.accepted.clip(s, e),
                clip(&b.shared),
                b.shadow.range(s..e).map(|(&k, &v)| (k, v)).collect(),
            )
        };
        self.check_parts(&accepted, &shared, &shadow);
    }

    /// Checks every invariant over the whole TD.
    pub fn check_all(&self) {
        self.check_all_on(1);
    }

    /// As [`SimTd::check_all`], the Secure-EPT lookups split over `threads` threads by GPA
    /// (the checks only read; parallel mode uses one thread per vCPU, so its final check does
    /// not become the serial part of the run).
    pub fn check_all_on(&self, threads: usize) {
        let (accepted, shared, shadow): (Pairs, Pairs, Pairs) = {
            let b = lock(&self.belief);
            (
                self.accepted.clip(0, u64::MAX),
                b.shared.iter().map(|r| (r.start, r.end)).collect(),
                b.shadow.iter().map(|(&k, &v)| (k, v)).collect(),
            )
        };
        let bounds = split_bounds(self.config.memory, threads);
        if bounds.len() <= 2 {
            self.check_parts(&accepted, &shared, &shadow);
        } else {
            std::thread::scope(|scope| {
                for w in bounds.windows(2) {
                    let (lo, hi) = (w[0], w[1]);
                    let (accepted, shared) =
                        (clip_pairs(&accepted, lo, hi), clip_pairs(&shared, lo, hi));
                    let shadow: Pairs = shadow
                        .iter()
                        .filter(|(gpa, _)| (lo..hi).contains(gpa))
                        .copied()
                        .collect();
                    scope.spawn(move || self.check_parts(&accepted, &shared, &shadow));
                }
            });
        }
        // The host's own view of shared memory, too.
        let host_shared: Vec<(u64, u64)> = self
            .host
            .gmem()
            .ranges()
            .into_iter()
            .filter(|(_, s)| *s == hostvmm::gmem::Shareability::Shared)
            .map(|(r, _)| (r.start().as_u64(), r.end().as_u64()))
            .collect();
        self.check_parts(&[], &host_shared, &[]);
        if let Err(e) = self.host.module().check_tree() {
            self.violation(ViolationKind::Tree, e.to_string());
        }
    }

    /// As [`SimTd::check_range`], limited to the parts of `range` that vCPU `vcpu` owns (see
    /// [`scenario`]) in parallel mode, where other vCPUs may be converting or writing theirs
    /// right now. The whole range in deterministic mode.
    pub fn check_range_of(&self, range: GpaRange, vcpu: usize) {
        if self.config.mode == Mode::Deterministic {
            self.check_range(range);
            return;
        }
        for part in scenario::owned_parts(range, vcpu, self.config.vcpus) {
            self.check_range(part);
        }
    }

    fn check_parts(&self, accepted: &[(u64, u64)], shared: &[(u64, u64)], shadow: &[(u64, u64)]) {
        // No zap, split or merge in flight while the Secure-EPT is read (parallel mode).
        let hold = self.host.mmu().hold_off_zaps();
        let module = self.host.module();
        for &(s, e) in accepted {
            let mut cur = s;
            while cur < e {
                let leaf = module.leaf(Gpa::new_truncate(cur));
                let size = 1u64 << (12 + 9 * u32::from(leaf.level));
                if leaf.state != SeptState::Mapped {
                    self.violation(
                        ViolationKind::AcceptedNotMapped,
                        format!("{cur:#x} is {:?} at level {}", leaf.state, leaf.level),
                    );
                    break;
                }
                cur = (cur & !(size - 1)) + size;
            }
        }
        for &(s, e) in shared {
            let mut cur = s;
            while cur < e {
                let leaf = module.leaf(Gpa::new_truncate(cur));
                let size = 1u64 << (12 + 9 * u32::from(leaf.level));
                if leaf.state.is_leaf() {
                    self.violation(
                        ViolationKind::PrivateAndShared,
                        format!("{cur:#x} is shared and has a {:?} private leaf", leaf.state),
                    );
                    break;
                }
                cur = (cur & !(size - 1)) + size;
            }
        }
        for &(gpa, token) in shadow {
            let leaf = module.leaf(Gpa::new_truncate(gpa));
            let found = if leaf.state == SeptState::Mapped {
                Some(module.read_content(leaf.page_hpa(gpa)))
            } else {
                None
            };
            if found != Some(token) {
                self.violation(
                    ViolationKind::ContentLost,
                    format!("{gpa:#x}: wrote {token:#x}, found {found:?}"),
                );
            }
        }
        // Lock order: the backing before the MMU lock.
        drop(hold);
        if self.host.gmem().poisoned_pages() > 0 {
            let g = self.host.gmem();
            for &(s, e) in accepted {
                let mut cur = s;
                while cur < e {
                    if g.is_poisoned(Gpa::new_truncate(cur)) {
                        self.violation(
                            ViolationKind::PoisonReused,
                            format!("{cur:#x} is poisoned and accepted"),
                        );
                    }
                    cur += 4096;
                }
            }
        }
    }
}

/// Private mapping totals over the whole TD: (MAPPED bytes, bytes in MAPPED leaves of 2M+),
/// the walk split over `threads` threads by GPA.
fn mapping_totals(host: &Host, memory: u64, threads: usize) -> (u64, u64) {
    let bounds = split_bounds(memory, threads);
    if bounds.len() <= 2 {
        return mapping_totals_in(host, 0, memory);
    }
    std::thread::scope(|scope| {
        let parts: Vec<_> = bounds
            .windows(2)
            .map(|w| {
                let (lo, hi) = (w[0], w[1]);
                scope.spawn(move || mapping_totals_in(host, lo, hi))
            })
            .collect();
        parts.into_iter().fold((0, 0), |(p, h), part| {
            let (pp, hh) = part.join().unwrap_or_else(|e| std::panic::resume_unwind(e));
            (p + pp, h + hh)
        })
    })
}

/// `[0, memory)` cut into at most `parts` pieces at 1 GiB boundaries (so no piece starts inside
/// a leaf): the boundaries, first 0 and last `memory`.
pub(crate) fn split_bounds(memory: u64, parts: usize) -> Vec<u64> {
    let g1 = PageLevel::Size1G.size();
    let gibs = memory.div_ceil(g1);
    let parts = (parts.max(1) as u64).min(gibs.max(1));
    let mut bounds: Vec<u64> = (0..parts).map(|i| (gibs * i / parts) * g1).collect();
    bounds.push(memory);
    bounds.dedup();
    bounds
}

/// The parts of `pairs` inside `[lo, hi)`.
fn clip_pairs(pairs: &[(u64, u64)], lo: u64, hi: u64) -> Pairs {
    pairs
        .iter()
        .filter(|&&(s, e)| e > lo && s < hi)
        .map(|&(s, e)| (s.max(lo), e.min(hi)))
        .collect()
}

/// Private mapping totals over `[lo, hi)` (2 MiB aligned): as [`mapping_totals`].
fn mapping_totals_in(host: &Host, lo: u64, hi: u64) -> (u64, u64) {
    let module = host.module();
    let (mut private, mut huge) = (0u64, 0u64);
    let mut cur = lo;
    while cur < hi {
        let leaf = module.leaf(Gpa::new_truncate(cur));
        let size = 1u64 << (12 + 9 * u32::from(leaf.level));
        if leaf.state == SeptState::Mapped {
            let len = size.min(hi - cur);
            private += len;
            if leaf.level >= 1 {
                huge += len;
            }
        }
        cur = (cur & !(size - 1)) + size;
    }
    (private, huge)
}

/// Bytes of `accepted` in 2M-aligned ranges held entirely, clipped to `[lo, hi)`.
fn optimal_in(accepted: &RangeSet<u64>, lo: u64, hi: u64) -> u64 {
    let m2 = PageLevel::Size2M.size();
    accepted
        .iter()
        .map(|r| {
            let s2 = r.start.max(lo).div_ceil(m2) * m2;
            let e2 = r.end.min(hi) / m2 * m2;
            e2.saturating_sub(s2)
        })
        .sum()
}

#[cfg(test)]
mod split_tests {
    use super::{clip_pairs, split_bounds};

    const G: u64 = 1 << 30;

    #[test]
    fn the_split_cuts_at_gib_boundaries_and_covers_everything() {
        assert_eq!(split_bounds(256 << 20, 4), vec![0, 256 << 20]);
        assert_eq!(split_bounds(3 * G, 1), vec![0, 3 * G]);
        assert_eq!(split_bounds(3 * G, 2), vec![0, G, 3 * G]);
        assert_eq!(split_bounds(3 * G, 8), vec![0, G, 2 * G, 3 * G]);
        assert_eq!(split_bounds(5 * G / 2, 4), vec![0, G, 2 * G, 5 * G / 2]);
        assert_eq!(split_bounds(1024 * G, 0), vec![0, 1024 * G]);
    }

    #[test]
    fn clipping_keeps_only_the_parts_inside() {
        let pairs = [(0, G / 2), (G - 4096, G + 4096), (2 * G, 3 * G)];
        assert_eq!(clip_pairs(&pairs, G, 2 * G), vec![(G, G + 4096)]);
        assert_eq!(clip_pairs(&pairs, 0, G), vec![(0, G / 2), (G - 4096, G)]);
        assert!(clip_pairs(&pairs, 3 * G, 4 * G).is_empty());
    }
}
