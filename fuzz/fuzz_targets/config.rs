#![no_main]
//! Fuzz target: see clubcast::fuzzing::config.
libfuzzer_sys::fuzz_target!(|data: &[u8]| clubcast::fuzzing::config(data));
