//! The proxy's side of SPEC 4f: which answer is watched for the object it creates, and what a
//! request's references mean for its candidates. The rules themselves live in `crate::affinity`.

use std::sync::Arc;

use actix_web::http::Method;
use actix_web::web::Bytes;

use crate::affinity::{refs, sticky};
use crate::attempt::FailKind;
use crate::capture::objects::ObjectWatch;
use crate::config::{Config, LbPolicy};
use crate::error::GatewayError;
use crate::escape::untrusted;
use crate::ledger::{Ledger, RequestInfo};
use crate::policy::Pin;
use crate::registry::{Order, RegistryView};
use crate::state::AppState;

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

/// What a request's references make of its candidates (SPEC 4f).
#[derive(Debug, Default)]
pub enum Route {
    /// It refers to no object: candidates as `lb_policy` orders them.
    #[default]
    Free,
    /// It refers to objects of one owner: that upstream only (and a rebuilt chain after it).
    Owner {
        /// The owner's name.
        upstream: Arc<str>,
        /// One object of it the request names, for the failure message.
        object: String,
        /// Ids it names that no upstream is known to own: the owner learns them on a 2xx.
        unknown: Vec<String>,
    },
    /// It refers only to objects the gateway has not seen answered: "not here" moves on.
    Unknown(Vec<String>),
}

/// The request's route, and how its candidates were shaped for it.
#[derive(Debug, Default)]
pub struct Pinning {
    /// See [`Route`].
    pub route: Route,
    /// The stateless body of a rebuilt chain (SPEC 4f `rebuild`), sent from candidate position
    /// `rebuild_from` on.
    pub rebuilt: Option<Bytes>,
    /// Where in the candidate list the rebuilt body takes over.
    pub rebuild_from: usize,
}

impl Pinning {
    /// What the policy is told about a candidate (SPEC 4f).
    pub fn pin(&self) -> Pin {
        match self.route {
            Route::Free => Pin::Free,
            Route::Unknown(_) => Pin::Unknown,
            // Nothing follows the owner unless a rebuilt chain does.
            Route::Owner { .. } if self.rebuilt.is_none() => Pin::OwnerOnly,
            Route::Owner { .. } => Pin::Free,
        }
    }

    /// The rebuilt body, when the candidate at `pos` is the first to get it.
    pub fn rebuild_at(&self, pos: usize) -> Option<&Bytes> {
        self.rebuilt.as_ref().filter(|_| pos == self.rebuild_from)
    }
}

/// The ids `info` refers to: path segments, then body keys (bounded, deduplicated).
fn referred_ids(info: &RequestInfo) -> Vec<String> {
    let mut ids: Vec<String> = refs::path_ids(info.uri.path())
        .map(str::to_string)
        .collect();
    for id in refs::body_ids(&info.body) {
        if ids.len() < refs::MAX_IDS && !ids.contains(&id) {
            ids.push(id);
        }
    }
    ids
}

/// The route of `info` under `cfg`; objects of two owners are a 409 (SPEC 4f).
pub fn route(state: &AppState, cfg: &Config, info: &RequestInfo) -> Result<Route, GatewayError> {
    let ids = referred_ids(info);
    if ids.is_empty() {
        return Ok(Route::Free);
    }
    let mut owner: Option<(Arc<str>, String)> = None;
    let mut unknown = Vec::new();
    for id in ids {
        match state.owners.owner_of(&id, cfg) {
            None => unknown.push(id),
            Some(up) => match &owner {
                None => owner = Some((up, id)),
                Some((first, first_id)) if *first != up => {
                    state.metrics.affinity("conflict");
                    return Err(GatewayError::ObjectConflict(format!(
                        "this request refers to objects on two upstreams: {first_id:?} lives on upstream {first} and {id:?} on upstream {up}; one request can only use objects of one upstream"
                    )));
                }
                Some(_) => {}
            },
        }
    }
    Ok(match owner {
        Some((upstream, object)) => Route::Owner {
            upstream,
            object,
            unknown,
        },
        None => Route::Unknown(unknown),
    })
}

/// The candidates for `info`: `lb_policy` order, with the affinity key under `sticky`.
pub fn candidates(state: &AppState, info: &RequestInfo) -> (Arc<RegistryView>, Order) {
    let model = info.model.as_deref();
    if state.config.get().lb_policy != LbPolicy::Sticky {
        return state.registry.candidates(model, None);
    }
    let key = sticky::affinity_key(&info.body, info.client_key.as_deref(), info.ip);
    state.registry.candidates(model, Some(&key))
}

/// Shapes `order` for `route` (SPEC 4f): the owner only, followed by the other candidates with a
/// rebuilt body when its chain can be rebuilt (and instead of it while it is in cooldown).
pub fn plan(
    state: &AppState,
    view: &RegistryView,
    order: &mut Order,
    info: &RequestInfo,
    route: Route,
) -> Result<Pinning, GatewayError> {
    let Route::Owner {
        upstream, object, ..
    } = &route
    else {
        return Ok(Pinning {
            route,
            ..Pinning::default()
        });
    };
    let cfg = &view.config;
    let name_of = |i: usize| cfg.upstreams.get(i).map(|u| &u.name);
    let Some(owner) = order
        .iter()
        .copied()
        .find(|&i| name_of(i) == Some(upstream))
    else {
        let model = info.model.as_deref().unwrap_or("");
        return Err(GatewayError::BadRequest(format!(
            "{object:?} lives on upstream {upstream}, which does not serve model {:?}",
            untrusted(model)
        )));
    };
    state.metrics.affinity("owner");
    // A rebuilt chain needs another candidate to go to.
    let rebuilt = rebuildable(state, cfg, info, upstream).filter(|_| order.len() > 1);
    let mut shaped = Order::default();
    let rebuild_from = match &rebuilt {
        Some(_) if cooling(view, owner) => 0,
        Some(_) => {
            shaped.push(owner);
            1
        }
        None => {
            shaped.push(owner);
            0
        }
    };
    if rebuilt.is_some() {
        for &i in order.iter().filter(|&&i| i != owner) {
            shaped.push(i);
        }
    }
    *order = shaped;
    Ok(Pinning {
        route,
        rebuilt,
        rebuild_from,
    })
}

/// The stateless body for a `POST /v1/responses` whose `previous_response_id` is `owner`'s, when
/// `rebuild` is on and every response of its chain is held whole.
fn rebuildable(
    state: &AppState,
    cfg: &Config,
    info: &RequestInfo,
    owner: &Arc<str>,
) -> Option<Bytes> {
    if !cfg.rebuild
        || info.method != Method::POST
        || info.uri.path().trim_end_matches('/') != "/v1/responses"
    {
        return None;
    }
    let prev = refs::previous_response_id(&info.body)?;
    if state.owners.owner_of(&prev, cfg).as_ref() != Some(owner) {
        return None;
    }
    let chain = state.owners.chain(&prev, cfg)?;
    crate::affinity::rebuild::rebuild_body(&info.body, &chain).map(Bytes::from)
}

/// Whether an answer is "not here" (SPEC 4f): a 404, or a 400 whose `error.code` ends in
/// `_not_found` (`head` is the start of its body, when it was read).
pub fn is_not_here(status: u16, head: Option<&[u8]>) -> bool {
    #[derive(serde::Deserialize)]
    struct Err {
        error: Detail,
    }
    #[derive(serde::Deserialize)]
    struct Detail {
        #[serde(default)]
        code: Option<serde_json::Value>,
    }
    match status {
        404 => true,
        400 => head
            .and_then(|h| serde_json::from_slice::<Err>(h).ok())
            .and_then(|e| e.error.code)
            .is_some_and(|c| c.as_str().is_some_and(|c| c.ends_with("_not_found"))),
        _ => false,
    }
}

/// A 2xx answer from `upstream`: it owns the ids the request named that no one was known to own
/// (SPEC 4f "learned").
pub fn answered(state: &AppState, plan: &Pinning, upstream: &Arc<str>) {
    let ids = match &plan.route {
        Route::Unknown(ids) => ids,
        Route::Owner { unknown, .. } if plan.rebuilt.is_none() => unknown,
        _ => return,
    };
    for id in ids {
        state.owners.learn(id, upstream);
        state.metrics.affinity("learned");
    }
}

/// The answer when the owner failed and nothing else may answer (SPEC 4f): the failure, with a
/// message naming the object and its owner.
pub fn owner_failed(
    state: &AppState,
    plan: &Pinning,
    failures: &[crate::attempt::Failure],
) -> GatewayError {
    let (upstream, object) = match &plan.route {
        Route::Owner {
            upstream, object, ..
        } => (&**upstream, object.as_str()),
        _ => ("?", "?"),
    };
    state.metrics.affinity("owner_failed");
    let status = match failures.last() {
        Some(f) if f.kind == FailKind::Http => f.status.unwrap_or(502),
        Some(f) if f.kind == FailKind::Timeout => 504,
        _ => 502,
    };
    GatewayError::OwnerFailed {
        status,
        message: format!(
            "{object:?} lives on upstream {upstream}, which failed ({}); no other upstream has it",
            crate::attempt::summary(failures)
        ),
    }
}

/// Whether upstream `idx` of `view` is in cooldown now (its chain is then rebuilt at once).
fn cooling(view: &RegistryView, idx: usize) -> bool {
    view.cooling_until(idx)
        .is_some_and(|until| until > std::time::Instant::now())
}
