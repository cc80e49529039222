//! A scripted TDX module for exact comparisons: every 4K page is pending or accepted, the host
//! maps each 2M region at 2M or 4K, the module may cap ACCEPT at 2M, and a script may override
//! any answer. Every call is logged in order.

use std::collections::{BTreeMap, BTreeSet};

use accept::abi::{
    operand, GhciStatus, Gpa, MapGpaOutcome, PageLevel, StatusCode, TdxStatus, VeInfo, VpInfo,
};
use accept::Tdcall;

use crate::{K4, M2};

/// One call the module saw, with its answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Call {
    /// TDG.MEM.PAGE.ACCEPT.
    Accept {
        /// GPA asked.
        gpa: u64,
        /// Level asked.
        level: PageLevel,
        /// Raw status answered.
        status: u64,
    },
    /// `TDG.VP.VMCALL<MapGPA>`.
    MapGpa {
        /// R12.
        start: u64,
        /// R13.
        len: u64,
        /// R10 answered.
        status: u64,
        /// R11 answered.
        resume: u64,
    },
}

/// Logs a MapGPA call answered with `status` and `resume` (R10, R11) and returns what the
/// guest engine sees: the VMCALL itself succeeded.
pub fn record_map_gpa(
    calls: &mut Vec<Call>,
    start: u64,
    len: u64,
    status: GhciStatus,
    resume: u64,
) -> MapGpaOutcome {
    calls.push(Call::MapGpa {
        start,
        len,
        status: status.raw(),
        resume,
    });
    MapGpaOutcome {
        tdcall: TdxStatus::SUCCESS,
        status,
        resume_gpa: resume,
    }
}

/// The ACCEPT calls of a log, as `(gpa, level, raw status)`.
pub fn accepts(calls: &[Call]) -> Vec<(u64, PageLevel, u64)> {
    calls
        .iter()
        .filter_map(|c| match *c {
            Call::Accept { gpa, level, status } => Some((gpa, level, status)),
            Call::MapGpa { .. } => None,
        })
        .collect()
}

/// The successful ACCEPTs of a log, as `(gpa, level)`.
pub fn successes(calls: &[Call]) -> Vec<(u64, PageLevel)> {
    accepts(calls)
        .into_iter()
        .filter(|&(_, _, s)| s == 0)
        .map(|(g, l, _)| (g, l))
        .collect()
}

/// An answer override: `Some(status)` replaces the modelled answer of an ACCEPT.
pub type AcceptScript = Box<dyn FnMut(u64, PageLevel) -> Option<TdxStatus> + Send>;
/// The host's answer to a MapGPA `(R12, R13)`: `(R10, R11)`.
pub type MapScript = Box<dyn FnMut(u64, u64) -> (GhciStatus, u64) + Send>;

/// The scripted module.
pub struct PageModel {
    /// Accepted pages as disjoint, non-touching `[start, end)` intervals by start.
    accepted: BTreeMap<u64, u64>,
    /// 2M regions (by index) the host maps at 4K.
    split: BTreeSet<u64>,
    /// Largest level ACCEPT supports.
    pub max_level: PageLevel,
    accept_script: Option<AcceptScript>,
    map_script: Option<MapScript>,
    /// Every call, in order.
    pub calls: Vec<Call>,
}

impl std::fmt::Debug for PageModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PageModel")
            .field("accepted_bytes", &self.accepted_bytes())
            .field("max_level", &self.max_level)
            .field("calls", &self.calls.len())
            .finish_non_exhaustive()
    }
}

impl PageModel {
    /// Everything pending, mapped 2M where aligned, ACCEPT up to `max_level`.
    pub fn new(max_level: PageLevel) -> PageModel {
        PageModel {
            accepted: BTreeMap::new(),
            split: BTreeSet::new(),
            max_level,
            accept_script: None,
            map_script: None,
            calls: Vec::new(),
        }
    }

    /// The host maps the 2M region holding `gpa` at 4K (a 2M or 1G ACCEPT over it answers
    /// PAGE_SIZE_MISMATCH).
    pub fn split_2m(&mut self, gpa: u64) {
        self.split.insert(gpa / M2);
    }

    /// Marks `[start, end)` accepted without a call (4K granular).
    pub fn preaccept(&mut self, start: u64, end: u64) {
        let (mut s, mut e) = (start & !(K4 - 1), end.next_multiple_of(K4));
        if s >= e {
            return;
        }
        // Absorb every interval that overlaps or touches [s, e).
        let touching: Vec<(u64, u64)> = self
            .accepted
            .range(..=e)
            .rev()
            .take_while(|&(_, &ie)| ie >= s)
            .map(|(&is, &ie)| (is, ie))
            .collect();
        for (is, ie) in touching {
            self.accepted.remove(&is);
            s = s.min(is);
            e = e.max(ie);
        }
        self.accepted.insert(s, e);
    }

    fn any_accepted(&self, start: u64, end: u64) -> bool {
        self.accepted
            .range(..end)
            .next_back()
            .is_some_and(|(_, &ie)| ie > start)
    }

    /// Overrides ACCEPT answers.
    pub fn script_accept(&mut self, s: AcceptScript) {
        self.accept_script = Some(s);
    }

    /// Answers MapGPA with `s`.
    pub fn script_map_gpa(&mut self, s: MapScript) {
        self.map_script = Some(s);
    }

    /// True when the 4K page at `gpa` is accepted.
    pub fn is_accepted(&self, gpa: u64) -> bool {
        let p = gpa & !(K4 - 1);
        self.any_accepted(p, p + K4)
    }

    /// Accepted bytes.
    pub fn accepted_bytes(&self) -> u64 {
        self.accepted.iter().map(|(s, e)| e - s).sum()
    }

    /// The accepted memory as disjoint `[start, end)` intervals.
    pub fn accepted_ranges(&self) -> Vec<(u64, u64)> {
        self.accepted.iter().map(|(&s, &e)| (s, e)).collect()
    }

    /// The ACCEPT calls logged, as `(gpa, level, raw status)`.
    pub fn accepts(&self) -> Vec<(u64, PageLevel, u64)> {
        accepts(&self.calls)
    }

    /// Successful ACCEPTs as `(gpa, level)`.
    pub fn successes(&self) -> Vec<(u64, PageLevel)> {
        successes(&self.calls)
    }

    /// The modelled answer, without logging.
    fn answer(&mut self, gpa: u64, level: PageLevel) -> TdxStatus {
        if let Some(s) = self.accept_script.as_mut().and_then(|f| f(gpa, level)) {
            return s;
        }
        if level > self.max_level {
            return StatusCode::OperandInvalid.with_operand(operand::RCX);
        }
        let size = level.size();
        if level > PageLevel::Size4K
            && (gpa..gpa + size)
                .step_by(M2 as usize)
                .any(|g| self.split.contains(&(g / M2)))
        {
            return StatusCode::PageSizeMismatch.with_operand(u32::from(level.index()));
        }
        if self.any_accepted(gpa, gpa + size) {
            return StatusCode::PageAlreadyAccepted.with_operand(u32::from(level.index()));
        }
        TdxStatus::SUCCESS
    }
}

impl Tdcall for PageModel {
    fn accept(&mut self, gpa: Gpa, level: PageLevel) -> TdxStatus {
        let g = gpa.as_u64();
        let status = self.answer(g, level);
        if status.raw() == 0 {
            self.preaccept(g, g + level.size());
        }
        self.calls.push(Call::Accept {
            gpa: g,
            level,
            status: status.raw(),
        });
        status
    }

    fn map_gpa(&mut self, start: u64, len: u64) -> MapGpaOutcome {
        let (status, resume) = match self.map_script.as_mut() {
            Some(f) => f(start, len),
            None => (GhciStatus::Success, 0),
        };
        record_map_gpa(&mut self.calls, start, len, status, resume)
    }

    fn ve_info(&mut self) -> Result<VeInfo, TdxStatus> {
        Err(StatusCode::NoValidVeInfo.status())
    }

    fn vp_info(&mut self) -> Result<VpInfo, TdxStatus> {
        Err(StatusCode::OperandInvalid.status())
    }
}
