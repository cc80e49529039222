//! A catalogue of hostile-host behaviours, each run against the real guest engine and the real
//! host half, with the verdict a correct guest must reach.
//!
//! Every [`Behaviour`] builds a fresh small TD (a [`Lab`]: a [`Host`] of [`LAB_MEMORY`] with
//! one vCPU; the first [`LAB_EAGER_END`] bytes accepted at boot by the [`Acceptor`], the rest
//! tracked by a [`LazyTracker`] in 2 MiB units, a few of them accepted, and private tokens
//! written into pages the guest owns), then misbehaves in one of two ways:
//!
//! - as the guest engine sees it: the lab's vCPU ([`Vcpu`], the engine's
//!   [`Tdcall`](accept::tdcall::Tdcall)) answers some calls itself instead of the honest host
//!   (rewriting MapGPA's R10/R11, answering ACCEPT with chosen statuses, replacing VE info), or
//!   handles EPT-violation exits by never mapping;
//! - through the host's own interfaces: direct SEAMCALLs on [`Host::module`] (BLOCK, TRACK,
//!   REMOVE then AUG to re-add a page; DEMOTE and PROMOTE between the guest's ACCEPTs; holding an
//!   S-EPT entry lock as a concurrent SEAMCALL would).
//!
//! The guest's answer is reduced to a [`Verdict`]: the operation completed, or it stopped with a
//! precise engine error (and, for a conversion, what the rollback did). A [`Row`] passes when
//! the observed verdict equals the expected one, no private token the guest still owns changed
//! (read back through the module's content model: a page re-accepted by mistake reads zero),
//! and the guest made no more TDCALLs than the behaviour's bound (the lab's vCPU refuses to go
//! on past it, so an engine loop shows as a failed row instead of a hang).
//!
//! Some rows model what no real host can do with a correct TDX module (the module's answers to
//! ACCEPT and VEINFO.GET are trusted; a host cannot inject #VE): they stand for a module bug or
//! a broken transport, and show that the engine still stops precisely. Each entry says so.
//! Interleavings with the host are at call granularity (the host acts between two guest calls),
//! which keeps every row deterministic.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use accept::acceptor::{AcceptPolicy, Acceptor};
use accept::convert::{ConvertPolicy, Converter};
use accept::tracker::{words_needed, LazyTracker, TrackerConfig};
use accept::ve::VeCpuState;

use hostvmm::kvm::YieldKicker;
use hostvmm::vmm::{Host, HostConfig, SharedBackend};

const K4: u64 = 4096;
const M2: u64 = 2 << 20;
/// The shared bit of the lab's TD (GPAW 48).
const SHARED: u64 = 1 << 47;

/// Guest memory of every lab TD.
pub const LAB_MEMORY: u64 = 64 * M2;
/// End of the memory the firmware accepts at boot; lazily accepted memory follows.
pub const LAB_EAGER_END: u64 = 8 * M2;
/// Lazily accepted units (2 MiB) the lab accepts during setup, from the first one.
const LAB_LAZY_ACCEPTED: u64 = 2;
/// Pages holding private tokens from setup on: boot memory and two lazily accepted units.
const BYSTANDERS: [u64; 5] = [
    0x5000,
    M2 + 0x9000,
    7 * M2 + 0x2000,
    LAB_EAGER_END + 0x3000,
    LAB_EAGER_END + M2 + 0x7000,
];
/// The private range the MapGPA rows convert to shared (boot memory, no bystander in it).
const CONV: (u64, u64) = (2 * M2, 4 * M2);
/// The range the to-private rows first make shared, then convert back under a hostile host.
const PRIV: (u64, u64) = (4 * M2, 6 * M2);
/// Pages of [`CONV`]'s second half that hold tokens in the rows where the host fails midway:
/// the host never converted them, so the engine promises their content.
const CONV_TAIL_TOKENS: [u64; 2] = [3 * M2 + 0x1000, 3 * M2 + 0x6_3000];
/// Bound on rounds of one guest access (each round may take a #VE).
const MAX_ACCESS_ROUNDS: u32 = 8;

/// GPA of lazily accepted unit `unit`.
const fn unit_gpa(unit: u64) -> u64 {
    LAB_EAGER_END + unit * M2
}

mod accepts;
mod lab;
mod mapgpa;
mod sept;
mod ve;
mod verdict;

pub use lab::{AcceptHook, ExitHook, Honest, Lab, LabExits, MapHook, Vcpu, VeHook};
pub use verdict::{Stop, Verdict};
// ---- the catalogue -------------------------------------------------------------------------

/// One hostile behaviour.
#[derive(Clone, Copy)]
pub struct Behaviour {
    /// Name, as `tdsim hostile NAME` takes it.
    pub name: &'static str,
    /// What the host does.
    pub description: &'static str,
    /// Why the expected verdict is the right one.
    pub why: &'static str,
    /// The verdict a correct guest reaches.
    pub expected: Verdict,
    /// Most TDCALLs the guest may make during the behaviour.
    pub bound: u64,
    /// Runs the behaviour in a prepared lab and returns what the guest made of it.
    pub run: fn(&mut Lab<'_>) -> Verdict,
}

impl fmt::Debug for Behaviour {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Behaviour")
            .field("name", &self.name)
            .field("expected", &self.expected)
            .field("bound", &self.bound)
            .finish_non_exhaustive()
    }
}

const CONV_SHARED: u64 = CONV.0 | SHARED;
const BUSY_TRIES: u32 = accept::acceptor::DEFAULT_BUSY_RETRIES + 1;
const NO_PROGRESS: u32 = accept::convert::DEFAULT_NO_PROGRESS_RETRIES + 1;

/// Every behaviour, in catalogue order.
pub fn catalogue() -> &'static [Behaviour] {
    &CATALOGUE
}

/// The catalogue: the families in this order, each in its own order.
static CATALOGUE: [Behaviour; 39] = join([
    &mapgpa::BEHAVIOURS,
    &accepts::BEHAVIOURS,
    &sept::BEHAVIOURS,
    &ve::BEHAVIOURS,
]);

/// The behaviours of `families` one after the other; does not compile unless they hold exactly
/// `N` behaviours.
const fn join<const N: usize>(families: [&[Behaviour]; 4]) -> [Behaviour; N] {
    let mut out = [families[0][0]; N];
    let mut at = 0;
    let mut f = 0;
    while f < families.len() {
        let mut i = 0;
        while i < families[f].len() {
            out[at] = families[f][i];
            at += 1;
            i += 1;
        }
        f += 1;
    }
    assert!(at == N, "the catalogue holds every family's behaviours");
    out
}

// ---- running ---------------------------------------------------------------------------------

fn ser_display<T: fmt::Display, S: serde::Serializer>(v: &T, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(v)
}

/// The result of one behaviour.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Row {
    /// Behaviour name.
    pub name: &'static str,
    /// Expected verdict.
    #[serde(serialize_with = "ser_display")]
    pub expected: Verdict,
    /// Observed verdict.
    #[serde(serialize_with = "ser_display")]
    pub observed: Verdict,
    /// Private pages the guest owned whose content changed or vanished, plus wrong reads.
    pub private_data_lost: u64,
    /// TDCALLs the guest made during the behaviour.
    pub tdcalls: u64,
    /// The behaviour's bound on TDCALLs.
    pub bound: u64,
    /// Observed == expected, nothing lost, within the bound, and the host half's invariants
    /// hold (well-formed Secure-EPT; no GPA both shared and mapped private).
    pub passed: bool,
    /// What happened, for a reader.
    pub detail: String,
}

/// Runs one behaviour in a fresh lab.
pub fn run_behaviour(b: &Behaviour) -> Row {
    run_behaviour_on(b, None)
}

/// Makes the conversion backend of a behaviour's host (see [`run_all_on`]).
pub type BackendFactory<'f> = &'f dyn Fn(&HostConfig) -> Result<SharedBackend, String>;

/// Runs behaviour `b` on a host whose conversion backend `backend` makes (`None`: the
/// guest_memfd model).
pub fn run_behaviour_on(b: &Behaviour, backend: Option<BackendFactory<'_>>) -> Row {
    let fail = |detail: String| Row {
        name: b.name,
        expected: b.expected,
        observed: Verdict::Stops(Stop::Inconsistent),
        private_data_lost: 0,
        tdcalls: 0,
        bound: b.bound,
        passed: false,
        detail,
    };
    let config = HostConfig::new(LAB_MEMORY, 1);
    let host = match backend {
        None => Host::new(config, Arc::new(YieldKicker)).map_err(|e| e.to_string()),
        Some(make) => make(&config).and_then(|b| {
            Host::with_backend(config, Arc::new(YieldKicker), b).map_err(|e| e.to_string())
        }),
    };
    let host = match host {
        Ok(h) => h,
        Err(e) => return fail(format!("host: {e}")),
    };
    let gpaw = host.config().module.gpaw;
    let acceptor = Acceptor::new(gpaw, AcceptPolicy::OURS);
    let converter = Converter::new(gpaw, ConvertPolicy::default());
    let units = (LAB_MEMORY - LAB_EAGER_END) / M2;
    let words: Vec<AtomicU64> = (0..words_needed(units))
        .map(|_| AtomicU64::new(0))
        .collect();
    let inflight = [AtomicU64::new(0)];
    let tracker = match LazyTracker::new(
        &acceptor,
        LAB_EAGER_END,
        M2,
        units,
        &words,
        &inflight,
        TrackerConfig {
            max_wait_spins: 1024,
        },
    ) {
        Ok(t) => t,
        Err(e) => return fail(format!("tracker: {e}")),
    };
    for u in 0..units {
        tracker.mark_unaccepted(u);
    }
    let mut lab = Lab {
        host: &host,
        acceptor: &acceptor,
        converter: &converter,
        tracker: &tracker,
        cpu: Vcpu::new(&host),
        ve_state: VeCpuState::new(),
        shadow: BTreeMap::new(),
        bad_reads: 0,
        next_token: 0,
        notes: Vec::new(),
    };
    if let Err(e) = lab.setup() {
        return fail(format!("setup: {e}"));
    }
    lab.cpu.calls = 0;
    lab.cpu.limit = b.bound;
    let observed = (b.run)(&mut lab);
    lab.cpu.honest_again();
    let tdcalls = lab.cpu.calls;
    let exceeded = lab.cpu.exceeded;
    if exceeded {
        lab.note(format!("more than {} TDCALLs: stopped", b.bound));
    }
    let lost = lab.lost();
    let host_ok = lab.host_consistent();
    Row {
        name: b.name,
        expected: b.expected,
        observed,
        private_data_lost: lost,
        tdcalls,
        bound: b.bound,
        passed: observed == b.expected && lost == 0 && !exceeded && host_ok,
        detail: lab.notes.join("; "),
    }
}

/// Runs the behaviour called `name`, if there is one.
pub fn run_one(name: &str) -> Option<Row> {
    catalogue()
        .iter()
        .find(|b| b.name == name)
        .map(run_behaviour)
}

/// Runs the whole catalogue.
pub fn run_all() -> Vec<Row> {
    catalogue().iter().map(run_behaviour).collect()
}

/// Runs the whole catalogue with each host's conversion backend made by `backend`.
pub fn run_all_on(backend: BackendFactory<'_>) -> Vec<Row> {
    catalogue()
        .iter()
        .map(|b| run_behaviour_on(b, Some(backend)))
        .collect()
}

/// Width of the table [`table`] prints (an 100-column terminal).
pub const TABLE_WIDTH: usize = 100;

/// Splits `text` into lines of at most `width` characters, at spaces where it can.
fn wrap(text: &str, width: usize) -> Vec<String> {
    let width = width.max(8);
    let mut lines = Vec::new();
    let mut cur = String::new();
    for word in text.split(' ') {
        let mut word = word.to_string();
        while word.chars().count() > width {
            if !cur.is_empty() {
                lines.push(std::mem::take(&mut cur));
            }
            let head: String = word.chars().take(width).collect();
            word = word.chars().skip(width).collect();
            lines.push(head);
        }
        let extra = usize::from(!cur.is_empty());
        if cur.chars().count() + extra + word.chars().count() > width {
            lines.push(std::mem::take(&mut cur));
        }
        if !cur.is_empty() {
            cur.push(' ');
        }
        cur.push_str(&word);
    }
    if !cur.is_empty() || lines.is_empty() {
        lines.push(cur);
    }
    lines
}

/// The rows as a table no wider than [`TABLE_WIDTH`]: behaviour, result, private data lost,
/// TDCALLs / bound, and the verdict (once when observed as expected; both, labelled, when not),
/// wrapped under its own column.
pub fn table(rows: &[Row]) -> String {
    let name_w = rows
        .iter()
        .map(|r| r.name.len())
        .chain(["behaviour".len()])
        .max()
        .unwrap_or(9);
    let calls_w = rows
        .iter()
        .map(|r| format!("{}/{}", r.tdcalls, r.bound).len())
        .chain(["tdcalls".len()])
        .max()
        .unwrap_or(7);
    let prefix = format!("{:<name_w$}  {:<6}  {:>4}  {:>calls_w$}  ", "", "", "", "").len();
    let verdict_w = TABLE_WIDTH.saturating_sub(prefix);
    let mut out = format!(
        "{:<name_w$}  {:<6}  {:>4}  {:>calls_w$}  verdict\n",
        "behaviour", "result", "lost", "tdcalls"
    );
    out.push_str(&format!(
        "{}  {}  {}  {}  {}\n",
        "-".repeat(name_w),
        "-".repeat(6),
        "-".repeat(4),
        "-".repeat(calls_w),
        "-".repeat(verdict_w.min(40))
    ));
    for r in rows {
        let verdict = if r.observed == r.expected {
            r.observed.to_string()
        } else {
            format!("expected {}; observed {}", r.expected, r.observed)
        };
        let lines = wrap(&verdict, verdict_w);
        out.push_str(&format!(
            "{:<name_w$}  {:<6}  {:>4}  {:>calls_w$}  {}\n",
            r.name,
            if r.passed { "pass" } else { "FAIL" },
            r.private_data_lost,
            format!("{}/{}", r.tdcalls, r.bound),
            lines.first().map_or("", String::as_str)
        ));
        for l in lines.iter().skip(1) {
            out.push_str(&format!("{:prefix$}{l}\n", ""));
        }
    }
    let passed = rows.iter().filter(|r| r.passed).count();
    let lost: u64 = rows.iter().map(|r| r.private_data_lost).sum();
    out.push_str(&format!(
        "{passed}/{} behaviours pass; private data lost: {lost}\n",
        rows.len()
    ));
    out
}

/// The catalogue as Markdown: each behaviour, its expected verdict and why.
pub fn markdown() -> String {
    let mut out = String::new();
    for b in catalogue() {
        out.push_str(&format!(
            "### `{}`\n\n{}\n\n- Expected: `{}` (at most {} TDCALLs)\n- Why: {}\n\n",
            b.name, b.description, b.expected, b.bound, b.why
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use accept::abi::PageLevel;

    use super::lab::{g, range};
    use super::mapgpa::{run_retry_at_start_forever, run_retry_before_start};
    use super::verdict::stop_of_accept;
    use super::*;
    use hostvmm::gmem::Shareability;

    fn behaviour(expected: Verdict, bound: u64, run: fn(&mut Lab<'_>) -> Verdict) -> Behaviour {
        Behaviour {
            name: "test",
            description: "",
            why: "",
            expected,
            bound,
            run,
        }
    }

    fn careless_reaccept(lab: &mut Lab<'_>) -> Verdict {
        let base = BYSTANDERS[3] & !(M2 - 1);
        if lab.host_remove_readd(base, PageLevel::Size2M).is_err() {
            return Verdict::Stops(Stop::Inconsistent);
        }
        // A guest that does not track what it accepted accepts the re-added page again.
        let acceptor = lab.acceptor;
        match acceptor.accept_unit(&mut lab.cpu, g(base), PageLevel::Size2M) {
            Ok(()) => Verdict::Completes,
            Err(e) => Verdict::Stops(stop_of_accept(e)),
        }
    }

    #[test]
    fn a_silent_reaccept_is_counted_as_lost_data() {
        let row = run_behaviour(&behaviour(Verdict::Completes, 1, careless_reaccept));
        assert_eq!(row.observed, Verdict::Completes);
        assert_eq!(row.private_data_lost, 1, "{}", row.detail);
        assert!(!row.passed);
    }

    fn shared_but_mapped(lab: &mut Lab<'_>) -> Verdict {
        let r = range(BYSTANDERS[0] & !0xFFF, (BYSTANDERS[0] & !0xFFF) + K4);
        let _ = lab.host.gmem().convert(
            r,
            Shareability::Shared,
            Default::default(),
            &mut hostvmm::gmem::NoopHook,
        );
        Verdict::Completes
    }

    #[test]
    fn a_gpa_both_shared_and_private_fails_the_row() {
        let row = run_behaviour(&behaviour(Verdict::Completes, 0, shared_but_mapped));
        assert_eq!(row.observed, Verdict::Completes);
        assert!(!row.passed);
        assert!(row.detail.contains("private leaf"), "{}", row.detail);
    }

    #[test]
    fn a_guest_past_the_bound_fails_the_row() {
        let row = run_behaviour(&behaviour(
            CATALOGUE[2].expected,
            10,
            run_retry_at_start_forever,
        ));
        assert!(row.tdcalls > 10);
        assert!(!row.passed);
        assert!(
            row.detail.contains("more than 10 TDCALLs"),
            "{}",
            row.detail
        );
    }

    #[test]
    fn another_verdict_fails_the_row() {
        let row = run_behaviour(&behaviour(Verdict::Completes, 12, run_retry_before_start));
        assert_eq!(row.observed, CATALOGUE[0].expected);
        assert!(!row.passed);
    }

    #[test]
    fn names_are_unique_and_documented() {
        let mut names: Vec<_> = catalogue().iter().map(|b| b.name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), catalogue().len());
        let md = markdown();
        for b in catalogue() {
            assert!(md.contains(&format!("### `{}`", b.name)));
            assert!(!b.description.is_empty() && !b.why.is_empty());
        }
    }

    #[test]
    fn the_table_has_a_line_per_row_and_a_summary() {
        let rows = vec![run_one("ve-shared-gpa").expect("in the catalogue")];
        let t = table(&rows);
        let row = t.lines().nth(2).expect("the row");
        assert!(
            row.starts_with("ve-shared-gpa") && row.contains(" pass "),
            "{row}"
        );
        assert!(t.ends_with("1/1 behaviours pass; private data lost: 0\n"));
    }

    #[test]
    fn the_table_fits_an_100_column_terminal() {
        let rows = run_all();
        let t = table(&rows);
        for line in t.lines() {
            assert!(
                line.chars().count() <= TABLE_WIDTH,
                "{} columns: {line}",
                line.len()
            );
        }
        assert_eq!(
            t.lines().filter(|l| l.contains(" pass ")).count(),
            rows.iter().filter(|r| r.passed).count()
        );
    }

    #[test]
    fn wrap_breaks_at_spaces_and_splits_long_words() {
        assert_eq!(wrap("aaaa bbb cc", 8), ["aaaa bbb", "cc"]);
        assert_eq!(wrap("abcdefghijkl", 8), ["abcdefgh", "ijkl"]);
        assert_eq!(wrap("", 8), [""]);
    }
}
