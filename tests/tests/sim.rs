//! The simulated TD end to end: every scenario passes its invariants at small sizes, runs are
//! deterministic, and every invariant check catches a deliberately broken host or guest.

use tdmem_sim::sabotage::Sabotage;
use tdmem_sim::scenario::Scenario;
use tdmem_sim::{run, GuestPolicy, HostPolicy, Mode, Report, SimConfig};

fn small(scenario: Scenario) -> SimConfig {
    SimConfig {
        memory: 256 << 20,
        vcpus: 4,
        ..SimConfig::new(scenario)
    }
}

fn go(config: SimConfig) -> Report {
    run(&config, &|_, _| {}).expect("valid configuration")
}

#[test]
fn every_scenario_passes_at_small_size() {
    for (scenario, name, _) in Scenario::ALL {
        let r = go(small(scenario));
        assert!(r.passed(), "{name}:\n{}", r.summary());
        assert!(r.counts.accept_calls > 0, "{name} accepted nothing");
        assert_eq!(r.scenario, name);
    }
}

#[test]
fn every_scenario_passes_under_baseline_hosts_and_a_4k_guest() {
    for (scenario, name, _) in Scenario::ALL {
        for host in [HostPolicy::Kvm4k, HostPolicy::KvmHugepage] {
            let r = go(SimConfig {
                host,
                ..small(scenario)
            });
            assert!(r.passed(), "{name} on {host:?}:\n{}", r.summary());
        }
        let r = go(SimConfig {
            guest: GuestPolicy::Asterinas,
            memory: 128 << 20,
            ..small(scenario)
        });
        assert!(r.passed(), "{name} with a 4K guest:\n{}", r.summary());
    }
}

#[test]
fn same_seed_same_counts() {
    for scenario in [Scenario::Mixed, Scenario::VeSplit] {
        let a = go(small(scenario));
        let b = go(small(scenario));
        assert_eq!(a.counts, b.counts);
        assert_eq!(a.modelled_time_us, b.modelled_time_us);
        assert_eq!(a.schedule_switches, b.schedule_switches);
        let c = go(SimConfig {
            seed: 2,
            ..small(scenario)
        });
        assert_ne!(a.counts, c.counts, "another seed, another run");
    }
}

#[test]
fn our_host_keeps_swiotlb_memory_huge_and_the_4k_host_does_not() {
    let ours = go(small(Scenario::Swiotlb));
    assert!(ours.counts.zap_splits > 0);
    assert_eq!(ours.counts.merges, ours.counts.zap_splits);
    assert!(ours.huge_ratio() >= 0.99, "{}", ours.summary());
    let series = go(SimConfig {
        host: HostPolicy::KvmHugepage,
        ..small(Scenario::Swiotlb)
    });
    assert_eq!(series.counts.merges, 0);
    assert!(series.huge_ratio() < ours.huge_ratio());
    let mainline = go(SimConfig {
        host: HostPolicy::Kvm4k,
        ..small(Scenario::Swiotlb)
    });
    assert_eq!(mainline.huge_private_bytes, 0);
}

#[test]
fn the_ve_split_path_demotes_for_a_4k_guest_and_never_for_ours() {
    let ours = go(small(Scenario::VeSplit));
    assert!(ours.counts.ve_injected > 0);
    assert_eq!(ours.counts.fault_splits, 0);
    let small_guest = go(SimConfig {
        guest: GuestPolicy::Asterinas,
        ..small(Scenario::VeSplit)
    });
    assert!(small_guest.counts.fault_splits > 0);
    assert!(small_guest.passed(), "{}", small_guest.summary());
}

#[test]
fn a_td_without_pending_ve_is_killed_on_its_first_early_touch() {
    let r = go(SimConfig {
        pending_ve: false,
        ..small(Scenario::VeSplit)
    });
    assert!(!r.passed());
    assert!(
        r.errors.iter().any(|e| e.contains("PENDING_EPT_VIOLATION")),
        "{:?}",
        r.errors
    );
    assert_eq!(r.invariant_violations, 0);
}

#[test]
fn every_invariant_check_catches_its_breakage() {
    every_breakage_is_caught(small(Scenario::BootLazy));
}

/// The breakages the end-of-run check finds, in parallel mode on a TD of several GiB, where
/// that check is split over the vCPU threads by GPA. (A double accept is seen when the ACCEPT
/// succeeds and a livelock by the vCPU loop, not by the final check.)
#[test]
fn every_invariant_check_catches_its_breakage_with_the_final_check_split() {
    every_breakage_is_caught_of(
        SimConfig {
            memory: 3 << 30,
            mode: Mode::Parallel,
            ..small(Scenario::BootLazy)
        },
        &[
            Sabotage::RemoveAccepted,
            Sabotage::SharedButMapped,
            Sabotage::CorruptContent,
            Sabotage::PoisonMapped,
        ],
    );
}

fn every_breakage_is_caught(base: SimConfig) {
    every_breakage_is_caught_of(base, &Sabotage::ALL.map(|(s, _)| s));
}

fn every_breakage_is_caught_of(base: SimConfig, which: &[Sabotage]) {
    for (sabotage, kind) in Sabotage::ALL.into_iter().filter(|(s, _)| which.contains(s)) {
        let kind: tdmem_sim::ViolationKind = kind;
        let r = go(SimConfig {
            sabotage: Some(sabotage),
            guest: if sabotage == Sabotage::IgnoreSplit {
                GuestPolicy::Asterinas
            } else {
                GuestPolicy::Ours
            },
            ..base
        });
        let found = r
            .violations_by_kind
            .iter()
            .find(|(k, _)| *k == kind)
            .map_or(0, |(_, n)| *n);
        assert!(
            found > 0,
            "{sabotage:?} did not trip {kind:?}:\n{}",
            r.summary()
        );
        assert!(!r.passed());
    }
}

#[test]
fn bad_configurations_are_refused() {
    assert!(run(
        &SimConfig {
            memory: (64 << 20) + 4096,
            ..small(Scenario::Mixed)
        },
        &|_, _| {}
    )
    .is_err());
    assert!(run(
        &SimConfig {
            vcpus: 0,
            ..small(Scenario::Mixed)
        },
        &|_, _| {}
    )
    .is_err());
}

#[test]
fn every_scenario_passes_in_parallel_mode() {
    for (scenario, name, _) in Scenario::ALL {
        let r = go(SimConfig {
            mode: Mode::Parallel,
            ..small(scenario)
        });
        assert!(r.passed(), "{name} in parallel mode:\n{}", r.summary());
        assert_eq!(r.mode, "parallel");
        assert!(r.counts.accept_calls > 0, "{name} accepted nothing");
    }
}

/// Busiest vCPU's modelled time over the mean of all vCPUs, minus one.
fn imbalance(r: &Report) -> f64 {
    let t: Vec<f64> = r
        .per_vcpu
        .iter()
        .map(|v| v.stats.modelled_ns as f64)
        .collect();
    let mean = t.iter().sum::<f64>() / t.len() as f64;
    t.iter().copied().fold(0.0, f64::max) / mean - 1.0
}

/// Boot acceptance is shared so that the busiest vCPU stays within 2% of total/N of the
/// modelled time, in both modes, with rare switches (vCPUs that run long stretches, i.e. at
/// uneven speeds) and with frequent ones. (Before the shrinking claims and the modelled-time
/// scheduling, `switch_every` 64 left 64 GiB on 8 vCPUs 14% above the bound.)
#[test]
fn boot_acceptance_is_balanced_within_2_percent() {
    for (mode, memory) in [
        (Mode::Deterministic, 64u64 << 30),
        (Mode::Parallel, 16 << 30),
    ] {
        for switch_every in [4, 64, 1000] {
            let r = go(SimConfig {
                memory,
                vcpus: 8,
                switch_every,
                mode,
                ..SimConfig::new(Scenario::BootEager)
            });
            assert!(r.passed(), "{}", r.summary());
            let over = imbalance(&r);
            assert!(
                over <= 0.02,
                "{mode} mode, switch every {switch_every}: busiest vCPU {:.2}% above the mean",
                over * 100.0
            );
        }
    }
}

/// A vCPU whose thread panics before the boot's barrier does not leave the others waiting at
/// it: the run ends with that vCPU's error, in both modes. (A panic skipped the count of
/// finished vCPUs, and a parallel run then waited at the barrier forever.)
#[test]
fn a_vcpu_that_panics_does_not_hold_the_others_at_a_barrier() {
    for mode in [Mode::Parallel, Mode::Deterministic] {
        let config = SimConfig {
            mode,
            sabotage: Some(Sabotage::VcpuPanic),
            ..small(Scenario::BootEager)
        };
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(go(config));
        });
        let r = rx
            .recv_timeout(std::time::Duration::from_secs(120))
            .unwrap_or_else(|_| panic!("{mode} mode: the run hung"));
        assert!(!r.passed(), "{mode} mode:\n{}", r.summary());
        assert_eq!(r.errors.len(), 1, "{mode} mode:\n{}", r.summary());
        assert!(r.errors[0].contains("panicked"), "{}", r.errors[0]);
    }
}
