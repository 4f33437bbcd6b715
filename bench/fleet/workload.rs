//! The fleet benchmark's workload: chats that share long system prompts, as a trace that is
//! the same for every system at a given rate (deterministic from the seed).
//!
//! - `groups` system prompts of `system_words` words each (a word is one token to the
//!   simulator), distinct from their first word, so a host that served one caches a few
//!   thousand tokens that only requests of the same group can reuse;
//! - each new conversation draws its group from a Zipf law (popularity ∝ 1 / rank^s): a few
//!   prompts are hot, most are lukewarm, as for a company's assistants;
//! - a conversation has 1..=`max_turns` turns; its next turn becomes due a think time
//!   (1–3 s) after the last one and carries the whole history (system, the user's turns and
//!   the assistant's answers), so it extends a prefix already computed somewhere;
//! - requests are due every 1 / rate seconds (open loop); at each due time a session whose
//!   next turn is due goes first, otherwise a new conversation starts.
//!
//! [`ideal_hits`] is the yardstick for the measured prefix-cache hit rate: the hit rate the
//! hosts would reach if every group were pinned to one host with an unbounded cache, i.e.
//! every prompt block computed once in the whole trace. It tokenizes and block-hashes the
//! bodies with the simulator's own code (`sim::prompt`, `sim::prefix_cache`), so the two
//! count the same tokens.

use crate::sim::prefix_cache::{block_hashes, BLOCK_TOKENS};
use bytes::Bytes;
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashSet};

/// What the workload looks like.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Spec {
    pub seed: u64,
    /// Distinct system prompts.
    pub groups: usize,
    /// Zipf exponent of the groups' popularity.
    pub zipf_s: f64,
    /// Words (simulator tokens) in a system prompt.
    pub system_words: usize,
    /// Words in a user turn, inclusive range.
    pub user_words: (usize, usize),
    /// Tokens each answer is asked for (`max_tokens`), and words of an answer in history.
    pub output_tokens: usize,
    /// Turns of a conversation are drawn from 1..=max_turns.
    pub max_turns: usize,
    /// Seconds between a turn and the next one of the same conversation, inclusive range.
    pub think_s: (f64, f64),
    pub model: String,
}

/// One request of the trace.
#[derive(Debug, Clone)]
pub struct Chat {
    pub group: usize,
    pub session: u64,
    /// 1 for a conversation's first request.
    pub turn: usize,
    /// The JSON body (`stream: true`).
    pub body: Bytes,
}

/// splitmix64: small, fast, and the same sequence everywhere.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in lo..=hi.
    pub fn between(&mut self, lo: usize, hi: usize) -> usize {
        let (lo, hi) = (lo.min(hi), lo.max(hi));
        lo + (self.next_u64() % (hi - lo + 1) as u64) as usize
    }
}

/// Draws ranks 0..n with probability ∝ 1 / (rank + 1)^s.
#[derive(Debug, Clone)]
pub struct Zipf {
    cumulative: Vec<f64>,
}

impl Zipf {
    pub fn new(n: usize, s: f64) -> Zipf {
        let mut total = 0.0;
        let cumulative = (1..=n.max(1))
            .map(|k| {
                total += 1.0 / (k as f64).powf(s);
                total
            })
            .collect();
        Zipf { cumulative }
    }

    /// The probability of `rank`.
    #[cfg(test)]
    pub fn probability(&self, rank: usize) -> f64 {
        let total = *self.cumulative.last().unwrap_or(&1.0);
        let below = if rank == 0 {
            0.0
        } else {
            self.cumulative[rank - 1]
        };
        (self.cumulative[rank] - below) / total
    }

    pub fn sample(&self, rng: &mut Rng) -> usize {
        let total = *self.cumulative.last().unwrap_or(&1.0);
        let u = rng.unit() * total;
        self.cumulative
            .partition_point(|&c| c <= u)
            .min(self.cumulative.len() - 1)
    }
}

const SYLLABLES: [&str; 32] = [
    "ka", "lo", "mi", "ne", "ru", "sa", "ti", "vo", "ba", "de", "fi", "go", "hu", "ja", "ke", "li",
    "mo", "nu", "pa", "qe", "ri", "so", "tu", "ve", "wa", "xi", "yo", "ze", "an", "el", "or", "um",
];

/// `n` made-up words from `rng`, space-separated.
fn words(rng: &mut Rng, n: usize, out: &mut String) {
    for i in 0..n {
        if i > 0 || !out.is_empty() {
            out.push(' ');
        }
        let syllables = 1 + (rng.next_u64() % 3) as usize;
        for _ in 0..syllables {
            out.push_str(SYLLABLES[(rng.next_u64() % SYLLABLES.len() as u64) as usize]);
        }
    }
}

/// Group `g`'s system prompt: distinct from its first word on.
pub fn system_prompt(spec: &Spec, g: usize) -> String {
    let mut rng = Rng::new(spec.seed ^ (0x5157_0000 + g as u64).wrapping_mul(0x2545_f491));
    let mut s = format!("Assistant-{g}-{:x}:", rng.next_u64());
    words(&mut rng, spec.system_words.saturating_sub(1), &mut s);
    s
}

struct Session {
    id: u64,
    group: usize,
    /// (role, content) after the system prompt.
    turns: Vec<(&'static str, String)>,
    turns_left: usize,
}

fn body(spec: &Spec, system: &str, turns: &[(&'static str, String)]) -> Bytes {
    let mut messages = vec![serde_json::json!({"role": "system", "content": system})];
    for (role, content) in turns {
        messages.push(serde_json::json!({"role": role, "content": content}));
    }
    let v = serde_json::json!({
        "model": spec.model,
        "messages": messages,
        "max_tokens": spec.output_tokens,
        "stream": true,
    });
    Bytes::from(v.to_string())
}

/// `count` requests due every 1 / `rate` s.
pub fn trace(spec: &Spec, rate: f64, count: usize) -> Vec<Chat> {
    let mut rng = Rng::new(spec.seed);
    let zipf = Zipf::new(spec.groups, spec.zipf_s);
    let systems: Vec<String> = (0..spec.groups.max(1))
        .map(|g| system_prompt(spec, g))
        .collect();
    let mut sessions: Vec<Session> = Vec::new();
    // (due time in µs, session index): the next turns waiting to be due.
    let mut waiting: BinaryHeap<Reverse<(u64, usize)>> = BinaryHeap::new();
    let mut out = Vec::with_capacity(count);
    for i in 0..count {
        let due_s = i as f64 / rate;
        let now_us = (due_s * 1e6) as u64;
        let idx = match waiting.peek() {
            Some(Reverse((at, s))) if *at <= now_us => {
                let s = *s;
                waiting.pop();
                s
            }
            _ => {
                sessions.push(Session {
                    id: sessions.len() as u64,
                    group: zipf.sample(&mut rng),
                    turns: Vec::new(),
                    turns_left: rng.between(1, spec.max_turns.max(1)),
                });
                sessions.len() - 1
            }
        };
        let s = &mut sessions[idx];
        if !s.turns.is_empty() {
            // The answer to the last turn, as the client keeps it in its history.
            let mut answer = String::new();
            words(&mut rng, spec.output_tokens, &mut answer);
            s.turns.push(("assistant", answer));
        }
        let mut question = String::new();
        let n = rng.between(spec.user_words.0, spec.user_words.1);
        words(&mut rng, n, &mut question);
        s.turns.push(("user", question));
        s.turns_left -= 1;
        out.push(Chat {
            group: s.group,
            session: s.id,
            turn: s.turns.len().div_ceil(2),
            body: body(spec, &systems[s.group], &s.turns),
        });
        if s.turns_left > 0 {
            let think = spec.think_s.0 + rng.unit() * (spec.think_s.1 - spec.think_s.0).max(0.0);
            waiting.push(Reverse((now_us + (think * 1e6) as u64, idx)));
        } else {
            // Done: its history is no longer needed.
            s.turns = Vec::new();
        }
    }
    out
}

/// What a trace is made of: conversations, the share of requests that continue one, the
/// hottest prompt's share of requests.
pub fn shape(chats: &[Chat]) -> (usize, f64, f64) {
    let n = chats.len().max(1) as f64;
    let sessions: HashSet<u64> = chats.iter().map(|c| c.session).collect();
    let follow_ups = chats.iter().filter(|c| c.turn > 1).count() as f64;
    let mut by_group = std::collections::HashMap::<usize, usize>::new();
    for c in chats {
        *by_group.entry(c.group).or_default() += 1;
    }
    let hottest = by_group.values().copied().max().unwrap_or(0) as f64;
    (sessions.len(), follow_ups / n, hottest / n)
}

/// A body's prompt as the simulator counts it.
pub fn prompt_tokens(body: &[u8]) -> Vec<u32> {
    let v: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
    crate::sim::prompt::tokens(v.get("messages").unwrap_or(&serde_json::Value::Null))
}

/// Prompt tokens and prefix-cache hit tokens of `chats[window]` with ideal placement: every
/// group on one host of unbounded cache, so a request hits every leading block any earlier
/// request of the trace computed (warm-up requests before the window included), up to
/// vLLM's ⌊(prompt − 1) / 16⌋ blocks.
pub fn ideal_hits(chats: &[Chat], model: &str, window: std::ops::Range<usize>) -> (u64, u64) {
    let mut seen: HashSet<u64> = HashSet::new();
    let (mut queries, mut hits) = (0u64, 0u64);
    for (i, c) in chats.iter().enumerate().take(window.end) {
        let tokens = prompt_tokens(&c.body);
        let hashes = block_hashes(model, &tokens);
        if window.contains(&i) {
            let cap = tokens.len().saturating_sub(1) / BLOCK_TOKENS;
            let hit = hashes
                .iter()
                .take(cap)
                .take_while(|h| seen.contains(h))
                .count();
            queries += tokens.len() as u64;
            hits += (hit * BLOCK_TOKENS) as u64;
        }
        seen.extend(hashes);
    }
    (queries, hits)
}
