#![no_main]
//! See `tend_wire::fuzzing::wire_decode` for the checks.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| tend_wire::fuzzing::wire_decode(data));
