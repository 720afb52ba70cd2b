//! `GET /usage` (see the members guide, "Usage"): what a member used — its limits, what it uses
//! now, and its requests and tokens per day and model from the records — as JSON for the
//! member's key, and, asked by a browser, as a page that asks for the key (kept in the tab's
//! session storage only, never in a URL) and draws the same data.

use std::time::{Duration, Instant, SystemTime};

use actix_web::http::header::{self, HeaderValue};
use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse};
use serde::Serialize;

use crate::admission::authorize;
use crate::records::usage::{member_days, DayUse};
use crate::state::AppState;

/// The page (no data in it: it fetches `/usage` with the key the person enters).
const PAGE: &str = include_str!("../static/usage.html");
/// Its script.
const SCRIPT: &str = include_str!("../static/usage.js");
/// Its stylesheet.
const STYLE: &str = include_str!("../static/usage.css");

/// Days of use shown by default, and at most.
const DAYS: (u32, u32) = (30, 90);

#[derive(Serialize)]
struct Answer {
    member: String,
    limits: Limits,
    now: Now,
    days: Vec<DayUse>,
}

#[derive(Serialize)]
struct Limits {
    rpm: Option<u64>,
    tpm: Option<u64>,
    tokens_per_day: Option<u64>,
    concurrent: Option<u64>,
}

#[derive(Serialize)]
struct Now {
    requests_last_minute: u64,
    tokens_last_minute: u64,
    tokens_today: u64,
    in_flight: u64,
}

/// An OpenAI-style error answer.
fn error(status: StatusCode, message: &str, code: &str) -> HttpResponse {
    let body = serde_json::json!({"error": {
        "message": message, "type": "invalid_request_error", "param": null, "code": code,
    }});
    HttpResponse::build(status)
        .insert_header((header::CONTENT_TYPE, "application/json"))
        .insert_header((header::CACHE_CONTROL, "no-store"))
        .body(body.to_string())
}

/// Whether a browser asks for a page (`Accept` names `text/html`).
fn wants_html(req: &HttpRequest) -> bool {
    req.headers()
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("text/html"))
}

/// `member=NAME` and `days=N` of the query; `days` outside 1–90 is an error.
fn query(req: &HttpRequest) -> Result<(Option<String>, u32), &'static str> {
    let mut member = None;
    let mut days = DAYS.0;
    for pair in req.query_string().split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        // Decoded when escaped (a label-named member's `…`), as written otherwise.
        let v = match crate::escape::percent_decode(v.as_bytes()) {
            Some(bytes) => String::from_utf8(bytes).unwrap_or_default(),
            None => v.to_string(),
        };
        match k {
            "member" => member = Some(v),
            "days" => {
                days = v
                    .parse::<u32>()
                    .ok()
                    .filter(|d| (1..=DAYS.1).contains(d))
                    .ok_or("days must be a whole number from 1 to 90")?;
            }
            _ => {}
        }
    }
    Ok((member, days))
}

/// `GET /usage`.
pub async fn usage(req: HttpRequest, state: web::Data<AppState>) -> HttpResponse {
    if wants_html(&req) {
        return HttpResponse::Ok()
            .insert_header((header::CONTENT_TYPE, "text/html; charset=utf-8"))
            .insert_header((header::CACHE_CONTROL, "no-store"))
            .insert_header((
                header::REFERRER_POLICY,
                HeaderValue::from_static("no-referrer"),
            ))
            .body(PAGE);
    }
    let cfg = state.config.get();
    let caller = match authorize(&req, &cfg) {
        Ok(c) => c,
        Err(e) => return error(StatusCode::UNAUTHORIZED, &e.to_string(), "invalid_api_key"),
    };
    let Some(me) = caller.member.and_then(|i| cfg.members.list.get(i)) else {
        return error(
            StatusCode::UNAUTHORIZED,
            "send a member's key as `Authorization: Bearer <key>`",
            "invalid_api_key",
        );
    };
    let (asked, days) = match query(&req) {
        Ok(q) => q,
        Err(why) => return error(StatusCode::BAD_REQUEST, why, "invalid_request"),
    };
    let member = match asked.as_deref() {
        None => me,
        Some(name) if name == &*me.name => me,
        Some(_) if !me.admin => {
            return error(
                StatusCode::FORBIDDEN,
                "only an admin member may read another member's usage",
                "forbidden",
            )
        }
        Some(name) => match cfg.members.by_name(name) {
            Some(m) => m,
            None => {
                let message = format!("no member named {:?}", crate::escape::untrusted(name));
                return error(StatusCode::NOT_FOUND, &message, "not_found");
            }
        },
    };
    let mut used = member.state.used(Instant::now(), SystemTime::now());
    // Replicas sharing a PostgreSQL store: the group's numbers (see the operations guide).
    if let Some(s) = &state.sinks.sharing {
        if let Some(o) = s.others_use(&member.name, &member.limits).await {
            used.requests_last_minute += o.requests_last_minute;
            used.tokens_last_minute += o.tokens_last_minute;
            used.tokens_today += o.tokens_today;
            used.in_flight += o.in_flight;
        }
    }
    let since = SystemTime::now() - Duration::from_secs(u64::from(days - 1) * 86_400);
    let since = day_start(since);
    let days = match state.store.clone() {
        None => Vec::new(),
        Some(store) => {
            let name = member.name.to_string();
            match web::block(move || member_days(&store, &name, since)).await {
                Ok(Ok(days)) => days,
                Ok(Err(e)) => {
                    log::warn!("usage: reading the records failed: {}", e.message);
                    return error(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "the records cannot be read now",
                        "records_unavailable",
                    );
                }
                Err(_) => Vec::new(),
            }
        }
    };
    let l = member.limits;
    let answer = Answer {
        member: member.name.to_string(),
        limits: Limits {
            rpm: l.rpm,
            tpm: l.tpm,
            tokens_per_day: l.tokens_per_day,
            concurrent: l.concurrent,
        },
        now: Now {
            requests_last_minute: used.requests_last_minute,
            tokens_last_minute: used.tokens_last_minute,
            tokens_today: used.tokens_today,
            in_flight: used.in_flight,
        },
        days,
    };
    HttpResponse::Ok()
        .insert_header((header::CACHE_CONTROL, "no-store"))
        .json(answer)
}

/// The start (00:00 UTC) of the day of `t`.
fn day_start(t: SystemTime) -> SystemTime {
    let secs = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    SystemTime::UNIX_EPOCH + Duration::from_secs(secs - secs % 86_400)
}

/// `GET /static/usage.js`.
pub async fn script() -> HttpResponse {
    HttpResponse::Ok()
        .insert_header((header::CONTENT_TYPE, "text/javascript; charset=utf-8"))
        .insert_header((header::CACHE_CONTROL, "public, max-age=3600"))
        .body(SCRIPT)
}

/// `GET /static/usage.css`.
pub async fn style() -> HttpResponse {
    HttpResponse::Ok()
        .insert_header((header::CONTENT_TYPE, "text/css; charset=utf-8"))
        .insert_header((header::CACHE_CONTROL, "public, max-age=3600"))
        .body(STYLE)
}
