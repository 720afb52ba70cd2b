//! The read-only status page (`GET /`, SPEC §8) and `GET /healthz`.
//!
//! Rendered on the server from the registry's snapshot so it works without JavaScript; the CSS
//! from `static/` is compiled in. Every value goes through [`esc`]; no key is ever in reach
//! (the snapshot holds display endpoints only).

use std::fmt::Write;
use std::time::Duration;

use actix_web::http::header;
use actix_web::{web, HttpResponse};

use crate::charts;
use crate::history::FailedAttempt;
use crate::registry::UpstreamStatus;
use crate::state::AppState;
use crate::time::rfc3339;

/// The stylesheet, served at `/static/style.css`.
pub const STYLE: &str = include_str!("../static/style.css");

/// HTML-escapes text for element content and quoted attributes. Control characters, the line
/// and paragraph separators and the bidirectional controls become visible `\u{…}` text (an HTML
/// character reference would still be the character itself to the browser, and reorder the
/// text around it) (SPEC 4d).
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

fn dur(d: Duration) -> String {
    let s = d.as_secs();
    if s >= 86_400 {
        format!("{}d {}h", s / 86_400, s % 86_400 / 3600)
    } else if s >= 3600 {
        format!("{}h {}m", s / 3600, s % 3600 / 60)
    } else if s >= 60 {
        format!("{}m {}s", s / 60, s % 60)
    } else {
        let t = format!("{:.3}", d.as_secs_f64());
        format!("{}s", t.trim_end_matches('0').trim_end_matches('.'))
    }
}

/// Configured durations read best as plain seconds (`60s`, `2.5s`), as they are written.
fn secs(d: Duration) -> String {
    let t = format!("{:.3}", d.as_secs_f64());
    format!("{}s", t.trim_end_matches('0').trim_end_matches('.'))
}

fn ms(d: Duration) -> String {
    let m = d.as_secs_f64() * 1000.0;
    if m < 10.0 {
        format!("{m:.2} ms")
    } else {
        format!("{m:.0} ms")
    }
}

fn row(out: &mut String, u: &UpstreamStatus, pos: usize, models: &str) {
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
        "<tr><td data-label=\"#\">{pos}</td><td data-label=\"Name\" class=\"name\">{}</td>\
         <td data-label=\"Endpoint\" class=\"mono\">{}</td>\
         <td data-label=\"State\"><span class=\"state {state_class}\">{}</span></td>\
         <td data-label=\"Timeouts\">{} / {}</td>\
         <td data-label=\"Allow / deny\">{} / {}</td>\
         <td data-label=\"Failures in a row\">{}</td>\
         <td data-label=\"OK / failed\">{} / {}</td>\
         <td data-label=\"First byte (median)\">{}</td>\
         <td data-label=\"Last error\">{}</td>\
         <td data-label=\"Tokens since start\">{}</td>\
         <td data-label=\"Models\" class=\"models\">{}</td>\
         <td data-label=\"Last 60 minutes\" class=\"hist\">",
        esc(&u.name),
        esc(&u.endpoint),
        esc(&state),
        secs(u.timeout),
        secs(u.stream_timeout),
        list(&u.allow),
        list(&u.deny),
        u.consecutive_failures,
        u.ok,
        u.failed,
        u.recent_first_byte.map(ms).unwrap_or_else(|| "—".into()),
        match &u.last_error {
            Some((t, e)) => format!(
                "<div><span class=\"err\">{}</span><br><small>{}</small></div>",
                esc(&crate::history::clip(e, crate::history::TEXT_MAX)),
                esc(&rfc3339(*t))
            ),
            None => "—".into(),
        },
        tokens(u),
        models,
    );
    charts::last_hour(out, &u.history.last_hour());
    out.push_str("</td></tr>");
}

/// Thousands separated with thin spaces: token counts run into the millions.
fn grouped(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3 * 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push('\u{2009}');
        }
        out.push(c);
    }
    out
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

/// The upstream's model list (SPEC §4b): how many ids, when fetched, the last fetch error.
fn models_cell(list: Option<&crate::models::ListState>) -> String {
    let Some(l) = list else {
        return "—".into();
    };
    let mut out = String::new();
    match (&l.ids, l.configured, l.fetched_at) {
        (Some(ids), true, _) => {
            let _ = write!(out, "{} ids <small>(from config)</small>", ids.len());
        }
        (Some(ids), false, Some(t)) => {
            let _ = write!(
                out,
                "{} ids<br><small>fetched {}</small>",
                ids.len(),
                esc(&rfc3339(t))
            );
        }
        _ => out.push_str("not fetched yet"),
    }
    if let Some((t, e)) = &l.error {
        let _ = write!(
            out,
            "<br><span class=\"err\">{}</span> <small>{}</small>",
            esc(e),
            esc(&rfc3339(*t))
        );
    }
    out
}

/// The upstream rows; `models` renders an upstream's model-list cell by name.
pub fn upstream_rows(
    out: &mut String,
    upstreams: &[UpstreamStatus],
    models: impl Fn(&str) -> String,
) {
    for (i, u) in upstreams.iter().enumerate() {
        row(out, u, i + 1, &models(&u.name));
    }
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
         <th>Outcome</th><th>Reason</th></tr></thead><tbody>",
    );
    for f in failures {
        let _ = write!(
            out,
            "<tr><td data-label=\"Time\" class=\"mono\">{}</td>\
             <td data-label=\"Upstream\" class=\"name\">{}</td>\
             <td data-label=\"Model\" class=\"mono\">{}</td>\
             <td data-label=\"Outcome\"><span class=\"outcome\">{}</span></td>\
             <td data-label=\"Reason\" class=\"err\">{}</td></tr>",
            esc(&rfc3339(f.at)),
            esc(&f.upstream),
            f.model.as_deref().map(esc).unwrap_or_else(|| "—".into()),
            esc(f.outcome),
            esc(&f.reason),
        );
    }
    out.push_str("</tbody></table>");
}

/// Renders the page from a snapshot.
pub fn render(state: &AppState, upstreams: &[UpstreamStatus]) -> String {
    let cfg = state.config.get();
    let mut rows = String::new();
    let models = state.models.snapshot();
    upstream_rows(&mut rows, upstreams, |name| models_cell(models.list(name)));
    let mut failures = String::new();
    failures_table(&mut failures, &state.registry.recent_failures());
    let recording = match &state.recorder {
        Some(r) if !r.up() => format!(
            "<span class=\"err\">{} database unreachable</span> ({} records waiting) {}",
            r.kind(),
            r.queued(),
            esc(&state.database)
        ),
        Some(r) => format!(
            "{} records in {} {}",
            r.rows(),
            r.kind(),
            esc(&state.database)
        ),
        None => "recording off".to_string(),
    };
    let uptime = dur(state.started.elapsed());
    let rescue = state.metrics.rescue_totals();
    let resumes = format!(
        "{} finished · {} prefill refused · {} diverged · {} failed",
        rescue.1[0], rescue.1[1], rescue.1[2], rescue.1[3]
    );
    format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
<meta http-equiv=\"refresh\" content=\"30\">\
<title>openai-api-route status</title><link rel=\"stylesheet\" href=\"/static/style.css\"></head><body>\
<header><h1>openai-api-route</h1><p class=\"sub\">OpenAI API gateway status</p></header>\
<section class=\"facts\">\
<div><span>Version</span><b>{version}</b></div>\
<div><span>Uptime</span><b>{uptime}</b></div>\
<div><span>Started</span><b>{started}</b></div>\
<div><span>Listening on</span><b>{listen}</b></div>\
<div><span>Client auth</span><b>{auth}</b></div>\
<div><span>Policy</span><b>{policy}</b></div>\
<div><span>Records</span><b>{recording}</b></div>\
<div title=\"Extra attempts on the same upstream after a retryable failure (retries)\"><span>Same-upstream retries</span><b>{retries}</b></div>\
<div title=\"Broken chat streams continued on the next upstream (resume): finished, prefill refused then regenerated, regeneration diverged, could not continue\"><span>Stream resumes</span><b>{resumes}</b></div>\
</section>\
<h2>Upstreams, in configured order</h2>\
<div class=\"wide\"><table class=\"upstreams\"><thead><tr><th>#</th><th>Name</th><th>Endpoint</th><th>State</th>\
<th>Timeouts (head / stream)</th><th>Allow / deny</th><th>Failures in a row</th><th>OK / failed</th>\
<th>First byte (median)</th><th>Last error</th><th>Tokens since start</th><th>Models</th>\
<th>Last 60 minutes</th></tr></thead><tbody>{rows}</tbody></table></div>\
{failures}\
<footer>Cooldown: {cf} failures in a row → back of the order for {cs}. Metrics at <a href=\"/v1/metrics\">/v1/metrics</a>.</footer>\
</body></html>",
        version = esc(env!("CARGO_PKG_VERSION")),
        started = esc(&rfc3339(state.started_at)),
        listen = esc(&state.listen),
        auth = if cfg.noauth { "off (-noauth)" } else { "on" },
        policy = esc(cfg.lb_policy.as_str()),
        retries = rescue.0,
        resumes = resumes,
        cf = cfg.cooldown_failures,
        cs = secs(cfg.cooldown),
    )
}

/// `GET /`.
pub async fn page(state: web::Data<AppState>) -> HttpResponse {
    let snapshot = state.registry.snapshot().await;
    HttpResponse::Ok()
        .insert_header((header::CONTENT_TYPE, "text/html; charset=utf-8"))
        .insert_header((header::CACHE_CONTROL, "no-store"))
        .body(render(&state, &snapshot))
}

/// `GET /static/style.css`.
pub async fn style() -> HttpResponse {
    HttpResponse::Ok()
        .insert_header((header::CONTENT_TYPE, "text/css; charset=utf-8"))
        .insert_header((header::CACHE_CONTROL, "public, max-age=3600"))
        .body(STYLE)
}

/// `GET /healthz`.
pub async fn healthz() -> HttpResponse {
    HttpResponse::Ok()
        .insert_header((header::CONTENT_TYPE, "text/plain"))
        .body("ok")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::{minute_of, UpstreamHistory};
    use std::sync::Arc;
    use std::time::{Instant, SystemTime};

    fn upstream(name: &str, history: Arc<UpstreamHistory>) -> UpstreamStatus {
        UpstreamStatus {
            name: name.to_string(),
            endpoint: "https://api.example.com/v1".into(),
            timeout: Duration::from_secs(60),
            stream_timeout: Duration::from_secs(5),
            allow: vec!["gpt-*".into()],
            deny: vec![],
            consecutive_failures: 0,
            cooling_until: None,
            healthy: true,
            ok: 1,
            failed: 1,
            last_error: Some((SystemTime::now(), "<script>alert(1)</script>".into())),
            recent_first_byte: Some(Duration::from_millis(420)),
            history,
        }
    }

    #[test]
    fn hostile_names_and_reasons_are_escaped() {
        let u = upstream("<img src=x onerror=alert(1)>", Arc::default());
        let mut out = String::new();
        upstream_rows(&mut out, &[u], |_| "—".into());
        failures_table(
            &mut out,
            &[FailedAttempt {
                at: SystemTime::now(),
                upstream: "\"><b>u".into(),
                model: Some("<svg onload=x>".into()),
                outcome: "http_error",
                reason: "HTTP 500 <iframe>&".into(),
            }],
        );
        for bad in ["<img", "<script", "<svg onload", "<iframe", "\"><b>"] {
            assert!(!out.contains(bad), "{bad} unescaped in {out}");
        }
        assert!(out.contains("&lt;img src=x onerror=alert(1)&gt;"));
        assert!(out.contains("HTTP 500 &lt;iframe&gt;&amp;"));
        assert!(out.contains("&lt;svg onload=x&gt;"));
    }

    #[test]
    fn empty_failure_list_says_so() {
        let mut out = String::new();
        failures_table(&mut out, &[]);
        assert!(out.contains("No failed attempt since start."));
    }

    #[test]
    fn token_counts_are_grouped() {
        assert_eq!(grouped(0), "0");
        assert_eq!(grouped(999), "999");
        assert_eq!(grouped(1_234_567), "1\u{2009}234\u{2009}567");
    }

    /// Not a timed assertion beyond a loose bound: prints what rendering 20 upstreams with a full
    /// hour of history and 20 failures costs (release builds take well under a millisecond).
    #[test]
    fn render_cost_with_twenty_full_upstreams() {
        let now = minute_of(SystemTime::now());
        let ups: Vec<UpstreamStatus> = (0..20)
            .map(|i| {
                let h = Arc::new(UpstreamHistory::default());
                for m in now - 59..=now {
                    for k in 0..(m % 7 + 1) {
                        h.record_ok_at(
                            m,
                            Duration::from_millis(u64::from(50 + k * 300 + m % 13 * 40)),
                        );
                    }
                    h.record_failure_at(m, true);
                }
                h.add_tokens(Some(123_456), Some(7_890));
                upstream(&format!("upstream-{i}"), h)
            })
            .collect();
        let failures: Vec<FailedAttempt> = (0..20)
            .map(|i| FailedAttempt {
                at: SystemTime::now(),
                upstream: format!("upstream-{i}"),
                model: Some("gpt-4o".into()),
                outcome: "timeout",
                reason: "x".repeat(200),
            })
            .collect();
        let t = Instant::now();
        let mut out = String::new();
        upstream_rows(&mut out, &ups, |_| "—".into());
        failures_table(&mut out, &failures);
        let took = t.elapsed();
        eprintln!(
            "status page body for 20 upstreams with full history: {} bytes in {took:?}",
            out.len()
        );
        assert_eq!(out.matches("<svg").count(), 40);
        assert!(took < Duration::from_millis(50), "{took:?}");
    }
}
