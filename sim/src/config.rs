//! What a run is: the guest and host policies, the module's ACCEPT cap, the conversion backend
//! and the [`SimConfig`] that puts them together.

use accept::abi::PageLevel;
use accept::acceptor::AcceptPolicy;
use accept::convert::ConvertPolicy;
use accept::tracker::TrackerConfig;
use hostvmm::kvm::MmuPolicy;

use crate::scenario::Scenario;
use crate::sched::Mode;

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
    pub sabotage: Option<crate::sabotage::Sabotage>,
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
