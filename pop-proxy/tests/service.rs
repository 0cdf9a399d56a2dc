//! The PoP as a service, over the real transport on 127.0.0.1: stores with dev-PKI SVIDs,
//! and a small core that serves the plan and the ledger and records what the PoP sends.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use fedmesh_pop_proxy::Ring;
use fedmesh_pop_proxy::service::{self, Config, Running};
use fedmesh_protocol::ids::{ModelVersion, RoundId, StoreId};
use fedmesh_protocol::secagg::{KeyAdvert, Masking, PlanConfig, SecAggPlan};
use fedmesh_protocol::wire::{self, ApiError, PartialSumAck, PartialSumHeader, RoundAnnouncement};
use fedmesh_transport::pki::{DevPkiLayout, DevPkiSpec, write_dev_pki};
use fedmesh_transport::{
    Client, ClientConfig, FileSvidSource, PeerPolicy, Request, Response, Router, SendBody, Server,
    ServerConfig,
};
use http::{HeaderMap, HeaderValue, Method, StatusCode};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const DIMENSION: u32 = 1000;

/// What the fake core was sent.
#[derive(Default)]
struct CoreLog {
    partial_sums: Vec<(PartialSumHeader, Bytes)>,
    store_headers: Vec<(String, String)>,
    blob_fetches: usize,
}

struct FakeCore {
    server: Server,
    announcement: Arc<Mutex<Option<RoundAnnouncement>>>,
    log: Arc<Mutex<CoreLog>>,
    accept_sums: Arc<Mutex<bool>>,
}

struct Mesh {
    _dir: tempfile::TempDir,
    pki: DevPkiLayout,
    root: PathBuf,
    core: FakeCore,
    plan: SecAggPlan,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn announcement(round: u64, cohort: &[&str], upload_in: Duration) -> Result<RoundAnnouncement> {
    let plan = PlanConfig {
        round: RoundId(round),
        seed: [3; 32],
        cohort: cohort.iter().map(|s| StoreId((*s).into())).collect(),
        masking: Masking::Secure,
        degree: 2,
        threshold: 2,
        min_survivors: 2,
        dimension: DIMENSION,
        kept: None,
        quant_bits: 8,
        clip: 1.0,
        guard_bits: 2,
        noise_stddev: 0.0,
    };
    let upload_ms = now_ms() + upload_in.as_millis() as u64;
    Ok(RoundAnnouncement {
        round: RoundId(round),
        model: "oj".into(),
        model_version: ModelVersion(1),
        model_sha256: "00".repeat(32),
        task: String::new(),
        task_sha256: "00".repeat(32),
        min_runtime: "1.4.2".into(),
        mode: wire::AggregationMode::Secure,
        plan,
        deadlines: wire::PhaseDeadlines {
            keys_ms: upload_ms,
            shares_ms: upload_ms,
            upload_ms,
            unmask_ms: upload_ms + 10_000,
        },
        evaluation: None,
        statistics: None,
    })
}

const BLOB: &[u8] = b"model weights, safetensors in real life";

/// Version 0 of `model` as the registry whose keys are in `keys` signs it.
fn signed_manifest(keys: &Path, model: &str) -> Result<Vec<u8>> {
    use fedmesh_core_agg::registry::embedded::EmbeddedBackend;
    use fedmesh_core_agg::registry::{
        Backend, Candidate, DpSpend, Registry, keys::read_signing_key,
    };
    let store = tempfile::tempdir()?;
    let registry = Registry::new(
        EmbeddedBackend::open(store.path())?,
        read_signing_key(&keys.join("registry.key"))?,
    );
    let model = fedmesh_core_agg::ModelId(model.into());
    let candidate = Candidate {
        model: model.clone(),
        parent: None,
        blob: BLOB.to_vec(),
        model_spec: "mlp".into(),
        training_config_sha256: service::cache::sha256_hex(b"task"),
        dp: DpSpend {
            unit: "record".into(),
            noise_multiplier: 1.0,
            clip_norm: 1.0,
            delta: 1e-5,
            epsilon: 0.0,
        },
        metrics: BTreeMap::new(),
    };
    registry.publish(&candidate, 0.05, fedmesh_core_agg::Timestamp(0))?;
    let signed = registry
        .backend()
        .manifest(&model, ModelVersion(0))?
        .context("published")?;
    Ok(serde_json::to_vec(&signed)?)
}

async fn fake_core(pki: &DevPkiLayout, ann: RoundAnnouncement) -> Result<FakeCore> {
    let pki_root = pki
        .bundle
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default();
    let announcement = Arc::new(Mutex::new(Some(ann)));
    let log = Arc::new(Mutex::new(CoreLog::default()));
    let accept_sums = Arc::new(Mutex::new(true));
    let (a, l, ok) = (announcement.clone(), log.clone(), accept_sums.clone());
    let record = |log: &Arc<Mutex<CoreLog>>, request: &Request| {
        let header = request
            .headers()
            .get(wire::STORE_HEADER)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("(none)")
            .to_owned();
        log.lock()
            .unwrap()
            .store_headers
            .push((request.uri().path().to_owned(), header));
    };
    let l2 = log.clone();
    let l3 = log.clone();
    let l4 = log.clone();
    let router = Router::new()
        .route(Method::GET, wire::ROUND, move |_| {
            let a = a.clone();
            async move {
                match a.lock().unwrap().clone() {
                    Some(ann) => Response::json(StatusCode::OK, &ann),
                    None => Response::new(StatusCode::NO_CONTENT, SendBody::empty()),
                }
            }
        })
        .route(Method::GET, wire::LEDGER, |_| async {
            // Store 9 has spent its budget: 0.1 is not above the policy's 0.5.
            let remaining = BTreeMap::from([(StoreId("9".into()), 0.1)]);
            Response::json(
                StatusCode::OK,
                &wire::LedgerSnapshot {
                    model: "oj".into(),
                    budget: 8.0,
                    remaining,
                },
            )
        })
        .route(Method::POST, "/v1/rounds/{round}/secagg", move |r| {
            record(&l2, &r);
            async { Response::new(StatusCode::ACCEPTED, SendBody::empty()) }
        })
        .route(Method::GET, "/v1/rounds/{round}/receipt", move |r| {
            record(&l3, &r);
            async { Response::new(StatusCode::NO_CONTENT, SendBody::empty()) }
        })
        .route(
            Method::GET,
            "/v1/models/{model}/versions/{version}",
            move |r| {
                // "oj" v0 is signed by the registry's key, "rogue" v0 by another key.
                let body = match r.param("model") {
                    Some("oj") => signed_manifest(&pki_root.join("../keys"), "oj"),
                    _ => signed_manifest(&pki_root.join("../other-keys"), "rogue"),
                };
                async move {
                    match body {
                        Ok(body) => Response::new(StatusCode::OK, SendBody::from_bytes(body)),
                        Err(e) => Response::text(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
                    }
                }
            },
        )
        .route(Method::GET, "/v1/blobs/{sha}", move |r| {
            l4.lock().unwrap().blob_fetches += 1;
            let tampered = r.param("sha") != Some(service::cache::sha256_hex(BLOB).as_str());
            async move {
                let body = if tampered {
                    &b"something else"[..]
                } else {
                    BLOB
                };
                Response::new(StatusCode::OK, SendBody::from_bytes(body))
            }
        })
        .route(
            Method::POST,
            "/v1/rounds/{round}/partial-sums",
            move |mut r| {
                let (l, ok) = (l.clone(), ok.clone());
                async move {
                    if !*ok.lock().unwrap() {
                        return Response::text(StatusCode::SERVICE_UNAVAILABLE, "not now");
                    }
                    let header: PartialSumHeader = match r
                        .headers()
                        .get(wire::PARTIAL_SUM_HEADER)
                        .and_then(|v| serde_json::from_slice(v.as_bytes()).ok())
                    {
                        Some(header) => header,
                        None => return Response::text(StatusCode::BAD_REQUEST, "no header"),
                    };
                    let body = r.body_mut().to_bytes(64 << 20).await.unwrap_or_default();
                    let ack = PartialSumAck {
                        round: header.round,
                        accepted: header
                            .contributors
                            .iter()
                            .map(|c| c.store.clone())
                            .collect(),
                    };
                    l.lock().unwrap().partial_sums.push((header, body));
                    Response::json(StatusCode::OK, &ack)
                }
            },
        );
    let source = FileSvidSource::load(pki.core.clone())?;
    let server = Server::bind(ServerConfig::new("127.0.0.1:0".parse()?), source, router).await?;
    Ok(FakeCore {
        server,
        announcement,
        log,
        accept_sums,
    })
}

impl Mesh {
    async fn new(cohort: &[&str], upload_in: Duration) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let stores = [
            ("north", "1"),
            ("north", "2"),
            ("north", "3"),
            ("south", "9"),
        ];
        fedmesh_core_agg::registry::keys::generate(&dir.path().join("keys"))?;
        fedmesh_core_agg::registry::keys::generate(&dir.path().join("other-keys"))?;
        let pki = write_dev_pki(
            &dir.path().join("pki"),
            &DevPkiSpec {
                trust_domain: "fedmesh.test".into(),
                ca_lifetime: Duration::from_secs(3600),
                svid_lifetime: Duration::from_secs(3600),
                pops: vec!["chicago".into()],
                stores: stores
                    .iter()
                    .map(|(r, s)| ((*r).into(), (*s).into()))
                    .collect(),
            },
        )?;
        let ann = announcement(7, cohort, upload_in)?;
        let plan = SecAggPlan::new(ann.plan.clone())?;
        let core = fake_core(&pki, ann).await?;
        Ok(Self {
            root: dir.path().to_path_buf(),
            _dir: dir,
            pki,
            core,
            plan,
        })
    }

    fn ring(&self) -> Ring {
        Ring::new(self.plan.ring_bits()).unwrap()
    }

    fn config(&self) -> Result<Config> {
        let policy = Path::new(env!("CARGO_MANIFEST_DIR")).join("../policy/rego");
        let text = format!(
            r#"
metro = "chicago"
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
core = "{core}"
identity_dir = "{root}/pki/pop/chicago"
state_dir = "{root}/state"
registry_public_key = "{root}/keys/registry.pub"
plan_poll_ms = 50
ledger_refresh_ms = 100
[policy]
path = "{policy}"
decision_log = "{root}/decisions.jsonl"
[policy.data]
stores_trust_domain = "fedmesh.test"
min_runtime_version = "1.4.2"
"#,
            core = self.core.server.quic_addr(),
            root = self.root.display(),
            policy = policy.display(),
        );
        Ok(Config::parse(&text, Path::new("pop.toml"))?)
    }

    /// Starts a PoP and waits (bounded) until it knows the round and the ledger.
    async fn pop(&self) -> Result<Running> {
        let running = service::start(self.config()?).await?;
        let until = Instant::now() + Duration::from_secs(10);
        while running.pop().newest_round().is_none() {
            if Instant::now() > until {
                bail!("the pop never opened the round");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Two ledger refreshes.
        tokio::time::sleep(Duration::from_millis(250)).await;
        Ok(running)
    }

    fn store(&self, running: &Running, id: &str) -> Result<Client> {
        let (_, paths) = self
            .pki
            .stores
            .iter()
            .find(|((_, s), _)| s == id)
            .context("no such store")?;
        let source = FileSvidSource::load(paths.clone())?;
        let addr: SocketAddr = running.addr();
        Ok(Client::new(
            ClientConfig::new(addr, PeerPolicy::PathPrefix("/pop/".into())),
            source,
        )?)
    }

    /// Waits (bounded) until core has received `n` partial sums.
    /// Clients of `ids`, each of which has advertised its keys through this PoP.
    async fn advertised_stores(&self, running: &Running, ids: &[&str]) -> Result<Vec<Client>> {
        let mut clients = Vec::new();
        for id in ids {
            let client = self.store(running, id)?;
            assert_eq!(advertise(&client, id, None).await?, StatusCode::ACCEPTED);
            clients.push(client);
        }
        Ok(clients)
    }

    async fn partial_sums(&self, n: usize) -> Result<Vec<(PartialSumHeader, Bytes)>> {
        let until = Instant::now() + Duration::from_secs(10);
        loop {
            let sums = self.core.log.lock().unwrap().partial_sums.clone();
            if sums.len() >= n {
                return Ok(sums);
            }
            if Instant::now() > until {
                bail!("core got {} partial sums, expected {n}", sums.len());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

fn masked_vector(seed: u64, ring: Ring) -> Vec<u64> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..DIMENSION)
        .map(|_| rng.r#gen::<u64>() & ring.mask())
        .collect()
}

fn update_header(round: u64, ring_bits: u32, len: u32, upload_id: &str) -> wire::UpdateHeader {
    wire::UpdateHeader {
        round: RoundId(round),
        model_version: ModelVersion(1),
        ring_bits,
        len,
        examples: 120,
        loss: 0.25,
        upload_id: upload_id.into(),
        resent: false,
    }
}

async fn put_update(
    client: &Client,
    header: &wire::UpdateHeader,
    body: Vec<u8>,
    runtime: &str,
) -> Result<(StatusCode, Bytes)> {
    let mut headers = HeaderMap::new();
    headers.insert(
        wire::UPDATE_HEADER,
        HeaderValue::from_str(&serde_json::to_string(header)?)?,
    );
    headers.insert(wire::RUNTIME_HEADER, HeaderValue::from_str(runtime)?);
    let response = client
        .request(
            Method::PUT,
            &wire::update(header.round),
            headers,
            SendBody::from_bytes(body),
        )
        .await?;
    let status = response.status();
    Ok((status, response.bytes(1 << 20).await?))
}

async fn upload(mesh: &Mesh, client: &Client, store: &str, seed: u64) -> Result<Vec<u64>> {
    let ring = mesh.ring();
    let values = masked_vector(seed, ring);
    let header = update_header(7, ring.bits(), DIMENSION, &format!("up-{store}"));
    let (status, body) = put_update(client, &header, ring.pack(&values), "1.5.0").await?;
    if status != StatusCode::OK {
        bail!("store {store}: {status} {}", String::from_utf8_lossy(&body));
    }
    let receipt: wire::UploadReceipt = serde_json::from_slice(&body)?;
    assert_eq!(receipt.store, StoreId(store.into()));
    assert_eq!(receipt.pop, "chicago");
    Ok(values)
}

/// Headers a store sends on every request: its runtime version.
fn store_headers() -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert(wire::RUNTIME_HEADER, HeaderValue::from_static("1.4.2"));
    headers
}

/// `GET path` as a store sends it.
async fn store_get(client: &Client, path: &str) -> Result<fedmesh_transport::ClientResponse> {
    Ok(client
        .request(Method::GET, path, store_headers(), SendBody::empty())
        .await?)
}

async fn advertise(client: &Client, store: &str, forged: Option<&str>) -> Result<StatusCode> {
    let message = wire::StoreMessage::KeyAdvert(KeyAdvert {
        round: RoundId(7),
        store: StoreId(store.into()),
        cipher_key: [1; 32],
        mask_key: [2; 32],
    });
    let mut headers = store_headers();
    if let Some(forged) = forged {
        headers.insert(wire::STORE_HEADER, HeaderValue::from_str(forged)?);
    }
    let response = client
        .request(
            Method::POST,
            &wire::secagg(RoundId(7)),
            headers,
            SendBody::from_bytes(serde_json::to_vec(&message)?),
        )
        .await?;
    Ok(response.status())
}

/// The sum modulo 2^r, computed element by element in u128 so that it shares no code with
/// the PoP's wrapping u64 fold.
fn reference_sum(vectors: &[&[u64]], ring: Ring) -> Vec<u64> {
    let modulus = 1u128 << ring.bits();
    (0..DIMENSION as usize)
        .map(|i| (vectors.iter().map(|v| u128::from(v[i])).sum::<u128>() % modulus) as u64)
        .collect()
}

fn unpack(body: &[u8], ring: Ring) -> Vec<u64> {
    let mut out = vec![0u64; DIMENSION as usize];
    let mut unpacker = fedmesh_pop_proxy::Unpacker::new(ring, DIMENSION as usize).unwrap();
    unpacker.push(body, &mut out).unwrap();
    unpacker.finish().unwrap();
    out
}

fn api_reason(body: &[u8]) -> String {
    serde_json::from_slice::<ApiError>(body)
        .map(|e| e.reason)
        .unwrap_or_else(|_| String::from_utf8_lossy(body).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partial_sum_equals_modular_sum_of_accepted_updates() -> Result<()> {
    let mesh = Mesh::new(&["1", "2", "3"], Duration::from_secs(30)).await?;
    let running = mesh.pop().await?;
    let ring = mesh.ring();
    // Every store advertises through this PoP, so the sum goes to core as soon as all three
    // are in, long before the 30 s deadline.
    let stores = mesh.advertised_stores(&running, &["1", "2", "3"]).await?;
    let mut vectors = Vec::new();
    for (i, (client, id)) in stores.iter().zip(["1", "2", "3"]).enumerate() {
        vectors.push(upload(&mesh, client, id, 100 + i as u64).await?);
    }

    let sums = mesh.partial_sums(1).await?;
    let (header, body) = &sums[0];
    assert_eq!(header.round, RoundId(7));
    assert_eq!(header.pop, "chicago");
    assert_eq!(header.ring_bits, ring.bits());
    let stores: Vec<&str> = header
        .contributors
        .iter()
        .map(|c| c.store.0.as_str())
        .collect();
    assert_eq!(stores, ["1", "2", "3"]);
    let first = &header.contributors[0];
    assert_eq!((first.region.0.as_str(), first.examples), ("north", 120));
    assert_eq!(
        first.bytes,
        ring.packed_len(DIMENSION as usize).unwrap() as u64
    );
    let refs: Vec<&[u64]> = vectors.iter().map(Vec::as_slice).collect();
    assert_eq!(unpack(body, ring), reference_sum(&refs, ring));

    // The operator's view of it: three stores connected, six decisions allowed (three
    // adverts, three uploads), three updates and their bytes folded at a measured rate,
    // one partial sum forwarded, at least its bytes sent. (A scrape samples connections.)
    let metrics = running.pop().encode_metrics();
    let value = |series: &str| -> f64 {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or_else(|| panic!("no {series} in {metrics}"))
    };
    let packed = ring.packed_len(DIMENSION as usize).unwrap() as f64;
    assert!(value("fedmesh_pop_connections") >= 3.0);
    assert_eq!(
        value("fedmesh_pop_policy_decisions_total{result=\"allow\",rule=\"allow\"}"),
        6.0
    );
    assert_eq!(value("fedmesh_pop_updates_folded_total"), 3.0);
    assert_eq!(value("fedmesh_pop_fold_bytes_total"), 3.0 * packed);
    assert!(value("fedmesh_pop_bytes_in_total") >= 3.0 * packed);
    assert_eq!(value("fedmesh_pop_partial_sums_forwarded_total"), 1.0);
    assert!(value("fedmesh_pop_bytes_out_total") >= body.len() as f64);
    assert!(value("fedmesh_pop_fold_throughput_bytes_per_second") > 0.0);
    running.kill().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn denied_store_never_reaches_a_sum() -> Result<()> {
    let mesh = Mesh::new(&["1", "2", "9"], Duration::from_millis(2500)).await?;
    let running = mesh.pop().await?;
    let ring = mesh.ring();

    // Store 9's ledger shows 0.1 epsilon left; store 2 runs a runtime older than 1.4.2.
    let header = update_header(7, ring.bits(), DIMENSION, "x");
    let body = ring.pack(&masked_vector(9, ring));
    let nine = mesh.store(&running, "9")?;
    let (status, answer) = put_update(&nine, &header, body.clone(), "1.5.0").await?;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(api_reason(&answer), "policy_denied");
    let two = mesh.store(&running, "2")?;
    let (status, answer) = put_update(&two, &header, body, "1.0.0").await?;
    assert_eq!(
        (status, api_reason(&answer).as_str()),
        (StatusCode::FORBIDDEN, "policy_denied")
    );

    let one = upload(&mesh, &mesh.store(&running, "1")?, "1", 1).await?;

    // Nobody advertised here, so the sum leaves at the deadline, with store 1 alone.
    let sums = mesh.partial_sums(1).await?;
    let (header, sum) = &sums[0];
    let stores: Vec<&str> = header
        .contributors
        .iter()
        .map(|c| c.store.0.as_str())
        .collect();
    assert_eq!(stores, ["1"]);
    assert_eq!(unpack(sum, ring), one);
    assert_eq!(header.rejected.get("policy_denied"), Some(&2));
    assert_eq!(running.pop().metrics().rejected_count("policy_denied"), 2);
    let log = std::fs::read_to_string(mesh.root.join("decisions.jsonl"))?;
    assert!(
        log.lines()
            .any(|l| l.contains("\"deny\"") && l.contains("epsilon_remaining"))
    );
    running.kill().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejects_duplicate_stale_wrong_shape_and_wrong_ring_updates_with_their_reason() -> Result<()>
{
    let mesh = Mesh::new(&["1", "2", "3"], Duration::from_secs(30)).await?;
    let running = mesh.pop().await?;
    let ring = mesh.ring();
    let client = mesh.store(&running, "1")?;
    upload(&mesh, &client, "1", 5).await?;

    // The same upload re-sent (a lost answer) is acknowledged again; another one is a
    // duplicate.
    let again = update_header(7, ring.bits(), DIMENSION, "up-1");
    let body = ring.pack(&masked_vector(5, ring));
    let (status, _) = put_update(&client, &again, body.clone(), "1.5.0").await?;
    assert_eq!(status, StatusCode::OK);
    let cases = [
        (
            update_header(7, ring.bits(), DIMENSION, "other"),
            "duplicate",
        ),
        (
            update_header(6, ring.bits(), DIMENSION, "old"),
            "stale_round",
        ),
        (
            update_header(7, ring.bits(), DIMENSION - 1, "short"),
            "wrong_shape",
        ),
        (
            update_header(7, ring.bits() + 1, DIMENSION, "wide"),
            "wrong_ring",
        ),
    ];
    let two = mesh.store(&running, "2")?;
    for (i, (header, reason)) in cases.iter().enumerate() {
        let sender = if i == 0 { &client } else { &two };
        let (status, answer) = put_update(sender, header, body.clone(), "1.5.0").await?;
        assert!(status.is_client_error(), "{reason}: {status}");
        assert_eq!(api_reason(&answer), *reason);
        assert_eq!(
            running.pop().metrics().rejected_count(reason),
            1,
            "{reason}"
        );
    }
    let metrics = running.pop().metrics().encode();
    assert!(
        metrics.contains("fedmesh_pop_updates_folded_total 1"),
        "{metrics}"
    );
    running.kill().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relayed_requests_carry_the_certificate_identity_not_a_forged_header() -> Result<()> {
    let mesh = Mesh::new(&["1", "2", "3"], Duration::from_secs(30)).await?;
    let running = mesh.pop().await?;
    let client = mesh.store(&running, "2")?;
    let forged = "spiffe://fedmesh.test/store/north/1";
    assert_eq!(
        advertise(&client, "2", Some(forged)).await?,
        StatusCode::ACCEPTED
    );
    let mut headers = store_headers();
    headers.insert(wire::STORE_HEADER, HeaderValue::from_static(forged));
    let receipt = client
        .request(
            Method::GET,
            &wire::receipt(RoundId(7)),
            headers,
            SendBody::empty(),
        )
        .await?;
    assert_eq!(receipt.status(), StatusCode::NO_CONTENT);

    let seen = mesh.core.log.lock().unwrap().store_headers.clone();
    assert_eq!(seen.len(), 2);
    for (path, store) in seen {
        assert_eq!(store, "spiffe://fedmesh.test/store/north/2", "{path}");
    }

    // Blobs come from core once, checked against their digest.
    let digest = service::cache::sha256_hex(BLOB);
    for _ in 0..2 {
        let blob = store_get(&client, &wire::blob(&digest))
            .await?
            .bytes(1 << 20)
            .await?;
        assert_eq!(&blob[..], BLOB);
    }
    let bad = service::cache::sha256_hex(b"not the blob");
    let refused = store_get(&client, &wire::blob(&bad)).await?;
    assert_eq!(refused.status(), StatusCode::BAD_GATEWAY);
    assert_eq!(mesh.core.log.lock().unwrap().blob_fetches, 2);

    // Manifests are served only when the registry's key signed them for that model and
    // version; one signed by another key is refused and never cached.
    let path = wire::model_version("oj", ModelVersion(0));
    let served = store_get(&client, &path).await?.bytes(1 << 20).await?;
    let signed: fedmesh_core_agg::registry::SignedManifest = serde_json::from_slice(&served)?;
    let public =
        fedmesh_core_agg::registry::keys::read_verifying_key(&mesh.root.join("keys/registry.pub"))?;
    let manifest = fedmesh_core_agg::registry::verify_manifest(
        &signed,
        &public,
        &fedmesh_core_agg::ModelId("oj".into()),
        Some(ModelVersion(0)),
    )?;
    assert_eq!(manifest.blob_sha256, digest);
    let forged = store_get(&client, &wire::model_version("rogue", ModelVersion(0))).await?;
    assert_eq!(forged.status(), StatusCode::BAD_GATEWAY);
    let body: ApiError = serde_json::from_slice(&forged.bytes(1 << 16).await?)?;
    assert_eq!(body.reason, "bad_manifest");
    running.kill().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_decides_every_store_route_and_a_store_past_its_budget_may_only_read() -> Result<()>
{
    let mesh = Mesh::new(&["1", "2", "9"], Duration::from_secs(30)).await?;
    let running = mesh.pop().await?;
    let allowed = mesh.store(&running, "2")?;
    let spent = mesh.store(&running, "9")?;
    let reason = |body: &[u8]| -> Result<ApiError> { Ok(serde_json::from_slice(body)?) };

    // A store with budget left relays every step; one without may poll the round and fetch
    // its receipt (its queue must settle), but not advertise keys for a round.
    assert_eq!(advertise(&allowed, "2", None).await?, StatusCode::ACCEPTED);
    let poll = store_get(&spent, wire::ROUND).await?;
    assert_eq!(poll.status(), StatusCode::OK);
    let receipt = store_get(&spent, &wire::receipt(RoundId(7))).await?;
    assert_eq!(receipt.status(), StatusCode::NO_CONTENT);
    assert_eq!(advertise(&spent, "9", None).await?, StatusCode::FORBIDDEN);

    // A runtime older than the minimum is refused on a read route too, naming the rule.
    let mut old = HeaderMap::new();
    old.insert(wire::RUNTIME_HEADER, HeaderValue::from_static("1.4.1"));
    let refused = allowed
        .request(Method::GET, wire::ROUND, old, SendBody::empty())
        .await?;
    assert_eq!(refused.status(), StatusCode::FORBIDDEN);
    let body = reason(&refused.bytes(1 << 16).await?)?;
    assert_eq!(body.reason, "policy_denied");
    assert!(body.message.contains("runtime_version"), "{}", body.message);

    // Each decision is counted by result and rule.
    let (_, metrics) = plain_get(running.admin_addr().context("admin")?, wire::METRICS).await?;
    assert!(metrics.contains("rule=\"runtime_version\""), "{metrics}");
    assert!(metrics.contains("rule=\"epsilon_remaining\""), "{metrics}");
    running.kill().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_after_an_early_forward_go_into_a_further_partial_sum() -> Result<()> {
    let mesh = Mesh::new(&["1", "2", "3"], Duration::from_millis(2500)).await?;
    let running = mesh.pop().await?;
    let ring = mesh.ring();

    // Stores 1 and 2 advertised here: their sum leaves as soon as both are in. Store 3
    // advertised elsewhere (anycast moved it) and uploads here later.
    let clients = [mesh.store(&running, "1")?, mesh.store(&running, "2")?];
    for (client, id) in clients.iter().zip(["1", "2"]) {
        advertise(client, id, None).await?;
    }
    for ((client, id), seed) in clients.iter().zip(["1", "2"]).zip([1, 2]) {
        upload(&mesh, client, id, seed).await?;
    }
    let first = mesh.partial_sums(1).await?;
    let three = upload(&mesh, &mesh.store(&running, "3")?, "3", 3).await?;

    let sums = mesh.partial_sums(2).await?;
    let names = |h: &PartialSumHeader| -> Vec<String> {
        h.contributors.iter().map(|c| c.store.0.clone()).collect()
    };
    assert_eq!(names(&first[0].0), ["1", "2"]);
    assert_eq!(names(&sums[1].0), ["3"]);
    assert_eq!(unpack(&sums[1].1, ring), three);
    running.kill().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_re_sent_update_is_taken_past_the_forwarding_time_and_forwarded_alone() -> Result<()> {
    // Uploads run from now to 3 s from now: PoPs forward 600 ms (a fifth) before the end.
    let mesh = Mesh::new(&["1", "2", "3"], Duration::from_secs(3)).await?;
    let upload_ms = now_ms() + 3_000;
    if let Some(ann) = mesh.core.announcement.lock().unwrap().as_mut() {
        ann.deadlines.shares_ms = now_ms();
        ann.deadlines.upload_ms = upload_ms;
    }
    let running = mesh.pop().await?;
    let ring = mesh.ring();
    let client = mesh.store(&running, "2")?;
    let values = masked_vector(22, ring);

    // 1. Past the forwarding time a plain upload is late ...
    let forward_ms = upload_ms - 600;
    tokio::time::sleep(Duration::from_millis(forward_ms + 100 - now_ms())).await;
    let plain = update_header(7, ring.bits(), DIMENSION, "up-2");
    let (status, answer) = put_update(&client, &plain, ring.pack(&values), "1.5.0").await?;
    assert_eq!(
        (status, api_reason(&answer).as_str()),
        (StatusCode::CONFLICT, "round_closed")
    );

    // 2. ... but the same update sent again, marked, is taken and forwarded on its own.
    let resent = wire::UpdateHeader {
        resent: true,
        ..plain
    };
    let (status, _) = put_update(&client, &resent, ring.pack(&values), "1.5.0").await?;
    assert_eq!(status, StatusCode::OK);
    let sums = mesh.partial_sums(1).await?;
    let (header, body) = &sums[0];
    assert!(header.resent, "{header:?}");
    let stores: Vec<&str> = header
        .contributors
        .iter()
        .map(|c| c.store.0.as_str())
        .collect();
    assert_eq!(stores, ["2"]);
    assert_eq!(unpack(body, ring), values);

    // 3. Asked again (a lost answer), it is acknowledged, not folded twice.
    let (status, _) = put_update(&client, &resent, ring.pack(&values), "1.5.0").await?;
    assert_eq!(status, StatusCode::OK);

    // 4. Past core's upload deadline even a re-send is late.
    tokio::time::sleep(Duration::from_millis(upload_ms + 100 - now_ms())).await;
    let other = mesh.store(&running, "3")?;
    let late = wire::UpdateHeader {
        upload_id: "up-3".into(),
        ..resent
    };
    let (status, answer) = put_update(&other, &late, ring.pack(&values), "1.5.0").await?;
    assert_eq!(
        (status, api_reason(&answer).as_str()),
        (StatusCode::CONFLICT, "round_closed")
    );
    assert_eq!(mesh.core.log.lock().unwrap().partial_sums.len(), 1);
    running.kill().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pop_killed_after_accepting_updates_still_forwards_them_all() -> Result<()> {
    let mesh = Mesh::new(&["1", "2", "3"], Duration::from_secs(8)).await?;
    *mesh.core.accept_sums.lock().unwrap() = false;
    let ring = mesh.ring();

    // 1. Two stores advertise and upload; the sum closes early but core is not taking it.
    let running = mesh.pop().await?;
    let clients = [mesh.store(&running, "1")?, mesh.store(&running, "2")?];
    for (client, id) in clients.iter().zip(["1", "2"]) {
        advertise(client, id, None).await?;
    }
    let mut vectors = Vec::new();
    for ((client, id), seed) in clients.iter().zip(["1", "2"]).zip([11, 12]) {
        vectors.push(upload(&mesh, client, id, seed).await?);
    }
    running.kill().await;
    assert!(mesh.core.log.lock().unwrap().partial_sums.is_empty());

    // 2. A new process on the same state directory forwards both once core takes sums.
    *mesh.core.accept_sums.lock().unwrap() = true;
    let running = service::start(mesh.config()?).await?;
    let sums = mesh.partial_sums(1).await?;
    let (header, body) = &sums[0];
    let stores: Vec<&str> = header
        .contributors
        .iter()
        .map(|c| c.store.0.as_str())
        .collect();
    assert_eq!(stores, ["1", "2"]);
    let refs: Vec<&[u64]> = vectors.iter().map(Vec::as_slice).collect();
    assert_eq!(unpack(body, ring), reference_sum(&refs, ring));

    // 3. Store 1 re-sending after the restart is known, not counted twice.
    let until = Instant::now() + Duration::from_secs(5);
    while running.pop().newest_round().is_none() && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(250)).await;
    let header = update_header(7, ring.bits(), DIMENSION, "other-id");
    let client = mesh.store(&running, "1")?;
    let (status, answer) = put_update(&client, &header, ring.pack(&vectors[0]), "1.5.0").await?;
    assert_eq!(
        (status, api_reason(&answer).as_str()),
        (StatusCode::CONFLICT, "duplicate")
    );
    running.kill().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_flips_readiness_to_withdraw() -> Result<()> {
    let mesh = Mesh::new(&["1", "2", "3"], Duration::from_secs(30)).await?;
    // No round open: nothing to finish before withdrawing.
    *mesh.core.announcement.lock().unwrap() = None;
    let running = service::start(mesh.config()?).await?;
    let admin = running.admin_addr().context("admin listener")?;
    let until = Instant::now() + Duration::from_secs(5);
    while plain_get(admin, wire::READY).await?.0 != 200 {
        if Instant::now() > until {
            bail!("never ready");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // A store may not drain the PoP; core may.
    let store = mesh.store(&running, "1")?;
    let refused = store
        .request(
            Method::POST,
            "/v1/admin/drain",
            HeaderMap::new(),
            SendBody::empty(),
        )
        .await?;
    assert_eq!(refused.status(), StatusCode::FORBIDDEN);
    let core = Client::new(
        ClientConfig::new(running.addr(), PeerPolicy::PathPrefix("/pop/".into())),
        FileSvidSource::load(mesh.pki.core.clone())?,
    )?;
    let drained = core
        .request(
            Method::POST,
            "/v1/admin/drain",
            HeaderMap::new(),
            SendBody::empty(),
        )
        .await?;
    assert_eq!(drained.status(), StatusCode::ACCEPTED);

    let (status, body) = plain_get(admin, wire::READY).await?;
    assert_eq!(status, 503);
    assert!(body.contains("withdraw"), "{body}");
    let ready = store.get(wire::HEALTH).await?.status();
    assert_eq!(ready, StatusCode::OK);
    let (status, metrics) = plain_get(admin, wire::METRICS).await?;
    assert_eq!(status, 200);
    assert!(metrics.contains("fedmesh_pop_withdrawn 1"), "{metrics}");
    running.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_pop_finishes_its_open_round_then_withdraws_and_takes_no_new_one() -> Result<()>
{
    let mesh = Mesh::new(&["1", "2", "3"], Duration::from_secs(30)).await?;
    let running = mesh.pop().await?;
    let admin = running.admin_addr().context("admin listener")?;
    let ring = mesh.ring();
    let stores = mesh.advertised_stores(&running, &["1", "2", "3"]).await?;
    let mut vectors = vec![upload(&mesh, &stores[0], "1", 200).await?];

    // 1. Drained with round 7 open: it stays ready while the round still needs it.
    running.pop().drain();
    let (status, _) = plain_get(admin, wire::READY).await?;
    assert_eq!(status, 200, "withdrawn with a round still open");

    // 2. The round's other stores finish here; the sum goes to core, then it withdraws.
    for (i, (client, id)) in stores.iter().zip(["1", "2", "3"]).enumerate().skip(1) {
        vectors.push(upload(&mesh, client, id, 200 + i as u64).await?);
    }
    let sums = mesh.partial_sums(1).await?;
    let refs: Vec<&[u64]> = vectors.iter().map(Vec::as_slice).collect();
    assert_eq!(unpack(&sums[0].1, ring), reference_sum(&refs, ring));
    let until = Instant::now() + Duration::from_secs(5);
    while plain_get(admin, wire::READY).await?.0 != 503 {
        if Instant::now() > until {
            bail!("never withdrew after its round closed");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // 3. Core announces round 8: a drained PoP does not take it, so uploads are refused.
    *mesh.core.announcement.lock().unwrap() =
        Some(announcement(8, &["1", "2", "3"], Duration::from_secs(30))?);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        running.pop().newest_round() != Some(RoundId(8)),
        "took a round while drained"
    );
    let header = update_header(8, ring.bits(), DIMENSION, "drained-8");
    let body = ring.pack(&masked_vector(300, ring));
    let (status, _) = put_update(&stores[0], &header, body, "1.4.2").await?;
    assert!(status.is_client_error(), "{status}");
    running.kill().await;
    Ok(())
}

/// A plain HTTP/1.1 GET on the admin listener, as a routing daemon's check script does.
async fn plain_get(addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: pop\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut answer = String::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_string(&mut answer)).await??;
    let status = answer
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .context("no status line")?;
    Ok((status, answer))
}
