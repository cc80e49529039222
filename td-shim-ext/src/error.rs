//! `core::error::Error` for the firmware glue's errors, with their causes, and the `From`
//! conversions that let `?` cross from the engine's errors.

use core::error::Error;

use tdmem_accept::abi::AddrError;
use tdmem_accept::unaccepted::TableError;

use crate::hob::HobError;
use crate::plan::PlanError;

impl Error for HobError {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        match self {
            HobError::BadRange { error, .. } => Some(error),
            _ => None,
        }
    }
}

impl Error for PlanError {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        match self {
            PlanError::Hob(e) => Some(e),
            PlanError::Range(e) => Some(e),
            PlanError::Table(e) => Some(e),
            _ => None,
        }
    }
}

impl From<AddrError> for PlanError {
    fn from(e: AddrError) -> PlanError {
        PlanError::Range(e)
    }
}

impl From<TableError> for PlanError {
    fn from(e: TableError) -> PlanError {
        PlanError::Table(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_errors_chain_to_their_cause() {
        let e = PlanError::from(HobError::BadRange {
            offset: 8,
            error: AddrError::Overflow,
        });
        let hob = e.source().expect("the HOB error");
        assert!(hob.source().is_some(), "the address error");
        assert!(PlanError::from(TableError::Overflow).source().is_some());
    }
}
