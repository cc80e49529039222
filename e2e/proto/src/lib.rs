//! Test support for the bare-metal image (`e2e/guest`) and `tdhost`: not firmware code.
//!
//! - [`wire`]: the framed request/answer protocol between the test image and `tdhost`.
//! - [`selftest`]: the engine's boot self-test suite, run by the bare-metal test image and by
//!   `tdhost --in-process`, with [`selftest::WireTdcall`], the TDCALL transport of the image.
//! - [`smp`]: the multi-CPU part of the self-test (several vCPUs at once, checked by
//!   invariants).
//! - [`mailbox`]: the per-vCPU shared-memory mailboxes that carry the multi-CPU part's frames.
//!
//! The firmware glue itself (HOB walk, boot plan, unaccepted table) is `tdmem-firmware`
//! (`td-shim-ext/`).
#![no_std]
// One unsafe block: the self-test's call of the engine's `unsafe fn` conversion
// (`selftest::convert_owned`).
#![deny(unsafe_code)]
#![cfg_attr(
    not(test),
    warn(clippy::unwrap_used, clippy::expect_used, clippy::panic)
)]

#[cfg(test)]
extern crate std;

pub mod mailbox;
pub mod selftest;
pub mod smp;
pub mod wire;
