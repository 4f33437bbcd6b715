//! JWKS documents, as a JWKS endpoint (as untrusted as a client) or a config file serves
//! them.
//!
//! Properties:
//! - no input panics `parse_jwks`, nor a signature check with any key it returns;
//! - a document is refused past `MAX_JWKS_BYTES` or `MAX_KEYS` keys; every key of an
//!   accepted one is either returned or skipped with a reason;
//! - a returned key is one the docs allow: it allows at least one algorithm, and its
//!   material has the size its type demands (an RSA modulus of 2048 bits or more, an
//!   uncompressed P-256 or P-384 point, a 32-byte Ed25519 key).
#![no_main]

use cubegate::auth::{
    jws::{Alg, KeyMaterial},
    keys::{parse_jwks, MAX_JWKS_BYTES, MAX_KEYS},
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok((keys, skipped)) = parse_jwks(data) else {
        return;
    };
    assert!(data.len() <= MAX_JWKS_BYTES && keys.len() + skipped.len() <= MAX_KEYS);
    for key in keys {
        let allowed: Vec<Alg> = Alg::ALL
            .into_iter()
            .filter(|a| key.algs.contains(*a))
            .collect();
        assert!(!allowed.is_empty());
        match &key.material {
            KeyMaterial::Rsa { n, .. } => assert!(n.len() >= 256),
            KeyMaterial::Ec { point } => assert!(point.len() == 65 || point.len() == 97),
            KeyMaterial::Ed25519 { public } => assert_eq!(public.len(), 32),
            KeyMaterial::Hmac(_) => panic!("a JWKS gave a symmetric key"),
        }
        for alg in allowed {
            let _ = key.verify(alg, b"header.payload", &[0x5a; 64]);
        }
    }
});
