//! Logging setup shared by every role: one subscriber per process, filtered by
//! `RUST_LOG` (default `info`), human-readable unless JSON is asked for, so the
//! same binary suits a terminal and a log pipeline.

use tracing_subscriber::EnvFilter;

/// How log lines are written to stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum LogFormat {
    /// One readable line per event.
    Text,
    /// One JSON object per event.
    Json,
}

/// Crates whose events stop at `debug` whatever `RUST_LOG` asks: at `trace`,
/// tungstenite logs every WebSocket frame it reads or writes with its payload
/// (in hex, and as text when it is UTF-8), so a client's auth frame would
/// put its token, and every push its body, in the log. Nothing below `debug`
/// of theirs is worth that.
const CAPPED_AT_DEBUG: [&str; 2] = ["tungstenite", "tokio_tungstenite"];

/// Installs the global subscriber. Call once, first thing in `main`.
pub(crate) fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // A directive for the same target replaces one from `RUST_LOG`, so
    // `tungstenite=trace` is capped too.
    let filter = CAPPED_AT_DEBUG
        .iter()
        .filter_map(|target| format!("{target}=debug").parse().ok())
        .fold(filter, EnvFilter::add_directive);
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
