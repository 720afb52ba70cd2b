//! How values read on the status page: escaped, counted in agreement ("1 attempt", "2 attempts"),
//! long names wrapped only where they may be, durations and sizes for people.
//!
//! Everything here returns HTML-safe text: each function escapes what it is given, so a caller
//! never has to remember which of them already did.

use std::fmt::Write;
use std::time::Duration;

/// HTML-escapes text for element content and quoted attributes. Control characters, the line
/// and paragraph separators and the bidirectional controls become visible `\u{…}` text (an HTML
/// character reference would still be the character itself to the browser, and reorder the
/// text around it) (see the security guide, "Escaping").
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            c if crate::escape::needs_escape(c) => {
                let _ = write!(out, "\\u{{{:x}}}", c as u32);
            }
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// `n` and the noun in agreement with it: `counted(1, "attempt", "attempts")` is "1 attempt".
/// Every count on the page goes through here; building a plural by suffixing is how "1 attempts"
/// happened.
pub fn counted(n: u64, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

/// Characters after which a long name, endpoint or path may wrap. A browser breaks none of
/// `/`, `.`, `_`, `:` and no `-` before a digit, so `self_hosted_vllm_llama-3.1-70b` or
/// `/openai/deployments/gpt-4o-2024-08-06` would run off a phone's screen or be broken mid-word.
const BREAK_AFTER: [char; 7] = ['/', '.', '-', '_', ':', '?', '&'];

/// The longest run without a space that is left as written: 28 characters fit every column the
/// page has on a 390 px phone, so short names and endpoints stay one piece in the markup.
const LONG_RUN: usize = 28;

/// [`esc`], with a `<wbr>` after each separator in [`BREAK_AFTER`] inside runs longer than
/// [`LONG_RUN`] (a run of separators such as `://` gets one after its last), so a long name
/// wraps at its natural break points and never mid-word.
pub fn breakable(s: &str) -> String {
    wrap_runs(s, LONG_RUN)
}

/// [`breakable`] for a value shown in a narrow fact box (the database target, the listen
/// address): every run may wrap at its separators, however short.
pub fn path(s: &str) -> String {
    wrap_runs(s, 0)
}

fn wrap_runs(s: &str, long_run: usize) -> String {
    let mut out = String::with_capacity(s.len() + s.len() / 4);
    let mut buf = [0u8; 4];
    for (i, run) in s.split(' ').enumerate() {
        if i > 0 {
            out.push(' ');
        }
        if run.chars().count() <= long_run {
            out.push_str(&esc(run));
            continue;
        }
        let mut chars = run.chars().peekable();
        while let Some(c) = chars.next() {
            out.push_str(&esc(c.encode_utf8(&mut buf)));
            if BREAK_AFTER.contains(&c) && chars.peek().is_some_and(|n| !BREAK_AFTER.contains(n)) {
                out.push_str("<wbr>");
            }
        }
    }
    out
}

/// A timestamp (RFC 3339) that may wrap between its date and its time.
pub fn timestamp(rfc3339: &str) -> String {
    match rfc3339.split_once('T') {
        Some((date, time)) => format!("{}T<wbr>{}", esc(date), esc(time)),
        None => esc(rfc3339),
    }
}

/// An elapsed time for people: `2d 3h`, `5h 12m`, `4m 2s`, `1.25s`.
pub fn dur(d: Duration) -> String {
    let s = d.as_secs();
    if s >= 86_400 {
        format!("{}d {}h", s / 86_400, s % 86_400 / 3600)
    } else if s >= 3600 {
        format!("{}h {}m", s / 3600, s % 3600 / 60)
    } else if s >= 60 {
        format!("{}m {}s", s / 60, s % 60)
    } else {
        secs(d)
    }
}

/// Configured durations read best as plain seconds (`60s`, `2.5s`), as they are written.
pub fn secs(d: Duration) -> String {
    let t = format!("{:.3}", d.as_secs_f64());
    format!("{}s", t.trim_end_matches('0').trim_end_matches('.'))
}

/// A latency in milliseconds, two decimals below 10 ms.
pub fn ms(d: Duration) -> String {
    let m = d.as_secs_f64() * 1000.0;
    if m < 10.0 {
        format!("{m:.2} ms")
    } else {
        format!("{m:.0} ms")
    }
}

/// Thousands separated with thin spaces: token counts run into the millions.
pub fn grouped(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3 * 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push('\u{2009}');
        }
        let _ = write!(out, "{c}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_agree_in_number() {
        assert_eq!(counted(0, "attempt", "attempts"), "0 attempts");
        assert_eq!(counted(1, "attempt", "attempts"), "1 attempt");
        assert_eq!(counted(2, "attempt", "attempts"), "2 attempts");
        assert_eq!(counted(1, "failure", "failures"), "1 failure");
    }

    #[test]
    fn long_names_may_wrap_after_separators_only() {
        assert_eq!(
            breakable("self_hosted_vllm_llama-3.1-70b-canary"),
            "self_<wbr>hosted_<wbr>vllm_<wbr>llama-<wbr>3.<wbr>1-<wbr>70b-<wbr>canary"
        );
        assert_eq!(
            breakable("http://127.0.0.1:8080/openai/deployments/x"),
            "http://<wbr>127.<wbr>0.<wbr>0.<wbr>1:<wbr>8080/<wbr>openai/<wbr>deployments/<wbr>x"
        );
        // Short runs stay as written; spaces are break points already.
        assert_eq!(breakable("bad-one"), "bad-one");
        assert_eq!(
            breakable("http://127.0.0.1:12345/v1"),
            "http://127.0.0.1:12345/v1"
        );
        assert_eq!(
            breakable("a.b a_very_long_name_with_many_parts.x"),
            "a.b a_<wbr>very_<wbr>long_<wbr>name_<wbr>with_<wbr>many_<wbr>parts.<wbr>x"
        );
        // Escaped still; nothing inserted inside an entity or after the last character.
        assert_eq!(breakable("a<b>&c"), "a&lt;b&gt;&amp;c");
        assert_eq!(
            path("/tmp/x/db.sqlite"),
            "/<wbr>tmp/<wbr>x/<wbr>db.<wbr>sqlite"
        );
        assert_eq!(path("a&b <i>"), "a&amp;<wbr>b &lt;i&gt;");
        assert_eq!(
            breakable("\"><img/src=x-onerror=alert(1)>&&&&&&"),
            "&quot;&gt;&lt;img/<wbr>src=x-<wbr>onerror=alert(1)&gt;&amp;&amp;&amp;&amp;&amp;&amp;"
        );
    }

    #[test]
    fn timestamps_wrap_between_date_and_time() {
        assert_eq!(
            timestamp("2026-01-02T03:04:05.678Z"),
            "2026-01-02T<wbr>03:04:05.678Z"
        );
        assert_eq!(timestamp("<x>"), "&lt;x&gt;");
    }

    #[test]
    fn token_counts_are_grouped() {
        assert_eq!(grouped(0), "0");
        assert_eq!(grouped(999), "999");
        assert_eq!(grouped(1_234_567), "1\u{2009}234\u{2009}567");
    }

    #[test]
    fn durations_read_as_written() {
        assert_eq!(secs(Duration::from_millis(2500)), "2.5s");
        assert_eq!(secs(Duration::from_secs(60)), "60s");
        assert_eq!(dur(Duration::from_secs(90_061)), "1d 1h");
        assert_eq!(dur(Duration::from_millis(48)), "0.048s");
        assert_eq!(ms(Duration::from_micros(380)), "0.38 ms");
    }
}
