//! What a request's prompt is to the simulated GPU: a deterministic sequence of token ids.
//!
//! The rule (simple enough that a benchmark can build prompts of an exact length and an
//! exact shared prefix):
//! - text is split on ASCII whitespace; each word is one token, whatever its length (the
//!   count the simulator always gave: a 300 KB word is still one token, so answers and
//!   the context-length check stay what existing clients and tests expect). A token's id
//!   is a hash of its bytes;
//! - chat messages are concatenated in order the way a chat template (Llama 3's) renders
//!   them: `<|start_header_id|>` role `<|end_header_id|>` content… `<|eot_id|>`, i.e. four
//!   template tokens per message plus its content's words; content may be a string or an
//!   array of `{"type":"text","text":…}` parts;
//! - a completions prompt is its text (or its token ids, when given as numbers); an array
//!   of prompts is their concatenation; Ollama's chat and generate are read alike.
//!
//! `usage.prompt_tokens` and Ollama's `prompt_eval_count` are the length of this sequence
//! (at least 1), so the counts and the prefix cache always agree.

use super::text::{fnv1a, FNV_OFFSET};
use serde_json::Value;

// Template tokens, outside the range word hashes are folded into.
const HEADER_START: u32 = 128_000;
const HEADER_END: u32 = 128_001;
const TURN_END: u32 = 128_002;
/// Word ids are folded below the template tokens.
const VOCABULARY: u64 = 128_000;

/// The prompt's token ids.
pub fn tokens(v: &Value) -> Vec<u32> {
    let mut out = Vec::new();
    walk(v, &mut |t| out.push(t));
    out
}

/// How many tokens the prompt has (the length of [`tokens`], without allocating).
pub fn count(v: &Value) -> usize {
    let mut n = 0;
    walk(v, &mut |_| n += 1);
    n
}

fn walk(v: &Value, emit: &mut impl FnMut(u32)) {
    match v {
        Value::String(s) => words(s, emit),
        Value::Number(n) => emit(n.as_u64().map_or(0, |id| id as u32)),
        Value::Array(items) => items.iter().for_each(|x| walk(x, emit)),
        Value::Object(m) => {
            let role = m.get("role");
            if let Some(role) = role {
                emit(HEADER_START);
                emit(word_id(role.as_str().unwrap_or("").as_bytes()));
                emit(HEADER_END);
            }
            for key in ["content", "text"] {
                if let Some(x) = m.get(key) {
                    walk(x, emit);
                }
            }
            if role.is_some() {
                emit(TURN_END);
            }
        }
        _ => {}
    }
}

fn words(s: &str, emit: &mut impl FnMut(u32)) {
    for word in s.split_ascii_whitespace() {
        emit(word_id(word.as_bytes()));
    }
}

fn word_id(bytes: &[u8]) -> u32 {
    (fnv1a(FNV_OFFSET, bytes) % VOCABULARY) as u32
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn chat_messages_cost_their_words_and_four_template_tokens() {
        let v = json!([
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "one two three"}]}
        ]);
        assert_eq!(count(&v), 4 + 2 + 4 + 3);
        assert_eq!(tokens(&v).len(), count(&v));
        assert_eq!(count(&Value::from("a b  c")), 3);
        assert_eq!(count(&json!([1, 2, 3])), 3);
        assert_eq!(tokens(&json!([7, 8])), vec![7, 8]);
    }

    #[test]
    fn a_word_is_one_token_whatever_its_length() {
        assert_eq!(count(&Value::from("x".repeat(300 * 1024))), 1);
        assert_ne!(tokens(&Value::from("ab")), tokens(&Value::from("abc")));
    }

    #[test]
    fn a_shared_prefix_gives_shared_leading_tokens() {
        let a = tokens(&json!([{"role": "system", "content": "you are helpful"},
                                {"role": "user", "content": "first question"}]));
        let b = tokens(&json!([{"role": "system", "content": "you are helpful"},
                                {"role": "user", "content": "second one"}]));
        // The system message (4 + 3 tokens) and the user header (3) agree.
        assert_eq!(a[..10], b[..10]);
        assert_ne!(a[10..], b[10..]);
        // Whitespace does not matter, words do.
        assert_eq!(
            tokens(&Value::from("a  b\nc")),
            tokens(&Value::from("a b c"))
        );
        assert_ne!(tokens(&Value::from("a b c")), tokens(&Value::from("a b d")));
    }
}
