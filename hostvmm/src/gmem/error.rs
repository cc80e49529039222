//! Errors of the guest_memfd model.

use accept::abi::{Gpa, GpaRange};

use super::hook::HookError;
use super::pool::PoolError;
use super::ranges::Shareability;

/// Errors of the per-page calls (fault path, host references, poison, configuration).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GmemError {
    /// The configuration is unusable.
    #[error("invalid guest_memfd configuration: {0}")]
    InvalidConfig(&'static str),
    /// The GPA is at or beyond the end of the file.
    #[error("GPA {gpa} is outside the guest_memfd [0, {size:#x})")]
    OutOfRange {
        /// The GPA passed.
        gpa: Gpa,
        /// The file size.
        size: u64,
    },
    /// The page is not in the state the call needs (e.g. a private fault on a shared page).
    #[error("GPA {gpa} is not {expected:?}")]
    WrongShareability {
        /// The page.
        gpa: Gpa,
        /// The state the call needs.
        expected: Shareability,
    },
    /// A shared -> private conversion of the page waits for host references to drop: neither
    /// the host nor the guest may use it until then. Retry later.
    #[error("GPA {gpa} has a conversion to private pending")]
    ConversionPending {
        /// The page.
        gpa: Gpa,
    },
    /// The page's frame is poisoned and will never be handed out again.
    #[error("GPA {gpa} is poisoned")]
    Poisoned {
        /// The page.
        gpa: Gpa,
    },
    /// No folio backs the page (for [`super::GuestMemfd::poison`]).
    #[error("no folio backs GPA {gpa}")]
    NotPopulated {
        /// The page.
        gpa: Gpa,
    },
    /// The pool could not provide a folio.
    #[error("no folio for GPA {gpa}: {source}")]
    NoMemory {
        /// The page being populated.
        gpa: Gpa,
        /// The pool's answer.
        #[source]
        source: PoolError,
    },
    /// `host_unmap` of a page the host has not mapped.
    #[error("GPA {gpa} is not mapped by the host")]
    NotMapped {
        /// The page.
        gpa: Gpa,
    },
    /// `put_ref` of a page with no transient reference.
    #[error("GPA {gpa} holds no transient reference")]
    NotReferenced {
        /// The page.
        gpa: Gpa,
    },
    /// A reference token of another guest_memfd.
    #[error("the reference token belongs to another guest_memfd")]
    ForeignToken,
    /// A page's host map or reference count would overflow.
    #[error("host reference count overflow at GPA {gpa}")]
    RefOverflow {
        /// The page.
        gpa: Gpa,
    },
}

/// The phase of a conversion (or hole punch) an error comes from. Every phase is before the
/// point of no return (the invalidation), so every error leaves the state unchanged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ConvertPhase {
    /// Argument checks.
    Validate,
    /// Phase 1: preallocating range-map nodes and deferred-commit records.
    Preallocate,
    /// Phase 2: the safety check against host mappings and references.
    SafetyCheck,
    /// Phase 3: [`super::InvalidateHook::prepare`] (preallocation and optional BLOCK in the MMU).
    Prepare,
}

/// Errors of [`super::GuestMemfd::convert`] and [`super::GuestMemfd::punch_hole`]. None of them
/// changes any state (all-or-nothing); each names the offset (= GPA) it failed at.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConvertError {
    /// [`ConvertPhase::Validate`]: the range reaches beyond the file.
    #[error("range {range} is outside the guest_memfd [0, {size:#x})")]
    OutOfRange {
        /// The range passed.
        range: GpaRange,
        /// The file size.
        size: u64,
    },
    /// [`ConvertPhase::Preallocate`]: a node or record for the run or page at `offset` could not
    /// be allocated (ENOMEM).
    #[error("no memory to convert at {offset}")]
    NoMemory {
        /// First page of the run (or the deferred page) the allocation was for.
        offset: Gpa,
    },
    /// [`ConvertPhase::SafetyCheck`]: the page at `offset` is mapped by the host (for a hole
    /// punch: mapped or referenced). EAGAIN: unmap and retry.
    #[error("GPA {offset} is still in use by the host (EAGAIN)")]
    Again {
        /// The first such page.
        offset: Gpa,
    },
    /// [`ConvertPhase::Prepare`]: the hook refused the run starting at `offset`; every prepared
    /// run was aborted.
    #[error("invalidation hook refused the run at {offset}: {source}")]
    HookFailed {
        /// Start of the run whose prepare failed.
        offset: Gpa,
        /// The hook's error.
        #[source]
        source: HookError,
    },
    /// [`ConvertPhase::Preallocate`]: the backend could not prepare the run at `offset` for a
    /// reason other than memory (a kernel error of a real guest_memfd); nothing changed.
    #[error("the backend refused the run at {offset}: {reason}")]
    Backend {
        /// Start of the run.
        offset: Gpa,
        /// The backend's own error, as text.
        reason: String,
    },
}

impl ConvertError {
    /// The phase the error comes from.
    pub const fn phase(&self) -> ConvertPhase {
        match self {
            ConvertError::OutOfRange { .. } => ConvertPhase::Validate,
            ConvertError::NoMemory { .. } | ConvertError::Backend { .. } => {
                ConvertPhase::Preallocate
            }
            ConvertError::Again { .. } => ConvertPhase::SafetyCheck,
            ConvertError::HookFailed { .. } => ConvertPhase::Prepare,
        }
    }

    /// The offset the error names, if any (all but [`ConvertError::OutOfRange`]).
    pub const fn offset(&self) -> Option<Gpa> {
        match self {
            ConvertError::OutOfRange { .. } => None,
            ConvertError::NoMemory { offset }
            | ConvertError::Again { offset }
            | ConvertError::HookFailed { offset, .. }
            | ConvertError::Backend { offset, .. } => Some(*offset),
        }
    }
}
