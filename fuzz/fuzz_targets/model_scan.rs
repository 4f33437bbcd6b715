//! The model scanner against serde_json, on arbitrary bytes cut arbitrarily.
//!
//! Properties:
//! - no input panics `ModelScanner::feed`;
//! - the verdict (the model, whether the object closed, or the error) is the same however
//!   the body is cut into pieces;
//! - on every body serde_json accepts as JSON, the scanner's verdict is the one its
//!   contract gives, with serde_json as the parser: not an object → `NotAnObject`; walking
//!   the top-level members in order, an escaped key → `EscapedKey`; a key equal to "model"
//!   ignoring ASCII case (as Go's encoding/json matches; no non-ASCII letter folds to one
//!   of "model"'s) → a second one is `Duplicate`, a value that is not a string
//!   `NotAString`, an escaped one `Escaped` (or `TooLong`, if 256 bytes came before the
//!   escape), one over 256 bytes `TooLong`; otherwise the scanner accepts, the object has
//!   closed, and it names exactly the model serde_json read (or none). So it may refuse a
//!   body serde_json accepts only for a documented reason, and it never names a model
//!   other than the parser's. On bytes serde_json refuses only the two properties above
//!   hold: the scanner is a tokenizer, not a validator.
#![no_main]

use cubegate::internals::proxy::model_scan::{ModelScanner, ScanError};
use cubegate_fuzz::{cut_plans, pieces};
use libfuzzer_sys::fuzz_target;
use serde::de::{Deserialize, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use std::fmt;

type Verdict = Result<(Option<String>, bool), ScanError>;

fn scan<'a>(body: impl Iterator<Item = &'a [u8]>) -> Verdict {
    let mut s = ModelScanner::new();
    for piece in body {
        s.feed(piece)?;
    }
    Ok((s.model().map(str::to_string), s.finished()))
}

/// A JSON value as the oracle needs it. serde_json hands a string over borrowed from the
/// input unless it had to unescape it, which tells escaped strings apart.
#[derive(Debug)]
enum Piece {
    Plain(String),
    Escaped,
    Other,
    Object(Vec<(Piece, Piece)>),
}

struct PieceVisitor;

impl<'de> Visitor<'de> for PieceVisitor {
    type Value = Piece;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_borrowed_str<E>(self, s: &'de str) -> Result<Piece, E> {
        Ok(Piece::Plain(s.to_string()))
    }
    fn visit_str<E>(self, _: &str) -> Result<Piece, E> {
        Ok(Piece::Escaped)
    }
    fn visit_bool<E>(self, _: bool) -> Result<Piece, E> {
        Ok(Piece::Other)
    }
    fn visit_i64<E>(self, _: i64) -> Result<Piece, E> {
        Ok(Piece::Other)
    }
    fn visit_u64<E>(self, _: u64) -> Result<Piece, E> {
        Ok(Piece::Other)
    }
    fn visit_f64<E>(self, _: f64) -> Result<Piece, E> {
        Ok(Piece::Other)
    }
    fn visit_unit<E>(self) -> Result<Piece, E> {
        Ok(Piece::Other)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Piece, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Piece::Other)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Piece, A::Error> {
        let mut members = Vec::new();
        while let Some(key) = map.next_key::<Piece>()? {
            // Members of nested objects are not looked at: only the top level matters.
            members.push((key, map.next_value::<Scalar>()?.0));
        }
        Ok(Piece::Object(members))
    }
}

impl<'de> Deserialize<'de> for Piece {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Piece, D::Error> {
        d.deserialize_any(PieceVisitor)
    }
}

/// A member's value: an object there counts as `Other`, like any non-string.
struct Scalar(Piece);

impl<'de> Deserialize<'de> for Scalar {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Scalar, D::Error> {
        Ok(Scalar(match d.deserialize_any(PieceVisitor)? {
            Piece::Object(_) => Piece::Other,
            p => p,
        }))
    }
}

/// What the scanner must answer for a body serde_json parsed as `top`.
fn contract(top: Piece) -> Result<Option<String>, &'static [ScanError]> {
    let Piece::Object(members) = top else {
        return Err(&[ScanError::NotAnObject]);
    };
    let mut found = None;
    for (key, value) in members {
        match key {
            Piece::Plain(k) if k.eq_ignore_ascii_case("model") => {}
            Piece::Plain(_) => continue,
            _ => return Err(&[ScanError::EscapedKey]),
        }
        if found.is_some() {
            return Err(&[ScanError::Duplicate]);
        }
        found = Some(match value {
            Piece::Plain(m) if m.len() > 256 => return Err(&[ScanError::TooLong]),
            Piece::Plain(m) => m,
            Piece::Escaped => return Err(&[ScanError::Escaped, ScanError::TooLong]),
            _ => return Err(&[ScanError::NotAString]),
        });
    }
    Ok(found)
}

fuzz_target!(|data: &[u8]| {
    let whole = scan(std::iter::once(data));
    for plan in cut_plans(data) {
        assert_eq!(scan(pieces(data, &plan)), whole, "cuts {plan:?}");
    }
    let Ok(top) = serde_json::from_slice::<Piece>(data) else {
        return;
    };
    match (contract(top), whole) {
        (Ok(model), Ok((got, finished))) => assert!(finished && got == model, "{got:?}"),
        (Err(allowed), Err(e)) => assert!(allowed.contains(&e), "{e:?}, want {allowed:?}"),
        (want, got) => panic!("scanner said {got:?}, its contract {want:?}"),
    }
});
