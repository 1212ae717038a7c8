#![no_main]
//! Fuzz target: see clubcast::fuzzing::fault_spec.
libfuzzer_sys::fuzz_target!(|data: &[u8]| clubcast::fuzzing::fault_spec(data));
