//! Backend response heads, as the backend's reads deliver them, and the head the client
//! is sent in their place.
//!
//! Properties, for the default and the smallest `max_upstream_head_bytes`, answering GET
//! and HEAD:
//! - no input panics `parse_response_head` or `write_client_head`;
//! - the head-reading loop of `proxy::stream` (parse what has arrived, skip interim 1xx
//!   answers) reaches the same verdict — the same final head, refused, or waiting — however
//!   the input is cut into reads;
//! - an accepted head lies within the input and the limit, every span inside it;
//! - the head written for the client (HTTP/1.1 and HTTP/1.0 clients) parses back as a
//!   response head with the same status and the framing the client was promised.
#![no_main]

use cubegate::internals::http::response::{
    client_framing, parse_response_head, write_client_head, ClientFraming, ResponseFraming,
    ResponseHead,
};
use cubegate_fuzz::{cut_plans, pieces};
use libfuzzer_sys::fuzz_target;

#[derive(Debug, PartialEq)]
enum Outcome {
    /// The final head: where it starts (after interim answers) and its Debug form.
    Head(usize, String),
    Refused,
    Waiting,
}

fn read_head(data: &[u8], plan: &[usize], max: usize, is_head: bool) -> Outcome {
    let (mut at, mut end) = (0, 0);
    for piece in pieces(data, plan) {
        end += piece.len();
        while at < end {
            match parse_response_head(&data[at..end], max, is_head) {
                Err(_) => return Outcome::Refused,
                Ok(None) => break,
                Ok(Some(h)) if h.status == 101 => return Outcome::Refused,
                Ok(Some(h)) if (100..200).contains(&h.status) => at += h.len,
                Ok(Some(h)) => {
                    check_head(&data[at..end], &h, max, is_head);
                    return Outcome::Head(at, format!("{h:?}"));
                }
            }
        }
    }
    Outcome::Waiting
}

fn check_head(buf: &[u8], h: &ResponseHead, max: usize, is_head: bool) {
    assert!(h.len <= buf.len() && h.len <= max);
    let spans = h.headers.iter().flat_map(|(n, v)| [n, v]);
    for s in spans.chain([&h.reason]).chain(&h.transfer_encoding) {
        assert!(s.start <= s.end && s.end as usize <= h.len, "{s:?}");
    }
    for client_minor in [0, 1] {
        let framing = client_framing(h.framing, client_minor);
        let mut out = Vec::new();
        write_client_head(&mut out, buf, h, framing, b"fuzz-id", true, b"");
        let back = parse_response_head(&out, out.len(), is_head);
        let text = String::from_utf8_lossy(&out);
        let back = back.unwrap_or_else(|e| panic!("{e}: {text:?}"));
        let back = back.unwrap_or_else(|| panic!("incomplete: {text:?}"));
        assert_eq!((back.status, back.len), (h.status, out.len()), "{text:?}");
        let promised = match framing {
            ClientFraming::None => ResponseFraming::None,
            ClientFraming::Length(n) => ResponseFraming::Length(n),
            ClientFraming::Chunked => ResponseFraming::Chunked,
            ClientFraming::Close => ResponseFraming::UntilClose,
        };
        assert_eq!(back.framing, promised, "{text:?}");
    }
}

fuzz_target!(|data: &[u8]| {
    for max in [64 * 1024, 1024] {
        for is_head in [false, true] {
            let reference = read_head(data, &[], max, is_head);
            for plan in cut_plans(data) {
                let got = read_head(data, &plan, max, is_head);
                assert_eq!(got, reference, "cuts {plan:?}");
            }
        }
    }
});
