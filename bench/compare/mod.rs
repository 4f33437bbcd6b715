//! `cubegate-bench compare`: cubegate side by side with its peers, in one run, against the
//! same simulated backend and with the same load.
//!
//! It starts two vLLM simulators (release binaries, `cubegate-bench backend`): one answering
//! whole answers of `--tokens` tokens at once, one streaming `--stream-tokens` tokens
//! `--token-delay-us` apart. Then, one system at a time (`systems.rs`): direct to the
//! simulators (the floor), cubegate with JWT auth, the same with its management store on a
//! throwaway PostgreSQL (`cubegate-pg`, `crate::services`), nginx, HAProxy verifying JWTs,
//! HAProxy in TCP mode, LiteLLM (`litellm.rs`); each is started with a generated config,
//! probed with one real request, warmed up, then measured with the in-process load
//! generator (`crate::load`):
//!
//! 1. closed loop, `--connections` connections, as fast as it goes: requests/s, and the
//!    proxy's CPU seconds (`measure.rs`, /proc) per 1,000 requests;
//! 2. open loop at `--rate` requests/s: latency p50/p99 from each request's intended
//!    send time;
//! 3. one connection, one request at a time: latency p50/p99 without queueing;
//! 4. streams, open loop at `--stream-rate`: time to first token, gap between chunks;
//!
//! (a system that forwarded less than twice `--rate` in 1., as LiteLLM with its one
//! Python worker, runs both open loops at half its closed-loop rate instead, said by its
//! name), then its peak RSS is read and it is stopped. Systems not installed are reported as
//! skipped. `report.rs` writes the table (stdout and `results.md`), `results.json` and two
//! SVG charts into `--out`.

mod litellm;
pub mod measure;
pub mod report;
pub mod svg;
pub mod systems;

#[cfg(test)]
mod tests;

use crate::load::{self, Kind as LoadKind, LoadArgs};
use crate::services::{Postgres, StartError};
use report::{Machine, Phase, Report, Settings, SystemResult};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};
use systems::{Endpoint, Env, Kind, NotRun, Proc, SharedStore};

#[derive(clap::Args, Debug, Clone)]
pub struct CompareArgs {
    /// Seconds per measurement (four per system, plus warmup).
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// Directory for results.md, results.json, latency.svg and cpu.svg.
    #[arg(long, default_value = "bench/results")]
    pub out: PathBuf,
    /// Rounds: every system runs once per round, in the same order (so systems alternate
    /// and a slow patch of the machine hits them all); each system's row is its round with
    /// the median closed-loop req/s.
    #[arg(long, default_value_t = 1)]
    pub repeat: usize,
    /// Systems to run, comma-separated, in this order [default: all]: direct, cubegate,
    /// cubegate-pg, nginx, haproxy-jwt, haproxy-tcp, litellm.
    #[arg(long, value_delimiter = ',')]
    pub systems: Vec<String>,
    /// Open-loop rate for the latency measurement, requests/s.
    #[arg(long, default_value_t = 500.0)]
    pub rate: f64,
    /// Connections of the closed-loop (throughput) measurement.
    #[arg(long, default_value_t = 32)]
    pub connections: usize,
    /// Open-loop rate of the streaming measurement, streams/s [default: --rate / 5].
    #[arg(long)]
    pub stream_rate: Option<f64>,
    /// Tokens in a whole (non-streamed) answer.
    #[arg(long, default_value_t = 16)]
    pub tokens: u64,
    /// Tokens in a streamed answer.
    #[arg(long, default_value_t = 32)]
    pub stream_tokens: u64,
    /// Delay between streamed tokens, µs (the simulator's timer ticks in milliseconds).
    #[arg(long, default_value_t = 1000)]
    pub token_delay_us: u64,
    /// Seconds of warmup per system before measuring [default: duration / 4, 0.2..2].
    #[arg(long)]
    pub warmup: Option<f64>,
    /// Workers (threads or processes) each proxy gets.
    #[arg(long, default_value_t = 1)]
    pub proxy_workers: usize,
    /// Do not pin proxies and load to separate CPUs.
    #[arg(long)]
    pub no_pin: bool,
    /// The cubegate binary [default: next to this one, or target/release/cubegate].
    #[arg(long)]
    pub cubegate: Option<PathBuf>,
    /// Clients speak HTTPS to the proxies (cubegate, nginx and HAProxy terminate TLS with
    /// one self-signed certificate from `cubegate gen-cert`; TLS 1.3 with ALPN http/1.1;
    /// connections kept alive, so handshakes are not what is measured). `direct` stays
    /// plain (the simulator has no TLS) and LiteLLM is skipped.
    #[arg(long)]
    pub tls: bool,
}

impl CompareArgs {
    /// The defaults, as on the command line without options.
    #[cfg(test)]
    pub fn defaults() -> CompareArgs {
        use clap::Parser;
        #[derive(clap::Parser)]
        struct P {
            #[command(flatten)]
            a: CompareArgs,
        }
        P::parse_from(["compare"]).a
    }
}

/// The socket address of an `http://` URL.
pub fn load_addr(url: &str) -> Result<SocketAddr, String> {
    load::parse_url(url).map(|(_, a, _)| a)
}

/// Signs the bench's one HS256 token (ring), valid for a day, for both bench domains.
pub fn sign_hs256(secret: &[u8], now: u64) -> String {
    use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
    use base64::Engine;
    let header = B64.encode(br#"{"alg":"HS256","typ":"JWT"}"#);
    let payload = serde_json::json!({
        "iss": systems::ISSUER,
        "sub": "bench-user",
        "iat": now,
        "exp": now + 86_400,
        "domains": [systems::FAST_DOMAIN, systems::STREAM_DOMAIN],
    });
    let payload = B64.encode(payload.to_string());
    let input = format!("{header}.{payload}");
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret);
    let sig = ring::hmac::sign(&key, input.as_bytes());
    format!("{input}.{}", B64.encode(sig.as_ref()))
}

/// `n` random bytes as hex digits.
pub fn random_hex(n: usize) -> Result<String, String> {
    use ring::rand::SecureRandom;
    let mut b = vec![0u8; n];
    ring::rand::SystemRandom::new()
        .fill(&mut b)
        .map_err(|_| "no randomness".to_string())?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// CPUs this process may run on.
fn allowed_cpus() -> Vec<usize> {
    // SAFETY: a zeroed cpu_set_t is valid; sched_getaffinity writes into it.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    let r = unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) };
    if r != 0 {
        return Vec::new();
    }
    (0..libc::CPU_SETSIZE as usize)
        // SAFETY: `i` is below CPU_SETSIZE.
        .filter(|&i| unsafe { libc::CPU_ISSET(i, &set) })
        .collect()
}

/// Pins the calling thread (and the threads and processes it starts afterwards) to `cpus`.
fn pin_self(cpus: &[usize]) {
    // SAFETY: as in allowed_cpus.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for &c in cpus {
        // SAFETY: CPU_SET bounds-checks.
        unsafe { libc::CPU_SET(c, &mut set) };
    }
    // SAFETY: a valid set for the calling thread.
    unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
}

/// Restores the calling thread's CPU set when dropped.
struct AffinityGuard(Vec<usize>);

impl Drop for AffinityGuard {
    fn drop(&mut self) {
        if !self.0.is_empty() {
            pin_self(&self.0);
        }
    }
}

/// Waits until something accepts connections on `addr`, or `p` exits, or `limit` passes.
pub fn wait_listening(addr: SocketAddr, p: &mut Proc, limit: Duration) -> Result<(), String> {
    let deadline = Instant::now() + limit;
    loop {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        if let Some(st) = p.exited() {
            return Err(format!("{} exited ({st}): {}", p.name, p.log_tail(3)));
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "{} not listening on {addr} after {limit:?}",
                p.name
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Starts one simulator process, pinned with compare's own CPUs.
pub fn start_sim(
    bin: &std::path::Path,
    dir: &std::path::Path,
    name: &str,
    tokens: u64,
    delay_us: u64,
) -> Result<(Proc, SocketAddr), String> {
    let port = systems::free_port().map_err(|e| format!("no free port: {e}"))?;
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let mut cmd = Command::new(bin);
    cmd.args(["backend", "--flavor", "vllm", "--threads", "1"])
        .arg("--listen")
        .arg(addr.to_string())
        .arg("--tokens")
        .arg(tokens.to_string())
        .arg("--token-delay-us")
        .arg(delay_us.to_string());
    let mut p = Proc::spawn(name, cmd, &dir.join(format!("{name}.log")), None)
        .map_err(|e| format!("cannot start the simulator {}: {e}", bin.display()))?;
    wait_listening(addr, &mut p, Duration::from_secs(10))?;
    Ok((p, addr))
}

/// How the load is shaped for every system.
struct Shape {
    duration: f64,
    warmup: f64,
    threads: usize,
}

fn load_args(ep: &Endpoint, bearer: Option<&str>, kind: LoadKind, tokens: u64) -> LoadArgs {
    LoadArgs {
        model: Some(ep.model.clone()),
        cacert: ep.cacert.clone(),
        connections: 1,
        duration: Some(1.0),
        tokens: Some(tokens),
        bearer: bearer.map(str::to_string),
        timeout: 5.0,
        request_timeout: 30.0,
        ..LoadArgs::new(&ep.url, kind)
    }
}

/// Sends one short chat through `ep` (with `bearer`); Ok when it is answered with a 2xx.
pub fn probe(ep: &Endpoint, bearer: Option<&str>) -> Result<(), String> {
    let mut a = load_args(ep, bearer, LoadKind::Chat, 4);
    a.requests = Some(1);
    a.duration = Some(10.0);
    a.timeout = 2.0;
    a.request_timeout = 5.0;
    let s = load::run(&a)?;
    if s.ok == 1 {
        Ok(())
    } else {
        Err(format!(
            "probe of {}: statuses {:?}, errors {:?}",
            ep.url, s.statuses, s.errors
        ))
    }
}

/// Whether a system that should verify tokens lets one with a broken signature through
/// (then it is not doing the work it is compared on).
fn forged_passes(r: &systems::Running) -> bool {
    let Some(t) = r.bearer.as_deref() else {
        return false;
    };
    // A character inside the signature (the last one carries padding bits a lenient
    // decoder may ignore).
    let mut b = t.as_bytes().to_vec();
    let i = b.len().saturating_sub(5);
    if let Some(c) = b.get_mut(i) {
        *c = if *c == b'A' { b'B' } else { b'A' };
    }
    let forged = String::from_utf8_lossy(&b).into_owned();
    probe(&r.fast, Some(&forged)).is_ok()
}

/// Measures one running system.
fn measure(
    r: &systems::Running,
    a: &CompareArgs,
    shape: &Shape,
    stream_rate: f64,
) -> Result<SystemResult, String> {
    let pid = r.proc.as_ref().map(|p| p.pid);
    let cpu = || pid.and_then(measure::cpu_seconds);
    let bearer = r.bearer.as_deref();
    let base = |ep: &Endpoint, kind, tokens| {
        let mut l = load_args(ep, bearer, kind, tokens);
        l.threads = shape.threads;
        l.duration = Some(shape.duration);
        l
    };
    // Warm up both routes (connections, pools, caches, page faults); discarded.
    if shape.warmup > 0.0 {
        let mut w = base(&r.fast, LoadKind::Chat, a.tokens);
        w.connections = a.connections;
        w.duration = Some(shape.warmup);
        load::run(&w)?;
        let mut w = base(&r.stream, LoadKind::ChatStream, a.stream_tokens);
        w.connections = 16;
        w.duration = Some((shape.warmup / 2.0).max(0.1));
        load::run(&w)?;
    }
    // 1. Throughput, closed loop; CPU over exactly this run.
    let mut l = base(&r.fast, LoadKind::Chat, a.tokens);
    l.connections = a.connections;
    let c0 = cpu();
    let closed = load::run(&l)?;
    let c1 = cpu();
    let cpu_closed = match (c0, c1) {
        (Some(x), Some(y)) => Some(y - x),
        _ => None,
    };
    answered("closed-loop", &closed)?;
    let rates = OpenLoopRates::for_system(a.rate, stream_rate, closed.requests_per_s);
    // 2. Latency at a fixed moderate rate, open loop.
    let mut l = base(&r.fast, LoadKind::Chat, a.tokens);
    l.rate = Some(rates.rate);
    l.connections = a.connections.max(64);
    let o0 = cpu();
    let open = load::run(&l)?;
    let o1 = cpu();
    // 3. One connection, one request at a time.
    let mut l = base(&r.fast, LoadKind::Chat, a.tokens);
    l.connections = 1;
    l.threads = 1;
    let single = load::run(&l)?;
    // 4. Streams, open loop.
    let mut l = base(&r.stream, LoadKind::ChatStream, a.stream_tokens);
    l.rate = Some(rates.stream_rate);
    l.connections = 64;
    let stream = load::run(&l)?;
    // A system that answered nothing in a measurement is failed, with what it answered
    // instead: its figures would only measure how fast it refuses.
    for (what, s) in [
        ("open-loop", &open),
        ("single-connection", &single),
        ("streaming", &stream),
    ] {
        answered(what, s)?;
    }
    let rss = pid.and_then(measure::peak_rss_kib);
    let closed = Phase::of(&closed, cpu_closed);
    let open = Phase::of(
        &open,
        match (o0, o1) {
            (Some(x), Some(y)) => Some(y - x),
            _ => None,
        },
    );
    let cpu_per_1k = closed
        .cpu_s
        .filter(|_| closed.ok > 0)
        .map(|c| c / closed.ok as f64 * 1000.0);
    let notes = rates
        .lowered
        .then(|| {
            format!(
                "open loop at {:.1} requests/s and {:.1} streams/s, half of what it forwarded \
                 in the closed loop ({:.1}/s): {} and {} would only measure its queue",
                rates.rate, rates.stream_rate, closed.requests_per_s, a.rate, stream_rate
            )
        })
        .into_iter()
        .collect();
    Ok(SystemResult {
        status: "ok".into(),
        notes,
        open_rate: Some(rates.rate),
        stream_rate: Some(rates.stream_rate),
        closed: Some(closed),
        open: Some(open),
        single: Some(Phase::of(&single, None)),
        stream: Some(Phase::of(&stream, None)),
        cpu_s_per_1k: cpu_per_1k,
        peak_rss_kib: rss,
        ..SystemResult::default()
    })
}

/// The open-loop rates one system is measured at.
#[derive(Debug, Clone, Copy, PartialEq)]
struct OpenLoopRates {
    rate: f64,
    stream_rate: f64,
    /// Below the asked rates.
    lowered: bool,
}

impl OpenLoopRates {
    /// The asked rates, or, for a system that forwarded less than twice `rate` in the
    /// closed loop, both scaled down to half its closed-loop rate: an open loop above
    /// what a system can carry measures a queue that only grows (and the requests it
    /// never sends), not the system. Streams scale with whole answers.
    fn for_system(rate: f64, stream_rate: f64, closed_rps: f64) -> OpenLoopRates {
        let half = closed_rps / 2.0;
        if !(half.is_finite() && half > 0.0) || half >= rate {
            return OpenLoopRates {
                rate,
                stream_rate,
                lowered: false,
            };
        }
        let f = half / rate;
        OpenLoopRates {
            rate: half,
            stream_rate: stream_rate * f,
            lowered: true,
        }
    }
}

/// `Err` naming what came back instead when no request of a measurement was answered.
fn answered(what: &str, s: &load::report::Summary) -> Result<(), String> {
    if s.ok > 0 {
        return Ok(());
    }
    let mut seen: Vec<String> = s
        .statuses
        .iter()
        .map(|(status, n)| format!("{n} × HTTP {status}"))
        .collect();
    seen.extend(s.errors.iter().map(|(e, n)| format!("{n} × {e}")));
    if seen.is_empty() {
        seen.push("nothing came back".into());
    }
    Err(format!(
        "no request of the {what} measurement was answered ({})",
        seen.join(", ")
    ))
}

/// The machine the run is on (CPUs, model, kernel) and how compare placed its processes.
pub fn machine(nproc: usize, proxy_cpus: &Option<Vec<usize>>, load_cpus: &[usize]) -> Machine {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu_model = cpuinfo
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            (k.trim() == "model name").then(|| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into());
    Machine {
        nproc,
        cpu_model,
        kernel,
        proxy_cpus: proxy_cpus.clone(),
        load_cpus: load_cpus.to_vec(),
    }
}

/// The commit this tree is at, when git knows it.
pub fn commit() -> Option<String> {
    let git = systems::find_program("git")?;
    let v = systems::version_of(&git, &["rev-parse", "--short", "HEAD"]);
    (v != "unknown" && v.chars().all(|c| c.is_ascii_hexdigit())).then_some(v)
}

/// Which systems to run, in order.
fn selected(a: &CompareArgs) -> Result<Vec<Kind>, String> {
    if a.systems.is_empty() {
        return Ok(Kind::ALL.to_vec());
    }
    let mut out = Vec::new();
    for s in a.systems.iter().filter(|s| !s.trim().is_empty()) {
        let k = Kind::parse(s).ok_or_else(|| {
            format!(
                "--systems: unknown system {s:?} (known: {})",
                Kind::ALL.map(Kind::name).join(", ")
            )
        })?;
        if !out.contains(&k) {
            out.push(k);
        }
    }
    Ok(out)
}

/// Runs the comparison; `progress` gets a line per step.
pub fn run(a: &CompareArgs, progress: &mut dyn FnMut(&str)) -> Result<Report, String> {
    if !(a.duration.is_finite() && a.duration > 0.0 && a.duration <= 3600.0) {
        return Err(format!(
            "--duration must be 0 < S ≤ 3600, not {}",
            a.duration
        ));
    }
    if !(a.rate.is_finite() && a.rate > 0.0) {
        return Err(format!("--rate must be positive, not {}", a.rate));
    }
    if a.connections == 0 || a.connections > 10_000 {
        return Err("--connections must be 1..=10000".into());
    }
    if a.tokens == 0 || a.stream_tokens == 0 {
        return Err("--tokens and --stream-tokens must be at least 1".into());
    }
    let kinds = selected(a)?;
    let stream_rate = a.stream_rate.unwrap_or(a.rate / 5.0);
    if !(stream_rate.is_finite() && stream_rate > 0.0) {
        return Err(format!("--stream-rate must be positive, not {stream_rate}"));
    }
    let warmup = a
        .warmup
        .unwrap_or((a.duration / 4.0).clamp(0.2, 2.0))
        .clamp(0.0, 600.0);
    systems::install_signal_watcher();

    // CPUs: the proxy gets the last `workers`, the load and the simulators the rest.
    let cpus = allowed_cpus();
    // Before pinning: afterwards this thread sees only the load generator's CPUs.
    let nproc = std::thread::available_parallelism().map_or(cpus.len().max(1), |n| n.get());
    let workers = a.proxy_workers.clamp(1, 64);
    let (proxy_cpus, load_cpus) = if !a.no_pin && cpus.len() > workers {
        let split = cpus.len() - workers;
        (Some(cpus[split..].to_vec()), cpus[..split].to_vec())
    } else {
        (None, cpus.clone())
    };
    let _restore = AffinityGuard(if proxy_cpus.is_some() {
        cpus.clone()
    } else {
        Vec::new()
    });
    if proxy_cpus.is_some() {
        pin_self(&load_cpus);
    }

    let tmp = systems::TempDir::new().map_err(|e| format!("cannot make a temp dir: {e}"))?;
    let sim_bin = systems::find_sibling("cubegate-bench")
        .ok_or("cannot find the cubegate-bench binary (run `cargo build --release`)")?;
    let (_fast_sim, fast) = start_sim(&sim_bin, &tmp.0, "sim-fast", a.tokens, 0)?;
    let (_stream_sim, stream) = start_sim(
        &sim_bin,
        &tmp.0,
        "sim-stream",
        a.stream_tokens,
        a.token_delay_us,
    )?;
    progress(&format!(
        "simulators on {fast} (whole answers) and {stream} (streams, {} µs per token)",
        a.token_delay_us
    ));
    let secret = random_hex(24)?;
    let token = sign_hs256(secret.as_bytes(), unix_now());
    let cubegate_bin = a
        .cubegate
        .clone()
        .or_else(|| systems::find_sibling("cubegate"));
    let tls = if a.tls {
        Some(systems::TlsFiles::create(&tmp.0)?)
    } else {
        None
    };
    // cubegate-pg's database, on the load generator's CPUs like the simulators.
    let postgres = kinds
        .contains(&Kind::CubegatePg)
        .then(|| Postgres::start_in(&tmp.0));
    let shared_store = match &postgres {
        None => Err("not selected".to_string()),
        Some(Err(StartError::NotInstalled)) => {
            Err("PostgreSQL not installed (apt-get install postgresql)".into())
        }
        Some(Err(StartError::Failed(why))) => Err(format!("PostgreSQL: {why}")),
        Some(Ok(pg)) => Ok(SharedStore {
            url: pg.create_database("cubegate")?,
            key_encryption_key: random_hex(32)?,
        }),
    };
    if let Ok(store) = &shared_store {
        progress(&format!("PostgreSQL for cubegate-pg at {}", store.url));
    }
    let env = Env {
        tls,
        dir: tmp.0.clone(),
        fast,
        stream,
        secret,
        token,
        workers,
        proxy_cpus: proxy_cpus.clone(),
        cubegate_bin,
        shared_store,
    };
    let shape = Shape {
        duration: a.duration,
        warmup,
        threads: load_cpus.len().clamp(1, 4),
    };

    let rounds = a.repeat.clamp(1, 20);
    let mut by_system: Vec<Vec<SystemResult>> = vec![Vec::new(); kinds.len()];
    let mut driver = None;
    for round in 0..rounds {
        for (slot, &kind) in kinds.iter().enumerate() {
            if rounds > 1 && slot == 0 {
                progress(&format!("round {}/{rounds}", round + 1));
            }
            progress(&format!("{}: starting", kind.name()));
            let started = Instant::now();
            let mut res = match systems::start(kind, &env, &probe) {
                Err(NotRun::Skipped(why)) => SystemResult {
                    status: format!("skipped ({why})"),
                    ..SystemResult::default()
                },
                Err(NotRun::Failed(why)) => SystemResult {
                    status: format!("failed: {why}"),
                    ..SystemResult::default()
                },
                Ok(running) if running.bearer.is_some() && forged_passes(&running) => {
                    SystemResult {
                        status: "failed: accepted a token with a bad signature".into(),
                        ..SystemResult::default()
                    }
                }
                Ok(mut running) => {
                    if matches!(kind, Kind::Cubegate | Kind::CubegatePg) {
                        if let Some(p) = &running.proc {
                            let log = std::fs::read_to_string(&p.log).unwrap_or_default();
                            driver = systems::driver_from_log(&log);
                            if let Some(d) = &driver {
                                running.notes.push(format!("driver {d}"));
                            }
                        }
                    }
                    let mut r = match measure(&running, a, &shape, stream_rate) {
                        Ok(r) => r,
                        Err(e) => SystemResult {
                            status: format!("failed: {e}"),
                            ..SystemResult::default()
                        },
                    };
                    if let Some(p) = running.proc.as_mut() {
                        if let Some(st) = p.exited() {
                            r.status = format!("failed: exited during the run ({st})");
                        }
                    }
                    r.version = Some(running.version.clone());
                    r.notes.splice(0..0, running.notes.iter().cloned());
                    drop(running); // stops the system before the next starts
                    r
                }
            };
            res.name = kind.name().to_string();
            res.label = kind.label().to_string();
            progress(&format!(
                "{}: {} ({:.1} s)",
                kind.name(),
                res.status,
                started.elapsed().as_secs_f64()
            ));
            by_system[slot].push(res);
        }
    }
    let results: Vec<SystemResult> = by_system.into_iter().filter_map(median_round).collect();

    Ok(Report {
        date: report::utc_date(unix_now()),
        commit: commit(),
        machine: machine(nproc, &proxy_cpus, &load_cpus),
        cubegate_driver: driver,
        settings: Settings {
            duration_s: a.duration,
            warmup_s: warmup,
            rate: a.rate,
            stream_rate,
            connections: a.connections,
            tokens: a.tokens,
            stream_tokens: a.stream_tokens,
            token_delay_us: a.token_delay_us,
            proxy_workers: workers,
            load_threads: shape.threads,
            tls: a.tls,
        },
        systems: results,
    })
}

/// A system's row from its rounds: the measured round with the median closed-loop req/s
/// (noting every round's figure), or the last round when none was measured.
fn median_round(mut rounds: Vec<SystemResult>) -> Option<SystemResult> {
    let rps = |r: &SystemResult| r.closed.as_ref().map_or(0.0, |p| p.requests_per_s);
    let measured: Vec<usize> = (0..rounds.len())
        .filter(|&i| rounds[i].measured())
        .collect();
    if measured.len() <= 1 {
        return if measured.len() == 1 {
            Some(rounds.swap_remove(measured[0]))
        } else {
            rounds.pop()
        };
    }
    let mut order = measured.clone();
    order.sort_by(|&x, &y| rps(&rounds[x]).total_cmp(&rps(&rounds[y])));
    let all: Vec<String> = measured
        .iter()
        .map(|&i| format!("{:.0}", rps(&rounds[i])))
        .collect();
    let mut chosen = rounds.swap_remove(order[order.len() / 2]);
    chosen.notes.push(format!(
        "median of {} rounds (req/s: {})",
        all.len(),
        all.join(", ")
    ));
    Some(chosen)
}

/// `compare` as a command: runs, prints the table, writes the files.
pub fn command(a: &CompareArgs) -> std::process::ExitCode {
    use std::process::ExitCode;
    let report = match run(a, &mut |s| eprintln!("compare: {s}")) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("cubegate-bench compare: {e}");
            return ExitCode::from(2);
        }
    };
    let md = report::markdown(&report);
    print!("{md}");
    if let Err(e) = report::write_all(&report, &a.out) {
        eprintln!(
            "cubegate-bench compare: cannot write {}: {e}",
            a.out.display()
        );
        return ExitCode::FAILURE;
    }
    eprintln!(
        "compare: wrote results.md, results.json, latency.svg and cpu.svg into {}",
        a.out.display()
    );
    if report
        .systems
        .iter()
        .any(|s| s.status.starts_with("failed"))
    {
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}
