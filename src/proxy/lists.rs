//! A list answered to a member that sees only its own objects keeps only those (see the members
//! guide, "Objects"): `data` filtered by who created each object, `first_id`/`last_id` describing
//! what is kept, `has_more` the upstream's. The one answer body the gateway rewrites; it is read
//! whole for that, within [`LIST_MAX`].

use serde_json::{Map, Value};

/// The lists whose items are objects that live on one upstream.
pub const LIST_PATHS: [&str; 8] = [
    "/v1/files",
    "/v1/batches",
    "/v1/vector_stores",
    "/v1/assistants",
    "/v1/fine_tuning/jobs",
    "/v1/containers",
    "/v1/conversations",
    "/v1/chat/completions",
];

/// The largest list answer read to be filtered; a longer one is refused rather than shown whole.
pub const LIST_MAX: usize = 32 << 20;

/// What a member that sees only its own objects gets for a list answer the gateway cannot read
/// (not a JSON object): an empty page, never the unfiltered one.
pub const EMPTY: &[u8] =
    br#"{"object":"list","data":[],"first_id":null,"last_id":null,"has_more":false}"#;

/// Whether `path` (without query) is one of the filtered lists.
pub fn is_list(path: &str) -> bool {
    LIST_PATHS.contains(&path.trim_end_matches('/'))
}

/// The list `body` with only the items `keep` accepts; None when it is not a JSON object.
pub fn keep_own(body: &[u8], keep: impl Fn(&str) -> bool) -> Option<Vec<u8>> {
    let mut obj: Map<String, Value> = serde_json::from_slice(body).ok()?;
    let Some(Value::Array(items)) = obj.get_mut("data") else {
        return serde_json::to_vec(&obj).ok();
    };
    items.retain(|item| item.get("id").and_then(Value::as_str).is_some_and(&keep));
    let id_at = |items: &Vec<Value>, first: bool| {
        let item = if first { items.first() } else { items.last() };
        item.and_then(|i| i.get("id"))
            .cloned()
            .unwrap_or(Value::Null)
    };
    let (first, last) = (id_at(items, true), id_at(items, false));
    if obj.contains_key("first_id") {
        obj.insert("first_id".into(), first);
    }
    if obj.contains_key("last_id") {
        obj.insert("last_id".into(), last);
    }
    serde_json::to_vec(&obj).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_members_objects_stay() {
        let body = br#"{"object":"list","data":[{"id":"file-a","object":"file"},{"id":"file-b"},{"id":"file-c"}],"first_id":"file-a","last_id":"file-c","has_more":true}"#;
        let out = keep_own(body, |id| id != "file-a").unwrap();
        let v: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["data"].as_array().unwrap().len(), 2);
        assert_eq!(v["first_id"], "file-b");
        assert_eq!(v["last_id"], "file-c");
        assert_eq!(v["has_more"], true);
        let none = keep_own(body, |_| false).unwrap();
        let v: Value = serde_json::from_slice(&none).unwrap();
        assert_eq!(v["first_id"], Value::Null);
        assert!(keep_own(b"[1]", |_| true).is_none());
        let empty: Value = serde_json::from_slice(EMPTY).unwrap();
        assert_eq!(empty["data"], serde_json::json!([]));
        assert!(is_list("/v1/files/") && !is_list("/v1/files/file-a"));
    }
}
