//! The chunked decoder, fed the same bytes cut into pieces every way.
//!
//! Properties:
//! - no input panics `ChunkedDecoder::feed`;
//! - split invariance: feeding the input whole, byte by byte, in two pieces at every offset
//!   (64 spread offsets past 512 bytes) and along a few many-cut plans gives the same
//!   payload bytes, the same count of bytes consumed, and the same verdict (done, waiting,
//!   or the same error; after an error only the payload delivered before it is compared,
//!   as the proxy stops there) — pieces after the body's end are not fed, as the proxy
//!   does;
//! - the payload never outgrows the bytes consumed, and consumption stops short of the
//!   input only when the body is done;
//! - the decoded payload, re-encoded as one chunk, decodes back to itself.
#![no_main]

use cubegate::internals::http::chunked::{ChunkError, ChunkedDecoder};
use cubegate_fuzz::{cut_plans, pieces};
use libfuzzer_sys::fuzz_target;

#[derive(Debug, PartialEq)]
struct Outcome {
    payload: Vec<u8>,
    consumed: usize,
    done: bool,
    error: Option<ChunkError>,
}

fn decode<'a>(input: impl Iterator<Item = &'a [u8]>) -> Outcome {
    let mut d = ChunkedDecoder::new();
    let mut out = Outcome {
        payload: Vec::new(),
        consumed: 0,
        done: false,
        error: None,
    };
    for piece in input {
        match d.feed(piece, |s| out.payload.extend_from_slice(s)) {
            Ok(n) => out.consumed += n,
            Err(e) => {
                out.error = Some(e);
                out.consumed = 0;
                break;
            }
        }
        assert!(out.consumed == 0 || out.payload.len() < out.consumed);
        if d.is_done() {
            out.done = true;
            break;
        }
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let whole = decode(std::iter::once(data));
    assert!(whole.done || whole.error.is_some() || whole.consumed == data.len());
    for plan in cut_plans(data) {
        assert_eq!(decode(pieces(data, &plan)), whole, "cuts {plan:?}");
    }
    let mut again = format!("{:x}\r\n", whole.payload.len()).into_bytes();
    again.extend_from_slice(&whole.payload);
    again.extend_from_slice(if whole.payload.is_empty() {
        b"\r\n"
    } else {
        b"\r\n0\r\n\r\n"
    });
    let back = decode(std::iter::once(&again[..]));
    assert_eq!(
        (back.payload, back.consumed, back.done),
        (whole.payload, again.len(), true)
    );
});
