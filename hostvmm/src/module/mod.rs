//! An emulator of the TDX module's Secure-EPT and of the memory SEAMCALLs and TDCALLs, following
//! the TDX module 1.5 source (intel/tdx-module, branch `tdx_1.5`, tag TDX_1.5.01) handler by
//! handler. The audit of every handler against that source (what is modelled, what is not and
//! why) is [`audit`] (`docs/module-audit.md`).
//!
//! [`TdxModule`] holds one TD: its Secure-EPT tree (nodes allocated on demand), its op-state
//! (build vs runnable), TLB epoch tracking with vCPU entry/exit accounting, the per-vCPU #VE
//! information, and a sparse model of page contents (a `u64` token per 4K host page). Host
//! calls are methods returning [`SeamcallResult`] (RAX, RCX, RDX as the module sets them);
//! guest calls take a vCPU index and return what the guest or the host would see next
//! ([`TdcallOutcome`], [`AccessOutcome`]); the calls that return data also have a raw-register
//! form ([`TdcallRegs`]). Every status is a value: no input panics.
//!
//! Order of checks, as in every memory SEAMCALL handler of the source: op-state from the
//! module's lookup table (`op_state_lookup.c`), page info and GPA (`helpers.c`
//! verify_page_info_input, check_gpa_validity), the S-EPT tree lock, the walk (which stops at
//! any entry without permissions, a blocked page table included: `sept_manager.c`
//! secure_ept_walk), the entry lock, the entry state from the module's state table
//! (`sept_state_lookup.c`), blocked-and-tracked, and only then the host physical address
//! operands. Failures about an entry report it in the architectural encoding
//! (`sept_manager.c` set_arch_septe_details_in_vmm_regs).
//!
//! Locking, as the source pins it down: the S-EPT tree lock is taken with try semantics,
//! **shared** by PAGE.AUG, PAGE.REMOVE, PAGE.DEMOTE, PAGE.PROMOTE and SEPT.ADD, **exclusive** by
//! RANGE.BLOCK, RANGE.UNBLOCK and SEPT.REMOVE (PAGE.ADD locks it implicitly through the TDR); a
//! conflict is OPERAND_BUSY|SEPT_TREE. Every call on an entry then takes the entry lock, also
//! with try semantics; guest ACCEPT takes only the entry lock, before it looks at the state. A
//! host call that loses the entry lock marks the entry with host priority (`tdx_locks.h`
//! sept_lock_acquire_host): guest calls on it get OPERAND_BUSY until a host call takes the lock,
//! and a vCPU refused for longer than the timeout exits with TDX_HOST_PRIORITY_BUSY_TIMEOUT
//! ([`TdExit::HostPriorityBusyTimeout`], `tdx_td_dispatcher.c`). The tree's memory is guarded
//! by a separate reader-writer lock (sharded for readers, so that the vCPUs' calls share no
//! cache line), held exclusively by calls that allocate or free S-EPT pages; this only
//! serialises them with guest calls, which the module also allows.
//!
//! What it does not model: the PAMT (HPAs are not checked for ownership or double use), TDR /
//! TDCS pages and their locks, measurement beyond a running digest of PAGE.ADD, L2 VMs,
//! migration, and TDG.MEM.PAGE.ATTR.WR. Capabilities that differ between module versions are
//! data ([`ModuleConfig`]) so that callers can be tested against each.

/// The audit of every handler against the module source (`docs/module-audit.md`).
pub mod audit {
    #![doc = include_str!("../../../docs/module-audit.md")]
}

mod content;
mod epoch;
mod fault;
mod guest;
mod host;
mod sept;
mod sharex;
mod stats;

use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};

use accept::abi::{Gpa, Gpaw, PageLevel, TdxStatus, VeInfo};
use crossbeam_utils::sync::{ShardedLock, ShardedLockReadGuard, ShardedLockWriteGuard};
use crossbeam_utils::CachePadded;

pub use fault::FaultResult;
#[cfg(feature = "testing")]
pub use fault::FaultRule;
pub use sept::SeptState;
pub use stats::{AccessKind, CallKind, CallOutcome, Stats};

use content::Contents;
use epoch::EpochTracking;
use fault::Injector;
use sept::{level_size, Tree, Word};
use sharex::SharexLock;
#[cfg(feature = "testing")]
use sharex::{LockMode, SharexGuard};
use stats::Counters;

/// TD attribute SEPT_VE_DISABLE (bit 28): no #VE on access to a PENDING page.
pub const ATTR_SEPT_VE_DISABLE: u64 = 1 << 28;

/// Operand id of R9 (TDH.MEM.PAGE.ADD's source page), `tdx_error_codes_defs.h`.
pub const OPERAND_R9: u32 = 9;

/// The physical address taken for the TD's root page (TDR): the RDX input of the memory
/// SEAMCALLs, which DEMOTE and PROMOTE give back in RDX with INTERRUPTED_RESTARTABLE
/// (`tdh_mem_page_demote.c`, `tdh_mem_page_promote.c`: original RCX and RDX restored). The
/// emulator holds one TD and no TDR page, so the value is fixed.
pub const TDR_PA: u64 = 0x00FF_FFFF_F000;

/// TDX_HOST_PRIORITY_BUSY_TIMEOUT (`tdx_error_codes_defs.h`): the status of TDH.VP.ENTER when a
/// vCPU exits because its guest calls were refused by host priority for too long.
pub const HOST_PRIORITY_BUSY_TIMEOUT: TdxStatus = TdxStatus::from_raw(0x9000_0205_0000_0000);

/// Default number of consecutive host-priority refusals of one vCPU's TDCALLs before the
/// module exits to the host (the module counts TSC ticks against the TD's HP_LOCK_TIMEOUT; the
/// emulator counts refusals, see [`TdxModule::set_hp_lock_timeout`]).
pub const DEFAULT_HP_LOCK_TIMEOUT: u32 = 64;

/// Module capabilities and TD configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModuleConfig {
    /// GPA width: 48 (4-level S-EPT, shared bit 47) or 52 (5-level, shared bit 51).
    pub gpaw: Gpaw,
    /// Largest level TDG.MEM.PAGE.ACCEPT takes: 2M in every public module (1.5.01); 1G for a
    /// future module.
    pub max_accept_level: PageLevel,
    /// Largest level TDH.MEM.PAGE.AUG takes (2M in 1.5.01).
    pub max_aug_level: PageLevel,
    /// Whether TDH.MEM.PAGE.DEMOTE returns INTERRUPTED_RESTARTABLE when a host interrupt is
    /// pending ([`TdxModule::set_host_interrupt_pending`]).
    pub demote_interruptible: bool,
    /// #VE on guest access to a PENDING page (TD attribute SEPT_VE_DISABLE clear).
    pub pending_ve: bool,
    /// Number of vCPUs (at least 1).
    pub vcpus: u32,
    /// Chunks zeroed by one slice of an interruptible 2M (or 1G) ACCEPT before the module looks
    /// for a pending interrupt (1..=512). Module 1.5 looks after every 4K chunk (1, the
    /// default). A 2M page has 512 4K chunks; a 1G page is modelled as 512 2M chunks.
    pub accept_slice_chunks: u16,
}

impl Default for ModuleConfig {
    fn default() -> ModuleConfig {
        ModuleConfig {
            gpaw: Gpaw::Bits48,
            max_accept_level: PageLevel::Size2M,
            max_aug_level: PageLevel::Size2M,
            demote_interruptible: true,
            pending_ve: true,
            vcpus: 1,
            accept_slice_chunks: 1,
        }
    }
}

/// A configuration the emulator cannot run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// `vcpus` is 0.
    #[error("a TD needs at least one vCPU")]
    NoVcpus,
    /// `accept_slice_chunks` is 0 or above 512.
    #[error("accept slice of {0} chunks is outside 1..=512")]
    BadAcceptSlice(u16),
}

/// A guest-side call or access named a vCPU that cannot make it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum VcpuError {
    /// No such vCPU index.
    #[error("vCPU {0} does not exist")]
    NoSuchVcpu(usize),
    /// The vCPU is not inside the TD (never entered, or exited and not re-entered).
    #[error("vCPU {0} is not running in the TD")]
    NotInTd(usize),
    /// `vcpu_enter` on a vCPU that is already inside the TD.
    #[error("vCPU {0} is already running in the TD")]
    AlreadyInTd(usize),
}

/// The TD's operation state (the subset that matters here).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpState {
    /// Build phase: PAGE.ADD allowed; REMOVE/DEMOTE/PROMOTE/UNBLOCK skip the blocked-and-tracked
    /// checks.
    Initialized,
    /// After TDH.MR.FINALIZE.
    Runnable,
}

/// What a SEAMCALL returns: RAX and the RCX/RDX outputs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SeamcallResult {
    /// RAX.
    pub status: TdxStatus,
    /// RCX: on S-EPT failures the entry found in the architectural encoding (see
    /// [`EntryInfo::raw`]); the removed page's HPA for PAGE.REMOVE; the freed S-EPT page for
    /// PROMOTE and SEPT.REMOVE; the page-info input after INTERRUPTED_RESTARTABLE.
    pub rcx: u64,
    /// RDX: on S-EPT failures, level (bits 2:0) | public state (bits 15:8); [`TDR_PA`] after
    /// INTERRUPTED_RESTARTABLE.
    pub rdx: u64,
}

impl SeamcallResult {
    /// A result with this status and zero outputs.
    pub const fn status(status: TdxStatus) -> SeamcallResult {
        SeamcallResult {
            status,
            rcx: 0,
            rdx: 0,
        }
    }

    /// The level reported in RDX bits 2:0.
    pub const fn rdx_level(&self) -> u8 {
        (self.rdx & 7) as u8
    }

    /// The public state reported in RDX bits 15:8.
    pub const fn rdx_state(&self) -> u8 {
        (self.rdx >> 8) as u8
    }
}

/// Extended exit qualification of an EPT-violation TD exit (spec §5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ExtExitQual(pub u64);

/// Type field (bits 3:0) of [`ExtExitQual`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitType {
    /// 0: a plain EPT violation.
    None,
    /// 1: TDG.MEM.PAGE.ACCEPT needs the host to map or demote.
    Accept,
    /// 2: GPA details.
    GpaDetails,
    /// 6: access to a PENDING page with #VE disabled.
    PendingEptViolation,
    /// Another value.
    Other(u8),
}

impl ExtExitQual {
    /// Type NONE, no details.
    pub const NONE: ExtExitQual = ExtExitQual(0);

    /// An ACCEPT-type qualification: requested level, level where the walk stopped, the public
    /// state there and whether that entry is a leaf.
    pub const fn accept(req_level: u8, walk_level: u8, state: SeptState, is_leaf: bool) -> Self {
        ExtExitQual(
            1 | ((req_level as u64 & 7) << 32)
                | ((walk_level as u64 & 7) << 35)
                | ((state.public_state() as u64) << 38)
                | ((is_leaf as u64) << 46),
        )
    }

    /// A PENDING_EPT_VIOLATION qualification.
    pub const PENDING: ExtExitQual = ExtExitQual(6);

    /// Bits 3:0.
    pub const fn exit_type(self) -> ExitType {
        match self.0 & 0xF {
            0 => ExitType::None,
            1 => ExitType::Accept,
            2 => ExitType::GpaDetails,
            6 => ExitType::PendingEptViolation,
            other => ExitType::Other(other as u8),
        }
    }

    /// Bits 34:32: the level the guest asked for.
    pub const fn req_level(self) -> u8 {
        ((self.0 >> 32) & 7) as u8
    }

    /// Bits 37:35: the level where the walk stopped.
    pub const fn walk_level(self) -> u8 {
        ((self.0 >> 35) & 7) as u8
    }

    /// Bits 45:38: the public state of the entry where the walk stopped.
    pub const fn state(self) -> u8 {
        ((self.0 >> 38) & 0xFF) as u8
    }

    /// Bit 46: that entry is a leaf.
    pub const fn is_leaf(self) -> bool {
        (self.0 >> 46) & 1 != 0
    }
}

/// Registers of TDG.VP.VMCALL: RCX's exposure mask and the 16 GPRs by x86 number
/// (RAX 0, RCX 1, RDX 2, RBX 3, RSP 4, RBP 5, RSI 6, RDI 7, R8..R15 8..15).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct VmcallRegs {
    /// RCX: bit i set exposes GPR i to the host.
    pub mask: u64,
    /// GPR values.
    pub gpr: [u64; 16],
}

impl VmcallRegs {
    /// R10 index.
    pub const R10: usize = 10;
    /// R11 index.
    pub const R11: usize = 11;
    /// R12 index.
    pub const R12: usize = 12;
    /// R13 index.
    pub const R13: usize = 13;
}

/// A TD exit to the host VMM. The vCPU has left the TD: the host calls
/// [`TdxModule::vcpu_enter`] to resume it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TdExit {
    /// EPT violation (exit reason 48).
    EptViolation {
        /// R8: the GPA, bits 11:0 cleared.
        gpa: u64,
        /// VMX exit qualification (bit 0 read, bit 1 write, bits 7/8 GLA valid/translated).
        exit_qualification: u64,
        /// Extended exit qualification.
        ext: ExtExitQual,
    },
    /// TDG.VP.VMCALL: the exposed registers (unexposed ones read as 0). The host answers by
    /// writing R10/R11 (and others) before resuming the guest.
    Vmcall(VmcallRegs),
    /// TDH.VP.ENTER returned [`HOST_PRIORITY_BUSY_TIMEOUT`]: the vCPU's TDCALL was refused
    /// because a host SEAMCALL has priority on the S-EPT entry, for longer than the timeout
    /// (`tdx_td_dispatcher.c` tdx_td_dispatcher, `td_exit.c` async_tdexit_internal). The TDCALL
    /// has completed with `guest_status` (OPERAND_BUSY) in the guest's RAX; the host re-enters
    /// the vCPU, which resumes after the TDCALL.
    HostPriorityBusyTimeout {
        /// The status the guest's TDCALL returns.
        guest_status: TdxStatus,
    },
}

impl TdExit {
    /// For an exit that completed the guest's TDCALL, the status the guest sees when it is
    /// re-entered; `None` when the guest re-executes the instruction or reads the host's
    /// answer (EPT violation, VMCALL).
    pub const fn completed_status(&self) -> Option<TdxStatus> {
        match self {
            TdExit::HostPriorityBusyTimeout { guest_status } => Some(*guest_status),
            _ => None,
        }
    }
}

/// What a TDCALL that can exit or be interrupted led to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TdcallOutcome {
    /// The TDCALL completed with this RAX.
    Completed(TdxStatus),
    /// The TD exited to the host; the guest re-executes the TDCALL after resumption (ACCEPT) or
    /// sees the host's answer (VMCALL).
    Exit(TdExit),
    /// A 2M/1G ACCEPT saved its progress because an interrupt was pending; the guest takes the
    /// interrupt and re-executes the same TDCALL, no status is returned.
    Interrupted,
}

pub use accept::abi::TdcallRegs;

/// A guest memory access.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Read the 4K page's token.
    Read,
    /// Write this token to the 4K page.
    Write(u64),
}

/// What a guest memory access led to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccessOutcome {
    /// The page is MAPPED: the token read (or written).
    Ok(u64),
    /// #VE (vector 20) injected; VE info is now valid with these contents.
    Ve(VeInfo),
    /// #VE while VE info was still valid: the module delivers #DF.
    DoubleFault,
    /// TD exit to the host.
    Exit(TdExit),
    /// A shared GPA (shared bit set): not in the S-EPT, host memory.
    Shared {
        /// The GPA as accessed.
        gpa: u64,
    },
    /// The GPA is beyond the TD's GPA width (the guest's own page tables would fault).
    InvalidGpa,
}

/// One S-EPT entry as seen by [`TdxModule::walk`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EntryInfo {
    /// Level of the entry (0 = 4K).
    pub level: u8,
    /// State.
    pub state: SeptState,
    /// Leaf: the page's HPA. Non-leaf: the child S-EPT page's HPA. FREE: 0.
    pub hpa: u64,
    /// 2M/1G ACCEPT progress, in chunks (0..=512).
    pub accept_progress: u64,
    /// The entry lock is held.
    pub locked: bool,
}

impl EntryInfo {
    /// The architectural encoding of the entry that the module returns in RCX on failures
    /// (`sept_manager.c` set_arch_septe_details_in_vmm_regs): FREE is SVE (bit 63) alone; a
    /// non-leaf is RWX only (7 NL_MAPPED, 0 NL_BLOCKED); a leaf is HPA | RWX (7 when MAPPED) |
    /// memory type WB (bits 5:3) | IPAT (bit 6) | PS (bit 7, 4K leaves included) | SVE, and a
    /// partly accepted 2M PENDING leaf also shows its ACCEPT counter in bits 20:12.
    pub const fn raw(&self) -> u64 {
        Word::leaf(self.state, self.hpa)
            .with_progress(self.accept_progress)
            .arch(self.level)
    }

    /// RDX on failures: level | public state << 8.
    pub const fn rdx(&self) -> u64 {
        (self.level as u64) | ((self.state.public_state() as u64) << 8)
    }

    /// The HPA of the 4K page of `gpa` inside this leaf.
    pub const fn page_hpa(&self, gpa: u64) -> u64 {
        self.hpa + (gpa & (level_size(self.level) - 1) & !0xFFF)
    }
}

/// A tree invariant that does not hold (reported by [`TdxModule::check_tree`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("S-EPT invariant violated: {0}")]
pub struct InvariantError(pub String);

#[derive(Debug, Default)]
struct VcpuState {
    inside: bool,
    epoch: u64,
    ve: Option<VeInfo>,
    /// Consecutive TDCALLs refused by host priority (`tdvps` hp_lock_busy and its start time).
    hp_refusals: u32,
}

const OP_INITIALIZED: u8 = 0;
const OP_RUNNABLE: u8 = 1;

/// One TD's view of the TDX module. `Send + Sync`; all methods take `&self`.
#[derive(Debug)]
pub struct TdxModule {
    config: ModuleConfig,
    // The two locks every call takes shared sit on cache lines of their own: their reader
    // counts change at every call, and the fields read next to them would miss each time.
    /// The arena's memory lock (see `sept.rs`), not the module's tree lock.
    tree: ShardedLock<Tree>,
    /// The module's S-EPT tree lock, with try semantics (see `sharex.rs`).
    sept_lock: CachePadded<SharexLock>,
    hp_lock_timeout: std::sync::atomic::AtomicU32,
    op_state: AtomicU8,
    /// TLB epoch tracking (see `epoch.rs`).
    epochs: EpochTracking,
    /// One cache line each: vCPUs running in parallel lock their own state at every call.
    vcpus: Vec<CachePadded<Mutex<VcpuState>>>,
    interrupts: Vec<AtomicBool>,
    host_interrupt: AtomicBool,
    pending_ve: AtomicBool,
    /// The TD attributes fixed at creation (TDG.VP.INFO RDX).
    attributes: u64,
    contents: Contents,
    counters: Counters,
    faults: Injector,
    mrtd: Mutex<u64>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl TdxModule {
    /// A TD in op-state INITIALIZED with an empty S-EPT (root only) and TD_EPOCH 1.
    ///
    /// # Errors
    /// [`ConfigError`] when the configuration has no vCPU or an impossible accept slice.
    pub fn new(config: ModuleConfig) -> Result<TdxModule, ConfigError> {
        if config.vcpus == 0 {
            return Err(ConfigError::NoVcpus);
        }
        if config.accept_slice_chunks == 0 || config.accept_slice_chunks > 512 {
            return Err(ConfigError::BadAcceptSlice(config.accept_slice_chunks));
        }
        let n = config.vcpus as usize;
        Ok(TdxModule {
            config,
            tree: ShardedLock::new(Tree::new(config.gpaw.sept_levels() - 1)),
            sept_lock: CachePadded::new(SharexLock::default()),
            hp_lock_timeout: std::sync::atomic::AtomicU32::new(DEFAULT_HP_LOCK_TIMEOUT),
            op_state: AtomicU8::new(OP_INITIALIZED),
            epochs: EpochTracking::new(n),
            vcpus: (0..n)
                .map(|_| CachePadded::new(Mutex::new(VcpuState::default())))
                .collect(),
            interrupts: (0..n).map(|_| AtomicBool::new(false)).collect(),
            host_interrupt: AtomicBool::new(false),
            pending_ve: AtomicBool::new(config.pending_ve),
            attributes: if config.pending_ve {
                0
            } else {
                ATTR_SEPT_VE_DISABLE
            },
            contents: Contents::new(),
            counters: Counters::new(),
            faults: Injector::default(),
            mrtd: Mutex::new(0xcbf2_9ce4_8422_2325),
        })
    }

    /// The configuration this module was created with.
    pub fn config(&self) -> &ModuleConfig {
        &self.config
    }

    /// The current op-state.
    pub fn op_state(&self) -> OpState {
        if self.op_state.load(Ordering::Acquire) == OP_RUNNABLE {
            OpState::Runnable
        } else {
            OpState::Initialized
        }
    }

    fn runnable(&self) -> bool {
        self.op_state() == OpState::Runnable
    }

    /// Changes the TD's PENDING_VE_DISABLE control (as TDG.VM.WR may): `true` enables #VE on
    /// pending pages.
    pub fn set_pending_ve(&self, enabled: bool) {
        self.pending_ve.store(enabled, Ordering::Release);
    }

    /// Whether access to a PENDING page injects #VE (rather than exiting to the host).
    pub fn pending_ve(&self) -> bool {
        self.pending_ve.load(Ordering::Acquire)
    }

    // ---- vCPU accounting -------------------------------------------------------------------

    fn vcpu(&self, vcpu: usize) -> Result<MutexGuard<'_, VcpuState>, VcpuError> {
        self.vcpus
            .get(vcpu)
            .map(|v| lock(v))
            .ok_or(VcpuError::NoSuchVcpu(vcpu))
    }

    /// TD entry of `vcpu`: counts it in the current epoch's parity.
    ///
    /// # Errors
    /// [`VcpuError::NoSuchVcpu`], or [`VcpuError::AlreadyInTd`] when it is already inside.
    pub fn vcpu_enter(&self, vcpu: usize) -> Result<(), VcpuError> {
        let mut v = self.vcpu(vcpu)?;
        if v.inside {
            return Err(VcpuError::AlreadyInTd(vcpu));
        }
        v.epoch = self.epochs.enter(vcpu);
        v.inside = true;
        Ok(())
    }

    /// TD exit of `vcpu` (a host kick, an interrupt): uncounts it. Exits caused by guest calls
    /// ([`TdExit`]) do this themselves.
    ///
    /// # Errors
    /// [`VcpuError::NoSuchVcpu`], or [`VcpuError::NotInTd`] when it is not inside.
    pub fn vcpu_exit(&self, vcpu: usize) -> Result<(), VcpuError> {
        let mut v = self.vcpu(vcpu)?;
        if !v.inside {
            return Err(VcpuError::NotInTd(vcpu));
        }
        self.leave(vcpu, &mut v);
        Ok(())
    }

    fn leave(&self, vcpu: usize, v: &mut VcpuState) {
        if v.inside {
            self.epochs.leave(vcpu, v.epoch);
            v.inside = false;
        }
    }

    /// A host kick of `vcpu` (KVM's IPI): if it is inside the TD it exits and re-enters at once,
    /// which moves it to the current epoch's parity; if it is outside, nothing happens. A kick
    /// waits for a guest call in progress on that vCPU to finish, as the IPI takes effect at
    /// an instruction boundary.
    ///
    /// # Errors
    /// [`VcpuError::NoSuchVcpu`].
    pub fn vcpu_kick(&self, vcpu: usize) -> Result<(), VcpuError> {
        let mut v = self.vcpu(vcpu)?;
        if v.inside {
            v.epoch = self.epochs.reenter(vcpu, v.epoch);
        }
        Ok(())
    }

    /// Kicks every vCPU ([`TdxModule::vcpu_kick`]).
    pub fn kick_all(&self) {
        for vcpu in 0..self.vcpus.len() {
            let _ = self.vcpu_kick(vcpu);
        }
    }

    /// Whether `vcpu` is inside the TD (`false` for an unknown index).
    pub fn vcpu_in_td(&self, vcpu: usize) -> bool {
        self.vcpu(vcpu).is_ok_and(|v| v.inside)
    }

    /// Whether `vcpu` has VE info that the guest has not read yet.
    pub fn ve_info_valid(&self, vcpu: usize) -> bool {
        self.vcpu(vcpu).is_ok_and(|v| v.ve.is_some())
    }

    /// Marks an interrupt pending (or not) for `vcpu`: the next slice boundary of a 2M ACCEPT
    /// on that vCPU saves progress and returns [`TdcallOutcome::Interrupted`], consuming it.
    /// Unknown indices are ignored.
    pub fn set_pending_interrupt(&self, vcpu: usize, pending: bool) {
        if let Some(f) = self.interrupts.get(vcpu) {
            f.store(pending, Ordering::Release);
        }
    }

    /// Marks a host interrupt pending: the next DEMOTE (if `demote_interruptible`) or PROMOTE
    /// that passes its checks returns INTERRUPTED_RESTARTABLE with no change, consuming it.
    pub fn set_host_interrupt_pending(&self, pending: bool) {
        self.host_interrupt.store(pending, Ordering::Release);
    }

    /// The current TD_EPOCH.
    pub fn td_epoch(&self) -> u64 {
        self.epochs.td_epoch()
    }

    /// vCPUs counted in each epoch parity.
    pub fn epoch_refcounts(&self) -> [u64; 2] {
        self.epochs.refcounts()
    }

    fn tracked(&self, bepoch: u64) -> bool {
        self.epochs.tracked(bepoch)
    }

    // ---- introspection ---------------------------------------------------------------------

    fn read_tree(&self) -> ShardedLockReadGuard<'_, Tree> {
        self.tree.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write_tree(&self) -> ShardedLockWriteGuard<'_, Tree> {
        self.tree.write().unwrap_or_else(PoisonError::into_inner)
    }

    /// Sets the host-priority timeout, in consecutive refusals of one vCPU's TDCALLs (at least
    /// 1): the module's TDCS field HP_LOCK_TIMEOUT, which the host may write, counted in TSC
    /// ticks there.
    pub fn set_hp_lock_timeout(&self, refusals: u32) {
        self.hp_lock_timeout
            .store(refusals.max(1), Ordering::Release);
    }

    /// Walks towards the entry of `gpa` at `level` (0 = 4K .. 4) and returns the entry where it
    /// ended (the requested level, or a higher one where the walk stopped at a leaf or FREE
    /// entry). Bits above the GPA width are ignored. This is introspection, standing in for a
    /// host's mirror page table: unlike the module's own walks it goes through NL_BLOCKED
    /// page tables, where every SEAMCALL and TDCALL walk stops.
    pub fn walk(&self, gpa: Gpa, level: u8) -> EntryInfo {
        let tree = self.read_tree();
        let end = tree.walk(gpa.as_u64(), level, true);
        entry_info(&tree, end.level, end.word)
    }

    /// The entry of `gpa` at exactly `level`, `None` when the walk stops above it.
    pub fn entry(&self, gpa: Gpa, level: PageLevel) -> Option<EntryInfo> {
        let e = self.walk(gpa, level.index());
        (e.level == level.index()).then_some(e)
    }

    /// The leaf (or FREE entry) that maps `gpa` for the guest, wherever the walk ends.
    pub fn leaf(&self, gpa: Gpa) -> EntryInfo {
        self.walk(gpa, 0)
    }

    /// Number of S-EPT nodes allocated, root included.
    pub fn sept_nodes(&self) -> usize {
        self.read_tree().live_nodes()
    }

    /// Estimated bytes used by the S-EPT (4 KiB per node) and page contents (4 KiB per 2M chunk
    /// holding a non-zero token).
    pub fn footprint_bytes(&self) -> usize {
        let nodes = self.sept_nodes();
        let chunks = self.contents.chunks();
        nodes
            .saturating_mul(4096)
            .saturating_add(chunks.saturating_mul(4096))
    }

    /// The token of the 4K host page containing `hpa`.
    pub fn read_content(&self, hpa: u64) -> u64 {
        self.contents.read(hpa)
    }

    /// Writes the token of the 4K host page containing `hpa` (host memory writes, e.g. the
    /// source of PAGE.ADD or what a page held before AUG).
    pub fn write_content(&self, hpa: u64, token: u64) {
        self.contents.write(hpa, token);
    }

    /// A snapshot of every counter.
    pub fn stats(&self) -> Stats {
        self.counters.snapshot()
    }

    /// Adds a fault-injection rule.
    #[cfg(feature = "testing")]
    pub fn inject(&self, rule: FaultRule) {
        self.faults.add(rule);
    }

    /// Drops every fault-injection rule.
    #[cfg(feature = "testing")]
    pub fn clear_faults(&self) {
        self.faults.clear();
    }

    /// Running digest of every PAGE.ADD (GPA and content token), a stand-in for MRTD.
    pub fn mrtd(&self) -> u64 {
        *lock(&self.mrtd)
    }

    /// Holds the TD epoch lock shared until the guard drops, as a TD entry in progress on
    /// another logical processor would (a test and simulation hook): TDH.MEM.TRACK answers
    /// OPERAND_BUSY|TD_EPOCH meanwhile.
    #[cfg(feature = "testing")]
    pub fn hold_epoch_lock(&self) -> EpochLockGuard<'_> {
        EpochLockGuard {
            _shared: self.epochs.hold(),
        }
    }

    /// Holds the lock of the entry of `gpa` at `level` until the guard drops, as another
    /// logical processor inside a shared-mode SEAMCALL on that entry would (a test and
    /// simulation hook for the locking rules). Also holds the S-EPT tree lock shared, so the
    /// calls that take it exclusively (BLOCK, UNBLOCK, SEPT.REMOVE, PAGE.ADD) are refused with
    /// BUSY meanwhile. The walk goes through blocked page tables, as a call that walked
    /// before the BLOCK may still hold the entry. `None` when the walk does not reach `level`,
    /// the entry is already locked or the tree lock is held exclusively.
    #[cfg(feature = "testing")]
    pub fn hold_entry_lock(&self, gpa: Gpa, level: u8) -> Option<EntryLockGuard<'_>> {
        let shared = self.sept_lock.try_lock(LockMode::Shared)?;
        let tree = self.read_tree();
        let end = tree.walk(gpa.as_u64(), level, true);
        if !end.reached {
            return None;
        }
        host::lock_entry(tree.slot(end.node, end.idx)?).ok()?;
        Some(EntryLockGuard {
            module: self,
            _shared: shared,
            node: end.node,
            idx: end.idx,
        })
    }

    /// Checks the tree's structural invariants: every non-leaf entry points to a live node one
    /// level down, every live node is reachable exactly once, and no entry lock is held (call
    /// when no call is in flight).
    ///
    /// # Errors
    /// [`InvariantError`] describing the first violation.
    pub fn check_tree(&self) -> Result<(), InvariantError> {
        let tree = self.read_tree();
        let mut seen = 0usize;
        let mut stack = vec![0usize];
        let mut visited = std::collections::HashSet::new();
        while let Some(n) = stack.pop() {
            if !visited.insert(n) {
                return Err(InvariantError(format!("node {n} reachable twice")));
            }
            seen += 1;
            let Some(node) = tree.node(n) else {
                return Err(InvariantError(format!("dangling node {n}")));
            };
            for (i, w) in tree.words(n).enumerate() {
                if w.locked() {
                    return Err(InvariantError(format!("entry {i} of node {n} locked")));
                }
                if w.state().is_non_leaf() {
                    if node.level == 0 {
                        return Err(InvariantError(format!("non-leaf 4K entry in node {n}")));
                    }
                    let child = w.child();
                    match tree.node(child) {
                        Some(c) if c.level + 1 == node.level => stack.push(child),
                        _ => {
                            return Err(InvariantError(format!(
                                "entry {i} of node {n} points to bad node {child}"
                            )))
                        }
                    }
                } else if w.state().is_leaf() {
                    if node.level > 2 {
                        return Err(InvariantError(format!("leaf above 1G in node {n}")));
                    }
                    if w.hpa() & (level_size(node.level) - 1) != 0 {
                        return Err(InvariantError(format!("misaligned leaf HPA in node {n}")));
                    }
                }
                if !w.state().is_leaf() && w.progress() != 0 {
                    return Err(InvariantError(format!("stray ACCEPT counter in node {n}")));
                }
            }
        }
        let live = tree.live().count();
        if seen != live || live != tree.live_nodes() {
            return Err(InvariantError(format!(
                "{seen} nodes reachable, {live} live, {} counted",
                tree.live_nodes()
            )));
        }
        Ok(())
    }
}

/// The TD epoch lock held shared ([`TdxModule::hold_epoch_lock`]); released on drop.
#[cfg(feature = "testing")]
#[derive(Debug)]
pub struct EpochLockGuard<'a> {
    _shared: SharexGuard<'a>,
}

/// An entry lock held by [`TdxModule::hold_entry_lock`]; released on drop. The entry's node
/// cannot be freed meanwhile: SEPT.REMOVE needs the tree lock exclusively and PROMOTE needs
/// every child's lock.
#[cfg(feature = "testing")]
#[derive(Debug)]
pub struct EntryLockGuard<'a> {
    module: &'a TdxModule,
    _shared: SharexGuard<'a>,
    node: usize,
    idx: usize,
}

#[cfg(feature = "testing")]
impl Drop for EntryLockGuard<'_> {
    fn drop(&mut self) {
        if let Some(slot) = self.module.read_tree().slot(self.node, self.idx) {
            host::release(slot);
        }
    }
}

fn entry_info(tree: &Tree, level: u8, word: Word) -> EntryInfo {
    let state = word.state();
    let hpa = if state.is_non_leaf() {
        tree.node(word.child()).map_or(0, |n| n.hpa)
    } else {
        word.hpa()
    };
    EntryInfo {
        level,
        state,
        hpa,
        accept_progress: word.progress(),
        locked: word.locked(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn module_is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<TdxModule>();
    }

    #[test]
    fn bad_configs_are_rejected() {
        let c = ModuleConfig {
            vcpus: 0,
            ..ModuleConfig::default()
        };
        assert_eq!(TdxModule::new(c).err(), Some(ConfigError::NoVcpus));
        let c = ModuleConfig {
            accept_slice_chunks: 513,
            ..ModuleConfig::default()
        };
        assert_eq!(
            TdxModule::new(c).err(),
            Some(ConfigError::BadAcceptSlice(513))
        );
    }

    #[test]
    fn ext_exit_qual_fields() {
        let q = ExtExitQual::accept(0, 1, SeptState::Pending, true);
        assert_eq!(q.exit_type(), ExitType::Accept);
        assert_eq!(q.req_level(), 0);
        assert_eq!(q.walk_level(), 1);
        assert_eq!(q.state(), 2);
        assert!(q.is_leaf());
        assert_eq!(
            ExtExitQual::PENDING.exit_type(),
            ExitType::PendingEptViolation
        );
    }

    #[test]
    fn epoch_tracking_rule() {
        // Epoch 3, one vCPU inside since epoch 3 (REFCOUNT [0, 1]).
        let e = EpochTracking::new(2);
        assert!(e.track().is_ok() && e.track().is_ok());
        e.enter(0);
        assert_eq!((e.td_epoch(), e.refcounts()), (3, [0, 1]));
        assert!(e.tracked(1));
        assert!(e.tracked(2));
        assert!(!e.tracked(3));
        // Epoch 3, one vCPU inside since epoch 2 (REFCOUNT [1, 0]).
        let e = EpochTracking::new(2);
        assert!(e.track().is_ok());
        e.enter(1);
        assert!(e.track().is_ok());
        assert_eq!((e.td_epoch(), e.refcounts()), (3, [1, 0]));
        assert!(!e.tracked(2));
        assert!(e.tracked(1));
    }
}
