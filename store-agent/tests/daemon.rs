//! The daemon against a fake PoP on 127.0.0.1: real transport (HTTP/3, mutual TLS with a
//! dev PKI), a registry-signed model, plain-masking rounds, recorded uploads.
//!
//! The fake PoP serves one `RoundAnnouncement` at a time, manifests and blobs, accepts
//! uploads once per upload id (a re-send is answered with the same receipt and not counted
//! again, as a PoP must), and answers receipts with a status the test sets.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use fedmesh_core_agg::registry::embedded::EmbeddedBackend;
use fedmesh_core_agg::registry::{Backend, Candidate, DpSpend, Registry, keys};
use fedmesh_core_agg::{ModelId, Timestamp};
use fedmesh_protocol::ids::{ModelVersion, RoundId, StoreId};
use fedmesh_protocol::moments::{MOMENT_QUANT_BITS, StatisticsTask};
use fedmesh_protocol::params::Scope;
use fedmesh_protocol::secagg::{
    CorePhase, CoreSession, Deadlines, MaskedUpdate, Masking, Outgoing, PackedVector,
    PartialSumBuilder, PlanConfig, RoundOutcome, SecAggPlan, ToStore,
};
use fedmesh_protocol::wire::{
    self, AggregationMode, CoreMessage, EvaluationReport, PhaseDeadlines, ReceiptStatus,
    RoundAnnouncement, RoundReceipt, SecAggStep, StoreMessage, UpdateHeader, UploadReceipt,
    Workload,
};
use fedmesh_store_agent::config::AgentConfig;
use fedmesh_store_agent::daemon;
use fedmesh_store_agent::daemon::state::{AgentState, StateDir};
use fedmesh_store_agent::ingest::{self, DataFiles};
use fedmesh_store_agent::model::{Model, Precision};
use fedmesh_store_agent::pipeline::layout_of;
use fedmesh_store_agent::spec::FeatureSpec;
use fedmesh_store_agent::task::{Normalisation, TaskConfig};
use fedmesh_store_agent::{audit, train};
use fedmesh_transport::pki::{DevPkiSpec, write_dev_pki};
use fedmesh_transport::server::{Request, Response};
use fedmesh_transport::{FileSvidSource, Router, SendBody, Server, ServerConfig, SvidPaths};
use http::{Method, StatusCode};
use sha2::{Digest, Sha256};
use tokio::sync::watch;

/// libtorch's generator is process-wide: tests that train run one at a time so that each
/// run repeats exactly.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

const MODEL: &str = "oj";
const CLIP: f32 = 0.5;

const SPEC: &str = r#"
store_column = "store"
target = "y"

[split]
column = "week"
train_max = 140

[[features]]
name = "x"
kind = "numeric"
columns = ["x1", "x2"]
"#;

const TASK: &str = r#"
[model]
kind = "mlp"
inputs = 2
hidden = [4]
outputs = 1
objective = "regression"
local = ["head"]

[training]
epochs = 3
batch_size = 16
learning_rate = 0.01
fedprox_mu = 0.1
seed = 11
"#;

/// The same task with DP-SGD at a noise level that spends a lot of epsilon.
const DP_TASK: &str = r#"
[model]
kind = "mlp"
inputs = 2
hidden = [4]
outputs = 1
objective = "regression"
local = ["head"]

[training]
epochs = 50
batch_size = 16
learning_rate = 0.01
seed = 11

[training.dp]
clip_norm = 1.0
noise_multiplier = 0.5
expected_batch_size = 20
"#;

/// Shared parameters of the task's model: hidden.0 is 4x2 weights and 4 biases.
const DIMENSION: u32 = 12;

fn sha256(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as u64
}

/// What the fake PoP holds and saw.
#[derive(Default)]
struct PopState {
    round: Option<RoundAnnouncement>,
    manifests: BTreeMap<(String, u64), Vec<u8>>,
    blobs: BTreeMap<String, Vec<u8>>,
    /// Accepted uploads, one per upload id, in arrival order.
    uploads: Vec<(StoreId, UpdateHeader, Vec<u8>)>,
    /// Every PUT, re-sends included.
    puts: usize,
    /// Upload ids of PUTs marked re-sent (core's receipt said no PoP brought them).
    resent_puts: Vec<String>,
    /// Answer uploads `503` without holding them, as a PoP that lost core would.
    refuse_uploads: bool,
    receipt: BTreeMap<(u64, String), ReceiptStatus>,
    evaluations: Vec<EvaluationReport>,
    /// Core's side of a secure round, when the test runs one.
    core: Option<FakeCore>,
}

/// Core behind the PoP for a secure round: the protocol's `CoreSession`, the PoP's fold,
/// and the replies waiting for each store at each step.
struct FakeCore {
    session: CoreSession,
    fold: Option<PartialSumBuilder>,
    outbox: BTreeMap<(String, &'static str), CoreMessage>,
}

impl FakeCore {
    fn post(&mut self, outgoing: Vec<Outgoing>) {
        for out in outgoing {
            let (step, message) = match out.message {
                ToStore::NeighbourKeys(m) => ("keys", CoreMessage::NeighbourKeys(m)),
                ToStore::Shares(m) => ("shares", CoreMessage::Shares(m)),
                ToStore::Unmask(m) => ("unmask", CoreMessage::Unmask(m)),
            };
            self.outbox.insert((out.to.0, step), message);
        }
    }
}

type Shared = Arc<Mutex<PopState>>;

fn lock(state: &Shared) -> MutexGuard<'_, PopState> {
    state.lock().unwrap_or_else(|e| e.into_inner())
}

fn store_of(request: &Request) -> Option<StoreId> {
    match Workload::from_path(request.peer().path())? {
        Workload::Store(_, id) => Some(id),
        _ => None,
    }
}

fn fake_pop_router(state: Shared) -> Router {
    let s = state.clone();
    let router = Router::new().route(Method::GET, wire::HEALTH, |_r: Request| async {
        Response::text(StatusCode::OK, "ok")
    });
    let router = router.route(Method::GET, wire::ROUND, move |_r: Request| {
        let round = lock(&s).round.clone();
        async move {
            match round {
                Some(round) => Response::json(StatusCode::OK, &round),
                None => Response::new(StatusCode::NO_CONTENT, SendBody::empty()),
            }
        }
    });
    let s = state.clone();
    let router = router.route(
        Method::GET,
        "/v1/models/{model}/versions/{version}",
        move |r: Request| {
            let key = (
                r.param("model").unwrap_or_default().to_owned(),
                r.param("version")
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(u64::MAX),
            );
            let found = lock(&s).manifests.get(&key).cloned();
            async move { bytes_or_404(found) }
        },
    );
    let s = state.clone();
    let router = router.route(Method::GET, "/v1/blobs/{sha}", move |r: Request| {
        let found = lock(&s)
            .blobs
            .get(r.param("sha").unwrap_or_default())
            .cloned();
        async move { bytes_or_404(found) }
    });
    let s = state.clone();
    let router = router.route(
        Method::PUT,
        "/v1/rounds/{round}/update",
        move |r: Request| {
            let s = s.clone();
            async move { accept_update(&s, r).await }
        },
    );
    let s = state.clone();
    let router = router.route(
        Method::GET,
        "/v1/rounds/{round}/receipt",
        move |r: Request| {
            let round: u64 = r.param("round").and_then(|v| v.parse().ok()).unwrap_or(0);
            let store = store_of(&r).unwrap_or(StoreId(String::new()));
            let status = lock(&s)
                .receipt
                .get(&(round, store.0.clone()))
                .copied()
                .unwrap_or(ReceiptStatus::Open);
            let receipt = RoundReceipt {
                round: RoundId(round),
                store,
                status,
            };
            async move { Response::json(StatusCode::OK, &receipt) }
        },
    );
    let s = state.clone();
    let router = router.route(
        Method::POST,
        "/v1/rounds/{round}/secagg",
        move |r: Request| {
            let s = s.clone();
            async move { relay_to_core(&s, r).await }
        },
    );
    let s = state.clone();
    let router = router.route(
        Method::GET,
        "/v1/rounds/{round}/secagg/{step}",
        move |r: Request| {
            let store = store_of(&r).map(|s| s.0).unwrap_or_default();
            let step = SecAggStep::parse(r.param("step").unwrap_or_default());
            let reply = step.and_then(|step| {
                let pop = lock(&s);
                let core = pop.core.as_ref()?;
                core.outbox.get(&(store, step.as_str())).cloned()
            });
            async move {
                match reply {
                    Some(msg) => Response::json(StatusCode::OK, &msg),
                    None => Response::new(StatusCode::NO_CONTENT, SendBody::empty()),
                }
            }
        },
    );
    let s = state;
    router.route(
        Method::POST,
        "/v1/rounds/{round}/evaluation",
        move |r: Request| {
            let s = s.clone();
            async move {
                let body = r.into_body().to_bytes(1 << 20).await.unwrap_or_default();
                match serde_json::from_slice::<EvaluationReport>(&body) {
                    Ok(report) => {
                        lock(&s).evaluations.push(report);
                        Response::new(StatusCode::ACCEPTED, SendBody::empty())
                    }
                    Err(_) => Response::new(StatusCode::BAD_REQUEST, SendBody::empty()),
                }
            }
        },
    )
}

/// Hands a store's secure-aggregation message to core, checking that it speaks for the
/// store whose certificate sent it.
async fn relay_to_core(state: &Shared, r: Request) -> Response {
    let Some(store) = store_of(&r) else {
        return Response::new(StatusCode::FORBIDDEN, SendBody::empty());
    };
    let body = r.into_body().to_bytes(1 << 20).await.unwrap_or_default();
    let Ok(msg) = serde_json::from_slice::<StoreMessage>(&body) else {
        return Response::new(StatusCode::BAD_REQUEST, SendBody::empty());
    };
    let mut pop = lock(state);
    let Some(core) = pop.core.as_mut() else {
        return Response::new(StatusCode::NOT_FOUND, SendBody::empty());
    };
    let now = std::time::Instant::now();
    let handled = match msg {
        StoreMessage::KeyAdvert(m) if m.store == store => core.session.handle_key_advert(now, m),
        StoreMessage::EncryptedShares(m) if m.from == store => {
            core.session.handle_encrypted_shares(now, m)
        }
        StoreMessage::UnmaskResponse(m) if m.from == store => {
            core.session.handle_unmask_response(now, m)
        }
        _ => return Response::new(StatusCode::FORBIDDEN, SendBody::empty()),
    };
    match handled {
        Ok(outgoing) => {
            core.post(outgoing);
            Response::new(StatusCode::ACCEPTED, SendBody::empty())
        }
        Err(_) => Response::new(StatusCode::CONFLICT, SendBody::empty()),
    }
}

fn bytes_or_404(found: Option<Vec<u8>>) -> Response {
    match found {
        Some(bytes) => Response::new(StatusCode::OK, SendBody::from_bytes(bytes)),
        None => Response::new(StatusCode::NOT_FOUND, SendBody::empty()),
    }
}

async fn accept_update(state: &Shared, r: Request) -> Response {
    let Some(store) = store_of(&r) else {
        return Response::new(StatusCode::FORBIDDEN, SendBody::empty());
    };
    let header = r
        .headers()
        .get(wire::UPDATE_HEADER)
        .and_then(|v| serde_json::from_slice::<UpdateHeader>(v.as_bytes()).ok());
    let Some(header) = header else {
        return Response::new(StatusCode::BAD_REQUEST, SendBody::empty());
    };
    let body = r.into_body().to_bytes(16 << 20).await.unwrap_or_default();
    let mut pop = lock(state);
    pop.puts += 1;
    if header.resent {
        pop.resent_puts.push(header.upload_id.clone());
    }
    if pop.refuse_uploads {
        return Response::new(StatusCode::SERVICE_UNAVAILABLE, SendBody::empty());
    }
    let seen = pop
        .uploads
        .iter()
        .any(|(_, h, _)| h.upload_id == header.upload_id);
    if !seen {
        pop.uploads
            .push((store.clone(), header.clone(), body.to_vec()));
        // In a secure round the PoP folds the masked vector and forwards the partial sum
        // once every store of the cohort is in.
        if let Some(core) = pop.core.as_mut()
            && let Some(fold) = core.fold.as_mut()
        {
            let update = MaskedUpdate {
                round: header.round,
                store: store.clone(),
                vector: PackedVector {
                    ring_bits: header.ring_bits,
                    len: header.len,
                    bytes: body.to_vec(),
                },
            };
            if fold.fold(&update).is_err() {
                return Response::new(StatusCode::BAD_REQUEST, SendBody::empty());
            }
            if fold.len() == core.session.plan().cohort().len() {
                let partial = core.fold.take().and_then(|f| f.finish().ok().flatten());
                if let Some(partial) = partial {
                    let now = std::time::Instant::now();
                    if let Ok(outgoing) = core.session.handle_partial_sum(now, partial) {
                        core.post(outgoing);
                    }
                }
            }
        }
    }
    let receipt = UploadReceipt {
        round: header.round,
        store,
        upload_id: header.upload_id,
        pop: "test".into(),
    };
    Response::json(StatusCode::OK, &receipt)
}

/// A whole test bed: PKI, registry, data, the fake PoP on its own runtime.
struct Bed {
    dir: tempfile::TempDir,
    _pop_runtime: tokio::runtime::Runtime,
    _server: Server,
    quic: std::net::SocketAddr,
    tcp: std::net::SocketAddr,
    state: Shared,
    registry: Registry<EmbeddedBackend>,
    /// Shared-parameter weights of every published version.
    versions: Vec<fedmesh_store_agent::weights::Weights>,
}

impl Bed {
    fn new(stores: &[&str]) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        let spec = DevPkiSpec {
            trust_domain: "fedmesh.test".into(),
            ca_lifetime: Duration::from_secs(86_400),
            svid_lifetime: Duration::from_secs(3_600),
            pops: vec!["test".into()],
            stores: stores
                .iter()
                .map(|s| ("north".to_owned(), (*s).to_owned()))
                .collect(),
        };
        write_dev_pki(&root.join("pki"), &spec).expect("dev pki");

        // Sales rows for each store: weeks 100..=160, so 41 train and 20 test rows; the
        // target is a fixed linear function of the two features.
        let mut csv = String::from("store,week,x1,x2,y\n");
        for store in stores {
            for week in 100..=160u32 {
                let x1 = f64::from(week % 7) / 7.0;
                let x2 = f64::from(week % 5) / 5.0;
                let y = 0.8 * x1 - 0.5 * x2 + 0.1;
                csv.push_str(&format!("{store},{week},{x1},{x2},{y}\n"));
            }
        }
        std::fs::write(root.join("sales.csv"), csv).expect("sales");
        std::fs::write(root.join("spec.toml"), SPEC).expect("spec");

        let (secret, _public) = keys::generate(&root.join("registry")).expect("keys");
        let signing = keys::read_signing_key(&secret).expect("signing key");
        let backend = EmbeddedBackend::open(&root.join("registry-store")).expect("registry");
        let registry = Registry::new(backend, signing);

        let pop_runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let state: Shared = Arc::default();
        let source =
            FileSvidSource::load(SvidPaths::in_dir(&root.join("pki/pop/test"))).expect("svid");
        let config = ServerConfig {
            quic_addr: "127.0.0.1:0".parse().expect("addr"),
            tcp_addr: Some("127.0.0.1:0".parse().expect("addr")),
            keepalive: Default::default(),
            stateless_reset_key: None,
        };
        let server = pop_runtime
            .block_on(Server::bind(config, source, fake_pop_router(state.clone())))
            .expect("bind");
        let (quic, tcp) = (server.quic_addr(), server.tcp_addr().expect("tcp"));
        let mut bed = Self {
            dir,
            _pop_runtime: pop_runtime,
            _server: server,
            quic,
            tcp,
            state,
            registry,
            versions: Vec::new(),
        };
        bed.publish(1);
        bed
    }

    fn root(&self) -> &Path {
        self.dir.path()
    }

    /// Publishes a fresh version (weights drawn from `seed`) and serves it.
    fn publish(&mut self, seed: i64) -> ModelVersion {
        let task = TaskConfig::from_toml_str(TASK).expect("task");
        tch::manual_seed(seed);
        let model = Model::new(&task.model, tch::Device::Cpu, Precision::F32).expect("model");
        let weights = model.shared_weights();
        let blob = weights.to_safetensors().expect("safetensors");
        let parent = self
            .versions
            .len()
            .checked_sub(1)
            .map(|v| ModelVersion(v as u64));
        let candidate = Candidate {
            model: ModelId(MODEL.into()),
            parent,
            blob: blob.clone(),
            model_spec: "mlp 2-4-1".into(),
            training_config_sha256: sha256(TASK.as_bytes()),
            dp: DpSpend {
                unit: "record".into(),
                noise_multiplier: 0.0,
                clip_norm: 0.0,
                delta: 1e-5,
                epsilon: 0.0,
            },
            metrics: BTreeMap::new(),
        };
        let manifest = self
            .registry
            .publish(&candidate, 0.1, Timestamp(1))
            .expect("publish");
        let signed = self
            .registry
            .backend()
            .manifest(&ModelId(MODEL.into()), manifest.version)
            .expect("manifest")
            .expect("stored");
        let mut pop = lock(&self.state);
        pop.manifests.insert(
            (MODEL.into(), manifest.version.0),
            serde_json::to_vec(&signed).expect("json"),
        );
        pop.blobs.insert(manifest.blob_sha256.clone(), blob);
        drop(pop);
        self.versions.push(weights);
        manifest.version
    }

    fn blob_sha(&self, version: ModelVersion) -> String {
        sha256(
            &self.versions[version.0 as usize]
                .to_safetensors()
                .expect("blob"),
        )
    }

    /// Writes a store's config; `extra` is appended (sections such as `[privacy]`).
    fn config(&self, store: &str, window: &str, extra: &str) -> AgentConfig {
        let root = self.root();
        let pki = root.join("pki/store/north").join(store);
        let text = format!(
            r#"
[store]
id = "{store}"
region = "north"
time_zone = "UTC"

[pop]
address = "{quic}"
fallback_tcp_address = "{tcp}"
poll_min_ms = 20
poll_max_ms = 50
backoff_max_ms = 500

[registry]
public_key = "{registry}"

[identity]
svid = "{svid}"
key = "{key}"
bundle = "{bundle}"

[data]
sales = "{sales}"
feature_spec = "{spec}"

[window]
hours = "{window}"

[resources]
device = "cpu"

[state]
dir = "{state}"
{extra}
"#,
            quic = self.quic,
            tcp = self.tcp,
            registry = root.join("registry/registry.pub").display(),
            svid = pki.join("svid.pem").display(),
            key = pki.join("svid.key.pem").display(),
            bundle = pki.join("bundle.pem").display(),
            sales = root.join("sales.csv").display(),
            spec = root.join("spec.toml").display(),
            state = self.state_dir(store).display(),
        );
        let path = root.join(format!("store-{store}.toml"));
        std::fs::write(&path, text).expect("config");
        AgentConfig::from_path(&path).expect("valid config")
    }

    fn state_dir(&self, store: &str) -> PathBuf {
        self.root().join("state").join(store)
    }

    /// Announces a plain-masking round over `cohort` training from `version`.
    fn announce(
        &self,
        round: u64,
        version: ModelVersion,
        cohort: &[&str],
        task: &str,
    ) -> PlanConfig {
        self.announce_with(
            round,
            version,
            &self.blob_sha(version),
            cohort,
            task,
            "0.0.1",
        )
    }

    fn announce_with(
        &self,
        round: u64,
        version: ModelVersion,
        blob_sha: &str,
        cohort: &[&str],
        task: &str,
        min_runtime: &str,
    ) -> PlanConfig {
        let plan = PlanConfig {
            round: RoundId(round),
            seed: [7; 32],
            cohort: cohort.iter().map(|s| StoreId((*s).into())).collect(),
            masking: Masking::Plain,
            degree: 0,
            threshold: 1,
            min_survivors: 1,
            dimension: DIMENSION,
            kept: None,
            quant_bits: 8,
            clip: CLIP,
            guard_bits: 2,
            noise_stddev: 0.0,
        };
        self.announce_plan(version, blob_sha, plan, task, min_runtime)
    }

    fn announce_plan(
        &self,
        version: ModelVersion,
        blob_sha: &str,
        plan: PlanConfig,
        task: &str,
        min_runtime: &str,
    ) -> PlanConfig {
        let round = plan.round.0;
        let now = now_ms();
        let announcement = RoundAnnouncement {
            round: RoundId(round),
            model: MODEL.into(),
            model_version: version,
            model_sha256: blob_sha.to_owned(),
            task: task.to_owned(),
            task_sha256: sha256(task.as_bytes()),
            min_runtime: min_runtime.to_owned(),
            mode: AggregationMode::Secure,
            plan: plan.clone(),
            deadlines: PhaseDeadlines {
                keys_ms: now + 20_000,
                shares_ms: now + 21_000,
                upload_ms: now + 22_000,
                unmask_ms: now + 23_000,
            },
            evaluation: None,
            statistics: None,
        };
        lock(&self.state).round = Some(announcement);
        plan
    }

    /// Puts a real secure-aggregation core behind the PoP and announces round 1 over
    /// `cohort` (the complete graph for three stores, threshold 2), optionally as a
    /// statistics round.
    fn secure_round(
        &self,
        cohort: &[&str],
        seed: [u8; 32],
        dimension: u32,
        quant_bits: u32,
        clip: f32,
        statistics: Option<StatisticsTask>,
    ) -> SecAggPlan {
        let plan = PlanConfig {
            round: RoundId(1),
            seed,
            cohort: cohort.iter().map(|s| StoreId((*s).into())).collect(),
            masking: Masking::Secure,
            degree: 2,
            threshold: 2,
            min_survivors: 2,
            dimension,
            kept: None,
            quant_bits,
            clip,
            guard_bits: 2,
            noise_stddev: 0.0,
        };
        let secagg = SecAggPlan::new(plan.clone()).expect("plan");
        let deadlines = Deadlines {
            keys: Duration::from_secs(20),
            shares: Duration::from_secs(20),
            upload: Duration::from_secs(20),
            unmask: Duration::from_secs(20),
        };
        self.pop().core = Some(FakeCore {
            session: CoreSession::new(secagg.clone(), std::time::Instant::now(), deadlines),
            fold: Some(PartialSumBuilder::new(secagg.clone())),
            outbox: BTreeMap::new(),
        });
        let sha = self.blob_sha(ModelVersion(0));
        self.announce_plan(ModelVersion(0), &sha, plan, TASK, "0.0.1");
        if let Some(round) = self.pop().round.as_mut() {
            round.statistics = statistics;
        }
        secagg
    }

    /// Waits for `agent`'s stores to finish round 1 at the fake core, settles their
    /// queues with receipts, stops the agent and returns the round's outcome.
    fn run_secure_round(&self, agent: Agent, stores: &[&str]) -> RoundOutcome {
        wait_for(25, "the unmasked sum", || {
            self.pop()
                .core
                .as_ref()
                .is_some_and(|c| c.session.outcome().is_some())
        });
        for store in stores {
            self.set_receipt(1, store, ReceiptStatus::Included);
        }
        wait_for(10, "every queue to settle", || {
            stores.iter().all(|s| queued_files(self, s).is_empty())
        });
        agent.stop();
        self.pop()
            .core
            .as_ref()
            .and_then(|c| c.session.outcome().cloned())
            .expect("finished")
            .expect("the round succeeded")
    }

    fn set_receipt(&self, round: u64, store: &str, status: ReceiptStatus) {
        lock(&self.state)
            .receipt
            .insert((round, store.into()), status);
    }

    fn pop(&self) -> MutexGuard<'_, PopState> {
        lock(&self.state)
    }
}

/// A store process: its own runtime, dropped to kill it.
struct Agent {
    runtime: tokio::runtime::Runtime,
    stop: watch::Sender<bool>,
    done: tokio::task::JoinHandle<Result<(), daemon::DaemonError>>,
}

impl Agent {
    fn start(configs: Vec<AgentConfig>) -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let (stop, shutdown) = watch::channel(false);
        let done = runtime.spawn(daemon::run(configs, shutdown));
        Self {
            runtime,
            stop,
            done,
        }
    }

    /// Stops the agent as SIGTERM does and waits for it.
    fn stop(self) {
        let _ = self.stop.send(true);
        let ended = self
            .runtime
            .block_on(async { tokio::time::timeout(Duration::from_secs(10), self.done).await });
        ended.expect("stops in time").expect("joins").expect("runs");
    }

    /// Kills the agent: every task dropped wherever it is, as power loss would.
    fn kill(self) {
        self.runtime.shutdown_background();
    }
}

/// Waits up to `secs` seconds for `done`.
fn wait_for(secs: u64, what: &str, mut done: impl FnMut() -> bool) {
    let until = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < until {
        if done() {
            return;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    panic!("timed out waiting for {what}");
}

fn audit_lines(bed: &Bed, store: &str) -> Vec<serde_json::Value> {
    let path = bed.state_dir(store).join("audit.jsonl");
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

fn declined(bed: &Bed, store: &str, round: u64) -> Option<String> {
    audit_lines(bed, store).into_iter().find_map(|line| {
        let hit = line["event"] == "round_declined" && line["round"] == round;
        hit.then(|| line["reason"].as_str().unwrap_or_default().to_owned())
    })
}

fn queued_files(bed: &Bed, store: &str) -> Vec<String> {
    let dir = bed.state_dir(store).join("queue");
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str().map(str::to_owned))
        .filter(|n| n.ends_with(".update"))
        .collect()
}

fn agent_state(bed: &Bed, store: &str) -> AgentState {
    StateDir::open(&bed.state_dir(store))
        .expect("state dir")
        .load()
        .expect("state")
}

/// The store's trained delta for round 1 from `version`, as the daemon computes it (same
/// seed, same thread count, no local checkpoint yet), in protocol order.
fn expected_delta(bed: &Bed, store: &str, version: ModelVersion) -> Vec<f32> {
    let data = store_data(bed, store);
    let task = TaskConfig::from_toml_str(TASK).expect("task");
    let global = &bed.versions[version.0 as usize];
    let outcome = train::run_round(&task, &data, global, None).expect("trains");
    let layout = layout_of(&outcome.delta).expect("layout");
    let values = outcome
        .delta
        .tensors
        .iter()
        .map(|t| (t.name.clone(), t.values.clone()))
        .collect();
    layout.flatten(&values, Scope::Shared).expect("flatten")
}

/// A store's rows as the daemon loads them.
fn store_data(bed: &Bed, store: &str) -> ingest::StoreData {
    let mut spec = FeatureSpec::from_toml_str(SPEC).expect("spec");
    spec.split.train_max = 140.0;
    let files = DataFiles {
        sales: bed.root().join("sales.csv"),
        attributes: None,
    };
    ingest::load_store(&spec, &files, &StoreId(store.into())).expect("data")
}

#[test]
fn store_joins_a_plain_round_and_its_upload_decodes_to_its_trained_delta() {
    let _serial = serial();
    let bed = Bed::new(&["2"]);
    let config = bed.config("2", "00:00-24:00", "");
    let plan = bed.announce(1, ModelVersion(0), &["2"], TASK);
    let agent = Agent::start(vec![config]);

    wait_for(25, "the upload", || !bed.pop().uploads.is_empty());
    let (store, header, body) = bed.pop().uploads[0].clone();
    assert_eq!(store, StoreId("2".into()));
    assert_eq!(
        (header.round, header.model_version),
        (RoundId(1), ModelVersion(0))
    );
    // 41 training rows: weeks 100 to 140.
    assert_eq!(header.examples, 41);
    assert!(
        header.loss.is_finite() && header.loss > 0.0,
        "{}",
        header.loss
    );
    let queued = queued_files(&bed, "2");
    assert_eq!(queued, vec![format!("{}.update", header.upload_id)]);

    // Plain masking: the upload is the quantised vector itself. Stochastic rounding moves
    // each coordinate by less than one level, 1/scale, after clamping to the clip bound.
    let plan = SecAggPlan::new(plan).expect("plan");
    let vector = PackedVector {
        ring_bits: header.ring_bits,
        len: header.len,
        bytes: body,
    };
    let ring = vector
        .unpack(plan.ring_bits(), plan.vector_len())
        .expect("unpacks");
    let decoded = plan.decode(&ring);
    let expected = expected_delta(&bed, "2", ModelVersion(0));
    assert_eq!(decoded.len(), expected.len());
    let level = 1.0 / plan.scale() as f32;
    for (i, (got, want)) in decoded.iter().zip(&expected).enumerate() {
        let want = want.clamp(-CLIP, CLIP);
        assert!(
            (got - want).abs() <= level + 1e-6,
            "coordinate {i}: {got} vs {want}"
        );
    }
    assert!(
        expected.iter().any(|v| v.abs() > 2.0 * level),
        "training moved the weights"
    );

    // Core includes it: the store settles the entry and records the confirmation.
    bed.set_receipt(1, "2", ReceiptStatus::Included);
    wait_for(10, "the queue to settle", || {
        queued_files(&bed, "2").is_empty()
    });

    // Named as an evaluator, the store scores the candidate (version 0's weights with its
    // own head) and the round's own model on its 20 test rows and posts both losses; here
    // the candidate is the round's model, so the two are the same number.
    let candidate = bed.blob_sha(ModelVersion(0));
    if let Some(round) = bed.pop().round.as_mut() {
        round.evaluation = Some(wire::EvaluationTask {
            candidate_sha256: candidate.clone(),
            evaluators: vec![StoreId("2".into())],
            deadline_ms: now_ms() + 20_000,
        });
    }
    wait_for(10, "the evaluation", || !bed.pop().evaluations.is_empty());
    let report = bed.pop().evaluations[0].clone();
    assert_eq!((report.round, report.examples), (RoundId(1), 20));
    assert_eq!(report.candidate_sha256, candidate);
    assert!(
        report.loss.is_finite() && report.loss > 0.0,
        "{}",
        report.loss
    );
    assert_eq!(report.baseline_loss, Some(report.loss));
    agent.stop();
    let lines = audit_lines(&bed, "2");
    let events: Vec<&str> = lines.iter().filter_map(|l| l["event"].as_str()).collect();
    for event in [
        "round_joined",
        "dataset_snapshot",
        "training_config",
        "noise_seed_commitment",
        "update_queued",
        "upload_confirmed",
    ] {
        assert!(events.contains(&event), "{event} missing from {events:?}");
    }
    assert!(
        lines
            .iter()
            .any(|l| l["event"] == "upload_confirmed" && l["included"] == true)
    );
    let verified = audit::verify(&bed.state_dir("2").join("audit.jsonl")).expect("reads");
    assert!(verified.is_ok(), "{verified:?}");
    // The personalised head stays at the store.
    assert!(bed.state_dir("2").join("local.safetensors").exists());
    assert_eq!(bed.pop().puts, 1);
}

#[test]
fn tampered_wrongly_signed_and_older_models_are_refused_and_the_last_good_one_kept() {
    let _serial = serial();
    let mut bed = Bed::new(&["2"]);
    let v1 = bed.publish(2);
    let v2 = bed.publish(3);
    let config = bed.config("2", "00:00-24:00", "");
    bed.set_receipt(1, "2", ReceiptStatus::Included);
    bed.announce(1, v1, &["2"], TASK);
    let agent = Agent::start(vec![config]);
    wait_for(25, "round 1's upload", || bed.pop().uploads.len() == 1);
    wait_for(10, "round 1 to settle", || {
        queued_files(&bed, "2").is_empty()
    });
    let good = agent_state(&bed, "2")
        .last_good_model
        .expect("a good model");
    assert_eq!(
        (good.version, agent_state(&bed, "2").last_trained_version),
        (1, Some(1))
    );

    // Round 2: version 2's blob with one byte changed (the manifest still signs the true
    // digest, which the round announces).
    let sha2 = bed.blob_sha(v2);
    let mut tampered = bed.pop().blobs[&sha2].clone();
    let last = tampered.len() - 1;
    tampered[last] ^= 1;
    bed.pop().blobs.insert(sha2.clone(), tampered);
    bed.announce(2, v2, &["2"], TASK);
    wait_for(15, "round 2's decline", || declined(&bed, "2", 2).is_some());
    let reason = declined(&bed, "2", 2).unwrap_or_default();
    assert!(
        reason.contains("model refused") && reason.contains("sha-256"),
        "{reason}"
    );

    // Round 3: version 2's manifest signed by another key.
    let other = tempfile::tempdir().expect("tempdir");
    let (secret, _) = keys::generate(other.path()).expect("keys");
    let intruder = Registry::new(
        EmbeddedBackend::open(&other.path().join("store")).expect("registry"),
        keys::read_signing_key(&secret).expect("key"),
    );
    let blob = bed.versions[v2.0 as usize].to_safetensors().expect("blob");
    for parent in [None, Some(ModelVersion(0)), Some(ModelVersion(1))] {
        let candidate = Candidate {
            model: ModelId(MODEL.into()),
            parent,
            blob: blob.clone(),
            model_spec: "mlp 2-4-1".into(),
            training_config_sha256: sha256(TASK.as_bytes()),
            dp: DpSpend {
                unit: "record".into(),
                noise_multiplier: 0.0,
                clip_norm: 0.0,
                delta: 1e-5,
                epsilon: 0.0,
            },
            metrics: BTreeMap::new(),
        };
        intruder
            .publish(&candidate, 0.1, Timestamp(1))
            .expect("publish");
    }
    let forged = intruder
        .backend()
        .manifest(&ModelId(MODEL.into()), v2)
        .expect("manifest")
        .expect("stored");
    {
        let mut pop = bed.pop();
        pop.blobs.insert(sha2.clone(), blob);
        pop.manifests.insert(
            (MODEL.into(), v2.0),
            serde_json::to_vec(&forged).expect("json"),
        );
    }
    bed.announce(3, v2, &["2"], TASK);
    wait_for(15, "round 3's decline", || declined(&bed, "2", 3).is_some());
    let reason = declined(&bed, "2", 3).unwrap_or_default();
    assert!(reason.contains("bad signature"), "{reason}");

    // Round 4: version 0, validly signed but older than version 1 the store trained from.
    bed.announce(4, ModelVersion(0), &["2"], TASK);
    wait_for(15, "round 4's decline", || declined(&bed, "2", 4).is_some());
    let reason = declined(&bed, "2", 4).unwrap_or_default();
    assert!(reason.contains("older than version 1"), "{reason}");
    agent.stop();

    // Nothing trained or sent since round 1; the last good model is still on disk.
    assert_eq!(bed.pop().uploads.len(), 1);
    let state = agent_state(&bed, "2");
    assert_eq!(state.last_good_model.as_ref(), Some(&good));
    assert_eq!(state.last_trained_version, Some(1));
    let models = bed.state_dir("2").join("models");
    assert!(models.join(format!("{}.safetensors", good.sha256)).exists());
    assert!(
        models
            .join(format!("{}.manifest.json", good.sha256))
            .exists()
    );
    assert!(!models.join(format!("{sha2}.safetensors")).exists());
}

#[test]
fn killed_after_queueing_a_store_resends_once_and_settles_after_the_receipt() {
    let _serial = serial();
    let bed = Bed::new(&["2"]);
    let config = bed.config("2", "00:00-24:00", "");
    bed.announce(1, ModelVersion(0), &["2"], TASK);

    // 1. The PoP holds the upload; core has not settled the round.
    let agent = Agent::start(vec![config.clone()]);
    wait_for(25, "the upload", || bed.pop().uploads.len() == 1);
    wait_for(5, "the queue entry", || queued_files(&bed, "2").len() == 1);
    agent.kill();
    let first = bed.pop().uploads[0].1.upload_id.clone();
    let puts_before = bed.pop().puts;

    // 2. A new process: it re-sends the open entry (the PoP answers the same receipt and
    //    does not count it again) and does not join round 1 a second time.
    let agent = Agent::start(vec![config]);
    wait_for(15, "the re-send", || bed.pop().puts > puts_before);
    bed.set_receipt(1, "2", ReceiptStatus::Included);
    wait_for(10, "the queue to settle", || {
        queued_files(&bed, "2").is_empty()
    });
    std::thread::sleep(Duration::from_millis(300));
    agent.stop();

    let pop = bed.pop();
    assert_eq!(pop.uploads.len(), 1, "one copy reached the pop");
    assert_eq!(pop.uploads[0].1.upload_id, first);
    let confirmations = audit_lines(&bed, "2")
        .into_iter()
        .filter(|l| l["event"] == "upload_confirmed")
        .count();
    assert_eq!(confirmations, 1);
    let joins = audit_lines(&bed, "2")
        .into_iter()
        .filter(|l| l["event"] == "round_joined")
        .count();
    assert_eq!(joins, 1, "round 1 is joined once across the restart");
}

#[test]
fn a_store_sends_its_update_again_when_core_says_no_pop_brought_it() {
    let _serial = serial();
    let bed = Bed::new(&["2"]);
    let config = bed.config("2", "00:00-24:00", "");
    bed.announce(1, ModelVersion(0), &["2"], TASK);

    // 1. A PoP holds the upload, then (as if it died before forwarding) core misses it.
    let agent = Agent::start(vec![config]);
    wait_for(25, "the upload", || bed.pop().uploads.len() == 1);
    assert!(
        bed.pop().resent_puts.is_empty(),
        "the first send is not a re-send"
    );
    bed.set_receipt(1, "2", ReceiptStatus::Resend);

    // 2. The same update goes again, marked; once core has it, the entry settles.
    wait_for(10, "the re-send", || !bed.pop().resent_puts.is_empty());
    bed.set_receipt(1, "2", ReceiptStatus::Included);
    wait_for(10, "the queue to settle", || {
        queued_files(&bed, "2").is_empty()
    });
    agent.stop();

    let pop = bed.pop();
    let first = pop.uploads[0].1.upload_id.clone();
    assert_eq!(pop.uploads.len(), 1, "one update, one upload id");
    assert!(pop.resent_puts.iter().all(|id| *id == first));
    let events: Vec<String> = audit_lines(&bed, "2")
        .into_iter()
        .filter_map(|l| l["event"].as_str().map(str::to_owned))
        .collect();
    for event in ["update_held", "update_resent", "upload_confirmed"] {
        assert!(
            events.iter().any(|e| e == event),
            "{event} missing: {events:?}"
        );
    }
    assert_eq!(
        events.iter().filter(|e| *e == "upload_confirmed").count(),
        1
    );
}

#[test]
fn killed_before_any_pop_held_its_update_a_store_delivers_it_once_after_restart() {
    let _serial = serial();
    let bed = Bed::new(&["2"]);
    let config = bed.config("2", "00:00-24:00", "");
    bed.announce(1, ModelVersion(0), &["2"], TASK);
    bed.pop().refuse_uploads = true;

    // 1. The update is built and queued, but the PoP will not hold it; the store keeps
    //    trying (with backoff) until it is killed.
    let agent = Agent::start(vec![config.clone()]);
    wait_for(25, "refused attempts", || bed.pop().puts >= 2);
    assert_eq!(queued_files(&bed, "2").len(), 1);
    agent.kill();
    assert!(bed.pop().uploads.is_empty());

    // 2. Restarted, with the PoP healthy again: delivered once, settled on the receipt.
    bed.pop().refuse_uploads = false;
    let agent = Agent::start(vec![config]);
    wait_for(15, "the upload", || bed.pop().uploads.len() == 1);
    bed.set_receipt(1, "2", ReceiptStatus::Included);
    wait_for(10, "the queue to settle", || {
        queued_files(&bed, "2").is_empty()
    });
    std::thread::sleep(Duration::from_millis(300));
    agent.stop();
    assert_eq!(bed.pop().uploads.len(), 1);
    let lines = audit_lines(&bed, "2");
    let count = |event: &str| lines.iter().filter(|l| l["event"] == event).count();
    assert_eq!((count("round_joined"), count("update_queued")), (1, 1));
    assert_eq!(count("upload_confirmed"), 1);
}

#[test]
fn decline_reasons_surface_in_each_hosted_stores_audit_log() {
    let _serial = serial();
    let bed = Bed::new(&["2", "5"]);
    // Store 2's window is closed now (it opens in two hours); store 5's is always open but
    // its budget is tiny.
    let opens = jiff::tz::TimeZone::UTC
        .to_datetime(jiff::Timestamp::now())
        .time()
        .wrapping_add(jiff::SignedDuration::from_hours(2));
    let closes = opens.wrapping_add(jiff::SignedDuration::from_mins(30));
    let window = format!(
        "{:02}:{:02}-{:02}:{:02}",
        opens.hour(),
        opens.minute(),
        closes.hour(),
        closes.minute()
    );
    let closed = bed.config("2", &window, "");
    let thrifty = bed.config("5", "00:00-24:00", "\n[privacy]\nepsilon_budget = 0.5\n");
    let agent = Agent::start(vec![closed, thrifty]);

    // Round 1 selects only store 5; round 2 needs a newer runtime; round 3 trains with
    // DP-SGD, which store 2's window and store 5's budget refuse.
    bed.announce(1, ModelVersion(0), &["5"], TASK);
    wait_for(15, "round 1's decline", || declined(&bed, "2", 1).is_some());
    let sha = bed.blob_sha(ModelVersion(0));
    bed.announce_with(2, ModelVersion(0), &sha, &["2", "5"], TASK, "99.0.0");
    wait_for(15, "round 2's declines", || {
        declined(&bed, "2", 2).is_some() && declined(&bed, "5", 2).is_some()
    });
    bed.announce(3, ModelVersion(0), &["2", "5"], DP_TASK);
    wait_for(15, "round 3's declines", || {
        declined(&bed, "2", 3).is_some() && declined(&bed, "5", 3).is_some()
    });
    agent.stop();

    let reason = |store, round| declined(&bed, store, round).unwrap_or_default();
    assert_eq!(reason("2", 1), "not selected for this round");
    assert!(
        reason("2", 2).contains("older than the plan's minimum 99.0.0"),
        "{}",
        reason("2", 2)
    );
    assert!(
        reason("5", 2).contains("older than the plan's minimum 99.0.0"),
        "{}",
        reason("5", 2)
    );
    assert!(
        reason("2", 3).starts_with("outside the training window"),
        "{}",
        reason("2", 3)
    );
    assert!(
        reason("5", 3).contains("over the budget of 0.5"),
        "{}",
        reason("5", 3)
    );
    // Store 5 trained round 1; nobody trained rounds 2 and 3.
    let rounds: Vec<u64> = bed
        .pop()
        .uploads
        .iter()
        .map(|(_, h, _)| h.round.0)
        .collect();
    assert!(rounds.iter().all(|&r| r == 1), "{rounds:?}");
    for store in ["2", "5"] {
        let verified = audit::verify(&bed.state_dir(store).join("audit.jsonl")).expect("reads");
        assert!(verified.is_ok(), "{store}: {verified:?}");
    }
}

#[test]
fn three_hosted_stores_complete_a_secure_round_whose_unmasked_sum_is_their_deltas() {
    let _serial = serial();
    let bed = Bed::new(&["2", "5", "8"]);
    let configs = ["2", "5", "8"]
        .map(|store| bed.config(store, "00:00-24:00", ""))
        .to_vec();
    // Three stores, the complete graph (degree 2), threshold 2: a real SecAgg+ round.
    let secagg = bed.secure_round(&["2", "5", "8"], [9; 32], DIMENSION, 8, CLIP, None);
    let agent = Agent::start(configs);

    wait_for(25, "the unmasked sum", || {
        bed.pop()
            .core
            .as_ref()
            .is_some_and(|c| c.session.outcome().is_some())
    });
    for store in ["2", "5", "8"] {
        bed.set_receipt(1, store, ReceiptStatus::Included);
    }
    wait_for(10, "every queue to settle", || {
        ["2", "5", "8"]
            .iter()
            .all(|s| queued_files(&bed, s).is_empty())
    });
    agent.stop();

    let outcome = bed
        .pop()
        .core
        .as_ref()
        .and_then(|c| c.session.outcome().cloned())
        .expect("finished")
        .expect("the round succeeded");
    assert_eq!(outcome.survivors.len(), 3);
    // The three stores hold the same rows (the generator does not depend on the store), so
    // each trains the same delta; the sum is three of them, within a level per store.
    let expected = expected_delta(&bed, "2", ModelVersion(0));
    let decoded = secagg.decode(&outcome.sum);
    let level = 1.0 / secagg.scale() as f32;
    for (i, (got, want)) in decoded.iter().zip(&expected).enumerate() {
        let want = 3.0 * want.clamp(-CLIP, CLIP);
        assert!(
            (got - want).abs() <= 3.0 * level + 1e-5,
            "coordinate {i}: {got} vs {want}"
        );
    }
    // What the PoP saw of one store is masked: it does not decode to that store's delta.
    let (_, header, body) = bed.pop().uploads[0].clone();
    let alone = PackedVector {
        ring_bits: header.ring_bits,
        len: header.len,
        bytes: body,
    }
    .unpack(secagg.ring_bits(), secagg.vector_len())
    .expect("unpacks");
    let far = secagg
        .decode(&alone)
        .iter()
        .zip(&expected)
        .filter(|(got, want)| (*got - want.clamp(-CLIP, CLIP)).abs() > 4.0 * level)
        .count();
    assert!(
        far > DIMENSION as usize / 2,
        "only {far} coordinates look masked"
    );
}

#[test]
fn three_hosted_stores_send_the_moments_of_their_rows_to_a_statistics_round() {
    let _serial = serial();
    let stores = ["2", "5", "8"];
    let bed = Bed::new(&stores);
    let configs = stores
        .map(|store| bed.config(store, "00:00-24:00", ""))
        .to_vec();
    let statistics = StatisticsTask {
        features: 2,
        max_rows: 100_000,
        bound: 100.0,
    };
    let dimension = statistics.levels_len() as u32;
    let secagg = bed.secure_round(
        &stores,
        [3; 32],
        dimension,
        MOMENT_QUANT_BITS,
        1.0,
        Some(statistics.clone()),
    );
    let outcome = bed.run_secure_round(Agent::start(configs), &stores);
    // The generator gives every store the same rows, so the pooled statistics are one
    // store's, over three times its rows; the reference is Normalisation::fit on them.
    let levels: Vec<i64> = outcome.sum.iter().map(|&v| secagg.centred(v)).collect();
    let got = statistics
        .decode(&levels, secagg.max_level())
        .expect("decodes");
    let data = store_data(&bed, "2");
    let fit = Normalisation::fit([&data.train]).expect("fit");
    assert_eq!(got.count, 3.0 * data.train.len() as f64);
    for j in 0..2 {
        assert!((got.mean[j] - fit.mean[j]).abs() <= 1e-9 * fit.mean[j].abs().max(1.0));
        assert!(
            (got.std[j] - fit.std[j]).abs() <= 1e-7 * fit.std[j],
            "feature {j}"
        );
    }
    let target_mean = fit.target_mean.expect("rows");
    assert!((got.target_mean - target_mean).abs() <= 1e-9 * target_mean.abs().max(1.0));

    // Nothing was trained and no epsilon spent; the audit log says what was sent.
    for store in stores {
        let state = agent_state(&bed, store);
        assert_eq!(state.rounds_trained, 0, "{store}");
        let joined = audit_lines(&bed, store)
            .into_iter()
            .find(|l| l["event"] == "statistics_joined")
            .expect("statistics_joined");
        assert_eq!(joined["rows"], data.train.len() as u64);
    }
}

#[cfg(feature = "failpoints")]
#[test]
fn a_store_restarted_between_upload_and_unmask_answers_from_its_saved_state() {
    let _serial = serial();
    let _failpoints = fail::FailScenario::setup();
    let stores = ["2", "5", "8"];
    let bed = Bed::new(&stores);
    let configs: Vec<AgentConfig> = stores
        .map(|store| bed.config(store, "00:00-24:00", ""))
        .to_vec();
    // Threshold 2 of each store's two neighbours: every store's answer is needed, so the
    // round completes only if the restarted stores answer.
    let secagg = bed.secure_round(&stores, [4; 32], DIMENSION, 8, CLIP, None);

    // 1. Every store uploads, then its process dies before the unmask step.
    fail::cfg("round.before_unmask", "return").expect("fail point");
    let agent = Agent::start(configs.clone());
    wait_for(25, "core to ask for unmasking", || {
        bed.pop()
            .core
            .as_ref()
            .is_some_and(|c| c.session.phase() == CorePhase::Unmasking)
    });
    std::thread::sleep(Duration::from_millis(300));
    agent.kill();
    fail::remove("round.before_unmask");
    for store in stores {
        let dir = bed.state_dir(store).join("secrets");
        let files: Vec<_> = std::fs::read_dir(&dir)
            .expect("secrets")
            .flatten()
            .collect();
        assert_eq!(files.len(), 1, "{store}: one saved round");
        let mode = files[0].metadata().expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{store}: readable by the agent only");
    }
    assert!(
        bed.pop()
            .core
            .as_ref()
            .is_some_and(|c| c.session.outcome().is_none())
    );

    // 2. A new process answers from the saved states; the sum is the three deltas.
    let outcome = bed.run_secure_round(Agent::start(configs), &stores);
    assert_eq!(outcome.survivors.len(), 3);
    let expected = expected_delta(&bed, "2", ModelVersion(0));
    let level = 1.0 / secagg.scale() as f32;
    for (i, (got, want)) in secagg
        .decode(&outcome.sum)
        .iter()
        .zip(&expected)
        .enumerate()
    {
        let want = 3.0 * want.clamp(-CLIP, CLIP);
        assert!((got - want).abs() <= 3.0 * level + 1e-5, "coordinate {i}");
    }
    // Settled rounds leave no secrets behind.
    for store in stores {
        let dir = bed.state_dir(store).join("secrets");
        assert_eq!(
            std::fs::read_dir(&dir).expect("secrets").count(),
            0,
            "{store}"
        );
    }
}

#[test]
fn status_reports_the_identity_the_pop_over_each_protocol_and_why_it_is_unreachable() {
    let _serial = serial();
    let bed = Bed::new(&["2"]);
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let gather = |config: &AgentConfig| {
        runtime
            .block_on(daemon::status::gather(config, Duration::from_secs(15)))
            .expect("status")
    };
    // A closed port: bound once, then released.
    let closed = std::net::UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .expect("port")
        .to_string();

    // 1. Reachable over HTTP/3, an always-open window, nothing spent or queued.
    let config = bed.config("2", "00:00-24:00", "");
    let up = gather(&config);
    assert_eq!(
        up.spiffe_id.as_deref(),
        Some("spiffe://fedmesh.test/store/north/2")
    );
    assert!(up.identity_expires.is_some() && up.identity_error.is_none());
    assert!(up.pop_reachable, "{up:?}");
    assert_eq!(up.pop_protocol.as_deref(), Some("HTTP/3"));
    assert!(up.window_open);
    assert!(up.queued.is_empty());
    assert_eq!(up.epsilon_spent, 0.0);
    assert_eq!(up.epsilon_left, up.epsilon_budget);

    // 2. UDP gets nowhere (nothing listens on the QUIC port): the TCP fallback answers.
    let mut no_udp = config.clone();
    no_udp.pop.address = closed.clone();
    let fallback = gather(&no_udp);
    assert!(fallback.pop_reachable, "{fallback:?}");
    assert_eq!(fallback.pop_protocol.as_deref(), Some("HTTP/2"));

    // 3. Neither answers: unreachable, with the reason.
    let mut down = config.clone();
    down.pop.address = closed.clone();
    down.pop.fallback_tcp_address = Some(closed);
    let unreachable = gather(&down);
    assert!(!unreachable.pop_reachable);
    assert!(unreachable.pop_protocol.is_none());
    assert!(unreachable.pop_error.is_some(), "{unreachable:?}");

    // 4. A window that is closed now says when it opens next: within a day, in the future.
    let now = jiff::Timestamp::now();
    let hour = jiff::tz::TimeZone::UTC.to_datetime(now).hour();
    let (start, end) = ((hour + 2) % 24, (hour + 3) % 24);
    let closed_window = bed.config("2", &format!("{start:02}:00-{end:02}:00"), "");
    let later = gather(&closed_window);
    assert!(!later.window_open);
    let next: jiff::Timestamp = later.next_window.parse().expect("RFC 3339");
    let ahead = next.duration_since(now).as_secs();
    assert!((3_600..=3 * 3_600).contains(&ahead), "opens in {ahead} s");
}

/// Runs the `store-agent` binary with `args`.
fn store_agent(args: &[&str]) -> std::process::Command {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_store-agent"));
    command.args(args);
    command
}

#[test]
fn sigterm_stops_the_agent_cleanly_and_leaves_the_unsettled_update_queued() {
    let _serial = serial();
    let bed = Bed::new(&["2"]);
    bed.config("2", "00:00-24:00", "");
    let config = bed.root().join("store-2.toml");
    bed.announce(1, ModelVersion(0), &["2"], TASK);
    let mut child = store_agent(&["run", "--config", config.to_str().expect("utf-8")])
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("starts");
    wait_for(25, "the upload", || bed.pop().uploads.len() == 1);
    let term = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill runs");
    assert!(term.success());
    let until = Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(status) = child.try_wait().expect("waits") {
            break status;
        }
        if Instant::now() > until {
            let _ = child.kill();
            panic!("the agent did not stop within 15 s of SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status:?}");
    // Core has not settled the round: the update stays queued for the next start.
    assert_eq!(queued_files(&bed, "2").len(), 1);

    // `status` reads the same state without disturbing it.
    let output = store_agent(&[
        "status",
        "--config",
        config.to_str().expect("utf-8"),
        "--json",
    ])
    .output()
    .expect("status runs");
    assert!(output.status.success(), "{output:?}");
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).expect("json");
    assert_eq!(report["spiffe_id"], "spiffe://fedmesh.test/store/north/2");
    assert!(report["identity_expires"].is_string(), "{report}");
    assert_eq!(report["pop_reachable"], true, "{report}");
    assert_eq!(report["pop_protocol"], "HTTP/3", "{report}");
    assert_eq!(report["model_version"], 0);
    assert_eq!(report["window_open"], true);
    assert_eq!(
        report["queued"].as_array().map(Vec::len),
        Some(1),
        "{report}"
    );
    assert_eq!(report["queued"][0]["state"], "sent", "{report}");
    assert_eq!(report["epsilon_spent"], 0.0);
    assert_eq!(report["epsilon_left"], 8.0);
    assert_eq!(queued_files(&bed, "2").len(), 1);
    let text = store_agent(&["status", "--config", config.to_str().expect("utf-8")])
        .output()
        .expect("status runs");
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("pop: reachable over HTTP/3"), "{text}");
    assert!(text.contains("queued updates: 1"), "{text}");
}
