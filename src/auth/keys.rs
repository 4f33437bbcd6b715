//! Verification keys: JWK / JWKS parsing, and the per-issuer key sets tokens are verified with.
//!
//! A JWK becomes a [`VerifyingKey`] only if it is unambiguous: its type and curve fix the
//! algorithm family, and an `alg` member, when present, narrows it to one algorithm. Keys
//! meant for encryption (`use: enc`), symmetric keys in a published set, and unknown types
//! are skipped with a reason (a JWKS often carries keys for other purposes). Sizes are
//! bounded: a JWKS endpoint is as untrusted as a client.
//!
//! [`KeyStore::from_config`] builds the store every token is verified with: this box's own
//! issuer first (its keys come from the management plane), then each `[[auth.trusted]]`
//! issuer with its HS secret or inline JWKS (JWKS URLs start empty; the fetcher fills them).

use super::jws::{Alg, AlgSet, KeyMaterial, VerifyingKey};
use crate::config::{Config, ConfigError};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use serde::Deserialize;

pub const MAX_JWKS_BYTES: usize = 256 * 1024;
pub const MAX_KEYS: usize = 64;

#[derive(Debug, Deserialize)]
struct Jwk {
    kty: String,
    kid: Option<String>,
    alg: Option<String>,
    #[serde(rename = "use")]
    use_: Option<String>,
    key_ops: Option<Vec<String>>,
    crv: Option<String>,
    n: Option<String>,
    e: Option<String>,
    x: Option<String>,
    y: Option<String>,
    /// Not a registered JWK member, but what Cube's identity providers send: the key's
    /// expiry, in Unix seconds.
    exp: Option<f64>,
    /// The key's certificate chain (standard base64 DER, the key's own first).
    x5c: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
struct Jwks {
    keys: Vec<serde_json::Value>,
}

/// Parses a JWKS document. Returns the usable keys and, for each skipped key, why.
pub fn parse_jwks(json: &[u8]) -> Result<(Vec<VerifyingKey>, Vec<String>), String> {
    if json.len() > MAX_JWKS_BYTES {
        return Err(format!("JWKS larger than {MAX_JWKS_BYTES} bytes"));
    }
    let set: Jwks = serde_json::from_slice(json)
        .map_err(|e| format!("not a JWKS (a JSON object with a \"keys\" array): {e}"))?;
    if set.keys.len() > MAX_KEYS {
        return Err(format!("JWKS has more than {MAX_KEYS} keys"));
    }
    let mut keys = Vec::new();
    let mut skipped = Vec::new();
    for (i, raw) in set.keys.into_iter().enumerate() {
        match serde_json::from_value::<Jwk>(raw)
            .map_err(|e| format!("invalid JWK: {e}"))
            .and_then(jwk_to_key)
        {
            Ok(k) => keys.push(k),
            Err(why) => skipped.push(format!("key {i}: {why}")),
        }
    }
    Ok((keys, skipped))
}

fn jwk_to_key(jwk: Jwk) -> Result<VerifyingKey, String> {
    if jwk.use_.as_deref().is_some_and(|u| u != "sig") {
        return Err("not a signature key (\"use\" is not \"sig\")".into());
    }
    if jwk
        .key_ops
        .as_ref()
        .is_some_and(|ops| !ops.iter().any(|o| o == "verify"))
    {
        return Err("\"key_ops\" does not include \"verify\"".into());
    }
    let named = match jwk.alg.as_deref() {
        None => None,
        Some(a) => Some(Alg::from_name(a).ok_or_else(|| format!("unsupported alg {a:?}"))?),
    };
    // The algorithms the key type allows; `alg`, when given, must be one of them.
    let (family, material): (&[Alg], KeyMaterial) = match jwk.kty.as_str() {
        "RSA" => {
            let n = strip_zeros(b64(&jwk.n, "n")?);
            let e = strip_zeros(b64(&jwk.e, "e")?);
            if n.len() < 256 {
                return Err("RSA modulus shorter than 2048 bits".into());
            }
            (
                &[
                    Alg::RS256,
                    Alg::RS384,
                    Alg::RS512,
                    Alg::PS256,
                    Alg::PS384,
                    Alg::PS512,
                ],
                KeyMaterial::Rsa { n, e },
            )
        }
        "EC" => {
            let (alg, size) = match jwk.crv.as_deref() {
                Some("P-256") => (Alg::ES256, 32),
                Some("P-384") => (Alg::ES384, 48),
                other => return Err(format!("unsupported EC curve {other:?}")),
            };
            let x = b64(&jwk.x, "x")?;
            let y = b64(&jwk.y, "y")?;
            if x.len() != size || y.len() != size {
                return Err("EC coordinates of the wrong length".into());
            }
            let mut point = Vec::with_capacity(1 + 2 * size);
            point.push(4);
            point.extend_from_slice(&x);
            point.extend_from_slice(&y);
            let family: &[Alg] = if alg == Alg::ES256 {
                &[Alg::ES256]
            } else {
                &[Alg::ES384]
            };
            (family, KeyMaterial::Ec { point })
        }
        "OKP" => {
            if jwk.crv.as_deref() != Some("Ed25519") {
                return Err(format!("unsupported OKP curve {:?}", jwk.crv));
            }
            let x = b64(&jwk.x, "x")?;
            if x.len() != 32 {
                return Err("Ed25519 key of the wrong length".into());
            }
            if has_small_order(&x) {
                // Such a "key" verifies forged signatures for any message.
                return Err("Ed25519 key is a small-order point".into());
            }
            (&[Alg::EdDSA], KeyMaterial::Ed25519 { public: x })
        }
        "oct" => return Err("symmetric keys do not belong in a JWKS; use hs_secret_env".into()),
        other => return Err(format!("unsupported key type {other:?}")),
    };
    let algs = match named {
        Some(a) if family.contains(&a) => AlgSet::of(&[a]),
        Some(a) => {
            return Err(format!(
                "alg {} does not fit key type {}",
                a.name(),
                jwk.kty
            ))
        }
        None => AlgSet::of(family),
    };
    let not_after = match (jwk.exp, certificate_not_after(&jwk.x5c)?) {
        (Some(exp), _) if !exp.is_finite() => return Err("\"exp\" is not a number".into()),
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    Ok(VerifyingKey {
        kid: jwk.kid,
        algs,
        material,
        not_after,
    })
}

/// The `notAfter` of a JWK's own certificate (the first of `x5c`), in Unix seconds. A
/// certificate that cannot be read makes the key unusable: its expiry is unknown.
fn certificate_not_after(x5c: &Option<Vec<String>>) -> Result<Option<f64>, String> {
    let Some(first) = x5c.as_ref().and_then(|chain| chain.first()) else {
        return Ok(None);
    };
    let der = base64::engine::general_purpose::STANDARD
        .decode(first)
        .map_err(|_| "\"x5c\" is not base64".to_string())?;
    let (_, cert) = x509_parser::parse_x509_certificate(&der)
        .map_err(|e| format!("\"x5c\" certificate unreadable: {e}"))?;
    Ok(Some(cert.validity().not_after.timestamp() as f64))
}

/// Ed25519 points of small order (and their non-canonical encodings), as libsodium lists
/// them; compared with the sign bit masked, which also covers the negated points.
fn has_small_order(point: &[u8]) -> bool {
    const fn ff(first: u8) -> [u8; 32] {
        let mut p = [0xff; 32];
        p[0] = first;
        p[31] = 0x7f;
        p
    }
    const BLOCKLIST: [[u8; 32]; 7] = [
        [0; 32],
        {
            let mut p = [0; 32];
            p[0] = 1;
            p
        },
        [
            0x26, 0xe8, 0x95, 0x8f, 0xc2, 0xb2, 0x27, 0xb0, 0x45, 0xc3, 0xf4, 0x89, 0xf2, 0xef,
            0x98, 0xf0, 0xd5, 0xdf, 0xac, 0x05, 0xd3, 0xc6, 0x33, 0x39, 0xb1, 0x38, 0x02, 0x88,
            0x6d, 0x53, 0xfc, 0x05,
        ],
        [
            0xc7, 0x17, 0x6a, 0x70, 0x3d, 0x4d, 0xd8, 0x4f, 0xba, 0x3c, 0x0b, 0x76, 0x0d, 0x10,
            0x67, 0x0f, 0x2a, 0x20, 0x53, 0xfa, 0x2c, 0x39, 0xcc, 0xc6, 0x4e, 0xc7, 0xfd, 0x77,
            0x92, 0xac, 0x03, 0x7a,
        ],
        ff(0xec),
        ff(0xed),
        ff(0xee),
    ];
    point.len() == 32
        && BLOCKLIST
            .iter()
            .any(|b| b[..31] == point[..31] && b[31] & 0x7f == point[31] & 0x7f)
}

fn b64(v: &Option<String>, name: &str) -> Result<Vec<u8>, String> {
    let v = v.as_deref().ok_or_else(|| format!("missing \"{name}\""))?;
    URL_SAFE_NO_PAD
        .decode(v)
        .map_err(|_| format!("\"{name}\" is not unpadded base64url"))
}

fn strip_zeros(mut v: Vec<u8>) -> Vec<u8> {
    let zeros = v.iter().take_while(|&&b| b == 0).count();
    v.drain(..zeros.min(v.len().saturating_sub(1)));
    v
}

/// The keys of one issuer whose tokens are accepted.
#[derive(Debug, Clone)]
pub struct IssuerKeys {
    pub issuer: String,
    /// Empty = `aud` is not checked.
    pub audiences: Vec<String>,
    pub keys: Vec<VerifyingKey>,
    /// Where the keys come from when they are fetched (`None` = static).
    pub jwks_url: Option<String>,
    pub require_exp: bool,
    /// This box's own issuer (keys from the management plane, not the config).
    pub own: bool,
}

impl IssuerKeys {
    /// The keys that may verify a token with this `kid`: the one with that id, and keys
    /// without an id (a shared secret); for a token without `kid`, every key (an issuer
    /// with one key often omits it).
    pub fn candidates<'a>(
        &'a self,
        kid: Option<&'a str>,
    ) -> impl Iterator<Item = &'a VerifyingKey> {
        self.keys
            .iter()
            .filter(move |k| kid.is_none() || k.kid.is_none() || k.kid.as_deref() == kid)
    }
}

/// Every issuer's keys, as one immutable value in the snapshot.
#[derive(Debug, Default)]
pub struct KeyStore {
    pub issuers: Vec<IssuerKeys>,
    /// Changes whenever any key changes: verified-token caches are emptied on a change.
    pub generation: u64,
}

impl KeyStore {
    /// Builds the key store from the configuration: HS secrets from the environment and
    /// inline JWKS now; JWKS URLs start empty and are filled by the fetcher.
    pub fn from_config(config: &Config, generation: u64) -> Result<KeyStore, ConfigError> {
        // This box's own issuer comes first; its keys arrive from the management plane.
        let mut issuers = vec![IssuerKeys {
            issuer: config.auth.issuer.clone(),
            audiences: Vec::new(),
            keys: Vec::new(),
            jwks_url: None,
            require_exp: true,
            own: true,
        }];
        for (i, t) in config.auth.trusted.iter().enumerate() {
            let key = |k: &str| format!("auth.trusted[{i}].{k}");
            let err = |k: &str, p: String| ConfigError {
                key: key(k),
                problem: p,
            };
            let mut keys: Vec<VerifyingKey> = Vec::new();
            if let Some(var) = &t.hs_secret_env {
                let secret = std::env::var(var).map_err(|_| {
                    err(
                        "hs_secret_env",
                        format!("environment variable {var} is not set"),
                    )
                })?;
                if secret.len() < 32 {
                    return Err(err(
                        "hs_secret_env",
                        format!("the secret in {var} is shorter than 32 bytes: too weak for HMAC"),
                    ));
                }
                keys.push(VerifyingKey::hmac(
                    None,
                    secret.as_bytes(),
                    AlgSet::of(&[Alg::HS256, Alg::HS384, Alg::HS512]),
                ));
            }
            if let Some(jwks) = &t.jwks {
                let (parsed, skipped) = parse_jwks(jwks.as_bytes()).map_err(|e| err("jwks", e))?;
                if parsed.is_empty() {
                    return Err(err(
                        "jwks",
                        format!("no usable key ({})", skipped.join("; ")),
                    ));
                }
                keys.extend(parsed);
            }
            issuers.push(IssuerKeys {
                issuer: t.issuer.clone(),
                audiences: t.audiences.clone(),
                keys,
                jwks_url: t.jwks_url.clone(),
                require_exp: t.require_exp,
                own: false,
            });
        }
        Ok(KeyStore {
            issuers,
            generation,
        })
    }

    /// A copy to modify into the next store (the caller publishes it).
    pub fn rebuilt(&self) -> KeyStore {
        KeyStore {
            issuers: self.issuers.clone(),
            generation: self.generation,
        }
    }

    /// Keeps the keys already fetched for JWKS issuers that `self` (just built from a
    /// reloaded file) still lists with the same URL, so a reload does not drop them.
    pub fn carry_fetched_keys(&mut self, old: &KeyStore) {
        for issuer in self
            .issuers
            .iter_mut()
            .filter(|i| i.jwks_url.is_some() || i.own)
        {
            if let Some(prev) = old.issuers.iter().find(|o| {
                o.issuer == issuer.issuer && o.jwks_url == issuer.jwks_url && o.own == issuer.own
            }) {
                issuer.keys = prev.keys.clone();
            }
        }
    }

    pub fn has_fetched_issuers(&self) -> bool {
        self.issuers.iter().any(|i| i.jwks_url.is_some())
    }
    pub fn issuer(&self, iss: &str) -> Option<(usize, &IssuerKeys)> {
        self.issuers
            .iter()
            .enumerate()
            .find(|(_, i)| i.issuer == iss)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jwks_parsing_skips_what_it_cannot_use() {
        let x = URL_SAFE_NO_PAD.encode([7u8; 32]);
        let doc = format!(
            r#"{{"keys":[
              {{"kty":"OKP","crv":"Ed25519","x":"{x}","kid":"a"}},
              {{"kty":"OKP","crv":"Ed25519","x":"{x}","kid":"b","use":"enc"}},
              {{"kty":"oct","k":"c2VjcmV0"}},
              {{"kty":"EC","crv":"P-521","x":"{x}","y":"{x}"}},
              {{"kty":"OKP","crv":"Ed25519","x":"{x}","alg":"RS256"}},
              {{"kty":"EC","crv":"P-256","x":"{x}","y":"{x}","alg":"ES256","kid":"e"}}
            ]}}"#
        );
        let (keys, skipped) = parse_jwks(doc.as_bytes()).unwrap();
        let kids: Vec<_> = keys.iter().map(|k| k.kid.as_deref().unwrap()).collect();
        assert_eq!(kids, ["a", "e"]);
        assert_eq!(skipped.len(), 4, "{skipped:?}");
        assert!(keys[1].algs.contains(Alg::ES256) && !keys[1].algs.contains(Alg::ES384));
        assert!(parse_jwks(b"[]").is_err());
        assert!(parse_jwks(&vec![b' '; MAX_JWKS_BYTES + 1]).is_err());
    }

    /// A DER certificate valid until `not_after` (year, month, day), base64.
    fn certificate(not_after: (i32, u8, u8)) -> String {
        let mut params = rcgen::CertificateParams::new(vec!["idp.test".to_string()]).unwrap();
        params.not_before = rcgen::date_time_ymd(2020, 1, 1);
        params.not_after = rcgen::date_time_ymd(not_after.0, not_after.1, not_after.2);
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        base64::engine::general_purpose::STANDARD.encode(cert.der())
    }

    #[test]
    fn key_expiry_from_exp_and_certificate() {
        let x = URL_SAFE_NO_PAD.encode([7u8; 32]);
        let cert = certificate((2031, 1, 1));
        let doc = format!(
            r#"{{"keys":[
              {{"kty":"OKP","crv":"Ed25519","x":"{x}","kid":"exp","exp":1900000000}},
              {{"kty":"OKP","crv":"Ed25519","x":"{x}","kid":"cert","x5c":["{cert}"]}},
              {{"kty":"OKP","crv":"Ed25519","x":"{x}","kid":"both","exp":1900000000,"x5c":["{cert}"]}},
              {{"kty":"OKP","crv":"Ed25519","x":"{x}","kid":"none"}},
              {{"kty":"OKP","crv":"Ed25519","x":"{x}","kid":"bad-cert","x5c":["bm90IGEgY2VydA=="]}},
              {{"kty":"OKP","crv":"Ed25519","x":"{x}","kid":"bad-exp","exp":"soon"}}
            ]}}"#
        );
        let (keys, skipped) = parse_jwks(doc.as_bytes()).unwrap();
        let expiry: Vec<_> = keys
            .iter()
            .map(|k| (k.kid.as_deref().unwrap(), k.not_after))
            .collect();
        // 2031-01-01T00:00:00Z
        let cert_end = 1_924_992_000.0;
        assert_eq!(
            expiry,
            [
                ("exp", Some(1_900_000_000.0)),
                ("cert", Some(cert_end)),
                ("both", Some(1_900_000_000.0)),
                ("none", None)
            ]
        );
        assert_eq!(skipped.len(), 2, "{skipped:?}");
        assert!(skipped[0].contains("certificate unreadable"), "{skipped:?}");
        assert!(keys[0].expired(1_900_000_001.0) && !keys[0].expired(1_899_999_999.0));
        assert!(!keys[3].expired(f64::MAX));
    }
}
