//! Request heads, as a client's reads deliver them.
//!
//! Properties, under the default limits and under the smallest a config allows:
//! - no input panics `parse_request_head`, `check_partial` or `worth_parsing`;
//! - an accepted head lies within the input and within `max_head_bytes`, its target is an
//!   origin-form path, and every span it records lies inside the head;
//! - reading in pieces (the connection's loop: re-parse when `worth_parsing`, else only
//!   `check_partial`) accepts exactly the head the whole input gives; it refuses only an
//!   input that the whole-input parse refuses too, or that is incomplete and stays refused
//!   when completed with a blank line (an early refusal must be one no later byte could
//!   undo). Pieces may still be waiting where the whole input is refused: the loop
//!   re-parses only once a line ends.
#![no_main]

use cubegate::{
    config::Limits,
    http::head::{check_partial, parse_request_head, worth_parsing, RequestHead},
};
use cubegate_fuzz::{cut_plans, pieces};
use libfuzzer_sys::fuzz_target;

/// What reading stopped at: a complete head (its Debug form), a refusal, or still waiting.
#[derive(Debug, PartialEq)]
enum Outcome {
    Head(String),
    Refused,
    Waiting,
}

fn whole(data: &[u8], limits: &Limits) -> Outcome {
    let mut head = RequestHead::default();
    match parse_request_head(data, limits, &mut head) {
        Ok(Some(())) => {
            assert!(head.len <= data.len() && head.len <= limits.max_head_bytes);
            assert!(head.target.of(data).starts_with(b"/"));
            let spans = head.headers.iter().flat_map(|(n, v)| [n, v]);
            let named = [head.request_id, head.authorization, head.forwarded_for];
            for s in spans.chain(named.iter().flatten()) {
                assert!(s.start <= s.end && s.end as usize <= head.len, "{s:?}");
            }
            Outcome::Head(format!("{head:?}"))
        }
        Ok(None) => Outcome::Waiting,
        Err(_) => Outcome::Refused,
    }
}

/// The loop of `proxy::conn::read_request_head`, over the pieces of one cut plan.
fn in_pieces(data: &[u8], plan: &[usize], limits: &Limits) -> Outcome {
    let mut head = RequestHead::default();
    let mut scanned = 0;
    for piece in pieces(data, plan) {
        let buf = &data[..scanned + piece.len()];
        let step = if worth_parsing(buf, scanned) {
            parse_request_head(buf, limits, &mut head).map(|o| o.is_some())
        } else {
            check_partial(buf, limits).map(|()| false)
        };
        match step {
            Ok(true) => return Outcome::Head(format!("{head:?}")),
            Ok(false) => scanned = buf.len(),
            Err(_) => return Outcome::Refused,
        }
    }
    Outcome::Waiting
}

fn check(data: &[u8], limits: &Limits) {
    let reference = whole(data, limits);
    let completed_is_refused = || {
        let completed = [data, b"\r\n\r\n"].concat();
        !matches!(whole(&completed, limits), Outcome::Head(_))
    };
    for plan in cut_plans(data) {
        let got = in_pieces(data, &plan, limits);
        let fine = match (&got, &reference) {
            (Outcome::Waiting, Outcome::Refused) => true,
            (Outcome::Refused, Outcome::Waiting) => completed_is_refused(),
            (got, reference) => got == reference,
        };
        assert!(fine, "cuts {plan:?}: {got:?}, whole input: {reference:?}");
    }
}

fuzz_target!(|data: &[u8]| {
    check(data, &Limits::default());
    let smallest = Limits {
        max_head_bytes: 1024,
        max_headers: 8,
        max_uri_bytes: 64,
        ..Limits::default()
    };
    check(data, &smallest);
});
