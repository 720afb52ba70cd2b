//! The OpenAI wire shapes a capture reads: SSE events (Chat Completions and Responses API),
//! whole JSON replies, message content in its string and content-part forms, and `usage` (found
//! by key, also in a cut reply's tail).

use std::borrow::Cow;

use serde::Deserialize;

use super::Usage;

#[derive(Deserialize)]
pub(super) struct RawUsage {
    pub(super) prompt_tokens: Option<i64>,
    pub(super) completion_tokens: Option<i64>,
    pub(super) input_tokens: Option<i64>,
    pub(super) output_tokens: Option<i64>,
    pub(super) total_tokens: Option<i64>,
}

impl RawUsage {
    pub(super) fn to_usage(&self) -> Usage {
        let prompt = self.prompt_tokens.or(self.input_tokens);
        let completion = self.completion_tokens.or(self.output_tokens);
        let total = self.total_tokens.or(match (prompt, completion) {
            (Some(p), Some(c)) => Some(p + c),
            _ => None,
        });
        Usage {
            prompt,
            completion,
            total,
        }
    }
}

/// A JSON string borrowed from the event unless it has escapes. serde borrows a `Cow<str>` field
/// only when it is not inside an `Option`; `Option<Cow<str>>` copied every delta's text (one
/// allocation per streamed chunk).
pub(super) struct Text<'a>(pub(super) Cow<'a, str>);

impl<'de: 'a, 'a> Deserialize<'de> for Text<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Text<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E: serde::de::Error>(self, v: &'de str) -> Result<Text<'de>, E> {
                Ok(Text(Cow::Borrowed(v)))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Text<'de>, E> {
                Ok(Text(Cow::Owned(v.to_string())))
            }
            fn visit_string<E: serde::de::Error>(self, v: String) -> Result<Text<'de>, E> {
                Ok(Text(Cow::Owned(v)))
            }
        }
        d.deserialize_str(V)
    }
}

/// The first element of a `choices` array (the only one whose text is kept); the others are
/// skipped without being collected, so no `Vec` is allocated per streamed chunk or reply.
pub(super) struct First<T>(pub(super) Option<T>);

impl<T> Default for First<T> {
    fn default() -> Self {
        First(None)
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for First<T> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<T>(std::marker::PhantomData<T>);
        impl<'de, T: Deserialize<'de>> serde::de::Visitor<'de> for V<T> {
            type Value = First<T>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an array of choices")
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<First<T>, A::Error> {
                let first = seq.next_element::<T>()?;
                while seq.next_element::<serde::de::IgnoredAny>()?.is_some() {}
                Ok(First(first))
            }
        }
        d.deserialize_seq(V(std::marker::PhantomData))
    }
}

/// The JSON text after each `"usage":` key (whitespace skipped).
#[cfg(test)]
pub(super) fn usage_values(json: &[u8]) -> impl Iterator<Item = &[u8]> {
    key_values(json, b"\"usage\"")
}

/// Where `key` (a JSON string, quotes included) first occurs in `hay`. Jumps from quote to quote:
/// `windows(..).position(w == key)` compared the key through a slice comparison at every offset
/// (~10 instructions per byte of every reply, a tenth of a stream's).
pub(crate) fn find_key(hay: &[u8], key: &[u8]) -> Option<usize> {
    let mut from = 0;
    loop {
        let at = from + hay.get(from..)?.iter().position(|&b| b == b'"')?;
        if hay[at..].starts_with(key) {
            return Some(at);
        }
        from = at + 1;
    }
}

/// The JSON text after each occurrence of the quoted `key` followed by a colon (whitespace
/// skipped). Inside a JSON string a quote is always escaped, so a quoted key followed by a colon
/// can only be a key.
pub(crate) fn key_values<'a>(json: &'a [u8], key: &'static [u8]) -> impl Iterator<Item = &'a [u8]> {
    let mut rest = json;
    std::iter::from_fn(move || loop {
        let at = find_key(rest, key)?;
        rest = &rest[at + key.len()..];
        if let Some(value) = rest.trim_ascii_start().strip_prefix(b":") {
            return Some(value.trim_ascii_start());
        }
    })
}

/// The last non-null `"finish_reason": "…"` in a JSON text (the tail of a reply cut at the
/// record limit, where the whole could not be parsed).
pub(crate) fn tail_finish_reason(tail: &[u8]) -> Option<String> {
    key_values(tail, b"\"finish_reason\"")
        .filter(|v| v.starts_with(b"\""))
        .filter_map(|v| String::deserialize(&mut serde_json::Deserializer::from_slice(v)).ok())
        .last()
}

/// The values after each `"usage":` key like [`usage_values`], last first: `usage` ends a reply,
/// so searching from the end reads its last hundred bytes, not the whole reply.
fn usage_values_rev(json: &[u8]) -> impl Iterator<Item = &[u8]> {
    const KEY: &[u8] = b"\"usage\"";
    let mut end = json.len();
    std::iter::from_fn(move || loop {
        let at = json[..end].iter().rposition(|&b| b == b'"')?;
        end = at;
        if json[at..].starts_with(KEY) {
            if let Some(value) = json[at + KEY.len()..].trim_ascii_start().strip_prefix(b":") {
                return Some(value.trim_ascii_start());
            }
        }
    })
}

/// The last `"usage": {…}` object in a JSON text.
pub(crate) fn tail_usage(tail: &[u8]) -> Option<Usage> {
    usage_values_rev(tail)
        .filter(|v| !v.starts_with(b"null"))
        .find_map(|v| RawUsage::deserialize(&mut serde_json::Deserializer::from_slice(v)).ok())
        .map(|u| u.to_usage())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_found_from_the_end_is_the_last_parsable_one() {
        let t = br#"{"a":"usage","usage":{"prompt_tokens":1},"x":{"usage":null},"usage" : {"prompt_tokens":2,"completion_tokens":3}}"#;
        let u = tail_usage(t).unwrap();
        assert_eq!((u.prompt, u.completion), (Some(2), Some(3)));
        let forward: Vec<&[u8]> = usage_values(t).collect();
        let mut backward: Vec<&[u8]> = usage_values_rev(t).collect();
        backward.reverse();
        assert_eq!(forward, backward);
        // A cut last object: the one before it counts.
        let cut = br#"{"usage":{"prompt_tokens":4},"more":1,"usage":{"prompt_tok"#;
        assert_eq!(tail_usage(cut).unwrap().prompt, Some(4));
        assert!(tail_usage(br#"{"usage":null}"#).is_none());
        assert!(tail_usage(b"").is_none());
    }
}

#[derive(Deserialize)]
pub(super) struct Whole<'a> {
    #[serde(default)]
    #[serde(borrow)]
    pub(super) choices: First<WholeChoice<'a>>,
    #[serde(default)]
    pub(super) usage: Option<RawUsage>,
    #[serde(default)]
    pub(super) output: Vec<OutputItem<'a>>,
    #[serde(borrow, default)]
    pub(super) object: Option<Text<'a>>,
    /// The model that answered.
    #[serde(borrow, default)]
    pub(super) model: Option<Text<'a>>,
}

#[derive(Deserialize)]
pub(super) struct WholeChoice<'a> {
    #[serde(default)]
    pub(super) message: Option<Message>,
    #[serde(default)]
    pub(super) text: Option<String>,
    #[serde(borrow, default)]
    pub(super) finish_reason: Option<Text<'a>>,
}

#[derive(Deserialize)]
pub(super) struct Message {
    #[serde(default)]
    pub(super) content: Option<Content>,
}

#[derive(Deserialize)]
pub(super) struct OutputItem<'a> {
    #[serde(borrow, default)]
    pub(super) content: Vec<OutputContent<'a>>,
}

#[derive(Deserialize)]
pub(super) struct OutputContent<'a> {
    #[serde(rename = "type", borrow, default)]
    pub(super) kind: Cow<'a, str>,
    #[serde(borrow, default)]
    pub(super) text: Option<Cow<'a, str>>,
}

/// `message.content`: a string, or content parts whose `text` strings are joined; anything
/// else reads as empty. Read in one pass, straight into the reply (no `serde_json::Value`).
pub(super) struct Content(String);

impl<'de> Deserialize<'de> for Content {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(TextOf(Shape::Content))
            .map(|t| Content(t.unwrap_or_default()))
    }
}

/// Which text a value gives: message content is a string or an array of parts; a part is an
/// object whose `text` is read as content. Every other shape gives none.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Shape {
    Content,
    Part,
}

/// Reads the text of a value of the given shape.
pub(super) struct TextOf(Shape);

impl<'de> serde::de::DeserializeSeed<'de> for TextOf {
    type Value = Option<String>;

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Option<String>, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> serde::de::Visitor<'de> for TextOf {
    type Value = Option<String>;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("message content")
    }

    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Option<String>, E> {
        Ok((self.0 == Shape::Content).then(|| v.to_owned()))
    }

    fn visit_string<E: serde::de::Error>(self, v: String) -> Result<Option<String>, E> {
        Ok((self.0 == Shape::Content).then_some(v))
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        if self.0 == Shape::Part {
            while seq.next_element::<serde::de::IgnoredAny>()?.is_some() {}
            return Ok(None);
        }
        let mut text = String::new();
        while let Some(part) = seq.next_element_seed(TextOf(Shape::Part))? {
            text.push_str(part.as_deref().unwrap_or_default());
        }
        Ok(Some(text))
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut text = None;
        while let Some(key) = map.next_key::<Cow<'de, str>>()? {
            if self.0 == Shape::Part && key == "text" {
                text = Some(map.next_value::<Content>()?.0);
            } else {
                map.next_value::<serde::de::IgnoredAny>()?;
            }
        }
        Ok(text)
    }

    fn visit_unit<E: serde::de::Error>(self) -> Result<Option<String>, E> {
        Ok(None)
    }

    fn visit_bool<E: serde::de::Error>(self, _: bool) -> Result<Option<String>, E> {
        Ok(None)
    }

    fn visit_i64<E: serde::de::Error>(self, _: i64) -> Result<Option<String>, E> {
        Ok(None)
    }

    fn visit_u64<E: serde::de::Error>(self, _: u64) -> Result<Option<String>, E> {
        Ok(None)
    }

    fn visit_f64<E: serde::de::Error>(self, _: f64) -> Result<Option<String>, E> {
        Ok(None)
    }
}

impl<'a> Whole<'a> {
    /// The first choice's `finish_reason` (only the first choice is read).
    pub(super) fn finish_reason(&mut self) -> Option<Cow<'a, str>> {
        self.choices
            .0
            .as_mut()
            .and_then(|c| c.finish_reason.take())
            .map(|t| t.0)
    }

    pub(super) fn into_reply(self) -> Option<String> {
        if let Some(c) = self.choices.0 {
            if let Some(m) = c.message {
                return Some(m.content.map(|c| c.0).unwrap_or_default());
            }
            if let Some(t) = c.text {
                return Some(t);
            }
        }
        if self.object.as_ref().map(|o| o.0.as_ref()) == Some("response") {
            return Some(
                self.output
                    .iter()
                    .flat_map(|o| &o.content)
                    .filter(|c| c.kind == "output_text")
                    .filter_map(|c| c.text.as_deref())
                    .collect(),
            );
        }
        None
    }
}
