//! The plain-HTTP admin listener: `/healthz`, `/readyz` and `/metrics` only, for a
//! routing daemon's health check and for Prometheus. It serves nothing a store could use.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use fedmesh_protocol::wire;
use http_body_util::Full;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use super::Pop;

/// Binds `addr` and serves the admin routes until the task is aborted.
pub(super) async fn spawn(
    addr: SocketAddr,
    pop: Arc<Pop>,
) -> std::io::Result<(SocketAddr, JoinHandle<()>)> {
    let listener = TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let task = tokio::spawn(async move {
        let mut connections = tokio::task::JoinSet::new();
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let pop = Arc::clone(&pop);
            connections.spawn(async move {
                let service = service_fn(move |request| {
                    let pop = Arc::clone(&pop);
                    async move { Ok::<_, Infallible>(answer(&pop, &request)) }
                });
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
            while connections.try_join_next().is_some() {}
        }
    });
    Ok((bound, task))
}

fn answer<B>(pop: &Pop, request: &http::Request<B>) -> http::Response<Full<Bytes>> {
    let (status, content_type, body) = match (request.method(), request.uri().path()) {
        (&http::Method::GET, wire::HEALTH) => (200, "text/plain", Bytes::from_static(b"ok\n")),
        (&http::Method::GET, wire::READY) => {
            let readiness = pop.readiness();
            let status = match readiness {
                wire::Readiness::Ready => 200,
                wire::Readiness::Withdraw => 503,
            };
            let json = serde_json::to_vec(&readiness).unwrap_or_default();
            (status, "application/json", Bytes::from(json))
        }
        (&http::Method::GET, wire::METRICS) => (
            200,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            Bytes::from(pop.encode_metrics()),
        ),
        _ => (404, "text/plain", Bytes::from_static(b"no such path\n")),
    };
    let mut response = http::Response::new(Full::new(body));
    *response.status_mut() = http::StatusCode::from_u16(status).unwrap_or_default();
    if let Ok(value) = http::HeaderValue::from_str(content_type) {
        response
            .headers_mut()
            .insert(http::header::CONTENT_TYPE, value);
    }
    response
}
