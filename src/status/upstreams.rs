//! The status page's upstream cards and its list of the last failed attempts.
//!
//! One card per upstream rather than a thirteen-column table: a table that wide scrolls sideways
//! at 1280 px and hides the charts at its end. A card puts name, endpoint and state on top, the
//! numbers in a grid that reflows with the width, and the 60-minute charts beside them (below
//! them on a phone). Names and endpoints go through [`breakable`] so they wrap at their
//! separators, never mid-word.

use std::fmt::Write;

use super::charts;
use super::text::{breakable, counted, esc, grouped, ms, secs, timestamp};
use crate::history::FailedAttempt;
use crate::registry::UpstreamStatus;
use crate::time::rfc3339;

/// One fact of a card: a label over its value (`value` is HTML already).
fn fact(out: &mut String, class: &str, label: &str, value: &str) {
    let _ = write!(
        out,
        "<div class=\"fact{class}\"><dt>{label}</dt><dd>{value}</dd></div>"
    );
}

fn card(out: &mut String, u: &UpstreamStatus, pos: usize, models: &str) {
    let (state_class, state) = match (u.cooling_until, u.healthy) {
        (Some(until), _) => ("cooling", format!("cooling down until {}", rfc3339(until))),
        (None, true) => ("healthy", "healthy".to_string()),
        (None, false) => ("probing", "retrying (cooldown over)".to_string()),
    };
    let list = |v: &[String]| {
        if v.is_empty() {
            "—".to_string()
        } else {
            esc(&v.join(", "))
        }
    };
    let _ = write!(
        out,
        "<article class=\"upstream\"><header><span class=\"pos\">{pos}</span>\
         <div class=\"ident\"><h3 class=\"name\">{}</h3><div class=\"endpoint mono\">{}</div></div>\
         <span class=\"state {state_class}\">{}</span></header><div class=\"body\"><dl class=\"facts-grid\">",
        breakable(&u.name),
        breakable(&u.endpoint),
        esc(&state),
    );
    fact(
        out,
        "",
        "Timeouts (head / stream)",
        &format!("{} / {}", secs(u.timeout), secs(u.stream_timeout)),
    );
    fact(
        out,
        "",
        "Allow / deny",
        &format!("{} / {}", list(&u.allow), list(&u.deny)),
    );
    fact(
        out,
        "",
        "Failures in a row",
        &u.consecutive_failures.to_string(),
    );
    fact(out, "", "OK / failed", &format!("{} / {}", u.ok, u.failed));
    fact(
        out,
        "",
        "First byte (median)",
        &u.recent_first_byte.map(ms).unwrap_or_else(|| "—".into()),
    );
    fact(out, "", "Tokens since start", &tokens(u));
    fact(out, "", "Models", models);
    fact(out, "", "Probes", &probes(u));
    let last_error = match &u.last_error {
        Some((t, e)) => format!(
            "<div><span class=\"err\">{}</span><br><small>{}</small></div>",
            esc(&crate::history::clip(e, crate::history::TEXT_MAX)),
            timestamp(&rfc3339(*t))
        ),
        None => "—".into(),
    };
    fact(out, " wide", "Last error", &last_error);
    out.push_str("</dl><div class=\"hist\"><h4>Last 60 minutes</h4>");
    charts::last_hour(out, &u.history.last_hour());
    out.push_str("</div></div></article>");
}

/// Whether probes are on (`probe_interval`) and the last probe's result and time.
fn probes(u: &UpstreamStatus) -> String {
    let Some(every) = u.probes else {
        return "off".into();
    };
    let last = match u.last_probe {
        Some((t, "ok")) => format!("last: ok {}", timestamp(&rfc3339(t))),
        Some((t, result)) => format!(
            "last: <span class=\"err\">{}</span> {}",
            esc(result),
            timestamp(&rfc3339(t))
        ),
        None => "no probe yet".into(),
    };
    format!("<div>every {}<br><small>{last}</small></div>", secs(every))
}

fn tokens(u: &UpstreamStatus) -> String {
    let (prompt, completion) = u.history.tokens();
    format!(
        "<div>{}<br><small>{} prompt · {} completion</small></div>",
        grouped(prompt + completion),
        grouped(prompt),
        grouped(completion)
    )
}

/// The upstream's model list (see the observability guide, "Models and token usage (0.2)"): how
/// many ids, when fetched, the last fetch error.
pub fn models_cell(list: Option<&crate::models::lists::ListState>) -> String {
    let Some(l) = list else {
        return "—".into();
    };
    let mut out = String::new();
    match (&l.ids, l.configured, l.fetched_at) {
        (Some(ids), true, _) => {
            let _ = write!(
                out,
                "{} <small>(from config)</small>",
                counted(ids.len() as u64, "id", "ids")
            );
        }
        (Some(ids), false, Some(t)) => {
            let _ = write!(
                out,
                "{}<br><small>fetched {}</small>",
                counted(ids.len() as u64, "id", "ids"),
                timestamp(&rfc3339(t))
            );
        }
        _ => out.push_str("not fetched yet"),
    }
    if let Some((t, e)) = &l.error {
        let _ = write!(
            out,
            "<br><span class=\"err\">{}</span> <small>{}</small>",
            esc(e),
            timestamp(&rfc3339(*t))
        );
    }
    out
}

/// The upstream cards, in order; `models` renders an upstream's model-list fact by name.
pub fn upstream_cards(
    out: &mut String,
    upstreams: &[UpstreamStatus],
    models: impl Fn(&str) -> String,
) {
    out.push_str("<section class=\"upstreams\">");
    for (i, u) in upstreams.iter().enumerate() {
        card(out, u, i + 1, &models(&u.name));
    }
    out.push_str("</section>");
}

/// The "last failed attempts" section; `failures` newest first.
pub fn failures_table(out: &mut String, failures: &[FailedAttempt]) {
    let _ = write!(
        out,
        "<h2>Last {} failed attempts</h2>",
        crate::history::RECENT_FAILURES
    );
    if failures.is_empty() {
        out.push_str("<p class=\"none\">No failed attempt since start.</p>");
        return;
    }
    out.push_str(
        "<table class=\"failures\"><thead><tr><th>Time</th><th>Upstream</th><th>Model</th>\
         <th>API</th><th>Outcome</th><th>Reason</th></tr></thead><tbody>",
    );
    for f in failures {
        let _ = write!(
            out,
            "<tr><td data-label=\"Time\" class=\"mono\">{}</td>\
             <td data-label=\"Upstream\" class=\"name\">{}</td>\
             <td data-label=\"Model\" class=\"mono model\">{}</td>\
             <td data-label=\"API\" class=\"mono\">{}</td>\
             <td data-label=\"Outcome\"><span class=\"outcome\">{}</span></td>\
             <td data-label=\"Reason\" class=\"err\">{}</td></tr>",
            timestamp(&rfc3339(f.at)),
            breakable(&f.upstream),
            f.model
                .as_deref()
                .map(breakable)
                .unwrap_or_else(|| "—".into()),
            breakable(f.family),
            esc(f.outcome),
            esc(&f.reason),
        );
    }
    out.push_str("</tbody></table>");
}
