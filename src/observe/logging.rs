//! Where log lines go and how they look: stderr, text or JSON, filtered by
//! `log_level` (RUST_LOG syntax). Colours only when stderr is a terminal, so
//! journald and log files never receive ANSI escape codes.

use std::io::IsTerminal;

use crate::config::LogFormat;

/// Installs the process's log subscriber: `format` on stderr, filtered by
/// `filter` (RUST_LOG syntax; empty or invalid: info). Call it once, first.
pub fn init(format: LogFormat, filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .ok()
        .filter(|_| !filter.trim().is_empty())
        .unwrap_or_else(|| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(colours(std::io::stderr().is_terminal(), std::env::var_os("NO_COLOR")));
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().with_current_span(true).with_span_list(false).init(),
    }
}

/// Colours on a terminal, unless `NO_COLOR` is set to something
/// (<https://no-color.org>).
fn colours(terminal: bool, no_color: Option<std::ffi::OsString>) -> bool {
    terminal && no_color.is_none_or(|v| v.is_empty())
}

#[cfg(test)]
mod tests {
    use super::colours;

    #[test]
    fn colours_only_on_a_terminal_without_no_color() {
        assert!(colours(true, None));
        assert!(colours(true, Some("".into())));
        assert!(!colours(true, Some("1".into())));
        assert!(!colours(false, None));
    }
}
