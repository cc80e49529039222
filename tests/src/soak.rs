//! A randomized soak of the host half with injected faults, driven from one guest vCPU.
//!
//! The guest keeps its own view of every 4K page (shared, private not accepted, accepted with
//! the last token it wrote, or lost to an error page) and runs random operations: ACCEPT 2M and
//! 4K, first touch through #VE (the split path), token writes and reads, MapGPA to shared and
//! to private of random 4K..2M ranges, host hole punches of shared ranges and merge passes.
//! Before an operation a fault may be armed at a random step: BUSY or INTERRUPTED_RESTARTABLE
//! on any SEAMCALL or ACCEPT, a hard error on a call of that flow, or an allocation failure
//! (S-EPT page pool, folio pool, range-map nodes). Faults do not outlive their operation.
//!
//! After every operation: the S-EPT is well formed (`check_tree`); for the pages the operation
//! touched and a random sample (and every page periodically): an accepted page is MAPPED and
//! holds its last token, unless it became an error page; no shared or poisoned page is MAPPED
//! or PENDING; the guest_memfd's shareability matches what MapGPA answered.
//!

use std::fmt;
use std::sync::Arc;

use accept::abi::{operand, GhciStatus, Gpa, GpaRange, PageLevel, StatusCode};
use hostvmm::gmem::Shareability;
use hostvmm::kvm::{BackingError, FaultError, YieldKicker};
use hostvmm::module::{Access, CallKind, FaultResult, FaultRule, SeptState};
use hostvmm::vmm::{ExitAction, Host, HostConfig};

use crate::drive::{self, accept, content, leaf, map_gpa, touch, GuestError, Touch, K4};

/// What to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SoakConfig {
    /// Operations.
    pub ops: u64,
    /// Seed of the pseudo-random sequence (runs are deterministic for a seed).
    pub seed: u64,
    /// Guest memory (a multiple of 2 MiB).
    pub memory: u64,
    /// Per mille of operations preceded by an armed fault.
    pub fault_per_mille: u32,
    /// Every this many operations, check every page (0: only at the end).
    pub full_check_every: u64,
    /// Operations per TD lifetime: then the TD is checked in full and a fresh one is built
    /// (error pages leak host memory for good, so a long-lived TD slowly runs out; 0: one TD).
    pub ops_per_td: u64,
}

impl Default for SoakConfig {
    fn default() -> Self {
        SoakConfig {
            ops: 20_000,
            seed: 0x7d6d_656d,
            memory: 64 << 20,
            fault_per_mille: 500,
            full_check_every: 4096,
            ops_per_td: 10_000,
        }
    }
}

/// Operations of the soak.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// ACCEPT a 2M unit (4K pages where the unit is partly accepted).
    Accept2M,
    /// ACCEPT one 4K page.
    Accept4K,
    /// First touch of a pending page: #VE, then ACCEPT 4K.
    VeTouch,
    /// Write a token to an accepted page.
    Write,
    /// Read an accepted page back.
    Read,
    /// MapGPA(shared) of a random private range.
    ToShared,
    /// MapGPA(private) of a random shared range.
    ToPrivate,
    /// Host hole punch of a random shared range.
    Punch,
    /// The MMU's merge pass.
    Merge,
}

impl Op {
    /// Every operation, in report order.
    pub const ALL: [Op; 9] = [
        Op::Accept2M,
        Op::Accept4K,
        Op::VeTouch,
        Op::Write,
        Op::Read,
        Op::ToShared,
        Op::ToPrivate,
        Op::Punch,
        Op::Merge,
    ];

    fn weight(self) -> u64 {
        match self {
            Op::Accept2M => 10,
            Op::Accept4K => 12,
            Op::VeTouch => 5,
            Op::Write => 22,
            Op::Read => 22,
            Op::ToShared => 10,
            Op::ToPrivate => 10,
            Op::Punch => 4,
            Op::Merge => 5,
        }
    }
}

/// What a soak run found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SoakReport {
    /// Operations run.
    pub ops: u64,
    /// TDs built (one per [`SoakConfig::ops_per_td`] operations).
    pub tds: u64,
    /// Operations run, by kind (order of [`Op::ALL`]).
    pub by_op: [u64; 9],
    /// Faults armed before an operation.
    pub faults_armed: u64,
    /// Faults that fired: module calls answered by a rule, plus folio-pool and range-map node
    /// allocation failures.
    pub faults_injected: u64,
    /// S-EPT page-pool allocation failures armed (the pool does not count the ones that fired).
    pub sept_pool_failures_armed: u64,
    /// Invariant violations.
    pub violations: u64,
    /// Accepted pages (not error pages) that lost their last token or their mapping.
    pub lost_private_pages: u64,
    /// Error pages recorded by the guest_memfd (counted, never mapped again).
    pub poisoned_pages: u64,
    /// Guest-visible host failures (the VMM resumed the vCPU afterwards).
    pub host_failures: u64,
    /// `check_tree` calls.
    pub tree_checks: u64,
    /// Page checks.
    pub page_checks: u64,
    /// MapGPA requests that succeeded.
    pub map_gpa_ok: u64,
    /// The first few violations, described.
    pub first_violations: Vec<String>,
}

impl fmt::Display for SoakReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "operations:           {}", self.ops)?;
        writeln!(f, "TD lifetimes:         {}", self.tds)?;
        for (op, n) in Op::ALL.iter().zip(self.by_op) {
            writeln!(f, "  {op:?}: {n}")?;
        }
        writeln!(f, "faults armed:         {}", self.faults_armed)?;
        writeln!(f, "faults injected:      {}", self.faults_injected)?;
        writeln!(
            f,
            "S-EPT pool failures armed: {}",
            self.sept_pool_failures_armed
        )?;
        writeln!(f, "host failures seen:   {}", self.host_failures)?;
        writeln!(f, "MapGPA completed:     {}", self.map_gpa_ok)?;
        writeln!(f, "error pages:          {}", self.poisoned_pages)?;
        writeln!(f, "tree checks:          {}", self.tree_checks)?;
        writeln!(f, "page checks:          {}", self.page_checks)?;
        writeln!(f, "invariant violations: {}", self.violations)?;
        write!(f, "lost private data:    {}", self.lost_private_pages)?;
        for v in &self.first_violations {
            write!(f, "\n  violation: {v}")?;
        }
        Ok(())
    }
}

/// The guest's view of a 4K page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum View {
    Shared,
    Unaccepted,
    Accepted(u64),
    /// An error page the guest ran into: given up.
    Lost,
}

/// splitmix64.
#[derive(Debug, Clone)]
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next() % n
        }
    }
}

/// The calls an operation makes, where transient faults are injected.
fn calls_of(op: Op) -> &'static [CallKind] {
    match op {
        Op::Accept2M | Op::Accept4K => &[CallKind::Accept, CallKind::SeptAdd, CallKind::PageAug],
        Op::VeTouch => &[
            CallKind::Accept,
            CallKind::SeptAdd,
            CallKind::PageAug,
            CallKind::RangeBlock,
            CallKind::MemTrack,
            CallKind::PageDemote,
        ],
        Op::ToShared => &[
            CallKind::RangeBlock,
            CallKind::MemTrack,
            CallKind::PageDemote,
            CallKind::PageRemove,
        ],
        Op::Merge => &[
            CallKind::RangeBlock,
            CallKind::MemTrack,
            CallKind::PagePromote,
            CallKind::RangeUnblock,
        ],
        Op::Write | Op::Read | Op::ToPrivate | Op::Punch => &[],
    }
}

/// Hard errors that every flow recovers from or turns into error pages as specified.
fn hard_kinds(op: Op) -> &'static [CallKind] {
    match op {
        Op::Accept2M | Op::Accept4K => &[CallKind::PageAug, CallKind::SeptAdd],
        Op::VeTouch | Op::ToShared | Op::Merge | Op::Punch => &[
            CallKind::PageAug,
            CallKind::SeptAdd,
            CallKind::RangeBlock,
            CallKind::MemTrack,
            CallKind::PageRemove,
            CallKind::PageDemote,
            CallKind::PagePromote,
        ],
        _ => &[],
    }
}

struct Soak {
    cfg: SoakConfig,
    /// Faults injected and error pages of the TDs before this one.
    past_injected: u64,
    past_poisoned: u64,
    h: Host,
    view: Vec<View>,
    rng: Rng,
    report: SoakReport,
    generation: u64,
    /// Pages the current operation touched: checked after it.
    touched: Vec<(u64, u64)>,
}

/// Runs a soak.
///
/// # Panics
/// When the host cannot be built from the configuration.
pub fn run(cfg: SoakConfig) -> SoakReport {
    run_with_progress(cfg, &mut |_, _| {})
}

/// Runs a soak, calling `progress(done, report)` every 65536 operations.
///
/// # Panics
/// When the host cannot be built from the configuration.
pub fn run_with_progress(
    cfg: SoakConfig,
    progress: &mut dyn FnMut(u64, &SoakReport),
) -> SoakReport {
    let pages = (cfg.memory / K4) as usize;
    let mut s = Soak {
        cfg,
        past_injected: 0,
        past_poisoned: 0,
        h: new_host(&cfg),
        view: vec![View::Unaccepted; pages],
        rng: Rng(cfg.seed),
        report: SoakReport::default(),
        generation: 0,
        touched: Vec::new(),
    };
    let total: u64 = Op::ALL.iter().map(|o| o.weight()).sum();
    s.report.tds = 1;
    for i in 0..cfg.ops {
        if cfg.ops_per_td != 0 && i != 0 && i % cfg.ops_per_td == 0 {
            s.reboot();
        }
        let mut pick = s.rng.below(total);
        let mut op = Op::Read;
        for o in Op::ALL {
            if pick < o.weight() {
                op = o;
                break;
            }
            pick -= o.weight();
        }
        s.step(op);
        if cfg.full_check_every != 0 && (i + 1) % cfg.full_check_every == 0 {
            s.check_all();
        }
        if (i + 1) % 65536 == 0 {
            s.finish_counts();
            progress(i + 1, &s.report);
        }
    }
    s.check_all();
    s.finish_counts();
    s.report
}

fn new_host(cfg: &SoakConfig) -> Host {
    Host::new(HostConfig::new(cfg.memory, 1), Arc::new(YieldKicker)).expect("host")
}

impl Soak {
    /// Checks the TD in full and replaces it with a fresh one.
    fn reboot(&mut self) {
        self.check_all();
        self.finish_counts();
        self.past_injected = self.report.faults_injected;
        self.past_poisoned = self.report.poisoned_pages;
        self.h = new_host(&self.cfg);
        self.view.fill(View::Unaccepted);
        self.report.tds += 1;
    }

    fn pages(&self) -> u64 {
        self.view.len() as u64
    }

    fn violation(&mut self, what: String) {
        self.report.violations += 1;
        if self.report.first_violations.len() < 16 {
            self.report.first_violations.push(what);
        }
    }

    fn finish_counts(&mut self) {
        let g = self.h.model();
        let injected = self.h.module().stats().injected
            + g.as_ref().map_or(0, |g| {
                g.with_pool(|p| p.injector().failures()) + g.node_injector().failures()
            });
        drop(g);
        let poisoned = self.h.gmem().poisoned_pages();
        self.report.faults_injected = self.past_injected + injected;
        self.report.poisoned_pages = self.past_poisoned + poisoned;
    }

    fn token(&mut self) -> u64 {
        self.generation += 1;
        0x5000_0000_0000_0000 | self.generation
    }

    /// A random page in state `want` (scanning from a random start), if any nearby.
    fn find(&mut self, want: fn(View) -> bool) -> Option<u64> {
        let n = self.pages();
        let start = self.rng.below(n);
        (0..n.min(4096))
            .map(|i| (start + i) % n)
            .find(|&p| want(self.view[p as usize]))
    }

    fn arm_fault(&mut self, op: Op) {
        if matches!(op, Op::Write | Op::Read)
            || self.rng.below(1000) >= u64::from(self.cfg.fault_per_mille)
        {
            return;
        }
        self.report.faults_armed += 1;
        let skip = self.rng.below(3);
        match self.rng.below(10) {
            0..=5 => {
                let kinds = calls_of(op);
                if kinds.is_empty() {
                    return;
                }
                let call = kinds[self.rng.below(kinds.len() as u64) as usize];
                let result = if self.rng.below(2) == 0 {
                    FaultResult::Busy
                } else {
                    FaultResult::InterruptedRestartable
                };
                self.h.module().inject(FaultRule {
                    call,
                    gpa: None,
                    skip,
                    count: 1 + self.rng.below(3),
                    result,
                });
            }
            6 | 7 => {
                let kinds = hard_kinds(op);
                if kinds.is_empty() {
                    return;
                }
                let call = kinds[self.rng.below(kinds.len() as u64) as usize];
                let status = if self.rng.below(2) == 0 {
                    StatusCode::OperandInvalid.with_operand(operand::RCX)
                } else {
                    StatusCode::EptEntryStateIncorrect.status()
                };
                self.h.module().inject(FaultRule {
                    call,
                    gpa: None,
                    skip,
                    count: 1,
                    result: FaultResult::Status(status),
                });
            }
            8 => {
                self.report.sept_pool_failures_armed += 1;
                self.h.mmu().sept_pool().fail_next(1);
            }
            _ => {
                let Some(mut g) = self.h.model() else {
                    return;
                };
                if self.rng.below(2) == 0 {
                    g.pool_mut().injector_mut().fail_nth(skip);
                } else {
                    g.node_injector_mut().fail_nth(skip);
                }
            }
        }
    }

    fn disarm(&mut self) {
        self.h.module().clear_faults();
        self.h.mmu().sept_pool().fail_next(0);
        if let Some(mut g) = self.h.model() {
            g.pool_mut().injector_mut().clear();
            g.node_injector_mut().clear();
        }
    }

    fn step(&mut self, op: Op) {
        self.report.ops += 1;
        self.report.by_op[Op::ALL.iter().position(|&o| o == op).unwrap_or(0)] += 1;
        self.touched.clear();
        self.arm_fault(op);
        match op {
            Op::Accept2M => self.op_accept_2m(),
            Op::Accept4K => {
                if let Some(p) = self.find(|v| v == View::Unaccepted) {
                    self.accept_4k(p);
                }
            }
            Op::VeTouch => self.op_ve_touch(),
            Op::Write => {
                if let Some(p) = self.find(|v| matches!(v, View::Accepted(_))) {
                    let t = self.token();
                    self.touched.push((p, p + 1));
                    match touch(&self.h, p * K4, Access::Write(t)) {
                        Ok(Touch::Ok(_)) => self.view[p as usize] = View::Accepted(t),
                        other => self.access_failed(p, other),
                    }
                }
            }
            Op::Read => {
                if let Some(p) = self.find(|v| matches!(v, View::Accepted(_))) {
                    self.touched.push((p, p + 1));
                    match touch(&self.h, p * K4, Access::Read) {
                        Ok(Touch::Ok(t)) => {
                            if let View::Accepted(want) = self.view[p as usize] {
                                if t != want {
                                    self.report.lost_private_pages += 1;
                                    self.violation(format!(
                                        "page {:#x} read {t:#x}, wrote {want:#x}",
                                        p * K4
                                    ));
                                    self.view[p as usize] = View::Accepted(t);
                                }
                            }
                        }
                        other => self.access_failed(p, other),
                    }
                }
            }
            Op::ToShared => self.op_convert(true),
            Op::ToPrivate => self.op_convert(false),
            Op::Punch => self.op_punch(),
            Op::Merge => {
                self.h.merge_pass();
            }
        }
        self.disarm();
        self.check_after();
    }

    fn host_failure(&mut self, p: u64, e: GuestError) {
        match e {
            GuestError::Host(ExitAction::Fatal(FaultError::Backing(BackingError::Poisoned))) => {
                if self.h.gmem().is_poisoned(Gpa::new_truncate(p * K4)) {
                    self.view[p as usize] = View::Lost;
                } else {
                    self.violation(format!("{:#x}: poisoned answer, page not poisoned", p * K4));
                }
                self.report.host_failures += 1;
            }
            // The VMM resumes the vCPU: the guest retries later.
            GuestError::Host(ExitAction::Fatal(e)) => {
                self.report.host_failures += 1;
                if std::env::var_os("SOAK_DEBUG").is_some() {
                    eprintln!("{:#x}: {e:?}", p * K4);
                }
            }
            other => self.violation(format!("{:#x}: {other:?}", p * K4)),
        }
    }

    fn access_failed(&mut self, p: u64, r: Result<Touch, GuestError>) {
        match r {
            Err(e) => self.host_failure(p, e),
            Ok(Touch::Ve(_)) => {
                let _ = drive::ve_info(&self.h);
                self.violation(format!("accepted page {:#x} raised #VE", p * K4));
            }
            Ok(Touch::Ok(_)) => {}
        }
    }

    fn accept_4k(&mut self, p: u64) -> bool {
        self.touched.push((p, p + 1));
        match accept(&self.h, p * K4, PageLevel::Size4K) {
            Ok(s) if s.is_success() => {
                self.view[p as usize] = View::Accepted(0);
                true
            }
            Ok(s) => {
                self.violation(format!("ACCEPT 4K {:#x}: {s:?}", p * K4));
                false
            }
            Err(e) => {
                self.host_failure(p, e);
                false
            }
        }
    }

    fn op_accept_2m(&mut self) {
        let Some(p) = self.find(|v| v == View::Unaccepted) else {
            return;
        };
        let unit = p / 512 * 512;
        let whole = (unit..unit + 512).all(|q| self.view[q as usize] == View::Unaccepted);
        if whole {
            self.touched.push((unit, unit + 512));
            match accept(&self.h, unit * K4, PageLevel::Size2M) {
                Ok(s) if s.is_success() => {
                    for q in unit..unit + 512 {
                        self.view[q as usize] = View::Accepted(0);
                    }
                    return;
                }
                Ok(s) if s.is(StatusCode::PageSizeMismatch) => {}
                Ok(s) => {
                    self.violation(format!("ACCEPT 2M {:#x}: {s:?}", unit * K4));
                    return;
                }
                Err(GuestError::Host(ExitAction::Fatal(_))) => self.report.host_failures += 1,
                Err(e) => return self.host_failure(unit, e),
            }
        }
        // The host mapped smaller (or part is accepted): 4K pages, a few at a time.
        let mut n = 0;
        for q in unit..unit + 512 {
            if self.view[q as usize] == View::Unaccepted {
                if !self.accept_4k(q) {
                    break;
                }
                n += 1;
                if n == 16 {
                    break;
                }
            }
        }
    }

    fn op_ve_touch(&mut self) {
        let Some(p) = self.find(|v| v == View::Unaccepted) else {
            return;
        };
        self.touched.push((p / 512 * 512, p / 512 * 512 + 512));
        match touch(&self.h, p * K4, Access::Read) {
            Ok(Touch::Ve(info)) => {
                if info.gpa != p * K4 {
                    self.violation(format!("#VE for {:#x} names {:#x}", p * K4, info.gpa));
                }
                if drive::ve_info(&self.h).is_err() {
                    self.violation("no VE info after a #VE".into());
                }
                self.accept_4k(p);
            }
            Ok(Touch::Ok(t)) => {
                self.violation(format!("unaccepted page {:#x} readable ({t:#x})", p * K4));
            }
            Err(e) => self.host_failure(p, e),
        }
    }

    /// A random run of pages all shared (or all private) of 1..=512 pages.
    fn pick_run(&mut self, shared: bool) -> Option<(u64, u64)> {
        let want: fn(View) -> bool = if shared {
            |v| v == View::Shared
        } else {
            |v| v != View::Shared
        };
        let p = self.find(want)?;
        let len = 1 + self.rng.below(512);
        let mut end = p;
        while end < self.pages() && end < p + len && want(self.view[end as usize]) {
            end += 1;
        }
        Some((p, end))
    }

    fn op_convert(&mut self, to_shared: bool) {
        let Some((s, e)) = self.pick_run(!to_shared) else {
            return;
        };
        self.touched.push((s, e));
        let bit = if to_shared { drive::SHARED } else { 0 };
        let mut done = false;
        // A fault is one-shot: a second attempt runs without it.
        for _ in 0..3 {
            let (status, _) = map_gpa(&self.h, bit | (s * K4), (e - s) * K4);
            if status == GhciStatus::Success {
                done = true;
                break;
            }
            if status != GhciStatus::Retry {
                self.violation(format!(
                    "MapGPA {:#x}..{:#x} shared={to_shared}: {status:?}",
                    s * K4,
                    e * K4
                ));
                break;
            }
            self.disarm();
        }
        if !done {
            self.violation(format!(
                "MapGPA {:#x}..{:#x} never completed",
                s * K4,
                e * K4
            ));
            return;
        }
        self.report.map_gpa_ok += 1;
        for q in s..e {
            self.view[q as usize] = if to_shared {
                View::Shared
            } else {
                View::Unaccepted
            };
        }
    }

    fn op_punch(&mut self) {
        let Some((s, e)) = self.pick_run(true) else {
            return;
        };
        self.touched.push((s, e));
        let range = GpaRange::new(s * K4, e * K4).expect("range");
        let r = self.h.punch_hole(range);
        if let Err(err) = r {
            if !matches!(err, hostvmm::gmem::ConvertError::HookFailed { .. }) {
                self.violation(format!("punch {range}: {err}"));
            }
        }
    }

    fn check_after(&mut self) {
        self.report.tree_checks += 1;
        if let Err(e) = self.h.module().check_tree() {
            self.violation(e.to_string());
        }
        let mut ranges = std::mem::take(&mut self.touched);
        for _ in 0..4 {
            let p = self.rng.below(self.pages());
            ranges.push((p, p + 1));
        }
        for &(s, e) in &ranges {
            for p in s..e {
                self.check_page(p);
            }
        }
        self.touched = ranges;
    }

    fn check_all(&mut self) {
        for p in 0..self.pages() {
            self.check_page(p);
        }
    }

    fn check_page(&mut self, p: u64) {
        self.report.page_checks += 1;
        let gpa = p * K4;
        let g = Gpa::new_truncate(gpa);
        let (shareability, poisoned) = {
            let m = self.h.gmem();
            (m.shareability(g).ok(), m.is_poisoned(g))
        };
        let (level, state) = leaf(&self.h, gpa);
        let live = matches!(state, SeptState::Mapped | SeptState::Pending);
        let view = self.view[p as usize];
        if poisoned && live {
            return self.violation(format!("error page {gpa:#x} is {state:?} (level {level})"));
        }
        if shareability == Some(Shareability::Shared) && live {
            return self.violation(format!("shared page {gpa:#x} is private {state:?}"));
        }
        let expect_shared = view == View::Shared;
        if (shareability == Some(Shareability::Shared)) != expect_shared {
            return self.violation(format!(
                "page {gpa:#x}: guest view {view:?}, guest_memfd {shareability:?}"
            ));
        }
        if view == View::Unaccepted && state == SeptState::Mapped && !poisoned {
            return self.violation(format!(
                "page {gpa:#x} the guest never accepted is MAPPED (stale content)"
            ));
        }
        if let View::Accepted(tok) = view {
            if poisoned {
                // An error page: counted, the guest gives it up.
                self.view[p as usize] = View::Lost;
                return;
            }
            if state != SeptState::Mapped {
                self.report.lost_private_pages += 1;
                self.view[p as usize] = View::Lost;
                return self.violation(format!("accepted page {gpa:#x} is {state:?}"));
            }
            let got = content(&self.h, gpa);
            if got != Some(tok) {
                self.report.lost_private_pages += 1;
                self.view[p as usize] = View::Lost;
                self.violation(format!(
                    "accepted page {gpa:#x} holds {got:x?}, last written {tok:#x}"
                ));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rng_is_deterministic() {
        let mut a = Rng(1);
        let mut b = Rng(1);
        assert_eq!(a.next(), b.next());
        assert!(a.below(10) < 10);
    }
}
