//! Where this box's signing keys live: PKCS#8 files under `data_dir` (one box, SQLite), or
//! the shared store (several boxes, PostgreSQL), so every box signs and verifies with the
//! same keys and a key rotated on one box is in force on all.
//!
//! In the shared store a key's private half is sealed (AES-256-GCM, ring) with a key
//! encryption key taken from the environment, never from the database: a dump of the
//! database alone cannot mint tokens. The key id is the seal's associated data, so a sealed
//! blob moved under another key id does not open. A key that does not open stops the box
//! with a message naming the variable, rather than serving with a partial key set.

use super::store::{SealedKey, Storage};
use super::tokens::{self, SigningKey};
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use ring::rand::{SecureRandom, SystemRandom};
use std::path::PathBuf;

/// Where the keys are kept.
pub enum KeyHome {
    /// `<data_dir>/keys/*.pk8`.
    Files(PathBuf),
    /// The shared store, sealed with this key.
    Store(Box<Sealer>),
}

impl KeyHome {
    /// Every key, oldest first; the first one is made when there is none.
    pub fn load_or_create(&self, store: &dyn Storage) -> Result<Vec<SigningKey>, String> {
        match self {
            KeyHome::Files(data_dir) => tokens::load_or_create_keys(data_dir),
            KeyHome::Store(sealer) => {
                let mut keys = self.load(store, sealer)?;
                if keys.is_empty() {
                    // Boxes starting together on an empty database make one first key
                    // between them.
                    let (kid, pkcs8) = tokens::generate_pkcs8()?;
                    let first = SealedKey {
                        sealed: sealer.seal(&kid, &pkcs8)?,
                        kid,
                        created_at_ns: tokens::now_ns(),
                    };
                    store
                        .insert_first_sealed_key(&first)
                        .map_err(|e| format!("cannot store the first signing key: {e}"))?;
                    keys = self.load(store, sealer)?;
                }
                Ok(keys)
            }
        }
    }

    /// Adds a new key, which signs from now on; returns where it went (for the log).
    pub fn add(&self, store: &dyn Storage) -> Result<String, String> {
        match self {
            KeyHome::Files(data_dir) => {
                tokens::create_key(&data_dir.join("keys")).map(|path| path.display().to_string())
            }
            KeyHome::Store(_) => {
                let (kid, pkcs8) = tokens::generate_pkcs8()?;
                self.store_key(store, &kid, tokens::now_ns(), &pkcs8)?;
                Ok(format!("the shared store (kid {kid})"))
            }
        }
    }

    /// Seals `pkcs8` and stores it under `kid` (a shared store only).
    pub fn store_key(
        &self,
        store: &dyn Storage,
        kid: &str,
        created_at_ns: i64,
        pkcs8: &[u8],
    ) -> Result<(), String> {
        let KeyHome::Store(sealer) = self else {
            return Err("signing keys are files here, not kept in the store".into());
        };
        let sealed = SealedKey {
            kid: kid.to_string(),
            created_at_ns,
            sealed: sealer.seal(kid, pkcs8)?,
        };
        store
            .insert_sealed_key(&sealed)
            .map_err(|e| format!("cannot store signing key {kid}: {e}"))
    }

    fn load(&self, store: &dyn Storage, sealer: &Sealer) -> Result<Vec<SigningKey>, String> {
        let sealed = store
            .sealed_keys()
            .map_err(|e| format!("cannot read the signing keys: {e}"))?;
        sealed
            .iter()
            .map(|k| {
                let pkcs8 = sealer.open(&k.kid, &k.sealed)?;
                tokens::key_from_pkcs8(&pkcs8).map_err(|e| format!("signing key {}: {e}", k.kid))
            })
            .collect()
    }
}

/// Seals and opens private keys with the key encryption key.
pub struct Sealer {
    key: LessSafeKey,
    /// The environment variable it came from, for messages.
    var: String,
}

impl Sealer {
    /// The key from environment variable `var`: 32 bytes as 64 hex digits or base64.
    pub fn from_env(var: &str) -> Result<Sealer, String> {
        let text = std::env::var(var).map_err(|_| {
            format!("management.store = \"postgres\" keeps the signing keys in the database, sealed with a 32-byte key: set it in the environment variable {var} (management.key_encryption_key_env), e.g. `openssl rand -hex 32`")
        })?;
        let bytes = parse_key(text.trim()).ok_or_else(|| {
            format!("{var}: not a 32-byte key (64 hex digits, or 32 bytes in base64)")
        })?;
        Sealer::new(&bytes, var)
    }

    fn new(bytes: &[u8], var: &str) -> Result<Sealer, String> {
        let key =
            UnboundKey::new(&AES_256_GCM, bytes).map_err(|_| format!("{var}: unusable key"))?;
        Ok(Sealer {
            key: LessSafeKey::new(key),
            var: var.to_string(),
        })
    }

    /// nonce ‖ ciphertext ‖ tag, bound to `kid`.
    fn seal(&self, kid: &str, secret: &[u8]) -> Result<Vec<u8>, String> {
        let mut nonce = [0u8; NONCE_LEN];
        SystemRandom::new()
            .fill(&mut nonce)
            .map_err(|_| "no randomness for a nonce")?;
        let mut out = secret.to_vec();
        self.key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(kid.as_bytes()),
                &mut out,
            )
            .map_err(|_| "cannot seal the signing key")?;
        let mut sealed = nonce.to_vec();
        sealed.extend_from_slice(&out);
        Ok(sealed)
    }

    fn open(&self, kid: &str, sealed: &[u8]) -> Result<Vec<u8>, String> {
        let refused = || {
            format!(
                "signing key {kid} does not open with the key in {}: it is not the key the database's signing keys were sealed with (or the row was altered)",
                self.var
            )
        };
        if sealed.len() < NONCE_LEN {
            return Err(refused());
        }
        let (nonce, body) = sealed.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| refused())?;
        let mut body = body.to_vec();
        let plain = self
            .key
            .open_in_place(nonce, Aad::from(kid.as_bytes()), &mut body)
            .map_err(|_| refused())?;
        Ok(plain.to_vec())
    }
}

/// 64 hex digits, or base64 (standard or URL-safe, padded or not) of 32 bytes.
fn parse_key(text: &str) -> Option<Vec<u8>> {
    let hex = || {
        (text.len() == 64 && text.bytes().all(|b| b.is_ascii_hexdigit())).then(|| {
            (0..32)
                .filter_map(|i| u8::from_str_radix(&text[2 * i..2 * i + 2], 16).ok())
                .collect::<Vec<u8>>()
        })
    };
    let b64 = || {
        STANDARD
            .decode(text)
            .or_else(|_| URL_SAFE_NO_PAD.decode(text.trim_end_matches('=')))
            .ok()
    };
    hex().or_else(b64).filter(|k| k.len() == 32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_keys_open_only_with_their_key_and_kid() {
        let a = Sealer::new(&[7u8; 32], "A").unwrap();
        let b = Sealer::new(&[8u8; 32], "B").unwrap();
        let sealed = a.seal("k1", b"secret pkcs8").unwrap();
        assert_eq!(a.open("k1", &sealed).unwrap(), b"secret pkcs8");
        assert!(b.open("k1", &sealed).unwrap_err().contains("B"));
        assert!(a.open("k2", &sealed).is_err());
        let mut altered = sealed.clone();
        *altered.last_mut().unwrap() ^= 1;
        assert!(a.open("k1", &altered).is_err());
        assert!(a.open("k1", &sealed[..5]).is_err());
        // Two seals of the same secret differ (fresh nonces).
        assert_ne!(sealed, a.seal("k1", b"secret pkcs8").unwrap());
    }

    #[test]
    fn key_encryption_keys_in_hex_or_base64() {
        let hex = "00".repeat(31) + "ff";
        assert_eq!(parse_key(&hex).unwrap()[31], 0xff);
        let b64 = STANDARD.encode([9u8; 32]);
        assert_eq!(parse_key(&b64).unwrap(), vec![9u8; 32]);
        assert_eq!(
            parse_key(&URL_SAFE_NO_PAD.encode([9u8; 32])).unwrap(),
            vec![9u8; 32]
        );
        assert!(parse_key("abcd").is_none());
        assert!(parse_key(&"zz".repeat(32)).is_none());
        assert!(parse_key(&STANDARD.encode([1u8; 16])).is_none());
    }
}
