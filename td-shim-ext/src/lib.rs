//! Firmware-side glue between TD firmware (td-shim) and the `accept` engine: turns the TD HOB
//! list into a boot acceptance plan and a Linux-compatible unaccepted-memory table.
//!
//! Not yet built: this crate only reserves its place in the workspace.
#![no_std]
#![forbid(unsafe_code)]
