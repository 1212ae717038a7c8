//! Log output on stderr: text for people or JSON lines for collectors, with a level that a
//! running relay can change (SIGHUP reload). Nothing logs per packet.

use clubcast::config::LogFormat;
use tracing::level_filters::LevelFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{fmt, reload, Registry};

/// The installed logger; changes its level while running.
pub(crate) struct Logging {
    level: reload::Handle<LevelFilter, Registry>,
}

impl Logging {
    /// Installs the process's logger.
    pub(crate) fn init(level: tracing::Level, format: LogFormat) -> Self {
        let (filter, handle) = reload::Layer::new(LevelFilter::from_level(level));
        let text = (format == LogFormat::Text).then(|| {
            fmt::layer()
                .with_writer(std::io::stderr)
                .with_target(false)
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        });
        let json = (format == LogFormat::Json).then(|| {
            fmt::layer()
                .json()
                .with_writer(std::io::stderr)
                .with_current_span(false)
        });
        // A second init (only possible in tests) keeps the first logger.
        let _ = tracing_subscriber::registry()
            .with(filter)
            .with(text)
            .with(json)
            .try_init();
        Logging { level: handle }
    }

    /// Shows lines up to `level` from now on.
    pub(crate) fn set_level(&self, level: tracing::Level) {
        if let Err(e) = self.level.reload(LevelFilter::from_level(level)) {
            tracing::warn!("cannot change the log level: {e}");
        }
    }
}
