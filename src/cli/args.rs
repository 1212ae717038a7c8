//! Parsers for flag values; the syntax is shared with config files (see [`clubcast::config`]).

pub(crate) use clubcast::config::values::{bitrate, duration, socket_addr};

use anyhow::Context;
use clubcast::crypto::ContentKey;

/// The content key in file `path`, if one was given (`--content-key`).
pub(crate) fn content_key(path: Option<&std::path::Path>) -> anyhow::Result<Option<ContentKey>> {
    path.map(ContentKey::read_file)
        .transpose()
        .context("cannot load the content key")
}
