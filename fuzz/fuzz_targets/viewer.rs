#![no_main]
//! Fuzz target: see clubcast::fuzzing::viewer.
libfuzzer_sys::fuzz_target!(|data: &[u8]| clubcast::fuzzing::viewer(data));
