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

use std::collections::BTreeSet;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};

use accept::abi::{Gpa, GpaRange, PageLevel, StatusCode, TdxStatus};

use crate::module::{ExitType, ExtExitQual, SeamcallResult, SeptState, TdxModule};

/// Bound on BUSY / INTERRUPTED answers to one SEAMCALL before the MMU gives up on it.
pub const SEAMCALL_RETRIES: u32 = 10_000;

/// Bound on kicks while waiting for TLB tracking (every vCPU to leave the TD once).
pub const TRACKING_KICKS: u32 = 10_000;

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

/// A pool of host pages for S-EPT pages (SEPT.ADD, DEMOTE), separate from guest memory.
#[derive(Debug)]
pub struct SeptPagePool {
    next: AtomicU64,
    end: u64,
    free: Mutex<Vec<u64>>,
    fail_next: AtomicU64,
    allocated: AtomicU64,
}

impl SeptPagePool {
    /// A pool handing out 4K pages from `[base, base + pages * 4K)`.
    pub fn new(base: u64, pages: u64) -> SeptPagePool {
        SeptPagePool {
            next: AtomicU64::new(base),
            end: base.saturating_add(pages.saturating_mul(4096)),
            free: Mutex::new(Vec::new()),
            fail_next: AtomicU64::new(0),
            allocated: AtomicU64::new(0),
        }
    }

    /// Makes the next `n` allocations fail (fault injection).
    pub fn fail_next(&self, n: u64) {
        self.fail_next.store(n, Ordering::Relaxed);
    }

    /// A page, or `None` when the pool is exhausted (or a failure is injected).
    pub fn alloc(&self) -> Option<u64> {
        if self
            .fail_next
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
            .is_ok()
        {
            return None;
        }
        let page = match self
            .free
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop()
        {
            Some(p) => p,
            None => {
                let p = self.next.fetch_add(4096, Ordering::Relaxed);
                if p >= self.end {
                    self.next.fetch_sub(4096, Ordering::Relaxed);
                    return None;
                }
                p
            }
        };
        self.allocated.fetch_add(1, Ordering::Relaxed);
        Some(page)
    }

    /// Returns a page.
    pub fn free(&self, page: u64) {
        self.allocated.fetch_sub(1, Ordering::Relaxed);
        self.free
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(page);
    }

    /// Pages handed out and not returned.
    pub fn in_use(&self) -> u64 {
        self.allocated.load(Ordering::Relaxed)
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

/// What the fault path did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultOutcome {
    /// Mapped a PENDING leaf at this level.
    Mapped(PageLevel),
    /// Split a huge leaf so that a smaller ACCEPT can proceed.
    Split,
    /// Zapped a huge PENDING leaf and inhibited huge mappings for its range.
    Inhibited,
    /// Nothing to do now (another vCPU mapped it, or a zap is in flight): resume the guest.
    Retry,
    /// The policy ignores the guest's smaller ACCEPT: resume the guest unchanged.
    Ignored,
}

/// Exact counters of the MMU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub struct MmuStats {
    /// EPT-violation exits handled.
    pub faults: u64,
    /// Leaves mapped by AUG, per level (4K, 2M, 1G).
    pub maps: [u64; 3],
    /// SEPT.ADD calls that added a level.
    pub sept_adds: u64,
    /// Fault-path splits (DEMOTE for a smaller ACCEPT).
    pub fault_splits: u64,
    /// Fault-path requests ignored by policy.
    pub ignored_splits: u64,
    /// One-way inhibits of huge mappings.
    pub inhibits: u64,
    /// DEMOTEs in the zap path (leaves straddling a zapped range).
    pub zap_demotes: u64,
    /// Leaves removed, per level.
    pub removes: [u64; 3],
    /// Successful PROMOTEs.
    pub promotes: u64,
    /// PROMOTEs refused by the module (range unblocked again).
    pub promote_refused: u64,
    /// TDH.MEM.TRACK calls that advanced the epoch.
    pub tracks: u64,
    /// Kicks while waiting for tracking.
    pub kicks: u64,
    /// BUSY or INTERRUPTED answers retried.
    pub busy_retries: u64,
    /// Leaves whose REMOVE or DEMOTE failed, recorded as error pages.
    pub poisoned_leaves: u64,
    /// Faults that found a zap in flight and asked the guest to retry.
    pub invalidation_retries: u64,
    /// TD exits with TDX_HOST_PRIORITY_BUSY_TIMEOUT (the vCPU is re-entered).
    pub hp_timeouts: u64,
    /// TDH.MEM.TRACK answers PREVIOUS_TLB_EPOCH_BUSY (a vCPU still in the previous epoch):
    /// each is followed by a kick and a retry.
    pub track_refusals: u64,
    /// SEAMCALLs answered TLB_TRACKING_NOT_DONE (a vCPU inside the TD has not left the epoch
    /// of the BLOCK yet): each is followed by a kick and a retry.
    pub tracking_not_done: u64,
    /// Times a SEAMCALL that kept getting BUSY held the vCPUs out of the TD and kicked them.
    pub hold_outs: u64,
}

#[derive(Default)]
struct Counters {
    faults: AtomicU64,
    maps: [AtomicU64; 3],
    sept_adds: AtomicU64,
    fault_splits: AtomicU64,
    ignored_splits: AtomicU64,
    inhibits: AtomicU64,
    zap_demotes: AtomicU64,
    removes: [AtomicU64; 3],
    promotes: AtomicU64,
    promote_refused: AtomicU64,
    tracks: AtomicU64,
    kicks: AtomicU64,
    busy_retries: AtomicU64,
    poisoned_leaves: AtomicU64,
    invalidation_retries: AtomicU64,
    hp_timeouts: AtomicU64,
    track_refusals: AtomicU64,
    tracking_not_done: AtomicU64,
    hold_outs: AtomicU64,
    /// BUSY-like answers by (SEAMCALL, raw operand and status detail bits).
    busy_by: Mutex<std::collections::BTreeMap<(&'static str, u32), u64>>,
}

fn inc(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

fn get(c: &AtomicU64) -> u64 {
    c.load(Ordering::Relaxed)
}

impl Counters {
    fn snapshot(&self) -> MmuStats {
        MmuStats {
            faults: get(&self.faults),
            maps: [get(&self.maps[0]), get(&self.maps[1]), get(&self.maps[2])],
            sept_adds: get(&self.sept_adds),
            fault_splits: get(&self.fault_splits),
            ignored_splits: get(&self.ignored_splits),
            inhibits: get(&self.inhibits),
            zap_demotes: get(&self.zap_demotes),
            removes: [
                get(&self.removes[0]),
                get(&self.removes[1]),
                get(&self.removes[2]),
            ],
            promotes: get(&self.promotes),
            promote_refused: get(&self.promote_refused),
            tracks: get(&self.tracks),
            kicks: get(&self.kicks),
            busy_retries: get(&self.busy_retries),
            poisoned_leaves: get(&self.poisoned_leaves),
            invalidation_retries: get(&self.invalidation_retries),
            hp_timeouts: get(&self.hp_timeouts),
            track_refusals: get(&self.track_refusals),
            tracking_not_done: get(&self.tracking_not_done),
            hold_outs: get(&self.hold_outs),
        }
    }
}

/// What one zap did.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ZapReport {
    /// Leaves removed.
    pub removed: u64,
    /// Huge leaves demoted because they straddled the range.
    pub demoted: u64,
    /// Leaves whose REMOVE or DEMOTE failed: their 4K pages must become error pages. The
    /// zap path does not record them itself (its caller, a guest_memfd conversion, holds the
    /// backing's lock and records them through its poison sink).
    pub poisoned: Vec<(Gpa, PageLevel)>,
}

/// What a merge attempt found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MergeOutcome {
    /// PROMOTEd to a 2M leaf.
    Promoted,
    /// Not (yet) mergeable: children not uniform, not contiguous, or the backing not huge.
    NotReady,
    /// Nothing to merge: already huge, or nothing mapped.
    Nothing,
}

/// The private MMU of one TD.
pub struct PrivateMmu {
    module: Arc<TdxModule>,
    backing: Arc<dyn PrivateBacking>,
    kicker: Arc<dyn Kicker>,
    policy: MmuPolicy,
    pool: SeptPagePool,
    mmu_lock: RwLock<()>,
    invalidate_seq: AtomicU64,
    /// SEAMCALLs currently holding the vCPUs out of the TD.
    held_out: AtomicU64,
    /// 2M ranges (by base GPA) never to be mapped huge again (one-way inhibit policy).
    inhibited: Mutex<BTreeSet<u64>>,
    /// 2M ranges (by base GPA) split at some point: candidates for PROMOTE.
    merge_candidates: Mutex<BTreeSet<u64>>,
    /// Leaves (base GPA, level) whose removal or split failed: left blocked, their pages are
    /// error pages. Never split or unblocked again.
    given_up: Mutex<BTreeSet<(u64, u8)>>,
    /// Set when a failure left an unsafe mapping: every later fault fails.
    bugged: Mutex<Option<&'static str>>,
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

/// Public state of a SEAMCALL's RDX on failure, as [`SeptState`] compares it.
fn busy_like(status: TdxStatus) -> bool {
    status.is(StatusCode::OperandBusy) || status.is(StatusCode::InterruptedRestartable)
}

const M2: u64 = 2 << 20;

/// BUSY answers in a row to one SEAMCALL before the MMU holds the vCPUs out of the TD and
/// kicks them (KVM retries once, then does it; a few plain retries first keep host-against-host
/// contention, which holding vCPUs out cannot help, from stopping the guest).
pub const BUSY_BEFORE_HOLD_OUT: u32 = 8;

/// Releases a hold on the vCPUs ([`PrivateMmu::vcpus_held_out`]) when dropped.
struct HoldOut<'m>(&'m AtomicU64);

impl Drop for HoldOut<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Name of TDH.MEM.TRACK in the MMU's retry loop (its refusals are counted on their own).
const TRACK_CALL: &str = "TRACK";

/// Name of TDH.MEM.RANGE.BLOCK in [`FaultError::Seamcall`].
const BLOCK_CALL: &str = "TDH.MEM.RANGE.BLOCK";

/// Attempts at a zap-path split that could not start, before the leaf is given up.
const ZAP_SPLIT_TRIES: u32 = 3;

/// What a failed split leaves behind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AfterFailure {
    /// UNBLOCK again (fault path, merge): the range stays usable.
    Restore,
    /// Keep it blocked (zap path): its pages become error pages, out of the guest's reach.
    KeepBlocked,
}

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
            mmu_lock: RwLock::new(()),
            invalidate_seq: AtomicU64::new(0),
            held_out: AtomicU64::new(0),
            inhibited: Mutex::new(BTreeSet::new()),
            merge_candidates: Mutex::new(BTreeSet::new()),
            given_up: Mutex::new(BTreeSet::new()),
            bugged: Mutex::new(None),
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

    /// Counters so far.
    pub fn stats(&self) -> MmuStats {
        self.counters.snapshot()
    }

    /// Why the MMU stopped serving faults, if it did (see [`FaultError::Bugged`]).
    pub fn bugged(&self) -> Option<&'static str> {
        *self.bugged.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn bug(&self, why: &'static str) {
        log::error!("private MMU bugged: {why}");
        let mut b = self.bugged.lock().unwrap_or_else(PoisonError::into_inner);
        b.get_or_insert(why);
    }

    /// Holds off zaps, splits and merges (KVM's MMU lock taken for read) so that a reader sees
    /// no range in the middle of a BLOCK .. REMOVE, DEMOTE or PROMOTE sequence. Faults still
    /// run. Lock order: take the backing's lock (if at all) before this guard, never while
    /// holding it.
    pub fn hold_off_zaps(&self) -> std::sync::RwLockReadGuard<'_, ()> {
        self.mmu_lock.read().unwrap_or_else(PoisonError::into_inner)
    }

    /// BUSY and INTERRUPTED answers the MMU retried, by SEAMCALL and by the status's operand
    /// (low 32 bits: which operand was busy, with any detail bits the module sets, such as a
    /// host-priority marker), in that order.
    pub fn busy_by_operand(&self) -> Vec<(&'static str, u32, u64)> {
        self.counters
            .busy_by
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .map(|(&(call, op), &n)| (call, op, n))
            .collect()
    }

    /// Number of 2M ranges waiting to be merged.
    pub fn merge_backlog(&self) -> usize {
        self.merge_candidates
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    // ---- SEAMCALL helpers ------------------------------------------------------------------

    /// Runs a SEAMCALL, retrying BUSY and INTERRUPTED_RESTARTABLE (bounded), and kicking vCPUs
    /// while TLB tracking is not done.
    ///
    /// After [`BUSY_BEFORE_HOLD_OUT`] BUSY answers in a row it does what KVM's
    /// `tdh_do_no_vcpus()` does: it holds every vCPU out of the TD (they may not start a guest
    /// call while [`PrivateMmu::vcpus_held_out`] is true), kicks them out (waiting for guest
    /// calls in progress to end), and retries; guest TDCALLs can then no longer win the lock.
    fn call(&self, name: &'static str, f: impl Fn() -> SeamcallResult) -> SeamcallResult {
        let mut busy = 0u32;
        let mut kicks = 0u32;
        let mut hold: Option<HoldOut<'_>> = None;
        loop {
            let r = f();
            if busy_like(r.status) && busy < SEAMCALL_RETRIES {
                busy += 1;
                if busy == BUSY_BEFORE_HOLD_OUT && hold.is_none() {
                    hold = Some(self.hold_out());
                }
                inc(&self.counters.busy_retries);
                if name != TRACK_CALL {
                    *self
                        .counters
                        .busy_by
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .entry((name, r.status.operand()))
                        .or_insert(0) += 1;
                }
                std::thread::yield_now();
                continue;
            }
            if r.status.is(StatusCode::TlbTrackingNotDone) && kicks < TRACKING_KICKS {
                kicks += 1;
                inc(&self.counters.tracking_not_done);
                inc(&self.counters.kicks);
                self.kicker.kick_all();
                continue;
            }
            if r.status.is_error() {
                log::debug!("{name}: {:?}", r.status);
            }
            return r;
        }
    }

    /// Holds the vCPUs out of the TD until the guard drops, and kicks them out.
    fn hold_out(&self) -> HoldOut<'_> {
        self.held_out.fetch_add(1, Ordering::AcqRel);
        inc(&self.counters.hold_outs);
        inc(&self.counters.kicks);
        self.kicker.kick_all();
        HoldOut(&self.held_out)
    }

    /// True while a SEAMCALL that kept getting BUSY holds the vCPUs out of the TD (KVM's
    /// `wait_for_sept_zap`): a vCPU must not start a guest call (it leaves the TD and waits).
    pub fn vcpus_held_out(&self) -> bool {
        self.held_out.load(Ordering::Acquire) > 0
    }

    /// TDH.MEM.TRACK, kicking vCPUs while the previous epoch is still busy.
    fn track(&self) -> Result<(), FaultError> {
        let r = self.call(TRACK_CALL, || {
            let r = self.module.mem_track();
            if r.status.is(StatusCode::PreviousTlbEpochBusy) {
                inc(&self.counters.track_refusals);
                self.kicker.kick_all();
                inc(&self.counters.kicks);
                // Reported as BUSY-like so that `call` retries it.
                return SeamcallResult::status(StatusCode::OperandBusy.status());
            }
            r
        });
        if r.status.is_error() {
            return Err(FaultError::Seamcall {
                call: "TDH.MEM.TRACK",
                status: r.status,
            });
        }
        inc(&self.counters.tracks);
        Ok(())
    }

    fn block(&self, gpa: Gpa, level: PageLevel) -> SeamcallResult {
        self.call("BLOCK", || self.module.range_block(gpa, level))
    }

    // ---- host-priority timeout -------------------------------------------------------------

    /// Handles a TD exit with TDX_HOST_PRIORITY_BUSY_TIMEOUT: the guest's TDCALL was refused
    /// for too long because a host SEAMCALL has priority on an S-EPT entry. The module leaves
    /// the vCPU ready to be re-entered with the TDCALL completed (`td_exit.c`
    /// async_tdexit_internal: VCPU_READY, LAST_EXIT_ASYNC_TRAP), so nothing needs mapping:
    /// the host yields to let its SEAMCALL through and re-enters the guest.
    pub fn handle_host_priority_timeout(&self) {
        inc(&self.counters.hp_timeouts);
        std::thread::yield_now();
    }

    // ---- fault path ------------------------------------------------------------------------

    /// Handles an EPT-violation TD exit on `gpa` with extended qualification `ext`.
    ///
    /// # Errors
    /// [`FaultError`]: the guest cannot make progress on this GPA (the VMM decides what to do:
    /// KVM would return the error to userspace).
    pub fn handle_ept_violation(
        &self,
        gpa: u64,
        ext: ExtExitQual,
    ) -> Result<FaultOutcome, FaultError> {
        inc(&self.counters.faults);
        if let Some(why) = self.bugged() {
            return Err(FaultError::Bugged(why));
        }
        let gpaw = self.module.config().gpaw;
        let g = Gpa::try_new(gpa & !0xFFF).map_err(|_| FaultError::NotPrivate(gpa))?;
        if g.is_shared(gpaw) || g.exceeds(gpaw) {
            return Err(FaultError::NotPrivate(gpa));
        }
        let requested = match ext.exit_type() {
            ExitType::Accept => PageLevel::from_index(ext.req_level() as u64),
            _ => None,
        };

        // Look the page up before taking the MMU lock (as KVM does), then make sure no
        // invalidation ran meanwhile.
        let seq = self.invalidate_seq.load(Ordering::Acquire);
        let pfn = match self.backing.get_pfn(g) {
            Err(BackingError::Pending) => return Ok(FaultOutcome::Retry),
            other => other?,
        };
        let guard = self.mmu_lock.read().unwrap_or_else(PoisonError::into_inner);
        if self.invalidate_seq.load(Ordering::Acquire) != seq {
            inc(&self.counters.invalidation_retries);
            return Ok(FaultOutcome::Retry);
        }

        let leaf = self.module.leaf(g);
        if leaf.state.is_leaf() {
            let leaf_level = PageLevel::from_index(leaf.level as u64).unwrap_or(PageLevel::Size4K);
            let base = g.align_down(leaf_level);
            return match requested {
                Some(req) if req < leaf_level && leaf.state == SeptState::Pending => {
                    drop(guard);
                    self.fault_split(g, leaf_level)
                }
                // A leaf an earlier zap gave up on, while the backing has a usable page here
                // again (the error pages' folio was punched out and replaced): retire it.
                _ if leaf.state.is_blocked() && self.is_given_up(base, leaf_level) => {
                    drop(guard);
                    self.retire_given_up(base, leaf_level);
                    Ok(FaultOutcome::Retry)
                }
                // Blocked (a zap or merge in flight) or mapped by another vCPU meanwhile.
                _ => Ok(FaultOutcome::Retry),
            };
        }

        // Choose the level.
        let mut level = self
            .policy
            .max_level
            .min(pfn.max_level)
            .min(self.module.config().max_aug_level);
        if self.policy.honour_accept_level {
            if let Some(req) = requested {
                level = level.min(req);
            }
        }
        if level > PageLevel::Size4K && self.is_inhibited(g) {
            level = PageLevel::Size4K;
        }
        // Never map over smaller mappings already present under the huge entry.
        loop {
            let e = self.module.walk(g, level.index());
            if e.level == level.index() && e.state.is_non_leaf() {
                match level.smaller() {
                    Some(s) => level = s,
                    None => return Ok(FaultOutcome::Retry),
                }
            } else {
                break;
            }
        }
        let base = g.align_down(level);
        let hpa = pfn.hpa - (g.as_u64() - base.as_u64());
        if hpa & level.mask() != 0 {
            // The backing page is not aligned for a huge mapping: map 4K.
            level = PageLevel::Size4K;
        }
        let base = g.align_down(level);
        let hpa = pfn.hpa - (g.as_u64() - base.as_u64());
        self.ensure_levels(base, level)?;
        let r = self.call("AUG", || self.module.page_aug(base, level, hpa));
        if r.status.is_success() {
            inc(&self.counters.maps[level.index() as usize]);
            if level == PageLevel::Size4K && self.policy.merge && pfn.max_level >= PageLevel::Size2M
            {
                self.add_merge_candidate(g.align_down(PageLevel::Size2M));
            }
            return Ok(FaultOutcome::Mapped(level));
        }
        if r.status.is(StatusCode::EptEntryStateIncorrect) {
            // Another vCPU mapped it first.
            return Ok(FaultOutcome::Retry);
        }
        if r.status.is(StatusCode::EptWalkFailed)
            && r.rdx_state() == SeptState::NlBlocked.public_state()
        {
            // The module's walk stops at a blocked page table (`sept_manager.c`
            // secure_ept_walk): a merge holds it blocked until PROMOTE or UNBLOCK.
            return Ok(FaultOutcome::Retry);
        }
        Err(FaultError::Seamcall {
            call: "TDH.MEM.PAGE.AUG",
            status: r.status,
        })
    }

    /// SEPT.ADD every missing non-leaf level above `level` for `gpa`.
    fn ensure_levels(&self, gpa: Gpa, level: PageLevel) -> Result<(), FaultError> {
        loop {
            let e = self.module.walk(gpa, level.index());
            if e.level <= level.index() {
                return Ok(());
            }
            if e.state != SeptState::Free {
                // A leaf or blocked entry above: the caller will retry.
                return Ok(());
            }
            let page = self.pool.alloc().ok_or(FaultError::NoSeptPage)?;
            // The entry at `e.level` becomes non-leaf; its GPA must be aligned to that level.
            let entry_size = 1u64 << (12 + 9 * u32::from(e.level));
            let entry_gpa = Gpa::new_truncate(gpa.as_u64() & !(entry_size - 1));
            let r = self.call("SEPT.ADD", || {
                self.module.sept_add(entry_gpa, e.level, page)
            });
            if r.status.is_success() {
                inc(&self.counters.sept_adds);
                continue;
            }
            self.pool.free(page);
            if r.status.is(StatusCode::EptEntryStateIncorrect) {
                // Added by another vCPU.
                continue;
            }
            return Err(FaultError::Seamcall {
                call: "TDH.MEM.SEPT.ADD",
                status: r.status,
            });
        }
    }

    fn is_inhibited(&self, gpa: Gpa) -> bool {
        self.inhibited
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .contains(&gpa.align_down(PageLevel::Size2M).as_u64())
    }

    fn add_merge_candidate(&self, base: Gpa) {
        self.merge_candidates
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(base.as_u64());
    }

    /// The guest asked to accept smaller than the PENDING `level` leaf holding `gpa`.
    fn fault_split(&self, gpa: Gpa, level: PageLevel) -> Result<FaultOutcome, FaultError> {
        match self.policy.fault_split {
            FaultSplit::Ignore => {
                inc(&self.counters.ignored_splits);
                Ok(FaultOutcome::Ignored)
            }
            FaultSplit::Demote => {
                let _w = self
                    .mmu_lock
                    .write()
                    .unwrap_or_else(PoisonError::into_inner);
                self.invalidate_seq.fetch_add(1, Ordering::AcqRel);
                let base = gpa.align_down(level);
                // Re-check under the exclusive lock: another vCPU may have split it already.
                let e = self.module.leaf(gpa);
                if !(e.state == SeptState::Pending && e.level == level.index()) {
                    return Ok(FaultOutcome::Retry);
                }
                self.demote(base, level, AfterFailure::Restore)?;
                inc(&self.counters.fault_splits);
                if self.policy.merge {
                    self.add_merge_candidate(base);
                }
                Ok(FaultOutcome::Split)
            }
            FaultSplit::Inhibit => {
                let _w = self
                    .mmu_lock
                    .write()
                    .unwrap_or_else(PoisonError::into_inner);
                self.invalidate_seq.fetch_add(1, Ordering::AcqRel);
                let base = gpa.align_down(level);
                self.inhibited
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .insert(base.as_u64());
                let e = self.module.leaf(gpa);
                let mut poisoned = Vec::new();
                if e.state == SeptState::Pending && e.level == level.index() {
                    // A PENDING leaf holds no guest data: removing it loses nothing.
                    poisoned = self.block_track_remove(&[(base, level)]).poisoned;
                }
                drop(_w);
                // Recorded outside the MMU lock: the backing's lock comes first in lock order.
                for (gpa, level) in poisoned {
                    self.backing.poison(gpa, level);
                }
                inc(&self.counters.inhibits);
                Ok(FaultOutcome::Inhibited)
            }
        }
    }

    /// BLOCK, TRACK, kick, DEMOTE one leaf.
    ///
    /// On failure the leaf is left as `on_failure` says: the fault path restores it (a PENDING
    /// leaf the guest will ask for again), the zap path keeps it blocked (its pages become
    /// error pages, and a blocked leaf is out of the guest's reach).
    fn demote(
        &self,
        base: Gpa,
        level: PageLevel,
        on_failure: AfterFailure,
    ) -> Result<(), FaultError> {
        let page = self.pool.alloc().ok_or(FaultError::NoSeptPage)?;
        let b = self.block(base, level);
        if b.status.is_error() {
            self.pool.free(page);
            return Err(FaultError::Seamcall {
                call: BLOCK_CALL,
                status: b.status,
            });
        }
        let r = match self.track() {
            Ok(()) => self.call("DEMOTE", || self.module.page_demote(base, level, page)),
            Err(FaultError::Seamcall { status, .. }) => SeamcallResult::status(status),
            Err(_) => SeamcallResult::status(StatusCode::TlbTrackingNotDone.status()),
        };
        if r.status.is_success() {
            return Ok(());
        }
        self.pool.free(page);
        if on_failure == AfterFailure::Restore {
            self.restore(base, level);
        }
        Err(FaultError::Seamcall {
            call: "TDH.MEM.PAGE.DEMOTE",
            status: r.status,
        })
    }

    fn unblock(&self, base: Gpa, level: PageLevel) {
        let r = self.call("UNBLOCK", || self.module.range_unblock(base, level));
        if r.status.is_error() {
            log::warn!("UNBLOCK {base} {level}: {:?}", r.status);
        }
    }

    /// UNBLOCKs a leaf (or non-leaf) blocked by a step that then failed, tracking first so
    /// that the UNBLOCK can succeed even when the failed step was the TRACK itself. If it
    /// still cannot be unblocked, the MMU is bugged: the range would stay unreachable.
    fn restore(&self, base: Gpa, level: PageLevel) {
        let ok = self.track().is_ok()
            && !self
                .call("UNBLOCK", || self.module.range_unblock(base, level))
                .status
                .is_error();
        if !ok {
            self.bug("a blocked range could not be unblocked after a failed split or merge");
        }
    }

    /// BLOCK every leaf, one TRACK, REMOVE every leaf. Failures become error pages, always
    /// on blocked leaves: a leaf that cannot even be BLOCKed (tried twice) would stay
    /// reachable by the guest, so the MMU is then bugged and the TD stops.
    fn block_track_remove(&self, leaves: &[(Gpa, PageLevel)]) -> ZapReport {
        let mut report = ZapReport::default();
        let mut blocked = Vec::with_capacity(leaves.len());
        for &(gpa, level) in leaves {
            let mut r = self.block(gpa, level);
            if r.status.is_error() {
                r = self.block(gpa, level);
            }
            if r.status.is_error() {
                self.poison(gpa, level, &mut report);
                self.bug("a leaf could not be blocked after the point of no return");
            } else {
                blocked.push((gpa, level));
            }
        }
        if blocked.is_empty() {
            return report;
        }
        if self.track().is_err() && self.track().is_err() {
            for &(gpa, level) in &blocked {
                self.poison(gpa, level, &mut report);
            }
            return report;
        }
        for (gpa, level) in blocked {
            let r = self.call("REMOVE", || self.module.page_remove(gpa, level));
            if r.status.is_success() {
                inc(&self.counters.removes[level.index() as usize]);
                report.removed += 1;
            } else {
                self.poison(gpa, level, &mut report);
            }
        }
        report
    }

    fn poison(&self, gpa: Gpa, level: PageLevel, report: &mut ZapReport) {
        inc(&self.counters.poisoned_leaves);
        report.poisoned.push((gpa, level));
        self.given_up
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert((gpa.as_u64(), level.index()));
    }

    fn forget_given_up(&self, gpa: Gpa, level: PageLevel) {
        self.given_up
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&(gpa.as_u64(), level.index()));
    }

    /// Tries again to REMOVE a leaf an earlier zap gave up on (its pages stay error pages in
    /// the backing; only the Secure-EPT entry is reclaimed).
    fn retire_given_up(&self, base: Gpa, level: PageLevel) {
        let _w = self
            .mmu_lock
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        self.invalidate_seq.fetch_add(1, Ordering::AcqRel);
        if self.block_track_remove(&[(base, level)]).removed > 0 {
            self.forget_given_up(base, level);
        }
    }

    fn is_given_up(&self, gpa: Gpa, level: PageLevel) -> bool {
        self.given_up
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .contains(&(gpa.as_u64(), level.index()))
    }

    // ---- zap path --------------------------------------------------------------------------

    /// Removes every private mapping in `range` (private -> shared, hole punch). Huge leaves
    /// that straddle the range are demoted first, so that only the range loses its mappings.
    /// Cannot fail: leaves that cannot be removed are reported to the backing as error pages.
    pub fn zap(&self, range: GpaRange) -> ZapReport {
        let _w = self
            .mmu_lock
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        self.invalidate_seq.fetch_add(1, Ordering::AcqRel);
        let mut report = ZapReport::default();

        // Pass 1: demote the huge leaves straddling either edge (at most one per edge and
        // level: 1G then 2M). A leaf whose split fails is handled once, even when both edges
        // fall inside it.
        let mut failed: Vec<(Gpa, PageLevel)> = Vec::new();
        for edge in [range.start(), range.end()] {
            for level in [PageLevel::Size1G, PageLevel::Size2M] {
                if edge.is_aligned(level) {
                    continue;
                }
                let e = self.module.leaf(edge);
                if !(e.state.is_leaf() && e.level == level.index()) {
                    continue;
                }
                let base = edge.align_down(level);
                // A leaf an earlier zap gave up on holds error pages: splitting it would make
                // them reachable again. Try to remove it whole instead.
                if self.is_given_up(base, level) {
                    let r = self.block_track_remove(&[(base, level)]);
                    report.removed += r.removed;
                    if r.removed > 0 {
                        self.forget_given_up(base, level);
                    }
                    continue;
                }
                let straddles = base.as_u64() < range.end().as_u64()
                    && base.as_u64() + level.size() > range.start().as_u64();
                if !straddles || failed.contains(&(base, level)) {
                    continue;
                }
                // A split that could not even start (no S-EPT page, BLOCK refused) left the
                // leaf reachable: try again a few times before giving up on it.
                let mut result = self.demote(base, level, AfterFailure::KeepBlocked);
                for _ in 1..ZAP_SPLIT_TRIES {
                    if !result.as_ref().is_err_and(FaultError::left_unblocked) {
                        break;
                    }
                    result = self.demote(base, level, AfterFailure::KeepBlocked);
                }
                if result.as_ref().is_err_and(FaultError::left_unblocked)
                    && self.block(base, level).status.is_error()
                {
                    // Its pages become error pages but stay reachable: the TD must stop.
                    self.bug("a huge leaf could not be blocked after the point of no return");
                }
                match result {
                    Ok(()) => {
                        inc(&self.counters.zap_demotes);
                        report.demoted += 1;
                        if self.policy.merge {
                            self.add_merge_candidate(base.align_down(PageLevel::Size2M));
                        }
                    }
                    Err(_) => {
                        // Seed 000: the split failed; the whole leaf, left blocked, becomes
                        // error pages.
                        failed.push((base, level));
                        self.poison(base, level, &mut report);
                    }
                }
            }
        }

        // Pass 2: collect the leaves inside the range, largest first.
        let mut leaves = Vec::new();
        let mut cur = range.start();
        let end = range.end().as_u64();
        while cur.as_u64() < end {
            let e = self.module.leaf(cur);
            let level = PageLevel::from_index(e.level as u64).unwrap_or(PageLevel::Size4K);
            let step = if e.level > 2 {
                // The walk stopped at a FREE entry above 1G.
                1u64 << (12 + 9 * e.level as u32)
            } else {
                level.size()
            };
            let base = cur.as_u64() & !(step - 1);
            if e.state.is_leaf() && base >= range.start().as_u64() && base + step <= end {
                leaves.push((Gpa::new_truncate(base), level));
            }
            cur = Gpa::new_truncate(base.saturating_add(step));
        }
        let r = self.block_track_remove(&leaves);
        report.removed += r.removed;
        report.poisoned.extend(r.poisoned);
        report
    }

    /// The leaves that overlap `range` (including huge leaves straddling its edges), in
    /// address order.
    fn leaves_overlapping(&self, range: GpaRange) -> Vec<(Gpa, PageLevel)> {
        let mut leaves = Vec::new();
        let (start, end) = (range.start().as_u64(), range.end().as_u64());
        let mut cur = start;
        while cur < end {
            let e = self.module.leaf(Gpa::new_truncate(cur));
            let step = 1u64 << (12 + 9 * u32::from(e.level));
            let base = cur & !(step - 1);
            if e.state.is_leaf() {
                if let Some(level) = PageLevel::from_index(u64::from(e.level)) {
                    leaves.push((Gpa::new_truncate(base), level));
                }
            }
            cur = base.saturating_add(step);
        }
        leaves
    }

    /// Block-first mode of a zap (seed 002): BLOCKs every leaf overlapping `range` before the
    /// point of no return, so that the guest stops using it while nothing is destroyed yet.
    /// [`PrivateMmu::unblock_leaves`] undoes it on abort; [`PrivateMmu::zap`] completes it.
    ///
    /// # Errors
    /// The failing BLOCK's status; the leaves blocked before it are unblocked again.
    pub fn block_range(&self, range: GpaRange) -> Result<Vec<(Gpa, PageLevel)>, FaultError> {
        let _w = self
            .mmu_lock
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        self.invalidate_seq.fetch_add(1, Ordering::AcqRel);
        let mut blocked = Vec::new();
        for (gpa, level) in self.leaves_overlapping(range) {
            let r = self.block(gpa, level);
            if r.status.is_error() {
                self.unblock_locked(&blocked);
                return Err(FaultError::Seamcall {
                    call: "TDH.MEM.RANGE.BLOCK",
                    status: r.status,
                });
            }
            if r.status.is_success() {
                blocked.push((gpa, level));
            }
        }
        Ok(blocked)
    }

    /// Undoes [`PrivateMmu::block_range`]: TRACK, then UNBLOCK each leaf.
    pub fn unblock_leaves(&self, leaves: &[(Gpa, PageLevel)]) {
        let _w = self
            .mmu_lock
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        self.unblock_locked(leaves);
    }

    fn unblock_locked(&self, leaves: &[(Gpa, PageLevel)]) {
        if leaves.is_empty() {
            return;
        }
        if self.track().is_err() {
            log::warn!("TRACK failed; {} leaves stay blocked", leaves.len());
            return;
        }
        for &(gpa, level) in leaves {
            self.unblock(gpa, level);
        }
    }

    // ---- merge -----------------------------------------------------------------------------

    /// Tries to PROMOTE the 2M range at `base` back to one leaf.
    pub fn try_merge(&self, base: Gpa) -> MergeOutcome {
        let base = base.align_down(PageLevel::Size2M);
        // The backing must hold the whole range in one private folio. Asked before taking the
        // MMU lock (lock order: backing, then MMU); a zap meanwhile bumps the sequence.
        let seq = self.invalidate_seq.load(Ordering::Acquire);
        match self.backing.get_pfn(base) {
            Ok(p) if p.max_level >= PageLevel::Size2M => {}
            _ => return MergeOutcome::NotReady,
        }
        let _w = self
            .mmu_lock
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        if self.invalidate_seq.load(Ordering::Acquire) != seq {
            return MergeOutcome::NotReady;
        }
        let Some(e) = self.module.entry(base, PageLevel::Size2M) else {
            return MergeOutcome::Nothing;
        };
        if e.state != SeptState::NlMapped {
            return MergeOutcome::Nothing;
        }
        // Check the children (as KVM would with its mirror table) before blocking anything.
        let first = self.module.leaf(base);
        if first.level != 0
            || !(first.state == SeptState::Mapped || first.state == SeptState::Pending)
            || first.hpa & (M2 - 1) != 0
        {
            return MergeOutcome::NotReady;
        }
        for i in 1..512u64 {
            let c = self
                .module
                .leaf(Gpa::new_truncate(base.as_u64() + i * 4096));
            if c.level != 0 || c.state != first.state || c.hpa != first.hpa + i * 4096 {
                return MergeOutcome::NotReady;
            }
        }
        self.invalidate_seq.fetch_add(1, Ordering::AcqRel);
        let b = self.block(base, PageLevel::Size2M);
        if b.status.is_error() {
            return MergeOutcome::NotReady;
        }
        if self.track().is_err() {
            self.restore(base, PageLevel::Size2M);
            return MergeOutcome::NotReady;
        }
        let r = self.call("PROMOTE", || {
            self.module.page_promote(base, PageLevel::Size2M)
        });
        if r.status.is_success() {
            self.pool.free(r.rcx);
            inc(&self.counters.promotes);
            MergeOutcome::Promoted
        } else {
            inc(&self.counters.promote_refused);
            self.restore(base, PageLevel::Size2M);
            MergeOutcome::NotReady
        }
    }

    /// Tries to merge every candidate 2M range (split earlier); keeps those not ready yet.
    /// Returns the number promoted. Does nothing when the policy does not merge.
    pub fn merge_pass(&self) -> u64 {
        if !self.policy.merge {
            return 0;
        }
        let candidates: Vec<u64> = self
            .merge_candidates
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .copied()
            .collect();
        let mut promoted = 0;
        for base in candidates {
            let outcome = self.try_merge(Gpa::new_truncate(base));
            if outcome != MergeOutcome::NotReady {
                self.merge_candidates
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .remove(&base);
            }
            if outcome == MergeOutcome::Promoted {
                promoted += 1;
            }
        }
        promoted
    }

    /// Adds a 2M range as a merge candidate (the VMM does this when a range turns private).
    pub fn note_private(&self, range: GpaRange) {
        if !self.policy.merge {
            return;
        }
        let mut c = self
            .merge_candidates
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let mut base = range.start().align_down(PageLevel::Size2M).as_u64();
        while base < range.end().as_u64() {
            c.insert(base);
            base += M2;
        }
    }
}

#[cfg(test)]
mod tests;
