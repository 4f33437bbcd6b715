//! Counters, gauges and histograms, per worker, summed when scraped.
//!
//! Each worker owns its [`WorkerMetrics`] and is its only writer, so an update is an
//! uncontended relaxed add on cache lines no other core writes; a scrape reads every
//! worker's values and adds them up. `GET /metrics` on the management listener serves them
//! in Prometheus' text format. Process-wide events that happen off the data plane (JWKS
//! fetches, reloads) use [`GLOBAL`].

use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A value that goes up and down (open connections, streams in flight).
#[derive(Debug, Default)]
pub struct Gauge(AtomicI64);

impl Gauge {
    pub fn up(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
    pub fn down(&self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
    pub fn get(&self) -> i64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Upper bounds of the latency buckets, seconds (LLM answers take from milliseconds to
/// minutes).
const BUCKETS: [f64; 14] = [
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// A Prometheus histogram: a count per bucket (non-cumulative here; summed on render).
#[derive(Debug, Default)]
pub struct Histogram {
    buckets: [Counter; BUCKETS.len() + 1],
    sum_micros: Counter,
}

impl Histogram {
    pub fn observe(&self, d: Duration) {
        let s = d.as_secs_f64();
        let i = BUCKETS
            .iter()
            .position(|b| s <= *b)
            .unwrap_or(BUCKETS.len());
        self.buckets[i].inc();
        self.sum_micros.add(d.as_micros() as u64);
    }
}

#[derive(Debug, Default)]
pub struct WorkerMetrics {
    pub requests: Counter,
    /// Answers by status class: 1xx..5xx at index 1..5.
    pub responses: [Counter; 6],
    pub connections: Gauge,
    pub streams: Gauge,
    pub upstream_connects: Counter,
    pub upstream_connect_failures: Counter,
    pub upstream_reuses: Counter,
    /// TLS handshakes completed with clients, and those that failed or timed out.
    pub tls_handshakes: Counter,
    pub tls_handshake_failures: Counter,
    pub token_cache_hits: Counter,
    pub token_cache_negative_hits: Counter,
    pub token_cache_misses: Counter,
    /// Signature verifications run (cache misses that reached the verifier).
    pub token_verifications: Counter,
    pub first_byte: Histogram,
    pub duration: Histogram,
}

impl WorkerMetrics {
    pub fn response(&self, status: u16) {
        self.responses[(status / 100).min(5) as usize].inc();
    }
}

/// Events off the data plane.
#[derive(Debug, Default)]
pub struct Global {
    pub jwks_fetches: Counter,
    pub jwks_fetch_failures: Counter,
    pub reloads: Counter,
}

pub static GLOBAL: Global = Global {
    jwks_fetches: Counter(AtomicU64::new(0)),
    jwks_fetch_failures: Counter(AtomicU64::new(0)),
    reloads: Counter(AtomicU64::new(0)),
};

/// Every worker's metrics.
pub type Registry = Arc<Vec<Arc<WorkerMetrics>>>;

pub fn render(registry: &Registry) -> String {
    let sum = |f: fn(&WorkerMetrics) -> &Counter| registry.iter().map(|w| f(w).get()).sum::<u64>();
    let gauge = |f: fn(&WorkerMetrics) -> &Gauge| registry.iter().map(|w| f(w).get()).sum::<i64>();
    let mut out = String::new();
    let mut counter = |name: &str, help: &str, value: u64| {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}"
        );
    };
    counter(
        "cubegate_requests_total",
        "Requests read from clients.",
        sum(|w| &w.requests),
    );
    counter(
        "cubegate_upstream_connects_total",
        "New connections opened to backends.",
        sum(|w| &w.upstream_connects),
    );
    counter(
        "cubegate_upstream_connect_failures_total",
        "Backend connections that failed or timed out.",
        sum(|w| &w.upstream_connect_failures),
    );
    counter(
        "cubegate_tls_handshakes_total",
        "TLS handshakes completed with clients.",
        sum(|w| &w.tls_handshakes),
    );
    counter(
        "cubegate_tls_handshake_failures_total",
        "Client TLS handshakes that failed or timed out.",
        sum(|w| &w.tls_handshake_failures),
    );
    counter(
        "cubegate_upstream_reuses_total",
        "Requests sent on a pooled backend connection.",
        sum(|w| &w.upstream_reuses),
    );
    counter(
        "cubegate_token_cache_hits_total",
        "Bearer tokens answered from a worker's verified-token cache.",
        sum(|w| &w.token_cache_hits),
    );
    counter(
        "cubegate_token_cache_negative_hits_total",
        "Bad bearer tokens refused from the cache without a signature check.",
        sum(|w| &w.token_cache_negative_hits),
    );
    counter(
        "cubegate_token_cache_misses_total",
        "Bearer tokens not in the cache.",
        sum(|w| &w.token_cache_misses),
    );
    counter(
        "cubegate_token_verifications_total",
        "Bearer tokens parsed and checked by the verifier.",
        sum(|w| &w.token_verifications),
    );
    counter(
        "cubegate_jwks_fetches_total",
        "JWKS documents fetched.",
        GLOBAL.jwks_fetches.get(),
    );
    counter(
        "cubegate_jwks_fetch_failures_total",
        "JWKS fetches that failed (the last good keys were kept).",
        GLOBAL.jwks_fetch_failures.get(),
    );
    counter(
        "cubegate_reloads_total",
        "Configuration reloads (SIGHUP) that were applied.",
        GLOBAL.reloads.get(),
    );
    let _ = writeln!(out, "# HELP cubegate_responses_total Answers to clients by status class.\n# TYPE cubegate_responses_total counter");
    for class in 1..=5 {
        let n: u64 = registry.iter().map(|w| w.responses[class].get()).sum();
        let _ = writeln!(out, "cubegate_responses_total{{class=\"{class}xx\"}} {n}");
    }
    for (name, help, value) in [
        (
            "cubegate_connections",
            "Open client connections.",
            gauge(|w| &w.connections),
        ),
        (
            "cubegate_streams",
            "Backend answers being relayed right now.",
            gauge(|w| &w.streams),
        ),
    ] {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}"
        );
    }
    for (name, help, pick) in [
        (
            "cubegate_first_byte_seconds",
            "From a request's head to its answer's head going out.",
            (|w: &WorkerMetrics| &w.first_byte) as fn(&WorkerMetrics) -> &Histogram,
        ),
        (
            "cubegate_request_duration_seconds",
            "From a request's head to the end of its answer.",
            |w: &WorkerMetrics| &w.duration,
        ),
    ] {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cumulative = 0;
        for (i, bound) in BUCKETS.iter().enumerate() {
            cumulative += registry
                .iter()
                .map(|w| pick(w).buckets[i].get())
                .sum::<u64>();
            let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {cumulative}");
        }
        cumulative += registry
            .iter()
            .map(|w| pick(w).buckets[BUCKETS.len()].get())
            .sum::<u64>();
        let sum_s = registry
            .iter()
            .map(|w| pick(w).sum_micros.get())
            .sum::<u64>() as f64
            / 1e6;
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {cumulative}\n{name}_sum {sum_s}\n{name}_count {cumulative}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prometheus_text() {
        let w = Arc::new(WorkerMetrics::default());
        w.requests.inc();
        w.response(200);
        w.response(404);
        w.first_byte.observe(Duration::from_millis(3));
        w.duration.observe(Duration::from_secs(100));
        let text = render(&Arc::new(vec![w.clone(), Arc::default()]));
        assert!(text.contains("cubegate_requests_total 1\n"));
        assert!(text.contains("cubegate_responses_total{class=\"4xx\"} 1\n"));
        assert!(text.contains("cubegate_first_byte_seconds_bucket{le=\"0.001\"} 0\n"));
        assert!(text.contains("cubegate_first_byte_seconds_bucket{le=\"0.005\"} 1\n"));
        assert!(text.contains("cubegate_request_duration_seconds_bucket{le=\"60\"} 0\n"));
        assert!(text.contains("cubegate_request_duration_seconds_bucket{le=\"+Inf\"} 1\n"));
        assert!(text.contains("cubegate_request_duration_seconds_count 1\n"));
    }
}
