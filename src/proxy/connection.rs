//! One client connection: its sockets, the bytes read from it, and how they are read and
//! written. What one request does with them is in the phase modules; the order of those
//! phases is in [`super::serve`].
//!
//! The read buffer holds the current request's head at offset 0, then as much of its body
//! as a phase has read, then whatever the client pipelined behind it. It starts small (an
//! idle keep-alive connection should cost little) and is bounded by the head and body
//! limits. Every read and write is bounded in time: a client that stops sending or stops
//! reading is dropped, not waited for.

use super::error::GatewayError;
use super::io::{reserve, ClientRead, ClientWrite, OutBuf};
use super::request::{Persistence, Request};
use super::request_id::RequestId;
use super::worker::Worker;
use crate::http::head::{check_partial, parse_request_head, worth_parsing, RequestHead};
use crate::http::response::write_local_response;
use crate::tls::stream::{handshake, HandshakeError};
use monoio::io::{AsyncWriteRent, AsyncWriteRentExt, Splitable};
use monoio::net::TcpStream;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// One read from a client socket.
pub const READ_SIZE: usize = 16 * 1024;
/// The read buffer's first size: a head is rarely 1 KiB.
const INITIAL_READ: usize = 4 * 1024;
/// How long the goodbye (close_notify, FIN) may take before the socket is just closed.
const SHUTDOWN_LIMIT: Duration = Duration::from_secs(1);

pub struct Connection {
    rd: ClientRead,
    wr: ClientWrite,
    rbuf: Vec<u8>,
    peer: SocketAddr,
    /// The peer's address as text, written once: every request forwards it
    /// (X-Forwarded-For), and formatting it each time was 0.5 % of a request's CPU.
    peer_ip: PeerIp,
    /// Scratch for heads and local answers, reused across requests.
    out: Vec<u8>,
    /// The last request's head, kept so its header vector is reused.
    spare_head: Option<RequestHead>,
    /// Whether a request has been read on this connection yet.
    carried_request: bool,
}

impl Connection {
    /// The connection as it is, or after a TLS handshake when the listener speaks HTTPS.
    /// `None` = the handshake failed or timed out (the connection just closes: there is no
    /// HTTP yet to answer in).
    pub async fn open(worker: &Worker, stream: TcpStream, peer: SocketAddr) -> Option<Connection> {
        let _ = stream.set_nodelay(true);
        let (rd, wr) = match &worker.tls {
            None => {
                let (rd, wr) = stream.into_split();
                (ClientRead::Plain(rd), ClientWrite::Plain(wr))
            }
            Some(config) => accept_tls(worker, config.clone(), stream, peer).await?,
        };
        Some(Connection {
            rd,
            wr,
            rbuf: Vec::with_capacity(INITIAL_READ),
            peer,
            peer_ip: PeerIp::of(peer),
            out: Vec::with_capacity(1024),
            spare_head: None,
            carried_request: false,
        })
    }

    pub fn peer(&self) -> SocketAddr {
        self.peer
    }

    /// The peer's IP address as text (`192.0.2.1`, `2001:db8::1`).
    pub fn peer_ip_text(&self) -> &[u8] {
        &self.peer_ip.text[..self.peer_ip.len as usize]
    }

    /// The bytes read so far: the current request's head at 0, then its body, then more.
    pub fn buffer(&self) -> &[u8] {
        &self.rbuf
    }

    /// Waits for the next request head. `Ok(None)` = the connection should end quietly
    /// (client closed, idle timeout, draining).
    pub async fn next_request(&mut self, worker: &Worker) -> Result<Option<Request>, GatewayError> {
        let mut head = self.spare_head.take().unwrap_or_default();
        let mut deadline: Option<Instant> = None;
        let mut scanned = 0;
        loop {
            if !self.rbuf.is_empty() {
                let complete = if worth_parsing(&self.rbuf, scanned) {
                    parse_request_head(&self.rbuf, &worker.limits, &mut head)?.is_some()
                } else {
                    check_partial(&self.rbuf, &worker.limits)?;
                    false
                };
                if complete {
                    let id = head
                        .request_id
                        .and_then(|s| RequestId::from_client(s.of(&self.rbuf)))
                        .unwrap_or_else(|| worker.next_request_id());
                    self.carried_request = true;
                    return Ok(Some(Request::new(head, id, worker.timeouts.body_total())));
                }
                scanned = self.rbuf.len();
                deadline.get_or_insert_with(|| Instant::now() + worker.timeouts.header_read());
            }
            reserve(&mut self.rbuf, READ_SIZE);
            let buf = std::mem::take(&mut self.rbuf);
            let read = match deadline {
                // Between requests (the buffer is empty): idle timeout, and cancellable by
                // draining.
                None => {
                    debug_assert!(buf.is_empty());
                    if worker.draining.get() {
                        self.rbuf = buf;
                        if self.carried_request {
                            return Ok(None);
                        }
                        // A connection accepted as draining began: its client is sending
                        // its first request and is owed an answer. Wait for it as for a
                        // head in progress (bounded), not as for an idle keep-alive.
                        deadline = Some(Instant::now() + worker.timeouts.header_read());
                        continue;
                    }
                    let handle = worker.drain.borrow().handle();
                    monoio::time::timeout(
                        worker.timeouts.idle_keepalive(),
                        self.rd.cancelable_read_more(buf, READ_SIZE, handle),
                    )
                    .await
                    .ok()
                }
                Some(d) => {
                    let left = d.saturating_duration_since(Instant::now());
                    match monoio::time::timeout(left, self.rd.read_more(buf, READ_SIZE)).await {
                        Ok(r) => Some(r),
                        // A connection that never sent a byte gets no 408, just its end.
                        Err(_) if scanned == 0 => return Ok(None),
                        Err(_) => return Err(GatewayError::HeaderReadTimeout),
                    }
                }
            };
            let Some((res, buf)) = read else {
                return Ok(None); // idle timeout
            };
            self.rbuf = buf;
            match res {
                // Cancelled by draining before the first request arrived: wait for it
                // (the branch above).
                Err(_) if worker.draining.get() && !self.carried_request => {}
                Ok(0) | Err(_) => return Ok(None),
                Ok(_) => {}
            }
        }
    }

    /// Reads more of the current request's body behind what the buffer holds, waiting at
    /// most `wait`.
    pub async fn read_body(&mut self, wait: Duration) -> Result<(), GatewayError> {
        let buf = std::mem::take(&mut self.rbuf);
        let read = monoio::time::timeout(wait, self.rd.read_more(buf, READ_SIZE)).await;
        let Ok((res, buf)) = read else {
            return Err(GatewayError::BodyReadTimeout);
        };
        self.rbuf = buf;
        match res {
            Ok(0) | Err(_) => Err(GatewayError::BodyIncomplete),
            Ok(_) => Ok(()),
        }
    }

    /// Reads from the client into `buf` (a body copy buffer of the caller's), at most
    /// `wait`; the bytes are not kept in the connection's buffer.
    pub async fn read_into(
        &mut self,
        buf: Vec<u8>,
        wait: Duration,
    ) -> (Result<(), GatewayError>, Vec<u8>) {
        match monoio::time::timeout(wait, self.rd.read_more(buf, READ_SIZE)).await {
            Err(_) => (Err(GatewayError::BodyReadTimeout), Vec::new()),
            Ok((Ok(0) | Err(_), buf)) => (Err(GatewayError::BodyIncomplete), buf),
            Ok((Ok(_), buf)) => (Ok(()), buf),
        }
    }

    /// Bytes read past the current request's body: the next request's, kept for it.
    pub fn keep_pipelined(&mut self, bytes: &[u8]) {
        self.rbuf.extend_from_slice(bytes);
    }

    /// Bytes in the buffer beyond `consumed` (pipelined requests waiting their turn).
    pub fn pending_bytes(&self, consumed: usize) -> usize {
        self.rbuf.len().saturating_sub(consumed)
    }

    /// Writes a whole buffer to the client within `limit`: a client that stops reading is
    /// treated as gone. `None` = failed (the connection must end).
    pub async fn write_within<B: OutBuf>(&mut self, buf: B, limit: Duration) -> Option<B> {
        write_within(&mut self.wr, buf, limit).await
    }

    /// The scratch buffer, emptied; give it back with `return_scratch`.
    pub fn take_scratch(&mut self) -> Vec<u8> {
        let mut out = std::mem::take(&mut self.out);
        out.clear();
        out
    }

    pub fn return_scratch(&mut self, out: Vec<u8>) {
        self.out = out;
    }

    /// The read buffer itself, lent out for a write that sends part of it (a large body
    /// read with the head); give it back with `return_buffer`.
    pub fn take_buffer(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.rbuf)
    }

    pub fn return_buffer(&mut self, buf: Vec<u8>) {
        self.rbuf = buf;
    }

    /// Both halves and the read buffer at once, for the phases that read and write
    /// concurrently (the client watch while an answer streams; splice).
    pub fn split(&mut self) -> (&mut ClientRead, &mut ClientWrite, &mut Vec<u8>) {
        (&mut self.rd, &mut self.wr, &mut self.rbuf)
    }

    /// Ends a request: its bytes leave the buffer when the connection stays, and its head
    /// storage is kept for the next one. A failed write that took the buffer with it means
    /// the connection ends.
    pub fn finish(&mut self, req: Request, persistence: Persistence) -> Persistence {
        let intact = self.rbuf.len() >= req.consumed;
        let persistence = persistence.and(Persistence::when(intact));
        if persistence.is_keep_alive() {
            self.rbuf.drain(..req.consumed);
            // One huge body must not pin its buffer for the connection's idle life.
            if self.rbuf.capacity() > 4 * READ_SIZE && self.rbuf.len() <= READ_SIZE {
                self.rbuf.shrink_to(READ_SIZE);
            }
            // Trimmed while a slow answer was awaited (stream_response): back to the
            // usual room, rather than the full READ_SIZE the next read would reserve.
            if self.rbuf.capacity() < INITIAL_READ {
                self.rbuf.reserve_exact(INITIAL_READ - self.rbuf.len());
            }
        }
        self.spare_head = Some(req.head);
        persistence
    }

    /// Says goodbye: under TLS this writes close_notify, which a client that stopped
    /// reading would never take, so it is bounded.
    pub async fn close(mut self) {
        let _ = monoio::time::timeout(SHUTDOWN_LIMIT, self.wr.shutdown()).await;
    }
}

/// Writes a whole buffer within `limit`. `None` = the write failed or timed out.
pub async fn write_within<B: OutBuf>(wr: &mut ClientWrite, buf: B, limit: Duration) -> Option<B> {
    if buf.bytes_init() == 0 {
        return Some(buf);
    }
    match monoio::time::timeout(limit, wr.write_all(buf)).await {
        Ok((Ok(_), buf)) => Some(buf),
        _ => None,
    }
}

/// An IP address as text, inline (the longest, an IPv4-mapped IPv6 address, is 45 bytes).
struct PeerIp {
    text: [u8; 46],
    len: u8,
}

impl PeerIp {
    fn of(peer: SocketAddr) -> PeerIp {
        use std::io::Write;
        let mut text = [0u8; 46];
        let mut cursor = std::io::Cursor::new(&mut text[..]);
        let _ = write!(cursor, "{}", peer.ip());
        let len = cursor.position() as u8;
        PeerIp { text, len }
    }
}

/// The TLS handshake of a new connection, bounded by the head-read timeout. Plain HTTP
/// sent to the HTTPS port gets a 400 in HTTP, the only language that client understands.
async fn accept_tls(
    worker: &Worker,
    config: std::sync::Arc<rustls::ServerConfig>,
    mut stream: TcpStream,
    peer: SocketAddr,
) -> Option<(ClientRead, ClientWrite)> {
    let session = rustls::ServerConnection::new(config).ok()?;
    let (mut reader, mut writer) = crate::tls::stream::pair(session);
    let shake = handshake(&mut stream, &mut reader, &mut writer, true);
    let outcome = monoio::time::timeout(worker.timeouts.header_read(), shake).await;
    if !matches!(outcome, Ok(Ok(()))) {
        worker.metrics.tls_handshake_failures.inc();
    }
    match outcome {
        Ok(Ok(())) => {}
        Ok(Err(HandshakeError::PlainHttp)) => {
            let mut answer = Vec::with_capacity(256);
            let id = worker.next_request_id();
            write_local_response(
                &mut answer,
                400,
                &[],
                "application/json",
                crate::tls::PLAIN_HTTP_BODY,
                id.as_bytes(),
                false,
            );
            let limit = worker.timeouts.between_chunks();
            let _ = monoio::time::timeout(limit, stream.write_all(answer)).await;
            let _ = stream.shutdown().await;
            return None;
        }
        Ok(Err(e)) => {
            tracing::debug!(%peer, error = %e, "TLS handshake failed");
            return None;
        }
        Err(_) => {
            tracing::debug!(%peer, "TLS handshake timed out");
            return None;
        }
    }
    worker.metrics.tls_handshakes.inc();
    let (rd, wr) = stream.into_split();
    Some((
        ClientRead::Tls {
            tcp: rd,
            tls: reader,
        },
        ClientWrite::Tls {
            tcp: wr,
            tls: writer,
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::PeerIp;

    #[test]
    fn peer_ip_text_is_the_address_alone() {
        for (peer, text) in [
            ("192.0.2.1:443", "192.0.2.1"),
            ("[2001:db8::1]:80", "2001:db8::1"),
            (
                "[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:1",
                "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
            ),
            ("[::ffff:255.255.255.255]:1", "::ffff:255.255.255.255"),
        ] {
            let ip = PeerIp::of(peer.parse().unwrap());
            assert_eq!(&ip.text[..ip.len as usize], text.as_bytes());
        }
    }
}
