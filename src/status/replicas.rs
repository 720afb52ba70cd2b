//! The status page's "Replicas" section: the replicas sharing the PostgreSQL store (see the
//! operations guide, "Several replicas"), as the roster last read them. Host names and
//! addresses come from other processes' rows, so they are escaped like everything else.

use std::fmt::Write;
use std::time::SystemTime;

use super::text::{breakable, esc, path, timestamp};
use crate::replicas::Replica;
use crate::time::rfc3339;

/// The section; `reachable` is whether PostgreSQL answered the last read.
pub fn replicas_table(out: &mut String, list: &[Replica], reachable: bool) {
    let _ = write!(out, "<h2>Replicas sharing the store ({})</h2>", list.len());
    if !reachable {
        out.push_str(
            "<p class=\"err\">PostgreSQL cannot be reached: health is this replica's own \
             until it answers; the list is the last one read.</p>",
        );
    }
    if list.is_empty() {
        out.push_str("<p class=\"none\">None seen in the last minute yet.</p>");
        return;
    }
    out.push_str(
        "<table class=\"failures replicas\"><thead><tr><th>Host</th><th>Listening on</th>\
         <th>Version</th><th>Last seen</th></tr></thead><tbody>",
    );
    let now = SystemTime::now();
    for r in list {
        let ago = now.duration_since(r.seen).unwrap_or_default().as_secs_f64();
        let _ = write!(
            out,
            "<tr><td data-label=\"Host\" class=\"name\">{}</td>\
             <td data-label=\"Listening on\" class=\"mono\">{}</td>\
             <td data-label=\"Version\">{}</td>\
             <td data-label=\"Last seen\" class=\"mono\">{} <small>({ago:.1}s ago)</small></td></tr>",
            breakable(&r.host),
            path(&r.listen),
            esc(&r.version),
            timestamp(&rfc3339(r.seen)),
        );
    }
    out.push_str("</tbody></table>");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostile_rows_are_escaped() {
        let r = Replica {
            id: "x".into(),
            host: "<script>h</script>".into(),
            listen: "\"><img src=x>".into(),
            version: "<b>".into(),
            seen: SystemTime::now(),
        };
        let mut out = String::new();
        replicas_table(&mut out, &[r], false);
        for bad in ["<script", "<img", "<b>"] {
            assert!(!out.contains(bad), "{bad} unescaped in {out}");
        }
        assert!(out.contains("cannot be reached"));
        assert!(out.contains("Replicas sharing the store (1)"));
    }
}
