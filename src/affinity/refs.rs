//! Which objects a request refers to (SPEC 4f "References"): ids in its path, and ids under the
//! referring keys of its JSON body at any depth.
//!
//! A body is parsed only when a one-pass scan finds one of those keys quoted in it, so a request
//! without them (most chat and embeddings traffic) costs a byte scan and no allocation. Every
//! id is bounded: at most [`MAX_IDS`] of at most [`MAX_ID_BYTES`] bytes each are looked at.

use serde_json::Value;

/// Body keys whose values name objects (SPEC 4f).
pub const BODY_KEYS: [&[u8]; 12] = [
    b"previous_response_id",
    b"conversation",
    b"file_id",
    b"file_ids",
    b"input_file_id",
    b"training_file",
    b"validation_file",
    b"vector_store_id",
    b"vector_store_ids",
    b"thread_id",
    b"assistant_id",
    b"container_id",
];

/// How every key of [`BODY_KEYS`] ends: a body with none of these (SIMD substring searches) has
/// no referring key, and its quotes need not be walked.
static KEY_ENDINGS: std::sync::LazyLock<[memchr::memmem::Finder<'static>; 3]> =
    std::sync::LazyLock::new(|| {
        [
            memchr::memmem::Finder::new(b"_id"),
            memchr::memmem::Finder::new(b"_file\""),
            memchr::memmem::Finder::new(b"conversation\""),
        ]
    });

/// Ids looked at per request.
pub const MAX_IDS: usize = 32;
/// Longest id looked at (OpenAI's are under 64 bytes).
pub const MAX_ID_BYTES: usize = 256;

/// API families whose objects live on one upstream; a path elsewhere refers to nothing.
const FAMILIES: [&str; 11] = [
    "responses",
    "conversations",
    "files",
    "uploads",
    "batches",
    "vector_stores",
    "fine_tuning",
    "assistants",
    "threads",
    "containers",
    "chat",
];

/// Path words that are never ids (sub-collections and actions).
const WORDS: [&str; 20] = [
    "runs",
    "files",
    "content",
    "input_items",
    "items",
    "messages",
    "steps",
    "cancel",
    "parts",
    "complete",
    "events",
    "checkpoints",
    "file_batches",
    "submit_tool_outputs",
    "search",
    "pause",
    "resume",
    "input_tokens",
    "jobs",
    "completions",
];

/// `POST` paths whose 2xx answer creates an object its upstream owns (SPEC 4f "Owners");
/// `/v1/chat/completions` only with `"store": true`.
pub const OWNING_PATHS: [&str; 12] = [
    "/v1/responses",
    "/v1/conversations",
    "/v1/files",
    "/v1/uploads",
    "/v1/batches",
    "/v1/vector_stores",
    "/v1/fine_tuning/jobs",
    "/v1/assistants",
    "/v1/threads",
    "/v1/threads/runs",
    "/v1/containers",
    "/v1/chat/completions",
];

/// Whether a `POST` to `path` with `body` creates an owned object when answered 2xx.
pub fn creates_object(path: &str, body: &[u8]) -> bool {
    let path = path.strip_suffix('/').unwrap_or(path);
    if !OWNING_PATHS.contains(&path) {
        return false;
    }
    if path != "/v1/chat/completions" {
        return true;
    }
    #[derive(serde::Deserialize)]
    struct Store {
        #[serde(default)]
        store: Option<Value>,
    }
    super::names_a_key(body, &[b"store"])
        && serde_json::from_slice::<Store>(body)
            .ok()
            .and_then(|s| s.store)
            == Some(Value::Bool(true))
}

/// The segments of `path` (without query) that may be ids: in an owning family, the segment
/// after each collection name (`/v1/files/{id}/content`, `/v1/vector_stores/{id}/files/{id}`,
/// `/v1/fine_tuning/jobs/{id}`, `/v1/chat/completions/{id}`), never a known word.
pub fn path_ids(path: &str) -> impl Iterator<Item = &str> {
    let rest = path.strip_prefix("/v1/").unwrap_or("");
    let family = rest.split('/').next().unwrap_or("");
    let rest = if FAMILIES.contains(&family) { rest } else { "" };
    // Two-word collections count as one.
    let rest = rest
        .strip_prefix("fine_tuning/")
        .or_else(|| rest.strip_prefix("chat/"))
        .unwrap_or(rest);
    rest.split('/')
        .enumerate()
        .filter(|(i, s)| {
            i % 2 == 1 && !s.is_empty() && s.len() <= MAX_ID_BYTES && !WORDS.contains(s)
        })
        .map(|(_, s)| s)
        .take(MAX_IDS)
}

/// The ids under the referring keys of a JSON `body`, at any depth (a `conversation` object's
/// `id` included). Empty, without parsing, when no referring key is quoted in it.
pub fn body_ids(body: &[u8]) -> Vec<String> {
    let mut out = Vec::new();
    if !body.trim_ascii_start().starts_with(b"{")
        || !KEY_ENDINGS.iter().any(|f| f.find(body).is_some())
        || !super::names_a_key(body, &BODY_KEYS)
    {
        return out;
    }
    let Ok(v) = serde_json::from_slice::<Value>(body) else {
        return out;
    };
    walk(&v, &mut out, 0);
    out
}

/// The value of the top-level `previous_response_id` of a JSON body.
pub fn previous_response_id(body: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Prev {
        #[serde(default)]
        previous_response_id: Option<Value>,
    }
    if !super::names_a_key(body, &[b"previous_response_id"]) {
        return None;
    }
    match serde_json::from_slice::<Prev>(body)
        .ok()?
        .previous_response_id?
    {
        Value::String(s) if !s.is_empty() && s.len() <= MAX_ID_BYTES => Some(s),
        _ => None,
    }
}

fn push(out: &mut Vec<String>, s: &str) {
    if out.len() < MAX_IDS
        && !s.is_empty()
        && s.len() <= MAX_ID_BYTES
        && !out.iter().any(|o| o == s)
    {
        out.push(s.to_string());
    }
}

fn walk(v: &Value, out: &mut Vec<String>, depth: usize) {
    // serde_json refuses nesting beyond 128 levels already; this keeps the walk honest anyway.
    if depth > 128 || out.len() >= MAX_IDS {
        return;
    }
    match v {
        Value::Object(m) => {
            for (k, v) in m {
                if BODY_KEYS.contains(&k.as_bytes()) {
                    match v {
                        Value::String(s) => push(out, s),
                        Value::Array(a) => a
                            .iter()
                            .filter_map(Value::as_str)
                            .for_each(|s| push(out, s)),
                        Value::Object(o) if k == "conversation" => {
                            if let Some(s) = o.get("id").and_then(Value::as_str) {
                                push(out, s);
                            }
                        }
                        _ => {}
                    }
                }
                walk(v, out, depth + 1);
            }
        }
        Value::Array(a) => a.iter().for_each(|v| walk(v, out, depth + 1)),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_ids_by_family() {
        let ids = |p| path_ids(p).collect::<Vec<_>>();
        assert_eq!(ids("/v1/files/file-1/content"), ["file-1"]);
        assert_eq!(
            ids("/v1/vector_stores/vs_1/files/file-2"),
            ["vs_1", "file-2"]
        );
        assert_eq!(ids("/v1/fine_tuning/jobs/ftjob-1/events"), ["ftjob-1"]);
        assert_eq!(
            ids("/v1/chat/completions/chatcmpl-1/messages"),
            ["chatcmpl-1"]
        );
        assert_eq!(
            ids("/v1/threads/thread_1/runs/run_1/steps"),
            ["thread_1", "run_1"]
        );
        assert!(ids("/v1/threads/runs").is_empty());
        assert!(ids("/v1/files").is_empty());
        assert!(ids("/v1/chat/completions").is_empty());
        assert!(ids("/v1/models/gpt-4o").is_empty());
        assert_eq!(ids("/v1/responses/resp_1/input_items"), ["resp_1"]);
    }

    #[test]
    fn body_ids_at_any_depth() {
        let body = br#"{"previous_response_id":"resp_1","conversation":{"id":"conv_1"},
            "tools":[{"type":"file_search","vector_store_ids":["vs_1","vs_2"]}],
            "input":[{"content":[{"type":"input_file","file_id":"file-1"}]}],
            "training_file":"file-2","x":{"thread_id":"thread_1"}}"#;
        let mut got = body_ids(body);
        got.sort();
        assert_eq!(
            got,
            ["conv_1", "file-1", "file-2", "resp_1", "thread_1", "vs_1", "vs_2"]
        );
        assert!(
            body_ids(br#"{"model":"m","messages":[{"role":"user","content":"file_id"}]}"#)
                .is_empty()
        );
        assert_eq!(body_ids(br#"{"conversation":"conv_9"}"#), ["conv_9"]);
    }

    #[test]
    fn owning_requests() {
        assert!(creates_object("/v1/responses", b"{}"));
        assert!(creates_object("/v1/files", b"--multipart"));
        assert!(!creates_object("/v1/chat/completions", br#"{"model":"m"}"#));
        assert!(creates_object(
            "/v1/chat/completions",
            br#"{"model":"m","store":true}"#
        ));
        assert!(!creates_object("/v1/embeddings", b"{}"));
    }
}
