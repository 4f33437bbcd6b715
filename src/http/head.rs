//! Request head parsing: httparse over the connection's read buffer, kept as offsets.
//!
//! The head is parsed in place and remembered as [`Span`]s into the buffer instead of
//! copied strings: no allocation per request, and the buffer can keep growing (body bytes
//! are appended behind the head) while the head stays readable. Everything that decides
//! how the request is framed is settled here, strictly: conflicting or repeated
//! Content-Length, Transfer-Encoding other than a lone `chunked`, both at once, control
//! bytes in values, oversized lines. A request that passes this point has exactly one
//! meaning.

use super::headers::{eq_ignore_case, has_token};
use crate::config::{Limits, MAX_HEADERS_CEILING};
use crate::http::HttpError;
use std::mem::MaybeUninit;

/// A byte range of the connection's read buffer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Span {
    pub start: u32,
    pub end: u32,
}

impl Span {
    pub fn of<'a>(&self, buf: &'a [u8]) -> &'a [u8] {
        &buf[self.start as usize..self.end as usize]
    }
    pub fn len(&self) -> usize {
        (self.end - self.start) as usize
    }
    pub fn is_empty(&self) -> bool {
        self.start == self.end
    }
    fn within(base: &[u8], part: &[u8]) -> Span {
        // Both slices come from the same buffer: the offset is the address difference.
        let start = part.as_ptr() as usize - base.as_ptr() as usize;
        Span {
            start: start as u32,
            end: (start + part.len()) as u32,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Get,
    Head,
    Post,
    Put,
    Delete,
    Patch,
    Options,
    Other,
}

impl Method {
    fn from_bytes(m: &str) -> Method {
        match m {
            "GET" => Method::Get,
            "HEAD" => Method::Head,
            "POST" => Method::Post,
            "PUT" => Method::Put,
            "DELETE" => Method::Delete,
            "PATCH" => Method::Patch,
            "OPTIONS" => Method::Options,
            _ => Method::Other,
        }
    }

    /// The method as sent (`Other` never leaves the parser: it is refused there).
    pub fn as_str(self) -> &'static str {
        match self {
            Method::Get => "GET",
            Method::Head => "HEAD",
            Method::Post => "POST",
            Method::Put => "PUT",
            Method::Delete => "DELETE",
            Method::Patch => "PATCH",
            Method::Options => "OPTIONS",
            Method::Other => "",
        }
    }
}

/// How the request body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyFraming {
    None,
    Length(u64),
    Chunked,
}

#[derive(Debug, Clone)]
pub struct RequestHead {
    pub method: Method,
    pub method_span: Span,
    /// Path and query, as sent.
    pub target: Span,
    pub minor_version: u8,
    /// (name, value) of every header, in order.
    pub headers: Vec<(Span, Span)>,
    pub framing: BodyFraming,
    pub keep_alive: bool,
    pub expect_continue: bool,
    pub request_id: Option<Span>,
    pub authorization: Option<Span>,
    pub forwarded_for: Option<Span>,
    /// Bytes of the head, including the blank line.
    pub len: usize,
}

impl RequestHead {
    /// The request target (path and query) as text; `buf` is the buffer the head was
    /// parsed from.
    pub fn target_str<'a>(&self, buf: &'a [u8]) -> Result<&'a str, HttpError> {
        std::str::from_utf8(self.target.of(buf))
            .map_err(|_| HttpError::MalformedHead("request target is not UTF-8"))
    }
}

impl Default for RequestHead {
    fn default() -> Self {
        RequestHead {
            method: Method::Get,
            method_span: Span::default(),
            target: Span::default(),
            minor_version: 1,
            headers: Vec::with_capacity(32),
            framing: BodyFraming::None,
            keep_alive: true,
            expect_continue: false,
            request_id: None,
            authorization: None,
            forwarded_for: None,
            len: 0,
        }
    }
}

/// Parses a request head at the start of `buf`. `Ok(None)` = incomplete, read more. On
/// success `head` is overwritten (its header vector is reused across requests).
pub fn parse_request_head(
    buf: &[u8],
    limits: &Limits,
    head: &mut RequestHead,
) -> Result<Option<()>, HttpError> {
    // Uninitialized: filling 256 empty headers (8 KiB) before every parse was a measured
    // 1 % of a proxied request's CPU; httparse writes only the headers it finds.
    let mut storage = [const { MaybeUninit::<httparse::Header>::uninit() }; MAX_HEADERS_CEILING];
    let mut req = httparse::Request::new(&mut []);
    let status = match req.parse_with_uninit_headers(buf, &mut storage[..limits.max_headers]) {
        Ok(s) => s,
        Err(httparse::Error::TooManyHeaders) => {
            return Err(HttpError::TooManyHeaders(limits.max_headers))
        }
        Err(e) => return Err(HttpError::MalformedHead(parse_error_text(e))),
    };
    let len = match status {
        httparse::Status::Complete(n) => n,
        httparse::Status::Partial => {
            check_partial(buf, limits)?;
            return Ok(None);
        }
    };
    if len > limits.max_head_bytes {
        return Err(HttpError::HeadTooLarge(limits.max_head_bytes));
    }
    let (Some(method), Some(path), Some(version)) = (req.method, req.path, req.version) else {
        return Err(HttpError::MalformedHead("incomplete request line"));
    };
    if path.len() > limits.max_uri_bytes {
        return Err(HttpError::UriTooLong(limits.max_uri_bytes));
    }
    if !path.starts_with('/') {
        return Err(HttpError::MalformedHead(
            "request target must be an absolute path (origin-form)",
        ));
    }
    if path.contains('#') {
        // A fragment never belongs on the wire; backends disagree on what it means.
        return Err(HttpError::MalformedHead(
            "fragment (#) in the request target",
        ));
    }
    // memchr finds the dozen line ends at SIMD speed; a byte loop here was 1.5 % of a
    // proxied request's CPU.
    if memchr::memchr_iter(b'\n', &buf[..len]).any(|i| i == 0 || buf[i - 1] != b'\r') {
        // httparse accepts bare LF; a proxy in front of us might not. One framing only.
        return Err(HttpError::MalformedHead(
            "line ending without CR in the request head",
        ));
    }
    head.method = Method::from_bytes(method);
    if head.method == Method::Other {
        return Err(HttpError::MalformedHead(
            "unsupported method (GET, HEAD, POST, PUT, DELETE, PATCH and OPTIONS are served)",
        ));
    }
    head.method_span = Span::within(buf, method.as_bytes());
    head.target = Span::within(buf, path.as_bytes());
    head.minor_version = version;
    head.len = len;
    head.headers.clear();
    head.framing = BodyFraming::None;
    head.keep_alive = version == 1;
    head.expect_continue = false;
    head.request_id = None;
    head.authorization = None;
    head.forwarded_for = None;

    let mut content_length: Option<u64> = None;
    let mut chunked = false;
    let mut saw_te = false;
    let mut saw_host = false;
    for h in req.headers.iter() {
        let name = h.name.as_bytes();
        let value = trim(h.value);
        if h.value.contains(&0) {
            return Err(HttpError::MalformedHead("NUL byte in a header value"));
        }
        head.headers
            .push((Span::within(buf, name), Span::within(buf, value)));
        if eq_ignore_case(name, b"content-length") {
            let n = parse_content_length(value)?;
            if content_length.is_some_and(|c| c != n) {
                return Err(HttpError::MalformedHead(
                    "conflicting Content-Length headers",
                ));
            }
            content_length = Some(n);
        } else if eq_ignore_case(name, b"transfer-encoding") {
            if saw_te || !eq_ignore_case(value, b"chunked") {
                return Err(HttpError::UnsupportedTransferEncoding);
            }
            saw_te = true;
            chunked = true;
        } else if eq_ignore_case(name, b"connection") {
            if has_token(value, b"close") {
                head.keep_alive = false;
            } else if has_token(value, b"keep-alive") {
                head.keep_alive = true;
            }
        } else if eq_ignore_case(name, b"expect") {
            if eq_ignore_case(value, b"100-continue") {
                head.expect_continue = true;
            } else {
                return Err(HttpError::ExpectationFailed);
            }
        } else if eq_ignore_case(name, b"host") {
            if saw_host {
                return Err(HttpError::MalformedHead("more than one Host header"));
            }
            saw_host = true;
        } else if eq_ignore_case(name, b"x-request-id") {
            head.request_id = Some(Span::within(buf, value));
        } else if eq_ignore_case(name, b"authorization") {
            // Two credentials: a proxy in front may have checked the other one.
            if head.authorization.is_some() {
                return Err(HttpError::MalformedHead(
                    "more than one Authorization header",
                ));
            }
            head.authorization = Some(Span::within(buf, value));
        } else if eq_ignore_case(name, b"x-forwarded-for") {
            head.forwarded_for = Some(Span::within(buf, value));
        }
    }
    if version == 1 && !saw_host {
        return Err(HttpError::MalformedHead(
            "HTTP/1.1 request without a Host header",
        ));
    }
    head.framing = match (chunked, content_length) {
        (true, Some(_)) => {
            return Err(HttpError::MalformedHead(
                "both Content-Length and Transfer-Encoding: refusing an ambiguous body",
            ))
        }
        (true, None) if version == 0 => return Err(HttpError::UnsupportedTransferEncoding),
        (true, None) => BodyFraming::Chunked,
        (false, Some(0)) | (false, None) => BodyFraming::None,
        (false, Some(n)) => BodyFraming::Length(n),
    };
    Ok(Some(()))
}

/// Whether parsing `buf` again can tell something new: the bytes after `from` complete a
/// line (so the head may be complete, or a finished line may be invalid), or nothing was
/// parsed yet. A head dribbled in byte by byte is then parsed once per line, not once per
/// byte.
pub fn worth_parsing(buf: &[u8], from: usize) -> bool {
    from == 0 || memchr::memchr(b'\n', &buf[from..]).is_some()
}

/// An incomplete head that already breaks a limit is refused now, not after more reading.
pub fn check_partial(buf: &[u8], limits: &Limits) -> Result<(), HttpError> {
    match memchr::memchr(b'\n', buf) {
        None if buf.len() > limits.max_uri_bytes + 32 => {
            Err(HttpError::UriTooLong(limits.max_uri_bytes))
        }
        _ if buf.len() >= limits.max_head_bytes => {
            Err(HttpError::HeadTooLarge(limits.max_head_bytes))
        }
        _ => Ok(()),
    }
}

fn parse_content_length(v: &[u8]) -> Result<u64, HttpError> {
    if v.is_empty() || v.len() > 19 || !v.iter().all(u8::is_ascii_digit) {
        return Err(HttpError::MalformedHead("invalid Content-Length"));
    }
    let mut n: u64 = 0;
    for &d in v {
        n = n * 10 + u64::from(d - b'0');
    }
    Ok(n)
}

fn trim(v: &[u8]) -> &[u8] {
    let start = v.iter().position(|b| !matches!(b, b' ' | b'\t'));
    let Some(start) = start else { return &v[..0] };
    let end = v
        .iter()
        .rposition(|b| !matches!(b, b' ' | b'\t'))
        .unwrap_or(start);
    &v[start..=end]
}

fn parse_error_text(e: httparse::Error) -> &'static str {
    match e {
        httparse::Error::HeaderName => "invalid header name",
        httparse::Error::HeaderValue => {
            "invalid byte in a header value (control characters are not allowed)"
        }
        httparse::Error::NewLine => "invalid line ending in the request head",
        httparse::Error::Status => "invalid status",
        httparse::Error::Token => "invalid method or token",
        httparse::Error::TooManyHeaders => "too many headers",
        httparse::Error::Version => "invalid HTTP version (only HTTP/1.0 and HTTP/1.1 are served)",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(raw: &[u8]) -> Result<Option<RequestHead>, HttpError> {
        let mut h = RequestHead::default();
        parse_request_head(raw, &Limits::default(), &mut h).map(|o| o.map(|()| h))
    }

    #[test]
    fn parses_a_post() {
        let raw = b"POST /proxy/d/v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 12\r\nX-Request-Id: abc\r\nAuthorization: Bearer t\r\n\r\n{\"model\":1}";
        let h = parse(raw).unwrap().unwrap();
        assert_eq!(h.method, Method::Post);
        assert_eq!(h.target.of(raw), b"/proxy/d/v1/chat/completions");
        assert_eq!(h.framing, BodyFraming::Length(12));
        assert_eq!(h.request_id.unwrap().of(raw), b"abc");
        assert_eq!(h.authorization.unwrap().of(raw), b"Bearer t");
        assert!(h.keep_alive);
        assert_eq!(h.len, raw.len() - 11);
    }

    #[test]
    fn partial_needs_more() {
        assert!(parse(b"GET / HTTP/1.1\r\nHost: x\r\n").unwrap().is_none());
    }

    #[test]
    fn http10_defaults_to_close() {
        let h = parse(b"GET / HTTP/1.0\r\n\r\n").unwrap().unwrap();
        assert!(!h.keep_alive);
    }

    #[test]
    fn refuses_smuggling_shapes() {
        let bad: &[&[u8]] = &[
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: +5\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5, 5\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding : chunked\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: x\r\nX-A: a\0b\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: x\r\nX-A: a\rb\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: x\r\n folded\r\n\r\n",
            b"GET / HTTP/1.1\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
            b"GET http://evil/ HTTP/1.1\r\nHost: x\r\n\r\n",
            b"GET / HTTP/2.0\r\nHost: x\r\n\r\n",
            b"GET /a#b HTTP/1.1\r\nHost: x\r\n\r\n",
            b"delete / HTTP/1.1\r\nHost: x\r\n\r\n",
            b"GET / HTTP/1.1\nHost: x\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: x\n\r\n",
            b"GET / HTTP/1.1\r\nHost: x\r\nExpect: 200-ok\r\n\r\n",
        ];
        for raw in bad {
            assert!(parse(raw).is_err(), "{:?}", String::from_utf8_lossy(raw));
        }
    }

    #[test]
    fn limits_give_the_right_error() {
        let long_uri = format!("GET /{} HTTP/1.1\r\nHost: x\r\n\r\n", "a".repeat(9000));
        assert!(matches!(
            parse(long_uri.as_bytes()),
            Err(HttpError::UriTooLong(_))
        ));
        let partial_uri = format!("GET /{}", "a".repeat(9000));
        assert!(matches!(
            parse(partial_uri.as_bytes()),
            Err(HttpError::UriTooLong(_))
        ));
        let many = format!(
            "GET / HTTP/1.1\r\nHost: x\r\n{}\r\n",
            "A: b\r\n".repeat(200)
        );
        assert!(matches!(
            parse(many.as_bytes()),
            Err(HttpError::TooManyHeaders(_))
        ));
        let big = format!("GET / HTTP/1.1\r\nHost: x\r\nA: {}\r\n", "b".repeat(40000));
        assert!(matches!(
            parse(big.as_bytes()),
            Err(HttpError::HeadTooLarge(_))
        ));
    }

    #[test]
    fn expect_continue_and_chunked() {
        let h = parse(b"POST / HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nTransfer-Encoding: Chunked\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(h.expect_continue);
        assert_eq!(h.framing, BodyFraming::Chunked);
    }
}
