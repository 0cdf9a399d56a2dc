//! The store-facing API (`fedmesh_protocol::wire`): uploads folded here, the rest relayed
//! to core with the store's identity from its certificate, models served from the cache.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use fedmesh_policy::PolicyInput;
use fedmesh_protocol::ids::{Region, RoundId, StoreId};
use fedmesh_protocol::wire::{self, ApiError, Contribution, StoreMessage, UploadReceipt, Workload};
use fedmesh_transport::{PeerIdentity, Request, Response, Router, SendBody};
use http::{HeaderMap, HeaderValue, Method, StatusCode};

use super::Pop;
use super::cache::{is_sha256_hex, sha256_hex};
use super::rounds::{Admission, RoundError};
use crate::fold::{RejectReason, Rejection};

/// The upload route, as the policy sees it.
pub const UPDATE_ROUTE: &str = "/v1/rounds/{round}/update";
/// Core or an operator asks the PoP to drain.
pub const DRAIN: &str = "/v1/admin/drain";

/// How long an upload may wait for its next chunk.
const CHUNK_TIMEOUT: Duration = Duration::from_secs(30);

/// The router of every route the PoP serves to stores (and health to anyone).
pub fn router(pop: &Arc<Pop>) -> Router {
    let relays: [(Method, &'static str); 7] = [
        (Method::GET, wire::ROUND),
        (Method::GET, "/v1/models/{model}/current"),
        (Method::POST, "/v1/rounds/{round}/secagg"),
        (Method::GET, "/v1/rounds/{round}/secagg/{step}"),
        (Method::GET, "/v1/rounds/{round}/receipt"),
        (Method::POST, "/v1/rounds/{round}/evaluation"),
        (Method::GET, wire::LEDGER),
    ];
    let mut router = Router::new();
    for (method, route) in relays {
        let pop = Arc::clone(pop);
        router = router.route(method, route, move |r| relay(Arc::clone(&pop), r, route));
    }
    let p = Arc::clone(pop);
    router = router.route(Method::PUT, UPDATE_ROUTE, move |r| {
        upload(Arc::clone(&p), r)
    });
    let p = Arc::clone(pop);
    router = router.route(
        Method::GET,
        "/v1/models/{model}/versions/{version}",
        move |r| cached(Arc::clone(&p), r, None),
    );
    let p = Arc::clone(pop);
    router = router.route(Method::GET, "/v1/blobs/{sha256}", move |r| {
        let digest = r.param("sha256").map(str::to_owned);
        cached(Arc::clone(&p), r, Some(digest.unwrap_or_default()))
    });
    let p = Arc::clone(pop);
    router = router.route(Method::GET, wire::HEALTH, move |_| {
        let p = Arc::clone(&p);
        async move { health(&p) }
    });
    let p = Arc::clone(pop);
    router = router.route(Method::GET, wire::READY, move |_| {
        let p = Arc::clone(&p);
        async move { ready(&p) }
    });
    let p = Arc::clone(pop);
    router = router.route(Method::GET, wire::METRICS, move |_| {
        let p = Arc::clone(&p);
        async move { metrics(&p) }
    });
    let p = Arc::clone(pop);
    router.route(Method::POST, DRAIN, move |r| {
        let p = Arc::clone(&p);
        async move { drain(&p, r.peer()) }
    })
}

/// `/healthz`: the process serves requests.
pub fn health(pop: &Pop) -> Response {
    pop.metrics.request(wire::HEALTH);
    Response::text(StatusCode::OK, "ok\n")
}

/// `/readyz`: [`wire::Readiness`], 503 when the anycast route should be withdrawn.
pub fn ready(pop: &Pop) -> Response {
    let readiness = pop.readiness();
    let status = match readiness {
        wire::Readiness::Ready => StatusCode::OK,
        wire::Readiness::Withdraw => StatusCode::SERVICE_UNAVAILABLE,
    };
    Response::json(status, &readiness)
}

/// `/metrics`: Prometheus text.
pub fn metrics(pop: &Pop) -> Response {
    let text = pop.encode_metrics();
    Response::new(StatusCode::OK, SendBody::from_bytes(text)).with_header(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
    )
}

fn drain(pop: &Pop, peer: &PeerIdentity) -> Response {
    let path = peer.path();
    let allowed = pop.config.admin_paths.iter().any(|admin| {
        path == admin
            || path
                .strip_prefix(admin.as_str())
                .is_some_and(|rest| rest.starts_with('/'))
    });
    if !allowed {
        return api_error(
            StatusCode::FORBIDDEN,
            "not_an_admin",
            format!("{} may not drain this pop", peer.spiffe_id()),
        );
    }
    pop.drain();
    Response::json(StatusCode::ACCEPTED, &pop.readiness())
}

fn api_error(status: StatusCode, reason: &str, message: impl Into<String>) -> Response {
    Response::json(
        status,
        &ApiError {
            reason: reason.to_owned(),
            message: message.into(),
        },
    )
}

/// The store behind a request, from its certificate; anything else is refused.
fn store_of(peer: &PeerIdentity) -> Result<(Region, StoreId), Box<Response>> {
    match Workload::from_path(peer.path()) {
        Some(Workload::Store(region, store)) => Ok((region, store)),
        _ => Err(Box::new(api_error(
            StatusCode::FORBIDDEN,
            "not_a_store",
            format!("{} is not a store", peer.spiffe_id()),
        ))),
    }
}

fn refusing_while_stopping(pop: &Pop) -> Option<Response> {
    pop.stopping
        .load(std::sync::atomic::Ordering::SeqCst)
        .then(|| {
            api_error(
                StatusCode::SERVICE_UNAVAILABLE,
                "shutting_down",
                "pop stopping",
            )
        })
}

/// The policy's decision on a store's request to `route`, on the facts its certificate and
/// core's ledger give (counted and logged by the gate).
fn decide(
    pop: &Pop,
    request: &Request,
    region: &Region,
    store: &StoreId,
    route: &str,
    round: Option<RoundId>,
) -> fedmesh_policy::Decision {
    let peer = request.peer();
    let runtime = request
        .headers()
        .get(wire::RUNTIME_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let input = PolicyInput {
        spiffe_id: peer.spiffe_id().to_string(),
        trust_domain: peer.trust_domain().to_owned(),
        runtime_version: runtime.to_owned(),
        epsilon_remaining: pop.epsilon_remaining(store),
        region: region.clone(),
        round,
        route: route.to_owned(),
        method: request.method().to_string(),
    };
    let decision = pop.policy.decide(&input);
    pop.metrics.decision(decision.allow, &decision.rule);
    decision
}

/// The store behind a request, if the policy lets it use `route`; otherwise the refusal
/// (403 `policy_denied` with every reason).
fn admit(pop: &Pop, request: &Request, route: &str) -> Result<StoreId, Box<Response>> {
    let (region, store) = store_of(request.peer())?;
    let round = request
        .param("round")
        .and_then(|r| r.trim_start_matches('r').parse().ok())
        .map(RoundId);
    let decision = decide(pop, request, &region, &store, route, round);
    if decision.allow {
        return Ok(store);
    }
    let reasons: Vec<String> = decision
        .reasons
        .iter()
        .map(|d| format!("{}: {}", d.rule, d.reason))
        .collect();
    Err(Box::new(api_error(
        StatusCode::FORBIDDEN,
        RejectReason::PolicyDenied.as_str(),
        reasons.join("; "),
    )))
}

/// Relays a store's request to core, naming the store by its certificate.
async fn relay(pop: Arc<Pop>, mut request: Request, route: &'static str) -> Response {
    pop.metrics.request(route);
    if let Some(refusal) = refusing_while_stopping(&pop) {
        return refusal;
    }
    let store = match admit(&pop, &request, route) {
        Ok(store) => store,
        Err(refusal) => return *refusal,
    };

    // 1. The request: the body (JSON, bounded), and headers the PoP sets itself. The
    //    store's own `fedmesh-store` header, if any, is never copied.
    let body = if request.method() == Method::POST {
        match request.body_mut().to_bytes(wire::MAX_JSON_BODY).await {
            Ok(body) => body,
            Err(error) => {
                return api_error(StatusCode::BAD_REQUEST, "malformed", error.to_string());
            }
        }
    } else {
        Bytes::new()
    };
    pop.metrics.bytes_in.inc_by(body.len() as u64);
    let headers = core_headers(request.peer(), request.headers(), !body.is_empty());
    let path = request
        .uri()
        .path_and_query()
        .map_or(request.uri().path(), |p| p.as_str())
        .to_owned();

    // 2. Core's answer, passed back as it is.
    let method = request.method().clone();
    let (status, content_type, answer) = match fetch(
        &pop,
        method,
        &path,
        headers,
        body.clone(),
        wire::MAX_JSON_BODY,
    )
    .await
    {
        Ok(answer) => answer,
        Err(response) => return response,
    };

    // 3. A key advert that core took makes the store one this PoP waits for.
    if route.ends_with("/secagg")
        && status.is_success()
        && let Ok(StoreMessage::KeyAdvert(_)) = serde_json::from_slice(&body)
        && let Some(round) = request.param("round").and_then(|r| r.parse().ok())
    {
        pop.lock_rounds().advertised(RoundId(round), store);
    }
    pop.metrics.bytes_out.inc_by(answer.len() as u64);
    let mut response = Response::new(status, SendBody::from_bytes(answer));
    if let Some(content_type) = content_type {
        response = response.with_header(http::header::CONTENT_TYPE, content_type);
    }
    response
}

fn core_headers(peer: &PeerIdentity, from_store: &HeaderMap, json: bool) -> HeaderMap {
    let mut headers = HeaderMap::new();
    if let Ok(id) = HeaderValue::from_str(&peer.spiffe_id().to_string()) {
        headers.insert(wire::STORE_HEADER, id);
    }
    if let Some(runtime) = from_store.get(wire::RUNTIME_HEADER) {
        headers.insert(wire::RUNTIME_HEADER, runtime.clone());
    }
    if json {
        headers.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
    }
    headers
}

type Fetched = (StatusCode, Option<HeaderValue>, Bytes);

async fn fetch(
    pop: &Pop,
    method: Method,
    path: &str,
    headers: HeaderMap,
    body: Bytes,
    limit: usize,
) -> Result<Fetched, Response> {
    let unreachable = |message: String| {
        tracing::debug!(%message, "core unreachable for a relay");
        api_error(StatusCode::BAD_GATEWAY, "core_unreachable", message)
    };
    let sent = tokio::time::timeout(
        Duration::from_secs(30),
        pop.core
            .request(method, path, headers, SendBody::from_bytes(body)),
    )
    .await
    .map_err(|_| unreachable("core did not answer in time".into()))?;
    let response = sent.map_err(|e| unreachable(e.to_string()))?;
    pop.core_answered();
    let status = response.status();
    let content_type = response.headers().get(http::header::CONTENT_TYPE).cloned();
    let answer = response
        .bytes(limit)
        .await
        .map_err(|e| unreachable(e.to_string()))?;
    Ok((status, content_type, answer))
}

/// Serves a manifest or blob from the cache, fetching it from core once. `digest` is the
/// blob's SHA-256 for blobs, `None` for manifests.
async fn cached(pop: Arc<Pop>, request: Request, digest: Option<String>) -> Response {
    let route = if digest.is_some() {
        "/v1/blobs/{sha256}"
    } else {
        "/v1/models/{model}/versions/{version}"
    };
    pop.metrics.request(route);
    if let Err(refusal) = admit(&pop, &request, route) {
        return *refusal;
    }
    if let Some(digest) = &digest
        && !is_sha256_hex(digest)
    {
        return api_error(
            StatusCode::BAD_REQUEST,
            "malformed",
            "a blob is named by its lowercase hex sha-256",
        );
    }
    let key = request.uri().path().to_owned();
    let serve = |pop: &Pop, bytes: Bytes| {
        pop.metrics.bytes_out.inc_by(bytes.len() as u64);
        let etag = HeaderValue::from_str(&format!("\"{}\"", sha256_hex(&bytes)));
        let response = Response::new(StatusCode::OK, SendBody::from_bytes(bytes));
        match etag {
            Ok(etag) => response.with_header(http::header::ETAG, etag),
            Err(_) => response,
        }
    };
    if let Some(bytes) = pop.cache.get(&key) {
        return serve(&pop, bytes);
    }

    // One fetch per miss: a second store asking meanwhile finds it cached.
    let _fill = pop.cache.fill_lock().await;
    if let Some(bytes) = pop.cache.get(&key) {
        return serve(&pop, bytes);
    }
    let headers = core_headers(request.peer(), request.headers(), false);
    let limit = pop.cache.max_object();
    let (status, content_type, bytes) =
        match fetch(&pop, Method::GET, &key, headers, Bytes::new(), limit).await {
            Ok(answer) => answer,
            Err(response) => return response,
        };
    if !status.is_success() {
        let mut response = Response::new(status, SendBody::from_bytes(bytes));
        if let Some(content_type) = content_type {
            response = response.with_header(http::header::CONTENT_TYPE, content_type);
        }
        return response;
    }
    if let Some(digest) = &digest
        && sha256_hex(&bytes) != *digest
    {
        tracing::warn!(blob.sha256 = %digest, "core served a blob whose digest differs");
        return api_error(
            StatusCode::BAD_GATEWAY,
            "digest_mismatch",
            "the blob from core does not match its digest",
        );
    }
    if digest.is_none()
        && let Err(why) = verify_manifest(&pop, &request, &bytes)
    {
        tracing::warn!(path = %key, error = %why, "core served a manifest that does not verify");
        return api_error(StatusCode::BAD_GATEWAY, "bad_manifest", why);
    }
    pop.cache.insert(key, bytes.clone());
    serve(&pop, bytes)
}

/// Checks a manifest from core against the registry's key, for the model and version the
/// request names: the cache never serves one the registry did not sign.
fn verify_manifest(pop: &Pop, request: &Request, bytes: &[u8]) -> Result<(), String> {
    use fedmesh_core_agg::ModelId;
    use fedmesh_core_agg::registry::SignedManifest;
    let model = request.param("model").ok_or("no model in the path")?;
    let version: u64 = request
        .param("version")
        .and_then(|v| v.parse().ok())
        .ok_or("no version in the path")?;
    let signed: SignedManifest =
        serde_json::from_slice(bytes).map_err(|e| format!("not a signed manifest: {e}"))?;
    fedmesh_core_agg::registry::verify_manifest(
        &signed,
        &pop.registry_key,
        &ModelId(model.to_owned()),
        Some(fedmesh_protocol::ids::ModelVersion(version)),
    )
    .map(|_| ())
    .map_err(|e| e.to_string())
}

/// `PUT /v1/rounds/{round}/update`: policy, header checks, streaming fold, durable
/// checkpoint, then the receipt.
async fn upload(pop: Arc<Pop>, request: Request) -> Response {
    pop.metrics.request(UPDATE_ROUTE);
    if let Some(refusal) = refusing_while_stopping(&pop) {
        return refusal;
    }
    let (region, store) = match store_of(request.peer()) {
        Ok(found) => found,
        Err(refusal) => return *refusal,
    };

    // 1. The header, bound to the path's round.
    let header = match parse_update_header(&request) {
        Ok(header) => header,
        Err(message) => {
            pop.metrics.rejected(RejectReason::Malformed.as_str());
            return api_error(
                StatusCode::BAD_REQUEST,
                RejectReason::Malformed.as_str(),
                message,
            );
        }
    };
    let round = header.round;

    // 2. Policy on authenticated facts and core's ledger.
    let decision = decide(&pop, &request, &region, &store, UPDATE_ROUTE, Some(round));

    // 3. A slot, then the header checks against the round.
    let Ok(_permit) = pop.uploads.acquire().await else {
        return api_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "shutting_down",
            "pop stopping",
        );
    };
    let begun = pop.lock_rounds().begin(
        &store,
        &header,
        &header.upload_id,
        &decision,
        Instant::now(),
    );
    let receipt = || {
        Response::json(
            StatusCode::OK,
            &UploadReceipt {
                round,
                store: store.clone(),
                upload_id: header.upload_id.clone(),
                pop: pop.config.metro.clone(),
            },
        )
    };
    let fold = match begun {
        Ok(Admission::Fold(fold)) => fold,
        Ok(Admission::AlreadyHeld) => return receipt(),
        Err(rejection) => return reject(&pop, round, rejection),
    };

    // 4. Stream the payload into the fold, chunk by chunk.
    let mut fold = *fold;
    let mut body = request.into_body();
    // Fold throughput counts decoding only, not waiting for the network.
    let mut folding = Duration::ZERO;
    let failure = loop {
        match tokio::time::timeout(CHUNK_TIMEOUT, body.chunk()).await {
            Ok(Ok(Some(chunk))) => {
                pop.metrics.bytes_in.inc_by(chunk.len() as u64);
                let started = Instant::now();
                let pushed = fold.push(&chunk);
                folding += started.elapsed();
                if let Err(rejection) = pushed {
                    break Some(rejection);
                }
            }
            Ok(Ok(None)) => break None,
            Ok(Err(error)) => break Some(Rejection::Interrupted(error.to_string())),
            Err(_) => break Some(Rejection::Interrupted("no data for 30 s".into())),
        }
    };
    if let Some(rejection) = failure {
        pop.lock_rounds().abort(round, fold, rejection.clone());
        return reject(&pop, round, rejection);
    }

    // 5. Commit and make durable (synced files: off the async threads); only then the
    //    receipt.
    let bytes = fold.bytes_in() as u64;
    let contribution = Contribution {
        store: store.clone(),
        region,
        examples: header.examples,
        loss: header.loss,
        bytes,
    };
    let committer = Arc::clone(&pop);
    let upload_id = header.upload_id.clone();
    let committed = tokio::task::spawn_blocking(move || {
        let started = Instant::now();
        let committed = committer
            .lock_rounds()
            .commit(round, fold, contribution, &upload_id);
        (committed, started.elapsed())
    })
    .await;
    let committed = match committed {
        Ok((committed, commit_time)) => {
            folding += commit_time;
            committed
        }
        Err(error) => {
            tracing::warn!(%error, round.id = round.0, "commit task failed");
            return api_error(StatusCode::SERVICE_UNAVAILABLE, "state", error.to_string());
        }
    };
    match committed {
        Ok(()) => {
            pop.metrics.updates_folded.inc();
            pop.metrics.fold_bytes.inc_by(bytes);
            pop.metrics.fold_micros.inc_by(folding.as_micros() as u64);
            let seconds = folding.as_secs_f64();
            if seconds > 0.0 {
                pop.metrics.fold_throughput.set(bytes as f64 / seconds);
            }
            tracing::debug!(store.id = %store, round.id = round.0, "update folded");
            receipt()
        }
        Err(RoundError::Rejected(rejection)) => reject(&pop, round, rejection),
        Err(error) => {
            tracing::warn!(%error, round.id = round.0, "update not made durable");
            api_error(StatusCode::SERVICE_UNAVAILABLE, "state", error.to_string())
        }
    }
}

fn parse_update_header(request: &Request) -> Result<wire::UpdateHeader, String> {
    let raw = request
        .headers()
        .get(wire::UPDATE_HEADER)
        .ok_or_else(|| format!("missing {} header", wire::UPDATE_HEADER))?;
    let header: wire::UpdateHeader = serde_json::from_slice(raw.as_bytes())
        .map_err(|e| format!("{} header: {e}", wire::UPDATE_HEADER))?;
    let path_round = request.param("round").and_then(|r| r.parse::<u64>().ok());
    if path_round != Some(header.round.0) {
        return Err("the header's round differs from the path's".into());
    }
    Ok(header)
}

fn reject(pop: &Pop, round: RoundId, rejection: Rejection) -> Response {
    let reason = rejection.reason();
    pop.metrics.rejected(reason.as_str());
    pop.lock_rounds().count_rejection(round, &rejection);
    let status = match reason {
        RejectReason::PolicyDenied | RejectReason::IdentityMismatch | RejectReason::NotInCohort => {
            StatusCode::FORBIDDEN
        }
        RejectReason::StaleRound
        | RejectReason::UnknownRound
        | RejectReason::WrongModelVersion
        | RejectReason::Duplicate
        | RejectReason::RoundClosed => StatusCode::CONFLICT,
        RejectReason::WrongShape | RejectReason::WrongRing | RejectReason::Malformed => {
            StatusCode::BAD_REQUEST
        }
        RejectReason::Interrupted => StatusCode::BAD_REQUEST,
    };
    api_error(status, reason.as_str(), rejection.to_string())
}
