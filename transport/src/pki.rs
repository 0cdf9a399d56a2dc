//! A development PKI: a trust domain's CA and X509-SVIDs for core, PoPs and stores.
//!
//! For labs and tests only: keys are generated in process and written as PEM files. Every
//! SVID follows the X509-SVID rules: basicConstraints CA=false, key usage digitalSignature,
//! exactly one URI SAN holding the SPIFFE ID. Both serverAuth and clientAuth extended key
//! usages are set, because every Fedmesh process is a client and most are servers.
//!
//! Files are written through a temporary file and a rename, so a process watching them
//! never reads half a certificate.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rand::RngCore;
use rcgen::string::Ia5String;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use spiffe::TrustDomain;

use crate::identity::SvidPaths;

/// How long a certificate is valid.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Validity {
    /// First second of validity.
    pub not_before: SystemTime,
    /// Last second of validity.
    pub not_after: SystemTime,
}

impl Validity {
    /// Valid from a minute ago (to absorb clock skew between lab processes) for `lifetime`
    /// from now.
    pub fn starting_now(lifetime: Duration) -> Self {
        let now = SystemTime::now();
        Self {
            not_before: now - Duration::from_secs(60),
            not_after: now + lifetime,
        }
    }
}

/// A trust domain's signing CA.
pub struct CertificateAuthority {
    trust_domain: TrustDomain,
    certificate_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl CertificateAuthority {
    /// Makes a self-signed CA for `trust_domain` with a fresh ECDSA P-256 key.
    ///
    /// # Errors
    /// [`PkiError::Generate`] when rcgen cannot build the certificate.
    pub fn new(trust_domain: &TrustDomain, validity: Validity) -> Result<Self, PkiError> {
        let mut params = CertificateParams::default();
        let mut name = DistinguishedName::new();
        name.push(DnType::OrganizationName, "Fedmesh");
        name.push(
            DnType::CommonName,
            format!("Fedmesh development CA for {trust_domain}"),
        );
        params.distinguished_name = name;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        set_validity(&mut params, validity);

        let key = KeyPair::generate()?;
        let certificate = params.self_signed(&key)?;
        Ok(Self {
            trust_domain: trust_domain.clone(),
            certificate_pem: certificate.pem(),
            issuer: Issuer::new(params, key),
        })
    }

    /// The CA certificate, PEM; this is the trust bundle of the domain.
    pub fn certificate_pem(&self) -> &str {
        &self.certificate_pem
    }

    /// The CA private key, PKCS#8 PEM; keep it to issue more SVIDs later.
    pub fn key_pem(&self) -> String {
        self.issuer.key().serialize_pem()
    }

    /// The trust domain this CA signs for.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// Issues an X509-SVID for `spiffe://<trust-domain><path>`.
    ///
    /// # Errors
    /// [`PkiError::InvalidPath`] unless `path` starts with `/`; [`PkiError::Generate`] when
    /// rcgen fails.
    pub fn issue(&self, path: &str, validity: Validity) -> Result<IssuedSvid, PkiError> {
        if !path.starts_with('/') || path.len() < 2 {
            return Err(PkiError::InvalidPath(path.to_owned()));
        }
        self.issue_with_uris(&[format!("spiffe://{}{path}", self.trust_domain)], validity)
    }

    /// Issues a leaf with exactly these URI SANs and otherwise the SVID extensions.
    ///
    /// Anything but one SPIFFE URI breaks the X509-SVID rules; this exists so tests can
    /// show that such certificates are refused.
    ///
    /// # Errors
    /// [`PkiError::Generate`] when a URI is not IA5 or rcgen fails.
    pub fn issue_with_uris(
        &self,
        uris: &[String],
        validity: Validity,
    ) -> Result<IssuedSvid, PkiError> {
        let mut params = CertificateParams::default();
        let mut name = DistinguishedName::new();
        name.push(DnType::OrganizationName, "Fedmesh");
        params.distinguished_name = name;
        for uri in uris {
            params
                .subject_alt_names
                .push(SanType::URI(Ia5String::try_from(uri.as_str())?));
        }
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        set_validity(&mut params, validity);

        let key = KeyPair::generate()?;
        let certificate = params.signed_by(&key, &self.issuer)?;
        Ok(IssuedSvid {
            chain_pem: certificate.pem(),
            key_pem: key.serialize_pem(),
            bundle_pem: self.certificate_pem.clone(),
        })
    }
}

/// An issued SVID as PEM text.
#[derive(Clone)]
pub struct IssuedSvid {
    /// Certificate chain, leaf first.
    pub chain_pem: String,
    /// PKCS#8 private key.
    pub key_pem: String,
    /// The issuing CA's certificate, as trust bundle.
    pub bundle_pem: String,
}

impl IssuedSvid {
    /// Writes `svid.pem`, `svid.key.pem` (mode 0600) and `bundle.pem` into `dir`, creating
    /// it, and returns their paths.
    ///
    /// # Errors
    /// [`PkiError::Write`] when a file cannot be written.
    pub fn write_to(&self, dir: &Path) -> Result<SvidPaths, PkiError> {
        let paths = SvidPaths::in_dir(dir);
        create_dir(dir)?;
        write_atomic(&paths.bundle, self.bundle_pem.as_bytes(), false)?;
        write_atomic(&paths.key, self.key_pem.as_bytes(), true)?;
        write_atomic(&paths.chain, self.chain_pem.as_bytes(), false)?;
        Ok(paths)
    }
}

impl std::fmt::Debug for IssuedSvid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IssuedSvid").finish_non_exhaustive()
    }
}

/// What a development PKI should contain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DevPkiSpec {
    /// The trust domain, e.g. `fl.example`.
    pub trust_domain: String,
    /// Lifetime of the CA certificate.
    pub ca_lifetime: Duration,
    /// Lifetime of every SVID.
    pub svid_lifetime: Duration,
    /// Metros that get a PoP SVID (`/pop/<metro>`).
    pub pops: Vec<String>,
    /// `(region, store id)` pairs that get a store SVID (`/store/<region>/<store>`).
    pub stores: Vec<(String, String)>,
}

/// Where [`write_dev_pki`] put everything.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DevPkiLayout {
    /// The CA certificate (trust bundle), `<out>/bundle.pem`.
    pub bundle: PathBuf,
    /// The CA key, `<out>/ca.key.pem`.
    pub ca_key: PathBuf,
    /// Core's SVID, under `<out>/core/`.
    pub core: SvidPaths,
    /// Each metro's PoP SVID, under `<out>/pop/<metro>/`.
    pub pops: Vec<(String, SvidPaths)>,
    /// Each store's SVID, under `<out>/store/<region>/<store>/`.
    pub stores: Vec<((String, String), SvidPaths)>,
}

/// Makes a CA for `spec.trust_domain` and SVIDs for core, every PoP and every store, and
/// writes them under `out`. Each SVID directory also holds a copy of `bundle.pem`, so
/// [`SvidPaths::in_dir`] finds all three files.
///
/// # Errors
/// [`PkiError`] when the trust domain, a metro, region or store name is invalid, or a
/// file cannot be written.
pub fn write_dev_pki(out: &Path, spec: &DevPkiSpec) -> Result<DevPkiLayout, PkiError> {
    let trust_domain = TrustDomain::new(&spec.trust_domain)
        .map_err(|e| PkiError::InvalidTrustDomain(format!("{}: {e}", spec.trust_domain)))?;
    let ca = CertificateAuthority::new(&trust_domain, Validity::starting_now(spec.ca_lifetime))?;
    let validity = Validity::starting_now(spec.svid_lifetime);

    // 1. The CA.
    create_dir(out)?;
    let bundle = out.join("bundle.pem");
    let ca_key = out.join("ca.key.pem");
    write_atomic(&bundle, ca.certificate_pem().as_bytes(), false)?;
    write_atomic(&ca_key, ca.key_pem().as_bytes(), true)?;

    // 2. Core, PoPs, stores.
    let core = ca.issue("/core", validity)?.write_to(&out.join("core"))?;
    let mut pops = Vec::with_capacity(spec.pops.len());
    for metro in &spec.pops {
        check_segment(metro)?;
        let paths = ca.issue(&format!("/pop/{metro}"), validity)?;
        pops.push((metro.clone(), paths.write_to(&out.join("pop").join(metro))?));
    }
    let mut stores = Vec::with_capacity(spec.stores.len());
    for (region, store) in &spec.stores {
        check_segment(region)?;
        check_segment(store)?;
        let issued = ca.issue(&format!("/store/{region}/{store}"), validity)?;
        let dir = out.join("store").join(region).join(store);
        stores.push(((region.clone(), store.clone()), issued.write_to(&dir)?));
    }
    Ok(DevPkiLayout {
        bundle,
        ca_key,
        core,
        pops,
        stores,
    })
}

/// Why the development PKI could not be made.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PkiError {
    /// The trust domain name is not valid for SPIFFE.
    #[error("invalid trust domain {0}")]
    InvalidTrustDomain(String),
    /// A SPIFFE ID path is empty or does not start with `/`.
    #[error("invalid SPIFFE ID path {0:?}: it must start with / and name a workload")]
    InvalidPath(String),
    /// A metro, region or store name cannot be one path segment.
    #[error("invalid name {0:?}: use letters, digits, '-', '_' and '.' only")]
    InvalidSegment(String),
    /// rcgen could not generate a key or certificate.
    #[error("cannot generate certificate: {0}")]
    Generate(#[from] rcgen::Error),
    /// A file or directory could not be written.
    #[error("cannot write {path}: {source}")]
    Write {
        /// The file or directory.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
}

fn set_validity(params: &mut CertificateParams, validity: Validity) {
    params.not_before = validity.not_before.into();
    params.not_after = validity.not_after.into();

    // Positive 128-bit serial; the top bit cleared keeps the DER integer positive.
    let mut serial = [0u8; 16];
    rand::thread_rng().fill_bytes(&mut serial);
    serial[0] &= 0x7f;
    params.serial_number = Some(SerialNumber::from_slice(&serial));
}

fn check_segment(name: &str) -> Result<(), PkiError> {
    let valid = !name.is_empty()
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
    if valid {
        Ok(())
    } else {
        Err(PkiError::InvalidSegment(name.to_owned()))
    }
}

fn create_dir(dir: &Path) -> Result<(), PkiError> {
    std::fs::create_dir_all(dir).map_err(|source| PkiError::Write {
        path: dir.to_owned(),
        source,
    })
}

fn write_atomic(path: &Path, contents: &[u8], private: bool) -> Result<(), PkiError> {
    let error = |source| PkiError::Write {
        path: path.to_owned(),
        source,
    };
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);

    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    if private {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    #[cfg(not(unix))]
    let _ = private;
    let mut file = options.open(&tmp).map_err(error)?;
    file.write_all(contents).map_err(error)?;
    file.sync_all().map_err(error)?;
    std::fs::rename(&tmp, path).map_err(error)
}
