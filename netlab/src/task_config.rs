//! `netlab task-config`: writes the task config for the Dominick's forecasting task, with the
//! normalisation statistics computed from the pooled training rows of every store.
//!
//! Only the lab holds every store's rows; a real chain computes the same statistics from a
//! sample it may pool, and ships them in the plan so that all stores map features alike.

use anyhow::{Context, Result};
use fedmesh_store_agent::ingest::{self, DataFiles};
use fedmesh_store_agent::spec::FeatureSpec;
use fedmesh_store_agent::task::{
    Activation, DeviceChoice, ModelSpec, Normalisation, Objective, Optimiser, TaskConfig,
    TrainingConfig,
};

use crate::TaskConfigArgs;

/// Builds the task config TOML.
pub(crate) fn run(args: &TaskConfigArgs) -> Result<String> {
    let spec = match &args.spec {
        Some(path) => FeatureSpec::from_path(path)?,
        None => FeatureSpec::from_toml_str(crate::baseline::DOMINICKS_SPEC)?,
    };
    let dir = crate::baseline::data_dir(&args.data);
    let dataset = ingest::load_all(&spec, &DataFiles::in_dir(&dir))
        .with_context(|| format!("loading {}", dir.display()))?;
    let normalisation = Normalisation::fit(dataset.stores.iter().map(|s| &s.train))?;

    let config = TaskConfig {
        model: ModelSpec::Mlp {
            inputs: spec.feature_count(),
            hidden: vec![64, 32],
            outputs: 1,
            activation: Activation::Relu,
            objective: Objective::Regression,
            local: if args.local_head {
                vec!["head".into()]
            } else {
                Vec::new()
            },
        },
        training: TrainingConfig {
            epochs: args.epochs,
            batch_size: 64,
            optimiser: Optimiser::Adam,
            learning_rate: 1e-3,
            momentum: 0.0,
            fedprox_mu: 0.0,
            seed: 1,
            threads: 1,
            device: DeviceChoice::Auto,
            dp: None,
        },
        normalisation: Some(normalisation),
    };
    Ok(toml::to_string(&config)?)
}
