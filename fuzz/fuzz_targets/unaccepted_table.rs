//! The Linux unaccepted-memory table parser: never panics, every query stays in bounds.
//! The property lives in `tdmem_tests::props::unaccepted_table` (also run by proptest on stable).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    tdmem_tests::props::unaccepted_table(data);
});
