//! Local training: plain mini-batch training or DP-SGD, with an optional FedProx term.
//!
//! A run repeats exactly for the same seed, data and thread count: the seed drives libtorch's
//! generator (initialisation) and the shuffling RNG; DP noise comes from its own CSPRNG (see
//! [`crate::dp::DpRng`]), repeatable only when the config gives `noise_seed`.

use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use rand_core::SeedableRng;
use tch::{Kind, Tensor, nn, nn::OptimizerConfig};

use crate::Examples;
use crate::dp::{self, DpRng};
use crate::eval::{self, Metrics};
use crate::ingest::StoreData;
use crate::model::{Model, ModelError, pick_device};
use crate::task::{Objective, Optimiser, TaskConfig, TaskError, TrainingConfig};
use crate::weights::{Weights, WeightsError};

/// Local training failed.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// The task config or normalisation does not fit the data.
    #[error(transparent)]
    Task(#[from] TaskError),
    /// The model could not be built or the weights loaded.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// Weights could not be combined.
    #[error(transparent)]
    Weights(#[from] WeightsError),
    /// libtorch reported an error.
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
    /// There are no training rows.
    #[error("no training examples")]
    NoExamples,
    /// The data's width is not the model's input width.
    #[error("data has {actual} features, the model takes {expected}")]
    Width {
        /// The model's input width.
        expected: usize,
        /// The data's width.
        actual: usize,
    },
}

/// What a store reports about a local run, so core can account for it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct TrainReport {
    /// Training rows.
    pub examples: usize,
    /// Optimiser steps taken.
    pub steps: usize,
    /// Mean training loss over the last epoch's batches.
    pub final_loss: f64,
    /// DP-SGD parameters, when the run used DP-SGD.
    pub dp: Option<DpReport>,
}

/// What the privacy accountant needs from a DP-SGD run.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct DpReport {
    /// Poisson sampling rate: expected batch size over examples.
    pub sampling_rate: f64,
    /// Noise standard deviation over the clip norm.
    pub noise_multiplier: f64,
    /// Per-example clip norm.
    pub clip_norm: f64,
    /// Noisy steps taken.
    pub steps: usize,
}

/// Sets libtorch's intra-op threads to `threads` and, once per process, its inter-op threads
/// to 1. libtorch's defaults oversubscribe small machines badly.
pub fn configure_threads(threads: usize) {
    static INTEROP: std::sync::Once = std::sync::Once::new();
    // libtorch refuses a second inter-op setting, so it is made once.
    INTEROP.call_once(|| tch::set_num_interop_threads(1));
    tch::set_num_threads(threads.max(1) as i32);
}

/// Trains `model` on `data` (normalised rows) in place. With `global`, and `fedprox_mu > 0`,
/// the proximal term pulls shared parameters towards those global weights.
///
/// # Errors
/// [`TrainError`] when the data is empty or does not fit the model, or libtorch fails.
pub fn train(
    model: &mut Model,
    config: &TrainingConfig,
    data: &Examples,
    global: Option<&Weights>,
) -> Result<TrainReport, TrainError> {
    configure_threads(config.threads);
    if data.is_empty() {
        return Err(TrainError::NoExamples);
    }
    let (x, y) = tensors(model, data)?;
    let prox = proximal_anchors(model, config.fedprox_mu, global)?;
    let vs = model.var_store();
    let mut opt = match config.optimiser {
        Optimiser::Adam => nn::Adam::default().build(vs, config.learning_rate)?,
        Optimiser::Sgd => {
            let sgd = nn::Sgd {
                momentum: config.momentum,
                ..Default::default()
            };
            sgd.build(vs, config.learning_rate)?
        }
    };
    let mut shuffle = ChaCha8Rng::seed_from_u64(config.seed);

    match &config.dp {
        None => {
            let n = data.len();
            let mut order: Vec<i64> = (0..n as i64).collect();
            let (mut steps, mut last_loss) = (0, 0.0);
            for _ in 0..config.epochs {
                order.shuffle(&mut shuffle);
                let mut epoch_loss = 0.0;
                let batches = order.chunks(config.batch_size);
                let count = batches.len();
                for batch in batches {
                    let index = Tensor::from_slice(batch).to_device(model.device());
                    let (xb, yb) = (x.index_select(0, &index), y.index_select(0, &index));
                    let mut loss = batch_loss(model, &xb, &yb);
                    if let Some(prox) = &prox {
                        loss += prox.penalty();
                    }
                    opt.zero_grad();
                    loss.backward();
                    opt.step();
                    epoch_loss += loss.double_value(&[]);
                    steps += 1;
                }
                last_loss = epoch_loss / count.max(1) as f64;
            }
            Ok(TrainReport {
                examples: n,
                steps,
                final_loss: last_loss,
                dp: None,
            })
        }
        Some(dp_config) => {
            let n = data.len();
            let (rate, total) = dp::schedule(n, dp_config.expected_batch_size, config.epochs);
            let expected = dp_config.expected_batch_size as f64;
            let per_epoch = total / config.epochs.max(1);
            let mut rng = DpRng::new(dp_config.noise_seed);
            let noise_std = dp_config.noise_multiplier * dp_config.clip_norm;
            let (mut epoch_loss, mut last_loss) = (0.0, 0.0);

            for step in 0..total {
                // 1. Poisson-sample a batch (it may be empty; the noise is added regardless).
                let batch = rng.poisson_batch(n, rate);
                let params = model.parameters();
                let summed: Vec<Tensor> = if batch.is_empty() {
                    params.iter().map(|p| p.tensor.zeros_like()).collect()
                } else {
                    let index = Tensor::from_slice(&batch).to_device(model.device());
                    let (xb, yb) = (x.index_select(0, &index), y.index_select(0, &index));
                    epoch_loss += tch::no_grad(|| batch_loss(model, &xb, &yb).double_value(&[]));
                    // 2. Clip each example's gradient and sum over the batch.
                    dp::clipped_sum(
                        &dp::per_example_gradients(model, &xb, &yb)?,
                        dp_config.clip_norm,
                    )
                };

                // 3. Noise the sum, divide by the expected batch size, add the proximal pull.
                let mut grads = Vec::with_capacity(summed.len());
                for (p, sum) in params.iter().zip(summed) {
                    let noise = rng.gaussian(sum.numel(), noise_std);
                    let noise = Tensor::from_slice(&noise)
                        .reshape(sum.size())
                        .to_device(sum.device());
                    let mut g = (sum + noise) / expected;
                    if let Some(prox) = &prox {
                        g += prox.gradient(&p.name, &p.tensor);
                    }
                    grads.push(g);
                }

                // 4. Step: the surrogate loss sum(p * g) has gradient g with respect to p.
                let surrogate = params
                    .iter()
                    .zip(&grads)
                    .map(|(p, g)| (&p.tensor * g).sum(Kind::Float))
                    .fold(
                        Tensor::zeros([], (Kind::Float, model.device())),
                        |acc, t| acc + t,
                    );
                opt.zero_grad();
                surrogate.backward();
                opt.step();

                if (step + 1) % per_epoch == 0 {
                    last_loss = epoch_loss / per_epoch as f64;
                    epoch_loss = 0.0;
                }
            }
            let report = DpReport {
                sampling_rate: rate,
                noise_multiplier: dp_config.noise_multiplier,
                clip_norm: dp_config.clip_norm,
                steps: total,
            };
            Ok(TrainReport {
                examples: n,
                steps: total,
                final_loss: last_loss,
                dp: Some(report),
            })
        }
    }
}

/// The mean training loss of a batch: mean squared error, or mean cross-entropy.
pub fn batch_loss(model: &Model, x: &Tensor, y: &Tensor) -> Tensor {
    let output = model.forward(x);
    match model.objective() {
        Objective::Regression => (output - y).square().mean(Kind::Float),
        Objective::Classification => output.cross_entropy_for_logits(y),
    }
}

/// Feature and target tensors on the model's device: targets are float `[n, 1]` for
/// regression and int64 class indices `[n]` for classification.
pub fn tensors(model: &Model, data: &Examples) -> Result<(Tensor, Tensor), TrainError> {
    let expected = model
        .parameters()
        .first()
        .map(|p| p.tensor.size())
        .unwrap_or_default();
    // The first MLP weight is [out, in]; a CNN's first conv takes any flattened image size.
    if model.is_mlp() && expected.get(1).is_some_and(|&d| d as usize != data.dim) {
        return Err(TrainError::Width {
            expected: expected[1] as usize,
            actual: data.dim,
        });
    }
    let n = data.len() as i64;
    let device = model.device();
    let x = Tensor::f_from_slice(&data.features)?
        .reshape([n, data.dim as i64])
        .to_device(device);
    let y = Tensor::f_from_slice(&data.targets)?;
    let y = match model.objective() {
        Objective::Regression => y.reshape([n, 1]),
        Objective::Classification => y.to_kind(Kind::Int64),
    };
    Ok((x, y.to_device(device)))
}

/// The global values of the shared parameters, for the FedProx term.
struct Proximal {
    mu: f64,
    anchors: Vec<(String, Tensor, Tensor)>,
}

impl Proximal {
    /// `mu / 2 * sum |w - w_global|^2` over shared parameters.
    fn penalty(&self) -> Tensor {
        let terms = self
            .anchors
            .iter()
            .map(|(_, w, g)| (w - g).square().sum(Kind::Float));
        terms.fold(Tensor::from(0f32), |acc, t| acc + t) * (self.mu / 2.0)
    }

    /// The penalty's gradient for one parameter: `mu (w - w_global)`, zero for local ones.
    fn gradient(&self, name: &str, w: &Tensor) -> Tensor {
        match self.anchors.iter().find(|(n, _, _)| n == name) {
            Some((_, _, g)) => tch::no_grad(|| (w - g) * self.mu),
            None => w.zeros_like(),
        }
    }
}

fn proximal_anchors(
    model: &Model,
    mu: f64,
    global: Option<&Weights>,
) -> Result<Option<Proximal>, TrainError> {
    let Some(global) = global.filter(|_| mu > 0.0) else {
        return Ok(None);
    };
    let mut anchors = Vec::new();
    for p in model.parameters().iter().filter(|p| !p.local) {
        let g = global
            .get(&p.name)
            .ok_or_else(|| ModelError::MissingParameter(p.name.clone()))?;
        let t = Tensor::f_from_slice(&g.values)?
            .reshape(p.tensor.size())
            .to_device(model.device());
        anchors.push((p.name.clone(), p.tensor.shallow_clone(), t));
    }
    Ok(Some(Proximal { mu, anchors }))
}

/// What one round of local training produced.
#[derive(Debug)]
pub struct RoundOutcome {
    /// Shared weights after training minus the global weights, in model order: the update
    /// `fedmesh-protocol` clips, noises, encodes and masks.
    pub delta: Weights,
    /// Every weight after training, local ones included: the store's own checkpoint, to pass
    /// back as `local_state` next round. Never sent.
    pub checkpoint: Weights,
    /// Counts for the ledger.
    pub report: TrainReport,
    /// Metrics on the store's test rows before training (the global model).
    pub before: Option<Metrics>,
    /// Metrics on the store's test rows after training.
    pub after: Option<Metrics>,
}

/// Builds the model for `task`, seeded, with `local_state` (the store's last checkpoint, for
/// local parameters) and then `global` loaded over it.
///
/// # Errors
/// [`TrainError`] when the weights do not fit the model.
pub fn build_model(
    task: &TaskConfig,
    global: &Weights,
    local_state: Option<&Weights>,
) -> Result<Model, TrainError> {
    configure_threads(task.training.threads);
    tch::manual_seed(task.training.seed as i64);
    let (device, precision) = pick_device(task.training.device)?;
    let mut model = fresh_model(task, device, precision)?;
    if let Some(state) = local_state {
        let local = Weights {
            tensors: state
                .tensors
                .iter()
                .filter(|t| is_local(&model, &t.name))
                .cloned()
                .collect(),
        };
        load_partial(&mut model, &local)?;
    }
    model.load(&shared_part(&model, global))?;
    Ok(model)
}

/// The tensors of `global` that the model shares, in the model's parameter order. A global
/// model may list its tensors in another order (a registry blob keeps them sorted by name),
/// and may still carry values for parameters the task keeps local (an initial model written
/// whole, say); those belong to each store and are never taken from it.
fn shared_part(model: &Model, global: &Weights) -> Weights {
    let shared = model.parameters().iter().filter(|p| !p.local);
    let mut tensors: Vec<_> = shared
        .filter_map(|p| global.get(&p.name).cloned())
        .collect();
    // Names the model does not know stay in, so that loading them fails by name.
    tensors.extend(
        global
            .tensors
            .iter()
            .filter(|t| !model.parameters().iter().any(|p| p.name == t.name))
            .cloned(),
    );
    Weights { tensors }
}

/// A newly initialised model of the task (seeded by the caller): a regression model's output
/// starts at the task's pooled target mean when the normalisation carries one.
///
/// # Errors
/// [`TrainError`] when the spec is invalid.
pub fn fresh_model(
    task: &TaskConfig,
    device: tch::Device,
    precision: crate::model::Precision,
) -> Result<Model, TrainError> {
    let mut model = Model::new(&task.model, device, precision)?;
    let target_mean = task.normalisation.as_ref().and_then(|n| n.target_mean);
    if let (Objective::Regression, Some(mean)) = (task.model.objective(), target_mean) {
        model.start_output_at(mean);
    }
    Ok(model)
}

fn is_local(model: &Model, name: &str) -> bool {
    model.parameters().iter().any(|p| p.local && p.name == name)
}

/// Loads only the tensors present (used for local state, which has no shared parameters).
fn load_partial(model: &mut Model, weights: &Weights) -> Result<(), TrainError> {
    let mut full = model.weights();
    for t in &weights.tensors {
        if let Some(slot) = full.tensors.iter_mut().find(|s| s.name == t.name) {
            *slot = t.clone();
        }
    }
    model.load(&full)?;
    Ok(())
}

/// One round at a store: normalise the data with the task's statistics, build the model from
/// the global weights (and the store's local state), train, and return the shared delta.
///
/// # Errors
/// [`TrainError`] when the config, data or weights do not fit, or libtorch fails.
pub fn run_round(
    task: &TaskConfig,
    data: &StoreData,
    global: &Weights,
    local_state: Option<&Weights>,
) -> Result<RoundOutcome, TrainError> {
    let normalise = |e: &Examples| match &task.normalisation {
        Some(norm) => e.normalised(norm),
        None => Ok(e.clone()),
    };
    let (train_rows, test_rows) = (normalise(&data.train)?, normalise(&data.test)?);

    let mut model = build_model(task, global, local_state)?;
    let before = (!test_rows.is_empty()).then(|| eval::evaluate(&model, &test_rows));
    let report = train(&mut model, &task.training, &train_rows, Some(global))?;
    let after = (!test_rows.is_empty()).then(|| eval::evaluate(&model, &test_rows));

    let delta = model.shared_weights().delta(&shared_part(&model, global))?;
    tracing::debug!(
        store.id = %data.store,
        examples = report.examples,
        steps = report.steps,
        "local round trained"
    );
    Ok(RoundOutcome {
        delta,
        checkpoint: model.weights(),
        report,
        before,
        after,
    })
}
