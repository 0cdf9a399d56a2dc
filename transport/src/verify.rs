//! rustls certificate verifiers that check SPIFFE identities.
//!
//! The chain is checked by rustls' webpki verification against the current trust bundle;
//! then the leaf must carry exactly one URI SAN that is a SPIFFE ID of our trust domain.
//! Servers have no DNS names in their SVIDs, so the client checks the server's SPIFFE ID
//! against a [`PeerPolicy`] instead of the TLS server name.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::ParsedCertificate;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, OtherError, SignatureScheme,
};

use crate::identity::{PeerCertError, PeerIdentity, PeerPolicy, SvidSource};

/// Verifies client SVIDs on the server side; a client certificate is mandatory.
pub(crate) struct SpiffeClientVerifier {
    source: Arc<dyn SvidSource>,
    provider: Arc<CryptoProvider>,
}

impl SpiffeClientVerifier {
    pub(crate) fn new(source: Arc<dyn SvidSource>, provider: Arc<CryptoProvider>) -> Self {
        Self { source, provider }
    }
}

impl fmt::Debug for SpiffeClientVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SpiffeClientVerifier")
            .finish_non_exhaustive()
    }
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // Hints are optional and the bundle can rotate under us; send none.
        &[]
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let bundle = self.source.bundle();
        bundle
            .client_verifier()
            .verify_client_cert(end_entity, intermediates, now)?;

        let peer = PeerIdentity::from_certificate(end_entity).map_err(reject)?;
        peer.check(bundle.trust_domain(), to_system_time(now))
            .map_err(reject)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Verifies the server's SVID on the client side, by SPIFFE ID rather than host name.
pub(crate) struct SpiffeServerVerifier {
    source: Arc<dyn SvidSource>,
    expected: PeerPolicy,
    provider: Arc<CryptoProvider>,
}

impl SpiffeServerVerifier {
    pub(crate) fn new(
        source: Arc<dyn SvidSource>,
        expected: PeerPolicy,
        provider: Arc<CryptoProvider>,
    ) -> Self {
        Self {
            source,
            expected,
            provider,
        }
    }
}

impl fmt::Debug for SpiffeServerVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SpiffeServerVerifier")
            .field("expected", &self.expected)
            .finish()
    }
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        // 1. The chain, validity and serverAuth usage, as webpki checks them for any server;
        //    the host name check is replaced by step 3.
        let bundle = self.source.bundle();
        let parsed = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            bundle.roots(),
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;

        // 2. Exactly one SPIFFE ID, in our trust domain.
        let peer = PeerIdentity::from_certificate(end_entity).map_err(reject)?;
        peer.check(bundle.trust_domain(), to_system_time(now))
            .map_err(reject)?;

        // 3. The identity this client expects to talk to.
        if !self.expected.allows(peer.spiffe_id()) {
            return Err(reject(PeerCertError::NotAllowed {
                id: peer.spiffe_id().to_string(),
                policy: self.expected.to_string(),
            }));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

fn reject(error: PeerCertError) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(error))))
}

fn to_system_time(now: UnixTime) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(now.as_secs())
}
