//! The ledger's side of the request's trace (see the tracing guide): attempts made apart from it
//! (continuations) and the end of the server span. Kept beside the ledger so that the ledger
//! stays one screenful of accounting; the spans themselves live in [`crate::trace`].

use crate::capture::Reply;
use crate::trace::{End, Link, Started, Trace};

use super::{BodyEnd, Ledger};

impl Ledger {
    /// A request went upstream apart from the ledger (a continuation) with this span, if traced.
    pub fn sent_as(&mut self, started: Option<Started>) {
        self.attempts += 1;
        self.trace.sent_as(started);
    }

    /// The request's trace, for attempts made apart from the ledger (continuations).
    pub fn trace_link(&self) -> Option<Link> {
        self.trace.link()
    }

    /// The request's trace (e.g. to mark a rebuilt chain, see the affinity guide).
    pub fn trace(&mut self) -> &mut Trace {
        &mut self.trace
    }

    /// Ends the trace (when there is one and it is sampled) with what `end` says.
    pub(super) fn end_trace(&mut self, end: impl FnOnce() -> End) {
        let info = &self.info;
        let request_id = self.request_id.clone();
        self.trace.end(self.sinks.tracer.as_ref(), || End {
            method: info.method.clone(),
            uri: info.uri.clone(),
            model: info.model.clone(),
            client_key: info.client_key.clone(),
            websocket: info.websocket,
            attempts: self.attempts,
            resumed: self.resumed,
            rebuilt: self.marks.rebuilt,
            request_id: Some(request_id),
            ..end()
        });
    }

    /// Ends the trace of a relayed answer: its usage, and how its body ended (`broken`: a break
    /// already accounted for).
    pub(super) fn end_body_trace(
        &mut self,
        status: u16,
        complete: bool,
        reply: &Reply,
        end: &BodyEnd,
        broken: bool,
    ) {
        self.end_trace(|| End {
            status,
            complete,
            input_tokens: reply.usage.prompt,
            output_tokens: reply.usage.completion,
            finish_reason: reply.finish_reason.clone(),
            response_model: reply.model.clone(),
            body_error: match end {
                BodyEnd::Broken { public, .. } if !broken => {
                    Some(("stream_error", Some(public.clone())))
                }
                BodyEnd::ClientGone => Some(("client_gone", None)),
                _ => None,
            },
            ..End::default()
        });
    }
}
