//! What the fleet benchmark found: the figures per system and rate, written as
//! `results.json`, `results.md` (also on stdout; `markdown.rs`) and `ttft_p99.svg` (TTFT
//! p99 against offered rate, one line per system, drawn by `compare`'s SVG writer). The
//! acceptance check (cubegate `auto` against the best peer where round robin saturates,
//! and its hit rate against ideal placement) is computed here from the measured points, so
//! it can be recomputed from `results.json`.

use crate::compare::report::Machine;
use crate::compare::svg::{self, Series};
use crate::load::report::Summary;
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::Path;

/// One system at one offered rate.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct Point {
    /// Offered requests per second.
    pub rate: f64,
    /// "ok", or "failed: …" when no request succeeded.
    pub status: String,
    pub sent: u64,
    /// Streams answered 2xx and complete.
    pub ok: u64,
    /// Non-2xx answers, failed requests and requests never sent.
    pub failed: u64,
    pub failed_before_first_token: u64,
    /// Streams cut after their first token.
    pub failed_mid_stream: u64,
    pub unsent: u64,
    pub ttft_p50_ms: f64,
    pub ttft_p90_ms: f64,
    pub ttft_p99_ms: f64,
    /// Output tokens of the complete streams per second.
    pub tokens_per_s: f64,
    /// Σ prefix-cache hit tokens / Σ prompt tokens over the hosts during the measurement.
    pub hit_rate: Option<f64>,
    /// Streams each host ran during the measurement.
    pub host_streams: Vec<u64>,
    /// Of those, the ones that waited ≥ 100 ms for a batch slot on their host, and the
    /// ones whose prefill alone took ≥ 100 ms (a prompt computed from scratch): the
    /// simulators' `queue_waits_over_100ms` and `prefills_over_100ms`.
    pub slow_queue_waits: u64,
    pub slow_prefills: u64,
    pub statuses: BTreeMap<String, u64>,
    pub errors: BTreeMap<String, u64>,
    /// cubegate: how the first host of each request was chosen during the measurement
    /// (`cubegate_routing_placements_total`).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub placements: BTreeMap<String, u64>,
    /// cubegate: prefix groups its balancers moved during the measurement
    /// (`cubegate_routing_group_moves_total`).
    #[serde(skip_serializing_if = "is_zero")]
    pub group_moves: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl Point {
    /// From a load summary and the hosts' counters over the same stretch.
    pub fn of(rate: f64, s: &Summary, output_tokens: usize, hosts: &[HostDelta]) -> Point {
        let non_2xx = s.completed - s.ok.min(s.completed);
        let failed = non_2xx + s.errors_total + s.unsent;
        let ms = |us: u64| us as f64 / 1000.0;
        let ttft = &s.latency_us.first_event;
        let queries: u64 = hosts.iter().map(|h| h.prefix_queries).sum();
        let hits: u64 = hosts.iter().map(|h| h.prefix_hits).sum();
        let status = if s.ok > 0 {
            "ok".to_string()
        } else {
            format!(
                "failed: none of {} requests succeeded (statuses {:?}, errors {:?})",
                s.sent + s.unsent,
                s.statuses,
                s.errors
            )
        };
        Point {
            rate,
            status,
            sent: s.sent,
            ok: s.ok,
            failed,
            failed_before_first_token: failed - s.errors_mid_stream.min(failed),
            failed_mid_stream: s.errors_mid_stream,
            unsent: s.unsent,
            ttft_p50_ms: ms(ttft.p50),
            ttft_p90_ms: ms(ttft.p90),
            ttft_p99_ms: ms(ttft.p99),
            tokens_per_s: s.ok as f64 * output_tokens as f64 / s.elapsed_s.max(1e-9),
            hit_rate: (queries > 0).then(|| hits as f64 / queries as f64),
            host_streams: hosts.iter().map(|h| h.streams).collect(),
            slow_queue_waits: hosts.iter().map(|h| h.slow_queue_waits).sum(),
            slow_prefills: hosts.iter().map(|h| h.slow_prefills).sum(),
            statuses: s.statuses.clone(),
            errors: s.errors.clone(),
            placements: BTreeMap::new(),
            group_moves: 0,
        }
    }

    pub fn measured(&self) -> bool {
        self.status == "ok"
    }
}

/// A host's counters over one measurement.
pub type HostDelta = super::hosts::HostStats;

/// One system's points, or why it has none.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SystemRuns {
    pub name: String,
    pub label: String,
    /// "ok", or "failed: <reason>" (not installed, did not start, …).
    pub status: String,
    pub version: Option<String>,
    pub points: Vec<Point>,
}

impl SystemRuns {
    pub fn at(&self, rate: f64) -> Option<&Point> {
        self.points
            .iter()
            .find(|p| (p.rate - rate).abs() < 1e-9 && p.measured())
    }
}

/// The ideal placement's hit rate on the trace of one rate.
#[derive(Debug, Clone, Serialize)]
pub struct Ideal {
    pub rate: f64,
    pub hit_rate: f64,
    pub prompt_tokens: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Settings {
    pub hosts: usize,
    pub slots: usize,
    pub cache_tokens: usize,
    pub prefill_us_per_token: u64,
    pub token_delay_us: u64,
    pub duration_s: f64,
    pub warmup_s: f64,
    pub rates: Vec<f64>,
    pub connections: usize,
    pub gateway_workers: usize,
    pub request_timeout_s: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Workload {
    #[serde(flatten)]
    pub spec: super::workload::Spec,
    /// In the heaviest rate's trace: conversations, the share of requests that continue
    /// one, the hottest system prompt's share of requests.
    pub conversations: usize,
    pub follow_up_share: f64,
    pub hottest_share: f64,
}

/// The acceptance bars, evaluated on this run.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Acceptance {
    /// The lowest rate at which cubegate's round robin saturates (see `saturation`).
    pub round_robin_saturates_at: Option<f64>,
    pub auto_ttft_p99_ms: Option<f64>,
    /// The peer with the lowest TTFT p99 at that rate, and that p99.
    pub best_peer: Option<(String, f64)>,
    pub p99_ratio: Option<f64>,
    /// auto p99 ≤ 0.5 × the best peer's.
    pub p99_holds: Option<bool>,
    pub auto_hit_rate: Option<f64>,
    pub ideal_hit_rate: Option<f64>,
    /// auto hit rate ≥ 0.9 × ideal.
    pub hit_holds: Option<bool>,
}

/// The faults run of one system.
#[derive(Debug, Clone, Default, Serialize)]
pub struct FaultRun {
    pub system: String,
    pub status: String,
    pub point: Option<Point>,
    /// What was done when (seconds after the measurement started).
    pub timeline: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub date: String,
    pub commit: Option<String>,
    pub machine: Machine,
    pub settings: Settings,
    pub workload: Workload,
    pub ideal: Vec<Ideal>,
    pub systems: Vec<SystemRuns>,
    pub acceptance: Acceptance,
    pub fault_rate: Option<f64>,
    pub fault_request_timeout_s: f64,
    pub faults: Vec<FaultRun>,
}

/// The lowest rate at which a system saturates: its TTFT p50 at least doubles over its
/// value at the lightest rate (requests wait in queues more than they compute), or
/// requests fail or cannot be sent.
pub fn saturation(points: &[Point]) -> Option<f64> {
    let base = points.iter().find(|p| p.measured())?.ttft_p50_ms;
    points
        .iter()
        .find(|p| !p.measured() || p.failed > 0 || p.ttft_p50_ms >= 2.0 * base)
        .map(|p| p.rate)
}

/// The heaviest rate below a system's saturation (its lightest when it saturates at once).
pub fn heaviest_unsaturated(points: &[Point]) -> Option<f64> {
    let sat = saturation(points);
    let below: Vec<f64> = points
        .iter()
        .filter(|p| p.measured() && sat.is_none_or(|s| p.rate < s))
        .map(|p| p.rate)
        .collect();
    below.last().copied().or(points.first().map(|p| p.rate))
}

pub fn acceptance(systems: &[SystemRuns], ideal: &[Ideal]) -> Acceptance {
    let find = |n: &str| systems.iter().find(|s| s.name == n);
    let mut a = Acceptance::default();
    let Some(rate) = find("cubegate-round-robin").and_then(|rr| saturation(&rr.points)) else {
        return a;
    };
    a.round_robin_saturates_at = Some(rate);
    let auto = find("cubegate-auto").and_then(|s| s.at(rate));
    a.auto_ttft_p99_ms = auto.map(|p| p.ttft_p99_ms);
    a.auto_hit_rate = auto.and_then(|p| p.hit_rate);
    a.best_peer = systems
        .iter()
        .filter(|s| super::systems::System::parse(&s.name).is_some_and(|x| x.is_peer()))
        .filter_map(|s| Some((s.name.clone(), s.at(rate)?.ttft_p99_ms)))
        .min_by(|x, y| x.1.total_cmp(&y.1));
    if let (Some(cg), Some((_, peer))) = (a.auto_ttft_p99_ms, &a.best_peer) {
        a.p99_ratio = Some(cg / peer);
        a.p99_holds = Some(cg <= 0.5 * peer);
    }
    a.ideal_hit_rate = ideal
        .iter()
        .find(|i| (i.rate - rate).abs() < 1e-9)
        .map(|i| i.hit_rate);
    if let (Some(h), Some(i)) = (a.auto_hit_rate, a.ideal_hit_rate) {
        a.hit_holds = Some(h >= 0.9 * i);
    }
    a
}

/// TTFT p99 against offered rate, one line per measured system.
pub fn svg_ttft(r: &Report) -> String {
    let series: Vec<Series> = r
        .systems
        .iter()
        .filter(|x| x.points.iter().any(Point::measured))
        .map(|x| Series {
            name: x.name.clone(),
            points: x
                .points
                .iter()
                .map(|p| (p.rate, if p.measured() { p.ttft_p99_ms } else { 0.0 }))
                .collect(),
        })
        .collect();
    svg::lines(
        "Time to first token, p99, against offered load",
        &format!(
            "{}{}; {} hosts × {} slots, {} system prompts (Zipf), open loop",
            r.date,
            r.commit
                .as_deref()
                .map(|c| format!(", commit {c}"))
                .unwrap_or_default(),
            r.settings.hosts,
            r.settings.slots,
            r.workload.spec.groups
        ),
        "offered requests/s",
        "TTFT p99, ms",
        &series,
    )
}

/// Writes results.md, results.json and ttft_p99.svg into `dir`.
pub fn write_all(r: &Report, dir: &Path) -> std::io::Result<()> {
    crate::compare::report::write_results(
        dir,
        &super::markdown::markdown(r),
        r,
        &[("ttft_p99.svg", svg_ttft(r))],
    )
}
