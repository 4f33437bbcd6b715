//! The data plane's hop to an HTTPS management listener: a TLS client that trusts exactly
//! the certificate the management listener serves.
//!
//! The public port forwards `/users/*`, `/domains/*`, `/keys/*` and `/metrics` to the
//! management listener over loopback. When that listener speaks HTTPS the hop does too:
//! there is then no plain-HTTP door into the management API at all, and a hand-over keeps
//! working as before (the hop goes to the one shared management socket, whichever process
//! accepts on it). Names and CAs mean nothing on this hop (the certificate names the
//! public host, the hop dials an IP, the certificate may be self-signed), so the check is
//! a pin: the server's end-entity certificate must be, byte for byte, the one in the
//! management [`CertStore`] right now — the same store SIGHUP reloads, so the pin follows
//! a renewed certificate with no step of its own. The handshake signatures are checked as
//! usual, so only the holder of that certificate's key can answer. (In a hand-over, a
//! successor that loaded a different certificate — files changed without a SIGHUP — fails
//! the old process's draining hops with a 502; the same files, the usual case, do not.)

use super::{provider, CertStore, ALPN_HTTP11};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, Error, SignatureScheme};
use std::sync::Arc;

/// Trusts the management listener's current certificate and nothing else.
struct PinnedToStore {
    store: Arc<CertStore>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl std::fmt::Debug for PinnedToStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PinnedToStore")
    }
}

impl ServerCertVerifier for PinnedToStore {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        let current = self.store.current();
        match current.cert.first() {
            Some(pinned) if pinned.as_ref() == end_entity.as_ref() => {
                Ok(ServerCertVerified::assertion())
            }
            _ => Err(Error::General(
                "the management listener's certificate is not the one this process loaded".into(),
            )),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// The client configuration of the hop: TLS 1.3 (the hop is in-process, both ends are
/// cubegate), ALPN `http/1.1`, the certificate pinned to `store`.
pub fn client_config(store: Arc<CertStore>) -> Arc<ClientConfig> {
    let provider = provider();
    let verifier = PinnedToStore {
        store,
        algorithms: provider.signature_verification_algorithms,
    };
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("the ring provider supports TLS 1.3")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    config.alpn_protocols = vec![ALPN_HTTP11.to_vec()];
    Arc::new(config)
}
