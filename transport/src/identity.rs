//! SPIFFE identities: our own SVID, the trust bundle, and the authenticated peer.
//!
//! An SVID is an X.509 certificate chain whose leaf carries exactly one URI SAN, the SPIFFE
//! ID (`spiffe://<trust-domain>/<path>`). The trust domain is compared in its canonical
//! lowercase form, so `spiffe://FL.example/core` and `spiffe://fl.example/core` are the same
//! identity. Peers must belong to the trust domain of our own SVID.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ring::digest::{Context, SHA256, digest};
use rustls::RootCertStore;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::ClientCertVerifier;
use rustls::sign::CertifiedKey;
use spiffe::{SpiffeId, TrustDomain, X509Svid};

use crate::tls::provider;

/// The authenticated identity of the other side of a connection.
///
/// Built only from a certificate chain that verified against the trust bundle.
#[derive(Clone, PartialEq, Eq)]
pub struct PeerIdentity {
    id: SpiffeId,
    not_after: SystemTime,
    fingerprint: [u8; 32],
}

impl PeerIdentity {
    /// Reads the SPIFFE ID and expiry from a DER leaf certificate.
    ///
    /// This does not verify the chain: callers pass only certificates a verifier accepted.
    ///
    /// # Errors
    /// [`PeerCertError`] when the certificate does not parse or does not carry exactly one
    /// URI SAN that is a valid SPIFFE ID with a path.
    pub fn from_certificate(der: &[u8]) -> Result<Self, PeerCertError> {
        let id = spiffe::cert::spiffe_id_from_der(der)?;
        if id.path().is_empty() {
            return Err(PeerCertError::NoPath { id: id.to_string() });
        }
        let (_, cert) = x509_parser::parse_x509_certificate(der)
            .map_err(|e| PeerCertError::Parse(e.to_string()))?;

        // A negative timestamp predates 1970 and is expired for any purpose here.
        let seconds = u64::try_from(cert.validity().not_after.timestamp()).unwrap_or(0);
        Ok(Self {
            id,
            not_after: UNIX_EPOCH + Duration::from_secs(seconds),
            fingerprint: sha256(der),
        })
    }

    /// The SPIFFE ID, trust domain in canonical lowercase.
    pub fn spiffe_id(&self) -> &SpiffeId {
        &self.id
    }

    /// The trust domain name, lowercase (`fl.example`).
    pub fn trust_domain(&self) -> &str {
        self.id.trust_domain_name()
    }

    /// The path of the SPIFFE ID (`/store/emea/0042`).
    pub fn path(&self) -> &str {
        self.id.path()
    }

    /// When the peer's leaf certificate stops being valid.
    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    /// SHA-256 of the peer's DER leaf certificate; tells rotated certificates apart.
    pub fn certificate_sha256(&self) -> [u8; 32] {
        self.fingerprint
    }

    /// Whether the certificate has expired at `now`.
    pub fn is_expired_at(&self, now: SystemTime) -> bool {
        now >= self.not_after
    }

    /// Checks the trust domain and the expiry against `now`.
    pub(crate) fn check(
        &self,
        trust_domain: &TrustDomain,
        now: SystemTime,
    ) -> Result<(), PeerCertError> {
        if !self.id.is_member_of(trust_domain) {
            return Err(PeerCertError::ForeignTrustDomain {
                id: self.id.to_string(),
                expected: trust_domain.to_string(),
            });
        }
        if self.is_expired_at(now) {
            return Err(PeerCertError::Expired {
                id: self.id.to_string(),
            });
        }
        Ok(())
    }
}

impl fmt::Debug for PeerIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PeerIdentity")
            .field("id", &self.id.to_string())
            .field("not_after", &self.not_after)
            .finish()
    }
}

impl fmt::Display for PeerIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.id.fmt(f)
    }
}

/// Why a peer certificate was not accepted as an identity.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PeerCertError {
    /// No URI SAN, several URI SANs, or a URI SAN that is not a SPIFFE ID.
    #[error("peer certificate has no single valid SPIFFE ID: {0}")]
    SpiffeId(#[from] spiffe::cert::error::CertificateError),
    /// The SPIFFE ID names only a trust domain; workloads need a path.
    #[error("peer SPIFFE ID {id} has no path")]
    NoPath {
        /// The SPIFFE ID found.
        id: String,
    },
    /// The certificate is not parseable X.509.
    #[error("peer certificate cannot be parsed: {0}")]
    Parse(String),
    /// The peer belongs to another trust domain.
    #[error("peer {id} is outside trust domain {expected}")]
    ForeignTrustDomain {
        /// The peer's SPIFFE ID.
        id: String,
        /// Our trust domain.
        expected: String,
    },
    /// The peer is in our trust domain but not the identity this connection expects.
    #[error("peer {id} does not match {policy}")]
    NotAllowed {
        /// The peer's SPIFFE ID.
        id: String,
        /// The expectation it failed.
        policy: String,
    },
    /// The peer's certificate has expired.
    #[error("certificate of peer {id} has expired")]
    Expired {
        /// The peer's SPIFFE ID.
        id: String,
    },
}

/// Which server identities a client accepts.
///
/// SPIFFE certificates carry no DNS names, so clients check the server's SPIFFE ID instead
/// of a host name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PeerPolicy {
    /// Any workload of our trust domain.
    AnyInTrustDomain,
    /// Exactly this SPIFFE ID.
    Exact(SpiffeId),
    /// Any SPIFFE ID of our trust domain whose path starts with this prefix (`/pop/`); for
    /// anycast, where any PoP may answer.
    PathPrefix(String),
}

impl PeerPolicy {
    /// Whether `id` satisfies the policy (the trust domain is checked separately).
    pub fn allows(&self, id: &SpiffeId) -> bool {
        match self {
            Self::AnyInTrustDomain => true,
            Self::Exact(expected) => expected == id,
            Self::PathPrefix(prefix) => id.path().starts_with(prefix.as_str()),
        }
    }
}

impl fmt::Display for PeerPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::AnyInTrustDomain => f.write_str("any workload of the trust domain"),
            Self::Exact(id) => write!(f, "exactly {id}"),
            Self::PathPrefix(prefix) => write!(f, "a path starting with {prefix}"),
        }
    }
}

/// Our own X.509 SVID: certificate chain, private key and SPIFFE ID.
pub struct Svid {
    id: SpiffeId,
    not_after: SystemTime,
    certified_key: Arc<CertifiedKey>,
}

impl Svid {
    /// Parses an SVID from a PEM certificate chain (leaf first) and a PEM PKCS#8 key.
    ///
    /// `origin` names where the bytes came from, for error messages.
    ///
    /// # Errors
    /// [`IdentityError`] when the PEM, the X509-SVID rules (one URI SAN, CA=false,
    /// digitalSignature) or the key (unsupported, or not matching the leaf) fail.
    pub fn from_pem(
        chain_pem: &[u8],
        key_pem: &[u8],
        origin: &Path,
    ) -> Result<Self, IdentityError> {
        let chain = read_certificates(chain_pem, origin)?;
        let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|source| IdentityError::Pem {
            path: origin.to_owned(),
            source,
        })?;

        // 1. The spiffe crate enforces the X509-SVID leaf and signing-certificate rules.
        let concatenated: Vec<u8> = chain.iter().flat_map(|c| c.iter().copied()).collect();
        let parsed =
            X509Svid::parse_from_der(&concatenated, key.secret_der()).map_err(|source| {
                IdentityError::InvalidSvid {
                    path: origin.to_owned(),
                    source,
                }
            })?;
        let peer = PeerIdentity::from_certificate(&chain[0]).map_err(|source| {
            IdentityError::InvalidCertificate {
                path: origin.to_owned(),
                source,
            }
        })?;

        // 2. rustls loads the key and checks it belongs to the leaf.
        let certified_key = CertifiedKey::from_der(chain, key, &provider()).map_err(|source| {
            IdentityError::Key {
                path: origin.to_owned(),
                source,
            }
        })?;
        Ok(Self {
            id: parsed.spiffe_id().clone(),
            not_after: peer.not_after,
            certified_key: Arc::new(certified_key),
        })
    }

    /// Our SPIFFE ID.
    pub fn spiffe_id(&self) -> &SpiffeId {
        &self.id
    }

    /// When our leaf certificate expires.
    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    pub(crate) fn certified_key(&self) -> Arc<CertifiedKey> {
        Arc::clone(&self.certified_key)
    }
}

impl fmt::Debug for Svid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print the key.
        f.debug_struct("Svid")
            .field("id", &self.id.to_string())
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

/// The CA certificates that sign SVIDs of one trust domain.
pub struct TrustBundle {
    trust_domain: TrustDomain,
    roots: Arc<RootCertStore>,
    client_verifier: Arc<dyn ClientCertVerifier>,
}

impl TrustBundle {
    /// Parses a PEM bundle of CA certificates for `trust_domain`.
    ///
    /// # Errors
    /// [`IdentityError`] when the PEM holds no certificate or a CA certificate is unusable.
    pub fn from_pem(
        trust_domain: TrustDomain,
        pem: &[u8],
        origin: &Path,
    ) -> Result<Self, IdentityError> {
        let mut roots = RootCertStore::empty();
        for cert in read_certificates(pem, origin)? {
            roots.add(cert).map_err(|source| IdentityError::Bundle {
                path: origin.to_owned(),
                source,
            })?;
        }
        let roots = Arc::new(roots);

        // WebPkiClientVerifier requires a client certificate unless told otherwise.
        let client_verifier =
            WebPkiClientVerifier::builder_with_provider(Arc::clone(&roots), provider())
                .build()
                .map_err(|e| IdentityError::Verifier {
                    path: origin.to_owned(),
                    reason: e.to_string(),
                })?;
        Ok(Self {
            trust_domain,
            roots,
            client_verifier,
        })
    }

    /// The trust domain whose SVIDs this bundle verifies.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    pub(crate) fn roots(&self) -> &RootCertStore {
        &self.roots
    }

    pub(crate) fn client_verifier(&self) -> &dyn ClientCertVerifier {
        self.client_verifier.as_ref()
    }
}

impl fmt::Debug for TrustBundle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TrustBundle")
            .field("trust_domain", &self.trust_domain.to_string())
            .field("roots", &self.roots.len())
            .finish()
    }
}

/// Where a process gets its current SVID and trust bundle.
///
/// Every new TLS handshake asks again, so a source that changes its answer rotates the
/// certificate for new connections without a restart. Implemented for PEM files by
/// [`FileSvidSource`]; a SPIFFE Workload API client fits the same trait.
pub trait SvidSource: Send + Sync + fmt::Debug + 'static {
    /// The SVID to present now.
    fn svid(&self) -> Arc<Svid>;

    /// The trust bundle to verify peers against now.
    fn bundle(&self) -> Arc<TrustBundle>;
}

/// The three PEM files of an SVID on disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SvidPaths {
    /// Certificate chain, leaf first.
    pub chain: PathBuf,
    /// PKCS#8 private key of the leaf.
    pub key: PathBuf,
    /// CA certificates of the trust domain.
    pub bundle: PathBuf,
}

impl SvidPaths {
    /// The layout the development PKI writes: `svid.pem`, `svid.key.pem` and `bundle.pem`.
    pub fn in_dir(dir: &Path) -> Self {
        Self {
            chain: dir.join("svid.pem"),
            key: dir.join("svid.key.pem"),
            bundle: dir.join("bundle.pem"),
        }
    }
}

/// An [`SvidSource`] backed by PEM files that are re-read when their contents change.
///
/// Peers must belong to the trust domain of the loaded SVID.
#[derive(Debug)]
pub struct FileSvidSource {
    paths: SvidPaths,
    state: RwLock<Loaded>,
}

#[derive(Debug)]
struct Loaded {
    svid: Arc<Svid>,
    bundle: Arc<TrustBundle>,
    contents: [u8; 32],
    generation: u64,
}

impl FileSvidSource {
    /// Loads the SVID and bundle from `paths`.
    ///
    /// # Errors
    /// [`IdentityError`] when a file cannot be read or is not a valid SVID or bundle.
    pub fn load(paths: SvidPaths) -> Result<Arc<Self>, IdentityError> {
        let loaded = load_files(&paths, 0)?;
        Ok(Arc::new(Self {
            paths,
            state: RwLock::new(loaded),
        }))
    }

    /// Re-reads the files; returns whether anything changed.
    ///
    /// On error the previous SVID stays in use. A rotation that has written the new
    /// certificate but not yet the new key fails the key check and is picked up by the
    /// next call.
    ///
    /// # Errors
    /// [`IdentityError`] when the new files are unreadable or invalid.
    pub fn reload(&self) -> Result<bool, IdentityError> {
        let (contents, generation) = {
            let state = self.state.read().unwrap_or_else(|e| e.into_inner());
            (state.contents, state.generation)
        };
        if read_fingerprint(&self.paths)? == contents {
            return Ok(false);
        }
        let loaded = load_files(&self.paths, generation + 1)?;
        tracing::info!(
            svid.id = %loaded.svid.spiffe_id(),
            svid.generation = loaded.generation,
            "svid reloaded from disk"
        );
        *self.state.write().unwrap_or_else(|e| e.into_inner()) = loaded;
        Ok(true)
    }

    /// How many times the files have been reloaded with new contents.
    pub fn generation(&self) -> u64 {
        self.state
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .generation
    }

    /// Spawns a task that calls [`reload`](Self::reload) every `interval`.
    ///
    /// The task ends when the source is dropped. Must be called inside a tokio runtime.
    pub fn watch(self: &Arc<Self>, interval: Duration) -> tokio::task::JoinHandle<()> {
        let weak: Weak<Self> = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(interval);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticker.tick().await;
                let Some(source) = weak.upgrade() else { return };
                if let Err(error) = source.reload() {
                    tracing::warn!(
                        %error,
                        "svid files changed but cannot be loaded; keeping the old svid",
                    );
                }
            }
        })
    }
}

impl SvidSource for FileSvidSource {
    fn svid(&self) -> Arc<Svid> {
        Arc::clone(&self.state.read().unwrap_or_else(|e| e.into_inner()).svid)
    }

    fn bundle(&self) -> Arc<TrustBundle> {
        Arc::clone(&self.state.read().unwrap_or_else(|e| e.into_inner()).bundle)
    }
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    to_array(digest(&SHA256, bytes))
}

fn to_array(digest: ring::digest::Digest) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(digest.as_ref());
    out
}

fn read_file(path: &Path) -> Result<Vec<u8>, IdentityError> {
    std::fs::read(path).map_err(|source| IdentityError::Read {
        path: path.to_owned(),
        source,
    })
}

fn read_fingerprint(paths: &SvidPaths) -> Result<[u8; 32], IdentityError> {
    let mut hasher = Context::new(&SHA256);
    for path in [&paths.chain, &paths.key, &paths.bundle] {
        let bytes = read_file(path)?;
        // Length-prefix each file so moving bytes between files changes the fingerprint.
        hasher.update(&(bytes.len() as u64).to_be_bytes());
        hasher.update(&bytes);
    }
    Ok(to_array(hasher.finish()))
}

fn load_files(paths: &SvidPaths, generation: u64) -> Result<Loaded, IdentityError> {
    let contents = read_fingerprint(paths)?;
    let svid = Svid::from_pem(
        &read_file(&paths.chain)?,
        &read_file(&paths.key)?,
        &paths.chain,
    )?;
    let trust_domain = svid.spiffe_id().trust_domain().clone();
    let bundle = TrustBundle::from_pem(trust_domain, &read_file(&paths.bundle)?, &paths.bundle)?;
    Ok(Loaded {
        svid: Arc::new(svid),
        bundle: Arc::new(bundle),
        contents,
        generation,
    })
}

fn read_certificates(
    pem: &[u8],
    origin: &Path,
) -> Result<Vec<CertificateDer<'static>>, IdentityError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| IdentityError::Pem {
            path: origin.to_owned(),
            source,
        })?;
    if certs.is_empty() {
        return Err(IdentityError::NoCertificate {
            path: origin.to_owned(),
        });
    }
    Ok(certs)
}

/// Why an SVID or trust bundle could not be loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IdentityError {
    /// The file cannot be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not valid PEM, or lacks the expected section.
    #[error("{path} is not valid PEM: {source}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// The PEM error.
        source: rustls::pki_types::pem::Error,
    },
    /// The PEM holds no certificate.
    #[error("{path} holds no certificate")]
    NoCertificate {
        /// The file.
        path: PathBuf,
    },
    /// The chain breaks an X509-SVID rule.
    #[error("{path} is not a valid X509-SVID: {source}")]
    InvalidSvid {
        /// The file.
        path: PathBuf,
        /// The rule broken.
        source: spiffe::X509SvidError,
    },
    /// The leaf's SPIFFE ID or validity cannot be read.
    #[error("{path} has no usable SPIFFE ID: {source}")]
    InvalidCertificate {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        source: PeerCertError,
    },
    /// The private key is unsupported or does not belong to the leaf.
    #[error("private key for {path} is unusable: {source}")]
    Key {
        /// The certificate file the key should match.
        path: PathBuf,
        /// The rustls error.
        source: rustls::Error,
    },
    /// A CA certificate in the bundle is unusable.
    #[error("trust bundle {path} has an unusable CA certificate: {source}")]
    Bundle {
        /// The bundle file.
        path: PathBuf,
        /// The rustls error.
        source: rustls::Error,
    },
    /// No verifier can be built from the bundle.
    #[error("trust bundle {path} cannot verify clients: {reason}")]
    Verifier {
        /// The bundle file.
        path: PathBuf,
        /// What rustls reported.
        reason: String,
    },
}
