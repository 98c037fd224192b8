//! Showing what a peer sent in a log line or an error: a short prefix, escaped.
//!
//! Every string a peer supplies (a cluster name, a type, a `Reject` message, a task id) goes
//! into logs and error messages only through [`Shown`]: at most [`SHOWN_MAX`] characters, and
//! no control character (no terminal escape sequence, no line break) is ever written as is.
//! The escaping is [`crate::text`]'s (tested there); this module adds only the cut.

use std::fmt;

use crate::text::write_escaped;

/// The most characters of a peer-supplied string shown (escapes count as one each).
pub const SHOWN_MAX: usize = 96;

/// Displays a peer-supplied string safely (see the module documentation): escaped as
/// [`crate::text::escape`] does (`\n`, `\x1b`, `\u{202e}`, ...), and a string longer than
/// [`SHOWN_MAX`] characters cut, with a note of its full size.
#[derive(Debug, Clone, Copy)]
pub struct Shown<'a>(pub &'a str);

impl fmt::Display for Shown<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0.char_indices().nth(SHOWN_MAX) {
            None => write_escaped(f, self.0),
            Some((cut, _)) => {
                write_escaped(f, &self.0[..cut])?;
                write!(
                    f,
                    "... ({} bytes in all, {} not shown)",
                    self.0.len(),
                    self.0.len() - cut
                )
            }
        }
    }
}

/// [`Shown`] as an owned string.
pub fn shown(s: &str) -> String {
    Shown(s).to_string()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn long_strings_are_cut_after_the_escaping() {
        assert_eq!(shown("cluster \"a\" é✓"), "cluster \"a\" é✓");
        // Escaped as `text` escapes (its tests hold the rules).
        let odd = "\u{1b}]0;x\u{7}\n\u{202e}\u{200e}";
        assert_eq!(shown(odd), crate::text::escape(odd));
        let long = "\u{1b}".repeat(3_000_000);
        let out = shown(&long);
        assert!(!out.contains('\u{1b}'));
        assert!(out.len() < 1000, "{} bytes", out.len());
        assert!(
            out.ends_with("(3000000 bytes in all, 2999904 not shown)"),
            "{out}"
        );
        // An escape counts as one character; multi-byte characters are cut whole.
        assert!(out.starts_with(&"\\x1b".repeat(SHOWN_MAX)), "{out}");
        let wide = "é".repeat(SHOWN_MAX + 1);
        assert_eq!(
            shown(&wide),
            format!(
                "{}... (194 bytes in all, 2 not shown)",
                "é".repeat(SHOWN_MAX)
            )
        );
        let exact = "x".repeat(SHOWN_MAX);
        assert_eq!(shown(&exact), exact);
    }
}
