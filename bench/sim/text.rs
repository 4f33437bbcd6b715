//! Deterministic "model output" for the simulator.
//!
//! Everything here is a pure function of a seed: the seed is an FNV-1a hash of the
//! request's model and prompt/messages (walked as JSON, so key order and whitespace in
//! the body do not matter), which makes the same request produce the same bytes, and a
//! request with `max_tokens = k` produce a prefix of the answer with a larger limit.
//! Tokens are picked from a fixed word list, so they never need JSON escaping.

use serde_json::Value;
use std::io::Write;

/// FNV-1a 64-bit offset basis.
pub const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// The vocabulary. Each word carries its leading space; the first token of an answer
/// drops it. None of these need escaping inside a JSON string.
const WORDS: [&str; 64] = [
    " the",
    " model",
    " answer",
    " is",
    " a",
    " simple",
    " token",
    " stream",
    " of",
    " words",
    " that",
    " GPU",
    " inference",
    " runs",
    " fast",
    " and",
    " cheap",
    " with",
    " every",
    " request",
    " getting",
    " the",
    " same",
    " bytes",
    " back",
    ",",
    ".",
    " gateway",
    " routes",
    " to",
    " backend",
    " hosts",
    " in",
    " order",
    " while",
    " latency",
    " stays",
    " low",
    " under",
    " load",
    " because",
    " io_uring",
    " batches",
    " syscalls",
    " so",
    " each",
    " core",
    " serves",
    " many",
    " clients",
    " at",
    " once",
    " without",
    " locks",
    " or",
    " copies",
    " on",
    " hot",
    " path",
    " for",
    " real",
    " users",
    " today",
    " again",
];

/// Feeds `bytes` into an FNV-1a hash state `h`.
pub fn fnv1a(mut h: u64, bytes: &[u8]) -> u64 {
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(FNV_PRIME);
    }
    h
}

/// SplitMix64 finaliser: spreads a counter or hash into well-mixed bits.
pub fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// Hashes a JSON value structurally (object keys are sorted by serde_json's map).
pub fn hash_value(mut h: u64, v: &Value) -> u64 {
    match v {
        Value::Null => fnv1a(h, b"n"),
        Value::Bool(b) => fnv1a(h, if *b { b"t" } else { b"f" }),
        Value::Number(n) => {
            h = fnv1a(h, b"#");
            if let Some(i) = n.as_i64() {
                fnv1a(h, &i.to_le_bytes())
            } else if let Some(u) = n.as_u64() {
                fnv1a(h, &u.to_le_bytes())
            } else {
                fnv1a(h, &n.as_f64().unwrap_or(0.0).to_bits().to_le_bytes())
            }
        }
        Value::String(s) => {
            h = fnv1a(h, b"s");
            h = fnv1a(h, &(s.len() as u64).to_le_bytes());
            fnv1a(h, s.as_bytes())
        }
        Value::Array(a) => {
            h = fnv1a(h, b"[");
            for x in a {
                h = hash_value(h, x);
            }
            fnv1a(h, b"]")
        }
        Value::Object(m) => {
            h = fnv1a(h, b"{");
            for (k, x) in m {
                h = fnv1a(h, k.as_bytes());
                h = fnv1a(h, b":");
                h = hash_value(h, x);
            }
            fnv1a(h, b"}")
        }
    }
}

/// The seed of an answer: the model name and the prompt (or messages, or input).
pub fn seed(model: &str, prompt: Option<&Value>) -> u64 {
    let h = fnv1a(FNV_OFFSET, model.as_bytes());
    match prompt {
        Some(v) => hash_value(h, v),
        None => h,
    }
}

/// Token `i` of the answer with seed `seed`.
pub fn token(seed: u64, i: usize) -> &'static str {
    let w = WORDS[(mix(seed ^ (i as u64).wrapping_mul(0x9e37_79b9)) % WORDS.len() as u64) as usize];
    if i == 0 {
        w.strip_prefix(' ').unwrap_or(w)
    } else {
        w
    }
}

/// The whole answer of `n` tokens.
pub fn text(seed: u64, n: usize) -> String {
    let mut s = String::with_capacity(n * 7);
    for i in 0..n {
        s.push_str(token(seed, i));
    }
    s
}

/// A 32-hex-digit id (like vLLM's uuid4().hex), derived from the seed.
pub fn hex_id(seed: u64) -> String {
    format!(
        "{:016x}{:016x}",
        mix(seed),
        mix(seed ^ 0x5555_5555_5555_5555)
    )
}

/// A fixed, seed-derived "created" unix timestamp (within 2025-01-01), not wall-clock.
pub fn created(seed: u64) -> u64 {
    1_735_689_600 + mix(seed ^ 0xc4ea_7ed0) % 86_400
}

/// Appends Ollama's `created_at` for line `i` of an answer (without quotes):
/// deterministic, increasing with `i`.
pub fn created_at(seed: u64, i: usize, out: &mut Vec<u8>) {
    let s = created(seed) - 1_735_689_600;
    let _ = write!(
        out,
        "2025-01-01T{:02}:{:02}:{:02}.{:09}Z",
        s / 3600,
        (s / 60) % 60,
        s % 60,
        (i % 1_000_000) * 1000
    );
}

/// Appends `t` as an RFC 3339 UTC timestamp with nanoseconds (Go's `time.RFC3339Nano`
/// shape, as Ollama writes them).
pub fn rfc3339(t: std::time::SystemTime, out: &mut Vec<u8>) {
    let t = time::OffsetDateTime::from(t);
    let _ = write!(
        out,
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:09}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        t.nanosecond()
    );
}

/// Appends a deterministic unit-length embedding of `dim` floats as a JSON array.
pub fn embedding(seed: u64, dim: usize, out: &mut Vec<u8>) {
    let mut norm = 0.0f64;
    for i in 0..dim {
        let x = unit(seed, i);
        norm += x * x;
    }
    let norm = if norm > 0.0 { norm.sqrt() } else { 1.0 };
    out.push(b'[');
    for i in 0..dim {
        if i > 0 {
            out.push(b',');
        }
        let x = (unit(seed, i) / norm) as f32;
        let _ = write!(out, "{x}");
    }
    out.push(b']');
}

/// A value in [-1, 1) for component `i`.
fn unit(seed: u64, i: usize) -> f64 {
    let bits = mix(seed
        .wrapping_add(i as u64)
        .wrapping_mul(0x2545_f491_4f6c_dd1d))
        >> 11;
    (bits as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
}

/// A 64-hex-digit sha256-looking digest for a model name.
pub fn digest(name: &str) -> String {
    let h = fnv1a(FNV_OFFSET, name.as_bytes());
    format!(
        "{:016x}{:016x}{:016x}{:016x}",
        mix(h),
        mix(h ^ 1),
        mix(h ^ 2),
        mix(h ^ 3)
    )
}

/// JSON string literal (with quotes) for `s`.
pub fn json_str(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_deterministic_and_prefix_stable() {
        let v: Value = serde_json::json!([{"role": "user", "content": "hello there"}]);
        let s1 = seed("m", Some(&v));
        let s2 = seed("m", Some(&v.clone()));
        assert_eq!(s1, s2);
        assert_eq!(text(s1, 16), text(s2, 16));
        assert!(text(s1, 16).starts_with(&text(s1, 5)));
        assert!(!text(s1, 1).starts_with(' '));
        assert_ne!(seed("m", Some(&v)), seed("other", Some(&v)));
    }

    #[test]
    fn words_need_no_escaping() {
        for w in WORDS {
            assert_eq!(json_str(w), format!("\"{w}\""));
        }
    }

    #[test]
    fn embedding_is_unit_length_and_deterministic() {
        let mut a = Vec::new();
        let mut b = Vec::new();
        embedding(42, 8, &mut a);
        embedding(42, 8, &mut b);
        assert_eq!(a, b);
        let v: Vec<f64> = serde_json::from_slice(&a).expect("valid JSON array");
        assert_eq!(v.len(), 8);
        let n: f64 = v.iter().map(|x| x * x).sum();
        assert!((n - 1.0).abs() < 1e-3, "norm {n}");
    }

    #[test]
    fn rfc3339_shape() {
        let mut s = Vec::new();
        let t = std::time::UNIX_EPOCH + std::time::Duration::new(1_735_689_661, 5);
        rfc3339(t, &mut s);
        assert_eq!(s, b"2025-01-01T00:01:01.000000005Z");
    }

    #[test]
    fn created_at_shape() {
        let mut s = Vec::new();
        created_at(7, 3, &mut s);
        assert_eq!(s.len(), "2025-01-01T00:00:00.000000000Z".len());
        assert!(s.ends_with(b"000003000Z"));
    }
}
