//! The simulated TD: vCPU threads that run the real guest engine (`accept`) against the real
//! host half ([`hostvmm::vmm::Host`]), with scenarios, invariants and reports.
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

// No unsafe code but one block: the call of the guest engine's `unsafe fn` conversion
// ([`convert`]), whose contract a simulated TD keeps trivially.
#![deny(unsafe_code)]

pub mod convert;
pub mod cost;
pub mod hostile;
pub mod report;
#[cfg(feature = "testing")]
pub mod sabotage;
pub mod scenario;
pub mod sched;
pub mod stress;
pub mod svg;
pub mod vcpu;

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Instant;

use accept::abi::{GhciStatus, Gpa, GpaRange, MapGpaOutcome, PageLevel};
use accept::acceptor::{AcceptPolicy, Acceptor};
use accept::convert::{ConvertPolicy, Converter};
use accept::parallel::{BootJob, WorkerProgress};
use accept::tracker::{words_needed, LazyTracker, TrackerConfig};
use accept::unaccepted::{build_table, UnacceptedTable};
use rangemap::RangeSet;

use hostvmm::kvm::{Kicker, MmuPolicy, MmuStats};
use hostvmm::module::{Access, SeptState, TdxModule};
use hostvmm::vmm::{Host, HostConfig, VmmStats};

use cost::CostTable;
pub use report::{Report, SCHEMA_VERSION};
use scenario::Scenario;
pub use sched::Mode;
use sched::{Scheduler, Switch};
use vcpu::SimVcpu;

/// Guest acceptance policies: this engine, and baselines that behave like other guests
/// (presets of [`AcceptPolicy`], written from their described behaviour).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, clap::ValueEnum)]
pub enum GuestPolicy {
    /// This project's engine: 1G -> 2M -> 4K, learns the module's cap, strict.
    Ours,
    /// Linux 6.12, shown equal to the compiled Linux code by `cargo xtask linux`: ACCEPT as
    /// `tdx_accept_memory()` (1G -> 2M -> 4K per chunk, any error -> smaller, nothing learned),
    /// lazy acceptance in runs as `accept_memory()` with `PAGE_ALREADY_ACCEPTED` fatal and
    /// unbounded waits, MapGPA as `tdx_map_gpa()` with no rollback, and no #VE on pending pages
    /// (Linux requires SEPT_VE_DISABLE).
    Linux,
    /// Like td-shim: 2M else 4K, already-accepted counts as success.
    TdShim,
    /// Like asterinas mainline: 4K accepts only.
    Asterinas,
    /// Like OVMF: 2M body, 4K head and tail.
    Ovmf,
}

impl GuestPolicy {
    /// Every policy, with its command-line name.
    pub const ALL: [(GuestPolicy, &'static str); 5] = [
        (GuestPolicy::Ours, "ours"),
        (GuestPolicy::Linux, "linux"),
        (GuestPolicy::TdShim, "td-shim"),
        (GuestPolicy::Asterinas, "asterinas"),
        (GuestPolicy::Ovmf, "ovmf"),
    ];

    /// The command-line name.
    pub fn name(self) -> &'static str {
        GuestPolicy::ALL
            .iter()
            .find(|(p, _)| *p == self)
            .map_or("?", |(_, n)| n)
    }

    /// Parses a command-line name.
    pub fn from_name(name: &str) -> Option<GuestPolicy> {
        GuestPolicy::ALL
            .iter()
            .find(|(_, n)| *n == name)
            .map(|(p, _)| *p)
    }

    /// The acceptor policy.
    pub fn accept_policy(self) -> AcceptPolicy {
        match self {
            GuestPolicy::Ours => AcceptPolicy::OURS,
            GuestPolicy::Linux => AcceptPolicy::LINUX,
            GuestPolicy::TdShim => AcceptPolicy::TD_SHIM,
            GuestPolicy::Asterinas => AcceptPolicy::ASTERINAS,
            GuestPolicy::Ovmf => AcceptPolicy::OVMF,
        }
    }

    /// The conversion policy: Linux's for [`GuestPolicy::Linux`], this engine's otherwise.
    pub fn convert_policy(self) -> ConvertPolicy {
        match self {
            GuestPolicy::Linux => ConvertPolicy::LINUX,
            _ => ConvertPolicy::OURS,
        }
    }

    /// The lazy-acceptance tuning: Linux waits without bound.
    pub fn tracker_config(self) -> TrackerConfig {
        match self {
            GuestPolicy::Linux => TrackerConfig {
                max_wait_spins: u64::MAX,
            },
            _ => TrackerConfig::default(),
        }
    }

    /// Whether the lazy tracker takes `PAGE_ALREADY_ACCEPTED` as a private page (false for
    /// Linux, which panics).
    pub fn already_accepted_is_private(self) -> bool {
        self != GuestPolicy::Linux
    }

    /// Whether the guest runs with SEPT_VE_DISABLE (no #VE on pending pages): Linux refuses to
    /// boot without it.
    pub fn sept_ve_disable(self) -> bool {
        self == GuestPolicy::Linux
    }
}

/// Host policies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, clap::ValueEnum)]
pub enum HostPolicy {
    /// This project's host: 2M at the guest's accept level, DEMOTE on demand, PROMOTE back.
    Ours,
    /// Mainline KVM: 4K private mappings only.
    #[value(name = "kvm-4k")]
    Kvm4k,
    /// The KVM TDX huge-page series: 2M, split in the zap path, one-way inhibit, no merge.
    KvmHugepage,
}

impl HostPolicy {
    /// Every policy, with its command-line name.
    pub const ALL: [(HostPolicy, &'static str); 3] = [
        (HostPolicy::Ours, "ours"),
        (HostPolicy::Kvm4k, "kvm-4k"),
        (HostPolicy::KvmHugepage, "kvm-hugepage"),
    ];

    /// The command-line name.
    pub fn name(self) -> &'static str {
        HostPolicy::ALL
            .iter()
            .find(|(p, _)| *p == self)
            .map_or("?", |(_, n)| n)
    }

    /// Parses a command-line name.
    pub fn from_name(name: &str) -> Option<HostPolicy> {
        HostPolicy::ALL
            .iter()
            .find(|(_, n)| *n == name)
            .map(|(p, _)| *p)
    }

    /// The MMU policy.
    pub fn mmu_policy(self) -> MmuPolicy {
        match self {
            HostPolicy::Ours => MmuPolicy::OURS,
            HostPolicy::Kvm4k => MmuPolicy::KVM_4K,
            HostPolicy::KvmHugepage => MmuPolicy::KVM_HUGEPAGE,
        }
    }
}

/// The module's largest ACCEPT level, as the command line names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, clap::ValueEnum)]
pub enum AcceptLevel {
    /// 2M: every public module.
    #[default]
    #[value(name = "2m", alias = "2M")]
    M2,
    /// 1G: a future module.
    #[value(name = "1g", alias = "1G")]
    G1,
}

impl AcceptLevel {
    /// The page level.
    pub fn level(self) -> PageLevel {
        match self {
            AcceptLevel::M2 => PageLevel::Size2M,
            AcceptLevel::G1 => PageLevel::Size1G,
        }
    }

    /// The level's command-line name ("1g" for 1G, "2m" for anything smaller).
    pub fn name_of(level: PageLevel) -> &'static str {
        match level {
            PageLevel::Size1G => "1g",
            _ => "2m",
        }
    }

    /// Parses a command-line name ("2m", "2M", "1g", "1G").
    pub fn from_name(name: &str) -> Option<AcceptLevel> {
        match name {
            "2m" | "2M" => Some(AcceptLevel::M2),
            "1g" | "1G" => Some(AcceptLevel::G1),
            _ => None,
        }
    }
}

/// The conversion backend under the host half.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, clap::ValueEnum)]
pub enum GmemBackend {
    /// The in-memory guest_memfd model
    #[default]
    Model,
    /// The kernel's guest_memfd from /dev/kvm (feature kernel-gmem)
    Kernel,
}

impl GmemBackend {
    /// Both backends with their command-line names.
    pub const ALL: [(GmemBackend, &'static str); 2] = [
        (GmemBackend::Model, "model"),
        (GmemBackend::Kernel, "kernel"),
    ];

    /// The command-line name.
    pub fn name(self) -> &'static str {
        match self {
            GmemBackend::Model => "model",
            GmemBackend::Kernel => "kernel",
        }
    }

    /// Parses a command-line name.
    pub fn from_name(name: &str) -> Option<GmemBackend> {
        GmemBackend::ALL
            .iter()
            .find(|(_, n)| *n == name)
            .map(|(b, _)| *b)
    }
}

/// One simulation run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SimConfig {
    /// What the TD does.
    pub scenario: Scenario,
    /// Guest memory in bytes (a multiple of 2 MiB, at least 64 MiB).
    pub memory: u64,
    /// vCPUs (threads).
    pub vcpus: u32,
    /// Seed of every random choice.
    pub seed: u64,
    /// Guest policy.
    pub guest: GuestPolicy,
    /// Host policy.
    pub host: HostPolicy,
    /// #VE on access to pending pages (TD attribute SEPT_VE_DISABLE clear).
    pub pending_ve: bool,
    /// The module's largest ACCEPT level (2M in every public module; 1G for a future one).
    pub max_accept_level: PageLevel,
    /// Per-mille chance that a vCPU has an interrupt pending at a TDCALL.
    pub irq_per_mille: u32,
    /// Per-mille chance that a host interrupt is pending when the host handles an exit: the
    /// next DEMOTE or PROMOTE answers INTERRUPTED_RESTARTABLE and the MMU retries it (benign
    /// fault injection for stress runs).
    pub host_irq_per_mille: u32,
    /// A scheduling point switches to a random other vCPU with probability 1 / this
    /// (deterministic mode).
    pub switch_every: u64,
    /// Scale of the scenario's traffic (1 = default).
    pub traffic: u32,
    /// A deliberate breakage, to check the checker (`None` in every normal run; feature
    /// `testing`).
    #[cfg(feature = "testing")]
    pub sabotage: Option<sabotage::Sabotage>,
    /// Deterministic (coroutines, exact counts) or parallel (one OS thread per vCPU).
    pub mode: Mode,
    /// The conversion backend: the guest_memfd model or the kernel's guest_memfd.
    pub gmem: GmemBackend,
}

impl SimConfig {
    /// The default run of `scenario`: 16 GiB, 8 vCPUs, seed 1, our policies.
    pub fn new(scenario: Scenario) -> SimConfig {
        SimConfig {
            scenario,
            memory: 16 << 30,
            vcpus: 8,
            seed: 1,
            guest: GuestPolicy::Ours,
            host: HostPolicy::Ours,
            pending_ve: true,
            max_accept_level: PageLevel::Size2M,
            irq_per_mille: 20,
            host_irq_per_mille: 0,
            switch_every: 4,
            traffic: 1,
            #[cfg(feature = "testing")]
            sabotage: None,
            mode: Mode::Deterministic,
            gmem: GmemBackend::Model,
        }
    }
}

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

/// Marks a parallel-mode vCPU finished when dropped (also when its thread panics).
struct Finish<'s>(&'s Scheduler, usize);

impl Drop for Finish<'_> {
    fn drop(&mut self) {
        self.0.finish(self.1);
    }
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
    accepted: RangeSet<u64>,
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
        let double = {
            let mut b = lock(&self.belief);
            let double = b.accepted.overlaps(&(s..e));
            b.accepted.insert(s..e);
            double
        };
        if double {
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
            b.accepted.remove(s..done);
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
            let b = lock(&self.belief);
            (
                optimal_in(&b.accepted, 0, memory),
                optimal_in(&b.accepted, pool_lo, pool_hi),
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
        lock(&self.belief)
            .accepted
            .iter()
            .map(|r| r.end - r.start)
            .sum()
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
                clip(&b.accepted),
                clip(&b.shared),
                b.shadow.range(s..e).map(|(&k, &v)| (k, v)).collect(),
            )
        };
        self.check_parts(&accepted, &shared, &shadow);
    }

    /// Checks every invariant over the whole TD.
    pub fn check_all(&self) {
        let (accepted, shared, shadow): (Pairs, Pairs, Pairs) = {
            let b = lock(&self.belief);
            (
                b.accepted.iter().map(|r| (r.start, r.end)).collect(),
                b.shared.iter().map(|r| (r.start, r.end)).collect(),
                b.shadow.iter().map(|(&k, &v)| (k, v)).collect(),
            )
        };
        self.check_parts(&accepted, &shared, &shadow);
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

/// Private mapping totals over the whole TD: (MAPPED bytes, bytes in MAPPED leaves of 2M+).
fn mapping_totals(host: &Host, memory: u64) -> (u64, u64) {
    mapping_totals_in(host, 0, memory)
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

/// Runs one simulation.
///
/// `progress(done, total)` is called from the vCPU threads as scenario steps complete.
///
/// # Errors
/// [`SimError`] for an unusable configuration. Invariant violations and a TD the host killed
/// are results, in the [`Report`].
pub fn run(config: &SimConfig, progress: &(dyn Fn(u64, u64) + Sync)) -> Result<Report, SimError> {
    run_with(config, progress, |_| {})
}

/// As [`run`], and lets `inspect` look at the finished TD (to draw it, for example) before it
/// is dropped.
///
/// # Errors
/// As [`run`].
pub fn run_with(
    config: &SimConfig,
    progress: &(dyn Fn(u64, u64) + Sync),
    inspect: impl FnOnce(&SimTd<'_>),
) -> Result<Report, SimError> {
    run_inner(config, progress, None, inspect)
}

/// As [`run_with`], and hands `sink` a [`Sample`] of the private mapping every `every` scenario
/// steps (counted over all vCPUs, taken by the vCPU that completes the step, which holds the
/// scheduler's baton) and once more at the end, after the host's final merge pass. Sampling
/// reads state only: the counts are those of the same run without it.
///
/// # Errors
/// As [`run`].
pub fn run_sampled(
    config: &SimConfig,
    progress: &(dyn Fn(u64, u64) + Sync),
    every: u64,
    sink: &(dyn Fn(Sample) + Sync),
    inspect: impl FnOnce(&SimTd<'_>),
) -> Result<Report, SimError> {
    run_inner(config, progress, Some(Sampler { every, sink }), inspect)
}

/// A host over the kernel's guest_memfd.
#[cfg(feature = "kernel-gmem")]
fn kernel_host(config: HostConfig, kicker: Arc<ModuleKicker>) -> Result<Host, SimError> {
    let backend = hostvmm::gmem::KernelBackend::new(config.memory, hostvmm::vmm::GUEST_HPA_BASE)
        .map_err(|e| SimError::Config(format!("--gmem kernel: {e}")))?;
    Ok(Host::with_backend(
        config,
        kicker,
        Arc::new(Mutex::new(backend)),
    )?)
}

/// Without the `kernel-gmem` feature there is no kernel backend.
#[cfg(not(feature = "kernel-gmem"))]
fn kernel_host(_config: HostConfig, _kicker: Arc<ModuleKicker>) -> Result<Host, SimError> {
    Err(SimError::Config(
        "--gmem kernel: hostvmm was built without the `kernel-gmem` feature".into(),
    ))
}

fn run_inner(
    config: &SimConfig,
    progress: &(dyn Fn(u64, u64) + Sync),
    sampler: Option<Sampler<'_>>,
    inspect: impl FnOnce(&SimTd<'_>),
) -> Result<Report, SimError> {
    let m2 = PageLevel::Size2M.size();
    if config.memory < 64 << 20 || config.memory % m2 != 0 {
        return Err(SimError::Config(format!(
            "memory must be a multiple of 2 MiB and at least 64 MiB, not {}",
            config.memory
        )));
    }
    if config.vcpus == 0 || config.vcpus > 512 {
        return Err(SimError::Config(format!("{} vCPUs", config.vcpus)));
    }
    let wall = Instant::now();
    let mut host_config = HostConfig::new(config.memory, config.vcpus);
    host_config.module.pending_ve = config.pending_ve && !config.guest.sept_ve_disable();
    host_config.module.max_accept_level = config.max_accept_level;
    host_config.mmu = config.host.mmu_policy();
    #[cfg(feature = "testing")]
    if config.sabotage == Some(sabotage::Sabotage::IgnoreSplit) {
        host_config.mmu.fault_split = hostvmm::kvm::FaultSplit::Ignore;
    }
    let kicker = Arc::new(ModuleKicker::default());
    let host = match config.gmem {
        GmemBackend::Model => Host::new(host_config, kicker.clone())?,
        GmemBackend::Kernel => kernel_host(host_config, kicker.clone())?,
    };
    kicker.connect(host.module().clone());
    let gpaw = host_config.module.gpaw;

    // Firmware side: what is accepted eagerly, and the Linux-format table for the rest.
    let eager_end = config.scenario.eager_bytes(config.memory);
    let mut table_buf = vec![0u8; 64 + (config.memory / m2 / 8) as usize + 8];
    let table = if eager_end < config.memory {
        let lazy = GpaRange::new(eager_end, config.memory)
            .map_err(|e| SimError::Config(format!("lazy range: {e}")))?;
        let mut accept_now = Vec::new();
        let len = build_table(&mut table_buf, &[lazy], m2 as u32, |r| accept_now.push(r))
            .map_err(|e| SimError::Config(format!("unaccepted table: {e}")))?;
        if !accept_now.is_empty() {
            return Err(SimError::Config("unaligned lazy range".into()));
        }
        Some(
            UnacceptedTable::parse(&table_buf[..len])
                .map_err(|e| SimError::Config(format!("unaccepted table: {e}")))?,
        )
    } else {
        None
    };

    // Kernel side: the engine objects every vCPU shares.
    let acceptor = Acceptor::new(gpaw, config.guest.accept_policy());
    let converter = Converter::new(gpaw, config.guest.convert_policy());
    let units = table.as_ref().map_or(0, |t| t.units());
    let words: Vec<AtomicU64> = (0..words_needed(units).max(1))
        .map(|_| AtomicU64::new(0))
        .collect();
    let inflight: Vec<AtomicU64> = (0..config.vcpus).map(|_| AtomicU64::new(0)).collect();
    let tracker_config = config.guest.tracker_config();
    let tracker = match &table {
        Some(t) => LazyTracker::from_table(&acceptor, t, &words, &inflight, tracker_config),
        None => LazyTracker::new(
            &acceptor,
            eager_end,
            m2,
            0,
            &words,
            &inflight,
            tracker_config,
        ),
    }
    .map_err(|e| SimError::Config(format!("tracker: {e}")))?
    .already_accepted_is_private(config.guest.already_accepted_is_private());

    let td = SimTd {
        host,
        sched: Scheduler::new(
            config.mode,
            config.vcpus as usize,
            config.seed,
            config.switch_every,
        ),
        cost: CostTable::DEFAULT,
        config: *config,
        guest: Guest {
            acceptor: &acceptor,
            converter: &converter,
            tracker: &tracker,
            eager_end,
        },
        belief: Mutex::new(Belief::default()),
        violations: Mutex::new(ViolationLog::default()),
        sampler,
    };
    let boot_ranges = [
        GpaRange::new(0, eager_end).map_err(|e| SimError::Config(format!("eager range: {e}")))?
    ];
    let boot_progress: Vec<WorkerProgress> =
        (0..config.vcpus).map(|_| WorkerProgress::new()).collect();
    let job = BootJob::new(&boot_ranges, &boot_progress);
    let plan = scenario::Plan::new(&td, &job);
    let n = config.vcpus as usize;
    let body = |id: usize, switch: Switch<'_>| {
        let mut v = SimVcpu::new(&td, id, config.seed, switch);
        let r = plan.run_vcpu(&mut v, progress);
        v.halt();
        if let Err(e) = r {
            if v.fatal().is_none() {
                log::error!("vCPU {id}: {e}");
            }
        }
        (v.stats(), v.fatal().map(str::to_string).or(plan.error(id)))
    };
    let outcomes: Vec<Option<(vcpu::VcpuStats, Option<String>)>> = match config.mode {
        Mode::Deterministic => sched::run_coroutines(&td.sched, n, body)?,
        Mode::Parallel => std::thread::scope(|scope| {
            let handles: Vec<_> = (0..n)
                .map(|id| {
                    let (body, sched) = (&body, &td.sched);
                    std::thread::Builder::new()
                        .name(format!("vcpu{id}"))
                        .spawn_scoped(scope, move || {
                            // Finished (or panicked), this vCPU no longer paces the others.
                            let _done = Finish(sched, id);
                            body(id, Switch::THREAD)
                        })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.ok().and_then(|h| h.join().ok()))
                .collect()
        }),
    };
    let results: Vec<(vcpu::VcpuStats, Option<String>)> = outcomes
        .into_iter()
        .map(|o| {
            o.unwrap_or_else(|| {
                (
                    vcpu::VcpuStats::default(),
                    Some("vCPU panicked or could not start".into()),
                )
            })
        })
        .collect();
    td.host.merge_pass();
    td.maybe_sample(plan.steps_done(), plan.pool(), true);
    td.check_all();
    let (private, huge) = mapping_totals(&td.host, config.memory);
    let optimal = optimal_in(&lock(&td.belief).accepted, 0, config.memory);
    inspect(&td);
    let log = std::mem::take(&mut *lock(&td.violations));
    let totals = MappingTotals {
        private,
        huge,
        optimal,
    };
    Ok(report::build(&td, &results, log, totals, wall.elapsed()))
}
