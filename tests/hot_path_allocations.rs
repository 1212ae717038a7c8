//! The relay's per-packet path allocates nothing: a counting global allocator watches the relay
//! worker threads (outside Ed25519 batch verification, which allocates per batch) while 10,000
//! pieces are forwarded to subscribers on loopback, on two workers.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use clubcast::engine::{on_hot_path, Backend, EngineConfig, PollMode, RelayEngine, ZeroCopy};
use clubcast::loadgen::{run_load, LoadConfig};
use clubcast::metrics::RelayMetrics;

struct Counting;

static HOT_PATH_ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

// SAFETY: every call is forwarded unchanged to the system allocator; counting has no effect on
// the memory handed out.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if on_hot_path() {
            HOT_PATH_ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        }
        // SAFETY: same contract as our caller's.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as our caller's.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if on_hot_path() {
            HOT_PATH_ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        }
        // SAFETY: same contract as our caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

#[test]
fn forwarding_ten_thousand_pieces_allocates_nothing_on_the_hot_path() {
    // One backend after the other: the counter is global.
    forward_and_count(Backend::Portable);
    forward_and_count(Backend::Uring {
        zerocopy: ZeroCopy::Auto,
    });
}

fn forward_and_count(backend: Backend) {
    let config = EngineConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        backend,
        workers: 2,
        pin: false,
        poll: PollMode::Adaptive,
        ..EngineConfig::default()
    };
    let metrics = RelayMetrics::new(backend.name(), 2);
    let relay = RelayEngine::bind(&config, metrics.clone())
        .unwrap()
        .spawn()
        .unwrap();
    let load = |pieces: u64| LoadConfig {
        relay: relay.addr(),
        subscribers: 8,
        rate_pps: 2_000,
        payload: 1128,
        duration: Duration::from_millis(pieces / 2),
        receiver_threads: 1,
        progress: false,
        key_seed: None,
        forge_every: 0,
    };
    // Warm-up: first subscriptions and channels grow tables; that is the control path.
    run_load(&load(400)).unwrap();
    let before = HOT_PATH_ALLOCATIONS.load(Ordering::Relaxed);
    let accepted_before = metrics.stats().pieces_accepted;
    let report = run_load(&load(10_000)).unwrap();
    let during = HOT_PATH_ALLOCATIONS.load(Ordering::Relaxed) - before;
    relay.stop().unwrap();
    let forwarded = metrics.stats().pieces_accepted - accepted_before;
    assert!(forwarded >= 10_000, "only {forwarded} pieces forwarded");
    assert!(report.delivered_ratio > 0.99, "{}", report.to_json());
    assert_eq!(
        during, 0,
        "{during} allocations on the hot path over {forwarded} pieces"
    );
}
