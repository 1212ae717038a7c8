#![no_main]
//! Fuzz target: see clubcast::fuzzing::swarm_node.
libfuzzer_sys::fuzz_target!(|data: &[u8]| clubcast::fuzzing::swarm_node(data));
