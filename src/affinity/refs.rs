//! Which objects a request refers to (see the affinity guide, "References"): ids in its path
//! here; ids in its body are read by the one parse of the body (`crate::facts`).

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

/// `POST` paths whose 2xx answer creates an object its upstream owns (see the affinity guide, "Owners");
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

/// Whether a `POST` to `path` creates an owned object when answered 2xx: a chat completion
/// only with `"store": true`, and a Responses answer not with `"store": false` (what the upstream
/// was told not to keep, nobody keeps).
pub fn creates_object(path: &str, store: Option<bool>) -> bool {
    let path = path.strip_suffix('/').unwrap_or(path);
    match path {
        "/v1/chat/completions" => store == Some(true),
        "/v1/responses" => store != Some(false),
        _ => OWNING_PATHS.contains(&path),
    }
}

/// The segments of `path` (without query) that may be ids: in an owning family, the segment
/// after each collection name (`/v1/files/{id}/content`, `/v1/vector_stores/{id}/files/{id}`,
/// `/v1/fine_tuning/jobs/{id}`, `/v1/chat/completions/{id}`), never a known word. Not cut by
/// length: the caller tells an id too long to own (`facts::MAX_ID_BYTES`) apart.
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
        .filter(|(i, s)| i % 2 == 1 && !s.is_empty() && !WORDS.contains(s))
        .map(|(_, s)| s)
        .take(crate::facts::MAX_REFS)
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
    fn owning_requests() {
        assert!(creates_object("/v1/responses", None));
        assert!(!creates_object("/v1/responses", Some(false)));
        assert!(creates_object("/v1/files", None));
        assert!(!creates_object("/v1/chat/completions", None));
        assert!(creates_object("/v1/chat/completions", Some(true)));
        assert!(!creates_object("/v1/embeddings", None));
    }
}
