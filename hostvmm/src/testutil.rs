//! What the unit tests of several modules share: sizes and a small host.

use std::sync::Arc;

use accept::abi::Gpa;

use crate::kvm::YieldKicker;
use crate::vmm::{Host, HostConfig};

/// 4 KiB.
pub(crate) const K4: u64 = 4096;
/// 2 MiB.
pub(crate) const M2: u64 = 2 << 20;
/// The shared bit of a 48-bit GPA width.
pub(crate) const SHARED: u64 = 1 << 47;

/// A host of 128 MiB with one vCPU.
pub(crate) fn host() -> Host {
    Host::new(HostConfig::new(64 * M2, 1), Arc::new(YieldKicker)).unwrap()
}

/// `a` as a GPA.
pub(crate) fn g(a: u64) -> Gpa {
    Gpa::new_truncate(a)
}
