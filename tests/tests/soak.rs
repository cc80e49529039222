//! The soak of the host half with injected faults: a fast run here, 10^6 operations ignored
//! (run it with `cargo run --release -p tdmem-tests --bin soak -- --ops 1000000`).

use tdmem_tests::soak::{run, SoakConfig};

#[test]
fn soak_with_injected_faults_keeps_every_invariant() {
    let r = run(SoakConfig {
        ops: 5_000,
        ..SoakConfig::default()
    });
    println!("{r}");
    assert_eq!(r.ops, 5_000);
    assert!(r.faults_injected > 300, "{r}");
    assert!(r.map_gpa_ok > 100, "{r}");
    assert_eq!(r.violations, 0, "{r}");
    assert_eq!(r.lost_private_pages, 0, "{r}");
}

#[test]
fn soak_seeds_are_deterministic() {
    let cfg = SoakConfig {
        ops: 1_000,
        seed: 99,
        ..SoakConfig::default()
    };
    assert_eq!(run(cfg), run(cfg));
}

#[test]
#[ignore = "10^6 operations: run in release (see docs/fuzzing.md)"]
fn soak_a_million_operations() {
    let r = run(SoakConfig {
        ops: 1_000_000,
        ..SoakConfig::default()
    });
    println!("{r}");
    assert_eq!(r.violations, 0, "{r}");
    assert_eq!(r.lost_private_pages, 0, "{r}");
}
