//! Tests of compare: the report's rendering (Markdown rows, well-formed SVG with one bar
//! per system), the token it signs, and a smoke run of the real thing for about a second
//! per system (direct and cubegate at least; nginx and HAProxy when installed, otherwise
//! reported skipped). No timing assertion: figures belong in the benchmark output.

use super::report::{self, Machine, Phase, Report, Settings, SystemResult};
use super::*;

fn phase(p50: u64, p99: u64, rps: f64) -> Phase {
    Phase {
        requests_per_s: rps,
        sent: 1000,
        ok: 1000,
        bad: 0,
        p50_us: p50,
        p90_us: (p50 + p99) / 2,
        p99_us: p99,
        max_us: p99 * 2,
        ttft_p50_us: p50 + 10,
        ttft_p99_us: p99 + 10,
        gap_p50_us: 1000,
        gap_p99_us: 1100,
        cpu_s: Some(1.5),
    }
}

fn measured(name: &str, p50: u64, cpu: Option<f64>) -> SystemResult {
    SystemResult {
        name: name.into(),
        label: name.into(),
        status: "ok".into(),
        version: Some(format!("{name} 1.0")),
        notes: Vec::new(),
        closed: Some(phase(p50, p50 * 3, 10_000.0 - p50 as f64)),
        open: Some(phase(p50, p50 * 3, 500.0)),
        single: Some(phase(p50 / 2, p50, 2000.0)),
        stream: Some(phase(p50, p50 * 2, 100.0)),
        open_rate: Some(500.0),
        stream_rate: Some(100.0),
        cpu_s_per_1k: cpu,
        peak_rss_kib: cpu.map(|_| 10 * 1024),
    }
}

fn sample() -> Report {
    Report {
        date: "2026-01-02 03:04 UTC".into(),
        commit: Some("abc1234".into()),
        machine: Machine {
            nproc: 2,
            cpu_model: "Test <CPU> & co".into(),
            kernel: "6.1.0".into(),
            proxy_cpus: Some(vec![1]),
            load_cpus: vec![0],
        },
        cubegate_driver: Some("Uring (auto)".into()),
        settings: Settings {
            duration_s: 1.0,
            warmup_s: 0.25,
            rate: 500.0,
            stream_rate: 100.0,
            connections: 32,
            tokens: 16,
            stream_tokens: 32,
            token_delay_us: 1000,
            proxy_workers: 1,
            load_threads: 1,
            tls: false,
        },
        systems: vec![
            measured("direct", 100, None),
            measured("cubegate", 150, Some(0.02)),
            measured("nginx", 140, Some(0.015)),
            SystemResult {
                name: "haproxy-jwt".into(),
                label: "x".into(),
                status: "skipped (not installed)".into(),
                ..SystemResult::default()
            },
            SystemResult {
                name: "litellm".into(),
                label: "x".into(),
                status: "failed: exited | badly".into(),
                ..SystemResult::default()
            },
        ],
    }
}

/// The rows of the Markdown table under `heading` (header and alignment rows included).
fn table<'a>(md: &'a str, heading: &str) -> Vec<&'a str> {
    md.split(heading)
        .nth(1)
        .unwrap_or("")
        .lines()
        .skip_while(|l| !l.starts_with('|'))
        .take_while(|l| l.starts_with('|'))
        .collect()
}

fn cells(row: &str) -> Vec<String> {
    let inner = row.trim().trim_start_matches('|').trim_end_matches('|');
    inner.split('|').map(|c| c.trim().to_string()).collect()
}

#[test]
fn markdown_rows() {
    let md = report::markdown(&sample());
    assert!(md.contains("2026-01-02 03:04 UTC, commit abc1234"));
    assert!(md.contains("Uring (auto)"));
    let t = table(&md, "### Whole answers");
    assert_eq!(t.len(), 2 + 5, "{md}");
    let width = cells(t[0]).len();
    for r in &t {
        assert_eq!(cells(r).len(), width, "row {r}");
    }
    let cg = cells(t[3]);
    assert_eq!(cg[0], "cubegate");
    assert_eq!(cg[1], "9850"); // req/s
    assert_eq!(cg[2], "0.150"); // p50 @rate, ms
    assert_eq!(cg[4], "+50"); // added p50, µs
    assert_eq!(cg[5], "+150"); // added p99
    assert_eq!(cg[10], "0.020"); // CPU s / 1k
    assert_eq!(cg[11], "10.0"); // RSS MiB
    let direct = cells(t[2]);
    assert_eq!(direct[10], "—");
    let skipped = cells(t[5]);
    assert_eq!(skipped[0], "haproxy-jwt");
    assert_eq!(skipped[1], "skipped (not installed)");
    let failed = cells(t[6]);
    assert_eq!(failed[1], "failed: exited / badly");
    assert_eq!(failed.len(), width);

    let s = table(&md, "### Streams");
    assert_eq!(s.len(), 2 + 5);
    let cg = cells(s[3]);
    assert_eq!(cg[1], "0.160");
    assert_eq!(cg[3], "+50");
    assert_eq!(cg[7], "+0");

    let r = table(&md, "### cubegate / peer");
    assert_eq!(r.len(), 3, "{md}");
    let n = cells(r[2]);
    assert_eq!(n[0], "nginx");
    assert_eq!(n[3], "1.25×"); // added p99: (450 - 300) / (420 - 300)
    assert_eq!(n[5], "1.33×"); // CPU 0.02 / 0.015
    assert_eq!(n[6], "1.00×"); // RSS
}

/// A system measured below the asked rates says so by its name, in both tables and the
/// latency chart; the others keep their plain names.
#[test]
fn a_row_measured_at_a_lower_rate_names_it() {
    let mut r = sample();
    r.systems[2].open_rate = Some(31.25);
    r.systems[2].stream_rate = Some(6.25);
    r.systems[1].open_rate = Some(500.0);
    r.systems[1].stream_rate = Some(100.0);
    let md = report::markdown(&r);
    assert_eq!(
        cells(table(&md, "### Whole answers")[4])[0],
        "nginx (at 31.2 requests/s)"
    );
    assert_eq!(
        cells(table(&md, "### Streams")[4])[0],
        "nginx (at 6.2 streams/s)"
    );
    assert_eq!(cells(table(&md, "### Whole answers")[3])[0], "cubegate");
    assert!(report::svg_latency(&r).contains("nginx (at 31.2 requests/s)"));
}

#[test]
fn open_loop_rates_stay_below_what_a_system_carries() {
    // Far above the asked rate: the asked rates.
    let r = OpenLoopRates::for_system(500.0, 100.0, 40_000.0);
    assert_eq!((r.rate, r.stream_rate, r.lowered), (500.0, 100.0, false));
    // Exactly twice: still the asked rates.
    assert!(!OpenLoopRates::for_system(500.0, 100.0, 1000.0).lowered);
    // A system that forwards 60/s: half of that, streams scaled alike.
    let r = OpenLoopRates::for_system(500.0, 100.0, 60.0);
    assert_eq!((r.rate, r.stream_rate, r.lowered), (30.0, 6.0, true));
    // Nothing measured: left as asked (that system is failed before it matters).
    assert!(!OpenLoopRates::for_system(500.0, 100.0, 0.0).lowered);
    assert!(!OpenLoopRates::for_system(500.0, 100.0, f64::NAN).lowered);
}

/// Checks that every element opened is closed in order, and nothing is left open.
fn well_formed(svg: &str) -> Result<(), String> {
    let mut stack: Vec<String> = Vec::new();
    let mut rest = svg;
    while let Some(i) = rest.find('<') {
        rest = &rest[i + 1..];
        let end = rest.find('>').ok_or("unterminated tag")?;
        let tag = &rest[..end];
        rest = &rest[end + 1..];
        if let Some(name) = tag.strip_prefix('/') {
            let open = stack.pop().ok_or(format!("</{name}> closes nothing"))?;
            if open != name.trim() {
                return Err(format!("<{open}> closed by </{name}>"));
            }
        } else if !tag.ends_with('/') {
            let name = tag.split_whitespace().next().ok_or("empty tag")?;
            stack.push(name.to_string());
        }
        if tag.contains('<') {
            return Err(format!("'<' inside a tag: {tag}"));
        }
    }
    if stack.is_empty() {
        Ok(())
    } else {
        Err(format!("left open: {stack:?}"))
    }
}

#[test]
fn svgs_are_well_formed_with_one_bar_per_system() {
    let r = sample();
    let lat = report::svg_latency(&r);
    assert!(lat.starts_with("<svg"), "{lat}");
    assert!(lat.trim_end().ends_with("</svg>"));
    well_formed(&lat).unwrap();
    // Three measured systems: one p50 bar each (and one p90, one p99).
    for key in ["p50", "p90", "p99"] {
        assert_eq!(lat.matches(&format!("class=\"bar {key}\"")).count(), 3);
    }
    for name in ["direct", "cubegate", "nginx"] {
        assert!(lat.contains(&format!("data-system=\"{name}\"")));
    }
    assert!(!lat.contains("haproxy-jwt"));
    let cpu = report::svg_cpu(&r);
    assert!(cpu.starts_with("<svg"));
    well_formed(&cpu).unwrap();
    // Direct has no proxy process: bars for cubegate and nginx only.
    assert_eq!(cpu.matches("class=\"bar cpu\"").count(), 2);
    assert!(!cpu.contains("data-system=\"direct\""));
    // Text is escaped.
    let mut r2 = r.clone();
    r2.systems[1].name = "a<b&c".into();
    let lat = report::svg_latency(&r2);
    well_formed(&lat).unwrap();
    assert!(lat.contains("a&lt;b&amp;c"));
    // Nothing measured: still a valid, empty chart.
    let mut empty = r;
    empty.systems.clear();
    well_formed(&report::svg_latency(&empty)).unwrap();
    well_formed(&report::svg_cpu(&empty)).unwrap();
}

#[test]
fn checker_catches_bad_svg() {
    assert!(well_formed("<svg><rect></svg>").is_err());
    assert!(well_formed("<svg><g></g>").is_err());
    assert!(well_formed("<svg><g/></svg>").is_ok());
}

#[test]
fn axis_steps() {
    assert_eq!(svg::nice_step(10.0), 2.0);
    assert_eq!(svg::nice_step(1.0), 0.2);
    assert_eq!(svg::nice_step(0.03), 0.01);
    assert_eq!(svg::nice_step(700.0), 200.0);
    assert_eq!(svg::nice_step(0.0), 1.0);
}

#[test]
fn ratios_keep_two_significant_digits_when_small() {
    assert_eq!(report::ratio(3.0, 2.0), "1.50×");
    assert_eq!(report::ratio(0.1, 1.0), "0.10×");
    assert_eq!(report::ratio(0.023, 12.405), "0.0019×");
    assert_eq!(report::ratio(0.02, 1.0), "0.020×");
    assert_eq!(report::ratio(1.0, 0.0), "—");
    assert_eq!(report::ratio(f64::NAN, 1.0), "—");
}

#[test]
fn dates() {
    assert_eq!(report::utc_date(0), "1970-01-01 00:00 UTC");
    assert_eq!(report::utc_date(951_782_400), "2000-02-29 00:00 UTC");
    assert_eq!(report::utc_date(1_767_323_045), "2026-01-02 03:04 UTC");
}

#[test]
fn signed_token_verifies() {
    use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
    use base64::Engine;
    let t = sign_hs256(b"0123456789abcdef0123456789abcdef", 1_700_000_000);
    let parts: Vec<&str> = t.split('.').collect();
    assert_eq!(parts.len(), 3);
    let header: serde_json::Value = serde_json::from_slice(&B64.decode(parts[0]).unwrap()).unwrap();
    assert_eq!(header["alg"], "HS256");
    let claims: serde_json::Value = serde_json::from_slice(&B64.decode(parts[1]).unwrap()).unwrap();
    assert_eq!(claims["iss"], systems::ISSUER);
    assert_eq!(claims["exp"], 1_700_086_400u64);
    assert_eq!(claims["domains"][0], systems::FAST_DOMAIN);
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, b"0123456789abcdef0123456789abcdef");
    let input = format!("{}.{}", parts[0], parts[1]);
    ring::hmac::verify(&key, input.as_bytes(), &B64.decode(parts[2]).unwrap()).unwrap();
}

#[test]
fn arguments() {
    let a = CompareArgs::defaults();
    assert_eq!(a.duration, 10.0);
    assert_eq!(a.rate, 500.0);
    assert_eq!(a.out, PathBuf::from("bench/results"));
    assert_eq!(selected(&a).unwrap(), Kind::ALL.to_vec());
    let mut b = a.clone();
    b.systems = vec!["cubegate".into(), "direct".into(), "cubegate".into()];
    assert_eq!(selected(&b).unwrap(), vec![Kind::Cubegate, Kind::Direct]);
    b.systems = vec!["envoy".into()];
    assert!(selected(&b).unwrap_err().contains("envoy"));
    let mut c = a;
    c.duration = 0.0;
    assert!(run(&c, &mut |_| {}).is_err());
}

/// The real thing, briefly: about a second of load per system (four measurements of
/// 0.25 s after 0.1 s of warmup); ~8 s in all with nginx and HAProxy installed, ~25 s
/// more with LiteLLM (its start). Every system installed must be measured.
#[test]
fn smoke_compare() {
    if systems::find_sibling("cubegate-bench").is_none() {
        eprintln!("smoke_compare: no cubegate-bench binary built; run `cargo build --release`");
        return;
    }
    let have_cubegate = systems::find_sibling("cubegate").is_some();
    let mut a = CompareArgs::defaults();
    a.duration = 0.25;
    a.warmup = Some(0.1);
    a.rate = 200.0;
    a.connections = 4;
    a.systems = vec![
        "direct".into(),
        "cubegate".into(),
        "nginx".into(),
        "haproxy-jwt".into(),
        "haproxy-tcp".into(),
        "litellm".into(),
    ];
    let started = Instant::now();
    let mut log = Vec::new();
    let r = run(&a, &mut |s| log.push(s.to_string())).expect("compare runs");
    // Bounded by construction (measurement lengths, start and request timeouts); shown,
    // not asserted: no timing assertion in tests.
    eprintln!(
        "smoke_compare: {:.1} s; {log:?}",
        started.elapsed().as_secs_f64()
    );
    let status = |n: &str| {
        r.systems
            .iter()
            .find(|s| s.name == n)
            .map(|s| s.status.clone())
            .unwrap()
    };
    assert_eq!(status("direct"), "ok");
    if have_cubegate {
        assert_eq!(status("cubegate"), "ok", "{log:?}");
        assert!(r.cubegate_driver.is_some());
        let cg = r.systems.iter().find(|s| s.name == "cubegate").unwrap();
        assert!(cg.closed.as_ref().unwrap().ok > 0);
        assert!(cg.stream.as_ref().unwrap().ok > 0);
        assert!(cg.peak_rss_kib.unwrap() > 0);
        assert!(cg.cpu_s_per_1k.is_some());
    } else {
        eprintln!(
            "smoke_compare: no cubegate binary built; {}",
            status("cubegate")
        );
    }
    for (name, program) in [
        ("nginx", "nginx"),
        ("haproxy-jwt", "haproxy"),
        ("haproxy-tcp", "haproxy"),
        ("litellm", "litellm"),
    ] {
        let st = status(name);
        if systems::find_program(program).is_some() {
            assert_eq!(st, "ok", "{name}: {log:?}");
        } else {
            assert_eq!(st, "skipped (not installed)");
        }
    }
    let md = report::markdown(&r);
    assert!(md.contains("| direct |"));
    let out = systems::TempDir::new().unwrap();
    report::write_all(&r, &out.0).unwrap();
    for f in ["results.md", "results.json", "latency.svg", "cpu.svg"] {
        assert!(out.0.join(f).is_file(), "{f}");
    }
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.0.join("results.json")).unwrap())
            .unwrap();
    assert_eq!(json["systems"].as_array().unwrap().len(), 6);
}

#[test]
fn repeated_rounds_keep_the_median() {
    use super::report::{Phase, SystemResult};
    let round = |rps: f64| SystemResult {
        name: "x".into(),
        status: "ok".into(),
        closed: Some(Phase {
            requests_per_s: rps,
            ..Phase::default()
        }),
        ..SystemResult::default()
    };
    let chosen = super::median_round(vec![round(30.0), round(10.0), round(20.0)]).unwrap();
    assert_eq!(chosen.closed.unwrap().requests_per_s, 20.0);
    assert!(chosen
        .notes
        .iter()
        .any(|n| n.contains("median of 3 rounds (req/s: 30, 10, 20)")));
    let failed = SystemResult {
        status: "failed: x".into(),
        ..SystemResult::default()
    };
    let only = super::median_round(vec![failed.clone(), round(5.0)]).unwrap();
    assert_eq!(only.closed.unwrap().requests_per_s, 5.0);
    assert_eq!(
        super::median_round(vec![failed]).unwrap().status,
        "failed: x"
    );
}

/// A measurement in which nothing was answered fails with what came back instead, never
/// passes as figures (LiteLLM once showed "ok" with 0 answers and 1,833 errors).
#[test]
fn a_system_that_answers_nothing_is_failed_with_the_reason() {
    // A port nothing listens on: every request is refused.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!(
        "http://{}/v1/chat/completions",
        closed.local_addr().unwrap()
    );
    drop(closed);
    let ep = Endpoint {
        url,
        model: "m".into(),
        cacert: None,
    };
    let mut a = load_args(&ep, None, LoadKind::Chat, 4);
    a.requests = Some(3);
    a.duration = Some(2.0);
    let s = load::run(&a).expect("the load generator itself runs");
    assert_eq!(s.ok, 0);
    let why = answered("closed-loop", &s).unwrap_err();
    assert!(why.contains("closed-loop") && why.contains('×'), "{why}");
}
