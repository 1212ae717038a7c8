#![no_main]
//! Fuzz target: see clubcast::fuzzing::frame.
libfuzzer_sys::fuzz_target!(|data: &[u8]| clubcast::fuzzing::frame(data));
