//! Scenario files: one TOML file describes a whole lab run — the data, how stores map to
//! regions and metros, the PoPs, the rounds and training, privacy, compression, the WAN each
//! group of stores sees, and the faults to inject. `netlab/README.md` documents every key.
//!
//! Paths in a scenario are relative to the scenario file's directory.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::wan::WanProfile;

/// A whole lab run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    /// Short name, used in reports.
    pub name: String,
    /// One line for the report.
    #[serde(default)]
    pub description: String,
    /// Seed of everything random in the lab (WAN, churn, data order).
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// The data and the feature spec.
    pub data: DataSection,
    /// Stores, regions, metros and PoPs.
    pub topology: Topology,
    /// Rounds and their deadlines.
    pub rounds: RoundsSection,
    /// Aggregation and local training.
    pub training: TrainingSection,
    /// Differential privacy.
    #[serde(default)]
    pub privacy: PrivacySection,
    /// Update compression.
    #[serde(default)]
    pub compression: CompressionSection,
    /// The WAN between stores and the anycast address.
    #[serde(default)]
    pub wan: WanSection,
    /// Faults to inject.
    #[serde(default)]
    pub faults: Faults,
}

fn default_seed() -> u64 {
    1
}

/// Where the data comes from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataSection {
    /// Directory holding `sales.csv.gz` and `stores.csv`.
    pub dir: PathBuf,
    /// The feature spec (TOML).
    pub spec: PathBuf,
    /// Rows whose split column is at most this train; the rest are test rows.
    #[serde(default)]
    pub train_max: Option<f64>,
    /// Use only the first so many stores (by id order); all when absent.
    #[serde(default)]
    pub stores: Option<usize>,
}

/// Stores, regions, metros and PoPs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Topology {
    /// Trust domain of the dev PKI.
    #[serde(default = "default_trust_domain")]
    pub trust_domain: String,
    /// store-agent processes the stores are spread over.
    #[serde(default = "default_store_processes")]
    pub store_processes: usize,
    /// The metros, each with its PoPs and the regions it serves.
    pub metros: Vec<Metro>,
}

fn default_trust_domain() -> String {
    "fedmesh.test".into()
}

fn default_store_processes() -> usize {
    4
}

/// A metro: where PoPs stand; its regions' stores reach it first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Metro {
    /// The metro's name (a SPIFFE path segment).
    pub name: String,
    /// PoPs in the metro (they share its SVID).
    pub pops: usize,
    /// Regions whose stores this metro serves. Stores (in id order) are dealt to all
    /// regions of all metros in turn.
    pub regions: Vec<String>,
}

/// Rounds and their deadlines.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoundsSection {
    /// Rounds to complete.
    pub count: u64,
    /// Fraction of online stores per round.
    pub fraction: f64,
    /// Fewest reports a round aggregates.
    #[serde(default = "default_min_cohort")]
    pub min_cohort: usize,
    /// Selected stores per wanted report.
    #[serde(default = "default_over_selection")]
    pub over_selection: f64,
    /// Largest share of a cohort one region may hold.
    #[serde(default = "default_region_cap")]
    pub region_cap: f64,
    /// Key advert phase, seconds.
    #[serde(default = "default_phase_s")]
    pub keys_s: u64,
    /// Share exchange phase, seconds.
    #[serde(default = "default_phase_s")]
    pub shares_s: u64,
    /// Training and upload phase, seconds.
    #[serde(default = "default_upload_s")]
    pub upload_s: u64,
    /// Unmask phase, seconds.
    #[serde(default = "default_phase_s")]
    pub unmask_s: u64,
    /// Evaluation phase, seconds.
    #[serde(default = "default_phase_s")]
    pub evaluation_s: u64,
    /// Held-out evaluators per round.
    #[serde(default = "default_evaluators")]
    pub evaluators: usize,
    /// Largest relative rise of evaluation loss that still publishes.
    #[serde(default = "default_regression")]
    pub regression_threshold: f64,
    /// Give up on the run after this many seconds.
    #[serde(default = "default_timeout_s")]
    pub timeout_s: u64,
}

fn default_min_cohort() -> usize {
    3
}
fn default_over_selection() -> f64 {
    1.3
}
fn default_region_cap() -> f64 {
    0.5
}
fn default_phase_s() -> u64 {
    3
}
fn default_upload_s() -> u64 {
    10
}
fn default_evaluators() -> usize {
    1
}
fn default_regression() -> f64 {
    0.05
}
fn default_timeout_s() -> u64 {
    3_600
}

/// Aggregation mode and strategy, and the stores' local training.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainingSection {
    /// `secure` or `trusted-pop`.
    #[serde(default = "default_mode")]
    pub mode: String,
    /// `fedavg`, `fedprox`, `qfedavg`, `fedadam` or `fedyogi`.
    pub strategy: String,
    /// FedProx proximal weight.
    #[serde(default)]
    pub mu: f64,
    /// Keep the output layer in each store (a personalised head).
    #[serde(default)]
    pub local_head: bool,
    /// Local epochs per round.
    #[serde(default = "default_epochs")]
    pub epochs: usize,
    /// Store learning rate.
    #[serde(default = "default_lr")]
    pub learning_rate: f64,
    /// Server learning rate (FedAdam, FedYogi).
    #[serde(default = "default_server_lr")]
    pub server_lr: f64,
    /// Measure the normalisation with a federated-statistics round before training, instead
    /// of writing the lab's pooled fit into the task.
    #[serde(default)]
    pub federated_statistics: bool,
}

fn default_mode() -> String {
    "secure".into()
}
fn default_epochs() -> usize {
    1
}
fn default_lr() -> f64 {
    1e-3
}
fn default_server_lr() -> f64 {
    0.01
}

/// Differential privacy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PrivacySection {
    /// `record` (DP-SGD in each store), `store`, or `none`.
    pub unit: String,
    /// Per-store epsilon budget.
    pub epsilon: f64,
    /// The delta the budget is stated at.
    pub delta: f64,
    /// DP-SGD noise over the clip norm.
    pub noise_multiplier: f64,
    /// DP-SGD per-example clip norm.
    pub clip_norm: f64,
    /// Expected Poisson batch size.
    pub expected_batch_size: usize,
}

impl Default for PrivacySection {
    fn default() -> Self {
        Self {
            unit: "none".into(),
            epsilon: 8.0,
            delta: 1e-5,
            noise_multiplier: 1.0,
            clip_norm: 1.0,
            expected_batch_size: 64,
        }
    }
}

/// Update compression.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CompressionSection {
    /// Quantisation bits per coordinate.
    pub quant_bits: u32,
    /// Per-coordinate clip of the quantiser.
    pub quant_clip: f64,
    /// Fraction of coordinates random-k keeps (1.0 keeps all).
    pub kept_fraction: f64,
}

impl Default for CompressionSection {
    fn default() -> Self {
        Self {
            quant_bits: 8,
            quant_clip: 0.1,
            kept_fraction: 1.0,
        }
    }
}

/// The WAN: named profiles and which stores get which.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WanSection {
    /// Turn the whole WAN emulation off (stores still reach PoPs through the anycast
    /// front, over perfect links).
    pub off: bool,
    /// Profile of stores no group names; a perfect link when absent.
    pub default: Option<String>,
    /// Named profiles.
    pub profiles: BTreeMap<String, WanProfile>,
    /// Groups of stores and their profile; the first group naming a store wins.
    pub groups: Vec<WanGroup>,
}

/// A group of stores sharing a WAN profile.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WanGroup {
    /// The profile's name.
    pub profile: String,
    /// Stores of these regions.
    #[serde(default)]
    pub regions: Vec<String>,
    /// Stores of these metros.
    #[serde(default)]
    pub metros: Vec<String>,
    /// These store ids.
    #[serde(default)]
    pub stores: Vec<String>,
    /// A share (0-1) of all stores, picked with the scenario's seed.
    #[serde(default)]
    pub share: Option<f64>,
}

/// Faults to inject.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Faults {
    /// Stores dropping out of rounds.
    pub churn: Option<Churn>,
    /// PoPs killed or drained.
    pub pops: Vec<PopFault>,
    /// Core restarts.
    pub core: Vec<CoreFault>,
    /// Adversarial stores.
    pub adversaries: Vec<Adversary>,
    /// WAN outages that start at a round's phase.
    pub outages: Vec<Outage>,
    /// Store-agent processes killed at a round's phase and started again.
    pub stores: Vec<StoreFault>,
}

/// A store-agent process (1-based, in the order the lab starts them) killed with SIGKILL
/// when `round` reaches `phase`, and started again on the same state `restart_after_s`
/// seconds later, as after a crash or a power cut.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreFault {
    /// Which store-agent process.
    pub process: usize,
    /// The round.
    pub round: u64,
    /// The phase: `keys`, `shares`, `upload`, `unmask`.
    #[serde(default = "default_outage_phase")]
    pub phase: String,
    /// Seconds until it is started again.
    #[serde(default = "default_restart_after_s")]
    pub restart_after_s: u64,
}

fn default_restart_after_s() -> u64 {
    2
}

/// A WAN outage: at `round`'s `phase`, a share of the honest stores lose their links for
/// `duration_s` seconds; their queued updates are delivered when the links return, or their
/// rounds close without them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Outage {
    /// The round it starts in.
    pub round: u64,
    /// The phase it starts at: `keys`, `shares`, `upload`, `unmask`.
    #[serde(default = "default_outage_phase")]
    pub phase: String,
    /// How long the links stay down, seconds.
    pub duration_s: u64,
    /// Share of the honest stores cut (0-1), chosen with the scenario's seed.
    #[serde(default = "default_outage_share")]
    pub share: f64,
}

fn default_outage_phase() -> String {
    "upload".into()
}

fn default_outage_share() -> f64 {
    1.0
}

/// Store churn: a share of each round's cohort loses its link at one phase and comes back
/// for the next round.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Churn {
    /// Share of the cohort (0-1).
    pub share: f64,
    /// The phase at which they drop: `keys`, `shares`, `upload`, `unmask`, or `any`
    /// (one of these at random per store).
    #[serde(default = "default_churn_phase")]
    pub phase: String,
}

fn default_churn_phase() -> String {
    "any".into()
}

/// A PoP fault.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PopFault {
    /// The PoP, `<metro>-<n>` with n from 1.
    pub pop: String,
    /// `kill` (SIGKILL) or `drain` (SIGUSR1: withdraw and finish).
    pub action: String,
    /// The round during which it happens.
    pub round: u64,
    /// The phase of that round (`keys`, `shares`, `upload`, `unmask`); `upload` by default.
    #[serde(default = "default_fault_phase")]
    pub phase: String,
    /// With `kill`: once the phase is reached, wait (up to the rest of the round's upload
    /// window) until the PoP has folded this many more updates (its `/metrics`), so that
    /// it dies holding accepted updates it may not have forwarded. 0, the default: at once.
    #[serde(default)]
    pub after_uploads: u64,
}

fn default_fault_phase() -> String {
    "upload".into()
}

/// Core restarted (SIGKILL, then started again on the same state) during a round.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CoreFault {
    /// The round.
    pub round: u64,
    /// The phase.
    #[serde(default = "default_fault_phase")]
    pub phase: String,
}

/// Adversarial stores: `count` extra stores (or taken from the real ones when `stores` is
/// set) behaving as `kind`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Adversary {
    /// `rogue-identity`, `outdated-runtime`, `stale-replay`, `oversized-update`,
    /// `nan-values` or `scaled-update`.
    pub kind: String,
    /// These store ids behave so.
    #[serde(default)]
    pub stores: Vec<String>,
    /// The factor of `scaled-update`.
    #[serde(default)]
    pub scale: Option<f64>,
}

/// Adversary kinds the scenario format knows.
pub const ADVERSARY_KINDS: [&str; 6] = [
    "rogue-identity",
    "outdated-runtime",
    "stale-replay",
    "oversized-update",
    "nan-values",
    "scaled-update",
];

/// Phases faults may name.
pub const PHASES: [&str; 4] = ["keys", "shares", "upload", "unmask"];

/// Why a scenario is unusable.
#[derive(Debug, thiserror::Error)]
pub enum ScenarioError {
    /// The file cannot be read.
    #[error("cannot read scenario {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The TOML does not parse into a scenario.
    #[error("scenario {path}: {source}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The cause, naming the key.
        source: toml::de::Error,
    },
    /// A value is out of range or refers to something missing.
    #[error("scenario {path}: `{key}` {problem}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// The key.
        key: String,
        /// What is wrong.
        problem: String,
    },
}

impl Scenario {
    /// Reads and checks a scenario file, making its paths absolute.
    ///
    /// # Errors
    /// [`ScenarioError`] naming the file and the key.
    pub fn from_path(path: &Path) -> Result<Self, ScenarioError> {
        let text = std::fs::read_to_string(path).map_err(|source| ScenarioError::Read {
            path: path.to_owned(),
            source,
        })?;
        let mut scenario: Self = toml::from_str(&text).map_err(|source| ScenarioError::Parse {
            path: path.to_owned(),
            source,
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        scenario.data.dir = base.join(&scenario.data.dir);
        scenario.data.spec = base.join(&scenario.data.spec);
        scenario
            .validate()
            .map_err(|(key, problem)| ScenarioError::Invalid {
                path: path.to_owned(),
                key,
                problem,
            })?;
        Ok(scenario)
    }

    /// Checks ranges and cross-references; returns the key and the problem.
    fn validate(&self) -> Result<(), (String, String)> {
        let bad = |key: &str, problem: String| Err((key.to_owned(), problem));
        if self.topology.metros.is_empty() {
            return bad("topology.metros", "is empty".into());
        }
        if self.topology.store_processes == 0 {
            return bad("topology.store_processes", "must be at least 1".into());
        }
        let mut regions = BTreeSet::new();
        for metro in &self.topology.metros {
            if metro.pops == 0 || metro.regions.is_empty() {
                return bad(
                    "topology.metros",
                    format!("{} needs pops and regions", metro.name),
                );
            }
            for region in &metro.regions {
                if !regions.insert(region.as_str()) {
                    return bad(
                        "topology.metros",
                        format!("region {region} is in two metros"),
                    );
                }
            }
        }
        if !(self.rounds.fraction > 0.0 && self.rounds.fraction <= 1.0) {
            return bad("rounds.fraction", "must be in (0, 1]".into());
        }
        if !["secure", "trusted-pop"].contains(&self.training.mode.as_str()) {
            return bad(
                "training.mode",
                format!("{:?} is not secure or trusted-pop", self.training.mode),
            );
        }
        let strategies = ["fedavg", "fedprox", "qfedavg", "fedadam", "fedyogi"];
        if !strategies.contains(&self.training.strategy.as_str()) {
            return bad(
                "training.strategy",
                format!("{:?} is unknown", self.training.strategy),
            );
        }
        if !["record", "store", "none"].contains(&self.privacy.unit.as_str()) {
            return bad(
                "privacy.unit",
                format!("{:?} is not record, store or none", self.privacy.unit),
            );
        }
        for (name, profile) in &self.wan.profiles {
            profile
                .validate()
                .map_err(|e| (format!("wan.profiles.{name}"), e.to_string()))?;
        }
        let names: Vec<&String> = self
            .wan
            .default
            .iter()
            .chain(self.wan.groups.iter().map(|g| &g.profile))
            .collect();
        for name in names {
            if !self.wan.profiles.contains_key(name) {
                return bad("wan", format!("profile {name:?} is not defined"));
            }
        }
        if let Some(churn) = &self.faults.churn
            && (!(0.0..=1.0).contains(&churn.share)
                || !(churn.phase == "any" || PHASES.contains(&churn.phase.as_str())))
        {
            return bad(
                "faults.churn",
                "share must be 0-1 and phase a known phase".into(),
            );
        }
        let pops = self.pop_names();
        for fault in &self.faults.pops {
            if !pops.contains(&fault.pop) || !["kill", "drain"].contains(&fault.action.as_str()) {
                return bad(
                    "faults.pops",
                    format!("{} {} is unknown", fault.action, fault.pop),
                );
            }
        }
        for fault in &self.faults.stores {
            if fault.process == 0
                || fault.process > self.topology.store_processes
                || !PHASES.contains(&fault.phase.as_str())
            {
                return bad(
                    "faults.stores",
                    format!(
                        "process must be 1 to {} and phase a known phase",
                        self.topology.store_processes
                    ),
                );
            }
        }
        for outage in &self.faults.outages {
            if !(0.0..=1.0).contains(&outage.share)
                || !PHASES.contains(&outage.phase.as_str())
                || outage.duration_s == 0
            {
                return bad(
                    "faults.outages",
                    "share must be 0-1, phase a known phase and duration_s positive".into(),
                );
            }
        }
        for adversary in &self.faults.adversaries {
            if !ADVERSARY_KINDS.contains(&adversary.kind.as_str()) {
                return bad(
                    "faults.adversaries",
                    format!("kind {:?} is unknown", adversary.kind),
                );
            }
        }
        Ok(())
    }

    /// Every PoP's name, `<metro>-<n>`.
    pub fn pop_names(&self) -> Vec<String> {
        self.topology
            .metros
            .iter()
            .flat_map(|m| (1..=m.pops).map(move |n| format!("{}-{n}", m.name)))
            .collect()
    }

    /// Every region with its metro, in the order stores are dealt to them.
    pub fn regions(&self) -> Vec<(String, String)> {
        self.topology
            .metros
            .iter()
            .flat_map(|m| m.regions.iter().map(|r| (r.clone(), m.name.clone())))
            .collect()
    }

    /// Deals `store_ids` (in the given order) to regions in turn: `(store, region, metro)`.
    pub fn place_stores(&self, store_ids: &[String]) -> Vec<(String, String, String)> {
        let regions = self.regions();
        store_ids
            .iter()
            .enumerate()
            .map(|(i, id)| {
                let (region, metro) = &regions[i % regions.len()];
                (id.clone(), region.clone(), metro.clone())
            })
            .collect()
    }

    /// The WAN profile of a store, with `share` groups resolved by the store's position in
    /// a seeded order (`rank` in `[0, 1)`).
    pub fn profile_for(&self, store: &str, region: &str, metro: &str, rank: f64) -> WanProfile {
        if self.wan.off {
            return WanProfile::default();
        }
        let group = self.wan.groups.iter().find(|g| {
            g.stores.iter().any(|s| s == store)
                || g.regions.iter().any(|r| r == region)
                || g.metros.iter().any(|m| m == metro)
                || g.share.is_some_and(|share| rank < share)
        });
        let name = group.map(|g| &g.profile).or(self.wan.default.as_ref());
        name.and_then(|n| self.wan.profiles.get(n))
            .cloned()
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shipped(name: &str) -> Scenario {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("scenarios")
            .join(name);
        Scenario::from_path(&path).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn the_main_job_has_83_stores_in_three_metros_of_two_pops() {
        let s = shipped("dominicks-oj.toml");
        assert_eq!(s.data.stores, Some(83));
        assert_eq!(s.topology.metros.len(), 3);
        assert!(s.topology.metros.iter().all(|m| m.pops == 2));
        assert_eq!(s.training.mode, "secure");
        // FedProx: the proximal term at the stores, FedAdam's step at core.
        assert_eq!(s.training.strategy, "fedadam");
        assert!(s.training.mu > 0.0);
        assert!(s.training.local_head);
        assert_eq!(
            (s.privacy.unit.as_str(), s.privacy.epsilon),
            ("record", 8.0)
        );
        assert_eq!(s.compression.quant_bits, 8);
        assert_eq!(s.faults.churn.as_ref().map(|c| c.share), Some(0.1));
        assert_eq!(s.faults.pops.len(), 1);
        assert_eq!(s.faults.pops[0].round, s.rounds.count / 2);
        assert!(s.data.dir.join("sales.csv.gz").exists());
        assert!(s.data.spec.exists());
    }

    /// Without a budget capping how often a store trains, the no-DP job runs a larger cohort
    /// for more rounds (task_config::NO_DP against DP); everything else is the main job's,
    /// the PoP kill half way included.
    #[test]
    fn the_no_dp_job_differs_only_in_privacy_and_its_cohort() {
        let mut dp = shipped("dominicks-oj.toml");
        let nodp = shipped("dominicks-oj-nodp.toml");
        assert_eq!(nodp.privacy.unit, "none");
        assert_eq!(nodp.faults.pops[0].round, nodp.rounds.count / 2);
        dp.name = nodp.name.clone();
        dp.description = nodp.description.clone();
        dp.privacy = nodp.privacy.clone();
        dp.rounds.count = nodp.rounds.count;
        dp.rounds.fraction = nodp.rounds.fraction;
        dp.faults.pops = nodp.faults.pops.clone();
        assert_eq!(dp, nodp);
    }

    #[test]
    fn every_shipped_scenario_parses() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios");
        for entry in std::fs::read_dir(dir).expect("scenarios dir") {
            let path = entry.expect("entry").path();
            if path.extension().is_some_and(|e| e == "toml") {
                Scenario::from_path(&path).unwrap_or_else(|e| panic!("{e}"));
            }
        }
    }

    #[test]
    fn stores_are_dealt_to_regions_in_turn() {
        let s = shipped("dominicks-oj.toml");
        let ids: Vec<String> = (0..7).map(|i| i.to_string()).collect();
        let placed = s.place_stores(&ids);
        let regions = s.regions();
        assert_eq!(placed[0].1, regions[0].0);
        assert_eq!(placed[regions.len()].1, regions[0].0);
        assert_eq!(placed[1].2, regions[1 % regions.len()].1);
    }

    #[test]
    fn unknown_keys_and_undefined_profiles_are_refused_by_name() {
        let dir = tempfile::tempdir().expect("tempdir");
        let base = include_str!("../scenarios/dominicks-oj.toml");
        let path = dir.path().join("s.toml");
        std::fs::write(&path, format!("{base}\n[extra]\nx = 1\n")).expect("write");
        let err = Scenario::from_path(&path).expect_err("unknown key");
        assert!(err.to_string().contains("extra"), "{err}");
        let bad = base.replace("default = \"retail\"", "default = \"nowhere\"");
        std::fs::write(&path, bad).expect("write");
        let err = Scenario::from_path(&path).expect_err("undefined profile");
        assert!(err.to_string().contains("nowhere"), "{err}");
    }
}
