//! Where a body ends: one tracker for Content-Length, chunked and until-close bodies.
//!
//! The proxy forwards raw bytes; the tracker only counts them, so it can say which of the
//! bytes just read belong to this message and which to the next (pipelining), and hand the
//! payload to an inspector (the model scanner) without copying.

use crate::http::chunked::{ChunkError, ChunkedDecoder};

#[derive(Debug, Clone)]
pub enum BodyTracker {
    Length {
        remaining: u64,
    },
    Chunked {
        decoder: ChunkedDecoder,
        payload: u64,
    },
    UntilClose,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyError {
    Chunk(ChunkError),
    /// Payload past the limit.
    TooLarge,
}

impl BodyTracker {
    pub fn length(n: u64) -> BodyTracker {
        BodyTracker::Length { remaining: n }
    }

    pub fn chunked() -> BodyTracker {
        BodyTracker::Chunked {
            decoder: ChunkedDecoder::new(),
            payload: 0,
        }
    }

    pub fn is_done(&self) -> bool {
        match self {
            BodyTracker::Length { remaining } => *remaining == 0,
            BodyTracker::Chunked { decoder, .. } => decoder.is_done(),
            BodyTracker::UntilClose => false,
        }
    }

    /// Consumes raw bytes; returns how many belong to the body. `on_payload` sees the
    /// decoded payload; `max_payload` bounds a chunked body's total payload.
    pub fn feed(
        &mut self,
        input: &[u8],
        max_payload: u64,
        mut on_payload: impl FnMut(&[u8]),
    ) -> Result<usize, BodyError> {
        match self {
            BodyTracker::Length { remaining } => {
                let n = (*remaining).min(input.len() as u64) as usize;
                on_payload(&input[..n]);
                *remaining -= n as u64;
                Ok(n)
            }
            BodyTracker::Chunked { decoder, payload } => {
                let mut over = false;
                let used = decoder
                    .feed(input, |data| {
                        *payload += data.len() as u64;
                        if *payload > max_payload {
                            over = true;
                        } else {
                            on_payload(data);
                        }
                    })
                    .map_err(BodyError::Chunk)?;
                if over {
                    return Err(BodyError::TooLarge);
                }
                Ok(used)
            }
            BodyTracker::UntilClose => {
                on_payload(input);
                Ok(input.len())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn length_stops_at_the_boundary() {
        let mut t = BodyTracker::length(3);
        let mut seen = Vec::new();
        assert_eq!(
            t.feed(b"abcdef", 100, |p| seen.extend_from_slice(p))
                .unwrap(),
            3
        );
        assert!(t.is_done());
        assert_eq!(seen, b"abc");
    }

    #[test]
    fn chunked_payload_is_bounded() {
        let mut t = BodyTracker::chunked();
        assert_eq!(
            t.feed(b"a\r\n0123456789\r\n", 5, |_| {}),
            Err(BodyError::TooLarge)
        );
    }
}
