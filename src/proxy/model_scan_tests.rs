//! Tests of the model scanner: the model, the disguises it refuses, and what else it
//! records on the way (message ends, `stream`, `max_tokens`).

use super::*;

fn scan(body: &[u8], step: usize) -> Result<(Option<String>, bool), ScanError> {
    let mut s = ModelScanner::new();
    for piece in body.chunks(step) {
        s.feed(piece)?;
    }
    Ok((s.model().map(str::to_string), s.finished()))
}

#[test]
fn finds_model_anywhere_at_top_level() {
    let body = br#" {"messages":[{"role":"user","content":"say \"model\": {\"x\"}","model":"inner"}],"stream":true,"model":"llama3.2:1b","n":1}"#;
    for step in 1..body.len() {
        let (m, done) = scan(body, step).unwrap();
        assert_eq!(m.as_deref(), Some("llama3.2:1b"));
        assert!(done);
    }
}

#[test]
fn nested_model_keys_do_not_count() {
    let (m, done) = scan(br#"{"options":{"model":"x"},"modelx":"y","mode":"z"}"#, 3).unwrap();
    assert_eq!(m, None);
    assert!(done);
}

#[test]
fn refuses_disguises() {
    let bad: &[(&[u8], ScanError)] = &[
        (br#"{"model":"a","model":"b"}"#, ScanError::Duplicate),
        (br#"{"model":"a","MODEL":"b"}"#, ScanError::Duplicate),
        (br#"{"Model":"a","model":"b"}"#, ScanError::Duplicate),
        (b"{\"model\":\"\xff\"}", ScanError::NotUtf8),
        (br#"{"model":"a","mod\u0065l":"b"}"#, ScanError::EscapedKey),
        (br#"{"model":"a\"b"}"#, ScanError::Escaped),
        (br#"{"model":5}"#, ScanError::NotAString),
        (br#"{"model":{"a":1}}"#, ScanError::NotAString),
        (br#"["model","a"]"#, ScanError::NotAnObject),
        (br#"{"model":"a"} {"model":"b"}"#, ScanError::TrailingData),
    ];
    for (body, want) in bad {
        assert_eq!(
            scan(body, 1).unwrap_err(),
            *want,
            "{}",
            String::from_utf8_lossy(body)
        );
    }
    let long = format!(r#"{{"model":"{}"}}"#, "a".repeat(300));
    assert_eq!(scan(long.as_bytes(), 7).unwrap_err(), ScanError::TooLong);
    let deep = format!(r#"{{"a":{}"#, "[".repeat(600));
    assert_eq!(scan(deep.as_bytes(), 64).unwrap_err(), ScanError::TooDeep);
}

/// Differential: random JSON objects serialized by serde_json, split at random points;
/// the scanner must agree with a full parse about the top-level "model".
#[test]
fn agrees_with_a_full_parser() {
    let mut seed: u64 = 0x2545F4914F6CDD1D;
    let mut rnd = move |n: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    };
    fn value(rnd: &mut impl FnMut(u64) -> u64, depth: u32) -> serde_json::Value {
        use serde_json::Value;
        let texts = ["model", "a\"b", "\\", "{\"model\":1}", "ü", "", "[\"x\"]"];
        match if depth > 3 { rnd(4) } else { rnd(6) } {
            0 => Value::Null,
            1 => Value::from(rnd(1000) as i64 - 500),
            2 => Value::from(texts[rnd(texts.len() as u64) as usize]),
            3 => Value::Bool(rnd(2) == 0),
            4 => Value::Array((0..rnd(4)).map(|_| value(rnd, depth + 1)).collect()),
            _ => {
                let mut m = serde_json::Map::new();
                for _ in 0..rnd(4) {
                    let k = texts[rnd(texts.len() as u64) as usize];
                    m.insert(k.to_string(), value(rnd, depth + 1));
                }
                Value::Object(m)
            }
        }
    }
    for _ in 0..2000 {
        let mut obj = serde_json::Map::new();
        for _ in 0..rnd(5) {
            let k = ["messages", "stream", "options", "prompt"][rnd(4) as usize];
            obj.insert(k.to_string(), value(&mut rnd, 0));
        }
        if rnd(4) > 0 {
            let models = ["llama3.2:1b", "meta-llama/Llama-3.1-8B-Instruct", "x"];
            obj.insert("model".into(), models[rnd(3) as usize].into());
        }
        let body = serde_json::to_vec(&serde_json::Value::Object(obj.clone())).unwrap();
        let mut s = ModelScanner::new();
        let mut at = 0;
        while at < body.len() {
            let step = 1 + rnd(body.len() as u64) as usize;
            let end = (at + step).min(body.len());
            s.feed(&body[at..end]).unwrap();
            at = end;
        }
        assert!(s.finished());
        assert_eq!(
            s.model(),
            obj.get("model").and_then(|m| m.as_str()),
            "{}",
            String::from_utf8_lossy(&body)
        );
    }
}

/// The message ends recorded while scanning, fed in random pieces, are those of a plain
/// byte walk over the whole body.
#[test]
fn records_message_ends_as_a_plain_walk_does() {
    use crate::fleet::prefix::tests::{ends, naive_ends};
    let mut seed: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut rnd = move |n: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    };
    let texts = [
        "plain words ",
        "a \"quoted\" }] word ",
        "\\ back ",
        "ü [{",
        "\n",
    ];
    let mut recorded = 0;
    for _ in 0..300 {
        let messages: Vec<serde_json::Value> = (0..1 + rnd(12))
            .map(|_| {
                let content: String = (0..rnd(60))
                    .map(|_| texts[rnd(texts.len() as u64) as usize])
                    .collect();
                serde_json::json!({"role": "user", "content": content, "n": [1, {"x": []}]})
            })
            .collect();
        let tools = serde_json::json!([{"type": "function"}, "t"]);
        let body = serde_json::to_vec(&serde_json::json!(
            {"model": "m", "messages": messages, "tools": tools, "options": {"a": [1]}}
        ))
        .unwrap();
        let mut s = ModelScanner::new();
        let mut at = 0;
        while at < body.len() {
            let end = (at + 1 + rnd(700) as usize).min(body.len());
            s.feed(&body[at..end]).unwrap();
            at = end;
        }
        assert_eq!(
            ends(s.message_ends()),
            ends(&naive_ends(&body)),
            "{}",
            String::from_utf8_lossy(&body)
        );
        recorded += ends(s.message_ends()).len();
    }
    assert!(recorded > 500, "too few ends to compare: {recorded}");
}

#[test]
fn sees_max_tokens() {
    for (body, want) in [
        (&br#"{"model":"m","max_tokens":512}"#[..], Some(512)),
        (br#"{"max_completion_tokens" : 77 ,"model":"m"}"#, Some(77)),
        (br#"{"model":"m","max_tokens":null}"#, None),
        (
            br#"{"model":"m","max_tokens":99999999999999999999999}"#,
            None,
        ),
        (br#"{"model":"m","options":{"max_tokens":5}}"#, None),
    ] {
        for step in 1..body.len() {
            let mut s = ModelScanner::new();
            for piece in body.chunks(step) {
                s.feed(piece).unwrap();
            }
            assert_eq!(s.max_tokens(), want, "{}", String::from_utf8_lossy(body));
        }
    }
}

#[test]
fn sees_stream_and_stream_options() {
    let cases: [(&[u8], bool, bool); 7] = [
        (br#"{"model":"m","stream":true}"#, true, false),
        (br#" {"stream" : true,"model":"m"}"#, true, false),
        (br#"{"model":"m","stream":false}"#, false, false),
        (br#"{"model":"m","stream":"true"}"#, false, false),
        (
            br#"{"model":"m","x":{"stream":true},"streamx":true}"#,
            false,
            false,
        ),
        (
            br#"{"stream":true,"stream_options":{"include_usage":false},"model":"m"}"#,
            true,
            true,
        ),
        (
            br#"{"model":"m","messages":[{"stream_options":1}],"Stream":true}"#,
            false,
            false,
        ),
    ];
    for (body, stream, options) in cases {
        for step in 1..body.len() {
            let mut s = ModelScanner::new();
            for piece in body.chunks(step) {
                s.feed(piece).unwrap();
            }
            let what = String::from_utf8_lossy(body);
            assert_eq!(s.stream(), stream, "{what}");
            assert_eq!(s.has_stream_options(), options, "{what}");
            assert_eq!(body[s.open_at()], b'{', "{what}");
        }
    }
}

#[test]
fn escapes_inside_other_values_are_fine() {
    let (m, _) = scan(br#"{"prompt":"a\\\"}","model":"m"}"#, 1).unwrap();
    assert_eq!(m.as_deref(), Some("m"));
}
