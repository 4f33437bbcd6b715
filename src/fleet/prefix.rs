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
//! The hash is XXH3 with no seed: the same bytes give the same keys on every box, so
//! several gateways in front of the same hosts place the same prefix alike without talking
//! to each other.

use xxhash_rust::xxh3::Xxh3;

/// The first boundary; also the size of the key used for consistent placement.
pub const FIRST_BOUNDARY: usize = 512;
/// Boundaries double up to this many bytes (7 keys).
pub const MAX_KEYS: usize = 7;

/// Hashes of a body's leading bytes, shortest first.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PrefixKeys {
    keys: [u64; MAX_KEYS],
    len: u8,
}

impl PrefixKeys {
    /// Keys of `body` (the part of the body at hand). A body shorter than the first
    /// boundary is keyed whole when `complete`; a partial one that short gets no key
    /// (its start says too little to place it by).
    pub fn of(body: &[u8], complete: bool) -> PrefixKeys {
        let mut out = PrefixKeys::default();
        if body.is_empty() {
            return out;
        }
        if body.len() < FIRST_BOUNDARY {
            if complete {
                return PrefixKeys::single(xxhash_rust::xxh3::xxh3_64(body));
            }
            return out;
        }
        let mut hasher = Xxh3::new();
        let mut done = 0;
        let mut boundary = FIRST_BOUNDARY;
        while boundary <= body.len() && (out.len as usize) < MAX_KEYS {
            hasher.update(&body[done..boundary]);
            out.keys[out.len as usize] = hasher.digest();
            out.len += 1;
            done = boundary;
            boundary *= 2;
        }
        out
    }

    /// A key from something other than the body (a session id).
    pub fn of_session(id: &[u8]) -> PrefixKeys {
        // Kept apart from body keys: a session id never equals a body prefix's hash.
        PrefixKeys::single(xxhash_rust::xxh3::xxh3_64_with_seed(id, 0x5e55_1011))
    }

    /// A key from the hash of an end user's id (the body's `"user"`).
    pub fn of_user(id_hash: u64) -> PrefixKeys {
        // Mixed with a seed of its own: a user id never equals a session id's key or a
        // body prefix's hash.
        PrefixKeys::single(xxhash_rust::xxh3::xxh3_64_with_seed(
            &id_hash.to_le_bytes(),
            0x05e2_1d00,
        ))
    }

    /// Just one key: what places the request, with no longer prefix behind it.
    fn single(key: u64) -> PrefixKeys {
        let mut out = PrefixKeys::default();
        out.keys[0] = key;
        out.len = 1;
        out
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The key that places a request consistently: its first (shortest) one.
    pub fn placement(&self) -> Option<u64> {
        (self.len > 0).then_some(self.keys[0])
    }

    /// All keys, shortest first.
    pub fn all(&self) -> &[u64] {
        &self.keys[..self.len as usize]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let a = PrefixKeys::of(&chat(&system, &[&q1]), true);
        let b = PrefixKeys::of(&chat(&system, &[&q2]), true);
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
        let a = PrefixKeys::of(&turn1, true);
        let b = PrefixKeys::of(&turn2, true);
        assert_eq!(a.all()[0], b.all()[0]);
        assert!(b.all().len() > a.all().len());
    }

    #[test]
    fn different_system_prompts_place_apart() {
        let a = PrefixKeys::of(&chat(&"alpha ".repeat(200), &["x"]), true);
        let b = PrefixKeys::of(&chat(&"omega ".repeat(200), &["x"]), true);
        assert_ne!(a.placement(), b.placement());
    }

    #[test]
    fn short_bodies() {
        assert!(PrefixKeys::of(b"", true).is_empty());
        assert!(PrefixKeys::of(b"{\"model\":\"m\"", false).is_empty());
        let whole = PrefixKeys::of(b"{\"model\":\"m\",\"prompt\":\"hi\"}", true);
        assert_eq!(whole.all().len(), 1);
        assert_ne!(
            PrefixKeys::of_session(b"abc").placement(),
            PrefixKeys::of(b"abc", true).placement()
        );
    }

    #[test]
    fn keys_stop_at_the_last_boundary() {
        let body = vec![b'x'; 1 << 20];
        assert_eq!(PrefixKeys::of(&body, false).all().len(), MAX_KEYS);
        // Deterministic: the same bytes, the same keys (what lets boxes agree).
        assert_eq!(PrefixKeys::of(&body, false), PrefixKeys::of(&body, true));
    }
}
