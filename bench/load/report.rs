//! What a load run measured and how it is shown. A [`Recorder`] per thread collects HDR
//! histograms (microseconds) of time to first byte, time to first event, the gap between
//! consecutive events and total time, plus status and error counts; the threads' recorders
//! are merged and turned into a [`Summary`], printed for humans or written as JSON.

use hdrhistogram::Histogram;
use serde::Serialize;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// Highest value a histogram holds, in microseconds (one hour); larger values saturate.
const MAX_US: u64 = 3_600_000_000;

/// Why a request failed (as opposed to being answered, whatever the status).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum ErrorKind {
    /// Could not open a connection (refused, unreachable, timed out).
    Connect,
    /// A read or write exceeded its timeout, or the request its deadline.
    Timeout,
    /// The server closed the connection before the response ended.
    Closed,
    /// A stream ended without its end marker (`data: [DONE]`, `"done":true`).
    Incomplete,
    /// Any other socket error.
    Io,
}

impl ErrorKind {
    fn name(self) -> &'static str {
        match self {
            ErrorKind::Connect => "connect",
            ErrorKind::Timeout => "timeout",
            ErrorKind::Closed => "closed",
            ErrorKind::Incomplete => "incomplete",
            ErrorKind::Io => "io",
        }
    }
}

/// When an answered request's milestones happened.
#[derive(Debug, Default)]
pub struct Milestones {
    pub first_byte: Option<Instant>,
    pub first_event: Option<Instant>,
    pub events: u64,
    pub bytes: u64,
}

/// A histogram of microseconds.
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_max(MAX_US, 3).expect("valid histogram bounds")
}

fn us(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// One thread's measurements.
pub struct Recorder {
    pub ttfb: Histogram<u64>,
    pub first_event: Histogram<u64>,
    pub gap: Histogram<u64>,
    pub total: Histogram<u64>,
    /// How late each request left after its intended time (the generator's own delay,
    /// or in an open loop, the wait for a free connection).
    pub send_lag: Histogram<u64>,
    pub statuses: BTreeMap<u16, u64>,
    pub errors: BTreeMap<&'static str, u64>,
    /// Of the failed requests, those that failed after their first event (a stream cut
    /// mid-way, as opposed to one that failed before its first token).
    pub failed_mid_stream: u64,
    /// Requests begun.
    pub sent: u64,
    /// Requests answered completely (any status).
    pub completed: u64,
    pub events: u64,
    pub bytes: u64,
    /// When the last request ended.
    pub last_done: Option<Instant>,
}

impl Default for Recorder {
    fn default() -> Self {
        Recorder {
            ttfb: histogram(),
            first_event: histogram(),
            gap: histogram(),
            total: histogram(),
            send_lag: histogram(),
            statuses: BTreeMap::new(),
            errors: BTreeMap::new(),
            failed_mid_stream: 0,
            sent: 0,
            completed: 0,
            events: 0,
            bytes: 0,
            last_done: None,
        }
    }
}

impl Recorder {
    pub fn lag(&mut self, d: Duration) {
        self.send_lag.saturating_record(us(d));
    }

    pub fn gap(&mut self, d: Duration) {
        self.gap.saturating_record(us(d));
    }

    /// A complete response; latencies count from `intended`, the time the request was
    /// meant to be sent (so a late send cannot hide queueing).
    pub fn response(&mut self, status: u16, intended: Instant, m: &Milestones, done: Instant) {
        *self.statuses.entry(status).or_default() += 1;
        self.completed += 1;
        self.events += m.events;
        self.bytes += m.bytes;
        if let Some(fb) = m.first_byte {
            self.ttfb
                .saturating_record(us(fb.saturating_duration_since(intended)));
        }
        if let Some(fe) = m.first_event {
            self.first_event
                .saturating_record(us(fe.saturating_duration_since(intended)));
        }
        self.total
            .saturating_record(us(done.saturating_duration_since(intended)));
        self.last_done = self.last_done.max(Some(done));
    }

    pub fn error(&mut self, k: ErrorKind) {
        *self.errors.entry(k.name()).or_default() += 1;
        self.last_done = self.last_done.max(Some(Instant::now()));
    }

    pub fn framing(&mut self, _what: &'static str) {
        *self.errors.entry("framing").or_default() += 1;
        self.last_done = self.last_done.max(Some(Instant::now()));
    }

    /// Adds another thread's measurements.
    pub fn merge(&mut self, o: &Recorder) {
        for (a, b) in [
            (&mut self.ttfb, &o.ttfb),
            (&mut self.first_event, &o.first_event),
            (&mut self.gap, &o.gap),
            (&mut self.total, &o.total),
            (&mut self.send_lag, &o.send_lag),
        ] {
            a.add(b).expect("histograms of equal bounds");
        }
        for (k, v) in &o.statuses {
            *self.statuses.entry(*k).or_default() += v;
        }
        for (k, v) in &o.errors {
            *self.errors.entry(k).or_default() += v;
        }
        self.failed_mid_stream += o.failed_mid_stream;
        self.sent += o.sent;
        self.completed += o.completed;
        self.events += o.events;
        self.bytes += o.bytes;
        self.last_done = self.last_done.max(o.last_done);
    }
}

/// Percentiles of one histogram, in microseconds.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Percentiles {
    pub count: u64,
    pub min: u64,
    pub mean: f64,
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub p999: u64,
    pub max: u64,
}

impl Percentiles {
    pub fn of(h: &Histogram<u64>) -> Percentiles {
        if h.is_empty() {
            return Percentiles {
                count: 0,
                min: 0,
                mean: 0.0,
                p50: 0,
                p90: 0,
                p99: 0,
                p999: 0,
                max: 0,
            };
        }
        Percentiles {
            count: h.len(),
            min: h.min(),
            mean: h.mean(),
            p50: h.value_at_quantile(0.50),
            p90: h.value_at_quantile(0.90),
            p99: h.value_at_quantile(0.99),
            p999: h.value_at_quantile(0.999),
            max: h.max(),
        }
    }
}

/// The run's settings, echoed in the output.
#[derive(Debug, Clone, Serialize)]
pub struct RunInfo {
    pub url: String,
    pub kind: String,
    pub model: String,
    pub connections: usize,
    pub threads: usize,
    /// Requests/s of an open-loop run; None = closed loop.
    pub rate: Option<f64>,
    pub duration_s: Option<f64>,
    pub requests: Option<u64>,
    pub tokens: Option<u64>,
    pub warmup_s: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Latencies {
    pub total: Percentiles,
    pub first_byte: Percentiles,
    pub first_event: Percentiles,
    pub between_events: Percentiles,
    pub send_lag: Percentiles,
}

/// Everything a run reports (the JSON output).
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub run: RunInfo,
    pub elapsed_s: f64,
    pub sent: u64,
    pub completed: u64,
    /// Completed with a 2xx status.
    pub ok: u64,
    /// Open loop: requests scheduled before the end that were never sent (all
    /// connections were busy): a sign the target could not keep up.
    pub unsent: u64,
    pub errors_total: u64,
    /// Of `errors_total`, those after the stream's first event (cut mid-way).
    pub errors_mid_stream: u64,
    pub requests_per_s: f64,
    pub events_per_s: f64,
    pub bytes_per_s: f64,
    pub events: u64,
    pub statuses: BTreeMap<String, u64>,
    pub errors: BTreeMap<String, u64>,
    pub latency_us: Latencies,
    /// With `--measure-pid`: the measured process's memory.
    pub memory: Option<Memory>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Memory {
    pub pid: u32,
    pub rss_start_kib: u64,
    pub peak_kib: u64,
    /// (peak − start) / connections.
    pub per_connection_bytes: f64,
}

impl Summary {
    pub fn new(run: RunInfo, r: &Recorder, elapsed: Duration, unsent: u64) -> Summary {
        let secs = elapsed.as_secs_f64().max(1e-9);
        let ok = r
            .statuses
            .iter()
            .filter(|(s, _)| (200..300).contains(*s))
            .map(|(_, n)| n)
            .sum();
        Summary {
            run,
            elapsed_s: elapsed.as_secs_f64(),
            sent: r.sent,
            completed: r.completed,
            ok,
            unsent,
            errors_total: r.errors.values().sum(),
            errors_mid_stream: r.failed_mid_stream,
            requests_per_s: r.completed as f64 / secs,
            events_per_s: r.events as f64 / secs,
            bytes_per_s: r.bytes as f64 / secs,
            events: r.events,
            statuses: r
                .statuses
                .iter()
                .map(|(k, v)| (k.to_string(), *v))
                .collect(),
            errors: r.errors.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
            latency_us: Latencies {
                total: Percentiles::of(&r.total),
                first_byte: Percentiles::of(&r.ttfb),
                first_event: Percentiles::of(&r.first_event),
                between_events: Percentiles::of(&r.gap),
                send_lag: Percentiles::of(&r.send_lag),
            },
            memory: None,
        }
    }

    /// The human summary.
    pub fn human(&self) -> String {
        use std::fmt::Write;
        let r = &self.run;
        let mut s = String::new();
        let mode = match r.rate {
            Some(rate) => format!("open loop at {rate} requests/s"),
            None => "closed loop".to_string(),
        };
        let _ = writeln!(s, "cubegate-bench load: {} {} ({})", r.kind, r.url, r.model);
        let _ = writeln!(
            s,
            "  {} connections, {} threads, {mode}, {:.2} s measured (+{} s warmup)",
            r.connections, r.threads, self.elapsed_s, r.warmup_s
        );
        if let Some(m) = &self.memory {
            let _ = writeln!(
                s,
                "  memory of pid {}: {} KiB at start, {} KiB peak: {:.0} bytes per connection",
                m.pid, m.rss_start_kib, m.peak_kib, m.per_connection_bytes
            );
        }
        let _ = writeln!(
            s,
            "  requests: {} sent, {} completed, {} 2xx, {} errors, {} unsent",
            self.sent, self.completed, self.ok, self.errors_total, self.unsent
        );
        let _ = writeln!(
            s,
            "  throughput: {:.1} requests/s, {:.1} events/s, {:.2} MiB/s body",
            self.requests_per_s,
            self.events_per_s,
            self.bytes_per_s / (1024.0 * 1024.0)
        );
        let _ = writeln!(
            s,
            "  latency (ms)     {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}",
            "count", "p50", "p90", "p99", "p99.9", "max", "mean"
        );
        let l = &self.latency_us;
        for (name, p) in [
            ("total", &l.total),
            ("first byte", &l.first_byte),
            ("first event", &l.first_event),
            ("between events", &l.between_events),
            ("send lag", &l.send_lag),
        ] {
            if p.count == 0 {
                continue;
            }
            let ms = |v: u64| v as f64 / 1000.0;
            let _ = writeln!(
                s,
                "    {name:<14} {:>9} {:>9.3} {:>9.3} {:>9.3} {:>9.3} {:>9.3} {:>9.3}",
                p.count,
                ms(p.p50),
                ms(p.p90),
                ms(p.p99),
                ms(p.p999),
                ms(p.max),
                p.mean / 1000.0
            );
        }
        let join = |m: &BTreeMap<String, u64>| {
            m.iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(" ")
        };
        if !self.statuses.is_empty() {
            let _ = writeln!(s, "  status: {}", join(&self.statuses));
        }
        if !self.errors.is_empty() {
            let _ = writeln!(s, "  errors: {}", join(&self.errors));
        }
        if self.errors_mid_stream > 0 {
            let _ = writeln!(
                s,
                "  of which after the first event (streams cut mid-way): {}",
                self.errors_mid_stream
            );
        }
        s
    }
}
