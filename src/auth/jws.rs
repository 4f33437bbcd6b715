//! JWS compact tokens: strict parsing and signature verification with `ring`.
//!
//! The algorithm a token may use comes from the key that verifies it ([`VerifyingKey`]
//! carries the set it allows), never from the token alone: `alg: none`, an HS token against
//! an RSA or EC key (algorithm confusion) and a header whose `alg` the key does not allow
//! all fail before any cryptography runs. Parsing is strict where leniency lets two
//! implementations disagree: base64url without padding or stray bits, bounded sizes,
//! duplicate JSON member names refused, `crit` refused (no extension is understood).

use super::TokenError;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use ring::{hmac, signature};
use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::fmt;

/// Longest token accepted (header + payload + signature, encoded).
pub const MAX_TOKEN_BYTES: usize = 16 * 1024;
const MAX_HEADER_BYTES: usize = 2 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Alg {
    HS256,
    HS384,
    HS512,
    RS256,
    RS384,
    RS512,
    PS256,
    PS384,
    PS512,
    ES256,
    ES384,
    EdDSA,
}

impl Alg {
    pub const ALL: [Alg; 12] = [
        Alg::HS256,
        Alg::HS384,
        Alg::HS512,
        Alg::RS256,
        Alg::RS384,
        Alg::RS512,
        Alg::PS256,
        Alg::PS384,
        Alg::PS512,
        Alg::ES256,
        Alg::ES384,
        Alg::EdDSA,
    ];

    pub fn from_name(name: &str) -> Option<Alg> {
        Alg::ALL.into_iter().find(|a| a.name() == name)
    }

    pub fn name(self) -> &'static str {
        match self {
            Alg::HS256 => "HS256",
            Alg::HS384 => "HS384",
            Alg::HS512 => "HS512",
            Alg::RS256 => "RS256",
            Alg::RS384 => "RS384",
            Alg::RS512 => "RS512",
            Alg::PS256 => "PS256",
            Alg::PS384 => "PS384",
            Alg::PS512 => "PS512",
            Alg::ES256 => "ES256",
            Alg::ES384 => "ES384",
            Alg::EdDSA => "EdDSA",
        }
    }

    fn bit(self) -> u16 {
        1 << (self as u16)
    }
}

/// A set of algorithms, as a bit set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct AlgSet(u16);

impl AlgSet {
    pub fn of(algs: &[Alg]) -> AlgSet {
        AlgSet(algs.iter().fold(0, |m, a| m | a.bit()))
    }
    pub fn contains(self, alg: Alg) -> bool {
        self.0 & alg.bit() != 0
    }
}

#[derive(Clone)]
pub struct HmacKeys {
    sha256: hmac::Key,
    sha384: hmac::Key,
    sha512: hmac::Key,
}

/// Public key material (or an HMAC secret), ready for `ring`.
#[derive(Clone)]
pub enum KeyMaterial {
    /// One `ring` key per HMAC hash, all from the same secret.
    Hmac(Box<HmacKeys>),
    Rsa {
        n: Vec<u8>,
        e: Vec<u8>,
    },
    /// Uncompressed SEC1 point (0x04 ‖ x ‖ y).
    Ec {
        point: Vec<u8>,
    },
    Ed25519 {
        public: Vec<u8>,
    },
}

impl fmt::Debug for KeyMaterial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print secrets.
        f.write_str(match self {
            KeyMaterial::Hmac(_) => "Hmac(..)",
            KeyMaterial::Rsa { .. } => "Rsa(..)",
            KeyMaterial::Ec { .. } => "Ec(..)",
            KeyMaterial::Ed25519 { .. } => "Ed25519(..)",
        })
    }
}

#[derive(Debug, Clone)]
pub struct VerifyingKey {
    pub kid: Option<String>,
    /// What a token verified by this key may say in `alg`.
    pub algs: AlgSet,
    pub material: KeyMaterial,
    /// Unix time after which the key is not used (a JWK's `exp`, its certificate's
    /// `notAfter`).
    pub not_after: Option<f64>,
}

impl VerifyingKey {
    pub fn hmac(kid: Option<String>, secret: &[u8], algs: AlgSet) -> VerifyingKey {
        VerifyingKey {
            not_after: None,
            kid,
            algs,
            material: KeyMaterial::Hmac(Box::new(HmacKeys {
                sha256: hmac::Key::new(hmac::HMAC_SHA256, secret),
                sha384: hmac::Key::new(hmac::HMAC_SHA384, secret),
                sha512: hmac::Key::new(hmac::HMAC_SHA512, secret),
            })),
        }
    }

    /// The key's time is over.
    pub fn expired(&self, now: f64) -> bool {
        self.not_after.is_some_and(|t| now > t)
    }

    /// Checks `sig` over `input` with `alg`, which must be one this key allows.
    pub fn verify(&self, alg: Alg, input: &[u8], sig: &[u8]) -> Result<(), TokenError> {
        if !self.algs.contains(alg) {
            return Err(TokenError::AlgNotAllowed);
        }
        let ok = match (&self.material, alg) {
            (KeyMaterial::Hmac(k), Alg::HS256) => hmac::verify(&k.sha256, input, sig).is_ok(),
            (KeyMaterial::Hmac(k), Alg::HS384) => hmac::verify(&k.sha384, input, sig).is_ok(),
            (KeyMaterial::Hmac(k), Alg::HS512) => hmac::verify(&k.sha512, input, sig).is_ok(),
            (KeyMaterial::Rsa { n, e }, _) => {
                let params: &signature::RsaParameters = match alg {
                    Alg::RS256 => &signature::RSA_PKCS1_2048_8192_SHA256,
                    Alg::RS384 => &signature::RSA_PKCS1_2048_8192_SHA384,
                    Alg::RS512 => &signature::RSA_PKCS1_2048_8192_SHA512,
                    Alg::PS256 => &signature::RSA_PSS_2048_8192_SHA256,
                    Alg::PS384 => &signature::RSA_PSS_2048_8192_SHA384,
                    Alg::PS512 => &signature::RSA_PSS_2048_8192_SHA512,
                    _ => return Err(TokenError::AlgNotAllowed),
                };
                signature::RsaPublicKeyComponents { n, e }
                    .verify(params, input, sig)
                    .is_ok()
            }
            (KeyMaterial::Ec { point }, Alg::ES256) => {
                signature::UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_FIXED, point)
                    .verify(input, sig)
                    .is_ok()
            }
            (KeyMaterial::Ec { point }, Alg::ES384) => {
                signature::UnparsedPublicKey::new(&signature::ECDSA_P384_SHA384_FIXED, point)
                    .verify(input, sig)
                    .is_ok()
            }
            (KeyMaterial::Ed25519 { public }, Alg::EdDSA) => {
                signature::UnparsedPublicKey::new(&signature::ED25519, public)
                    .verify(input, sig)
                    .is_ok()
            }
            _ => return Err(TokenError::AlgNotAllowed),
        };
        if ok {
            Ok(())
        } else {
            Err(TokenError::BadSignature)
        }
    }
}

/// The protected header, as far as verification needs it.
#[derive(Debug, Deserialize)]
struct RawHeader {
    alg: String,
    kid: Option<String>,
    crit: Option<serde_json::Value>,
}

/// A compact JWS split and decoded, not yet verified.
pub struct Parsed<'t> {
    pub alg: Alg,
    pub kid: Option<String>,
    /// `header.payload`, what the signature covers.
    pub signing_input: &'t [u8],
    pub signature: Vec<u8>,
    pub payload: JsonObject,
}

pub fn parse(token: &[u8]) -> Result<Parsed<'_>, TokenError> {
    if token.len() > MAX_TOKEN_BYTES {
        return Err(TokenError::TooLarge);
    }
    let mut parts = token.split(|&b| b == b'.');
    let (Some(h), Some(p), Some(s), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(TokenError::Malformed(
            "not a compact JWS (three dot-separated parts)",
        ));
    };
    if h.len() > MAX_HEADER_BYTES * 4 / 3 + 4 {
        return Err(TokenError::TooLarge);
    }
    let header_json = b64(h, "header")?;
    let header: RawHeader = deserialize_strict(&header_json)
        .map_err(|_| TokenError::Malformed("header is not a JSON object with a string \"alg\""))?;
    if header.crit.is_some() {
        return Err(TokenError::Malformed(
            "\"crit\" header extensions are not supported",
        ));
    }
    let alg = Alg::from_name(&header.alg).ok_or(TokenError::UnsupportedAlg)?;
    let payload_json = b64(p, "payload")?;
    let payload: JsonObject =
        serde_json::from_slice(&payload_json).map_err(|e| match e.classify() {
            serde_json::error::Category::Data if e.to_string().contains("duplicate") => {
                TokenError::Malformed("duplicate claim names")
            }
            _ => TokenError::Malformed("payload is not a JSON object"),
        })?;
    let signature = b64(s, "signature")?;
    Ok(Parsed {
        alg,
        kid: header.kid,
        signing_input: &token[..h.len() + 1 + p.len()],
        signature,
        payload,
    })
}

fn b64(part: &[u8], what: &'static str) -> Result<Vec<u8>, TokenError> {
    URL_SAFE_NO_PAD.decode(part).map_err(|_| {
        TokenError::Malformed(match what {
            "header" => "header is not unpadded base64url",
            "payload" => "payload is not unpadded base64url",
            _ => "signature is not unpadded base64url",
        })
    })
}

/// The header, deserialized while refusing duplicate member names at the top level.
fn deserialize_strict<T: serde::de::DeserializeOwned>(json: &[u8]) -> Result<T, ()> {
    let object: JsonObject = serde_json::from_slice(json).map_err(|_| ())?;
    serde_json::from_value(serde_json::Value::Object(object.0.into_iter().collect()))
        .map_err(|_| ())
}

/// A JSON object whose deserialization fails on a repeated member name (serde_json's own
/// map silently keeps the last one, which is how claim-confusion attacks work).
#[derive(Debug, Default, Clone)]
pub struct JsonObject(pub BTreeMap<String, serde_json::Value>);

impl JsonObject {
    pub fn get(&self, name: &str) -> Option<&serde_json::Value> {
        self.0.get(name)
    }
}

impl<'de> Deserialize<'de> for JsonObject {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = JsonObject;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<JsonObject, A::Error> {
                let mut out = BTreeMap::new();
                while let Some((k, v)) = map.next_entry::<String, serde_json::Value>()? {
                    if out.insert(k, v).is_some() {
                        return Err(de::Error::custom("duplicate member name"));
                    }
                }
                Ok(JsonObject(out))
            }
        }
        d.deserialize_map(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enc(v: &str) -> String {
        URL_SAFE_NO_PAD.encode(v)
    }

    #[test]
    fn parses_and_refuses() {
        let good = format!(
            "{}.{}.{}",
            enc(r#"{"alg":"HS256","kid":"k"}"#),
            enc(r#"{"sub":"u"}"#),
            enc("sig")
        );
        let p = parse(good.as_bytes()).unwrap();
        assert_eq!(p.alg, Alg::HS256);
        assert_eq!(p.kid.as_deref(), Some("k"));
        let bad = [
            format!("{}.{}.", enc(r#"{"alg":"none"}"#), enc("{}")),
            format!("{}.{}", enc(r#"{"alg":"HS256"}"#), enc("{}")),
            format!("{}.{}.{}.x", enc(r#"{"alg":"HS256"}"#), enc("{}"), enc("s")),
            format!("{}=.{}.{}", enc(r#"{"alg":"HS256"}"#), enc("{}"), enc("s")),
            format!(
                "{}.{}.{}",
                enc(r#"{"alg":"HS256","alg":"none"}"#),
                enc("{}"),
                enc("s")
            ),
            format!(
                "{}.{}.{}",
                enc(r#"{"alg":"HS256"}"#),
                enc(r#"{"sub":"a","sub":"b"}"#),
                enc("s")
            ),
            format!(
                "{}.{}.{}",
                enc(r#"{"alg":"HS256","crit":["b64"]}"#),
                enc("{}"),
                enc("s")
            ),
            format!("{}.{}.{}", enc(r#"["HS256"]"#), enc("{}"), enc("s")),
            format!("{}.{}.{}", enc(r#"{"alg":"HS256"}"#), enc("[]"), enc("s")),
            format!("{}.{}.{}", enc(r#"{"alg":"HS256"}"#), "e30+", enc("s")),
            format!("{}.{}.{}", enc(r#"{"alg":"HS256"}"#), enc("{}"), "a"),
        ];
        for t in bad {
            assert!(parse(t.as_bytes()).is_err(), "{t}");
        }
        let huge = "a".repeat(MAX_TOKEN_BYTES + 1);
        assert!(matches!(parse(huge.as_bytes()), Err(TokenError::TooLarge)));
    }

    #[test]
    fn algorithm_comes_from_the_key() {
        let k = VerifyingKey::hmac(None, b"secret", AlgSet::of(&[Alg::HS256]));
        let tag = hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, b"secret"), b"a.b");
        assert!(k.verify(Alg::HS256, b"a.b", tag.as_ref()).is_ok());
        assert!(matches!(
            k.verify(Alg::HS384, b"a.b", tag.as_ref()),
            Err(TokenError::AlgNotAllowed)
        ));
        assert!(matches!(
            k.verify(Alg::HS256, b"a.c", tag.as_ref()),
            Err(TokenError::BadSignature)
        ));
        let ed = VerifyingKey {
            not_after: None,
            kid: None,
            algs: AlgSet::of(&[Alg::EdDSA]),
            material: KeyMaterial::Ed25519 {
                public: vec![0; 32],
            },
        };
        assert!(matches!(
            ed.verify(Alg::HS256, b"a.b", tag.as_ref()),
            Err(TokenError::AlgNotAllowed)
        ));
    }
}
