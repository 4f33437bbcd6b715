//! The load generator's HTTP/1.1 client: one keep-alive connection per [`Conn`], one request
//! at a time. [`exchange`] connects when needed, writes the prebuilt request, reads the head
//! and the body (Content-Length, chunked, or until close, decoded by `http.rs`), and times
//! it: first body byte, every SSE/NDJSON event, the end. Every connect, read and write has a
//! timeout, and the whole request a deadline. Failures are counted, never fatal: the
//! connection is dropped and the next request opens a new one.

use super::http::{parse_head, BodyLen, Chunked, EventFormat, EventScanner, FramingError};
use super::report::{ErrorKind, Milestones, Recorder};
use bytes::Bytes;
use cubegate::internals::proxy::io::BackendStream;
use monoio::net::TcpStream;
use std::cell::RefCell;
use std::io;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// What every request of a run shares.
#[derive(Debug, Clone)]
pub struct Target {
    pub addr: SocketAddr,
    /// https:// targets: sessions are rustls (cubegate's own session driver).
    pub tls: Option<TlsTarget>,
    /// The whole requests, head and body; sent in turn (several when they carry distinct
    /// bearer tokens, to exercise a gateway's token cache).
    pub requests: std::sync::Arc<[Bytes]>,
    pub next: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    /// Connect from 127.0.0.1..=127.0.0.N in turn (N > 1: more connections than one source
    /// address has ports for).
    pub source_ips: u8,
    pub next_source: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    /// How to split a 2xx body into events (None = not a stream).
    pub events: Option<EventFormat>,
    /// Limit of each connect, read and write.
    pub io_timeout: Duration,
    /// Limit of a whole request, from when it is sent.
    pub request_timeout: Duration,
}

#[derive(Debug, Clone)]
pub struct TlsTarget {
    pub config: std::sync::Arc<rustls::ClientConfig>,
    pub name: rustls::pki_types::ServerName<'static>,
}

/// Opens a connection (and its TLS session for https), from the next source address when
/// `source_ips` > 1.
async fn open(t: &Target) -> io::Result<BackendStream> {
    let tcp = connect(t).await?;
    let _ = tcp.set_nodelay(true);
    match &t.tls {
        None => Ok(BackendStream::plain(tcp)),
        Some(tls) => {
            BackendStream::tls(tcp, tls.config.clone(), tls.name.clone(), t.io_timeout).await
        }
    }
}

/// Opens a TCP connection, from the next source address when `source_ips` > 1.
async fn connect(t: &Target) -> io::Result<TcpStream> {
    if t.source_ips <= 1 || !t.addr.ip().is_loopback() {
        return TcpStream::connect_addr(t.addr).await;
    }
    let i = t
        .next_source
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        % usize::from(t.source_ips);
    let source = SocketAddr::from(([127, 0, 0, 1 + i as u8], 0));
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    socket.bind(&source.into())?;
    socket.set_nonblocking(true)?;
    match socket.connect(&t.addr.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    let stream = TcpStream::from_std(std::net::TcpStream::from(socket))?;
    stream.writable(true).await?;
    // Connected only if the kernel knows the peer now.
    stream.peer_addr()?;
    Ok(stream)
}

impl Target {
    /// The next request to send, in turn.
    pub fn pick(&self) -> Bytes {
        let i = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.requests[i % self.requests.len()].clone()
    }
}

/// An open keep-alive connection with its read buffer.
pub struct Conn {
    stream: BackendStream,
    buf: Vec<u8>,
}

/// A response's milestones so far.
#[derive(Debug, Default)]
struct Timing {
    m: Milestones,
    last_event: Option<Instant>,
}

impl Timing {
    /// Notes `n` body bytes (decoded) that arrived at `at`.
    fn body(&mut self, n: usize, at: Instant) {
        if n > 0 && self.m.first_byte.is_none() {
            self.m.first_byte = Some(at);
        }
        self.m.bytes += n as u64;
    }

    /// Notes an event completed at `at`; records the gap since the previous one.
    fn event(&mut self, at: Instant, rec: &mut Recorder) {
        if let Some(prev) = self.last_event {
            rec.gap(at.saturating_duration_since(prev));
        } else {
            self.m.first_event = Some(at);
        }
        self.last_event = Some(at);
        self.m.events += 1;
    }
}

enum Failure {
    Kind(ErrorKind),
    Framing(FramingError),
}

impl From<FramingError> for Failure {
    fn from(e: FramingError) -> Self {
        Failure::Framing(e)
    }
}

fn io_failure(e: &io::Error) -> Failure {
    Failure::Kind(match e.kind() {
        io::ErrorKind::TimedOut => ErrorKind::Timeout,
        io::ErrorKind::ConnectionReset
        | io::ErrorKind::BrokenPipe
        | io::ErrorKind::UnexpectedEof => ErrorKind::Closed,
        _ => ErrorKind::Io,
    })
}

fn op_deadline(deadline: Instant, t: &Target) -> monoio::time::Instant {
    let d = (Instant::now() + t.io_timeout).min(deadline);
    monoio::time::Instant::from_std(d)
}

/// Sends one request on `slot` (opening a connection when it is empty) and records it in
/// `rec` with latencies counted from `intended`. Leaves `slot` empty when the connection
/// cannot be reused. Returns true when no connection could be opened.
pub async fn exchange(
    slot: &mut Option<Conn>,
    t: &Target,
    intended: Instant,
    rec: &RefCell<Recorder>,
) -> bool {
    let sent = Instant::now();
    let deadline = sent + t.request_timeout;
    rec.borrow_mut().sent += 1;
    let mut timing = Timing::default();
    let res = attempt(slot, t, deadline, &mut timing, rec).await;
    let done = Instant::now();
    let mut r = rec.borrow_mut();
    match res {
        Ok((status, reusable)) => {
            if !reusable {
                *slot = None;
            }
            r.response(status, intended, &timing.m, done);
            false
        }
        Err(f) => {
            *slot = None;
            if timing.m.first_event.is_some() {
                r.failed_mid_stream += 1;
            }
            match f {
                Failure::Kind(k) => {
                    r.error(k);
                    k == ErrorKind::Connect
                }
                Failure::Framing(e) => {
                    r.framing(e.0);
                    false
                }
            }
        }
    }
}

/// The counts say how many connects failed; the first one's reason is printed once, so a
/// refused certificate or a wrong port is not a mystery.
fn say_first_connect_error(e: &io::Error) {
    static SAID: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if !SAID.swap(true, std::sync::atomic::Ordering::Relaxed) {
        eprintln!("cubegate-bench load: connect failed: {e}");
    }
}

/// Returns (status, connection reusable).
async fn attempt(
    slot: &mut Option<Conn>,
    t: &Target,
    deadline: Instant,
    timing: &mut Timing,
    rec: &RefCell<Recorder>,
) -> Result<(u16, bool), Failure> {
    if slot.is_none() {
        let c = monoio::time::timeout_at(op_deadline(deadline, t), open(t)).await;
        let stream = match c {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                say_first_connect_error(&e);
                return Err(Failure::Kind(ErrorKind::Connect));
            }
            Err(_) => return Err(Failure::Kind(ErrorKind::Connect)),
        };
        *slot = Some(Conn {
            stream,
            buf: Vec::with_capacity(16 * 1024),
        });
    }
    let conn = slot.as_mut().expect("connection just set");
    conn.buf.clear();
    let w =
        monoio::time::timeout_at(op_deadline(deadline, t), conn.stream.write_all(t.pick())).await;
    match w {
        Ok((Ok(_), _)) => {}
        Ok((Err(e), _)) => return Err(io_failure(&e)),
        Err(_) => return Err(Failure::Kind(ErrorKind::Timeout)),
    }
    // The head, skipping interim (1xx) responses.
    let head = loop {
        if let Some(h) = parse_head(&conn.buf)? {
            if (100..200).contains(&h.status) {
                conn.buf.drain(..h.len);
                continue;
            }
            conn.buf.drain(..h.len);
            break h;
        }
        if read_more(conn, t, deadline).await? == 0 {
            return Err(Failure::Kind(ErrorKind::Closed));
        }
    };
    let scan = if (200..300).contains(&head.status) {
        t.events
    } else {
        None
    };
    let mut scanner = scan.map(EventScanner::new);
    let mut chunked = Chunked::default();
    let mut left = match head.body {
        BodyLen::Length(n) => n,
        _ => 0,
    };
    let mut at = Instant::now();
    loop {
        // Decode what the buffer holds.
        let mut finished = false;
        {
            let mut r = rec.borrow_mut();
            let mut sink = |piece: &[u8]| {
                timing.body(piece.len(), at);
                if let Some(s) = scanner.as_mut() {
                    s.feed(piece, |_| timing.event(at, &mut r));
                }
            };
            match head.body {
                BodyLen::Empty => finished = true,
                BodyLen::Length(_) => {
                    let n = conn
                        .buf
                        .len()
                        .min(usize::try_from(left).unwrap_or(usize::MAX));
                    sink(&conn.buf[..n]);
                    left -= n as u64;
                    if n < conn.buf.len() {
                        return Err(FramingError("bytes after the response body").into());
                    }
                    finished = left == 0;
                }
                BodyLen::Chunked => {
                    let used = chunked.feed(&conn.buf, &mut sink)?;
                    if used < conn.buf.len() {
                        return Err(FramingError("bytes after the chunked body").into());
                    }
                    finished = chunked.done();
                }
                BodyLen::UntilClose => sink(&conn.buf),
            }
        }
        conn.buf.clear();
        if finished {
            break;
        }
        let n = read_more(conn, t, deadline).await?;
        at = Instant::now();
        if n == 0 {
            if head.body == BodyLen::UntilClose {
                break;
            }
            return Err(Failure::Kind(ErrorKind::Closed));
        }
    }
    if let Some(s) = scanner {
        if !s.finished || s.pending() {
            return Err(Failure::Kind(ErrorKind::Incomplete));
        }
    }
    Ok((head.status, !head.close))
}

/// Reads more bytes onto the end of the connection's buffer; Ok(0) = EOF.
async fn read_more(conn: &mut Conn, t: &Target, deadline: Instant) -> Result<usize, Failure> {
    let owned = std::mem::take(&mut conn.buf);
    let fut = conn.stream.read_more(owned, 16 * 1024);
    match monoio::time::timeout_at(op_deadline(deadline, t), fut).await {
        Ok((res, buf)) => {
            conn.buf = buf;
            res.map_err(|e| io_failure(&e))
        }
        Err(_) => Err(Failure::Kind(ErrorKind::Timeout)),
    }
}
