//! Reading one management request off a blocking socket.
//!
//! The head goes through the data plane's parser ([`crate::http::head`]), so a request has
//! one meaning wherever it arrives: what the public port refuses (Content-Length with
//! Transfer-Encoding, differing Content-Lengths, bare LF, obs-fold, control bytes, …) the
//! management listener refuses with the same status. The limits stay the management API's
//! own (a smaller header count and a 1 MiB body), and the whole request must arrive within
//! one deadline, so a client trickling bytes cannot hold one of the few management threads.
//! Chunked bodies are decoded (bounded by [`MAX_BODY`]) as before: the data plane forwards
//! a client's chunked body as chunked. The bytes come through [`Wire`]: a plain socket, or
//! the TLS session of an HTTPS management listener (`super::https`), with the same bounds.

use crate::config::Limits;
use crate::http::chunked::ChunkedDecoder;
use crate::http::head::{check_partial, parse_request_head, worth_parsing, BodyFraming};
use crate::http::head::{RequestHead, Span};
use crate::http::HttpError;
use std::io::{self, Read};
use std::net::{IpAddr, TcpStream};
use std::time::{Duration, Instant};

const MAX_HEAD: usize = 32 * 1024;
const MAX_HEADERS: usize = 64;
pub const MAX_BODY: usize = 1024 * 1024;
/// One read or write on a management connection.
pub(super) const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// A whole request (head and body) must arrive within this.
const REQUEST_DEADLINE: Duration = Duration::from_secs(15);
const READ_SIZE: usize = 8192;
const BODY_TOO_LARGE: &str = "request body too large (limit 1 MiB)";

pub struct Request {
    pub method: String,
    /// Path without the query.
    pub path: String,
    /// The query, without the `?` ("" when none).
    pub query: String,
    pub authorization: Option<String>,
    /// What the client accepts (the usage API answers CSV to `text/csv`).
    pub accept: Option<String>,
    pub body: Vec<u8>,
    /// The client: the last `X-Forwarded-For` hop when the request came through the data
    /// plane on loopback, else the peer.
    pub client: IpAddr,
}

/// A connection a request is read from: a plain socket, or a TLS session over one.
pub trait Wire {
    /// Reads some bytes into `buf`, waiting at most until `deadline` (and at most
    /// [`IO_TIMEOUT`] on one socket read). `Ok(0)` = the peer closed.
    fn read_until(&mut self, buf: &mut [u8], deadline: Instant) -> io::Result<usize>;
}

impl Wire for TcpStream {
    fn read_until(&mut self, buf: &mut [u8], deadline: Instant) -> io::Result<usize> {
        let left = deadline.saturating_duration_since(Instant::now());
        self.set_read_timeout(Some(left.min(IO_TIMEOUT).max(Duration::from_millis(1))))?;
        self.read(buf)
    }
}

/// Why no request could be read. Either way the answer is an error and the connection
/// closes (its framing, or what is left of it, cannot be trusted).
#[derive(Debug)]
pub enum Refusal {
    /// The head is not one unambiguous HTTP/1.1 message: answered as the data plane
    /// answers it.
    Head(HttpError),
    /// Too slow, too large, cut short, or a broken chunked body.
    Transfer { status: u16, message: &'static str },
}

impl From<HttpError> for Refusal {
    fn from(e: HttpError) -> Self {
        Refusal::Head(e)
    }
}

fn transfer(status: u16, message: &'static str) -> Refusal {
    Refusal::Transfer { status, message }
}

/// The data plane's head rules with the management API's own sizes.
fn head_limits() -> Limits {
    Limits {
        max_head_bytes: MAX_HEAD,
        max_headers: MAX_HEADERS,
        max_body_bytes: MAX_BODY as u64,
        ..Limits::default()
    }
}

/// Reads one request (head and body) within `REQUEST_DEADLINE`. `peer` is the connection's
/// remote address.
pub fn read_request(stream: &mut impl Wire, peer: IpAddr) -> Result<Request, Refusal> {
    let deadline = Instant::now() + REQUEST_DEADLINE;
    let mut buf = Vec::with_capacity(4096);
    let mut head = RequestHead::default();
    read_head(stream, &mut buf, &mut head, deadline)?;
    let target = head.target_str(&buf)?;
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let (path, query) = (path.to_string(), query.to_string());
    let text = |span: Option<Span>| span.map(|s| String::from_utf8_lossy(s.of(&buf)).into_owned());
    let authorization = text(head.authorization);
    let accept = head
        .headers
        .iter()
        .find(|(name, _)| name.of(&buf).eq_ignore_ascii_case(b"accept"))
        .map(|(_, value)| *value);
    let accept = text(accept);
    let client = match text(head.forwarded_for) {
        Some(xff) if peer.is_loopback() => xff
            .rsplit(',')
            .next()
            .and_then(|ip| ip.trim().parse().ok())
            .unwrap_or(peer),
        _ => peer,
    };
    let after_head = buf.split_off(head.len);
    let body = match head.framing {
        BodyFraming::None => Vec::new(),
        BodyFraming::Length(n) => read_sized_body(stream, after_head, n, deadline)?,
        BodyFraming::Chunked => read_chunked_body(stream, &after_head, deadline)?,
    };
    Ok(Request {
        method: head.method.as_str().to_string(),
        path,
        query,
        authorization,
        accept,
        body,
        client,
    })
}

/// Reads until `buf` starts with a complete head, parsed into `head`. A line that breaks a
/// rule or a limit is refused as soon as it arrives, not after the whole head.
fn read_head(
    stream: &mut impl Wire,
    buf: &mut Vec<u8>,
    head: &mut RequestHead,
    deadline: Instant,
) -> Result<(), Refusal> {
    let limits = head_limits();
    let mut chunk = [0u8; READ_SIZE];
    loop {
        let scanned = buf.len();
        let n = read_within(stream, &mut chunk, deadline)?;
        if n == 0 {
            return Err(transfer(400, "connection closed inside the request"));
        }
        buf.extend_from_slice(&chunk[..n]);
        if !worth_parsing(buf, scanned) {
            check_partial(buf, &limits)?;
        } else if parse_request_head(buf, &limits, head)?.is_some() {
            return Ok(());
        }
    }
}

/// A Content-Length body; `body` holds what arrived with the head (bytes past the body
/// are dropped: one request per connection).
fn read_sized_body(
    stream: &mut impl Wire,
    mut body: Vec<u8>,
    length: u64,
    deadline: Instant,
) -> Result<Vec<u8>, Refusal> {
    let want = match usize::try_from(length) {
        Ok(n) if n <= MAX_BODY => n,
        _ => return Err(transfer(413, BODY_TOO_LARGE)),
    };
    let mut chunk = [0u8; READ_SIZE];
    while body.len() < want {
        let n = read_within(stream, &mut chunk, deadline)?;
        if n == 0 {
            return Err(transfer(400, "connection closed inside the body"));
        }
        body.extend_from_slice(&chunk[..n]);
    }
    body.truncate(want);
    Ok(body)
}

/// A chunked body, decoded; `arrived` is what came with the head. Past `MAX_BODY` of
/// payload it is refused, however it is cut into chunks.
fn read_chunked_body(
    stream: &mut impl Wire,
    arrived: &[u8],
    deadline: Instant,
) -> Result<Vec<u8>, Refusal> {
    let mut body = Vec::new();
    let mut decoder = ChunkedDecoder::new();
    let mut chunk = [0u8; READ_SIZE];
    let mut raw = arrived;
    loop {
        decoder
            .feed(raw, |payload| body.extend_from_slice(payload))
            .map_err(|_| transfer(400, "malformed chunked body"))?;
        if body.len() > MAX_BODY {
            return Err(transfer(413, BODY_TOO_LARGE));
        }
        if decoder.is_done() {
            return Ok(body);
        }
        let n = read_within(stream, &mut chunk, deadline)?;
        if n == 0 {
            return Err(transfer(400, "connection closed inside the body"));
        }
        raw = &chunk[..n];
    }
}

/// Reads more, within what is left of the request's whole deadline.
fn read_within(
    stream: &mut impl Wire,
    chunk: &mut [u8],
    deadline: Instant,
) -> Result<usize, Refusal> {
    if Instant::now() >= deadline {
        return Err(transfer(408, "the request took too long to arrive"));
    }
    stream
        .read_until(chunk, deadline)
        .map_err(|_| transfer(408, "timed out reading the request"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::net::TcpListener;

    /// Sends `raw` over loopback and reads it back as a management request.
    fn read(raw: &[u8]) -> Result<Request, Refusal> {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let raw = raw.to_vec();
        // Written from another thread: a large request need not fit the socket buffers.
        let writer = std::thread::spawn(move || {
            let _ = client.write_all(&raw);
            // Nothing more comes: a request that wants more bytes sees the end at once.
            let _ = client.shutdown(std::net::Shutdown::Write);
            client
        });
        let (mut server, peer) = listener.accept().unwrap();
        let request = read_request(&mut server, peer.ip());
        drop(server);
        let _ = writer.join();
        request
    }

    fn status(r: Result<Request, Refusal>) -> u16 {
        match r {
            Ok(_) => 200,
            Err(Refusal::Head(e)) => e.status(),
            Err(Refusal::Transfer { status, .. }) => status,
        }
    }

    #[test]
    fn reads_a_request_and_its_client() {
        let raw = b"POST /users/tokens/issue?x=1 HTTP/1.1\r\nHost: m\r\nAuthorization: Bearer t\r\nAccept: text/csv\r\nX-Forwarded-For: 10.0.0.1, 10.0.0.2\r\nContent-Length: 2\r\n\r\n{}";
        let req = read(raw).unwrap();
        assert_eq!(req.method, "POST");
        assert_eq!(req.path, "/users/tokens/issue");
        assert_eq!(req.query, "x=1");
        assert_eq!(req.accept.as_deref(), Some("text/csv"));
        assert_eq!(req.authorization.as_deref(), Some("Bearer t"));
        assert_eq!(req.body, b"{}");
        assert_eq!(req.client, IpAddr::from([10, 0, 0, 2]));
    }

    #[test]
    fn decodes_chunked_bodies() {
        let raw = b"PUT /domains/d/members/u HTTP/1.1\r\nHost: m\r\nTransfer-Encoding: chunked\r\n\r\n3\r\n{\"r\r\n5\r\nole\":\r\n1\r\n1\r\n1\r\n}\r\n0\r\n\r\n";
        assert_eq!(read(raw).unwrap().body, b"{\"role\":1}");
        let bad = b"POST / HTTP/1.1\r\nHost: m\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n";
        assert_eq!(status(read(bad)), 400);
    }

    #[test]
    fn refuses_what_the_data_plane_refuses() {
        let cases: &[(&[u8], u16)] = &[
            (b"POST / HTTP/1.1\r\nHost: m\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n{}", 400),
            (b"POST / HTTP/1.1\r\nHost: m\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}x", 400),
            (b"GET / HTTP/1.1\nHost: m\r\n\r\n", 400),
            (b"GET / HTTP/1.1\r\nHost: m\r\nX-A: 1\r\n folded\r\n\r\n", 400),
            (b"GET / HTTP/1.1\r\nHost : m\r\n\r\n", 400),
            (b"GET / HTTP/1.1\r\nHost: m\r\nX-A: a\x01b\r\n\r\n", 400),
            (b"GET / HTTP/1.1\r\n\r\n", 400),
            (b"POST / HTTP/1.1\r\nHost: m\r\nTransfer-Encoding: gzip\r\n\r\n", 501),
            (b"POST / HTTP/1.1\r\nHost: m\r\nExpect: 200-ok\r\n\r\n", 417),
        ];
        for (raw, want) in cases {
            let got = status(read(raw));
            assert_eq!(got, *want, "{:?}", String::from_utf8_lossy(raw));
        }
    }

    #[test]
    fn keeps_the_management_limits() {
        let many = format!(
            "GET / HTTP/1.1\r\nHost: m\r\n{}\r\n",
            "X-A: 1\r\n".repeat(70)
        );
        assert_eq!(status(read(many.as_bytes())), 431);
        let big = format!(
            "GET / HTTP/1.1\r\nHost: m\r\nX-A: {}\r\n\r\n",
            "a".repeat(40_000)
        );
        assert_eq!(status(read(big.as_bytes())), 431);
        let huge = format!(
            "POST / HTTP/1.1\r\nHost: m\r\nContent-Length: {}\r\n\r\n",
            MAX_BODY + 1
        );
        assert_eq!(status(read(huge.as_bytes())), 413);
        // Chunked: the payload counts, however it is cut.
        let mut chunked =
            b"POST / HTTP/1.1\r\nHost: m\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
        for _ in 0..=MAX_BODY / 65536 {
            chunked.extend_from_slice(b"10000\r\n");
            chunked.extend(std::iter::repeat_n(b'a', 65536));
            chunked.extend_from_slice(b"\r\n");
        }
        chunked.extend_from_slice(b"0\r\n\r\n");
        assert_eq!(status(read(&chunked)), 413);
        let cut = b"POST / HTTP/1.1\r\nHost: m\r\nContent-Length: 10\r\n\r\n{}";
        assert_eq!(status(read(cut)), 400);
    }
}
