//! The fuzz targets' saved inputs, run on stable Rust: every seed and every input that once
//! crashed a target (`fuzz/seeds/TARGET/`, `fuzz/regressions/TARGET/`) goes through the same
//! entry point the fuzzer drives (`clubcast::fuzzing`). Plus a quick pseudo-random sweep so
//! the entry points run in CI even where cargo fuzz does not.

use std::path::Path;

use clubcast::fuzzing;

/// A fuzz entry point.
type Target = fn(&[u8]);

const TARGETS: [(&str, Target); 9] = [
    ("wire", fuzzing::wire),
    ("relay_core", fuzzing::relay_core),
    ("viewer", fuzzing::viewer),
    ("config", fuzzing::config),
    ("metrics_text", fuzzing::metrics_text),
    ("frame", fuzzing::frame),
    ("fault_spec", fuzzing::fault_spec),
    ("tracker", fuzzing::tracker),
    ("swarm_node", fuzzing::swarm_node),
];

#[test]
fn saved_fuzz_inputs_still_pass() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut ran = 0;
    for (name, target) in TARGETS {
        for kind in ["seeds", "regressions"] {
            let Ok(dir) = std::fs::read_dir(root.join(kind).join(name)) else {
                continue;
            };
            for entry in dir {
                let path = entry.unwrap().path();
                let data = std::fs::read(&path).unwrap();
                let result = std::panic::catch_unwind(|| target(&data));
                assert!(result.is_ok(), "{name}: {} fails again", path.display());
                ran += 1;
            }
        }
    }
    assert!(ran >= 7, "only {ran} saved inputs found");
}

#[test]
fn entry_points_survive_a_pseudo_random_sweep() {
    // xorshift: fixed, so a failure here repeats.
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for (_, target) in TARGETS {
        for _ in 0..300 {
            let len = (next() % 600) as usize;
            let data: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            target(&data);
        }
    }
}
