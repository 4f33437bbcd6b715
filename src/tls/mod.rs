//! TLS: the listeners' certificates and the rustls configurations, for clients (HTTPS on
//! `proxy.listen` and on `management.listen`) and for `https://` backends.
//!
//! The certificate lives in a [`CertStore`] that rustls asks for it on every handshake, so
//! SIGHUP swaps it in place: handshakes after the swap get the new one, connections
//! already up keep the session they have. A file that cannot be read, holds no key, or
//! holds a key that does not sign for the certificate is refused with the key's name and
//! the path, at startup and at reload (a refused reload keeps the running certificate).
//! Both listeners load and reload the same way; [`Listener`] says whose files they are.
//! rustls uses its `ring` provider, the same crypto as token verification.

pub mod gen_cert;
pub mod pinned;
pub mod stream;

use arc_swap::ArcSwap;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Certificate and key files are small; anything bigger is not one.
const MAX_PEM_BYTES: u64 = 1024 * 1024;

/// The protocols cubegate speaks, announced with ALPN.
const ALPN_HTTP11: &[u8] = b"http/1.1";

pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The answer a TLS port gives to a client that speaks plain HTTP to it (status 400), on
/// the public and the management listener alike.
pub const PLAIN_HTTP_BODY: &[u8] = br#"{"error":{"message":"this port speaks HTTPS: use https://","type":"invalid_request_error","code":"plain_http_on_https_port"}}"#;

/// Whose certificate: which listener's files (errors name its configuration keys).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listener {
    /// `[proxy] tls_cert` / `tls_key`: HTTPS on the public listener.
    Public,
    /// `[management] tls_cert` / `tls_key`: HTTPS on the management listener.
    Management,
}

impl Listener {
    fn cert_key(self) -> &'static str {
        match self {
            Listener::Public => "proxy.tls_cert",
            Listener::Management => "management.tls_cert",
        }
    }

    fn key_key(self) -> &'static str {
        match self {
            Listener::Public => "proxy.tls_key",
            Listener::Management => "management.tls_key",
        }
    }

    /// The paths of this listener's certificate and key, when HTTPS is on.
    pub fn files(self, config: &crate::config::Config) -> Option<(PathBuf, PathBuf)> {
        let (cert, key) = match self {
            Listener::Public => (&config.proxy.tls_cert, &config.proxy.tls_key),
            Listener::Management => (&config.management.tls_cert, &config.management.tls_key),
        };
        match (cert, key) {
            (Some(c), Some(k)) => Some((c.clone(), k.clone())),
            _ => None,
        }
    }
}

/// A problem with a TLS file: the configuration key it came from and what is wrong.
#[derive(Debug)]
pub struct TlsFileError {
    pub key: &'static str,
    pub message: String,
}

impl std::fmt::Display for TlsFileError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.key, self.message)
    }
}

fn file_error(key: &'static str, message: String) -> TlsFileError {
    TlsFileError { key, message }
}

fn read_pem(key: &'static str, path: &Path) -> Result<Vec<u8>, TlsFileError> {
    use std::io::Read;
    let file = std::fs::File::open(path)
        .map_err(|e| file_error(key, format!("cannot read {}: {e}", path.display())))?;
    let mut bytes = Vec::new();
    file.take(MAX_PEM_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| file_error(key, format!("cannot read {}: {e}", path.display())))?;
    if bytes.len() as u64 > MAX_PEM_BYTES {
        return Err(file_error(
            key,
            format!(
                "{} is larger than 1 MiB; it is not a PEM file",
                path.display()
            ),
        ));
    }
    Ok(bytes)
}

/// Every CERTIFICATE block of a PEM file, in order.
pub fn load_certs(
    key: &'static str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, TlsFileError> {
    let pem = read_pem(key, path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_error(key, format!("{}: bad PEM: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(file_error(
            key,
            format!("{} holds no PEM CERTIFICATE block", path.display()),
        ));
    }
    Ok(certs)
}

/// Loads a certificate chain and its private key and checks that they belong together.
pub fn load_certified_key(
    listener: Listener,
    cert: &Path,
    key: &Path,
) -> Result<CertifiedKey, TlsFileError> {
    let chain = load_certs(listener.cert_key(), cert)?;
    let pem = read_pem(listener.key_key(), key)?;
    let private = PrivateKeyDer::from_pem_slice(&pem).map_err(|e| {
        file_error(
            listener.key_key(),
            format!(
                "{} holds no usable PEM private key (PKCS#8, PKCS#1 or SEC1): {e}",
                key.display()
            ),
        )
    })?;
    let signing = provider()
        .key_provider
        .load_private_key(private)
        .map_err(|e| {
            file_error(
                listener.key_key(),
                format!("{}: unsupported private key: {e}", key.display()),
            )
        })?;
    let certified = CertifiedKey::new(chain, signing);
    certified.keys_match().map_err(|e| {
        file_error(
            listener.key_key(),
            format!(
                "the key in {} does not belong to the certificate in {} ({e})",
                key.display(),
                cert.display()
            ),
        )
    })?;
    Ok(certified)
}

/// A listener's certificate, swappable while serving.
pub struct CertStore {
    current: ArcSwap<CertifiedKey>,
    listener: Listener,
}

impl std::fmt::Debug for CertStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CertStore")
    }
}

impl CertStore {
    pub fn load(listener: Listener, cert: &Path, key: &Path) -> Result<CertStore, TlsFileError> {
        Ok(CertStore {
            current: ArcSwap::from_pointee(load_certified_key(listener, cert, key)?),
            listener,
        })
    }

    /// Loads the files again; on any problem the running certificate stays.
    pub fn reload(&self, cert: &Path, key: &Path) -> Result<(), TlsFileError> {
        let fresh = load_certified_key(self.listener, cert, key)?;
        self.current.store(Arc::new(fresh));
        Ok(())
    }

    /// The certificate handshakes get now.
    pub fn current(&self) -> Arc<CertifiedKey> {
        self.current.load_full()
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

/// TLS 1.2 and 1.3, ALPN `http/1.1`, no client certificates.
pub fn server_config(store: Arc<CertStore>) -> Arc<ServerConfig> {
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .expect("the ring provider supports TLS 1.2 and 1.3")
        .with_no_client_auth()
        .with_cert_resolver(store);
    config.alpn_protocols = vec![ALPN_HTTP11.to_vec()];
    Arc::new(config)
}

/// How cubegate checks `https://` backends: the CA bundle of `proxy.backend_ca_file`, or
/// the system's trust store when it is not set.
pub fn backend_config(ca_file: Option<&Path>) -> Result<Arc<ClientConfig>, TlsFileError> {
    let mut roots = RootCertStore::empty();
    match ca_file {
        Some(path) => {
            for cert in load_certs("proxy.backend_ca_file", path)? {
                roots.add(cert).map_err(|e| {
                    file_error("proxy.backend_ca_file", format!("{}: {e}", path.display()))
                })?;
            }
        }
        None => {
            for cert in rustls_native_certs::load_native_certs().certs {
                let _ = roots.add(cert);
            }
            if roots.is_empty() {
                return Err(file_error(
                    "proxy.backend_ca_file",
                    "https:// backends need trusted CAs: the system store has none; set backend_ca_file".into(),
                ));
            }
        }
    }
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .expect("the ring provider supports TLS 1.2 and 1.3")
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![ALPN_HTTP11.to_vec()];
    Ok(Arc::new(config))
}

impl From<TlsFileError> for crate::config::ConfigError {
    fn from(e: TlsFileError) -> Self {
        crate::config::ConfigError {
            key: e.key.to_string(),
            problem: e.message,
        }
    }
}
