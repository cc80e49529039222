//! The MapGPA loop against arbitrary RETRY/R11 answers: bounded, never resumes outside [start, end).
//! The property lives in `tdmem_tests::props::map_gpa_resume` (also run by proptest on stable).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    tdmem_tests::props::map_gpa_resume(data);
});
