//! A private channel end to end: `keygen --private`, a publisher that encrypts, a relay that
//! verifies and forwards ciphertext it cannot read, a watcher with the content key that plays
//! the stream byte for byte, and one without it that says clearly why it cannot.

mod common;

use std::time::Duration;

use common::{clubcast, publish_file, run_ok, stderr_of, synthetic_input, watcher_with, Relay};

#[test]
fn only_watchers_with_the_content_key_play_a_private_channel() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("channel.key");
    let out = run_ok(clubcast().args(["keygen", "--private", "--out"]).arg(&key));
    let public = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let content = dir.path().join("channel.key.content");
    assert!(String::from_utf8_lossy(&out.stderr).contains("channel.key.content"));
    assert!(content.exists());

    let relay = Relay::start(&[]);
    let with_key_out = dir.path().join("with-key.ts");
    let mut with_key = watcher_with(
        relay.addr,
        &public,
        &with_key_out,
        &["--content-key".as_ref(), content.as_os_str()],
    );
    let mut without = watcher_with(relay.addr, &public, &dir.path().join("without.ts"), &[]);
    relay.wait_metric("clubcast_relay_subscribers", 2.0, Duration::from_secs(10));

    let (input, ts) = synthetic_input(dir.path(), 3, 2_000_000);
    publish_file(
        relay.addr,
        &input,
        &key,
        &["--content-key".as_ref(), content.as_os_str()],
    );

    assert!(
        with_key.wait(Duration::from_secs(20)).success(),
        "{}",
        stderr_of(&mut with_key)
    );
    assert_eq!(
        std::fs::read(&with_key_out).unwrap(),
        ts,
        "the keyed watcher's output differs"
    );

    let status = without.wait(Duration::from_secs(20));
    let err = stderr_of(&mut without);
    assert!(!status.success());
    assert!(
        err.contains("channel is private") && err.contains("--content-key"),
        "{err}"
    );

    // The relay verified every piece (signatures cover the ciphertext) and read none.
    let accepted = relay.metric("clubcast_relay_pieces_accepted_total");
    assert!(accepted > 100.0, "{accepted}");
    assert_eq!(
        relay.metric("clubcast_relay_dropped_total{reason=\"bad_signature\"}"),
        0.0
    );
}
