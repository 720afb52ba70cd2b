//! The references of a body: ids under the referring keys at any depth, read during the one parse
//! of the body (its seeds walk only the values that may hold them). A body without a referring key
//! quoted in it (most chat and embeddings traffic) costs a byte scan and no walk. Every id is
//! bounded: at most [`MAX_REFS`] are read, of at most [`MAX_ID_BYTES`] bytes each (a longer one is
//! noted, never cut, never owned).

use std::borrow::Cow;
use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::value::RawValue;

/// Body keys whose values name objects that live on one upstream.
pub const REF_KEYS: [&str; 12] = [
    "previous_response_id",
    "conversation",
    "file_id",
    "file_ids",
    "input_file_id",
    "training_file",
    "validation_file",
    "vector_store_id",
    "vector_store_ids",
    "thread_id",
    "assistant_id",
    "container_id",
];

/// References read per request; the rest of a body is not searched further.
pub const MAX_REFS: usize = 32;
/// The longest id the gateway owns and routes whole; a longer one is never owned (and never cut).
pub const MAX_ID_BYTES: usize = 1024;

/// Nesting the reference walk follows; deeper values are skipped without recursion (serde_json
/// skips an ignored value iteratively, so a deeply nested body is read, not refused).
const MAX_WALK_DEPTH: usize = 64;

/// Whether any referring key appears quoted in `text`: one scan, so a body without references
/// (most chat and embeddings traffic) is read without walking its values.
pub fn may_refer(text: &[u8]) -> bool {
    static ENDINGS: std::sync::LazyLock<[memchr::memmem::Finder<'static>; 3]> =
        std::sync::LazyLock::new(|| {
            [
                memchr::memmem::Finder::new(b"_id\""),
                memchr::memmem::Finder::new(b"_ids\""),
                memchr::memmem::Finder::new(b"_file\""),
            ]
        });
    ENDINGS.iter().any(|f| f.find(text).is_some())
        || memchr::memmem::find(text, b"\"conversation\"").is_some()
}

/// A key, borrowed from the body unless it had escapes.
pub struct Key<'de>(pub Cow<'de, str>);

impl<'de> serde::Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string key")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(v.to_string())))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(v)))
            }
        }
        d.deserialize_str(V)
    }
}

/// The references found so far.
#[derive(Debug, Default)]
pub struct Refs {
    /// The ids, in the order found.
    pub ids: Vec<Box<str>>,
    /// An id was longer than [`MAX_ID_BYTES`].
    pub long: bool,
}
impl Refs {
    /// Adds an id (bounded; an over-long one is only noted).
    pub fn push(&mut self, id: &str) {
        if id.is_empty() {
            return;
        }
        if id.len() > MAX_ID_BYTES {
            self.long = true;
            return;
        }
        if self.ids.len() < MAX_REFS && !self.ids.iter().any(|o| &**o == id) {
            self.ids.push(id.into());
        }
    }

    fn full(&self) -> bool {
        self.ids.len() >= MAX_REFS
    }
}

/// Walks a value for the ids under referring keys (see the affinity guide "References").
pub struct Walk<'a> {
    refs: &'a mut Refs,
    depth: usize,
}

impl<'a> Walk<'a> {
    /// A walk of a top-level member's value.
    pub fn new(refs: &'a mut Refs) -> Walk<'a> {
        Walk { refs, depth: 1 }
    }
}

impl<'de> DeserializeSeed<'de> for Walk<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        if self.depth > MAX_WALK_DEPTH || self.refs.full() {
            d.deserialize_ignored_any(IgnoredAny).map(|_| ())
        } else {
            d.deserialize_any(self)
        }
    }
}

impl<'de> Visitor<'de> for Walk<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<(), E> {
        Ok(())
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<(), E> {
        Ok(())
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<(), E> {
        Ok(())
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<(), E> {
        Ok(())
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<(), E> {
        Ok(())
    }
    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        Ok(())
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let depth = self.depth + 1;
        while seq
            .next_element_seed(Walk {
                refs: &mut *self.refs,
                depth,
            })?
            .is_some()
        {}
        Ok(())
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let depth = self.depth + 1;
        while let Some(Key(key)) = map.next_key::<Key<'de>>()? {
            if REF_KEYS.contains(&key.as_ref()) {
                let conversation = key == "conversation";
                map.next_value_seed(RefValue {
                    refs: &mut *self.refs,
                    depth,
                    conversation,
                })?;
            } else {
                map.next_value_seed(Walk {
                    refs: &mut *self.refs,
                    depth,
                })?;
            }
        }
        Ok(())
    }
}

/// The value of a referring key: a string id, an array of them, or (for `conversation`) an
/// object with an `id`; anything inside is walked too.
pub struct RefValue<'a> {
    refs: &'a mut Refs,
    depth: usize,
    conversation: bool,
}

impl<'a> RefValue<'a> {
    /// The value of the top-level referring key `key`.
    pub fn new(refs: &'a mut Refs, key: &str) -> RefValue<'a> {
        RefValue {
            refs,
            depth: 1,
            conversation: key == "conversation",
        }
    }
}

impl<'de> DeserializeSeed<'de> for RefValue<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        if self.depth > MAX_WALK_DEPTH {
            d.deserialize_ignored_any(IgnoredAny).map(|_| ())
        } else {
            d.deserialize_any(self)
        }
    }
}

impl<'de> Visitor<'de> for RefValue<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<(), E> {
        self.refs.push(v);
        Ok(())
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<(), E> {
        Ok(())
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<(), E> {
        Ok(())
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<(), E> {
        Ok(())
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<(), E> {
        Ok(())
    }
    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        Ok(())
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        // An array of ids (`file_ids`); anything else in it is walked.
        let depth = self.depth + 1;
        while seq
            .next_element_seed(RefValue {
                refs: &mut *self.refs,
                depth,
                conversation: false,
            })?
            .is_some()
        {}
        Ok(())
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let depth = self.depth + 1;
        while let Some(Key(key)) = map.next_key::<Key<'de>>()? {
            if self.conversation && key == "id" {
                map.next_value_seed(RefValue {
                    refs: &mut *self.refs,
                    depth,
                    conversation: false,
                })?;
            } else if REF_KEYS.contains(&key.as_ref()) {
                let conversation = key == "conversation";
                map.next_value_seed(RefValue {
                    refs: &mut *self.refs,
                    depth,
                    conversation,
                })?;
            } else {
                map.next_value_seed(Walk {
                    refs: &mut *self.refs,
                    depth,
                })?;
            }
        }
        Ok(())
    }
}

/// Walks the raw text of a member kept as a range (`input`, `messages`) for references: the one
/// part of the body read twice, and only when a referring key is quoted inside it.
pub fn walk_raw<E: de::Error>(raw: &RawValue, refs: &mut Refs) -> Result<(), E> {
    if !may_refer(raw.get().as_bytes()) {
        return Ok(());
    }
    let mut de = serde_json::Deserializer::from_str(raw.get());
    Walk { refs, depth: 1 }
        .deserialize(&mut de)
        .map_err(|e| E::custom(format_args!("{e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(body: &str) -> crate::facts::RequestFacts {
        crate::facts::read(body.as_bytes()).unwrap()
    }

    #[test]
    fn body_ids_at_any_depth() {
        let body = r#"{"previous_response_id":"resp_1","conversation":{"id":"conv_1"},
            "tools":[{"type":"file_search","vector_store_ids":["vs_1","vs_2"]}],
            "input":[{"content":[{"type":"input_file","file_id":"file-1"}]}],
            "training_file":"file-2","x":{"thread_id":"thread_1"}}"#;
        let f = facts(body);
        let mut got: Vec<&str> = f.refs.iter().map(|r| &**r).collect();
        got.sort();
        assert_eq!(
            got,
            ["conv_1", "file-1", "file-2", "resp_1", "thread_1", "vs_1", "vs_2"]
        );
        assert_eq!(f.previous_response_id.as_deref(), Some("resp_1"));
        assert!(
            facts(r#"{"model":"m","messages":[{"role":"user","content":"file_id"}]}"#)
                .refs
                .is_empty()
        );
        let f = facts(r#"{"conversation":"conv_9"}"#);
        assert_eq!(f.refs, vec![Box::from("conv_9")]);
        // Nested `previous_response_id` is a reference, but not the top-level one (which alone,
        // besides path ids, teaches an owner through "not here").
        let f = facts(r#"{"metadata":{"previous_response_id":"resp_2"}}"#);
        assert_eq!(f.refs, vec![Box::from("resp_2")]);
        assert_eq!(f.previous_response_id, None);
    }

    #[test]
    fn references_are_bounded_and_long_ids_are_noted_not_cut() {
        let ids: Vec<String> = (0..100).map(|i| format!("\"file-{i}\"")).collect();
        let f = facts(&format!("{{\"file_ids\":[{}]}}", ids.join(",")));
        assert_eq!(f.refs.len(), MAX_REFS);
        let long = "r".repeat(MAX_ID_BYTES + 1);
        let f = facts(&format!("{{\"previous_response_id\":\"{long}\"}}"));
        assert!(f.refs.is_empty() && f.long_ref && f.previous_response_id.is_none());
        let whole = "r".repeat(MAX_ID_BYTES);
        let f = facts(&format!("{{\"previous_response_id\":\"{whole}\"}}"));
        assert_eq!(f.previous_response_id.as_deref(), Some(whole.as_str()));
        // Deep nesting is read (not refused) and walked only so far.
        let deep = format!(
            "{{\"a\":{}{{\"file_id\":\"f\"}}{},\"b\":{{\"file_id\":\"g\"}}}}",
            "[".repeat(10_000),
            "]".repeat(10_000)
        );
        assert_eq!(facts(&deep).refs, vec![Box::from("g")]);
    }
}
