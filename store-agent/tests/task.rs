//! Task configs as a plan carries them.

use fedmesh_store_agent::Examples;
use fedmesh_store_agent::task::{ModelSpec, Normalisation, Optimiser, TaskConfig, TaskError};

const TASK: &str = r#"
[model]
kind = "mlp"
inputs = 2
hidden = [4]
outputs = 1
objective = "regression"
local = ["head"]

[training]
epochs = 12
batch_size = 64
optimiser = "sgd"
learning_rate = 0.1
momentum = 0.9
fedprox_mu = 0.01
seed = 3

[training.dp]
clip_norm = 1.0
noise_multiplier = 1.0
expected_batch_size = 64

[normalisation]
mean = [1.0, -2.0]
std = [2.0, 0.5]
"#;

#[test]
fn parses_a_full_task_config() {
    let task = TaskConfig::from_toml_str(TASK).unwrap();
    assert!(
        matches!(task.model, ModelSpec::Mlp { inputs: 2, ref local, .. } if local == &["head"])
    );
    assert_eq!(task.training.optimiser, Optimiser::Sgd);
    assert_eq!(
        task.training.threads, 1,
        "one libtorch thread unless the plan says otherwise"
    );
    let dp = task.training.dp.unwrap();
    assert_eq!((dp.expected_batch_size, dp.noise_seed), (64, None));
}

#[test]
fn rejects_out_of_range_fields_by_name() {
    let bad = TASK.replace("batch_size = 64", "batch_size = 0");
    let err = TaskConfig::from_toml_str(&bad).unwrap_err();
    assert!(err.to_string().contains("training.batch_size"), "{err}");
    let bad = TASK.replace("std = [2.0, 0.5]", "std = [2.0, 0.0]");
    assert!(matches!(
        TaskConfig::from_toml_str(&bad),
        Err(TaskError::BadStd { index: 1, .. })
    ));
}

#[test]
fn normalisation_uses_the_configs_statistics_not_the_stores() {
    // (x - mean) / std with mean [1, -2] and std [2, 0.5]: (3, -1) -> (1, 2).
    let norm = TaskConfig::from_toml_str(TASK)
        .unwrap()
        .normalisation
        .unwrap();
    let rows = Examples {
        dim: 2,
        features: vec![3.0, -1.0],
        targets: vec![0.0],
    };
    assert_eq!(rows.normalised(&norm).unwrap().features, vec![1.0, 2.0]);
}

#[test]
fn fitted_normalisation_is_the_pooled_mean_and_population_std() {
    // Pooled column 0: 1, 3, 5, 7 -> mean 4, variance (9 + 1 + 1 + 9) / 4 = 5. Column 1 is
    // constant, so its std is taken as 1.
    let a = Examples {
        dim: 2,
        features: vec![1.0, 2.0, 3.0, 2.0],
        targets: vec![0.0; 2],
    };
    let b = Examples {
        dim: 2,
        features: vec![5.0, 2.0, 7.0, 2.0],
        targets: vec![0.0; 2],
    };
    let norm = Normalisation::fit([&a, &b]).unwrap();
    assert_eq!(norm.mean, vec![4.0, 2.0]);
    assert!((norm.std[0] - 5f64.sqrt()).abs() < 1e-12);
    assert_eq!(norm.std[1], 1.0);
}

#[test]
fn a_fresh_regression_model_starts_at_the_pooled_target_mean() {
    // Targets 8, 10 and 12, pooled over two stores: mean 10.
    let a = Examples {
        dim: 2,
        features: vec![0.0; 4],
        targets: vec![8.0, 10.0],
    };
    let b = Examples {
        dim: 2,
        features: vec![0.0; 2],
        targets: vec![12.0],
    };
    let norm = Normalisation::fit([&a, &b]).unwrap();
    assert_eq!(norm.target_mean, Some(10.0));

    let mut task = TaskConfig::from_toml_str(TASK).unwrap();
    task.normalisation = Some(norm);
    let model = fedmesh_store_agent::train::fresh_model(
        &task,
        tch::Device::Cpu,
        fedmesh_store_agent::model::Precision::F32,
    )
    .unwrap();
    let bias = model.weights().get("head.bias").unwrap().values.clone();
    assert_eq!(bias, vec![10.0]);

    // Written into the task and read back, a value that is not a number is refused by name.
    let text = TASK.replace("std = [2.0, 0.5]", "std = [2.0, 0.5]\ntarget_mean = nan");
    let err = TaskConfig::from_toml_str(&text).unwrap_err();
    assert!(err.to_string().contains("target_mean"), "{err}");
}
