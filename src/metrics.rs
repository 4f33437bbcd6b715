//! Counters, gauges and histograms, per worker, summed when scraped.
//!
//! Each worker owns its [`WorkerMetrics`] and is its only writer, so an update is an
//! uncontended relaxed add on cache lines no other core writes; a scrape reads every
//! worker's values and adds them up. `GET /metrics` on the management listener serves them
//! in Prometheus' text format. Process-wide events that happen off the data plane (JWKS
//! fetches, reloads) use [`GLOBAL`]; tokens by domain and model come from the usage
//! writer's sums (`usage::series`), so the request path pays nothing for them.

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
    pub fn set(&self, v: i64) {
        self.0.store(v, Ordering::Relaxed);
    }
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

/// The `route` label of per-domain request counts (the kinds of `scope::Endpoint`).
pub const ROUTES: [&str; 8] = [
    "models",
    "tags",
    "chat",
    "completions",
    "embeddings",
    "model_info",
    "admin",
    "other",
];
const CLASSES: usize = 6;
/// Domains with series of their own. Slot 0 holds requests for domains that do not exist
/// (a made-up id must not create a series: that would let anyone grow the scrape) and for
/// domains past the limit.
pub const DOMAIN_SLOTS: usize = 256;

type DomainBlock = [Counter; ROUTES.len() * CLASSES];

/// Requests by domain, route kind and status class, for one worker. A domain's block is
/// allocated the first time it is counted, so unused slots cost a pointer.
#[derive(Debug)]
pub struct DomainRequests(Box<[std::sync::OnceLock<Box<DomainBlock>>]>);

impl Default for DomainRequests {
    fn default() -> Self {
        DomainRequests(
            (0..DOMAIN_SLOTS)
                .map(|_| std::sync::OnceLock::new())
                .collect(),
        )
    }
}

impl DomainRequests {
    pub fn count(&self, slot: u16, route: usize, status: u16) {
        let Some(cell) = self.0.get(usize::from(slot)) else {
            return;
        };
        let block = cell.get_or_init(|| Box::new(std::array::from_fn(|_| Counter::default())));
        let class = usize::from(status / 100).min(CLASSES - 1);
        block[route.min(ROUTES.len() - 1) * CLASSES + class].inc();
    }

    fn get(&self, slot: usize, route: usize, class: usize) -> u64 {
        self.0[slot]
            .get()
            .map_or(0, |b| b[route * CLASSES + class].get())
    }
}

/// Domain ids by slot, process-wide; assigned when a snapshot is built, never on the
/// request path. Slot 0 is `_other`.
static DOMAIN_NAMES: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

/// The metrics slot of domain `id` (the same id keeps its slot across reloads).
pub fn domain_slot(id: &str) -> u16 {
    let mut names = DOMAIN_NAMES.lock().unwrap_or_else(|p| p.into_inner());
    if names.is_empty() {
        names.push("_other".into());
    }
    if let Some(i) = names.iter().position(|n| n == id) {
        return i as u16;
    }
    if names.len() >= DOMAIN_SLOTS {
        return 0;
    }
    names.push(id.to_string());
    (names.len() - 1) as u16
}

#[derive(Debug, Default)]
pub struct WorkerMetrics {
    /// Requests for a domain, by route kind and status class.
    pub by_domain: DomainRequests,
    /// Signatures checked, by algorithm (`auth::jws::Alg::ALL` order).
    pub signatures: [Counter; 12],
    /// API keys looked up.
    pub api_key_checks: Counter,
    /// Calls to the check service (`[auth] check_url`), and those that failed (503).
    pub auth_checks: Counter,
    pub auth_check_failures: Counter,
    /// Idle pooled backend connections.
    pub upstream_idle: Gauge,
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
    /// How requests' first hosts were chosen (`fleet::policy::Placement::index` order).
    pub placements: [Counter; crate::fleet::policy::Placement::ALL.len()],
    /// Prefix groups the box's balancer moved to another home, in reviews this worker ran.
    pub group_moves: Counter,
    pub limit_rejections: crate::usage::metrics::LimitRejections,
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
        (
            "cubegate_upstream_idle_connections",
            "Idle keep-alive connections to backends in the workers' pools.",
            gauge(|w| &w.upstream_idle),
        ),
    ] {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}"
        );
    }
    render_labelled(&mut out, registry);
    crate::usage::fleet::view::render(&mut out);
    let placements: Vec<u64> = (0..crate::fleet::policy::Placement::ALL.len())
        .map(|i| registry.iter().map(|w| w.placements[i].get()).sum())
        .collect();
    let moves = registry.iter().map(|w| w.group_moves.get()).sum();
    crate::fleet::metrics::render(&mut out, &crate::fleet::hosts(), &placements, moves);
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

/// The labelled series: requests by domain, route and status class; signature checks by
/// algorithm. Only series that counted something are written.
fn render_labelled(out: &mut String, registry: &Registry) {
    let names = DOMAIN_NAMES
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    let _ = writeln!(out, "# HELP cubegate_domain_requests_total Requests by domain (\"_other\" = unknown or past {DOMAIN_SLOTS} domains), route kind and answer status class.\n# TYPE cubegate_domain_requests_total counter");
    for (slot, name) in names.iter().enumerate() {
        for (route, route_name) in ROUTES.iter().enumerate() {
            for class in 1..CLASSES {
                let n: u64 = registry
                    .iter()
                    .map(|w| w.by_domain.get(slot, route, class))
                    .sum();
                if n > 0 {
                    let _ = writeln!(
                        out,
                        "cubegate_domain_requests_total{{domain=\"{}\",route=\"{route_name}\",status=\"{class}xx\"}} {n}",
                        label_value(name)
                    );
                }
            }
        }
    }
    crate::usage::metrics::render(
        out,
        &names,
        registry.iter().map(|w| &w.limit_rejections),
        label_value,
    );
    let _ = writeln!(out, "# HELP cubegate_token_signature_checks_total Token signatures checked (cache misses), by algorithm.\n# TYPE cubegate_token_signature_checks_total counter");
    for (i, alg) in crate::auth::jws::Alg::ALL.iter().enumerate() {
        let n: u64 = registry.iter().map(|w| w.signatures[i].get()).sum();
        let _ = writeln!(
            out,
            "cubegate_token_signature_checks_total{{alg=\"{}\"}} {n}",
            alg.name()
        );
    }
    let n: u64 = registry.iter().map(|w| w.api_key_checks.get()).sum();
    let _ = writeln!(out, "# HELP cubegate_api_key_checks_total API keys looked up (cache misses).\n# TYPE cubegate_api_key_checks_total counter\ncubegate_api_key_checks_total {n}");
    let n: u64 = registry.iter().map(|w| w.auth_checks.get()).sum();
    let _ = writeln!(out, "# HELP cubegate_auth_checks_total Calls to the check service (auth.check_url).\n# TYPE cubegate_auth_checks_total counter\ncubegate_auth_checks_total {n}");
    let n: u64 = registry.iter().map(|w| w.auth_check_failures.get()).sum();
    let _ = writeln!(out, "# HELP cubegate_auth_check_failures_total Calls to the check service that failed (down, slow, a bad answer: 503).\n# TYPE cubegate_auth_check_failures_total counter\ncubegate_auth_check_failures_total {n}");
    let _ = writeln!(out, "# HELP cubegate_tokens_total Tokens of answers by domain, model (\"{}\" past a domain's bound) and kind, as stored for usage (trails the answers by about a second).\n# TYPE cubegate_tokens_total counter", crate::usage::series::OTHER);
    crate::usage::series::each(|domain, model, prompt, completion| {
        let (domain, model) = (label_value(domain), label_value(model));
        for (kind, n) in [("prompt", prompt), ("completion", completion)] {
            let _ = writeln!(
                out,
                "cubegate_tokens_total{{domain=\"{domain}\",model=\"{model}\",kind=\"{kind}\"}} {n}"
            );
        }
    });
}

/// Prometheus label values escape backslash, quote and newline.
fn label_value(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    #[test]
    fn usage_metrics_have_a_slot_per_domain_slot() {
        assert_eq!(crate::usage::metrics::SLOTS, DOMAIN_SLOTS);
    }

    use super::*;

    #[test]
    fn domain_series_are_stable_bounded_and_escaped() {
        let a = domain_slot("slot-test-a");
        assert_ne!(a, 0);
        assert_eq!(domain_slot("slot-test-a"), a);
        let w = Arc::new(WorkerMetrics::default());
        w.by_domain.count(a, 2, 503);
        w.by_domain.count(a, 2, 503);
        w.by_domain.count(u16::MAX, 2, 200); // out of range: ignored, no panic
        let text = render(&Arc::new(vec![w]));
        assert!(text.contains(
            "cubegate_domain_requests_total{domain=\"slot-test-a\",route=\"chat\",status=\"5xx\"} 2\n"
        ));
        assert_eq!(label_value("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }

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
