//! The small rules of rescue (see the rescue guide, "When an upstream breaks a stream") that the
//! attempt loop applies: how long to pause before a same-upstream retry, what a `Retry-After`
//! says, and which 400s fail over.

use std::time::{Duration, SystemTime};

use actix_web::http::header::{self, HttpDate};
use actix_web::http::StatusCode;
use actix_web::web::{Bytes, BytesMut};
use futures_util::StreamExt;

/// An upstream response, head read (named here too: this leaf knows nothing else of an attempt).
type Upstreamed = awc::ClientResponse;

/// The most of a 400 body read to find its `error.code`.
const ERROR_BODY_MAX: usize = 64 << 10;

/// The pause before retry `n` (0 for the first) without a usable `Retry-After`:
/// 250 ms × 2ⁿ ± 20 %.
pub fn backoff(n: u32) -> Duration {
    let base = 250.0 * f64::from(1u32 << n.min(10));
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    // A cheap spread in [-1, 1): retries of concurrent requests do not line up.
    let jitter = f64::from(nanos % 2001) / 1000.0 - 1.0;
    Duration::from_secs_f64(base * (1.0 + 0.2 * jitter) / 1000.0)
}

/// The `Retry-After` of a 429 or 503 (seconds or an HTTP date), if it has a usable one.
pub fn retry_after(resp: &Upstreamed, status: StatusCode) -> Option<Duration> {
    if status != StatusCode::TOO_MANY_REQUESTS && status != StatusCode::SERVICE_UNAVAILABLE {
        return None;
    }
    let v = resp
        .headers()
        .get(header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim();
    if let Ok(secs) = v.parse::<f64>() {
        return (secs.is_finite() && secs >= 0.0).then(|| Duration::from_secs_f64(secs.min(1e6)));
    }
    let at: SystemTime = v.parse::<HttpDate>().ok()?.into();
    Some(
        at.duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO),
    )
}

/// Reads the start of a body (up to [`ERROR_BODY_MAX`], within `wait`), after `first`. Returns
/// what was read and whether that is the whole body; what is not read stays in `resp`.
pub async fn read_head_of_body(
    resp: &mut Upstreamed,
    first: Option<Bytes>,
    wait: Duration,
) -> (Bytes, bool) {
    let mut buf = BytesMut::new();
    if let Some(f) = first {
        buf.extend_from_slice(&f);
    }
    let read = async {
        while buf.len() < ERROR_BODY_MAX {
            match resp.next().await {
                Some(Ok(chunk)) => buf.extend_from_slice(&chunk),
                Some(Err(_)) => return false,
                None => return true,
            }
        }
        false
    };
    let whole = actix_rt::time::timeout(wait, read).await.unwrap_or(false);
    if whole {
        // An ended awc payload panics if polled again: the relay gets an empty one.
        use actix_web::HttpMessage;
        drop(resp.take_payload());
    }
    (buf.freeze(), whole)
}

/// The `error.code` (else `error.type`) of a 400 body, when it is one of `codes`.
pub fn failover_code(body: &[u8], codes: &[String]) -> Option<String> {
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
    let err = v.get("error")?;
    let code = err
        .get("code")
        .and_then(|c| c.as_str())
        .or_else(|| err.get("type").and_then(|t| t.as_str()))?;
    codes.iter().any(|c| c == code).then(|| code.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_with_a_fifth_of_spread() {
        for n in 0..4 {
            let d = backoff(n).as_secs_f64() * 1000.0;
            let base = 250.0 * f64::from(1u32 << n);
            assert!(
                d >= base * 0.8 - 0.001 && d <= base * 1.2 + 0.001,
                "{n}: {d}"
            );
        }
    }

    #[test]
    fn failover_codes_read_code_then_type() {
        let codes = vec!["context_length_exceeded".to_string()];
        let body = br#"{"error":{"message":"too long","type":"invalid_request_error","code":"context_length_exceeded"}}"#;
        assert_eq!(
            failover_code(body, &codes).as_deref(),
            Some("context_length_exceeded")
        );
        let body = br#"{"error":{"message":"x","type":"context_length_exceeded"}}"#;
        assert!(failover_code(body, &codes).is_some());
        let body =
            br#"{"error":{"message":"x","type":"invalid_request_error","code":"invalid_value"}}"#;
        assert!(failover_code(body, &codes).is_none());
        assert!(failover_code(b"not json", &codes).is_none());
    }
}
