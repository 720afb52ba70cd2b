//! The one SSE reader: every split of a stream gives the same events, each byte belongs to one
//! event, and every observer reads the same payload.

use super::*;

/// (name, data, tail, comment, start, end) of each event, feeding `chunks` in turn.
type Seen = Vec<(Option<String>, Option<String>, bool, bool, u64, u64)>;

fn events(chunks: &[&[u8]]) -> Seen {
    let mut r = Reader::new(0);
    let mut out = Seen::new();
    let mut push = |ev: Event<'_>| {
        let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        out.push((
            ev.name.map(text),
            ev.data.map(text),
            ev.tail.is_some(),
            ev.comment,
            ev.start,
            ev.end,
        ));
        Flow::Continue
    };
    for c in chunks {
        r.feed(c, &mut push);
    }
    r.finish(&mut push);
    out
}

/// The events of `body`, the same for every split into two chunks and byte by byte.
fn split_everywhere(body: &str) -> Seen {
    let b = body.as_bytes();
    let whole = events(&[b]);
    for i in 0..=b.len() {
        assert_eq!(events(&[&b[..i], &b[i..]]), whole, "split at {i}: {body:?}");
    }
    let bytes: Vec<&[u8]> = b.chunks(1).collect();
    assert_eq!(events(&bytes), whole, "byte by byte: {body:?}");
    // Every byte belongs to one event, in order.
    let mut at = 0;
    for e in &whole {
        assert_eq!(e.4, at, "{body:?}: {whole:?}");
        at = e.5;
    }
    assert_eq!(at, b.len() as u64, "{body:?}: {whole:?}");
    whole
}

fn data(s: &str) -> Option<String> {
    Some(s.to_string())
}

#[test]
fn events_end_at_blank_lines_of_any_style() {
    for body in [
        "data: a\n\ndata: b\n\n",
        "data: a\r\n\r\ndata: b\r\n\r\n",
        "data: a\r\rdata: b\r\r",
    ] {
        let got = split_everywhere(body);
        assert_eq!(got.len(), 2, "{body:?}");
        assert_eq!(got[0].1, data("a"));
        assert_eq!(got[1].1, data("b"));
    }
}

#[test]
fn names_comments_and_several_data_lines() {
    let got = split_everywhere(": ping\n\nevent: error\ndata: {\"message\":\ndata: \"x\"}\n\n");
    assert_eq!(got[0], (None, None, false, true, 0, 8));
    assert_eq!(got[1].0.as_deref(), Some("error"));
    // `data:` lines join with a newline; only one leading space goes.
    assert_eq!(got[1].1, data("{\"message\":\n\"x\"}"));
}

#[test]
fn single_newline_events_end_at_the_next_data_line() {
    let got = split_everywhere("data: {\"a\":1}\ndata: {\"b\":2}\ndata: [DONE]\n");
    let datas: Vec<_> = got.iter().map(|e| e.1.clone()).collect();
    assert_eq!(
        datas,
        [data("{\"a\":1}"), data("{\"b\":2}"), data("[DONE]")]
    );
    // A payload that is not whole yet keeps the next data line.
    let got = split_everywhere("data: {\"a\":\ndata: 1}\n\n");
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].1, data("{\"a\":\n1}"));
}

#[test]
fn a_line_too_long_keeps_its_ends() {
    let big = "x".repeat(100_000);
    let body = format!("data: {{\"choices\":[{{\"delta\":{{\"content\":\"{big}\"}},\"finish_reason\":\"length\"}}]}}\n\ndata: [DONE]\n\n");
    let mut r = Reader::new(1024);
    let mut seen = Vec::new();
    for c in body.as_bytes().chunks(777) {
        r.feed(c, &mut |ev| {
            let p = ev.payload();
            seen.push((ev.tail.is_some(), p.done, p.choices.finished != 0));
            Flow::Continue
        });
        assert!(r.line.len() <= 8192 && r.line_tail.as_ref().is_none_or(|t| t.len() <= 2 * EDGE));
    }
    assert_eq!(seen, [(true, false, true), (false, true, false)]);
}

#[test]
fn a_stop_ends_the_chunk_where_the_event_ends() {
    let mut r = Reader::new(0);
    let mut ends = Vec::new();
    let flow = r.feed(b"data: a\n\ndata: [DONE]\n\ndata: after\n\n", &mut |ev| {
        ends.push(ev.end);
        if ev.payload().done {
            Flow::Stop
        } else {
            Flow::Continue
        }
    });
    assert_eq!(flow, Flow::Stop);
    assert_eq!(ends, [9, 23]);
    assert_eq!(r.position(), 23);
}

#[test]
fn payloads_say_what_every_observer_needs() {
    let p = Payload::read(br#"{"id":"c1","model":"m","choices":[{"index":0,"delta":{"role":"assistant","content":"Hi"},"finish_reason":null},{"index":2,"delta":{"tool_calls":[{}]},"finish_reason":"tool_calls","logprobs":{"content":[]}}]}"#);
    assert_eq!(p.text(), Some("Hi"));
    let c = &p.choices;
    assert!(c.present && !c.empty && c.tools && c.logprobs);
    assert_eq!((c.carried, c.finished), (0b101, 0b100));
    assert_eq!(c.finish_reason.as_deref(), Some("tool_calls"));
    assert!(c.first.as_ref().is_some_and(|f| f.role));
    assert_eq!(p.named_model(), Some("m"));
    // Usage-only, in both shapes.
    assert!(Payload::read(br#"{"choices":[],"usage":{"total_tokens":3}}"#).usage_only());
    assert!(Payload::read(br#"{"choices":[{"index":0,"delta":{},"finish_reason":null}],"usage":{"prompt_tokens":1,"completion_tokens":2}}"#).usage_only());
    assert!(!Payload::read(
        br#"{"choices":[{"index":0,"delta":{"content":"x"}}],"usage":{"total_tokens":3}}"#
    )
    .usage_only());
    assert!(!Payload::read(br#"{"choices":[],"usage":null}"#).usage_only());
    // Errors and Responses events.
    assert!(Payload::read(br#"{"error":{"message":"overloaded"}}"#).is_error());
    assert!(!Payload::read(br#"{"error":null,"choices":[]}"#).is_error());
    assert!(Payload::read(br#"{"type":"error","message":"x"}"#).is_error());
    let p = Payload::read(br#"{"type":"response.output_text.delta","delta":"Hel"}"#);
    assert_eq!(p.text(), Some("Hel"));
    let p = Payload::read(br#"{"type":"response.completed","response":{"id":"r1","usage":{"input_tokens":2,"output_tokens":3},"output":[]}}"#);
    assert_eq!(p.reported_usage().and_then(|u| u.total), Some(5));
    assert!(Payload::read(b" [DONE] ").done);
    assert!(!Payload::read(b"not json").object);
    // A weird index is read and set aside, never a failure.
    let p = Payload::read(br#"{"choices":[{"index":"0","delta":{"content":"a"}}]}"#);
    assert_eq!(p.text(), Some("a"));
}

#[test]
fn an_error_event_is_an_error_to_every_reader() {
    // `event: error` with a payload that has no `error` key: the name says it.
    let body = "event: error\ndata: {\"message\":\"the model is overloaded\"}\n\n";
    let mut r = Reader::new(0);
    let mut found = None;
    r.feed(body.as_bytes(), &mut |ev| {
        let p = ev.payload();
        found = Some((ev.is_error(&p), ev.error_message(&p)));
        Flow::Continue
    });
    assert_eq!(found, Some((true, "the model is overloaded".to_string())));
}

/// Usage stays hidden in every shape (see the observability guide, "Models and token usage
/// (0.2)"), and nothing else is taken for it.
#[test]
fn usage_only_chunks_in_every_shape() {
    let only = |data: &str| {
        let body = format!("data: {data}\n\n");
        let mut r = Reader::new(0);
        let mut got = None;
        r.feed(body.as_bytes(), &mut |ev| {
            got = Some(ev.payload().usage_only());
            Flow::Continue
        });
        got.unwrap()
    };
    let t = r#""usage":{"total_tokens":1}"#;
    assert!(only(&format!(r#"{{"id":"x","choices":[],{t}}}"#)));
    assert!(!only(r#"{"choices":[],"usage":null}"#));
    assert!(only(&format!("{{\"choices\" : [ \t ],{t}}}")));
    // One choice with an empty delta and a null finish_reason (LiteLLM's shape).
    assert!(only(&format!(
        r#"{{"choices":[{{"index":0,"delta":{{}},"finish_reason":null}}],{t}}}"#
    )));
    assert!(only(&format!(
        r#"{{"choices":[{{"delta":{{"content":null,"role":null}}}}],{t}}}"#
    )));
    // A choice that says something keeps the chunk.
    for data in [
        r#"{"choices":[{"delta":{"content":"\"choices\":[]"}}],"usage":null}"#.to_string(),
        format!(r#"{{"choices":[{{"delta":{{"tool_calls":[{{"id":null}}]}}}}],{t}}}"#),
        format!(r#"{{"choices":[{{"delta":{{}}}},{{"delta":{{"content":"x"}}}}],{t}}}"#),
        format!(r#"{{"choices":[{{"delta":"x"}}],{t}}}"#),
        format!(r#"{{"choices":{{}},{t}}}"#),
        format!(r#"{{"choices":null,{t}}}"#),
        format!(r#"{{"choices":[{{"delta":{{}},"finish_reason":"stop"}}],{t}}}"#),
        format!(r#"{{"choices":[{{"delta":{{"content":"x"}}}}],{t}}}"#),
        format!(r#"{{"choices":[{{"text":"x","finish_reason":null}}],{t}}}"#),
    ] {
        assert!(!only(&data), "{data}");
    }
    // A JSON object split over two `data:` lines.
    let body = format!("data: {{\"choices\":\ndata: [],{t}}}\n\n");
    let mut r = Reader::new(0);
    let mut got = false;
    r.feed(body.as_bytes(), &mut |ev| {
        got = ev.payload().usage_only();
        Flow::Continue
    });
    assert!(got);
}
