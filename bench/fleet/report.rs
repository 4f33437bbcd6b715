//! What the fleet benchmark found and how it is shown: `results.md` (also on stdout),
//! `results.json`, and `ttft_p99.svg` (TTFT p99 against offered rate, one line per system,
//! drawn by `compare`'s SVG writer). The acceptance check (cubegate `auto` against the best
//! peer where round robin saturates, and its hit rate against ideal placement) is
//! computed here from the measured points, so it can be recomputed from `results.json`.

use crate::compare::report::Machine;
use crate::compare::svg::{self, Series};
use crate::load::report::Summary;
use serde::Serialize;
use std::collections::BTreeMap;
use std::fmt::Write as _;
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
    pub statuses: BTreeMap<String, u64>,
    pub errors: BTreeMap<String, u64>,
    /// cubegate: how the first host of each request was chosen during the measurement
    /// (`cubegate_routing_placements_total`).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub placements: BTreeMap<String, u64>,
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
            statuses: s.statuses.clone(),
            errors: s.errors.clone(),
            placements: BTreeMap::new(),
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

const DASH: &str = "—";

fn row(cells: &[String]) -> String {
    format!("| {} |\n", cells.join(" | "))
}

fn header(cols: &[String]) -> String {
    let align: Vec<String> = (0..cols.len())
        .map(|i| if i == 0 { "---" } else { "---:" }.to_string())
        .collect();
    row(cols) + &row(&align)
}

fn pct(v: Option<f64>) -> String {
    v.map_or(DASH.into(), |v| format!("{:.1} %", v * 100.0))
}

fn shares(p: &Point) -> String {
    let total: u64 = p.host_streams.iter().sum();
    if total == 0 {
        return DASH.into();
    }
    p.host_streams
        .iter()
        .map(|n| format!("{:.0}", *n as f64 * 100.0 / total as f64))
        .collect::<Vec<_>>()
        .join("/")
        + " %"
}

fn failed_cell(p: &Point) -> String {
    if p.failed == 0 {
        "0".into()
    } else {
        format!(
            "{} ({} before 1st token, {} mid-stream{})",
            p.failed,
            p.failed_before_first_token,
            p.failed_mid_stream,
            if p.unsent > 0 {
                format!(", {} unsent", p.unsent)
            } else {
                String::new()
            }
        )
    }
}

fn yes_no(v: Option<bool>) -> &'static str {
    match v {
        Some(true) => "**holds**",
        Some(false) => "**missed**",
        None => "not evaluated",
    }
}

/// The whole Markdown report.
pub fn markdown(r: &Report) -> String {
    let mut s = String::new();
    let st = &r.settings;
    let (w, spec) = (&r.workload, &r.workload.spec);
    let m = &r.machine;
    s.push_str(&crate::compare::report::heading(
        "fleet",
        &r.date,
        r.commit.as_deref(),
    ));
    let _ = writeln!(
        s,
        "- Machine: {} CPUs ({}), Linux {}; nothing pinned (hosts, router and load share them).",
        m.nproc, m.cpu_model, m.kernel
    );
    let _ = writeln!(
        s,
        "- Hosts: {} simulated vLLM hosts, {} batch slots each, a block-hashed LRU prefix cache \
         of {} tokens each, {} µs of prefill per uncached prompt token, {} µs per output token.",
        st.hosts, st.slots, st.cache_tokens, st.prefill_us_per_token, st.token_delay_us
    );
    let _ = writeln!(
        s,
        "- Workload (seed {}): chats over {} system prompts of {} tokens, Zipf popularity \
         (s = {}); conversations of 1–{} turns, {}–{} user words a turn, the next turn {}–{} s \
         after the last with the whole history; {} output tokens, streamed. In the heaviest \
         rate's trace: {} conversations, {:.0} % of requests continue one, the hottest prompt \
         is {:.0} % of requests.",
        spec.seed,
        spec.groups,
        spec.system_words,
        spec.zipf_s,
        spec.max_turns,
        spec.user_words.0,
        spec.user_words.1,
        spec.think_s.0,
        spec.think_s.1,
        spec.output_tokens,
        w.conversations,
        w.follow_up_share * 100.0,
        w.hottest_share * 100.0
    );
    let _ = writeln!(
        s,
        "- Load: open loop, {} s measured after {} s of warm-up at each rate; the same trace \
         for every system at a rate; fresh hosts (empty caches) and a fresh router for every \
         measurement; TTFT = intended send time → first SSE event; request timeout {} s; \
         cubegate with {} worker(s), `auth.mode = \"none\"`.",
        st.duration_s, st.warmup_s, st.request_timeout_s, st.gateway_workers
    );
    let _ = writeln!(
        s,
        "- Hit rate = Σ prefix-cache hit tokens / Σ prompt tokens from the hosts' own counters \
         over the measurement. **Ideal** = the hit rate with every prompt group pinned to one \
         host of unbounded cache (every prompt block computed once in the trace, warm-up \
         included), computed offline from the trace with the simulator's tokenizer and block \
         hashes.\n"
    );

    let rates = &st.rates;
    let _ = writeln!(s, "### TTFT p99 (ms) by offered rate\n");
    let mut cols = vec!["system".to_string()];
    cols.extend(rates.iter().map(|r| format!("{r}/s")));
    s.push_str(&header(&cols));
    for x in &r.systems {
        let mut cells = vec![x.name.clone()];
        if x.status != "ok" {
            cells.push(x.status.replace('|', "/"));
            cells.resize(cols.len(), DASH.into());
        } else {
            for &rate in rates {
                cells.push(match x.points.iter().find(|p| p.rate == rate) {
                    Some(p) if p.measured() => format!("{:.0}", p.ttft_p99_ms),
                    Some(p) => p.status.replace('|', "/"),
                    None => DASH.into(),
                });
            }
        }
        s.push_str(&row(&cells));
    }
    let mut cells = vec!["*ideal hit rate*".to_string()];
    for &rate in rates {
        cells.push(pct(r
            .ideal
            .iter()
            .find(|i| i.rate == rate)
            .map(|i| i.hit_rate)));
    }
    s.push_str(&row(&cells));

    for &rate in rates {
        let ideal = r.ideal.iter().find(|i| i.rate == rate).map(|i| i.hit_rate);
        let _ = writeln!(
            s,
            "\n### At {rate} requests/s (ideal hit rate {})\n",
            pct(ideal)
        );
        let cols = [
            "system",
            "TTFT p50",
            "TTFT p90",
            "TTFT p99",
            "output tokens/s",
            "hit rate",
            "hosts' share",
            "ok",
            "failed",
        ]
        .map(String::from);
        s.push_str(&header(&cols));
        for x in &r.systems {
            let Some(p) = x.points.iter().find(|p| p.rate == rate) else {
                let mut cells = vec![x.name.clone(), x.status.replace('|', "/")];
                cells.resize(cols.len(), DASH.into());
                s.push_str(&row(&cells));
                continue;
            };
            if !p.measured() {
                let mut cells = vec![x.name.clone(), p.status.replace('|', "/")];
                cells.resize(cols.len(), DASH.into());
                s.push_str(&row(&cells));
                continue;
            }
            s.push_str(&row(&[
                x.name.clone(),
                format!("{:.0}", p.ttft_p50_ms),
                format!("{:.0}", p.ttft_p90_ms),
                format!("{:.0}", p.ttft_p99_ms),
                format!("{:.0}", p.tokens_per_s),
                pct(p.hit_rate),
                shares(p),
                p.ok.to_string(),
                failed_cell(p),
            ]));
        }
        let placed: Vec<String> = r
            .systems
            .iter()
            .filter_map(|x| {
                let p = x.points.iter().find(|p| p.rate == rate)?;
                let total: u64 = p.placements.values().sum();
                (total > 0).then(|| {
                    let parts: Vec<String> = p
                        .placements
                        .iter()
                        .filter(|(_, n)| **n > 0)
                        .map(|(k, n)| format!("{k} {:.0} %", *n as f64 * 100.0 / total as f64))
                        .collect();
                    format!("{} — {}", x.name, parts.join(", "))
                })
            })
            .collect();
        if !placed.is_empty() {
            let _ = writeln!(
                s,
                "\ncubegate's placements (how each request's first host was chosen): {}.",
                placed.join("; ")
            );
        }
    }

    let a = &r.acceptance;
    let _ = writeln!(s, "\n### Acceptance\n");
    match a.round_robin_saturates_at {
        None => {
            let _ = writeln!(
                s,
                "Not evaluated: cubegate's round robin did not saturate within the sweep (or \
                 was not run). Saturation = TTFT p50 at least twice its value at the lightest \
                 rate, or failed requests."
            );
        }
        Some(rate) => {
            let _ = writeln!(
                s,
                "Round robin saturates at **{rate} requests/s** (its TTFT p50 at least twice \
                 its value at the lightest rate, or failed requests).\n"
            );
            let ms = |v: Option<f64>| v.map_or(DASH.into(), |v| format!("{v:.0} ms"));
            let _ = writeln!(
                s,
                "- TTFT p99: cubegate `auto` {} against the best peer {} → {} (bar: ≤ 0.50×): {}.",
                ms(a.auto_ttft_p99_ms),
                a.best_peer
                    .as_ref()
                    .map_or(DASH.into(), |(n, v)| format!("({n}) {v:.0} ms")),
                a.p99_ratio.map_or(DASH.into(), |x| format!("{x:.2}×")),
                yes_no(a.p99_holds)
            );
            let _ = writeln!(
                s,
                "- Prefix-cache hit rate: cubegate `auto` {} against ideal placement {} → {} \
                 (bar: ≥ 90 %): {}.",
                pct(a.auto_hit_rate),
                pct(a.ideal_hit_rate),
                match (a.auto_hit_rate, a.ideal_hit_rate) {
                    (Some(h), Some(i)) if i > 0.0 => format!("{:.0} % of ideal", h / i * 100.0),
                    _ => DASH.into(),
                },
                yes_no(a.hit_holds)
            );
        }
    }

    if !r.faults.is_empty() {
        let _ = writeln!(
            s,
            "\n### Faults run{}\n",
            r.fault_rate
                .map(|x| format!(" at {x} requests/s"))
                .unwrap_or_default()
        );
        if let Some(f) = r.faults.iter().find(|f| !f.timeline.is_empty()) {
            let _ = writeln!(
                s,
                "After the warm-up: {}. Clients give up after {} s. Failed = non-2xx answers, \
                 failed or timed-out streams and requests never sent; \"mid-stream\" = cut after \
                 the first token.\n",
                f.timeline.join("; "),
                r.fault_request_timeout_s
            );
        }
        let cols = [
            "system",
            "ok",
            "failed",
            "before 1st token",
            "mid-stream",
            "TTFT p50",
            "TTFT p99",
            "hosts' share",
            "answers",
            "errors",
        ]
        .map(String::from);
        s.push_str(&header(&cols));
        for f in &r.faults {
            let Some(p) = f.point.as_ref().filter(|_| f.status == "ok") else {
                let mut cells = vec![f.system.clone(), f.status.replace('|', "/")];
                cells.resize(cols.len(), DASH.into());
                s.push_str(&row(&cells));
                continue;
            };
            let map = |m: &BTreeMap<String, u64>| {
                if m.is_empty() {
                    DASH.to_string()
                } else {
                    m.iter()
                        .map(|(k, v)| format!("{k}: {v}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                }
            };
            s.push_str(&row(&[
                f.system.clone(),
                p.ok.to_string(),
                p.failed.to_string(),
                p.failed_before_first_token.to_string(),
                p.failed_mid_stream.to_string(),
                format!("{:.0}", p.ttft_p50_ms),
                format!("{:.0}", p.ttft_p99_ms),
                shares(p),
                map(&p.statuses),
                map(&p.errors),
            ]));
        }
    }
    let versions: Vec<String> = r
        .systems
        .iter()
        .filter_map(|x| x.version.as_ref().map(|v| format!("{}: {v}", x.name)))
        .collect();
    if !versions.is_empty() {
        let _ = writeln!(s, "\nVersions: {}.", versions.join("; "));
    }
    s
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
    crate::compare::report::write_results(dir, &markdown(r), r, &[("ttft_p99.svg", svg_ttft(r))])
}
