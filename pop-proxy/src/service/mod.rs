//! The PoP as a running service (`pop-proxy serve --config pop.toml`): the store-facing API
//! of `fedmesh_protocol::wire` over the transport, the link to core, health, drain and
//! metrics, around the network-free [`crate::fold`] and [`crate::durable`].
//!
//! # Tasks
//!
//! - the server: stores' requests ([`routes`]);
//! - the plan poller: `GET /v1/round` from core every `plan_poll_ms`, opening rounds and
//!   closing partial sums at their deadline;
//! - the ledger refresher: `GET /v1/ledger` every `ledger_refresh_ms`, for the policy's
//!   remaining epsilon;
//! - the forwarder: partial sums to core until acknowledged, with capped, jittered backoff;
//! - the policy and SVID watchers.
//!
//! # Readiness
//!
//! `/readyz` answers [`Readiness::Withdraw`] (status 503) while core has not answered for
//! `core_unreachable_after_ms`, and once a drain has finished: no round open here and no
//! partial sum owed to core.

pub mod cache;
pub mod config;
pub mod metrics;
pub mod policy;
pub mod rounds;
pub mod routes;

mod admin;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use fedmesh_protocol::ids::StoreId;
use fedmesh_protocol::wire::{self, LedgerSnapshot, PartialSumAck, Readiness};
use fedmesh_transport::{
    Client, ClientConfig, FileSvidSource, PeerPolicy, ResetKey, SendBody, Server, ServerConfig,
    SpiffeId, SvidPaths, SvidSource,
};
use http::{HeaderMap, HeaderValue, Method, StatusCode};
use rand::Rng;
use thiserror::Error;
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;

pub use config::{Config, ConfigError};

use cache::ModelCache;
use metrics::Metrics;
use policy::PolicyGate;
use rounds::Rounds;

/// Why the service could not start.
#[derive(Debug, Error)]
pub enum ServeError {
    /// The configuration is unusable.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The PoP's SVID could not be loaded.
    #[error("identity {dir}: {message}")]
    Identity {
        /// The identity directory.
        dir: std::path::PathBuf,
        /// What failed.
        message: String,
    },
    /// The policy could not be loaded.
    #[error("policy: {0}")]
    Policy(#[from] fedmesh_policy::LoadError),
    /// The state directory could not be opened or recovered.
    #[error("state: {0}")]
    State(#[from] crate::durable::StateError),
    /// A listener could not be bound.
    #[error("listen: {0}")]
    Listen(String),
    /// The client to core could not be set up.
    #[error("core client: {0}")]
    Core(String),
    /// The registry's public key could not be read.
    #[error("registry_public_key: {0}")]
    RegistryKey(String),
    /// The anycast stateless-reset key could not be read.
    #[error("stateless_reset_key_file {path}: {message}")]
    ResetKey {
        /// The file.
        path: std::path::PathBuf,
        /// What is wrong (never the key).
        message: String,
    },
}

/// Reads the anycast group's stateless-reset key, if the config names one.
fn reset_key(config: &Config) -> Result<Option<ResetKey>, ServeError> {
    let Some(path) = &config.stateless_reset_key_file else {
        return Ok(None);
    };
    let error = |message: String| ServeError::ResetKey {
        path: path.clone(),
        message,
    };
    let text = std::fs::read_to_string(path).map_err(|e| error(e.to_string()))?;
    ResetKey::from_hex(&text).map(Some).map_err(error)
}

/// The PoP's shared state, seen by every handler and task.
pub struct Pop {
    config: Config,
    core: Client,
    policy: Arc<PolicyGate>,
    rounds: Mutex<Rounds>,
    ledger: RwLock<Option<LedgerSnapshot>>,
    cache: ModelCache,
    /// Verifies the manifests the cache takes from core.
    registry_key: ed25519_dalek::VerifyingKey,
    metrics: Metrics,
    uploads: Arc<Semaphore>,
    draining: AtomicBool,
    stopping: AtomicBool,
    core_seen: Mutex<Option<Instant>>,
    // The store-facing server, set once bound; held here so scrapes can sample it.
    server: Mutex<Option<Server>>,
}

impl std::fmt::Debug for Pop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pop")
            .field("metro", &self.config.metro)
            .field("draining", &self.is_draining())
            .finish_non_exhaustive()
    }
}

impl Pop {
    /// The configuration in force.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The metrics.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Stops taking new rounds; open rounds finish, then readiness says withdraw.
    pub fn drain(&self) {
        if !self.draining.swap(true, Ordering::SeqCst) {
            tracing::info!(pop.metro = %self.config.metro, "pop draining");
        }
    }

    /// Whether a drain was asked for.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// What `/readyz` answers now.
    pub fn readiness(&self) -> Readiness {
        let now = Instant::now();
        let core_ok = self
            .core_seen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some_and(|seen| now.duration_since(seen) < self.config.core_unreachable_after());
        let drained = self.is_draining() && !self.lock_rounds().busy(now);
        let stopping = self.stopping.load(Ordering::SeqCst);
        let withdraw = !core_ok || drained || stopping;
        self.metrics.withdrawn.set(i64::from(withdraw));
        if withdraw {
            Readiness::Withdraw
        } else {
            Readiness::Ready
        }
    }

    /// The metrics in text form, with the connection gauge sampled now.
    pub fn encode_metrics(&self) -> String {
        let connections = self
            .server
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map_or(0, Server::quic_connections);
        self.metrics.connections.set(connections as i64);
        self.metrics.encode()
    }

    /// The newest round core announced and this PoP opened.
    pub fn newest_round(&self) -> Option<fedmesh_protocol::ids::RoundId> {
        self.lock_rounds().newest()
    }

    /// Partial sums not yet acknowledged by core.
    pub fn pending_partial_sums(&self) -> usize {
        self.lock_rounds().pending_len()
    }

    fn lock_rounds(&self) -> std::sync::MutexGuard<'_, Rounds> {
        self.rounds.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn core_answered(&self) {
        *self.core_seen.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
    }

    /// Remaining epsilon of `store` by the last ledger; 0 (deny) before any ledger.
    fn epsilon_remaining(&self, store: &StoreId) -> f64 {
        let ledger = self.ledger.read().unwrap_or_else(|p| p.into_inner());
        ledger.as_ref().map_or(0.0, |ledger| {
            ledger
                .remaining
                .get(store)
                .copied()
                .unwrap_or(ledger.budget)
        })
    }
}

/// A started PoP.
pub struct Running {
    pop: Arc<Pop>,
    addr: SocketAddr,
    admin_addr: Option<SocketAddr>,
    tasks: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for Running {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Running")
            .field("addr", &self.addr())
            .finish_non_exhaustive()
    }
}

impl Running {
    /// The address stores reach (UDP and TCP).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The plain-HTTP admin address, if configured.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_addr
    }

    /// The shared state.
    pub fn pop(&self) -> &Arc<Pop> {
        &self.pop
    }

    /// Graceful shutdown: refuse new requests, let uploads in flight finish (up to the
    /// grace period), try once more to forward what is owed to core, then stop. Everything
    /// acknowledged is on disk already.
    pub async fn shutdown(mut self) {
        tracing::info!(pop.metro = %self.pop.config.metro, "pop shutting down");
        self.pop.stopping.store(true, Ordering::SeqCst);
        let max = self.pop.config.max_uploads_in_flight;
        let deadline = Instant::now() + self.pop.config.shutdown_grace();
        while self.pop.uploads.available_permits() < max && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let pop = Arc::clone(&self.pop);
        let _ = tokio::time::timeout(Duration::from_secs(2), forward_due(&pop)).await;
        self.stop().await;
    }

    /// Stops at once, like a killed process: nothing more is written.
    pub async fn kill(mut self) {
        self.stop().await;
    }

    async fn stop(&mut self) {
        for task in self.tasks.drain(..) {
            task.abort();
        }
        let server = self
            .pop
            .server
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(server) = server {
            server.abort().await;
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        for task in self.tasks.drain(..) {
            task.abort();
        }
        // The server's routes hold the state: break the cycle so the server stops.
        drop(
            self.pop
                .server
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take(),
        );
    }
}

/// Starts the PoP of `config`: recovers its state, loads policy and identity, binds the
/// listeners and starts the background tasks. Must be called inside a multi-threaded tokio
/// runtime.
///
/// # Errors
/// [`ServeError`] naming what could not be set up.
pub async fn start(config: Config) -> Result<Running, ServeError> {
    // 1. Identity, policy, state.
    let identity = FileSvidSource::load(SvidPaths::in_dir(&config.identity_dir)).map_err(|e| {
        ServeError::Identity {
            dir: config.identity_dir.clone(),
            message: e.to_string(),
        }
    })?;
    let own_id = identity.svid().spiffe_id().clone();
    if own_id.path() != format!("/pop/{}", config.metro) {
        return Err(ServeError::Identity {
            dir: config.identity_dir.clone(),
            message: format!("svid {own_id} is not the pop of metro {}", config.metro),
        });
    }
    let trust_domain = own_id.trust_domain().to_string();
    let registry_key =
        fedmesh_core_agg::registry::keys::read_verifying_key(&config.registry_public_key)
            .map_err(|e| ServeError::RegistryKey(e.to_string()))?;
    let stateless_reset_key = reset_key(&config)?;
    let policy = Arc::new(PolicyGate::open(&config.policy)?);
    let rounds = Rounds::recover(&config.state_dir, &config.metro)?;

    // 2. The client to core, accepting only core's SPIFFE ID.
    let core_id = SpiffeId::new(format!("spiffe://{trust_domain}/core"))
        .map_err(|e| ServeError::Core(e.to_string()))?;
    let mut client_config = ClientConfig::new(config.core, PeerPolicy::Exact(core_id));
    client_config.quic_connect_timeout = Duration::from_millis(500);
    client_config.tcp_connect_timeout = Duration::from_secs(2);
    let source: Arc<dyn SvidSource> = identity.clone();
    let core = Client::new(client_config, Arc::clone(&source))
        .map_err(|e| ServeError::Core(e.to_string()))?;

    let pop = Arc::new(Pop {
        cache: ModelCache::new(config.cache_max_object_bytes),
        registry_key,
        uploads: Arc::new(Semaphore::new(config.max_uploads_in_flight)),
        config,
        core,
        policy,
        rounds: Mutex::new(rounds),
        ledger: RwLock::new(None),
        metrics: Metrics::new(),
        draining: AtomicBool::new(false),
        stopping: AtomicBool::new(false),
        core_seen: Mutex::new(None),
        server: Mutex::new(None),
    });

    // 3. Listeners.
    let router = routes::router(&pop);
    let server_config = ServerConfig {
        stateless_reset_key,
        ..ServerConfig::new(pop.config.listen)
    };
    let server = Server::bind(server_config, source, router)
        .await
        .map_err(|e| ServeError::Listen(e.to_string()))?;
    let mut tasks = vec![
        identity.watch(Duration::from_secs(5)),
        pop.policy
            .watch(Duration::from_millis(pop.config.policy.reload_ms)),
    ];
    let mut admin_addr = None;
    if let Some(addr) = pop.config.admin_listen {
        let (bound, task) = admin::spawn(addr, Arc::clone(&pop))
            .await
            .map_err(|e| ServeError::Listen(format!("admin {addr}: {e}")))?;
        admin_addr = Some(bound);
        tasks.push(task);
    }

    // 4. Background work.
    tasks.push(tokio::spawn(poll_plan(Arc::clone(&pop))));
    tasks.push(tokio::spawn(refresh_ledger(Arc::clone(&pop))));
    tasks.push(tokio::spawn(forward_loop(Arc::clone(&pop))));
    let addr = server.quic_addr();
    tracing::info!(
        pop.metro = %pop.config.metro,
        listen = %addr,
        core = %pop.config.core,
        "pop serving"
    );
    *pop.server.lock().unwrap_or_else(|p| p.into_inner()) = Some(server);
    Ok(Running {
        pop,
        addr,
        admin_addr,
        tasks,
    })
}

/// Runs the PoP of the config file at `path` until SIGTERM or SIGINT (graceful shutdown);
/// SIGUSR1 starts a drain.
///
/// # Errors
/// [`ServeError`] from start-up.
pub async fn serve(path: &Path) -> Result<(), ServeError> {
    use tokio::signal::unix::{SignalKind, signal};

    let config = Config::load(path)?;
    let running = start(config).await?;
    let signal_error = |e: std::io::Error| ServeError::Listen(format!("signals: {e}"));
    let mut term = signal(SignalKind::terminate()).map_err(signal_error)?;
    let mut int = signal(SignalKind::interrupt()).map_err(signal_error)?;
    let mut usr1 = signal(SignalKind::user_defined1()).map_err(signal_error)?;
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = usr1.recv() => running.pop.drain(),
        }
    }
    running.shutdown().await;
    Ok(())
}

/// Polls core's plan, opens rounds, and closes partial sums at their deadline.
async fn poll_plan(pop: Arc<Pop>) {
    let mut ticker = tokio::time::interval(pop.config.plan_poll());
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_error = String::new();
    loop {
        ticker.tick().await;
        let answer = tokio::time::timeout(
            pop.config.plan_poll().max(Duration::from_secs(2)),
            pop.core.request(
                Method::GET,
                wire::ROUND,
                HeaderMap::new(),
                SendBody::empty(),
            ),
        )
        .await;
        match answer {
            Ok(Ok(response)) if response.status() == StatusCode::OK => {
                pop.core_answered();
                let parsed = response
                    .bytes(wire::MAX_JSON_BODY)
                    .await
                    .map_err(|e| e.to_string())
                    .and_then(|b| {
                        serde_json::from_slice::<wire::RoundAnnouncement>(&b)
                            .map_err(|e| e.to_string())
                    });
                let opened = parsed.and_then(|announcement| {
                    pop.lock_rounds()
                        .plan(&announcement, !pop.is_draining())
                        .map_err(|e| e.to_string())
                });
                if let Err(error) = opened
                    && error != last_error
                {
                    tracing::warn!(%error, "round plan unusable");
                    last_error = error;
                }
            }
            Ok(Ok(response)) if response.status().is_success() => pop.core_answered(),
            Ok(Ok(response)) => {
                tracing::debug!(status = %response.status(), "core refused the plan poll")
            }
            Ok(Err(error)) => tracing::debug!(%error, "core unreachable"),
            Err(_) => tracing::debug!("plan poll timed out"),
        }
        pop.lock_rounds().poll_deadlines(Instant::now());
        let _ = pop.readiness();
    }
}

/// Keeps the ledger snapshot fresh for the policy's remaining epsilon.
async fn refresh_ledger(pop: Arc<Pop>) {
    let mut ticker = tokio::time::interval(pop.config.ledger_refresh());
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let answer = tokio::time::timeout(
            Duration::from_secs(5),
            pop.core.request(
                Method::GET,
                wire::LEDGER,
                HeaderMap::new(),
                SendBody::empty(),
            ),
        )
        .await;
        let Ok(Ok(response)) = answer else {
            continue;
        };
        if !response.status().is_success() {
            continue;
        }
        pop.core_answered();
        match response
            .bytes(wire::MAX_JSON_BODY)
            .await
            .map(|b| serde_json::from_slice::<LedgerSnapshot>(&b).map_err(|e| e.to_string()))
        {
            Ok(Ok(ledger)) => {
                *pop.ledger.write().unwrap_or_else(|p| p.into_inner()) = Some(ledger);
            }
            Ok(Err(error)) => tracing::warn!(%error, "core's ledger is not a ledger snapshot"),
            Err(error) => tracing::debug!(%error, "ledger fetch failed"),
        }
    }
}

async fn forward_loop(pop: Arc<Pop>) {
    loop {
        forward_due(&pop).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Sends every partial sum due now; an acknowledged one is forgotten, a failed one is
/// retried after a capped, jittered backoff.
async fn forward_due(pop: &Arc<Pop>) {
    let due = pop.lock_rounds().due(Instant::now());
    for pending in due {
        let outcome = forward_one(pop, &pending).await;
        let mut rounds = pop.lock_rounds();
        match outcome {
            Forward::Acked(ack) => {
                pop.metrics.partial_sums_forwarded.inc();
                pop.metrics.bytes_out.inc_by(pending.body.len() as u64);
                tracing::info!(
                    round.id = pending.round.0,
                    part = pending.part,
                    accepted = ack.accepted.len(),
                    "partial sum acknowledged by core"
                );
                if let Err(error) = rounds.settled(pending.round, pending.part, "acked") {
                    tracing::warn!(%error, "cannot forget an acknowledged partial sum");
                }
            }
            Forward::Refused(message) => {
                tracing::warn!(
                    round.id = pending.round.0,
                    part = pending.part,
                    %message,
                    "core refused the partial sum; its stores re-send"
                );
                if let Err(error) = rounds.settled(pending.round, pending.part, "refused") {
                    tracing::warn!(%error, "cannot set a refused partial sum aside");
                }
            }
            Forward::Retry(message) => {
                let ceiling = Duration::from_millis(100)
                    .saturating_mul(1 << pending.attempts.min(6))
                    .min(Duration::from_secs(5));
                let delay = rand::thread_rng().gen_range(ceiling / 2..=ceiling);
                tracing::debug!(round.id = pending.round.0, %message, ?delay, "forward failed");
                rounds.retry_later(pending.round, pending.part, delay);
            }
        }
    }
}

enum Forward {
    Acked(PartialSumAck),
    Refused(String),
    Retry(String),
}

async fn forward_one(pop: &Pop, pending: &rounds::PendingSum) -> Forward {
    let header = match serde_json::to_string(&pending.header)
        .map_err(|e| e.to_string())
        .and_then(|json| HeaderValue::from_str(&json).map_err(|e| e.to_string()))
    {
        Ok(header) => header,
        Err(message) => return Forward::Refused(message),
    };
    let mut headers = HeaderMap::new();
    headers.insert(wire::PARTIAL_SUM_HEADER, header);
    let sent = tokio::time::timeout(
        Duration::from_secs(30),
        pop.core.request(
            Method::POST,
            &wire::partial_sums(pending.round),
            headers,
            SendBody::from_bytes(pending.body.clone()),
        ),
    )
    .await;
    let response = match sent {
        Ok(Ok(response)) => response,
        Ok(Err(error)) => return Forward::Retry(error.to_string()),
        Err(_) => return Forward::Retry("timed out".into()),
    };
    let status = response.status();
    let body: Bytes = match response.bytes(wire::MAX_JSON_BODY).await {
        Ok(body) => body,
        Err(error) => return Forward::Retry(error.to_string()),
    };
    if status.is_success() {
        pop.core_answered();
        return match serde_json::from_slice::<PartialSumAck>(&body) {
            Ok(ack) => Forward::Acked(ack),
            Err(error) => Forward::Retry(format!("acknowledgement unreadable: {error}")),
        };
    }
    let retryable = status.is_server_error()
        || status == StatusCode::REQUEST_TIMEOUT
        || status == StatusCode::TOO_MANY_REQUESTS;
    let message = format!("{status}: {}", String::from_utf8_lossy(&body));
    if retryable {
        Forward::Retry(message)
    } else {
        Forward::Refused(message)
    }
}
