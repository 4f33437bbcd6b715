//! Per-worker sums of finished requests, per minute per (domain, user, API key, model),
//! handed to the usage writer in batches.
//!
//! Each worker adds to its own map (no lock, no shared write); about once a second, and at
//! drain, the map is swapped out and sent whole. The writer merges batches and writes them
//! to the store; a kill -9 loses at most what was not yet written.

/// What a usage row is summed by.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct UsageKey {
    /// Unix time / 60.
    pub minute: i64,
    pub domain: Box<str>,
    /// The user id ("" for a request with no user: `auth.mode = "none"` without a token).
    pub user: Box<str>,
    /// The API key's id, when the request came with one.
    pub key: Option<Box<str>>,
    /// The model the request named ("" when none).
    pub model: Box<str>,
}

/// Sums for one key.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tally {
    pub requests: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    /// Answers with status ≥ 400 or cut short.
    pub errors: u64,
    /// Requests whose tokens the gateway counted because the host reported none.
    pub counted: u64,
}

impl Tally {
    pub fn add(&mut self, other: &Tally) {
        self.requests += other.requests;
        self.prompt_tokens += other.prompt_tokens;
        self.completion_tokens += other.completion_tokens;
        self.errors += other.errors;
        self.counted += other.counted;
    }
}

/// One batch from a worker to the writer.
pub type Batch = Vec<(UsageKey, Tally)>;
