#![no_main]
//! See `tend_profiles::fuzzing::profile_loader` for the input format and the checks.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| tend_profiles::fuzzing::profile_loader(data));
