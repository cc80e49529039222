//! The kernel's guest_memfd as the memory behind a simulated TD.
//!
//! [`KernelGuestMemfd`] keeps a TD's private memory in a real guest_memfd
//! (`KVM_CREATE_GUEST_MEMFD` on the default VM type) and its shared memory in a memfd, the way
//! QEMU and Cloud Hypervisor do it where the kernel has no in-place conversion
//! (`KVM_CAP_MEMORY_ATTRIBUTES` is 0): the VMM tracks shareability, a conversion allocates the
//! side taken up with `fallocate(FALLOC_FL_KEEP_SIZE)` and punches the side given up with
//! `FALLOC_FL_PUNCH_HOLE`. Shared pages are read and written through the host's mapping of the
//! memfd; private pages cannot be touched by the host (mapping the guest_memfd is allowed with
//! `GUEST_MEMFD_FLAG_MMAP`, and a touch raises SIGBUS).
//!
//! Every kernel error becomes a precise [`KernelGmemError`]; nothing here panics on what the
//! kernel answers. Linux only; [`Capabilities::probe`] tells whether this machine has it.
//!
//! The system calls are wrapped once in `sys`; the rest is safe code.

mod backend;
mod error;
mod sys;

pub use backend::{
    Capabilities, KernelGmemStats, KernelGuestMemfd, Reservation, GUEST_MEMFD_FLAG_INIT_SHARED,
    GUEST_MEMFD_FLAG_MMAP, KVM_CAP_GUEST_MEMFD_FLAGS, KVM_CAP_MEMORY_ATTRIBUTES,
};
pub use error::{KernelGmemError, Op};
pub use sys::Mapping;
