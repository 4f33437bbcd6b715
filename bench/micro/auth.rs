//! criterion benchmarks of authentication: a cache hit, an uncached verification per
//! algorithm next to `ring`'s raw signature check (the floor), and the whole
//! head-parse + authenticate + route path of one request.
//!
//! Run: `cargo bench --bench auth` (add `-- --quick` for a fast pass). Keys are the test
//! keys in tests/keys/.

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use criterion::{black_box, criterion_group, criterion_main, Criterion};
use cubegate::internals::auth::cache::TokenCache;
use cubegate::internals::auth::claims::ClaimRules;
use cubegate::internals::auth::directory::Directory;
use cubegate::internals::auth::jws::{Alg, AlgSet, KeyMaterial, VerifyingKey};
use cubegate::internals::auth::keys::{IssuerKeys, KeyStore};
use cubegate::internals::auth::{verify_token, Authenticator};
use cubegate::internals::config::{AuthConfig, Limits};
use cubegate::internals::http::head::{parse_request_head, RequestHead};
use cubegate::internals::proxy::route::classify;
use ring::rand::SystemRandom;
use ring::signature::{self, EcdsaKeyPair, Ed25519KeyPair, KeyPair, RsaKeyPair};
use std::sync::Arc;

const ISSUER: &str = "https://idp.bench/";

fn pem(name: &str) -> Vec<u8> {
    let path = format!("{}/tests/keys/{name}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).expect(&path);
    let b64: String = text.lines().filter(|l| !l.starts_with("-----")).collect();
    STANDARD.decode(b64).unwrap()
}

type SignFn = Box<dyn Fn(&[u8]) -> Vec<u8>>;

/// A signer and the matching verifying key.
struct Signer {
    alg: Alg,
    sign: SignFn,
    key: VerifyingKey,
}

fn signers() -> Vec<Signer> {
    let rng = SystemRandom::new();
    let mut out = Vec::new();
    let secret = b"0123456789abcdef0123456789abcdef".to_vec();
    let hk = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &secret);
    out.push(Signer {
        alg: Alg::HS256,
        sign: Box::new(move |m| ring::hmac::sign(&hk, m).as_ref().to_vec()),
        key: VerifyingKey::hmac(Some("hs".into()), &secret, AlgSet::of(&[Alg::HS256])),
    });
    let rsa = Arc::new(RsaKeyPair::from_pkcs8(&pem("rsa2048.pem")).unwrap());
    let comps = signature::RsaPublicKeyComponents::<Vec<u8>>::from(rsa.public());
    for (alg, enc) in [
        (
            Alg::RS256,
            &signature::RSA_PKCS1_SHA256 as &'static dyn signature::RsaEncoding,
        ),
        (Alg::PS256, &signature::RSA_PSS_SHA256),
    ] {
        let (rsa, rng) = (rsa.clone(), rng.clone());
        out.push(Signer {
            alg,
            sign: Box::new(move |m| {
                let mut sig = vec![0; rsa.public().modulus_len()];
                rsa.sign(enc, &rng, m, &mut sig).unwrap();
                sig
            }),
            key: VerifyingKey {
                not_after: None,
                kid: Some(alg.name().into()),
                algs: AlgSet::of(&[alg]),
                material: KeyMaterial::Rsa {
                    n: comps.n.clone(),
                    e: comps.e.clone(),
                },
            },
        });
    }
    for (alg, file, ring_alg) in [
        (
            Alg::ES256,
            "ec-p256.pem",
            &signature::ECDSA_P256_SHA256_FIXED_SIGNING,
        ),
        (
            Alg::ES384,
            "ec-p384.pem",
            &signature::ECDSA_P384_SHA384_FIXED_SIGNING,
        ),
    ] {
        let pair = EcdsaKeyPair::from_pkcs8(ring_alg, &pem(file), &rng).unwrap();
        let point = pair.public_key().as_ref().to_vec();
        let rng = rng.clone();
        out.push(Signer {
            alg,
            sign: Box::new(move |m| pair.sign(&rng, m).unwrap().as_ref().to_vec()),
            key: VerifyingKey {
                not_after: None,
                kid: Some(alg.name().into()),
                algs: AlgSet::of(&[alg]),
                material: KeyMaterial::Ec { point },
            },
        });
    }
    let ed = Ed25519KeyPair::from_pkcs8_maybe_unchecked(&pem("ed25519.pem")).unwrap();
    let public = ed.public_key().as_ref().to_vec();
    out.push(Signer {
        alg: Alg::EdDSA,
        sign: Box::new(move |m| ed.sign(m).as_ref().to_vec()),
        key: VerifyingKey {
            not_after: None,
            kid: Some("EdDSA".into()),
            algs: AlgSet::of(&[Alg::EdDSA]),
            material: KeyMaterial::Ed25519 { public },
        },
    });
    out
}

fn token(s: &Signer) -> String {
    let header = format!(
        r#"{{"alg":"{}","typ":"JWT","kid":"{}"}}"#,
        s.alg.name(),
        s.key.kid.as_deref().unwrap()
    );
    let claims = serde_json::json!({"iss": ISSUER, "sub": "user-7f3a", "aud": "cubegate", "exp": 4_000_000_000u64, "iat": 1_700_000_000u64, "domains": ["d1", "d2"]});
    let input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    );
    let sig = (s.sign)(input.as_bytes());
    format!("{input}.{}", URL_SAFE_NO_PAD.encode(sig))
}

fn store(signers: &[Signer]) -> KeyStore {
    KeyStore {
        issuers: vec![IssuerKeys {
            issuer: ISSUER.into(),
            audiences: vec!["cubegate".into()],
            keys: signers.iter().map(|s| s.key.clone()).collect(),
            jwks_url: None,
            require_exp: true,
            own: false,
        }],
        generation: 1,
    }
}

fn rules() -> ClaimRules {
    ClaimRules {
        leeway_s: 30.0,
        namespace: String::new(),
        domains_claim: "domains".into(),
        claim_headers: Vec::new(),
    }
}

fn uncached(c: &mut Criterion) {
    let signers = signers();
    let keys = store(&signers);
    let mut g = c.benchmark_group("verify_uncached");
    for s in &signers {
        let t = token(s);
        g.bench_function(s.alg.name(), |b| {
            b.iter(|| verify_token(black_box(t.as_bytes()), &keys, &rules(), 1.8e9).unwrap())
        });
        // ring's raw check of the same signature: the floor under the verifier.
        let (input, sig) = t.rsplit_once('.').unwrap();
        let sig = URL_SAFE_NO_PAD.decode(sig).unwrap();
        g.bench_function(format!("{}_ring_raw", s.alg.name()), |b| {
            b.iter(|| {
                s.key
                    .verify(s.alg, black_box(input.as_bytes()), &sig)
                    .unwrap()
            })
        });
    }
    g.finish();
}

fn cached(c: &mut Criterion) {
    let signers = signers();
    let keys = store(&signers);
    let directory = Directory::default();
    let auth = Authenticator::new(&AuthConfig::default());
    let mut cache = TokenCache::new(65536, Default::default());
    let t = token(signers.iter().find(|s| s.alg == Alg::EdDSA).unwrap());
    let header = format!("Bearer {t}");
    auth.authenticate(Some(header.as_bytes()), &keys, &directory, 0, &mut cache)
        .unwrap();
    c.bench_function("authenticate_cache_hit", |b| {
        b.iter(|| {
            let header = Some(black_box(header.as_bytes()));
            auth.authenticate(header, &keys, &directory, 0, &mut cache)
                .unwrap()
        })
    });
    // The whole pre-forwarding path of one request: parse head, authenticate, route.
    let raw = format!(
        "POST /proxy/d1/v1/chat/completions HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\nAuthorization: {header}\r\nContent-Length: 120\r\n\r\n"
    );
    let limits = Limits::default();
    let mut head = RequestHead::default();
    c.bench_function("head_auth_route_cached", |b| {
        b.iter(|| {
            let buf = black_box(raw.as_bytes());
            parse_request_head(buf, &limits, &mut head)
                .unwrap()
                .unwrap();
            let target = std::str::from_utf8(head.target.of(buf)).unwrap();
            let route = classify(head.method, target);
            let authz = head.authorization.map(|s| s.of(buf));
            let id = auth
                .authenticate(authz, &keys, &directory, 0, &mut cache)
                .unwrap();
            black_box((route, id));
        })
    });
}

criterion_group!(benches, cached, uncached);
criterion_main!(benches);
