//! `netlab run`: a whole mesh from a scenario file, as real processes on 127.0.0.1.
//!
//! The steps, in order: issue the dev PKI, split the data per store, write the task config,
//! the initial model and the registry key, write each process's config, start a relay per
//! store behind the anycast front, start core, the PoPs and the store-agent processes
//! (many stores per process), wait until they serve, follow core's `/v1/status` printing
//! one line per round while injecting the scenario's faults, and stop. Every child is
//! killed when the run ends, fails or is interrupted: each is spawned with `kill_on_drop`
//! in its own process group, and the [`Mesh`] that owns them is dropped on every path.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use fedmesh_netlab::anycast::{Anycast, PopEndpoint, PopHealth};
use fedmesh_netlab::relay::Relay;
use fedmesh_netlab::scenario::Scenario;
use fedmesh_store_agent::task::{Normalisation, Optimiser, TaskConfig};
use fedmesh_transport::pki::{CertificateAuthority, Validity};
use fedmesh_transport::{Client, ClientConfig, FileSvidSource, PeerPolicy, SvidPaths, SvidSource};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tokio::process::{Child, Command};

use crate::report::{self, RoundSample};
use crate::task_config::{self, DpRecipe, LocalRecipe};

/// The model core trains and publishes.
pub(crate) const MODEL: &str = "oj-demand";

/// Options of `netlab run`.
#[derive(Debug, clap::Args)]
pub(crate) struct RunArgs {
    /// The scenario file (TOML).
    #[arg(long)]
    pub scenario: PathBuf,
    /// Output folder: configs, state, logs, summary.json, report.md and plots.
    #[arg(long)]
    pub out: PathBuf,
    /// Where core-agg, pop-proxy and store-agent are; the netlab binary's folder by default.
    #[arg(long)]
    pub bin_dir: Option<PathBuf>,
    /// Run with the WAN emulation off (perfect links), whatever the scenario says.
    #[arg(long)]
    pub no_wan: bool,
    /// Skip the centralised baselines in the report (they train for about a minute).
    #[arg(long)]
    pub skip_baselines: bool,
}

/// One store as the lab places it.
#[derive(Debug, Clone)]
pub(crate) struct LabStore {
    pub id: String,
    pub region: String,
    pub metro: String,
    /// The store whose rows it holds (itself, or a real store for an adversary).
    pub data_of: String,
    /// `None` for an honest store, else the adversary kind.
    pub adversary: Option<String>,
    pub state_dir: PathBuf,
    pub config: PathBuf,
}

/// A child process of the mesh.
struct Proc {
    name: String,
    child: Child,
    command: Vec<String>,
    log: PathBuf,
}

/// Everything the run started. Dropping it kills every child and stops every relay.
pub(crate) struct Mesh {
    core: Option<Proc>,
    pops: BTreeMap<String, Proc>,
    stores: Vec<Proc>,
    /// Each store-agent process's configs, to start it again after a kill.
    store_configs: Vec<Vec<PathBuf>>,
    /// Store-agent processes the scenario killed, with when to start them again.
    dead_stores: BTreeMap<usize, Instant>,
    relays: BTreeMap<String, Relay>,
    /// A client per PoP, for its `/metrics`.
    pop_clients: BTreeMap<String, Client>,
    front: Arc<Anycast>,
    _health: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Mesh {
    fn drop(&mut self) {
        // kill_on_drop sends SIGKILL to each child; do it explicitly to every process
        // group first so nothing a child started survives either.
        let pids = self
            .core
            .iter()
            .chain(self.pops.values())
            .chain(self.stores.iter())
            .filter_map(|p| p.child.id());
        for pid in pids {
            let _ = std::process::Command::new("kill")
                .args(["-KILL", "--", &format!("-{pid}")])
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// Paths of one run's output folder.
pub(crate) struct Layout {
    pub root: PathBuf,
    pub pki: PathBuf,
    pub keys: PathBuf,
    pub data: PathBuf,
    pub conf: PathBuf,
    pub state: PathBuf,
    pub logs: PathBuf,
}

impl Layout {
    fn new(root: &Path) -> Result<Self> {
        let root = std::path::absolute(root)?;
        let layout = Self {
            pki: root.join("pki"),
            keys: root.join("keys"),
            data: root.join("data"),
            conf: root.join("conf"),
            state: root.join("state"),
            logs: root.join("logs"),
            root,
        };
        for dir in [&layout.data, &layout.conf, &layout.state, &layout.logs] {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        Ok(layout)
    }
}

/// Runs a scenario end to end and writes the report.
pub(crate) fn run(args: &RunArgs) -> Result<()> {
    let mut scenario = Scenario::from_path(&args.scenario)?;
    if args.no_wan {
        scenario.wan.off = true;
    }
    if args.out.exists() && std::fs::read_dir(&args.out)?.next().is_some() {
        bail!("output folder {} is not empty", args.out.display());
    }
    let layout = Layout::new(&args.out)?;
    let bins = bin_dir(args.bin_dir.as_deref())?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let outcome = runtime.block_on(async {
        tokio::select! {
            outcome = run_mesh(&scenario, &layout, &bins) => outcome,
            _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
        }
    });
    // The mesh is gone here, on every path: its drop killed the children.
    let mut outcome = outcome?;
    report::write(&scenario, &layout, &mut outcome, args.skip_baselines)
}

/// What the run observed, for the report.
pub(crate) struct Outcome {
    pub stores: Vec<LabStore>,
    pub task: TaskConfig,
    pub normalisation: Normalisation,
    /// The federated statistics against the lab's pooled fit, when core measured them.
    pub statistics: Option<serde_json::Value>,
    /// The honest stores' upload queues and audit logs once the mesh stopped.
    pub stores_at_end: serde_json::Value,
    pub status: serde_json::Value,
    pub ledger: Option<serde_json::Value>,
    pub samples: Vec<RoundSample>,
    pub startup_seconds: f64,
    pub wall_seconds: f64,
    pub faults: Vec<String>,
    pub processes: Vec<report::ProcessFigures>,
    pub signed_manifest: Option<serde_json::Value>,
    pub blob: Option<Vec<u8>>,
    pub version_blobs: Vec<(u64, Vec<u8>)>,
    pub registry_public_key: PathBuf,
    pub relay_bytes_up: BTreeMap<String, u64>,
}

async fn run_mesh(scenario: &Scenario, layout: &Layout, bins: &Path) -> Result<Outcome> {
    let wall = Instant::now();

    // 1. Stores, data, PKI, task, initial model, registry key.
    let stores = place_stores(scenario, layout)?;
    split_data(scenario, layout, &stores)?;
    let lab_identity = issue_pki(scenario, layout, &stores)?;
    let (task, normalisation) = write_task(scenario, layout)?;
    let (_, public_key) = fedmesh_core_agg::registry::keys::generate(&layout.keys)
        .map_err(|e| anyhow::anyhow!("registry keygen: {e}"))?;
    write_initial_model(
        &task,
        &layout.root.join("initial.safetensors"),
        scenario.seed,
    )?;

    // 2. Ports, the anycast front and a relay per store.
    let core_addr = free_port_pair()?;
    let mut pop_endpoints = Vec::new();
    for metro in &scenario.topology.metros {
        for n in 1..=metro.pops {
            pop_endpoints.push(PopEndpoint {
                name: format!("{}-{n}", metro.name),
                metro: metro.name.clone(),
                addr: free_port_pair()?,
            });
        }
    }
    let front = Anycast::new(pop_endpoints.clone());
    let health = front.spawn_health_poll(Arc::clone(&lab_identity), Duration::from_millis(250));
    let start = Instant::now();
    let mut relays = BTreeMap::new();
    let mut order: Vec<usize> = (0..stores.len()).collect();
    order.shuffle(&mut ChaCha8Rng::seed_from_u64(scenario.seed));
    for (index, store) in stores.iter().enumerate() {
        let rank = order[index] as f64 / stores.len().max(1) as f64;
        let profile = scenario.profile_for(&store.id, &store.region, &store.metro, rank);
        let view = Arc::new(front.view(&store.metro, index));
        let seed = scenario
            .seed
            .wrapping_mul(1_000_003)
            .wrapping_add(index as u64);
        let relay = Relay::start_at("127.0.0.1:0".parse()?, view, profile, seed, start).await?;
        relays.insert(store.id.clone(), relay);
    }

    // 3. Configs.
    let honest = stores.iter().filter(|s| s.adversary.is_none()).count();
    let core_config = write_core_config(scenario, layout, core_addr, honest)?;
    let mut pop_configs = Vec::new();
    for pop in &pop_endpoints {
        pop_configs.push((
            pop.clone(),
            write_pop_config(scenario, layout, pop, core_addr)?,
        ));
    }
    for store in &stores {
        let relay = &relays[&store.id];
        let spec = &scenario.data.spec;
        write_store_config(
            layout,
            store,
            relay.addr(),
            &public_key,
            spec,
            scenario.data.train_max,
        )?;
    }

    // 4. Processes: core first, then PoPs, then stores.
    let mut mesh = Mesh {
        core: None,
        pops: BTreeMap::new(),
        stores: Vec::new(),
        store_configs: Vec::new(),
        dead_stores: BTreeMap::new(),
        relays,
        pop_clients: BTreeMap::new(),
        front: Arc::clone(&front),
        _health: health,
    };
    let status_client = operator_client(core_addr, &lab_identity)?;
    let started = Instant::now();
    mesh.core = Some(spawn(
        bins,
        "core-agg",
        "core",
        &["serve", "--config"],
        std::slice::from_ref(&core_config),
        layout,
    )?);
    wait_healthy(
        &status_client,
        "/v1/status",
        Duration::from_secs(60),
        &mut mesh,
    )
    .await?;
    for (pop, config) in &pop_configs {
        let proc = spawn(
            bins,
            "pop-proxy",
            &pop.name,
            &["serve", "--config"],
            std::slice::from_ref(config),
            layout,
        )?;
        mesh.pops.insert(pop.name.clone(), proc);
    }
    for (pop, _) in &pop_configs {
        let client = pop_client(pop.addr, &lab_identity)?;
        wait_healthy(&client, "/healthz", Duration::from_secs(60), &mut mesh).await?;
        mesh.pop_clients.insert(pop.name.clone(), client);
    }
    let groups = store_groups(&stores, scenario.topology.store_processes);
    for (i, group) in groups.iter().enumerate() {
        let configs: Vec<PathBuf> = group.iter().map(|s| s.config.clone()).collect();
        let proc = spawn_store_agent(bins, &format!("stores-{}", i + 1), &configs, layout)?;
        mesh.stores.push(proc);
        mesh.store_configs.push(configs);
    }
    let startup = wait_online(&status_client, honest, &mut mesh, Duration::from_secs(120)).await?;
    let startup_seconds = startup.saturating_duration_since(started).as_secs_f64();
    println!(
        "mesh up in {startup_seconds:.1} s: core, {} PoPs, {} stores in {} processes",
        mesh.pops.len(),
        stores.len(),
        mesh.stores.len()
    );

    // 5. Follow the rounds, injecting faults.
    let mut follow = Follower::new(scenario);
    follow.honest = stores
        .iter()
        .filter(|s| s.adversary.is_none())
        .map(|s| s.id.clone())
        .collect();
    let deadline = Instant::now() + Duration::from_secs(scenario.rounds.timeout_s);
    let mut status = serde_json::Value::Null;
    let mut faults: Vec<String> = stores
        .iter()
        .filter_map(|s| {
            let kind = s.adversary.as_deref()?;
            let injected = ["rogue-identity", "outdated-runtime"].contains(&kind);
            Some(if injected {
                format!("adversary {} ({kind}) started", s.id)
            } else {
                format!(
                    "adversary {} ({kind}) NOT injected: store-agent has no switch for it",
                    s.id
                )
            })
        })
        .collect();
    let mut samples = Vec::new();
    loop {
        if Instant::now() > deadline {
            faults.push(format!(
                "run timed out after {} s",
                scenario.rounds.timeout_s
            ));
            break;
        }
        check_alive(&mut mesh)?;
        match get_json(&status_client, "/v1/status").await {
            Ok(now) => status = now,
            Err(e) => {
                tracing::debug!(error = %e, "status unavailable");
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        }
        samples.extend(follow.new_rounds(&status, &status_client).await);
        follow.learn_plan(&status, &status_client).await;
        for line in follow
            .inject(&status, &mut mesh, scenario, bins, layout, &core_config)
            .await?
        {
            println!("fault: {line}");
            faults.push(line);
        }
        let committed = status["rounds_completed"].as_u64().unwrap_or(0);
        let abandoned = status["rounds_abandoned"].as_u64().unwrap_or(0);
        if committed >= scenario.rounds.count {
            break;
        }
        if abandoned >= abandon_limit(scenario.rounds.count) {
            faults.push(format!(
                "core stopped planning: {abandoned} rounds abandoned, {committed} committed"
            ));
            break;
        }
        // A fault bound to a phase needs a look inside that phase, and a short round's
        // shares phase may last only a store's poll (100-250 ms): look often until the
        // last such fault's round has gone by.
        let current = status["round"]["id"].as_u64().unwrap_or(0);
        let wait = if phase_faults_ahead(scenario, current) {
            40
        } else {
            200
        };
        tokio::time::sleep(Duration::from_millis(wait)).await;
    }

    // 6. Collect what the report needs while the mesh still serves.
    let ledger = get_json(&status_client, fedmesh_protocol::wire::LEDGER)
        .await
        .ok();
    let (signed_manifest, blob) = fetch_model(&status_client).await;
    let mut version_blobs = Vec::new();
    for version in samples.iter().filter_map(|s| s.model_version) {
        if let Some(blob) = fetch_version(&status_client, version).await {
            version_blobs.push((version, blob));
        }
    }
    let processes = report::process_figures(&mesh.processes(&groups)).await;
    let relay_bytes_up = mesh
        .relays
        .iter()
        .map(|(id, r)| {
            (
                id.clone(),
                r.stats()
                    .bytes_up
                    .load(std::sync::atomic::Ordering::Relaxed),
            )
        })
        .collect();
    drop(mesh);
    let stores_at_end = stores_at_end(&stores);
    // The test rows are normalised as the stores trained: with what core measured, if it
    // ran a statistics round.
    let measured = measured_normalisation(&status);
    let statistics = match &measured {
        Some(m) => Some(compare_normalisation(m, scenario, &status)?),
        None => None,
    };
    let normalisation = measured.unwrap_or(normalisation);
    // Fresh heads in the report start where the stores' did: at the announced target mean.
    let mut task = task;
    task.normalisation = Some(normalisation.clone());
    Ok(Outcome {
        stores,
        task,
        normalisation,
        statistics,
        stores_at_end,
        status,
        ledger,
        samples,
        startup_seconds,
        wall_seconds: wall.elapsed().as_secs_f64(),
        faults,
        processes,
        signed_manifest,
        blob,
        version_blobs,
        registry_public_key: public_key,
        relay_bytes_up,
    })
}

impl Mesh {
    /// Name, pid and hosted stores of every running process.
    fn processes(&self, groups: &[Vec<LabStore>]) -> Vec<(String, u32, usize)> {
        let services = self.core.iter().chain(self.pops.values());
        let mut out: Vec<(String, u32, usize)> = services
            .filter_map(|p| Some((p.name.clone(), p.child.id()?, 0)))
            .collect();
        for (proc, group) in self.stores.iter().zip(groups) {
            if let Some(pid) = proc.child.id() {
                out.push((proc.name.clone(), pid, group.len()));
            }
        }
        out
    }
}

/// The folder holding the service binaries: `--bin-dir`, else the netlab binary's own.
fn bin_dir(given: Option<&Path>) -> Result<PathBuf> {
    let dir = match given {
        Some(dir) => dir.to_path_buf(),
        None => std::env::current_exe()?
            .parent()
            .context("the netlab binary has no folder")?
            .to_path_buf(),
    };
    for name in ["core-agg", "pop-proxy", "store-agent"] {
        if !dir.join(name).exists() {
            bail!(
                "{} not found in {} (build it: cargo build -p fedmesh-{name}, or cargo xtask demo)",
                name,
                dir.display()
            );
        }
    }
    Ok(dir)
}

/// Abandoned rounds after which core stops planning, for `count` to commit: a quarter of
/// them, at least three, for rounds a fault abandons.
fn abandon_limit(count: u64) -> u64 {
    (count / 4).max(3)
}

/// A free port on 127.0.0.1 for both UDP and TCP.
fn free_port_pair() -> Result<std::net::SocketAddr> {
    for _ in 0..64 {
        let udp = std::net::UdpSocket::bind("127.0.0.1:0")?;
        let addr = udp.local_addr()?;
        if std::net::TcpListener::bind(addr).is_ok() {
            return Ok(addr);
        }
    }
    bail!("no free udp+tcp port pair on 127.0.0.1")
}

/// The stores in id order, dealt to regions, plus the scenario's adversaries.
fn place_stores(scenario: &Scenario, layout: &Layout) -> Result<Vec<LabStore>> {
    let mut ids = store_ids(&scenario.data.dir.join("stores.csv"))?;
    if let Some(n) = scenario.data.stores {
        ids.truncate(n);
    }
    let mut stores: Vec<LabStore> = scenario
        .place_stores(&ids)
        .into_iter()
        .map(|(id, region, metro)| lab_store(layout, id.clone(), region, metro, id, None))
        .collect();
    let honest = stores.len();
    for adversary in &scenario.faults.adversaries {
        for id in &adversary.stores {
            // An adversary joins the region of the store whose rows it copies.
            let like = stores[stores.len() % honest.max(1)].clone();
            stores.push(lab_store(
                layout,
                id.clone(),
                like.region,
                like.metro,
                like.id,
                Some(adversary.kind.clone()),
            ));
        }
    }
    Ok(stores)
}

fn lab_store(
    layout: &Layout,
    id: String,
    region: String,
    metro: String,
    data_of: String,
    adversary: Option<String>,
) -> LabStore {
    LabStore {
        state_dir: layout.state.join("store").join(&id),
        config: layout.conf.join(format!("store-{id}.toml")),
        id,
        region,
        metro,
        data_of,
        adversary,
    }
}

/// Store ids from the attributes file's first column, in numeric order.
fn store_ids(stores_csv: &Path) -> Result<Vec<String>> {
    let mut reader = csv::Reader::from_path(stores_csv)
        .with_context(|| format!("reading {}", stores_csv.display()))?;
    let mut ids: Vec<u64> = Vec::new();
    for (row, record) in reader.records().enumerate() {
        let record = record.with_context(|| format!("{} row {}", stores_csv.display(), row + 2))?;
        let id = record.get(0).unwrap_or_default();
        ids.push(id.trim().parse().with_context(|| {
            format!(
                "{} row {}: store {id:?} is not a number",
                stores_csv.display(),
                row + 2
            )
        })?);
    }
    ids.sort_unstable();
    ids.dedup();
    Ok(ids.into_iter().map(|id| id.to_string()).collect())
}

/// Writes each store's own rows to `data/<store>/sales.csv`: a store sees nothing else.
fn split_data(scenario: &Scenario, layout: &Layout, stores: &[LabStore]) -> Result<()> {
    let path = scenario.data.dir.join("sales.csv.gz");
    let file = std::fs::File::open(&path).with_context(|| format!("opening {}", path.display()))?;
    let mut reader = csv::Reader::from_reader(flate2::read::GzDecoder::new(file));
    let headers = reader.headers()?.clone();
    let column = headers
        .iter()
        .position(|h| h == "store")
        .with_context(|| format!("{} has no store column", path.display()))?;
    let wanted: BTreeSet<&str> = stores.iter().map(|s| s.data_of.as_str()).collect();
    let mut rows: BTreeMap<String, Vec<csv::StringRecord>> = BTreeMap::new();
    for record in reader.records() {
        let record = record.with_context(|| format!("reading {}", path.display()))?;
        let store = record.get(column).unwrap_or_default().trim().to_owned();
        if wanted.contains(store.as_str()) {
            rows.entry(store).or_default().push(record);
        }
    }
    for store in stores {
        let dir = layout.data.join(&store.id);
        std::fs::create_dir_all(&dir)?;
        let mut writer = csv::Writer::from_path(dir.join("sales.csv"))?;
        writer.write_record(&headers)?;
        for record in rows
            .get(&store.data_of)
            .map(Vec::as_slice)
            .unwrap_or_default()
        {
            let mut record = record.clone();
            if store.data_of != store.id {
                // An adversary's copy carries its own store id.
                let fields: Vec<String> = record
                    .iter()
                    .enumerate()
                    .map(|(i, f)| {
                        if i == column {
                            store.id.clone()
                        } else {
                            f.to_owned()
                        }
                    })
                    .collect();
                record = csv::StringRecord::from(fields);
            }
            writer.write_record(&record)?;
        }
        writer.flush()?;
    }
    // Attributes: the real stores' rows, plus a copy for each adversary.
    let attributes = std::fs::read_to_string(scenario.data.dir.join("stores.csv"))?;
    let mut out = attributes.trim_end().to_owned();
    for store in stores.iter().filter(|s| s.data_of != s.id) {
        if let Some(line) = attributes
            .lines()
            .find(|l| l.split(',').next() == Some(store.data_of.as_str()))
        {
            let rest = line.split_once(',').map(|(_, r)| r).unwrap_or_default();
            let _ = write!(out, "\n{},{rest}", store.id);
        }
    }
    out.push('\n');
    std::fs::write(layout.data.join("stores.csv"), out)?;
    Ok(())
}

/// Issues the PKI: core, a PoP SVID per metro, a store SVID per store, the lab's operator
/// identity, and, for rogue stores, SVIDs from another trust domain's CA.
fn issue_pki(
    scenario: &Scenario,
    layout: &Layout,
    stores: &[LabStore],
) -> Result<Arc<dyn SvidSource>> {
    let domain = fedmesh_transport::TrustDomain::new(&scenario.topology.trust_domain)
        .map_err(|e| anyhow::anyhow!("trust domain: {e}"))?;
    let validity = Validity::starting_now(Duration::from_secs(7 * 86_400));
    let ca = CertificateAuthority::new(&domain, validity)?;
    ca.issue("/core", validity)?
        .write_to(&layout.pki.join("core"))?;
    for metro in &scenario.topology.metros {
        let path = format!("/pop/{}", metro.name);
        ca.issue(&path, validity)?
            .write_to(&layout.pki.join("pop").join(&metro.name))?;
    }
    let rogue_domain = fedmesh_transport::TrustDomain::new("rogue.test")
        .map_err(|e| anyhow::anyhow!("trust domain: {e}"))?;
    let rogue = CertificateAuthority::new(&rogue_domain, validity)?;
    for store in stores {
        let path = format!("/store/{}/{}", store.region, store.id);
        let issuer = if store.adversary.as_deref() == Some("rogue-identity") {
            &rogue
        } else {
            &ca
        };
        let mut issued = issuer.issue(&path, validity)?;
        // A rogue store still trusts the real CA, so it can reach the PoP's handshake.
        issued.bundle_pem = ca.certificate_pem().to_owned();
        issued.write_to(&store_pki(layout, store))?;
    }
    let lab = ca
        .issue("/operator/netlab", validity)?
        .write_to(&layout.pki.join("netlab"))?;
    Ok(FileSvidSource::load(lab)?)
}

fn store_pki(layout: &Layout, store: &LabStore) -> PathBuf {
    layout.pki.join("store").join(&store.region).join(&store.id)
}

/// Writes `task.toml` from the scenario's training and privacy, with normalisation fitted
/// on the pooled training rows (only the lab holds them all).
fn write_task(scenario: &Scenario, layout: &Layout) -> Result<(TaskConfig, Normalisation)> {
    let (spec, dataset) =
        task_config::load_dominicks(&scenario.data.dir, Some(&scenario.data.spec))?;
    let normalisation = Normalisation::fit(dataset.stores.iter().map(|s| &s.train))?;
    let dp = (scenario.privacy.unit == "record").then_some(DpRecipe {
        clip_norm: scenario.privacy.clip_norm,
        noise_multiplier: scenario.privacy.noise_multiplier,
        expected_batch_size: scenario.privacy.expected_batch_size,
    });
    let local = LocalRecipe {
        epochs: scenario.training.epochs,
        batch_size: 64,
        optimiser: Optimiser::Adam,
        learning_rate: scenario.training.learning_rate,
        // The proximal term is the stores' half of FedProx and composes with any server
        // step (FedAvg, or FedAdam's adaptive one).
        fedprox_mu: scenario.training.mu,
        local_head: scenario.training.local_head,
        dp,
    };
    let mut task = task_config::task_config(
        spec.feature_count(),
        &local,
        normalisation.clone(),
        scenario.seed,
    );
    // With federated statistics core measures the normalisation and announces it; the
    // pooled fit stays in the lab, to compare with.
    let mut written = task.clone();
    if scenario.training.federated_statistics {
        written.normalisation = None;
        task.normalisation = None;
    }
    std::fs::write(layout.root.join("task.toml"), toml::to_string(&written)?)?;
    Ok((task, normalisation))
}

/// What the honest stores left behind: updates still queued (none, once every round they
/// joined has closed and its receipt came back), whether each audit chain verifies, and,
/// from the audit logs, updates a PoP acknowledged that their round settled without (by
/// round) and updates sent again after core found them missing.
fn stores_at_end(stores: &[LabStore]) -> serde_json::Value {
    use fedmesh_store_agent::daemon::state::StateDir;
    let (mut queued, mut holding, mut verified, mut broken) =
        (0usize, Vec::new(), 0usize, Vec::new());
    let mut held_not_included: BTreeMap<u64, usize> = BTreeMap::new();
    let mut resent = 0usize;
    let honest: Vec<&LabStore> = stores.iter().filter(|s| s.adversary.is_none()).collect();
    for store in &honest {
        let Ok(dir) = StateDir::open(&store.state_dir) else {
            broken.push(store.id.clone());
            continue;
        };
        let left = fedmesh_store_agent::queue::UploadQueue::open(&dir.queue_dir())
            .and_then(|q| q.list())
            .map_or(0, |l| l.len());
        if left > 0 {
            holding.push(store.id.clone());
        }
        queued += left;
        match fedmesh_store_agent::audit::verify(&dir.audit_log()) {
            Ok(Ok(_)) => verified += 1,
            _ => broken.push(store.id.clone()),
        }
        let fates = update_fates(&dir.audit_log());
        resent += fates.resent;
        for round in fates.held_not_included {
            *held_not_included.entry(round).or_default() += 1;
        }
    }
    serde_json::json!({
        "stores": honest.len(),
        "queued_updates": queued,
        "updates_resent": resent,
        "held_not_included_by_round": held_not_included,
        "stores_holding_updates": holding,
        "audit_chains_verified": verified,
        "audit_chains_broken": broken,
    })
}

/// What one store's audit log says of its updates' fates.
#[derive(Debug, Default)]
struct UpdateFates {
    /// Rounds whose update a PoP acknowledged and the round settled without.
    held_not_included: Vec<u64>,
    /// Updates sent again after core found them missing.
    resent: usize,
}

fn update_fates(log: &Path) -> UpdateFates {
    let mut fates = UpdateFates::default();
    let Ok(text) = std::fs::read_to_string(log) else {
        return fates;
    };
    use fedmesh_store_agent::audit::AuditEvent;
    let mut held = BTreeSet::new();
    // Each line is the event's fields beside the chain's own (sequence, time, hashes).
    for event in text
        .lines()
        .filter_map(|l| serde_json::from_str::<AuditEvent>(l).ok())
    {
        match event {
            AuditEvent::UpdateHeld {
                round,
                update_sha256,
                ..
            } => {
                held.insert((round, update_sha256));
            }
            AuditEvent::UpdateResent { .. } => fates.resent += 1,
            AuditEvent::UploadConfirmed {
                round,
                update_sha256,
                included: false,
            } if held.contains(&(round, update_sha256.clone())) => {
                fates.held_not_included.push(round);
            }
            _ => {}
        }
    }
    fates
}

/// The normalisation core measured in its statistics round, from its status.
fn measured_normalisation(status: &serde_json::Value) -> Option<Normalisation> {
    let result = &status["statistics"]["result"];
    let floats = |key: &str| -> Option<Vec<f64>> {
        result[key].as_array()?.iter().map(|v| v.as_f64()).collect()
    };
    Some(Normalisation {
        mean: floats("mean")?,
        std: floats("std")?,
        target_mean: result["target_mean"].as_f64(),
    })
}

/// How far the federated statistics are from the lab's pooled fit over the training rows of
/// the stores that were in the statistics round's sum: mean errors in units of the pooled
/// deviation, deviation errors relative to it.
fn compare_normalisation(
    measured: &Normalisation,
    scenario: &Scenario,
    status: &serde_json::Value,
) -> Result<serde_json::Value> {
    let round = &status["statistics"]["round"];
    let contributors: Vec<&str> = status["history"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|r| r["round"] == *round)
        .and_then(|r| r["survivors"].as_array())
        .into_iter()
        .flatten()
        .filter_map(serde_json::Value::as_str)
        .collect();
    let (_, dataset) = task_config::load_dominicks(&scenario.data.dir, Some(&scenario.data.spec))?;
    let pooled = Normalisation::fit(
        dataset
            .stores
            .iter()
            .filter(|s| contributors.contains(&s.store.0.as_str()))
            .map(|s| &s.train),
    )?;
    let mean_error = measured
        .mean
        .iter()
        .zip(&pooled.mean)
        .zip(&pooled.std)
        .map(|((m, p), s)| (m - p).abs() / s)
        .fold(0.0f64, f64::max);
    let std_error = measured
        .std
        .iter()
        .zip(&pooled.std)
        .map(|(m, p)| (m - p).abs() / p)
        .fold(0.0f64, f64::max);
    let target_error = match (measured.target_mean, pooled.target_mean) {
        (Some(m), Some(p)) => Some((m - p).abs()),
        _ => None,
    };
    Ok(serde_json::json!({
        "round": round,
        "stores": contributors.len(),
        "rows": status["statistics"]["result"]["count"],
        "features": measured.mean.len(),
        "max_mean_error_in_pooled_std": mean_error,
        "max_std_relative_error": std_error,
        "target_mean_abs_error": target_error,
    }))
}

fn write_initial_model(task: &TaskConfig, path: &Path, seed: u64) -> Result<()> {
    tch::manual_seed(seed as i64);
    let model = fedmesh_store_agent::train::fresh_model(
        task,
        tch::Device::Cpu,
        fedmesh_store_agent::model::Precision::F32,
    )?;
    model.weights().write(path)?;
    Ok(())
}

/// Core's config for the scenario. Core plans once four in five honest stores are online, so
/// the first round is not drawn from the few that polled first; churn and offline windows
/// take stores out of the online count, and stall planning only while more than a fifth
/// of the honest stores are away at once.
fn write_core_config(
    scenario: &Scenario,
    layout: &Layout,
    addr: std::net::SocketAddr,
    honest: usize,
) -> Result<PathBuf> {
    let r = &scenario.rounds;
    let t = &scenario.training;
    let p = &scenario.privacy;
    let c = &scenario.compression;
    let unit = if p.unit == "none" {
        "record"
    } else {
        p.unit.as_str()
    };
    let text = format!(
        r#"listen = "{addr}"
identity_dir = "{pki}"
state_dir = "{state}"
model = "{MODEL}"
task = "{task}"
initial_model = "{initial}"
min_runtime = "0.1.0"

[registry]
signing_key = "{key}"
backend = "embedded"

[rounds]
count = {count}
max_abandoned = {max_abandoned}
fraction = {fraction}
min_cohort = {min_cohort}
over_selection = {over}
region_cap = {cap}
min_online = {min_online}
online_window_s = 30
selection_timeout_s = 30
keys_s = {keys}
shares_s = {shares}
upload_s = {upload}
unmask_s = {unmask}
evaluation_s = {evaluation}
evaluators = {evaluators}
regression_threshold = {regression}
pause_s = 0

[aggregation]
mode = "{mode}"
strategy = "{strategy}"
mu = {mu}
eta = {eta}
quant_bits = {bits}
clip = {clip}
kept_fraction = {kept}
expected_dropout = 0.1

[privacy]
unit = "{unit}"
budget = {budget}
delta = {delta}

[statistics]
enabled = {statistics}
"#,
        pki = layout.pki.join("core").display(),
        state = layout.state.join("core").display(),
        task = layout.root.join("task.toml").display(),
        initial = layout.root.join("initial.safetensors").display(),
        key = layout.keys.join("registry.key").display(),
        count = r.count,
        max_abandoned = abandon_limit(r.count),
        fraction = r.fraction,
        min_cohort = r.min_cohort,
        over = r.over_selection,
        cap = r.region_cap,
        min_online = r.min_cohort.max(honest * 4 / 5),
        keys = r.keys_s,
        shares = r.shares_s,
        upload = r.upload_s,
        unmask = r.unmask_s,
        evaluation = r.evaluation_s,
        evaluators = r.evaluators,
        regression = r.regression_threshold,
        mode = t.mode,
        strategy = t.strategy,
        mu = t.mu,
        eta = t.server_lr,
        bits = c.quant_bits,
        clip = c.quant_clip,
        kept = c.kept_fraction,
        budget = if p.unit == "none" { 1e9 } else { p.epsilon },
        delta = p.delta,
        statistics = t.federated_statistics,
    );
    let path = layout.conf.join("core.toml");
    std::fs::write(&path, text)?;
    Ok(path)
}

fn write_pop_config(
    scenario: &Scenario,
    layout: &Layout,
    pop: &PopEndpoint,
    core: std::net::SocketAddr,
) -> Result<PathBuf> {
    let state = layout.state.join(format!("pop-{}", pop.name));
    let policy = std::path::absolute(scenario.data.spec.join("../../../policy/rego"))?;
    // Every PoP stands behind the front's one address: they share the stateless-reset key.
    let reset_key = layout.keys.join("anycast-reset.key");
    if !reset_key.exists() {
        use std::os::unix::fs::OpenOptionsExt;
        let hex = hex::encode(rand::random::<[u8; 32]>());
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&reset_key)?;
        std::io::Write::write_all(&mut file, hex.as_bytes())?;
    }
    let text = format!(
        r#"metro = "{metro}"
listen = "{addr}"
core = "{core}"
identity_dir = "{pki}"
state_dir = "{state}"
registry_public_key = "{registry_pub}"
stateless_reset_key_file = "{reset_key}"
plan_poll_ms = 200
ledger_refresh_ms = 1000
core_unreachable_after_ms = 10000
shutdown_grace_ms = 3000
admin_paths = ["/core", "/operator"]

[policy]
path = "{policy}"
decision_log = "{log}"

[policy.data]
stores_trust_domain = "{domain}"
min_runtime_version = "0.1.0"
min_epsilon_remaining = 0.0
"#,
        metro = pop.metro,
        addr = pop.addr,
        pki = layout.pki.join("pop").join(&pop.metro).display(),
        state = state.display(),
        policy = normalise(&policy).display(),
        log = state.join("decisions.jsonl").display(),
        domain = scenario.topology.trust_domain,
        registry_pub = layout.keys.join("registry.pub").display(),
        reset_key = reset_key.display(),
    );
    let path = layout.conf.join(format!("pop-{}.toml", pop.name));
    std::fs::write(&path, text)?;
    Ok(path)
}

/// Drops `..` segments so config paths read plainly.
fn normalise(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for part in path.components() {
        match part {
            std::path::Component::ParentDir => {
                out.pop();
            }
            other => out.push(other),
        }
    }
    out
}

fn write_store_config(
    layout: &Layout,
    store: &LabStore,
    anycast: std::net::SocketAddr,
    public_key: &Path,
    spec: &Path,
    train_max: Option<f64>,
) -> Result<()> {
    let pki = SvidPaths::in_dir(&store_pki(layout, store));
    let runtime = if store.adversary.as_deref() == Some("outdated-runtime") {
        "version = \"0.0.1\"\n"
    } else {
        ""
    };
    let text = format!(
        r#"[store]
id = "{id}"
region = "{region}"
time_zone = "America/Chicago"

[pop]
address = "{anycast}"
poll_min_ms = 100
poll_max_ms = 250
backoff_max_ms = 2000

[registry]
public_key = "{key}"

[identity]
svid = "{svid}"
key = "{svid_key}"
bundle = "{bundle}"

[data]
sales = "{sales}"
attributes = "{attributes}"
feature_spec = "{spec}"
{train_max}
[window]
hours = "00:00-24:00"

[resources]
threads = 1
memory_mib = 256
device = "cpu"

[privacy]
epsilon_budget = 8.0
delta = 1e-5

[state]
dir = "{state}"

[runtime]
{runtime}"#,
        id = store.id,
        region = store.region,
        key = public_key.display(),
        svid = pki.chain.display(),
        svid_key = pki.key.display(),
        bundle = pki.bundle.display(),
        sales = layout.data.join(&store.id).join("sales.csv").display(),
        attributes = layout.data.join("stores.csv").display(),
        spec = spec.display(),
        state = store.state_dir.display(),
        train_max = train_max
            .map(|t| format!("train_max = {t:?}\n"))
            .unwrap_or_default(),
    );
    std::fs::write(&store.config, text)?;
    Ok(())
}

fn store_groups(stores: &[LabStore], processes: usize) -> Vec<Vec<LabStore>> {
    let per = stores.len().div_ceil(processes.max(1)).max(1);
    stores.chunks(per).map(<[LabStore]>::to_vec).collect()
}

fn spawn(
    bins: &Path,
    binary: &str,
    name: &str,
    args: &[&str],
    configs: &[PathBuf],
    layout: &Layout,
) -> Result<Proc> {
    let log = layout.logs.join(format!("{name}.log"));
    let file = std::fs::File::create(&log)?;
    let mut command = Command::new(bins.join(binary));
    command.args(args);
    for config in configs {
        command.arg(config);
    }
    let line = std::iter::once(binary.to_owned())
        .chain(args.iter().map(|a| (*a).to_owned()))
        .chain(configs.iter().map(|c| c.display().to_string()))
        .collect();
    let child = command
        .env(
            "RUST_LOG",
            std::env::var("NETLAB_CHILD_LOG").unwrap_or_else(|_| "info".into()),
        )
        .stdin(Stdio::null())
        .stdout(file.try_clone()?)
        .stderr(file)
        .kill_on_drop(true)
        .process_group(0)
        .spawn()
        .with_context(|| format!("starting {}", bins.join(binary).display()))?;
    Ok(Proc {
        name: name.to_owned(),
        child,
        command: line,
        log,
    })
}

fn spawn_store_agent(
    bins: &Path,
    name: &str,
    configs: &[PathBuf],
    layout: &Layout,
) -> Result<Proc> {
    let log = layout.logs.join(format!("{name}.log"));
    // Appended to: a process started again after a kill keeps the first one's lines.
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log)?;
    let mut command = Command::new(bins.join("store-agent"));
    command.arg("run");
    for config in configs {
        command.arg("--config").arg(config);
    }
    let child = command
        .env(
            "RUST_LOG",
            std::env::var("NETLAB_CHILD_LOG").unwrap_or_else(|_| "info".into()),
        )
        .stdin(Stdio::null())
        .stdout(file.try_clone()?)
        .stderr(file)
        .kill_on_drop(true)
        .process_group(0)
        .spawn()
        .context("starting store-agent")?;
    Ok(Proc {
        name: name.to_owned(),
        child,
        command: vec![
            "store-agent run".into(),
            format!("{} stores", configs.len()),
        ],
        log,
    })
}

/// Fails the run when a process the scenario did not kill has exited.
fn check_alive(mesh: &mut Mesh) -> Result<()> {
    let dead = &mesh.dead_stores;
    let procs = mesh.core.iter_mut().chain(mesh.pops.values_mut()).chain(
        mesh.stores
            .iter_mut()
            .enumerate()
            .filter(|(i, _)| !dead.contains_key(i))
            .map(|(_, p)| p),
    );
    for proc in procs {
        if let Ok(Some(status)) = proc.child.try_wait() {
            let tail = log_tail(&proc.log, 20);
            bail!(
                "{} ({}) exited with {status}; last lines of {}:\n{tail}",
                proc.name,
                proc.command.join(" "),
                proc.log.display()
            );
        }
    }
    Ok(())
}

fn log_tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn operator_client(addr: std::net::SocketAddr, identity: &Arc<dyn SvidSource>) -> Result<Client> {
    let mut config = ClientConfig::new(addr, PeerPolicy::PathPrefix("/core".into()));
    config.quic_connect_timeout = Duration::from_millis(800);
    config.retry.max_attempts = 2;
    Ok(Client::new(config, Arc::clone(identity))?)
}

fn pop_client(addr: std::net::SocketAddr, identity: &Arc<dyn SvidSource>) -> Result<Client> {
    let mut config = ClientConfig::new(addr, PeerPolicy::PathPrefix("/pop/".into()));
    config.quic_connect_timeout = Duration::from_millis(800);
    config.retry.max_attempts = 1;
    Ok(Client::new(config, Arc::clone(identity))?)
}

async fn get_json(client: &Client, path: &str) -> Result<serde_json::Value> {
    let body = client.get(path).await?.bytes(64 << 20).await?;
    Ok(serde_json::from_slice(&body)?)
}

/// Waits until `path` answers (any status), bounded by `limit`.
async fn wait_healthy(client: &Client, path: &str, limit: Duration, mesh: &mut Mesh) -> Result<()> {
    let deadline = Instant::now() + limit;
    loop {
        let probe = client.request(
            http::Method::GET,
            path,
            http::HeaderMap::new(),
            fedmesh_transport::SendBody::empty(),
        );
        if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_secs(2), probe).await {
            return Ok(());
        }
        check_alive(mesh)?;
        if Instant::now() > deadline {
            bail!("{path} did not answer within {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until core counts every honest store online; returns when.
async fn wait_online(
    client: &Client,
    stores: usize,
    mesh: &mut Mesh,
    limit: Duration,
) -> Result<Instant> {
    let deadline = Instant::now() + limit;
    loop {
        check_alive(mesh)?;
        if let Ok(status) = get_json(client, "/v1/status").await {
            let online = status["online_stores"].as_u64().unwrap_or(0) as usize;
            if online >= stores || status["round"].is_object() || Instant::now() > deadline {
                if online < stores {
                    tracing::warn!(online, stores, "not every store came online");
                }
                return Ok(Instant::now());
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The published model's signed manifest and blob.
async fn fetch_model(client: &Client) -> (Option<serde_json::Value>, Option<Vec<u8>>) {
    let Ok(pointer) = get_json(client, &fedmesh_protocol::wire::model_current(MODEL)).await else {
        return (None, None);
    };
    let Some(version) = pointer["version"].as_u64() else {
        return (None, None);
    };
    let path =
        fedmesh_protocol::wire::model_version(MODEL, fedmesh_protocol::ids::ModelVersion(version));
    let Ok(signed) = get_json(client, &path).await else {
        return (None, None);
    };
    let blob = blob_of(client, &signed).await;
    (Some(signed), blob)
}

/// One published version's blob.
async fn fetch_version(client: &Client, version: u64) -> Option<Vec<u8>> {
    let path =
        fedmesh_protocol::wire::model_version(MODEL, fedmesh_protocol::ids::ModelVersion(version));
    let signed = get_json(client, &path).await.ok()?;
    blob_of(client, &signed).await
}

async fn blob_of(client: &Client, signed: &serde_json::Value) -> Option<Vec<u8>> {
    let manifest: serde_json::Value = signed["manifest"]
        .as_str()
        .and_then(|m| serde_json::from_str(m).ok())
        .unwrap_or_default();
    let sha = manifest["blob_sha256"].as_str()?;
    let response = client.get(&fedmesh_protocol::wire::blob(sha)).await.ok()?;
    response.bytes(256 << 20).await.ok().map(|b| b.to_vec())
}

/// Follows core's status: one progress line per ended round, and the faults.
struct Follower {
    seen: usize,
    churn_round: Option<u64>,
    churned: BTreeMap<String, String>,
    /// Stores in a WAN outage, with when their links return.
    outage: BTreeMap<String, Instant>,
    /// The honest stores' ids, which outages choose from.
    honest: Vec<String>,
    applied: BTreeSet<String>,
    rng: ChaCha8Rng,
    payload: BTreeMap<u64, u64>,
}

impl Follower {
    fn new(scenario: &Scenario) -> Self {
        Self {
            seen: 0,
            churn_round: None,
            churned: BTreeMap::new(),
            outage: BTreeMap::new(),
            honest: Vec::new(),
            applied: BTreeSet::new(),
            rng: ChaCha8Rng::seed_from_u64(scenario.seed ^ 0x0c4e_5eed),
            payload: BTreeMap::new(),
        }
    }

    /// Samples of the rounds that ended since the last call, with the ledger after them.
    async fn new_rounds(
        &mut self,
        status: &serde_json::Value,
        client: &Client,
    ) -> Vec<RoundSample> {
        let history = status["history"].as_array().cloned().unwrap_or_default();
        if history.len() <= self.seen {
            return Vec::new();
        }
        let epsilon = match get_json(client, fedmesh_protocol::wire::LEDGER).await {
            Ok(ledger) => spent(&ledger),
            Err(_) => BTreeMap::new(),
        };
        let mut out = Vec::new();
        for record in history.iter().skip(self.seen) {
            let mut sample = RoundSample::from_record(record);
            sample.payload_bytes_per_store = self.payload.get(&sample.round).copied();
            sample.epsilon = epsilon.clone();
            println!("{}", sample.progress_line());
            out.push(sample);
        }
        self.seen = history.len();
        out
    }

    /// Reads the open round's plan once, for the size of each store's upload.
    async fn learn_plan(&mut self, status: &serde_json::Value, client: &Client) {
        let Some(id) = status["round"]["id"].as_u64() else {
            return;
        };
        if self.payload.contains_key(&id) {
            return;
        }
        let Ok(value) = get_json(client, fedmesh_protocol::wire::ROUND).await else {
            return;
        };
        let Ok(announcement) =
            serde_json::from_value::<fedmesh_protocol::wire::RoundAnnouncement>(value)
        else {
            return;
        };
        let plan = announcement.plan;
        let len = u64::from(plan.kept.unwrap_or(plan.dimension));
        if let Ok(secagg) = fedmesh_protocol::secagg::SecAggPlan::new(plan) {
            let bits = u64::from(secagg.ring_bits());
            self.payload
                .insert(announcement.round.0, (len * bits).div_ceil(8));
        }
    }

    /// Applies the faults whose moment has come; returns a line per fault applied.
    async fn inject(
        &mut self,
        status: &serde_json::Value,
        mesh: &mut Mesh,
        scenario: &Scenario,
        bins: &Path,
        layout: &Layout,
        core_config: &Path,
    ) -> Result<Vec<String>> {
        let mut lines = Vec::new();
        let round = &status["round"];
        let id = round["id"].as_u64();
        let phase = phase_of(round);

        // 1. Churn: restore last round's stores (unless an outage holds them), pick this
        //    round's, cut each at its phase.
        if id != self.churn_round {
            for store in std::mem::take(&mut self.churned).keys() {
                if let Some(relay) = mesh.relays.get(store)
                    && !self.outage.contains_key(store)
                {
                    relay.set_cut(false);
                }
            }
            self.churn_round = id;
            if let (Some(churn), Some(cohort)) =
                (&scenario.faults.churn, round["cohort"].as_array())
            {
                let mut cohort: Vec<String> = cohort
                    .iter()
                    .filter_map(|s| s.as_str().map(str::to_owned))
                    .collect();
                cohort.shuffle(&mut self.rng);
                let n = (cohort.len() as f64 * churn.share).round() as usize;
                for store in cohort.into_iter().take(n) {
                    let at = if churn.phase == "any" {
                        fedmesh_netlab::scenario::PHASES[self.rng.gen_range(0..4)].to_owned()
                    } else {
                        churn.phase.clone()
                    };
                    self.churned.insert(store, at);
                }
            }
        }
        if let Some(phase) = phase {
            for (store, at) in &self.churned {
                if phase_reached(phase, at)
                    && let Some(relay) = mesh.relays.get(store)
                {
                    relay.set_cut(true);
                }
            }
        }

        // 2. PoP kills and drains. A fault is due once its round is at or past its phase or,
        //    when that round went by between two looks at core's status (short rounds on a
        //    perfect WAN), in the first later round seen at or past that phase; its line
        //    names the round and the phase it was seen in.
        let due = |round: u64, wanted: &str| {
            id.is_some_and(|id| id >= round) && phase.is_some_and(|p| phase_reached(p, wanted))
        };
        let at = id.unwrap_or_default();
        let seen = phase.unwrap_or("?");
        for fault in &scenario.faults.pops {
            let key = format!("pop {} {} {}", fault.action, fault.pop, fault.round);
            if self.applied.contains(&key) || !due(fault.round, &fault.phase) {
                continue;
            }
            self.applied.insert(key);
            let Some(proc) = mesh.pops.get_mut(&fault.pop) else {
                continue;
            };
            if fault.action == "kill" {
                if fault.after_uploads > 0
                    && let Some(client) = mesh.pop_clients.get(&fault.pop)
                {
                    let window = scenario.rounds.shares_s + scenario.rounds.upload_s;
                    let limit = Duration::from_secs(window);
                    let folded = wait_for_folds(client, fault.after_uploads, limit).await;
                    lines.push(format!(
                        "PoP {} folded {folded} update(s) before its kill",
                        fault.pop
                    ));
                }
                let _ = proc.child.start_kill();
                let _ = proc.child.wait().await;
                mesh.pops.remove(&fault.pop);
                mesh.front.set_health(&fault.pop, PopHealth::Down);
                lines.push(format!("killed PoP {} in round {at} ({seen})", fault.pop));
            } else {
                if let Some(pid) = proc.child.id() {
                    let _ = std::process::Command::new("kill")
                        .args(["-USR1", &pid.to_string()])
                        .status();
                }
                mesh.front.set_health(&fault.pop, PopHealth::Withdrawn);
                lines.push(format!("drained PoP {} in round {at} ({seen})", fault.pop));
            }
        }

        // 3. WAN outages: cut a share of the honest stores' links, and give them back when
        //    the outage ends (a store churned in the open round waits for the churn's end).
        let now = Instant::now();
        let over: Vec<String> = self
            .outage
            .iter()
            .filter(|(_, until)| now >= **until)
            .map(|(s, _)| s.clone())
            .collect();
        if !over.is_empty() {
            for store in &over {
                self.outage.remove(store);
                if let Some(relay) = mesh.relays.get(store)
                    && !self.churned.contains_key(store)
                {
                    relay.set_cut(false);
                }
            }
            lines.push(format!(
                "WAN back for {} stores in round {at} ({seen})",
                over.len()
            ));
        }
        for (i, fault) in scenario.faults.outages.iter().enumerate() {
            let key = format!("outage {i}");
            if self.applied.contains(&key) || !due(fault.round, &fault.phase) {
                continue;
            }
            self.applied.insert(key);
            let mut honest = self.honest.clone();
            honest.shuffle(&mut self.rng);
            let n = (honest.len() as f64 * fault.share).round() as usize;
            let until = now + Duration::from_secs(fault.duration_s);
            for store in honest.into_iter().take(n) {
                if let Some(relay) = mesh.relays.get(&store) {
                    relay.set_cut(true);
                }
                self.outage.insert(store, until);
            }
            lines.push(format!(
                "WAN outage for {n} stores, {} s, in round {at} ({seen})",
                fault.duration_s
            ));
        }

        // 4. Store-agent processes killed, then started again on their state.
        for (i, fault) in scenario.faults.stores.iter().enumerate() {
            let key = format!("store process {i}");
            if self.applied.contains(&key) || !due(fault.round, &fault.phase) {
                continue;
            }
            self.applied.insert(key);
            let index = fault.process - 1;
            let Some(proc) = mesh.stores.get_mut(index) else {
                continue;
            };
            let _ = proc.child.start_kill();
            let _ = proc.child.wait().await;
            let restart = now + Duration::from_secs(fault.restart_after_s);
            mesh.dead_stores.insert(index, restart);
            lines.push(format!(
                "killed store process {} ({} stores) in round {at} ({seen})",
                proc.name,
                mesh.store_configs.get(index).map_or(0, Vec::len)
            ));
        }
        let due_again: Vec<usize> = mesh
            .dead_stores
            .iter()
            .filter(|(_, at)| now >= **at)
            .map(|(i, _)| *i)
            .collect();
        for index in due_again {
            mesh.dead_stores.remove(&index);
            let name = format!("stores-{}", index + 1);
            let configs = mesh.store_configs[index].clone();
            mesh.stores[index] = spawn_store_agent(bins, &name, &configs, layout)?;
            lines.push(format!(
                "started store process {name} again in round {at} ({seen})"
            ));
        }

        // 5. Core restarts.
        for fault in &scenario.faults.core {
            let key = format!("core {}", fault.round);
            if self.applied.contains(&key) || !due(fault.round, &fault.phase) {
                continue;
            }
            self.applied.insert(key);
            if let Some(mut core) = mesh.core.take() {
                let _ = core.child.start_kill();
                let _ = core.child.wait().await;
            }
            mesh.core = Some(spawn(
                bins,
                "core-agg",
                "core-restarted",
                &["serve", "--config"],
                &[core_config.to_owned()],
                layout,
            )?);
            lines.push(format!("restarted core in round {at} ({seen})"));
        }
        Ok(lines)
    }
}

/// Epsilon spent per store from a ledger snapshot: the budget less what remains.
pub(crate) fn spent(ledger: &serde_json::Value) -> BTreeMap<String, f64> {
    let budget = ledger["budget"].as_f64().unwrap_or(0.0);
    ledger["remaining"]
        .as_object()
        .map(|m| {
            m.iter()
                .filter_map(|(store, left)| Some((store.clone(), budget - left.as_f64()?)))
                .collect()
        })
        .unwrap_or_default()
}

/// Polls a PoP's `/metrics` every 10 ms until it has folded `more` updates beyond those it
/// had at the first look, or `limit` passes; returns how many it folded meanwhile.
async fn wait_for_folds(client: &Client, more: u64, limit: Duration) -> u64 {
    async fn folded(client: &Client) -> Option<u64> {
        let body = client.get(fedmesh_protocol::wire::METRICS).await.ok()?;
        let text = String::from_utf8(body.bytes(8 << 20).await.ok()?.to_vec()).ok()?;
        text.lines()
            .find_map(|l| l.strip_prefix("fedmesh_pop_updates_folded_total "))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .map(|v| v as u64)
    }
    let until = Instant::now() + limit;
    let start = folded(client).await.unwrap_or(0);
    let mut now = start;
    while Instant::now() < until {
        now = folded(client).await.unwrap_or(now);
        if now >= start + more {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    now.saturating_sub(start)
}

/// Whether a fault bound to a round's phase is due in round `current` or later.
fn phase_faults_ahead(scenario: &Scenario, current: u64) -> bool {
    let f = &scenario.faults;
    f.pops
        .iter()
        .map(|x| x.round)
        .chain(f.core.iter().map(|x| x.round))
        .chain(f.stores.iter().map(|x| x.round))
        .chain(f.outages.iter().map(|x| x.round))
        .any(|round| round >= current)
}

/// The fault phase a status's open round is in.
fn phase_of(round: &serde_json::Value) -> Option<&'static str> {
    let core = round["phase"].as_str()?;
    let secagg = round["secagg_phase"].as_str().unwrap_or_default();
    Some(match (core, secagg) {
        ("collecting", "CollectingKeys") => "keys",
        ("collecting", "CollectingShares") => "shares",
        ("collecting", _) => "upload",
        ("selecting", _) => return None,
        _ => "unmask",
    })
}

/// Whether `now` is at or past `wanted` in the order keys, shares, upload, unmask.
fn phase_reached(now: &str, wanted: &str) -> bool {
    let index = |p: &str| {
        fedmesh_netlab::scenario::PHASES
            .iter()
            .position(|x| *x == p)
    };
    matches!((index(now), index(wanted)), (Some(a), Some(b)) if a >= b)
}
