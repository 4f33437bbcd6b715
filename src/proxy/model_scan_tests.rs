//! Tests of the model scanner: the model, the disguises it refuses, and what else it
//! records on the way (`stream`, `stream_options`, `max_tokens`).

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
            let k = ["messages", "stream", "options", "prompt", "user"][rnd(5) as usize];
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
        let user = obj.get("user").and_then(|u| u.as_str());
        assert_eq!(
            s.user().is_some(),
            user.is_some_and(|u| !u.is_empty()),
            "{}",
            String::from_utf8_lossy(&body)
        );
    }
}

#[test]
fn escapes_inside_other_values_are_fine() {
    let (m, _) = scan(br#"{"prompt":"a\\\"}","model":"m"}"#, 1).unwrap();
    assert_eq!(m.as_deref(), Some("m"));
}

fn user_of(body: &[u8], step: usize) -> Option<u64> {
    let mut s = ModelScanner::new();
    for piece in body.chunks(step) {
        s.feed(piece).unwrap();
    }
    s.user()
}

#[test]
fn finds_the_top_level_user_however_the_body_is_split() {
    let body = br#"{"messages":[{"role":"user","content":"hi","user":"inner"}],"model":"m","user":"alice \"A\" smith"}"#;
    let whole = user_of(body, body.len()).expect("a user");
    for step in 1..body.len() {
        assert_eq!(user_of(body, step), Some(whole), "pieces of {step}");
    }
    // The same id anywhere at top level hashes alike; another id does not; the nested
    // "user" (a role, a message's field) is not the end user.
    assert_eq!(
        user_of(br#"{"user":"alice \"A\" smith","model":"m"}"#, 3),
        Some(whole)
    );
    assert_ne!(
        user_of(br#"{"user":"alice \"A\" smitH","model":"m"}"#, 3),
        Some(whole)
    );
    let nested = br#"{"messages":[{"role":"user","user":"inner"}],"model":"m"}"#;
    assert_eq!(user_of(nested, 1), None);
}

#[test]
fn a_user_that_is_no_string_or_empty_is_none() {
    for body in [
        &br#"{"user":null,"model":"m"}"#[..],
        br#"{"user":42,"model":"m"}"#,
        br#"{"user":{"id":"x"},"model":"m"}"#,
        br#"{"user":["x"],"model":"m"}"#,
        br#"{"user":"","model":"m"}"#,
        br#"{"model":"m","user" : "" }"#,
    ] {
        assert_eq!(user_of(body, 1), None, "{}", String::from_utf8_lossy(body));
    }
    // A key that only starts like it is another key.
    assert_eq!(user_of(br#"{"username":"x","model":"m"}"#, 1), None);
    assert!(user_of(br#"{"model":"m", "user" :"x"}"#, 1).is_some());
}
