//! The Dominick's training recipes and `netlab task-config`, which writes a recipe's task
//! config with the normalisation statistics computed from the pooled training rows of every
//! store.
//!
//! A recipe has two halves: what the plan's task config tells each store (epochs, learning
//! rate, FedProx mu, the personalised head, DP-SGD) and what core runs (rounds, fraction,
//! strategy, update clip, quantisation). `netlab simulate` searched both; the winners are the
//! constants here, with and without record-level DP. Only the lab holds every store's rows;
//! a real chain computes the same statistics from a sample it may pool, and ships them in the
//! plan so that all stores map features alike.

use std::path::PathBuf;

use anyhow::{Context, Result};
use fedmesh_store_agent::ingest::{self, DataFiles, Dataset};
use fedmesh_store_agent::spec::FeatureSpec;
use fedmesh_store_agent::task::{
    Activation, DeviceChoice, DpConfig, ModelSpec, Normalisation, Objective, Optimiser, TaskConfig,
    TrainingConfig,
};
use serde::Serialize;

/// Options of `netlab task-config`.
#[derive(Debug, clap::Args)]
pub(crate) struct TaskConfigArgs {
    /// Directory holding sales.csv.gz and stores.csv.
    #[arg(long, default_value = "data/dominicks-oj")]
    pub data: PathBuf,
    /// Feature spec (TOML); the built-in Dominick's recipe when absent.
    #[arg(long)]
    pub spec: Option<PathBuf>,
    /// Write the record-level DP recipe (DP-SGD) instead of the one without DP.
    #[arg(long)]
    pub dp: bool,
    /// Local epochs per round, overriding the recipe's.
    #[arg(long)]
    pub epochs: Option<usize>,
}

/// Local training as the plan's task config carries it.
#[derive(Debug, Clone, Copy, Serialize)]
pub(crate) struct LocalRecipe {
    /// Passes over the store's rows per round.
    pub epochs: usize,
    /// Rows per batch without DP.
    pub batch_size: usize,
    /// The store's optimiser.
    pub optimiser: Optimiser,
    /// Its learning rate.
    pub learning_rate: f64,
    /// FedProx proximal weight.
    pub fedprox_mu: f64,
    /// Whether the output layer stays in the store (a personalised head).
    pub local_head: bool,
    /// DP-SGD, when the recipe protects records.
    pub dp: Option<DpRecipe>,
}

/// DP-SGD settings of a recipe.
#[derive(Debug, Clone, Copy, Serialize)]
pub(crate) struct DpRecipe {
    /// Per-example gradient clip norm.
    pub clip_norm: f64,
    /// Noise standard deviation over the clip norm.
    pub noise_multiplier: f64,
    /// Expected Poisson batch size.
    pub expected_batch_size: usize,
}

/// What core runs: the rounds, the cohort and the aggregation.
#[derive(Debug, Clone, Copy, Serialize)]
pub(crate) struct CoreRecipe {
    /// Rounds.
    pub rounds: usize,
    /// Share of stores the cohort targets per round, before over-selection.
    pub fraction: f64,
    /// The server optimiser turning the average update into the next model.
    pub server_opt: ServerOpt,
    /// Server learning rate of FedAdam and FedYogi (FedAvg steps by the average itself).
    pub server_lr: f64,
    /// L2 norm each store's shared update is clipped to.
    pub update_clip: f32,
    /// Per-coordinate bound of the secure-aggregation quantiser.
    pub quant_clip: f32,
    /// Quantisation bits per coordinate.
    pub quant_bits: u32,
    /// Share of the shared coordinates random-k sends each round (1 sends all).
    pub kept_fraction: f64,
}

/// A whole recipe.
#[derive(Debug, Clone, Copy, Serialize)]
pub(crate) struct Recipe {
    /// The stores' half.
    pub local: LocalRecipe,
    /// Core's half.
    pub core: CoreRecipe,
}

/// The server optimiser.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub(crate) enum ServerOpt {
    /// The average update applied as it is (FedAvg; FedProx when mu > 0).
    Fedavg,
    /// FedAdam on the average update.
    Fedadam,
    /// FedYogi on the average update.
    Fedyogi,
}

/// The recipe without DP, as `netlab simulate` chose it (pooled test RMSE 0.573 at seed 1 and
/// 0.576 at seed 2, against 0.579 for the pooled MLP with a store one-hot): Adam at 3e-3 with
/// FedProx's proximal term, a personalised head, FedAdam at core, half the stores a round for
/// 60 rounds, 8-bit quantisation of 18% of the coordinates (random-k).
pub(crate) const NO_DP: Recipe = Recipe {
    local: LocalRecipe {
        epochs: 1,
        batch_size: 64,
        optimiser: Optimiser::Adam,
        learning_rate: 3e-3,
        fedprox_mu: 0.01,
        local_head: true,
        dp: None,
    },
    core: CoreRecipe {
        rounds: 60,
        fraction: 0.5,
        server_opt: ServerOpt::Fedadam,
        server_lr: 0.03,
        update_clip: 10.0,
        quant_clip: 0.1,
        quant_bits: 8,
        kept_fraction: 0.18,
    },
};

/// The recipe with record-level DP: epsilon at most 8 per store at delta 1e-5 (simulated
/// 0.625, max epsilon 7.997). A budget caps how often a store may train, so a tenth of the
/// stores fewer per round and 40 rounds do better here than the no-DP cohort.
pub(crate) const DP: Recipe = Recipe {
    local: LocalRecipe {
        dp: Some(DpRecipe {
            clip_norm: 1.0,
            noise_multiplier: 1.0,
            expected_batch_size: 64,
        }),
        ..NO_DP.local
    },
    core: CoreRecipe {
        rounds: 40,
        fraction: 0.3,
        ..NO_DP.core
    },
};

/// The record-level epsilon budget per store the DP recipe is sized for.
pub(crate) const EPSILON_BUDGET: f64 = 8.0;

/// The delta the budget is stated at.
pub(crate) const DELTA: f64 = 1e-5;

/// Loads the Dominick's stores with the given or built-in feature spec.
pub(crate) fn load_dominicks(
    data: &std::path::Path,
    spec: Option<&std::path::Path>,
) -> Result<(FeatureSpec, Dataset)> {
    let spec = match spec {
        Some(path) => FeatureSpec::from_path(path)?,
        None => FeatureSpec::from_toml_str(crate::baseline::DOMINICKS_SPEC)?,
    };
    let dir = crate::baseline::data_dir(data);
    let dataset = ingest::load_all(&spec, &DataFiles::in_dir(&dir))
        .with_context(|| format!("loading {}", dir.display()))?;
    Ok((spec, dataset))
}

/// The task config of `local` for a model with `inputs` features.
pub(crate) fn task_config(
    inputs: usize,
    local: &LocalRecipe,
    normalisation: Normalisation,
    seed: u64,
) -> TaskConfig {
    let dp = local.dp.map(|dp| DpConfig {
        clip_norm: dp.clip_norm,
        noise_multiplier: dp.noise_multiplier,
        expected_batch_size: dp.expected_batch_size,
        noise_seed: None,
    });
    TaskConfig {
        model: ModelSpec::Mlp {
            inputs,
            hidden: vec![64, 32],
            outputs: 1,
            activation: Activation::Relu,
            objective: Objective::Regression,
            local: if local.local_head {
                vec!["head".into()]
            } else {
                Vec::new()
            },
        },
        training: TrainingConfig {
            epochs: local.epochs,
            batch_size: local.batch_size,
            optimiser: local.optimiser,
            learning_rate: local.learning_rate,
            momentum: 0.0,
            fedprox_mu: local.fedprox_mu,
            seed,
            threads: 1,
            device: DeviceChoice::Auto,
            dp,
        },
        normalisation: Some(normalisation),
    }
}

/// Builds the task config TOML.
pub(crate) fn run(args: &TaskConfigArgs) -> Result<String> {
    let (spec, dataset) = load_dominicks(&args.data, args.spec.as_deref())?;
    let normalisation = Normalisation::fit(dataset.stores.iter().map(|s| &s.train))?;
    let mut local = if args.dp { DP.local } else { NO_DP.local };
    if let Some(epochs) = args.epochs {
        local.epochs = epochs;
    }
    let config = task_config(spec.feature_count(), &local, normalisation, 1);
    Ok(toml::to_string(&config)?)
}
