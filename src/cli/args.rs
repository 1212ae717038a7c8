//! Parsers for flag values; the syntax is shared with config files (see [`clubcast::config`]).

pub(crate) use clubcast::config::values::{bitrate, duration, socket_addr};
