//! The client: one API over HTTP/3, falling back to HTTP/2 on TCP where UDP is blocked.
//!
//! A client keeps one connection to its server. It tries QUIC first; if QUIC does not
//! connect within [`ClientConfig::quic_connect_timeout`] it connects over TCP and serves
//! requests there, and after [`ClientConfig::quic_retry_after`] it tries QUIC again before
//! the next request. Callers see the same [`ClientResponse`] either way.

use std::future::Future;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::{HeaderMap, Method, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;
use tracing::{debug, info};

use crate::body::{BodyError, Protocol, RecvBody, RecvInner, SendBody};
use crate::identity::{PeerIdentity, PeerPolicy, SvidSource};
use crate::retry::{KeepAlive, RetryPolicy};
use crate::server::transport_config;
use crate::tls::{self, ALPN_H2, ALPN_H3, SERVER_NAME};

/// How a [`Client`] reaches its server.
#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// UDP address for HTTP/3.
    pub quic_addr: SocketAddr,
    /// TCP address for the HTTP/2 fallback.
    pub tcp_addr: SocketAddr,
    /// Which server SPIFFE IDs to accept.
    pub expected_server: PeerPolicy,
    /// How long QUIC may take to connect before falling back to TCP.
    pub quic_connect_timeout: Duration,
    /// How long to stay on TCP after a fallback before trying QUIC again.
    pub quic_retry_after: Duration,
    /// How long a TCP connect plus TLS handshake may take.
    pub tcp_connect_timeout: Duration,
    /// Keepalive timing.
    pub keepalive: KeepAlive,
    /// Retry timing for idempotent requests and transfers.
    pub retry: RetryPolicy,
    /// Largest object [`Client::put_object`] will send.
    pub max_object_size: u64,
    /// Chunk size of transfers.
    pub chunk_size: u64,
}

impl ClientConfig {
    /// A server at `addr` (UDP and TCP), accepting server identities by `expected_server`,
    /// with default timing and an 8 GiB object limit.
    pub fn new(addr: SocketAddr, expected_server: PeerPolicy) -> Self {
        Self {
            quic_addr: addr,
            tcp_addr: addr,
            expected_server,
            quic_connect_timeout: Duration::from_secs(2),
            quic_retry_after: Duration::from_secs(60),
            tcp_connect_timeout: Duration::from_secs(10),
            keepalive: KeepAlive::default(),
            retry: RetryPolicy::default(),
            max_object_size: 8 << 30,
            chunk_size: crate::transfer::DEFAULT_CHUNK_SIZE,
        }
    }
}

/// A response as a caller sees it.
#[derive(Debug)]
pub struct ClientResponse {
    status: StatusCode,
    headers: HeaderMap,
    protocol: Protocol,
    peer: PeerIdentity,
    body: RecvBody,
}

impl ClientResponse {
    /// The status code.
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// The headers.
    pub fn headers(&self) -> &HeaderMap {
        &self.headers
    }

    /// Which HTTP version carried the exchange.
    pub fn protocol(&self) -> Protocol {
        self.protocol
    }

    /// The authenticated server.
    pub fn peer(&self) -> &PeerIdentity {
        &self.peer
    }

    /// The body, to read piece by piece.
    pub fn body_mut(&mut self) -> &mut RecvBody {
        &mut self.body
    }

    /// Collects the body, refusing more than `limit` bytes.
    ///
    /// # Errors
    /// [`ClientError::Response`] when the body breaks or exceeds `limit`.
    pub async fn bytes(mut self, limit: usize) -> Result<Bytes, ClientError> {
        self.body
            .to_bytes(limit)
            .await
            .map_err(ClientError::Response)
    }

    /// Fails with [`ClientError::Status`] (holding up to 4 KiB of the body) unless the
    /// status is 2xx.
    ///
    /// # Errors
    /// [`ClientError::Status`] for a non-2xx status.
    pub async fn success(mut self) -> Result<Self, ClientError> {
        if self.status.is_success() {
            return Ok(self);
        }
        let status = self.status;
        let message = match self.body.to_bytes(4096).await {
            Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
            Err(e) => e.to_string(),
        };
        Err(ClientError::Status { status, message })
    }
}

/// An HTTP/3 client with HTTP/2 fallback, cheap to clone.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

struct Inner {
    config: ClientConfig,
    endpoint: quinn::Endpoint,
    quic: quinn::ClientConfig,
    tcp_tls: tokio_rustls::TlsConnector,
    state: tokio::sync::Mutex<State>,
}

#[derive(Default)]
struct State {
    conn: Option<Conn>,
    fell_back_at: Option<Instant>,
}

#[derive(Clone)]
enum Conn {
    H3 {
        send: h3::client::SendRequest<h3_quinn::OpenStreams, Bytes>,
        quic: quinn::Connection,
        peer: PeerIdentity,
        driver: Arc<AbortOnDrop>,
    },
    H2 {
        send: hyper::client::conn::http2::SendRequest<H2Body>,
        peer: PeerIdentity,
        driver: Arc<AbortOnDrop>,
    },
}

type H2Body = http_body_util::combinators::UnsyncBoxBody<Bytes, std::io::Error>;

/// Aborts the connection driver once the last clone of a connection is gone.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Conn {
    fn protocol(&self) -> Protocol {
        match self {
            Self::H3 { .. } => Protocol::Http3,
            Self::H2 { .. } => Protocol::Http2,
        }
    }

    fn peer(&self) -> &PeerIdentity {
        match self {
            Self::H3 { peer, .. } | Self::H2 { peer, .. } => peer,
        }
    }

    fn driver(&self) -> &Arc<AbortOnDrop> {
        match self {
            Self::H3 { driver, .. } | Self::H2 { driver, .. } => driver,
        }
    }

    /// Open, and the server's certificate still valid: session resumption or a long-lived
    /// connection must not outlast the identity it was opened with.
    fn is_usable(&self) -> bool {
        let open = match self {
            Self::H3 { quic, .. } => quic.close_reason().is_none(),
            Self::H2 { send, .. } => !send.is_closed(),
        };
        open && !self.peer().is_expired_at(SystemTime::now())
    }
}

impl Client {
    /// A client presenting the SVID of `source`. Connects lazily, on the first request.
    ///
    /// Must be called inside a tokio runtime.
    ///
    /// # Errors
    /// [`ClientError::Setup`] when the UDP socket cannot be bound or TLS setup fails.
    pub fn new(config: ClientConfig, source: Arc<dyn SvidSource>) -> Result<Self, ClientError> {
        // 1. QUIC: a local socket of the server's address family; loopback stays loopback.
        let ip = config.quic_addr.ip();
        let local: SocketAddr = match (ip.is_loopback(), ip.is_ipv4()) {
            (true, true) => (Ipv4Addr::LOCALHOST, 0).into(),
            (true, false) => (Ipv6Addr::LOCALHOST, 0).into(),
            (false, true) => (Ipv4Addr::UNSPECIFIED, 0).into(),
            (false, false) => (Ipv6Addr::UNSPECIFIED, 0).into(),
        };
        let endpoint = quinn::Endpoint::client(local)
            .map_err(|e| ClientError::Setup(format!("cannot bind udp {local}: {e}")))?;
        let tls = tls::client_config(&source, config.expected_server.clone(), ALPN_H3)
            .map_err(|e| ClientError::Setup(e.to_string()))?;
        let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
            .map_err(|e| ClientError::Setup(e.to_string()))?;
        let mut quic = quinn::ClientConfig::new(Arc::new(crypto));
        let transport =
            transport_config(config.keepalive).map_err(|e| ClientError::Setup(e.to_string()))?;
        quic.transport_config(Arc::new(transport));

        // 2. TCP fallback with the same identity and verification.
        let tls = tls::client_config(&source, config.expected_server.clone(), ALPN_H2)
            .map_err(|e| ClientError::Setup(e.to_string()))?;
        let tcp_tls = tokio_rustls::TlsConnector::from(Arc::new(tls));
        let inner = Inner {
            config,
            endpoint,
            quic,
            tcp_tls,
            state: Default::default(),
        };
        Ok(Self {
            inner: Arc::new(inner),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &ClientConfig {
        &self.inner.config
    }

    /// The protocol of the open connection, if any.
    pub async fn protocol(&self) -> Option<Protocol> {
        let state = self.inner.state.lock().await;
        state
            .conn
            .as_ref()
            .filter(|c| c.is_usable())
            .map(Conn::protocol)
    }

    /// Sends one request; no retries.
    ///
    /// # Errors
    /// [`ClientError::Connect`] when no connection could be made, [`ClientError::Request`]
    /// when the exchange broke, [`ClientError::Body`] when `body` failed to produce bytes.
    pub async fn request(
        &self,
        method: Method,
        path: &str,
        headers: HeaderMap,
        body: SendBody,
    ) -> Result<ClientResponse, ClientError> {
        let uri: http::Uri = format!("https://{SERVER_NAME}{path}")
            .parse()
            .map_err(|_| ClientError::InvalidPath(path.to_owned()))?;
        let mut head = http::Request::new(());
        *head.method_mut() = method;
        *head.uri_mut() = uri;
        *head.headers_mut() = headers;

        let conn = self.connection().await?;
        let mut result = match &conn {
            Conn::H3 { send, peer, .. } => send_h3(send.clone(), head, body, peer).await,
            Conn::H2 { send, peer, .. } => send_h2(send.clone(), head, body, peer).await,
        };
        // With TLS 1.3 a server refuses a client certificate after the client finished its
        // handshake, so the refusal surfaces here, on the first request.
        if let (Err(ClientError::Request(_)), Conn::H3 { quic, .. }) = (&result, &conn)
            && let Some(reason) = quic.close_reason().as_ref().and_then(quic_tls_refusal)
        {
            result = Err(ClientError::Refused(reason));
        }
        if matches!(
            result,
            Err(ClientError::Request(_) | ClientError::Refused(_))
        ) {
            self.forget(&conn).await;
        }
        result
    }

    /// `GET path`, retried with backoff on connection and server errors.
    ///
    /// # Errors
    /// The last error once [`RetryPolicy::max_attempts`] are spent, or the first error that
    /// retrying cannot fix.
    pub async fn get(&self, path: &str) -> Result<ClientResponse, ClientError> {
        self.retrying(|| async move {
            self.request(Method::GET, path, HeaderMap::new(), SendBody::empty())
                .await?
                .success()
                .await
        })
        .await
    }

    /// `POST path` with `body`. Retried only while no connection could be made, since a
    /// POST that reached the server may have taken effect.
    ///
    /// # Errors
    /// As [`request`](Self::request), plus [`ClientError::Status`] for a non-2xx answer.
    pub async fn post(&self, path: &str, body: Bytes) -> Result<ClientResponse, ClientError> {
        let policy = self.inner.config.retry;
        let mut retry = 0;
        loop {
            let sent = self
                .request(
                    Method::POST,
                    path,
                    HeaderMap::new(),
                    SendBody::from_bytes(body.clone()),
                )
                .await;
            match sent {
                Err(error @ ClientError::Connect { .. }) if retry + 1 < policy.max_attempts => {
                    debug!(%error, retry, "post: no connection, retrying");
                    tokio::time::sleep(policy.delay(retry, &mut rand::thread_rng())).await;
                    retry += 1;
                }
                Err(error) => return Err(error),
                Ok(response) => return response.success().await,
            }
        }
    }

    /// Runs `op` until it succeeds, fails in a way retrying cannot fix, or the retry policy
    /// is spent; waits with full jitter between attempts.
    pub(crate) async fn retrying<T, F, Fut>(&self, mut op: F) -> Result<T, ClientError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, ClientError>>,
    {
        let policy = self.inner.config.retry;
        let mut retry = 0;
        loop {
            match op().await {
                Ok(value) => return Ok(value),
                Err(error) if error.is_retryable() && retry + 1 < policy.max_attempts => {
                    let delay = policy.delay(retry, &mut rand::thread_rng());
                    debug!(%error, retry, delay.ms = delay.as_millis() as u64, "retrying");
                    tokio::time::sleep(delay).await;
                    retry += 1;
                }
                Err(error) => return Err(error),
            }
        }
    }

    async fn connection(&self) -> Result<Conn, ClientError> {
        let inner = &self.inner;
        let mut state = inner.state.lock().await;
        let retry_after = inner.config.quic_retry_after;
        let quic_due = state
            .fell_back_at
            .is_none_or(|at| at.elapsed() >= retry_after);

        // 1. Reuse the open connection, unless it is the fallback and QUIC is due a retry.
        if let Some(conn) = state.conn.clone() {
            if conn.is_usable() && (conn.protocol() == Protocol::Http3 || !quic_due) {
                return Ok(conn);
            }
            if conn.is_usable() {
                return match self.connect_h3().await {
                    Ok(quic) => {
                        info!(server.addr = %inner.config.quic_addr, "quic reachable again");
                        state.fell_back_at = None;
                        state.conn = Some(quic.clone());
                        Ok(quic)
                    }
                    Err(error) => {
                        debug!(%error, "quic still unreachable; staying on http/2");
                        state.fell_back_at = Some(Instant::now());
                        Ok(conn)
                    }
                };
            }
            state.conn = None;
        }

        // 2. A new connection: QUIC first when due, else or on failure TCP.
        let mut quic_error = None;
        if quic_due {
            match self.connect_h3().await {
                Ok(quic) => {
                    state.fell_back_at = None;
                    state.conn = Some(quic.clone());
                    return Ok(quic);
                }
                // TCP would check the same identities: a refusal is final.
                Err(error @ ClientError::Refused(_)) => return Err(error),
                Err(error) => {
                    info!(
                        server.addr = %inner.config.quic_addr,
                        %error,
                        "quic failed; falling back to http/2 over tcp",
                    );
                    state.fell_back_at = Some(Instant::now());
                    quic_error = Some(error);
                }
            }
        }
        match self.connect_h2().await {
            Ok(tcp) => {
                state.conn = Some(tcp.clone());
                Ok(tcp)
            }
            Err(error) => {
                // Stay on TCP only while TCP works: with both down, the next attempt
                // starts with QUIC again.
                state.fell_back_at = None;
                Err(match (error, quic_error) {
                    (ClientError::Connect { protocol, reason }, Some(quic)) => {
                        let reason = format!("{reason}; before that, {quic}");
                        ClientError::Connect { protocol, reason }
                    }
                    (error, _) => error,
                })
            }
        }
    }

    async fn forget(&self, conn: &Conn) {
        let mut state = self.inner.state.lock().await;
        if state
            .conn
            .as_ref()
            .is_some_and(|c| Arc::ptr_eq(c.driver(), conn.driver()))
        {
            state.conn = None;
        }
    }

    async fn connect_h3(&self) -> Result<Conn, ClientError> {
        let inner = &self.inner;
        let error = |reason: String| ClientError::Connect {
            protocol: Protocol::Http3,
            reason,
        };
        let connect = async {
            let connecting = inner
                .endpoint
                .connect_with(inner.quic.clone(), inner.config.quic_addr, SERVER_NAME)
                .map_err(|e| error(e.to_string()))?;
            let quic = connecting.await.map_err(|e| match quic_tls_refusal(&e) {
                Some(reason) => ClientError::Refused(reason),
                None => error(e.to_string()),
            })?;
            let h3 = h3::client::new(h3_quinn::Connection::new(quic.clone()))
                .await
                .map_err(|e| error(e.to_string()))?;
            Ok::<_, ClientError>((quic, h3))
        };
        let (quic, (mut driver, send)) =
            tokio::time::timeout(inner.config.quic_connect_timeout, connect)
                .await
                .map_err(|_| error("timed out".into()))??;
        let peer = quic
            .peer_identity()
            .and_then(|any| any.downcast::<Vec<CertificateDer<'static>>>().ok())
            .and_then(|certs| PeerIdentity::from_certificate(certs.first()?).ok())
            .ok_or_else(|| error("server presented no usable identity".into()))?;
        let driver = tokio::spawn(async move {
            let closed = std::future::poll_fn(|cx| driver.poll_close(cx)).await;
            debug!(error = %closed, "http/3 connection closed");
        });
        Ok(Conn::H3 {
            send,
            quic,
            peer,
            driver: Arc::new(AbortOnDrop(driver)),
        })
    }

    async fn connect_h2(&self) -> Result<Conn, ClientError> {
        let inner = &self.inner;
        let error = |reason: String| ClientError::Connect {
            protocol: Protocol::Http2,
            reason,
        };
        let keepalive = inner.config.keepalive;
        let connect = async {
            let tcp = TcpStream::connect(inner.config.tcp_addr)
                .await
                .map_err(|e| error(e.to_string()))?;
            let _ = tcp.set_nodelay(true);
            let name = ServerName::try_from(SERVER_NAME).map_err(|e| error(e.to_string()))?;
            let tls =
                inner
                    .tcp_tls
                    .connect(name, tcp)
                    .await
                    .map_err(|e| match tls_refusal(&e) {
                        true => ClientError::Refused(e.to_string()),
                        false => error(e.to_string()),
                    })?;
            let peer = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|certs| PeerIdentity::from_certificate(certs.first()?).ok())
                .ok_or_else(|| error("server presented no usable identity".into()))?;
            let (send, connection) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .keep_alive_interval(keepalive.interval)
                .keep_alive_timeout(keepalive.timeout)
                .keep_alive_while_idle(true)
                .handshake(TokioIo::new(tls))
                .await
                .map_err(|e| error(e.to_string()))?;
            Ok::<_, ClientError>((send, connection, peer))
        };
        let (send, connection, peer) =
            tokio::time::timeout(inner.config.tcp_connect_timeout, connect)
                .await
                .map_err(|_| error("timed out".into()))??;
        let driver = tokio::spawn(async move {
            if let Err(error) = connection.await {
                debug!(%error, "http/2 connection closed");
            }
        });
        Ok(Conn::H2 {
            send,
            peer,
            driver: Arc::new(AbortOnDrop(driver)),
        })
    }
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

async fn send_h3(
    mut send: h3::client::SendRequest<h3_quinn::OpenStreams, Bytes>,
    head: http::Request<()>,
    mut body: SendBody,
    peer: &PeerIdentity,
) -> Result<ClientResponse, ClientError> {
    let mut stream = send.send_request(head).await.map_err(request_error)?;

    // A server that refuses early (413, 409) stops reading; the response still arrives.
    let mut send_error = None;
    while let Some(piece) = body.next().await {
        let piece = match piece {
            Ok(piece) => piece,
            Err(error) => {
                stream.stop_stream(h3::error::Code::H3_REQUEST_CANCELLED);
                return Err(ClientError::Body(error));
            }
        };
        if let Err(error) = stream.send_data(piece).await {
            send_error = Some(error);
            break;
        }
    }
    if send_error.is_none() {
        send_error = stream.finish().await.err();
    }
    let head = match stream.recv_response().await {
        Ok(head) => head,
        Err(error) => return Err(request_error(send_error.unwrap_or(error))),
    };
    let (_send, recv) = stream.split();
    let (parts, ()) = head.into_parts();
    Ok(ClientResponse {
        status: parts.status,
        headers: parts.headers,
        protocol: Protocol::Http3,
        peer: peer.clone(),
        body: RecvBody::new(RecvInner::H3Client(recv)),
    })
}

async fn send_h2(
    mut send: hyper::client::conn::http2::SendRequest<H2Body>,
    head: http::Request<()>,
    body: SendBody,
    peer: &PeerIdentity,
) -> Result<ClientResponse, ClientError> {
    send.ready().await.map_err(request_error)?;
    let response = send
        .send_request(head.map(|()| body.into_http_body()))
        .await
        .map_err(request_error)?;
    let (parts, body) = response.into_parts();
    Ok(ClientResponse {
        status: parts.status,
        headers: parts.headers,
        protocol: Protocol::Http2,
        peer: peer.clone(),
        body: RecvBody::new(RecvInner::H2(body)),
    })
}

fn request_error(error: impl std::error::Error + 'static) -> ClientError {
    if tls_refusal(&error) {
        return ClientError::Refused(error.to_string());
    }
    ClientError::Request(error.to_string())
}

/// Whether a QUIC connection ended in a TLS alert (QUIC crypto error codes 0x100-0x1ff),
/// sent by either side: a refused identity, not a network problem.
fn quic_tls_refusal(error: &quinn::ConnectionError) -> Option<String> {
    let code = match error {
        quinn::ConnectionError::ConnectionClosed(close) => close.error_code,
        quinn::ConnectionError::TransportError(error) => error.code,
        _ => return None,
    };
    (0x100..0x200)
        .contains(&u64::from(code))
        .then(|| error.to_string())
}

/// Whether a rustls error sits anywhere in the chain of `error`.
fn tls_refusal(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(error);
    while let Some(error) = next {
        if error.is::<rustls::Error>() {
            return true;
        }
        // io::Error::source skips the error it wraps; look inside explicitly.
        let inner = error
            .downcast_ref::<std::io::Error>()
            .and_then(|e| e.get_ref());
        if inner.is_some_and(|inner| inner.is::<rustls::Error>()) {
            return true;
        }
        next = error.source();
    }
    false
}

/// Why a client call failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The client could not be set up (socket, TLS configuration).
    #[error("client setup failed: {0}")]
    Setup(String),
    /// No connection could be made; includes refused TLS handshakes.
    #[error("cannot connect over {protocol}: {reason}")]
    Connect {
        /// The protocol tried last.
        protocol: Protocol,
        /// What failed.
        reason: String,
    },
    /// TLS refused an identity: the server refused ours, or ours refused the server's.
    /// Retrying cannot help until an SVID or bundle changes.
    #[error("tls refused the connection: {0}")]
    Refused(String),
    /// The connection or stream broke during the exchange.
    #[error("request failed: {0}")]
    Request(String),
    /// The response body broke or was too long.
    #[error("response body: {0}")]
    Response(BodyError),
    /// The body to send could not be produced (a file read failed).
    #[error("cannot produce the request body: {0}")]
    Body(std::io::Error),
    /// The path does not form a valid URI.
    #[error("invalid request path {0:?}")]
    InvalidPath(String),
    /// The server answered with a non-2xx status.
    #[error("server answered {status}: {message}")]
    Status {
        /// The status.
        status: StatusCode,
        /// The start of the body.
        message: String,
    },
    /// The server sent something this client cannot understand.
    #[error("malformed server answer: {0}")]
    Malformed(String),
    /// The object is bigger than the configured limit; nothing was sent.
    #[error("object of {size} bytes exceeds the {limit}-byte limit; nothing was sent")]
    ObjectTooLarge {
        /// The object size.
        size: u64,
        /// The limit.
        limit: u64,
    },
    /// A local file could not be read or written.
    #[error("{path}: {source}")]
    File {
        /// The file.
        path: std::path::PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
}

impl ClientError {
    /// Whether trying again later may succeed: connection trouble and server-side errors.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Connect { .. } | Self::Request(_) | Self::Response(BodyError::Stream(_)) => true,
            Self::Status { status, .. } => {
                status.is_server_error()
                    || *status == StatusCode::REQUEST_TIMEOUT
                    || *status == StatusCode::TOO_MANY_REQUESTS
            }
            _ => false,
        }
    }
}
