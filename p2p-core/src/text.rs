//! Peer-supplied text made safe for a terminal or a log line.
//!
//! Everything a peer sends (task output, error text, node types, addresses, reasons) may
//! carry terminal control sequences: `ESC ] 0 ; title BEL` sets the window title,
//! `ESC ] 52 ; c ; ...` writes the clipboard, `ESC [ 2 J` clears the screen, a bare `CR`
//! or `LF` forges a log line. [`escape`] (and its [`Display`](std::fmt::Display) form
//! [`Escaped`]) writes every such character as a visible escape, so the text reaches a
//! terminal as plain characters:
//!
//! - C0 controls and DEL: `\n`, `\r`, `\t`, `\0`, and `\x1b`-style hex for the rest;
//! - C1 controls (U+0080 to U+009F, which some terminals read as `ESC` sequences) and the
//!   Unicode bidirectional marks, overrides and isolates (U+200E, U+200F, U+202A to U+202E,
//!   U+2066 to U+2069, which reorder what is shown): `\u{9b}`-style.
//!
//! Everything else, backslashes included, is kept as it is: this is for showing text
//! safely, not an encoding to decode (`--json` output stays exact JSON instead).

use std::borrow::Cow;
use std::fmt::{self, Write};

/// Whether `c` is written as an escape by [`escape`].
pub fn needs_escape(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// `s` with every control character written as a visible escape (see the module docs).
/// Borrows when there is nothing to escape.
///
/// ```
/// use p2p_core::text::escape;
/// assert_eq!(escape("ok"), "ok");
/// assert_eq!(escape("\u{1b}]0;pwned\u{7}"), "\\x1b]0;pwned\\x07");
/// assert_eq!(escape("a\nb"), "a\\nb");
/// ```
pub fn escape(s: &str) -> Cow<'_, str> {
    if !s.chars().any(needs_escape) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    // Writing to a String cannot fail.
    let _ = write_escaped(&mut out, s);
    Cow::Owned(out)
}

/// Writes `s` to `w` as [`escape`] would return it.
pub fn write_escaped(w: &mut impl Write, s: &str) -> fmt::Result {
    let mut rest = s;
    while let Some((i, c)) = rest.char_indices().find(|&(_, c)| needs_escape(c)) {
        w.write_str(&rest[..i])?;
        match c {
            '\n' => w.write_str("\\n")?,
            '\r' => w.write_str("\\r")?,
            '\t' => w.write_str("\\t")?,
            '\0' => w.write_str("\\0")?,
            c if (c as u32) < 0x80 => write!(w, "\\x{:02x}", c as u32)?,
            c => write!(w, "\\u{{{:x}}}", c as u32)?,
        }
        rest = &rest[i + c.len_utf8()..];
    }
    w.write_str(rest)
}

/// Shows a string escaped (see [`escape`]) without allocating: `%Escaped(&peer_text)` in a
/// `tracing` field, `{}` in a format string.
#[derive(Debug, Clone, Copy)]
pub struct Escaped<'a>(pub &'a str);

impl fmt::Display for Escaped<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_escaped(f, self.0)
    }
}

/// A [`fmt::Write`] that escapes everything written through it (see [`escape`]) into the
/// inner writer: wrap a formatter to escape a value's whole `Display` or `Debug` output.
#[derive(Debug)]
pub struct EscapingWriter<W>(pub W);

impl<W: Write> Write for EscapingWriter<W> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        write_escaped(&mut self.0, s)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn terminal_sequences_become_visible() {
        // OSC 0 (window title), OSC 52 (clipboard), CSI (clear screen, cursor moves).
        assert_eq!(escape("\x1b]0;owned\x07"), "\\x1b]0;owned\\x07");
        assert_eq!(escape("\x1b]52;c;aGk=\x1b\\"), "\\x1b]52;c;aGk=\\x1b\\");
        assert_eq!(escape("\x1b[2J\x1b[1;1H"), "\\x1b[2J\\x1b[1;1H");
        // C1 CSI and bidi overrides.
        assert_eq!(escape("a\u{9b}2Jb"), "a\\u{9b}2Jb");
        assert_eq!(escape("x\u{202e}y\u{2066}"), "x\\u{202e}y\\u{2066}");
        // The directional marks too (`shown` escaped them, `text` did not).
        assert_eq!(escape("a\u{200e}b\u{200f}"), "a\\u{200e}b\\u{200f}");
        // Line forging, NUL, DEL, backspace.
        assert_eq!(escape("a\r\nb\tc\0"), "a\\r\\nb\\tc\\0");
        assert_eq!(escape("\x7f\x08"), "\\x7f\\x08");
    }

    #[test]
    fn plain_text_is_kept_and_borrowed() {
        for s in [
            "",
            "Executing task: a1",
            "C:\\path\\x1b",
            "é ü 日本 🎉",
            "a b",
        ] {
            assert!(matches!(escape(s), Cow::Borrowed(x) if x == s), "{s:?}");
        }
    }

    #[test]
    fn every_escaped_string_is_free_of_controls() {
        let all: String = (0u32..0x3000).filter_map(char::from_u32).collect();
        let out = escape(&all);
        assert!(!out.chars().any(needs_escape));
        assert_eq!(Escaped(&all).to_string(), out);
        let mut w = EscapingWriter(String::new());
        write!(w, "{}", all).unwrap();
        assert_eq!(w.0, out);
    }
}
