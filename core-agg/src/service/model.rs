//! What core reads from the task config and the model blob.
//!
//! The aggregated vector holds the shared parameters only, sorted by name and flattened
//! row-major, the order of `fedmesh_protocol::params::ParamLayout` with `Scope::Shared`. A
//! parameter is local when its name starts with one of the task's `[model] local` prefixes
//! at a `.` boundary (`head` matches `head.weight`, not `header.weight`); local parameters
//! keep the values of the initial model in every published blob.

use std::collections::BTreeMap;

use fedmesh_protocol::ids::RoundId;
use fedmesh_protocol::moments::CohortStatistics;
use safetensors::tensor::{Dtype, TensorView};
use serde::Deserialize;

/// Why the task or model is unusable.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// The task is not TOML or lacks a key core needs.
    #[error("task config: {0}")]
    Task(String),
    /// The blob is not safetensors of f32.
    #[error("model blob: {0}")]
    Blob(String),
    /// A vector of the wrong length.
    #[error("shared vector has {got} values, the model has {expected}")]
    Length {
        /// Shared parameters of the model.
        expected: usize,
        /// Values given.
        got: usize,
    },
}

/// The parts of the task config core uses.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskFacts {
    /// Parameter-name prefixes that never leave a store.
    pub local: Vec<String>,
    /// Local epochs.
    pub epochs: u64,
    /// The model description (`[model]` as TOML), recorded in manifests.
    pub model_spec: String,
    /// `[training.dp]`, when the task protects records.
    pub dp: Option<TaskDp>,
    /// `model.inputs`: features per row, when the model states it.
    pub inputs: Option<u32>,
    /// Whether the task carries `[normalisation]` already.
    pub has_normalisation: bool,
}

/// `[training.dp]`.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
pub struct TaskDp {
    /// Per-example (and update) L2 clip.
    pub clip_norm: f64,
    /// DP-SGD noise multiplier.
    pub noise_multiplier: f64,
    /// Expected Poisson batch size.
    pub expected_batch_size: u64,
}

#[derive(Deserialize)]
struct TaskToml {
    model: toml::Table,
    training: TrainingToml,
    normalisation: Option<toml::Table>,
}

#[derive(Deserialize)]
struct TrainingToml {
    epochs: u64,
    dp: Option<TaskDp>,
}

impl TaskFacts {
    /// Reads what core needs from the task text; other keys are the stores' business.
    ///
    /// # Errors
    ///
    /// [`ModelError::Task`] when the text is not TOML or lacks `[model]`,
    /// `training.epochs`, or has a malformed `[training.dp]` or `model.local`.
    pub fn parse(text: &str) -> Result<Self, ModelError> {
        let task: TaskToml = toml::from_str(text).map_err(|e| ModelError::Task(e.to_string()))?;
        let local = match task.model.get("local") {
            None => Vec::new(),
            Some(value) => value
                .as_array()
                .and_then(|items| {
                    items
                        .iter()
                        .map(|v| v.as_str().map(str::to_owned))
                        .collect::<Option<Vec<_>>>()
                })
                .ok_or_else(|| ModelError::Task("model.local must be strings".into()))?,
        };
        if task.training.epochs == 0 {
            return Err(ModelError::Task(
                "training.epochs must be at least 1".into(),
            ));
        }
        Ok(Self {
            local,
            epochs: task.training.epochs,
            model_spec: toml::to_string(&task.model).unwrap_or_default(),
            dp: task.training.dp,
            inputs: task
                .model
                .get("inputs")
                .and_then(toml::Value::as_integer)
                .and_then(|n| u32::try_from(n).ok()),
            has_normalisation: task.normalisation.is_some(),
        })
    }

    /// The task text with `[normalisation]` from a statistics round appended: the text
    /// training rounds announce.
    pub fn with_normalisation(text: &str, round: RoundId, stats: &CohortStatistics) -> String {
        #[derive(serde::Serialize)]
        struct Table<'a> {
            normalisation: Normalisation<'a>,
        }
        #[derive(serde::Serialize)]
        struct Normalisation<'a> {
            mean: &'a [f64],
            std: &'a [f64],
            target_mean: f64,
        }
        let table = Table {
            normalisation: Normalisation {
                mean: &stats.mean,
                std: &stats.std,
                target_mean: stats.target_mean,
            },
        };
        // Finite numbers in plain arrays always serialise.
        let toml = toml::to_string(&table).unwrap_or_default();
        format!(
            "{}\n# From federated statistics round {round}: {:.0} rows.\n{toml}",
            text.trim_end(),
            stats.count
        )
    }

    /// Whether a parameter stays in the stores.
    pub fn is_local(&self, name: &str) -> bool {
        self.local.iter().any(|prefix| {
            name.strip_prefix(prefix.as_str())
                .is_some_and(|rest| rest.is_empty() || rest.starts_with('.'))
        })
    }
}

/// A model's parameters, by name, each flattened row-major, with shapes.
#[derive(Debug, Clone, PartialEq)]
pub struct Weights {
    tensors: BTreeMap<String, (Vec<usize>, Vec<f32>)>,
}

impl Weights {
    /// Parses a safetensors blob of f32 tensors.
    ///
    /// # Errors
    ///
    /// [`ModelError::Blob`] when the bytes are not safetensors or a tensor is not f32.
    pub fn from_safetensors(bytes: &[u8]) -> Result<Self, ModelError> {
        let parsed = safetensors::SafeTensors::deserialize(bytes)
            .map_err(|e| ModelError::Blob(e.to_string()))?;
        let mut tensors = BTreeMap::new();
        for (name, view) in parsed.tensors() {
            if view.dtype() != Dtype::F32 {
                return Err(ModelError::Blob(format!("tensor {name} is not f32")));
            }
            let values = view
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            tensors.insert(name, (view.shape().to_vec(), values));
        }
        Ok(Self { tensors })
    }

    /// Serialises to safetensors.
    ///
    /// # Errors
    ///
    /// [`ModelError::Blob`] if serialisation fails.
    pub fn to_safetensors(&self) -> Result<Vec<u8>, ModelError> {
        let bytes: Vec<(&String, &Vec<usize>, Vec<u8>)> = self
            .tensors
            .iter()
            .map(|(name, (shape, values))| {
                let raw = values.iter().flat_map(|v| v.to_le_bytes()).collect();
                (name, shape, raw)
            })
            .collect();
        let mut views = Vec::with_capacity(bytes.len());
        for (name, shape, raw) in &bytes {
            let view = TensorView::new(Dtype::F32, (*shape).clone(), raw)
                .map_err(|e| ModelError::Blob(e.to_string()))?;
            views.push(((*name).clone(), view));
        }
        safetensors::serialize(views, &None).map_err(|e| ModelError::Blob(e.to_string()))
    }

    /// Names of the shared parameters, sorted.
    pub fn shared_names<'a>(&'a self, task: &'a TaskFacts) -> impl Iterator<Item = &'a String> {
        self.tensors.keys().filter(|name| !task.is_local(name))
    }

    /// The shared parameters as one vector (sorted by name, each row-major).
    pub fn shared_vector(&self, task: &TaskFacts) -> Vec<f32> {
        self.shared_names(task)
            .flat_map(|name| self.tensors[name].1.iter().copied())
            .collect()
    }

    /// Replaces the shared parameters with `flat`, in [`Self::shared_vector`]'s order.
    ///
    /// # Errors
    ///
    /// [`ModelError::Length`] when `flat` has the wrong length; nothing changes then.
    pub fn set_shared(&mut self, task: &TaskFacts, flat: &[f32]) -> Result<(), ModelError> {
        let expected = self.shared_vector(task).len();
        if flat.len() != expected {
            return Err(ModelError::Length {
                expected,
                got: flat.len(),
            });
        }
        let mut offset = 0;
        for (name, (_, values)) in self.tensors.iter_mut() {
            if task.is_local(name) {
                continue;
            }
            let n = values.len();
            values.copy_from_slice(&flat[offset..offset + n]);
            offset += n;
        }
        Ok(())
    }

    /// Tensors by name: shape and values.
    pub fn tensors(&self) -> &BTreeMap<String, (Vec<usize>, Vec<f32>)> {
        &self.tensors
    }

    /// Weights from named tensors (for tests and tools).
    pub fn from_tensors(tensors: BTreeMap<String, (Vec<usize>, Vec<f32>)>) -> Self {
        Self { tensors }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_prefixes_match_at_a_dot_boundary_only() {
        let task = TaskFacts::parse(
            "[model]\nkind = \"mlp\"\nlocal = [\"head\"]\n[training]\nepochs = 1\n",
        )
        .unwrap();
        assert!(task.is_local("head.weight"));
        assert!(task.is_local("head"));
        assert!(!task.is_local("header.weight"));
        assert!(task.dp.is_none());
    }

    #[test]
    fn shared_vector_round_trips_through_safetensors_and_keeps_local_values() {
        let task =
            TaskFacts::parse("[model]\nlocal = [\"head\"]\n[training]\nepochs = 1\n").unwrap();
        let weights = Weights::from_tensors(BTreeMap::from([
            ("body.bias".into(), (vec![2], vec![1.0, 2.0])),
            ("body.weight".into(), (vec![1, 2], vec![3.0, 4.0])),
            ("head.weight".into(), (vec![1], vec![9.0])),
        ]));
        let mut back = Weights::from_safetensors(&weights.to_safetensors().unwrap()).unwrap();
        assert_eq!(back, weights);
        assert_eq!(back.shared_vector(&task), vec![1.0, 2.0, 3.0, 4.0]);
        back.set_shared(&task, &[5.0, 6.0, 7.0, 8.0]).unwrap();
        assert_eq!(back.tensors()["head.weight"].1, vec![9.0]);
        assert_eq!(back.tensors()["body.weight"].1, vec![7.0, 8.0]);
        assert!(back.set_shared(&task, &[1.0]).is_err());
    }
}
