//! The upstreams' model lists: [`ModelsActor`] fetches and keeps them, [`ModelsHandle`] is what
//! the request path, the status page and the handler read (see the observability guide, "Models
//! and token usage (0.2)").
//!
//! Below the application state on purpose: it imports neither the handler's state nor admission,
//! so `state.rs` can hold a [`ModelsHandle`] without closing an import circle.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime};

use actix::prelude::*;
use actix_web::http::header;
use actix_web::web::Bytes;
use serde_json::{json, Value};

use crate::config::{Config, Upstream, UpstreamAuth};

/// One fetch may take this long before it counts as failed.
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest `/models` body read from an upstream.
const MAX_LIST_BYTES: usize = 8 << 20;
/// Most ids kept from one upstream's list.
const MAX_IDS: usize = 10_000;
/// Longest id (or `owned_by`) kept; longer entries are skipped.
const MAX_ID_BYTES: usize = 512;

/// One model as an upstream listed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelEntry {
    /// The id clients send as `model`.
    pub id: String,
    /// The entry's `created`, else 0.
    pub created: i64,
    /// The entry's `owned_by`, if it had one.
    pub owned_by: Option<String>,
}

/// What is known of one upstream's list.
#[derive(Debug, Clone, Default)]
pub struct ListState {
    /// The ids, once fetched successfully (or from `models:`); None = unknown.
    pub ids: Option<Arc<Vec<ModelEntry>>>,
    /// The list comes from the file's `models:` key.
    pub configured: bool,
    /// Last successful fetch.
    pub fetched_at: Option<SystemTime>,
    /// The latest fetch's failure and why (escaped, cut, no key); None once a fetch succeeds.
    pub error: Option<(SystemTime, String)>,
}

/// What the handlers and the proxy read: every list and the answers built from them.
#[derive(Debug, Default)]
pub struct ModelsSnapshot {
    lists: HashMap<String, ListState>,
    /// Per upstream with a known list: the ids it serves (for `route_by_models`).
    known: HashMap<String, HashSet<String>>,
    /// The `/v1/models` body.
    pub(super) list_body: Bytes,
    /// `/v1/models/{id}` bodies.
    pub(super) entries: HashMap<String, Bytes>,
    /// The ids of the list, in its order (a member's own list is cut from it).
    order: Vec<String>,
}

impl ModelsSnapshot {
    /// Builds the answers from the lists, in the config's upstream order.
    pub fn build(config: &Config, lists: HashMap<String, ListState>) -> ModelsSnapshot {
        let mut data: Vec<Value> = Vec::new();
        let mut entries = HashMap::new();
        let mut known = HashMap::new();
        let mut order = Vec::new();
        let mut add = |id: &str, created: i64, owned_by: &str| {
            if entries.contains_key(id) {
                return;
            }
            let v = json!({"id": id, "object": "model", "created": created, "owned_by": owned_by});
            entries.insert(id.to_string(), Bytes::from(v.to_string()));
            order.push(id.to_string());
            data.push(v);
        };
        for up in &config.upstreams {
            if let Some(ids) = lists.get(&*up.name).and_then(|l| l.ids.as_ref()) {
                for e in ids.iter().filter(|e| up.admits(Some(&e.id))) {
                    add(&e.id, e.created, e.owned_by.as_deref().unwrap_or(&up.name));
                }
                known.insert(
                    up.name.to_string(),
                    ids.iter().map(|e| e.id.clone()).collect::<HashSet<_>>(),
                );
            }
            for (from, _) in up.model_map.iter().filter(|(p, _)| !p.0.contains('*')) {
                add(&from.0, 0, &up.name);
            }
        }
        let list_body = Bytes::from(json!({"object": "list", "data": data}).to_string());
        ModelsSnapshot {
            lists,
            known,
            list_body,
            entries,
            order,
        }
    }

    /// The `/v1/models` body of the models `may_use` admits (a member's own list).
    pub fn list_for(&self, may_use: impl Fn(&str) -> bool) -> Bytes {
        let mut out = Vec::with_capacity(self.list_body.len());
        out.extend_from_slice(br#"{"object":"list","data":["#);
        let mut first = true;
        for id in self.order.iter().filter(|id| may_use(id)) {
            if let Some(e) = self.entries.get(id) {
                if !first {
                    out.push(b',');
                }
                first = false;
                out.extend_from_slice(e);
            }
        }
        out.extend_from_slice(b"]}");
        Bytes::from(out)
    }

    /// `route_by_models`: whether `up` may serve `model`. An unknown list, or a `"*"` model_map
    /// entry, admits everything; otherwise the name sent upstream (after `model_map`) must be listed.
    pub fn serves(&self, up: &Upstream, model: &str) -> bool {
        if up.model_map.iter().any(|(p, _)| p.0 == "*") {
            return true;
        }
        let Some(ids) = self.known.get(&*up.name) else {
            return true;
        };
        ids.contains(up.mapped_model(model).unwrap_or(model))
    }

    /// One upstream's list state, for the status page.
    pub fn list(&self, name: &str) -> Option<&ListState> {
        self.lists.get(name)
    }
}

/// Control characters escaped and cut at 200 characters: upstream text goes to logs and the page.
fn clean(s: &str) -> String {
    crate::escape::untrusted(s).into_owned()
}

/// Parses a `/models` answer: OpenAI's `{"data": […]}` (or a bare array) of `{id, created,
/// owned_by}` objects. Oversized or malformed entries are skipped, the list is capped.
pub fn parse_list(body: &[u8]) -> Result<Vec<ModelEntry>, String> {
    let v: Value = serde_json::from_slice(body).map_err(|e| format!("not a JSON list: {e}"))?;
    let items = match &v {
        Value::Array(a) => a,
        Value::Object(o) => match o.get("data") {
            Some(Value::Array(a)) => a,
            _ => return Err("no \"data\" array in the answer".into()),
        },
        _ => return Err("not a JSON list".into()),
    };
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for item in items {
        if out.len() == MAX_IDS {
            break;
        }
        let Some(id) = item.get("id").and_then(Value::as_str) else {
            continue;
        };
        if id.is_empty() || id.len() > MAX_ID_BYTES || !seen.insert(id) {
            continue;
        }
        out.push(ModelEntry {
            id: id.to_string(),
            created: item.get("created").and_then(Value::as_i64).unwrap_or(0),
            owned_by: item
                .get("owned_by")
                .and_then(Value::as_str)
                .filter(|o| !o.is_empty() && o.len() <= MAX_ID_BYTES)
                .map(str::to_string),
        });
    }
    Ok(out)
}

/// The request path's handle: the published snapshot, and reloads to the actor.
#[derive(Clone)]
pub struct ModelsHandle {
    snap: Arc<RwLock<Arc<ModelsSnapshot>>>,
    addr: Addr<ModelsActor>,
}

impl ModelsHandle {
    /// The current snapshot (an `Arc` clone under a read lock).
    pub fn snapshot(&self) -> Arc<ModelsSnapshot> {
        match self.snap.read() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// With `route_by_models` (see the observability guide, "Models and token usage (0.2)"):
    /// keeps in `order` only the upstreams whose known list serves `model` (after their
    /// `model_map`).
    pub fn route_filter(
        &self,
        cfg: &Config,
        order: &mut crate::registry::Order,
        model: Option<&str>,
    ) {
        let Some(model) = model.filter(|_| cfg.route_by_models) else {
            return;
        };
        let snap = self.snapshot();
        order.retain(|&i| cfg.upstreams.get(i).is_some_and(|u| snap.serves(u, model)));
    }

    /// A new config (SIGHUP): lists are fetched again.
    pub fn reload(&self, config: Arc<Config>) {
        self.addr.do_send(ReloadModels(config));
    }
}

/// Applies a new config and fetches every list again.
#[derive(Message)]
#[rtype(result = "()")]
pub struct ReloadModels(pub Arc<Config>);

/// The owner of the lists; see the module docs.
pub struct ModelsActor {
    config: Arc<Config>,
    lists: HashMap<String, ListState>,
    /// Per upstream: number of the newest fetch started, and of the newest one applied.
    started: HashMap<String, u64>,
    applied: HashMap<String, u64>,
    /// Upstreams with a fetch in flight (a refresh tick does not pile another on).
    in_flight: HashSet<String>,
    seq: u64,
    client: awc::Client,
    tick: Option<SpawnHandle>,
    snap: Arc<RwLock<Arc<ModelsSnapshot>>>,
}

impl ModelsActor {
    /// Starts the actor on the current arbiter; the first fetches start at once, in the
    /// background.
    pub fn start_with(config: Arc<Config>, client: awc::Client) -> ModelsHandle {
        let snap = Arc::new(RwLock::new(Arc::new(ModelsSnapshot::build(
            &config,
            HashMap::new(),
        ))));
        let addr = ModelsActor {
            config,
            lists: HashMap::new(),
            started: HashMap::new(),
            applied: HashMap::new(),
            in_flight: HashSet::new(),
            seq: 0,
            client,
            tick: None,
            snap: snap.clone(),
        }
        .start();
        ModelsHandle { snap, addr }
    }

    fn publish(&self) {
        let snap = Arc::new(ModelsSnapshot::build(&self.config, self.lists.clone()));
        match self.snap.write() {
            Ok(mut g) => *g = snap,
            Err(p) => *p.into_inner() = snap,
        }
    }

    fn schedule(&mut self, ctx: &mut Context<Self>) {
        if let Some(h) = self.tick.take() {
            ctx.cancel_future(h);
        }
        let every = self.config.models_refresh;
        self.tick = Some(ctx.run_interval(every, |act, ctx| act.refresh(ctx, false)));
    }

    /// Puts configured lists in place and starts fetches (all of them when `force`, else those
    /// not already in flight).
    fn refresh(&mut self, ctx: &mut Context<Self>, force: bool) {
        let config = self.config.clone();
        let names: HashSet<&str> = config.upstreams.iter().map(|u| &*u.name).collect();
        self.lists.retain(|n, _| names.contains(n.as_str()));
        for up in &config.upstreams {
            match &up.models {
                Some(ids) => {
                    let entries = ids
                        .iter()
                        .map(|id| ModelEntry {
                            id: id.clone(),
                            created: 0,
                            owned_by: None,
                        })
                        .collect();
                    self.lists.insert(
                        up.name.to_string(),
                        ListState {
                            ids: Some(Arc::new(entries)),
                            configured: true,
                            fetched_at: None,
                            error: None,
                        },
                    );
                }
                None => {
                    let l = self.lists.entry(up.name.to_string()).or_default();
                    if l.configured {
                        *l = ListState::default();
                    }
                    if force || !self.in_flight.contains(&*up.name) {
                        self.fetch(ctx, up);
                    }
                }
            }
        }
        self.publish();
    }

    fn fetch(&mut self, ctx: &mut Context<Self>, up: &Upstream) {
        self.seq += 1;
        let seq = self.seq;
        self.started.insert(up.name.to_string(), seq);
        self.in_flight.insert(up.name.to_string());
        let mut req = self
            .client
            .get(format!("{}/models", up.base))
            .insert_header((header::ACCEPT, "application/json"))
            .insert_header((header::ACCEPT_ENCODING, "identity"));
        // `sk: asis` has no key of its own: the list is asked for without one.
        if let UpstreamAuth::Bearer(v) = &up.auth {
            req = req.insert_header((header::AUTHORIZATION, v.clone()));
        }
        let name = up.name.clone();
        let t0 = Instant::now();
        let work = async move {
            let mut resp = req
                .send()
                .await
                .map_err(|e| format!("request failed: {e}"))?;
            let status = resp.status();
            if !status.is_success() {
                return Err(format!("HTTP {}", status.as_u16()));
            }
            let body = resp
                .body()
                .limit(MAX_LIST_BYTES)
                .await
                .map_err(|e| format!("reading the list failed: {e}"))?;
            parse_list(&body)
        };
        let fut = async move {
            match actix_rt::time::timeout(FETCH_TIMEOUT, work).await {
                Ok(r) => r,
                Err(_) => Err(format!("no answer within {}s", FETCH_TIMEOUT.as_secs())),
            }
        };
        ctx.spawn(fut.into_actor(self).map(move |result, act, _| {
            act.apply(&name, seq, result, t0.elapsed());
        }));
    }

    fn apply(
        &mut self,
        name: &str,
        seq: u64,
        result: Result<Vec<ModelEntry>, String>,
        took: Duration,
    ) {
        if self.started.get(name) == Some(&seq) {
            self.in_flight.remove(name);
        }
        // A result older than one already applied, or for an upstream that is gone or now has a
        // configured list, changes nothing.
        let current = self
            .config
            .upstreams
            .iter()
            .any(|u| &*u.name == name && u.models.is_none());
        if !current || self.applied.get(name).is_some_and(|&a| a > seq) {
            return;
        }
        self.applied.insert(name.to_string(), seq);
        let l = self.lists.entry(name.to_string()).or_default();
        match result {
            Ok(ids) => {
                log::info!(
                    "upstream {name}: model list fetched ({} ids, {} ms)",
                    ids.len(),
                    took.as_millis()
                );
                l.ids = Some(Arc::new(ids));
                l.fetched_at = Some(SystemTime::now());
                // The status page shows an error only while it is the latest fetch's.
                l.error = None;
            }
            Err(e) => {
                let e = clean(&e);
                log::warn!("upstream {name}: model list not fetched ({e}); keeping the last one");
                l.error = Some((SystemTime::now(), e));
            }
        }
        self.publish();
    }
}

impl Actor for ModelsActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        self.refresh(ctx, true);
        self.schedule(ctx);
    }
}

impl Handler<ReloadModels> for ModelsActor {
    type Result = ();

    fn handle(&mut self, msg: ReloadModels, ctx: &mut Context<Self>) {
        let reschedule = msg.0.models_refresh != self.config.models_refresh;
        self.config = msg.0;
        self.refresh(ctx, true);
        if reschedule {
            self.schedule(ctx);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(text: &str) -> Config {
        crate::config::parse(std::path::Path::new("t.yaml"), text, false, &|_| None)
            .unwrap()
            .0
    }

    fn entries(ids: &[&str]) -> ListState {
        ListState {
            ids: Some(Arc::new(
                ids.iter()
                    .map(|id| ModelEntry {
                        id: id.to_string(),
                        created: 7,
                        owned_by: (*id == "b").then(|| "org-b".to_string()),
                    })
                    .collect(),
            )),
            ..Default::default()
        }
    }

    #[test]
    fn union_in_order_with_filters_and_map_keys() {
        let c = cfg("authorization: x\nroute_by_models: true\nupstreams:\n  - name: one\n    endpoint: http://h\n    deny: [c]\n    model_map: {alias: a, \"gpt-*\": z}\n  - name: two\n    endpoint: http://h2\n  - name: three\n    endpoint: http://h3\n    model_map: {\"*\": q}\n");
        let mut lists = HashMap::new();
        lists.insert("one".to_string(), entries(&["a", "b", "c"]));
        lists.insert("two".to_string(), entries(&["c", "a", "d"]));
        let s = ModelsSnapshot::build(&c, lists);
        let v: Value = serde_json::from_slice(&s.list_body).unwrap();
        let ids: Vec<&str> = v["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["id"].as_str().unwrap())
            .collect();
        assert_eq!(ids, ["a", "b", "alias", "c", "d"]);
        assert_eq!(v["data"][1]["owned_by"], "org-b");
        assert_eq!(v["data"][0]["owned_by"], "one");
        assert_eq!(v["data"][3]["owned_by"], "two");
        assert_eq!(v["data"][2]["created"], 0);
        assert_eq!(v["data"][0]["created"], 7);
        assert_eq!(v["object"], "list");
        // route_by_models
        assert!(s.serves(&c.upstreams[0], "alias"));
        assert!(!s.serves(&c.upstreams[0], "d"));
        assert!(s.serves(&c.upstreams[1], "d"));
        assert!(s.serves(&c.upstreams[2], "anything"));
    }

    #[test]
    fn parse_skips_bad_entries() {
        let l = parse_list(br#"{"object":"list","data":[{"id":"a","owned_by":"x","created":5},{"id":7},{"nope":1},{"id":"a"},{"id":"b"}]}"#).unwrap();
        assert_eq!(l.len(), 2);
        assert_eq!(l[0].owned_by.as_deref(), Some("x"));
        assert_eq!(l[0].created, 5);
        assert!(parse_list(b"<html>").is_err());
        assert_eq!(parse_list(br#"[{"id":"z"}]"#).unwrap()[0].id, "z");
    }

    #[test]
    fn clean_escapes_upstream_text() {
        assert_eq!(clean("a\nb\u{1b}"), "a\\nb\\u{1b}");
    }
}
