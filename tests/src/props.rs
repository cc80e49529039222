//! Property checks driven by arbitrary bytes, shared by the cargo-fuzz targets (`fuzz/`) and
//! the proptest versions in `tests/tests/fuzz_props.rs` (so that stable CI runs them too).
//!
//! Each check takes the fuzzer's bytes, builds its input from them with [`Bytes`], and panics
//! when the property does not hold (which is what a fuzzer reports):
//!
//! - [`unaccepted_table`]: the Linux unaccepted-memory table parser never panics and every query
//!   on a parsed table stays within the bitmap it announced;
//! - [`accept_planner`]: the acceptor over an arbitrary range against a module answering from a
//!   script never panics, stays inside the range, never asks for a page it was already told is
//!   accepted, and terminates within its retry bounds;
//! - [`map_gpa_resume`]: the MapGPA loop against arbitrary RETRY/R11 answers terminates within its
//!   bounds, never resumes outside `[start, end)` or on the other alias, and reports a failure
//!   point consistent with what the host said;
//! - [`emulator_ops`]: arbitrary host and guest call sequences against the TDX-module emulator
//!   never panic and keep the S-EPT well formed after every call.

use std::collections::BTreeMap;

use accept::abi::{
    operand, GhciStatus, Gpa, GpaRange, Gpaw, MapGpaOutcome, PageLevel, StatusCode, TdxStatus,
    VeInfo, VpInfo,
};
use accept::acceptor::{AcceptPolicy, Acceptor};
use accept::convert::{ConvertPolicy, Converter, MapGpaErrorKind, Visibility};
use accept::unaccepted::UnacceptedTable;
use accept::Tdcall;
use hostvmm::module::{Access, ModuleConfig, TdxModule};

/// A reader of fuzzer bytes: each value takes the next bytes, zeros once they run out.
#[derive(Debug, Clone)]
pub struct Bytes<'a> {
    data: &'a [u8],
}

impl<'a> Bytes<'a> {
    /// Reads from `data`.
    pub fn new(data: &'a [u8]) -> Bytes<'a> {
        Bytes { data }
    }

    /// True when every byte was used.
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// The next byte (0 when exhausted).
    pub fn u8(&mut self) -> u8 {
        match self.data.split_first() {
            Some((&b, rest)) => {
                self.data = rest;
                b
            }
            None => 0,
        }
    }

    /// The next 2 bytes, little endian.
    pub fn u16(&mut self) -> u16 {
        u16::from(self.u8()) | (u16::from(self.u8()) << 8)
    }

    /// The next 8 bytes, little endian.
    pub fn u64(&mut self) -> u64 {
        (0..8).fold(0, |v, i| v | (u64::from(self.u8()) << (8 * i)))
    }
}

// ---- unaccepted table --------------------------------------------------------------------------

/// Parses `data` as an unaccepted-memory table and queries it everywhere the bytes say.
///
/// # Panics
/// When a query disagrees with the bitmap or a parse panics.
pub fn unaccepted_table(data: &[u8]) {
    let Ok(t) = UnacceptedTable::parse(data) else {
        return;
    };
    let units = t.units();
    assert_eq!(units, t.bitmap_len() as u64 * 8);
    assert!(t.table_len() <= data.len());
    assert!(t.unit_size() >= 4096 && t.unit_size().is_power_of_two());
    assert!(t.unaccepted_units() <= units);
    // Runs: in order, disjoint, inside [phys_base, end), their units all set.
    let mut last_end = t.phys_base();
    let mut covered = 0u64;
    for (i, r) in t.unaccepted_ranges().enumerate() {
        assert!(i as u64 <= units, "more runs than units");
        let (s, e) = (r.start().as_u64(), r.end().as_u64());
        assert!(
            s >= last_end && e <= t.end() && s < e,
            "run {r} out of place"
        );
        assert!(t.is_unaccepted(s) && t.is_unaccepted(e - 1));
        covered += (e - s) / t.unit_size();
        last_end = e;
    }
    assert_eq!(covered, t.unaccepted_units());
    // Queries at the edges and at addresses taken from the input.
    let tail = data.get(t.table_len()..).unwrap_or_default();
    let mut b = Bytes::new(tail);
    let probes = [
        0,
        t.phys_base().wrapping_sub(1),
        t.phys_base(),
        t.end().wrapping_sub(1),
        t.end(),
        u64::MAX,
        b.u64(),
        b.u64(),
    ];
    for &g in &probes {
        let unit = t.unit_of(g);
        assert_eq!(unit.is_some(), g >= t.phys_base() && g < t.end());
        if let Some(u) = unit {
            assert!(u < units);
            assert_eq!(t.is_unaccepted(g), t.is_unit_unaccepted(u));
        } else {
            assert!(!t.is_unaccepted(g));
        }
        for &h in &probes {
            let any = t.range_contains_unaccepted(g, h);
            if any {
                assert!(g < h && t.unaccepted_units() > 0);
            }
        }
    }
    assert!(!t.is_unit_unaccepted(units));
    assert!(!t.is_unit_unaccepted(u64::MAX));
}

// ---- accept planner ----------------------------------------------------------------------------

/// A module answering ACCEPT from a script, recording what it said was accepted.
struct ScriptedAccept<'a> {
    script: Bytes<'a>,
    range: GpaRange,
    /// Accepted runs: start -> end.
    accepted: BTreeMap<u64, u64>,
    calls: u64,
}

impl ScriptedAccept<'_> {
    fn overlaps(&self, s: u64, e: u64) -> bool {
        self.accepted
            .range(..e)
            .next_back()
            .is_some_and(|(_, &end)| end > s)
    }
}

impl Tdcall for ScriptedAccept<'_> {
    fn accept(&mut self, gpa: Gpa, level: PageLevel) -> TdxStatus {
        self.calls += 1;
        let (s, e) = (gpa.as_u64(), gpa.as_u64() + level.size());
        assert!(gpa.is_aligned(level), "misaligned ACCEPT {gpa} {level:?}");
        assert!(
            s >= self.range.start().as_u64() && e <= self.range.end().as_u64(),
            "ACCEPT {gpa} {level:?} outside {}",
            self.range
        );
        assert!(
            !self.overlaps(s, e),
            "ACCEPT {gpa} {level:?} covers a page already accepted"
        );
        let answer = match self.script.u8() % 10 {
            0..=3 => TdxStatus::SUCCESS,
            4 => StatusCode::PageSizeMismatch.with_operand(u32::from(level.index())),
            5 => StatusCode::OperandBusy.with_operand(operand::RCX),
            6 => StatusCode::PageAlreadyAccepted.with_operand(u32::from(level.index())),
            7 => StatusCode::OperandInvalid.with_operand(operand::RCX),
            8 => match TdxStatus::from_raw(self.script.u64()) {
                // Class SUCCESS with operand bits set is not a status any module returns, and
                // policies read it differently (ours by class, Linux's as "non-zero = failed"):
                // the page's fate would be undefined.
                s if s.is(StatusCode::Success) => TdxStatus::SUCCESS,
                s => s,
            },
            _ => TdxStatus::SUCCESS,
        };
        // The engine decodes by class (bits 63:32): SUCCESS with an operand is a success.
        if answer.is(StatusCode::Success) {
            self.accepted.insert(s, e);
        }
        answer
    }

    fn map_gpa(&mut self, _start: u64, _len: u64) -> MapGpaOutcome {
        unreachable!("the acceptor does not convert")
    }

    fn ve_info(&mut self) -> Result<VeInfo, TdxStatus> {
        Err(StatusCode::NoValidVeInfo.status())
    }

    fn vp_info(&mut self) -> Result<VpInfo, TdxStatus> {
        Err(StatusCode::OperandInvalid.status())
    }
}

/// Runs the acceptor over a range and a policy taken from `data`, against scripted answers.
///
/// # Panics
/// When the acceptor leaves the range, re-accepts a page or does not terminate in bounds.
pub fn accept_planner(data: &[u8]) {
    let mut b = Bytes::new(data);
    // Start: any 4K page below 16 GiB, 1G or 2M aligned half of the time; up to 1 GiB long.
    let mut start = (b.u64() & 0x3_FFFF_F000) % (16 << 30);
    match b.u8() % 4 {
        0 => start &= !((1 << 30) - 1),
        1 => start &= !((2 << 20) - 1),
        _ => {}
    }
    let len = match b.u8() % 4 {
        0 => (u64::from(b.u16()) + 1) * 4096,
        1 => (u64::from(b.u8() % 8) + 1) << 21,
        // 1 GiB: a 1G unit the host may split down to 4K (262 144 calls at worst).
        2 => 1 << 30,
        _ => (b.u64() % (64 << 20)) & !0xFFF,
    };
    let Ok(range) = GpaRange::from_len(start, len.max(4096)) else {
        return;
    };
    let mut policy = [
        AcceptPolicy::OURS,
        AcceptPolicy::LINUX,
        AcceptPolicy::TD_SHIM,
        AcceptPolicy::ASTERINAS,
        AcceptPolicy::OVMF,
    ][usize::from(b.u8() % 5)];
    policy.busy_retries = policy.busy_retries.min(8);
    let acceptor = Acceptor::new(Gpaw::Bits48, policy);
    let mut m = ScriptedAccept {
        script: b,
        range,
        accepted: BTreeMap::new(),
        calls: 0,
    };
    let r = acceptor.accept_range(&mut m, range);
    // Every call either accepts bytes, splits (at most 512 + 512*512 sub-calls per 1G), or is
    // one of the bounded BUSY retries.
    let pages = range.len() / 4096;
    let bound = (pages + 2) * 3 * (u64::from(policy.busy_retries) + 2);
    assert!(m.calls <= bound, "{} calls for {pages} pages", m.calls);
    match r {
        Ok(()) => {
            let covered: u64 = m.accepted.iter().map(|(s, e)| e - s).sum();
            // Pages answered ALREADY_ACCEPTED under a tolerant policy are not recorded.
            assert!(covered <= range.len());
            if !policy.tolerate_already_accepted {
                assert_eq!(covered, range.len(), "Ok without accepting the whole range");
            }
        }
        Err(e) => {
            if let Some(at) = e.gpa() {
                assert!(
                    range.contains(at) || at == range.end(),
                    "error at {at} outside"
                );
            }
        }
    }
}

// ---- MapGPA resume -----------------------------------------------------------------------------

/// A host answering MapGPA from a script.
struct ScriptedMapGpa<'a> {
    script: Bytes<'a>,
    bit: u64,
    start: u64,
    end: u64,
    /// (start sent, answer).
    calls: Vec<(u64, GhciStatus, u64)>,
}

impl Tdcall for ScriptedMapGpa<'_> {
    fn accept(&mut self, _gpa: Gpa, _level: PageLevel) -> TdxStatus {
        unreachable!("map_gpa does not accept")
    }

    fn map_gpa(&mut self, start: u64, len: u64) -> MapGpaOutcome {
        let shared = Gpaw::Bits48.shared_bit();
        let addr = start & !shared;
        assert_eq!(start & shared, self.bit, "request on the other alias");
        assert!(
            addr >= self.start && addr < self.end,
            "resumed at {addr:#x} outside [{:#x}, {:#x})",
            self.start,
            self.end
        );
        assert_eq!(addr + len, self.end, "length does not reach the end");
        if let Some(&(prev, _, _)) = self.calls.last() {
            assert!(addr >= prev, "went backwards");
        }
        let remaining_pages = (self.end - addr) / 4096;
        let (status, resume) = match self.script.u8() % 12 {
            0 | 1 => (GhciStatus::Success, 0),
            2..=4 => {
                // Progress.
                let step = 1 + u64::from(self.script.u16()) % remaining_pages.max(1);
                (GhciStatus::Retry, (addr + step * 4096) | self.bit)
            }
            5 => (GhciStatus::Retry, start),
            6 => (GhciStatus::Retry, addr.wrapping_sub(4096) | self.bit),
            7 => (GhciStatus::Retry, self.end | self.bit),
            8 => (GhciStatus::Retry, (addr + 4096) | (self.bit ^ shared)),
            9 => (GhciStatus::Retry, start + 1),
            10 => (GhciStatus::from_raw(self.script.u64()), self.script.u64()),
            _ => (GhciStatus::Retry, self.script.u64()),
        };
        self.calls.push((addr, status, resume));
        MapGpaOutcome {
            tdcall: TdxStatus::SUCCESS,
            status,
            resume_gpa: resume,
        }
    }

    fn ve_info(&mut self) -> Result<VeInfo, TdxStatus> {
        Err(StatusCode::NoValidVeInfo.status())
    }

    fn vp_info(&mut self) -> Result<VpInfo, TdxStatus> {
        Err(StatusCode::OperandInvalid.status())
    }
}

/// Runs the MapGPA loop over a range from `data` against scripted answers.
///
/// # Panics
/// When the loop leaves its bounds or reports something the host did not say.
pub fn map_gpa_resume(data: &[u8]) {
    let mut b = Bytes::new(data);
    let start = (b.u64() % (1 << 40)) & !0xFFF;
    let len = (u64::from(b.u16()) + 1) * 4096;
    let to = if b.u8() & 1 == 0 {
        Visibility::Shared
    } else {
        Visibility::Private
    };
    let retries = u32::from(b.u8() % 20);
    let conv = Converter::new(
        Gpaw::Bits48,
        ConvertPolicy {
            no_progress_retries: retries,
            ..ConvertPolicy::OURS
        },
    );
    let Ok(range) = GpaRange::from_len(start, len) else {
        return;
    };
    let mut host = ScriptedMapGpa {
        script: b,
        bit: to.gpa_bit(Gpaw::Bits48),
        start: range.start().as_u64(),
        end: range.end().as_u64(),
        calls: Vec::new(),
    };
    let r = conv.map_gpa(&mut host, range, to);
    let calls = host.calls.len() as u64;
    let pages = range.len() / 4096;
    assert!(
        calls <= (pages + 1) * (u64::from(retries) + 1) + 1,
        "{calls} calls for {pages} pages with {retries} retries"
    );
    let &(last_start, last_status, _) = host.calls.last().expect("at least one call");
    match r {
        Ok(()) => assert_eq!(last_status, GhciStatus::Success),
        Err(e) => {
            // `[start, at)` is what the host reported done through valid RETRY answers: the
            // loop's position at its last call.
            assert_eq!(e.at.as_u64(), last_start, "reported prefix {e}");
            match e.kind {
                MapGpaErrorKind::Host(s) => assert_eq!(s, last_status),
                MapGpaErrorKind::BadResume { .. } | MapGpaErrorKind::NoProgress { .. } => {
                    assert_eq!(last_status, GhciStatus::Retry)
                }
                MapGpaErrorKind::InvalidRange(_) | MapGpaErrorKind::Tdcall(_) => {
                    panic!("unexpected {e}")
                }
            }
        }
    }
}

// ---- emulator operations -----------------------------------------------------------------------

/// Runs host and guest calls from `data` against a fresh TDX-module emulator (2 vCPUs, a 4 MiB
/// window of GPAs so that calls meet), checking the S-EPT after each.
///
/// # Panics
/// When a call panics or `check_tree` fails.
pub fn emulator_ops(data: &[u8]) {
    let mut b = Bytes::new(data);
    let cfg = ModuleConfig {
        vcpus: 2,
        demote_interruptible: b.u8() & 1 == 0,
        pending_ve: b.u8() & 1 == 0,
        accept_slice_chunks: 1 + u16::from(b.u8() % 4) * 170,
        ..ModuleConfig::default()
    };
    let m = TdxModule::new(cfg).expect("config");
    let mut next_sept = 1u64 << 46;
    let mut ops = 0;
    while !b.is_empty() && ops < 4096 {
        ops += 1;
        let op = b.u8();
        let sel = b.u8();
        // Mostly in a 4 MiB window; sometimes raw operands.
        let gpa = if sel & 0x80 == 0 {
            u64::from(b.u16() % 1024) << 12
        } else {
            b.u64()
        };
        let level = PageLevel::from_index(u64::from(sel % 3)).unwrap_or(PageLevel::Size4K);
        let g = Gpa::new_truncate(gpa & !0xFFF & ((1 << 52) - 1));
        let aligned = g.align_down(level);
        let hpa = (1u64 << 40) + (aligned.as_u64() & ((1 << 30) - 1));
        let vcpu = usize::from(sel >> 6 & 1);
        match op % 18 {
            0 => {
                let _ = m.page_aug(aligned, level, hpa);
            }
            1 => {
                next_sept += 4096;
                let _ = m.sept_add(g, 1 + sel % 3, next_sept);
            }
            2 => {
                let _ = m.range_block(aligned, level);
            }
            3 => {
                let _ = m.mem_track();
            }
            4 => {
                let _ = m.range_unblock(aligned, level);
            }
            5 => {
                let _ = m.page_remove(aligned, level);
            }
            6 => {
                next_sept += 4096;
                let _ = m.page_demote(aligned, level, next_sept);
            }
            7 => {
                let _ = m.page_promote(aligned, level);
            }
            8 => {
                let _ = m.sept_remove(g, 1 + sel % 3);
            }
            9 => {
                let _ = m.finalize();
            }
            10 => {
                let _ = m.vcpu_enter(vcpu);
            }
            11 => {
                let _ = m.vcpu_exit(vcpu);
            }
            12 => {
                let _ = m.tdg_mem_page_accept(vcpu, b.u64());
            }
            13 => {
                let _ = m.tdg_mem_page_accept(vcpu, accept::abi::page_info(aligned, level));
            }
            14 => {
                let a = if sel & 1 == 0 {
                    Access::Read
                } else {
                    Access::Write(b.u64())
                };
                let _ = m.guest_access(vcpu, gpa, a);
            }
            15 => {
                let _ = m.tdg_vp_veinfo_get(vcpu);
            }
            16 => m.set_pending_interrupt(vcpu, sel & 1 == 0),
            _ => {
                let _ = m.page_add(aligned, hpa, 0);
            }
        }
        if let Err(e) = m.check_tree() {
            panic!("after op {ops} ({op}): {e}");
        }
    }
}
