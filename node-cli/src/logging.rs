//! How the binary logs: which levels `-v` gives, and whether log lines are coloured.

use std::ffi::OsStr;

/// The crates whose level `-v` raises: p2p-node's own (the library, the binary and the
/// crates under them). Everything else (tokio, mio, ...) stays at `warn`.
pub const OWN_CRATES: [&str; 5] = [
    "node_cli",
    "p2p_node",
    "p2p_core",
    "p2p_discovery",
    "p2p_tasks",
];

/// The log filter (an `EnvFilter` directive) when `RUST_LOG` is not set: `warn` for every
/// crate, and for p2p-node's own crates `info` for `serve` (else `warn`), `debug` with
/// `-v`, `trace` with `-vv` or more.
pub fn default_filter(serve: bool, verbose: u8) -> String {
    let own = match (serve, verbose) {
        (true, 0) => "info",
        (false, 0) => "warn",
        (_, 1) => "debug",
        _ => "trace",
    };
    let mut filter = String::from("warn");
    for c in OWN_CRATES {
        filter.push_str(&format!(",{c}={own}"));
    }
    filter
}

/// Whether log lines get colours: only on a terminal, and never when `NO_COLOR` is set to
/// anything but the empty string (<https://no-color.org>).
pub fn colour(stderr_is_terminal: bool, no_color: Option<&OsStr>) -> bool {
    stderr_is_terminal && no_color.is_none_or(OsStr::is_empty)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verbose_raises_only_our_crates() {
        assert_eq!(
            default_filter(true, 0),
            "warn,node_cli=info,p2p_node=info,p2p_core=info,p2p_discovery=info,p2p_tasks=info"
        );
        assert!(default_filter(false, 0)
            .split(',')
            .all(|d| d.ends_with("warn")));
        let debug = default_filter(false, 1);
        assert!(debug.starts_with("warn,"), "{debug}");
        assert!(debug.contains("p2p_core=debug"), "{debug}");
        let trace = default_filter(true, 5);
        assert!(trace.starts_with("warn,"), "{trace}");
        assert!(
            !trace.contains("mio") && !trace.contains("tokio"),
            "{trace}"
        );
        assert_eq!(trace.matches("=trace").count(), OWN_CRATES.len());
    }

    #[test]
    fn colour_only_on_a_terminal_without_no_color() {
        assert!(colour(true, None));
        assert!(colour(true, Some(OsStr::new(""))));
        assert!(!colour(true, Some(OsStr::new("1"))));
        assert!(!colour(false, None));
    }
}
