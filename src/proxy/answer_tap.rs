//! What `stream_response` does with an answer's payload besides passing it on: decoding
//! it for an HTTP/1.0 client, metering its tokens ([`crate::usage::meter`]) and taking
//! out the usage event the gateway asked for ([`crate::usage::strip`]).
//!
//! A filtered answer no longer has the backend's chunk sizes, so it goes to a chunked
//! client in chunks of our own, one per backend chunk (the client sees the same
//! boundaries as the events it would have seen).

use super::body::BodyTracker;
use super::error::GatewayError;
use super::request::Metering;
use crate::http::headers::eq_ignore_case;
use crate::http::response::{ResponseFraming, ResponseHead};
use crate::usage::meter::{Framing, Meter};
use crate::usage::strip::UsageEventFilter;
use crate::usage::Usage;

pub struct AnswerTap {
    metering: Metering,
    meter: Option<Meter>,
    filter: Option<UsageEventFilter>,
    /// The filter's output for the read at hand (framed as chunks when `rechunk`).
    filtered: Vec<u8>,
    /// The filter's output for one backend chunk, before it is framed.
    piece: Vec<u8>,
    /// The client's framing is chunked: filtered payload is framed anew.
    rechunk: bool,
}

impl AnswerTap {
    pub fn new(metering: Metering) -> AnswerTap {
        AnswerTap {
            metering,
            meter: None,
            filter: None,
            filtered: Vec::new(),
            piece: Vec::new(),
            rechunk: false,
        }
    }

    /// Sets up the meter (and the usage filter) for an answer whose head is `head`.
    pub fn start(&mut self, ubuf: &[u8], head: &ResponseHead, client_chunked: bool) {
        self.rechunk = client_chunked;
        if self.metering == Metering::Off {
            return;
        }
        let framing = head
            .headers
            .iter()
            .find(|(n, _)| eq_ignore_case(n.of(ubuf), b"content-type"))
            .map_or(Framing::Whole, |(_, v)| {
                Framing::of_content_type(v.of(ubuf))
            });
        self.meter = Some(Meter::new(framing));
        // A Content-Length answer cannot lose an event: its length is announced.
        let filterable = !matches!(
            head.framing,
            ResponseFraming::Length(_) | ResponseFraming::None
        );
        if matches!(self.metering, Metering::AskForUsage { .. })
            && framing == Framing::Sse
            && filterable
        {
            self.filter = Some(UsageEventFilter::default());
        }
    }

    /// The answer's bytes must be read (not spliced past).
    pub fn metered(&self) -> bool {
        self.meter.is_some()
    }

    /// The payload reaches the client through the filter (see [`AnswerTap::pass`]).
    pub fn filters(&self) -> bool {
        self.filter.is_some()
    }

    pub fn usage(&self) -> Option<Usage> {
        self.meter.as_ref().map(Meter::usage)
    }

    /// Runs body bytes through the tracker; returns how many belong to the body. The
    /// payload goes through the meter, and to the filter or (`decode`) to `out`.
    pub fn track(
        &mut self,
        t: &mut BodyTracker,
        input: &[u8],
        decode: bool,
        out: &mut Vec<u8>,
    ) -> Result<usize, GatewayError> {
        t.feed(input, u64::MAX, |payload| {
            if let Some(m) = self.meter.as_mut() {
                m.feed(payload);
            }
            match self.filter.as_mut() {
                Some(f) => {
                    self.piece.clear();
                    f.feed(payload, &mut self.piece);
                    put_piece(&mut self.filtered, &self.piece, self.rechunk);
                }
                None if decode => out.extend_from_slice(payload),
                None => {}
            }
        })
        .map_err(|_| GatewayError::UpstreamBadResponse("bad chunked framing"))
    }

    /// Moves the filter's output for this read into `out`; when the answer is `done`,
    /// what the filter held and (chunked) the last chunk too.
    pub fn pass(&mut self, done: bool, out: &mut Vec<u8>) {
        if done {
            self.finish();
        }
        out.extend_from_slice(&self.filtered);
        if done && self.rechunk {
            out.extend_from_slice(b"0\r\n\r\n");
        }
        self.filtered.clear();
    }

    /// An until-close answer ended with its connection: what the filter held, into `out`.
    pub fn pass_rest(&mut self, out: &mut Vec<u8>) {
        self.finish();
        out.append(&mut self.filtered);
    }

    fn finish(&mut self) {
        if let Some(f) = self.filter.as_mut() {
            self.piece.clear();
            f.finish(&mut self.piece);
            put_piece(&mut self.filtered, &self.piece, self.rechunk);
        }
    }
}

/// Appends filtered payload to `out`: as a chunk of its own when `rechunk`.
fn put_piece(out: &mut Vec<u8>, piece: &[u8], rechunk: bool) {
    if !rechunk {
        out.extend_from_slice(piece);
    } else if !piece.is_empty() {
        use std::io::Write as _;
        let _ = write!(out, "{:x}\r\n", piece.len());
        out.extend_from_slice(piece);
        out.extend_from_slice(b"\r\n");
    }
}
