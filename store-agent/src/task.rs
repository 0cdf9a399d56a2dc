//! The task config a plan carries to every store: model spec, training settings and the
//! normalisation statistics.
//!
//! Normalisation comes from here, never from the store's own rows, so that every store maps a
//! feature value to the same model input. [`Normalisation::fit`] computes it once from a
//! training set (the lab's pooled data, or a public sample) to write into the config.
//!
//! ```toml
//! [model]
//! kind = "mlp"
//! inputs = 47
//! hidden = [64, 32]
//! outputs = 1
//! activation = "relu"
//! objective = "regression"
//! local = ["head"]         # parameter-name prefixes trained but never exported
//!
//! [training]
//! epochs = 20
//! batch_size = 256
//! optimiser = "adam"
//! learning_rate = 0.001
//! fedprox_mu = 0.0
//! seed = 7
//! threads = 1
//!
//! [training.dp]            # optional: DP-SGD
//! clip_norm = 1.0
//! noise_multiplier = 1.0
//! expected_batch_size = 64
//!
//! [normalisation]
//! mean = [0.0, ...]
//! std = [1.0, ...]
//! ```

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::Examples;

/// A task config or its normalisation is unusable.
#[derive(Debug, thiserror::Error)]
pub enum TaskError {
    /// The file could not be read.
    #[error("cannot read task config {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The text is not valid TOML or does not match the schema.
    #[error("invalid task config: {0}")]
    Toml(#[from] toml::de::Error),
    /// The normalisation has a different width from the data or the model.
    #[error("normalisation has {expected} features, data has {actual}")]
    NormalisationWidth {
        /// The normalisation's width.
        expected: usize,
        /// The data's width.
        actual: usize,
    },
    /// A standard deviation is zero, negative or not finite.
    #[error("normalisation: std of feature {index} is {value}, must be positive")]
    BadStd {
        /// The feature.
        index: usize,
        /// Its std.
        value: f64,
    },
    /// A field has a value outside its range.
    #[error("task config: field {field}: {problem}")]
    Invalid {
        /// The field, dotted (`training.batch_size`).
        field: &'static str,
        /// What is wrong.
        problem: String,
    },
}

/// Everything a store needs to train one round.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskConfig {
    /// The model.
    pub model: ModelSpec,
    /// How to train it.
    pub training: TrainingConfig,
    /// Feature standardisation shared by every store.
    pub normalisation: Option<Normalisation>,
}

impl TaskConfig {
    /// Parses and checks a task config from TOML.
    ///
    /// # Errors
    /// [`TaskError`] when the text is not a valid config.
    pub fn from_toml_str(text: &str) -> Result<Self, TaskError> {
        let config: TaskConfig = toml::from_str(text)?;
        config.training.check()?;
        if let Some(norm) = &config.normalisation {
            norm.check()?;
        }
        Ok(config)
    }

    /// Reads and checks a task config file.
    ///
    /// # Errors
    /// [`TaskError`] when the file cannot be read or is not a valid config.
    pub fn from_path(path: &Path) -> Result<Self, TaskError> {
        let text = std::fs::read_to_string(path).map_err(|source| TaskError::Io {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_toml_str(&text)
    }
}

/// Which model to build. Parameter names are part of the wire format (see [`crate::model`]).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum ModelSpec {
    /// A multilayer perceptron for tabular data.
    Mlp {
        /// Input features.
        inputs: usize,
        /// Hidden layer widths.
        hidden: Vec<usize>,
        /// Outputs: 1 (or more) for regression, the class count for classification.
        outputs: usize,
        /// Activation between layers.
        #[serde(default)]
        activation: Activation,
        /// What the outputs mean, and so the loss.
        objective: Objective,
        /// Parameter-name prefixes that stay in the store (e.g. `["head"]`).
        #[serde(default)]
        local: Vec<String>,
    },
    /// A small CNN for images: conv 3x3 + ReLU + 2x2 max-pool per entry of `channels`, then a
    /// linear classifier.
    Cnn {
        /// Input channels, height and width.
        input: [usize; 3],
        /// Output channels of each conv block.
        channels: Vec<usize>,
        /// Classes.
        classes: usize,
        /// Parameter-name prefixes that stay in the store.
        #[serde(default)]
        local: Vec<String>,
    },
}

impl ModelSpec {
    /// The parameter-name prefixes that are local.
    pub fn local(&self) -> &[String] {
        match self {
            ModelSpec::Mlp { local, .. } | ModelSpec::Cnn { local, .. } => local,
        }
    }

    /// The objective the model is trained for.
    pub fn objective(&self) -> Objective {
        match self {
            ModelSpec::Mlp { objective, .. } => *objective,
            ModelSpec::Cnn { .. } => Objective::Classification,
        }
    }
}

/// Activation function between MLP layers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    /// max(0, x).
    #[default]
    Relu,
    /// tanh(x).
    Tanh,
    /// x * sigmoid(x).
    Silu,
}

/// What the model's outputs mean.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Objective {
    /// Real-valued outputs, mean squared error.
    Regression,
    /// Class logits, cross-entropy; targets are class indices.
    Classification,
}

/// Local training settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainingConfig {
    /// Passes over the local data.
    pub epochs: usize,
    /// Rows per batch (without DP; with DP the expected batch size is in `dp`).
    pub batch_size: usize,
    /// The optimiser.
    #[serde(default)]
    pub optimiser: Optimiser,
    /// Learning rate.
    pub learning_rate: f64,
    /// SGD momentum (ignored by Adam).
    #[serde(default)]
    pub momentum: f64,
    /// FedProx proximal weight: adds `mu / 2 * |w - w_global|^2` over shared parameters.
    #[serde(default)]
    pub fedprox_mu: f64,
    /// Seed for initialisation and shuffling; the same seed repeats a run exactly.
    #[serde(default)]
    pub seed: u64,
    /// libtorch intra-op threads (inter-op is always 1).
    #[serde(default = "one")]
    pub threads: usize,
    /// Where to train.
    #[serde(default)]
    pub device: DeviceChoice,
    /// DP-SGD, when the task protects records.
    pub dp: Option<DpConfig>,
}

fn one() -> usize {
    1
}

impl TrainingConfig {
    fn check(&self) -> Result<(), TaskError> {
        let invalid = |field, problem: &str| {
            Err(TaskError::Invalid {
                field,
                problem: problem.into(),
            })
        };
        if self.batch_size == 0 {
            return invalid("training.batch_size", "must be at least 1");
        }
        if self.threads == 0 {
            return invalid("training.threads", "must be at least 1");
        }
        if !(self.learning_rate.is_finite() && self.learning_rate > 0.0) {
            return invalid("training.learning_rate", "must be positive");
        }
        if !(self.fedprox_mu.is_finite() && self.fedprox_mu >= 0.0) {
            return invalid("training.fedprox_mu", "must be zero or positive");
        }
        if let Some(dp) = &self.dp {
            if !(dp.clip_norm.is_finite() && dp.clip_norm > 0.0) {
                return invalid("training.dp.clip_norm", "must be positive");
            }
            if !(dp.noise_multiplier.is_finite() && dp.noise_multiplier >= 0.0) {
                return invalid("training.dp.noise_multiplier", "must be zero or positive");
            }
            if dp.expected_batch_size == 0 {
                return invalid("training.dp.expected_batch_size", "must be at least 1");
            }
        }
        Ok(())
    }
}

/// The optimiser.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Optimiser {
    /// SGD, with `momentum` from the training config.
    Sgd,
    /// Adam (beta1 0.9, beta2 0.999, eps 1e-8).
    #[default]
    Adam,
}

/// Where to train.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeviceChoice {
    /// CUDA when present (with bf16 compute where it works), else CPU.
    #[default]
    Auto,
    /// CPU, float32.
    Cpu,
    /// The first CUDA device.
    Cuda,
}

/// DP-SGD settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DpConfig {
    /// Per-example gradient L2 clip norm C.
    pub clip_norm: f64,
    /// Noise standard deviation divided by C.
    pub noise_multiplier: f64,
    /// Expected Poisson batch size; the sampling rate is this over the example count.
    pub expected_batch_size: usize,
    /// Seed for the noise and the sampling; absent means fresh from the OS.
    pub noise_seed: Option<u64>,
}

/// Per-feature mean and standard deviation; inputs become `(x - mean) / std`. For regression
/// the pooled target mean also starts every fresh output layer's bias, so that a new model
/// (or a store's new personalised head) predicts the mean instead of zero: with targets far
/// from zero (log units sold are about 9) a zero start costs dozens of federated rounds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Normalisation {
    /// Means, one per feature.
    pub mean: Vec<f64>,
    /// Standard deviations, one per feature, all positive.
    pub std: Vec<f64>,
    /// Mean of the target over the same rows; absent in configs written without it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_mean: Option<f64>,
}

impl Normalisation {
    /// Pooled mean and population standard deviation of `sets`; a constant feature gets std 1
    /// so that it maps to zero rather than to infinity.
    ///
    /// # Errors
    /// [`TaskError::NormalisationWidth`] when the sets have different widths.
    pub fn fit<'a>(sets: impl IntoIterator<Item = &'a Examples>) -> Result<Self, TaskError> {
        let mut dim = None;
        let (mut n, mut sum, mut sum_sq) = (0usize, Vec::new(), Vec::new());
        let mut target_sum = 0.0f64;
        for set in sets {
            let d = *dim.get_or_insert(set.dim);
            if d != set.dim {
                return Err(TaskError::NormalisationWidth {
                    expected: d,
                    actual: set.dim,
                });
            }
            sum.resize(d, 0.0f64);
            sum_sq.resize(d, 0.0f64);
            for row in set.features.chunks_exact(d) {
                for (j, &x) in row.iter().enumerate() {
                    sum[j] += f64::from(x);
                    sum_sq[j] += f64::from(x) * f64::from(x);
                }
            }
            target_sum += set.targets.iter().map(|&y| f64::from(y)).sum::<f64>();
            n += set.len();
        }
        let target_mean = (n > 0).then(|| target_sum / n as f64);
        let n = n.max(1) as f64;
        let mean: Vec<f64> = sum.iter().map(|s| s / n).collect();
        let std = sum_sq
            .iter()
            .zip(&mean)
            .map(|(sq, m)| {
                let var = (sq / n - m * m).max(0.0);
                if var > 1e-12 { var.sqrt() } else { 1.0 }
            })
            .collect();
        Ok(Normalisation {
            mean,
            std,
            target_mean,
        })
    }

    /// Standardises `examples` in place.
    ///
    /// # Errors
    /// [`TaskError::NormalisationWidth`] when the widths differ.
    pub fn apply(&self, examples: &mut Examples) -> Result<(), TaskError> {
        if self.mean.len() != examples.dim {
            return Err(TaskError::NormalisationWidth {
                expected: self.mean.len(),
                actual: examples.dim,
            });
        }
        let scale: Vec<f64> = self.std.iter().map(|s| 1.0 / s).collect();
        for row in examples.features.chunks_exact_mut(examples.dim) {
            for ((x, m), s) in row.iter_mut().zip(&self.mean).zip(&scale) {
                *x = ((f64::from(*x) - m) * s) as f32;
            }
        }
        Ok(())
    }

    fn check(&self) -> Result<(), TaskError> {
        if self.mean.len() != self.std.len() {
            return Err(TaskError::NormalisationWidth {
                expected: self.mean.len(),
                actual: self.std.len(),
            });
        }
        if let Some(index) = self.std.iter().position(|s| !(s.is_finite() && *s > 0.0)) {
            return Err(TaskError::BadStd {
                index,
                value: self.std[index],
            });
        }
        match self.target_mean {
            Some(mean) if !mean.is_finite() => Err(TaskError::Invalid {
                field: "normalisation.target_mean",
                problem: format!("{mean} is not a finite number"),
            }),
            _ => Ok(()),
        }
    }
}
