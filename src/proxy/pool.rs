//! Upstream connection pools: per worker, keep-alive connections to each backend.
//!
//! Each worker owns its pools (no lock, no sharing): idle connections per backend address,
//! bounded, most recently used first (the warmest socket, the least likely to have been
//! closed by the backend's keep-alive timer). A connection idle longer than the backend's
//! likely keep-alive timeout is dropped rather than risked. Which host to use is the
//! fleet's decision (`fleet::policy`), not the pool's.

use super::io::BackendStream;
use monoio::net::TcpStream;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// uvicorn (vLLM) closes idle keep-alive connections after 5 s; stay under it.
const IDLE_TTL: Duration = Duration::from_secs(4);

pub struct Upstream {
    pub stream: BackendStream,
    pub addr: SocketAddr,
    /// Came from the pool: a failure before any answer byte may be a stale socket.
    pub reused: bool,
}

pub struct Pools {
    /// aHash, not SipHash: looked up twice per proxied request, keyed by our own config.
    idle: HashMap<SocketAddr, Vec<(BackendStream, Instant)>, ahash::RandomState>,
    max_idle: usize,
    /// Idle connections held, mirrored into the worker's gauge.
    idle_count: usize,
    metrics: Option<std::sync::Arc<crate::metrics::WorkerMetrics>>,
}

impl Pools {
    pub fn new(max_idle: usize) -> Pools {
        Pools {
            idle: HashMap::default(),
            max_idle,
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
