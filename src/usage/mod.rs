//! Usage metering: what each answer cost in tokens, counted on its way to the client, and
//! gathered per minute per (domain, user, API key, model) off the request path.
//!
//! - [`meter`] reads the answer as it streams (never holding a chunk back) and takes the
//!   token counts the host reports: OpenAI `usage` (whole answers, and the final usage
//!   event of a stream, which the gateway asks for when the client did not and removes
//!   again), Ollama's `prompt_eval_count` / `eval_count`, embeddings' usage.
//! - [`tally`] adds finished requests up per minute in each worker (plain maps, no lock)
//!   and hands the sums to the writer in batches.
//! - [`writer`] is the thread that merges the batches and stores them (one transaction per
//!   `[usage] flush_ms`, retention), so no worker ever touches the database.
//! - [`series`] is `/metrics`' tokens by domain and model, summed by the writer.
//! - [`strip`] takes the usage event the gateway asked for back out of a stream.
//! - [`limits`] are the limit sets, [`limiter`] their counters shared by the workers,
//!   [`admission`] the check of one request against them, [`metrics`] its refusals.
//! - [`fleet`] shares the limiter's counts with the other boxes of a fleet (`[fleet]`,
//!   through Redis), so limits hold over all of them.

pub mod admission;
pub mod fleet;
pub mod limiter;
pub mod limits;
pub mod meter;
pub mod metrics;
pub mod series;
pub mod strip;
pub mod tally;
pub mod writer;

/// Tokens one answer used.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub source: UsageSource,
}

/// Where a request's token counts come from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum UsageSource {
    /// The host reported them.
    #[default]
    Reported,
    /// The host reported nothing (the stream was cut, or the host does not report usage):
    /// completion tokens are the content events delivered, prompt tokens are unknown (0).
    Counted,
}

impl UsageSource {
    pub fn as_str(self) -> &'static str {
        match self {
            UsageSource::Reported => "reported",
            UsageSource::Counted => "counted",
        }
    }
}
