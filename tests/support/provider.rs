//! A mock upstream with state, like a real provider: it keeps the responses and files it created
//! and knows nothing of any other upstream's. A `previous_response_id` it did not create is
//! answered 400 `previous_response_not_found`, a file it does not have 404 — what OpenAI does.
//! It can be taken down (503) and brought back.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use serde_json::{json, Value};

use super::mock::{Ending, Mock, Reply, Seen};

/// A stateful mock provider (see the module docs).
pub struct Provider {
    pub mock: Mock,
    pub name: String,
    down: Arc<AtomicBool>,
    /// Responses it created: id → the request body it got.
    pub responses: Arc<Mutex<HashMap<String, Value>>>,
    /// Files it holds: id → content.
    pub files: Arc<Mutex<HashMap<String, Vec<u8>>>>,
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
        let n = Arc::new(AtomicUsize::new(0));
        let (d, r, f, who) = (
            down.clone(),
            responses.clone(),
            files.clone(),
            name.to_string(),
        );
        let mock = Mock::script(move |req, _| {
            if d.load(Ordering::SeqCst) {
                return Reply::status(503);
            }
            handle(&who, req, &r, &f, &n)
        });
        Provider {
            mock,
            name: name.to_string(),
            down,
            responses,
            files,
        }
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

fn handle(
    who: &str,
    req: &Seen,
    responses: &Mutex<HashMap<String, Value>>,
    files: &Mutex<HashMap<String, Vec<u8>>>,
    n: &AtomicUsize,
) -> Reply {
    let path = req.target.split('?').next().unwrap_or("");
    let seq = n.fetch_add(1, Ordering::SeqCst);
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
            let id = format!("resp_{who}_{seq}");
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
        ("POST", "/v1/files") => {
            let id = format!("file-{who}-{seq}");
            files.lock().unwrap().insert(id.clone(), req.body.clone());
            Reply::json(
                200,
                json!({"id": id, "object": "file", "bytes": req.body.len(), "created_at": 1700000000,
                       "filename": "notes.jsonl", "purpose": "batch", "status": "processed"}),
            )
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
                (Some(bytes), false) => Reply::json(
                    200,
                    json!({"id": id, "object": "file", "bytes": bytes.len(), "created_at": 1700000000,
                           "filename": "notes.jsonl", "purpose": "batch", "status": "processed"}),
                ),
            }
        }
        _ => Reply::chat(&format!("{who} chat")),
    }
}
