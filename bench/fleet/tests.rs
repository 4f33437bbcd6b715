//! The workload generator (deterministic, Zipf shape, sessions that grow), the report (a
//! system that failed is reported failed, never as figures; the acceptance check), and a
//! short end-to-end run of the real thing.

use super::report::{self, Ideal, Point, Report, SystemRuns};
use super::workload::{self, Rng, Spec, Zipf};
use super::*;

fn spec() -> Spec {
    let mut s = FleetArgs::defaults().workload();
    s.system_words = 300;
    s
}

#[test]
fn the_trace_is_deterministic_from_the_seed() {
    let a = workload::trace(&spec(), 50.0, 300);
    let b = workload::trace(&spec(), 50.0, 300);
    assert_eq!(a.len(), 300);
    assert!(a
        .iter()
        .zip(&b)
        .all(|(x, y)| x.body == y.body && x.group == y.group));
    let mut other = spec();
    other.seed = 2;
    let c = workload::trace(&other, 50.0, 300);
    assert!(a.iter().zip(&c).any(|(x, y)| x.body != y.body));
}

#[test]
fn zipf_popularity() {
    let z = Zipf::new(32, 1.0);
    let total: f64 = (0..32).map(|k| z.probability(k)).sum();
    assert!((total - 1.0).abs() < 1e-9);
    // P(k) ∝ 1/k: the first is twice the second, four times the fourth.
    assert!((z.probability(0) / z.probability(1) - 2.0).abs() < 1e-9);
    assert!((z.probability(0) / z.probability(3) - 4.0).abs() < 1e-9);
    let mut rng = Rng::new(7);
    let mut counts = [0u32; 32];
    let n = 200_000;
    for _ in 0..n {
        counts[z.sample(&mut rng)] += 1;
    }
    for k in [0, 1, 7, 31] {
        let seen = f64::from(counts[k]) / f64::from(n);
        let want = z.probability(k);
        assert!(
            (seen - want).abs() < 0.1 * want + 0.001,
            "rank {k}: {seen} vs {want}"
        );
    }
    // In the trace, new conversations follow it: the hottest prompt leads.
    let t = workload::trace(&spec(), 100.0, 3000);
    let mut by_group = [0u32; 32];
    for c in t.iter().filter(|c| c.turn == 1) {
        by_group[c.group] += 1;
    }
    assert!(
        by_group[0] > by_group[1] && by_group[1] > by_group[8],
        "{by_group:?}"
    );
}

fn messages(body: &[u8]) -> Vec<serde_json::Value> {
    let v: serde_json::Value = serde_json::from_slice(body).unwrap();
    v["messages"].as_array().unwrap().clone()
}

#[test]
fn sessions_grow_their_history() {
    let t = workload::trace(&spec(), 50.0, 2000);
    let mut turns = std::collections::HashMap::<u64, Vec<&workload::Chat>>::new();
    let mut at = std::collections::HashMap::<u64, Vec<usize>>::new();
    for (i, c) in t.iter().enumerate() {
        turns.entry(c.session).or_default().push(c);
        at.entry(c.session).or_default().push(i);
    }
    // A turn is due a think time (at least a second: 50 requests at 50/s) after the last.
    assert!(at.values().all(|v| v.windows(2).all(|w| w[1] - w[0] >= 50)));
    let long = turns.values().filter(|v| v.len() >= 3).count();
    assert!(long > 10, "{long} sessions of 3+ turns");
    for v in turns.values() {
        for w in v.windows(2) {
            let (a, b) = (messages(&w[0].body), messages(&w[1].body));
            // The next turn is the previous request's messages, an answer and a question.
            assert_eq!(b.len(), a.len() + 2);
            assert_eq!(&b[..a.len()], &a[..]);
            assert_eq!(b[a.len()]["role"], "assistant");
            assert_eq!(w[1].turn, w[0].turn + 1);
            assert_eq!(w[0].group, w[1].group);
        }
        // Every request starts with its group's system prompt, distinct from the first
        // bytes on (what a router's prefix key sees).
        let m = messages(&v[0].body);
        assert_eq!(m[0]["role"], "system");
        assert_eq!(
            m[0]["content"],
            workload::system_prompt(&spec(), v[0].group)
        );
    }
    let (a, b) = (
        workload::system_prompt(&spec(), 0),
        workload::system_prompt(&spec(), 1),
    );
    assert_ne!(a[..16], b[..16]);
    assert!(workload::prompt_tokens(t[0].body.as_ref()).len() > 300);
}

#[test]
fn ideal_placement_hits_what_was_computed_before() {
    let s = spec();
    let t = workload::trace(&s, 50.0, 400);
    let (queries, hits) = workload::ideal_hits(&t, &s.model, 0..t.len());
    let total: usize = t
        .iter()
        .map(|c| workload::prompt_tokens(&c.body).len())
        .sum();
    assert_eq!(queries, total as u64);
    assert!(hits > 0 && hits < queries);
    // The first request of the trace hits nothing; a window later in the trace hits more
    // (warm-up requests count as computed).
    let (q1, h1) = workload::ideal_hits(&t, &s.model, 0..1);
    assert!(q1 > 0 && h1 == 0);
    let (q2, h2) = workload::ideal_hits(&t, &s.model, 200..400);
    assert!(h2 as f64 / q2 as f64 > hits as f64 / queries as f64);
}

fn point(rate: f64, p50: f64, p99: f64, hit: f64) -> Point {
    Point {
        rate,
        status: "ok".into(),
        sent: 100,
        ok: 100,
        ttft_p50_ms: p50,
        ttft_p90_ms: p99 * 0.8,
        ttft_p99_ms: p99,
        tokens_per_s: 1000.0,
        hit_rate: Some(hit),
        host_streams: vec![25, 25, 30, 20],
        ..Point::default()
    }
}

fn runs(name: &str, points: Vec<Point>) -> SystemRuns {
    SystemRuns {
        name: name.into(),
        label: name.into(),
        status: "ok".into(),
        version: Some("v1".into()),
        points,
    }
}

fn sample() -> Report {
    let a = FleetArgs::defaults();
    let systems = vec![
        runs(
            "cubegate-auto",
            vec![
                point(40.0, 100.0, 200.0, 0.8),
                point(90.0, 110.0, 250.0, 0.78),
            ],
        ),
        runs(
            "cubegate-round-robin",
            vec![
                point(40.0, 150.0, 400.0, 0.3),
                point(90.0, 400.0, 1500.0, 0.3),
            ],
        ),
        runs(
            "sglang-router",
            vec![
                point(40.0, 120.0, 300.0, 0.6),
                point(90.0, 170.0, 600.0, 0.6),
            ],
        ),
        SystemRuns {
            name: "vllm-router".into(),
            label: "vllm-router".into(),
            status: "failed: not installed (pip install vllm-router)".into(),
            ..SystemRuns::default()
        },
        runs(
            "nginx",
            vec![
                point(40.0, 150.0, 380.0, 0.3),
                Point {
                    rate: 90.0,
                    status: "failed: none of 5 requests succeeded".into(),
                    failed: 5,
                    ..Point::default()
                },
            ],
        ),
    ];
    let ideal = vec![
        Ideal {
            rate: 40.0,
            hit_rate: 0.85,
            prompt_tokens: 1,
        },
        Ideal {
            rate: 90.0,
            hit_rate: 0.84,
            prompt_tokens: 1,
        },
    ];
    Report {
        date: "2026-11-24 10:00 UTC".into(),
        commit: Some("abc1234".into()),
        machine: crate::compare::machine(2, &None, &[]),
        settings: report::Settings {
            hosts: 4,
            slots: 4,
            cache_tokens: 32768,
            prefill_us_per_token: 60,
            token_delay_us: 3000,
            duration_s: 8.0,
            warmup_s: 4.0,
            rates: vec![40.0, 90.0],
            connections: 1024,
            gateway_workers: 1,
            request_timeout_s: 60.0,
        },
        workload: report::Workload {
            spec: a.workload(),
            conversations: 10,
            follow_up_share: 0.5,
            hottest_share: 0.2,
        },
        acceptance: report::acceptance(&systems, &ideal),
        ideal,
        systems,
        fault_rate: Some(40.0),
        fault_request_timeout_s: 5.0,
        faults: vec![report::FaultRun {
            system: "vllm-router".into(),
            status: "failed: not installed (pip install vllm-router)".into(),
            point: None,
            timeline: Vec::new(),
        }],
    }
}

#[test]
fn a_failed_system_is_reported_failed_never_as_figures() {
    let r = sample();
    let md = markdown::markdown(&r);
    let rows: Vec<&str> = md
        .lines()
        .filter(|l| l.starts_with("| vllm-router |"))
        .collect();
    assert!(rows.len() >= 3, "{md}");
    for row in rows {
        assert!(row.contains("failed: not installed"), "{row}");
        assert!(!row.chars().any(|c| c.is_ascii_digit()), "{row}");
    }
    // A rate where every request failed: that point is failed, the others are figures.
    let nginx: Vec<&str> = md.lines().filter(|l| l.starts_with("| nginx |")).collect();
    assert!(nginx[0].contains("| 380 |") && nginx[0].contains("failed: none of 5"));
    // And failed points are no line in the chart, nor the best peer.
    assert_eq!(
        r.acceptance.best_peer,
        Some(("sglang-router".into(), 600.0))
    );
    let svg = report::svg_ttft(&r);
    assert!(!svg.contains("data-series=\"vllm-router\""));
    assert_eq!(svg.matches("<circle").count(), 2 + 2 + 2 + 1);
}

#[test]
fn acceptance_is_read_where_round_robin_saturates() {
    let r = sample();
    let a = &r.acceptance;
    // Round robin's p50 went from 150 to 400 ms: saturated at 90/s.
    assert_eq!(a.round_robin_saturates_at, Some(90.0));
    assert_eq!(a.auto_ttft_p99_ms, Some(250.0));
    assert_eq!(a.p99_holds, Some(true));
    assert!((a.p99_ratio.unwrap() - 250.0 / 600.0).abs() < 1e-9);
    assert_eq!(a.ideal_hit_rate, Some(0.84));
    assert_eq!(a.hit_holds, Some(true));
    let md = markdown::markdown(&r);
    assert!(
        md.contains("Round robin saturates at **90 requests/s**"),
        "{md}"
    );
    assert_eq!(
        report::heaviest_unsaturated(&r.systems[0].points),
        Some(90.0)
    );
    assert_eq!(
        report::heaviest_unsaturated(&r.systems[1].points),
        Some(40.0)
    );
}

#[test]
fn report_files() {
    let r = sample();
    let out = crate::compare::systems::TempDir::new().unwrap();
    report::write_all(&r, &out.0).unwrap();
    for f in ["results.md", "results.json", "ttft_p99.svg"] {
        assert!(out.0.join(f).is_file(), "{f}");
    }
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.0.join("results.json")).unwrap())
            .unwrap();
    assert_eq!(json["systems"].as_array().unwrap().len(), 5);
    assert_eq!(json["acceptance"]["round_robin_saturates_at"], 90.0);
}

#[test]
fn arguments() {
    let a = FleetArgs::defaults();
    assert_eq!(a.hosts, 4);
    assert_eq!(a.slots, 4);
    assert_eq!(a.rates.len(), 5);
    assert_eq!(selected(&[]).unwrap().len(), 8);
    assert_eq!(
        selected(&["cubegate".into(), "sglang_router".into()]).unwrap(),
        vec![System::Cubegate("auto"), System::SglangRouter]
    );
    assert!(selected(&["envoy".into()]).is_err());
    for s in System::ALL {
        assert_eq!(System::parse(&s.name()), Some(s));
    }
    let mut b = a.clone();
    b.rates = vec![0.0];
    assert!(run(&b, &mut |_| {}).is_err());
}

/// The real thing, briefly: 2 hosts, one rate, cubegate only (peers named on the command
/// line but not installed are reported failed, not run).
#[test]
fn smoke_fleet() {
    if compare::systems::find_sibling("cubegate-bench").is_none() {
        eprintln!("smoke_fleet: no cubegate-bench binary built; run `cargo build`");
        return;
    }
    let mut a = FleetArgs::defaults();
    a.hosts = 2;
    a.duration = 1.0;
    a.warmup = Some(0.5);
    a.rates = vec![20.0];
    a.system_tokens = 200;
    a.cache_tokens = 4096;
    a.connections = 64;
    a.systems = vec!["cubegate-auto".into()];
    a.no_faults = true;
    let mut log = Vec::new();
    let r = run(&a, &mut |s| log.push(s.to_string())).expect("fleet runs");
    eprintln!("smoke_fleet: {log:?}");
    let cg = &r.systems[0];
    if systems::cubegate_binary().is_none() {
        assert!(cg.status.starts_with("failed: not built"), "{}", cg.status);
        return;
    }
    assert_eq!(cg.status, "ok", "{log:?}");
    let p = &cg.points[0];
    assert_eq!(p.status, "ok", "{log:?}");
    assert!(p.ok > 0 && p.ttft_p50_ms > 0.0, "{p:?}");
    assert_eq!(p.host_streams.len(), 2);
    assert!(p.hit_rate.is_some_and(|h| h > 0.0), "{p:?}");
    assert!(r.ideal[0].hit_rate > 0.0);
    let md = markdown::markdown(&r);
    assert!(md.contains("| cubegate-auto |"), "{md}");
}
