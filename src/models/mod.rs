//! `GET /v1/models` answered by the gateway from every upstream's model list (see the
//! observability guide, "Models and token usage (0.2)").
//!
//! Proxying the listing to the first upstream showed a model picker that upstream's models only
//! (or an error while it was down). Instead a small actor, [`ModelsActor`], keeps each upstream's
//! list — fetched in the background from `GET {endpoint}/models` at start, after each reload and
//! every `models_refresh` seconds, or given in the file as `models:` — and publishes an `Arc`'d
//! [`ModelsSnapshot`] with the answer already serialised. Handlers read that snapshot and never
//! wait for an upstream; a slow or dead upstream only delays its own list. Lists are kept by
//! upstream name, so a reload keeps what is known until the new fetch lands. Fetches are not
//! attempts: they never count toward health, cooldown or `upstream_requests_total`.

pub mod lists;

use actix_web::http::header;
use actix_web::web::Bytes;
use actix_web::{web, HttpRequest, HttpResponse};
use serde_json::json;

use crate::admission;
use crate::state::AppState;

pub use self::lists::*;

fn json_response(status: actix_web::http::StatusCode, body: Bytes) -> HttpResponse {
    HttpResponse::build(status)
        .insert_header((header::CONTENT_TYPE, "application/json"))
        .insert_header((header::ACCESS_CONTROL_ALLOW_ORIGIN, "*"))
        .body(body)
}

/// Percent-decodes a path segment (ids such as `meta-llama/Llama-3` may arrive as `%2F`).
fn percent_decode(s: &str) -> String {
    match admission::percent_decode(s.as_bytes()) {
        Some(b) => String::from_utf8_lossy(&b).into_owned(),
        None => s.to_string(),
    }
}

/// `GET /v1/models` and `GET /v1/models/{id}` (an empty id is the list).
pub async fn handler(req: HttpRequest, state: web::Data<AppState>) -> HttpResponse {
    let (ledger, cfg) = match admission::admit(&req, &state, admission::Counting::Free) {
        Ok(admitted) => (admitted.ledger, admitted.config),
        Err(refused) => return refused.answer(),
    };
    let snap = state.models.snapshot();
    let id = percent_decode(req.match_info().get("id").unwrap_or(""));
    // A member that may use only some models sees only those (see the members guide).
    let member = ledger
        .member()
        .and_then(|m| cfg.members.list.get(m.idx))
        .filter(|m| !m.allow.is_empty() || !m.deny.is_empty());
    let (status, body) = if id.is_empty() {
        let body = match member {
            Some(m) => snap.list_for(|id| m.may_use(Some(id))),
            None => snap.list_body.clone(),
        };
        (actix_web::http::StatusCode::OK, body)
    } else {
        let visible = member.is_none_or(|m| m.may_use(Some(&id)));
        match snap.entries.get(&id).filter(|_| visible) {
            Some(b) => (actix_web::http::StatusCode::OK, b.clone()),
            None => {
                let err = json!({"error": {
                    "message": format!("The model '{id}' does not exist or is not served by any upstream"),
                    "type": "invalid_request_error",
                    "param": "model",
                    "code": "model_not_found",
                }});
                (
                    actix_web::http::StatusCode::NOT_FOUND,
                    Bytes::from(err.to_string()),
                )
            }
        }
    };
    let mut resp = json_response(status, body);
    resp.headers_mut().insert(
        header::HeaderName::from_static("x-request-id"),
        ledger.request_id().clone(),
    );
    ledger.rate_headers(resp.headers_mut());
    ledger.finish_answered(status);
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_path_segments() {
        assert_eq!(percent_decode("meta-llama%2FLlama-3"), "meta-llama/Llama-3");
        assert_eq!(percent_decode("a/b%"), "a/b%");
        assert_eq!(percent_decode("%zz"), "%zz");
    }
}
