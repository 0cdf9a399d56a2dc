//! Shared test fixtures: a development PKI in a temporary directory, a server with a
//! `/whoami` route and the object routes, and a raw HTTP/3 client that can present any
//! certificate (or none) the way a misbehaving peer would.

#![allow(dead_code)] // Each test binary uses a different part of this module.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result};
use bytes::{Buf, Bytes};
use fedmesh_transport::pki::{CertificateAuthority, IssuedSvid, Validity};
use fedmesh_transport::server::{Request, Response};
use fedmesh_transport::transfer::ObjectStore;
use fedmesh_transport::{
    Client, ClientConfig, FileSvidSource, KeepAlive, PeerPolicy, Router, Server, ServerConfig,
    SvidPaths, SvidSource, TrustDomain,
};
use http::{Method, StatusCode};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};

pub const LOCALHOST: &str = "127.0.0.1:0";

/// A trust domain with its CA and a scratch directory for SVID files.
pub struct Lab {
    pub dir: tempfile::TempDir,
    pub ca: CertificateAuthority,
}

impl Lab {
    pub fn new(trust_domain: &str) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let td = TrustDomain::new(trust_domain)?;
        let ca =
            CertificateAuthority::new(&td, Validity::starting_now(Duration::from_secs(86400)))?;
        Ok(Self { dir, ca })
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Issues `spiffe://<td><spiffe_path>` valid for a day and writes it under `name`.
    pub fn issue(&self, name: &str, spiffe_path: &str) -> Result<SvidPaths> {
        let issued = self.ca.issue(
            spiffe_path,
            Validity::starting_now(Duration::from_secs(86400)),
        )?;
        Ok(issued.write_to(&self.path(name))?)
    }

    pub fn source(&self, name: &str, spiffe_path: &str) -> Result<Arc<FileSvidSource>> {
        Ok(FileSvidSource::load(self.issue(name, spiffe_path)?)?)
    }
}

/// Routes used by the tests: `/whoami` answers the caller's SPIFFE ID and protocol.
pub fn router(store: Option<&Arc<ObjectStore>>) -> Router {
    let router = Router::new().route(Method::GET, "/whoami", |request: Request| async move {
        let text = format!("{} {}", request.peer().spiffe_id(), request.protocol());
        Response::text(StatusCode::OK, text)
    });
    match store {
        Some(store) => store.routes(router),
        None => router,
    }
}

pub fn fast_keepalive() -> KeepAlive {
    KeepAlive {
        interval: Duration::from_millis(500),
        timeout: Duration::from_secs(3),
    }
}

pub async fn start_server(source: Arc<dyn SvidSource>, router: Router) -> Result<Server> {
    let config = ServerConfig {
        quic_addr: LOCALHOST.parse()?,
        tcp_addr: Some(LOCALHOST.parse()?),
        keepalive: fast_keepalive(),
        stateless_reset_key: None,
    };
    Ok(Server::bind(config, source, router).await?)
}

pub fn client_config(server: &Server) -> ClientConfig {
    let mut config = ClientConfig::new(server.quic_addr(), PeerPolicy::AnyInTrustDomain);
    config.tcp_addr = server.tcp_addr().expect("test servers serve tcp");
    config.keepalive = fast_keepalive();
    config.retry.base = Duration::from_millis(50);
    config.retry.cap = Duration::from_millis(500);
    config
}

pub fn client(server: &Server, source: Arc<dyn SvidSource>) -> Result<Client> {
    Ok(Client::new(client_config(server), source)?)
}

/// Accepts any server certificate: the raw client tests the server, not the client.
#[derive(Debug)]
struct AcceptAnyServer(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AcceptAnyServer {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let algs = &self.0.signature_verification_algorithms;
        rustls::crypto::verify_tls12_signature(message, cert, dss, algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let algs = &self.0.signature_verification_algorithms;
        rustls::crypto::verify_tls13_signature(message, cert, dss, algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// A QUIC connection presenting `identity` (chain and key files), or no certificate.
pub async fn raw_connect(
    server: SocketAddr,
    identity: Option<&SvidPaths>,
) -> Result<quinn::Connection> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAnyServer(provider)));
    let mut tls = match identity {
        Some(paths) => {
            let chain =
                CertificateDer::pem_file_iter(&paths.chain)?.collect::<Result<Vec<_>, _>>()?;
            let key = PrivateKeyDer::from_pem_file(&paths.key)?;
            builder.with_client_auth_cert(chain, key)?
        }
        None => builder.with_no_client_auth(),
    };
    tls.alpn_protocols = vec![b"h3".to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)?;
    let mut endpoint = quinn::Endpoint::client(LOCALHOST.parse()?)?;
    endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(crypto)));
    Ok(endpoint.connect(server, "fedmesh.invalid")?.await?)
}

/// An HTTP/3 session on a raw connection. The connection stays open while the returned
/// sender lives: h3 closes it when the last sender is dropped.
pub async fn raw_h3(conn: &quinn::Connection) -> Result<RawSender> {
    let (mut driver, send) = h3::client::new(h3_quinn::Connection::new(conn.clone())).await?;
    tokio::spawn(async move { std::future::poll_fn(|cx| driver.poll_close(cx)).await });
    Ok(send)
}

pub type RawSender = h3::client::SendRequest<h3_quinn::OpenStreams, Bytes>;

/// `GET /whoami`: the status and body text.
pub async fn raw_whoami(send: &mut RawSender) -> Result<(StatusCode, String)> {
    let request = http::Request::get("https://fedmesh.invalid/whoami").body(())?;
    let mut stream = send.send_request(request).await?;
    stream.finish().await?;
    let response = stream.recv_response().await?;
    let mut body = Vec::new();
    while let Some(mut piece) = stream.recv_data().await? {
        body.extend_from_slice(&piece.copy_to_bytes(piece.remaining()));
    }
    Ok((response.status(), String::from_utf8(body)?))
}

/// Connects with `identity` and asks `/whoami`, all within 10 s.
pub async fn raw_request(
    server: SocketAddr,
    identity: Option<&SvidPaths>,
) -> Result<(StatusCode, String)> {
    tokio::time::timeout(Duration::from_secs(10), async {
        let conn = raw_connect(server, identity).await?;
        raw_whoami(&mut raw_h3(&conn).await?).await
    })
    .await
    .context("raw request timed out")?
}

/// Writes `len` bytes of a fixed pseudo-random sequence (xorshift64) to `path`, 1 MiB at a
/// time, so the test itself never holds the object.
pub fn write_pattern_file(path: &Path, len: u64, seed: u64) -> Result<()> {
    use std::io::Write;
    let mut file = std::io::BufWriter::new(std::fs::File::create(path)?);
    let mut state = seed | 1;
    let mut left = len;
    let mut block = vec![0u8; 1 << 20];
    while left > 0 {
        for word in block.chunks_exact_mut(8) {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            word.copy_from_slice(&state.to_le_bytes());
        }
        let n = left.min(block.len() as u64) as usize;
        file.write_all(&block[..n])?;
        left -= n as u64;
    }
    file.flush()?;
    Ok(())
}

/// Whether two files have the same bytes, compared 1 MiB at a time.
pub fn same_contents(a: &Path, b: &Path) -> Result<bool> {
    use std::io::Read;
    let (mut fa, mut fb) = (std::fs::File::open(a)?, std::fs::File::open(b)?);
    if fa.metadata()?.len() != fb.metadata()?.len() {
        return Ok(false);
    }
    let (mut ba, mut bb) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    loop {
        let n = fa.read(&mut ba)?;
        if n == 0 {
            return Ok(true);
        }
        fb.read_exact(&mut bb[..n])?;
        if ba[..n] != bb[..n] {
            return Ok(false);
        }
    }
}

/// SHA-256 of the first certificate in a PEM file.
pub fn leaf_sha256(chain: &Path) -> Result<[u8; 32]> {
    let leaf = CertificateDer::from_pem_file(chain)?;
    let digest = ring::digest::digest(&ring::digest::SHA256, &leaf);
    Ok(digest.as_ref().try_into()?)
}

/// Writes an issued SVID over the files at `dir`.
pub fn rotate(issued: &IssuedSvid, dir: &Path) -> Result<SvidPaths> {
    Ok(issued.write_to(dir)?)
}

pub fn seconds_from_now(seconds: u64) -> SystemTime {
    SystemTime::now() + Duration::from_secs(seconds)
}

pub fn bytes(text: &str) -> Bytes {
    Bytes::copy_from_slice(text.as_bytes())
}

/// Forwards one client's UDP to a server. Cut, it drops everything both ways, like a store
/// whose WAN link died; moved, the client's next packets reach another server, as the
/// anycast front sends them when a PoP dies.
pub struct UdpRelay {
    pub addr: SocketAddr,
    cut: Arc<AtomicBool>,
    target: Arc<Mutex<SocketAddr>>,
    task: tokio::task::JoinHandle<()>,
}

impl UdpRelay {
    pub async fn start(server: SocketAddr) -> Result<Self> {
        let front = tokio::net::UdpSocket::bind(LOCALHOST).await?;
        let back = tokio::net::UdpSocket::bind(LOCALHOST).await?;
        let addr = front.local_addr()?;
        let cut = Arc::new(AtomicBool::new(false));
        let target = Arc::new(Mutex::new(server));
        let (c, t) = (Arc::clone(&cut), Arc::clone(&target));
        let task = tokio::spawn(async move {
            let (mut up, mut down) = (vec![0u8; 65536], vec![0u8; 65536]);
            let mut client = None;
            loop {
                tokio::select! {
                    Ok((n, from)) = front.recv_from(&mut up) => {
                        client = Some(from);
                        let to = *t.lock().expect("target");
                        if !c.load(Ordering::Relaxed) {
                            let _ = back.send_to(&up[..n], to).await;
                        }
                    }
                    Ok((n, _)) = back.recv_from(&mut down) => {
                        if let (Some(to), false) = (client, c.load(Ordering::Relaxed)) {
                            let _ = front.send_to(&down[..n], to).await;
                        }
                    }
                }
            }
        });
        Ok(Self {
            addr,
            cut,
            target,
            task,
        })
    }

    pub fn cut(&self) {
        self.cut.store(true, Ordering::Relaxed);
    }

    pub fn move_to(&self, server: SocketAddr) {
        *self.target.lock().expect("target") = server;
    }
}

impl Drop for UdpRelay {
    fn drop(&mut self) {
        self.task.abort();
    }
}
