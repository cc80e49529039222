//! The fuzz targets' properties (`fuzz/fuzz_targets/*.rs`) as proptest tests, so that stable CI
//! runs them on every change. The real fuzzers are documented in `docs/fuzzing.md`.

use proptest::prelude::*;
use tdmem_tests::props;

fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        ..ProptestConfig::default()
    }
}

/// A table header that parses (most of the time), followed by arbitrary bitmap and tail bytes.
fn table_bytes() -> impl Strategy<Value = Vec<u8>> {
    (
        prop_oneof![Just(1u32), any::<u32>()],
        prop_oneof![Just(2u32 << 20), Just(4096u32), any::<u32>()],
        prop_oneof![
            Just(0u64),
            (0u64..1 << 40).prop_map(|b| b & !0xFFF),
            any::<u64>()
        ],
        prop::collection::vec(any::<u8>(), 0..96),
        prop_oneof![
            Just(None),
            (0u64..128).prop_map(Some),
            any::<u64>().prop_map(Some)
        ],
    )
        .prop_map(|(version, unit, base, rest, size)| {
            let mut v = Vec::new();
            v.extend_from_slice(&version.to_le_bytes());
            v.extend_from_slice(&unit.to_le_bytes());
            v.extend_from_slice(&base.to_le_bytes());
            let size = size.unwrap_or(rest.len() as u64);
            v.extend_from_slice(&size.to_le_bytes());
            v.extend_from_slice(&rest);
            v
        })
}

proptest! {
    #![proptest_config(config(512))]

    #[test]
    fn unaccepted_table_queries_stay_in_bounds(bytes in table_bytes()) {
        props::unaccepted_table(&bytes);
    }

    #[test]
    fn unaccepted_table_parse_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..64)) {
        props::unaccepted_table(&bytes);
    }

    #[test]
    fn map_gpa_resume_stays_in_bounds(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        props::map_gpa_resume(&bytes);
    }
}

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn accept_planner_accepts_each_page_at_most_once(
        bytes in prop::collection::vec(any::<u8>(), 0..512)
    ) {
        props::accept_planner(&bytes);
    }

    #[test]
    fn emulator_ops_keep_the_sept_well_formed(
        bytes in prop::collection::vec(any::<u8>(), 0..1024)
    ) {
        props::emulator_ops(&bytes);
    }
}

/// A property over fuzzer bytes.
type Check = fn(&[u8]);

/// The committed seed corpus runs here too.
#[test]
fn fuzz_corpus_seeds_pass() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus");
    let targets: [(&str, Check); 4] = [
        ("unaccepted_table", props::unaccepted_table),
        ("accept_planner", props::accept_planner),
        ("map_gpa_resume", props::map_gpa_resume),
        ("emulator_ops", props::emulator_ops),
    ];
    let mut n = 0;
    for (name, check) in targets {
        let Ok(dir) = std::fs::read_dir(root.join(name)) else {
            continue;
        };
        for f in dir.flatten() {
            check(&std::fs::read(f.path()).expect("read seed"));
            n += 1;
        }
    }
    println!("{n} seeds");
}
