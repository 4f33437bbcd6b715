//! `cubegate-bench load`: drives chat requests (OpenAI or Ollama, streaming or not) at a
//! gateway or a backend and reports latency distributions and throughput.
//!
//! Each of `--threads` threads runs its own monoio runtime with its share of the
//! connections; each connection is a task that takes the next request from the thread's
//! [`schedule::Tickets`], sends it when it is due and records it (`client.rs`) into the
//! thread's [`report::Recorder`]. An optional warmup phase runs the same load and is
//! discarded; then all threads start measuring at one common instant. (With
//! [`LoadArgs::open_warmup`] the warmup is instead the first seconds of one continuous open
//! loop, so queues built during it carry over into the measurement.) At the end the
//! recorders are merged into a [`report::Summary`] (stdout, and `--json FILE`).

pub mod client;
pub mod http;
pub mod report;
pub mod schedule;

#[cfg(test)]
mod net_tests;
#[cfg(test)]
mod tests;

use bytes::Bytes;
use client::{Conn, Target};
use http::EventFormat;
use report::{Recorder, RunInfo, Summary};
use schedule::{Schedule, Tickets};
use std::cell::RefCell;
use std::net::{SocketAddr, ToSocketAddrs};
use std::rc::Rc;
use std::sync::{Arc, Barrier, OnceLock};
use std::time::{Duration, Instant};

/// What to send.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// OpenAI chat completion, whole answer.
    Chat,
    /// OpenAI chat completion streamed as SSE.
    ChatStream,
    /// Ollama /api/chat, whole answer.
    OllamaChat,
    /// Ollama /api/chat streamed as NDJSON.
    OllamaStream,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Chat => "chat",
            Kind::ChatStream => "chat-stream",
            Kind::OllamaChat => "ollama-chat",
            Kind::OllamaStream => "ollama-stream",
        }
    }
    fn ollama(self) -> bool {
        matches!(self, Kind::OllamaChat | Kind::OllamaStream)
    }
    fn events(self) -> Option<EventFormat> {
        match self {
            Kind::ChatStream => Some(EventFormat::Sse),
            Kind::OllamaStream => Some(EventFormat::Ndjson),
            _ => None,
        }
    }
    fn default_path(self) -> &'static str {
        if self.ollama() {
            "/api/chat"
        } else {
            "/v1/chat/completions"
        }
    }
    fn default_model(self) -> &'static str {
        if self.ollama() {
            "llama3.2:1b"
        } else {
            "meta-llama/Llama-3.1-8B-Instruct"
        }
    }
}

#[derive(clap::Args, Debug, Clone)]
pub struct LoadArgs {
    /// Target, http://HOST:PORT/PATH (a bare / means the kind's usual path).
    #[arg(long)]
    pub url: String,
    /// What requests to send.
    #[arg(long, value_enum, default_value = "chat")]
    pub kind: Kind,
    /// Model named in the body [default: the simulator's default for the kind].
    #[arg(long)]
    pub model: Option<String>,
    /// Concurrent connections (each carries one request at a time, keep-alive).
    #[arg(long, default_value_t = 8)]
    pub connections: usize,
    /// Seconds to measure [default: 10 unless --requests is given].
    #[arg(long)]
    pub duration: Option<f64>,
    /// Requests to send in all (the run ends at whichever of this and --duration first).
    #[arg(long)]
    pub requests: Option<u64>,
    /// Open loop: requests per second, scheduled at fixed intervals, latency counted from
    /// each request's intended send time. Omitted: closed loop (as fast as possible).
    #[arg(long)]
    pub rate: Option<f64>,
    /// Answer length asked for (max_tokens, or options.num_predict for Ollama).
    #[arg(long)]
    pub tokens: Option<u64>,
    /// Send `Authorization: Bearer TOKEN`.
    #[arg(long)]
    pub bearer: Option<String>,
    /// Sign bearer tokens (HS256) with this shared secret instead of --bearer: claims
    /// iss = --issuer, sub = bench-user-<i>, exp = now + 1 h, domains = [--token-domain].
    #[arg(long, conflicts_with = "bearer")]
    pub sign_hs256: Option<String>,
    /// How many distinct signed tokens to send in turn (1 = every request the same token:
    /// cache hits; as many as requests: every request a miss).
    #[arg(long, default_value_t = 1)]
    pub distinct_tokens: usize,
    /// `iss` of signed tokens.
    #[arg(long, default_value = "https://bench.cubegate/")]
    pub issuer: String,
    /// Domain id put in signed tokens' `domains` claim.
    #[arg(long)]
    pub token_domain: Option<String>,
    /// Connect from 127.0.0.1..=127.0.0.N in turn (loopback targets): for more concurrent
    /// connections than one source address has ephemeral ports.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=250))]
    pub source_ips: u8,
    /// Report this process's memory: resident at the start, peak at the end, and the
    /// difference per connection (e.g. the gateway's pid, with long-lived streams).
    #[arg(long)]
    pub measure_pid: Option<u32>,
    /// Also write the summary as JSON to FILE.
    #[arg(long)]
    pub json: Option<std::path::PathBuf>,
    /// Seconds of the same load before measuring (discarded).
    #[arg(long, default_value_t = 0.0)]
    pub warmup: f64,
    /// Threads, each a monoio runtime with its share of the connections (0 = one per CPU).
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// Seconds each connect, read and write may take.
    #[arg(long, default_value_t = 10.0)]
    pub timeout: f64,
    /// Seconds a whole request may take.
    #[arg(long, default_value_t = 120.0)]
    pub request_timeout: f64,
    /// For https:// URLs: trust the certificates in this PEM file (e.g. the cert.pem of
    /// `cubegate gen-cert`) instead of the system's CA store.
    #[arg(long)]
    pub cacert: Option<std::path::PathBuf>,
    /// Request bodies to send in turn instead of the kind's one body (a benchmark's own
    /// workload, e.g. `fleet`'s chats): the `n`-th request sent carries body `n`, so a
    /// trace in send order is sent in that order. Not on the command line.
    #[arg(skip)]
    pub bodies: Option<Arc<Vec<Bytes>>>,
    /// Open loop: the warmup is the first `warmup` seconds of one schedule that goes on
    /// into the measurement (requests due then are sent, not recorded), rather than a
    /// phase of its own that ends, and waits for its answers, before the measurement
    /// starts: what a saturated target queued during the warmup is still queued when
    /// measuring begins. Not on the command line.
    #[arg(skip)]
    pub open_warmup: bool,
}

impl LoadArgs {
    /// The command line's defaults for `url` and `kind` (callers change what they need).
    pub fn new(url: &str, kind: Kind) -> LoadArgs {
        use clap::Parser;
        #[derive(clap::Parser)]
        struct P {
            #[command(flatten)]
            a: LoadArgs,
        }
        let mut a = P::parse_from(["load", "--url", url]).a;
        a.kind = kind;
        a
    }
}

fn secs(name: &str, v: f64) -> Result<Duration, String> {
    if (0.0..1e9).contains(&v) {
        Ok(Duration::from_secs_f64(v))
    } else {
        Err(format!("--{name} must be a number of seconds ≥ 0, not {v}"))
    }
}

/// `http[s]://host[:port][/path]` → (host header, socket address, path).
pub fn parse_url(url: &str) -> Result<(String, SocketAddr, String), String> {
    let (rest, default_port) = if let Some(rest) = url.strip_prefix("http://") {
        (rest, 80)
    } else if let Some(rest) = url.strip_prefix("https://") {
        (rest, 443)
    } else {
        return Err(format!("--url {url}: must start with http:// or https://"));
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    if authority.is_empty() || authority.contains('@') {
        return Err(format!("--url {url}: bad host"));
    }
    let has_port = match authority.rfind(']') {
        Some(i) => authority[i..].contains(':'),
        None => authority.contains(':'),
    };
    let hostport = if has_port {
        authority.to_string()
    } else {
        format!("{authority}:{default_port}")
    };
    let addr = hostport
        .to_socket_addrs()
        .map_err(|e| format!("--url {url}: cannot resolve {hostport}: {e}"))?
        .next()
        .ok_or_else(|| format!("--url {url}: {hostport} resolves to nothing"))?;
    Ok((authority.to_string(), addr, path.to_string()))
}

/// For an https:// URL: the client configuration (ALPN http/1.1, the --cacert roots or the
/// system's) and the name the server's certificate must carry.
fn tls_for(a: &LoadArgs, host: &str) -> Result<Option<client::TlsTarget>, String> {
    if !a.url.starts_with("https://") {
        return Ok(None);
    }
    let config = cubegate::internals::tls::backend_config(a.cacert.as_deref())
        .map_err(|e| format!("--cacert: {}", e.message))?;
    let name = match host.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(""),
        None => host.rsplit_once(':').map_or(host, |(h, _)| h),
    };
    let name = rustls::pki_types::ServerName::try_from(name.to_string())
        .map_err(|_| format!("--url {}: {name:?} is not a TLS server name", a.url))?;
    Ok(Some(client::TlsTarget { config, name }))
}

/// HS256-signs `n` distinct tokens (ring).
pub fn sign_tokens(a: &LoadArgs, secret: &str, n: usize) -> Vec<String> {
    use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
    use base64::Engine;
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes());
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
        + 3600;
    let header = B64.encode(r#"{"alg":"HS256","typ":"JWT"}"#);
    (0..n.max(1))
        .map(|i| {
            let mut claims =
                serde_json::json!({"iss": a.issuer, "sub": format!("bench-user-{i}"), "exp": exp});
            if let Some(d) = &a.token_domain {
                claims["domains"] = serde_json::json!([d]);
            }
            let input = format!("{header}.{}", B64.encode(claims.to_string()));
            let sig = ring::hmac::sign(&key, input.as_bytes());
            format!("{input}.{}", B64.encode(sig.as_ref()))
        })
        .collect()
}

/// The requests the connections send in turn: one, one per distinct signed token, or one
/// per body of `a.bodies`.
pub fn build_requests(a: &LoadArgs, host: &str, path: &str) -> Vec<Bytes> {
    if let Some(bodies) = &a.bodies {
        return bodies
            .iter()
            .map(|b| with_head(a, host, path, a.bearer.as_deref(), b).into())
            .collect();
    }
    match &a.sign_hs256 {
        Some(secret) => sign_tokens(a, secret, a.distinct_tokens)
            .iter()
            .map(|t| build_request(a, host, path, Some(t)).into())
            .collect(),
        None => vec![build_request(a, host, path, a.bearer.as_deref()).into()],
    }
}

/// One request, with `bearer` as its credential.
pub fn build_request(a: &LoadArgs, host: &str, path: &str, bearer: Option<&str>) -> Vec<u8> {
    let model = a.model.as_deref().unwrap_or(a.kind.default_model());
    let stream = a.kind.events().is_some();
    let mut body = serde_json::json!({
        "model": model,
        "messages": [{"role": "user", "content": "Write a short poem about a gateway."}],
        "stream": stream,
    });
    if let Some(n) = a.tokens {
        if a.kind.ollama() {
            body["options"] = serde_json::json!({ "num_predict": n });
        } else {
            body["max_tokens"] = n.into();
        }
    }
    with_head(a, host, path, bearer, body.to_string().as_bytes())
}

/// A POST of `body` with the kind's head (path, Accept) and `bearer` as its credential.
fn with_head(a: &LoadArgs, host: &str, path: &str, bearer: Option<&str>, body: &[u8]) -> Vec<u8> {
    let path = if path == "/" {
        a.kind.default_path()
    } else {
        path
    };
    let accept = match a.kind.events() {
        Some(EventFormat::Sse) => "text/event-stream",
        Some(EventFormat::Ndjson) => "application/x-ndjson",
        None => "application/json",
    };
    let mut req = format!(
        "POST {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: cubegate-bench\r\n\
         Content-Type: application/json\r\nAccept: {accept}\r\nContent-Length: {}\r\n",
        body.len()
    );
    if let Some(b) = bearer {
        req.push_str(&format!("Authorization: Bearer {b}\r\n"));
    }
    req.push_str("\r\n");
    let mut req = req.into_bytes();
    req.extend_from_slice(body);
    req
}

/// Runs the load described by `a` and returns its summary.
pub fn run(a: &LoadArgs) -> Result<Summary, String> {
    let (host, addr, path) = parse_url(&a.url)?;
    if a.connections == 0 {
        return Err("--connections must be at least 1".into());
    }
    if let Some(r) = a.rate {
        if !(r.is_finite() && r > 0.0) {
            return Err(format!("--rate must be a positive number, not {r}"));
        }
    }
    if a.tokens.is_some_and(|t| t == 0) {
        return Err("--tokens must be at least 1".into());
    }
    let duration = match (a.duration, a.requests) {
        (Some(d), _) => Some(secs("duration", d)?),
        (None, Some(_)) => None,
        (None, None) => Some(Duration::from_secs(10)),
    };
    let mut warmup = secs("warmup", a.warmup)?;
    // Continuous: one phase of warmup + duration, recording only from `record_after`.
    let record_after = if a.open_warmup && a.rate.is_some() && duration.is_some() {
        std::mem::take(&mut warmup)
    } else {
        Duration::ZERO
    };
    let measured = duration;
    let duration = duration.map(|d| d + record_after);
    let tls = tls_for(a, &host)?;
    let target = Target {
        addr,
        tls,
        requests: build_requests(a, &host, &path).into(),
        next: Default::default(),
        source_ips: a.source_ips,
        next_source: Default::default(),
        events: a.kind.events(),
        io_timeout: secs("timeout", a.timeout)?.max(Duration::from_millis(1)),
        request_timeout: secs("request-timeout", a.request_timeout)?.max(Duration::from_millis(1)),
    };
    let threads = match a.threads {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    }
    .min(a.connections);
    let plan = Arc::new(Plan {
        target,
        interval: a.rate.map(Schedule::interval_for),
        duration,
        requests: a.requests,
        warmup,
        record_after,
        threads: threads as u64,
        t0: Instant::now(),
        barrier: Barrier::new(threads),
        start: OnceLock::new(),
    });
    let rss_before = match a.measure_pid {
        Some(pid) => {
            Some(proc_kib(pid, "VmRSS:").ok_or(format!("--measure-pid {pid}: no such process"))?)
        }
        None => None,
    };
    let mut handles = Vec::new();
    for t in 0..threads {
        let conns = a.connections / threads + usize::from(t < a.connections % threads);
        let plan = plan.clone();
        let h = std::thread::Builder::new()
            .name(format!("load-{t}"))
            .spawn(move || thread_main(t as u64, conns, &plan))
            .map_err(|e| format!("cannot start a thread: {e}"))?;
        handles.push(h);
    }
    let mut all = Recorder::default();
    let mut taken = 0;
    for h in handles {
        let (rec, n) = h
            .join()
            .map_err(|_| "a load thread panicked".to_string())??;
        all.merge(&rec);
        taken += n;
    }
    let start = *plan.start.get().ok_or("the run never started")?;
    let end = all.last_done.unwrap_or_else(Instant::now).max(start);
    let sched = plan.schedule(start, 0);
    let unsent = sched.planned().map_or(0, |p| p.saturating_sub(taken));
    let info = RunInfo {
        url: a.url.clone(),
        kind: a.kind.name().to_string(),
        model: a
            .model
            .as_deref()
            .unwrap_or(a.kind.default_model())
            .to_string(),
        connections: a.connections,
        threads,
        rate: a.rate,
        duration_s: measured.map(|d| d.as_secs_f64()),
        requests: a.requests,
        tokens: a.tokens,
        warmup_s: (warmup + record_after).as_secs_f64(),
    };
    let from = start + record_after;
    let mut summary = Summary::new(info, &all, end.max(from) - from, unsent);
    if let (Some(pid), Some(before)) = (a.measure_pid, rss_before) {
        let peak = proc_kib(pid, "VmHWM:").ok_or("cannot read the measured process's memory")?;
        summary.memory = Some(report::Memory {
            pid,
            rss_start_kib: before,
            peak_kib: peak,
            per_connection_bytes: (peak.saturating_sub(before) * 1024) as f64
                / a.connections.max(1) as f64,
        });
    }
    Ok(summary)
}

/// A `VmRSS:`/`VmHWM:` line of /proc/PID/status, in KiB.
fn proc_kib(pid: u32, field: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// What all threads share.
struct Plan {
    target: Target,
    interval: Option<Duration>,
    duration: Option<Duration>,
    requests: Option<u64>,
    warmup: Duration,
    /// Requests due before `start + record_after` are sent but not recorded.
    record_after: Duration,
    threads: u64,
    /// When the warmup starts.
    t0: Instant,
    barrier: Barrier,
    /// When measuring starts (the first thread past the barrier sets it).
    start: OnceLock<Instant>,
}

impl Plan {
    fn schedule(&self, start: Instant, offset: u64) -> Schedule {
        Schedule {
            start,
            interval: self.interval,
            end: self.duration.map(|d| start + d),
            requests: self.requests,
            stride: self.threads,
            offset,
        }
    }
}

fn thread_main(t: u64, conns: usize, plan: &Plan) -> Result<(Recorder, u64), String> {
    let rt = monoio::RuntimeBuilder::<monoio::FusionDriver>::new()
        .enable_timer()
        .build();
    let mut rt = match rt {
        Ok(rt) => rt,
        Err(e) => {
            // Keep the other threads from waiting for this one forever.
            plan.barrier.wait();
            return Err(format!("cannot start a runtime: {e}"));
        }
    };
    let target = Rc::new(plan.target.clone());
    rt.block_on(async move {
        let mut slots: Vec<Option<Conn>> = (0..conns).map(|_| None).collect();
        if !plan.warmup.is_zero() {
            let mut s = plan.schedule(plan.t0, t);
            s.end = Some(plan.t0 + plan.warmup);
            s.requests = None;
            let discard = Rc::new(RefCell::new(Recorder::default()));
            slots = phase(slots, s, &target, (&discard, &discard, plan.t0))
                .await
                .0;
        }
        // Threads block here only between phases, when no task of theirs is running.
        plan.barrier.wait();
        let start = *plan.start.get_or_init(Instant::now);
        let rec = Rc::new(RefCell::new(Recorder::default()));
        let warm = Rc::new(RefCell::new(Recorder::default()));
        let recorders = (&warm, &rec, start + plan.record_after);
        let (_, taken) = phase(slots, plan.schedule(start, t), &target, recorders).await;
        drop(warm);
        let rec = Rc::try_unwrap(rec).map_err(|_| "recorder still shared")?;
        Ok((rec.into_inner(), taken))
    })
}

/// Where a phase records: requests due before the instant into the first recorder (not
/// measured), the others into the second.
type Recorders<'a> = (
    &'a Rc<RefCell<Recorder>>,
    &'a Rc<RefCell<Recorder>>,
    Instant,
);

/// Runs one phase on this thread's connections; hands them back with the requests taken.
async fn phase(
    slots: Vec<Option<Conn>>,
    sched: Schedule,
    target: &Rc<Target>,
    (warm, rec, record_from): Recorders<'_>,
) -> (Vec<Option<Conn>>, u64) {
    let tickets = Rc::new(Tickets::default());
    let handles: Vec<_> = slots
        .into_iter()
        .map(|slot| {
            monoio::spawn(connection_task(
                slot,
                sched,
                tickets.clone(),
                target.clone(),
                (warm.clone(), rec.clone(), record_from),
            ))
        })
        .collect();
    let mut back = Vec::with_capacity(handles.len());
    for h in handles {
        back.push(h.await);
    }
    (back, tickets.taken())
}

/// The runtime timer's resolution.
const TIMER_TICK: Duration = Duration::from_millis(1);

async fn connection_task(
    mut slot: Option<Conn>,
    sched: Schedule,
    tickets: Rc<Tickets>,
    target: Rc<Target>,
    (warm, measured, record_from): (Rc<RefCell<Recorder>>, Rc<RefCell<Recorder>>, Instant),
) -> Option<Conn> {
    loop {
        let now = Instant::now();
        let Some(at) = tickets.take(&sched, now) else {
            break;
        };
        // monoio's timer has 1 ms ticks and rounds up: aim a tick early, so a request
        // leaves at most about a millisecond before its time and is measured from when it
        // actually left; a late one is measured from its intended time.
        if let Some(early) = at.checked_sub(TIMER_TICK).filter(|e| *e > now) {
            monoio::time::sleep_until(monoio::time::Instant::from_std(early)).await;
        }
        let rec = if at >= record_from { &measured } else { &warm };
        let sent = Instant::now();
        rec.borrow_mut().lag(sent.saturating_duration_since(at));
        let from = at.min(sent);
        let connect_failed = client::exchange(&mut slot, &target, from, rec).await;
        if connect_failed && sched.interval.is_none() {
            // Closed loop against a dead target: do not spin.
            monoio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    slot
}
