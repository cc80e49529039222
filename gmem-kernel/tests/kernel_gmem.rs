//! The backend against this machine's kernel. Each test skips, saying so, where `/dev/kvm`
//! offers no guest_memfd.

use accept::abi::GpaRange;
use accept::convert::Visibility;
use tdmem_gmem_kernel::{Capabilities, KernelGmemError, KernelGuestMemfd, GUEST_MEMFD_FLAG_MMAP};

const M2: u64 = 2 << 20;
const K4: u64 = 4096;

/// The backend, or `None` (with a note on stderr) where the kernel has no guest_memfd.
fn backend(size: u64) -> Option<KernelGuestMemfd> {
    match KernelGuestMemfd::new(size) {
        Ok(b) => Some(b),
        Err(KernelGmemError::Unsupported(why)) => {
            eprintln!("SKIPPED: no guest_memfd on this machine ({why})");
            None
        }
        Err(e) => panic!("guest_memfd is offered but creating one failed: {e}"),
    }
}

fn range(s: u64, e: u64) -> GpaRange {
    GpaRange::new(s, e).expect("range")
}

/// What the probe reports is what a backend then gets: a kernel that says guest_memfd works
/// creates one, and the flags it reports are the ones the backend sees.
#[test]
fn probe_reports_what_the_kernel_offers() {
    let caps = match Capabilities::probe() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("SKIPPED: {e}");
            return;
        }
    };
    match KernelGuestMemfd::new(M2) {
        Ok(b) => {
            assert!(
                caps.guest_memfd,
                "a backend was created although the probe said no"
            );
            assert_eq!(b.capabilities(), caps);
        }
        Err(KernelGmemError::Unsupported(_)) => assert!(!caps.guest_memfd),
        Err(e) => panic!("guest_memfd is offered but creating one failed: {e}"),
    }
}

#[test]
fn shared_pages_are_read_and_written_through_the_host_mapping() {
    let Some(mut b) = backend(4 * M2) else { return };
    assert_eq!(b.visibility(0), Some(Visibility::Private));
    b.convert(range(M2, M2 + 3 * K4), Visibility::Shared)
        .expect("to shared");
    assert_eq!(b.visibility(M2 + K4), Some(Visibility::Shared));
    assert_eq!(b.visibility(M2 + 3 * K4), Some(Visibility::Private));
    b.write_shared(M2 + 100, b"bounce buffer").expect("write");
    let mut buf = [0u8; 13];
    b.read_shared(M2 + 100, &mut buf).expect("read");
    assert_eq!(&buf, b"bounce buffer");
    let s = b.stats();
    assert_eq!(
        (s.shared_allocs, s.private_punches, s.conversions),
        (1, 1, 1)
    );
}

#[test]
fn the_host_cannot_use_private_memory_through_the_backend() {
    let Some(mut b) = backend(M2) else { return };
    let mut buf = [0u8; 8];
    assert!(matches!(
        b.read_shared(0, &mut buf),
        Err(KernelGmemError::NotShared { start: 0, end: 8 })
    ));
    assert!(matches!(
        b.write_shared(K4 - 4, &[1; 8]),
        Err(KernelGmemError::NotShared { .. })
    ));
    // A range that straddles the edge of a shared part is refused too.
    b.convert(range(0, K4), Visibility::Shared)
        .expect("to shared");
    assert!(b.read_shared(K4 - 4, &mut buf).is_err());
    assert!(b.read_shared(K4 - 8, &mut buf).is_ok());
}

#[test]
fn converting_back_discards_the_shared_content() {
    let Some(mut b) = backend(M2) else { return };
    b.convert(range(0, 2 * K4), Visibility::Shared)
        .expect("to shared");
    b.write_shared(0, &[0xAB; 64]).expect("write");
    b.convert(range(0, 2 * K4), Visibility::Private)
        .expect("to private");
    b.convert(range(0, 2 * K4), Visibility::Shared)
        .expect("to shared again");
    let mut buf = [0xFFu8; 64];
    b.read_shared(0, &mut buf).expect("read");
    assert_eq!(buf, [0u8; 64], "the hole punch freed the old shared page");
    let s = b.stats();
    assert_eq!(s.shared_punches, 1);
    assert_eq!(s.bytes_converted, 6 * K4);
}

#[test]
fn kernel_errors_become_precise_errors() {
    let Some(mut b) = backend(M2) else { return };
    // Out of the file.
    assert!(matches!(
        b.convert(range(M2, 2 * M2), Visibility::Shared),
        Err(KernelGmemError::OutOfRange { size, .. }) if size == M2
    ));
    // Misaligned offsets cannot be expressed (`GpaRange` is 4K aligned); the kernel's EINVAL
    // for one is a unit test of the backend.
    // The file size must be page aligned.
    assert!(matches!(
        KernelGuestMemfd::new(K4 + 1),
        Err(KernelGmemError::Invalid { .. })
    ));
}

#[test]
fn populate_allocates_on_the_side_each_part_is_on() {
    let Some(mut b) = backend(M2) else { return };
    b.convert(range(K4, 2 * K4), Visibility::Shared)
        .expect("to shared");
    b.populate(range(0, 3 * K4)).expect("populate");
    let s = b.stats();
    // Private [0, 4K), shared [4K, 8K) (plus the conversion's own), private [8K, 12K).
    assert_eq!(s.private_allocs, 2);
    assert_eq!(s.shared_allocs, 2);
}

/// Touching private memory through a mapping of the guest_memfd kills the toucher with SIGBUS.
/// The touch happens in a child process, which the test expects to die of that signal.
#[test]
fn touching_private_memory_raises_sigbus_in_the_host() {
    let Some(mut b) = backend(M2) else { return };
    if b.capabilities().guest_memfd_flags & GUEST_MEMFD_FLAG_MMAP == 0 {
        eprintln!("SKIPPED: this kernel's guest_memfd cannot be mapped");
        return;
    }
    b.populate(range(0, K4)).expect("populate");
    let map = b.map_private().expect("mmap of the guest_memfd");
    let p = map.as_ptr();
    // SAFETY: fork in a test process; the child only reads one byte and exits with `_exit`,
    // touching no lock another thread could hold.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork failed");
    if pid == 0 {
        // SAFETY: `p` is the start of a live mapping; the read is expected to raise SIGBUS.
        let v = unsafe { p.read_volatile() };
        // SAFETY: leaves the child at once, without running the parent's destructors.
        unsafe { libc::_exit(i32::from(v) + 1) };
    }
    let mut status = 0;
    // SAFETY: waits for the child just forked.
    let waited = unsafe { libc::waitpid(pid, &mut status, 0) };
    assert_eq!(waited, pid);
    assert!(
        libc::WIFSIGNALED(status),
        "the child read private memory: status {status:#x}"
    );
    assert_eq!(libc::WTERMSIG(status), libc::SIGBUS);
}
