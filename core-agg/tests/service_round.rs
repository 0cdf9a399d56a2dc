//! `core-agg serve` end to end over the real transport on 127.0.0.1: a fake PoP relays for
//! fake stores that run `secagg::StoreSession`, and folds their masked updates itself.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use fedmesh_core_agg::ModelId;
use fedmesh_core_agg::registry::{SignedManifest, keys, sha256_hex, verify_manifest};
use fedmesh_core_agg::service::config::Config;
use fedmesh_core_agg::service::model::{TaskFacts, Weights};
use fedmesh_core_agg::service::{self, Running};
use fedmesh_protocol::accountant::RdpAccountant;
use fedmesh_protocol::ids::{ModelVersion, Region, RoundId, StoreId};
use fedmesh_protocol::secagg::{
    PackedVector, PartialSumBuilder, QuantisedUpdate, SecAggPlan, StoreSession,
};
use fedmesh_protocol::wire::{
    self, ApiError, Contribution, CoreMessage, EvaluationReport, ModelPointer, PartialSumAck,
    PartialSumHeader, ReceiptStatus, RoundAnnouncement, RoundReceipt, SecAggStep, StoreMessage,
};
use fedmesh_transport::pki::{DevPkiSpec, write_dev_pki};
use fedmesh_transport::{Client, ClientConfig, FileSvidSource, PeerPolicy, SendBody, SvidPaths};
use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;

#[cfg(feature = "etcd")]
#[allow(dead_code)]
mod support;

const TRUST_DOMAIN: &str = "fedmesh.test";
const STORES: [(&str, &str); 7] = [
    ("north", "1"),
    ("north", "2"),
    ("north", "3"),
    ("north", "4"),
    ("south", "5"),
    ("south", "6"),
    ("south", "7"),
];
/// Each poll loop waits at most this many steps of [`STEP`].
const MAX_STEPS: usize = 200;
const STEP: Duration = Duration::from_millis(50);

const TASK: &str = r#"
[model]
kind = "mlp"
inputs = 3
hidden = [2]
outputs = 1
objective = "regression"
local = ["head"]

[training]
epochs = 1
batch_size = 16
learning_rate = 0.01

[training.dp]
clip_norm = 1.0
noise_multiplier = 1.0
expected_batch_size = 16
"#;

/// The initial model: 8 shared values (`body.bias`, `body.weight`) and a local head.
fn initial_weights() -> Weights {
    Weights::from_tensors(BTreeMap::from([
        ("body.bias".into(), (vec![2], vec![0.1, -0.2])),
        (
            "body.weight".into(),
            (vec![2, 3], vec![0.5, -0.5, 0.25, 0.0, 1.0, -1.0]),
        ),
        ("head.weight".into(), (vec![1, 2], vec![3.0, 4.0])),
    ]))
}

/// A store's update: deterministic, different per store, inside the clip of 0.5.
fn update_of(store: &StoreId) -> Vec<f32> {
    let s: f32 = store.0.parse().unwrap_or(0.0);
    (0..8)
        .map(|j| ((s * 0.07 + j as f32 * 0.031) % 0.9) - 0.45)
        .collect()
}

struct Mesh {
    dir: tempfile::TempDir,
    config: Config,
    running: Option<Running>,
    pop: Client,
    rng: ChaCha20Rng,
}

fn free_port() -> SocketAddr {
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    udp.local_addr().unwrap()
}

impl Mesh {
    async fn start(edit: impl FnOnce(&mut String)) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let root = dir.path();
        write_dev_pki(
            &root.join("pki"),
            &DevPkiSpec {
                trust_domain: TRUST_DOMAIN.into(),
                ca_lifetime: Duration::from_secs(3600),
                svid_lifetime: Duration::from_secs(3600),
                pops: vec!["chicago".into()],
                stores: STORES
                    .iter()
                    .map(|(r, s)| (r.to_string(), s.to_string()))
                    .collect(),
            },
        )?;
        keys::generate(&root.join("keys"))?;
        std::fs::write(root.join("task.toml"), TASK)?;
        std::fs::write(
            root.join("initial.safetensors"),
            initial_weights().to_safetensors()?,
        )?;
        let mut text = format!(
            r#"
listen = "{listen}"
identity_dir = "pki/core"
state_dir = "state"
model = "oj-demand"
task = "task.toml"
initial_model = "initial.safetensors"
[registry]
signing_key = "keys/registry.key"
[rounds]
count = 1
fraction = 0.1
min_cohort = 3
over_selection = 1.0
region_cap = 1.0
min_online = 5
online_window_s = 60
selection_timeout_s = 5
keys_s = 3
shares_s = 3
upload_s = 4
unmask_s = 3
evaluation_s = 5
evaluators = 1
regression_threshold = 0.5
[aggregation]
quant_bits = 8
guard_bits = 2
clip = 0.5
expected_dropout = 0.1
"#,
            listen = free_port()
        );
        edit(&mut text);
        std::fs::write(root.join("core.toml"), &text)?;
        let config = Config::load(&root.join("core.toml"))?;
        let running = service::start(config.clone()).await?;
        let pop = pop_client(root, &running, "pop/chicago")?;
        Ok(Self {
            dir,
            config,
            running: Some(running),
            pop,
            rng: ChaCha20Rng::seed_from_u64(11),
        })
    }

    /// Kills core and starts it again on the same state and address.
    async fn restart(&mut self) -> Result<()> {
        if let Some(running) = self.running.take() {
            running.stop().await;
        }
        // The old sockets close asynchronously; a fresh process would not wait, a task
        // in this process may have to.
        let mut attempt = 0;
        let running = loop {
            match service::start(self.config.clone()).await {
                Ok(running) => break running,
                Err(_) if attempt < 30 => {
                    attempt += 1;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => return Err(e.into()),
            }
        };
        self.pop = pop_client(self.dir.path(), &running, "pop/chicago")?;
        self.running = Some(running);
        Ok(())
    }

    fn client_as(&self, identity: &str) -> Result<Client> {
        pop_client(
            self.dir.path(),
            self.running.as_ref().context("core stopped")?,
            identity,
        )
    }

    /// A request through the PoP, relaying for `store` if given.
    async fn call(
        &self,
        method: Method,
        path: &str,
        store: Option<&StoreId>,
        header: Option<(&'static str, String)>,
        body: Vec<u8>,
    ) -> Result<(StatusCode, Bytes)> {
        call(&self.pop, method, path, store, header, body).await
    }

    async fn get_json<T: serde::de::DeserializeOwned>(&self, path: &str) -> Result<T> {
        let (status, body) = self.call(Method::GET, path, None, None, Vec::new()).await?;
        if status != StatusCode::OK {
            bail!("GET {path}: {status} {}", String::from_utf8_lossy(&body));
        }
        Ok(serde_json::from_slice(&body)?)
    }

    /// Every store polls until the round is announced.
    async fn announcement(&self) -> Result<RoundAnnouncement> {
        for _ in 0..MAX_STEPS {
            let mut found = None;
            for (region, id) in STORES {
                let store = StoreId(id.into());
                let _ = region;
                let (status, body) = self
                    .call(Method::GET, wire::ROUND, Some(&store), None, Vec::new())
                    .await?;
                if status == StatusCode::OK {
                    found = Some(serde_json::from_slice(&body)?);
                }
            }
            if let Some(announcement) = found {
                return Ok(announcement);
            }
            tokio::time::sleep(STEP).await;
        }
        bail!("no round announced")
    }

    async fn post_secagg(
        &self,
        round: RoundId,
        store: &StoreId,
        message: &StoreMessage,
    ) -> Result<StatusCode> {
        let body = serde_json::to_vec(message)?;
        let (status, _) = self
            .call(Method::POST, &wire::secagg(round), Some(store), None, body)
            .await?;
        Ok(status)
    }

    /// Polls a secure-aggregation step until core answers.
    async fn poll_step(
        &self,
        round: RoundId,
        step: SecAggStep,
        store: &StoreId,
    ) -> Result<CoreMessage> {
        for _ in 0..MAX_STEPS {
            let (status, body) = self
                .call(
                    Method::GET,
                    &wire::secagg_step(round, step),
                    Some(store),
                    None,
                    Vec::new(),
                )
                .await?;
            match status {
                StatusCode::OK => return Ok(serde_json::from_slice(&body)?),
                StatusCode::NO_CONTENT => tokio::time::sleep(STEP).await,
                other => bail!(
                    "{step:?} for {store}: {other} {}; status {}",
                    String::from_utf8_lossy(&body),
                    self.status().await?
                ),
            }
        }
        bail!("no {step:?} reply for {store}")
    }

    async fn metrics(&self) -> Result<String> {
        let (status, body) = self
            .call(Method::GET, wire::METRICS, None, None, Vec::new())
            .await?;
        assert_eq!(status, StatusCode::OK);
        Ok(String::from_utf8_lossy(&body).into_owned())
    }

    async fn status(&self) -> Result<serde_json::Value> {
        self.get_json("/v1/status").await
    }
}

fn pop_client(root: &Path, running: &Running, identity: &str) -> Result<Client> {
    let source = FileSvidSource::load(SvidPaths::in_dir(&root.join("pki").join(identity)))?;
    let core_id = format!("spiffe://{TRUST_DOMAIN}/core").parse()?;
    let mut config = ClientConfig::new(running.quic_addr(), PeerPolicy::Exact(core_id));
    config.tcp_addr = running.tcp_addr().context("no tcp listener")?;
    Ok(Client::new(config, source)?)
}

async fn call(
    client: &Client,
    method: Method,
    path: &str,
    store: Option<&StoreId>,
    header: Option<(&'static str, String)>,
    body: Vec<u8>,
) -> Result<(StatusCode, Bytes)> {
    let mut headers = HeaderMap::new();
    if let Some(store) = store {
        let region = STORES
            .iter()
            .find(|(_, id)| *id == store.0)
            .map_or("north", |(r, _)| *r);
        let value = format!("spiffe://{TRUST_DOMAIN}/store/{region}/{}", store.0);
        headers.insert(
            HeaderName::from_static(wire::STORE_HEADER),
            HeaderValue::from_str(&value)?,
        );
    }
    if let Some((name, value)) = header {
        headers.insert(
            HeaderName::from_static(name),
            HeaderValue::from_str(&value)?,
        );
    }
    let response = client
        .request(method, path, headers, SendBody::from_bytes(body))
        .await?;
    let status = response.status();
    Ok((status, response.bytes(64 << 20).await?))
}

/// What the stores of a cohort hold across the protocol.
struct Cohort {
    plan: SecAggPlan,
    sessions: Vec<(StoreId, StoreSession)>,
}

/// How a test store turns its data into ring values.
type Quantiser = dyn Fn(&SecAggPlan, &StoreId, &mut ChaCha20Rng) -> Result<QuantisedUpdate> + Sync;

impl Mesh {
    /// Steps 1 and 2: key adverts and encrypted shares for every cohort store.
    async fn exchange_keys(&mut self, announcement: &RoundAnnouncement) -> Result<Cohort> {
        let plan = SecAggPlan::new(announcement.plan.clone())?;
        let round = announcement.round;
        let mut sessions = Vec::new();
        for store in plan.cohort().to_vec() {
            let (session, advert) = StoreSession::new(plan.clone(), store.clone(), &mut self.rng)?;
            let advert = advert.context("secure mode sends an advert")?;
            let status = self
                .post_secagg(round, &store, &StoreMessage::KeyAdvert(advert))
                .await?;
            assert_eq!(status, StatusCode::ACCEPTED);
            sessions.push((store, session));
        }
        for (store, session) in &mut sessions {
            let CoreMessage::NeighbourKeys(keys) =
                self.poll_step(round, SecAggStep::Keys, store).await?
            else {
                bail!("keys step answered something else");
            };
            let shares = session.handle_neighbour_keys(&keys, &mut self.rng)?;
            let status = self
                .post_secagg(round, store, &StoreMessage::EncryptedShares(shares))
                .await?;
            assert_eq!(status, StatusCode::ACCEPTED);
        }
        Ok(Cohort { plan, sessions })
    }

    /// Steps 3 and 4: every store receives its shares, quantises and masks its update; the
    /// PoP folds them and forwards one partial sum; then each store unmasks. Returns each
    /// store's quantised update (ring values).
    async fn upload_and_unmask(
        &mut self,
        round: RoundId,
        cohort: &mut Cohort,
    ) -> Result<Vec<Vec<u64>>> {
        self.upload_and_unmask_with(round, cohort, &|plan, store, rng| {
            Ok(plan.quantise(&update_of(store), rng)?)
        })
        .await
    }

    /// [`Mesh::upload_and_unmask`] with each store's vector from `quantise`.
    async fn upload_and_unmask_with(
        &mut self,
        round: RoundId,
        cohort: &mut Cohort,
        quantise: &Quantiser,
    ) -> Result<Vec<Vec<u64>>> {
        let quantised = self.upload_with(round, cohort, quantise).await?;
        self.unmask(round, cohort).await?;
        Ok(quantised)
    }

    /// Steps 3 and 4 only: the partial sum reaches core, nobody unmasks yet.
    async fn upload_with(
        &mut self,
        round: RoundId,
        cohort: &mut Cohort,
        quantise: &Quantiser,
    ) -> Result<Vec<Vec<u64>>> {
        let mut builder = PartialSumBuilder::new(cohort.plan.clone());
        let mut quantised = Vec::new();
        let mut contributors = Vec::new();
        for (store, session) in &mut cohort.sessions {
            let CoreMessage::Shares(shares) =
                self.poll_step(round, SecAggStep::Shares, store).await?
            else {
                bail!("shares step answered something else");
            };
            session.handle_shares(&shares)?;
            let q = quantise(&cohort.plan, store, &mut self.rng)?;
            quantised.push(q.values().to_vec());
            builder.fold(&session.mask(&q)?)?;
            let region = STORES
                .iter()
                .find(|(_, id)| *id == store.0)
                .map_or("north", |(r, _)| *r);
            contributors.push(Contribution {
                store: store.clone(),
                region: Region(region.into()),
                examples: 100,
                loss: 1.0,
                bytes: 10,
            });
        }
        let partial = builder.finish()?.context("a partial sum")?;
        let header = PartialSumHeader {
            round,
            pop: "chicago".into(),
            ring_bits: partial.vector.ring_bits,
            len: partial.vector.len,
            contributors,
            rejected: BTreeMap::new(),
            resent: false,
        };
        let (status, body) = self
            .call(
                Method::POST,
                &wire::partial_sums(round),
                None,
                Some((wire::PARTIAL_SUM_HEADER, serde_json::to_string(&header)?)),
                partial.vector.bytes.clone(),
            )
            .await?;
        assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
        let ack: PartialSumAck = serde_json::from_slice(&body)?;
        assert_eq!(ack.accepted.len(), cohort.sessions.len());
        Ok(quantised)
    }

    /// Step 5: every store answers core's unmask request.
    async fn unmask(&mut self, round: RoundId, cohort: &mut Cohort) -> Result<()> {
        // Core unmasks as soon as it holds t shares of every secret; a response after that
        // finds the step closed (409), and only then.
        let mut accepted = 0;
        for (store, session) in &mut cohort.sessions {
            // A statistics round ends at unmasking: the rest of the cohort finds it closed.
            if accepted >= cohort.plan.threshold() && self.status().await?["round"]["id"] != round.0
            {
                break;
            }
            let CoreMessage::Unmask(request) =
                self.poll_step(round, SecAggStep::Unmask, store).await?
            else {
                bail!("unmask step answered something else");
            };
            let response = session.handle_unmask_request(&request)?;
            let status = self
                .post_secagg(round, store, &StoreMessage::UnmaskResponse(response))
                .await?;
            if status == StatusCode::ACCEPTED {
                accepted += 1;
            } else {
                assert_eq!(status, StatusCode::CONFLICT, "{store}");
                assert!(
                    accepted >= cohort.plan.threshold(),
                    "closed after {accepted}"
                );
            }
        }
        Ok(())
    }

    /// The held-out evaluators score the candidate once it is announced.
    async fn evaluate(&self, round: RoundId, loss: f64) -> Result<String> {
        for _ in 0..MAX_STEPS {
            let announcement = self.announcement().await?;
            if let Some(task) = announcement.evaluation {
                // One report is the configured minimum: the round may publish and close
                // before the other evaluators report, and a late report finds it closed.
                let store = task.evaluators.first().context("an evaluator")?;
                let report = EvaluationReport {
                    round,
                    candidate_sha256: task.candidate_sha256.clone(),
                    examples: 50,
                    loss,
                    baseline_loss: None,
                };
                let (status, body) = self
                    .call(
                        Method::POST,
                        &wire::evaluation(round),
                        Some(store),
                        None,
                        serde_json::to_vec(&report)?,
                    )
                    .await?;
                assert_eq!(
                    status,
                    StatusCode::ACCEPTED,
                    "{}",
                    String::from_utf8_lossy(&body)
                );
                return Ok(task.candidate_sha256);
            }
            tokio::time::sleep(STEP).await;
        }
        bail!("the candidate was never sent for evaluation")
    }

    async fn wait_for_version(&self, version: u64) -> Result<()> {
        for _ in 0..MAX_STEPS {
            let pointer: ModelPointer = self.get_json(&wire::model_current("oj-demand")).await?;
            if pointer.version == ModelVersion(version) {
                return Ok(());
            }
            tokio::time::sleep(STEP).await;
        }
        bail!(
            "version {version} never published: {}",
            self.status().await?
        )
    }

    /// Waits for version 1 and checks that it is the FedAvg of `quantised`, within 1e-5
    /// (see the first test for why that is ample).
    async fn publishes_fedavg_of(&self, cohort: &Cohort, quantised: &[Vec<u64>]) -> Result<()> {
        self.wait_for_version(1).await?;
        let published = self.published_shared(1).await?;
        let expected = expected_model(&cohort.plan, quantised);
        for j in 0..8 {
            assert!(
                (f64::from(published[j]) - expected[j]).abs() < 1e-5,
                "coordinate {j}: {} vs {}",
                published[j],
                expected[j]
            );
        }
        Ok(())
    }

    /// The published version's shared parameters, after verifying it as a store does.
    async fn published_shared(&self, version: u64) -> Result<Vec<f32>> {
        let signed: SignedManifest = self
            .get_json(&wire::model_version("oj-demand", ModelVersion(version)))
            .await?;
        let public = keys::read_verifying_key(&self.dir.path().join("keys/registry.pub"))?;
        let manifest = verify_manifest(
            &signed,
            &public,
            &ModelId("oj-demand".into()),
            Some(ModelVersion(version)),
        )?;
        let (status, blob) = self
            .call(
                Method::GET,
                &wire::blob(&manifest.blob_sha256),
                None,
                None,
                Vec::new(),
            )
            .await?;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(sha256_hex(&blob), manifest.blob_sha256);
        let weights = Weights::from_safetensors(&blob)?;
        assert_eq!(
            weights.tensors()["head.weight"].1,
            vec![3.0, 4.0],
            "local head kept"
        );
        Ok(weights.shared_vector(&TaskFacts::parse(TASK)?))
    }
}

/// The FedAvg of the quantised updates, by hand: the initial shared weights plus, per
/// coordinate, the mean over stores of the centred ring value divided by the scale.
fn expected_model(plan: &SecAggPlan, quantised: &[Vec<u64>]) -> Vec<f64> {
    let task = TaskFacts::parse(TASK).unwrap();
    let start = initial_weights().shared_vector(&task);
    let n = quantised.len() as f64;
    start
        .iter()
        .enumerate()
        .map(|(j, &w)| {
            let sum: f64 = quantised
                .iter()
                .map(|q| plan.centred(q[j]) as f64 / plan.scale())
                .sum();
            f64::from(w) + sum / n
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_secure_round_publishes_the_fedavg_of_the_quantised_updates() -> Result<()> {
    let mut mesh = Mesh::start(|_| {}).await?;
    let announcement = mesh.announcement().await?;
    let round = announcement.round;
    assert_eq!(announcement.model_version, ModelVersion(0));
    assert_eq!(announcement.plan.dimension, 8, "shared parameters only");
    assert_eq!(announcement.task, TASK);
    // The graph for three stores at the configured 10% expected dropout.
    let (degree, threshold) = SecAggPlan::recommended_neighbourhood(3, 0.1);
    assert_eq!(
        (announcement.plan.degree, announcement.plan.threshold),
        (degree, threshold)
    );

    let mut cohort = mesh.exchange_keys(&announcement).await?;
    let quantised = mesh.upload_and_unmask(round, &mut cohort).await?;
    mesh.evaluate(round, 0.9).await?;
    mesh.wait_for_version(1).await?;

    // Core decodes sum/scale in f32 and adds the mean in f64 to f32 weights: a few f32
    // ulps of values below 2, so 1e-5 is ample; and stochastic rounding keeps the
    // quantised mean within one level (1/scale) of the mean of the raw updates.
    let published = mesh.published_shared(1).await?;
    let expected = expected_model(&cohort.plan, &quantised);
    let start = initial_weights().shared_vector(&TaskFacts::parse(TASK)?);
    for j in 0..8 {
        let got = f64::from(published[j]);
        assert!(
            (got - expected[j]).abs() < 1e-5,
            "coordinate {j}: {got} vs {}",
            expected[j]
        );
        let raw_mean: f64 = cohort
            .sessions
            .iter()
            .map(|(s, _)| f64::from(update_of(s)[j]))
            .sum::<f64>()
            / 3.0;
        let level = 1.0 / cohort.plan.scale();
        assert!((got - f64::from(start[j]) - raw_mean).abs() <= level + 1e-6);
    }

    // The operator's view.
    let status = mesh.status().await?;
    assert_eq!(status["rounds_completed"], 1);
    assert_eq!(status["current_version"], 1);
    let record = &status["history"][0];
    assert_eq!(record["outcome"], "committed");
    assert_eq!(record["cohort_size"], 3);
    assert_eq!(record["dropouts"], 0);
    assert_eq!(record["model_version"], 1);
    assert_eq!(record["evaluation_loss"], 0.9);
    let survivors: u64 = record["survivors_by_region"]
        .as_object()
        .context("by region")?
        .values()
        .filter_map(|v| v.as_u64())
        .sum();
    assert_eq!(survivors, 3);

    // Receipts, the ledger and the metrics.
    let member = cohort.sessions[0].0.clone();
    let (_, body) = mesh
        .call(
            Method::GET,
            &wire::receipt(round),
            Some(&member),
            None,
            Vec::new(),
        )
        .await?;
    let receipt: RoundReceipt = serde_json::from_slice(&body)?;
    assert_eq!(receipt.status, ReceiptStatus::Included);
    let ledger: wire::LedgerSnapshot = mesh.get_json(wire::LEDGER).await?;
    assert!(
        ledger.remaining[&member] < ledger.budget,
        "survivors are charged"
    );
    let (_, metrics) = mesh
        .call(Method::GET, wire::METRICS, None, None, Vec::new())
        .await?;
    let metrics = String::from_utf8_lossy(&metrics);
    assert!(
        metrics.contains("fedmesh_core_registry_version 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("fedmesh_core_round_participants{region="),
        "{metrics}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejects_a_secagg_message_for_a_stale_round() -> Result<()> {
    let mut mesh = Mesh::start(|_| {}).await?;
    let announcement = mesh.announcement().await?;
    let plan = SecAggPlan::new(announcement.plan.clone())?;
    let store = plan.cohort()[0].clone();
    let (_, advert) = StoreSession::new(plan, store.clone(), &mut mesh.rng)?;
    let mut advert = advert.context("advert")?;
    let stale = RoundId(announcement.round.0 + 7);
    advert.round = stale;

    let body = serde_json::to_vec(&StoreMessage::KeyAdvert(advert))?;
    let (status, reply) = mesh
        .call(Method::POST, &wire::secagg(stale), Some(&store), None, body)
        .await?;
    assert_eq!(status, StatusCode::CONFLICT);
    let error: ApiError = serde_json::from_slice(&reply)?;
    assert_eq!(error.reason, "stale-round");
    assert_eq!(mesh.status().await?["rejections"]["stale-round"], 1);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refuses_a_store_header_from_a_peer_that_is_not_a_pop() -> Result<()> {
    let mesh = Mesh::start(|_| {}).await?;
    // A store dialling core directly and claiming to relay for another store.
    let store = mesh.client_as("store/north/1")?;
    let (status, body) = call(
        &store,
        Method::GET,
        wire::ROUND,
        Some(&StoreId("2".into())),
        None,
        Vec::new(),
    )
    .await?;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let error: ApiError = serde_json::from_slice(&body)?;
    assert_eq!(error.reason, "store-header-from-non-pop");
    // The claimed store was not counted online.
    assert_eq!(mesh.status().await?["online_stores"], 0);
    // Operator routes stay open to any peer of the trust domain.
    let (status, _) = call(&store, Method::GET, "/v1/status", None, None, Vec::new()).await?;
    assert_eq!(status, StatusCode::OK);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_round_without_quorum_ends_abandoned() -> Result<()> {
    let mut mesh = Mesh::start(|text| {
        *text = text
            .replace("keys_s = 3", "keys_s = 1")
            .replace("shares_s = 3", "shares_s = 1")
            .replace("upload_s = 4", "upload_s = 1");
    })
    .await?;
    let announcement = mesh.announcement().await?;
    let plan = SecAggPlan::new(announcement.plan.clone())?;
    // Only one of the three selected stores ever speaks.
    let store = plan.cohort()[0].clone();
    let (_, advert) = StoreSession::new(plan, store.clone(), &mut mesh.rng)?;
    let status = mesh
        .post_secagg(
            announcement.round,
            &store,
            &StoreMessage::KeyAdvert(advert.context("advert")?),
        )
        .await?;
    assert_eq!(status, StatusCode::ACCEPTED);

    for _ in 0..MAX_STEPS {
        let status = mesh.status().await?;
        if status["rounds_abandoned"] == 1 {
            let record = &status["history"][0];
            assert_eq!(record["outcome"], "abandoned");
            let reason = record["reason"].as_str().unwrap_or_default();
            assert!(reason.contains("quorum not met"), "{reason}");
            assert_eq!(status["abandoned_by_reason"]["quorum-not-met"], 1);
            assert_eq!(status["current_version"], 0, "nothing published");
            return Ok(());
        }
        tokio::time::sleep(STEP).await;
    }
    bail!("the round never ended: {}", mesh.status().await?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_round_resumes_after_core_restarts_mid_round() -> Result<()> {
    let mut mesh = Mesh::start(|text| {
        *text = text.replace("upload_s = 4", "upload_s = 10");
    })
    .await?;
    let announcement = mesh.announcement().await?;
    let round = announcement.round;
    let mut cohort = mesh.exchange_keys(&announcement).await?;

    // Core dies after the shares were exchanged and before any upload.
    mesh.restart().await?;
    let status = mesh.status().await?;
    assert_eq!(status["round"]["id"], round.0, "the same round is open");
    // Stores keep polling the announcement, which marks them online again.
    assert_eq!(mesh.announcement().await?.round, round);

    // The stores carry on where they were: the replies they poll for are still there.
    let quantised = mesh.upload_and_unmask(round, &mut cohort).await?;
    mesh.evaluate(round, 0.9).await?;
    mesh.publishes_fedavg_of(&cohort, &quantised).await?;
    let status = mesh.status().await?;
    assert_eq!(status["rounds_completed"], 1);
    assert_eq!(status["rounds_abandoned"], 0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_round_resumes_after_core_restarts_between_upload_and_unmasking() -> Result<()> {
    let mut mesh = Mesh::start(|text| {
        *text = text.replace("unmask_s = 3", "unmask_s = 10");
    })
    .await?;
    let announcement = mesh.announcement().await?;
    let round = announcement.round;
    let mut cohort = mesh.exchange_keys(&announcement).await?;
    let quantised = mesh
        .upload_with(round, &mut cohort, &|plan, store, rng| {
            Ok(plan.quantise(&update_of(store), rng)?)
        })
        .await?;

    // Core dies holding the acknowledged partial sum, before any store unmasked: the
    // journal gives it back, and the unmask requests are asked again.
    mesh.restart().await?;
    assert_eq!(mesh.announcement().await?.round, round);
    mesh.unmask(round, &mut cohort).await?;
    mesh.evaluate(round, 0.9).await?;
    mesh.publishes_fedavg_of(&cohort, &quantised).await?;
    // The ledger charged the contributors once, and keeps it through a restart.
    let ledger: wire::LedgerSnapshot = mesh.get_json(wire::LEDGER).await?;
    let charged = cohort
        .sessions
        .iter()
        .filter(|(s, _)| ledger.remaining.get(s).is_some_and(|r| *r < ledger.budget))
        .count();
    assert_eq!(charged, cohort.sessions.len());
    mesh.restart().await?;
    let again: wire::LedgerSnapshot = mesh.get_json(wire::LEDGER).await?;
    assert_eq!(
        again.remaining, ledger.remaining,
        "the ledger survives a restart"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_round_resumes_after_core_restarts_while_its_candidate_is_evaluated() -> Result<()> {
    let mut mesh = Mesh::start(|text| {
        *text = text.replace("evaluation_s = 5", "evaluation_s = 30");
    })
    .await?;
    let announcement = mesh.announcement().await?;
    let round = announcement.round;
    let mut cohort = mesh.exchange_keys(&announcement).await?;
    let quantised = mesh.upload_and_unmask(round, &mut cohort).await?;

    // 1. The candidate is out for evaluation: core has unmasked and aggregated.
    let mut candidate = None;
    for _ in 0..MAX_STEPS {
        if let Some(task) = mesh.announcement().await?.evaluation {
            candidate = Some(task.candidate_sha256);
            break;
        }
        tokio::time::sleep(STEP).await;
    }
    let candidate = candidate.context("the candidate was never sent for evaluation")?;

    // 2. Core dies before any report: it comes back with the same candidate, takes the
    //    report and publishes the FedAvg of the three updates, once.
    mesh.restart().await?;
    assert_eq!(mesh.evaluate(round, 0.9).await?, candidate);
    mesh.publishes_fedavg_of(&cohort, &quantised).await?;
    let status = mesh.status().await?;
    assert_eq!(status["rounds_completed"], 1, "{status:#}");
    assert_eq!(status["current_version"], 1, "{status:#}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_that_drops_after_sharing_is_unmasked_and_left_out() -> Result<()> {
    // Four reports are enough and five stores are selected, so one may drop (five stores
    // share among all four others with threshold 3; three stores could lose none).
    let mut mesh = Mesh::start(|text| {
        *text = text
            .replace("min_cohort = 3", "min_cohort = 4")
            .replace("over_selection = 1.0", "over_selection = 1.25");
    })
    .await?;
    let announcement = mesh.announcement().await?;
    let round = announcement.round;
    assert_eq!(announcement.plan.cohort.len(), 5);
    let mut cohort = mesh.exchange_keys(&announcement).await?;

    // The last store shared its keys, then vanished: its pairwise masks are removed with
    // the key shares its neighbours hold.
    let (dropped, _) = cohort.sessions.pop().context("a cohort")?;
    let quantised = mesh.upload_and_unmask(round, &mut cohort).await?;
    mesh.evaluate(round, 0.9).await?;
    mesh.wait_for_version(1).await?;

    let published = mesh.published_shared(1).await?;
    let expected = expected_model(&cohort.plan, &quantised);
    for j in 0..8 {
        assert!(
            (f64::from(published[j]) - expected[j]).abs() < 1e-5,
            "coordinate {j}"
        );
    }
    let record = &mesh.status().await?["history"][0];
    assert_eq!(record["dropouts"], 1);
    assert_eq!(record["cohort_size"], 5);
    let (_, body) = mesh
        .call(
            Method::GET,
            &wire::receipt(round),
            Some(&dropped),
            None,
            Vec::new(),
        )
        .await?;
    let receipt: RoundReceipt = serde_json::from_slice(&body)?;
    assert_eq!(receipt.status, ReceiptStatus::NotIncluded);

    // What an operator's dashboard reads: the dropout, the four in the sum by region, one
    // round's duration, the one partial sum's bytes, and each survivor's epsilon as the
    // ledger has it; the epsilon gauges are there again after a restart.
    let metrics = mesh.metrics().await?;
    assert_eq!(metric(&metrics, "fedmesh_core_round_dropouts"), Some(1.0));
    assert_eq!(metric(&metrics, "fedmesh_core_dropouts_total"), Some(1.0));
    let by_region: f64 = ["north", "south"]
        .iter()
        .filter_map(|r| {
            metric(
                &metrics,
                &format!("fedmesh_core_round_participants{{region=\"{r}\"}}"),
            )
        })
        .sum();
    assert_eq!(by_region, 4.0);
    assert_eq!(
        metric(&metrics, "fedmesh_core_round_duration_seconds_count"),
        Some(1.0)
    );
    let plan = &cohort.plan;
    let packed = PackedVector::pack(&vec![0; plan.vector_len()], plan.ring_bits())?;
    assert_eq!(
        metric(&metrics, "fedmesh_core_bytes_in_total"),
        Some(packed.bytes.len() as f64)
    );
    let ledger: wire::LedgerSnapshot = mesh.get_json(wire::LEDGER).await?;
    let survivor = &cohort.sessions[0].0;
    let spent = ledger.budget - ledger.remaining[survivor];
    assert!(spent > 0.0);
    let gauge = format!("fedmesh_core_store_epsilon{{store=\"{survivor}\"}}");
    let shown = metric(&metrics, &gauge).context("epsilon gauge")?;
    assert!((shown - spent).abs() < 1e-9, "{shown} vs {spent}");
    mesh.restart().await?;
    let restarted = mesh.metrics().await?;
    let shown = metric(&restarted, &gauge).context("epsilon gauge after restart")?;
    assert!((shown - spent).abs() < 1e-9, "{shown} vs {spent}");
    assert_eq!(
        metric(&restarted, "fedmesh_core_registry_version"),
        Some(1.0)
    );
    Ok(())
}

/// What a store sees when it asks core for its receipt.
async fn receipt_of(mesh: &Mesh, round: RoundId, store: &StoreId) -> Result<ReceiptStatus> {
    let (_, body) = mesh
        .call(
            Method::GET,
            &wire::receipt(round),
            Some(store),
            None,
            Vec::new(),
        )
        .await?;
    Ok(serde_json::from_slice::<RoundReceipt>(&body)?.status)
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_update_re_sent_after_its_pop_died_is_counted_once() -> Result<()> {
    // Core restarts near the end of the upload window: the unmask step must outlast that.
    let mut mesh =
        Mesh::start(|text| *text = text.replace("unmask_s = 3", "unmask_s = 15")).await?;
    let announcement = mesh.announcement().await?;
    let round = announcement.round;
    let mut cohort = mesh.exchange_keys(&announcement).await?;

    // 1. Every store masks its update; the first two reach core in a PoP's partial sum,
    //    the third's PoP died holding it.
    let mut builder = PartialSumBuilder::new(cohort.plan.clone());
    let mut quantised = Vec::new();
    let mut masked = Vec::new();
    for (store, session) in &mut cohort.sessions {
        let CoreMessage::Shares(shares) = mesh.poll_step(round, SecAggStep::Shares, store).await?
        else {
            bail!("shares step answered something else");
        };
        session.handle_shares(&shares)?;
        let q = cohort.plan.quantise(&update_of(store), &mut mesh.rng)?;
        quantised.push(q.values().to_vec());
        masked.push(session.mask(&q)?);
    }
    let contribution = |store: &StoreId| Contribution {
        store: store.clone(),
        region: Region("north".into()),
        examples: 100,
        loss: 1.0,
        bytes: 10,
    };
    for update in &masked[..2] {
        builder.fold(update)?;
    }
    let partial = builder.finish()?.context("a partial sum")?;
    let header = PartialSumHeader {
        round,
        pop: "chicago".into(),
        ring_bits: partial.vector.ring_bits,
        len: partial.vector.len,
        contributors: masked[..2].iter().map(|u| contribution(&u.store)).collect(),
        rejected: BTreeMap::new(),
        resent: false,
    };
    let sum_header = Some((wire::PARTIAL_SUM_HEADER, serde_json::to_string(&header)?));
    let (status, _) = mesh
        .call(
            Method::POST,
            &wire::partial_sums(round),
            None,
            sum_header,
            partial.vector.bytes,
        )
        .await?;
    assert_eq!(status, StatusCode::OK);

    // 2. Until the PoPs' forwarding time has passed (plus a quarter of the margin), the
    //    missing store is told to wait; then to send again.
    let third = masked[2].store.clone();
    assert_eq!(receipt_of(&mesh, round, &third).await?, ReceiptStatus::Open);
    let d = announcement.deadlines;
    let resend_at = d.pop_forward_ms() + (d.upload_ms - d.pop_forward_ms()) / 4;
    tokio::time::sleep(Duration::from_millis(
        resend_at.saturating_sub(unix_ms()) + 50,
    ))
    .await;
    assert_eq!(
        receipt_of(&mesh, round, &third).await?,
        ReceiptStatus::Resend
    );

    // 3. Its update comes again, alone and marked, through the surviving PoP; a repeat
    //    (a lost answer) is acknowledged without counting it twice.
    let header = PartialSumHeader {
        contributors: vec![contribution(&third)],
        resent: true,
        ..header
    };
    for _ in 0..2 {
        let (status, body) = mesh
            .call(
                Method::POST,
                &wire::partial_sums(round),
                None,
                Some((wire::PARTIAL_SUM_HEADER, serde_json::to_string(&header)?)),
                masked[2].vector.bytes.clone(),
            )
            .await?;
        assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
        let ack: PartialSumAck = serde_json::from_slice(&body)?;
        assert_eq!(ack.accepted, std::slice::from_ref(&third));
    }
    assert_eq!(
        receipt_of(&mesh, round, &third).await?,
        ReceiptStatus::Included
    );

    // 4. Core restarts: the journal brings the held update back, and the model is the
    //    FedAvg of all three, the third counted once.
    mesh.restart().await?;
    assert_eq!(
        receipt_of(&mesh, round, &third).await?,
        ReceiptStatus::Included
    );
    // The stores poll again (they are online, evaluators can be chosen).
    assert_eq!(mesh.announcement().await?.round, round);
    mesh.unmask(round, &mut cohort).await?;
    mesh.evaluate(round, 0.9).await?;
    mesh.publishes_fedavg_of(&cohort, &quantised).await?;
    assert_eq!(mesh.status().await?["history"][0]["dropouts"], 0);
    Ok(())
}

/// The value of one series in Prometheus text, by its name and labels as written.
fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_level_dp_charges_the_guaranteed_noise_not_the_survivors() -> Result<()> {
    // Five stores selected, four guaranteed (min_cohort): all five survive, so the sum
    // carries five stores' noise shares, but only four are promised in advance.
    let mut mesh = Mesh::start(|text| {
        *text = text
            .replace("min_cohort = 3", "min_cohort = 4")
            .replace("over_selection = 1.0", "over_selection = 1.25");
        text.push_str("[privacy]\nunit = \"store\"\nstore_noise_multiplier = 1.0\n");
    })
    .await?;
    let announcement = mesh.announcement().await?;
    let round = announcement.round;
    let mut cohort = mesh.exchange_keys(&announcement).await?;
    assert_eq!(cohort.plan.cohort().len(), 5);
    assert_eq!(cohort.plan.min_survivors(), 4);
    mesh.upload_and_unmask(round, &mut cohort).await?;
    mesh.evaluate(round, 0.9).await?;
    mesh.wait_for_version(1).await?;

    // One Poisson-subsampled Gaussian step for every eligible store: q = cohort/eligible,
    // sigma = guaranteed stddev / clip_norm (1.0 in TASK), epsilon at delta 1e-5.
    let ledger: wire::LedgerSnapshot = mesh.get_json(wire::LEDGER).await?;
    let eligible = ledger.remaining.len();
    assert!(eligible >= 5, "every eligible store is charged: {ledger:?}");
    let epsilon_for = |sigma: f64| -> Result<f64> {
        let mut accountant = RdpAccountant::new();
        accountant.compose_poisson_gaussian(5.0 / eligible as f64, sigma, 1)?;
        Ok(accountant.epsilon(1e-5)?)
    };
    let guaranteed = cohort.plan.planned_noise().context("store-level noise")?;
    assert_eq!(guaranteed.stores, 4);
    let expected = epsilon_for(guaranteed.stddev)?;
    let realised = cohort.plan.noise_with(5).context("noise")?;
    let hoped = epsilon_for(realised.stddev)?;
    assert!(hoped < expected * 0.99, "the test tells the two apart");
    for (store, remaining) in &ledger.remaining {
        let spent = ledger.budget - remaining;
        assert!(
            (spent - expected).abs() <= 1e-9 * expected,
            "{store}: spent {spent}, guaranteed noise gives {expected}, survivors' {hoped}"
        );
    }
    Ok(())
}

#[cfg(feature = "etcd")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_core_on_etcd_publishes_there_and_serves_through_a_dead_member() -> Result<()> {
    use fedmesh_core_agg::registry::Backend;
    use fedmesh_core_agg::registry::etcd::EtcdBackend;

    const PREFIX: &str = "/fedmesh/service-test";
    let mut cluster = tokio::task::spawn_blocking(support::Cluster::start).await??;
    let endpoints = cluster.endpoints.clone();
    let list: Vec<String> = endpoints.iter().map(|e| format!("\"{e}\"")).collect();
    let mut mesh = Mesh::start(|text| {
        let registry = format!(
            "[registry]\nbackend = \"etcd\"\netcd_endpoints = [{}]\netcd_prefix = \"{PREFIX}\"\n",
            list.join(", ")
        );
        *text = text.replace("[registry]\n", &registry);
    })
    .await?;
    let announcement = mesh.announcement().await?;
    let round = announcement.round;
    let mut cohort = mesh.exchange_keys(&announcement).await?;
    mesh.upload_and_unmask(round, &mut cohort).await?;
    mesh.evaluate(round, 0.9).await?;
    mesh.wait_for_version(1).await?;

    // The pointer and both signed manifests live in the cluster.
    let model = ModelId("oj-demand".into());
    let blobs = tempfile::tempdir()?;
    let etcd = EtcdBackend::connect(&endpoints, PREFIX, blobs.path())?;
    assert_eq!(etcd.current(&model)?, Some(ModelVersion(1)));
    assert_eq!(
        etcd.versions(&model)?,
        vec![ModelVersion(0), ModelVersion(1)]
    );
    let public = keys::read_verifying_key(&mesh.dir.path().join("keys/registry.pub"))?;
    let signed = etcd
        .manifest(&model, ModelVersion(1))?
        .context("manifest 1 in etcd")?;
    verify_manifest(&signed, &public, &model, Some(ModelVersion(1)))?;

    // The leader dies: core still answers from the two members left, and a restarted core
    // finds version 1 there instead of publishing the initial model again.
    let leader = {
        let probe = tokio::task::spawn_blocking(move || {
            let index = cluster.leader();
            (cluster, index)
        });
        let (back, index) = probe.await?;
        cluster = back;
        index?
    };
    cluster.kill(leader);
    mesh.wait_for_version(1).await?;
    mesh.published_shared(1).await?;
    mesh.restart().await?;
    let status = mesh.status().await?;
    assert_eq!(status["current_version"], 1, "{status}");
    assert_eq!(etcd.versions(&model)?.len(), 2, "nothing republished");
    Ok(())
}

/// A test store's rows (3 features; target): 20 + s rows around store-dependent levels.
fn rows_of(store: &StoreId) -> (Vec<f32>, Vec<f32>) {
    let s: f32 = store.0.parse().unwrap_or(0.0);
    let (mut x, mut y) = (Vec::new(), Vec::new());
    for i in 0..(20 + s as usize) {
        let i = i as f32;
        x.extend([10.5 + 0.01 * s + 0.003 * i, (i % 3.0) - 1.0, s * 0.25]);
        y.push(9.0 + 0.1 * i - 0.2 * s);
    }
    (x, y)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_statistics_round_gives_the_training_rounds_the_cohorts_normalisation() -> Result<()> {
    let mut mesh = Mesh::start(|text| {
        text.push_str("[statistics]\nenabled = true\nmax_rows = 1000\nbound = 50.0\n");
    })
    .await?;
    let announcement = mesh.announcement().await?;
    let task = announcement
        .statistics
        .clone()
        .context("a statistics round first")?;
    assert_eq!(task.features, 3, "model.inputs");
    assert_eq!(announcement.plan.dimension as usize, task.levels_len());
    assert_eq!(announcement.task, TASK);
    let round = announcement.round;
    let mut cohort = mesh.exchange_keys(&announcement).await?;
    let encode = task.clone();
    mesh.upload_and_unmask_with(round, &mut cohort, &move |plan, store, rng| {
        let (x, y) = rows_of(store);
        let levels = encode.encode(3, &x, &y, plan.max_level())?;
        Ok(plan.levels(&levels, rng)?)
    })
    .await?;

    // The pooled figures by hand, in f64 over the cohort's rows.
    let (mut n, mut sum, mut sq) = (0.0f64, [0.0f64; 4], [0.0f64; 4]);
    for (store, _) in &cohort.sessions {
        let (x, y) = rows_of(store);
        for (row, &t) in x.chunks(3).zip(&y) {
            for (j, v) in row.iter().chain([&t]).enumerate() {
                sum[j] += f64::from(*v);
                sq[j] += f64::from(*v) * f64::from(*v);
            }
            n += 1.0;
        }
    }

    // The next round trains, and its task carries the normalisation.
    let next = loop {
        let a = mesh.announcement().await?;
        if a.round != round {
            break a;
        }
        tokio::time::sleep(STEP).await;
    };
    assert!(next.statistics.is_none());
    assert_eq!(
        next.plan.dimension, 8,
        "training again: the shared parameters"
    );
    assert!(next.task.starts_with(TASK.trim_end()));
    assert_eq!(next.task_sha256, sha256_hex(next.task.as_bytes()));
    let parsed: toml::Table = toml::from_str(&next.task)?;
    let norm = parsed["normalisation"]
        .as_table()
        .context("[normalisation]")?;
    let floats = |key: &str| -> Vec<f64> {
        norm[key]
            .as_array()
            .map(|a| a.iter().filter_map(toml::Value::as_float).collect())
            .unwrap_or_default()
    };
    let (mean, std) = (floats("mean"), floats("std"));
    assert_eq!(mean.len(), 3);
    for j in 0..3 {
        let m = sum[j] / n;
        let sd = (sq[j] / n - m * m).sqrt();
        assert!((mean[j] - m).abs() <= 1e-9 * m.abs().max(1.0), "mean {j}");
        // Feature 2 is constant within a store but not across the cohort.
        assert!(
            (std[j] - sd).abs() <= 1e-6 * sd,
            "std {j}: {} vs {sd}",
            std[j]
        );
    }
    let target_mean = norm["target_mean"].as_float().context("target_mean")?;
    assert!((target_mean - sum[3] / n).abs() <= 1e-9 * (sum[3] / n));

    let status = mesh.status().await?;
    assert_eq!(status["history"][0]["outcome"], "measured");
    assert_eq!(
        status["rounds_completed"], 0,
        "statistics do not count as training"
    );
    assert_eq!(status["current_version"], 0, "nothing published");
    assert_eq!(status["statistics"]["result"]["count"], n);
    Ok(())
}
