//! A guest_memfd-style memory backend: the host memory behind one TD, private and shared.
//!
//! A [`GuestMemfd`] covers GPAs `[0, size)` (offset == private GPA) and
//! - backs them with folios of one level (4K, 2M or 1G) taken lazily from a [`FolioPool`] of
//!   simulated host memory; the same folio backs a page whether private or shared (in-place
//!   conversion), so converting a 4K sub-page never splits its folio, and a folio is freed only
//!   when all its sub-pages have been punched out (seed 001);
//! - keeps shareability as coalesced runs ([`ShareabilityMap`]), O(runs) memory;
//! - converts ranges all-or-nothing ([`GuestMemfd::convert`], seed 002): every allocation and
//!   every check happens before the invalidation, the point of no return, after which nothing
//!   fails; an optional BLOCK-first mode lets the MMU abort cleanly;
//! - tracks host users of shared pages: a VMM mapping makes a conversion to private fail with
//!   EAGAIN at that offset, a transient reference defers its commit until the last reference is
//!   put (seed 004);
//! - records pages the MMU could not zap as poisoned, per 4K frame in a bitmap allocated with
//!   the folio (no allocation in the error path); poisoned frames are never handed out again
//!   and are leaked, and counted, when their folio is freed (seed 000).
//!
//! It does not map anything itself: the Secure-EPT side is behind the [`InvalidateHook`] trait,
//! implemented by the private MMU. It holds no page contents and is not thread-safe by itself
//! (`&mut self` throughout; wrap it in a lock to share it).

mod backend;
mod error;
mod folio;
mod hook;
#[cfg(feature = "kernel-gmem")]
mod kernel;
mod memfd;
mod pool;
mod ranges;
mod stats;

pub use backend::{BackendCall, ConversionBackend, RecordingBackend};
pub use error::{ConvertError, ConvertPhase, GmemError};
#[cfg(feature = "testing")]
pub use hook::{HookCall, RecordingHook};
pub use hook::{HookError, InvalidateCtx, InvalidateHook, InvalidateReason, NoopHook};
#[cfg(feature = "kernel-gmem")]
pub use kernel::KernelBackend;
pub use memfd::{
    ConvertMode, ConvertReport, FolioInfo, FolioSnapshot, GmemConfig, GmemSnapshot, GuestMemfd,
    HostRefs, PfnInfo, PunchReport, RefRelease, RefToken,
};
#[cfg(feature = "testing")]
pub use pool::FailureInjector;
pub use pool::{FolioPool, Hpa, PoolError, PoolSnapshot, PoolStats};
pub use ranges::{Shareability, ShareabilityMap};
pub use stats::{GmemStats, LevelCounts};
