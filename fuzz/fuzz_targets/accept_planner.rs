//! The acceptor against scripted module answers: stays in its range, never re-accepts a page, terminates.
//! The property lives in `tdmem_tests::props::accept_planner` (also run by proptest on stable).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    tdmem_tests::props::accept_planner(data);
});
