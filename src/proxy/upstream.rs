//! Upstream connections: per-worker keep-alive pools, connecting, and backend choice.
//!
//! Each worker owns its pools (no lock, no sharing): idle connections per backend address,
//! bounded, most recently used first (the warmest socket, the least likely to have been
//! closed by the backend's keep-alive timer). A connection idle longer than the backend's
//! likely keep-alive timeout is dropped rather than risked. Backends that refused a
//! connection are put last in the order for a short while.

use super::io::BackendStream;
use monoio::net::TcpStream;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use super::error::GatewayError;
use super::Worker;
use crate::scope::Endpoint;
use crate::snapshot::{Backend, Domain};

/// uvicorn (vLLM) closes idle keep-alive connections after 5 s; stay under it.
const IDLE_TTL: Duration = Duration::from_secs(4);
/// How long a backend that refused a connection is tried last.
const DOWN_FOR: Duration = Duration::from_secs(2);

pub struct Upstream {
    pub stream: BackendStream,
    pub addr: SocketAddr,
    /// Came from the pool: a failure before any answer byte may be a stale socket.
    pub reused: bool,
}

pub struct Pools {
    idle: HashMap<SocketAddr, Vec<(BackendStream, Instant)>>,
    down_until: HashMap<SocketAddr, Instant>,
    max_idle: usize,
    round_robin: usize,
    /// Idle connections held, mirrored into the worker's gauge.
    idle_count: usize,
    metrics: Option<std::sync::Arc<crate::metrics::WorkerMetrics>>,
}

impl Pools {
    pub fn new(max_idle: usize) -> Pools {
        Pools {
            idle: HashMap::new(),
            down_until: HashMap::new(),
            max_idle,
            round_robin: 0,
            idle_count: 0,
            metrics: None,
        }
    }

    /// Reports the number of idle connections into `metrics`.
    pub fn with_metrics(mut self, metrics: std::sync::Arc<crate::metrics::WorkerMetrics>) -> Pools {
        self.metrics = Some(metrics);
        self
    }

    fn idle_changed(&mut self, by: isize) {
        self.idle_count = self.idle_count.saturating_add_signed(by);
        if let Some(m) = &self.metrics {
            m.upstream_idle.set(self.idle_count as i64);
        }
    }

    /// A pooled connection to `addr` that has not outlived the keep-alive window and is
    /// still clean: nothing unread in it, not closed by the backend. Its TLS name must be
    /// `tls`: two https backends behind one address (virtual hosts) never share a session
    /// verified for the other's name, and plain and TLS never mix.
    pub fn take(
        &mut self,
        addr: SocketAddr,
        tls: Option<&rustls::pki_types::ServerName<'static>>,
    ) -> Option<BackendStream> {
        let list = self.idle.get_mut(&addr)?;
        let now = Instant::now();
        let mut taken = 0;
        let mut found = None;
        while let Some((stream, since)) = list.pop() {
            taken += 1;
            if now.duration_since(since) < IDLE_TTL
                && stream.tls_name() == tls
                && !stream.has_pending()
                && is_clean_idle(stream.socket())
            {
                found = Some(stream);
                break;
            }
        }
        self.idle_changed(-taken);
        found
    }

    pub fn put(&mut self, addr: SocketAddr, stream: BackendStream) {
        if self.max_idle == 0 {
            return;
        }
        let list = self.idle.entry(addr).or_default();
        let evicted = list.len() >= self.max_idle;
        if evicted {
            list.remove(0);
        }
        list.push((stream, Instant::now()));
        self.idle_changed(if evicted { 0 } else { 1 });
    }

    pub fn mark_down(&mut self, addr: SocketAddr) {
        self.down_until.insert(addr, Instant::now() + DOWN_FOR);
    }

    fn is_down(&self, addr: &SocketAddr, now: Instant) -> bool {
        self.down_until.get(addr).is_some_and(|t| *t > now)
    }

    /// Orders candidate backends for one request: round-robin among those that are up,
    /// then those recently down (still tried: a down mark is a hint, not a verdict).
    pub fn order(&mut self, candidates: &[(usize, SocketAddr)], out: &mut Vec<usize>) {
        out.clear();
        if candidates.is_empty() {
            return;
        }
        self.round_robin = self.round_robin.wrapping_add(1);
        let start = self.round_robin % candidates.len();
        let now = Instant::now();
        let rotated = candidates[start..].iter().chain(&candidates[..start]);
        out.extend(
            rotated
                .clone()
                .filter(|(_, a)| !self.is_down(a, now))
                .map(|(i, _)| *i),
        );
        out.extend(
            rotated
                .filter(|(_, a)| self.is_down(a, now))
                .map(|(i, _)| *i),
        );
    }
}

/// Phase `pick_backends`: the backends that may serve this model on this route, in the
/// order to try them.
pub fn pick_backends(
    worker: &Worker,
    domain: &Domain,
    model: Option<&str>,
    ollama_only: bool,
    endpoint: Endpoint,
) -> Result<Vec<usize>, GatewayError> {
    let mut candidates: Vec<(usize, SocketAddr)> = domain
        .candidates(model, ollama_only)
        .map(|i| (i, domain.backends[i].addr))
        .collect();
    if candidates.is_empty() && model.is_some() && endpoint.is_admin() {
        // Admin operations may name a model the domain does not list yet (a pull).
        candidates = domain
            .candidates(None, ollama_only)
            .map(|i| (i, domain.backends[i].addr))
            .collect();
    }
    if candidates.is_empty() {
        return Err(match model {
            Some(m) => GatewayError::UnknownModel {
                domain: domain.id.clone(),
                model: m.to_string(),
            },
            None => GatewayError::NoOllamaBackend(domain.id.clone()),
        });
    }
    let mut order = Vec::with_capacity(candidates.len());
    worker.pools.borrow_mut().order(&candidates, &mut order);
    Ok(order)
}

/// An idle connection must have nothing to read. Bytes there are an answer nobody asked
/// for (reusing the socket would hand them to the next client: a response desync), and
/// EOF means the backend closed it. One non-blocking peek, no data consumed.
fn is_clean_idle(stream: &TcpStream) -> bool {
    use std::mem::MaybeUninit;
    use std::os::fd::{AsRawFd, BorrowedFd};
    // SAFETY: the descriptor belongs to `stream`, which is borrowed for this whole
    // function, so it stays open (and cannot be reused for another file) while `fd` lives.
    let fd = unsafe { BorrowedFd::borrow_raw(stream.as_raw_fd()) };
    let mut byte = [MaybeUninit::<u8>::uninit(); 1];
    let peek = libc::MSG_PEEK | libc::MSG_DONTWAIT;
    match socket2::SockRef::from(&fd).recv_with_flags(&mut byte, peek) {
        Err(e) => e.kind() == std::io::ErrorKind::WouldBlock,
        Ok(_) => false,
    }
}

/// Opens a fresh connection with the configured timeout, which also bounds the TLS
/// handshake of an `https://` backend.
pub async fn connect(worker: &Worker, backend: &Backend) -> Result<BackendStream, GatewayError> {
    let timeout = worker.timeouts.upstream_connect();
    let started = Instant::now();
    let tcp = match monoio::time::timeout(timeout, TcpStream::connect_addr(backend.addr)).await {
        Ok(Ok(stream)) => {
            let _ = stream.set_nodelay(true);
            stream
        }
        Ok(Err(e)) => return Err(GatewayError::UpstreamConnect(e)),
        Err(_) => return Err(GatewayError::UpstreamConnectTimeout),
    };
    let Some(name) = &backend.tls else {
        return Ok(BackendStream::plain(tcp));
    };
    let Some(config) = &worker.backend_tls else {
        return Err(GatewayError::UpstreamConnect(std::io::Error::other(
            "https:// backend, but no CA certificates are trusted: set proxy.backend_ca_file",
        )));
    };
    let left = timeout.saturating_sub(started.elapsed());
    BackendStream::tls(tcp, config.clone(), name.clone(), left)
        .await
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::TimedOut => GatewayError::UpstreamConnectTimeout,
            _ => GatewayError::UpstreamConnect(e),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn order_rotates_and_demotes_down_backends() {
        let a: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let b: SocketAddr = "127.0.0.1:2".parse().unwrap();
        let mut p = Pools::new(4);
        let mut out = Vec::new();
        let c = [(0, a), (1, b)];
        p.order(&c, &mut out);
        let first = out[0];
        p.order(&c, &mut out);
        assert_ne!(out[0], first);
        p.mark_down(a);
        for _ in 0..3 {
            p.order(&c, &mut out);
            assert_eq!(out, [1, 0]);
        }
    }
}
