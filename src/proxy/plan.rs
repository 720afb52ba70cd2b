//! Where a request may go: its candidates from the registry's view (`allow`/`deny`, `lb_policy`
//! with the sticky key, cooldowns to the back, `route_by_models`), and what the objects it refers
//! to make of them (see the affinity guide): the owner only, "not here", or a rebuilt chain after
//! the owner. The rules that follow from a plan are rows of `policy::decide` ([`Plan::pin`]); the
//! plan only shapes the candidate list and says which ids an answer may teach.

use std::sync::Arc;

use actix_web::http::Method;
use actix_web::web::Bytes;

use crate::affinity::{refs, sticky, Owners};
use crate::config::{Config, LbPolicy};
use crate::error::GatewayError;
use crate::escape::untrusted;
use crate::facts::MAX_ID_BYTES;
use crate::ledger::{Ledger, RequestInfo};
use crate::models::lists::ModelsHandle;
use crate::policy::Pin;
use crate::registry::{Order, RegistryHandle, RegistryView};

/// What a request's references make of its candidates.
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
    },
    /// It refers only to objects the gateway has not seen answered: "not here" moves on.
    Unknown,
}

/// A request's candidates and what its objects make of them.
pub struct Plan {
    /// The registry view the candidates come from.
    pub view: Arc<RegistryView>,
    /// Upstream indices in the order they are tried.
    pub order: Order,
    /// See [`Route`].
    pub route: Route,
    /// Ids no one owns that a 2xx answer teaches its upstream (only an id in the path or the
    /// top-level `previous_response_id` of a `POST /v1/responses`: other body references route a
    /// request but never teach an owner).
    pub learn: Vec<Box<str>>,
    /// The stateless body of a rebuilt chain (`rebuild: true`, the whole chain held).
    pub rebuilt: Option<Bytes>,
    /// From which candidate position the rebuilt body is sent.
    pub rebuild_from: Option<usize>,
}

impl Plan {
    /// What the policy is told about the candidate at `pos`.
    pub fn pin(&self, pos: usize) -> Pin {
        match self.route {
            Route::Free => Pin::Free,
            Route::Unknown => Pin::Unknown,
            // From where the rebuilt chain goes, the failover rules apply.
            Route::Owner { .. } if self.rebuild_from.is_some_and(|from| pos >= from) => Pin::Free,
            Route::Owner { .. } => Pin::Owner {
                alone: self.rebuilt.is_none(),
                rebuild: self.rebuilt.is_some(),
            },
        }
    }

    /// The rebuilt body, when the candidate at `pos` is the first to get it.
    pub fn rebuild_at(&self, pos: usize) -> Option<&Bytes> {
        self.rebuilt
            .as_ref()
            .filter(|_| self.rebuild_from == Some(pos))
    }
}

/// The view and the ordered candidates for a request with `info` (its sticky key under
/// `sticky`), `route_by_models` applied.
pub fn candidates(
    registry: &RegistryHandle,
    models: &ModelsHandle,
    info: &RequestInfo,
) -> (Arc<RegistryView>, Order) {
    let model = info.model.as_deref();
    let view = registry.view();
    let key = (view.config.lb_policy == LbPolicy::Sticky).then(|| {
        let body_key = info.facts.affinity.as_deref();
        sticky::affinity_key(body_key, info.client_key.as_deref(), info.ip)
    });
    let mut order = registry.order(&view, model, key.as_deref());
    models.route_filter(&view.config, &mut order, model);
    (view, order)
}

/// The plan of a request (see the module docs); no candidate at all is a 404 naming the model,
/// objects of two owners a 409.
pub fn plan(
    ledger: &Ledger,
    registry: &RegistryHandle,
    models: &ModelsHandle,
) -> Result<Plan, GatewayError> {
    let info = ledger.info();
    let (view, mut order) = candidates(registry, models, info);
    if order.is_empty() {
        let model = info.model.as_deref().unwrap_or_default().to_string();
        return Err(GatewayError::NoUpstreamForModel(model));
    }
    let owners = &ledger.sinks().owners;
    let (route, learn) = route(ledger, owners, &view.config)?;
    let mut plan = Plan {
        view,
        order: Order::default(),
        route,
        learn,
        rebuilt: None,
        rebuild_from: None,
    };
    let Route::Owner { upstream, object } = &plan.route else {
        plan.order = order;
        return Ok(plan);
    };
    let cfg = &plan.view.config;
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
    ledger.affinity("owner");
    // A rebuilt chain needs another candidate to go to.
    let rebuilt = rebuildable(owners, cfg, info, upstream).filter(|_| order.len() > 1);
    let mut shaped = Order::default();
    if !(rebuilt.is_some() && plan.view.cooling(owner)) {
        shaped.push(owner);
    }
    if rebuilt.is_some() {
        plan.rebuild_from = Some(shaped.len());
        for &i in order.iter().filter(|&&i| i != owner) {
            shaped.push(i);
        }
    }
    order = shaped;
    plan.order = order;
    plan.rebuilt = rebuilt;
    Ok(plan)
}

/// The route of a request, and the ids its 2xx answer may teach.
fn route(
    ledger: &Ledger,
    owners: &Owners,
    cfg: &Config,
) -> Result<(Route, Vec<Box<str>>), GatewayError> {
    let info = ledger.info();
    let facts = &info.facts;
    let path = info.uri.path();
    let mut long = facts.long_ref;
    let mut ids: Vec<&str> = Vec::new();
    let mut learnable: Vec<&str> = Vec::new();
    for id in refs::path_ids(path) {
        if id.len() > MAX_ID_BYTES {
            long = true;
        } else if !ids.contains(&id) {
            ids.push(id);
            learnable.push(id);
        }
    }
    for id in &facts.refs {
        if ids.len() < crate::facts::MAX_REFS && !ids.contains(&&**id) {
            ids.push(id);
        }
    }
    let responses = info.method == Method::POST && path.trim_end_matches('/') == "/v1/responses";
    if let (true, Some(prev)) = (responses, facts.previous_response_id.as_deref()) {
        learnable.push(prev);
    }
    if ids.is_empty() {
        // An id too long to own: routed as an unseen one, and never learned.
        let route = if long { Route::Unknown } else { Route::Free };
        return Ok((route, Vec::new()));
    }
    let mut owner: Option<(Arc<str>, &str)> = None;
    let mut unknown: Vec<&str> = Vec::new();
    for id in ids {
        match owners.owner_of(id, cfg) {
            None => unknown.push(id),
            Some(up) => match &owner {
                None => owner = Some((up, id)),
                Some((first, first_id)) if *first != up => {
                    ledger.affinity("conflict");
                    return Err(GatewayError::ObjectConflict(format!(
                        "this request refers to objects on two upstreams: {:?} lives on upstream {first} and {:?} on upstream {up}; one request can only use objects of one upstream",
                        untrusted(first_id),
                        untrusted(id)
                    )));
                }
                Some(_) => {}
            },
        }
    }
    let learn = unknown
        .iter()
        .filter(|id| learnable.contains(id))
        .map(|id| Box::from(*id))
        .collect();
    let route = match owner {
        Some((upstream, object)) => Route::Owner {
            upstream,
            object: object.to_string(),
        },
        None => Route::Unknown,
    };
    Ok((route, learn))
}

/// The stateless body for a `POST /v1/responses` whose `previous_response_id` is `owner`'s, when
/// `rebuild` is on and every response of its chain is held whole.
fn rebuildable(
    owners: &Owners,
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
    let prev = info.facts.previous_response_id.as_deref()?;
    if owners.owner_of(prev, cfg).as_ref() != Some(owner) {
        return None;
    }
    let chain = owners.chain(prev, cfg)?;
    crate::affinity::rebuild::rebuild_body(&info.body, &chain).map(Bytes::from)
}

/// Whether an answer is "not found" (see the affinity guide): a 404, or a 400 whose
/// `error.code` ends in `_not_found` (`head` is the start of its body, when it was read).
pub fn is_not_found(status: u16, head: Option<&[u8]>) -> bool {
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

/// The answer when the owner failed and nothing else may answer: the failure, with a message
/// naming the object and its owner.
pub fn owner_failed(ledger: &Ledger, plan: &Plan) -> GatewayError {
    let (upstream, object) = match &plan.route {
        Route::Owner { upstream, object } => (&**upstream, object.as_str()),
        _ => ("?", "?"),
    };
    ledger.affinity("owner_failed");
    let failures = ledger.failures();
    let status = match failures.last() {
        Some(f) if f.kind == crate::failure::FailKind::Http => f.status.unwrap_or(502),
        Some(f) if f.kind == crate::failure::FailKind::Timeout => 504,
        _ => 502,
    };
    GatewayError::OwnerFailed {
        status,
        message: format!(
            "{:?} lives on upstream {upstream}, which failed ({}); no other upstream has it",
            untrusted(object),
            crate::failure::summary(failures)
        ),
    }
}
