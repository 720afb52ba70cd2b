//! The read-only status page (`GET /`, SPEC §8) and `GET /healthz`.
//!
//! Rendered on the server from the registry's snapshot so it works without JavaScript; the CSS
//! from `static/` is compiled in. Every value goes through [`esc`]; no key is ever in reach
//! (the snapshot holds display endpoints only).

use std::fmt::Write;
use std::time::Duration;

use actix_web::http::header;
use actix_web::{web, HttpResponse};

use crate::registry::UpstreamStatus;
use crate::state::AppState;
use crate::time::rfc3339;

/// The stylesheet, served at `/static/style.css`.
pub const STYLE: &str = include_str!("../static/style.css");

/// HTML-escapes text for element content and quoted attributes.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
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
         <td data-label=\"Models\">{models}</td></tr>",
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
                esc(e),
                esc(&rfc3339(*t))
            ),
            None => "—".into(),
        },
    );
}

/// Renders the page from a snapshot.
pub fn render(state: &AppState, upstreams: &[UpstreamStatus]) -> String {
    let cfg = state.config.get();
    let mut rows = String::new();
    let models = state.models.snapshot();
    for (i, u) in upstreams.iter().enumerate() {
        row(&mut rows, u, i + 1, &models.status_cell(&u.name));
    }
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
</section>\
<h2>Upstreams, in configured order</h2>\
<table class=\"upstreams\"><thead><tr><th>#</th><th>Name</th><th>Endpoint</th><th>State</th>\
<th>Timeouts (head / stream)</th><th>Allow / deny</th><th>Failures in a row</th><th>OK / failed</th>\
<th>First byte (median)</th><th>Last error</th><th>Models</th></tr></thead><tbody>{rows}</tbody></table>\
<footer>Cooldown: {cf} failures in a row → back of the order for {cs}. Metrics at <a href=\"/v1/metrics\">/v1/metrics</a>.</footer>\
</body></html>",
        version = esc(env!("CARGO_PKG_VERSION")),
        started = esc(&rfc3339(state.started_at)),
        listen = esc(&state.listen),
        auth = if cfg.noauth { "off (-noauth)" } else { "on" },
        policy = esc(cfg.lb_policy.as_str()),
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
