//! Firmware side of TDX memory acceptance, for td-shim payloads and other TD firmware.
//!
//! - [`hob`]: a bounded walk over a TD HOB list with the layouts of the published
//!   `td-shim-interface` crate, yielding memory resource descriptors.
//! - [`plan`]: a [`BootPlan`] from the HOB list (or a plain list of unaccepted ranges): what the
//!   firmware accepts eagerly (handed to [`tdmem_accept::parallel::BootJob`], which shares it across
//!   vCPUs largest pages first), what the Linux-compatible unaccepted table records for the
//!   kernel, and where that table goes in accepted memory.
//!
//! Use from a payload:
//!
//! ```text
//! let plan = BootPlan::from_hob(hob_list, &PlanConfig { reserved: &[payload, hob], ..Default::default() })?;
//! let n = plan.eager().copy_to(&mut ranges);            // fixed-size array, no allocator
//! let job = BootJob::new(&ranges[..n], &progress);      // wake APs with &job, then:
//! job.run_edges(&mut tdcall, &acceptor)?; job.run(0, &mut tdcall, &acceptor)?;
//! let t = plan.table().unwrap();                        // memory under it is now accepted
//! plan.write_table(table_bytes_at(t.gpa, t.len))?;      // then publish t.gpa under the GUID
//! ```
//!
//! Nothing here touches hardware; it needs no allocator and no `unsafe`.
#![no_std]
#![forbid(unsafe_code)]
#![cfg_attr(
    not(test),
    warn(clippy::unwrap_used, clippy::expect_used, clippy::panic)
)]

#[cfg(test)]
extern crate std;

mod error;
pub mod hob;
pub mod plan;

pub use hob::{HobError, Resource, ResourceKind};
pub use plan::{BootPlan, MapEntry, PlanConfig, PlanError, RangeList, TablePlacement};
