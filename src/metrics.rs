//! Counters, per worker, summed when scraped.
//!
//! Each worker owns its [`WorkerMetrics`] and is its only writer, so an increment is an
//! uncontended relaxed add on a cache line no other core writes; a scrape reads every
//! worker's counters and adds them up. `GET /metrics` serves them in Prometheus' text
//! format (on the proxy listener until the management listener exists).

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

#[derive(Debug, Default)]
pub struct WorkerMetrics {
    pub requests: Counter,
    pub token_cache_hits: Counter,
    pub token_cache_negative_hits: Counter,
    pub token_cache_misses: Counter,
    /// Signature verifications run (cache misses that reached the verifier).
    pub token_verifications: Counter,
}

/// Every worker's counters.
pub type Registry = Arc<Vec<Arc<WorkerMetrics>>>;

pub fn render(registry: &Registry) -> String {
    let sum = |f: fn(&WorkerMetrics) -> &Counter| registry.iter().map(|w| f(w).get()).sum::<u64>();
    let mut out = String::new();
    for (name, help, value) in [
        (
            "cubegate_requests_total",
            "Requests read from clients.",
            sum(|w| &w.requests),
        ),
        (
            "cubegate_token_cache_hits_total",
            "Bearer tokens answered from a worker's verified-token cache.",
            sum(|w| &w.token_cache_hits),
        ),
        (
            "cubegate_token_cache_negative_hits_total",
            "Bad bearer tokens refused from the cache without a signature check.",
            sum(|w| &w.token_cache_negative_hits),
        ),
        (
            "cubegate_token_cache_misses_total",
            "Bearer tokens not in the cache.",
            sum(|w| &w.token_cache_misses),
        ),
        (
            "cubegate_token_verifications_total",
            "Bearer tokens parsed and checked by the verifier.",
            sum(|w| &w.token_verifications),
        ),
    ] {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}"
        );
    }
    out
}
