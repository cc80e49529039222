//! Host half of TDX private/shared memory conversion.
//!
//! - [`module`]: an emulator of the TDX module's Secure-EPT and memory SEAMCALLs/TDCALLs
//!   (`docs/tdx-module-memory.md` §1-§7): S-EPT tree, host calls, epochs, ACCEPT walk cases,
//!   #VE delivery, page-content tokens, capabilities as data and fault injection.
//! - [`kvm`]: a KVM-style private MMU: fault path at the guest's accept level, fault-path and
//!   zap-path splits, PROMOTE back to huge mappings.
//! - [`gmem`]: a guest_memfd-style backend: folios, shareability ranges, all-or-nothing
//!   conversion, deferred commits and error pages.
//! - [`vmm`]: the host half wired together (module, guest_memfd, MMU) and the exit handlers,
//!   MapGPA included.
//! - [`sim`]: the simulated TD: vCPU threads running the guest engine against the host half,
//!   scenarios, invariants and reports (the `tdsim` binary).
//!
//! `docs/life-of-a-mapgpa.md` follows one conversion through these modules, from the guest's
//! TDCALL to the Secure-EPT change, naming each file on the way.
// No unsafe code but one block: the simulator's call of the guest engine's `unsafe fn`
// conversion (`sim::convert`), whose contract a simulated TD keeps trivially.
#![deny(unsafe_code)]

mod counters;
pub mod gmem;
pub mod kvm;
pub mod module;
pub mod sim;
pub mod vmm;
