//! Integration tests of the guest engine (`accept`) against the host half (`hostvmm`).
//! The tests live in `tests/`; this library holds shared helpers.
#![forbid(unsafe_code)]

pub mod drive;
pub mod props;
pub mod soak;
