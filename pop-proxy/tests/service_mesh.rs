//! One secure round through the real PoP and the real core, over the transport on
//! 127.0.0.1: five stores (each with its own SVID) poll, exchange keys, mask and upload
//! through `pop-proxy`, which folds their updates and forwards one partial sum; core
//! unmasks and answers every store's receipt with `included`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use fedmesh_core_agg::registry::keys;
use fedmesh_core_agg::service::model::Weights;
use fedmesh_pop_proxy::service::{self, Config, Running};
use fedmesh_protocol::ids::{RoundId, StoreId};
use fedmesh_protocol::secagg::{SecAggPlan, StoreSession};
use fedmesh_protocol::wire::{
    self, CoreMessage, ReceiptStatus, RoundAnnouncement, RoundReceipt, SecAggStep, StoreMessage,
};
use fedmesh_transport::pki::{DevPkiSpec, write_dev_pki};
use fedmesh_transport::{Client, ClientConfig, FileSvidSource, PeerPolicy, SendBody, SvidPaths};
use http::{HeaderMap, HeaderValue, Method, StatusCode};
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;

const STORES: [(&str, &str); 5] = [
    ("north", "1"),
    ("north", "2"),
    ("north", "3"),
    ("south", "4"),
    ("south", "5"),
];
/// Every poll loop waits at most this many steps of [`STEP`].
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

fn free_port() -> Result<SocketAddr> {
    Ok(std::net::UdpSocket::bind("127.0.0.1:0")?.local_addr()?)
}

async fn start_core(root: &Path) -> Result<fedmesh_core_agg::service::Running> {
    keys::generate(&root.join("keys"))?;
    std::fs::write(root.join("task.toml"), TASK)?;
    // 8 shared values (`body.*`) and a local head.
    let weights = Weights::from_tensors(BTreeMap::from([
        ("body.bias".into(), (vec![2], vec![0.1, -0.2])),
        ("body.weight".into(), (vec![2, 3], vec![0.5; 6])),
        ("head.weight".into(), (vec![1, 2], vec![3.0, 4.0])),
    ]));
    std::fs::write(root.join("initial.safetensors"), weights.to_safetensors()?)?;
    let text = format!(
        r#"
listen = "{listen}"
identity_dir = "pki/core"
state_dir = "core-state"
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
upload_s = 6
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
        listen = free_port()?
    );
    std::fs::write(root.join("core.toml"), &text)?;
    let config = fedmesh_core_agg::service::config::Config::load(&root.join("core.toml"))?;
    Ok(fedmesh_core_agg::service::start(config).await?)
}

async fn start_pop(root: &Path, core: SocketAddr) -> Result<Running> {
    let policy = Path::new(env!("CARGO_MANIFEST_DIR")).join("../policy/rego");
    let text = format!(
        r#"
metro = "chicago"
listen = "127.0.0.1:0"
core = "{core}"
identity_dir = "{root}/pki/pop/chicago"
state_dir = "{root}/pop-state"
registry_public_key = "{root}/keys/registry.pub"
plan_poll_ms = 50
ledger_refresh_ms = 200
[policy]
path = "{policy}"
decision_log = "{root}/decisions.jsonl"
[policy.data]
stores_trust_domain = "fedmesh.test"
min_runtime_version = "0.1.0"
"#,
        root = root.display(),
        policy = policy.display(),
    );
    Ok(service::start(Config::parse(&text, Path::new("pop.toml"))?).await?)
}

/// A store as the PoP sees it: its own SVID, the PoP at the anycast address.
struct Store {
    id: StoreId,
    client: Client,
}

impl Store {
    fn new(root: &Path, pop: SocketAddr, region: &str, id: &str) -> Result<Self> {
        let dir = root.join("pki/store").join(region).join(id);
        let source = FileSvidSource::load(SvidPaths::in_dir(&dir))?;
        let config = ClientConfig::new(pop, PeerPolicy::PathPrefix("/pop/".into()));
        Ok(Self {
            id: StoreId(id.into()),
            client: Client::new(config, source)?,
        })
    }

    async fn call(
        &self,
        method: Method,
        path: &str,
        mut headers: HeaderMap,
        body: Vec<u8>,
    ) -> Result<(StatusCode, Bytes)> {
        headers.insert(wire::RUNTIME_HEADER, HeaderValue::from_static("0.1.0"));
        let response = self
            .client
            .request(method, path, headers, SendBody::from_bytes(body))
            .await?;
        let status = response.status();
        Ok((status, response.bytes(16 << 20).await?))
    }

    async fn post(&self, round: RoundId, message: &StoreMessage) -> Result<()> {
        let body = serde_json::to_vec(message)?;
        let (status, answer) = self
            .call(Method::POST, &wire::secagg(round), HeaderMap::new(), body)
            .await?;
        if status != StatusCode::ACCEPTED {
            bail!(
                "store {}: {status} {}",
                self.id,
                String::from_utf8_lossy(&answer)
            );
        }
        Ok(())
    }

    async fn poll(&self, round: RoundId, step: SecAggStep) -> Result<CoreMessage> {
        for _ in 0..MAX_STEPS {
            let path = wire::secagg_step(round, step);
            let (status, body) = self
                .call(Method::GET, &path, HeaderMap::new(), vec![])
                .await?;
            match status {
                StatusCode::OK => return Ok(serde_json::from_slice(&body)?),
                StatusCode::NO_CONTENT => tokio::time::sleep(STEP).await,
                other => bail!("{step:?}: {other} {}", String::from_utf8_lossy(&body)),
            }
        }
        bail!("no {step:?} reply for store {}", self.id)
    }
}

async fn announcement(stores: &[Store]) -> Result<RoundAnnouncement> {
    for _ in 0..MAX_STEPS {
        let mut found = None;
        for store in stores {
            let (status, body) = store
                .call(Method::GET, wire::ROUND, HeaderMap::new(), vec![])
                .await?;
            if status == StatusCode::OK {
                found = Some(serde_json::from_slice(&body)?);
            }
        }
        if let Some(found) = found {
            return Ok(found);
        }
        tokio::time::sleep(STEP).await;
    }
    bail!("no round announced through the pop")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_secure_round_completes_through_the_pop() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let root = dir.path();
    write_dev_pki(
        &root.join("pki"),
        &DevPkiSpec {
            trust_domain: "fedmesh.test".into(),
            ca_lifetime: Duration::from_secs(3600),
            svid_lifetime: Duration::from_secs(3600),
            pops: vec!["chicago".into()],
            stores: STORES
                .iter()
                .map(|(r, s)| ((*r).into(), (*s).into()))
                .collect(),
        },
    )?;
    let core = start_core(root).await?;
    let pop = start_pop(root, core.quic_addr()).await?;
    let stores: Vec<Store> = STORES
        .iter()
        .map(|(region, id)| Store::new(root, pop.addr(), region, id))
        .collect::<Result<_>>()?;
    let mut rng = ChaCha20Rng::seed_from_u64(5);

    // 1. Stores poll through the PoP (core counts them online from the relayed identity)
    //    until a round is planned.
    let announcement = announcement(&stores).await?;
    let round = announcement.round;
    let plan = SecAggPlan::new(announcement.plan.clone())?;
    let cohort: Vec<&Store> = stores
        .iter()
        .filter(|s| plan.cohort().contains(&s.id))
        .collect();
    assert!(cohort.len() >= 3, "cohort of {}", cohort.len());

    // 2. Keys and shares, relayed.
    let mut sessions = Vec::new();
    for store in &cohort {
        let (session, advert) = StoreSession::new(plan.clone(), store.id.clone(), &mut rng)?;
        let advert = advert.context("secure mode sends an advert")?;
        store.post(round, &StoreMessage::KeyAdvert(advert)).await?;
        sessions.push(session);
    }
    for (store, session) in cohort.iter().zip(&mut sessions) {
        let CoreMessage::NeighbourKeys(keys) = store.poll(round, SecAggStep::Keys).await? else {
            bail!("keys step answered something else");
        };
        let shares = session.handle_neighbour_keys(&keys, &mut rng)?;
        store
            .post(round, &StoreMessage::EncryptedShares(shares))
            .await?;
    }

    // 3. Masked uploads to the PoP; each answered with a receipt once durable.
    for (i, (store, session)) in cohort.iter().zip(&mut sessions).enumerate() {
        let CoreMessage::Shares(shares) = store.poll(round, SecAggStep::Shares).await? else {
            bail!("shares step answered something else");
        };
        session.handle_shares(&shares)?;
        let update: Vec<f32> = (0..plan.config().dimension)
            .map(|j| ((i as f32 * 0.07 + j as f32 * 0.031) % 0.9) - 0.45)
            .collect();
        let masked = session.mask(&plan.quantise(&update, &mut rng)?)?;
        let header = wire::UpdateHeader {
            round,
            model_version: announcement.model_version,
            ring_bits: masked.vector.ring_bits,
            len: masked.vector.len,
            examples: 100,
            loss: 1.0,
            upload_id: format!("u-{}", store.id),
            resent: false,
        };
        let mut headers = HeaderMap::new();
        headers.insert(
            wire::UPDATE_HEADER,
            HeaderValue::from_str(&serde_json::to_string(&header)?)?,
        );
        let (status, body) = store
            .call(
                Method::PUT,
                &wire::update(round),
                headers,
                masked.vector.bytes,
            )
            .await?;
        assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
    }

    // 4. Every store advertised through this PoP, so its sum reaches core before the
    //    deadline; core then asks each survivor to unmask.
    for (store, session) in cohort.iter().zip(&mut sessions) {
        let CoreMessage::Unmask(request) = store.poll(round, SecAggStep::Unmask).await? else {
            bail!("unmask step answered something else");
        };
        let response = session.handle_unmask_request(&request)?;
        store
            .post(round, &StoreMessage::UnmaskResponse(response))
            .await?;
    }
    for store in &cohort {
        let (status, body) = store
            .call(Method::GET, &wire::receipt(round), HeaderMap::new(), vec![])
            .await?;
        assert_eq!(status, StatusCode::OK);
        let receipt: RoundReceipt = serde_json::from_slice(&body)?;
        assert_eq!(receipt.store, store.id);
        assert_eq!(receipt.status, ReceiptStatus::Included);
    }
    assert_eq!(pop.pop().pending_partial_sums(), 0);
    let metrics = pop.pop().encode_metrics();
    assert!(
        metrics.contains("fedmesh_pop_partial_sums_forwarded_total 1"),
        "{metrics}"
    );
    pop.kill().await;
    core.stop().await;
    Ok(())
}
