//! The per-vCPU mailboxes of the multi-CPU run: the transport that lets every vCPU of the
//! bare-metal image have one request in flight at a time, all vCPUs at once.
//!
//! QEMU's guest RAM is a shared file (`-object memory-backend-file,share=on`); `tdhost` opens
//! the same file, so a GPA below the 32-bit PCI hole is the same byte at the same file offset on
//! both sides. vCPU `i` owns the 4 KiB page at [`BASE`] `+ i * ` [`STRIDE`] (inside the image's
//! own memory, `[0, 8 MiB)`):
//!
//! | offset | size | written by | what |
//! |---|---|---|---|
//! | [`REQ_SEQ`] | u64 | image | number of the latest request |
//! | [`ANS_SEQ`] | u64 | host | number of the request answered |
//! | [`REQ_FRAME`] | [`MAX_FRAME`](crate::wire::MAX_FRAME) | image | the request, a [`wire`](crate::wire) frame |
//! | [`ANS_FRAME`] | [`MAX_FRAME`](crate::wire::MAX_FRAME) | host | the answer, a frame |
//!
//! The image writes the frame, then stores `REQ_SEQ + 1` (release); the host sees the new
//! number, reads the frame, writes the answer frame, then stores the same number in `ANS_SEQ`;
//! the image waits for that number (acquire) and reads the answer. Both stores are ordered after
//! the frame they publish (x86 stores are not reordered with older stores), and a sequence
//! number only ever grows by one, so a reader never takes a half-written frame.

/// GPA of vCPU 0's mailbox (7 MiB, in the image's accepted memory).
pub const BASE: u64 = 0x70_0000;
/// Distance between two vCPUs' mailboxes.
pub const STRIDE: u64 = 0x1000;
/// Offset of the request sequence number.
pub const REQ_SEQ: u64 = 0;
/// Offset of the answer sequence number.
pub const ANS_SEQ: u64 = 8;
/// Offset of the request frame.
pub const REQ_FRAME: u64 = 64;
/// Offset of the answer frame.
pub const ANS_FRAME: u64 = 512;
/// Most vCPUs with a mailbox.
pub const MAX_VCPUS: u64 = 16;

/// GPA of vCPU `vcpu`'s mailbox.
pub const fn gpa(vcpu: u64) -> u64 {
    BASE + vcpu * STRIDE
}
