#![no_main]
//! Fuzz target: see clubcast::fuzzing::metrics_text.
libfuzzer_sys::fuzz_target!(|data: &[u8]| clubcast::fuzzing::metrics_text(data));
