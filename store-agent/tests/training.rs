//! Local training: DP-SGD per-example clipping, repeatability, FedProx, local parameters and
//! the weights that leave the store.

use fedmesh_store_agent::dp;
use fedmesh_store_agent::model::{Model, Precision};
use fedmesh_store_agent::task::{
    Activation, DeviceChoice, DpConfig, ModelSpec, Objective, Optimiser, TaskConfig, TrainingConfig,
};
use fedmesh_store_agent::train;
use fedmesh_store_agent::weights::Weights;
use fedmesh_store_agent::{Examples, StoreId, ingest::StoreData};
use rand::{Rng, SeedableRng};
use tch::{Device, Kind, Tensor};

fn mlp(inputs: usize, outputs: usize, objective: Objective, local: &[&str]) -> ModelSpec {
    ModelSpec::Mlp {
        inputs,
        hidden: vec![8, 4],
        outputs,
        activation: Activation::Relu,
        objective,
        local: local.iter().map(|s| s.to_string()).collect(),
    }
}

fn config(seed: u64) -> TrainingConfig {
    TrainingConfig {
        epochs: 3,
        batch_size: 32,
        optimiser: Optimiser::Adam,
        learning_rate: 0.01,
        momentum: 0.0,
        fedprox_mu: 0.0,
        seed,
        threads: 1,
        device: DeviceChoice::Cpu,
        dp: None,
    }
}

/// `n` rows of 5 features with a noisy linear target (regression), seeded.
fn synthetic(n: usize, seed: u64) -> Examples {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut data = Examples::empty(5);
    for _ in 0..n {
        let row: Vec<f32> = (0..5).map(|_| rng.gen_range(-1.0..1.0)).collect();
        let y = 2.0 * row[0] - row[1] + 0.5 * row[2] * row[3] + rng.gen_range(-0.1..0.1);
        data.features.extend(row);
        data.targets.push(y);
    }
    data
}

fn model(spec: &ModelSpec, seed: i64) -> Model {
    tch::manual_seed(seed);
    Model::new(spec, Device::Cpu, Precision::F32).unwrap()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

#[test]
fn fast_per_example_gradients_match_one_example_at_a_time() {
    let data = synthetic(24, 1);
    let x = Tensor::from_slice(&data.features).reshape([24, 5]);
    for (spec, y) in [
        (
            mlp(5, 1, Objective::Regression, &[]),
            Tensor::from_slice(&data.targets).reshape([24, 1]),
        ),
        (
            mlp(5, 3, Objective::Classification, &[]),
            Tensor::arange(24, (Kind::Int64, Device::Cpu)).remainder(3),
        ),
    ] {
        let net = model(&spec, 5);
        let fast = dp::per_example_gradients(&net, &x, &y).unwrap();
        let looped = dp::per_example_gradients_looped(&net, &x, &y).unwrap();
        assert_eq!(fast.len(), net.parameters().len());
        for ((f, l), p) in fast.iter().zip(&looped).zip(net.parameters()) {
            assert_eq!(f.size(), l.size(), "{}", p.name);
            assert!(
                max_abs_diff(f, l) < 1e-5,
                "{}: {}",
                p.name,
                max_abs_diff(f, l)
            );
        }
    }
}

#[test]
fn every_per_example_gradient_is_clipped_to_the_norm() {
    let data = synthetic(32, 2);
    let x = Tensor::from_slice(&data.features).reshape([32, 5]);
    let y = Tensor::from_slice(&data.targets).reshape([32, 1]) * 10.0;
    let net = model(&mlp(5, 1, Objective::Regression, &[]), 6);
    let grads = dp::per_example_gradients_looped(&net, &x, &y).unwrap();
    let norms = Vec::<f64>::try_from(&dp::per_example_norms(&grads).to_kind(Kind::Double)).unwrap();

    // A clip norm at the median norm: half the examples must shrink, the rest stay as they are.
    let mut sorted = norms.clone();
    sorted.sort_by(f64::total_cmp);
    let clip = sorted[16];
    let clipped = dp::clip_per_example(&dp::per_example_gradients(&net, &x, &y).unwrap(), clip);
    let clipped_norms =
        Vec::<f64>::try_from(&dp::per_example_norms(&clipped).to_kind(Kind::Double)).unwrap();
    for (i, (before, after)) in norms.iter().zip(&clipped_norms).enumerate() {
        assert!(
            *after <= clip * (1.0 + 1e-5),
            "example {i}: norm {after} > {clip}"
        );
        if *before < clip {
            assert!(
                (after - before).abs() < 1e-4 * before.max(1.0),
                "example {i} changed"
            );
        }
    }

    // The clipped sum the optimiser sees is the sum of these clipped gradients.
    let summed = dp::clipped_sum(&grads, clip);
    for (s, c) in summed.iter().zip(&clipped) {
        assert!(max_abs_diff(s, &c.sum_dim_intlist(0, false, Kind::Float)) < 1e-4);
    }
}

fn trained_weights(seed: u64, dp: Option<DpConfig>) -> Weights {
    let data = synthetic(200, 3);
    let mut config = config(seed);
    config.dp = dp;
    let mut net = model(&mlp(5, 1, Objective::Regression, &[]), seed as i64);
    train::train(&mut net, &config, &data, None).unwrap();
    net.weights()
}

#[test]
fn identical_seeds_train_identical_weights() {
    assert_eq!(trained_weights(11, None), trained_weights(11, None));
    assert_ne!(trained_weights(11, None), trained_weights(12, None));

    let dp = |seed| DpConfig {
        clip_norm: 1.0,
        noise_multiplier: 1.0,
        expected_batch_size: 20,
        noise_seed: Some(seed),
    };
    assert_eq!(
        trained_weights(11, Some(dp(5))),
        trained_weights(11, Some(dp(5)))
    );
    assert_ne!(
        trained_weights(11, Some(dp(5))),
        trained_weights(11, Some(dp(6)))
    );
}

#[test]
fn dp_sgd_reports_what_the_accountant_needs() {
    // The reference run: about 1,070 rows, expected batch 64, 12 epochs of 1070 / 64 = 16
    // steps = 192 steps (epsilon about 6.3 at delta 1e-5 with noise multiplier 1).
    let data = synthetic(1070, 4);
    let mut config = config(1);
    config.epochs = 12;
    config.dp = Some(DpConfig {
        clip_norm: 1.0,
        noise_multiplier: 1.0,
        expected_batch_size: 64,
        noise_seed: None,
    });
    let mut net = model(&mlp(5, 1, Objective::Regression, &[]), 1);
    let report = train::train(&mut net, &config, &data, None).unwrap();
    let dp = report.dp.unwrap();
    assert_eq!((report.examples, report.steps, dp.steps), (1070, 192, 192));
    assert!((dp.sampling_rate - 64.0 / 1070.0).abs() < 1e-12);
    assert_eq!((dp.noise_multiplier, dp.clip_norm), (1.0, 1.0));
}

fn distance(a: &Weights, b: &Weights) -> f64 {
    a.delta(b)
        .unwrap()
        .flatten()
        .iter()
        .map(|v| f64::from(*v).powi(2))
        .sum::<f64>()
        .sqrt()
}

#[test]
fn fedprox_with_huge_mu_keeps_weights_near_global() {
    let data = synthetic(200, 5);
    let spec = mlp(5, 1, Objective::Regression, &[]);
    let global = model(&spec, 9).weights();
    let run = |mu: f64| {
        let mut config = config(2);
        (config.optimiser, config.learning_rate, config.fedprox_mu) = (Optimiser::Sgd, 1e-3, mu);
        let mut net = model(&spec, 9);
        net.load(&global).unwrap();
        train::train(&mut net, &config, &data, Some(&global)).unwrap();
        distance(&net.weights(), &global)
    };
    // With lr * mu = 1 each step lands back on the global weights plus one gradient step, so
    // the drift stays about one step long, against 21 accumulated steps without the term.
    let (plain, prox) = (run(0.0), run(1000.0));
    assert!(plain > 0.0);
    assert!(
        prox < 0.2 * plain,
        "drift with mu {prox} vs without {plain}"
    );
}

#[test]
fn local_parameters_never_appear_in_the_update() {
    let spec = mlp(5, 1, Objective::Regression, &["head"]);
    let global = model(&spec, 1).shared_weights();
    let names: Vec<&str> = global.names().collect();
    assert_eq!(
        names,
        [
            "hidden.0.weight",
            "hidden.0.bias",
            "hidden.1.weight",
            "hidden.1.bias"
        ]
    );

    let task = TaskConfig {
        model: spec,
        training: config(1),
        normalisation: None,
    };
    let data = StoreData {
        store: StoreId("7".into()),
        train: synthetic(100, 6),
        test: synthetic(20, 7),
    };
    let outcome = train::run_round(&task, &data, &global, None).unwrap();
    assert!(outcome.delta.names().all(|n| !n.starts_with("head")));
    assert_eq!(outcome.delta.numel(), 5 * 8 + 8 + 8 * 4 + 4);
    let bytes = outcome.delta.to_safetensors().unwrap();
    assert!(
        !bytes.windows(4).any(|w| w == b"head"),
        "the head's name is not in the bytes"
    );

    // The checkpoint keeps the trained head, and the next round starts from it.
    let head = outcome.checkpoint.get("head.weight").unwrap().clone();
    let next = train::build_model(&task, &global, Some(&outcome.checkpoint)).unwrap();
    assert_eq!(next.weights().get("head.weight"), Some(&head));
}

/// A global model written whole (the launcher's initial model, an operator's export) carries
/// a head too: the store trains from its shared part only and keeps its own head.
#[test]
fn a_global_model_carrying_the_head_never_replaces_the_stores_own() {
    let spec = mlp(5, 1, Objective::Regression, &["head"]);
    // Sorted by name, as a registry blob lists them: bias before weight, head first.
    let mut whole = model(&spec, 1).weights();
    whole.tensors.sort_by(|a, b| a.name.cmp(&b.name));
    assert_eq!(
        whole.tensors.len(),
        6,
        "hidden.0, hidden.1 and head, weight and bias"
    );
    let task = TaskConfig {
        model: spec,
        training: config(1),
        normalisation: None,
    };
    let data = StoreData {
        store: StoreId("7".into()),
        train: synthetic(100, 6),
        test: synthetic(20, 7),
    };

    let outcome = train::run_round(&task, &data, &whole, None).unwrap();
    let names: Vec<&str> = outcome.delta.names().collect();
    assert_eq!(
        names,
        [
            "hidden.0.weight",
            "hidden.0.bias",
            "hidden.1.weight",
            "hidden.1.bias"
        ],
        "the update is in model order, shared parameters only"
    );

    // The store's trained head survives a global model that still holds the initial one.
    let head = outcome.checkpoint.get("head.weight").unwrap().clone();
    assert_ne!(
        Some(&head),
        whole.get("head.weight"),
        "training moved the head"
    );
    let next = train::build_model(&task, &whole, Some(&outcome.checkpoint)).unwrap();
    assert_eq!(next.weights().get("head.weight"), Some(&head));
    assert_eq!(
        next.weights().get("hidden.0.weight"),
        whole.get("hidden.0.weight"),
        "shared parameters come from the global model"
    );
}

#[test]
fn delta_is_local_minus_global_in_model_order() {
    let spec = mlp(5, 1, Objective::Regression, &[]);
    let global = model(&spec, 1).weights();
    let task = TaskConfig {
        model: spec,
        training: config(1),
        normalisation: None,
    };
    let data = StoreData {
        store: StoreId("7".into()),
        train: synthetic(64, 8),
        test: Examples::empty(5),
    };
    let outcome = train::run_round(&task, &data, &global, None).unwrap();
    let delta = outcome.delta.flatten();
    let expected: Vec<f32> = outcome
        .checkpoint
        .flatten()
        .iter()
        .zip(global.flatten())
        .map(|(w, g)| w - g)
        .collect();
    assert_eq!(delta, expected);
    assert!(delta.iter().any(|v| *v != 0.0));
}

#[test]
fn safetensors_bytes_round_trip_and_reject_garbage() {
    let weights = model(&mlp(5, 2, Objective::Classification, &[]), 3).weights();
    let bytes = weights.to_safetensors().unwrap();
    assert_eq!(Weights::from_safetensors(&bytes).unwrap(), weights);
    assert!(Weights::from_safetensors(&bytes[..bytes.len() - 3]).is_err());
    assert!(Weights::from_safetensors(b"not safetensors").is_err());
    assert!(Weights::from_safetensors(&[]).is_err());
}

#[test]
fn small_cnn_trains_on_images() {
    let spec = ModelSpec::Cnn {
        input: [1, 8, 8],
        channels: vec![4],
        classes: 2,
        local: vec!["head".into()],
    };
    let mut net = model(&spec, 1);
    let names: Vec<&str> = net.parameters().iter().map(|p| p.name.as_str()).collect();
    assert_eq!(
        names,
        ["conv.0.weight", "conv.0.bias", "head.weight", "head.bias"]
    );

    // Class 1 images are bright in the top half, class 0 in the bottom half.
    let mut data = Examples::empty(64);
    for i in 0..64 {
        let class = i % 2;
        data.features
            .extend((0..64).map(|p| if (p < 32) == (class == 1) { 1.0 } else { 0.0 }));
        data.targets.push(class as f32);
    }
    let mut config = config(1);
    config.epochs = 20;
    config.dp = Some(DpConfig {
        clip_norm: 10.0,
        noise_multiplier: 0.0,
        expected_batch_size: 16,
        noise_seed: Some(1),
    });
    train::train(&mut net, &config, &data, None).unwrap();
    match fedmesh_store_agent::eval::evaluate(&net, &data) {
        fedmesh_store_agent::eval::Metrics::Classification { accuracy, .. } => {
            assert_eq!(accuracy, 1.0)
        }
        other => panic!("unexpected metrics {other:?}"),
    }
}

#[test]
fn dp_noise_and_poisson_batches_have_the_requested_statistics() {
    // 200,000 draws of N(0, 1.5^2): the sample mean has std 1.5 / sqrt(2e5) = 0.0034 and the
    // sample variance has std 2.25 * sqrt(2 / 2e5) = 0.0071; the bounds are over 5 of those.
    let mut rng = dp::DpRng::new(Some(42));
    let draws = rng.gaussian(200_000, 1.5);
    let n = draws.len() as f64;
    let mean = draws.iter().map(|&v| f64::from(v)).sum::<f64>() / n;
    let var = draws
        .iter()
        .map(|&v| (f64::from(v) - mean).powi(2))
        .sum::<f64>()
        / (n - 1.0);
    assert!(mean.abs() < 0.02, "mean {mean}");
    assert!((var - 2.25).abs() < 0.04, "variance {var}");

    // 400 batches at rate 64 / 1070: the mean size has std sqrt(1070 q (1 - q) / 400) = 0.39.
    let sizes: Vec<usize> = (0..400)
        .map(|_| rng.poisson_batch(1070, 64.0 / 1070.0).len())
        .collect();
    let mean_size = sizes.iter().sum::<usize>() as f64 / sizes.len() as f64;
    assert!(
        (mean_size - 64.0).abs() < 2.0,
        "mean batch size {mean_size}"
    );
    assert!(sizes.iter().any(|&s| s != sizes[0]), "batch sizes vary");
}
