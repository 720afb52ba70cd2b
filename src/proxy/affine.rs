//! The proxy's side of SPEC 4f: which answer is watched for the object it creates, and what a
//! request's references mean for its candidates. The rules themselves live in `crate::affinity`.

use std::sync::Arc;

use actix_web::http::Method;

use crate::affinity::refs;
use crate::capture::objects::ObjectWatch;
use crate::ledger::Ledger;

/// A watch for the id of the object this request creates, when it creates one (a `POST` to an
/// owning path answered 2xx by `upstream`): the id becomes `upstream`'s the moment it is read.
pub fn object_watch(ledger: &Ledger, upstream: &Arc<str>, limit: usize) -> Option<ObjectWatch> {
    let info = ledger.info();
    if info.method != Method::POST || !refs::creates_object(info.uri.path(), &info.body) {
        return None;
    }
    let owners = ledger.state().owners.clone();
    let up = upstream.clone();
    let want_output = info.uri.path().trim_end_matches('/') == "/v1/responses";
    Some(ObjectWatch::new(
        Box::new(move |id| owners.learn(id, &up)),
        want_output,
        limit,
    ))
}
