//! What the kernel's answers become: one precise error per failure a caller can act on.

use std::io;

/// The operation that failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Opening `/dev/kvm` or creating the VM.
    Kvm,
    /// `KVM_CREATE_GUEST_MEMFD`.
    CreateGuestMemfd,
    /// `memfd_create` or sizing the shared memfd.
    CreateMemfd,
    /// `mmap` of one of the files.
    Map,
    /// `fallocate` allocating backing.
    Allocate,
    /// `fallocate(PUNCH_HOLE)`.
    PunchHole,
}

/// An error of [`KernelGuestMemfd`](crate::KernelGuestMemfd).
#[derive(Debug, thiserror::Error)]
pub enum KernelGmemError {
    /// The kernel offers no guest_memfd (no `/dev/kvm`, or `KVM_CAP_GUEST_MEMFD` is 0).
    #[error("guest_memfd is not available: {0}")]
    Unsupported(String),
    /// The range is not inside the file or is empty.
    #[error("range {start:#x}..{end:#x} is outside the {size:#x}-byte file")]
    OutOfRange {
        /// First byte.
        start: u64,
        /// End (exclusive).
        end: u64,
        /// File size.
        size: u64,
    },
    /// Shared access to a range that is not (wholly) shared.
    #[error("{start:#x}..{end:#x} is not shared")]
    NotShared {
        /// First byte.
        start: u64,
        /// End (exclusive).
        end: u64,
    },
    /// The host is out of memory for the backing (`ENOSPC`, `ENOMEM`).
    #[error("{op:?} of {len:#x} bytes at {offset:#x}: no memory")]
    NoSpace {
        /// The operation.
        op: Op,
        /// Offset in the file.
        offset: u64,
        /// Length.
        len: u64,
    },
    /// The kernel refused the arguments (`EINVAL`): a misaligned offset or length, or a
    /// flag this kernel's guest_memfd does not take.
    #[error("{op:?} of {len:#x} bytes at {offset:#x}: invalid (misaligned or unsupported)")]
    Invalid {
        /// The operation.
        op: Op,
        /// Offset in the file.
        offset: u64,
        /// Length.
        len: u64,
    },
    /// The kernel could not access a buffer (`EFAULT`).
    #[error("{op:?}: bad address")]
    Fault {
        /// The operation.
        op: Op,
    },
    /// Any other error, with the kernel's own.
    #[error("{op:?}: {source}")]
    Os {
        /// The operation.
        op: Op,
        /// The kernel's error.
        source: io::Error,
    },
}

impl KernelGmemError {
    /// Classifies `err`, returned by `op` on `[offset, offset + len)`.
    pub(crate) fn from_io(op: Op, offset: u64, len: u64, err: io::Error) -> KernelGmemError {
        match err.raw_os_error() {
            Some(libc::ENOSPC) | Some(libc::ENOMEM) => KernelGmemError::NoSpace { op, offset, len },
            Some(libc::EINVAL) => KernelGmemError::Invalid { op, offset, len },
            Some(libc::EFAULT) => KernelGmemError::Fault { op },
            _ => KernelGmemError::Os { op, source: err },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errno_values_become_precise_errors() {
        let e =
            |n| KernelGmemError::from_io(Op::Allocate, 4096, 8192, io::Error::from_raw_os_error(n));
        assert!(matches!(
            e(libc::ENOSPC),
            KernelGmemError::NoSpace {
                offset: 4096,
                len: 8192,
                ..
            }
        ));
        assert!(matches!(e(libc::ENOMEM), KernelGmemError::NoSpace { .. }));
        assert!(matches!(
            e(libc::EINVAL),
            KernelGmemError::Invalid {
                op: Op::Allocate,
                ..
            }
        ));
        assert!(matches!(
            e(libc::EFAULT),
            KernelGmemError::Fault { op: Op::Allocate }
        ));
        assert!(matches!(e(libc::EIO), KernelGmemError::Os { .. }));
    }
}
