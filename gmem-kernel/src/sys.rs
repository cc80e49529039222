//! The system calls the backend makes, each wrapped once: `fallocate`, `memfd_create`, `mmap`.
//! Every other file works with safe types.

use std::ffi::CStr;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::ptr::NonNull;

/// `fallocate(file, mode | FALLOC_FL_KEEP_SIZE, offset, len)`. guest_memfd requires
/// `KEEP_SIZE` for allocation and takes `PUNCH_HOLE | KEEP_SIZE` for holes.
pub fn fallocate(file: &File, punch: bool, offset: u64, len: u64) -> io::Result<()> {
    let mut mode = libc::FALLOC_FL_KEEP_SIZE;
    if punch {
        mode |= libc::FALLOC_FL_PUNCH_HOLE;
    }
    let off =
        libc::off_t::try_from(offset).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    let n = libc::off_t::try_from(len).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: fallocate reads no memory of ours; the descriptor is valid for the call.
    let rc = unsafe { libc::fallocate(file.as_raw_fd(), mode, off, n) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// An anonymous memory file (`memfd_create`), sized to `size`.
pub fn memfd(name: &CStr, size: u64) -> io::Result<File> {
    // SAFETY: `name` is a valid NUL-terminated string for the duration of the call.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by memfd_create and is owned by nobody else.
    let file = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    file.set_len(size)?;
    Ok(file)
}

/// A shared read-write mapping of a whole file, unmapped on drop.
#[derive(Debug)]
pub struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is plain memory owned by this value; access goes through `&self`/`&mut
// self` methods or raw pointers whose use the caller justifies.
unsafe impl Send for Mapping {}
// SAFETY: as above; shared references only hand out a raw pointer.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Maps `len` bytes of `file` from offset 0, shared, readable and writable.
    pub fn new(file: &File, len: usize) -> io::Result<Mapping> {
        // SAFETY: a fresh mapping chosen by the kernel (no fixed address), of a descriptor
        // valid for the call; the result is checked against MAP_FAILED.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr = NonNull::new(p.cast::<u8>())
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EFAULT))?;
        Ok(Mapping { ptr, len })
    }

    /// Its length.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it maps nothing (never: `mmap` refuses empty mappings).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Its first byte. Reading through it can fault (SIGBUS) where the file has no page the
    /// host may touch, e.g. private guest_memfd memory.
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// Copies `buf.len()` bytes at `offset` out of the mapping.
    ///
    /// # Safety
    /// `[offset, offset + buf.len())` is inside the mapping and backed by pages the host may
    /// read (shared memory).
    pub unsafe fn read(&self, offset: usize, buf: &mut [u8]) {
        // SAFETY: the caller's contract: in bounds and readable; `buf` does not overlap the
        // mapping (it is a Rust slice the caller owns).
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.ptr.as_ptr().add(offset),
                buf.as_mut_ptr(),
                buf.len(),
            )
        }
    }

    /// Copies `data` into the mapping at `offset`.
    ///
    /// # Safety
    /// As [`Mapping::read`], and writable.
    pub unsafe fn write(&self, offset: usize, data: &[u8]) {
        // SAFETY: as in `read`.
        unsafe {
            std::ptr::copy_nonoverlapping(data.as_ptr(), self.ptr.as_ptr().add(offset), data.len())
        }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping this value created; no reference into it can
        // outlive `self` (the accessors copy).
        unsafe {
            libc::munmap(self.ptr.as_ptr().cast(), self.len);
        }
    }
}
