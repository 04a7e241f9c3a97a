#![no_main]
//! See `tend_profiles::fuzzing::modbus_registers` for the input format and the checks.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| tend_profiles::fuzzing::modbus_registers(data));
