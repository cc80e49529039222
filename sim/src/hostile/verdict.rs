//! Verdicts: the guest engine's answer to a behaviour, reduced to what identifies it.

use std::fmt;

use accept::abi::{GhciStatus, PageLevel, StatusCode};
use accept::acceptor::AcceptError;
use accept::convert::{ConvertCause, MapGpaError, MapGpaErrorKind};
use accept::tracker::TrackerError;
use accept::ve::{VeFatal, VeVerdict};

/// Where and why the guest stopped: the engine's error, reduced to what identifies it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// MapGPA RETRY with an R11 the engine refused (`MapGpaErrorKind::BadResume`).
    BadResume {
        /// First GPA whose state is unknown.
        at: u64,
        /// R11 as the host wrote it.
        resume: u64,
    },
    /// MapGPA RETRY without progress past the bound (`MapGpaErrorKind::NoProgress`).
    NoProgress {
        /// First GPA whose state is unknown.
        at: u64,
        /// Answers without progress.
        tries: u32,
    },
    /// MapGPA answered a GHCI error (`MapGpaErrorKind::Host`).
    Host {
        /// First GPA whose state is unknown.
        at: u64,
        /// R10.
        status: GhciStatus,
    },
    /// The MapGPA TDCALL itself failed (`MapGpaErrorKind::Tdcall`).
    Tdcall {
        /// First GPA whose state is unknown.
        at: u64,
        /// RAX's class.
        code: StatusCode,
    },
    /// The engine refused the range before any call.
    InvalidRange,
    /// The page-table hook failed.
    PageTable,
    /// ACCEPT stayed `OPERAND_BUSY` past the bound (`AcceptError::Busy`).
    Busy {
        /// Page being accepted.
        gpa: u64,
        /// Level asked.
        level: PageLevel,
        /// Calls made.
        tries: u32,
    },
    /// ACCEPT answered `PAGE_ALREADY_ACCEPTED` (`AcceptError::AlreadyAccepted`).
    AlreadyAccepted {
        /// Page whose acceptance was refused.
        gpa: u64,
        /// Level asked.
        level: PageLevel,
    },
    /// ACCEPT answered a status the spec does not allow there (`AcceptError::Module`).
    Module {
        /// Page being accepted.
        gpa: u64,
        /// Level asked.
        level: PageLevel,
        /// The status's class.
        code: StatusCode,
    },
    /// The tracker refused a unit whose earlier acceptance failed part way.
    UnitFailed {
        /// Unit index.
        unit: u64,
    },
    /// Any other tracker error.
    Tracker,
    /// #VE on an accepted page: the host re-added it (`VeFatal::ReAdded`).
    ReAdded {
        /// The faulting GPA.
        gpa: u64,
    },
    /// #VE on a private page outside unaccepted memory (`VeFatal::Untracked`).
    Untracked {
        /// The faulting GPA.
        gpa: u64,
    },
    /// #VE on this vCPU's own acceptance (`VeFatal::Reentrant`).
    Reentrant {
        /// Unit index.
        unit: u64,
    },
    /// Not an EPT violation on a private GPA (`VeVerdict::NotMine`).
    NotMine {
        /// VE info's GPA.
        gpa: u64,
    },
    /// VEINFO.GET found nothing valid (`VeVerdict::NoVeInfo`).
    NoVeInfo {
        /// The module's status class.
        code: StatusCode,
    },
    /// The host stopped the TD: an exit it would not or could not handle (KVM returns to
    /// userspace and the VMM kills the TD), or an instruction that needed more than
    /// [`MAX_EXITS_PER_INSTRUCTION`](crate::vcpu::MAX_EXITS_PER_INSTRUCTION) exits.
    Killed,
    /// #VE while VE info was valid.
    DoubleFault,
    /// An access kept taking #VEs.
    VeLoop,
    /// The guest's result contradicts the TD's state (see the row's detail).
    Inconsistent,
}

/// A status class for a reader: its name, or its class bits in hex when the spec has none.
struct Code(StatusCode);

impl fmt::Display for Code {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            StatusCode::Unknown(bits) => write!(f, "Unknown({bits:#x})"),
            code => write!(f, "{code:?}"),
        }
    }
}

/// A GHCI status for a reader: its name, or the raw R10 in hex.
struct Ghci(GhciStatus);

impl fmt::Display for Ghci {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            GhciStatus::Unknown(raw) => write!(f, "Unknown({raw:#x})"),
            status => write!(f, "{status:?}"),
        }
    }
}

impl fmt::Display for Stop {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Stop::BadResume { at, resume } => write!(f, "BadResume(R11 {resume:#x}) at {at:#x}"),
            Stop::NoProgress { at, tries } => write!(f, "NoProgress({tries}) at {at:#x}"),
            Stop::Host { at, status } => write!(f, "Host({}) at {at:#x}", Ghci(*status)),
            Stop::Tdcall { at, code } => write!(f, "Tdcall({}) at {at:#x}", Code(*code)),
            Stop::InvalidRange => write!(f, "InvalidRange"),
            Stop::PageTable => write!(f, "PageTable"),
            Stop::Busy { gpa, level, tries } => write!(f, "Busy({tries}) {level} {gpa:#x}"),
            Stop::AlreadyAccepted { gpa, level } => write!(f, "AlreadyAccepted {level} {gpa:#x}"),
            Stop::Module { gpa, level, code } => {
                write!(f, "Module({}) {level} {gpa:#x}", Code(*code))
            }
            Stop::UnitFailed { unit } => write!(f, "UnitFailed({unit})"),
            Stop::Tracker => write!(f, "Tracker"),
            Stop::ReAdded { gpa } => write!(f, "Fatal(ReAdded) {gpa:#x}"),
            Stop::Untracked { gpa } => write!(f, "Fatal(Untracked) {gpa:#x}"),
            Stop::Reentrant { unit } => write!(f, "Fatal(Reentrant) unit {unit}"),
            Stop::NotMine { gpa } => write!(f, "NotMine {gpa:#x}"),
            Stop::NoVeInfo { code } => write!(f, "NoVeInfo({})", Code(*code)),
            Stop::Killed => write!(f, "TD stopped by the host"),
            Stop::DoubleFault => write!(f, "#DF"),
            Stop::VeLoop => write!(f, "#VE loop"),
            Stop::Inconsistent => write!(f, "inconsistent"),
        }
    }
}

/// What the guest made of a behaviour.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The operation completed and the TD's state agrees (data intact, sides as asked).
    Completes,
    /// The guest stopped with this error.
    Stops(Stop),
    /// A conversion failed with this cause and was rolled back completely (every part in its
    /// original visibility).
    RolledBack(Stop),
    /// A conversion failed, and so did its rollback: the parts are reported unknown.
    RollbackFailed {
        /// The first failure.
        cause: Stop,
        /// The rollback's failure.
        rollback: Stop,
    },
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Verdict::Completes => write!(f, "completes"),
            Verdict::Stops(s) => write!(f, "{s}"),
            Verdict::RolledBack(s) => write!(f, "{s}; rolled back"),
            Verdict::RollbackFailed { cause, rollback } => {
                write!(f, "{cause}; rollback failed: {rollback}")
            }
        }
    }
}

pub(super) fn stop_of_map(e: MapGpaError) -> Stop {
    let at = e.at.as_u64();
    match e.kind {
        MapGpaErrorKind::InvalidRange(_) => Stop::InvalidRange,
        MapGpaErrorKind::Tdcall(s) => Stop::Tdcall { at, code: s.code() },
        MapGpaErrorKind::Host(status) => Stop::Host { at, status },
        MapGpaErrorKind::BadResume { resume } => Stop::BadResume { at, resume },
        MapGpaErrorKind::NoProgress { tries } => Stop::NoProgress { at, tries },
    }
}

pub(super) fn stop_of_accept(e: AcceptError) -> Stop {
    match e {
        AcceptError::InvalidRange(_) => Stop::InvalidRange,
        AcceptError::AlreadyAccepted { gpa, level, .. } => Stop::AlreadyAccepted {
            gpa: gpa.as_u64(),
            level,
        },
        AcceptError::Busy { gpa, level, tries } => Stop::Busy {
            gpa: gpa.as_u64(),
            level,
            tries,
        },
        AcceptError::Module { gpa, level, status } => Stop::Module {
            gpa: gpa.as_u64(),
            level,
            code: status.code(),
        },
    }
}

pub(super) fn stop_of_tracker(e: TrackerError) -> Stop {
    match e {
        TrackerError::Accept { error, .. } => stop_of_accept(error),
        TrackerError::UnitFailed { unit, .. } => Stop::UnitFailed { unit },
        TrackerError::Reentrant { unit, .. } => Stop::Reentrant { unit },
        _ => Stop::Tracker,
    }
}

pub(super) fn stop_of_cause(c: ConvertCause) -> Stop {
    match c {
        ConvertCause::InvalidRange(_) => Stop::InvalidRange,
        ConvertCause::PageTable(_) => Stop::PageTable,
        ConvertCause::MapGpa(e) => stop_of_map(e),
        ConvertCause::Accept(e) => stop_of_accept(e),
    }
}

/// The verdict of a #VE handler answer; `None` for "retry the access".
pub(super) fn stop_of_ve(v: VeVerdict) -> Option<Stop> {
    match v {
        VeVerdict::Handled { .. } | VeVerdict::AcceptedMeanwhile { .. } => None,
        VeVerdict::NotMine(info) => Some(Stop::NotMine { gpa: info.gpa }),
        VeVerdict::NoVeInfo(s) => Some(Stop::NoVeInfo { code: s.code() }),
        VeVerdict::Fatal(VeFatal::ReAdded { info, .. }) => Some(Stop::ReAdded { gpa: info.gpa }),
        VeVerdict::Fatal(VeFatal::Untracked { info }) => Some(Stop::Untracked { gpa: info.gpa }),
        VeVerdict::Fatal(VeFatal::Reentrant { unit, .. }) => Some(Stop::Reentrant { unit }),
        VeVerdict::Fatal(VeFatal::Accept { error, .. }) => Some(stop_of_tracker(error)),
    }
}
