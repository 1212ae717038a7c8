#![no_main]
//! Fuzz target: see clubcast::fuzzing::wire.
libfuzzer_sys::fuzz_target!(|data: &[u8]| clubcast::fuzzing::wire(data));
