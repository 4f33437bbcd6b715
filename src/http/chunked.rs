//! Incremental decoder for `Transfer-Encoding: chunked` (RFC 9112 §7.1).
//!
//! The proxy forwards chunked bodies byte for byte (no re-encoding, so a stream costs no
//! copy), but it must know where the body ends and it may need the decoded payload (to find
//! the `"model"` of a chunked request). So the decoder is fed raw bytes, hands each run of
//! payload to a callback as a borrowed slice, and reports how many raw bytes belonged to the
//! body. It is strict where leniency lets two parsers disagree (request smuggling): sizes
//! are bare hex with an overflow check, every line ends in CRLF, extensions and trailers are
//! bounded.

use std::fmt;

const MAX_SIZE_DIGITS: u8 = 16;
const MAX_EXT_BYTES: u32 = 4096;
/// All extensions of one body together: they are framing, not payload, and must not let a
/// body cost far more than its payload limit.
const MAX_EXT_TOTAL: u32 = 64 * 1024;
const MAX_TRAILER_BYTES: u32 = 16 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Reading the hex digits of a chunk size.
    Size,
    /// After `;`: a chunk extension, skipped up to CR.
    Ext,
    /// Saw CR after the size line, need LF.
    SizeLf,
    Data,
    DataCr,
    DataLf,
    /// After the last chunk: either CRLF (end) or a trailer field line.
    TrailerStart,
    TrailerLine,
    TrailerLf,
    EndLf,
    Done,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkError {
    BadSize,
    SizeTooLong,
    BadLineEnd,
    ExtTooLong,
    TrailersTooLong,
}

impl fmt::Display for ChunkError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ChunkError::BadSize => "invalid chunk size (expected hexadecimal digits)",
            ChunkError::SizeTooLong => "chunk size too large",
            ChunkError::BadLineEnd => "chunk framing line does not end in CRLF",
            ChunkError::ExtTooLong => "chunk extension too long",
            ChunkError::TrailersTooLong => "chunked trailers too long",
        })
    }
}

#[derive(Debug, Clone)]
pub struct ChunkedDecoder {
    state: State,
    remaining: u64,
    digits: u8,
    counter: u32,
    ext_total: u32,
}

impl Default for ChunkedDecoder {
    fn default() -> Self {
        Self::new()
    }
}

impl ChunkedDecoder {
    pub fn new() -> Self {
        ChunkedDecoder {
            state: State::Size,
            remaining: 0,
            digits: 0,
            counter: 0,
            ext_total: 0,
        }
    }

    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Feeds raw bytes. Each run of payload is passed to `on_data`. Returns how many bytes
    /// of `input` belong to the chunked body: all of them, unless the body ended inside
    /// `input` (then `is_done()` is true and the rest belongs to whatever follows).
    pub fn feed(
        &mut self,
        input: &[u8],
        mut on_data: impl FnMut(&[u8]),
    ) -> Result<usize, ChunkError> {
        let mut i = 0;
        while i < input.len() {
            let b = input[i];
            match self.state {
                State::Size => {
                    if let Some(v) = hex_value(b) {
                        if self.digits == MAX_SIZE_DIGITS || self.remaining >> 60 != 0 {
                            return Err(ChunkError::SizeTooLong);
                        }
                        self.remaining = (self.remaining << 4) | u64::from(v);
                        self.digits += 1;
                    } else if self.digits == 0 {
                        return Err(ChunkError::BadSize);
                    } else if b == b';' {
                        self.state = State::Ext;
                        self.counter = 0;
                    } else if b == b'\r' {
                        self.state = State::SizeLf;
                    } else {
                        return Err(ChunkError::BadSize);
                    }
                }
                State::Ext => {
                    if b == b'\r' {
                        self.state = State::SizeLf;
                    } else if b == b'\n' || b == 0 {
                        return Err(ChunkError::BadLineEnd);
                    } else {
                        self.counter += 1;
                        self.ext_total += 1;
                        if self.counter > MAX_EXT_BYTES || self.ext_total > MAX_EXT_TOTAL {
                            return Err(ChunkError::ExtTooLong);
                        }
                    }
                }
                State::SizeLf => {
                    if b != b'\n' {
                        return Err(ChunkError::BadLineEnd);
                    }
                    self.digits = 0;
                    if self.remaining == 0 {
                        self.state = State::TrailerStart;
                        self.counter = 0;
                    } else {
                        self.state = State::Data;
                    }
                }
                State::Data => {
                    let avail = (input.len() - i) as u64;
                    let take = avail.min(self.remaining) as usize;
                    on_data(&input[i..i + take]);
                    self.remaining -= take as u64;
                    i += take;
                    if self.remaining == 0 {
                        self.state = State::DataCr;
                    }
                    continue;
                }
                State::DataCr => {
                    if b != b'\r' {
                        return Err(ChunkError::BadLineEnd);
                    }
                    self.state = State::DataLf;
                }
                State::DataLf => {
                    if b != b'\n' {
                        return Err(ChunkError::BadLineEnd);
                    }
                    self.state = State::Size;
                }
                State::TrailerStart => {
                    if b == b'\r' {
                        self.state = State::EndLf;
                    } else {
                        self.state = State::TrailerLine;
                        continue;
                    }
                }
                State::TrailerLine => {
                    self.counter += 1;
                    if self.counter > MAX_TRAILER_BYTES {
                        return Err(ChunkError::TrailersTooLong);
                    }
                    if b == b'\r' {
                        self.state = State::TrailerLf;
                    } else if b == b'\n' || b == 0 {
                        return Err(ChunkError::BadLineEnd);
                    }
                }
                State::TrailerLf => {
                    if b != b'\n' {
                        return Err(ChunkError::BadLineEnd);
                    }
                    self.state = State::TrailerStart;
                }
                State::EndLf => {
                    if b != b'\n' {
                        return Err(ChunkError::BadLineEnd);
                    }
                    self.state = State::Done;
                    return Ok(i + 1);
                }
                State::Done => return Ok(i),
            }
            i += 1;
        }
        Ok(i)
    }
}

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_all(input: &[u8], step: usize) -> Result<(Vec<u8>, usize, bool), ChunkError> {
        let mut d = ChunkedDecoder::new();
        let mut out = Vec::new();
        let mut used = 0;
        for piece in input.chunks(step.max(1)) {
            let n = d.feed(piece, |s| out.extend_from_slice(s))?;
            used += n;
            if d.is_done() {
                break;
            }
        }
        Ok((out, used, d.is_done()))
    }

    #[test]
    fn decodes_in_any_split() {
        let body = b"5\r\nhello\r\n7;ext=1\r\n, world\r\n0\r\nX-T: 1\r\n\r\nNEXT";
        for step in 1..body.len() {
            let (out, used, done) = decode_all(body, step).unwrap();
            assert_eq!(out, b"hello, world");
            assert!(done);
            assert_eq!(used, body.len() - 4, "step {step}");
        }
    }

    #[test]
    fn rejects_hostile_framing() {
        let bad: &[&[u8]] = &[
            b"x\r\n",
            b"\r\n",
            b"5\nhello\r\n",
            b"5\r\nhelloX\r\n",
            b" 5\r\nhello\r\n",
            b"5 \r\nhello\r\n",
            b"-5\r\n",
            b"0x5\r\n",
            b"11111111111111111\r\n",
            b"fffffffffffffffff\r\n",
            b"0\r\n\n",
            b"0\r\nX: 1\n\r\n",
        ];
        for case in bad {
            assert!(
                decode_all(case, 1).is_err(),
                "{:?}",
                String::from_utf8_lossy(case)
            );
        }
    }

    #[test]
    fn bounded_extensions_and_trailers() {
        let mut ext = b"1;".to_vec();
        ext.extend(std::iter::repeat_n(b'a', 5000));
        assert_eq!(decode_all(&ext, 64).unwrap_err(), ChunkError::ExtTooLong);
        let mut tr = b"0\r\n".to_vec();
        tr.extend(std::iter::repeat_n(b'a', 20000));
        assert_eq!(
            decode_all(&tr, 64).unwrap_err(),
            ChunkError::TrailersTooLong
        );
    }

    #[test]
    fn incomplete_is_not_done() {
        let (out, _, done) = decode_all(b"5\r\nhel", 3).unwrap();
        assert_eq!(out, b"hel");
        assert!(!done);
    }
}
