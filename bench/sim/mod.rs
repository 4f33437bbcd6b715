//! `cubegate-bench backend`: a deterministic simulator of vLLM's and Ollama's HTTP APIs.
//!
//! One thread per `--threads`, each a monoio runtime with its own SO_REUSEPORT listener
//! on the same address. Connections are HTTP/1.1 keep-alive (`conn.rs`, with the parsing
//! in `http.rs`); a request is routed to the flavor (`vllm.rs` or `ollama.rs`, sharing
//! `openai.rs`), which answers with a [`Reply`]: a complete body, or a [`StreamFormat`]
//! that `conn.rs` streams token by token, one chunk per event, honouring the configured
//! delays, the test hooks (`x-sim-die-after`, `x-sim-stall-ms`) and client disconnects.
//! Token text comes from `text.rs`. `GET /sim/stats` reports the [`Stats`] counters.

mod conn;
pub mod http;
pub mod ollama;
pub mod openai;
pub mod text;
pub mod vllm;

#[cfg(test)]
mod tests;

use monoio::net::TcpListener;
use std::io;
use std::net::{SocketAddr, ToSocketAddrs};
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
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
}

/// Process-wide counters, shared by all threads (a simulator, so atomics are fine).
#[derive(Debug, Default)]
pub struct Stats {
    pub requests: AtomicU64,
    pub streams_completed: AtomicU64,
    pub streams_aborted: AtomicU64,
    pub streams_died: AtomicU64,
    pub active_streams: AtomicU64,
}

impl Stats {
    fn json(&self) -> Vec<u8> {
        format!(
            "{{\"requests\":{},\"streams_completed\":{},\"streams_aborted\":{},\"active_streams\":{},\"streams_died\":{}}}",
            self.requests.load(Relaxed),
            self.streams_completed.load(Relaxed),
            self.streams_aborted.load(Relaxed),
            self.active_streams.load(Relaxed),
            self.streams_died.load(Relaxed),
        )
        .into_bytes()
    }
}

/// What a flavor answers.
pub enum Reply {
    /// A complete response. `gen` tokens were "generated": the simulator waits as long as
    /// generating them would take before answering.
    Full {
        status: u16,
        content_type: &'static str,
        body: Vec<u8>,
        gen: usize,
    },
    /// A chunked stream of `n` tokens.
    Stream {
        fmt: Box<dyn StreamFormat>,
        n: usize,
    },
}

impl Reply {
    pub fn json(status: u16, body: Vec<u8>) -> Reply {
        Reply::Full {
            status,
            content_type: "application/json",
            body,
            gen: 0,
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
    #[allow(dead_code)] // read by tests
    pub stats: Arc<Stats>,
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
pub fn start(cfg: Config) -> io::Result<Server> {
    let want = cfg.listen.to_socket_addrs()?.next().ok_or_else(|| {
        io::Error::new(io::ErrorKind::InvalidInput, "--listen resolves to nothing")
    })?;
    let threads = cfg.threads.max(1);
    let first = bind(want)?;
    let addr = first.local_addr()?;
    let mut listeners = vec![first];
    for _ in 1..threads {
        listeners.push(bind(addr)?);
    }
    let cfg = Arc::new(cfg);
    let stats = Arc::new(Stats::default());
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<io::Result<()>>();
    let mut handles = Vec::new();
    for (i, l) in listeners.into_iter().enumerate() {
        let cfg = cfg.clone();
        let stats = stats.clone();
        let ready = ready_tx.clone();
        let h = std::thread::Builder::new()
            .name(format!("sim-{i}"))
            .spawn(move || serve_thread(l, cfg, stats, ready))?;
        handles.push(h);
    }
    drop(ready_tx);
    for _ in 0..threads {
        match ready_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(e),
            Err(_) => return Err(io::Error::other("a simulator thread died while starting")),
        }
    }
    Ok(Server {
        addr,
        stats,
        threads: handles,
    })
}

/// Runs the simulator until the process is killed.
pub fn run(cfg: Config) -> io::Result<()> {
    let server = start(cfg)?;
    eprintln!("listening on {}", server.addr);
    server.join();
    Ok(())
}

fn bind(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    use socket2::{Domain, Socket, Type};
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    s.set_reuse_address(true)?;
    s.set_reuse_port(true)?;
    s.bind(&addr.into())?;
    s.listen(1024)?;
    s.set_nonblocking(true)?;
    Ok(s.into())
}

/// What every connection of a thread shares.
struct Shared {
    cfg: Arc<Config>,
    stats: Arc<Stats>,
}

fn serve_thread(
    l: std::net::TcpListener,
    cfg: Arc<Config>,
    stats: Arc<Stats>,
    ready: std::sync::mpsc::Sender<io::Result<()>>,
) {
    let rt = monoio::RuntimeBuilder::<monoio::FusionDriver>::new()
        .enable_timer()
        .build();
    let mut rt = match rt {
        Ok(rt) => rt,
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    rt.block_on(async move {
        let listener = match TcpListener::from_std(l) {
            Ok(l) => l,
            Err(e) => {
                let _ = ready.send(Err(e));
                return;
            }
        };
        let _ = ready.send(Ok(()));
        let shared = Rc::new(Shared { cfg, stats });
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    let _ = stream.set_nodelay(true);
                    monoio::spawn(conn::connection(stream, shared.clone()));
                }
                Err(_) => monoio::time::sleep(Duration::from_millis(10)).await,
            }
        }
    });
}
