//! The command line as a user meets it: `--help` explains every flag, and bad flags, missing
//! files, bad keys and absent relays each give one clear error line and a non-zero exit.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::process::Output;

use common::{clubcast, keygen};

fn run(args: &[&str]) -> Output {
    clubcast().args(args).output().unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Fails unless the command failed with an `error:` line mentioning every fragment.
fn assert_error(args: &[&str], fragments: &[&str]) {
    let o = run(args);
    let err = stderr(&o);
    assert!(!o.status.success(), "{args:?} succeeded");
    let line = err
        .lines()
        .find(|l| l.contains("error:"))
        .unwrap_or_else(|| panic!("{args:?}: no error line in {err:?}"));
    for f in fragments {
        assert!(
            line.contains(f),
            "{args:?}: {line:?} does not mention {f:?}"
        );
    }
}

#[test]
fn help_documents_every_flag_of_every_command() {
    let expected: &[(&str, &[&str])] = &[
        ("demo", &["--viewers", "--duration", "--bitrate"]),
        ("keygen", &["--out"]),
        (
            "loadgen",
            &[
                "--relay",
                "--subscribers",
                "--rate",
                "--bitrate",
                "--payload",
                "--duration",
                "--receiver-threads",
                "--json",
                "--find-max",
            ],
        ),
        (
            "publish",
            &[
                "--key",
                "--input",
                "--to",
                "--realtime",
                "--max-bitrate",
                "--clubs",
                "--announce-timeout",
            ],
        ),
        (
            "relay",
            &[
                "--listen",
                "--metrics",
                "--subscriber-timeout",
                "--max-channels",
                "--max-subscribers",
                "--socket-buffer",
            ],
        ),
        ("sim", &["--scenario", "--seed", "--json", "--plot"]),
        (
            "watch",
            &[
                "--relay",
                "--channel",
                "--output",
                "--jitter",
                "--idle-timeout",
            ],
        ),
    ];
    let top = run(&["--help"]);
    assert!(top.status.success());
    let top = String::from_utf8_lossy(&top.stdout);
    for (cmd, flags) in expected {
        assert!(top.contains(cmd), "top-level help lacks {cmd}");
        let o = run(&[cmd, "--help"]);
        assert!(o.status.success());
        let help = String::from_utf8_lossy(&o.stdout);
        for flag in *flags {
            // The flag's line and the line after it must carry a description.
            let line = help
                .lines()
                .position(|l| {
                    let t = l.trim_start();
                    t.starts_with(&format!("{flag} "))
                        || t.starts_with(&format!("{flag}\n"))
                        || *t == **flag
                })
                .unwrap_or_else(|| panic!("`{cmd} --help` lacks {flag}:\n{help}"));
            let described = help.lines().skip(line).take(2).any(|l| {
                let text = l.split(flag).last().unwrap_or("");
                text.split_whitespace()
                    .filter(|w| w.chars().all(char::is_alphabetic))
                    .count()
                    >= 2
            });
            assert!(described, "`{cmd} --help` does not explain {flag}:\n{help}");
        }
    }
}

#[test]
fn bad_flags_and_values_fail_clearly() {
    assert_error(&["relay", "--bogus"], &["--bogus"]);
    assert_error(&["relay", "--listen", "nowhere"], &["nowhere"]);
    assert_error(
        &[
            "publish",
            "--key",
            "k",
            "--to",
            "127.0.0.1:1",
            "--max-bitrate",
            "fast",
        ],
        &["fast"],
    );
    assert_error(
        &["watch", "--relay", "127.0.0.1:1", "--channel", "abc"],
        &["channel"],
    );
    assert_error(&["frobnicate"], &["frobnicate"]);
}

#[test]
fn missing_and_insecure_files_fail_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.key");
    let missing = missing.to_str().unwrap();
    assert_error(
        &["publish", "--key", missing, "--to", "127.0.0.1:9"],
        &["channel key", missing],
    );

    let (key, _) = keygen(dir.path());
    let key = key.to_str().unwrap();
    assert_eq!(
        std::fs::metadata(key).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert_error(&["keygen", "--out", key], &["channel key", key]);

    let no_input = dir.path().join("nope.ts");
    let no_input = no_input.to_str().unwrap();
    assert_error(
        &[
            "publish",
            "--key",
            key,
            "--to",
            "127.0.0.1:9",
            "--input",
            no_input,
        ],
        &[no_input],
    );

    std::fs::set_permissions(key, std::fs::Permissions::from_mode(0o644)).unwrap();
    assert_error(
        &["publish", "--key", key, "--to", "127.0.0.1:9"],
        &["chmod 600"],
    );
}

#[test]
fn publishing_to_an_absent_relay_fails_after_the_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let (key, _) = keygen(dir.path());
    let input = dir.path().join("in.ts");
    std::fs::write(&input, [0x47u8; 188 * 10]).unwrap();
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let to = silent.local_addr().unwrap().to_string();
    assert_error(
        &[
            "publish",
            "--key",
            key.to_str().unwrap(),
            "--to",
            &to,
            "--input",
            input.to_str().unwrap(),
            "--announce-timeout",
            "500ms",
        ],
        &["did not acknowledge", &to],
    );
}

#[test]
fn relay_reports_a_busy_port() {
    let busy = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = busy.local_addr().unwrap().to_string();
    assert_error(
        &["relay", "--listen", &addr, "--metrics", "127.0.0.1:0"],
        &["cannot start the relay", &addr],
    );
}

#[test]
fn relay_refuses_a_pool_too_small_for_its_workers() {
    assert_error(
        &[
            "relay",
            "--listen",
            "127.0.0.1:0",
            "--metrics",
            "127.0.0.1:0",
            "--workers",
            "2",
            "--pool-slots",
            "32",
        ],
        &["too small", "2 workers"],
    );
}

#[test]
fn watch_output_to_an_unwritable_place_fails_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let (_, public) = keygen(dir.path());
    let out = "/nonexistent/dir/out.ts";
    assert_error(
        &[
            "watch",
            "--relay",
            "127.0.0.1:9",
            "--channel",
            &public,
            "--output",
            out,
        ],
        &["cannot create output file", out],
    );
}
