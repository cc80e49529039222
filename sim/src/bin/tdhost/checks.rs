//! What `tdhost` checks and reports at the end of each part: the counts both modes must agree
//! on (serialized with `tdsim`'s key names where the quantity is the same), and the invariants.

use std::collections::BTreeMap;

use accept::abi::{Gpa, PageLevel, StatusCode};
use e2e_proto::selftest::{self, Summary, IMAGE_END, MEMORY};
use e2e_proto::smp::{self, Smp};
use e2e_proto::wire::Request;
use hostvmm::module::{AccessKind, CallKind, CallOutcome, SeptState};
use serde::Serialize;
use tdmem_sim::report::Seamcalls;

use crate::exec::{lock, Exec};

/// Number of tests in `e2e_proto::selftest::run`.
const TESTS: u64 = 7;

/// ACCEPT executions at one level, by outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub(crate) struct AcceptOutcomes {
    /// Answered SUCCESS.
    pub ok: u64,
    /// Left the TD (an EPT violation the host handles; the image re-executes).
    pub exit: u64,
    /// Interrupted (the image re-executes).
    pub interrupted: u64,
}

/// A count per page level, keyed as `tdsim`'s report keys its levels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub(crate) struct ByLevel<T> {
    /// 4K.
    #[serde(rename = "4k")]
    pub k4: T,
    /// 2M.
    #[serde(rename = "2m")]
    pub m2: T,
    /// 1G.
    #[serde(rename = "1g")]
    pub g1: T,
}

/// The counts both modes must agree on: the `TDMEM-HOST-COUNTS` line. A key that `tdsim`'s
/// report also has names the same quantity there.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub(crate) struct HostCounts {
    /// TDCALLs the module ran (every leaf, re-executions included).
    pub tdcalls: u64,
    /// Every call the module ran, by kind (kinds never called left out).
    pub calls: BTreeMap<String, u64>,
    /// SEAMCALLs by kind: `tdsim`'s type.
    pub seamcalls: Seamcalls,
    /// ACCEPT executions the module ran (re-executions after exits and interrupts included).
    pub accept_executions: u64,
    /// The same by level and outcome.
    pub accept_outcomes: ByLevel<AcceptOutcomes>,
    /// Interrupts taken inside ACCEPTs.
    pub accept_interrupted: u64,
    /// #VEs injected.
    pub ve_injected: u64,
    /// EPT-violation exits the host handled.
    pub ept_violation_exits: u64,
    /// MapGPA calls the host served.
    pub map_gpa_calls: u64,
    /// Chunks the host converted for them.
    pub map_gpa_chunks: u64,
    /// RETRY answers to them.
    pub map_gpa_retries: u64,
    /// Leaves the private MMU mapped by AUG, by level.
    pub mmu_maps: ByLevel<u64>,
    /// Fault-path splits (DEMOTE for a smaller ACCEPT).
    pub fault_splits: u64,
    /// Zap-path splits (DEMOTE of a leaf straddling a conversion).
    pub zap_splits: u64,
    /// Merges (successful PROMOTEs back to 2M).
    pub merges: u64,
    /// Error pages recorded.
    pub poisoned_pages: u64,
    /// 4K pages the module zeroed.
    pub zeroed_4k: u64,
    /// Requests that crossed the link, by kind.
    pub requests: BTreeMap<String, u64>,
    /// Answers to them, by kind.
    pub answers: BTreeMap<String, u64>,
}

impl Exec {
    /// The counts both modes must agree on.
    pub(crate) fn counts(&self) -> HostCounts {
        let st = self.host.module().stats();
        let total = |k: CallKind| st.total(k);
        let outcomes = |l: PageLevel| AcceptOutcomes {
            ok: st.get_at(
                CallKind::Accept,
                l,
                CallOutcome::Status(StatusCode::Success),
            ),
            exit: st.get_at(CallKind::Accept, l, CallOutcome::TdExit),
            interrupted: st.get_at(CallKind::Accept, l, CallOutcome::Interrupted),
        };
        let names = |m: &BTreeMap<&str, u64>| -> BTreeMap<String, u64> {
            m.iter().map(|(k, v)| ((*k).to_string(), *v)).collect()
        };
        let vmm = self.host.stats();
        let mmu = self.host.mmu().stats();
        HostCounts {
            tdcalls: CallKind::ALL
                .iter()
                .filter(|k| !k.is_seamcall())
                .map(|&k| total(k))
                .sum(),
            calls: CallKind::ALL
                .iter()
                .filter(|&&k| total(k) != 0)
                .map(|&k| (format!("{k:?}"), total(k)))
                .collect(),
            seamcalls: Seamcalls::from_stats(&st),
            accept_executions: total(CallKind::Accept),
            accept_outcomes: ByLevel {
                k4: outcomes(PageLevel::Size4K),
                m2: outcomes(PageLevel::Size2M),
                g1: outcomes(PageLevel::Size1G),
            },
            accept_interrupted: st.get(CallKind::Accept, CallOutcome::Interrupted),
            ve_injected: st.access(AccessKind::Ve),
            ept_violation_exits: vmm.ept_violations,
            map_gpa_calls: vmm.map_gpa_calls,
            map_gpa_chunks: vmm.map_gpa_chunks,
            map_gpa_retries: vmm.map_gpa_retries,
            mmu_maps: ByLevel {
                k4: mmu.maps[0],
                m2: mmu.maps[1],
                g1: mmu.maps[2],
            },
            fault_splits: mmu.fault_splits,
            zap_splits: mmu.zap_demotes,
            merges: st.status(CallKind::PagePromote, StatusCode::Success),
            poisoned_pages: self.host.gmem().poisoned_pages(),
            zeroed_4k: st.zeroed_4k,
            requests: names(&lock(&self.requests)),
            answers: names(&lock(&self.answers)),
        }
    }

    /// The checks every run shares: the S-EPT tree well formed, no host fault errors, no error
    /// pages, and the image's DONE. Returns the violations and the image's summary.
    fn check_host(&self) -> (Vec<String>, Option<(u64, Summary)>) {
        let mut bad = Vec::new();
        if let Err(e) = self.host.module().check_tree() {
            bad.push(e.to_string());
        }
        let vmm = self.host.stats();
        if vmm.fault_errors != 0 {
            bad.push(format!("{} host fault errors", vmm.fault_errors));
        }
        let poisoned = self.host.gmem().poisoned_pages();
        if poisoned != 0 {
            bad.push(format!("{poisoned} error pages"));
        }
        let summary = *lock(&self.summary);
        if summary.is_none() {
            bad.push("the image never reported DONE".into());
        }
        (bad, summary)
    }

    /// Invariant checks at the end of a run; returns the violations.
    fn check(&self) -> Vec<String> {
        let (mut bad, summary) = self.check_host();
        let m = self.host.module();
        let Some((status, s)) = summary else {
            return bad;
        };
        if status != 0 || s.failed != 0 || s.passed != TESTS {
            bad.push(format!(
                "image self-test: status {status}, {} passed, {} failed (want {TESTS})",
                s.passed, s.failed
            ));
        }
        let st = m.stats();
        let ok = CallOutcome::Status(StatusCode::Success);
        // The image's accepted 2M pages, plus the image memory accepted at setup.
        let setup_2m = IMAGE_END / PageLevel::Size2M.size();
        let module_2m = st.get_at(CallKind::Accept, PageLevel::Size2M, ok);
        if module_2m != s.accepted[1] + setup_2m {
            bad.push(format!(
                "2M accepts: module {module_2m}, image {} + setup {setup_2m}",
                s.accepted[1]
            ));
        }
        let module_4k = st.get_at(CallKind::Accept, PageLevel::Size4K, ok);
        if module_4k != s.accepted[0] {
            bad.push(format!(
                "4K accepts: module {module_4k}, image {}",
                s.accepted[0]
            ));
        }
        if st.access(AccessKind::Ve) != s.ves {
            bad.push(format!(
                "#VE: module injected {}, image took {}",
                st.access(AccessKind::Ve),
                s.ves
            ));
        }
        // Accepted memory is MAPPED; memory nobody asked for is FREE.
        let mapped = |gpa: u64| m.leaf(Gpa::new_truncate(gpa)).state == SeptState::Mapped;
        let mut gpa = 0;
        while gpa < selftest::EAGER_BELOW {
            if !mapped(gpa) {
                bad.push(format!("{gpa:#x} (eagerly accepted) is not MAPPED"));
            }
            gpa += 4096 * 61;
        }
        for g in [selftest::LAZY_GPA, selftest::VE_GPA, selftest::CONVERT.0] {
            if !mapped(g) {
                bad.push(format!("{g:#x} (accepted by the image) is not MAPPED"));
            }
        }
        for g in [300 << 20, MEMORY - 4096] {
            let leaf = m.leaf(Gpa::new_truncate(g));
            if leaf.state != SeptState::Free {
                bad.push(format!("{g:#x} (never touched) is {:?}", leaf.state));
            }
        }
        bad
    }

    /// Invariant checks of the multi-CPU part (a host of its own); returns the violations.
    fn check_smp(&self, extra: &SmpExtra) -> Vec<String> {
        let (mut bad, summary) = self.check_host();
        let m = self.host.module();
        let vmm = self.host.stats();
        let Some((status, s)) = summary else {
            return bad;
        };
        let tests = smp::CPUS as u64 * Smp::TESTS_PER_CPU;
        if status != 0 || s.failed != 0 || s.passed != tests {
            bad.push(format!(
                "multi-CPU self-test: status {status}, {} passed, {} failed (want {tests})",
                s.passed, s.failed
            ));
        }
        let st = m.stats();
        let ok = CallOutcome::Status(StatusCode::Success);
        let setup_2m = IMAGE_END / PageLevel::Size2M.size();
        let module_2m = st.get_at(CallKind::Accept, PageLevel::Size2M, ok);
        let module_4k = st.get_at(CallKind::Accept, PageLevel::Size4K, ok);
        if module_2m != s.accepted[1] + setup_2m || module_4k != s.accepted[0] {
            bad.push(format!(
                "ACCEPTs: module 2M {module_2m} 4K {module_4k}, vCPUs 2M {} 4K {} + setup 2M \
                 {setup_2m}",
                s.accepted[1], s.accepted[0]
            ));
        }
        // Every unit exactly once: each 2M unit of [BASE, END) once, the converted units once
        // more after the conversion, nothing at 4K.
        let units = (smp::END - smp::BASE) / smp::UNIT;
        let reaccepted = (smp::CONVERT.1 - smp::CONVERT.0) / smp::UNIT;
        if s.accepted[1] != units + reaccepted || s.accepted[0] != 0 {
            bad.push(format!(
                "accepted exactly once: want {units} units + {reaccepted} after the \
                 conversion at 2M, the vCPUs accepted {} at 2M and {} at 4K",
                s.accepted[1], s.accepted[0]
            ));
        }
        if st.access(AccessKind::Ve) != s.ves {
            bad.push(format!(
                "#VE: module injected {}, vCPUs took {}",
                st.access(AccessKind::Ve),
                s.ves
            ));
        }
        if vmm.map_gpa_calls != s.map_gpa.0 {
            bad.push(format!(
                "MapGPA: host served {}, vCPUs made {}",
                vmm.map_gpa_calls, s.map_gpa.0
            ));
        }
        if extra.ve_handled + extra.ve_meanwhile > s.ves {
            bad.push(format!(
                "#VE verdicts {} + {} exceed the #VEs taken {}",
                extra.ve_handled, extra.ve_meanwhile, s.ves
            ));
        }
        let mut gpa = smp::BASE;
        while gpa < smp::END {
            for at in [gpa, gpa + smp::UNIT - 4096] {
                let leaf = m.leaf(Gpa::new_truncate(at));
                if leaf.state != SeptState::Mapped {
                    bad.push(format!(
                        "{at:#x} (accepted by the vCPUs) is {:?}",
                        leaf.state
                    ));
                }
            }
            gpa += smp::UNIT;
        }
        bad
    }

    /// Prints the multi-CPU report; true when every invariant holds.
    pub(crate) fn report_smp(&self, mode: &str, extra: &SmpExtra) -> bool {
        let st = self.host.module().stats();
        let tdcalls: u64 = CallKind::ALL
            .iter()
            .filter(|k| !k.is_seamcall())
            .map(|&k| st.total(k))
            .sum();
        let requests: u64 = lock(&self.requests).values().sum();
        if let Some((_, s)) = *lock(&self.summary) {
            println!("TDMEM-HOST-SMP-GUEST-SUMMARY {s}");
        }
        println!(
            "TDMEM-HOST-SMP vcpus={} requests={requests} tdcalls={tdcalls} ve_injected={} \
             ve_handled={} ve_accepted_meanwhile={} ept_violations={}",
            smp::CPUS,
            st.access(AccessKind::Ve),
            extra.ve_handled,
            extra.ve_meanwhile,
            self.host.stats().ept_violations
        );
        let bad = self.check_smp(extra);
        if bad.is_empty() {
            println!("TDMEM-HOST-SMP-RESULT ok mode={mode} invariants=ok");
            true
        } else {
            for b in &bad {
                println!("invariant violated: {b}");
            }
            println!(
                "TDMEM-HOST-SMP-RESULT FAILED mode={mode} violations={}",
                bad.len()
            );
            false
        }
    }

    pub(crate) fn report(&self, mode: &str) -> bool {
        if let Some((_, s)) = *lock(&self.summary) {
            println!("TDMEM-HOST-GUEST-SUMMARY {s}");
        }
        match serde_json::to_string(&self.counts()) {
            Ok(json) => println!("TDMEM-HOST-COUNTS {json}"),
            Err(e) => eprintln!("tdhost: cannot serialize the counts: {e}"),
        }
        let bad = self.check();
        if bad.is_empty() {
            println!("TDMEM-HOST-RESULT ok mode={mode} invariants=ok");
            true
        } else {
            for b in &bad {
                println!("invariant violated: {b}");
            }
            println!(
                "TDMEM-HOST-RESULT FAILED mode={mode} violations={}",
                bad.len()
            );
            false
        }
    }
}

/// What the multi-CPU DONE carries after the [`Summary`] counts.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct SmpExtra {
    ve_handled: u64,
    ve_meanwhile: u64,
}

impl SmpExtra {
    /// Index of the first extra count in DONE's counts.
    const AT: usize = 11;

    pub(crate) fn from_done(req: &Request) -> Option<SmpExtra> {
        match *req {
            Request::Done { counts, n, .. } if n >= Self::AT + 2 => Some(SmpExtra {
                ve_handled: counts[Self::AT],
                ve_meanwhile: counts[Self::AT + 1],
            }),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::Value;

    use super::*;

    fn keys(v: &Value) -> Vec<String> {
        v.as_object().expect("an object").keys().cloned().collect()
    }

    #[test]
    fn counts_use_tdsim_key_names_for_the_same_quantities() {
        let exec = Exec::new(1);
        let host = serde_json::to_value(exec.counts()).expect("serialize");
        let sim = serde_json::to_value(tdmem_sim::report::Counts::default()).expect("tdsim");
        for key in [
            "seamcalls",
            "accept_executions",
            "accept_interrupted",
            "ve_injected",
            "ept_violation_exits",
            "map_gpa_calls",
            "map_gpa_retries",
            "fault_splits",
            "zap_splits",
            "merges",
            "poisoned_pages",
        ] {
            let (h, s) = (&host[key], &sim[key]);
            assert!(!h.is_null() && !s.is_null(), "{key} missing");
            assert_eq!(h.is_object(), s.is_object(), "{key} has another shape");
        }
        assert_eq!(keys(&host["seamcalls"]), keys(&sim["seamcalls"]));
        assert_eq!(
            keys(&host["accept_outcomes"]),
            keys(&sim["accept_by_level"])
        );
        assert_eq!(keys(&host["mmu_maps"]), keys(&sim["accept_by_level"]));
        for gone in ["ept_violations", "demotes", "promotes", "accept"] {
            assert!(
                host.get(gone).is_none(),
                "{gone} is a key tdsim does not use"
            );
        }
    }

    #[test]
    fn counts_are_one_json_line_and_count_the_image_memory_build() {
        let exec = Exec::new(1);
        let counts = exec.counts();
        let line = serde_json::to_string(&counts).expect("serialize");
        let back: Value = serde_json::from_str(&line).expect("JSON");
        assert_eq!(back, serde_json::to_value(&counts).expect("a value"));
        // The image's memory is accepted in 2M pages at build time, through the fault path.
        assert_eq!(
            counts.accept_outcomes.m2.ok,
            IMAGE_END / PageLevel::Size2M.size()
        );
        assert_eq!(counts.accept_outcomes.k4, AcceptOutcomes::default());
        assert_eq!(counts.ept_violation_exits, counts.accept_outcomes.m2.exit);
        assert!(counts.requests.is_empty() && counts.answers.is_empty());
    }
}
