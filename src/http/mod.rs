//! HTTP/1.1 on both sides of the proxy: request heads from clients, response heads from
//! backends, chunked framing, and the bytes cubegate writes itself (errors, local answers).
//!
//! Nothing here does I/O: these are pure functions over buffers, so they are tested and
//! fuzzed in isolation and the connection code in `proxy` stays about control flow.

pub mod chunked;
pub mod head;
pub mod headers;
pub mod response;

use std::fmt;

/// A request that cannot be read as one unambiguous HTTP/1.1 message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HttpError {
    MalformedHead(&'static str),
    TooManyHeaders(usize),
    HeadTooLarge(usize),
    UriTooLong(usize),
    UnsupportedTransferEncoding,
    ExpectationFailed,
}

impl HttpError {
    /// The status every listener answers this with (the data plane and the management API
    /// alike, so a request is refused the same way wherever it arrives).
    pub fn status(&self) -> u16 {
        match self {
            HttpError::TooManyHeaders(_) | HttpError::HeadTooLarge(_) => 431,
            HttpError::UriTooLong(_) => 414,
            HttpError::ExpectationFailed => 417,
            HttpError::UnsupportedTransferEncoding => 501,
            HttpError::MalformedHead(_) => 400,
        }
    }

    /// The error `code` of the JSON answer: stable and machine-readable.
    pub fn code(&self) -> &'static str {
        match self {
            HttpError::TooManyHeaders(_) => "too_many_headers",
            HttpError::HeadTooLarge(_) => "head_too_large",
            HttpError::UriTooLong(_) => "uri_too_long",
            HttpError::ExpectationFailed => "expectation_failed",
            HttpError::UnsupportedTransferEncoding => "unsupported_transfer_encoding",
            HttpError::MalformedHead(_) => "malformed_request",
        }
    }
}

impl fmt::Display for HttpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HttpError::MalformedHead(why) => write!(f, "malformed request: {why}"),
            HttpError::TooManyHeaders(n) => write!(f, "too many request headers (limit {n})"),
            HttpError::HeadTooLarge(n) => {
                write!(f, "request head too large (limit {n} bytes)")
            }
            HttpError::UriTooLong(n) => write!(f, "request URI too long (limit {n} bytes)"),
            HttpError::UnsupportedTransferEncoding => f.write_str(
                "unsupported Transfer-Encoding: only a single \"chunked\" coding is accepted",
            ),
            HttpError::ExpectationFailed => {
                f.write_str("unsupported Expect header: only \"100-continue\" is accepted")
            }
        }
    }
}
