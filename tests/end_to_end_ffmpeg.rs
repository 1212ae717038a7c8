//! End to end with real tools: ffmpeg makes a 5-second H.264 test stream, `clubcast publish
//! --realtime` sends it through a relay to a watcher, and ffprobe checks the watcher's output
//! is a valid stream with every video frame. Fails (never skips) when ffmpeg is missing.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{clubcast, keygen, require_tool, watcher, Proc, Relay};

fn count_frames(path: &std::path::Path) -> u64 {
    let out = Command::new("ffprobe")
        .args(["-v", "error", "-count_frames", "-select_streams", "v:0"])
        .args([
            "-show_entries",
            "stream=nb_read_frames,codec_name",
            "-of",
            "default=noprint_wrappers=1",
        ])
        .arg(path)
        .output()
        .expect("ffprobe runs");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "ffprobe failed on {}: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("codec_name=h264"), "{text}");
    text.lines()
        .find_map(|l| l.strip_prefix("nb_read_frames="))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no frame count in {text:?}"))
}

#[test]
fn ffmpeg_stream_survives_publish_relay_watch_with_every_frame() {
    require_tool("ffmpeg");
    require_tool("ffprobe");
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.ts");
    let status = Command::new("ffmpeg")
        .args([
            "-v",
            "error",
            "-f",
            "lavfi",
            "-i",
            "testsrc=duration=5:size=320x240:rate=25",
        ])
        .args([
            "-c:v",
            "libx264",
            "-preset",
            "ultrafast",
            "-g",
            "25",
            "-pix_fmt",
            "yuv420p",
            "-f",
            "mpegts",
        ])
        .arg(&input)
        .stdin(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success(), "ffmpeg could not make the test stream");
    let frames_in = count_frames(&input);
    assert_eq!(frames_in, 125);

    let relay = Relay::start(&[]);
    let (key, public) = keygen(dir.path());
    let output = dir.path().join("out.ts");
    let mut w = watcher(relay.addr, &public, &output);
    relay.wait_metric("clubcast_relay_subscribers", 1.0, Duration::from_secs(10));

    let started = Instant::now();
    let mut cmd = clubcast();
    cmd.args([
        "publish",
        "--realtime",
        "--to",
        &relay.addr.to_string(),
        "--key",
    ])
    .arg(&key)
    .arg("--input")
    .arg(&input)
    .stdout(Stdio::null())
    .stderr(Stdio::piped());
    let mut publisher = Proc::spawn("publisher", &mut cmd);
    let status = publisher.wait(Duration::from_secs(30));
    assert!(
        status.success(),
        "publisher failed: {}",
        common::stderr_of(&mut publisher)
    );
    // --realtime paces by PCR: 5 s of video takes about 5 s (the first PCR is at offset zero
    // and the last frame's PCR is one frame before the end).
    assert!(
        started.elapsed() >= Duration::from_millis(4500),
        "published in {:?}",
        started.elapsed()
    );

    let status = w.wait(Duration::from_secs(20));
    assert!(
        status.success(),
        "watcher failed: {}",
        common::stderr_of(&mut w)
    );
    assert_eq!(
        std::fs::read(&output).unwrap(),
        std::fs::read(&input).unwrap()
    );
    assert_eq!(count_frames(&output), frames_in);
}
