//! A scripted TDX-module fake for tests and examples (feature `testing`, needs an allocator).
//!
//! [`FakeModule`] implements [`Tdcall`] the way a cooperative host and the module answer a
//! single vCPU: every private page of the configured RAM can be accepted once, at any level up
//! to the module's largest; accepting it again answers `TDX_PAGE_ALREADY_ACCEPTED`; a 2M or 1G
//! request over memory the host mapped at a smaller size answers `TDX_PAGE_SIZE_MISMATCH`;
//! MapGPA converts whole ranges at once. Rules ([`FakeModule::on_accept`],
//! [`FakeModule::on_map_gpa`]) override any answer, so a test can play a hostile or busy host,
//! and every call is recorded ([`FakeModule::calls`]).
//!
//! It is a fake, not an emulator: it has no Secure-EPT, no locks, no epochs and one vCPU. The
//! host half of this project (`hostvmm::module`) emulates the module itself.
//!
//! # Examples
//!
//! ```
//! use tdmem_accept::testing::{Call, FakeModule};
//! use tdmem_accept::{Gpa, PageLevel, StatusCode, Tdcall};
//!
//! let mut module = FakeModule::new();
//! let gpa = Gpa::try_new(0x20_0000)?;
//! assert!(module.accept(gpa, PageLevel::Size2M).is_success());
//! assert!(module.accept(gpa, PageLevel::Size2M).is(StatusCode::PageAlreadyAccepted));
//! assert!(module.is_accepted(Gpa::try_new(0x3f_f000)?));
//! assert_eq!(module.calls().len(), 2);
//! assert!(matches!(module.calls()[0], Call::Accept { level: PageLevel::Size2M, .. }));
//! # Ok::<(), tdmem_accept::abi::AddrError>(())
//! ```

use alloc::boxed::Box;
use alloc::collections::{BTreeMap, BTreeSet, VecDeque};
use alloc::vec::Vec;
use core::fmt;

use crate::abi::{
    operand, GhciStatus, Gpa, Gpaw, MapGpaOutcome, PageLevel, StatusCode, TdxStatus, VeInfo, VpInfo,
};
use crate::tdcall::Tdcall;

/// One call the fake answered, with its answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Call {
    /// TDG.MEM.PAGE.ACCEPT.
    Accept {
        /// The page.
        gpa: Gpa,
        /// Its level.
        level: PageLevel,
        /// The answer.
        status: TdxStatus,
    },
    /// `TDG.VP.VMCALL<MapGPA>`.
    MapGpa {
        /// R12 as the guest passed it (shared bit included).
        start: u64,
        /// R13.
        len: u64,
        /// The answer.
        outcome: MapGpaOutcome,
    },
    /// TDG.VP.VEINFO.GET.
    VeInfo,
    /// TDG.VP.INFO.
    VpInfo,
}

type AcceptRule = Box<dyn FnMut(Gpa, PageLevel) -> Option<TdxStatus> + Send>;
type MapGpaRule = Box<dyn FnMut(u64, u64) -> Option<MapGpaOutcome> + Send>;

/// A single-vCPU TDX module and cooperative host, scripted. See the [module docs](self).
pub struct FakeModule {
    gpaw: Gpaw,
    max_accept_level: PageLevel,
    ram_end: u64,
    vp_info: VpInfo,
    /// Accepted leaves: start GPA -> level.
    accepted: BTreeMap<u64, PageLevel>,
    /// 2M ranges the host mapped at 4K (a 2M or 1G ACCEPT over them mismatches).
    mapped_4k: BTreeSet<u64>,
    /// 4K pages currently shared.
    shared: BTreeSet<u64>,
    ve: VecDeque<VeInfo>,
    accept_rule: Option<AcceptRule>,
    map_gpa_rule: Option<MapGpaRule>,
    calls: Vec<Call>,
}

impl fmt::Debug for FakeModule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FakeModule")
            .field("gpaw", &self.gpaw)
            .field("max_accept_level", &self.max_accept_level)
            .field("ram_end", &self.ram_end)
            .field("accepted_leaves", &self.accepted.len())
            .field("shared_pages", &self.shared.len())
            .field("calls", &self.calls.len())
            .finish_non_exhaustive()
    }
}

impl Default for FakeModule {
    fn default() -> FakeModule {
        FakeModule::new()
    }
}

impl FakeModule {
    /// A module with a 48-bit GPA width, 2M the largest ACCEPT level (as every public module
    /// 1.5 release), and all of the private GPA space as RAM.
    pub fn new() -> FakeModule {
        let gpaw = Gpaw::Bits48;
        FakeModule {
            gpaw,
            max_accept_level: PageLevel::Size2M,
            ram_end: gpaw.private_limit(),
            vp_info: VpInfo {
                gpaw,
                attributes: 0,
                num_vcpus: 1,
                max_vcpus: 1,
                vcpu_index: 0,
            },
            accepted: BTreeMap::new(),
            mapped_4k: BTreeSet::new(),
            shared: BTreeSet::new(),
            ve: VecDeque::new(),
            accept_rule: None,
            map_gpa_rule: None,
            calls: Vec::new(),
        }
    }

    /// Sets the GPA width (TDG.VP.INFO reports it; the shared bit follows it).
    #[must_use]
    pub fn with_gpaw(mut self, gpaw: Gpaw) -> FakeModule {
        self.gpaw = gpaw;
        self.vp_info.gpaw = gpaw;
        self.ram_end = self.ram_end.min(gpaw.private_limit());
        self
    }

    /// Sets the largest level ACCEPT takes; larger requests answer `TDX_OPERAND_INVALID`
    /// (RCX), as a module without 1G support does.
    #[must_use]
    pub fn with_max_accept_level(mut self, level: PageLevel) -> FakeModule {
        self.max_accept_level = level;
        self
    }

    /// Limits RAM to `[0, end)`: ACCEPT above it answers `TDX_OPERAND_ADDR_RANGE_ERROR`.
    #[must_use]
    pub fn with_ram_end(mut self, end: u64) -> FakeModule {
        self.ram_end = end.min(self.gpaw.private_limit());
        self
    }

    /// Marks the 2M range containing `gpa` as mapped at 4K by the host: a 2M or 1G ACCEPT
    /// over it answers `TDX_PAGE_SIZE_MISMATCH`.
    #[must_use]
    pub fn with_host_4k(mut self, gpa: u64) -> FakeModule {
        self.mapped_4k.insert(gpa & !PageLevel::Size2M.mask());
        self
    }

    /// Installs a rule consulted before every ACCEPT; `Some(status)` is the answer (and the
    /// fake's state does not change unless the status is a success), `None` lets the fake
    /// answer.
    #[must_use]
    pub fn on_accept(
        mut self,
        rule: impl FnMut(Gpa, PageLevel) -> Option<TdxStatus> + Send + 'static,
    ) -> FakeModule {
        self.accept_rule = Some(Box::new(rule));
        self
    }

    /// Installs a rule consulted before every MapGPA with `(R12, R13)`; `Some(outcome)` is the
    /// answer and nothing converts, `None` lets the fake convert the whole range.
    #[must_use]
    pub fn on_map_gpa(
        mut self,
        rule: impl FnMut(u64, u64) -> Option<MapGpaOutcome> + Send + 'static,
    ) -> FakeModule {
        self.map_gpa_rule = Some(Box::new(rule));
        self
    }

    /// Queues a #VE: the next TDG.VP.VEINFO.GET returns it.
    pub fn inject_ve(&mut self, info: VeInfo) {
        self.ve.push_back(info);
    }

    /// Every call so far, in order.
    pub fn calls(&self) -> &[Call] {
        &self.calls
    }

    /// The ACCEPT calls so far, as `(gpa, level)`.
    pub fn accept_calls(&self) -> impl Iterator<Item = (Gpa, PageLevel)> + '_ {
        self.calls.iter().filter_map(|c| match *c {
            Call::Accept { gpa, level, .. } => Some((gpa, level)),
            _ => None,
        })
    }

    /// Whether the private page containing `gpa` is accepted.
    pub fn is_accepted(&self, gpa: Gpa) -> bool {
        self.leaf_containing(gpa.to_private(self.gpaw).as_u64())
            .is_some()
    }

    /// Whether the 4K page containing `gpa` is shared.
    pub fn is_shared(&self, gpa: Gpa) -> bool {
        let page = gpa.to_private(self.gpaw).as_u64() & !PageLevel::Size4K.mask();
        self.shared.contains(&page)
    }

    /// Bytes of accepted private memory.
    pub fn accepted_bytes(&self) -> u64 {
        self.accepted.values().map(|l| l.size()).sum()
    }

    fn leaf_containing(&self, gpa: u64) -> Option<(u64, PageLevel)> {
        let (&start, &level) = self.accepted.range(..=gpa).next_back()?;
        (gpa < start + level.size()).then_some((start, level))
    }

    fn overlaps_accepted(&self, start: u64, end: u64) -> Option<(u64, PageLevel)> {
        if let Some(leaf) = self.leaf_containing(start) {
            return Some(leaf);
        }
        self.accepted
            .range(start..end)
            .next()
            .map(|(&s, &l)| (s, l))
    }

    fn answer_accept(&mut self, gpa: Gpa, level: PageLevel) -> TdxStatus {
        let raw = gpa.as_u64();
        if gpa.is_shared(self.gpaw) || gpa.exceeds(self.gpaw) || !gpa.is_aligned(level) {
            return StatusCode::OperandInvalid.with_operand(operand::RCX);
        }
        if level > self.max_accept_level {
            return StatusCode::OperandInvalid.with_operand(operand::RCX);
        }
        let end = raw.saturating_add(level.size());
        if end > self.ram_end {
            return StatusCode::OperandAddrRangeError.with_operand(operand::RCX);
        }
        if let Some(rule) = self.accept_rule.as_mut() {
            if let Some(status) = rule(gpa, level) {
                if status.is_success() {
                    self.accepted.insert(raw, level);
                }
                return status;
            }
        }
        if let Some((_, found)) = self.overlaps_accepted(raw, end) {
            if found >= level {
                return StatusCode::PageAlreadyAccepted.with_operand(u32::from(found.index()));
            }
            return StatusCode::PageSizeMismatch.with_operand(u32::from(level.index()));
        }
        if level > PageLevel::Size4K {
            let first = raw & !PageLevel::Size2M.mask();
            if self.mapped_4k.range(first..end).next().is_some() {
                return StatusCode::PageSizeMismatch.with_operand(u32::from(level.index()));
            }
        }
        if self.shared.range(raw..end).next().is_some() {
            // The host has no private page there: a cooperative host would map one only after
            // MapGPA(private). The module sees an unmapped (FREE) entry.
            return StatusCode::EptEntryFree.with_operand(operand::RCX);
        }
        self.accepted.insert(raw, level);
        TdxStatus::SUCCESS
    }

    /// Makes `[start, end)` shared: accepted leaves inside it go (a leaf straddling an edge is
    /// split to 4K, as a host DEMOTEs it), and the 4K pages are recorded shared.
    fn make_shared(&mut self, start: u64, end: u64) {
        let mut edges = Vec::new();
        for edge in [start, end] {
            if let Some((s, l)) = self.leaf_containing(edge) {
                if s < edge && edge < s + l.size() {
                    edges.push((s, l));
                }
            }
        }
        for (s, l) in edges {
            self.accepted.remove(&s);
            let mut p = s;
            while p < s + l.size() {
                self.accepted.insert(p, PageLevel::Size4K);
                p += PageLevel::Size4K.size();
            }
            self.mapped_4k.insert(s & !PageLevel::Size2M.mask());
        }
        let inside: Vec<u64> = self.accepted.range(start..end).map(|(&s, _)| s).collect();
        for s in inside {
            self.accepted.remove(&s);
        }
        let mut p = start;
        while p < end {
            self.shared.insert(p);
            p += PageLevel::Size4K.size();
        }
    }

    fn make_private(&mut self, start: u64, end: u64) {
        let pages: Vec<u64> = self.shared.range(start..end).copied().collect();
        for p in pages {
            self.shared.remove(&p);
        }
    }

    fn answer_map_gpa(&mut self, start: u64, len: u64) -> MapGpaOutcome {
        let done = |status| MapGpaOutcome {
            tdcall: TdxStatus::SUCCESS,
            status,
            resume_gpa: 0,
        };
        if let Some(rule) = self.map_gpa_rule.as_mut() {
            if let Some(outcome) = rule(start, len) {
                return outcome;
            }
        }
        let mask = PageLevel::Size4K.mask();
        if start & mask != 0 || len & mask != 0 {
            return done(GhciStatus::AlignError);
        }
        let shared_bit = self.gpaw.shared_bit();
        let private_start = start & !shared_bit;
        let Some(end) = private_start.checked_add(len) else {
            return done(GhciStatus::InvalidOperand);
        };
        if end > self.gpaw.private_limit() {
            return done(GhciStatus::InvalidOperand);
        }
        if start & shared_bit != 0 {
            self.make_shared(private_start, end);
        } else {
            self.make_private(private_start, end);
        }
        done(GhciStatus::Success)
    }
}

impl Tdcall for FakeModule {
    fn accept(&mut self, gpa: Gpa, level: PageLevel) -> TdxStatus {
        let status = self.answer_accept(gpa, level);
        self.calls.push(Call::Accept { gpa, level, status });
        status
    }

    fn map_gpa(&mut self, start: u64, len: u64) -> MapGpaOutcome {
        let outcome = self.answer_map_gpa(start, len);
        self.calls.push(Call::MapGpa {
            start,
            len,
            outcome,
        });
        outcome
    }

    fn ve_info(&mut self) -> Result<VeInfo, TdxStatus> {
        self.calls.push(Call::VeInfo);
        self.ve
            .pop_front()
            .ok_or(StatusCode::NoValidVeInfo.status())
    }

    fn vp_info(&mut self) -> Result<VpInfo, TdxStatus> {
        self.calls.push(Call::VpInfo);
        Ok(self.vp_info)
    }
}

/// A module whose every ACCEPT answer comes from a rule, recording the calls: for tests that
/// script the module call by call. Unlike [`FakeModule::on_accept`], the rule may borrow the
/// test's state. MapGPA answers `TDG.VP.VMCALL_SUBFUNC_UNSUPPORTED`, VEINFO.GET
/// `TDX_NO_VALID_VE_INFO` and TDG.VP.INFO a 48-bit GPA width.
///
/// # Examples
///
/// ```
/// use tdmem_accept::acceptor::{AcceptPolicy, Acceptor};
/// use tdmem_accept::testing::ScriptedAccept;
/// use tdmem_accept::abi::operand;
/// use tdmem_accept::{GpaRange, Gpaw, PageLevel, StatusCode, TdxStatus};
///
/// // BUSY twice, then success.
/// let mut busy = 2;
/// let mut module = ScriptedAccept::new(|_, _| {
///     if busy > 0 {
///         busy -= 1;
///         StatusCode::OperandBusy.with_operand(operand::RCX)
///     } else {
///         TdxStatus::SUCCESS
///     }
/// });
/// let acceptor = Acceptor::new(Gpaw::Bits48, AcceptPolicy::default());
/// acceptor.accept_range(&mut module, GpaRange::new(0, 0x1000)?)?;
/// assert_eq!(module.calls().len(), 3);
/// assert_eq!(module.calls()[2].1, PageLevel::Size4K);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct ScriptedAccept<F> {
    rule: F,
    calls: Vec<(Gpa, PageLevel)>,
}

impl<F> fmt::Debug for ScriptedAccept<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ScriptedAccept")
            .field("calls", &self.calls)
            .finish_non_exhaustive()
    }
}

impl<F: FnMut(Gpa, PageLevel) -> TdxStatus> ScriptedAccept<F> {
    /// A module answering ACCEPT with `rule`.
    pub fn new(rule: F) -> ScriptedAccept<F> {
        ScriptedAccept {
            rule,
            calls: Vec::new(),
        }
    }

    /// The ACCEPT calls so far, in order.
    pub fn calls(&self) -> &[(Gpa, PageLevel)] {
        &self.calls
    }
}

impl<F: FnMut(Gpa, PageLevel) -> TdxStatus> Tdcall for ScriptedAccept<F> {
    fn accept(&mut self, gpa: Gpa, level: PageLevel) -> TdxStatus {
        self.calls.push((gpa, level));
        (self.rule)(gpa, level)
    }

    fn map_gpa(&mut self, _start: u64, _len: u64) -> MapGpaOutcome {
        MapGpaOutcome {
            tdcall: TdxStatus::SUCCESS,
            status: GhciStatus::SubfuncUnsupported,
            resume_gpa: 0,
        }
    }

    fn ve_info(&mut self) -> Result<VeInfo, TdxStatus> {
        Err(StatusCode::NoValidVeInfo.status())
    }

    fn vp_info(&mut self) -> Result<VpInfo, TdxStatus> {
        Ok(VpInfo {
            gpaw: Gpaw::Bits48,
            attributes: 0,
            num_vcpus: 1,
            max_vcpus: 1,
            vcpu_index: 0,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const M2: u64 = 2 << 20;
    const K4: u64 = 4096;

    fn gpa(v: u64) -> Gpa {
        Gpa::new_truncate(v)
    }

    #[test]
    fn refuses_levels_above_the_cap_with_operand_rcx() {
        let mut m = FakeModule::new();
        let s = m.accept(gpa(0), PageLevel::Size1G);
        assert!(s.is(StatusCode::OperandInvalid));
        assert_eq!(s.operand(), operand::RCX);
        let mut m = FakeModule::new().with_max_accept_level(PageLevel::Size1G);
        assert!(m.accept(gpa(0), PageLevel::Size1G).is_success());
        assert_eq!(m.accepted_bytes(), 1 << 30);
    }

    #[test]
    fn smaller_accept_inside_an_accepted_page_is_already_accepted() {
        let mut m = FakeModule::new();
        assert!(m.accept(gpa(M2), PageLevel::Size2M).is_success());
        let s = m.accept(gpa(M2 + K4), PageLevel::Size4K);
        assert!(s.is(StatusCode::PageAlreadyAccepted));
        assert_eq!(s.operand(), 1);
    }

    #[test]
    fn larger_accept_over_accepted_4k_mismatches() {
        let mut m = FakeModule::new();
        assert!(m.accept(gpa(M2 + K4), PageLevel::Size4K).is_success());
        assert!(m
            .accept(gpa(M2), PageLevel::Size2M)
            .is(StatusCode::PageSizeMismatch));
        let mut m = FakeModule::new().with_host_4k(M2);
        assert!(m
            .accept(gpa(M2), PageLevel::Size2M)
            .is(StatusCode::PageSizeMismatch));
    }

    #[test]
    fn map_gpa_shared_drops_acceptance_and_splits_edges() {
        let gpaw = Gpaw::Bits48;
        let mut m = FakeModule::new();
        assert!(m.accept(gpa(0), PageLevel::Size2M).is_success());
        let out = m.map_gpa(K4 | gpaw.shared_bit(), K4);
        assert_eq!(out.status, GhciStatus::Success);
        assert!(m.is_shared(gpa(K4)));
        assert!(!m.is_accepted(gpa(K4)));
        assert!(m.is_accepted(gpa(0)));
        assert!(m.is_accepted(gpa(2 * K4)));
        assert_eq!(m.accepted_bytes(), M2 - K4);
        // Back to private: pending again, acceptable once.
        assert_eq!(m.map_gpa(K4, K4).status, GhciStatus::Success);
        assert!(!m.is_shared(gpa(K4)));
        assert!(m.accept(gpa(K4), PageLevel::Size4K).is_success());
    }

    #[test]
    fn rules_override_and_calls_are_recorded() {
        let mut n = 0;
        let mut m = FakeModule::new().on_accept(move |_, _| {
            n += 1;
            (n == 1).then(|| StatusCode::OperandBusy.with_operand(operand::RCX))
        });
        assert!(m
            .accept(gpa(0), PageLevel::Size4K)
            .is(StatusCode::OperandBusy));
        assert!(m.accept(gpa(0), PageLevel::Size4K).is_success());
        assert_eq!(m.accept_calls().count(), 2);
        assert!(m.ve_info().is_err());
        assert_eq!(m.calls().last(), Some(&Call::VeInfo));
    }

    #[test]
    fn misaligned_map_gpa_is_an_align_error() {
        let mut m = FakeModule::new();
        assert_eq!(m.map_gpa(0x800, K4).status, GhciStatus::AlignError);
    }
}
