//! Response heads: parsing what a backend sends, and writing what the client receives.
//!
//! A backend is treated as hostile as a client: its head is bounded, its framing must be
//! unambiguous (Content-Length and chunked together is refused, as on the request side),
//! and hop-by-hop headers are dropped before the head is rewritten for the client.

use super::head::Span;
use super::headers::{eq_ignore_case, has_token, is_hop_by_hop_response};
use crate::config::MAX_HEADERS_CEILING;
use std::mem::MaybeUninit;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResponseFraming {
    /// No body (HEAD request, 1xx, 204, 304).
    None,
    Length(u64),
    Chunked,
    /// Body runs until the backend closes the connection.
    UntilClose,
}

#[derive(Debug, Clone)]
pub struct ResponseHead {
    pub status: u16,
    pub reason: Span,
    pub headers: Vec<(Span, Span)>,
    pub framing: ResponseFraming,
    /// The backend will keep the connection open after this response.
    pub keep_alive: bool,
    pub len: usize,
    /// The backend's Transfer-Encoding value (kept whole: codings before `chunked`, such as
    /// gzip, are content the client must still decode).
    pub transfer_encoding: Option<Span>,
    /// The backend's Content-Length (also meaningful without a body: HEAD).
    pub content_length: Option<u64>,
}

/// Why a backend's response head was refused.
pub type UpstreamHeadError = &'static str;

/// Parses a backend's response head. `Ok(None)` = incomplete.
pub fn parse_response_head(
    buf: &[u8],
    max_head: usize,
    request_was_head: bool,
) -> Result<Option<ResponseHead>, UpstreamHeadError> {
    // Uninitialized, as for requests (`head::parse_request_head`).
    let mut storage = [const { MaybeUninit::<httparse::Header>::uninit() }; MAX_HEADERS_CEILING];
    let mut resp = httparse::Response::new(&mut []);
    let parsed = httparse::ParserConfig::default().parse_response_with_uninit_headers(
        &mut resp,
        buf,
        &mut storage,
    );
    let len = match parsed {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => {
            if buf.len() >= max_head {
                return Err("response head too large");
            }
            return Ok(None);
        }
        Err(_) => return Err("malformed response head"),
    };
    if len > max_head {
        return Err("response head too large");
    }
    let status = resp.code.unwrap_or(0);
    if status < 100 {
        // httparse takes any three digits; "HTTP/1.1 050" would reach the client as "50".
        return Err("response status code below 100");
    }
    let version = resp.version.unwrap_or(1);
    // httparse gives a reason phrase with obs-text bytes as a static "" that is not part of
    // `buf`, so its address says nothing: an empty reason is recorded as an empty span.
    let reason = resp.reason.filter(|r| !r.is_empty());
    let base = buf.as_ptr() as usize;
    let span = |s: &[u8]| {
        let start = s.as_ptr() as usize - base;
        Span {
            start: start as u32,
            end: (start + s.len()) as u32,
        }
    };
    let mut headers = Vec::with_capacity(resp.headers.len());
    let mut content_length: Option<u64> = None;
    let mut chunked = false;
    let mut keep_alive = version == 1;
    let mut transfer_encoding = None;
    for h in resp.headers.iter() {
        let name = h.name.as_bytes();
        let value = h.value.trim_ascii();
        headers.push((span(name), span(value)));
        if eq_ignore_case(name, b"content-length") {
            if value.is_empty() || value.len() > 19 || !value.iter().all(u8::is_ascii_digit) {
                return Err("invalid Content-Length in response");
            }
            let n: u64 = std::str::from_utf8(value)
                .ok()
                .and_then(|s| s.parse().ok())
                .ok_or("invalid Content-Length in response")?;
            if content_length.is_some_and(|c| c != n) {
                return Err("conflicting Content-Length in response");
            }
            content_length = Some(n);
        } else if eq_ignore_case(name, b"transfer-encoding") {
            // The last coding decides the framing; anything before chunked (gzip…) is
            // content the client decodes, forwarded as is.
            let last = value
                .rsplit(|&b| b == b',')
                .next()
                .unwrap_or(b"")
                .trim_ascii();
            if !eq_ignore_case(last, b"chunked") {
                return Err("response Transfer-Encoding does not end in chunked");
            }
            if chunked {
                return Err("more than one Transfer-Encoding header in the response");
            }
            chunked = true;
            transfer_encoding = Some(span(value));
        } else if eq_ignore_case(name, b"connection") {
            if has_token(value, b"close") {
                keep_alive = false;
            } else if has_token(value, b"keep-alive") {
                keep_alive = true;
            }
        }
    }
    let framing =
        if request_was_head || (100..200).contains(&status) || status == 204 || status == 304 {
            ResponseFraming::None
        } else {
            match (chunked, content_length) {
                (true, Some(_)) => return Err("response has both Content-Length and chunked"),
                (true, None) => ResponseFraming::Chunked,
                (false, Some(n)) => ResponseFraming::Length(n),
                (false, None) => {
                    keep_alive = false;
                    ResponseFraming::UntilClose
                }
            }
        };
    Ok(Some(ResponseHead {
        status,
        reason: reason.map_or(Span::default(), |r| span(r.as_bytes())),
        headers,
        framing,
        keep_alive,
        len,
        transfer_encoding,
        content_length,
    }))
}

/// How the client will receive the body, given the backend's framing and the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientFraming {
    None,
    Length(u64),
    /// Backend's chunked bytes forwarded verbatim.
    Chunked,
    /// Decoded (HTTP/1.0 client of a chunked backend) or until-close body; the client
    /// connection closes after it.
    Close,
}

pub fn client_framing(backend: ResponseFraming, client_minor_version: u8) -> ClientFraming {
    match backend {
        ResponseFraming::None => ClientFraming::None,
        ResponseFraming::Length(n) => ClientFraming::Length(n),
        ResponseFraming::Chunked if client_minor_version >= 1 => ClientFraming::Chunked,
        ResponseFraming::Chunked | ResponseFraming::UntilClose => ClientFraming::Close,
    }
}

/// Writes the head the client receives: the backend's status and end-to-end headers, our
/// framing, request id and connection headers.
pub fn write_client_head(
    out: &mut Vec<u8>,
    upstream_buf: &[u8],
    head: &ResponseHead,
    framing: ClientFraming,
    request_id: &[u8],
    keep_alive: bool,
    extra: &[u8],
) {
    out.extend_from_slice(b"HTTP/1.1 ");
    push_u64(out, u64::from(head.status));
    out.push(b' ');
    out.extend_from_slice(head.reason.of(upstream_buf));
    out.extend_from_slice(b"\r\n");
    for (name, value) in &head.headers {
        let n = name.of(upstream_buf);
        if is_hop_by_hop_response(n) || eq_ignore_case(n, b"x-request-id") {
            continue;
        }
        out.extend_from_slice(n);
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.of(upstream_buf));
        out.extend_from_slice(b"\r\n");
    }
    match framing {
        ClientFraming::Length(n) => {
            out.extend_from_slice(b"Content-Length: ");
            push_u64(out, n);
            out.extend_from_slice(b"\r\n");
        }
        ClientFraming::Chunked => {
            out.extend_from_slice(b"Transfer-Encoding: ");
            match head.transfer_encoding {
                Some(te) => out.extend_from_slice(te.of(upstream_buf)),
                None => out.extend_from_slice(b"chunked"),
            }
            out.extend_from_slice(b"\r\n");
        }
        ClientFraming::None => {
            // A HEAD answer announces the length of the body it does not carry.
            let bodiless = (100..200).contains(&head.status) || matches!(head.status, 204 | 304);
            if let (Some(n), false) = (head.content_length, bodiless) {
                out.extend_from_slice(b"Content-Length: ");
                push_u64(out, n);
                out.extend_from_slice(b"\r\n");
            }
        }
        ClientFraming::Close => {}
    }
    out.extend_from_slice(b"X-Request-Id: ");
    out.extend_from_slice(request_id);
    out.extend_from_slice(b"\r\n");
    if !keep_alive || framing == ClientFraming::Close {
        out.extend_from_slice(b"Connection: close\r\n");
    }
    out.extend_from_slice(extra);
    out.extend_from_slice(b"\r\n");
}

/// Writes a complete response cubegate answers itself (errors, model lists, health).
pub fn write_local_response(
    out: &mut Vec<u8>,
    status: u16,
    extra_headers: &[(&str, &str)],
    content_type: &str,
    body: &[u8],
    request_id: &[u8],
    keep_alive: bool,
) {
    out.extend_from_slice(b"HTTP/1.1 ");
    push_u64(out, u64::from(status));
    out.push(b' ');
    out.extend_from_slice(reason_phrase(status).as_bytes());
    out.extend_from_slice(b"\r\nContent-Type: ");
    out.extend_from_slice(content_type.as_bytes());
    out.extend_from_slice(b"\r\nContent-Length: ");
    push_u64(out, body.len() as u64);
    out.extend_from_slice(b"\r\n");
    for (n, v) in extra_headers {
        out.extend_from_slice(n.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(v.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if !request_id.is_empty() {
        out.extend_from_slice(b"X-Request-Id: ");
        out.extend_from_slice(request_id);
        out.extend_from_slice(b"\r\n");
    }
    if !keep_alive {
        out.extend_from_slice(b"Connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(body);
}

pub fn push_u64(out: &mut Vec<u8>, n: u64) {
    let mut tmp = [0u8; 20];
    let mut i = tmp.len();
    let mut n = n;
    loop {
        i -= 1;
        tmp[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&tmp[i..]);
}

pub fn reason_phrase(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        201 => "Created",
        204 => "No Content",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        411 => "Length Required",
        413 => "Content Too Large",
        414 => "URI Too Long",
        417 => "Expectation Failed",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Unknown",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn response_framing() {
        let raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Type: text/event-stream\r\n\r\n";
        let h = parse_response_head(raw, 65536, false).unwrap().unwrap();
        assert_eq!(h.framing, ResponseFraming::Chunked);
        assert!(h.keep_alive);
        let raw = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello";
        let h = parse_response_head(raw, 65536, false).unwrap().unwrap();
        assert_eq!(h.framing, ResponseFraming::Length(5));
        assert!(!h.keep_alive);
        let raw = b"HTTP/1.0 200 OK\r\n\r\n";
        let h = parse_response_head(raw, 65536, false).unwrap().unwrap();
        assert_eq!(h.framing, ResponseFraming::UntilClose);
        let raw = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert!(parse_response_head(raw, 65536, false).is_err());
        let raw = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n";
        let h = parse_response_head(raw, 65536, true).unwrap().unwrap();
        assert_eq!(h.framing, ResponseFraming::None);
    }

    #[test]
    fn rewrites_head_for_client() {
        let raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: keep-alive\r\nContent-Type: text/event-stream\r\nX-Request-Id: theirs\r\n\r\n";
        let h = parse_response_head(raw, 65536, false).unwrap().unwrap();
        let mut out = Vec::new();
        write_client_head(
            &mut out,
            raw,
            &h,
            ClientFraming::Chunked,
            b"ours",
            true,
            b"",
        );
        let s = String::from_utf8(out).unwrap();
        assert_eq!(
            s,
            "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\nX-Request-Id: ours\r\n\r\n"
        );
    }

    #[test]
    fn keeps_codings_and_head_lengths() {
        let raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n";
        let h = parse_response_head(raw, 65536, false).unwrap().unwrap();
        let mut out = Vec::new();
        write_client_head(&mut out, raw, &h, ClientFraming::Chunked, b"r", true, b"");
        assert!(String::from_utf8(out)
            .unwrap()
            .contains("Transfer-Encoding: gzip, chunked\r\n"));
        let raw = b"HTTP/1.1 200 OK\r\nContent-Length: 42\r\n\r\n";
        let h = parse_response_head(raw, 65536, true).unwrap().unwrap();
        let mut out = Vec::new();
        write_client_head(&mut out, raw, &h, ClientFraming::None, b"r", true, b"");
        assert!(String::from_utf8(out)
            .unwrap()
            .contains("Content-Length: 42\r\n"));
    }

    /// Found by fuzz/ (response_head): a reason phrase with a non-ASCII byte made the
    /// reason's span an address difference with a static string (an overflow, or in release
    /// a wild span that panicked when the client's head was written).
    #[test]
    fn reason_with_obs_text() {
        let raw = b"HTTP/1.1 200 O\x98K\r\nContent-Type: application/x-ndjson\r\nTransfer-Encoding: chunked\r\n\r\n7\r\ndata: x\r\n0\r\n\r\n";
        let h = parse_response_head(raw, 65536, false).unwrap().unwrap();
        assert_eq!(h.status, 200);
        assert!(h.reason.of(raw).is_empty());
        let mut out = Vec::new();
        write_client_head(&mut out, raw, &h, ClientFraming::Chunked, b"r", true, b"");
        assert!(out.starts_with(b"HTTP/1.1 200 \r\nContent-Type: application/x-ndjson\r\n"));
    }

    /// Found by fuzz/ (response_head): status "050" was accepted and written to the client
    /// as "HTTP/1.1 50", a status line no client can parse.
    #[test]
    fn status_below_100_is_refused() {
        let raw = b"HTTP/1.1 050 Continue\r\n\r\nHTTP/1.1 t-100 Continuea\xd8\xf4ion/x-n\r\n";
        assert!(parse_response_head(raw, 65536, false).is_err());
        let raw = b"HTTP/1.1 000 OK\r\nContent-Length: 2\r\n\r\nok";
        assert!(parse_response_head(raw, 65536, false).is_err());
        let raw = b"HTTP/1.1 100 Continue\r\n\r\n";
        assert_eq!(
            parse_response_head(raw, 65536, false)
                .unwrap()
                .unwrap()
                .status,
            100
        );
    }

    #[test]
    fn numbers() {
        let mut v = Vec::new();
        push_u64(&mut v, 0);
        v.push(b' ');
        push_u64(&mut v, u64::MAX);
        assert_eq!(v, b"0 18446744073709551615");
    }
}
