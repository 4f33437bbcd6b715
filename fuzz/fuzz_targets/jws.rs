//! Compact JWS tokens, as a bearer credential carries them.
//!
//! Each input is tried twice: as a token, and as `header JSON \n payload JSON \n signature`
//! encoded into a canonical token here, so the fuzzer can work on the JSON directly rather
//! than through base64.
//!
//! Properties:
//! - no input panics `jws::parse`, nor verifying what it parsed (an HMAC key allowing
//!   every HS algorithm, and an Ed25519 key);
//! - an accepted token has exactly three dot-separated parts, is at most
//!   `MAX_TOKEN_BYTES`, its signing input is the first two parts with their dot, and its
//!   signature part is canonical unpadded base64url (re-encoding the decoded signature
//!   gives the part back: no padding, no stray bits).
#![no_main]

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use cubegate::internals::auth::jws::{
    parse, Alg, AlgSet, KeyMaterial, VerifyingKey, MAX_TOKEN_BYTES,
};
use libfuzzer_sys::fuzz_target;

fn check(data: &[u8]) {
    let Ok(token) = parse(data) else { return };
    assert!(data.len() <= MAX_TOKEN_BYTES);
    let parts: Vec<&[u8]> = data.split(|&b| b == b'.').collect();
    assert_eq!(parts.len(), 3);
    assert_eq!(
        token.signing_input,
        &data[..parts[0].len() + 1 + parts[1].len()]
    );
    assert_eq!(
        URL_SAFE_NO_PAD.encode(&token.signature).as_bytes(),
        parts[2]
    );
    assert_eq!(Alg::from_name(token.alg.name()), Some(token.alg));
    let hs = [Alg::HS256, Alg::HS384, Alg::HS512];
    let hmac = VerifyingKey::hmac(None, b"fuzz secret of thirty-two bytes!", AlgSet::of(&hs));
    let ed = VerifyingKey {
        not_after: None,
        kid: None,
        algs: AlgSet::of(&[Alg::EdDSA]),
        material: KeyMaterial::Ed25519 {
            public: vec![7; 32],
        },
    };
    for key in [hmac, ed] {
        let _ = key.verify(token.alg, token.signing_input, &token.signature);
    }
}

fuzz_target!(|data: &[u8]| {
    check(data);
    let mut parts = data.splitn(3, |&b| b == b'\n');
    let (header, payload, sig) = (parts.next(), parts.next(), parts.next());
    let encoded: Vec<String> = [header, payload, sig]
        .iter()
        .map(|p| URL_SAFE_NO_PAD.encode(p.unwrap_or(b"")))
        .collect();
    check(encoded.join(".").as_bytes());
});
