//! The id of the object an answer creates (see the affinity guide, "What is pinned"), read while
//! the answer is relayed: a JSON answer's top-level `id`, or a stream's first event that names one
//! (`response.created` → `response.id`). The id is handed on the moment it is read — before the
//! bytes that carry it go to the client — so a follow-up can never arrive before its owner is
//! known. For a Responses answer the `output` items are also kept (within the record limit), for
//! rebuilding its chain.

use serde::Deserialize;
use serde_json::value::RawValue;

/// Bytes of a JSON answer searched for its top-level `id` when its output is not wanted.
const ID_HEAD: usize = 64 << 10;

/// Called with the id as soon as it is read.
pub type OnId = Box<dyn FnMut(&str) + Send>;

/// What the watch found, for the record and the chain.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ObjectSeen {
    /// The object's id.
    pub id: Option<String>,
    /// A Responses answer's `output` array as JSON text, when it was read whole.
    pub output: Option<String>,
}

/// Watches one answer for its object id (and output items).
pub struct ObjectWatch {
    on_id: Option<OnId>,
    /// Keep the Responses `output` (POST /v1/responses).
    want_output: bool,
    limit: usize,
    /// JSON: the body so far (bounded).
    body: Vec<u8>,
    /// JSON: bytes seen in all.
    total: usize,
    /// A stream line could not be read whole.
    cut: bool,
    seen: ObjectSeen,
}

impl std::fmt::Debug for ObjectWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ObjectWatch")
            .field("seen", &self.seen)
            .field("cut", &self.cut)
            .finish()
    }
}

#[derive(Deserialize)]
struct OutputOf<'a> {
    #[serde(default, borrow)]
    output: Option<&'a RawValue>,
}

impl ObjectWatch {
    /// A watch calling `on_id` with the id; `want_output` keeps a Responses answer's output
    /// within `limit` bytes (0 = the capture's own bound).
    pub fn new(on_id: OnId, want_output: bool, limit: usize) -> ObjectWatch {
        ObjectWatch {
            on_id: Some(on_id),
            want_output,
            limit: if limit == 0 {
                super::UNLIMITED_CAPTURE - super::SLACK
            } else {
                limit
            },
            body: Vec::new(),
            total: 0,
            cut: false,
            seen: ObjectSeen::default(),
        }
    }

    fn found(&mut self, id: &str) {
        // An id longer than the gateway routes whole is never owned (and never cut).
        if self.seen.id.is_some() || id.is_empty() || id.len() > crate::facts::MAX_ID_BYTES {
            return;
        }
        if let Some(mut f) = self.on_id.take() {
            f(id);
        }
        self.seen.id = Some(id.to_string());
    }

    /// A chunk of a JSON answer.
    pub fn json(&mut self, chunk: &[u8]) {
        self.total += chunk.len();
        let bound = if self.want_output {
            self.limit.max(ID_HEAD)
        } else {
            ID_HEAD
        };
        if self.seen.id.is_some() && !self.want_output {
            return;
        }
        let room = bound.saturating_sub(self.body.len());
        self.body.extend_from_slice(&chunk[..chunk.len().min(room)]);
        if self.seen.id.is_none() {
            if let Some(id) = top_level_id(&self.body) {
                self.found(&id);
            }
        }
    }

    /// One SSE event's payload, read once by the relay: the id of the first event that names
    /// one, and a Responses answer's output at its end.
    pub fn sse_payload(&mut self, p: &crate::sse::Payload<'_>) {
        if p.cut {
            // Too long to keep whole: its output cannot be read whole.
            self.cut = true;
            return;
        }
        if self.seen.id.is_none() {
            let id = p
                .response
                .as_ref()
                .and_then(|r| r.id.as_deref())
                .or(p.id.as_deref());
            if let Some(id) = id {
                self.found(id);
            }
        }
        let done = matches!(
            p.kind.as_deref(),
            Some("response.completed" | "response.incomplete")
        );
        if self.want_output && done {
            self.seen.output = p
                .response
                .as_ref()
                .and_then(|r| r.output)
                .map(|o| o.get().to_string());
        }
    }

    /// What was found; a cut answer gives no output.
    pub fn finish(mut self, json: bool) -> ObjectSeen {
        if json {
            self.cut = self.total > self.limit || self.total > self.body.len();
        }
        if json && !self.cut && self.want_output {
            if let Ok(o) = serde_json::from_slice::<OutputOf<'_>>(&self.body) {
                self.seen.output = o.output.map(|o| o.get().to_string());
            }
        }
        if self.cut {
            self.seen.output = None;
        }
        self.seen
    }
}

/// The top-level `"id"` string of a JSON object whose text may be incomplete; None until it is
/// there (or when it is not a string).
pub fn top_level_id(json: &[u8]) -> Option<String> {
    let mut s = Scan { b: json, i: 0 };
    s.ws();
    s.eat(b'{')?;
    loop {
        s.ws();
        if s.peek()? == b'}' {
            return None;
        }
        let key_start = s.i;
        s.string()?;
        let key = &json[key_start..s.i];
        s.ws();
        s.eat(b':')?;
        s.ws();
        let v_start = s.i;
        if key == b"\"id\"" {
            s.string()?;
            return serde_json::from_slice::<String>(&json[v_start..s.i]).ok();
        }
        s.value()?;
        s.ws();
        match s.peek()? {
            b',' => s.i += 1,
            _ => return None,
        }
    }
}

/// A forward-only JSON skimmer; every step returns None when the text ends first.
struct Scan<'a> {
    b: &'a [u8],
    i: usize,
}

impl Scan<'_> {
    fn peek(&self) -> Option<u8> {
        self.b.get(self.i).copied()
    }
    fn ws(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\n' | b'\r' | b'\t')) {
            self.i += 1;
        }
    }
    fn eat(&mut self, c: u8) -> Option<()> {
        (self.peek()? == c).then(|| self.i += 1)
    }
    fn string(&mut self) -> Option<()> {
        self.eat(b'"')?;
        loop {
            match self.peek()? {
                b'\\' => self.i += 2,
                b'"' => {
                    self.i += 1;
                    return Some(());
                }
                _ => self.i += 1,
            }
        }
    }
    fn value(&mut self) -> Option<()> {
        match self.peek()? {
            b'"' => self.string(),
            b'{' | b'[' => {
                let mut depth = 0usize;
                loop {
                    match self.peek()? {
                        b'"' => {
                            self.string()?;
                            continue;
                        }
                        b'{' | b'[' => depth += 1,
                        b'}' | b']' => {
                            depth -= 1;
                            if depth == 0 {
                                self.i += 1;
                                return Some(());
                            }
                        }
                        _ => {}
                    }
                    self.i += 1;
                }
            }
            _ => {
                while !matches!(
                    self.peek()?,
                    b',' | b'}' | b']' | b' ' | b'\n' | b'\r' | b'\t'
                ) {
                    self.i += 1;
                }
                Some(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[test]
    fn top_level_id_in_partial_json() {
        assert_eq!(
            top_level_id(br#"{"id":"resp_1","x":1"#).as_deref(),
            Some("resp_1")
        );
        assert_eq!(
            top_level_id(
                br#"{"object":"file","meta":{"id":"no"},"list":[{"id":"no"}],"id":"file-1"}"#
            )
            .as_deref(),
            Some("file-1")
        );
        assert_eq!(top_level_id(br#"{"object":"file","i"#), None);
        assert_eq!(top_level_id(br#"{"id":"a\"b"}"#).as_deref(), Some("a\"b"));
        assert_eq!(top_level_id(br#"{"id":5}"#), None);
        assert_eq!(top_level_id(b"[1]"), None);
    }

    #[test]
    fn the_id_is_handed_on_when_read() {
        let got = Arc::new(Mutex::new(Vec::new()));
        let g = got.clone();
        let mut w = ObjectWatch::new(
            Box::new(move |id| g.lock().unwrap().push(id.to_string())),
            true,
            0,
        );
        w.sse_payload(&crate::sse::Payload::read(
            br#"{"type":"response.created","response":{"id":"resp_9","output":[]}}"#,
        ));
        assert_eq!(*got.lock().unwrap(), ["resp_9"]);
        w.sse_payload(&crate::sse::Payload::read(
            br#"{"type":"response.output_item.added","item":{"id":"msg_1"}}"#,
        ));
        w.sse_payload(&crate::sse::Payload::read(br#"{"type":"response.completed","response":{"id":"resp_9","output":[{"type":"message"}]}}"#));
        let seen = w.finish(false);
        assert_eq!(seen.id.as_deref(), Some("resp_9"));
        assert_eq!(seen.output.as_deref(), Some(r#"[{"type":"message"}]"#));
        assert_eq!(got.lock().unwrap().len(), 1);
    }

    #[test]
    fn a_cut_json_answer_gives_no_output() {
        let mut w = ObjectWatch::new(Box::new(|_| {}), true, 16);
        w.json(br#"{"id":"resp_1","output":[{"type":"message"}]}"#);
        let seen = w.finish(true);
        assert_eq!(seen.id.as_deref(), Some("resp_1"));
        assert_eq!(seen.output, None);
    }
}
