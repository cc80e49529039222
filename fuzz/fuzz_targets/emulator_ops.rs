//! Arbitrary host/guest call sequences against the TDX-module emulator: check_tree after each.
//! The property lives in `tdmem_tests::props::emulator_ops` (also run by proptest on stable).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    tdmem_tests::props::emulator_ops(data);
});
