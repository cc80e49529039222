//! The cells of the benchmark matrix: their keys (guest policy x host policy x scenario x
//! memory size x vCPUs), which of them are simulated, extrapolated or skipped and why, and the
//! numbers kept from each cell's report.

use tdmem_sim::cost::CostTable;
use tdmem_sim::Report;

/// Guest policies, in table order.
pub(super) const GUESTS: [&str; 5] = ["ours", "linux", "td-shim", "asterinas", "ovmf"];
pub(super) const HOSTS: [&str; 3] = ["ours", "kvm-4k", "kvm-hugepage"];
pub(super) const SCENARIOS: [&str; 6] = [
    "boot-eager",
    "boot-lazy",
    "swiotlb",
    "ve-split",
    "convert-storm",
    "mixed",
];
/// Seed of every cell.
pub(super) const SEED: u64 = 1;
/// `--switch-every` of every cell: the counts of boot-eager do not depend on it; the modelled
/// critical path slightly does (which vCPU takes which chunk).
pub(super) const SWITCH_EVERY: u64 = 64;
/// The scenario traffic runs at this vCPU count only (boot-eager runs at every count).
pub(super) const TRAFFIC_VCPUS: u32 = 8;
/// Timeline rows every this many scenario steps.
pub(super) const TIMELINE_EVERY: u64 = 4;
/// The size and vCPUs of the headline comparisons.
pub(super) const HEADLINE_GIB: u64 = 64;
pub(super) const HEADLINE_VCPUS: u32 = 8;

pub(super) const SKIP_4K_MANY: &str = "skipped to keep the bench short: one exit per 4K page costs about 1.2 s of wall time per 4 GiB here, and the counts do not depend on vCPUs (see the 1- and 8-vCPU rows)";
pub(super) const SKIP_4K_TRAFFIC: &str = "skipped: the eager prefix alone is 16.7M 4K exits and the traffic's counts do not scale linearly, so they are not extrapolated";

pub(super) const SKIP_BASELINE_GUEST_1T: &str = "skipped: above 64 GiB the traffic scenarios run with our guest only, to keep the matrix within ~15 minutes on 2 cores; the baseline guests' traffic is in the 4 and 64 GiB rows";
/// Extra runs of the 1 TiB headline cell, for its wall time on a machine that may be busy.
pub(super) const WALL_REPEATS: usize = 3;

/// How a cell gets its numbers.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum How {
    Run,
    Extrapolated { from_gib: u64 },
    Skipped(&'static str),
}

/// One cell of the matrix.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct Key {
    pub(super) scenario: &'static str,
    pub(super) gib: u64,
    pub(super) vcpus: u32,
    pub(super) guest: &'static str,
    pub(super) host: &'static str,
}

impl Key {
    pub(super) fn four_k(&self) -> bool {
        self.guest == "asterinas" || self.host == "kvm-4k"
    }

    pub(super) fn file_name(&self) -> String {
        format!(
            "{}-{}g-{}v-{}-{}.json",
            self.scenario, self.gib, self.vcpus, self.guest, self.host
        )
    }

    pub(super) fn tdsim_args(&self) -> Vec<String> {
        vec![
            "run".into(),
            "--scenario".into(),
            self.scenario.into(),
            "--memory".into(),
            format!("{}G", self.gib),
            "--vcpus".into(),
            self.vcpus.to_string(),
            "--guest-policy".into(),
            self.guest.into(),
            "--host-policy".into(),
            self.host.into(),
            "--seed".into(),
            SEED.to_string(),
            "--switch-every".into(),
            SWITCH_EVERY.to_string(),
        ]
    }

    pub(super) fn command_line(&self) -> String {
        format!("tdsim {}", self.tdsim_args().join(" "))
    }
}

/// The numbers kept from one report.
#[derive(Debug, Clone, Default)]
pub(super) struct Rep {
    pub(super) accept_calls: u64,
    pub(super) k4: u64,
    pub(super) m2: u64,
    pub(super) g1: u64,
    pub(super) size_mismatch: u64,
    pub(super) exits: u64,
    pub(super) ve: u64,
    pub(super) map_gpa: u64,
    pub(super) seamcalls: u64,
    pub(super) demote: u64,
    pub(super) promote: u64,
    pub(super) splits: u64,
    pub(super) merges: u64,
    pub(super) private: u64,
    pub(super) huge: u64,
    pub(super) optimal: u64,
    pub(super) modelled_us: u64,
    /// `None` when extrapolated.
    pub(super) wall_ms: Option<u64>,
    pub(super) violations: u64,
    pub(super) errors: usize,
    /// The cost table the report's modelled time came from.
    pub(super) cost: CostTable,
}

impl Rep {
    pub(super) fn from_report(r: &Report) -> Rep {
        let c = &r.counts;
        let s = &c.seamcalls;
        Rep {
            accept_calls: c.accept_calls,
            k4: c.accept_by_level.k4,
            m2: c.accept_by_level.m2,
            g1: c.accept_by_level.g1,
            size_mismatch: c.accept_size_mismatch,
            exits: c.ept_violation_exits,
            ve: c.ve_injected,
            map_gpa: c.map_gpa_calls,
            seamcalls: s.add
                + s.sept_add
                + s.aug
                + s.block
                + s.track
                + s.unblock
                + s.remove
                + s.demote
                + s.promote,
            demote: s.demote,
            promote: s.promote,
            splits: c.fault_splits + c.zap_splits,
            merges: c.merges,
            private: r.private_bytes,
            huge: r.huge_private_bytes,
            optimal: r.optimal_huge_private_bytes,
            modelled_us: r.modelled_time_us,
            wall_ms: Some(r.wall_ms),
            violations: r.invariant_violations as u64,
            errors: r.errors.len(),
            cost: r.cost_table,
        }
    }

    /// boot-eager at `to_gib` from the same cell at `from_gib`: counts and bytes scale with
    /// memory; the modelled critical path with the 1 GiB boot chunks per vCPU.
    pub(super) fn extrapolate(&self, from_gib: u64, to_gib: u64, vcpus: u32) -> Rep {
        let s = |x: u64| x * to_gib / from_gib;
        let v = u64::from(vcpus);
        let per_vcpu = |g: u64| g.div_ceil(v).max(1);
        Rep {
            accept_calls: s(self.accept_calls),
            k4: s(self.k4),
            m2: s(self.m2),
            g1: s(self.g1),
            size_mismatch: s(self.size_mismatch),
            exits: s(self.exits),
            ve: s(self.ve),
            map_gpa: s(self.map_gpa),
            seamcalls: s(self.seamcalls),
            demote: s(self.demote),
            promote: s(self.promote),
            splits: s(self.splits),
            merges: s(self.merges),
            private: s(self.private),
            huge: s(self.huge),
            optimal: s(self.optimal),
            modelled_us: self.modelled_us * per_vcpu(to_gib) / per_vcpu(from_gib),
            wall_ms: None,
            violations: self.violations,
            errors: self.errors,
            cost: self.cost,
        }
    }

    pub(super) fn ratio(&self) -> f64 {
        if self.optimal == 0 {
            1.0
        } else {
            self.huge as f64 / self.optimal as f64
        }
    }

    pub(super) fn passed(&self) -> bool {
        self.violations == 0 && self.errors == 0
    }
}

/// How the cell `k` gets its numbers, given the sizes of the run; `None` when it is not part
/// of the matrix.
pub(super) fn how(k: &Key, sizes: &[u64]) -> Option<How> {
    if k.scenario == "boot-eager" {
        if k.four_k() && k.vcpus >= 64 {
            return Some(How::Skipped(SKIP_4K_MANY));
        }
        if k.four_k() && k.gib > 64 {
            return Some(if sizes.contains(&64) {
                How::Extrapolated { from_gib: 64 }
            } else {
                How::Skipped("skipped: extrapolation needs the 64 GiB cell (--sizes)")
            });
        }
        return Some(How::Run);
    }
    if k.vcpus != TRAFFIC_VCPUS {
        return None;
    }
    if k.four_k() && k.gib > 64 {
        return Some(How::Skipped(SKIP_4K_TRAFFIC));
    }
    if k.gib > 64 && k.guest != "ours" {
        return Some(How::Skipped(SKIP_BASELINE_GUEST_1T));
    }
    Some(How::Run)
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(super) fn key(
        scenario: &'static str,
        gib: u64,
        vcpus: u32,
        guest: &'static str,
        host: &'static str,
    ) -> Key {
        Key {
            scenario,
            gib,
            vcpus,
            guest,
            host,
        }
    }

    #[test]
    pub(super) fn matrix_rules() {
        let sizes = [4, 64, 1024];
        assert_eq!(
            how(&key("boot-eager", 1024, 8, "ours", "ours"), &sizes),
            Some(How::Run)
        );
        assert_eq!(
            how(&key("boot-eager", 1024, 8, "linux", "kvm-4k"), &sizes),
            Some(How::Extrapolated { from_gib: 64 })
        );
        assert!(matches!(
            how(&key("boot-eager", 4, 64, "asterinas", "ours"), &sizes),
            Some(How::Skipped(_))
        ));
        assert_eq!(how(&key("swiotlb", 64, 1, "ours", "ours"), &sizes), None);
        assert!(matches!(
            how(&key("swiotlb", 1024, 8, "ours", "kvm-4k"), &sizes),
            Some(How::Skipped(_))
        ));
        assert_eq!(
            how(&key("swiotlb", 64, 8, "ovmf", "kvm-4k"), &sizes),
            Some(How::Run)
        );
    }

    #[test]
    pub(super) fn extrapolation_scales_counts_and_chunks_per_vcpu() {
        let r = Rep {
            accept_calls: 16_809_985,
            exits: 16_777_216,
            huge: 0,
            optimal: 64 << 30,
            modelled_us: 34_400_000,
            wall_ms: Some(30_000),
            ..Rep::default()
        };
        let x = r.extrapolate(64, 1024, 8);
        assert_eq!(x.accept_calls, 16_809_985 * 16);
        assert_eq!(x.exits, 268_435_456);
        assert_eq!(x.optimal, 1 << 40);
        assert_eq!(x.modelled_us, 34_400_000 * 16);
        assert_eq!(x.wall_ms, None);
        // 4 GiB on 64 vCPUs keeps 4 busy; 64 GiB keeps 64 busy: one chunk each either way.
        assert_eq!(r.extrapolate(4, 64, 64).modelled_us, r.modelled_us);
    }
}
