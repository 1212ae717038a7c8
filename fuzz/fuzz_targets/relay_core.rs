#![no_main]
//! Fuzz target: see clubcast::fuzzing::relay_core.
libfuzzer_sys::fuzz_target!(|data: &[u8]| clubcast::fuzzing::relay_core(data));
