//! `core.toml`: what `core-agg serve` reads at start-up.
//!
//! Every key is documented in `core-agg/core.example.toml`, which the lab generates its
//! configs from. Unknown keys are refused, and every error names the file and the key.
//! Relative paths are taken relative to the directory of the config file.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::strategy::{AdaptiveConfig, Strategy};
use fedmesh_protocol::wire::AggregationMode;

/// Why a config file is unusable.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config {file}: {source}")]
    Io {
        /// The file.
        file: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// Not TOML, an unknown key, or a value of the wrong type (the message names the key).
    #[error("config {file}: {message}")]
    Toml {
        /// The file.
        file: PathBuf,
        /// The parser's message, which names the key and line.
        message: String,
    },
    /// A key has a value outside its range.
    #[error("config {file}: key {key}: {problem}")]
    Invalid {
        /// The file.
        file: PathBuf,
        /// The dotted key (`rounds.fraction`).
        key: &'static str,
        /// What is wrong.
        problem: String,
    },
}

/// The whole config.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Address to listen on: HTTP/3 on this UDP port, HTTP/2 on the same TCP port.
    pub listen: SocketAddr,
    /// Directory with core's SVID (`svid.pem`, `svid.key.pem`, `bundle.pem`).
    pub identity_dir: PathBuf,
    /// Directory for the round state, the ledger and the embedded registry.
    pub state_dir: PathBuf,
    /// The model trained, e.g. `oj-demand`.
    pub model: String,
    /// Task config file (TOML); its text is sent verbatim in every announcement.
    pub task: PathBuf,
    /// Safetensors file published as the first version when the registry is empty.
    pub initial_model: PathBuf,
    /// Oldest store runtime (semantic version) rounds accept.
    #[serde(default = "default_min_runtime")]
    pub min_runtime: String,
    /// The model registry.
    pub registry: RegistryConfig,
    /// Round planning and deadlines.
    #[serde(default)]
    pub rounds: RoundsConfig,
    /// Aggregation mode, strategy and secure-aggregation parameters.
    #[serde(default)]
    pub aggregation: AggregationConfig,
    /// The privacy ledger.
    #[serde(default)]
    pub privacy: PrivacyConfig,
    /// Federated statistics before training.
    #[serde(default)]
    pub statistics: StatisticsConfig,
}

/// `[statistics]`: a federated-statistics round that gives the task its normalisation.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StatisticsConfig {
    /// Run one statistics round before training when the task has no `[normalisation]`;
    /// the training rounds' task then carries the cohort's means and deviations.
    pub enabled: bool,
    /// Rows a store counts at most.
    pub max_rows: u64,
    /// Bound on the magnitude of every feature and the target; values clamp to it.
    pub bound: f64,
}

impl Default for StatisticsConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            max_rows: 100_000,
            bound: 100.0,
        }
    }
}

/// `[registry]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegistryConfig {
    /// The secret key file (`registry.key`, from `core-agg registry keygen`).
    pub signing_key: PathBuf,
    /// `embedded` (default) or `etcd`.
    #[serde(default)]
    pub backend: BackendKind,
    /// etcd endpoints (`http://127.0.0.1:2379`), for `backend = "etcd"`.
    #[serde(default)]
    pub etcd_endpoints: Vec<String>,
    /// Key prefix in etcd, so that several registries can share a cluster.
    #[serde(default = "default_etcd_prefix")]
    pub etcd_prefix: String,
}

fn default_etcd_prefix() -> String {
    "/fedmesh/registry".into()
}

/// Which registry storage.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BackendKind {
    /// A directory under `state_dir`.
    #[default]
    Embedded,
    /// An etcd cluster (manifests and pointers); blobs stay under `state_dir`.
    Etcd,
}

/// `[rounds]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RoundsConfig {
    /// Committed rounds after which planning stops; 0 runs forever.
    pub count: u64,
    /// Abandoned rounds after which planning stops as well; 0 never stops for them.
    pub max_abandoned: u64,
    /// Fraction of the eligible online stores that should report.
    pub fraction: f64,
    /// Fewest reports a round aggregates (and the smallest target).
    pub min_cohort: usize,
    /// Selected stores per wanted report (1.3 selects 130%).
    pub over_selection: f64,
    /// Largest share of a cohort any one region may hold.
    pub region_cap: f64,
    /// Stores that must have polled recently before a round is planned.
    pub min_online: usize,
    /// A store counts as online this many seconds after its last poll.
    pub online_window_s: u64,
    /// Seconds selection may wait for enough eligible stores.
    pub selection_timeout_s: u64,
    /// Seconds for key adverts.
    pub keys_s: u64,
    /// Seconds for encrypted shares.
    pub shares_s: u64,
    /// Seconds for uploads (PoPs forward their partial sums shortly before the end, see
    /// `PhaseDeadlines::pop_forward_ms`).
    pub upload_s: u64,
    /// Seconds for unmask responses.
    pub unmask_s: u64,
    /// Seconds evaluators have to report (announced to them; core itself gives up on a
    /// phase after the whole secure-aggregation time or this, whichever is longer).
    pub evaluation_s: u64,
    /// Held-out stores that must evaluate each candidate.
    pub evaluators: usize,
    /// Largest relative rise of evaluation loss that still publishes.
    pub regression_threshold: f64,
    /// Seconds to wait after a round ends before planning the next.
    pub pause_s: u64,
}

impl Default for RoundsConfig {
    fn default() -> Self {
        Self {
            count: 0,
            max_abandoned: 0,
            fraction: 0.1,
            min_cohort: 3,
            over_selection: 1.3,
            region_cap: 0.5,
            min_online: 3,
            online_window_s: 30,
            selection_timeout_s: 60,
            keys_s: 10,
            shares_s: 10,
            upload_s: 60,
            unmask_s: 10,
            evaluation_s: 30,
            evaluators: 1,
            regression_threshold: 0.02,
            pause_s: 0,
        }
    }
}

/// `[aggregation]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AggregationConfig {
    /// `secure` (SecAgg+) or `trusted-pop`.
    pub mode: AggregationMode,
    /// `fedavg`, `fedprox`, `qfedavg`, `fedadam` or `fedyogi`.
    pub strategy: StrategyKind,
    /// FedProx proximal weight (sent to stores in the task; here for the record).
    pub mu: f64,
    /// q-FedAvg fairness exponent.
    pub q: f64,
    /// q-FedAvg Lipschitz constant.
    pub lipschitz: f64,
    /// FedAdam/FedYogi server learning rate.
    pub eta: f64,
    /// FedAdam/FedYogi first-moment decay.
    pub beta1: f64,
    /// FedAdam/FedYogi second-moment decay.
    pub beta2: f64,
    /// FedAdam/FedYogi adaptivity.
    pub tau: f64,
    /// Quantisation bits per coordinate.
    pub quant_bits: u32,
    /// Extra ring bits that hold the noise.
    pub guard_bits: u32,
    /// Per-coordinate clip bound: coordinates are clamped to `[-clip, clip]`.
    pub clip: f32,
    /// Fraction of coordinates random-k keeps (1.0 keeps all).
    pub kept_fraction: f64,
    /// Expected per-store dropout, sizing the neighbourhood.
    pub expected_dropout: f64,
}

impl Default for AggregationConfig {
    fn default() -> Self {
        let adaptive = AdaptiveConfig::default();
        Self {
            mode: AggregationMode::Secure,
            strategy: StrategyKind::Fedavg,
            mu: 0.0,
            q: 1.0,
            lipschitz: 1.0,
            eta: adaptive.eta,
            beta1: adaptive.beta1,
            beta2: adaptive.beta2,
            tau: adaptive.tau,
            quant_bits: 8,
            guard_bits: 2,
            clip: 1.0,
            kept_fraction: 1.0,
            expected_dropout: 0.1,
        }
    }
}

impl AggregationConfig {
    /// The strategy with its parameters.
    pub fn strategy(&self) -> Strategy {
        let adaptive = AdaptiveConfig {
            eta: self.eta,
            beta1: self.beta1,
            beta2: self.beta2,
            tau: self.tau,
        };
        match self.strategy {
            StrategyKind::Fedavg => Strategy::FedAvg,
            StrategyKind::Fedprox => Strategy::FedProx { mu: self.mu },
            StrategyKind::Qfedavg => Strategy::QFedAvg {
                q: self.q,
                lipschitz: self.lipschitz,
            },
            StrategyKind::Fedadam => Strategy::FedAdam(adaptive),
            StrategyKind::Fedyogi => Strategy::FedYogi(adaptive),
        }
    }
}

/// The strategy names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StrategyKind {
    /// FedAvg.
    Fedavg,
    /// FedProx.
    Fedprox,
    /// q-FedAvg.
    Qfedavg,
    /// FedAdam.
    Fedadam,
    /// FedYogi.
    Fedyogi,
}

/// `[privacy]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PrivacyConfig {
    /// `record` (DP-SGD at each store) or `store` (distributed noise on the cohort sum).
    pub unit: Unit,
    /// Epsilon budget per store per model per window.
    pub budget: f64,
    /// Delta at which epsilon is reported.
    pub delta: f64,
    /// Length of the rolling window, days.
    pub window_days: u64,
    /// Store-level noise multiplier (unit `store`): the cohort sum carries noise of this
    /// many times the task's `training.dp.clip_norm`.
    pub store_noise_multiplier: f64,
}

impl Default for PrivacyConfig {
    fn default() -> Self {
        Self {
            unit: Unit::Record,
            budget: 8.0,
            delta: 1e-5,
            window_days: 30,
            store_noise_multiplier: 1.0,
        }
    }
}

/// The DP unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Unit {
    /// A row of a store's data.
    Record,
    /// A store's whole contribution.
    Store,
}

fn default_min_runtime() -> String {
    "0.0.0".into()
}

impl Config {
    /// Reads, parses and checks a config file; relative paths become relative to its
    /// directory.
    ///
    /// # Errors
    ///
    /// [`ConfigError`] naming the file and the key.
    pub fn load(file: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(file).map_err(|source| ConfigError::Io {
            file: file.to_owned(),
            source,
        })?;
        let mut config = Self::parse(&text, file)?;
        let base = file.parent().unwrap_or(Path::new("."));
        for path in [
            &mut config.identity_dir,
            &mut config.state_dir,
            &mut config.task,
            &mut config.initial_model,
            &mut config.registry.signing_key,
        ] {
            if path.is_relative() {
                *path = base.join(&*path);
            }
        }
        Ok(config)
    }

    /// Parses and checks config text; `file` only names it in errors.
    ///
    /// # Errors
    ///
    /// [`ConfigError`] naming the file and the key.
    pub fn parse(text: &str, file: &Path) -> Result<Self, ConfigError> {
        let config: Self = toml::from_str(text).map_err(|e| ConfigError::Toml {
            file: file.to_owned(),
            message: e.to_string().trim_end().to_owned(),
        })?;
        config.check(file)?;
        Ok(config)
    }

    fn check(&self, file: &Path) -> Result<(), ConfigError> {
        let invalid = |key: &'static str, problem: &str| {
            Err(ConfigError::Invalid {
                file: file.to_owned(),
                key,
                problem: problem.to_owned(),
            })
        };
        let unit = |x: f64| x.is_finite() && x > 0.0 && x <= 1.0;
        let (r, a, p) = (&self.rounds, &self.aggregation, &self.privacy);
        if crate::registry::check_model_id(&crate::ModelId(self.model.clone())).is_err() {
            return invalid("model", "must be 1-128 characters of [A-Za-z0-9._-]");
        }
        if !unit(r.fraction) {
            return invalid("rounds.fraction", "must be in (0, 1]");
        }
        if r.min_cohort < 2 {
            return invalid("rounds.min_cohort", "must be at least 2");
        }
        if !(r.over_selection.is_finite() && r.over_selection >= 1.0) {
            return invalid("rounds.over_selection", "must be at least 1.0");
        }
        if !unit(r.region_cap) {
            return invalid("rounds.region_cap", "must be in (0, 1]");
        }
        if r.min_online < r.min_cohort {
            return invalid("rounds.min_online", "must be at least rounds.min_cohort");
        }
        let deadlines = [
            ("rounds.online_window_s", r.online_window_s),
            ("rounds.keys_s", r.keys_s),
            ("rounds.shares_s", r.shares_s),
            ("rounds.upload_s", r.upload_s),
            ("rounds.unmask_s", r.unmask_s),
            ("rounds.evaluation_s", r.evaluation_s),
            ("rounds.selection_timeout_s", r.selection_timeout_s),
        ];
        for (key, value) in deadlines {
            if value == 0 || value > 7 * 24 * 3600 {
                return invalid(key, "must be between 1 second and 7 days");
            }
        }
        if r.evaluators == 0 {
            return invalid("rounds.evaluators", "must be at least 1");
        }
        if !(r.regression_threshold.is_finite() && r.regression_threshold >= 0.0) {
            return invalid("rounds.regression_threshold", "must be zero or positive");
        }
        if a.mode != AggregationMode::Secure {
            return invalid("aggregation.mode", "only `secure` is served so far");
        }
        if let Err(e) = a.strategy().validate() {
            return invalid("aggregation.strategy", &e.to_string());
        }
        if !(1..=24).contains(&a.quant_bits) {
            return invalid("aggregation.quant_bits", "must be between 1 and 24");
        }
        if a.guard_bits > 16 {
            return invalid("aggregation.guard_bits", "must be at most 16");
        }
        if !(a.clip.is_finite() && a.clip > 0.0) {
            return invalid("aggregation.clip", "must be positive");
        }
        if !unit(a.kept_fraction) {
            return invalid("aggregation.kept_fraction", "must be in (0, 1]");
        }
        if !(a.expected_dropout.is_finite() && (0.0..0.9).contains(&a.expected_dropout)) {
            return invalid("aggregation.expected_dropout", "must be in [0, 0.9)");
        }
        if !(p.budget.is_finite() && p.budget > 0.0) {
            return invalid("privacy.budget", "must be positive");
        }
        if !(p.delta > 0.0 && p.delta < 1.0) {
            return invalid("privacy.delta", "must be in (0, 1)");
        }
        if p.window_days == 0 {
            return invalid("privacy.window_days", "must be at least 1");
        }
        if !(p.store_noise_multiplier.is_finite() && p.store_noise_multiplier > 0.0) {
            return invalid("privacy.store_noise_multiplier", "must be positive");
        }
        let st = &self.statistics;
        if st.max_rows == 0 || st.max_rows > 1 << 40 {
            return invalid("statistics.max_rows", "must be 1 to 2^40");
        }
        if !(st.bound.is_finite() && st.bound > 0.0) {
            return invalid("statistics.bound", "must be positive");
        }
        if self.registry.backend == BackendKind::Etcd && self.registry.etcd_endpoints.is_empty() {
            return invalid("registry.etcd_endpoints", "backend etcd needs endpoints");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
        listen = "127.0.0.1:7443"
        identity_dir = "pki/core"
        state_dir = "state"
        model = "oj-demand"
        task = "task.toml"
        initial_model = "init.safetensors"
        [registry]
        signing_key = "keys/registry.key"
    "#;

    #[test]
    fn the_example_config_parses_with_every_key() {
        let text = include_str!("../../core.example.toml");
        let config = Config::parse(text, Path::new("core.example.toml")).unwrap();
        assert_eq!(config.rounds.keys_s, 3);
        assert_eq!(config.aggregation.strategy, StrategyKind::Fedavg);
    }

    #[test]
    fn unknown_keys_are_refused_with_their_name() {
        let text = format!("{MINIMAL}\n[rounds]\nfractoin = 0.2\n");
        let error = Config::parse(&text, Path::new("core.toml")).unwrap_err();
        let message = error.to_string();
        assert!(message.contains("core.toml"), "{message}");
        assert!(message.contains("fractoin"), "{message}");
    }

    #[test]
    fn out_of_range_values_name_the_key() {
        let text = format!("{MINIMAL}\n[rounds]\nfraction = 1.5\n");
        let message = Config::parse(&text, Path::new("core.toml"))
            .unwrap_err()
            .to_string();
        assert!(message.contains("key rounds.fraction"), "{message}");
    }
}
