//! Host half of TDX private/shared memory conversion.
//!
//! - [`module`]: an emulator of the TDX module's Secure-EPT and memory SEAMCALLs/TDCALLs.
#![forbid(unsafe_code)]

pub mod module;
