//! The path rules of admission (see the security guide, "Paths"): which `/v1/*` paths are never
//! forwarded.
//!
//! A gateway and the server behind it must read a path the same way, or a path the gateway
//! thinks harmless reaches somewhere else under the operator's key: `/v1/%2e%2e/admin` is
//! `/admin` to a server that decodes before it resolves dot segments, `/v1/..;/admin` is
//! `/admin` to Java servlet containers (Tomcat drops the `;` parameter), `%c0%ae` is `.` to
//! decoders that accept overlong UTF-8, `%u002e` is `.` to IIS, and a NUL ends the path for C
//! code. Each rule is checked on the path as received and after each of a few rounds of
//! percent-decoding, so that a double-encoded form is refused like the plain one.

use std::borrow::Cow;

use crate::escape::percent_decode;

/// Rounds of percent-decoding looked through (`%25252e` is three).
const ROUNDS: usize = 4;

/// Why a path is refused; each text ends the 400's message.
const DOT: &str =
    "the path has a `.` or `..` segment (after percent-decoding); it is not forwarded";
const DOT_PARAM: &str =
    "the path has a `.;` or `..;` segment (after percent-decoding); it is not forwarded";
const CONTROL: &str =
    "the path has a control character (after percent-decoding); it is not forwarded";
const OVERLONG: &str = "the path uses an overlong UTF-8 or `%u` escape; it is not forwarded";

/// Why `path` (as received, percent-encoded) is not forwarded, or None when it may be.
pub fn path_problem(path: &str) -> Option<&'static str> {
    let mut current: Cow<'_, [u8]> = Cow::Borrowed(path.as_bytes());
    for _ in 0..ROUNDS {
        if let Some(why) = round_problem(&current) {
            return Some(why);
        }
        match percent_decode(&current) {
            Some(next) => current = Cow::Owned(next),
            None => return None,
        }
    }
    round_problem(&current)
}

/// The rules on one decoding round of the path.
fn round_problem(p: &[u8]) -> Option<&'static str> {
    if has_u_escape(p) || has_overlong_utf8(p) {
        return Some(OVERLONG);
    }
    for seg in p.split(|b| *b == b'/' || *b == b'\\') {
        if seg == b"." || seg == b".." {
            return Some(DOT);
        }
        if has_control(seg) {
            return Some(CONTROL);
        }
        let before_param = seg.split(|b| *b == b';').next().unwrap_or(seg);
        if before_param.len() < seg.len() && (before_param == b"." || before_param == b"..") {
            return Some(DOT_PARAM);
        }
    }
    None
}

/// IIS's `%uXXXX` escape (any case).
fn has_u_escape(p: &[u8]) -> bool {
    p.windows(6).any(|w| {
        w[0] == b'%' && (w[1] | 0x20) == b'u' && w[2..].iter().all(|b| b.is_ascii_hexdigit())
    })
}

/// A UTF-8 sequence longer than its code point needs: lead bytes C0/C1, or E0 / F0 followed by
/// a byte that makes the sequence overlong (RFC 3629 §3 forbids all of them).
fn has_overlong_utf8(p: &[u8]) -> bool {
    p.iter().enumerate().any(|(i, &b)| {
        let next = p.get(i + 1).copied().unwrap_or(0);
        matches!(b, 0xC0 | 0xC1)
            || (b == 0xE0 && (0x80..=0x9F).contains(&next))
            || (b == 0xF0 && (0x80..=0x8F).contains(&next))
    })
}

/// An ASCII control byte (NUL … US, DEL) or a C1 control encoded as UTF-8 (U+0080–U+009F).
fn has_control(seg: &[u8]) -> bool {
    seg.iter().enumerate().any(|(i, &b)| {
        b < 0x20
            || b == 0x7F
            || (b == 0xC2 && seg.get(i + 1).is_some_and(|n| (0x80..=0x9F).contains(n)))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dot_segments() {
        for bad in [
            "/v1/../admin",
            "/v1/./x",
            "/v1/%2e%2e/x",
            "/v1/%2E%2e/x",
            "/v1/.%2e/x",
            "/v1/x%2f..%2fy",
            "/v1/x%5c..%5cy",
            "/v1/x\\..\\y",
            "/v1/%252e%252e/x",
            "/v1/..",
        ] {
            assert_eq!(path_problem(bad), Some(DOT), "{bad}");
        }
        for ok in [
            "/v1/chat/completions",
            "/v1/files/file-abc.jsonl",
            "/v1/models/meta-llama/Llama-3.1-8B",
            "/v1/x/...",
            "/v1/x/...;a",
            "/v1/x/a;b",
            "/v1/%2",
            "/v1/a%",
            "/v1/models/caf%C3%A9",
            "/v1/models/%E2%82%AC",
            "/v1/models/%F0%9F%94%91",
            "/v1/x/%ul",
        ] {
            assert_eq!(path_problem(ok), None, "{ok}");
        }
    }

    #[test]
    fn second_probe_forms() {
        for (bad, why) in [
            ("/v1/..;/admin", DOT_PARAM),
            ("/v1/.;/x", DOT_PARAM),
            ("/v1/..;jsessionid=1/admin", DOT_PARAM),
            ("/v1/%2e%2e%3b/admin", DOT_PARAM),
            ("/v1/..%00/admin", CONTROL),
            ("/v1/x%00", CONTROL),
            ("/v1/x%09y", CONTROL),
            ("/v1/x%0ay", CONTROL),
            ("/v1/x%7f", CONTROL),
            ("/v1/x%C2%85", CONTROL),
            ("/v1/x%2500", CONTROL),
            ("/v1/%c0%ae%c0%ae/admin", OVERLONG),
            ("/v1/%C1%9C", OVERLONG),
            ("/v1/%e0%80%ae", OVERLONG),
            ("/v1/%f0%80%80%ae", OVERLONG),
            ("/v1/%25c0%25ae", OVERLONG),
            ("/v1/%u002e%u002e/admin", OVERLONG),
            ("/v1/%U002E", OVERLONG),
            ("/v1/%25u002e", OVERLONG),
        ] {
            assert_eq!(path_problem(bad), Some(why), "{bad}");
        }
    }
}
