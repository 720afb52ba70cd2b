//! The read-only status page (`GET /`, see the observability guide, "Status page") and
//! `GET /healthz`.
//!
//! Rendered on the server from the registry's snapshot so it works without JavaScript; the CSS
//! from `static/` is compiled in. Every value goes through `text::esc` (or `text::breakable`,
//! which escapes too); no key is ever in reach (the snapshot holds display endpoints only).
//! `upstreams` draws one card per upstream, `charts` its last hour, `text` how values read.

mod charts;
mod replicas;
mod text;
mod upstreams;

use actix_web::http::header;
use actix_web::{web, HttpResponse};

use crate::registry::UpstreamStatus;
use crate::state::AppState;
use crate::time::rfc3339;
use text::{counted, dur, esc, path, secs, timestamp};
use upstreams::{failures_table, upstream_cards};

/// The stylesheet, served at `/static/style.css`.
pub const STYLE: &str = include_str!("../../static/style.css");

/// The "Records" fact: where records go and how many were written (or that the database is
/// unreachable, with how many wait). No count is followed by a noun that could disagree with it.
fn recording(state: &AppState) -> String {
    match &state.sinks.recorder {
        Some(r) if !r.up() => format!(
            "<span class=\"err\">{} database unreachable</span><br><small>{} waiting · {}</small>",
            r.kind(),
            r.queued(),
            path(&state.database)
        ),
        Some(r) => {
            // Rows trail the requests by what the spool holds (see the observability guide,
            // "The spool"): said while there is a backlog worth a look.
            let behind = match r.spooled() {
                b if b >= 1 << 20 => {
                    format!(" · {:.1} MiB in the spool", b as f64 / f64::from(1 << 20))
                }
                _ => String::new(),
            };
            format!(
                "{} stored<br><small>records in {} {}{behind}</small>",
                r.rows(),
                r.kind(),
                path(&state.database)
            )
        }
        None => "recording off".to_string(),
    }
}

/// Renders the page from a snapshot.
pub fn render(state: &AppState, upstreams: &[UpstreamStatus]) -> String {
    let cfg = state.config.get();
    let mut cards = String::new();
    let models = state.models.snapshot();
    upstream_cards(&mut cards, upstreams, |name| {
        upstreams::models_cell(models.list(name))
    });
    let mut failures = String::new();
    if let Some(roster) = &state.replicas {
        let (list, reachable) = roster.list();
        replicas::replicas_table(&mut failures, &list, reachable);
    }
    failures_table(&mut failures, &state.sinks.registry.recent_failures());
    let uptime = dur(state.started.elapsed());
    let rescue = state.sinks.metrics.rescue_totals();
    let resumes = format!(
        "{}&nbsp;finished · {}&nbsp;prefill&nbsp;refused · {}&nbsp;started&nbsp;over · {}&nbsp;diverged · {}&nbsp;failed",
        rescue.1[0], rescue.1[1], rescue.1[4], rescue.1[2], rescue.1[3]
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
<div class=\"long\"><span>Records</span><b>{recording}</b></div>\
<div title=\"Extra attempts on the same upstream after a retryable failure (retries)\"><span>Same-upstream retries</span><b>{retries}</b></div>\
<div class=\"long\" title=\"Broken chat streams continued on the next upstream (resume): finished, prefill refused then regenerated, prefill ignored (the answer started over) then regenerated, regeneration diverged, could not continue\"><span>Stream resumes</span><b>{resumes}</b></div>\
</section>\
<h2>Upstreams, in configured order</h2>\
{cards}\
{failures}\
<footer>Cooldown: {cooldown} in a row → back of the order for {cs}. Metrics at <a href=\"/v1/metrics\">/v1/metrics</a>.</footer>\
</body></html>",
        version = esc(env!("CARGO_PKG_VERSION")),
        started = timestamp(&rfc3339(state.started_at)),
        listen = path(&state.listen),
        auth = if cfg.noauth { "off (-noauth)" } else { "on" },
        policy = esc(cfg.lb_policy.as_str()),
        recording = recording(state),
        retries = rescue.0,
        resumes = resumes,
        cooldown = counted(u64::from(cfg.cooldown_failures), "failure", "failures"),
        cs = secs(cfg.cooldown),
    )
}

/// `GET /`.
pub async fn page(state: web::Data<AppState>) -> HttpResponse {
    let snapshot = state.sinks.registry.snapshot().await;
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
    use crate::history::{minute_of, FailedAttempt, UpstreamHistory};
    use std::sync::Arc;
    use std::time::{Duration, Instant, SystemTime};

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
            probes: None,
            last_probe: None,
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
        upstream_cards(&mut out, &[u], |_| "—".into());
        failures_table(
            &mut out,
            &[FailedAttempt {
                at: SystemTime::now(),
                upstream: "\"><b>u".into(),
                model: Some("<svg onload=x>".into()),
                family: "chat/completions",
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
                family: "chat/completions",
                outcome: "timeout",
                reason: "x".repeat(200),
            })
            .collect();
        let t = Instant::now();
        let mut out = String::new();
        upstream_cards(&mut out, &ups, |_| "—".into());
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
