//! `core-agg`: the Fedmesh core aggregator's command line.
//!
//! `core-agg serve --config core.toml` runs the core aggregator;
//! `core-agg privacy epsilon` and `core-agg privacy sigma` plan DP budgets,
//! `core-agg registry keygen` writes the registry's key pair,
//! `core-agg registry rollback` moves a model's current version back, and
//! `core-agg ledger status` prints a store's remaining epsilon; each prints one JSON object
//! on stdout.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use fedmesh_core_agg::ledger::{self, LedgerConfig};
use fedmesh_core_agg::registry::embedded::EmbeddedBackend;
use fedmesh_core_agg::registry::{Backend, Registry, keys};
use fedmesh_core_agg::service::{self, config::Config};
use fedmesh_core_agg::{ModelId, Timestamp};
use fedmesh_protocol::accountant::{RdpAccountant, noise_multiplier_for_epsilon};
use fedmesh_protocol::ids::{ModelVersion, StoreId};
use serde_json::json;

/// Fedmesh core aggregator.
#[derive(Parser)]
#[command(name = "core-agg", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the core aggregator: the round API for PoPs, the operator API and /metrics.
    Serve {
        /// The config file (see core-agg/core.example.toml).
        #[arg(long)]
        config: PathBuf,
    },
    /// Plan differential-privacy budgets (Poisson-subsampled Gaussian, add-or-remove-one).
    #[command(subcommand)]
    Privacy(Privacy),
    /// Operate the model registry.
    #[command(subcommand)]
    Registry(RegistryCommand),
    /// Read the privacy ledger.
    #[command(subcommand)]
    Ledger(LedgerCommand),
}

#[derive(Subcommand)]
enum LedgerCommand {
    /// Print a store's spend, remaining epsilon and flags for a model, in both units.
    Status {
        /// The ledger file core keeps.
        #[arg(long)]
        file: PathBuf,
        /// The model.
        #[arg(long)]
        model: String,
        /// The store.
        #[arg(long)]
        store: String,
        /// Record-level budget.
        #[arg(long, default_value_t = LedgerConfig::default().record_budget)]
        record_budget: f64,
        /// Store-level budget.
        #[arg(long, default_value_t = LedgerConfig::default().store_budget)]
        store_budget: f64,
        /// Time of the query, Unix seconds; now if absent.
        #[arg(long)]
        now: Option<u64>,
    },
}

#[derive(Subcommand)]
enum RegistryCommand {
    /// Write a fresh registry key pair: `DIR/registry.key` (secret seed, 64 hex digits,
    /// mode 0600; core's `registry.signing_key`) and `DIR/registry.pub` (public key, 64 hex
    /// digits; given to stores and PoPs). Refuses to overwrite either file.
    Keygen {
        /// Directory to write the two files into (created if missing).
        #[arg(long)]
        out: PathBuf,
    },
    /// Move a model's current version back to its parent, or to `--to`, after checking
    /// that version's signature and blob.
    Rollback {
        /// Registry directory (the embedded backend).
        #[arg(long, required_unless_present = "config", conflicts_with = "config")]
        root: Option<PathBuf>,
        /// Core's config instead: its registry backend, embedded or etcd.
        #[arg(long)]
        config: Option<PathBuf>,
        /// The model.
        #[arg(long)]
        model: String,
        /// The registry's secret key file (`registry.key`: the 32-byte seed in hex).
        #[arg(long)]
        key: PathBuf,
        /// Version to make current; the current version's parent if absent.
        #[arg(long)]
        to: Option<u64>,
    },
}

#[derive(Subcommand)]
enum Privacy {
    /// Print the epsilon that `steps` runs with noise `sigma` and sampling rate `q` spend.
    Epsilon {
        /// Noise multiplier: noise standard deviation over the clipping norm.
        #[arg(long)]
        sigma: f64,
        /// Sampling rate: expected batch over data size (records), or cohort over eligible
        /// stores (stores).
        #[arg(long)]
        q: f64,
        /// Number of runs of the mechanism (DP-SGD steps, or rounds).
        #[arg(long)]
        steps: u64,
        /// Target delta.
        #[arg(long, default_value_t = 1e-5)]
        delta: f64,
    },
    /// Print the smallest noise multiplier that keeps `steps` runs within `epsilon`.
    Sigma {
        /// Epsilon budget to meet.
        #[arg(long)]
        epsilon: f64,
        /// Sampling rate.
        #[arg(long)]
        q: f64,
        /// Number of runs of the mechanism.
        #[arg(long)]
        steps: u64,
        /// Target delta.
        #[arg(long, default_value_t = 1e-5)]
        delta: f64,
    },
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let report = match cli.command {
        Command::Serve { config } => return serve(&config),
        Command::Privacy(privacy) => privacy_report(privacy)?,
        Command::Registry(RegistryCommand::Keygen { out }) => {
            let (secret, public) = keys::generate(&out)?;
            let key = keys::read_verifying_key(&public)?;
            json!({
                "secret_key": secret, "public_key": public,
                "public_key_hex": hex::encode(key.to_bytes()),
            })
        }
        Command::Registry(RegistryCommand::Rollback {
            root,
            config,
            model,
            key,
            to,
        }) => {
            let key = keys::read_signing_key(&key)?;
            let backend: Box<dyn Backend + Send> = match (root, config) {
                (Some(root), _) => Box::new(EmbeddedBackend::open(&root)?),
                (None, Some(config)) => {
                    fedmesh_core_agg::service::open_backend(&Config::load(&config)?)?
                }
                (None, None) => bail!("give --root or --config"),
            };
            let registry = Registry::new(backend, key);
            let model = ModelId(model);
            let current = registry.rollback(&model, to.map(ModelVersion))?;
            json!({ "model": model, "current": current })
        }
        Command::Ledger(LedgerCommand::Status {
            file,
            model,
            store,
            record_budget,
            store_budget,
            now,
        }) => {
            let config = LedgerConfig {
                record_budget,
                store_budget,
                ..LedgerConfig::default()
            };
            let ledger = ledger::load(&file, config)?;
            let now = match now {
                Some(secs) => secs,
                None => std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .context("clock before 1970")?
                    .as_secs(),
            };
            let status = ledger.status(&ModelId(model), &StoreId(store), Timestamp(now));
            json!({ "status": status, "excluded": status.excluded() })
        }
    };
    println!("{report}");
    Ok(())
}

fn serve(path: &std::path::Path) -> Result<()> {
    let config = Config::load(path)?;
    let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    runtime.block_on(async move {
        let running = service::start(config).await?;
        running.wait().await;
        anyhow::Ok(())
    })
}

fn privacy_report(command: Privacy) -> Result<serde_json::Value> {
    match command {
        Privacy::Epsilon {
            sigma,
            q,
            steps,
            delta,
        } => {
            let mut accountant = RdpAccountant::new();
            accountant
                .compose_poisson_gaussian(q, sigma, steps)
                .context("invalid mechanism")?;
            let guarantee = accountant.guarantee(delta).context("invalid delta")?;
            // JSON has no infinity: an unbounded loss is written as null.
            let epsilon = guarantee.epsilon.is_finite().then_some(guarantee.epsilon);
            Ok(json!({
                "sigma": sigma, "q": q, "steps": steps, "delta": delta,
                "epsilon": epsilon, "order": guarantee.order,
            }))
        }
        Privacy::Sigma {
            epsilon,
            q,
            steps,
            delta,
        } => {
            let sigma = noise_multiplier_for_epsilon(epsilon, q, steps, delta)
                .context("cannot find a noise multiplier")?;
            let mut accountant = RdpAccountant::new();
            accountant.compose_poisson_gaussian(q, sigma, steps)?;
            Ok(json!({
                "epsilon": epsilon, "q": q, "steps": steps, "delta": delta,
                "sigma": sigma, "epsilon_at_sigma": accountant.epsilon(delta)?,
            }))
        }
    }
}
