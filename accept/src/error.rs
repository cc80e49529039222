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

impl<E: Error + 'static> Error for ConvertCause<E> {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        match self {
            ConvertCause::InvalidRange(e) => Some(e),
            ConvertCause::PageTable(e) => Some(e),
            ConvertCause::MapGpa(e) => Some(e),
            ConvertCause::Accept(e) => Some(e),
        }
    }
}

impl<E: Error + 'static> Error for ConvertFailure<E> {
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

impl<E> From<AddrError> for ConvertCause<E> {
    fn from(e: AddrError) -> ConvertCause<E> {
        ConvertCause::InvalidRange(e)
    }
}

impl From<HookError> for ConvertCause<HookError> {
    fn from(e: HookError) -> ConvertCause<HookError> {
        ConvertCause::PageTable(e)
    }
}

impl<E> From<MapGpaError> for ConvertCause<E> {
    fn from(e: MapGpaError) -> ConvertCause<E> {
        ConvertCause::MapGpa(e)
    }
}

impl<E> From<AcceptError> for ConvertCause<E> {
    fn from(e: AcceptError) -> ConvertCause<E> {
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
        let cause: ConvertCause = ConvertCause::from(AcceptError::from(AddrError::Overflow));
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

    /// A kernel's own error type travels through a failed conversion unchanged, and `?` takes
    /// the failure up to `Box<dyn Error>`.
    #[test]
    fn a_kernel_error_type_reaches_the_caller() {
        use crate::acceptor::{AcceptPolicy, Acceptor};
        use crate::convert::{ConvertHooks, ConvertPolicy, Converter, Rollback, Visibility};
        use crate::testing::FakeModule;
        use crate::{GpaRange, Gpaw};

        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        enum PteError {
            NoMemory { level: u8 },
        }
        impl fmt::Display for PteError {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(
                    f,
                    "out of page-table memory at level {}",
                    match self {
                        PteError::NoMemory { level } => level,
                    }
                )
            }
        }
        impl Error for PteError {}

        struct Kernel;
        impl ConvertHooks for Kernel {
            type Error = PteError;
            fn set_visibility(&mut self, _: GpaRange, _: Visibility) -> Result<(), PteError> {
                Err(PteError::NoMemory { level: 2 })
            }
            fn flush_tlb(&mut self, _: GpaRange) {}
        }

        let converter = Converter::new(Gpaw::Bits48, ConvertPolicy::default());
        let acceptor = Acceptor::new(Gpaw::Bits48, AcceptPolicy::default());
        let mut tdcall = FakeModule::new();
        let range = GpaRange::new(0x20_0000, 0x20_1000).unwrap();
        // SAFETY: the fake has no memory behind the GPAs.
        #[allow(unsafe_code)]
        let f = unsafe {
            converter.convert(
                &mut tdcall,
                &acceptor,
                range,
                Visibility::Shared,
                &mut Kernel,
            )
        }
        .unwrap_err();
        assert_eq!(
            f.cause,
            ConvertCause::PageTable(PteError::NoMemory { level: 2 })
        );
        assert_eq!(f.rollback, Rollback::NotNeeded);
        let boxed: Box<dyn Error> = Box::new(f);
        let source = boxed
            .source()
            .expect("the cause")
            .source()
            .expect("the kernel's error");
        assert_eq!(source.to_string(), "out of page-table memory at level 2");
    }
}
