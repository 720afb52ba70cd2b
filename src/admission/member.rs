//! What a member may ask, checked once its request's body is read (see the members guide): a
//! model it may use (else 403, before any upstream), and — for a member that sees only its own
//! objects — only objects its own requests created (else 404 `No such object`, sent nowhere, so no
//! member can read, continue, rebuild, delete or re-route another's conversations, files or
//! batches, nor teach an owner for them).

use crate::affinity::refs;
use crate::config::{Config, Objects};
use crate::error::GatewayError;
use crate::escape::cut_bytes;
use crate::facts::MAX_ID_BYTES;
use crate::ledger::Ledger;

/// The member's rules for the request in `ledger` (nothing to check without a member).
pub fn member_rules(ledger: &Ledger, cfg: &Config) -> Result<(), GatewayError> {
    let Some(m) = ledger.member() else {
        return Ok(());
    };
    let info = ledger.info();
    if let Some(member) = cfg.members.list.get(m.idx) {
        if !member.may_use(info.model.as_deref()) {
            let model = info.model.as_deref().unwrap_or_default();
            return Err(GatewayError::ModelNotAllowed(
                crate::escape::untrusted(model).into_owned(),
            ));
        }
    }
    if m.objects == Objects::All {
        return Ok(());
    }
    let owners = &ledger.sinks().owners;
    let path = info.uri.path();
    // The creating paths (`/v1/responses`, `/v1/chat/completions`, …) hold no id: most requests.
    let path = if refs::OWNING_PATHS.contains(&path) {
        ""
    } else {
        path
    };
    let ids = refs::path_ids(path).chain(info.facts.refs.iter().map(|r| &**r));
    for id in ids {
        let mine = id.len() <= MAX_ID_BYTES
            && owners
                .member_of(id, cfg)
                .is_some_and(|owner| owner == m.name);
        if !mine {
            return Err(GatewayError::NoSuchObject(
                cut_bytes(id, MAX_ID_BYTES).to_string(),
            ));
        }
    }
    if info.facts.long_ref {
        return Err(GatewayError::NoSuchObject(
            "(an id longer than 1024 bytes)".into(),
        ));
    }
    Ok(())
}
