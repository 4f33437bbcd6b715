//! This box's signing keys and the tokens it issues.
//!
//! Keys are Ed25519 (ring), one PKCS#8 file each under `<data_dir>/keys/`, created with
//! mode 0600 on first start. The newest file signs; all of them verify and are published
//! in the JWKS, so a key added later rotates signing while the older one keeps verifying
//! the tokens it issued. Access and refresh tokens are compact JWS with a `kid` header and
//! the contract's claims (`iss`, `sub`, `iat`, `exp`, `jti`, `type`, `role`; refresh tokens
//! add `fam`, the rotation family).

use crate::auth::jws::{Alg, AlgSet, KeyMaterial, VerifyingKey};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use ring::rand::{SecureRandom, SystemRandom};
use ring::signature::{Ed25519KeyPair, KeyPair};
use std::io::Write;
use std::path::Path;

pub struct SigningKey {
    pub kid: String,
    pair: Ed25519KeyPair,
}

impl SigningKey {
    pub fn public(&self) -> &[u8] {
        self.pair.public_key().as_ref()
    }

    pub fn verifying_key(&self) -> VerifyingKey {
        VerifyingKey {
            not_after: None,
            kid: Some(self.kid.clone()),
            algs: AlgSet::of(&[Alg::EdDSA]),
            material: KeyMaterial::Ed25519 {
                public: self.public().to_vec(),
            },
        }
    }

    pub fn jwk(&self) -> serde_json::Value {
        serde_json::json!({
            "kty": "OKP", "crv": "Ed25519", "use": "sig", "alg": "EdDSA",
            "kid": self.kid, "x": URL_SAFE_NO_PAD.encode(self.public()),
        })
    }

    /// Signs `claims` as a compact JWS.
    pub fn sign(&self, claims: &serde_json::Value) -> String {
        let header = serde_json::json!({"alg": "EdDSA", "typ": "JWT", "kid": self.kid});
        let input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        let sig = self.pair.sign(input.as_bytes());
        format!("{input}.{}", URL_SAFE_NO_PAD.encode(sig.as_ref()))
    }
}

/// Loads every key in `<data_dir>/keys` (oldest first), creating the first one if none.
pub fn load_or_create_keys(data_dir: &Path) -> Result<Vec<SigningKey>, String> {
    let dir = data_dir.join("keys");
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    if key_paths(&dir)?.is_empty() {
        create_key(&dir)?;
    }
    key_paths(&dir)?
        .iter()
        .map(|path| {
            let bytes =
                std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
            key_from_pkcs8(&bytes).map_err(|e| format!("{}: {e}", path.display()))
        })
        .collect()
}

/// The key files of `dir`, oldest first (their names are their creation times).
fn key_paths(dir: &Path) -> Result<Vec<std::path::PathBuf>, String> {
    let mut names: Vec<_> = std::fs::read_dir(dir)
        .map_err(|e| format!("cannot read {}: {e}", dir.display()))?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "pk8"))
        .collect();
    names.sort();
    Ok(names)
}

/// Every key file under `<data_dir>/keys` as (creation time in ns, PKCS#8), oldest first.
pub fn key_files(data_dir: &Path) -> Result<Vec<(i64, Vec<u8>)>, String> {
    let dir = data_dir.join("keys");
    if !dir.exists() {
        return Ok(Vec::new());
    }
    key_paths(&dir)?
        .iter()
        .enumerate()
        .map(|(i, path)| {
            let bytes =
                std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
            let made = path
                .file_stem()
                .and_then(|s| s.to_str())
                .and_then(|s| s.parse::<i64>().ok())
                .unwrap_or(i as i64);
            Ok((made, bytes))
        })
        .collect()
}

/// A signing key from its PKCS#8 document.
pub fn key_from_pkcs8(pkcs8: &[u8]) -> Result<SigningKey, String> {
    let pair =
        Ed25519KeyPair::from_pkcs8(pkcs8).map_err(|e| format!("not an Ed25519 PKCS#8 key: {e}"))?;
    Ok(SigningKey {
        kid: kid_of(pair.public_key().as_ref()),
        pair,
    })
}

/// A new Ed25519 key: its key id and PKCS#8 document.
pub fn generate_pkcs8() -> Result<(String, Vec<u8>), String> {
    let pkcs8 = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new())
        .map_err(|_| "cannot generate a key")?;
    let key = key_from_pkcs8(pkcs8.as_ref())?;
    Ok((key.kid, pkcs8.as_ref().to_vec()))
}

/// Nanoseconds since the epoch: keys made later sort later.
pub fn now_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i64)
}

/// Writes a new key file (mode 0600) named so that it sorts after the existing ones.
pub fn create_key(dir: &Path) -> Result<std::path::PathBuf, String> {
    use std::os::unix::fs::OpenOptionsExt;
    let (_, pkcs8) = generate_pkcs8()?;
    let now = now_ns();
    let path = dir.join(format!("{now:032}.pk8"));
    // Written under a temporary name, synced, then renamed: a crash never leaves a
    // half-written key file that would stop the next start.
    let tmp = dir.join(format!("{now:032}.pk8.tmp"));
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|e| format!("cannot create {}: {e}", tmp.display()))?;
    file.write_all(pkcs8.as_ref())
        .and_then(|_| file.sync_all())
        .map_err(|e| format!("cannot write {}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, &path)
        .and_then(|_| std::fs::File::open(dir)?.sync_all())
        .map_err(|e| format!("cannot install {}: {e}", path.display()))?;
    Ok(path)
}

/// A key id derived from the public key (stable across restarts).
fn kid_of(public: &[u8]) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, public);
    URL_SAFE_NO_PAD.encode(&digest.as_ref()[..12])
}

/// A random URL-safe id (128 bits).
pub fn random_id() -> String {
    let mut bytes = [0u8; 16];
    let _ = SystemRandom::new().fill(&mut bytes);
    // UUID v4 layout, as SuperMQ ids are UUIDs.
    bytes[6] = (bytes[6] & 0x0f) | 0x40;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    let h: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_persist_and_sign() {
        let dir = std::env::temp_dir().join(format!("cubegate-keys-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let first = load_or_create_keys(&dir).unwrap();
        let again = load_or_create_keys(&dir).unwrap();
        assert_eq!(first.len(), 1);
        assert_eq!(first[0].kid, again[0].kid);
        use std::os::unix::fs::PermissionsExt;
        let file = std::fs::read_dir(dir.join("keys"))
            .unwrap()
            .next()
            .unwrap()
            .unwrap();
        assert_eq!(file.metadata().unwrap().permissions().mode() & 0o777, 0o600);
        let token = first[0].sign(&serde_json::json!({"sub": "u"}));
        let parsed = crate::auth::jws::parse(token.as_bytes()).unwrap();
        first[0]
            .verifying_key()
            .verify(parsed.alg, parsed.signing_input, &parsed.signature)
            .unwrap();
        assert_eq!(random_id().len(), 36);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
