//! The fleet benchmark's `results.md` (also printed): the TTFT p99 table by rate, a table
//! per rate (latency, throughput, hit rate, why the slow requests were slow, each host's
//! share, failures, cubegate's placements), the acceptance check and the faults run.

use super::report::{Point, Report};
use std::collections::BTreeMap;
use std::fmt::Write as _;

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

/// `n` as a share of the streams the hosts ran.
fn of_streams(p: &Point, n: u64) -> String {
    let total: u64 = p.host_streams.iter().sum();
    match total {
        0 => DASH.into(),
        _ => format!("{:.1} %", n as f64 * 100.0 / total as f64),
    }
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
            "queued ≥ 100 ms",
            "prefill ≥ 100 ms",
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
                of_streams(p, p.slow_queue_waits),
                of_streams(p, p.slow_prefills),
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
                    let moves = match p.group_moves {
                        0 => String::new(),
                        n => format!(" ({n} group moves)"),
                    };
                    format!("{} — {}{moves}", x.name, parts.join(", "))
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
