//! Text that came from a client or an upstream, made safe for a log line or an alert (see the
//! security guide, "Escaping").
//!
//! A model name with a newline could forge a line in an alert; an alert sink's answer with ANSI
//! escapes could forge or hide log lines. Everything foreign goes through [`untrusted`] first:
//! control characters become visible escapes and the text is cut at [`MAX_CHARS`] characters.
//! The Unicode line and paragraph separators break lines in many viewers and chat clients, and
//! the bidirectional controls reorder what a reader sees (a reason that reads "ok" but is not):
//! they are escaped the same way ([`needs_escape`]).

use std::borrow::Cow;
use std::fmt::Write;

/// The most characters of a foreign value that reach a log line or an alert.
pub const MAX_CHARS: usize = 200;

/// Whether `c` is shown as a visible escape: a control character (C0, DEL, C1), the line and
/// paragraph separators U+2028/U+2029, or a bidirectional control (U+061C, U+200E, U+200F,
/// U+202A–U+202E, U+2066–U+2069) (see the security guide, "Escaping").
pub fn needs_escape(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{2028}'
                | '\u{2029}'
                | '\u{061c}'
                | '\u{200e}'
                | '\u{200f}'
                | '\u{202a}'..='\u{202e}'
                | '\u{2066}'..='\u{2069}'
        )
}

/// `s` with control characters escaped (`\n`, `\r`, `\t`, `\u{1b}` …) and cut at [`MAX_CHARS`]
/// characters (with `…`). Borrows when there is nothing to change.
pub fn untrusted(s: &str) -> Cow<'_, str> {
    untrusted_cut(s, MAX_CHARS)
}

/// [`untrusted`] with another length limit, in characters.
pub fn untrusted_cut(s: &str, max: usize) -> Cow<'_, str> {
    let clean = !s.chars().any(needs_escape);
    if clean && s.len() <= max {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len().min(max * 2) + 8);
    for (n, c) in s.chars().enumerate() {
        if n == max {
            out.push('…');
            break;
        }
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if needs_escape(c) => {
                let _ = write!(out, "\\u{{{:x}}}", c as u32);
            }
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

/// `s` cut to at most `max` bytes on a char boundary (the record's bounded columns).
pub fn cut_bytes(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// One round of percent-decoding, or None when there is nothing to decode. The one decoder of
/// the gateway: admission's path rules, model ids and the trace exporter's headers use it.
pub fn percent_decode(s: &[u8]) -> Option<Vec<u8>> {
    if !s.contains(&b'%') {
        return None;
    }
    let hex = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    let mut out = Vec::with_capacity(s.len());
    let mut i = 0;
    let mut changed = false;
    while i < s.len() {
        if s[i] == b'%' && i + 2 < s.len() {
            if let (Some(h), Some(l)) = (hex(s[i + 1]), hex(s[i + 2])) {
                out.push(h << 4 | l);
                i += 3;
                changed = true;
                continue;
            }
        }
        out.push(s[i]);
        i += 1;
    }
    changed.then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_and_cuts() {
        assert!(matches!(untrusted("gpt-4o"), Cow::Borrowed("gpt-4o")));
        assert_eq!(
            untrusted("a\nb\r\x1b[31mc\u{7f}"),
            "a\\nb\\r\\u{1b}[31mc\\u{7f}"
        );
        let long = "x".repeat(500);
        let cut = untrusted(&long);
        assert_eq!(cut.chars().count(), MAX_CHARS + 1);
        assert!(cut.ends_with('…'));
        assert!(!untrusted("\u{85}next").contains('\u{85}'));
        assert_eq!(
            untrusted("a\u{2028}b\u{2029}c\u{202e}d\u{2066}e\u{200f}"),
            "a\\u{2028}b\\u{2029}c\\u{202e}d\\u{2066}e\\u{200f}"
        );
        for c in ['\u{200e}', '\u{202a}', '\u{202d}', '\u{2069}', '\u{61c}'] {
            assert!(!untrusted(&format!("x{c}y")).contains(c), "{c:?}");
        }
        assert!(matches!(untrusted("café ✓ 日本"), Cow::Borrowed(_)));
    }

    #[test]
    fn cuts_bytes_on_char_boundaries() {
        assert_eq!(cut_bytes("héllo", 2), "h");
        assert_eq!(cut_bytes("héllo", 3), "hé");
        assert_eq!(cut_bytes("abc", 10), "abc");
        assert_eq!(cut_bytes("", 0), "");
    }
}
