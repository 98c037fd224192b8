//! Showing what a peer sent in a log line or an error: a short prefix, escaped.
//!
//! Every string a peer supplies (a cluster name, a type, a `Reject` message, a task id) goes
//! into logs and error messages only through [`Shown`]: at most [`SHOWN_MAX`] characters, and
//! no control character (no terminal escape sequence, no line break) is ever written as is.

use std::fmt;

/// The most characters of a peer-supplied string shown (escapes count as one each).
pub const SHOWN_MAX: usize = 96;

/// Displays a peer-supplied string safely (see the module documentation): control and
/// bidirectional-override characters as `\n`, `\t`, `\x1b`, `\u{202e}`, ..., and a string longer
/// than [`SHOWN_MAX`] characters cut, with a note of its full size.
#[derive(Debug, Clone, Copy)]
pub struct Shown<'a>(pub &'a str);

/// Whether `c` must not reach a terminal or a log line as is.
fn dangerous(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

impl fmt::Display for Shown<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (shown, (i, c)) in self.0.char_indices().enumerate() {
            if shown == SHOWN_MAX {
                return write!(
                    f,
                    "... ({} bytes in all, {} not shown)",
                    self.0.len(),
                    self.0.len() - i
                );
            }
            if dangerous(c) {
                match c {
                    '\n' => f.write_str("\\n")?,
                    '\r' => f.write_str("\\r")?,
                    '\t' => f.write_str("\\t")?,
                    '\0' => f.write_str("\\0")?,
                    c if u32::from(c) < 0x80 => write!(f, "\\x{:02x}", u32::from(c))?,
                    c => write!(f, "\\u{{{:x}}}", u32::from(c))?,
                }
            } else {
                write!(f, "{c}")?;
            }
        }
        Ok(())
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
    fn control_characters_are_escaped_and_long_strings_cut() {
        assert_eq!(shown("cluster \"a\" é✓"), "cluster \"a\" é✓");
        assert_eq!(
            shown("\u{1b}]0;pwned\u{7}\n\r\t\u{202e}x"),
            "\\x1b]0;pwned\\x07\\n\\r\\t\\u{202e}x"
        );
        let long = "\u{1b}".repeat(3_000_000);
        let out = shown(&long);
        assert!(!out.contains('\u{1b}'));
        assert!(out.len() < 1000, "{} bytes", out.len());
        assert!(
            out.ends_with("(3000000 bytes in all, 2999904 not shown)"),
            "{out}"
        );
        let exact = "x".repeat(SHOWN_MAX);
        assert_eq!(shown(&exact), exact);
    }
}
