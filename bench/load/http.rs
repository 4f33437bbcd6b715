//! The load generator's own HTTP/1.1 response parsing, written independently of cubegate's
//! and of the simulator's so that a framing bug in one cannot hide in the other.
//!
//! Everything here is incremental and pure (no sockets, no clocks): [`parse_head`] reads a
//! status line and the few headers a client needs, [`Chunked`] decodes a chunked body fed
//! in arbitrary pieces, and [`EventScanner`] splits a decoded body into SSE events or
//! NDJSON lines, reporting each completed event in order.

/// Largest response head accepted.
pub const MAX_HEAD: usize = 64 * 1024;
/// Largest chunk-size line (size, extensions) accepted.
const MAX_SIZE_LINE: usize = 1024;
/// Bytes of one event kept to recognise the end-of-stream marker.
const MAX_EVENT_KEEP: usize = 64 * 1024;

/// A malformed response: the connection cannot be trusted any more.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FramingError(pub &'static str);

/// How the response body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyLen {
    /// No body (1xx, 204, 304).
    Empty,
    Length(u64),
    Chunked,
    /// Until the server closes the connection.
    UntilClose,
}

/// What a client needs from a response head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    pub status: u16,
    pub body: BodyLen,
    /// The connection cannot be reused after this response.
    pub close: bool,
    /// Bytes the head took, including the blank line.
    pub len: usize,
}

/// Parses a response head at the start of `buf`; Ok(None) = incomplete.
pub fn parse_head(buf: &[u8]) -> Result<Option<Head>, FramingError> {
    let end = match memchr::memmem::find(buf, b"\r\n\r\n") {
        Some(i) => i,
        None if buf.len() > MAX_HEAD => return Err(FramingError("response head too large")),
        None => return Ok(None),
    };
    let text =
        std::str::from_utf8(&buf[..end]).map_err(|_| FramingError("response head not UTF-8"))?;
    let mut lines = text.split("\r\n");
    let status_line = lines.next().unwrap_or("");
    let (version, rest) = status_line
        .split_once(' ')
        .ok_or(FramingError("bad status line"))?;
    let http10 = match version {
        "HTTP/1.1" => false,
        "HTTP/1.0" => true,
        _ => return Err(FramingError("not an HTTP/1.x response")),
    };
    let code = rest.get(..3).ok_or(FramingError("bad status code"))?;
    if !code.bytes().all(|b| b.is_ascii_digit())
        || rest.as_bytes().get(3).is_some_and(|&b| b != b' ')
    {
        return Err(FramingError("bad status code"));
    }
    let status: u16 = code.parse().map_err(|_| FramingError("bad status code"))?;
    let mut length: Option<u64> = None;
    let mut chunked = false;
    let mut close = http10;
    for line in lines {
        let (name, value) = line
            .split_once(':')
            .ok_or(FramingError("bad header line"))?;
        if name.is_empty() || name.bytes().any(|b| b.is_ascii_whitespace()) {
            return Err(FramingError("bad header name"));
        }
        let value = value.trim_matches(|c| c == ' ' || c == '\t');
        if name.eq_ignore_ascii_case("content-length") {
            if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) || value.len() > 18 {
                return Err(FramingError("bad Content-Length"));
            }
            let n: u64 = value
                .parse()
                .map_err(|_| FramingError("bad Content-Length"))?;
            if length.is_some_and(|l| l != n) {
                return Err(FramingError("conflicting Content-Length"));
            }
            length = Some(n);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            let last = value.rsplit(',').next().unwrap_or("").trim();
            if !last.eq_ignore_ascii_case("chunked") {
                return Err(FramingError("unsupported Transfer-Encoding"));
            }
            chunked = true;
        } else if name.eq_ignore_ascii_case("connection") {
            for tok in value.split(',').map(str::trim) {
                if tok.eq_ignore_ascii_case("close") {
                    close = true;
                } else if tok.eq_ignore_ascii_case("keep-alive") && http10 {
                    close = false;
                }
            }
        }
    }
    let body = if (100..200).contains(&status) || status == 204 || status == 304 {
        BodyLen::Empty
    } else if chunked {
        if length.is_some() {
            return Err(FramingError("both Content-Length and chunked"));
        }
        BodyLen::Chunked
    } else if let Some(n) = length {
        BodyLen::Length(n)
    } else {
        close = true;
        BodyLen::UntilClose
    };
    Ok(Some(Head {
        status,
        body,
        close,
        len: end + 4,
    }))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    /// Hex digits of the size; `seen` digits so far.
    Size {
        seen: u8,
    },
    /// After the size: extensions up to CR.
    Ext,
    SizeLf,
    Data(u64),
    DataCr,
    DataLf,
    /// A trailer line (or the final blank line when `empty`).
    Trailer {
        empty: bool,
    },
    TrailerLf {
        empty: bool,
    },
    Done,
}

/// Incremental decoder of a chunked body.
#[derive(Debug)]
pub struct Chunked {
    state: ChunkState,
    size: u64,
    line: usize,
}

impl Default for Chunked {
    fn default() -> Self {
        Chunked {
            state: ChunkState::Size { seen: 0 },
            size: 0,
            line: 0,
        }
    }
}

impl Chunked {
    /// True once the terminating chunk and trailers were read.
    pub fn done(&self) -> bool {
        self.state == ChunkState::Done
    }

    /// Decodes `input`, handing each piece of payload to `out`. Returns the bytes consumed
    /// (less than `input.len()` only when the body ended inside `input`).
    pub fn feed(
        &mut self,
        input: &[u8],
        mut out: impl FnMut(&[u8]),
    ) -> Result<usize, FramingError> {
        let mut i = 0;
        while i < input.len() {
            let b = input[i];
            match self.state {
                ChunkState::Size { seen } => match (b as char).to_digit(16) {
                    Some(d) if seen < 16 => {
                        self.size = self.size * 16 + d as u64;
                        self.state = ChunkState::Size { seen: seen + 1 };
                        self.line += 1;
                    }
                    Some(_) => return Err(FramingError("chunk size too large")),
                    None if seen == 0 => return Err(FramingError("bad chunk size")),
                    None if b == b'\r' => self.state = ChunkState::SizeLf,
                    None if b == b';' || b == b' ' || b == b'\t' => self.state = ChunkState::Ext,
                    None => return Err(FramingError("bad chunk size")),
                },
                ChunkState::Ext => {
                    self.line += 1;
                    if self.line > MAX_SIZE_LINE {
                        return Err(FramingError("chunk extension too long"));
                    }
                    if b == b'\r' {
                        self.state = ChunkState::SizeLf;
                    } else if b == b'\n' {
                        return Err(FramingError("bare LF in chunk size line"));
                    }
                }
                ChunkState::SizeLf => {
                    if b != b'\n' {
                        return Err(FramingError("chunk size line not ended by CRLF"));
                    }
                    self.line = 0;
                    self.state = if self.size == 0 {
                        ChunkState::Trailer { empty: true }
                    } else {
                        ChunkState::Data(self.size)
                    };
                }
                ChunkState::Data(left) => {
                    let n = (input.len() - i).min(usize::try_from(left).unwrap_or(usize::MAX));
                    out(&input[i..i + n]);
                    i += n;
                    let left = left - n as u64;
                    self.state = if left == 0 {
                        ChunkState::DataCr
                    } else {
                        ChunkState::Data(left)
                    };
                    continue;
                }
                ChunkState::DataCr => {
                    if b != b'\r' {
                        return Err(FramingError("chunk data longer than its size"));
                    }
                    self.state = ChunkState::DataLf;
                }
                ChunkState::DataLf => {
                    if b != b'\n' {
                        return Err(FramingError("chunk data not ended by CRLF"));
                    }
                    self.size = 0;
                    self.state = ChunkState::Size { seen: 0 };
                }
                ChunkState::Trailer { empty } => {
                    self.line += 1;
                    if self.line > MAX_HEAD {
                        return Err(FramingError("trailers too large"));
                    }
                    if b == b'\r' {
                        self.state = ChunkState::TrailerLf { empty };
                    } else {
                        self.state = ChunkState::Trailer { empty: false };
                    }
                }
                ChunkState::TrailerLf { empty } => {
                    if b != b'\n' {
                        return Err(FramingError("trailer line not ended by CRLF"));
                    }
                    if empty {
                        self.state = ChunkState::Done;
                        return Ok(i + 1);
                    }
                    self.state = ChunkState::Trailer { empty: true };
                }
                ChunkState::Done => return Ok(i),
            }
            i += 1;
        }
        Ok(i)
    }
}

/// How a streamed body is split into events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventFormat {
    /// `text/event-stream`: events end at a blank line; `data: [DONE]` ends the stream and
    /// is not counted as an event.
    Sse,
    /// One JSON object a line; the line with `"done":true` ends the stream (and counts).
    Ndjson,
}

/// Splits a decoded body into events, incrementally.
#[derive(Debug)]
pub struct EventScanner {
    fmt: EventFormat,
    /// Bytes of the current event (up to [`MAX_EVENT_KEEP`]).
    cur: Vec<u8>,
    /// Bytes in the current event, including those not kept.
    cur_len: usize,
    /// Length of the current SSE line, ignoring CR.
    line_len: usize,
    /// The end-of-stream marker was seen.
    pub finished: bool,
}

impl EventScanner {
    pub fn new(fmt: EventFormat) -> Self {
        EventScanner {
            fmt,
            cur: Vec::with_capacity(512),
            cur_len: 0,
            line_len: 0,
            finished: false,
        }
    }

    /// Scans `data`; calls `on_event` with each completed event's bytes (as far as kept).
    pub fn feed(&mut self, data: &[u8], mut on_event: impl FnMut(&[u8])) {
        let mut rest = data;
        while !rest.is_empty() {
            let Some(nl) = memchr::memchr(b'\n', rest) else {
                self.keep(rest);
                if self.fmt == EventFormat::Sse {
                    self.line_len += rest.iter().filter(|&&b| b != b'\r').count();
                }
                return;
            };
            let (piece, tail) = rest.split_at(nl + 1);
            rest = tail;
            self.keep(&piece[..nl]);
            match self.fmt {
                EventFormat::Ndjson => {
                    let ev = trim_cr(&self.cur);
                    if !ev.iter().all(u8::is_ascii_whitespace) {
                        if is_ollama_done(ev) {
                            self.finished = true;
                        }
                        on_event(ev);
                    }
                    self.reset();
                }
                EventFormat::Sse => {
                    let line = piece[..nl].iter().filter(|&&b| b != b'\r').count();
                    let blank = self.line_len + line == 0;
                    self.line_len = 0;
                    if blank {
                        // `cur` holds the event's lines joined without their LFs; the
                        // blank line's own bytes (at most a CR) are at the end.
                        let ev = trim_cr(&self.cur);
                        if ev == b"data: [DONE]" || ev == b"data:[DONE]" {
                            self.finished = true;
                        } else if !ev.is_empty() {
                            on_event(ev);
                        }
                        self.reset();
                    } else {
                        self.keep(b"\n");
                    }
                }
            }
        }
    }

    fn keep(&mut self, bytes: &[u8]) {
        self.cur_len += bytes.len();
        let room = MAX_EVENT_KEEP.saturating_sub(self.cur.len());
        self.cur.extend_from_slice(&bytes[..bytes.len().min(room)]);
    }

    fn reset(&mut self) {
        self.cur.clear();
        self.cur_len = 0;
    }

    /// True when bytes of an unfinished event are pending.
    pub fn pending(&self) -> bool {
        self.cur_len > 0
    }
}

fn trim_cr(b: &[u8]) -> &[u8] {
    let mut b = b;
    while let [rest @ .., b'\r' | b'\n'] = b {
        b = rest;
    }
    b
}

fn is_ollama_done(line: &[u8]) -> bool {
    memchr::memmem::find(line, b"\"done\":true").is_some()
        || memchr::memmem::find(line, b"\"done\": true").is_some()
}
