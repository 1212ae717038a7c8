use std::path::Path;

use super::*;
use crate::crypto::ChannelKey;

fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn from_toml(text: &str) -> Result<RelaySettings, ConfigError> {
    let mut s = RelaySettings::default();
    s.apply_toml(text, Path::new("relay.toml"))?;
    Ok(s)
}

#[test]
fn printed_config_reads_back_to_the_same_settings() {
    let default = RelaySettings::default();
    assert_eq!(from_toml(&default.to_toml()).unwrap(), default);

    let key = ChannelKey::generate().public();
    let custom = from_toml(&format!(
        "listen = \"127.0.0.1:7100\"\nsubscriber-timeout = \"1500ms\"\nmax-subscribers = 7\n\
         socket-buffer = \"512k\"\npin = false\npoll = \"busy\"\nbackend = \"portable\"\n\
         log-format = \"json\"\nlog-level = \"debug\"\nchannels = [\"{key}\"]\n"
    ))
    .unwrap();
    assert_eq!(custom.max_subscribers, 7);
    assert_eq!(custom.subscriber_timeout, Duration::from_millis(1500));
    assert_eq!(custom.socket_buffer, 512 << 10);
    assert!(!custom.pin);
    assert_eq!(custom.channels, vec![key]);
    assert_eq!(from_toml(&custom.to_toml()).unwrap(), custom);
}

#[test]
fn flags_beat_environment_beats_file_beats_defaults() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("relay.toml");
    std::fs::write(
        &file,
        "max-subscribers = 10\nmax-channels = 11\nworkers = 3\n",
    )
    .unwrap();
    let vars = env(&[
        ("CLUBCAST_MAX_SUBSCRIBERS", "20"),
        ("CLUBCAST_MAX_CHANNELS", "21"),
        ("PATH", "/bin"),
    ]);
    let flags = vec![("max-subscribers".to_string(), "30".to_string())];
    let s = RelaySettings::load(Some(&file), vars, &flags).unwrap();
    assert_eq!(s.max_subscribers, 30, "flag wins");
    assert_eq!(s.max_channels, 21, "environment beats the file");
    assert_eq!(s.workers, 3, "file beats the default");
    assert_eq!(s.pool_slots, RelaySettings::default().pool_slots);
}

#[test]
fn errors_name_the_key_the_place_and_the_reason() {
    let e = from_toml("max-subscribers = \"many\"")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("config file relay.toml")
            && e.contains("`max-subscribers`")
            && e.contains("\"many\" is not a whole number"),
        "{e}"
    );
    let e = from_toml("max-subscriber = 3").unwrap_err().to_string();
    assert!(
        e.contains("unknown key `max-subscriber`") && e.contains("max-subscribers"),
        "{e}"
    );
    let e = from_toml("max-channels = 0").unwrap_err().to_string();
    assert!(e.contains("must be at least 1"), "{e}");
    let e = from_toml("listen = [1, 2]").unwrap_err().to_string();
    assert!(
        e.contains("`listen`") && e.contains("list of strings"),
        "{e}"
    );
    let e = from_toml("[relay]\nlisten = \"x\"")
        .unwrap_err()
        .to_string();
    assert!(e.contains("unknown key `relay`"), "{e}");
    let e = from_toml("listen = ").unwrap_err().to_string();
    assert!(e.contains("not valid TOML"), "{e}");
    let e = from_toml("channels = [\"abc\"]").unwrap_err().to_string();
    assert!(e.contains("`channels`") && e.contains("\"abc\""), "{e}");

    let mut s = RelaySettings::default();
    let e = s
        .apply_env(env(&[("CLUBCAST_MAX_SUBSCRIBER", "3")]))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("environment variable CLUBCAST_MAX_SUBSCRIBER") && e.contains("unknown key"),
        "{e}"
    );
    let e = s
        .apply_env(env(&[("CLUBCAST_POLL", "sometimes")]))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("`poll`") && e.contains("busy, adaptive, block"),
        "{e}"
    );

    let e = RelaySettings::load(Some(Path::new("/nonexistent/relay.toml")), [], &[])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("cannot read config file /nonexistent/relay.toml"),
        "{e}"
    );
}

#[test]
fn every_key_has_an_environment_variable_and_a_default_it_accepts() {
    let default = RelaySettings::default();
    for key in KEYS {
        assert!(key.env_var().starts_with("CLUBCAST_"), "{}", key.name);
        assert!(!key.env_var().contains('-'), "{}", key.name);
        let mut s = RelaySettings::default();
        s.apply_env([(key.env_var(), key.show(&default))]).unwrap();
        assert_eq!(s, default, "{}", key.name);
    }
}

#[test]
fn changed_keys_tell_live_changes_from_restarts() {
    let old = RelaySettings::default();
    let mut new = old.clone();
    new.max_subscribers = 5;
    new.listen = "127.0.0.1:1".parse().unwrap();
    let changed: Vec<(&str, bool)> = old
        .changed_keys(&new)
        .iter()
        .map(|k| (k.name, k.live))
        .collect();
    assert_eq!(changed, vec![("listen", false), ("max-subscribers", true)]);
}

#[test]
fn channel_list_becomes_the_cores_allow_list() {
    let keys = [
        ChannelKey::generate().public(),
        ChannelKey::generate().public(),
    ];
    let text = format!("{},{}", keys[0], keys[1]);
    let mut s = RelaySettings::default();
    assert_eq!(s.relay_config().allowed_channels, None);
    s.set("channels", &text, &Origin::Default).unwrap();
    let allowed = s.relay_config().allowed_channels.unwrap();
    assert_eq!(allowed, vec![keys[0].channel_id(), keys[1].channel_id()]);
}
