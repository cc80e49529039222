//! Host half of TDX private/shared memory conversion.
//!
//! - [`module`]: an emulator of the TDX module's Secure-EPT and memory SEAMCALLs/TDCALLs
//!   (`docs/tdx-module-memory.md` §1-§7): S-EPT tree, host calls, epochs, ACCEPT walk cases,
//!   #VE delivery, page-content tokens, capabilities as data and (feature `testing`) fault
//!   injection.
//! - [`kvm`]: a KVM-style private MMU: fault path at the guest's accept level, fault-path and
//!   zap-path splits, PROMOTE back to huge mappings.
//! - [`gmem`]: a guest_memfd-style backend: folios, shareability ranges, all-or-nothing
//!   conversion, deferred commits and error pages.
//! - [`vmm`]: the host half wired together (module, guest_memfd, MMU) and the exit handlers,
//!   MapGPA included.
//!
//! `docs/life-of-a-mapgpa.md` follows one conversion through these modules, from the guest's
//! TDCALL to the Secure-EPT change, naming each file on the way.
#![deny(unsafe_code)]

pub mod gmem;
pub mod kvm;
pub mod module;
pub mod vmm;
