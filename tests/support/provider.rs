//! A mock upstream with state, like a real provider: it keeps the responses and files it created
//! and knows nothing of any other upstream's. A `previous_response_id` it did not create is
//! answered 400 `previous_response_not_found`, a file it does not have 404 — what OpenAI does.
//! It can be taken down (503) and brought back, deletes what it is asked to delete, lists its
//! files and batches (`GET /v1/files`, `GET /v1/batches`, newest first, `limit` and `after` as
//! OpenAI pages them), can make ids as long as LiteLLM's, and a test can answer some requests in
//! its place ([`Provider::intercept`]).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use serde_json::{json, Value};

use super::mock::{Ending, Mock, Reply, Seen};

/// A test's own answer to some requests, before the provider's: `None` lets the provider answer.
type Intercept = Arc<Mutex<Option<Box<dyn Fn(&Seen) -> Option<Reply> + Send>>>>;

/// A stateful mock provider (see the module docs).
pub struct Provider {
    pub mock: Mock,
    pub name: String,
    down: Arc<AtomicBool>,
    intercept: Intercept,
    /// Length of the ids it makes from now on (0: `resp_{name}_{n}` as they come).
    id_len: Arc<AtomicUsize>,
    /// Responses it created: id → the request body it got.
    pub responses: Arc<Mutex<HashMap<String, Value>>>,
    /// Files it holds: id → content.
    pub files: Arc<Mutex<HashMap<String, Vec<u8>>>>,
    /// Batches it created: id → the batch object.
    pub batches: Arc<Mutex<HashMap<String, Value>>>,
}

fn not_found(code: &str, what: &str) -> Reply {
    Reply::json(
        404,
        json!({"error": {"message": format!("No such {what}"), "type": "invalid_request_error", "param": null, "code": code}}),
    )
}

impl Provider {
    /// A provider named `name` (its ids start `resp_{name}_`, `file-{name}-`).
    pub fn new(name: &str) -> Provider {
        let down = Arc::new(AtomicBool::new(false));
        let responses: Arc<Mutex<HashMap<String, Value>>> = Arc::default();
        let files: Arc<Mutex<HashMap<String, Vec<u8>>>> = Arc::default();
        let batches: Arc<Mutex<HashMap<String, Value>>> = Arc::default();
        let n = Arc::new(AtomicUsize::new(0));
        let intercept: Intercept = Arc::default();
        let id_len = Arc::new(AtomicUsize::new(0));
        let (d, r, f, b, who) = (
            down.clone(),
            responses.clone(),
            files.clone(),
            batches.clone(),
            name.to_string(),
        );
        let (hook, len) = (intercept.clone(), id_len.clone());
        let mock = Mock::script(move |req, _| {
            if d.load(Ordering::SeqCst) {
                return Reply::status(503);
            }
            if let Some(reply) = hook.lock().unwrap().as_ref().and_then(|h| h(req)) {
                return reply;
            }
            let ids = Ids {
                who: &who,
                n: &n,
                len: len.load(Ordering::SeqCst),
            };
            let held = Held {
                responses: &r,
                files: &f,
                batches: &b,
            };
            handle(&ids, req, held)
        });
        Provider {
            mock,
            name: name.to_string(),
            down,
            intercept,
            id_len,
            responses,
            files,
            batches,
        }
    }

    /// From now on `f` answers the requests it returns `Some` for; the provider the rest.
    pub fn intercept(&self, f: impl Fn(&Seen) -> Option<Reply> + Send + 'static) {
        *self.intercept.lock().unwrap() = Some(Box::new(f));
    }

    /// Ids it makes from now on are `len` bytes long (LiteLLM proxy's Responses ids are 409).
    pub fn set_id_len(&self, len: usize) {
        self.id_len.store(len, Ordering::SeqCst);
    }

    /// It loses every response it held (a restart without storage).
    pub fn forget_responses(&self) {
        self.responses.lock().unwrap().clear();
    }

    /// Answer 503 to everything (`true`) or serve again.
    pub fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
    }

    /// A file this provider holds although no gateway saw it created.
    pub fn add_file(&self, id: &str, content: &[u8]) {
        self.files
            .lock()
            .unwrap()
            .insert(id.to_string(), content.to_vec());
    }

    /// A response this provider holds although no gateway saw it created.
    pub fn add_response(&self, id: &str) {
        self.responses
            .lock()
            .unwrap()
            .insert(id.to_string(), json!({}));
    }

    pub fn endpoint(&self) -> String {
        self.mock.endpoint()
    }

    /// Requests seen whose path starts with `prefix` (after `/v1`).
    pub fn seen_on(&self, prefix: &str) -> Vec<Seen> {
        self.mock
            .seen()
            .into_iter()
            .filter(|s| s.target.starts_with(prefix))
            .collect()
    }
}

/// What a turn of a Responses conversation answers: one assistant message naming the provider
/// and the turn, and a function call when the input asks for one.
fn answer(who: &str, id: &str, body: &Value) -> Value {
    let asks_tool = body["input"].to_string().contains("use the tool");
    let mut output = vec![
        json!({"type": "reasoning", "id": format!("rs_{id}"), "summary": [], "encrypted_content": "opaque"}),
        json!({"type": "message", "id": format!("msg_{id}"), "status": "completed", "role": "assistant",
               "content": [{"type": "output_text", "text": format!("{who} answers {id}"), "annotations": []}]}),
    ];
    if asks_tool {
        output.push(json!({"type": "function_call", "id": format!("fc_{id}"), "call_id": format!("call_{id}"),
                           "name": "lookup", "arguments": "{\"q\":1}", "status": "completed"}));
    }
    json!({"id": id, "object": "response", "status": "completed", "model": body["model"], "output": output,
           "previous_response_id": body["previous_response_id"],
           "usage": {"input_tokens": 3, "output_tokens": 4, "total_tokens": 7}})
}

/// How a provider names what it creates.
struct Ids<'a> {
    who: &'a str,
    n: &'a AtomicUsize,
    /// 0, or the length every id is padded to.
    len: usize,
}

impl Ids<'_> {
    /// The next sequence number (every request takes one).
    fn next(&self) -> usize {
        self.n.fetch_add(1, Ordering::SeqCst)
    }

    /// `{prefix}{seq}`, padded with base64-like text (as LiteLLM's encoded ids are) to `len`.
    fn make(&self, prefix: &str, seq: usize) -> String {
        let mut id = format!("{prefix}{seq}");
        if self.len > id.len() {
            id.push('_');
            let pad = "bGl0ZWxsbTpjdXN0b21fbGxtX3Byb3ZpZGVyOm9wZW5haQ";
            id.extend(pad.chars().cycle().take(self.len - id.len()));
        }
        id
    }
}

fn deleted(id: &str, object: &str) -> Reply {
    Reply::json(200, json!({"id": id, "object": object, "deleted": true}))
}

/// What a provider holds.
struct Held<'a> {
    responses: &'a Mutex<HashMap<String, Value>>,
    files: &'a Mutex<HashMap<String, Vec<u8>>>,
    batches: &'a Mutex<HashMap<String, Value>>,
}

/// A file object as OpenAI shows it.
fn file_object(id: &str, bytes: usize) -> Value {
    json!({"id": id, "object": "file", "bytes": bytes, "created_at": 1700000000,
           "filename": "notes.jsonl", "purpose": "batch", "status": "processed"})
}

/// An OpenAI list page of `objects` (id, object), newest first (ids end with a sequence
/// number): at most `limit` (query, default 20) after the id `after`, with `first_id`,
/// `last_id` and `has_more`.
fn list_page(target: &str, mut objects: Vec<(String, Value)>) -> Reply {
    let query = target.split_once('?').map_or("", |(_, q)| q);
    let param = |k: &str| {
        query
            .split('&')
            .filter_map(|p| p.split_once('='))
            .find(|(key, _)| *key == k)
            .map(|(_, v)| v.to_string())
    };
    let seq = |id: &str| -> u64 {
        id.rsplit(['-', '_'])
            .next()
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    };
    objects.sort_by_key(|(id, _)| std::cmp::Reverse(seq(id)));
    if let Some(after) = param("after") {
        if let Some(at) = objects.iter().position(|(id, _)| *id == after) {
            objects.drain(..=at);
        }
    }
    let limit: usize = param("limit").and_then(|l| l.parse().ok()).unwrap_or(20);
    let has_more = objects.len() > limit;
    objects.truncate(limit);
    let data: Vec<Value> = objects.into_iter().map(|(_, v)| v).collect();
    let id_at = |v: Option<&Value>| v.map_or(Value::Null, |v| v["id"].clone());
    Reply::json(
        200,
        json!({"object": "list", "data": data, "first_id": id_at(data.first()),
               "last_id": id_at(data.last()), "has_more": has_more}),
    )
}

fn handle(ids: &Ids<'_>, req: &Seen, held: Held<'_>) -> Reply {
    let Held {
        responses,
        files,
        batches,
    } = held;
    let who = ids.who;
    let path = req.target.split('?').next().unwrap_or("");
    let seq = ids.next();
    match (req.method.as_str(), path) {
        ("POST", "/v1/responses") => {
            let body = req.json();
            if let Some(prev) = body["previous_response_id"].as_str() {
                if !responses.lock().unwrap().contains_key(prev) {
                    return Reply::json(
                        400,
                        json!({"error": {"message": format!("Previous response with id '{prev}' not found."),
                               "type": "invalid_request_error", "param": "previous_response_id",
                               "code": "previous_response_not_found"}}),
                    );
                }
            }
            // Referenced files must be ours.
            let text = body.to_string();
            for word in text.split('"') {
                if word.starts_with("file-") && !files.lock().unwrap().contains_key(word) {
                    return not_found("file_not_found", "File");
                }
            }
            let id = ids.make(&format!("resp_{who}_"), seq);
            responses.lock().unwrap().insert(id.clone(), body.clone());
            let out = answer(who, &id, &body);
            if body["stream"] == true {
                let created = json!({"type": "response.created", "sequence_number": 0,
                    "response": {"id": id, "object": "response", "status": "in_progress", "output": []}});
                let delta = json!({"type": "response.output_text.delta", "sequence_number": 1,
                    "item_id": format!("msg_{id}"), "output_index": 1, "content_index": 0,
                    "delta": format!("{who} answers {id}")});
                let done =
                    json!({"type": "response.completed", "sequence_number": 2, "response": out});
                let chunks = [
                    format!("event: response.created\ndata: {created}\n\n"),
                    format!("event: response.output_text.delta\ndata: {delta}\n\n"),
                    format!("event: response.completed\ndata: {done}\n\n"),
                ];
                return Reply::Chunks {
                    status: 200,
                    headers: vec![("content-type".into(), "text/event-stream".into())],
                    chunks: chunks
                        .into_iter()
                        .map(|c| (std::time::Duration::ZERO, c.into_bytes()))
                        .collect(),
                    ending: Ending::Finish,
                };
            }
            Reply::json(200, out)
        }
        ("GET", p) if p.starts_with("/v1/responses/") => {
            let id = &p["/v1/responses/".len()..];
            match responses.lock().unwrap().get(id) {
                Some(_) => Reply::json(200, json!({"id": id, "object": "response"})),
                None => not_found("response_not_found", "Response"),
            }
        }
        ("DELETE", p) if p.starts_with("/v1/responses/") => {
            let id = &p["/v1/responses/".len()..];
            match responses.lock().unwrap().remove(id) {
                Some(_) => deleted(id, "response"),
                None => not_found("response_not_found", "Response"),
            }
        }
        ("DELETE", p) if p.starts_with("/v1/files/") => {
            let id = &p["/v1/files/".len()..];
            match files.lock().unwrap().remove(id) {
                Some(_) => deleted(id, "file"),
                None => not_found("file_not_found", "File"),
            }
        }
        ("POST", "/v1/files") => {
            let id = ids.make(&format!("file-{who}-"), seq);
            files.lock().unwrap().insert(id.clone(), req.body.clone());
            Reply::json(200, file_object(&id, req.body.len()))
        }
        ("GET", "/v1/files") => {
            let all = files
                .lock()
                .unwrap()
                .iter()
                .map(|(id, b)| (id.clone(), file_object(id, b.len())))
                .collect();
            list_page(&req.target, all)
        }
        ("POST", "/v1/batches") => {
            let body = req.json();
            if let Some(input) = body["input_file_id"].as_str() {
                if !files.lock().unwrap().contains_key(input) {
                    return not_found("file_not_found", "File");
                }
            }
            let id = ids.make(&format!("batch_{who}_"), seq);
            let batch = json!({"id": id, "object": "batch", "endpoint": body["endpoint"],
                               "input_file_id": body["input_file_id"], "status": "validating"});
            batches.lock().unwrap().insert(id.clone(), batch.clone());
            Reply::json(200, batch)
        }
        ("GET", "/v1/batches") => {
            let all = batches
                .lock()
                .unwrap()
                .iter()
                .map(|(id, b)| (id.clone(), b.clone()))
                .collect();
            list_page(&req.target, all)
        }
        ("GET", p) if p.starts_with("/v1/files/") => {
            let rest = &p["/v1/files/".len()..];
            let (id, content) = match rest.strip_suffix("/content") {
                Some(id) => (id, true),
                None => (rest, false),
            };
            let held = files.lock().unwrap().get(id).cloned();
            match (held, content) {
                (None, _) => Reply::json(
                    404,
                    json!({"error": {"message": format!("No such File object: {id}"),
                           "type": "invalid_request_error", "param": "id", "code": null}}),
                ),
                (Some(bytes), true) => Reply::Full {
                    status: 200,
                    headers: vec![("content-type".into(), "application/octet-stream".into())],
                    body: format!("{who}:")
                        .into_bytes()
                        .into_iter()
                        .chain(bytes)
                        .collect(),
                },
                (Some(bytes), false) => Reply::json(200, file_object(id, bytes.len())),
            }
        }
        _ => Reply::chat(&format!("{who} chat")),
    }
}
