//! Reading an answer's token counts as it streams past, without holding any of it back.
//!
//! Hosts report usage in a few shapes: OpenAI's `"usage":{"prompt_tokens":…,
//! "completion_tokens":…}` (whole answers, the final event of a stream, embeddings) and
//! Ollama's `"prompt_eval_count":…,"eval_count":…` (the final object of a chat or
//! generate, `/api/embed`). The meter does not parse JSON: it looks for those four keys,
//! written with an unescaped quote (inside a JSON string a quote is always escaped, so
//! generated text can never spell one), and takes the number after each. The last value
//! seen wins: the host's own report comes last in every shape (after the choices, as the
//! final event or object), so an earlier look-alike (an Ollama tool call's arguments are a
//! raw object) is overwritten by the real one.
//!
//! The payload arrives in pieces that may split a key or its number anywhere; the last
//! bytes of each piece are kept and searched again together with the start of the next,
//! so nothing is missed and nothing is copied but those few bytes.
//!
//! When the host reports nothing (a stream cut short, a host that does not report usage)
//! the meter falls back to what was delivered: the stream's events (SSE) or objects
//! (NDJSON), each about one token, and says so ([`UsageSource::Counted`]).

use super::{Usage, UsageSource};
use memchr::memmem::Finder;
use std::sync::LazyLock;

/// How the answer's payload is cut into messages, from its Content-Type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// `text/event-stream`: events end with a blank line.
    Sse,
    /// `application/x-ndjson`: one object a line.
    Lines,
    /// One JSON document.
    Whole,
}

impl Framing {
    pub fn of_content_type(value: &[u8]) -> Framing {
        let starts = |p: &[u8]| value.len() >= p.len() && value[..p.len()].eq_ignore_ascii_case(p);
        if starts(b"text/event-stream") {
            Framing::Sse
        } else if starts(b"application/x-ndjson") {
            Framing::Lines
        } else {
            Framing::Whole
        }
    }
}

/// The keys, each as the bytes that end it (`tokens":` / `count":`) and what must come
/// before those.
const TOKENS: &[u8] = b"tokens\":";
const COUNT: &[u8] = b"count\":";

/// Searchers built once per process: `memmem::find` builds one per call, which showed in
/// a proxied request's profile.
static FIND_TOKENS: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(TOKENS));
static FIND_COUNT: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(COUNT));
static FIND_EVENT_END: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\n\n"));
static FIND_DONE: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"[DONE]"));

#[derive(Clone, Copy)]
enum Field {
    Prompt,
    Completion,
}

/// Bytes kept from the end of a piece: more than the longest key (`"prompt_eval_count":`,
/// 20 bytes) plus a 20-digit number and a few spaces.
const CARRY: usize = 48;

pub struct Meter {
    framing: Framing,
    prompt: Option<u64>,
    completion: Option<u64>,
    /// Events or lines delivered (for the fallback).
    messages: u64,
    done_marker: bool,
    carry: [u8; CARRY],
    carry_len: usize,
    /// The previous piece ended with a newline (an SSE event may end across pieces).
    newline_at_end: bool,
}

impl Meter {
    pub fn new(framing: Framing) -> Meter {
        Meter {
            framing,
            prompt: None,
            completion: None,
            messages: 0,
            done_marker: false,
            carry: [0; CARRY],
            carry_len: 0,
            newline_at_end: false,
        }
    }

    /// The next piece of the answer's payload (dechunked).
    pub fn feed(&mut self, piece: &[u8]) {
        if piece.is_empty() {
            return;
        }
        // Keys that straddle the previous piece and this one (found again if they were
        // whole in the previous one: the same value, recorded twice, changes nothing).
        if self.carry_len > 0 {
            let mut joint = [0u8; 2 * CARRY];
            let head = piece.len().min(CARRY);
            joint[..self.carry_len].copy_from_slice(&self.carry[..self.carry_len]);
            joint[self.carry_len..self.carry_len + head].copy_from_slice(&piece[..head]);
            self.find_keys(&joint[..self.carry_len + head]);
        }
        self.find_keys(piece);
        self.count_messages(piece);
        self.keep_tail(piece);
    }

    /// Keeps the last `CARRY` bytes seen.
    fn keep_tail(&mut self, piece: &[u8]) {
        if piece.len() >= CARRY {
            self.carry.copy_from_slice(&piece[piece.len() - CARRY..]);
            self.carry_len = CARRY;
            return;
        }
        let over = (self.carry_len + piece.len()).saturating_sub(CARRY);
        self.carry.copy_within(over..self.carry_len, 0);
        self.carry_len -= over;
        self.carry[self.carry_len..self.carry_len + piece.len()].copy_from_slice(piece);
        self.carry_len += piece.len();
    }

    /// What the answer used: the host's figures when it gave any, else what was counted.
    pub fn usage(&self) -> Usage {
        if self.prompt.is_some() || self.completion.is_some() {
            return Usage {
                prompt_tokens: self.prompt.unwrap_or(0),
                completion_tokens: self.completion.unwrap_or(0),
                source: UsageSource::Reported,
            };
        }
        Usage {
            prompt_tokens: 0,
            completion_tokens: self.messages.saturating_sub(u64::from(self.done_marker)),
            source: UsageSource::Counted,
        }
    }

    /// Records every key in `bytes` whose number is complete within it.
    fn find_keys(&mut self, bytes: &[u8]) {
        for (finder, is_tokens) in [(&*FIND_TOKENS, true), (&*FIND_COUNT, false)] {
            let ending = finder.needle();
            for at in finder.find_iter(bytes) {
                let before = &bytes[..at];
                let field = if is_tokens {
                    if before.ends_with(b"\"prompt_") {
                        Field::Prompt
                    } else if before.ends_with(b"\"completion_") {
                        Field::Completion
                    } else {
                        continue;
                    }
                } else if before.ends_with(b"\"prompt_eval_") {
                    Field::Prompt
                } else if before.ends_with(b"\"eval_") {
                    Field::Completion
                } else {
                    continue;
                };
                if let Some(n) = number(&bytes[at + ending.len()..]) {
                    match field {
                        Field::Prompt => self.prompt = Some(n),
                        Field::Completion => self.completion = Some(n),
                    }
                }
            }
        }
    }

    fn count_messages(&mut self, piece: &[u8]) {
        match self.framing {
            Framing::Whole => {}
            Framing::Lines => self.messages += memchr::memchr_iter(b'\n', piece).count() as u64,
            Framing::Sse => {
                let mut ends = FIND_EVENT_END.find_iter(piece).count() as u64;
                if self.newline_at_end && piece[0] == b'\n' {
                    ends += 1;
                }
                self.messages += ends;
                if FIND_DONE.find(piece).is_some() {
                    self.done_marker = true;
                }
            }
        }
        self.newline_at_end = piece.last() == Some(&b'\n');
    }
}

/// The number at the start of `bytes` (after spaces), if it ends within them.
fn number(bytes: &[u8]) -> Option<u64> {
    let start = bytes.iter().position(|b| *b != b' ')?;
    let digits = bytes[start..]
        .iter()
        .take_while(|b| b.is_ascii_digit())
        .count();
    if digits == 0 || start + digits == bytes.len() || digits > 19 {
        return None;
    }
    bytes[start..start + digits].iter().try_fold(0u64, |n, d| {
        n.checked_mul(10)?.checked_add(u64::from(d - b'0'))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meter(framing: Framing, pieces: &[&[u8]]) -> Usage {
        let mut m = Meter::new(framing);
        for p in pieces {
            m.feed(p);
        }
        m.usage()
    }

    fn reported(prompt: u64, completion: u64) -> Usage {
        Usage {
            prompt_tokens: prompt,
            completion_tokens: completion,
            source: UsageSource::Reported,
        }
    }

    const SSE: &[u8] = b"data: {\"id\":\"c1\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"say \\\"prompt_tokens\\\":99\"}}]}\n\n\
data: {\"id\":\"c1\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}]}\n\n\
data: {\"id\":\"c1\",\"choices\":[],\"usage\":{\"prompt_tokens\":1234,\"total_tokens\":1301,\"completion_tokens\":67}}\n\n\
data: [DONE]\n\n";
    const NDJSON: &[u8] = b"{\"message\":{\"content\":\"hi\",\"tool_calls\":[{\"function\":{\"arguments\":{\"eval_count\":5}}}]},\"done\":false}\n\
{\"message\":{\"content\":\"\"},\"done\":true,\"prompt_eval_count\":26,\"prompt_eval_duration\":1,\"eval_count\":298,\"eval_duration\":2}\n";
    const JSON: &[u8] = b"{\"id\":\"x\",\"choices\":[{\"message\":{\"content\":\"\\\"completion_tokens\\\": 1\"}}],\"usage\": {\"prompt_tokens\": 17, \"completion_tokens\": 4, \"prompt_tokens_details\": null}}";

    #[test]
    fn every_shape_split_anywhere() {
        for (framing, body, want) in [
            (Framing::Sse, SSE, reported(1234, 67)),
            (Framing::Lines, NDJSON, reported(26, 298)),
            (Framing::Whole, JSON, reported(17, 4)),
        ] {
            assert_eq!(meter(framing, &[body]), want);
            for cut in 1..body.len() {
                let (a, b) = body.split_at(cut);
                assert_eq!(meter(framing, &[a, b]), want, "cut at {cut}");
            }
            for size in 1..8 {
                let pieces: Vec<&[u8]> = body.chunks(size).collect();
                assert_eq!(meter(framing, &pieces), want, "pieces of {size}");
            }
        }
    }

    #[test]
    fn a_stream_without_a_report_counts_what_was_delivered() {
        let usage_event =
            memchr::memmem::find(SSE, b"data: {\"id\":\"c1\",\"choices\":[]").unwrap();
        let cut = &SSE[..usage_event];
        let got = meter(Framing::Sse, &[cut]);
        assert_eq!(got.source, UsageSource::Counted);
        assert_eq!(got.completion_tokens, 2);
        let lines = b"{\"response\":\"a\"}\n{\"response\":\"b\"}\n{\"respo";
        let got = meter(Framing::Lines, &[&lines[..5], &lines[5..]]);
        assert_eq!(
            (got.completion_tokens, got.source),
            (2, UsageSource::Counted)
        );
        // Events split between pieces right at their blank line.
        let got = meter(
            Framing::Sse,
            &[b"data: {}\n", b"\ndata: {}\n\n", b"data: [DONE]\n\n"],
        );
        assert_eq!(got.completion_tokens, 2);
    }

    #[test]
    fn hostile_numbers() {
        let huge =
            b"{\"usage\":{\"prompt_tokens\":99999999999999999999999,\"completion_tokens\":-3}}";
        assert_eq!(meter(Framing::Whole, &[huge]).source, UsageSource::Counted);
        let unfinished = b"{\"usage\":{\"prompt_tokens\":12";
        assert_eq!(
            meter(Framing::Whole, &[unfinished]).source,
            UsageSource::Counted
        );
        assert_eq!(
            Framing::of_content_type(b"Text/Event-Stream; charset=utf-8"),
            Framing::Sse
        );
        assert_eq!(
            Framing::of_content_type(b"application/x-ndjson"),
            Framing::Lines
        );
        assert_eq!(
            Framing::of_content_type(b"application/json"),
            Framing::Whole
        );
    }
}
