//! The OpenAI wire shapes a capture reads: SSE events (Chat Completions and Responses API),
//! whole JSON replies, message content in its string and content-part forms, and `usage` (found
//! by key, also in a cut reply's tail).

use std::borrow::Cow;

use serde::Deserialize;

pub(super) use crate::sse::scan::RawUsage;

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
