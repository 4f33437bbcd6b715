//! Minimal HTTP/1.1 plumbing for the simulator: request-head parsing with httparse
//! (keeping only what the simulator needs), an incremental chunked-body decoder,
//! response-head and chunk framing. Pure functions over byte buffers, no I/O, so they
//! are unit-testable; `mod.rs` does the socket work.

use std::io::Write;

/// Largest request head (request line + headers) accepted.
pub const MAX_HEAD: usize = 64 * 1024;
/// Largest request body accepted (after de-chunking).
pub const MAX_BODY: usize = 16 * 1024 * 1024;
/// Most request headers accepted.
pub const MAX_HEADERS: usize = 128;

/// How the request body is framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyKind {
    None,
    Length(usize),
    Chunked,
}

/// The parts of a request head the simulator uses.
#[derive(Debug, Default)]
pub struct Head {
    pub method: String,
    /// Path without the query string.
    pub path: String,
    pub keep_alive: bool,
    pub body: Option<BodyKind>,
    pub expect_continue: bool,
    pub request_id: Option<Vec<u8>>,
    pub domain_id: Option<Vec<u8>>,
    pub saw_authorization: bool,
    pub die_after: Option<u64>,
    pub stall_ms: Option<u64>,
}

/// Why a request head was refused: status and a short reason.
#[derive(Debug, PartialEq, Eq)]
pub struct HeadError(pub u16, pub &'static str);

/// Parses a request head from the front of `buf`.
/// `Ok(None)` = incomplete; `Ok(Some((head, len)))` = parsed, `len` bytes of head.
pub fn parse_head(buf: &[u8]) -> Result<Option<(Head, usize)>, HeadError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => {
            if buf.len() > MAX_HEAD {
                return Err(HeadError(431, "request head larger than 64 KiB"));
            }
            return Ok(None);
        }
        Err(httparse::Error::TooManyHeaders) => {
            return Err(HeadError(431, "too many request headers"))
        }
        Err(_) => return Err(HeadError(400, "malformed HTTP request")),
    };
    if len > MAX_HEAD {
        return Err(HeadError(431, "request head larger than 64 KiB"));
    }
    let version = req.version.unwrap_or(1);
    let target = req.path.unwrap_or("/");
    let path = target.split('?').next().unwrap_or("/");
    let mut head = Head {
        method: req.method.unwrap_or("GET").to_string(),
        path: path.to_string(),
        keep_alive: version >= 1,
        ..Head::default()
    };
    let mut length: Option<usize> = None;
    let mut chunked = false;
    for h in req.headers.iter() {
        let name = h.name;
        let value = h.value;
        if name.eq_ignore_ascii_case("content-length") {
            let n = parse_decimal(value).ok_or(HeadError(400, "invalid Content-Length"))?;
            if length.is_some_and(|old| old != n) {
                return Err(HeadError(400, "conflicting Content-Length headers"));
            }
            length = Some(n);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            let v = trim(value);
            if v.eq_ignore_ascii_case(b"chunked") {
                chunked = true;
            } else {
                return Err(HeadError(
                    400,
                    "unsupported Transfer-Encoding (only chunked)",
                ));
            }
        } else if name.eq_ignore_ascii_case("connection") {
            for tok in value.split(|&b| b == b',') {
                let tok = trim(tok);
                if tok.eq_ignore_ascii_case(b"close") {
                    head.keep_alive = false;
                } else if tok.eq_ignore_ascii_case(b"keep-alive") {
                    head.keep_alive = true;
                }
            }
        } else if name.eq_ignore_ascii_case("expect") {
            head.expect_continue = trim(value).eq_ignore_ascii_case(b"100-continue");
        } else if name.eq_ignore_ascii_case("x-request-id") {
            head.request_id = Some(value.to_vec());
        } else if name.eq_ignore_ascii_case("x-domain-id") {
            head.domain_id = Some(value.to_vec());
        } else if name.eq_ignore_ascii_case("authorization") {
            head.saw_authorization = true;
        } else if name.eq_ignore_ascii_case("x-sim-die-after") {
            head.die_after =
                Some(parse_decimal(value).ok_or(HeadError(400, "invalid x-sim-die-after"))? as u64);
        } else if name.eq_ignore_ascii_case("x-sim-stall-ms") {
            head.stall_ms =
                Some(parse_decimal(value).ok_or(HeadError(400, "invalid x-sim-stall-ms"))? as u64);
        }
    }
    head.body = Some(match (chunked, length) {
        (true, Some(_)) => {
            return Err(HeadError(400, "both Content-Length and Transfer-Encoding"));
        }
        (true, None) => BodyKind::Chunked,
        (false, Some(n)) if n > MAX_BODY => {
            return Err(HeadError(413, "request body larger than 16 MiB"));
        }
        (false, Some(0)) | (false, None) => BodyKind::None,
        (false, Some(n)) => BodyKind::Length(n),
    });
    Ok(Some((head, len)))
}

fn trim(v: &[u8]) -> &[u8] {
    let start = v
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .unwrap_or(v.len());
    let end = v
        .iter()
        .rposition(|b| !b.is_ascii_whitespace())
        .map_or(start, |e| e + 1);
    &v[start..end]
}

/// A non-negative decimal of at most 15 digits.
fn parse_decimal(v: &[u8]) -> Option<usize> {
    let v = trim(v);
    if v.is_empty() || v.len() > 15 || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(
        v.iter()
            .fold(0usize, |n, &d| n * 10 + usize::from(d - b'0')),
    )
}

/// Incremental decoder of a chunked body. Feed it the unconsumed input; it appends data
/// to `out` and reports how many input bytes it consumed.
#[derive(Debug, Default)]
pub struct Chunked {
    state: ChunkState,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    #[default]
    Size,
    Data(usize),
    DataEnd,
    Trailers,
    Done,
}

impl Chunked {
    /// Decodes from `input`; returns bytes consumed. `done()` tells when the body ended.
    pub fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) -> Result<usize, HeadError> {
        let mut pos = 0;
        loop {
            let rest = &input[pos..];
            match self.state {
                ChunkState::Done => return Ok(pos),
                ChunkState::Size => {
                    let Some(nl) = memchr::memchr(b'\n', rest) else {
                        if rest.len() > 1024 {
                            return Err(HeadError(400, "chunk size line too long"));
                        }
                        return Ok(pos);
                    };
                    let line = rest[..nl].strip_suffix(b"\r").unwrap_or(&rest[..nl]);
                    let hex = line.split(|&b| b == b';').next().unwrap_or(b"");
                    let hex = trim(hex);
                    if hex.is_empty() || hex.len() > 8 || !hex.iter().all(u8::is_ascii_hexdigit) {
                        return Err(HeadError(400, "invalid chunk size"));
                    }
                    let size = hex.iter().fold(0usize, |n, &d| {
                        n * 16 + (char::from(d).to_digit(16).unwrap_or(0) as usize)
                    });
                    if out.len() + size > MAX_BODY {
                        return Err(HeadError(413, "request body larger than 16 MiB"));
                    }
                    pos += nl + 1;
                    self.state = if size == 0 {
                        ChunkState::Trailers
                    } else {
                        ChunkState::Data(size)
                    };
                }
                ChunkState::Data(left) => {
                    if rest.is_empty() {
                        return Ok(pos);
                    }
                    let n = left.min(rest.len());
                    out.extend_from_slice(&rest[..n]);
                    pos += n;
                    self.state = if n == left {
                        ChunkState::DataEnd
                    } else {
                        ChunkState::Data(left - n)
                    };
                }
                ChunkState::DataEnd => {
                    if rest.len() < 2 {
                        if rest.first().is_some_and(|&b| b != b'\r' && b != b'\n') {
                            return Err(HeadError(400, "chunk data not followed by CRLF"));
                        }
                        if rest == b"\n" {
                            pos += 1;
                            self.state = ChunkState::Size;
                            continue;
                        }
                        return Ok(pos);
                    }
                    if rest.starts_with(b"\r\n") {
                        pos += 2;
                    } else if rest[0] == b'\n' {
                        pos += 1;
                    } else {
                        return Err(HeadError(400, "chunk data not followed by CRLF"));
                    }
                    self.state = ChunkState::Size;
                }
                ChunkState::Trailers => {
                    let Some(nl) = memchr::memchr(b'\n', rest) else {
                        if rest.len() > MAX_HEAD {
                            return Err(HeadError(431, "chunked trailers too large"));
                        }
                        return Ok(pos);
                    };
                    let line = rest[..nl].strip_suffix(b"\r").unwrap_or(&rest[..nl]);
                    pos += nl + 1;
                    if line.is_empty() {
                        self.state = ChunkState::Done;
                    }
                }
            }
        }
    }

    pub fn done(&self) -> bool {
        self.state == ChunkState::Done
    }
}

/// Per-request values every response carries.
pub struct Echo<'a> {
    pub request_id: Option<&'a [u8]>,
    pub domain_id: Option<&'a [u8]>,
    pub saw_authorization: bool,
    /// Lowercase header names (uvicorn/vLLM style) instead of canonical (Go/Ollama).
    pub lowercase: bool,
}

pub fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        413 => "Payload Too Large",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Unknown",
    }
}

/// Writes a response head into `out`. `length: None` = chunked.
pub fn write_head(
    out: &mut Vec<u8>,
    status: u16,
    content_type: &str,
    length: Option<usize>,
    keep_alive: bool,
    echo: &Echo<'_>,
) {
    let lc = echo.lowercase;
    let n = |canon: &'static str, lower: &'static str| if lc { lower } else { canon };
    let _ = write!(out, "HTTP/1.1 {} {}\r\n", status, reason(status));
    if lc {
        out.extend_from_slice(b"server: uvicorn\r\n");
    }
    if !content_type.is_empty() {
        let _ = write!(
            out,
            "{}: {}\r\n",
            n("Content-Type", "content-type"),
            content_type
        );
    }
    match length {
        Some(len) => {
            let _ = write!(
                out,
                "{}: {}\r\n",
                n("Content-Length", "content-length"),
                len
            );
        }
        None => {
            let _ = write!(
                out,
                "{}: chunked\r\n",
                n("Transfer-Encoding", "transfer-encoding")
            );
        }
    }
    if !keep_alive {
        let _ = write!(out, "{}: close\r\n", n("Connection", "connection"));
    }
    if let Some(id) = echo.request_id {
        out.extend_from_slice(n("X-Request-Id: ", "x-request-id: ").as_bytes());
        out.extend_from_slice(id);
        out.extend_from_slice(b"\r\n");
    }
    let _ = write!(
        out,
        "x-sim-saw-authorization: {}\r\nx-sim-domain-id: ",
        if echo.saw_authorization { "yes" } else { "no" }
    );
    out.extend_from_slice(echo.domain_id.unwrap_or(b"-"));
    out.extend_from_slice(b"\r\n\r\n");
}

/// Room reserved in front of a chunk payload for its size line (8 hex digits + CRLF).
pub const CHUNK_PREFIX: usize = 10;

/// Starts a chunk in `buf`: clears it and reserves the size-line room.
pub fn chunk_begin(buf: &mut Vec<u8>) {
    buf.clear();
    buf.resize(CHUNK_PREFIX, 0);
}

/// Finishes a chunk begun with `chunk_begin` and holding its payload after the prefix.
/// Returns the offset where the framed chunk starts (write `buf[start..]`).
pub fn chunk_end(buf: &mut Vec<u8>) -> usize {
    let len = buf.len() - CHUNK_PREFIX;
    let mut hex = [0u8; 16];
    let mut digits = 0;
    let mut v = len;
    loop {
        hex[digits] = b"0123456789abcdef"[v & 15];
        digits += 1;
        v >>= 4;
        if v == 0 {
            break;
        }
    }
    let start = CHUNK_PREFIX - 2 - digits;
    for i in 0..digits {
        buf[start + i] = hex[digits - 1 - i];
    }
    buf[CHUNK_PREFIX - 2] = b'\r';
    buf[CHUNK_PREFIX - 1] = b'\n';
    buf.extend_from_slice(b"\r\n");
    start
}
