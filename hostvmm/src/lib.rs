//! Host half of TDX private/shared memory conversion: the pieces a VMM (KVM or another)
//! needs to run a TD's private memory, and an emulator of the TDX module to run them against
//! without TDX hardware. A library: no binaries, no command line, no serialisation formats.
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
//! - [`vcpu`]: the vCPU loop (enter the TD, one guest instruction, leave, hand exits to the
//!   host, re-execute) as one type, [`vcpu::Vcpu`], with hooks for what a VMM or a harness
//!   adds; it implements the guest engine's `Tdcall`, so the engine runs on it directly.
//!
//! `docs/life-of-a-mapgpa.md` follows one conversion through these modules, from the guest's
//! TDCALL to the Secure-EPT change, naming each file on the way.
//!
//! # Features
//!
//! - `kernel-gmem` (default): `gmem::KernelBackend`, the kernel's guest_memfd (Linux,
//!   `/dev/kvm`) as the conversion backend, through `tdmem-gmem-kernel`.
//! - `serde`: `serde::Serialize` for the counters ([`kvm::MmuStats`], [`vmm::VmmStats`]).
//! - `testing`: fault injection and test-only hooks: the module's fault rules
//!   (`TdxModule::inject`, `clear_faults`, `FaultRule`), `TdxModule::hold_entry_lock`, the
//!   MMU page pool's `fail_next`, the guest_memfd pools' `FailureInjector`s and
//!   `gmem::RecordingHook`. Without it these are absent and the checks compile away.
//!
//! The simulated TD (the guest engine against this host half, scenarios, invariants, reports)
//! and the binaries `tdsim` and `tdhost` are in the `tdmem-sim` crate (`sim/`).
#![deny(unsafe_code)]

mod counters;
pub mod gmem;
pub mod kvm;
pub mod module;
#[cfg(test)]
mod testutil;
pub mod vcpu;
pub mod vmm;
