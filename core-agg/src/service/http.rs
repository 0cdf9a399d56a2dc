//! The HTTP API over fedmesh-transport, and the one task that drives [`Core`].
//!
//! Handlers check who is calling and parse the body, then hand a job to the driver task,
//! which owns the core, reads the clock, runs the job and ticks every 100 ms. Access:
//! requests carrying [`wire::STORE_HEADER`] are taken only from PoPs (`/pop/<metro>`);
//! store-relayed routes require that header; partial sums only from PoPs; operator routes
//! (status, ledger, metrics, models, blobs, announcements without a store) from any peer of
//! the trust domain, which the transport has already checked.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use fedmesh_protocol::ids::{ModelVersion, Region, RoundId, StoreId};
use fedmesh_protocol::wire::{self, SecAggStep, StoreMessage, Workload};
use fedmesh_transport::server::{Request, Response};
use fedmesh_transport::{FileSvidSource, Router, SendBody, Server, ServerConfig, SvidPaths};
use http::{Method, StatusCode};
use tokio::sync::{mpsc, oneshot};

use super::config::Config;
use super::core::{Core, Refusal};

/// How often the driver ticks.
const TICK: Duration = Duration::from_millis(100);
/// Largest partial-sum body accepted, bytes.
const MAX_PARTIAL_SUM: usize = 256 << 20;

/// Why the service could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The core state or a file is unusable.
    #[error(transparent)]
    Start(#[from] super::core::StartError),
    /// The SVID could not be loaded.
    #[error("identity: {0}")]
    Identity(#[from] fedmesh_transport::IdentityError),
    /// A listener could not be bound.
    #[error("listen: {0}")]
    Server(#[from] fedmesh_transport::ServerError),
}

type Job = Box<dyn FnOnce(&mut Core, u64) -> Response + Send>;

/// The handlers' way into the driver task.
#[derive(Clone)]
struct Driver {
    jobs: mpsc::Sender<(Job, oneshot::Sender<Response>)>,
}

impl Driver {
    async fn run(&self, job: impl FnOnce(&mut Core, u64) -> Response + Send + 'static) -> Response {
        let (reply, answer) = oneshot::channel();
        if self.jobs.send((Box::new(job), reply)).await.is_err() {
            return unavailable();
        }
        answer.await.unwrap_or_else(|_| unavailable())
    }

    /// Counts a refusal made before the core was reached, and answers it.
    async fn refuse(&self, refusal: Refusal) -> Response {
        self.run(move |core, _| {
            core.refused_at_door(&refusal.body.reason);
            refused(&refusal)
        })
        .await
    }
}

/// A running core service.
pub struct Running {
    server: Server,
    driver: tokio::task::JoinHandle<()>,
}

impl Running {
    /// The UDP (HTTP/3) address.
    pub fn quic_addr(&self) -> SocketAddr {
        self.server.quic_addr()
    }

    /// The TCP (HTTP/2 fallback) address.
    pub fn tcp_addr(&self) -> Option<SocketAddr> {
        self.server.tcp_addr()
    }

    /// Stops at once, as a killed process would: nothing is flushed beyond what each step
    /// already saved.
    pub async fn stop(self) {
        self.driver.abort();
        let _ = self.driver.await;
        self.server.abort().await;
    }

    /// Runs until the driver task ends (it does not, unless it panics).
    pub async fn wait(self) {
        let _ = self.driver.await;
    }
}

/// Opens the state, binds the listeners and starts the driver.
///
/// # Errors
///
/// [`ServeError`] when the config's files, the identity or the address are unusable.
pub async fn start(config: Config) -> Result<Running, ServeError> {
    let source = FileSvidSource::load(SvidPaths::in_dir(&config.identity_dir))?;
    let _watch = source.watch(Duration::from_secs(5));
    let listen = config.listen;
    let mut core = Core::open(config, now_ms())?;

    let (jobs, mut inbox) = mpsc::channel::<(Job, oneshot::Sender<Response>)>(1024);
    let driver = tokio::spawn(async move {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    if let Err(e) = core.tick(now_ms()) {
                        tracing::error!(error = %e, "core state could not be saved");
                    }
                }
                job = inbox.recv() => {
                    let Some((job, reply)) = job else { break };
                    let _ = reply.send(job(&mut core, now_ms()));
                }
            }
        }
    });
    let router = routes(Driver { jobs });
    let server = Server::bind(ServerConfig::new(listen), source, router).await?;
    tracing::info!(quic.addr = %server.quic_addr(), tcp.addr = ?server.tcp_addr(),
        "core listening");
    Ok(Running { server, driver })
}

/// Unix milliseconds: the only clock core reads.
fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn routes(driver: Driver) -> Router {
    let d = Arc::new(driver);
    let router = Router::new();
    let router = {
        let d = Arc::clone(&d);
        router.route(Method::GET, wire::ROUND, move |r| round(Arc::clone(&d), r))
    };
    let router = {
        let d = Arc::clone(&d);
        router.route(Method::POST, "/v1/rounds/{round}/secagg", move |r| {
            secagg_post(Arc::clone(&d), r)
        })
    };
    let router = {
        let d = Arc::clone(&d);
        router.route(Method::GET, "/v1/rounds/{round}/secagg/{step}", move |r| {
            secagg_get(Arc::clone(&d), r)
        })
    };
    let router = {
        let d = Arc::clone(&d);
        router.route(Method::GET, "/v1/rounds/{round}/receipt", move |r| {
            receipt(Arc::clone(&d), r)
        })
    };
    let router = {
        let d = Arc::clone(&d);
        router.route(Method::POST, "/v1/rounds/{round}/evaluation", move |r| {
            evaluation(Arc::clone(&d), r)
        })
    };
    let router = {
        let d = Arc::clone(&d);
        router.route(Method::POST, "/v1/rounds/{round}/partial-sums", move |r| {
            partial_sums(Arc::clone(&d), r)
        })
    };
    let router = {
        let d = Arc::clone(&d);
        router.route(Method::GET, "/v1/status", move |_| {
            let d = Arc::clone(&d);
            async move {
                d.run(|core, now| Response::json(StatusCode::OK, &core.status(now)))
                    .await
            }
        })
    };
    let router = {
        let d = Arc::clone(&d);
        router.route(Method::GET, wire::LEDGER, move |_| {
            let d = Arc::clone(&d);
            async move {
                d.run(|core, now| Response::json(StatusCode::OK, &core.ledger_snapshot(now)))
                    .await
            }
        })
    };
    let router = {
        let d = Arc::clone(&d);
        router.route(Method::GET, wire::METRICS, move |_| {
            let d = Arc::clone(&d);
            async move {
                d.run(|core, _| Response::text(StatusCode::OK, core.metrics_text()))
                    .await
            }
        })
    };
    let router = {
        let d = Arc::clone(&d);
        router.route(Method::GET, "/v1/models/{model}/current", move |r| {
            let d = Arc::clone(&d);
            let model = r.param("model").unwrap_or_default().to_owned();
            async move {
                d.run(move |core, _| match core.model_current(&model) {
                    Some(pointer) => Response::json(StatusCode::OK, &pointer),
                    None => not_found("no such model or no current version"),
                })
                .await
            }
        })
    };
    let router = {
        let d = Arc::clone(&d);
        router.route(
            Method::GET,
            "/v1/models/{model}/versions/{version}",
            move |r| {
                let d = Arc::clone(&d);
                let model = r.param("model").unwrap_or_default().to_owned();
                let version = r.param("version").and_then(|v| v.parse::<u64>().ok());
                async move {
                    let Some(version) = version else {
                        return not_found("no such version");
                    };
                    d.run(
                        move |core, _| match core.manifest(&model, ModelVersion(version)) {
                            Some(signed) => Response::json(StatusCode::OK, &signed),
                            None => not_found("no such version"),
                        },
                    )
                    .await
                }
            },
        )
    };
    let router = {
        let d = Arc::clone(&d);
        router.route(Method::GET, "/v1/blobs/{sha256}", move |r| {
            let d = Arc::clone(&d);
            let sha = r.param("sha256").unwrap_or_default().to_owned();
            async move {
                d.run(move |core, _| match core.blob(&sha) {
                    Some(bytes) => Response::new(StatusCode::OK, SendBody::from_bytes(bytes)),
                    None => not_found("no such blob"),
                })
                .await
            }
        })
    };
    router.route(Method::GET, wire::HEALTH, |_| async {
        Response::text(StatusCode::OK, "ok")
    })
}

// ----- handlers -----

async fn round(d: Arc<Driver>, request: Request) -> Response {
    let store = match relayed_store(&request) {
        Ok(store) => store,
        Err(refusal) => return d.refuse(refusal).await,
    };
    d.run(move |core, now| match core.announcement(now, store) {
        Some(announcement) => Response::json(StatusCode::OK, &announcement),
        None => Response::new(StatusCode::NO_CONTENT, SendBody::empty()),
    })
    .await
}

async fn secagg_post(d: Arc<Driver>, mut request: Request) -> Response {
    let (store, round) = match store_and_round(&request) {
        Ok(found) => found,
        Err(refusal) => return d.refuse(refusal).await,
    };
    let message: StoreMessage = match json_body(&mut request).await {
        Ok(message) => message,
        Err(refusal) => return d.refuse(refusal).await,
    };
    d.run(
        move |core, now| match core.secagg_message(now, round, &store, message) {
            Ok(()) => Response::new(StatusCode::ACCEPTED, SendBody::empty()),
            Err(refusal) => refused(&refusal),
        },
    )
    .await
}

async fn secagg_get(d: Arc<Driver>, request: Request) -> Response {
    let (store, round) = match store_and_round(&request) {
        Ok(found) => found,
        Err(refusal) => return d.refuse(refusal).await,
    };
    let Some(step) = request.param("step").and_then(SecAggStep::parse) else {
        return not_found("no such step");
    };
    d.run(
        move |core, _| match core.secagg_reply(round, step, &store) {
            Ok(Some(reply)) => Response::json(StatusCode::OK, &reply),
            Ok(None) => Response::new(StatusCode::NO_CONTENT, SendBody::empty()),
            Err(refusal) => refused(&refusal),
        },
    )
    .await
}

async fn receipt(d: Arc<Driver>, request: Request) -> Response {
    let (store, round) = match store_and_round(&request) {
        Ok(found) => found,
        Err(refusal) => return d.refuse(refusal).await,
    };
    d.run(move |core, now| Response::json(StatusCode::OK, &core.receipt(now, round, &store)))
        .await
}

async fn evaluation(d: Arc<Driver>, mut request: Request) -> Response {
    let (store, round) = match store_and_round(&request) {
        Ok(found) => found,
        Err(refusal) => return d.refuse(refusal).await,
    };
    let report: wire::EvaluationReport = match json_body(&mut request).await {
        Ok(report) => report,
        Err(refusal) => return d.refuse(refusal).await,
    };
    d.run(
        move |core, now| match core.evaluation(now, round, &store, report) {
            Ok(()) => Response::new(StatusCode::ACCEPTED, SendBody::empty()),
            Err(refusal) => refused(&refusal),
        },
    )
    .await
}

async fn partial_sums(d: Arc<Driver>, mut request: Request) -> Response {
    let checked = (|| {
        let Some(Workload::Pop(metro)) = Workload::from_path(request.peer().path()) else {
            return Err(refusal(
                StatusCode::FORBIDDEN,
                "not-a-pop",
                "partial sums come from PoPs",
            ));
        };
        let round = round_param(&request)?;
        let header: wire::PartialSumHeader = request
            .headers()
            .get(wire::PARTIAL_SUM_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| serde_json::from_str(v).ok())
            .ok_or_else(|| {
                refusal(
                    StatusCode::BAD_REQUEST,
                    "bad-header",
                    "missing or malformed partial-sum header",
                )
            })?;
        if header.pop != metro {
            return Err(refusal(
                StatusCode::FORBIDDEN,
                "pop-mismatch",
                "header names another PoP",
            ));
        }
        Ok((round, header))
    })();
    let (round, header) = match checked {
        Ok(found) => found,
        Err(refusal) => return d.refuse(refusal).await,
    };
    let body = match request.body_mut().to_bytes(MAX_PARTIAL_SUM).await {
        Ok(body) => body.to_vec(),
        Err(e) => {
            return d
                .refuse(refusal(StatusCode::BAD_REQUEST, "bad-body", e.to_string()))
                .await;
        }
    };
    d.run(
        move |core, now| match core.partial_sum(now, round, header, body) {
            Ok(ack) => Response::json(StatusCode::OK, &ack),
            Err(refusal) => refused(&refusal),
        },
    )
    .await
}

// ----- checks -----

/// The store a PoP relays for, from [`wire::STORE_HEADER`]; `None` when absent.
fn relayed_store(request: &Request) -> Result<Option<(StoreId, Region)>, Refusal> {
    let Some(value) = request.headers().get(wire::STORE_HEADER) else {
        return Ok(None);
    };
    if !matches!(
        Workload::from_path(request.peer().path()),
        Some(Workload::Pop(_))
    ) {
        return Err(refusal(
            StatusCode::FORBIDDEN,
            "store-header-from-non-pop",
            "only a PoP may relay for a store",
        ));
    }
    let bad = || {
        refusal(
            StatusCode::BAD_REQUEST,
            "bad-store-header",
            "not a store SPIFFE ID",
        )
    };
    let value = value.to_str().map_err(|_| bad())?;
    let rest = value.strip_prefix("spiffe://").ok_or_else(bad)?;
    let (domain, path) = rest.split_at(rest.find('/').ok_or_else(bad)?);
    if domain != request.peer().trust_domain() {
        return Err(bad());
    }
    match Workload::from_path(path) {
        Some(Workload::Store(region, store)) => Ok(Some((store, region))),
        _ => Err(bad()),
    }
}

fn store_and_round(request: &Request) -> Result<(StoreId, RoundId), Refusal> {
    let store = relayed_store(request)?.ok_or_else(|| {
        refusal(
            StatusCode::FORBIDDEN,
            "store-header-required",
            "this route is relayed by a PoP for a store",
        )
    })?;
    Ok((store.0, round_param(request)?))
}

fn round_param(request: &Request) -> Result<RoundId, Refusal> {
    request
        .param("round")
        .and_then(|r| r.parse().ok())
        .map(RoundId)
        .ok_or_else(|| {
            refusal(
                StatusCode::BAD_REQUEST,
                "bad-round",
                "round is not a number",
            )
        })
}

async fn json_body<T: serde::de::DeserializeOwned>(request: &mut Request) -> Result<T, Refusal> {
    let body = request
        .body_mut()
        .to_bytes(wire::MAX_JSON_BODY)
        .await
        .map_err(|e| refusal(StatusCode::BAD_REQUEST, "bad-body", e.to_string()))?;
    serde_json::from_slice(&body)
        .map_err(|e| refusal(StatusCode::BAD_REQUEST, "bad-json", e.to_string()))
}

fn refusal(status: StatusCode, reason: &str, message: impl Into<String>) -> Refusal {
    Refusal {
        status,
        body: wire::ApiError {
            reason: reason.into(),
            message: message.into(),
        },
    }
}

fn refused(refusal: &Refusal) -> Response {
    Response::json(refusal.status, &refusal.body)
}

fn not_found(message: &str) -> Response {
    refused(&refusal(StatusCode::NOT_FOUND, "not-found", message))
}

fn unavailable() -> Response {
    refused(&refusal(
        StatusCode::SERVICE_UNAVAILABLE,
        "unavailable",
        "core is stopping",
    ))
}
