//! Prefix keys: what a request's leading content is, as a few hashes, for cache affinity.
//!
//! A GPU host that served a prompt holds its leading blocks in its KV (prefix) cache; a
//! later prompt that starts the same way skips their prefill. The gateway cannot tokenize,
//! and does not parse the body: it hashes the raw body bytes it already holds (the model
//! scanner read them) at growing boundaries — 512 B, 1 KiB, 2 KiB … 32 KiB. Two requests
//! share key *k* exactly when their bodies share their first 512·2^k bytes, which for a
//! chat means the system prompt and the earlier turns (clients serialize `messages`
//! first, or `model` then `messages`; either way the same for the same client).
//!
//! Byte boundaries alone cannot tell a session from its group: every key of a chat whose
//! system prompt is 10 KB falls inside that prompt. So a body is also keyed at the ends of
//! the last few elements of its top-level arrays — the messages. A follow-up turn carries
//! the previous turn's request as its leading bytes, up to the end of that request's last
//! message, so one of its message keys is the previous turn's last: the lookup (longest
//! first) finds the host that holds the session's history even when its group moved. The
//! model scanner, which walks the body anyway, records those ends ([`MessageEnds`]); a
//! second walk here cost 5 µs on an 8-KiB body full of escapes.
//!
//! The hash is XXH3 with no seed: the same bytes give the same keys on every box, so
//! several gateways in front of the same hosts place the same prefix alike without talking
//! to each other.

use xxhash_rust::xxh3::Xxh3;

/// The first boundary; also the size of the key used for consistent placement.
pub const FIRST_BOUNDARY: usize = 512;
/// Boundaries double up to 512 B · 2^6 = 32 KiB (7 keys).
const BYTE_KEYS: usize = 7;
/// Message ends keyed: the last this many (past the first boundary).
const MESSAGE_KEYS: usize = 6;
pub const MAX_KEYS: usize = BYTE_KEYS + MESSAGE_KEYS;

/// Hashes of a body's leading bytes, shortest first.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PrefixKeys {
    keys: [u64; MAX_KEYS],
    len: u8,
}

impl PrefixKeys {
    /// Keys of `body` (the part of the body at hand), at its byte boundaries and at the
    /// `messages` ends that lie within it. A body shorter than the first boundary is keyed
    /// whole when `complete`; a partial one that short gets no key (its start says too
    /// little to place it by).
    pub fn of(body: &[u8], complete: bool, messages: &MessageEnds) -> PrefixKeys {
        let mut out = PrefixKeys::default();
        if body.is_empty() {
            return out;
        }
        if body.len() < FIRST_BOUNDARY {
            if complete {
                out.keys[0] = xxhash_rust::xxh3::xxh3_64(body);
                out.len = 1;
            }
            return out;
        }
        let mut messages = messages.ascending().filter(|&e| e <= body.len()).peekable();
        let mut hasher = Xxh3::new();
        let mut done = 0;
        let mut power = FIRST_BOUNDARY;
        let mut powers = 0;
        loop {
            // The next boundary of either kind; both lists ascend.
            let next_power = (powers < BYTE_KEYS && power <= body.len()).then_some(power);
            let boundary = match (next_power, messages.peek().copied()) {
                (None, None) => break,
                (Some(p), Some(m)) if m < p => messages.next(),
                (Some(p), Some(m)) if m == p => {
                    messages.next();
                    continue;
                }
                (Some(p), _) => {
                    power *= 2;
                    powers += 1;
                    Some(p)
                }
                (None, Some(_)) => messages.next(),
            };
            let Some(boundary) = boundary else { break };
            hasher.update(&body[done..boundary]);
            out.keys[out.len as usize] = hasher.digest();
            out.len += 1;
            done = boundary;
        }
        out
    }

    /// A key from something other than the body (a session id).
    pub fn of_session(id: &[u8]) -> PrefixKeys {
        let mut out = PrefixKeys::default();
        // Kept apart from body keys: a session id never equals a body prefix's hash.
        out.keys[0] = xxhash_rust::xxh3::xxh3_64_with_seed(id, 0x5e55_1011);
        out.len = 1;
        out
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The key that places a request consistently: its first (shortest) one, which for a
    /// body of 512 B or more is always the 512-B key (message keys start past it).
    pub fn placement(&self) -> Option<u64> {
        (self.len > 0).then_some(self.keys[0])
    }

    /// All keys, shortest first.
    pub fn all(&self) -> &[u64] {
        &self.keys[..self.len as usize]
    }
}

/// Where the last few elements of a body's top-level arrays end (one past their closing
/// bracket), ascending, each past the first boundary: recorded by whoever walks the body's
/// structure, in order.
#[derive(Debug, Clone, Copy, Default)]
pub struct MessageEnds {
    ends: [usize; MESSAGE_KEYS],
    len: u8,
    /// Where the oldest kept end is in `ends` (a ring once full).
    start: u8,
}

impl MessageEnds {
    /// Records the end of an element at body offset `end` (ascending across calls).
    pub fn push(&mut self, end: usize) {
        if end <= FIRST_BOUNDARY {
            return;
        }
        if (self.len as usize) < MESSAGE_KEYS {
            self.ends[self.len as usize] = end;
            self.len += 1;
        } else {
            self.ends[self.start as usize] = end;
            self.start = ((self.start as usize + 1) % MESSAGE_KEYS) as u8;
        }
    }

    /// The kept ends, oldest first.
    fn ascending(&self) -> impl Iterator<Item = usize> + '_ {
        let (newer, older) = self.ends[..self.len as usize].split_at(self.start as usize);
        older.iter().chain(newer).copied()
    }
}

#[cfg(test)]
pub mod tests {
    use super::*;

    /// Test oracle: the message ends of a body, by a plain byte walk (strings and nesting).
    pub fn naive_ends(body: &[u8]) -> MessageEnds {
        let mut out = MessageEnds::default();
        let (mut depth, mut top_array, mut in_string, mut escape) = (0, false, false, false);
        for (i, &b) in body.iter().enumerate() {
            match (in_string, escape, b) {
                (true, true, _) => escape = false,
                (true, false, b'\\') => escape = true,
                (true, false, b'"') => in_string = false,
                (true, false, _) => {}
                (false, _, b'"') => in_string = true,
                (false, _, b'{' | b'[') => {
                    depth += 1;
                    if depth == 2 {
                        top_array = b == b'[';
                    }
                }
                (false, _, b'}' | b']') => {
                    if depth == 3 && top_array {
                        out.push(i + 1);
                    }
                    depth -= 1;
                }
                _ => {}
            }
        }
        out
    }

    /// Keys as the gateway computes them for a whole Content-Length body.
    pub fn keyed(body: &[u8], complete: bool) -> PrefixKeys {
        PrefixKeys::of(body, complete, &naive_ends(body))
    }

    pub fn ends(m: &MessageEnds) -> Vec<usize> {
        m.ascending().collect()
    }

    fn chat(system: &str, turns: &[&str]) -> Vec<u8> {
        let mut messages = vec![serde_json::json!({"role": "system", "content": system})];
        for t in turns {
            messages.push(serde_json::json!({"role": "user", "content": t}));
        }
        serde_json::to_vec(&serde_json::json!({"messages": messages, "model": "m"})).unwrap()
    }

    #[test]
    fn shared_leading_bytes_share_keys() {
        let system = "You are a careful assistant. ".repeat(100);
        let (q1, q2) = ("first question ".repeat(100), "other question ".repeat(100));
        let a = keyed(&chat(&system, &[&q1]), true);
        let b = keyed(&chat(&system, &[&q2]), true);
        assert_eq!(a.placement(), b.placement());
        assert!(a.all().len() >= 3);
        // Keys within the system prompt agree; the last ones (past it) differ.
        let shared = a
            .all()
            .iter()
            .zip(b.all())
            .take_while(|(x, y)| x == y)
            .count();
        assert!(shared >= 2 && shared < a.all().len(), "{shared}");
    }

    #[test]
    fn a_longer_history_keeps_the_keys_of_its_start() {
        let system = "Answer in French. ".repeat(60);
        let turn1 = chat(&system, &["q1"]);
        let mut long = vec!["q1"];
        let filler = "earlier turn ".repeat(300);
        long.push(&filler);
        let turn2 = chat(&system, &long);
        let a = keyed(&turn1, true);
        let b = keyed(&turn2, true);
        assert_eq!(a.all()[0], b.all()[0]);
        assert!(b.all().len() > a.all().len());
    }

    fn conversation(system: &str, turns: &[(&str, &str)]) -> Vec<u8> {
        let mut messages = vec![serde_json::json!({"role": "system", "content": system})];
        for (role, content) in turns {
            messages.push(serde_json::json!({"role": role, "content": content}));
        }
        serde_json::to_vec(&serde_json::json!({"messages": messages, "model": "m", "stream": true}))
            .unwrap()
    }

    /// The longest key two bodies share, as its index in `b`.
    fn longest_shared(a: &PrefixKeys, b: &PrefixKeys) -> Option<usize> {
        b.all().iter().rposition(|k| a.all().contains(k))
    }

    #[test]
    fn a_follow_up_turn_shares_its_previous_turns_whole_prompt() {
        // A 10-KB system prompt: every byte boundary of a turn falls inside it.
        let system = "Quote the \"manual\" exactly. ".repeat(340);
        let q1 = "why ".repeat(30);
        let turn1 = conversation(&system, &[("user", &q1)]);
        let turn2 = conversation(
            &system,
            &[("user", &q1), ("assistant", "because"), ("user", "and?")],
        );
        let other = conversation(&system, &[("user", &"how ".repeat(30))]);
        let (k1, k2, ko) = (
            keyed(&turn1, true),
            keyed(&turn2, true),
            keyed(&other, true),
        );
        // The session's own key (turn 1 up to its last message) is in turn 2, longer than
        // any key it shares with another conversation of its group.
        let own = longest_shared(&k1, &k2).expect("turn 2 shares keys with turn 1");
        let group = longest_shared(&ko, &k2).expect("the group shares keys");
        assert!(own > group, "own {own}, group {group}: {k2:?}");
        assert_eq!(k1.placement(), k2.placement());
        assert_eq!(k1.placement(), ko.placement());
    }

    #[test]
    fn message_ends_are_the_last_few_past_the_first_boundary() {
        let system = "s".repeat(600);
        let turns: Vec<(&str, &str)> = (0..20).map(|_| ("user", "q")).collect();
        let body = conversation(&system, &turns);
        let kept = ends(&naive_ends(&body));
        assert_eq!(kept.len(), MESSAGE_KEYS);
        assert!(kept.windows(2).all(|w| w[0] < w[1]));
        for &e in &kept {
            assert_eq!(body[e - 1], b'}');
            assert!(e > FIRST_BOUNDARY);
        }
        // The last one is the last message's end, just before the array closes.
        assert_eq!(body[*kept.last().unwrap()], b']');
        // Ends past the bytes at hand (a partial body) are not keyed.
        let cut = &body[..kept[2]];
        let partial = PrefixKeys::of(cut, false, &naive_ends(&body));
        let powers = (0..BYTE_KEYS)
            .filter(|k| FIRST_BOUNDARY << k <= cut.len())
            .count();
        assert_eq!(partial.all().len(), powers + 3);
    }

    #[test]
    fn hostile_bodies_are_keyed_without_harm() {
        for body in [
            &br#"{"messages":[{"a":"\"][[[[[[}}}}}}]]]]]"#[..],
            &[b'"'; 2000][..],
            &[b'\\'; 2000][..],
            &[b'{'; 4000][..],
            &[b'}'; 4000][..],
        ] {
            let mut padded = body.to_vec();
            padded.resize(padded.len().max(FIRST_BOUNDARY + 1), b' ');
            let keys = keyed(&padded, false);
            assert!(!keys.is_empty() && keys.all().len() <= MAX_KEYS);
            // An escape as the very last byte of an unterminated string.
            let mut cut = padded.clone();
            cut.extend_from_slice(b"[{\"x\\");
            let _ = keyed(&cut, false);
        }
    }

    #[test]
    fn different_system_prompts_place_apart() {
        let a = keyed(&chat(&"alpha ".repeat(200), &["x"]), true);
        let b = keyed(&chat(&"omega ".repeat(200), &["x"]), true);
        assert_ne!(a.placement(), b.placement());
    }

    #[test]
    fn short_bodies() {
        assert!(keyed(b"", true).is_empty());
        assert!(keyed(b"{\"model\":\"m\"", false).is_empty());
        let whole = keyed(b"{\"model\":\"m\",\"prompt\":\"hi\"}", true);
        assert_eq!(whole.all().len(), 1);
        assert_ne!(
            PrefixKeys::of_session(b"abc").placement(),
            keyed(b"abc", true).placement()
        );
    }

    #[test]
    fn keys_stop_at_the_last_boundary() {
        let body = vec![b'x'; 1 << 20];
        assert_eq!(keyed(&body, false).all().len(), BYTE_KEYS);
        // Deterministic: the same bytes, the same keys (what lets boxes agree).
        assert_eq!(keyed(&body, false), keyed(&body, true));
    }
}
