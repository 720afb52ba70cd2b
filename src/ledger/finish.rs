//! How a request ends, once: an answer the gateway makes itself ([`Ledger::finish_local`]), a
//! successful local answer ([`Ledger::finish_answered`]), or the end (or break) of a relayed
//! body ([`Ledger::finish_body`]). Each writes the record, the trace's end and what is left of
//! the metrics; the all-failed alert goes out from here too.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use actix_web::http::header::{self, HeaderName, HeaderValue};
use actix_web::http::StatusCode;
use actix_web::HttpResponse;

use crate::affinity::rebuild;
use crate::capture::Reply;
use crate::error::{GatewayError, Rejection};
use crate::escape::untrusted;
use crate::failure::{summary, FailKind, Failure};
use crate::notify::RequestFailed;
use crate::records::Record;
use crate::registry::AttemptResult;
use crate::trace::End;

use super::{Answered, BodyEnd, Ledger};

impl Ledger {
    /// Ends a request the gateway answers itself: a refusal before any upstream (counted, and
    /// recorded without its body within the per-reason bound, see the security guide) or an
    /// all-failed answer (alerted).
    pub fn finish_local(mut self, err: GatewayError) -> HttpResponse {
        let mut resp = err.response();
        let status = resp.status().as_u16();
        // A span shows the gateway's own words, never an upstream's (see the security guide,
        // "Upstream text stays with the operator").
        let span_error = match &err {
            GatewayError::AllFailed { .. } | GatewayError::OwnerFailed { .. } => {
                crate::failure::public_summary(&self.failures)
            }
            other => other.to_string(),
        };
        self.end_trace(|| End {
            status,
            error: (status >= 500).then_some(span_error),
            ..Default::default()
        });
        let headers = resp.headers_mut();
        headers.insert(
            HeaderName::from_static("x-request-id"),
            self.request_id.clone(),
        );
        if err.after_every_candidate() {
            // Every candidate was tried: the client's SDK must not try them all again (see the
            // rescue guide, "A client's own retry where it helps (0.4)").
            headers.insert(
                HeaderName::from_static("x-should-retry"),
                HeaderValue::from_static("false"),
            );
        }
        if let Some(retry) = err.retry_after() {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(retry));
            headers.insert(
                HeaderName::from_static("x-should-retry"),
                HeaderValue::from_static("true"),
            );
        }
        if self.attempts > 0 {
            headers.insert(
                HeaderName::from_static("x-upstream-attempts"),
                HeaderValue::from(self.attempts),
            );
        }
        // An answer no upstream saw cost nothing; one the upstreams saw (and failed) counts by
        // its body.
        if self.attempts > 0 {
            self.member_ended(Default::default(), 0);
        }
        self.rate_headers(resp.headers_mut());
        let (error, reply) = match err.rejection() {
            Some(reason) => {
                if !self.refused(Some(reason)) {
                    return resp;
                }
                (err.to_string(), Reply::default())
            }
            None if matches!(err, GatewayError::TooManySessions(_)) => {
                if !self.refused(None) {
                    return resp;
                }
                (err.to_string(), Reply::default())
            }
            None => {
                if err.after_every_candidate() {
                    self.alert(resp.status().as_u16());
                }
                let error = if self.failures.is_empty() {
                    err.to_string()
                } else {
                    summary(&self.failures)
                };
                (error, Reply::with_text(Some(err.body())))
            }
        };
        if let Some(rec) = self.sinks.recorder.clone() {
            let status = resp.status().as_u16();
            rec.submit(self.into_record(status, None, Some(error), reply, None, status < 400));
        }
        resp
    }

    /// Ends a request the gateway answered with content of its own (`/v1/models`). A success
    /// costs no upstream and is not recorded (only the HTTP metrics count it); a 404 is a refusal
    /// like any other (counted; recorded without a body within the per-reason bound).
    pub fn finish_answered(mut self, status: StatusCode) {
        let (status_code, complete) = (status.as_u16(), status.as_u16() < 400);
        self.end_trace(|| End {
            status: status_code,
            complete,
            ..Default::default()
        });
        if status != StatusCode::NOT_FOUND || !self.refused(Some(Rejection::NotFound)) {
            return;
        }
        if let Some(rec) = self.sinks.recorder.clone() {
            rec.submit(self.into_record(
                status.as_u16(),
                None,
                Some("model not found".to_string()),
                Reply::default(),
                None,
                false,
            ));
        }
    }

    /// Counts a refusal for `reason` (None: a handshake beyond the WebSocket session limits,
    /// which has no `rejected_total` reason) and says whether its record may be written (per
    /// reason, at most 10 a second and 1,000 an hour). A refused request's body is never kept.
    fn refused(&mut self, reason: Option<Rejection>) -> bool {
        // The second the record will show (its `created_at`), so that no second of records
        // holds more than the bound.
        let at = self
            .info
            .created_at
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        self.info.body = Default::default();
        match reason {
            Some(reason) => {
                self.sinks.metrics.rejected(reason);
                self.sinks.reject_gate.admit(reason, at)
            }
            None => self.sinks.reject_gate.admit_sessions_full(at),
        }
    }

    /// Ends a relayed response when its body ends, breaks, or the client goes away, with what
    /// the capture read of it.
    pub fn finish_body(mut self, end: BodyEnd, reply: Reply) {
        let Some(c) = self.answered.take() else {
            return;
        };
        let sinks = self.sinks.clone();
        let upstream = c.view.config.upstreams.get(c.idx).map_or("", |u| &*u.name);
        let outcome = match &end {
            // Already accounted for when it broke; no continuation could finish it.
            BodyEnd::Broken { .. } if c.broken => None,
            BodyEnd::Broken { reason, public } => {
                log::warn!(
                    "{}: upstream {upstream} broke mid-response: {}",
                    self.who(),
                    untrusted(reason)
                );
                self.stream_failed(&c, upstream, reason.clone(), public.clone());
                Some(FailKind::Stream.label())
            }
            BodyEnd::ClientGone => {
                log::info!(
                    "{}: client went away; upstream {upstream} request cancelled",
                    self.who()
                );
                c.ok.then_some("ok")
            }
            // A Responses stream that ends with its protocol's `error` or `response.failed`
            // event ended properly, but the upstream failed it: an in-band error counts for
            // health (see the rescue guide, "Which failures count (0.4)").
            BodyEnd::Complete if reply.error_event && c.ok && !c.broken => {
                self.stream_failed(
                    &c,
                    upstream,
                    "in-band error event at the end of the stream".into(),
                    "in-band error event".into(),
                );
                Some(FailKind::Stream.label())
            }
            BodyEnd::Complete => (c.ok && !c.broken).then_some("ok"),
            BodyEnd::Noted(note) => {
                self.failures.push(Failure {
                    upstream: upstream.to_string(),
                    kind: FailKind::Stream,
                    status: None,
                    reason: note.clone(),
                    public: note.clone(),
                });
                c.ok.then_some("ok")
            }
        };
        if let Some(outcome) = outcome {
            sinks.metrics.attempt(upstream, outcome);
        }
        let usage = reply.usage;
        // The member's tokens count now that the answer ended (see the members guide).
        self.member_ended(usage, reply.text.as_ref().map_or(0, String::len));
        sinks
            .metrics
            .tokens(upstream, usage.prompt, usage.completion);
        sinks
            .registry
            .add_tokens(&c.view, c.idx, usage.prompt, usage.completion);
        // The whole answer reached the client: a non-error status, its body to the end, and no
        // in-band error event inside it.
        let complete = matches!(end, BodyEnd::Complete) && c.status < 400 && !reply.error_event;
        let broken = c.broken;
        self.end_body_trace(c.status, complete, &reply, &end, broken);
        // The object this answer created, and for a Responses answer its chain link (see the
        // affinity guide).
        let at = (&*sinks.owners, &*c.view.config, c.idx, c.status);
        let request = rebuild::RequestPart {
            body: &self.info.body,
            facts: &self.info.facts,
            limit: self.info.body_limit,
        };
        let (object_id, items) = rebuild::object_of(at, reply.object.as_ref(), complete, request);
        if let Some(rec) = &sinks.recorder {
            let error = (!self.failures.is_empty()).then(|| summary(&self.failures));
            let upstream = c.view.config.upstreams.get(c.idx).map(|u| u.name.clone());
            let record = self.into_record(c.status, upstream, error, reply, Some(c.ttfb), complete);
            rec.submit(record.with_object(object_id, items));
        }
    }

    /// The committed answer's stream failed (it broke, or ended with an in-band error): its
    /// upstream hears of it, and the failure joins the request's (record, span).
    fn stream_failed(&mut self, c: &Answered, upstream: &str, reason: String, public: String) {
        self.sinks.registry.report_for(
            &c.view,
            c.idx,
            self.info.subject(),
            AttemptResult::Failed {
                kind: FailKind::Stream,
                reason: public.clone(),
                cooldown: None,
            },
        );
        self.failures.push(Failure {
            upstream: upstream.to_string(),
            kind: FailKind::Stream,
            status: None,
            reason,
            public,
        });
    }

    /// The all-failed alert (see the operations guide, "Alerts"), by message: nobody waits for it.
    pub(super) fn alert(&self, status: u16) {
        if let Some(alerts) = &self.sinks.alerts {
            alerts.do_send(RequestFailed {
                at: SystemTime::now(),
                ip: self.info.ip.map_or_else(String::new, |ip| ip.to_string()),
                method: self.info.method.to_string(),
                path: self.info.path().to_string(),
                model: self.info.model.as_deref().map(str::to_string),
                status,
                attempts: self.failures.iter().map(ToString::to_string).collect(),
            });
        }
    }

    /// The request's one record; `complete` says whether the client got the whole answer.
    fn into_record(
        self,
        status: u16,
        upstream: Option<Arc<str>>,
        error: Option<String>,
        reply: Reply,
        ttfb: Option<Duration>,
        complete: bool,
    ) -> Record {
        let info = self.info;
        let usage = reply.usage;
        Record {
            created_at: info.created_at,
            ip: info.ip,
            method: info.method,
            path: info.uri,
            model: info.model,
            stream: info.stream,
            upstream,
            status,
            attempts: self.attempts,
            error,
            request_body: info.body,
            response: reply.text,
            response_json: reply.json,
            prompt_tokens: usage.prompt,
            completion_tokens: usage.completion,
            total_tokens: usage.total,
            ttfb_ms: ttfb.map(|d| d.as_millis() as u64),
            duration_ms: info.started.elapsed().as_millis() as u64,
            user_agent: info.user_agent,
            client_key: info.client_key,
            body_limit: info.body_limit,
            finish_reason: reply.finish_reason,
            resumed: self.resumed,
            complete,
            object_id: None,
            rebuilt: self.marks.rebuilt,
            response_items: None,
            request_id: Some(self.request_id),
            member: info.member,
            forgets: self.forgets,
            learned: self.learned,
        }
    }
}
