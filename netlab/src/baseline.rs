//! The reference models on the Dominick's data: what federated training must beat.
//!
//! Every model sees the same split and the same pooled training normalisation:
//! - `mean`: predict the training mean of the target;
//! - `pooled_ridge`: one ridge regression on all stores' training rows;
//! - `pooled_mlp`: MLP 47-64-32-1, Adam 1e-3, batch 256, 20 epochs, on all stores;
//! - `pooled_mlp_store_onehot`: the same with a one-hot of the store appended;
//! - `local`: one ridge regression per store on its own rows only.
//!
//! Each figure is the test RMSE over all stores' test rows together.

use std::path::Path;

use anyhow::{Context, Result};
use fedmesh_store_agent::eval::{self, Metrics};
use fedmesh_store_agent::ingest::{self, DataFiles};
use fedmesh_store_agent::spec::FeatureSpec;
use fedmesh_store_agent::task::{
    Activation, DeviceChoice, ModelSpec, Normalisation, Objective, Optimiser, TrainingConfig,
};
use fedmesh_store_agent::{Examples, model, train};
use serde::Serialize;

use crate::BaselineArgs;
use crate::ridge::Ridge;

/// The Dominick's recipe, built in so the command needs only the data.
pub(crate) const DOMINICKS_SPEC: &str = include_str!("../../store-agent/specs/dominicks-oj.toml");

/// Ridge penalty for the linear baselines, on standardised features.
const RIDGE_ALPHA: f64 = 1.0;

/// Test RMSE of each reference model.
#[derive(Debug, Serialize)]
pub(crate) struct BaselineReport {
    mean: f64,
    pooled_ridge: f64,
    pooled_mlp: f64,
    pooled_mlp_store_onehot: f64,
    local: f64,
}

/// Loads the data, trains every reference model and returns their test RMSE.
pub(crate) fn run(args: &BaselineArgs) -> Result<BaselineReport> {
    let spec = match &args.spec {
        Some(path) => FeatureSpec::from_path(path)?,
        None => FeatureSpec::from_toml_str(DOMINICKS_SPEC)?,
    };
    let dir = data_dir(&args.data);
    let dataset = ingest::load_all(&spec, &DataFiles::in_dir(&dir))
        .with_context(|| format!("loading {}", dir.display()))?;
    tracing::info!(
        stores = dataset.stores.len(),
        features = dataset.feature_names.len(),
        "data loaded"
    );

    // 1. Pool and standardise with the pooled training statistics.
    let norm = Normalisation::fit(dataset.stores.iter().map(|s| &s.train))?;
    let stores: Vec<(Examples, Examples)> = dataset
        .stores
        .iter()
        .map(|s| Ok((s.train.normalised(&norm)?, s.test.normalised(&norm)?)))
        .collect::<Result<_>>()?;
    let dim = dataset.feature_names.len();
    let (train, test) = pooled(&stores, dim, None);

    // 2. The training mean.
    let mean = train.targets.iter().map(|&y| f64::from(y)).sum::<f64>() / train.len() as f64;
    let mean_rmse = eval::rmse(&vec![mean as f32; test.len()], &test.targets);

    // 3. Linear models, pooled and per store.
    let pooled_ridge = Ridge::fit(&train.features, dim, &train.targets, RIDGE_ALPHA);
    let pooled_ridge_rmse = eval::rmse(&pooled_ridge.predict(&test.features), &test.targets);
    let (mut predictions, mut targets) = (Vec::new(), Vec::new());
    for (store_train, store_test) in &stores {
        let local = Ridge::fit(
            &store_train.features,
            dim,
            &store_train.targets,
            RIDGE_ALPHA,
        );
        predictions.extend(local.predict(&store_test.features));
        targets.extend_from_slice(&store_test.targets);
    }
    let local_rmse = eval::rmse(&predictions, &targets);
    tracing::info!(
        mean = mean_rmse,
        pooled_ridge = pooled_ridge_rmse,
        local = local_rmse,
        "linear baselines"
    );

    // 4. The MLPs, without and with the store one-hot.
    let pooled_mlp = mlp_rmse(args, &train, &test)?;
    tracing::info!(pooled_mlp, "pooled mlp");
    let (train_onehot, test_onehot) = pooled(&stores, dim, Some(stores.len()));
    let pooled_mlp_store_onehot = mlp_rmse(args, &train_onehot, &test_onehot)?;
    tracing::info!(pooled_mlp_store_onehot, "pooled mlp with store one-hot");

    Ok(BaselineReport {
        mean: round(mean_rmse),
        pooled_ridge: round(pooled_ridge_rmse),
        pooled_mlp: round(pooled_mlp),
        pooled_mlp_store_onehot: round(pooled_mlp_store_onehot),
        local: round(local_rmse),
    })
}

/// The data directory as given, or, for the default relative path, the repository's copy when
/// the command runs from elsewhere.
pub(crate) fn data_dir(given: &Path) -> std::path::PathBuf {
    if given.exists() || given.is_absolute() {
        return given.to_path_buf();
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(given)
}

/// All stores' rows in one training and one test set; with `one_hot = Some(stores)`, each row
/// gets a one-hot of its store's position appended.
fn pooled(
    stores: &[(Examples, Examples)],
    dim: usize,
    one_hot: Option<usize>,
) -> (Examples, Examples) {
    let width = dim + one_hot.unwrap_or(0);
    let (mut train, mut test) = (Examples::empty(width), Examples::empty(width));
    for (index, (store_train, store_test)) in stores.iter().enumerate() {
        for (from, to) in [(store_train, &mut train), (store_test, &mut test)] {
            for i in 0..from.len() {
                to.features.extend_from_slice(from.row(i));
                if let Some(count) = one_hot {
                    to.features
                        .extend((0..count).map(|s| if s == index { 1.0f32 } else { 0.0 }));
                }
            }
            to.targets.extend_from_slice(&from.targets);
        }
    }
    (train, test)
}

/// Test RMSE of the 47-64-32-1 recipe (or wider input) trained on `train`.
fn mlp_rmse(args: &BaselineArgs, train: &Examples, test: &Examples) -> Result<f64> {
    let spec = ModelSpec::Mlp {
        inputs: train.dim,
        hidden: vec![64, 32],
        outputs: 1,
        activation: Activation::Relu,
        objective: Objective::Regression,
        local: Vec::new(),
    };
    let config = TrainingConfig {
        epochs: args.epochs,
        batch_size: 256,
        optimiser: Optimiser::Adam,
        learning_rate: 1e-3,
        momentum: 0.0,
        fedprox_mu: 0.0,
        seed: args.seed,
        threads: args.threads,
        device: DeviceChoice::Auto,
        dp: None,
    };
    train::configure_threads(config.threads);
    tch::manual_seed(config.seed as i64);
    let (device, precision) = model::pick_device(config.device)?;
    let mut mlp = model::Model::new(&spec, device, precision)?;
    train::train(&mut mlp, &config, train, None)?;
    match eval::evaluate(&mlp, test) {
        Metrics::Regression { rmse, .. } => Ok(rmse),
        Metrics::Classification { .. } => {
            anyhow::bail!("a regression model reported class metrics")
        }
    }
}

fn round(value: f64) -> f64 {
    (value * 1e4).round() / 1e4
}
