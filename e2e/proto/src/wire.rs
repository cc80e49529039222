//! The framed protocol between the bare-metal test image and the host process (`tdhost`) that
//! stands in for the TDX module when the image runs under QEMU TCG, which has no TDX.
//!
//! The image sends one request per TDCALL (or per memory touch) over a byte stream (a QEMU
//! serial port wired to a Unix socket) and waits for exactly one answer. No request is
//! pipelined, so the protocol needs no sequence numbers.
//!
//! Frame, both directions: `[MAGIC] [op] [n] [n x u64, little endian] [sum]`, where `sum` is the
//! wrapping byte sum of everything before it, `n <= MAX_ARGS`.
//!
//! | request (image -> host) | op | args |
//! |---|---|---|
//! | [`Request::Hello`] | 0x01 | protocol version |
//! | [`Request::VpInfo`] (TDG.VP.INFO) | 0x02 | - |
//! | [`Request::VeInfo`] (TDG.VP.VEINFO.GET) | 0x03 | - |
//! | [`Request::Accept`] (TDG.MEM.PAGE.ACCEPT) | 0x06 | RCX page info |
//! | [`Request::MapGpa`] (`TDG.VP.VMCALL<MapGPA>`) | 0x10 | R12 start, R13 length |
//! | [`Request::Touch`] (a memory access) | 0x20 | GPA, 1 = write, token written |
//! | [`Request::Done`] (end of the run) | 0x7F | status (0 = pass), then the image's counts |
//! | [`Request::Attach`] (a QEMU vCPU's link, TCG-TDX) | 0x30 | protocol version, vCPU index |
//! | [`Request::Tdcall`] (a TDCALL instruction, TCG-TDX) | 0x31 | RAX, RCX, RDX, R8-R15 |
//! | [`Request::Access`] (a Secure-EPT access check, TCG-TDX) | 0x32 | GPA, 1 = write, 1 = fetch, 1 = probe |
//!
//! | answer (host -> image) | op | args |
//! |---|---|---|
//! | [`Answer::Regs`]: the call retired | 0x80 | RAX, RCX, RDX, R8, R9, R10, R11 |
//! | [`Answer::Reexecute`]: the TD exited, the host handled it, run the instruction again | 0x81 | - |
//! | [`Answer::InjectVe`]: the module injected #VE (vector 20) | 0x82 | - |
//! | [`Answer::InjectDf`]: the module injected #DF (a #VE while VE info was valid) | 0x83 | - |
//! | [`Answer::Ack`] | 0x84 | - |
//! | [`Answer::Fatal`]: the host killed the TD | 0x8F | reason code |
//!
//! A touch that completes answers `Regs` with RAX 0 and RCX the page's content token (the
//! emulator's model of the page content).
//!
//! The last three requests come from the patched QEMU of `cargo xtask e2e --tcg-tdx`
//! (`e2e/qemu-tcg-tdx/`), which executes TDCALL itself and checks every guest access to
//! private memory against the emulator's Secure-EPT: one link per vCPU, opened with `Attach`.
//! A `Tdcall` carries the raw register block and is decoded by the host as the module decodes
//! it ([`decode_tdcall`]); an `Access` answers `Regs` when the access may complete. A probe
//! (QEMU's non-faulting look-up) changes nothing: it answers `Regs` with RAX 0 when the page is
//! MAPPED and 1 when not. Encoding and decoding are pure functions over byte
//! slices; the transport that moves the bytes is the embedder's.

/// Start of every frame.
pub const MAGIC: u8 = 0xA5;
/// Protocol version carried by [`Request::Hello`].
pub const VERSION: u64 = 1;
/// Most arguments in one frame.
pub const MAX_ARGS: usize = 16;
/// Longest frame in bytes.
pub const MAX_FRAME: usize = 3 + 8 * MAX_ARGS + 1;

/// A decoded frame: an opcode and its arguments.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame {
    /// Opcode.
    pub op: u8,
    /// Number of valid arguments.
    pub n: usize,
    /// Arguments (`args[..n]`).
    pub args: [u64; MAX_ARGS],
}

impl Frame {
    /// A frame with these arguments (at most [`MAX_ARGS`]; more are dropped).
    pub fn new(op: u8, args: &[u64]) -> Frame {
        let n = args.len().min(MAX_ARGS);
        let mut a = [0; MAX_ARGS];
        a[..n].copy_from_slice(&args[..n]);
        Frame { op, n, args: a }
    }

    /// Argument `i`, 0 when absent.
    pub fn arg(&self, i: usize) -> u64 {
        if i < self.n {
            self.args[i]
        } else {
            0
        }
    }

    /// Encodes into `out`, returning the frame length.
    pub fn encode(&self, out: &mut [u8; MAX_FRAME]) -> usize {
        out[0] = MAGIC;
        out[1] = self.op;
        out[2] = self.n as u8;
        let mut at = 3;
        for a in &self.args[..self.n] {
            out[at..at + 8].copy_from_slice(&a.to_le_bytes());
            at += 8;
        }
        out[at] = checksum(&out[..at]);
        at + 1
    }
}

/// Why bytes are not a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WireError {
    /// The first byte is not [`MAGIC`].
    Magic(u8),
    /// More than [`MAX_ARGS`] arguments.
    TooLong(u8),
    /// The checksum does not match.
    Checksum,
    /// An opcode this side does not know.
    Op(u8),
    /// Fewer bytes than the header announces.
    Short,
}

/// Wrapping byte sum.
pub fn checksum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |s, b| s.wrapping_add(*b))
}

/// Incremental decoder: feed bytes one at a time, get a frame when one is complete.
#[derive(Debug, Clone)]
pub struct Decoder {
    buf: [u8; MAX_FRAME],
    len: usize,
}

impl Default for Decoder {
    fn default() -> Self {
        Decoder::new()
    }
}

impl Decoder {
    /// An empty decoder.
    pub const fn new() -> Decoder {
        Decoder {
            buf: [0; MAX_FRAME],
            len: 0,
        }
    }

    /// Adds one byte. Returns `Some(Ok(frame))` when a frame is complete, `Some(Err(_))` for a
    /// bad frame (the decoder resets), `None` while more bytes are needed.
    pub fn push(&mut self, byte: u8) -> Option<Result<Frame, WireError>> {
        if self.len == 0 && byte != MAGIC {
            return Some(Err(WireError::Magic(byte)));
        }
        if self.len == 2 && usize::from(byte) > MAX_ARGS {
            self.len = 0;
            return Some(Err(WireError::TooLong(byte)));
        }
        self.buf[self.len] = byte;
        self.len += 1;
        if self.len < 3 {
            return None;
        }
        let n = usize::from(self.buf[2]);
        let total = 3 + 8 * n + 1;
        if self.len < total {
            return None;
        }
        self.len = 0;
        Some(decode(&self.buf[..total]))
    }
}

/// Decodes one whole frame.
///
/// # Errors
/// [`WireError`].
pub fn decode(bytes: &[u8]) -> Result<Frame, WireError> {
    let (&magic, rest) = bytes.split_first().ok_or(WireError::Short)?;
    if magic != MAGIC {
        return Err(WireError::Magic(magic));
    }
    let (&op, rest) = rest.split_first().ok_or(WireError::Short)?;
    let (&n, rest) = rest.split_first().ok_or(WireError::Short)?;
    let n = usize::from(n);
    if n > MAX_ARGS {
        return Err(WireError::TooLong(n as u8));
    }
    let body = rest.get(..8 * n).ok_or(WireError::Short)?;
    let sum = *rest.get(8 * n).ok_or(WireError::Short)?;
    if checksum(&bytes[..3 + 8 * n]) != sum {
        return Err(WireError::Checksum);
    }
    let mut args = [0; MAX_ARGS];
    for (a, c) in args.iter_mut().zip(body.chunks_exact(8)) {
        let mut b = [0; 8];
        b.copy_from_slice(c);
        *a = u64::from_le_bytes(b);
    }
    Ok(Frame { op, n, args })
}

/// Request opcodes.
pub mod op {
    /// Hello.
    pub const HELLO: u8 = 0x01;
    /// TDG.VP.INFO.
    pub const VP_INFO: u8 = 0x02;
    /// TDG.VP.VEINFO.GET.
    pub const VE_INFO: u8 = 0x03;
    /// TDG.MEM.PAGE.ACCEPT.
    pub const ACCEPT: u8 = 0x06;
    /// MapGPA.
    pub const MAP_GPA: u8 = 0x10;
    /// Memory touch.
    pub const TOUCH: u8 = 0x20;
    /// End of run.
    pub const DONE: u8 = 0x7F;
    /// A QEMU vCPU's link (TCG-TDX).
    pub const ATTACH: u8 = 0x30;
    /// A TDCALL's register block (TCG-TDX).
    pub const TDCALL: u8 = 0x31;
    /// A Secure-EPT access check (TCG-TDX).
    pub const ACCESS: u8 = 0x32;
    /// Registers.
    pub const REGS: u8 = 0x80;
    /// Re-execute.
    pub const REEXEC: u8 = 0x81;
    /// Inject #VE.
    pub const INJECT_VE: u8 = 0x82;
    /// Inject #DF.
    pub const INJECT_DF: u8 = 0x83;
    /// Acknowledge.
    pub const ACK: u8 = 0x84;
    /// Fatal.
    pub const FATAL: u8 = 0x8F;
}

/// What the image asks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    /// Start of a run.
    Hello {
        /// [`VERSION`].
        version: u64,
    },
    /// TDG.VP.INFO.
    VpInfo,
    /// TDG.VP.VEINFO.GET.
    VeInfo,
    /// TDG.MEM.PAGE.ACCEPT with this RCX.
    Accept {
        /// Page info (GPA | level).
        page_info: u64,
    },
    /// `TDG.VP.VMCALL<MapGPA>`.
    MapGpa {
        /// R12.
        start: u64,
        /// R13.
        len: u64,
    },
    /// A memory access to the 4K page holding `gpa`.
    Touch {
        /// The GPA.
        gpa: u64,
        /// `Some(token)` for a write.
        write: Option<u64>,
    },
    /// A QEMU vCPU opens its link (TCG-TDX): every later request on it is this vCPU's.
    Attach {
        /// [`VERSION`].
        version: u64,
        /// The vCPU's index.
        vcpu: u64,
    },
    /// A TDCALL instruction (TCG-TDX): RAX, RCX, RDX, R8-R15 as the vCPU holds them.
    Tdcall {
        /// The register block.
        regs: [u64; TDCALL_REGS],
    },
    /// A guest access to the private page holding `gpa` (TCG-TDX), checked against the
    /// Secure-EPT before the access completes.
    Access {
        /// The GPA.
        gpa: u64,
        /// A store.
        write: bool,
        /// An instruction fetch.
        fetch: bool,
        /// A non-faulting probe: only whether the page is MAPPED.
        probe: bool,
    },
    /// End of the run: `status` 0 when every self-test passed, then up to 15 counters.
    Done {
        /// 0 = pass.
        status: u64,
        /// Counters, as many as sent.
        counts: [u64; MAX_ARGS - 1],
        /// How many.
        n: usize,
    },
}

impl Request {
    /// The frame for this request.
    pub fn to_frame(&self) -> Frame {
        match *self {
            Request::Hello { version } => Frame::new(op::HELLO, &[version]),
            Request::VpInfo => Frame::new(op::VP_INFO, &[]),
            Request::VeInfo => Frame::new(op::VE_INFO, &[]),
            Request::Accept { page_info } => Frame::new(op::ACCEPT, &[page_info]),
            Request::MapGpa { start, len } => Frame::new(op::MAP_GPA, &[start, len]),
            Request::Touch { gpa, write } => Frame::new(
                op::TOUCH,
                &[gpa, u64::from(write.is_some()), write.unwrap_or(0)],
            ),
            Request::Attach { version, vcpu } => Frame::new(op::ATTACH, &[version, vcpu]),
            Request::Tdcall { regs } => Frame::new(op::TDCALL, &regs),
            Request::Access {
                gpa,
                write,
                fetch,
                probe,
            } => Frame::new(
                op::ACCESS,
                &[gpa, u64::from(write), u64::from(fetch), u64::from(probe)],
            ),
            Request::Done { status, counts, n } => {
                let mut a = [0; MAX_ARGS];
                a[0] = status;
                let n = n.min(MAX_ARGS - 1);
                a[1..=n].copy_from_slice(&counts[..n]);
                Frame::new(op::DONE, &a[..=n])
            }
        }
    }

    /// The request a frame carries.
    ///
    /// # Errors
    /// [`WireError::Op`] for an opcode that is not a request.
    pub fn from_frame(f: &Frame) -> Result<Request, WireError> {
        Ok(match f.op {
            op::HELLO => Request::Hello { version: f.arg(0) },
            op::VP_INFO => Request::VpInfo,
            op::VE_INFO => Request::VeInfo,
            op::ACCEPT => Request::Accept {
                page_info: f.arg(0),
            },
            op::MAP_GPA => Request::MapGpa {
                start: f.arg(0),
                len: f.arg(1),
            },
            op::TOUCH => Request::Touch {
                gpa: f.arg(0),
                write: (f.arg(1) != 0).then_some(f.arg(2)),
            },
            op::ATTACH => Request::Attach {
                version: f.arg(0),
                vcpu: f.arg(1),
            },
            op::TDCALL => {
                let mut regs = [0; TDCALL_REGS];
                for (i, r) in regs.iter_mut().enumerate() {
                    *r = f.arg(i);
                }
                Request::Tdcall { regs }
            }
            op::ACCESS => Request::Access {
                gpa: f.arg(0),
                write: f.arg(1) != 0,
                fetch: f.arg(2) != 0,
                probe: f.arg(3) != 0,
            },
            op::DONE => {
                let n = f.n.saturating_sub(1);
                let mut counts = [0; MAX_ARGS - 1];
                counts[..n].copy_from_slice(&f.args[1..=n]);
                Request::Done {
                    status: f.arg(0),
                    counts,
                    n,
                }
            }
            other => return Err(WireError::Op(other)),
        })
    }
}

/// TDCALL output registers carried by [`Answer::Regs`]: the ABI's register block.
pub type Regs = accept::abi::TdcallRegs;

/// Registers a [`Request::Tdcall`] carries: RAX, RCX, RDX, R8-R15.
pub const TDCALL_REGS: usize = 11;

/// What a TDCALL's registers ask of the module, decoded as the module decodes them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decoded {
    /// A call the host serves.
    Request(Request),
    /// A call answered on the spot: a VMCALL sub-function the VMM does not serve (RAX 0, R10
    /// `TDG.VP.VMCALL_SUBFUNC_UNSUPPORTED`), or a leaf this module does not implement (RAX
    /// `TDX_OPERAND_INVALID`).
    Local(Regs),
}

/// Decodes a TDCALL from its leaf (`RAX[15:0]`) and operands: TDG.VP.INFO, TDG.VP.VEINFO.GET,
/// TDG.MEM.PAGE.ACCEPT (RCX page info) and `TDG.VP.VMCALL<MapGPA>` (R11 sub-function, R12
/// start, R13 length).
pub fn decode_tdcall(rax: u64, rcx: u64, r11: u64, r12: u64, r13: u64) -> Decoded {
    use accept::abi::{leaf, operand, vmcall, GhciStatus, StatusCode};
    match rax & 0xFFFF {
        leaf::VP_INFO => Decoded::Request(Request::VpInfo),
        leaf::VP_VEINFO_GET => Decoded::Request(Request::VeInfo),
        leaf::MEM_PAGE_ACCEPT => Decoded::Request(Request::Accept { page_info: rcx }),
        leaf::VP_VMCALL if r11 == vmcall::MAP_GPA => Decoded::Request(Request::MapGpa {
            start: r12,
            len: r13,
        }),
        leaf::VP_VMCALL => Decoded::Local(Regs {
            r10: GhciStatus::SubfuncUnsupported.raw(),
            ..Regs::default()
        }),
        _ => Decoded::Local(Regs {
            rax: StatusCode::OperandInvalid.with_operand(operand::RAX).raw(),
            ..Regs::default()
        }),
    }
}

/// What the host answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// The instruction retired with these registers.
    Regs(Regs),
    /// Run the instruction again (the TD exited and the host handled the exit).
    Reexecute,
    /// Raise #VE (vector 20), then run the instruction again.
    InjectVe,
    /// Raise #DF.
    InjectDf,
    /// Acknowledged.
    Ack,
    /// The host killed the TD.
    Fatal(u64),
}

impl Answer {
    /// The frame for this answer.
    pub fn to_frame(&self) -> Frame {
        match *self {
            Answer::Regs(r) => {
                Frame::new(op::REGS, &[r.rax, r.rcx, r.rdx, r.r8, r.r9, r.r10, r.r11])
            }
            Answer::Reexecute => Frame::new(op::REEXEC, &[]),
            Answer::InjectVe => Frame::new(op::INJECT_VE, &[]),
            Answer::InjectDf => Frame::new(op::INJECT_DF, &[]),
            Answer::Ack => Frame::new(op::ACK, &[]),
            Answer::Fatal(code) => Frame::new(op::FATAL, &[code]),
        }
    }

    /// The answer a frame carries.
    ///
    /// # Errors
    /// [`WireError::Op`] for an opcode that is not an answer.
    pub fn from_frame(f: &Frame) -> Result<Answer, WireError> {
        Ok(match f.op {
            op::REGS => Answer::Regs(Regs {
                rax: f.arg(0),
                rcx: f.arg(1),
                rdx: f.arg(2),
                r8: f.arg(3),
                r9: f.arg(4),
                r10: f.arg(5),
                r11: f.arg(6),
            }),
            op::REEXEC => Answer::Reexecute,
            op::INJECT_VE => Answer::InjectVe,
            op::INJECT_DF => Answer::InjectDf,
            op::ACK => Answer::Ack,
            op::FATAL => Answer::Fatal(f.arg(0)),
            other => return Err(WireError::Op(other)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip(f: Frame) -> Frame {
        let mut buf = [0u8; MAX_FRAME];
        let n = f.encode(&mut buf);
        let mut d = Decoder::new();
        for (i, &b) in buf[..n].iter().enumerate() {
            match d.push(b) {
                None => assert!(i + 1 < n),
                Some(r) => {
                    assert_eq!(i + 1, n);
                    return r.unwrap();
                }
            }
        }
        panic!("incomplete frame");
    }

    #[test]
    fn requests_roundtrip() {
        let reqs = [
            Request::Hello { version: VERSION },
            Request::VpInfo,
            Request::VeInfo,
            Request::Accept {
                page_info: 0x20_0001,
            },
            Request::MapGpa {
                start: 1 << 47 | 0x40_0000,
                len: 0x20_0000,
            },
            Request::Touch {
                gpa: 0x1234_5000,
                write: Some(0xDEAD_BEEF),
            },
            Request::Touch {
                gpa: 0x1000,
                write: None,
            },
            Request::Attach {
                version: VERSION,
                vcpu: 3,
            },
            Request::Tdcall {
                regs: [6, 0x20_0001, 2, 3, 4, 5, 6, 7, 8, 9, u64::MAX],
            },
            Request::Access {
                gpa: 0x20_3000,
                write: true,
                fetch: false,
                probe: false,
            },
            Request::Access {
                gpa: 0x10_0000,
                write: false,
                fetch: true,
                probe: true,
            },
            Request::Done {
                status: 0,
                counts: [7; MAX_ARGS - 1],
                n: 3,
            },
        ];
        for r in reqs {
            let f = roundtrip(r.to_frame());
            let mut back = Request::from_frame(&f).unwrap();
            if let (Request::Done { counts: c, n, .. }, Request::Done { .. }) = (&mut back, r) {
                assert_eq!(*n, 3);
                assert_eq!(&c[..3], &[7, 7, 7]);
                c[3..].fill(7);
            }
            assert_eq!(back, r);
        }
    }

    /// The frame the patched QEMU builds for a TDCALL (`tdx-tcg.c` tdx_tcg_send), byte for
    /// byte: magic, op, 11 registers little endian, byte sum.
    #[test]
    fn a_tdcall_frame_is_the_one_qemu_sends() {
        let regs = [6, 0x20_0001, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        let mut buf = [0u8; MAX_FRAME];
        let n = Request::Tdcall { regs }.to_frame().encode(&mut buf);
        let mut want = std::vec![MAGIC, op::TDCALL, 11];
        for r in regs {
            want.extend_from_slice(&r.to_le_bytes());
        }
        let sum = want.iter().fold(0u8, |a, &b| a.wrapping_add(b));
        want.push(sum);
        assert_eq!(&buf[..n], &want[..]);
    }

    #[test]
    fn tdcalls_decode_as_the_module_decodes_them() {
        use accept::abi::{leaf, operand, vmcall, GhciStatus, StatusCode};
        assert_eq!(
            decode_tdcall(leaf::MEM_PAGE_ACCEPT, 0x20_0001, 0, 0, 0),
            Decoded::Request(Request::Accept {
                page_info: 0x20_0001
            })
        );
        // Only RAX[15:0] is the leaf.
        assert_eq!(
            decode_tdcall(leaf::VP_INFO | 1 << 16, 0, 0, 0, 0),
            Decoded::Request(Request::VpInfo)
        );
        assert_eq!(
            decode_tdcall(leaf::VP_VEINFO_GET, 0, 0, 0, 0),
            Decoded::Request(Request::VeInfo)
        );
        assert_eq!(
            decode_tdcall(leaf::VP_VMCALL, 0, vmcall::MAP_GPA, 1 << 47, 4096),
            Decoded::Request(Request::MapGpa {
                start: 1 << 47,
                len: 4096
            })
        );
        match decode_tdcall(leaf::VP_VMCALL, 0, 0x10000, 0, 0) {
            Decoded::Local(r) => {
                assert_eq!((r.rax, r.r10), (0, GhciStatus::SubfuncUnsupported.raw()))
            }
            other => panic!("{other:?}"),
        }
        match decode_tdcall(99, 0, 0, 0, 0) {
            Decoded::Local(r) => assert_eq!(
                r.rax,
                StatusCode::OperandInvalid.with_operand(operand::RAX).raw()
            ),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn answers_roundtrip() {
        let answers = [
            Answer::Regs(Regs {
                rax: 0xC000_0B0B_0000_0001,
                rcx: 1,
                rdx: 2,
                r8: 3,
                r9: 4,
                r10: 5,
                r11: u64::MAX,
            }),
            Answer::Reexecute,
            Answer::InjectVe,
            Answer::InjectDf,
            Answer::Ack,
            Answer::Fatal(9),
        ];
        for a in answers {
            assert_eq!(Answer::from_frame(&roundtrip(a.to_frame())).unwrap(), a);
        }
    }

    #[test]
    fn bad_frames_are_errors() {
        let mut buf = [0u8; MAX_FRAME];
        let n = Request::Accept { page_info: 5 }.to_frame().encode(&mut buf);
        assert_eq!(n, 3 + 8 + 1);
        let mut bad = buf;
        bad[5] ^= 1;
        assert_eq!(decode(&bad[..n]), Err(WireError::Checksum));
        assert_eq!(decode(&buf[..n - 1]), Err(WireError::Short));
        assert_eq!(decode(&[0x00, 1, 0, 1]), Err(WireError::Magic(0)));
        assert_eq!(decode(&[MAGIC, 1, 17, 0]), Err(WireError::TooLong(17)));
        let mut d = Decoder::new();
        assert_eq!(d.push(0x41), Some(Err(WireError::Magic(0x41))));
        assert_eq!(d.push(MAGIC), None);
        assert_eq!(d.push(op::ACK), None);
        assert_eq!(d.push(200), Some(Err(WireError::TooLong(200))));
        // The decoder resynchronises on the next frame.
        let f = Answer::Ack.to_frame();
        assert_eq!(roundtrip(f), f);
        assert_eq!(
            Request::from_frame(&Frame::new(op::ACK, &[])),
            Err(WireError::Op(op::ACK))
        );
        assert_eq!(
            Answer::from_frame(&Frame::new(op::TOUCH, &[])),
            Err(WireError::Op(op::TOUCH))
        );
    }
}
