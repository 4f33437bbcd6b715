//! What compare found, and how it is shown: a Markdown report (stdout and `results.md`),
//! `results.json`, and two SVG charts (drawn by `svg.rs`): `latency.svg` (p50/p90/p99 per
//! system at the fixed open-loop rate) and `cpu.svg` (proxy CPU seconds per 1,000 requests).

use super::svg::bars;
use crate::load::report::Summary;
use serde::Serialize;
use std::fmt::Write as _;
use std::path::Path;

/// One measurement of one system.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct Phase {
    pub requests_per_s: f64,
    pub sent: u64,
    /// Answered with a 2xx.
    pub ok: u64,
    /// Non-2xx answers, failed requests and (open loop) requests never sent.
    pub bad: u64,
    pub p50_us: u64,
    pub p90_us: u64,
    pub p99_us: u64,
    pub max_us: u64,
    /// Streams: time to the first event (token), from the intended send time.
    pub ttft_p50_us: u64,
    pub ttft_p99_us: u64,
    /// Streams: time between consecutive events.
    pub gap_p50_us: u64,
    pub gap_p99_us: u64,
    /// CPU seconds of the proxy's processes during this measurement.
    pub cpu_s: Option<f64>,
}

impl Phase {
    pub fn of(s: &Summary, cpu_s: Option<f64>) -> Phase {
        let l = &s.latency_us;
        Phase {
            requests_per_s: s.requests_per_s,
            sent: s.sent,
            ok: s.ok,
            bad: (s.completed - s.ok.min(s.completed)) + s.errors_total + s.unsent,
            p50_us: l.total.p50,
            p90_us: l.total.p90,
            p99_us: l.total.p99,
            max_us: l.total.max,
            ttft_p50_us: l.first_event.p50,
            ttft_p99_us: l.first_event.p99,
            gap_p50_us: l.between_events.p50,
            gap_p99_us: l.between_events.p99,
            cpu_s,
        }
    }
}

/// One system's row.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SystemResult {
    pub name: String,
    pub label: String,
    /// "ok", "skipped (…)" or "failed: …".
    pub status: String,
    pub version: Option<String>,
    pub notes: Vec<String>,
    /// Closed loop, `connections` connections.
    pub closed: Option<Phase>,
    /// Open loop at `open_rate`.
    pub open: Option<Phase>,
    /// One connection, closed loop.
    pub single: Option<Phase>,
    /// Streams, open loop at `stream_rate`.
    pub stream: Option<Phase>,
    /// The open-loop rates this system was measured at: the settings' rates, or half its
    /// closed-loop rate when that is lower (see the notes).
    pub open_rate: Option<f64>,
    pub stream_rate: Option<f64>,
    /// Proxy CPU seconds per 1,000 requests (closed loop).
    pub cpu_s_per_1k: Option<f64>,
    /// Peak RSS of the proxy's processes, KiB (sum of VmHWM).
    pub peak_rss_kib: Option<u64>,
}

impl SystemResult {
    pub fn measured(&self) -> bool {
        self.status == "ok"
    }

    /// The name, with the rate it was measured at when that is below `asked` (the
    /// column headers name the asked rates).
    fn name_at(&self, rate: Option<f64>, asked: f64, unit: &str) -> String {
        match rate {
            Some(r) if r < asked => format!("{} (at {r:.1} {unit}/s)", self.name),
            _ => self.name.clone(),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    pub nproc: usize,
    pub cpu_model: String,
    pub kernel: String,
    pub proxy_cpus: Option<Vec<usize>>,
    pub load_cpus: Vec<usize>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Settings {
    pub duration_s: f64,
    pub warmup_s: f64,
    pub rate: f64,
    pub stream_rate: f64,
    pub connections: usize,
    pub tokens: u64,
    pub stream_tokens: u64,
    pub token_delay_us: u64,
    pub proxy_workers: usize,
    pub load_threads: usize,
    /// Clients spoke HTTPS to the proxies.
    pub tls: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub date: String,
    pub commit: Option<String>,
    pub machine: Machine,
    pub cubegate_driver: Option<String>,
    pub settings: Settings,
    pub systems: Vec<SystemResult>,
}

impl Report {
    fn system(&self, name: &str) -> Option<&SystemResult> {
        self.systems.iter().find(|s| s.name == name && s.measured())
    }
}

/// `YYYY-MM-DD HH:MM UTC` of a Unix time.
pub fn utc_date(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02} UTC",
        rem / 3600,
        (rem % 3600) / 60
    )
}

const DASH: &str = "—";

fn ms(us: u64) -> String {
    format!("{:.3}", us as f64 / 1000.0)
}

fn added(v: u64, base: u64) -> String {
    let d = v as i64 - base as i64;
    if d >= 0 {
        format!("+{d}")
    } else {
        format!("−{}", -d)
    }
}

/// `a / b` with two decimals, or two significant digits below 0.1 (cubegate against a
/// Python gateway is ~0.002×, which two decimals would show as 0.00×).
pub fn ratio(a: f64, b: f64) -> String {
    if !(a.is_finite() && b.is_finite() && a > 0.0 && b > 0.0) {
        return DASH.into();
    }
    let r = a / b;
    let decimals = if r >= 0.1 {
        2
    } else {
        (1 - r.log10().floor() as i64).clamp(2, 9) as usize
    };
    format!("{r:.decimals$}×")
}

fn row(cells: &[String]) -> String {
    format!("| {} |\n", cells.join(" | "))
}

fn header(cols: &[&str]) -> String {
    let mut s = row(&cols.iter().map(|c| c.to_string()).collect::<Vec<_>>());
    let align: Vec<String> = cols
        .iter()
        .enumerate()
        .map(|(i, _)| if i == 0 { "---".into() } else { "---:".into() })
        .collect();
    s.push_str(&row(&align));
    s
}

/// A row for a system that was not measured: its status, then dashes.
fn unmeasured(s: &SystemResult, cols: usize) -> String {
    let mut cells = vec![s.name.clone(), s.status.replace('|', "/")];
    cells.resize(cols, DASH.into());
    row(&cells)
}

/// A bench report's title line: `## cubegate-bench <what> — <date>, commit <commit>`.
pub fn heading(what: &str, date: &str, commit: Option<&str>) -> String {
    let commit = commit.map(|c| format!(", commit {c}")).unwrap_or_default();
    format!("## cubegate-bench {what} — {date}{commit}\n\n")
}

/// The whole Markdown report.
pub fn markdown(r: &Report) -> String {
    let mut s = String::new();
    let st = &r.settings;
    let m = &r.machine;
    s.push_str(&heading("compare", &r.date, r.commit.as_deref()));
    let pin = match &m.proxy_cpus {
        Some(p) => format!(
            "proxy pinned to CPU {:?}, load generator and simulators to CPU {:?}",
            p, m.load_cpus
        ),
        None => "nothing pinned".into(),
    };
    let _ = writeln!(
        s,
        "- Machine: {} CPUs ({}), Linux {}; {pin}.",
        m.nproc, m.cpu_model, m.kernel
    );
    let _ = writeln!(
        s,
        "- cubegate driver: {}.",
        r.cubegate_driver.as_deref().unwrap_or("not run")
    );
    let versions: Vec<String> = r
        .systems
        .iter()
        .filter_map(|x| x.version.as_ref().map(|v| format!("{}: {v}", x.name)))
        .collect();
    if !versions.is_empty() {
        let _ = writeln!(s, "- Versions: {}.", versions.join("; "));
    }
    let _ = writeln!(
        s,
        "- Load: vLLM simulator; whole answers of {} tokens; {} s per measurement after {} s \
         warmup; each proxy has {} worker(s); throughput closed loop with {} connections; \
         latency open loop at {} requests/s and at concurrency 1; streams of {} tokens {} µs \
         apart, open loop at {} streams/s (both lower for a system that forwards less than \
         twice that: the rate is then by its name).",
        st.tokens,
        st.duration_s,
        st.warmup_s,
        st.proxy_workers,
        st.connections,
        st.rate,
        st.stream_tokens,
        st.token_delay_us,
        st.stream_rate
    );
    if st.tls {
        let _ = writeln!(
            s,
            "- Clients speak HTTPS (TLS 1.3, kept-alive connections) to every proxy; `direct` \
             is plain HTTP to the simulator."
        );
    }
    let _ = writeln!(
        s,
        "- Latencies in ms; \"added\" = this system minus direct, in µs. CPU = the proxy's own \
         CPU seconds (/proc utime+stime) per 1,000 requests in the closed loop. RSS = peak \
         (VmHWM, summed over the proxy's processes). Errors = non-2xx, failed or unsent \
         requests over all measurements.\n"
    );

    let rate = st.rate;
    let direct = r.system("direct");
    let cols = [
        "system",
        "req/s",
        &format!("p50 @{rate}/s"),
        &format!("p99 @{rate}/s"),
        "added p50",
        "added p99",
        "p50 @c1",
        "p99 @c1",
        "added p50 @c1",
        "added p99 @c1",
        "CPU s / 1k req",
        "peak RSS MiB",
        "errors",
    ]
    .map(|c| c.to_string());
    let cols: Vec<&str> = cols.iter().map(String::as_str).collect();
    let _ = writeln!(s, "### Whole answers\n");
    s.push_str(&header(&cols));
    for x in &r.systems {
        let (Some(c), Some(o), Some(one)) = (&x.closed, &x.open, &x.single) else {
            s.push_str(&unmeasured(x, cols.len()));
            continue;
        };
        let base = |f: fn(&SystemResult) -> Option<u64>, v: u64| match direct.and_then(f) {
            Some(b) => added(v, b),
            None => DASH.into(),
        };
        let errors: u64 = [&x.closed, &x.open, &x.single, &x.stream]
            .iter()
            .filter_map(|p| p.as_ref().map(|p| p.bad))
            .sum();
        s.push_str(&row(&[
            x.name_at(x.open_rate, st.rate, "requests"),
            format!("{:.0}", c.requests_per_s),
            ms(o.p50_us),
            ms(o.p99_us),
            base(|d| d.open.as_ref().map(|p| p.p50_us), o.p50_us),
            base(|d| d.open.as_ref().map(|p| p.p99_us), o.p99_us),
            ms(one.p50_us),
            ms(one.p99_us),
            base(|d| d.single.as_ref().map(|p| p.p50_us), one.p50_us),
            base(|d| d.single.as_ref().map(|p| p.p99_us), one.p99_us),
            x.cpu_s_per_1k.map_or(DASH.into(), |c| format!("{c:.3}")),
            x.peak_rss_kib
                .map_or(DASH.into(), |k| format!("{:.1}", k as f64 / 1024.0)),
            errors.to_string(),
        ]));
    }

    let _ = writeln!(s, "\n### Streams\n");
    let cols = [
        "system",
        "TTFT p50",
        "TTFT p99",
        "added TTFT p50",
        "added TTFT p99",
        "chunk gap p50",
        "chunk gap p99",
        "added gap p50",
        "added gap p99",
    ];
    s.push_str(&header(&cols));
    for x in &r.systems {
        let Some(p) = &x.stream else {
            s.push_str(&unmeasured(x, cols.len()));
            continue;
        };
        let ds = direct.and_then(|d| d.stream.as_ref());
        let base = |f: fn(&Phase) -> u64| match ds {
            Some(b) => added(f(p), f(b)),
            None => DASH.into(),
        };
        s.push_str(&row(&[
            x.name_at(x.stream_rate, st.stream_rate, "streams"),
            ms(p.ttft_p50_us),
            ms(p.ttft_p99_us),
            base(|q| q.ttft_p50_us),
            base(|q| q.ttft_p99_us),
            ms(p.gap_p50_us),
            ms(p.gap_p99_us),
            base(|q| q.gap_p50_us),
            base(|q| q.gap_p99_us),
        ]));
    }

    if let Some(cg) = r.system("cubegate") {
        let peers: Vec<&SystemResult> = r
            .systems
            .iter()
            .filter(|x| x.measured() && x.name != "cubegate" && x.name != "direct")
            .collect();
        if !peers.is_empty() {
            let _ = writeln!(
                s,
                "\n### cubegate / peer\n\nBelow 1× is better for cubegate, except req/s. Added \
                 latency ratios compare what each adds over direct (— when the peer adds \
                 nothing measurable).\n"
            );
            let cols = [
                "peer",
                "req/s",
                "added p50",
                "added p99",
                "added p50 @c1",
                "CPU / 1k req",
                "peak RSS",
                "added TTFT p50",
            ];
            s.push_str(&header(&cols));
            let add = |x: &SystemResult, f: fn(&SystemResult) -> Option<u64>| -> f64 {
                match (f(x), direct.and_then(f)) {
                    (Some(v), Some(b)) => v as f64 - b as f64,
                    _ => f64::NAN,
                }
            };
            let fns: [fn(&SystemResult) -> Option<u64>; 4] = [
                |x| x.open.as_ref().map(|p| p.p50_us),
                |x| x.open.as_ref().map(|p| p.p99_us),
                |x| x.single.as_ref().map(|p| p.p50_us),
                |x| x.stream.as_ref().map(|p| p.ttft_p50_us),
            ];
            for p in peers {
                let rps =
                    |x: &SystemResult| x.closed.as_ref().map_or(f64::NAN, |c| c.requests_per_s);
                let mut cells = vec![p.name.clone(), ratio(rps(cg), rps(p))];
                for f in &fns[..3] {
                    cells.push(ratio(add(cg, *f), add(p, *f)));
                }
                cells.push(ratio(
                    cg.cpu_s_per_1k.unwrap_or(f64::NAN),
                    p.cpu_s_per_1k.unwrap_or(f64::NAN),
                ));
                cells.push(ratio(
                    cg.peak_rss_kib.map_or(f64::NAN, |k| k as f64),
                    p.peak_rss_kib.map_or(f64::NAN, |k| k as f64),
                ));
                cells.push(ratio(add(cg, fns[3]), add(p, fns[3])));
                s.push_str(&row(&cells));
            }
        }
    }
    let notes: Vec<String> = r
        .systems
        .iter()
        .flat_map(|x| x.notes.iter().map(move |n| format!("{}: {n}", x.name)))
        .collect();
    if !notes.is_empty() {
        let _ = writeln!(s, "\nNotes: {}.", notes.join("; "));
    }
    s
}

/// Latency percentiles per system at the fixed open-loop rate.
pub fn svg_latency(r: &Report) -> String {
    let groups: Vec<(String, Vec<f64>)> = r
        .systems
        .iter()
        .filter(|x| x.measured())
        .filter_map(|x| {
            let o = x.open.as_ref()?;
            let v = [o.p50_us, o.p90_us, o.p99_us].map(|u| u as f64 / 1000.0);
            Some((
                x.name_at(x.open_rate, r.settings.rate, "requests"),
                v.to_vec(),
            ))
        })
        .collect();
    bars(
        &format!(
            "Latency at {} requests/s (open loop, whole answers)",
            r.settings.rate
        ),
        &format!(
            "{}{}, {} CPUs, Linux {}",
            r.date,
            r.commit
                .as_deref()
                .map(|c| format!(", commit {c}"))
                .unwrap_or_default(),
            r.machine.nproc,
            r.machine.kernel
        ),
        "ms",
        &[("p50", "#4e79a7"), ("p90", "#f28e2b"), ("p99", "#e15759")],
        &groups,
    )
}

/// Proxy CPU seconds per 1,000 requests per system.
pub fn svg_cpu(r: &Report) -> String {
    let groups: Vec<(String, Vec<f64>)> = r
        .systems
        .iter()
        .filter(|x| x.measured())
        .filter_map(|x| Some((x.name.clone(), vec![x.cpu_s_per_1k?])))
        .collect();
    bars(
        "Proxy CPU seconds per 1,000 requests (closed loop)",
        &format!(
            "{}{}, {} connections, {} worker(s) per proxy",
            r.date,
            r.commit
                .as_deref()
                .map(|c| format!(", commit {c}"))
                .unwrap_or_default(),
            r.settings.connections,
            r.settings.proxy_workers
        ),
        "CPU s / 1k requests",
        &[("cpu", "#59a14f")],
        &groups,
    )
}

/// Writes results.md, results.json, latency.svg and cpu.svg into `dir`.
pub fn write_all(r: &Report, dir: &Path) -> std::io::Result<()> {
    let svgs = [("latency.svg", svg_latency(r)), ("cpu.svg", svg_cpu(r))];
    write_results(dir, &markdown(r), r, &svgs)
}

/// Writes a bench report into `dir`: `results.md`, `results.json` and the charts (file
/// name, SVG text).
pub fn write_results(
    dir: &Path,
    markdown: &str,
    report: &impl Serialize,
    svgs: &[(&str, String)],
) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join("results.md"), markdown)?;
    let json = serde_json::to_string_pretty(report).map_err(std::io::Error::other)?;
    std::fs::write(dir.join("results.json"), json + "\n")?;
    for (name, svg) in svgs {
        std::fs::write(dir.join(name), svg)?;
    }
    Ok(())
}
