//! `--peers-file FILE`: a list of peers too long for the command line (a thousand nodes).
//!
//! The file holds `HOST:PORT` entries separated by newlines, spaces or commas; `#` starts a
//! comment to the end of its line. Its entries join `--peer`'s, duplicates dropped (first
//! kept), before any command uses them.

use std::path::Path;

/// The largest peers file read (a million entries of 16 bytes fit).
pub const MAX_PEERS_FILE: u64 = 16 * 1024 * 1024;

/// The entries of a peers file's text, in order; `Err` names the first line that is not
/// `HOST:PORT` entries.
pub fn parse(text: &str) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.split_once('#').map_or(line, |(before, _)| before);
        for entry in line.split(|c: char| c.is_whitespace() || c == ',') {
            if entry.is_empty() {
                continue;
            }
            let port_ok = entry
                .rsplit_once(':')
                .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
            if !port_ok {
                return Err(format!("line {}: {entry:?}: expected HOST:PORT", n + 1));
            }
            out.push(entry.to_string());
        }
    }
    Ok(out)
}

/// Reads `path` (at most [`MAX_PEERS_FILE`] bytes) into its entries.
pub fn read(path: &Path) -> Result<Vec<String>, String> {
    use std::io::Read;
    let file = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let mut text = String::new();
    file.take(MAX_PEERS_FILE + 1)
        .read_to_string(&mut text)
        .map_err(|e| e.to_string())?;
    if text.len() as u64 > MAX_PEERS_FILE {
        return Err(format!(
            "larger than {} MiB",
            MAX_PEERS_FILE / (1024 * 1024)
        ));
    }
    parse(&text)
}

/// `peers` with `more` appended, each entry once (the first kept, in order).
pub fn merge(peers: &mut Vec<String>, more: Vec<String>) {
    let mut seen = std::collections::HashSet::new();
    let all = std::mem::take(peers).into_iter().chain(more);
    *peers = all.filter(|p| seen.insert(p.clone())).collect();
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn entries_by_line_space_or_comma_with_comments() {
        let text = "# the fleet\n127.0.0.1:7401\n127.0.0.1:7402 127.0.0.1:7403,host-a:7400\n\n  \
                    [::1]:7404 # loopback v6\n";
        assert_eq!(
            parse(text).unwrap(),
            [
                "127.0.0.1:7401",
                "127.0.0.1:7402",
                "127.0.0.1:7403",
                "host-a:7400",
                "[::1]:7404"
            ]
        );
        assert_eq!(parse("").unwrap(), Vec::<String>::new());
    }

    #[test]
    fn an_entry_without_a_port_names_its_line() {
        let err = parse("127.0.0.1:1\nhost\n").unwrap_err();
        assert_eq!(err, "line 2: \"host\": expected HOST:PORT");
        assert!(parse("h:99999").is_err());
        assert!(parse(":7400").is_err());
    }

    #[test]
    fn merging_drops_duplicates_and_keeps_the_first_order() {
        let mut peers = vec!["a:1".to_string(), "b:2".into(), "a:1".into()];
        merge(&mut peers, vec!["c:3".into(), "b:2".into(), "c:3".into()]);
        assert_eq!(peers, ["a:1", "b:2", "c:3"]);
    }
}
