//! A private channel end to end: `keygen --private`, a publisher that encrypts, a relay that
//! verifies and forwards ciphertext it cannot read, a watcher with the content key that plays
//! the stream byte for byte, and one without it that says clearly why it cannot.

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::{clubcast, Proc, Relay};

#[test]
fn only_watchers_with_the_content_key_play_a_private_channel() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("channel.key");
    let out = clubcast()
        .args(["keygen", "--private", "--out"])
        .arg(&key)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let public = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let content = dir.path().join("channel.key.content");
    assert!(String::from_utf8_lossy(&out.stderr).contains("channel.key.content"));
    assert!(content.exists());

    let relay = Relay::start(&[]);
    let watch = |name: &str, extra: &[&std::ffi::OsStr]| {
        let output = dir.path().join(format!("{name}.ts"));
        let mut cmd = clubcast();
        cmd.args([
            "watch",
            "--relay",
            &relay.addr.to_string(),
            "--channel",
            &public,
        ])
        .args(["--idle-timeout", "20s", "--output"])
        .arg(&output)
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
        (Proc::spawn(name, &mut cmd), output)
    };
    let (mut with_key, with_key_out) =
        watch("with-key", &["--content-key".as_ref(), content.as_os_str()]);
    let (mut without, _) = watch("without-key", &[]);
    relay.wait_metric("clubcast_relay_subscribers", 2.0, Duration::from_secs(10));

    let input = dir.path().join("in.ts");
    let mut ts = Vec::new();
    clubcast::ts::SyntheticTs::new(2_000_000).generate_until(Duration::from_secs(3), &mut ts);
    std::fs::write(&input, &ts).unwrap();
    let out = clubcast()
        .args([
            "publish",
            "--max-bitrate",
            "8mbit",
            "--to",
            &relay.addr.to_string(),
        ])
        .arg("--input")
        .arg(&input)
        .arg("--key")
        .arg(&key)
        .arg("--content-key")
        .arg(&content)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    assert!(
        with_key.wait(Duration::from_secs(20)).success(),
        "{}",
        common::stderr_of(&mut with_key)
    );
    assert_eq!(
        std::fs::read(&with_key_out).unwrap(),
        ts,
        "the keyed watcher's output differs"
    );

    let status = without.wait(Duration::from_secs(20));
    let err = common::stderr_of(&mut without);
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
