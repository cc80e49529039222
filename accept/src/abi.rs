//! The TDX ABI as both halves of the project speak it: leaf numbers, completion statuses, page
//! levels, guest physical addresses with the shared bit, #VE information and GHCI statuses.
//!
//! This module is the single source of ABI truth: the guest engine decodes what the module
//! returns with it, and the host-side emulator encodes its answers with it. It holds no policy.
//!
//! Sources: `include/tdx_api_defs.h` and `include/auto_gen/tdx_error_codes_defs.h` of the public
//! TDX module 1.5 source, Linux `arch/x86/include/asm/shared/tdx.h`, and the GHCI specification.

use core::fmt;

#[cfg(feature = "x86_64")]
mod x86_64_interop;

/// TDCALL leaf numbers (`RAX[15:0]`), `include/tdx_api_defs.h`.
pub mod leaf {
    /// TDG.VP.VMCALL: exit to the host VMM, GHCI sub-function in R11.
    pub const VP_VMCALL: u64 = 0;
    /// TDG.VP.INFO: RCX returns the GPA width.
    pub const VP_INFO: u64 = 1;
    /// TDG.VP.VEINFO.GET.
    pub const VP_VEINFO_GET: u64 = 3;
    /// TDG.MEM.PAGE.ACCEPT.
    pub const MEM_PAGE_ACCEPT: u64 = 6;
    /// TDG.VM.RD.
    pub const VM_RD: u64 = 7;
    /// TDG.VM.WR.
    pub const VM_WR: u64 = 8;
    /// TDG.MEM.PAGE.ATTR.WR.
    pub const MEM_PAGE_ATTR_WR: u64 = 24;
}

/// SEAMCALL leaf numbers used by the host half, `include/tdx_api_defs.h`.
pub mod seamcall {
    /// TDH.MEM.PAGE.ADD (4K, build time only).
    pub const MEM_PAGE_ADD: u64 = 2;
    /// TDH.MEM.SEPT.ADD.
    pub const MEM_SEPT_ADD: u64 = 3;
    /// TDH.MEM.PAGE.AUG.
    pub const MEM_PAGE_AUG: u64 = 6;
    /// TDH.MEM.RANGE.BLOCK.
    pub const MEM_RANGE_BLOCK: u64 = 7;
    /// TDH.MEM.PAGE.DEMOTE.
    pub const MEM_PAGE_DEMOTE: u64 = 15;
    /// TDH.MR.FINALIZE.
    pub const MR_FINALIZE: u64 = 17;
    /// TDH.MEM.PAGE.PROMOTE.
    pub const MEM_PAGE_PROMOTE: u64 = 23;
    /// TDH.MEM.PAGE.REMOVE.
    pub const MEM_PAGE_REMOVE: u64 = 29;
    /// TDH.MEM.SEPT.REMOVE.
    pub const MEM_SEPT_REMOVE: u64 = 30;
    /// TDH.MEM.TRACK.
    pub const MEM_TRACK: u64 = 38;
    /// TDH.MEM.RANGE.UNBLOCK.
    pub const MEM_RANGE_UNBLOCK: u64 = 39;
}

/// GHCI TDG.VP.VMCALL sub-function numbers (R11 on entry, with R10 = 0).
pub mod vmcall {
    /// MapGPA: convert a GPA range between private and shared.
    pub const MAP_GPA: u64 = 0x10001;
    /// Register mask (RCX) of the usual set exposed to the host: RBX, RBP, RSI, RDI, R8-R15.
    pub const EXPOSE_REGS_MASK: u64 = 0xFFCC;
}

/// Operand ids carried in the low 32 bits of an error status, `tdx_error_codes_defs.h`.
pub mod operand {
    /// RAX.
    pub const RAX: u32 = 0;
    /// RCX.
    pub const RCX: u32 = 1;
    /// RDX.
    pub const RDX: u32 = 2;
    /// R8.
    pub const R8: u32 = 8;
    /// The TD root page.
    pub const TDR: u32 = 128;
    /// The Secure-EPT tree (tree lock).
    pub const SEPT_TREE: u32 = 146;
    /// A Secure-EPT entry.
    pub const SEPT_ENTRY: u32 = 147;
    /// The TD's TLB epoch.
    pub const TD_EPOCH: u32 = 169;
    /// The TD's operation state.
    pub const OP_STATE: u32 = 172;
}

/// A completion status class: the upper 32 bits of a 64-bit TDX status.
///
/// `Unknown` keeps the raw class of codes this crate does not name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StatusCode {
    /// TDX_SUCCESS.
    Success,
    /// TDX_NON_RECOVERABLE_TD.
    NonRecoverableTd,
    /// TDX_INTERRUPTED_RESUMABLE.
    InterruptedResumable,
    /// TDX_INTERRUPTED_RESTARTABLE.
    InterruptedRestartable,
    /// TDX_OPERAND_INVALID.
    OperandInvalid,
    /// TDX_OPERAND_ADDR_RANGE_ERROR.
    OperandAddrRangeError,
    /// TDX_OPERAND_BUSY.
    OperandBusy,
    /// TDX_PREVIOUS_TLB_EPOCH_BUSY.
    PreviousTlbEpochBusy,
    /// TDX_OP_STATE_INCORRECT.
    OpStateIncorrect,
    /// TDX_NO_VALID_VE_INFO.
    NoValidVeInfo,
    /// TDX_EPT_WALK_FAILED.
    EptWalkFailed,
    /// TDX_EPT_ENTRY_FREE.
    EptEntryFree,
    /// TDX_EPT_ENTRY_NOT_FREE.
    EptEntryNotFree,
    /// TDX_EPT_ENTRY_NOT_PRESENT.
    EptEntryNotPresent,
    /// TDX_EPT_ENTRY_NOT_LEAF.
    EptEntryNotLeaf,
    /// TDX_EPT_ENTRY_LEAF.
    EptEntryLeaf,
    /// TDX_GPA_RANGE_NOT_BLOCKED.
    GpaRangeNotBlocked,
    /// TDX_GPA_RANGE_ALREADY_BLOCKED (warning).
    GpaRangeAlreadyBlocked,
    /// TDX_TLB_TRACKING_NOT_DONE.
    TlbTrackingNotDone,
    /// TDX_EPT_INVALID_PROMOTE_CONDITIONS.
    EptInvalidPromoteConditions,
    /// TDX_PAGE_ALREADY_ACCEPTED (warning).
    PageAlreadyAccepted,
    /// TDX_PAGE_SIZE_MISMATCH.
    PageSizeMismatch,
    /// TDX_GPA_RANGE_BLOCKED.
    GpaRangeBlocked,
    /// TDX_EPT_ENTRY_STATE_INCORRECT.
    EptEntryStateIncorrect,
    /// TDX_EPT_PAGE_NOT_FREE.
    EptPageNotFree,
    /// A class this crate does not name; the raw upper 32 bits.
    Unknown(u32),
}

/// Table of named classes: (code, upper 32 bits of the status).
const CODES: &[(StatusCode, u32)] = &[
    (StatusCode::Success, 0x0000_0000),
    (StatusCode::NonRecoverableTd, 0x6000_0002),
    (StatusCode::InterruptedResumable, 0x8000_0003),
    (StatusCode::InterruptedRestartable, 0x8000_0004),
    (StatusCode::OperandInvalid, 0xC000_0100),
    (StatusCode::OperandAddrRangeError, 0xC000_0101),
    (StatusCode::OperandBusy, 0x8000_0200),
    (StatusCode::PreviousTlbEpochBusy, 0x8000_0201),
    (StatusCode::OpStateIncorrect, 0xC000_0608),
    (StatusCode::NoValidVeInfo, 0xC000_0704),
    (StatusCode::EptWalkFailed, 0xC000_0B00),
    (StatusCode::EptEntryFree, 0xC000_0B01),
    (StatusCode::EptEntryNotFree, 0xC000_0B02),
    (StatusCode::EptEntryNotPresent, 0xC000_0B03),
    (StatusCode::EptEntryNotLeaf, 0xC000_0B04),
    (StatusCode::EptEntryLeaf, 0xC000_0B05),
    (StatusCode::GpaRangeNotBlocked, 0xC000_0B06),
    (StatusCode::GpaRangeAlreadyBlocked, 0x0000_0B07),
    (StatusCode::TlbTrackingNotDone, 0xC000_0B08),
    (StatusCode::EptInvalidPromoteConditions, 0xC000_0B09),
    (StatusCode::PageAlreadyAccepted, 0x0000_0B0A),
    (StatusCode::PageSizeMismatch, 0xC000_0B0B),
    (StatusCode::GpaRangeBlocked, 0xC000_0B0C),
    (StatusCode::EptEntryStateIncorrect, 0xC000_0B0D),
    (StatusCode::EptPageNotFree, 0xC000_0B0E),
];

impl StatusCode {
    /// The upper 32 bits of a status of this class.
    pub const fn class_bits(self) -> u32 {
        match self {
            StatusCode::Unknown(bits) => bits,
            _ => {
                let mut i = 0;
                while i < CODES.len() {
                    if CODES[i].0.same_named(self) {
                        return CODES[i].1;
                    }
                    i += 1;
                }
                // Every named variant is in CODES (checked by a unit test).
                u32::MAX
            }
        }
    }

    /// Decodes the upper 32 bits of a status.
    pub const fn from_class_bits(bits: u32) -> StatusCode {
        let mut i = 0;
        while i < CODES.len() {
            if CODES[i].1 == bits {
                return CODES[i].0;
            }
            i += 1;
        }
        StatusCode::Unknown(bits)
    }

    const fn discriminant(self) -> u32 {
        match self {
            StatusCode::Success => 0,
            StatusCode::NonRecoverableTd => 1,
            StatusCode::InterruptedResumable => 2,
            StatusCode::InterruptedRestartable => 3,
            StatusCode::OperandInvalid => 4,
            StatusCode::OperandAddrRangeError => 5,
            StatusCode::OperandBusy => 6,
            StatusCode::PreviousTlbEpochBusy => 7,
            StatusCode::OpStateIncorrect => 8,
            StatusCode::NoValidVeInfo => 9,
            StatusCode::EptWalkFailed => 10,
            StatusCode::EptEntryFree => 11,
            StatusCode::EptEntryNotFree => 12,
            StatusCode::EptEntryNotPresent => 13,
            StatusCode::EptEntryNotLeaf => 14,
            StatusCode::EptEntryLeaf => 15,
            StatusCode::GpaRangeNotBlocked => 16,
            StatusCode::GpaRangeAlreadyBlocked => 17,
            StatusCode::TlbTrackingNotDone => 18,
            StatusCode::EptInvalidPromoteConditions => 19,
            StatusCode::PageAlreadyAccepted => 20,
            StatusCode::PageSizeMismatch => 21,
            StatusCode::GpaRangeBlocked => 22,
            StatusCode::EptEntryStateIncorrect => 23,
            StatusCode::EptPageNotFree => 24,
            StatusCode::Unknown(_) => u32::MAX,
        }
    }

    const fn same_named(self, other: StatusCode) -> bool {
        self.discriminant() == other.discriminant()
    }

    /// The status of this class with the given operand id (or ACCEPT level) in the low 32 bits.
    pub const fn with_operand(self, operand: u32) -> TdxStatus {
        TdxStatus(((self.class_bits() as u64) << 32) | operand as u64)
    }

    /// The status of this class with operand 0.
    pub const fn status(self) -> TdxStatus {
        self.with_operand(0)
    }
}

/// A raw 64-bit TDX completion status (RAX after TDCALL or SEAMCALL).
///
/// The raw value is kept as is, so unknown codes survive a round trip; decode it with
/// [`TdxStatus::code`] (class, bits 63:32) and [`TdxStatus::operand`] (bits 31:0).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct TdxStatus(u64);

impl TdxStatus {
    /// TDX_SUCCESS.
    pub const SUCCESS: TdxStatus = TdxStatus(0);

    /// Wraps a raw status.
    pub const fn from_raw(raw: u64) -> TdxStatus {
        TdxStatus(raw)
    }

    /// The raw 64-bit value.
    pub const fn raw(self) -> u64 {
        self.0
    }

    /// The decoded class.
    pub const fn code(self) -> StatusCode {
        StatusCode::from_class_bits((self.0 >> 32) as u32)
    }

    /// The low 32 bits: operand id, or for ACCEPT outcomes the EPT level the walk stopped at.
    pub const fn operand(self) -> u32 {
        self.0 as u32
    }

    /// Bit 63: the call failed. Warnings (ALREADY_ACCEPTED, ALREADY_BLOCKED) have it clear.
    pub const fn is_error(self) -> bool {
        self.0 >> 63 != 0
    }

    /// Bit 62: the error is non-recoverable.
    pub const fn is_non_recoverable(self) -> bool {
        (self.0 >> 62) & 1 != 0
    }

    /// Bit 61: the error is fatal for the TD.
    pub const fn is_fatal(self) -> bool {
        (self.0 >> 61) & 1 != 0
    }

    /// True for exactly TDX_SUCCESS (all 64 bits zero).
    pub const fn is_success(self) -> bool {
        self.0 == 0
    }

    /// True when the class is `code`, whatever the operand.
    pub const fn is(self, code: StatusCode) -> bool {
        (self.0 >> 32) as u32 == code.class_bits()
    }
}

impl fmt::Debug for TdxStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TdxStatus({:#018x} {:?}", self.0, self.code())?;
        if self.operand() != 0 {
            write!(f, " operand {}", self.operand())?;
        }
        f.write_str(")")
    }
}

impl fmt::Display for TdxStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// A Secure-EPT mapping level: 4 KiB, 2 MiB or 1 GiB.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[repr(u8)]
pub enum PageLevel {
    /// 4 KiB, EPT level 0.
    Size4K = 0,
    /// 2 MiB, EPT level 1.
    Size2M = 1,
    /// 1 GiB, EPT level 2.
    Size1G = 2,
}

impl PageLevel {
    /// All levels, largest first.
    pub const LARGEST_FIRST: [PageLevel; 3] =
        [PageLevel::Size1G, PageLevel::Size2M, PageLevel::Size4K];

    /// The level number as the ABI encodes it (0 = 4K, 1 = 2M, 2 = 1G).
    pub const fn index(self) -> u8 {
        self as u8
    }

    /// Decodes an ABI level number; `None` for 3 and above.
    pub const fn from_index(index: u64) -> Option<PageLevel> {
        match index {
            0 => Some(PageLevel::Size4K),
            1 => Some(PageLevel::Size2M),
            2 => Some(PageLevel::Size1G),
            _ => None,
        }
    }

    /// Size in bytes.
    pub const fn size(self) -> u64 {
        match self {
            PageLevel::Size4K => 1 << 12,
            PageLevel::Size2M => 1 << 21,
            PageLevel::Size1G => 1 << 30,
        }
    }

    /// `size() - 1`: the offset bits within a page of this level.
    pub const fn mask(self) -> u64 {
        self.size() - 1
    }

    /// Number of 4K pages in a page of this level.
    pub const fn pages_4k(self) -> u64 {
        self.size() >> 12
    }

    /// The next smaller level, `None` at 4K.
    pub const fn smaller(self) -> Option<PageLevel> {
        match self {
            PageLevel::Size4K => None,
            PageLevel::Size2M => Some(PageLevel::Size4K),
            PageLevel::Size1G => Some(PageLevel::Size2M),
        }
    }

    /// The next larger level, `None` at 1G.
    pub const fn larger(self) -> Option<PageLevel> {
        match self {
            PageLevel::Size4K => Some(PageLevel::Size2M),
            PageLevel::Size2M => Some(PageLevel::Size1G),
            PageLevel::Size1G => None,
        }
    }

    /// True when `value` is a multiple of this level's size.
    pub const fn is_aligned(self, value: u64) -> bool {
        value & self.mask() == 0
    }
}

impl fmt::Display for PageLevel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PageLevel::Size4K => "4K",
            PageLevel::Size2M => "2M",
            PageLevel::Size1G => "1G",
        })
    }
}

/// Guest physical address width of a TD, reported by TDG.VP.INFO. It fixes the shared bit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Gpaw {
    /// 48-bit GPAs, shared bit 47 (4-level Secure-EPT).
    Bits48,
    /// 52-bit GPAs, shared bit 51 (5-level Secure-EPT).
    Bits52,
}

impl Gpaw {
    /// Decodes TDG.VP.INFO's `RCX[5:0]`.
    pub const fn from_width(width: u64) -> Option<Gpaw> {
        match width {
            48 => Some(Gpaw::Bits48),
            52 => Some(Gpaw::Bits52),
            _ => None,
        }
    }

    /// Width in bits.
    pub const fn width(self) -> u32 {
        match self {
            Gpaw::Bits48 => 48,
            Gpaw::Bits52 => 52,
        }
    }

    /// The shared-bit mask: bit GPAW-1.
    pub const fn shared_bit(self) -> u64 {
        1 << (self.width() - 1)
    }

    /// One past the largest private GPA: the shared bit itself.
    pub const fn private_limit(self) -> u64 {
        self.shared_bit()
    }

    /// Number of Secure-EPT levels (4 or 5).
    pub const fn sept_levels(self) -> u8 {
        match self {
            Gpaw::Bits48 => 4,
            Gpaw::Bits52 => 5,
        }
    }
}

/// Errors of the address and range helpers. Also what the engine reports for a bad range
/// before it makes any call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddrError {
    /// Bits at or above 52 are set.
    NotCanonical(u64),
    /// The address is not aligned to the level or to 4K.
    Misaligned(u64),
    /// `start + len` (or an alignment step) overflows.
    Overflow,
    /// The range is empty or `end < start`.
    EmptyRange,
    /// The range reaches or crosses the shared bit (or starts with it set when private was meant).
    CrossesSharedBit,
}

impl fmt::Display for AddrError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AddrError::NotCanonical(a) => write!(f, "GPA {a:#x} has bits above 51 set"),
            AddrError::Misaligned(a) => write!(f, "GPA {a:#x} is misaligned"),
            AddrError::Overflow => f.write_str("address arithmetic overflows"),
            AddrError::EmptyRange => f.write_str("empty or inverted range"),
            AddrError::CrossesSharedBit => f.write_str("range crosses the shared bit"),
        }
    }
}

/// A guest physical address below 2^52.
///
/// The shared bit is part of the address; it is applied or stripped only through the named
/// helpers [`Gpa::to_shared`], [`Gpa::to_private`] and tested with [`Gpa::is_shared`].
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Gpa(u64);

impl Gpa {
    /// Largest number of address bits any TD has.
    pub const MAX_BITS: u32 = 52;

    /// Checked constructor: bits 63:52 must be clear.
    ///
    /// # Errors
    /// [`AddrError::NotCanonical`] when a bit at or above 52 is set.
    pub const fn try_new(addr: u64) -> Result<Gpa, AddrError> {
        if addr >> Self::MAX_BITS != 0 {
            Err(AddrError::NotCanonical(addr))
        } else {
            Ok(Gpa(addr))
        }
    }

    /// Constructor for addresses known to be valid (constants, tests); truncates bits 63:52.
    pub const fn new_truncate(addr: u64) -> Gpa {
        Gpa(addr & ((1 << Self::MAX_BITS) - 1))
    }

    /// Checked constructor that also requires alignment to `level`.
    ///
    /// # Errors
    /// [`AddrError::NotCanonical`] or [`AddrError::Misaligned`].
    pub const fn try_new_aligned(addr: u64, level: PageLevel) -> Result<Gpa, AddrError> {
        match Gpa::try_new(addr) {
            Ok(g) if level.is_aligned(addr) => Ok(g),
            Ok(_) => Err(AddrError::Misaligned(addr)),
            Err(e) => Err(e),
        }
    }

    /// The raw value.
    pub const fn as_u64(self) -> u64 {
        self.0
    }

    /// True when the shared bit of `gpaw` is set.
    pub const fn is_shared(self, gpaw: Gpaw) -> bool {
        self.0 & gpaw.shared_bit() != 0
    }

    /// The shared alias: the shared bit set.
    pub const fn to_shared(self, gpaw: Gpaw) -> Gpa {
        Gpa(self.0 | gpaw.shared_bit())
    }

    /// The private alias: the shared bit cleared.
    pub const fn to_private(self, gpaw: Gpaw) -> Gpa {
        Gpa(self.0 & !gpaw.shared_bit())
    }

    /// True when the address lies beyond what the TD's GPA width can express.
    pub const fn exceeds(self, gpaw: Gpaw) -> bool {
        self.0 >> gpaw.width() != 0
    }

    /// True when aligned to `level`.
    pub const fn is_aligned(self, level: PageLevel) -> bool {
        level.is_aligned(self.0)
    }

    /// Rounds down to `level`.
    pub const fn align_down(self, level: PageLevel) -> Gpa {
        Gpa(self.0 & !level.mask())
    }

    /// Rounds up to `level`.
    ///
    /// # Errors
    /// [`AddrError::Overflow`] when the result would not fit in 52 bits.
    pub const fn align_up(self, level: PageLevel) -> Result<Gpa, AddrError> {
        match self.0.checked_add(level.mask()) {
            Some(v) => match Gpa::try_new(v & !level.mask()) {
                Ok(g) => Ok(g),
                Err(_) => Err(AddrError::Overflow),
            },
            None => Err(AddrError::Overflow),
        }
    }

    /// `self + bytes`, checked.
    ///
    /// # Errors
    /// [`AddrError::Overflow`] when the sum does not fit in 52 bits.
    pub const fn checked_add(self, bytes: u64) -> Result<Gpa, AddrError> {
        match self.0.checked_add(bytes) {
            Some(v) if v >> Self::MAX_BITS == 0 => Ok(Gpa(v)),
            _ => Err(AddrError::Overflow),
        }
    }

    /// The 4K page frame number.
    pub const fn pfn(self) -> u64 {
        self.0 >> 12
    }
}

impl From<Gpa> for u64 {
    fn from(g: Gpa) -> u64 {
        g.0
    }
}

impl fmt::Debug for Gpa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Gpa({:#x})", self.0)
    }
}

impl fmt::Display for Gpa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}", self.0)
    }
}

/// A half-open GPA range `[start, end)`, non-empty, 4K aligned, below 2^52.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct GpaRange {
    start: Gpa,
    end: Gpa,
}

impl GpaRange {
    /// Checked constructor from `[start, end)`.
    ///
    /// # Errors
    /// [`AddrError::EmptyRange`] if `end <= start`, [`AddrError::Misaligned`] if either bound
    /// is not 4K aligned, [`AddrError::NotCanonical`] if either is at or above 2^52.
    pub const fn new(start: u64, end: u64) -> Result<GpaRange, AddrError> {
        if end <= start {
            return Err(AddrError::EmptyRange);
        }
        let s = match Gpa::try_new_aligned(start, PageLevel::Size4K) {
            Ok(s) => s,
            Err(e) => return Err(e),
        };
        // `end` may be exactly 2^52 (one past the last GPA).
        if end > (1 << Gpa::MAX_BITS) {
            return Err(AddrError::NotCanonical(end));
        }
        if !PageLevel::Size4K.is_aligned(end) {
            return Err(AddrError::Misaligned(end));
        }
        Ok(GpaRange {
            start: s,
            end: Gpa(end),
        })
    }

    /// Checked constructor from a start and a length.
    ///
    /// # Errors
    /// As [`GpaRange::new`], plus [`AddrError::Overflow`] if `start + len` overflows.
    pub const fn from_len(start: u64, len: u64) -> Result<GpaRange, AddrError> {
        match start.checked_add(len) {
            Some(end) => GpaRange::new(start, end),
            None => Err(AddrError::Overflow),
        }
    }

    /// First byte.
    pub const fn start(self) -> Gpa {
        self.start
    }

    /// One past the last byte.
    pub const fn end(self) -> Gpa {
        self.end
    }

    /// Length in bytes (never 0).
    pub const fn len(self) -> u64 {
        self.end.0 - self.start.0
    }

    /// Always false: a `GpaRange` is never empty. Present for API symmetry.
    pub const fn is_empty(self) -> bool {
        false
    }

    /// True when `gpa` lies in `[start, end)`.
    pub const fn contains(self, gpa: Gpa) -> bool {
        gpa.0 >= self.start.0 && gpa.0 < self.end.0
    }

    /// The sub-range `[start, at)`, `None` when empty.
    pub const fn head(self, at: Gpa) -> Option<GpaRange> {
        if at.0 <= self.start.0 {
            None
        } else if at.0 >= self.end.0 {
            Some(self)
        } else {
            Some(GpaRange {
                start: self.start,
                end: at,
            })
        }
    }

    /// The sub-range `[at, end)`, `None` when empty.
    pub const fn tail(self, at: Gpa) -> Option<GpaRange> {
        if at.0 >= self.end.0 {
            None
        } else if at.0 <= self.start.0 {
            Some(self)
        } else {
            Some(GpaRange {
                start: at,
                end: self.end,
            })
        }
    }

    /// True when the whole range is below the shared bit of `gpaw`.
    pub const fn is_private_space(self, gpaw: Gpaw) -> bool {
        self.end.0 <= gpaw.private_limit()
    }
}

impl fmt::Debug for GpaRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[{:#x}, {:#x})", self.start.0, self.end.0)
    }
}

impl fmt::Display for GpaRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// Encodes the "page info" operand of memory calls (RCX): level in bits 2:0, `GPA[51:12]`.
pub const fn page_info(gpa: Gpa, level: PageLevel) -> u64 {
    (gpa.0 & !0xFFF) | level as u64
}

/// Decodes a page-info operand as the module does (`helpers.c` verify_page_info_input):
/// reserved bits 11:3 and 63:52 must be clear, the level must be at most `max_level`, and the
/// GPA must be aligned to the level.
///
/// # Errors
/// `TDX_OPERAND_INVALID | RCX` for any violation.
pub const fn decode_page_info(
    raw: u64,
    max_level: PageLevel,
) -> Result<(Gpa, PageLevel), TdxStatus> {
    let invalid = StatusCode::OperandInvalid.with_operand(operand::RCX);
    if raw & 0xFF8 != 0 || raw >> Gpa::MAX_BITS != 0 {
        return Err(invalid);
    }
    let level = match PageLevel::from_index(raw & 0x7) {
        Some(l) if l as u8 <= max_level as u8 => l,
        _ => return Err(invalid),
    };
    let gpa = raw & !0xFFF;
    if !level.is_aligned(gpa) {
        return Err(invalid);
    }
    Ok((Gpa(gpa), level))
}

/// EPT-violation exit reason number (VE_INFO exit_reason for a pending page).
pub const EXIT_REASON_EPT_VIOLATION: u32 = 48;

/// #VE vector.
pub const VE_VECTOR: u8 = 20;

/// The outputs of TDG.VP.VEINFO.GET (spec section 6).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct VeInfo {
    /// `RCX[31:0]`: exit reason (48 = EPT violation).
    pub exit_reason: u32,
    /// RDX: exit qualification.
    pub exit_qualification: u64,
    /// R8: guest linear address.
    pub gla: u64,
    /// R9: guest physical address, shared bit included.
    pub gpa: u64,
    /// `R10[31:0]`: instruction length.
    pub instruction_length: u32,
    /// `R10[63:32]`: instruction information.
    pub instruction_info: u32,
}

impl VeInfo {
    /// True for an EPT-violation #VE.
    pub const fn is_ept_violation(&self) -> bool {
        self.exit_reason == EXIT_REASON_EPT_VIOLATION
    }
}

/// A TDCALL's output registers as the guest sees them: what the module writes back, for the
/// calls that return data (the emulator's raw-register forms, the e2e image's trap path).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TdcallRegs {
    /// RAX: the completion status.
    pub rax: u64,
    /// RCX.
    pub rcx: u64,
    /// RDX.
    pub rdx: u64,
    /// R8.
    pub r8: u64,
    /// R9.
    pub r9: u64,
    /// R10.
    pub r10: u64,
    /// R11.
    pub r11: u64,
}

/// The outputs of TDG.VP.INFO that the engine uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VpInfo {
    /// GPA width, which fixes the shared bit.
    pub gpaw: Gpaw,
    /// `RCX[63:6]` raw TD attributes word as returned in RDX (for diagnostics).
    pub attributes: u64,
    /// `R8[31:0]`: number of vCPUs.
    pub num_vcpus: u32,
    /// `R8[63:32]`: maximum number of vCPUs.
    pub max_vcpus: u32,
    /// `R9[31:0]`: this vCPU's index.
    pub vcpu_index: u32,
}

/// A GHCI TDG.VP.VMCALL completion status (R10 on return).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GhciStatus {
    /// TDG.VP.VMCALL_SUCCESS.
    Success,
    /// TDG.VP.VMCALL_RETRY: resume from the GPA in R11.
    Retry,
    /// TDG.VP.VMCALL_INVALID_OPERAND.
    InvalidOperand,
    /// TDG.VP.VMCALL_GPA_INUSE.
    GpaInUse,
    /// TDG.VP.VMCALL_ALIGN_ERROR.
    AlignError,
    /// TDG.VP.VMCALL_SUBFUNC_UNSUPPORTED.
    SubfuncUnsupported,
    /// A value the GHCI does not define; kept raw.
    Unknown(u64),
}

impl GhciStatus {
    /// Decodes R10.
    pub const fn from_raw(raw: u64) -> GhciStatus {
        match raw {
            0 => GhciStatus::Success,
            1 => GhciStatus::Retry,
            0x8000_0000_0000_0000 => GhciStatus::InvalidOperand,
            0x8000_0000_0000_0001 => GhciStatus::GpaInUse,
            0x8000_0000_0000_0002 => GhciStatus::AlignError,
            0x8000_0000_0000_0003 => GhciStatus::SubfuncUnsupported,
            other => GhciStatus::Unknown(other),
        }
    }

    /// The raw R10 value.
    pub const fn raw(self) -> u64 {
        match self {
            GhciStatus::Success => 0,
            GhciStatus::Retry => 1,
            GhciStatus::InvalidOperand => 0x8000_0000_0000_0000,
            GhciStatus::GpaInUse => 0x8000_0000_0000_0001,
            GhciStatus::AlignError => 0x8000_0000_0000_0002,
            GhciStatus::SubfuncUnsupported => 0x8000_0000_0000_0003,
            GhciStatus::Unknown(raw) => raw,
        }
    }
}

/// What `TDG.VP.VMCALL<MapGPA>` returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MapGpaOutcome {
    /// RAX of the TDCALL itself (not SUCCESS only if the TDCALL failed, e.g. a bad mask).
    pub tdcall: TdxStatus,
    /// R10: the GHCI status.
    pub status: GhciStatus,
    /// R11: on RETRY, the GPA to resume from, as the host wrote it (shared bit included).
    pub resume_gpa: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_named_code_round_trips() {
        for (code, bits) in CODES {
            assert_eq!(code.class_bits(), *bits, "{code:?}");
            assert_eq!(StatusCode::from_class_bits(*bits), *code);
            let s = code.with_operand(7);
            assert_eq!(s.code(), *code);
            assert_eq!(s.operand(), 7);
        }
    }

    #[test]
    fn spec_status_values() {
        assert_eq!(
            StatusCode::OperandInvalid.with_operand(operand::RCX).raw(),
            0xC000_0100_0000_0001
        );
        assert_eq!(
            StatusCode::OperandBusy
                .with_operand(operand::SEPT_TREE)
                .raw(),
            0x8000_0200_0000_0092
        );
        assert_eq!(
            StatusCode::PageSizeMismatch.with_operand(1).raw(),
            0xC000_0B0B_0000_0001
        );
        assert_eq!(
            StatusCode::PageAlreadyAccepted.status().raw(),
            0x0000_0B0A_0000_0000
        );
        assert_eq!(
            StatusCode::GpaRangeAlreadyBlocked.status().raw(),
            0x0000_0B07_0000_0000
        );
        assert!(!StatusCode::PageAlreadyAccepted.status().is_error());
        assert!(StatusCode::PageSizeMismatch.status().is_error());
    }

    #[test]
    fn unknown_codes_keep_their_raw_value() {
        let raw = 0xC000_0DEA_0000_0042;
        let s = TdxStatus::from_raw(raw);
        assert_eq!(s.code(), StatusCode::Unknown(0xC000_0DEA));
        assert_eq!(s.operand(), 0x42);
        assert_eq!(s.raw(), raw);
    }

    #[test]
    fn shared_bit_by_gpaw() {
        assert_eq!(Gpaw::Bits48.shared_bit(), 1 << 47);
        assert_eq!(Gpaw::Bits52.shared_bit(), 1 << 51);
        let g = Gpa::try_new(0x1000).unwrap();
        assert!(g.to_shared(Gpaw::Bits48).is_shared(Gpaw::Bits48));
        assert!(!g.to_shared(Gpaw::Bits48).is_shared(Gpaw::Bits52));
        assert_eq!(g.to_shared(Gpaw::Bits52).to_private(Gpaw::Bits52), g);
        assert_eq!(Gpa::try_new(1 << 52), Err(AddrError::NotCanonical(1 << 52)));
    }

    #[test]
    fn page_info_is_validated_like_the_module() {
        let g = Gpa::try_new(0x20_0000).unwrap();
        assert_eq!(
            decode_page_info(page_info(g, PageLevel::Size2M), PageLevel::Size2M),
            Ok((g, PageLevel::Size2M))
        );
        let invalid = Err(StatusCode::OperandInvalid.with_operand(operand::RCX));
        // Level above the call's maximum.
        assert_eq!(
            decode_page_info(page_info(g, PageLevel::Size1G), PageLevel::Size2M),
            invalid
        );
        // Misaligned for the level.
        assert_eq!(decode_page_info(0x1000 | 1, PageLevel::Size2M), invalid);
        // Reserved bits 11:3.
        assert_eq!(
            decode_page_info(0x20_0000 | 0x8, PageLevel::Size2M),
            invalid
        );
        // Bits 63:52.
        assert_eq!(decode_page_info(1 << 60, PageLevel::Size2M), invalid);
        // Level 3.
        assert_eq!(decode_page_info(3, PageLevel::Size1G), invalid);
    }

    #[test]
    fn range_checks() {
        assert_eq!(GpaRange::new(0x2000, 0x1000), Err(AddrError::EmptyRange));
        assert_eq!(GpaRange::new(0x1000, 0x1000), Err(AddrError::EmptyRange));
        assert_eq!(
            GpaRange::new(0x1001, 0x2000),
            Err(AddrError::Misaligned(0x1001))
        );
        assert_eq!(
            GpaRange::from_len(u64::MAX - 0xFFF, 0x2000),
            Err(AddrError::Overflow)
        );
        let r = GpaRange::new(0x1000, 0x5000).unwrap();
        assert_eq!(r.len(), 0x4000);
        assert!(r.contains(Gpa::new_truncate(0x4FFF)));
        assert!(!r.contains(Gpa::new_truncate(0x5000)));
        assert_eq!(
            r.head(Gpa::new_truncate(0x3000)),
            Some(GpaRange::new(0x1000, 0x3000).unwrap())
        );
        assert_eq!(
            r.tail(Gpa::new_truncate(0x3000)),
            Some(GpaRange::new(0x3000, 0x5000).unwrap())
        );
        assert_eq!(r.head(Gpa::new_truncate(0x1000)), None);
    }

    #[test]
    fn ghci_status_round_trip() {
        for raw in [
            0,
            1,
            0x8000_0000_0000_0000,
            0x8000_0000_0000_0001,
            0x8000_0000_0000_0002,
            0x8000_0000_0000_0003,
            5,
        ] {
            assert_eq!(GhciStatus::from_raw(raw).raw(), raw);
        }
    }
}
