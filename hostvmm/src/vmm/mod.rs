//! The VMM: one TD's host half wired together, and its exit handlers.
//!
//! [`Host`] owns the TDX-module emulator, the guest_memfd ([`GuestMemfd`]) and the private MMU
//! ([`PrivateMmu`]) and connects them the way KVM and a VMM do:
//!
//! - the MMU's backing store is the guest_memfd ([`PrivateBacking`] over it: `get_pfn` plus the
//!   largest uniformly private level around the GPA);
//! - the guest_memfd's invalidations go to the MMU ([`InvalidateHook`]): private -> shared and
//!   hole punches zap the private Secure-EPT, and pages the zap could not remove come back
//!   through the poison sink as error pages;
//! - EPT-violation exits go to the MMU's fault path ([`Host::handle_exit`]);
//! - `TDG.VP.VMCALL<MapGPA>` exits go to [`Host::handle_map_gpa`], which validates the request,
//!   converts in 2 MiB chunks (one KVM_HC_MAP_GPA_RANGE exit each on real KVM), answers RETRY
//!   with R11 = the next GPA (shared bit as sent) when the vCPU has a pending event or its time
//!   slice is spent, and maps backend errors to GHCI statuses a guest can act on.
//!
//! Lock order is guest_memfd first, then the MMU: conversions hold the guest_memfd while the
//! MMU zaps, and the MMU's fault path asks the guest_memfd before it takes its own lock.
//!
//! Not here: vCPU scheduling and guest code (see the simulator), shared-memory mappings.

use std::fmt;
use std::sync::{Arc, PoisonError};

use crossbeam_utils::sync::{ShardedLock, ShardedLockWriteGuard};

use accept::abi::{vmcall, GhciStatus, Gpa, GpaRange, PageLevel};

use crate::counters::{Local, Striped};
use crate::gmem::{
    ConversionBackend, ConvertError, ConvertMode, ConvertReport, FolioPool, GmemConfig, GmemError,
    GuestMemfd, HookError, InvalidateCtx, InvalidateHook, InvalidateReason, PunchReport,
    Shareability,
};
use crate::kvm::{
    BackingError, FaultError, FaultOutcome, Kicker, MmuPolicy, Pfn, PrivateBacking, PrivateMmu,
    SeptPagePool,
};
use crate::module::{ConfigError, ModuleConfig, TdExit, TdxModule, VmcallRegs};

/// Host physical base of guest memory folios in the model.
pub const GUEST_HPA_BASE: u64 = 1 << 40;
/// Host physical base of the S-EPT page pool in the model.
pub const SEPT_HPA_BASE: u64 = 1 << 46;

/// How the host splits MapGPA work.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MapGpaConfig {
    /// Bytes converted per chunk (KVM: 2 MiB).
    pub chunk: u64,
    /// Chunks per MapGPA call before the host answers RETRY anyway (a time slice); `0` never.
    pub chunks_per_slice: u32,
    /// Convert in block-first mode: BLOCK the private mappings before the point of no return
    /// and UNBLOCK them if the conversion aborts (seed 002).
    pub block_first: bool,
}

impl Default for MapGpaConfig {
    fn default() -> Self {
        MapGpaConfig {
            chunk: PageLevel::Size2M.size(),
            chunks_per_slice: 64,
            block_first: false,
        }
    }
}

/// Everything needed to build a [`Host`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostConfig {
    /// The TDX module's capabilities and the TD's configuration.
    pub module: ModuleConfig,
    /// Guest memory size in bytes (GPAs `[0, memory)`).
    pub memory: u64,
    /// Folio size of the guest_memfd.
    pub folio_level: PageLevel,
    /// Private MMU policy.
    pub mmu: MmuPolicy,
    /// MapGPA handling.
    pub map_gpa: MapGpaConfig,
    /// Pages in the S-EPT page pool.
    pub sept_pages: u64,
}

impl HostConfig {
    /// A host for `memory` bytes and `vcpus` vCPUs with this project's policies.
    pub fn new(memory: u64, vcpus: u32) -> HostConfig {
        HostConfig {
            module: ModuleConfig {
                vcpus,
                ..ModuleConfig::default()
            },
            memory,
            folio_level: PageLevel::Size2M,
            mmu: MmuPolicy::OURS,
            map_gpa: MapGpaConfig::default(),
            // One S-EPT page per 2M of guest memory covers a fully 4K-mapped TD, plus the
            // upper levels.
            sept_pages: memory / PageLevel::Size2M.size() + 4096,
        }
    }
}

/// Why a host could not be built.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    /// The module configuration is invalid.
    #[error("module: {0}")]
    Module(#[from] ConfigError),
    /// The guest_memfd configuration is invalid.
    #[error("guest_memfd: {0}")]
    Gmem(#[from] GmemError),
    /// The folio pool could not be created.
    #[error("folio pool: {0}")]
    Pool(String),
}

/// The backend behind a [`Host`], shared with the MMU's fault path. The lock stands for
/// guest_memfd's invalidation lock: the fault path takes it shared when the backend has a
/// shared fault path ([`ConversionBackend::fault_pfn_shared`]), everything else exclusive. It
/// is sharded for readers (a reader locks its thread's shard, a writer every shard), so faults
/// on different vCPUs share no cache line.
pub type SharedBackend = Arc<ShardedLock<dyn ConversionBackend>>;

/// The MMU's view of the conversion backend.
struct GmemBacking {
    gmem: SharedBackend,
}

fn lock<T: ?Sized>(m: &ShardedLock<T>) -> ShardedLockWriteGuard<'_, T> {
    m.write().unwrap_or_else(PoisonError::into_inner)
}

impl PrivateBacking for GmemBacking {
    fn get_pfn(&self, gpa: Gpa) -> Result<Pfn, BackingError> {
        let shared = self
            .gmem
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .fault_pfn_shared(gpa);
        let (pfn, max_level) = match shared {
            Some(r) => r,
            None => lock(&self.gmem).fault_pfn(gpa),
        }
        .map_err(backing_error)?;
        Ok(Pfn {
            hpa: pfn.hpa.as_u64(),
            max_level,
        })
    }

    fn poison(&self, gpa: Gpa, level: PageLevel) {
        let mut g = lock(&self.gmem);
        for i in 0..level.pages_4k() {
            let page = Gpa::new_truncate(gpa.as_u64() + i * 4096);
            if let Err(e) = g.poison(page) {
                log::warn!("cannot poison {page}: {e}");
            }
        }
    }
}

fn backing_error(e: GmemError) -> BackingError {
    match e {
        GmemError::OutOfRange { .. } => BackingError::OutOfRange,
        GmemError::Poisoned { .. } => BackingError::Poisoned,
        GmemError::NoMemory { .. } => BackingError::NoMemory,
        GmemError::ConversionPending { .. } => BackingError::Pending,
        _ => BackingError::Shared,
    }
}

/// The guest_memfd's invalidations, applied to the private MMU.
struct MmuHook<'a> {
    mmu: &'a PrivateMmu,
    /// Leaves blocked by a block-first `prepare`, per prepared range.
    blocked: Vec<(GpaRange, Vec<(Gpa, PageLevel)>)>,
}

impl<'a> MmuHook<'a> {
    fn new(mmu: &'a PrivateMmu) -> MmuHook<'a> {
        MmuHook {
            mmu,
            blocked: Vec::new(),
        }
    }
}

/// S-EPT pages a zap may need for the DEMOTEs at its two edges (1G and 2M at each).
const ZAP_SEPT_PAGES: usize = 4;

impl InvalidateHook for MmuHook<'_> {
    fn prepare(&mut self, range: GpaRange, ctx: InvalidateCtx) -> Result<(), HookError> {
        if ctx.reason == InvalidateReason::ToPrivate {
            return Ok(());
        }
        // Make sure the DEMOTEs at the edges will find their S-EPT pages (model of KVM's
        // split cache top-up before the point of no return).
        let pool = self.mmu.sept_pool();
        let mut got = Vec::with_capacity(ZAP_SEPT_PAGES);
        for _ in 0..ZAP_SEPT_PAGES {
            match pool.alloc() {
                Some(p) => got.push(p),
                None => break,
            }
        }
        let enough = got.len() == ZAP_SEPT_PAGES;
        for p in got {
            pool.free(p);
        }
        if !enough {
            return Err(HookError::NoMemory);
        }
        if ctx.block_first {
            let leaves = self.mmu.block_range(range).map_err(|e| match e {
                FaultError::Seamcall { status, .. } => HookError::Seamcall(status),
                _ => HookError::Busy,
            })?;
            self.blocked.push((range, leaves));
        }
        Ok(())
    }

    fn abort(&mut self, range: GpaRange, _ctx: InvalidateCtx) {
        if let Some(i) = self.blocked.iter().position(|(r, _)| *r == range) {
            let (_, leaves) = self.blocked.swap_remove(i);
            self.mmu.unblock_leaves(&leaves);
        }
    }

    fn invalidate(&mut self, range: GpaRange, ctx: InvalidateCtx, poison: &mut dyn FnMut(Gpa)) {
        if ctx.reason == InvalidateReason::ToPrivate {
            // Only shared mappings go; the VMM maps shared memory itself (not modelled).
            return;
        }
        // Leaves blocked in `prepare` are zapped like the others (BLOCK answers "already
        // blocked").
        self.blocked.retain(|(r, _)| *r != range);
        let report = self.mmu.zap(range);
        for (gpa, level) in report.poisoned {
            for i in 0..level.pages_4k() {
                poison(Gpa::new_truncate(gpa.as_u64() + i * 4096));
            }
        }
    }
}

/// Exact counters of the MapGPA handler.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct VmmStats {
    /// MapGPA exits handled.
    pub map_gpa_calls: u64,
    /// 2 MiB chunks converted (one KVM_HC_MAP_GPA_RANGE exit each on KVM).
    pub map_gpa_chunks: u64,
    /// RETRY answers given.
    pub map_gpa_retries: u64,
    /// Requests refused (ALIGN_ERROR, INVALID_OPERAND, ...).
    pub map_gpa_errors: u64,
    /// Conversions refused with EAGAIN (a host mapping) and turned into RETRY.
    pub map_gpa_eagain: u64,
    /// EPT-violation exits handled.
    pub ept_violations: u64,
    /// Exits the host could not handle.
    pub fault_errors: u64,
}

/// What the handlers count: one index per counter of [`VmmStats`], in its order.
#[derive(Debug, Clone, Copy)]
enum Ev {
    MapGpaCalls,
    MapGpaChunks,
    MapGpaRetries,
    MapGpaErrors,
    MapGpaEagain,
    EptViolations,
    FaultErrors,
}

const N: usize = Ev::FaultErrors as usize + 1;

thread_local! {
    static THREAD: Local<N> = Local::new();
}

#[derive(Debug, Default)]
struct Counters(Striped<N>);

impl Counters {
    fn inc(&self, e: Ev) {
        self.0.add(e as usize, 1);
        // Gone only while the thread is being torn down: nothing reads its counts then.
        let _ = THREAD.try_with(|t| t.add(e as usize, 1));
    }
}

impl VmmStats {
    fn from_counts(c: [u64; N]) -> VmmStats {
        let g = |e: Ev| c[e as usize];
        VmmStats {
            map_gpa_calls: g(Ev::MapGpaCalls),
            map_gpa_chunks: g(Ev::MapGpaChunks),
            map_gpa_retries: g(Ev::MapGpaRetries),
            map_gpa_errors: g(Ev::MapGpaErrors),
            map_gpa_eagain: g(Ev::MapGpaEagain),
            ept_violations: g(Ev::EptViolations),
            fault_errors: g(Ev::FaultErrors),
        }
    }
}

/// The events of every [`Host`] that the calling thread caused since it started. Read it
/// before and after a call (an exit handled on a vCPU's thread) to learn what that call did,
/// while other threads use the same host; [`crate::kvm::thread_stats`] is the MMU's part.
pub fn thread_stats() -> VmmStats {
    VmmStats::from_counts(THREAD.try_with(Local::get).unwrap_or([0; N]))
}

/// What the vCPU loop does after the host handled an exit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitAction {
    /// Re-enter the TD: the guest re-executes the instruction (ACCEPT, access) or sees the
    /// VMCALL's answer.
    Resume,
    /// The host cannot let the guest go on with this access (KVM: return to userspace with an
    /// error; the VMM usually kills the TD).
    Fatal(FaultError),
    /// A PENDING_EPT_VIOLATION exit: the TD runs with #VE on pending pages disabled and
    /// touched memory it never accepted. Mainline KVM kills the TD.
    KillTd,
}

/// One TD's host half.
pub struct Host {
    config: HostConfig,
    module: Arc<TdxModule>,
    gmem: SharedBackend,
    /// The same allocation as `gmem` when the backend is the guest_memfd model.
    model: Option<Arc<ShardedLock<GuestMemfd>>>,
    mmu: Arc<PrivateMmu>,
    counters: Counters,
}

impl fmt::Debug for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Host")
            .field("config", &self.config)
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

impl Host {
    /// Builds the module, the guest_memfd (all private, lazily backed) and the MMU. The TD is
    /// finalized (op-state RUNNABLE): the build phase (PAGE.ADD) is not modelled here.
    ///
    /// # Errors
    /// [`HostError`] for an unusable configuration.
    pub fn new(config: HostConfig, kicker: Arc<dyn Kicker>) -> Result<Host, HostError> {
        let pool = FolioPool::new(GUEST_HPA_BASE, config.memory)
            .map_err(|e| HostError::Pool(e.to_string()))?;
        let model = Arc::new(ShardedLock::new(GuestMemfd::new(
            GmemConfig::new(config.memory, config.folio_level),
            pool,
        )?));
        let mut host = Host::with_backend(config, kicker, model.clone())?;
        host.model = Some(model);
        Ok(host)
    }

    /// Builds the module and the MMU over another conversion backend (a real guest_memfd, a
    /// KVM_SET_MEMORY_ATTRIBUTES-style handler, a recording wrapper). The backend must cover
    /// `config.memory` bytes, all private.
    ///
    /// # Errors
    /// [`HostError`] for an unusable configuration.
    pub fn with_backend(
        config: HostConfig,
        kicker: Arc<dyn Kicker>,
        backend: SharedBackend,
    ) -> Result<Host, HostError> {
        let module = Arc::new(TdxModule::new(config.module)?);
        let finalize = module.finalize();
        if !finalize.status.is_success() {
            log::warn!("finalize: {:?}", finalize.status);
        }
        let gmem = backend;
        let backing = Arc::new(GmemBacking { gmem: gmem.clone() });
        let mmu = Arc::new(PrivateMmu::new(
            module.clone(),
            backing,
            kicker,
            config.mmu,
            SeptPagePool::new(SEPT_HPA_BASE, config.sept_pages),
        ));
        Ok(Host {
            config,
            module,
            gmem,
            model: None,
            mmu,
            counters: Counters::default(),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &HostConfig {
        &self.config
    }

    /// The module emulator.
    pub fn module(&self) -> &Arc<TdxModule> {
        &self.module
    }

    /// The private MMU.
    pub fn mmu(&self) -> &Arc<PrivateMmu> {
        &self.mmu
    }

    /// The conversion backend, locked. Do not hold it across a call into the host.
    pub fn gmem(&self) -> ShardedLockWriteGuard<'_, dyn ConversionBackend + 'static> {
        lock(&self.gmem)
    }

    /// The guest_memfd model, locked, when it is the backend ([`Host::new`]); `None` for a
    /// host built [`Host::with_backend`]. Do not hold it across a call into the host.
    pub fn model(&self) -> Option<ShardedLockWriteGuard<'_, GuestMemfd>> {
        self.model.as_deref().map(lock)
    }

    /// Counters so far.
    pub fn stats(&self) -> VmmStats {
        VmmStats::from_counts(self.counters.0.sum())
    }

    /// Handles a TD exit. For a VMCALL, `regs` is updated with the answer (R10, R11).
    /// `pending_event` tells whether the vCPU has an event to deliver (MapGPA then yields).
    pub fn handle_exit(
        &self,
        exit: TdExit,
        regs: &mut VmcallRegs,
        pending_event: &dyn Fn() -> bool,
    ) -> ExitAction {
        match exit {
            TdExit::EptViolation { gpa, ext, .. } => {
                self.counters.inc(Ev::EptViolations);
                if ext.exit_type() == crate::module::ExitType::PendingEptViolation {
                    return ExitAction::KillTd;
                }
                match self.mmu.handle_ept_violation(gpa, ext) {
                    Ok(_) => ExitAction::Resume,
                    Err(e) => {
                        self.counters.inc(Ev::FaultErrors);
                        ExitAction::Fatal(e)
                    }
                }
            }
            TdExit::HostPriorityBusyTimeout { .. } => {
                self.mmu.handle_host_priority_timeout();
                ExitAction::Resume
            }
            TdExit::Vmcall(r) => {
                *regs = r;
                if r.gpr[VmcallRegs::R10] == 0 && r.gpr[VmcallRegs::R11] == vmcall::MAP_GPA {
                    self.handle_map_gpa(regs, pending_event);
                } else {
                    regs.gpr[VmcallRegs::R10] = GhciStatus::SubfuncUnsupported.raw();
                }
                ExitAction::Resume
            }
        }
    }

    /// Handles `TDG.VP.VMCALL<MapGPA>`: R12 start (shared bit = direction), R13 length; writes
    /// R10 (status) and R11 (resume GPA on RETRY).
    pub fn handle_map_gpa(&self, regs: &mut VmcallRegs, pending_event: &dyn Fn() -> bool) {
        self.counters.inc(Ev::MapGpaCalls);
        let (status, resume) = self.map_gpa(
            regs.gpr[VmcallRegs::R12],
            regs.gpr[VmcallRegs::R13],
            pending_event,
        );
        match status {
            GhciStatus::Success => {}
            GhciStatus::Retry => self.counters.inc(Ev::MapGpaRetries),
            _ => self.counters.inc(Ev::MapGpaErrors),
        }
        regs.gpr[VmcallRegs::R10] = status.raw();
        regs.gpr[VmcallRegs::R11] = resume;
    }

    fn map_gpa(&self, start: u64, len: u64, pending_event: &dyn Fn() -> bool) -> (GhciStatus, u64) {
        let gpaw = self.config.module.gpaw;
        let bit = start & gpaw.shared_bit();
        let addr = start & !gpaw.shared_bit();
        if len == 0 || start & 0xFFF != 0 || len & 0xFFF != 0 {
            return (GhciStatus::AlignError, 0);
        }
        let Some(end) = addr.checked_add(len) else {
            return (GhciStatus::InvalidOperand, 0);
        };
        // Bits above the GPA width, a range crossing the shared bit, or beyond guest memory.
        if start >> gpaw.width() != 0 || end > gpaw.shared_bit() || end > self.config.memory {
            return (GhciStatus::InvalidOperand, 0);
        }
        let to = if bit != 0 {
            Shareability::Shared
        } else {
            Shareability::Private
        };
        let chunk = self.config.map_gpa.chunk.max(4096);
        let mut cur = addr;
        let mut chunks = 0u32;
        while cur < end {
            let chunk_end = ((cur / chunk) + 1).saturating_mul(chunk).min(end);
            let Ok(range) = GpaRange::new(cur, chunk_end) else {
                return (GhciStatus::InvalidOperand, 0);
            };
            match self.convert(range, to) {
                Ok(_) => {}
                Err(ConvertError::Again { offset }) => {
                    // A host mapping still holds the page: the guest may retry from there.
                    self.counters.inc(Ev::MapGpaEagain);
                    return (GhciStatus::Retry, offset.as_u64() | bit);
                }
                Err(ConvertError::NoMemory { .. })
                | Err(ConvertError::HookFailed { .. })
                | Err(ConvertError::Backend { .. }) => {
                    return (GhciStatus::Retry, cur | bit);
                }
                Err(ConvertError::OutOfRange { .. }) => return (GhciStatus::InvalidOperand, 0),
            }
            self.counters.inc(Ev::MapGpaChunks);
            chunks += 1;
            cur = chunk_end;
            let slice = self.config.map_gpa.chunks_per_slice;
            if cur < end && (pending_event() || (slice != 0 && chunks >= slice)) {
                return (GhciStatus::Retry, cur | bit);
            }
        }
        (GhciStatus::Success, 0)
    }

    /// Converts `range` in the guest_memfd (and, to shared, zaps the private mappings).
    ///
    /// # Errors
    /// The guest_memfd's [`ConvertError`]; nothing changed.
    pub fn convert(
        &self,
        range: GpaRange,
        to: Shareability,
    ) -> Result<ConvertReport, ConvertError> {
        let mode = ConvertMode {
            block_first: self.config.map_gpa.block_first,
        };
        let report = {
            let mut g = lock(&self.gmem);
            let mut hook = MmuHook::new(&self.mmu);
            g.convert(range, to, mode, &mut hook)?
        };
        if to == Shareability::Private {
            self.mmu.note_private(range);
        }
        Ok(report)
    }

    /// Punches `range` out of the guest_memfd (fallocate PUNCH_HOLE): its private mappings
    /// are zapped first, through the same hook as conversions.
    ///
    /// # Errors
    /// The guest_memfd's [`ConvertError`]; nothing changed.
    pub fn punch_hole(&self, range: GpaRange) -> Result<PunchReport, ConvertError> {
        let mut g = lock(&self.gmem);
        let mut hook = MmuHook::new(&self.mmu);
        g.punch_hole(range, &mut hook)
    }

    /// Runs the MMU's merge pass (PROMOTE split ranges that became uniform again).
    pub fn merge_pass(&self) -> u64 {
        self.mmu.merge_pass()
    }

    /// Handles an EPT-violation exit directly (for callers that drive the module themselves).
    ///
    /// # Errors
    /// [`FaultError`] from the MMU.
    pub fn fault(
        &self,
        gpa: u64,
        ext: crate::module::ExtExitQual,
    ) -> Result<FaultOutcome, FaultError> {
        self.counters.inc(Ev::EptViolations);
        self.mmu.handle_ept_violation(gpa, ext)
    }
}

#[cfg(test)]
mod tests;
