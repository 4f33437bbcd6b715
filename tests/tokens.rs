//! Token verification, in process, against the library API.
//!
//! Differential: tokens built and judged by `jsonwebtoken` (RustCrypto, an independent
//! implementation) for every algorithm and many claim combinations must get the same
//! verdict (accept / reject) from cubegate's `verify_token` (ring). Where cubegate is
//! stricter on purpose (duplicate claims, `crit`, padding, `iat` in the future, refresh
//! tokens, …) the case is in the hostile suite instead, which asserts the exact
//! `TokenError`. Keys are the test-only PEM files in `tests/keys/`.

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD as B64};
use base64::Engine;
use cubegate::internals::auth::claims::{ClaimRules, Role, VerifiedClaims};
use cubegate::internals::auth::jws::{Alg, AlgSet, VerifyingKey, MAX_TOKEN_BYTES};
use cubegate::internals::auth::keys::{parse_jwks, IssuerKeys, KeyStore};
use cubegate::internals::auth::{verify_token, TokenError};
use cubegate::internals::scope::DomainId;
use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde_json::{json, Value};

const ISS: &str = "https://idp.test/";
const ISS_HS: &str = "https://hs.test/";
/// An issuer that does not require `exp`.
const ISS_NO_EXP: &str = "https://noexp.test/";
const AUD: &str = "cubegate";
const LEEWAY: u64 = 30;
const HS_SECRET: &[u8] = b"test-only-hmac-secret-0123456789-abcdefgh";
const HS_OTHER: &[u8] = b"another-test-hmac-secret-0123456789-xyz!";

const ALL_ALGS: [Algorithm; 12] = [
    Algorithm::HS256,
    Algorithm::HS384,
    Algorithm::HS512,
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
    Algorithm::ES256,
    Algorithm::ES384,
    Algorithm::EdDSA,
];

fn key_file(name: &str) -> Vec<u8> {
    let path = format!("{}/tests/keys/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// The DER inside a PEM file.
fn pem_der(pem: &[u8]) -> Vec<u8> {
    let text = std::str::from_utf8(pem).unwrap();
    let body: String = text.lines().filter(|l| !l.starts_with("-----")).collect();
    STANDARD.decode(body).unwrap()
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Family {
    Hmac,
    Rsa,
    P256,
    P384,
    Ed,
}

fn family(alg: Algorithm) -> Family {
    match alg {
        Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512 => Family::Hmac,
        Algorithm::ES256 => Family::P256,
        Algorithm::ES384 => Family::P384,
        Algorithm::EdDSA => Family::Ed,
        _ => Family::Rsa,
    }
}

/// One signing key, its public half for jsonwebtoken, and its public JWK (no `alg`).
struct Pair {
    enc: EncodingKey,
    dec: DecodingKey,
    jwk: Value,
    kid: Option<&'static str>,
}

/// The key of `f`; `other` = a second, unrelated key of the same type (same `kid`).
fn pair(f: Family, other: bool) -> Pair {
    let suffix = if other { "-other" } else { "" };
    let jwk_of = |enc: &EncodingKey, alg: Algorithm, kid: &str| -> Value {
        let mut v = serde_json::to_value(Jwk::from_encoding_key(enc, alg).unwrap()).unwrap();
        let o = v.as_object_mut().unwrap();
        o.remove("alg");
        o.insert("kid".into(), kid.into());
        v
    };
    match f {
        Family::Hmac => {
            let secret = if other { HS_OTHER } else { HS_SECRET };
            Pair {
                enc: EncodingKey::from_secret(secret),
                dec: DecodingKey::from_secret(secret),
                jwk: Value::Null,
                kid: None,
            }
        }
        Family::Rsa => {
            let enc =
                EncodingKey::from_rsa_pem(&key_file(&format!("rsa2048{suffix}.pem"))).unwrap();
            let dec =
                DecodingKey::from_rsa_pem(&key_file(&format!("rsa2048{suffix}.pub.pem"))).unwrap();
            let jwk = jwk_of(&enc, Algorithm::RS256, "rsa");
            Pair {
                enc,
                dec,
                jwk,
                kid: Some("rsa"),
            }
        }
        Family::P256 => {
            let enc = EncodingKey::from_ec_pem(&key_file(&format!("ec-p256{suffix}.pem"))).unwrap();
            let dec =
                DecodingKey::from_ec_pem(&key_file(&format!("ec-p256{suffix}.pub.pem"))).unwrap();
            let jwk = jwk_of(&enc, Algorithm::ES256, "p256");
            Pair {
                enc,
                dec,
                jwk,
                kid: Some("p256"),
            }
        }
        Family::P384 => {
            assert!(!other, "one P-384 key only");
            let enc = EncodingKey::from_ec_pem(&key_file("ec-p384.pem")).unwrap();
            let dec = DecodingKey::from_ec_pem(&key_file("ec-p384.pub.pem")).unwrap();
            let jwk = jwk_of(&enc, Algorithm::ES384, "p384");
            Pair {
                enc,
                dec,
                jwk,
                kid: Some("p384"),
            }
        }
        Family::Ed => {
            let public = key_file(&format!("ed25519{suffix}.pub.pem"));
            let der = pem_der(&public);
            // SubjectPublicKeyInfo of Ed25519: a 12-byte prefix, then the 32-byte key.
            assert_eq!(der.len(), 44);
            Pair {
                enc: EncodingKey::from_ed_pem(&key_file(&format!("ed25519{suffix}.pem"))).unwrap(),
                dec: DecodingKey::from_ed_pem(&public).unwrap(),
                jwk: json!({"kty": "OKP", "crv": "Ed25519", "x": B64.encode(&der[12..]), "kid": "ed"}),
                kid: Some("ed"),
            }
        }
    }
}

/// The public JWKS of the four asymmetric keys.
fn jwks() -> Value {
    json!({"keys": [
        pair(Family::Rsa, false).jwk,
        pair(Family::P256, false).jwk,
        pair(Family::P384, false).jwk,
        pair(Family::Ed, false).jwk,
    ]})
}

fn hs_key() -> VerifyingKey {
    VerifyingKey::hmac(
        None,
        HS_SECRET,
        AlgSet::of(&[Alg::HS256, Alg::HS384, Alg::HS512]),
    )
}

fn issuer(name: &str, keys: Vec<VerifyingKey>, require_exp: bool) -> IssuerKeys {
    IssuerKeys {
        issuer: name.into(),
        audiences: vec![AUD.into()],
        keys,
        jwks_url: None,
        require_exp,
        own: false,
    }
}

fn parse_all(doc: &Value) -> Vec<VerifyingKey> {
    let (keys, skipped) = parse_jwks(doc.to_string().as_bytes()).unwrap();
    assert!(skipped.is_empty(), "skipped keys: {skipped:?}\n{doc}");
    assert_eq!(keys.len(), doc["keys"].as_array().unwrap().len());
    keys
}

/// ISS: the JWKS; ISS_HS: the HMAC secret; ISS_NO_EXP: the JWKS, `exp` optional.
fn store_from(doc: &Value) -> KeyStore {
    KeyStore {
        issuers: vec![
            issuer(ISS, parse_all(doc), true),
            issuer(ISS_HS, vec![hs_key()], true),
            issuer(ISS_NO_EXP, parse_all(doc), false),
        ],
        generation: 1,
    }
}

fn store() -> KeyStore {
    store_from(&jwks())
}

fn rules() -> ClaimRules {
    ClaimRules {
        leeway_s: LEEWAY as f64,
        namespace: String::new(),
        domains_claim: "domains".into(),
        claim_headers: Vec::new(),
    }
}

fn iss_for(alg: Algorithm) -> &'static str {
    if family(alg) == Family::Hmac {
        ISS_HS
    } else {
        ISS
    }
}

fn sign(alg: Algorithm, kid: Option<&str>, claims: &Value, key: &EncodingKey) -> String {
    let mut h = Header::new(alg);
    h.kid = kid.map(str::to_string);
    jsonwebtoken::encode(&h, claims, key).unwrap()
}

/// A token with exactly this header and payload text, signed by jsonwebtoken's crypto.
fn sign_raw(alg: Algorithm, header: &str, payload: &str, key: &EncodingKey) -> String {
    let input = format!("{}.{}", B64.encode(header), B64.encode(payload));
    let sig = jsonwebtoken::crypto::sign(input.as_bytes(), key, alg).unwrap();
    format!("{input}.{sig}")
}

/// jsonwebtoken's verdict, with the rules cubegate applies to these issuers.
fn oracle(token: &str, alg: Algorithm, dec: &DecodingKey) -> Result<(), String> {
    let mut v = Validation::new(alg);
    v.leeway = LEEWAY;
    v.validate_exp = true;
    v.validate_nbf = true;
    v.set_issuer(&[iss_for(alg)]);
    v.set_audience(&[AUD]);
    v.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
    jsonwebtoken::decode::<Value>(token, dec, &v)
        .map(|_| ())
        .map_err(|e| format!("{:?}", e.kind()))
}

fn cubegate(token: &str, keys: &KeyStore, now: u64) -> Result<VerifiedClaims, TokenError> {
    verify_token(token.as_bytes(), keys, &rules(), now as f64)
}

/// Claim sets for the differential, at time `now`, for issuer `iss`.
fn claim_cases(now: u64, iss: &str) -> Vec<(&'static str, Value)> {
    let n = now as i64;
    let l = LEEWAY as i64;
    let base = |extra: Value| -> Value {
        let mut v = json!({"iss": iss, "sub": "user-1", "aud": AUD, "iat": n, "exp": n + 600});
        for (k, x) in extra.as_object().unwrap() {
            if x.is_null() {
                v.as_object_mut().unwrap().remove(k);
            } else {
                v[k] = x.clone();
            }
        }
        v
    };
    vec![
        ("good", base(json!({}))),
        (
            "good, custom claims",
            base(json!({"domains": ["d1", "d2"], "role": "admin", "jti": "j1"})),
        ),
        ("aud array with ours", base(json!({"aud": ["other", AUD]}))),
        (
            "aud array without ours",
            base(json!({"aud": ["other", "else"]})),
        ),
        ("aud empty array", base(json!({"aud": []}))),
        ("aud missing", base(json!({"aud": null}))),
        ("aud wrong", base(json!({"aud": "someone-else"}))),
        ("iss wrong", base(json!({"iss": "https://evil.test/"}))),
        ("iss missing", base(json!({"iss": null}))),
        ("sub missing", base(json!({"sub": null}))),
        ("exp missing", base(json!({"exp": null}))),
        ("exp long past", base(json!({"exp": n - 3600}))),
        ("exp past, in leeway -1", base(json!({"exp": n - l + 1}))),
        ("exp past, at leeway", base(json!({"exp": n - l}))),
        ("exp past, leeway +1", base(json!({"exp": n - l - 1}))),
        ("exp now", base(json!({"exp": n}))),
        ("nbf past", base(json!({"nbf": n - 100}))),
        ("nbf future, in leeway -1", base(json!({"nbf": n + l - 1}))),
        ("nbf future, at leeway", base(json!({"nbf": n + l}))),
        ("nbf future, leeway +1", base(json!({"nbf": n + l + 1}))),
        ("nbf far future", base(json!({"nbf": n + 3600}))),
        ("iat past, no nbf", base(json!({"iat": n - 86400}))),
        ("iat missing", base(json!({"iat": null}))),
    ]
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mutation {
    None,
    NoKid,
    WrongKey,
    TamperedPayload,
    TamperedSignature,
}

fn mutate(token: &str, m: Mutation) -> String {
    let parts: Vec<&str> = token.split('.').collect();
    assert_eq!(parts.len(), 3);
    match m {
        Mutation::TamperedPayload => {
            let mut claims: Value = serde_json::from_slice(&B64.decode(parts[1]).unwrap()).unwrap();
            claims["sub"] = "mallory".into();
            claims["role"] = "admin".into();
            format!(
                "{}.{}.{}",
                parts[0],
                B64.encode(claims.to_string()),
                parts[2]
            )
        }
        Mutation::TamperedSignature => {
            let mut sig = B64.decode(parts[2]).unwrap();
            let mid = sig.len() / 2;
            sig[mid] ^= 0x01;
            format!("{}.{}.{}", parts[0], parts[1], B64.encode(sig))
        }
        _ => token.to_string(),
    }
}

#[test]
fn jwks_from_the_test_keys_parses_whole() {
    let doc = jwks();
    let keys = parse_all(&doc);
    let kids: Vec<_> = keys.iter().map(|k| k.kid.clone().unwrap()).collect();
    assert_eq!(kids, ["rsa", "p256", "p384", "ed"]);
    assert!(keys[0].algs.contains(Alg::RS256) && keys[0].algs.contains(Alg::PS512));
    assert!(!keys[0].algs.contains(Alg::HS256) && !keys[0].algs.contains(Alg::ES256));
    assert!(keys[1].algs.contains(Alg::ES256) && !keys[1].algs.contains(Alg::ES384));
    assert!(keys[2].algs.contains(Alg::ES384) && !keys[2].algs.contains(Alg::ES256));
    assert!(keys[3].algs.contains(Alg::EdDSA) && !keys[3].algs.contains(Alg::ES256));
}

/// Every algorithm × every claim case × mutations: cubegate and jsonwebtoken agree.
#[test]
fn differential_against_jsonwebtoken() {
    let keys = store();
    let mut disagreements = Vec::new();
    let mut checked = 0;
    let (mut accepted, mut rejected) = (0, 0);
    for alg in ALL_ALGS {
        let f = family(alg);
        let main = pair(f, false);
        let other = if f == Family::P384 {
            None
        } else {
            Some(pair(f, true))
        };
        let n_cases = claim_cases(0, "").len();
        for case in 0..n_cases {
            // Mutations are expensive (RSA signing in a debug build): the time and claim
            // checks get every mutation on a few cases, the rest are signed once.
            let mutations: &[Mutation] = if case < 3 || case == 12 {
                &[
                    Mutation::None,
                    Mutation::NoKid,
                    Mutation::WrongKey,
                    Mutation::TamperedPayload,
                    Mutation::TamperedSignature,
                ]
            } else {
                &[Mutation::None]
            };
            for &m in mutations {
                let signer = match (m, &other) {
                    (Mutation::WrongKey, Some(o)) => o,
                    (Mutation::WrongKey, None) => continue,
                    _ => &main,
                };
                let kid = if m == Mutation::NoKid { None } else { main.kid };
                // jsonwebtoken reads the clock itself: retry (bounded) until the second
                // did not change around its check, so both judge the same `now`.
                // The oracle reads the clock itself, somewhere in [t0, t1]. Our verdict is
                // taken at both ends: when they agree, the oracle's must be the same (the
                // checks are monotonic in time); when they differ, the case straddled a
                // second and is tried again. A loaded machine only makes this retry more.
                let mut verdicts = None;
                for _ in 0..50 {
                    let t0 = unix_now();
                    let (name, claims) = claim_cases(t0, iss_for(alg)).swap_remove(case);
                    let token = mutate(&sign(alg, kid, &claims, &signer.enc), m);
                    let theirs = oracle(&token, alg, &main.dec);
                    let t1 = unix_now();
                    let ours = cubegate(&token, &keys, t0);
                    if t1 != t0 && cubegate(&token, &keys, t1).is_ok() != ours.is_ok() {
                        continue;
                    }
                    verdicts = Some((name, claims, theirs, ours));
                    break;
                }
                let (name, claims, theirs, ours) = verdicts.expect("the clock kept ticking");
                checked += 1;
                if theirs.is_ok() {
                    accepted += 1;
                } else {
                    rejected += 1;
                }
                if theirs.is_ok() != ours.is_ok() {
                    disagreements.push(format!(
                        "{alg:?} / {name} / {m:?}: jsonwebtoken {theirs:?}, cubegate {:?}\n    claims {claims}",
                        ours.as_ref().map(|c| c.sub())
                    ));
                }
                if case == 0 && m == Mutation::None {
                    let c = ours.unwrap_or_else(|e| panic!("{alg:?}: good token refused: {e}"));
                    assert_eq!(c.sub(), "user-1");
                }
            }
        }
    }
    assert!(
        disagreements.is_empty(),
        "{} of {checked} verdicts differ:\n{}",
        disagreements.len(),
        disagreements.join("\n")
    );
    // The loop must have exercised both verdicts.
    assert!(
        accepted > 50 && rejected > 100,
        "{accepted} accepted, {rejected} rejected"
    );
}

/// What a wrong key, a tampered payload and a tampered signature are refused for.
#[test]
fn signature_failures_name_the_signature() {
    let keys = store();
    let now = unix_now();
    for alg in ALL_ALGS {
        let f = family(alg);
        let main = pair(f, false);
        let claims = claim_cases(now, iss_for(alg)).swap_remove(0).1;
        let good = sign(alg, main.kid, &claims, &main.enc);
        assert!(cubegate(&good, &keys, now).is_ok(), "{alg:?}");
        for m in [Mutation::TamperedPayload, Mutation::TamperedSignature] {
            let t = mutate(&good, m);
            assert_eq!(
                cubegate(&t, &keys, now).unwrap_err(),
                TokenError::BadSignature,
                "{alg:?} {m:?}"
            );
        }
        if f != Family::P384 {
            let other = pair(f, true);
            for kid in [main.kid, None] {
                let t = sign(alg, kid, &claims, &other.enc);
                assert_eq!(
                    cubegate(&t, &keys, now).unwrap_err(),
                    TokenError::BadSignature,
                    "{alg:?} signed by another key of the same type, kid {kid:?}"
                );
            }
        }
    }
}

/// `want` matches `got`: the same variant; for `Malformed`, `got`'s reason contains
/// `want`'s.
fn same_error(got: &TokenError, want: &TokenError) -> bool {
    match (got, want) {
        (TokenError::Malformed(g), TokenError::Malformed(w)) => g.contains(w),
        _ => got == want,
    }
}

struct Hostile {
    cases: Vec<(String, String, TokenError)>,
}

impl Hostile {
    fn new() -> Hostile {
        Hostile { cases: Vec::new() }
    }
    fn add(&mut self, name: impl Into<String>, token: impl Into<String>, want: TokenError) {
        self.cases.push((name.into(), token.into(), want));
    }
    fn check(self, keys: &KeyStore, now: u64) {
        let mut wrong = Vec::new();
        for (name, token, want) in &self.cases {
            let got = cubegate(token, keys, now);
            match &got {
                Err(e) if same_error(e, want) => {}
                _ => wrong.push(format!(
                    "{name}: want {want:?}, got {:?}",
                    got.as_ref().map(|c| c.sub())
                )),
            }
        }
        assert!(
            wrong.is_empty(),
            "{} of {} hostile cases:\n{}",
            wrong.len(),
            self.cases.len(),
            wrong.join("\n")
        );
    }
}

fn good_claims(now: u64, iss: &str) -> Value {
    json!({"iss": iss, "sub": "user-1", "aud": AUD, "iat": now, "exp": now + 600})
}

fn with(mut v: Value, extra: Value) -> Value {
    for (k, x) in extra.as_object().unwrap() {
        if x.is_null() {
            v.as_object_mut().unwrap().remove(k);
        } else {
            v[k] = x.clone();
        }
    }
    v
}

#[test]
fn hostile_algorithms_and_keys() {
    let keys = store();
    let now = unix_now();
    let claims = good_claims(now, ISS);
    let payload = claims.to_string();
    let rsa = pair(Family::Rsa, false);
    let p256 = pair(Family::P256, false);
    let ed = pair(Family::Ed, false);
    let mut h = Hostile::new();

    // Controls: the same claims, properly signed, pass.
    for (alg, p) in [
        (Algorithm::RS256, &rsa),
        (Algorithm::ES256, &p256),
        (Algorithm::EdDSA, &ed),
    ] {
        let t = sign(alg, p.kid, &claims, &p.enc);
        assert!(cubegate(&t, &keys, now).is_ok(), "control {alg:?}");
    }

    // alg none, in any spelling, with and without a signature.
    for alg in ["none", "None", "nOnE", "NONE"] {
        for kid in ["", r#","kid":"rsa""#] {
            let input = format!(
                "{}.{}",
                B64.encode(format!(r#"{{"alg":"{alg}"{kid}}}"#)),
                B64.encode(&payload)
            );
            h.add(
                format!("alg {alg} {kid}, empty signature"),
                format!("{input}."),
                TokenError::UnsupportedAlg,
            );
            h.add(
                format!("alg {alg} {kid}, junk signature"),
                format!("{input}.{}", B64.encode("sig")),
                TokenError::UnsupportedAlg,
            );
        }
    }
    for alg in ["hs256", "RS1", "ES512", "PS256 ", "", "Ed25519", "ES256K"] {
        let t = sign_raw(
            Algorithm::HS256,
            &format!(r#"{{"alg":"{alg}"}}"#),
            &payload,
            &EncodingKey::from_secret(HS_SECRET),
        );
        h.add(format!("alg {alg:?}"), t, TokenError::UnsupportedAlg);
    }

    // Algorithm confusion: HS256 with the RSA public key (PEM text, DER, modulus) as secret.
    let rsa_pub_pem = key_file("rsa2048.pub.pem");
    let rsa_n = B64.decode(rsa.jwk["n"].as_str().unwrap()).unwrap();
    for (what, secret) in [
        ("PEM", rsa_pub_pem.clone()),
        ("DER", pem_der(&rsa_pub_pem)),
        ("modulus", rsa_n),
    ] {
        let k = EncodingKey::from_secret(&secret);
        for alg in [Algorithm::HS256, Algorithm::HS384, Algorithm::HS512] {
            h.add(
                format!("{alg:?} with the RSA public key {what} as secret, kid rsa"),
                sign(alg, Some("rsa"), &claims, &k),
                TokenError::AlgNotAllowed,
            );
            h.add(
                format!("{alg:?} with the RSA public key {what} as secret, no kid"),
                sign(alg, None, &claims, &k),
                TokenError::AlgNotAllowed,
            );
        }
    }
    let ec_pub = EncodingKey::from_secret(&key_file("ec-p256.pub.pem"));
    h.add(
        "HS256 with the EC public key as secret",
        sign(Algorithm::HS256, Some("p256"), &claims, &ec_pub),
        TokenError::AlgNotAllowed,
    );
    let ed_pub = EncodingKey::from_secret(&key_file("ed25519.pub.pem"));
    h.add(
        "HS256 with the Ed25519 public key as secret",
        sign(Algorithm::HS256, Some("ed"), &claims, &ed_pub),
        TokenError::AlgNotAllowed,
    );
    // The other way round: an RSA token claiming to come from the HMAC issuer.
    h.add(
        "RS256 token for the HMAC issuer",
        sign(Algorithm::RS256, None, &good_claims(now, ISS_HS), &rsa.enc),
        TokenError::AlgNotAllowed,
    );

    // kid tricks.
    h.add(
        "kid matching no key",
        sign(Algorithm::RS256, Some("nope"), &claims, &rsa.enc),
        TokenError::UnknownKey,
    );
    h.add(
        "empty kid",
        sign(Algorithm::RS256, Some(""), &claims, &rsa.enc),
        TokenError::UnknownKey,
    );
    h.add(
        "kid of the EC key, RS256 header",
        sign(Algorithm::RS256, Some("p256"), &claims, &rsa.enc),
        TokenError::AlgNotAllowed,
    );
    h.add(
        "kid of the Ed25519 key, ES256 header",
        sign(Algorithm::ES256, Some("ed"), &claims, &p256.enc),
        TokenError::AlgNotAllowed,
    );
    h.add(
        "kid of the P-384 key, ES256 token",
        sign(Algorithm::ES256, Some("p384"), &claims, &p256.enc),
        TokenError::AlgNotAllowed,
    );
    h.add(
        "kid of the RSA key, EdDSA token",
        sign(Algorithm::EdDSA, Some("rsa"), &claims, &ed.enc),
        TokenError::AlgNotAllowed,
    );
    h.add(
        "kid as a number",
        sign_raw(
            Algorithm::RS256,
            r#"{"alg":"RS256","kid":1}"#,
            &payload,
            &rsa.enc,
        ),
        TokenError::Malformed("header"),
    );
    // A header that embeds the attacker's own key (jwk) must not be used to verify.
    let attacker = pair(Family::Rsa, true);
    let embedded = format!(r#"{{"alg":"RS256","kid":"rsa","jwk":{}}}"#, attacker.jwk);
    h.add(
        "embedded jwk header",
        sign_raw(Algorithm::RS256, &embedded, &payload, &attacker.enc),
        TokenError::BadSignature,
    );
    h.add(
        "jku header",
        sign_raw(
            Algorithm::RS256,
            r#"{"alg":"RS256","kid":"rsa","jku":"http://127.0.0.1:1/jwks"}"#,
            &payload,
            &attacker.enc,
        ),
        TokenError::BadSignature,
    );

    // Signatures from another key of the same type.
    let other_ed = pair(Family::Ed, true);
    h.add(
        "EdDSA by another key, kid ed",
        sign(Algorithm::EdDSA, Some("ed"), &claims, &other_ed.enc),
        TokenError::BadSignature,
    );
    let other_p256 = pair(Family::P256, true);
    h.add(
        "ES256 by another key, kid p256",
        sign(Algorithm::ES256, Some("p256"), &claims, &other_p256.enc),
        TokenError::BadSignature,
    );
    h.add(
        "PS256 by another key, kid rsa",
        sign(Algorithm::PS256, Some("rsa"), &claims, &attacker.enc),
        TokenError::BadSignature,
    );
    h.add(
        "HS256 with another secret",
        sign(
            Algorithm::HS256,
            None,
            &good_claims(now, ISS_HS),
            &EncodingKey::from_secret(HS_OTHER),
        ),
        TokenError::BadSignature,
    );

    // An issuer nobody trusts.
    h.add(
        "unknown issuer",
        sign(
            Algorithm::RS256,
            Some("rsa"),
            &with(claims.clone(), json!({"iss": "https://evil.test/"})),
            &rsa.enc,
        ),
        TokenError::UnknownIssuer,
    );
    // API-key shaped bearer values.
    h.add(
        "unknown API key",
        "cg_0123456789abcdef",
        TokenError::UnknownApiKey,
    );
    h.check(&keys, now);
}

/// A JWK whose `alg` is RS256 verifies RS256 only, not PS256 (or RS512) with the same key.
#[test]
fn jwk_alg_pins_the_algorithm() {
    let mut doc = jwks();
    doc["keys"][0]["alg"] = "RS256".into();
    let keys = store_from(&doc);
    let now = unix_now();
    let claims = good_claims(now, ISS);
    let rsa = pair(Family::Rsa, false);
    assert!(cubegate(
        &sign(Algorithm::RS256, Some("rsa"), &claims, &rsa.enc),
        &keys,
        now
    )
    .is_ok());
    let mut h = Hostile::new();
    for alg in [
        Algorithm::PS256,
        Algorithm::RS512,
        Algorithm::PS512,
        Algorithm::RS384,
    ] {
        h.add(
            format!("{alg:?} against an RS256 JWK"),
            sign(alg, Some("rsa"), &claims, &rsa.enc),
            TokenError::AlgNotAllowed,
        );
        h.add(
            format!("{alg:?} against an RS256 JWK, no kid"),
            sign(alg, None, &claims, &rsa.enc),
            TokenError::AlgNotAllowed,
        );
    }
    h.check(&keys, now);
}

#[test]
fn hostile_encodings_and_sizes() {
    let keys = store();
    let now = unix_now();
    let claims = good_claims(now, ISS);
    let payload = claims.to_string();
    let rsa = pair(Family::Rsa, false);
    let p256 = pair(Family::P256, false);
    let good = sign(Algorithm::RS256, Some("rsa"), &claims, &rsa.enc);
    assert!(cubegate(&good, &keys, now).is_ok());
    let parts: Vec<&str> = good.split('.').collect();
    let (h64, p64, s64) = (parts[0], parts[1], parts[2]);
    let mut h = Hostile::new();

    // Truncation.
    h.add("empty", "", TokenError::Malformed("compact"));
    h.add("dots only", "..", TokenError::Malformed("header"));
    h.add("header only", h64, TokenError::Malformed("compact"));
    h.add(
        "no signature part",
        format!("{h64}.{p64}"),
        TokenError::Malformed("compact"),
    );
    h.add(
        "truncated in the payload",
        &good[..h64.len() + 1 + p64.len() / 2],
        TokenError::Malformed("compact"),
    );
    h.add(
        "empty signature",
        format!("{h64}.{p64}."),
        TokenError::BadSignature,
    );
    assert_eq!(s64.len(), 342, "RS256 over 2048 bits");
    h.add(
        "signature cut by 1 char (impossible length)",
        &good[..good.len() - 1],
        TokenError::Malformed("signature"),
    );
    h.add(
        "signature cut by 2 chars",
        &good[..good.len() - 2],
        TokenError::BadSignature,
    );
    // Cuts to a length of 4k characters decode (to a short signature) without stray bits.
    h.add(
        "signature cut by 6 chars",
        &good[..good.len() - 6],
        TokenError::BadSignature,
    );
    h.add(
        "signature cut to 172 chars",
        &good[..good.len() - 170],
        TokenError::BadSignature,
    );
    h.add(
        "four parts",
        format!("{good}.{s64}"),
        TokenError::Malformed("compact"),
    );
    h.add(
        "JWE-like five parts",
        format!("{h64}.{p64}.{s64}.{s64}.{s64}"),
        TokenError::Malformed("compact"),
    );

    // Padding, stray bytes, whitespace, the standard alphabet.
    // The signature (256 bytes) needs "==" padding in standard base64.
    h.add(
        "padded signature",
        format!("{good}=="),
        TokenError::Malformed("signature"),
    );
    h.add(
        "signature with one =",
        format!("{good}="),
        TokenError::Malformed("signature"),
    );
    let padded_header = |json: &str| {
        let std = STANDARD.encode(json);
        assert!(std.ends_with('='), "{json} must need padding");
        std.replace('+', "-").replace('/', "_")
    };
    let hdr = r#"{"alg":"RS256","kid":"rsa"}"#;
    // 28 bytes: base64 with "==" padding.
    let hdr_pad = r#"{"alg":"RS256","kid":"rsa" }"#;
    let t = sign_raw(Algorithm::RS256, hdr_pad, &payload, &rsa.enc);
    assert!(
        cubegate(&t, &keys, now).is_ok(),
        "control for the padded header"
    );
    let input = format!("{}.{}", padded_header(hdr_pad), B64.encode(&payload));
    let sig = jsonwebtoken::crypto::sign(input.as_bytes(), &rsa.enc, Algorithm::RS256).unwrap();
    h.add(
        "padded header (validly signed over the padded text)",
        format!("{input}.{sig}"),
        TokenError::Malformed("header"),
    );
    let mut pl = payload.clone();
    while !STANDARD.encode(&pl).ends_with('=') {
        pl.insert(1, ' ');
    }
    let input = format!(
        "{}.{}",
        B64.encode(hdr),
        STANDARD.encode(&pl).replace('+', "-").replace('/', "_")
    );
    let sig = jsonwebtoken::crypto::sign(input.as_bytes(), &rsa.enc, Algorithm::RS256).unwrap();
    h.add(
        "padded payload (validly signed)",
        format!("{input}.{sig}"),
        TokenError::Malformed("payload"),
    );
    for (name, t) in [
        (
            "space inside the payload",
            format!("{h64}.{} {}.{s64}", &p64[..10], &p64[10..]),
        ),
        ("leading space", format!(" {good}")),
        ("trailing newline", format!("{good}\n")),
        ("trailing CRLF", format!("{good}\r\n")),
        (
            "tab in the header",
            format!("{}\t{}.{p64}.{s64}", &h64[..4], &h64[4..]),
        ),
        (
            "NUL in the signature",
            format!("{h64}.{p64}.{}\0{}", &s64[..100], &s64[100..]),
        ),
        ("non-ASCII byte", format!("{h64}.{p64}.{}é", &s64[..340])),
    ] {
        let want = if name.contains("header") || name == "leading space" {
            TokenError::Malformed("header")
        } else if name.contains("payload") {
            TokenError::Malformed("payload")
        } else {
            TokenError::Malformed("signature")
        };
        h.add(name, t, want);
    }
    // The standard alphabet: a payload whose encoding has '-' or '_' re-spelled with '+'/'/'.
    let pl = (0..256)
        .map(|i| with(claims.clone(), json!({"x": "?>".repeat(i)})).to_string())
        .find(|pl| B64.encode(pl).contains(['-', '_']))
        .expect("some payload encodes with - or _");
    let input = format!("{h64}.{}", STANDARD.encode(&pl).trim_end_matches('='));
    let sig = jsonwebtoken::crypto::sign(input.as_bytes(), &rsa.enc, Algorithm::RS256).unwrap();
    h.add(
        "standard base64 alphabet in the payload (validly signed)",
        format!("{input}.{sig}"),
        TokenError::Malformed("payload"),
    );

    // Non-canonical trailing bits: the last character of a 256-byte RS256 signature carries
    // 4 unused bits; an ES256 signature (64 bytes) too.
    let with_trailing_bits = |t: &str| {
        let (rest, last) = t.split_at(t.len() - 1);
        let alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let idx = alphabet
            .iter()
            .position(|&c| c == last.as_bytes()[0])
            .unwrap();
        assert_eq!(
            idx & 0x0f,
            0,
            "canonical encodings leave the unused bits zero"
        );
        format!("{rest}{}", alphabet[idx | 0x01] as char)
    };
    h.add(
        "RS256 signature with non-zero trailing bits",
        with_trailing_bits(&good),
        TokenError::Malformed("signature"),
    );
    let es = sign(Algorithm::ES256, Some("p256"), &claims, &p256.enc);
    assert!(cubegate(&es, &keys, now).is_ok());
    assert_eq!(es.rsplit('.').next().unwrap().len(), 86);
    h.add(
        "ES256 signature with non-zero trailing bits",
        with_trailing_bits(&es),
        TokenError::Malformed("signature"),
    );

    // Sizes.
    let big_header = format!(
        r#"{{"alg":"RS256","kid":"rsa","x":"{}"}}"#,
        "a".repeat(2100)
    );
    h.add(
        "header > 2 KiB",
        sign_raw(Algorithm::RS256, &big_header, &payload, &rsa.enc),
        TokenError::TooLarge,
    );
    let big = with(claims.clone(), json!({"pad": "a".repeat(MAX_TOKEN_BYTES)}));
    h.add(
        "token > 16 KiB",
        sign(Algorithm::RS256, Some("rsa"), &big, &rsa.enc),
        TokenError::TooLarge,
    );
    h.add(
        "16 KiB of junk",
        "a".repeat(MAX_TOKEN_BYTES + 1),
        TokenError::TooLarge,
    );
    // Just under the limit is fine.
    let room = MAX_TOKEN_BYTES - good.len() - 64;
    let fits = with(claims.clone(), json!({"pad": "a".repeat(room * 3 / 4)}));
    let t = sign(Algorithm::RS256, Some("rsa"), &fits, &rsa.enc);
    assert!(t.len() <= MAX_TOKEN_BYTES, "{}", t.len());
    assert!(
        cubegate(&t, &keys, now).is_ok(),
        "a token just under 16 KiB is accepted"
    );

    // Deeply nested JSON: no stack overflow, a Malformed verdict (serde_json's depth limit).
    for depth in [200, 1000, 5000] {
        let nested = format!(
            r#"{{"iss":"{ISS}","sub":"u","aud":"{AUD}","exp":{},"x":{}{}}}"#,
            now + 600,
            "[".repeat(depth),
            "]".repeat(depth)
        );
        let t = sign_raw(Algorithm::RS256, hdr, &nested, &rsa.enc);
        assert!(
            t.len() <= MAX_TOKEN_BYTES,
            "depth {depth}: {} bytes",
            t.len()
        );
        h.add(
            format!("payload nested {depth} deep"),
            t,
            TokenError::Malformed("payload"),
        );
    }
    // 10,000 levels do not fit in 16 KiB: refused for size before any parsing.
    let nested = format!(r#"{{"x":{}{}}}"#, "[".repeat(10_000), "]".repeat(10_000));
    h.add(
        "payload nested 10,000 deep",
        sign_raw(Algorithm::RS256, hdr, &nested, &rsa.enc),
        TokenError::TooLarge,
    );
    // Unsigned, so only the parser sees it: 10,000 levels of objects.
    let nested = format!("{}1{}", r#"{"a":"#.repeat(10_000), "}".repeat(10_000));
    h.add(
        "unsigned payload nested 10,000 deep",
        format!("{h64}.{}.{s64}", B64.encode(nested)),
        TokenError::TooLarge,
    );
    let nested_header = format!(
        r#"{{"alg":"RS256","x":{}{}}}"#,
        "[".repeat(700),
        "]".repeat(700)
    );
    h.add(
        "header nested 700 deep",
        sign_raw(Algorithm::RS256, &nested_header, &payload, &rsa.enc),
        TokenError::Malformed("header"),
    );

    // Not JSON objects.
    h.add(
        "payload is an array",
        sign_raw(Algorithm::RS256, hdr, "[1,2]", &rsa.enc),
        TokenError::Malformed("payload"),
    );
    h.add(
        "payload is not JSON",
        sign_raw(Algorithm::RS256, hdr, "hello", &rsa.enc),
        TokenError::Malformed("payload"),
    );
    h.add(
        "payload with trailing garbage",
        sign_raw(Algorithm::RS256, hdr, &format!("{payload}x"), &rsa.enc),
        TokenError::Malformed("payload"),
    );
    h.add(
        "header is an array",
        sign_raw(Algorithm::RS256, r#"["RS256"]"#, &payload, &rsa.enc),
        TokenError::Malformed("header"),
    );
    h.add(
        "header without alg",
        sign_raw(Algorithm::RS256, r#"{"kid":"rsa"}"#, &payload, &rsa.enc),
        TokenError::Malformed("header"),
    );
    h.add(
        "alg is null",
        sign_raw(Algorithm::RS256, r#"{"alg":null}"#, &payload, &rsa.enc),
        TokenError::Malformed("header"),
    );
    h.check(&keys, now);
}

#[test]
fn hostile_json_tricks() {
    let keys = store();
    let now = unix_now();
    let rsa = pair(Family::Rsa, false);
    let hs = EncodingKey::from_secret(HS_SECRET);
    let hdr = r#"{"alg":"RS256","kid":"rsa"}"#;
    let exp = now + 600;
    let mut h = Hostile::new();
    let body = format!(r#""iss":"{ISS}","aud":"{AUD}","exp":{exp}"#);
    let control = sign_raw(
        Algorithm::RS256,
        hdr,
        &format!(r#"{{{body},"sub":"a"}}"#),
        &rsa.enc,
    );
    assert!(cubegate(&control, &keys, now).is_ok());
    h.add(
        "duplicate sub",
        sign_raw(
            Algorithm::RS256,
            hdr,
            &format!(r#"{{{body},"sub":"a","sub":"admin"}}"#),
            &rsa.enc,
        ),
        TokenError::Malformed("duplicate"),
    );
    h.add(
        "duplicate exp",
        sign_raw(
            Algorithm::RS256,
            hdr,
            &format!(r#"{{{body},"sub":"a","exp":1}}"#),
            &rsa.enc,
        ),
        TokenError::Malformed("duplicate"),
    );
    h.add(
        "duplicate iss",
        sign_raw(
            Algorithm::RS256,
            hdr,
            &format!(r#"{{"iss":"https://evil.test/",{body},"sub":"a"}}"#),
            &rsa.enc,
        ),
        TokenError::Malformed("duplicate"),
    );
    h.add(
        "duplicate role",
        sign_raw(
            Algorithm::RS256,
            hdr,
            &format!(r#"{{{body},"sub":"a","role":"user","role":"admin"}}"#),
            &rsa.enc,
        ),
        TokenError::Malformed("duplicate"),
    );
    // The same name spelled with an escape is still the same name.
    h.add(
        "duplicate sub via a \\u escape",
        sign_raw(
            Algorithm::RS256,
            hdr,
            &format!(r#"{{{body},"sub":"a","s\u0075b":"admin"}}"#),
            &rsa.enc,
        ),
        TokenError::Malformed("duplicate"),
    );
    h.add(
        "duplicate alg in the header",
        sign_raw(
            Algorithm::RS256,
            r#"{"alg":"RS256","kid":"rsa","alg":"none"}"#,
            &format!(r#"{{{body},"sub":"a"}}"#),
            &rsa.enc,
        ),
        TokenError::Malformed("header"),
    );
    h.add(
        "duplicate kid in the header",
        sign_raw(
            Algorithm::RS256,
            r#"{"alg":"RS256","kid":"rsa","kid":"p256"}"#,
            &format!(r#"{{{body},"sub":"a"}}"#),
            &rsa.enc,
        ),
        TokenError::Malformed("header"),
    );
    for crit in [r#"["exp"]"#, r#"["b64"]"#, "[]", "null"] {
        let header = format!(r#"{{"alg":"RS256","kid":"rsa","crit":{crit}}}"#);
        let want = if crit == "null" {
            // `"crit": null` deserializes as absent; cubegate accepts it (RFC 7515 says crit
            // must be a non-empty array, so refusing would be fine too).
            None
        } else {
            Some(TokenError::Malformed("crit"))
        };
        let t = sign_raw(
            Algorithm::RS256,
            &header,
            &format!(r#"{{{body},"sub":"a"}}"#),
            &rsa.enc,
        );
        match want {
            Some(w) => h.add(format!("crit {crit}"), t, w),
            None => {
                let _ = cubegate(&t, &keys, now);
            }
        }
    }
    let hs_body = format!(r#""iss":"{ISS_HS}","aud":"{AUD}","exp":{exp}"#);
    h.add(
        "HS256 duplicate sub",
        sign_raw(
            Algorithm::HS256,
            r#"{"alg":"HS256"}"#,
            &format!(r#"{{{hs_body},"sub":"a","sub":"b"}}"#),
            &hs,
        ),
        TokenError::Malformed("duplicate"),
    );
    h.check(&keys, now);
}

#[test]
fn hostile_claims() {
    let keys = store();
    let now = unix_now();
    let n = now as i64;
    let rsa = pair(Family::Rsa, false);
    let ed = pair(Family::Ed, false);
    let good = good_claims(now, ISS);
    let mut h = Hostile::new();
    let rs = |c: Value| sign(Algorithm::RS256, Some("rsa"), &c, &rsa.enc);
    let eds = |c: Value| sign(Algorithm::EdDSA, Some("ed"), &c, &ed.enc);
    let hss = |c: Value| {
        sign(
            Algorithm::HS256,
            None,
            &c,
            &EncodingKey::from_secret(HS_SECRET),
        )
    };
    let leeway = LEEWAY as i64;
    for (signer, label) in [(&rs as &dyn Fn(Value) -> String, "RS256"), (&eds, "EdDSA")] {
        let t = |extra: Value| signer(with(good.clone(), extra));
        h.add(
            format!("{label} expired an hour ago"),
            t(json!({"exp": n - 3600})),
            TokenError::Expired,
        );
        h.add(
            format!("{label} expired leeway+1 ago"),
            t(json!({"exp": n - leeway - 1})),
            TokenError::Expired,
        );
        h.add(
            format!("{label} exp 0"),
            t(json!({"exp": 0})),
            TokenError::Expired,
        );
        h.add(
            format!("{label} exp negative"),
            t(json!({"exp": -1})),
            TokenError::Expired,
        );
        h.add(
            format!("{label} nbf leeway+1 ahead"),
            t(json!({"nbf": n + leeway + 1})),
            TokenError::NotYetValid,
        );
        h.add(
            format!("{label} nbf a day ahead"),
            t(json!({"nbf": n + 86400})),
            TokenError::NotYetValid,
        );
        h.add(
            format!("{label} iat leeway+1 ahead"),
            t(json!({"iat": n + leeway + 1})),
            TokenError::IssuedInFuture,
        );
        h.add(
            format!("{label} iat a year ahead"),
            t(json!({"iat": n + 31_536_000})),
            TokenError::IssuedInFuture,
        );
        h.add(
            format!("{label} no exp"),
            t(json!({"exp": null})),
            TokenError::MissingExp,
        );
        h.add(
            format!("{label} exp as a string"),
            t(json!({"exp": (n + 600).to_string()})),
            TokenError::Malformed("time claim"),
        );
        h.add(
            format!("{label} nbf as a string"),
            t(json!({"nbf": "0"})),
            TokenError::Malformed("time claim"),
        );
        h.add(
            format!("{label} iat as a bool"),
            t(json!({"iat": true})),
            TokenError::Malformed("time claim"),
        );
        h.add(
            format!("{label} no iss"),
            t(json!({"iss": null})),
            TokenError::WrongIssuer,
        );
        h.add(
            format!("{label} iss as an array"),
            t(json!({"iss": [ISS]})),
            TokenError::WrongIssuer,
        );
        h.add(
            format!("{label} iss with a trailing space"),
            t(json!({"iss": format!("{ISS} ")})),
            TokenError::UnknownIssuer,
        );
        h.add(
            format!("{label} iss differs in case"),
            t(json!({"iss": ISS.to_uppercase()})),
            TokenError::UnknownIssuer,
        );
        h.add(
            format!("{label} wrong aud"),
            t(json!({"aud": "someone-else"})),
            TokenError::WrongAudience,
        );
        h.add(
            format!("{label} aud list without ours"),
            t(json!({"aud": ["a", "b"]})),
            TokenError::WrongAudience,
        );
        h.add(
            format!("{label} aud missing"),
            t(json!({"aud": null})),
            TokenError::WrongAudience,
        );
        h.add(
            format!("{label} aud as a number"),
            t(json!({"aud": 1})),
            TokenError::WrongAudience,
        );
        h.add(
            format!("{label} aud nested list"),
            t(json!({"aud": [[AUD]]})),
            TokenError::WrongAudience,
        );
        h.add(
            format!("{label} aud prefix"),
            t(json!({"aud": "cubegat"})),
            TokenError::WrongAudience,
        );
        h.add(
            format!("{label} no sub"),
            t(json!({"sub": null})),
            TokenError::MissingSub,
        );
        h.add(
            format!("{label} sub with CRLF"),
            t(json!({"sub": "user\r\nX-Admin: 1"})),
            TokenError::Malformed("sub"),
        );
        h.add(
            format!("{label} sub with LF"),
            t(json!({"sub": "user\nx"})),
            TokenError::Malformed("sub"),
        );
        h.add(
            format!("{label} sub with CR"),
            t(json!({"sub": "user\rx"})),
            TokenError::Malformed("sub"),
        );
        h.add(
            format!("{label} sub with NUL"),
            t(json!({"sub": "user\u{0}"})),
            TokenError::Malformed("sub"),
        );
        h.add(
            format!("{label} sub with DEL"),
            t(json!({"sub": "user\u{7f}"})),
            TokenError::Malformed("sub"),
        );
        h.add(
            format!("{label} sub non-ASCII"),
            t(json!({"sub": "usér"})),
            TokenError::Malformed("sub"),
        );
        h.add(
            format!("{label} sub empty"),
            t(json!({"sub": ""})),
            TokenError::Malformed("sub"),
        );
        h.add(
            format!("{label} sub 257 chars"),
            t(json!({"sub": "u".repeat(257)})),
            TokenError::Malformed("sub"),
        );
        h.add(
            format!("{label} sub a number"),
            t(json!({"sub": 42})),
            TokenError::Malformed("sub"),
        );
        h.add(
            format!("{label} refresh token"),
            t(json!({"type": "refresh"})),
            TokenError::WrongType,
        );
        h.add(
            format!("{label} domains a number"),
            t(json!({"domains": 3})),
            TokenError::Malformed("domains"),
        );
        h.add(
            format!("{label} domains list of numbers"),
            t(json!({"domains": ["d1", 2]})),
            TokenError::Malformed("domains"),
        );
    }
    h.add(
        "HS256 expired",
        hss(with(good_claims(now, ISS_HS), json!({"exp": n - 3600}))),
        TokenError::Expired,
    );
    h.add(
        "HS256 refresh token",
        hss(with(good_claims(now, ISS_HS), json!({"type": "refresh"}))),
        TokenError::WrongType,
    );
    h.add(
        "HS256 wrong aud",
        hss(with(good_claims(now, ISS_HS), json!({"aud": "x"}))),
        TokenError::WrongAudience,
    );
    h.check(&keys, now);

    // The edges that must still pass.
    let ok = |c: Value| cubegate(&rs(c), &keys, now);
    for (name, extra) in [
        ("exp leeway-1 ago", json!({"exp": n - leeway + 1})),
        ("exp exactly leeway ago", json!({"exp": n - leeway})),
        ("nbf leeway-1 ahead", json!({"nbf": n + leeway - 1})),
        ("nbf exactly leeway ahead", json!({"nbf": n + leeway})),
        ("iat leeway-1 ahead", json!({"iat": n + leeway - 1})),
        ("iat exactly leeway ahead", json!({"iat": n + leeway})),
        ("exp fractional", json!({"exp": n as f64 + 600.5})),
        ("sub 256 chars", json!({"sub": "u".repeat(256)})),
        ("access token type", json!({"type": "access"})),
        ("aud list with ours", json!({"aud": ["x", AUD]})),
        ("domains a single string", json!({"domains": "d1"})),
    ] {
        let c = with(good.clone(), extra);
        assert!(
            ok(c.clone()).is_ok(),
            "{name}: {:?}\n{c}",
            ok(c.clone()).err()
        );
    }
    // An issuer configured with require_exp = false takes a token without exp, but still
    // refuses an expired one.
    let noexp = with(good.clone(), json!({"iss": ISS_NO_EXP, "exp": null}));
    assert!(ok(noexp.clone()).is_ok());
    assert_eq!(
        ok(with(noexp, json!({"exp": n - 3600}))).unwrap_err(),
        TokenError::Expired
    );
}

fn ids(list: &[&str]) -> Vec<DomainId> {
    list.iter().map(|d| DomainId::from(*d)).collect()
}

#[test]
fn verified_claims_carry_identity_domains_and_role() {
    let keys = store();
    let now = unix_now();
    let ed = pair(Family::Ed, false);
    let c = with(
        good_claims(now, ISS),
        json!({"sub": "alice", "domains": ["d1", "d2"], "role": "admin"}),
    );
    let v = cubegate(&sign(Algorithm::EdDSA, Some("ed"), &c, &ed.enc), &keys, now).unwrap();
    assert_eq!(v.sub(), "alice");
    assert_eq!(v.issuer(), Some(0));
    assert_eq!(v.domains(), Some(&ids(&["d1", "d2"])[..]));
    assert_eq!(v.role(), Role::Admin);
    assert_eq!(v.exp(), Some((now + 600) as f64));
    let c = with(good_claims(now, ISS), json!({"role": "user"}));
    let v = cubegate(&sign(Algorithm::EdDSA, Some("ed"), &c, &ed.enc), &keys, now).unwrap();
    assert_eq!(v.domains(), None);
    assert_eq!(v.role(), Role::User);

    // Namespaced custom claims.
    let rules = ClaimRules {
        leeway_s: 30.0,
        namespace: "https://cube.example/".into(),
        domains_claim: "domains".into(),
        claim_headers: Vec::new(),
    };
    let c = with(
        good_claims(now, ISS),
        json!({"https://cube.example/domains": ["d9"], "https://cube.example/role": "admin"}),
    );
    let t = sign(Algorithm::EdDSA, Some("ed"), &c, &ed.enc);
    let v = verify_token(t.as_bytes(), &keys, &rules, now as f64).unwrap();
    assert_eq!(v.domains(), Some(&ids(&["d9"])[..]));
    assert_eq!(v.role(), Role::Admin);
    // Without the namespace configured, the namespaced claims mean nothing.
    let v = cubegate(&t, &keys, now).unwrap();
    assert_eq!(v.domains(), None);
    assert_eq!(v.role(), Role::User);
    // Another namespace's claims are not ours.
    let c = with(
        good_claims(now, ISS),
        json!({"https://evil.example/domains": ["d9"], "https://evil.example/role": "admin"}),
    );
    let t = sign(Algorithm::EdDSA, Some("ed"), &c, &ed.enc);
    let v = verify_token(t.as_bytes(), &keys, &rules, now as f64).unwrap();
    assert_eq!(v.domains(), None);
    assert_eq!(v.role(), Role::User);
    // A custom domains claim name.
    let rules = ClaimRules {
        leeway_s: 30.0,
        namespace: String::new(),
        domains_claim: "tenants".into(),
        claim_headers: Vec::new(),
    };
    let c = with(
        good_claims(now, ISS),
        json!({"tenants": ["t1"], "domains": ["d1"]}),
    );
    let t = sign(Algorithm::EdDSA, Some("ed"), &c, &ed.enc);
    let v = verify_token(t.as_bytes(), &keys, &rules, now as f64).unwrap();
    assert_eq!(v.domains(), Some(&ids(&["t1"])[..]));
}

/// A token signed with the shared secret that carries a `kid` header (many HS issuers set
/// one): the HS secret from `hs_secret_env` has no kid, so it verifies whatever kid is named.
#[test]
fn hs_token_with_a_kid() {
    let keys = store();
    let now = unix_now();
    let t = sign(
        Algorithm::HS256,
        Some("k1"),
        &good_claims(now, ISS_HS),
        &EncodingKey::from_secret(HS_SECRET),
    );
    // A shared secret has no kid of its own: it verifies HS tokens whatever kid they name.
    assert!(cubegate(&t, &keys, now).is_ok());
}

/// A published key for which any signature verifies must not be usable. With the Ed25519
/// identity point (a small-order point) as public key, the "signature" R = identity,
/// S = 0 verifies for every message: whoever can put such a key into a JWKS (or a
/// misbehaving issuer) lets anyone mint tokens. `keys.rs` treats a JWKS endpoint "as
/// untrusted as a client", so such a key should be skipped (or the token refused).
#[test]
fn small_order_ed25519_key_is_not_usable() {
    let mut identity = [0u8; 32];
    identity[0] = 1;
    let doc = json!({"keys": [{"kty": "OKP", "crv": "Ed25519", "x": B64.encode(identity), "kid": "weak"}]});
    let (keys, skipped) = parse_jwks(doc.to_string().as_bytes()).unwrap();
    if keys.is_empty() {
        assert_eq!(skipped.len(), 1);
        return;
    }
    let store = KeyStore {
        issuers: vec![issuer(ISS, keys, true)],
        generation: 1,
    };
    let now = unix_now();
    let input = format!(
        "{}.{}",
        B64.encode(r#"{"alg":"EdDSA","kid":"weak"}"#),
        B64.encode(with(good_claims(now, ISS), json!({"role": "admin"})).to_string())
    );
    let mut sig = [0u8; 64];
    sig[0] = 1; // R = the identity point, S = 0
    let forged = format!("{input}.{}", B64.encode(sig));
    let verdict = cubegate(&forged, &store, now);
    assert!(
        verdict.is_err(),
        "a token with a forged signature was accepted under a small-order Ed25519 key: {:?}",
        verdict.map(|c| c.sub().to_string())
    );
}

/// An EC JWK whose point is not on the curve never verifies anything.
#[test]
fn off_curve_ec_key_verifies_nothing() {
    let p256 = pair(Family::P256, false);
    let mut jwk = p256.jwk.clone();
    let mut y = B64.decode(jwk["y"].as_str().unwrap()).unwrap();
    y[31] ^= 1;
    jwk["y"] = B64.encode(&y).into();
    let doc = json!({ "keys": [jwk] });
    let (keys, _) = parse_jwks(doc.to_string().as_bytes()).unwrap();
    let store = KeyStore {
        issuers: vec![issuer(ISS, keys, true)],
        generation: 1,
    };
    let now = unix_now();
    let t = sign(
        Algorithm::ES256,
        Some("p256"),
        &good_claims(now, ISS),
        &p256.enc,
    );
    assert!(cubegate(&t, &store, now).is_err());
}
