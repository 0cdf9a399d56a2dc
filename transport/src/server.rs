//! The server: one [`Router`] served over HTTP/3 (QUIC) and HTTP/2 (TLS on TCP) at once.
//!
//! Every connection is mutually authenticated; handlers receive the caller's
//! [`PeerIdentity`] with each [`Request`]. A connection is closed when the peer's
//! certificate expires, and every request re-checks the expiry and, when the trust bundle
//! has changed, the chain, so neither a resumed TLS session nor a long-lived connection
//! carries an expired or no longer trusted identity past the handshake.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use futures_util::future::BoxFuture;
use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::pki_types::{CertificateDer, UnixTime};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tracing::{debug, info};

use crate::body::{Protocol, RecvBody, RecvInner, SendBody};
use crate::identity::{PeerIdentity, SvidSource, TrustBundle};
use crate::retry::KeepAlive;
use crate::tls::{self, ALPN_H2, ALPN_H3};

/// QUIC application close code for a peer whose certificate expired.
pub const CLOSE_PEER_EXPIRED: u32 = 0x1001;
/// QUIC application close code when the server stops.
pub const CLOSE_SERVER_STOPPED: u32 = 0x1002;

/// How long a TCP client has to finish its TLS handshake.
const TCP_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// An authenticated request as a handler sees it.
#[derive(Debug)]
pub struct Request {
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    peer: PeerIdentity,
    protocol: Protocol,
    params: Vec<(String, String)>,
    body: RecvBody,
}

impl Request {
    /// A request as if received from `peer`; the server builds these from the network.
    pub fn new(
        method: Method,
        uri: Uri,
        headers: HeaderMap,
        peer: PeerIdentity,
        protocol: Protocol,
        body: RecvBody,
    ) -> Self {
        Self {
            method,
            uri,
            headers,
            peer,
            protocol,
            params: Vec::new(),
            body,
        }
    }

    /// The HTTP method.
    pub fn method(&self) -> &Method {
        &self.method
    }

    /// The request URI.
    pub fn uri(&self) -> &Uri {
        &self.uri
    }

    /// The request headers.
    pub fn headers(&self) -> &HeaderMap {
        &self.headers
    }

    /// The authenticated caller.
    pub fn peer(&self) -> &PeerIdentity {
        &self.peer
    }

    /// Which HTTP version carried the request.
    pub fn protocol(&self) -> Protocol {
        self.protocol
    }

    /// The path segment matched by `{name}` in the route pattern.
    pub fn param(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.as_str())
    }

    /// The body, to read piece by piece.
    pub fn body_mut(&mut self) -> &mut RecvBody {
        &mut self.body
    }

    /// Takes the body.
    pub fn into_body(self) -> RecvBody {
        self.body
    }
}

/// A response from a handler: status, headers and a possibly streaming body.
#[derive(Debug)]
pub struct Response {
    status: StatusCode,
    headers: HeaderMap,
    body: SendBody,
}

impl Response {
    /// A response with `status` and `body`.
    pub fn new(status: StatusCode, body: SendBody) -> Self {
        Self {
            status,
            headers: HeaderMap::new(),
            body,
        }
    }

    /// A plain-text response; used for errors a person reads.
    pub fn text(status: StatusCode, text: impl Into<String>) -> Self {
        Self::new(status, SendBody::from_bytes(Bytes::from(text.into()))).with_header(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain"),
        )
    }

    /// A JSON response.
    pub fn json<T: serde::Serialize>(status: StatusCode, value: &T) -> Self {
        match serde_json::to_vec(value) {
            Ok(bytes) => Self::new(status, SendBody::from_bytes(bytes)).with_header(
                http::header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            ),
            Err(e) => Self::text(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("cannot encode: {e}"),
            ),
        }
    }

    /// Adds a header.
    pub fn with_header(mut self, name: HeaderName, value: HeaderValue) -> Self {
        self.headers.append(name, value);
        self
    }

    /// The status code.
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// The headers.
    pub fn headers(&self) -> &HeaderMap {
        &self.headers
    }

    fn into_parts(self) -> (http::Response<()>, SendBody) {
        let mut head = http::Response::new(());
        *head.status_mut() = self.status;
        *head.headers_mut() = self.headers;
        (head, self.body)
    }
}

type Handler = Arc<dyn Fn(Request) -> BoxFuture<'static, Response> + Send + Sync>;

struct Route {
    method: Method,
    segments: Vec<Segment>,
    handler: Handler,
}

enum Segment {
    Literal(String),
    Param(String),
}

/// Routes `(method, path)` to async handlers. Patterns are literal segments and `{name}`
/// segments, each matching one path segment: `/objects/{digest}/chunks`.
#[derive(Default)]
pub struct Router {
    routes: Vec<Route>,
}

impl Router {
    /// An empty router: every request gets 404.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a route.
    pub fn route<H, F>(mut self, method: Method, pattern: &str, handler: H) -> Self
    where
        H: Fn(Request) -> F + Send + Sync + 'static,
        F: Future<Output = Response> + Send + 'static,
    {
        let segments = split_path(pattern)
            .map(
                |segment| match segment.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
                    Some(name) => Segment::Param(name.to_owned()),
                    None => Segment::Literal(segment.to_owned()),
                },
            )
            .collect();
        let handler: Handler = Arc::new(move |request| Box::pin(handler(request)));
        self.routes.push(Route {
            method,
            segments,
            handler,
        });
        self
    }

    /// Runs the handler for `request`: 404 when no pattern matches its path, 405 when one
    /// does but not for its method.
    pub async fn dispatch(&self, mut request: Request) -> Response {
        let path_string = request.uri.path().to_owned();
        let path: Vec<&str> = split_path(&path_string).collect();
        let mut path_matched = false;
        for route in &self.routes {
            let Some(params) = route.matches(&path) else {
                continue;
            };
            path_matched = true;
            if route.method != request.method {
                continue;
            }
            request.params = params;
            return (route.handler)(request).await;
        }
        if path_matched {
            Response::text(
                StatusCode::METHOD_NOT_ALLOWED,
                "method not allowed on this path",
            )
        } else {
            Response::text(StatusCode::NOT_FOUND, "no such path")
        }
    }
}

impl Route {
    fn matches(&self, path: &[&str]) -> Option<Vec<(String, String)>> {
        if path.len() != self.segments.len() {
            return None;
        }
        let mut params = Vec::new();
        for (segment, actual) in self.segments.iter().zip(path) {
            match segment {
                Segment::Literal(literal) if literal.as_str() == *actual => {}
                Segment::Literal(_) => return None,
                Segment::Param(name) => params.push((name.clone(), (*actual).to_owned())),
            }
        }
        Some(params)
    }
}

fn split_path(path: &str) -> impl Iterator<Item = &str> {
    path.split('/').filter(|segment| !segment.is_empty())
}

/// Where and how a [`Server`] listens.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// UDP address for HTTP/3.
    pub quic_addr: SocketAddr,
    /// TCP address for the HTTP/2 fallback; `None` serves HTTP/3 only.
    pub tcp_addr: Option<SocketAddr>,
    /// Keepalive timing for both protocols.
    pub keepalive: KeepAlive,
    /// The key QUIC stateless resets are derived from; `None`: a random key of this
    /// process. See [`ResetKey`].
    pub stateless_reset_key: Option<ResetKey>,
}

impl ServerConfig {
    /// HTTP/3 on UDP `addr` and HTTP/2 on TCP `addr`, default keepalives, a reset key of
    /// this process.
    pub fn new(addr: SocketAddr) -> Self {
        Self {
            quic_addr: addr,
            tcp_addr: Some(addr),
            keepalive: KeepAlive::default(),
            stateless_reset_key: None,
        }
    }
}

/// The secret QUIC stateless-reset tokens are computed from (RFC 9000, section 10.3: a
/// token is an HMAC of the connection ID under this key).
///
/// Servers behind one anycast address share it. When one of them dies, the client's next
/// packets reach another, which knows no such connection and answers with a stateless
/// reset that the client accepts, because the token matches the one the dead server
/// issued: the client reconnects at once instead of waiting out its idle timeout. The
/// servers' connection-ID generators share a key derived from it too, since a server
/// ignores packets for connection IDs it could not have issued. Anyone holding the key can
/// reset those servers' connections, so keep it as secret as a TLS key.
#[derive(Clone)]
pub struct ResetKey([u8; 32]);

impl ResetKey {
    /// A key from its 32 bytes.
    pub fn new(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// Parses 64 hexadecimal digits (surrounding whitespace ignored), as
    /// `openssl rand -hex 32` writes them.
    ///
    /// # Errors
    /// A message saying what is wrong with the text (never the text itself).
    pub fn from_hex(text: &str) -> Result<Self, String> {
        let text = text.trim();
        if text.len() != 64 {
            return Err(format!(
                "expected 64 hex digits, found {} characters",
                text.len()
            ));
        }
        let mut bytes = [0u8; 32];
        hex::decode_to_slice(text, &mut bytes).map_err(|_| "not hexadecimal".to_owned())?;
        Ok(Self(bytes))
    }
}

impl ResetKey {
    /// Sets both secrets an anycast peer needs to reset this server's connections: the
    /// reset-token key, and the key of the connection-ID generator (a peer drops packets
    /// whose connection IDs it did not generate before it considers a reset). The latter
    /// is derived from the former, labelled, so neither reveals the other.
    fn configure(&self, endpoint: &mut quinn::EndpointConfig) {
        let hmac = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &self.0);
        let tag = ring::hmac::sign(&hmac, b"fedmesh connection-id generator");
        let mut cid_key = [0u8; 8];
        cid_key.copy_from_slice(&tag.as_ref()[..8]);
        let cid_key = u64::from_le_bytes(cid_key);
        let reset = ring::hmac::sign(&hmac, b"fedmesh stateless reset");
        endpoint
            .reset_key(Arc::new(ring::hmac::Key::new(
                ring::hmac::HMAC_SHA256,
                reset.as_ref(),
            )))
            .cid_generator(move || {
                Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key))
            });
    }
}

impl std::fmt::Debug for ResetKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ResetKey(..)")
    }
}

/// A running server. Dropping it stops it at once, like a killed process: connections
/// close without waiting for requests in flight.
pub struct Server {
    quic_addr: SocketAddr,
    tcp_addr: Option<SocketAddr>,
    endpoint: quinn::Endpoint,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Server {
    /// Binds both listeners and starts serving `router`.
    ///
    /// # Errors
    /// [`ServerError`] when a socket cannot be bound or the TLS setup fails.
    pub async fn bind(
        config: ServerConfig,
        source: Arc<dyn SvidSource>,
        router: Router,
    ) -> Result<Self, ServerError> {
        let shared = Arc::new(Shared {
            router,
            source: Arc::clone(&source),
        });

        // 1. HTTP/3 on QUIC.
        let tls = tls::server_config(&source, ALPN_H3)?;
        let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls)
            .map_err(|e| ServerError::Tls(rustls::Error::General(e.to_string())))?;
        let mut quic = quinn::ServerConfig::with_crypto(Arc::new(crypto));
        quic.transport_config(Arc::new(transport_config(config.keepalive)?));
        let mut endpoint_config = quinn::EndpointConfig::default();
        if let Some(key) = &config.stateless_reset_key {
            key.configure(&mut endpoint_config);
        }
        let bind_error = |source| ServerError::Bind {
            addr: config.quic_addr,
            source,
        };
        let socket = std::net::UdpSocket::bind(config.quic_addr).map_err(bind_error)?;
        let endpoint = quinn::Endpoint::new(
            endpoint_config,
            Some(quic),
            socket,
            Arc::new(quinn::TokioRuntime),
        )
        .map_err(bind_error)?;
        let quic_addr = endpoint.local_addr().map_err(|source| ServerError::Bind {
            addr: config.quic_addr,
            source,
        })?;
        let mut tasks = vec![tokio::spawn(accept_quic(
            endpoint.clone(),
            Arc::clone(&shared),
        ))];

        // 2. HTTP/2 on TCP, same identities and routes.
        let mut tcp_addr = None;
        if let Some(addr) = config.tcp_addr {
            let listener = TcpListener::bind(addr)
                .await
                .map_err(|source| ServerError::Bind { addr, source })?;
            tcp_addr = Some(
                listener
                    .local_addr()
                    .map_err(|source| ServerError::Bind { addr, source })?,
            );
            let tls = Arc::new(tls::server_config(&source, ALPN_H2)?);
            let acceptor = tokio_rustls::TlsAcceptor::from(tls);
            tasks.push(tokio::spawn(accept_tcp(
                listener,
                acceptor,
                shared,
                config.keepalive,
            )));
        }
        debug!(quic.addr = %quic_addr, tcp.addr = ?tcp_addr, "server listening");
        Ok(Self {
            quic_addr,
            tcp_addr,
            endpoint,
            tasks,
        })
    }

    /// The bound UDP address.
    pub fn quic_addr(&self) -> SocketAddr {
        self.quic_addr
    }

    /// The bound TCP address, if the fallback is served.
    pub fn tcp_addr(&self) -> Option<SocketAddr> {
        self.tcp_addr
    }

    /// Open QUIC connections.
    pub fn quic_connections(&self) -> usize {
        self.endpoint.open_connections()
    }

    /// Stops at once and waits (up to a second) until the UDP socket is released.
    pub async fn abort(mut self) {
        self.stop();
        let _ = tokio::time::timeout(Duration::from_secs(1), self.endpoint.wait_idle()).await;
    }

    fn stop(&mut self) {
        self.endpoint.close(
            quinn::VarInt::from_u32(CLOSE_SERVER_STOPPED),
            b"server stopped",
        );
        for task in self.tasks.drain(..) {
            task.abort();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}

pub(crate) fn transport_config(
    keepalive: KeepAlive,
) -> Result<quinn::TransportConfig, ServerError> {
    let timeout = quinn::IdleTimeout::try_from(keepalive.timeout)
        .map_err(|_| ServerError::KeepAlive(keepalive.timeout))?;
    let mut transport = quinn::TransportConfig::default();
    transport
        .keep_alive_interval(Some(keepalive.interval))
        .max_idle_timeout(Some(timeout));
    Ok(transport)
}

async fn accept_quic(endpoint: quinn::Endpoint, shared: Arc<Shared>) {
    // Connection tasks live in the set, so aborting this task ends them all.
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            incoming = endpoint.accept() => {
                let Some(incoming) = incoming else { return };
                connections.spawn(serve_quic(incoming, Arc::clone(&shared)));
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

async fn serve_quic(incoming: quinn::Incoming, shared: Arc<Shared>) {
    let remote = incoming.remote_address();
    let conn = match incoming.await {
        Ok(conn) => conn,
        Err(error) => {
            // Refused client certificates end here; the peer has no identity to log.
            info!(client.addr = %remote, %error, "quic handshake refused");
            return;
        }
    };
    let Some(peer) = quic_peer(&conn).map(Arc::new) else {
        conn.close(quinn::VarInt::from_u32(0x1003), b"no peer identity");
        return;
    };
    let mut h3 = match h3::server::builder()
        .build::<_, Bytes>(h3_quinn::Connection::new(conn.clone()))
        .await
    {
        Ok(h3) => h3,
        Err(error) => {
            debug!(peer.id = %peer.identity, %error, "http/3 setup failed");
            return;
        }
    };

    let expiry = tokio::time::sleep(until(peer.identity.not_after()));
    tokio::pin!(expiry);
    let mut requests = JoinSet::new();
    loop {
        tokio::select! {
            () = &mut expiry => {
                info!(peer.id = %peer.identity, "closing connection: peer certificate expired");
                let code = quinn::VarInt::from_u32(CLOSE_PEER_EXPIRED);
                conn.close(code, b"peer certificate expired");
                return;
            }
            accepted = h3.accept() => match accepted {
                Ok(Some(resolver)) => {
                    let (peer, shared) = (Arc::clone(&peer), Arc::clone(&shared));
                    requests.spawn(serve_h3_request(resolver, peer, shared));
                }
                Ok(None) => break,
                Err(error) => {
                    debug!(peer.id = %peer.identity, %error, "http/3 connection ended");
                    break;
                }
            },
            Some(_) = requests.join_next(), if !requests.is_empty() => {}
        }
    }
    while requests.join_next().await.is_some() {}
}

type H3Resolver = h3::server::RequestResolver<h3_quinn::Connection, Bytes>;

async fn serve_h3_request(resolver: H3Resolver, peer: Arc<ConnectionPeer>, shared: Arc<Shared>) {
    let (head, stream) = match resolver.resolve_request().await {
        Ok(resolved) => resolved,
        Err(error) => {
            debug!(peer.id = %peer.identity, %error, "bad http/3 request");
            return;
        }
    };
    let (mut send, recv) = stream.split();
    let (parts, ()) = head.into_parts();
    let body = RecvBody::new(RecvInner::H3Server(recv));
    let request = Request::new(
        parts.method,
        parts.uri,
        parts.headers,
        peer.identity.clone(),
        Protocol::Http3,
        body,
    );

    let (head, mut body) = handle(&shared, &peer, request).await.into_parts();
    if let Err(error) = send.send_response(head).await {
        debug!(%error, "cannot send http/3 response");
        return;
    }
    while let Some(piece) = body.next().await {
        let sent = match piece {
            Ok(bytes) => send.send_data(bytes).await,
            Err(error) => {
                debug!(%error, "response body failed; resetting the stream");
                send.stop_stream(h3::error::Code::H3_INTERNAL_ERROR);
                return;
            }
        };
        if let Err(error) = sent {
            debug!(%error, "cannot send http/3 response body");
            return;
        }
    }
    if let Err(error) = send.finish().await {
        debug!(%error, "cannot finish http/3 response");
    }
}

async fn accept_tcp(
    listener: TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    shared: Arc<Shared>,
    keepalive: KeepAlive,
) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let acceptor = acceptor.clone();
                    connections.spawn(serve_tcp(stream, acceptor, Arc::clone(&shared), keepalive));
                }
                Err(error) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    debug!(%error, "tcp accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

async fn serve_tcp(
    stream: TcpStream,
    acceptor: tokio_rustls::TlsAcceptor,
    shared: Arc<Shared>,
    keepalive: KeepAlive,
) {
    let remote = stream.peer_addr().ok();
    let _ = stream.set_nodelay(true);
    let tls = match tokio::time::timeout(TCP_HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(error)) => {
            info!(client.addr = ?remote, %error, "tls handshake refused");
            return;
        }
        Err(_) => {
            debug!(client.addr = ?remote, "tls handshake timed out");
            return;
        }
    };
    let chain = tls.get_ref().1.peer_certificates().map(<[_]>::to_vec);
    let Some(peer) = chain.and_then(ConnectionPeer::new).map(Arc::new) else {
        return;
    };

    let expiry_at = until(peer.identity.not_after());
    let service_peer = Arc::clone(&peer);
    let service =
        hyper::service::service_fn(move |request: http::Request<hyper::body::Incoming>| {
            let shared = Arc::clone(&shared);
            let peer = Arc::clone(&service_peer);
            async move {
                let (parts, body) = request.into_parts();
                let body = RecvBody::new(RecvInner::H2(body));
                let request = Request::new(
                    parts.method,
                    parts.uri,
                    parts.headers,
                    peer.identity.clone(),
                    Protocol::Http2,
                    body,
                );
                let (head, body) = handle(&shared, &peer, request).await.into_parts();
                Ok::<_, Infallible>(head.map(|()| body.into_http_body()))
            }
        });
    let connection = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .keep_alive_interval(Some(keepalive.interval))
        .keep_alive_timeout(keepalive.timeout)
        .serve_connection(TokioIo::new(tls), service);
    tokio::select! {
        result = connection => {
            if let Err(error) = result {
                debug!(peer.id = %peer.identity, %error, "http/2 connection ended");
            }
        }
        () = tokio::time::sleep(expiry_at) => {
            // Dropping the connection closes the socket.
            info!(peer.id = %peer.identity, "closing connection: peer certificate expired");
        }
    }
}

/// What every connection task of a server shares.
struct Shared {
    router: Router,
    source: Arc<dyn SvidSource>,
}

/// The authenticated peer of one connection and the chain it presented.
struct ConnectionPeer {
    identity: PeerIdentity,
    chain: Vec<CertificateDer<'static>>,
    /// The bundle the chain was last verified against; `None` until the first request.
    verified_with: std::sync::Mutex<Option<Arc<TrustBundle>>>,
}

impl ConnectionPeer {
    fn new(chain: Vec<CertificateDer<'static>>) -> Option<Self> {
        let identity = PeerIdentity::from_certificate(chain.first()?).ok()?;
        Some(Self {
            identity,
            chain,
            verified_with: Default::default(),
        })
    }

    /// Checks, at the application layer, that the peer may still be served: its
    /// certificate has not expired, and its chain still verifies against the current
    /// bundle. TLS session resumption skips certificate verification, and a CA removed
    /// from the bundle must stop open connections too; re-verifying only when the bundle
    /// changed keeps the common case to one pointer comparison.
    fn check(&self, source: &dyn SvidSource) -> Result<(), String> {
        let now = SystemTime::now();
        if self.identity.is_expired_at(now) {
            return Err("peer certificate expired".into());
        }
        let bundle = source.bundle();
        let mut verified_with = self.verified_with.lock().unwrap_or_else(|e| e.into_inner());
        if verified_with
            .as_ref()
            .is_some_and(|last| Arc::ptr_eq(last, &bundle))
        {
            return Ok(());
        }
        let Some((leaf, intermediates)) = self.chain.split_first() else {
            return Err("peer presented no certificate".into());
        };
        bundle
            .client_verifier()
            .verify_client_cert(leaf, intermediates, UnixTime::now())
            .map_err(|e| format!("peer no longer trusted: {e}"))?;
        self.identity
            .check(bundle.trust_domain(), now)
            .map_err(|e| e.to_string())?;
        *verified_with = Some(bundle);
        Ok(())
    }
}

/// Runs the handler once the peer passes [`ConnectionPeer::check`].
async fn handle(shared: &Shared, peer: &ConnectionPeer, request: Request) -> Response {
    if let Err(reason) = peer.check(shared.source.as_ref()) {
        info!(peer.id = %peer.identity, %reason, "request refused");
        return Response::text(StatusCode::UNAUTHORIZED, reason);
    }
    shared.router.dispatch(request).await
}

fn quic_peer(conn: &quinn::Connection) -> Option<ConnectionPeer> {
    let identity = conn.peer_identity()?;
    let chain = identity.downcast::<Vec<CertificateDer<'static>>>().ok()?;
    ConnectionPeer::new(*chain)
}

/// Time from now until `at`, zero if passed, capped at a year so timers stay in range.
pub(crate) fn until(at: SystemTime) -> Duration {
    let left = at
        .duration_since(SystemTime::now())
        .unwrap_or(Duration::ZERO);
    left.min(Duration::from_secs(365 * 24 * 3600))
}

/// Why a server could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServerError {
    /// A socket could not be bound.
    #[error("cannot bind {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The TLS configuration was refused.
    #[error("tls setup failed: {0}")]
    Tls(#[from] rustls::Error),
    /// The keepalive timeout is outside what QUIC can express.
    #[error("keepalive timeout {0:?} is out of range")]
    KeepAlive(Duration),
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use rustls::pki_types::pem::PemObject;

    use super::*;
    use crate::pki::{CertificateAuthority, Validity};

    fn store_peer() -> PeerIdentity {
        let td = spiffe::TrustDomain::new("fl.example").expect("valid trust domain");
        let ca = CertificateAuthority::new(&td, Validity::starting_now(Duration::from_secs(600)))
            .expect("ca");
        let issued = ca
            .issue(
                "/store/emea/0042",
                Validity::starting_now(Duration::from_secs(600)),
            )
            .expect("svid");
        let der = CertificateDer::from_pem_slice(issued.chain_pem.as_bytes()).expect("pem");
        PeerIdentity::from_certificate(&der).expect("identity")
    }

    fn request(method: Method, path: &str) -> Request {
        let uri = path.parse().expect("uri");
        Request::new(
            method,
            uri,
            HeaderMap::new(),
            store_peer(),
            Protocol::Http3,
            RecvBody::empty(),
        )
    }

    fn router() -> Router {
        Router::new()
            .route(
                Method::GET,
                "/rounds/{round}/plan",
                |r: Request| async move {
                    let round = r.param("round").unwrap_or_default().to_owned();
                    Response::text(
                        StatusCode::OK,
                        format!("plan {round} for {}", r.peer().path()),
                    )
                },
            )
            .route(Method::PUT, "/rounds/{round}/plan", |_: Request| async {
                Response::text(StatusCode::CREATED, "stored")
            })
    }

    async fn text(response: Response) -> String {
        let (_, mut body) = response.into_parts();
        let mut out = Vec::new();
        while let Some(piece) = body.next().await {
            out.extend_from_slice(&piece.expect("body piece"));
        }
        String::from_utf8(out).expect("utf-8")
    }

    #[tokio::test]
    async fn routes_by_method_and_path_and_hands_over_parameters() {
        let router = router();
        let get = router
            .dispatch(request(Method::GET, "/rounds/17/plan"))
            .await;
        assert_eq!(get.status(), StatusCode::OK);
        assert_eq!(text(get).await, "plan 17 for /store/emea/0042");
        let put = router
            .dispatch(request(Method::PUT, "/rounds/17/plan"))
            .await;
        assert_eq!(put.status(), StatusCode::CREATED);
    }

    #[tokio::test]
    async fn answers_405_for_known_path_and_404_for_unknown() {
        let router = router();
        let delete = router
            .dispatch(request(Method::DELETE, "/rounds/17/plan"))
            .await;
        assert_eq!(delete.status(), StatusCode::METHOD_NOT_ALLOWED);
        let unknown = router
            .dispatch(request(Method::GET, "/rounds/17/plan/extra"))
            .await;
        assert_eq!(unknown.status(), StatusCode::NOT_FOUND);
    }
}
