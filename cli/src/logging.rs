//! Logging: human-readable on a terminal, JSON with `TASKMESH_LOG_FORMAT=json`; level from
//! `RUST_LOG` (default `info`).

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

/// Installs the global subscriber. `long_running` services log at `info` by default,
/// one-shot verbs only at `warn` so their output stays readable.
pub(crate) fn init(long_running: bool) {
    let default = if long_running {
        "info,async_nats=warn"
    } else {
        "warn"
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let json = std::env::var("TASKMESH_LOG_FORMAT").is_ok_and(|v| v.eq_ignore_ascii_case("json"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .init();
    } else {
        builder
            .with_ansi(std::io::stderr().is_terminal())
            .with_target(false)
            .init();
    }
}
