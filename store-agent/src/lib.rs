//! Fedmesh's store side: what runs inside a store and never leaves it.
//!
//! - [`spec`] and [`ingest`]: a declarative feature spec, and the loader that reads only the
//!   columns it names, redacts card numbers ([`redact`]) and joins store attributes;
//! - [`task`]: the task config a plan carries (model spec, training settings, normalisation);
//! - [`model`]: MLP and CNN models in `tch::nn` with stable parameter names, some of which may be
//!   local (a personalised head that is trained but never exported);
//! - [`train`] and [`dp`]: local training with FedProx, and DP-SGD with per-example clipping;
//! - [`eval`]: local metrics; [`weights`]: weights and deltas as safetensors;
//! - [`pipeline`]: the shared delta clipped, noised and compressed into the update sent;
//! - [`window`]: the local hours in which the store lets Fedmesh train;
//! - [`participation`]: whether the store takes part in a round offered to it, and why not;
//! - [`queue`] and [`secrets`]: the upload queue and round secrets that survive a crash;
//! - [`audit`]: the hash-chained audit log a regulator can check;
//! - [`config`]: the agent's one config file, checked at start-up;
//! - [`daemon`]: the running agent: one task per hosted store polling its PoP, taking part
//!   in rounds, evaluating candidates, and `status`.
//!
//! A round, from the store's side:
//!
//! ```no_run
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use fedmesh_store_agent::{ingest, spec::FeatureSpec, task::TaskConfig, train, weights::Weights};
//! let spec = FeatureSpec::from_path("specs/dominicks-oj.toml".as_ref())?;
//! let files = ingest::DataFiles::in_dir("data/dominicks-oj".as_ref());
//! let data = ingest::load_store(&spec, &files, &fedmesh_store_agent::StoreId("2".into()))?;
//! let task = TaskConfig::from_path("task.toml".as_ref())?;
//! let global = Weights::from_safetensors(&std::fs::read("global.safetensors")?)?;
//! // The store's checkpoint from its last round carries its local parameters, if any.
//! let outcome = train::run_round(&task, &data, &global, None)?;
//! let delta: Vec<f32> = outcome.delta.flatten(); // shared parameters only, in model order
//! # Ok(()) }
//! ```
//!
//! The update maths (clipping, noise, codecs, masking) lives in `fedmesh-protocol`;
//! [`pipeline`] applies it to the store's named weights.

pub mod audit;
pub mod config;
pub mod daemon;
pub mod dp;
pub mod eval;
pub mod ingest;
pub mod model;
pub mod participation;
pub mod pipeline;
pub mod queue;
pub mod redact;
pub mod secrets;
pub mod spec;
pub mod task;
pub mod train;
pub mod weights;
pub mod window;

/// A store's id (e.g. `"2"` for Dominick's store 2): the protocol's newtype, the last
/// segment of the store's SPIFFE ID.
pub use fedmesh_protocol::ids::StoreId;

/// Rows of features with their targets, row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct Examples {
    /// Features per row.
    pub dim: usize,
    /// `len() * dim` values, row after row.
    pub features: Vec<f32>,
    /// One target per row (a class index for classification).
    pub targets: Vec<f32>,
}

impl Examples {
    /// No rows of `dim` features.
    pub fn empty(dim: usize) -> Self {
        Examples {
            dim,
            features: Vec::new(),
            targets: Vec::new(),
        }
    }

    /// Number of rows.
    pub fn len(&self) -> usize {
        self.targets.len()
    }

    /// Whether there are no rows.
    pub fn is_empty(&self) -> bool {
        self.targets.is_empty()
    }

    /// The features of row `i`.
    ///
    /// # Panics
    /// When `i >= len()`.
    pub fn row(&self, i: usize) -> &[f32] {
        &self.features[i * self.dim..(i + 1) * self.dim]
    }

    /// Appends the rows of `other`, which must have the same `dim`.
    ///
    /// # Panics
    /// When the dims differ.
    pub fn extend(&mut self, other: &Examples) {
        assert_eq!(self.dim, other.dim, "examples of different widths");
        self.features.extend_from_slice(&other.features);
        self.targets.extend_from_slice(&other.targets);
    }

    /// A copy with features standardised by `norm`.
    ///
    /// # Errors
    /// [`task::TaskError::NormalisationWidth`] when `norm` is for a different width.
    pub fn normalised(&self, norm: &task::Normalisation) -> Result<Examples, task::TaskError> {
        let mut out = self.clone();
        norm.apply(&mut out)?;
        Ok(out)
    }
}
