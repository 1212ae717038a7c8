#![no_main]
//! Fuzz target: see clubcast::fuzzing::tracker.
libfuzzer_sys::fuzz_target!(|data: &[u8]| clubcast::fuzzing::tracker(data));
