//! How a continuation asks the next upstream (SPEC 4a `prefill`): the client's request with the
//! text already sent appended as a partial assistant message, in that upstream's dialect.

use actix_web::web::Bytes;
use serde_json::{Map, Value};

use crate::config::{Prefill, Upstream};

use super::attempt as one;

/// `body` as `up` gets it: its `model_map` applied.
pub fn mapped(body: &Bytes, up: &Upstream, model: Option<&str>) -> Bytes {
    match model.and_then(|m| up.mapped_model(m)) {
        Some(to) => one::rewrite_model(body, to).unwrap_or_else(|| body.clone()),
        None => body.clone(),
    }
}

/// The request with the text already sent appended as an assistant message, in `dialect`.
pub fn prefill_body(body: &[u8], text: &str, dialect: Prefill) -> Option<Bytes> {
    let mut obj: Map<String, Value> = serde_json::from_slice(body).ok()?;
    let mut msg = Map::new();
    msg.insert("role".into(), Value::String("assistant".into()));
    msg.insert("content".into(), Value::String(text.to_string()));
    if dialect == Prefill::Deepseek {
        msg.insert("prefix".into(), Value::Bool(true));
    }
    obj.get_mut("messages")?
        .as_array_mut()?
        .push(Value::Object(msg));
    if dialect == Prefill::Vllm {
        obj.insert("continue_final_message".into(), Value::Bool(true));
        obj.insert("add_generation_prompt".into(), Value::Bool(false));
    }
    serde_json::to_vec(&obj).ok().map(Bytes::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefill_dialects() {
        let body = br#"{"model":"m","stream":true,"messages":[{"role":"user","content":"hi"}]}"#;
        let v: Value =
            serde_json::from_slice(&prefill_body(body, "Hel", Prefill::Message).unwrap()).unwrap();
        assert_eq!(
            v["messages"][1],
            serde_json::json!({"role": "assistant", "content": "Hel"})
        );
        assert!(v.get("continue_final_message").is_none());
        let v: Value =
            serde_json::from_slice(&prefill_body(body, "Hel", Prefill::Vllm).unwrap()).unwrap();
        assert_eq!(v["continue_final_message"], true);
        assert_eq!(v["add_generation_prompt"], false);
        let v: Value =
            serde_json::from_slice(&prefill_body(body, "Hel", Prefill::Deepseek).unwrap()).unwrap();
        assert_eq!(v["messages"][1]["prefix"], true);
    }
}
