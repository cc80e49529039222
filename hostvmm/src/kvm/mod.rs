//! A KVM-style private MMU: the host side of the Secure-EPT, driven only through SEAMCALLs.
//!
//! [`PrivateMmu`] does what KVM's TDX mirror-EPT code does, with the policies of
//! `design.md` as data ([`MmuPolicy`]):
//!
//! - **fault path** ([`PrivateMmu::handle_ept_violation`]): on an EPT-violation exit for a
//!   private GPA, map at the largest level allowed by the guest's requested ACCEPT level (from
//!   the extended exit qualification), the backing folio, uniform private attributes, the
//!   module's AUG limit and the policy; SEPT.ADD missing levels first, then AUG.
//! - **fault-path split** (seed 003): the guest accepts smaller than an existing PENDING huge
//!   leaf: BLOCK, TRACK, kick, DEMOTE, and the guest's ACCEPT re-executes. Policies can instead
//!   ignore the request (the guest then loops, which the simulator detects) or inhibit huge
//!   mappings for that range one way (zap and remap small, never huge again).
//! - **zap path** ([`PrivateMmu::zap`]): private -> shared or hole punch: DEMOTE only the huge
//!   leaves that straddle the range, BLOCK the rest at their own level, one TRACK, kick, REMOVE.
//!   A REMOVE or DEMOTE that still fails is not returned: the leaf's 4K pages are reported to
//!   the backing as error pages (seed 000).
//! - **merge** ([`PrivateMmu::merge_pass`]): a 2M range split earlier whose 512 children are all
//!   MAPPED (or all PENDING) with contiguous backing is PROMOTEd back (BLOCK + TRACK + kick
//!   first, UNBLOCK if the module refuses).
//!
//! The MMU reads S-EPT state with [`TdxModule::walk`], standing in for KVM's mirror page table
//! (or TDH.MEM.SEPT.RD). "Kicking" vCPUs is the [`Kicker`]'s job: KVM sends IPIs; the simulator's
//! vCPUs leave the TD after every instruction, so the default kicker only yields.
//!
//! Faults and zaps are serialised as in KVM: faults take the MMU lock shared and look up the
//! backing page before taking it, zaps take it exclusively and bump an invalidation sequence
//! that makes a racing fault retry.
//!
//! Not here: shared EPT (host memory is mapped by the VMM directly), memslots (GPA is the
//! guest_memfd offset), and 1G mappings (the 1.5 module AUGs at most 2M).
//!
//! # Files
//!
//! This file holds the types the MMU shares with its callers (backing, kicker, policy, errors),
//! the [`PrivateMmu`] struct, its construction and accessors. It runs no SEAMCALL itself. The
//! flows live in child modules, each adding its own `impl PrivateMmu` block:
//!
//! - `seamcall.rs`: the SEAMCALL wrapper (BUSY retry, hold-outs, kicks), TRACK, BLOCK,
//!   UNBLOCK, and the host-priority timeout exit;
//! - `fault.rs`: the fault path (AUG, SEPT.ADD, the fault-path split policies);
//! - `split.rs`: DEMOTE of one huge leaf, shared by the fault path and the zap path;
//! - `zap.rs`: the zap path, block-first zaps and leaves given up as error pages;
//! - `merge.rs`: merge candidates and the PROMOTE pass;
//! - `pool.rs`: the S-EPT page pool;
//! - `stats.rs`: the MMU's counters.

use std::collections::BTreeSet;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use crossbeam_utils::sync::{ShardedLock, ShardedLockReadGuard, ShardedLockWriteGuard};

use accept::abi::{Gpa, PageLevel, TdxStatus};

use crate::module::TdxModule;

mod fault;
mod merge;
mod pool;
mod seamcall;
mod split;
mod stats;
mod zap;

pub use fault::FaultOutcome;
pub use merge::MergeOutcome;
pub use pool::SeptPagePool;
pub use seamcall::{BUSY_BEFORE_HOLD_OUT, SEAMCALL_RETRIES, TRACKING_KICKS};
pub use stats::{thread_stats, MmuStats};
pub use zap::ZapReport;

use stats::Counters;

/// What the backing store says about a private GPA.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pfn {
    /// Host physical address of the 4K page holding the GPA.
    pub hpa: u64,
    /// Largest level a private mapping around the GPA may use: bounded by the folio holding
    /// it and by uniform private attributes over the aligned range.
    pub max_level: PageLevel,
}

/// Why the backing store cannot supply a private page.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BackingError {
    /// The GPA is shared now: a private fault on it is the guest's error (or a race with a
    /// conversion, which the guest resolves by retrying).
    #[error("GPA is shared")]
    Shared,
    /// The page is an error page.
    #[error("GPA is an error page")]
    Poisoned,
    /// No memory for a new folio.
    #[error("out of memory")]
    NoMemory,
    /// Outside the guest memory.
    #[error("GPA outside guest memory")]
    OutOfRange,
    /// A conversion of the page to private waits for host references to drop: retry later.
    #[error("conversion to private pending")]
    Pending,
}

/// The private memory behind the MMU: a guest_memfd as KVM sees it (kvm_gmem_get_pfn).
pub trait PrivateBacking: Send + Sync {
    /// The backing page of private `gpa`, allocating it on first use.
    ///
    /// # Errors
    /// [`BackingError`].
    fn get_pfn(&self, gpa: Gpa) -> Result<Pfn, BackingError>;

    /// Records the 4K pages of `[gpa, gpa + level size)` as error pages: a REMOVE or DEMOTE
    /// of that leaf failed and the TDX module may still own them (seed 000).
    fn poison(&self, gpa: Gpa, level: PageLevel);
}

/// Makes every vCPU that is running in the TD leave it once (KVM: an IPI to each).
pub trait Kicker: Send + Sync {
    /// Kicks every vCPU.
    fn kick_all(&self);
}

/// A kicker for vCPUs that leave the TD on their own after each step: it only yields.
#[derive(Debug, Default, Clone, Copy)]
pub struct YieldKicker;

impl Kicker for YieldKicker {
    fn kick_all(&self) {
        std::thread::yield_now();
    }
}

/// What the fault path does when the guest accepts smaller than an existing PENDING leaf.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultSplit {
    /// DEMOTE the leaf (BLOCK, TRACK, kick, DEMOTE): ours.
    Demote,
    /// Zap the PENDING leaf and never map that 2M range huge again (a one-way inhibit).
    Inhibit,
    /// Do nothing: the guest re-executes the ACCEPT and exits again, forever.
    Ignore,
}

/// Host mapping policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MmuPolicy {
    /// Largest private mapping.
    pub max_level: PageLevel,
    /// Map at the level the guest asked to ACCEPT (when the exit says so).
    pub honour_accept_level: bool,
    /// Fault-path split behaviour.
    pub fault_split: FaultSplit,
    /// PROMOTE split ranges back when they become uniform again.
    pub merge: bool,
}

impl MmuPolicy {
    /// This project's host: 2M, honours the accept level, splits with DEMOTE, merges.
    pub const OURS: MmuPolicy = MmuPolicy {
        max_level: PageLevel::Size2M,
        honour_accept_level: true,
        fault_split: FaultSplit::Demote,
        merge: true,
    };

    /// Mainline KVM: 4K private mappings only.
    pub const KVM_4K: MmuPolicy = MmuPolicy {
        max_level: PageLevel::Size4K,
        honour_accept_level: false,
        fault_split: FaultSplit::Ignore,
        merge: false,
    };

    /// The KVM TDX huge-page series: 2M mappings, split in the zap path, a one-way inhibit in
    /// the fault path, never merge.
    pub const KVM_HUGEPAGE: MmuPolicy = MmuPolicy {
        max_level: PageLevel::Size2M,
        honour_accept_level: true,
        fault_split: FaultSplit::Inhibit,
        merge: false,
    };
}

impl Default for MmuPolicy {
    fn default() -> Self {
        MmuPolicy::OURS
    }
}

/// Why the fault path could not map.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FaultError {
    /// The GPA has the shared bit set or is beyond the GPA width: not a private fault.
    #[error("GPA {0:#x} is not a private GPA")]
    NotPrivate(u64),
    /// The backing store refused.
    #[error("backing: {0}")]
    Backing(#[from] BackingError),
    /// No page for an S-EPT page.
    #[error("no memory for an S-EPT page")]
    NoSeptPage,
    /// An earlier SEAMCALL failure left a mapping the MMU could not make safe (a leaf it
    /// could not BLOCK after the point of no return): like KVM_BUG_ON, the TD must stop.
    #[error("the private MMU is bugged: {0}")]
    Bugged(&'static str),
    /// A SEAMCALL failed in a way the MMU does not handle.
    #[error("{call} failed: {status}")]
    Seamcall {
        /// Which call.
        call: &'static str,
        /// Its status.
        status: TdxStatus,
    },
}

impl FaultError {
    /// True for failures that happen before a split blocks anything (no S-EPT page, BLOCK
    /// refused): the leaf is still mapped as it was.
    fn left_unblocked(&self) -> bool {
        match self {
            FaultError::NoSeptPage => true,
            FaultError::Seamcall { call, .. } => *call == BLOCK_CALL,
            _ => false,
        }
    }
}

/// The private MMU of one TD.
pub struct PrivateMmu {
    module: Arc<TdxModule>,
    backing: Arc<dyn PrivateBacking>,
    kicker: Arc<dyn Kicker>,
    policy: MmuPolicy,
    pool: SeptPagePool,
    /// KVM's `mmu_lock`: every fault takes it for read, so readers lock one shard of it (their
    /// thread's) and writers all of them, and faults on different vCPUs share no cache line.
    mmu_lock: ShardedLock<()>,
    invalidate_seq: AtomicU64,
    /// SEAMCALLs currently holding the vCPUs out of the TD.
    held_out: AtomicU64,
    /// 2M ranges (by base GPA) never to be mapped huge again (one-way inhibit policy).
    inhibited: Mutex<BTreeSet<u64>>,
    /// Whether `inhibited` holds anything: the fault path's check without the lock.
    any_inhibited: AtomicBool,
    /// 2M ranges (by base GPA) split at some point: candidates for PROMOTE.
    merge_candidates: Mutex<BTreeSet<u64>>,
    /// Leaves (base GPA, level) whose removal or split failed: left blocked, their pages are
    /// error pages. Never split or unblocked again.
    given_up: Mutex<BTreeSet<(u64, u8)>>,
    /// Set when a failure left an unsafe mapping: every later fault fails.
    bugged: OnceLock<&'static str>,
    counters: Counters,
}

impl fmt::Debug for PrivateMmu {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PrivateMmu")
            .field("policy", &self.policy)
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

const M2: u64 = 2 << 20;

/// Name of TDH.MEM.RANGE.BLOCK in [`FaultError::Seamcall`].
const BLOCK_CALL: &str = "TDH.MEM.RANGE.BLOCK";

impl PrivateMmu {
    /// An MMU over `module`, backed by `backing`, with S-EPT pages from `pool`.
    pub fn new(
        module: Arc<TdxModule>,
        backing: Arc<dyn PrivateBacking>,
        kicker: Arc<dyn Kicker>,
        policy: MmuPolicy,
        pool: SeptPagePool,
    ) -> PrivateMmu {
        PrivateMmu {
            module,
            backing,
            kicker,
            policy,
            pool,
            mmu_lock: ShardedLock::new(()),
            invalidate_seq: AtomicU64::new(0),
            held_out: AtomicU64::new(0),
            inhibited: Mutex::new(BTreeSet::new()),
            any_inhibited: AtomicBool::new(false),
            merge_candidates: Mutex::new(BTreeSet::new()),
            given_up: Mutex::new(BTreeSet::new()),
            bugged: OnceLock::new(),
            counters: Counters::default(),
        }
    }

    /// The policy.
    pub fn policy(&self) -> MmuPolicy {
        self.policy
    }

    /// The module.
    pub fn module(&self) -> &Arc<TdxModule> {
        &self.module
    }

    /// The S-EPT page pool.
    pub fn sept_pool(&self) -> &SeptPagePool {
        &self.pool
    }

    /// Why the MMU stopped serving faults, if it did (see [`FaultError::Bugged`]).
    pub fn bugged(&self) -> Option<&'static str> {
        self.bugged.get().copied()
    }

    fn bug(&self, why: &'static str) {
        log::error!("private MMU bugged: {why}");
        // The first reason stays.
        let _ = self.bugged.set(why);
    }

    /// Holds off zaps, splits and merges (KVM's MMU lock taken for read) so that a reader sees
    /// no range in the middle of a BLOCK .. REMOVE, DEMOTE or PROMOTE sequence. Faults still
    /// run. Lock order: take the backing's lock (if at all) before this guard, never while
    /// holding it.
    pub fn hold_off_zaps(&self) -> ShardedLockReadGuard<'_, ()> {
        self.mmu_lock.read().unwrap_or_else(PoisonError::into_inner)
    }

    /// Takes the MMU lock exclusively for a change that invalidates mappings (zap, split,
    /// inhibit, retiring a given-up leaf) and bumps the invalidation sequence, so that a fault
    /// that looked its page up before the change retries.
    fn lock_for_invalidation(&self) -> ShardedLockWriteGuard<'_, ()> {
        let w = self
            .mmu_lock
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        self.invalidate_seq.fetch_add(1, Ordering::AcqRel);
        w
    }
}

#[cfg(test)]
mod tests;
