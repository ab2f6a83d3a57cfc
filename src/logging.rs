//! Logging: tracing to stderr, filtered by --log-level / -v / RUST_LOG; fuser's `log`
//! records are bridged in. Tokens never reach a log line (see `client::auth`).

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

/// Starts logging to stderr, or to `file` (appending) when given.
pub fn init(verbose: u8, level: Option<&str>, file: Option<std::fs::File>) {
    let filter = if let Some(l) = level {
        EnvFilter::new(l)
    } else if let Ok(env) = std::env::var("RUST_LOG") {
        EnvFilter::new(env)
    } else {
        EnvFilter::new(match verbose {
            0 => "warn,physiofs=info,fuser=error",
            1 => "info,physiofs=debug,fuser=warn",
            _ => "debug,physiofs=trace",
        })
    };
    let _ = tracing_log::LogTracer::init();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false);
    let _ = match file {
        Some(f) => builder
            .with_writer(std::sync::Mutex::new(f))
            .with_ansi(false)
            .try_init(),
        None => builder
            .with_writer(std::io::stderr)
            .with_ansi(std::io::stderr().is_terminal())
            .try_init(),
    };
}
