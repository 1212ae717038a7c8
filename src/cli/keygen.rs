//! `clubcast keygen`: create a channel key.

use std::path::PathBuf;

use anyhow::Context;
use clubcast::crypto::{ChannelKey, ContentKey};

/// Create a channel key: writes the secret key, prints the public key.
///
/// The secret key goes to --out with mode 0600 (keep it: whoever holds it
/// can publish on the channel). The public key, printed on stdout, is the channel id that
/// viewers pass to `clubcast watch --channel`.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// File to write the secret key to; must not exist yet.
    #[arg(long, value_name = "FILE")]
    out: PathBuf,

    /// Also make a content key for a private channel, written to FILE.content (mode 0600):
    /// give it to `publish --content-key` and to the watchers allowed to play.
    #[arg(long)]
    private: bool,
}

pub(crate) fn run(args: Args) -> anyhow::Result<()> {
    let key = ChannelKey::generate();
    key.write_new_file(&args.out)
        .context("cannot write the channel key")?;
    eprintln!(
        "wrote secret key to {} (mode 0600); channel id (public key):",
        args.out.display()
    );
    println!("{}", key.public());
    if args.private {
        let path = PathBuf::from(format!("{}.content", args.out.display()));
        ContentKey::generate()
            .write_new_file(&path)
            .context("cannot write the content key")?;
        eprintln!(
            "wrote content key to {} (mode 0600): publish and watch with --content-key {0}",
            path.display()
        );
    }
    Ok(())
}
