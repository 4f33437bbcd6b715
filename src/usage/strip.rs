//! Taking back out of a stream the usage event the gateway asked for.
//!
//! A streamed OpenAI answer reports usage only when the request carried
//! `stream_options.include_usage`. When the client did not ask for it, the gateway adds
//! the option (so every stream is counted from the host's own figures) and removes the
//! extra event again here, so the client receives the events it would have received from
//! the host directly.
//!
//! Events are passed on as soon as their closing blank line has arrived; only the
//! unfinished event at the end of a read is held, and an SSE client cannot act on an
//! unfinished event anyway, so holding it delays nothing. An event longer than
//! [`HOLD_LIMIT`] is no usage event: it is passed on as it comes.

use memchr::memmem;

/// Longest unfinished event held back; past it the event streams through.
pub const HOLD_LIMIT: usize = 16 * 1024;

#[derive(Default)]
pub struct UsageEventFilter {
    /// The unfinished event (held).
    pending: Vec<u8>,
    /// Inside an event too long to hold: bytes pass until its end.
    passing: bool,
    /// The last byte passed while `passing` was a newline.
    passing_newline: bool,
}

impl UsageEventFilter {
    /// The next piece of the payload; what the client gets is appended to `out`.
    pub fn feed(&mut self, mut piece: &[u8], out: &mut Vec<u8>) {
        if self.passing {
            match event_end(piece, self.passing_newline) {
                Some(end) => {
                    out.extend_from_slice(&piece[..end]);
                    piece = &piece[end..];
                    self.passing = false;
                }
                None => {
                    out.extend_from_slice(piece);
                    self.passing_newline = piece.last() == Some(&b'\n');
                    return;
                }
            }
        }
        let scanned = self.pending.len().saturating_sub(3);
        self.pending.extend_from_slice(piece);
        let mut from = 0;
        let mut search = scanned;
        while let Some(end) = event_end(&self.pending[search..], false).map(|e| search + e) {
            let event = &self.pending[from..end];
            if !is_usage_event(event) {
                out.extend_from_slice(event);
            }
            from = end;
            search = end;
        }
        self.pending.drain(..from);
        if self.pending.len() > HOLD_LIMIT {
            out.extend_from_slice(&self.pending);
            self.passing_newline = self.pending.last() == Some(&b'\n');
            self.pending.clear();
            self.passing = true;
        }
    }

    /// The answer has ended: an unfinished last event goes out as it is.
    pub fn finish(&mut self, out: &mut Vec<u8>) {
        out.append(&mut self.pending);
    }
}

/// One past the blank line that ends the first event in `bytes` (`\n\n` or `\r\n\r\n`;
/// `after_newline`: the byte before `bytes` was a newline).
fn event_end(bytes: &[u8], after_newline: bool) -> Option<usize> {
    if after_newline {
        if bytes.first() == Some(&b'\n') {
            return Some(1);
        }
        if bytes.starts_with(b"\r\n") {
            return Some(2);
        }
    }
    memchr::memchr_iter(b'\n', bytes).find_map(|at| {
        let next = &bytes[at + 1..];
        if next.first() == Some(&b'\n') {
            Some(at + 2)
        } else if next.starts_with(b"\r\n") {
            Some(at + 3)
        } else {
            None
        }
    })
}

/// An event whose data is a chunk with no choices and a usage object: OpenAI's final usage
/// chunk. (Both markers are structural: inside a JSON string the quotes would be escaped.)
fn is_usage_event(event: &[u8]) -> bool {
    let data = event
        .strip_prefix(b"data: ")
        .or_else(|| event.strip_prefix(b"data:"));
    matches!(data, Some(d) if d.starts_with(b"{"))
        && memmem::find(event, b"\"choices\":[]").is_some()
        && memmem::find(event, b"\"usage\":{").is_some()
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONTENT: &[u8] = b"data: {\"choices\":[{\"delta\":{\"content\":\"x \\\"choices\\\":[] \\\"usage\\\":{\"}}]}\n\n";
    const USAGE: &[u8] =
        b"data: {\"id\":\"c\",\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":2}}\n\n";
    const DONE: &[u8] = b"data: [DONE]\n\n";

    fn filter(pieces: &[&[u8]]) -> Vec<u8> {
        let mut f = UsageEventFilter::default();
        let mut out = Vec::new();
        for p in pieces {
            f.feed(p, &mut out);
        }
        f.finish(&mut out);
        out
    }

    #[test]
    fn removes_only_the_usage_event_wherever_the_pieces_are_cut() {
        let stream = [CONTENT, CONTENT, USAGE, DONE].concat();
        let want = [CONTENT, CONTENT, DONE].concat();
        assert_eq!(filter(&[&stream]), want);
        for cut in 1..stream.len() {
            let (a, b) = stream.split_at(cut);
            assert_eq!(filter(&[a, b]), want, "cut at {cut}");
        }
        for size in 1..9 {
            let pieces: Vec<&[u8]> = stream.chunks(size).collect();
            assert_eq!(filter(&pieces), want, "pieces of {size}");
        }
        let crlf = b"data: {\"choices\":[],\"usage\":{}}\r\n\r\ndata: [DONE]\r\n\r\n";
        assert_eq!(filter(&[crlf]), b"data: [DONE]\r\n\r\n");
    }

    #[test]
    fn complete_events_are_not_held() {
        let mut f = UsageEventFilter::default();
        let mut out = Vec::new();
        f.feed(&[CONTENT, &CONTENT[..10]].concat(), &mut out);
        assert_eq!(out, CONTENT);
    }

    #[test]
    fn an_event_too_long_to_hold_streams_through() {
        let long = [
            b"data: {\"x\":\"".as_slice(),
            &vec![b'a'; HOLD_LIMIT + 10],
            b"\"}\n\n",
        ]
        .concat();
        let stream = [long.as_slice(), USAGE, DONE].concat();
        let mut f = UsageEventFilter::default();
        let mut out = Vec::new();
        let pieces: Vec<&[u8]> = stream.chunks(4096).collect();
        for (i, p) in pieces.iter().enumerate() {
            f.feed(p, &mut out);
            // Once past the limit, what arrives goes out.
            if (i + 1) * 4096 > HOLD_LIMIT + 4096 && (i + 1) * 4096 < long.len() {
                assert_eq!(out.len(), (i + 1) * 4096);
            }
        }
        f.finish(&mut out);
        assert_eq!(out, [long.as_slice(), DONE].concat());
    }
}
