//! `cubegate-bench backend`: a deterministic simulator of vLLM's and Ollama's HTTP APIs,
//! and of the GPU host behind them.
//!
//! One thread per `--threads`, each a monoio runtime with its own SO_REUSEPORT listener
//! on the same address (`listen.rs`). Connections are HTTP/1.1 keep-alive (`conn.rs`,
//! with the parsing in `http.rs`); a request is routed to the flavor (`vllm.rs` or
//! `ollama.rs`, sharing `openai.rs`), which answers with a [`Reply`]: a complete body, or
//! a [`StreamFormat`] that `answer.rs` streams token by token, one chunk per event,
//! honouring the configured delays, the test hooks (`x-sim-die-after`,
//! `x-sim-stall-ms`) and client disconnects. Token text comes from `text.rs`.
//!
//! The GPU host (`host.rs`, one per process, shared by the threads): a generation request
//! ([`Work`]: its prompt as tokens, `prompt.rs`) waits for one of `--slots` places in the
//! running batch in a FIFO queue (`batch.rs`), finds its cached prefix (`prefix_cache.rs`,
//! vLLM's automatic prefix caching) and pays `--prefill-us-per-token` for the rest, then
//! decodes. Fault modes (`fault.rs`) are chosen at start or switched through the control
//! listener (`control.rs`). `GET /sim/stats` (and the control's `GET /stats`) report the
//! counters; vLLM's `/metrics` and Ollama's `/api/ps` report the host's state.

mod answer;
mod batch;
mod conn;
mod control;
pub mod fault;
pub mod host;
pub mod http;
mod listen;
pub mod ollama;
pub mod openai;
pub mod prefix_cache;
pub mod prompt;
mod socket;
pub mod text;
pub mod vllm;

#[cfg(test)]
mod fault_tests;
#[cfg(test)]
mod gpu_tests;
#[cfg(test)]
mod tests;

pub use fault::Fault;
pub use host::Host;
use std::io as stdio; // `io` would read as a module of this crate
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::Arc;
use std::time::Duration;

/// Which server the simulator pretends to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavor {
    Vllm,
    Ollama,
}

/// Simulator settings (from the command line).
#[derive(Debug, Clone)]
pub struct Config {
    pub flavor: Flavor,
    pub listen: String,
    pub models: Vec<String>,
    pub tokens: usize,
    pub token_delay: Duration,
    pub first_token_delay: Duration,
    pub threads: usize,
    pub embed_dim: usize,
    /// The GPU host model and its faults.
    pub gpu: GpuConfig,
}

/// The GPU host behind the API (all off by default: the simulator then behaves as a bare
/// API server with unlimited parallelism).
#[derive(Debug, Clone)]
pub struct GpuConfig {
    /// Requests generating at once (`None` = unlimited); the rest wait FIFO.
    pub slots: Option<usize>,
    /// Prefix-cache (KV pool) size in tokens; 0 = no prefix caching.
    pub prefix_cache_tokens: usize,
    /// Prefill time of each prompt token not found in the cache.
    pub prefill_per_token: Duration,
    /// The fault mode at start.
    pub fault: Fault,
    /// How much slower everything is in the `slow` fault mode.
    pub slow_factor: u32,
    /// Where the control API listens (`None` = no control listener).
    pub control: Option<String>,
}

impl Default for GpuConfig {
    fn default() -> GpuConfig {
        GpuConfig {
            slots: None,
            prefix_cache_tokens: 0,
            prefill_per_token: Duration::ZERO,
            fault: Fault::None,
            slow_factor: 10,
            control: None,
        }
    }
}

/// What a flavor answers.
pub enum Reply {
    /// A complete response. With `work`, the answer was "generated": the simulator runs
    /// it on the GPU host and waits as long as generating it would take before answering.
    Full {
        status: u16,
        content_type: &'static str,
        body: Vec<u8>,
        work: Option<Work>,
    },
    /// A chunked stream of `work.output_tokens` tokens.
    Stream {
        fmt: Box<dyn StreamFormat>,
        work: Work,
    },
}

/// What a generation asks of the GPU.
#[derive(Debug, Clone)]
pub struct Work {
    pub model: String,
    /// The prompt's tokens (`prompt.rs`).
    pub prompt: Vec<u32>,
    pub output_tokens: usize,
}

impl Reply {
    pub fn json(status: u16, body: Vec<u8>) -> Reply {
        Reply::Full {
            status,
            content_type: "application/json",
            body,
            work: None,
        }
    }

    /// A whole answer with no body (`/health`).
    pub fn empty(status: u16) -> Reply {
        Reply::Full {
            status,
            content_type: "",
            body: Vec::new(),
            work: None,
        }
    }
}

/// How one streaming answer is framed. Each method appends one event's bytes to `out`.
pub trait StreamFormat {
    fn content_type(&self) -> &'static str;
    /// An event before the first token (e.g. vLLM's role chunk); false = none.
    fn open(&self, out: &mut Vec<u8>) -> bool;
    /// The event carrying token `i`.
    fn token(&self, i: usize, tok: &str, out: &mut Vec<u8>);
    /// Closing event number `step` (0, 1, …); false = no more events.
    fn close(&self, step: usize, out: &mut Vec<u8>) -> bool;
    /// The seed the tokens come from.
    fn seed(&self) -> u64;
}

/// Renders a whole stream's payload (no chunk framing, no delays); for tests.
#[cfg(test)]
pub fn render(fmt: &dyn StreamFormat, n: usize) -> Vec<u8> {
    let mut out = Vec::new();
    fmt.open(&mut out);
    for i in 0..n {
        fmt.token(i, text::token(fmt.seed(), i), &mut out);
    }
    let mut step = 0;
    while fmt.close(step, &mut out) {
        step += 1;
    }
    out
}

/// The served model called `name`, if any. Ollama names without a tag mean `:latest`.
pub fn find_model<'a>(cfg: &'a Config, name: &str) -> Option<&'a str> {
    cfg.models
        .iter()
        .map(String::as_str)
        .find(|m| *m == name || (cfg.flavor == Flavor::Ollama && norm_any(m) == norm_any(name)))
}

fn norm_any(m: &str) -> (&str, &str) {
    match m.rsplit_once(':') {
        Some((base, tag)) if !tag.contains('/') => (base, tag),
        _ => (m, "latest"),
    }
}

/// A running simulator.
pub struct Server {
    pub addr: SocketAddr,
    /// Where the control API listens, when asked for.
    pub control_addr: Option<SocketAddr>,
    #[allow(dead_code)] // read by tests
    pub host: Arc<Host>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Server {
    /// Waits for the server threads (they run until the process ends).
    pub fn join(self) {
        for t in self.threads {
            let _ = t.join();
        }
    }
}

/// Starts the simulator; returns once every thread is accepting.
pub fn start(cfg: Config) -> stdio::Result<Server> {
    let want = resolve(&cfg.listen, "--listen")?;
    let threads = cfg.threads.max(1);
    let first = listen::bind(want)?;
    let addr = first.local_addr()?;
    let mut listeners = vec![first];
    for _ in 1..threads {
        listeners.push(listen::bind(addr)?);
    }
    let control = match &cfg.gpu.control {
        Some(c) => Some(std::net::TcpListener::bind(resolve(c, "--control")?)?),
        None => None,
    };
    let cfg = Arc::new(cfg);
    let host = Arc::new(Host::new(&cfg));
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<stdio::Result<()>>();
    let mut handles = Vec::new();
    for (i, l) in listeners.into_iter().enumerate() {
        let shared = Shared {
            cfg: cfg.clone(),
            host: host.clone(),
        };
        let ready = ready_tx.clone();
        let h = std::thread::Builder::new()
            .name(format!("sim-{i}"))
            .spawn(move || listen::serve_thread(i, l, addr, shared, ready))?;
        handles.push(h);
    }
    drop(ready_tx);
    for _ in 0..threads {
        match ready_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(e),
            Err(_) => {
                return Err(stdio::Error::other(
                    "a simulator thread died while starting",
                ))
            }
        }
    }
    let control_addr = match control {
        Some(l) => Some(control::start(l, host.clone())?),
        None => None,
    };
    Ok(Server {
        addr,
        control_addr,
        host,
        threads: handles,
    })
}

fn resolve(addr: &str, flag: &str) -> stdio::Result<SocketAddr> {
    addr.to_socket_addrs()?.next().ok_or_else(|| {
        stdio::Error::new(
            stdio::ErrorKind::InvalidInput,
            format!("{flag} resolves to nothing"),
        )
    })
}

/// Runs the simulator until the process is killed.
pub fn run(cfg: Config) -> stdio::Result<()> {
    let server = start(cfg)?;
    match server.control_addr {
        Some(c) => eprintln!("listening on {} control on {c}", server.addr),
        None => eprintln!("listening on {}", server.addr),
    }
    server.join();
    Ok(())
}

/// What every connection of a thread shares.
struct Shared {
    cfg: Arc<Config>,
    host: Arc<Host>,
}
