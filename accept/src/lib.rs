#![doc = include_str!("../README.md")]
//!
//! ## Modules
//!
//! - [`abi`]: leaf numbers, statuses, levels, GPAs and the shared bit: the ABI both halves share.
//! - [`tdcall`]: the one trait through which the engine calls the TDX module.
//! - [`acceptor`]: TDG.MEM.PAGE.ACCEPT over ranges, 1G -> 2M -> 4K, with bounded retries.
//! - [`convert`]: `TDG.VP.VMCALL<MapGPA>` with RETRY handling, and private/shared conversion with
//!   ordering hooks, partial-failure reports and rollback.
//! - [`unaccepted`]: the Linux-compatible EFI unaccepted-memory table, read and built.
//! - [`tracker`]: lazy acceptance from many vCPUs, each unit exactly once, bounded waits.
//! - [`ve`]: the #VE handler for EPT violations on pending private pages.
//! - [`parallel`]: boot-time acceptance shared by many vCPUs through one atomic cursor.
//! - `hw` (feature `hw`, x86_64 only): the real TDCALL backend.
//! - `testing` (feature `testing`): a scripted TDX-module fake for tests and examples.
//!
//! The engine never panics on what the host returns: every outcome is a value.
#![no_std]
#![cfg_attr(docsrs, feature(doc_cfg))]
// No unsafe block anywhere: the one `unsafe` item is the declaration of `Converter::convert`,
// whose contract (it erases or exposes memory) the engine cannot check.
#![deny(unsafe_code)]
#![cfg_attr(
    not(test),
    warn(clippy::unwrap_used, clippy::expect_used, clippy::panic)
)]

#[cfg(feature = "testing")]
extern crate alloc;
#[cfg(test)]
extern crate std;

pub mod abi;
pub mod acceptor;
pub mod convert;
mod error;
#[cfg(all(feature = "hw", target_arch = "x86_64"))]
pub mod hw;
pub mod parallel;
pub mod tdcall;
#[cfg(feature = "testing")]
pub mod testing;
pub mod tracker;
pub mod unaccepted;
pub mod ve;

pub use abi::{Gpa, GpaRange, Gpaw, PageLevel, StatusCode, TdxStatus};
pub use tdcall::Tdcall;
