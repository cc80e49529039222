//! `core::error::Error` for every error type of the engine, with the cause chains
//! (`source()`) and the `From` conversions that let `?` cross the engine's layers: an address
//! error becomes an acceptance or MapGPA error, an acceptance error becomes a boot, tracker or
//! conversion error, and so on.
//!
//! The types themselves live next to the code that returns them; this file only ties them
//! together.

use core::error::Error;
use core::fmt;

use crate::abi::AddrError;
use crate::acceptor::AcceptError;
use crate::convert::{ConvertCause, ConvertFailure, HookError, MapGpaError, MapGpaErrorKind};
use crate::parallel::BootError;
use crate::tracker::TrackerError;
use crate::unaccepted::TableError;
use crate::ve::VeFatal;

impl Error for AddrError {}

impl Error for TableError {}

impl Error for AcceptError {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        match self {
            AcceptError::InvalidRange(e) => Some(e),
            _ => None,
        }
    }
}

impl Error for MapGpaErrorKind {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        match self {
            MapGpaErrorKind::InvalidRange(e) => Some(e),
            _ => None,
        }
    }
}

impl Error for MapGpaError {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        Some(&self.kind)
    }
}

impl fmt::Display for HookError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "embedder hook failed with code {}", self.0)
    }
}

impl Error for HookError {}

impl Error for ConvertCause {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        match self {
            ConvertCause::InvalidRange(e) => Some(e),
            ConvertCause::PageTable(e) => Some(e),
            ConvertCause::MapGpa(e) => Some(e),
            ConvertCause::Accept(e) => Some(e),
        }
    }
}

impl Error for ConvertFailure {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        Some(&self.cause)
    }
}

impl Error for BootError {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        match self {
            BootError::Accept(e) => Some(e),
            _ => None,
        }
    }
}

impl Error for TrackerError {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        match self {
            TrackerError::Table(e) => Some(e),
            TrackerError::Addr(e) => Some(e),
            TrackerError::Accept { error, .. } => Some(error),
            _ => None,
        }
    }
}

impl Error for VeFatal {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        match self {
            VeFatal::Accept { error, .. } => Some(error),
            _ => None,
        }
    }
}

impl From<AddrError> for AcceptError {
    fn from(e: AddrError) -> AcceptError {
        AcceptError::InvalidRange(e)
    }
}

impl From<AddrError> for MapGpaErrorKind {
    fn from(e: AddrError) -> MapGpaErrorKind {
        MapGpaErrorKind::InvalidRange(e)
    }
}

impl From<AddrError> for ConvertCause {
    fn from(e: AddrError) -> ConvertCause {
        ConvertCause::InvalidRange(e)
    }
}

impl From<HookError> for ConvertCause {
    fn from(e: HookError) -> ConvertCause {
        ConvertCause::PageTable(e)
    }
}

impl From<MapGpaError> for ConvertCause {
    fn from(e: MapGpaError) -> ConvertCause {
        ConvertCause::MapGpa(e)
    }
}

impl From<AcceptError> for ConvertCause {
    fn from(e: AcceptError) -> ConvertCause {
        ConvertCause::Accept(e)
    }
}

impl From<AcceptError> for BootError {
    fn from(e: AcceptError) -> BootError {
        BootError::Accept(e)
    }
}

impl From<AddrError> for TrackerError {
    fn from(e: AddrError) -> TrackerError {
        TrackerError::Addr(e)
    }
}

impl From<TableError> for TrackerError {
    fn from(e: TableError) -> TrackerError {
        TrackerError::Table(e)
    }
}

#[cfg(test)]
mod tests {
    extern crate std;

    use std::boxed::Box;
    use std::string::ToString;

    use super::*;
    use crate::abi::{Gpa, PageLevel, TdxStatus};

    fn accept_fails() -> Result<(), AcceptError> {
        Err(AcceptError::Module {
            gpa: Gpa::new_truncate(0x20_0000),
            level: PageLevel::Size2M,
            status: TdxStatus::from_raw(0xC000_0B0B_0000_0001),
        })
    }

    fn boot() -> Result<(), Box<dyn Error>> {
        accept_fails()?;
        Ok(())
    }

    #[test]
    fn question_mark_reaches_box_dyn_error() {
        let e = boot().unwrap_err();
        assert!(e.to_string().contains("0x200000"), "{e}");
    }

    #[test]
    fn cause_chain_is_walkable() {
        let cause = ConvertCause::from(AcceptError::from(AddrError::Overflow));
        let first = cause.source().expect("accept error");
        let second = first.source().expect("address error");
        assert_eq!(second.to_string(), AddrError::Overflow.to_string());
        assert!(second.source().is_none());
    }

    #[test]
    fn tracker_error_wraps_table_error() {
        let e: TrackerError = TableError::Overflow.into();
        assert!(e.source().is_some());
    }
}
