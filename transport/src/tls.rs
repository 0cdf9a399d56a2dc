//! rustls configurations for both sides: TLS 1.3 only, ring only, mutual authentication,
//! certificates taken from the [`SvidSource`] at every handshake, and no 0-RTT.

use std::sync::{Arc, OnceLock};

use rustls::client::ResolvesClientCert;
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, ServerConfig, SignatureScheme};

use crate::identity::{PeerPolicy, SvidSource};
use crate::verify::{SpiffeClientVerifier, SpiffeServerVerifier};

/// ALPN for HTTP/3.
pub(crate) const ALPN_H3: &[u8] = b"h3";
/// ALPN for HTTP/2.
pub(crate) const ALPN_H2: &[u8] = b"h2";
/// The TLS server name clients send; SPIFFE verification ignores it.
pub(crate) const SERVER_NAME: &str = "fedmesh.invalid";

/// The one crypto provider of the process: ring.
pub(crate) fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    Arc::clone(PROVIDER.get_or_init(|| Arc::new(rustls::crypto::ring::default_provider())))
}

/// Hands out whatever SVID the source holds at handshake time, so rotation reaches new
/// connections without rebuilding the configuration.
#[derive(Debug)]
struct CurrentSvid(Arc<dyn SvidSource>);

impl ResolvesServerCert for CurrentSvid {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.svid().certified_key())
    }
}

impl ResolvesClientCert for CurrentSvid {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(self.0.svid().certified_key())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

pub(crate) fn server_config(
    source: &Arc<dyn SvidSource>,
    alpn: &[u8],
) -> Result<ServerConfig, rustls::Error> {
    let verifier = SpiffeClientVerifier::new(Arc::clone(source), provider());
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(Arc::new(verifier))
        .with_cert_resolver(Arc::new(CurrentSvid(Arc::clone(source))));
    config.alpn_protocols = vec![alpn.to_vec()];
    // 0-RTT data could be replayed; nothing here accepts it.
    config.max_early_data_size = 0;
    Ok(config)
}

pub(crate) fn client_config(
    source: &Arc<dyn SvidSource>,
    expected: PeerPolicy,
    alpn: &[u8],
) -> Result<ClientConfig, rustls::Error> {
    let verifier = SpiffeServerVerifier::new(Arc::clone(source), expected, provider());
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_cert_resolver(Arc::new(CurrentSvid(Arc::clone(source))));
    config.alpn_protocols = vec![alpn.to_vec()];
    config.enable_early_data = false;
    Ok(config)
}
