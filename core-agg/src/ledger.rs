//! The privacy ledger: epsilon per store per model over a rolling window.
//!
//! Core is authoritative for every store's spend. It never takes a store's own figure: it
//! recomputes each charge from the plan and what the store reported, composes the charges
//! inside the window in RDP (with [`fedmesh_protocol::accountant`]) and converts the total
//! to epsilon at the ledger's delta. Both units of DESIGN.md are kept apart, each with its
//! own budget:
//!
//! - **record**: the store's own DP-SGD, a Poisson-subsampled Gaussian with rate
//!   `q = min(1, batch / examples)` run `epochs * max(1, examples / batch)` steps (integer
//!   division: whole batches per epoch), where batch, epochs and noise come from the plan
//!   and examples from the store's report;
//! - **store**: distributed noise over the cohort, one step per round with
//!   `q = cohort / eligible`, charged to every store that was eligible for sampling,
//!   selected or not.
//!
//! A store is alarmed (a `warn` event and a flag in its status) at 80% of a budget and
//! left out of selection at 100%. Charges older than the window stop counting, so a store
//! regains budget as they age out. The ledger is pure: time is passed in; [`save`] and
//! [`load`] persist it atomically.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use fedmesh_protocol::accountant::{
    AccountantError, default_orders, epsilon_from_rdp, poisson_gaussian_rdp,
};
use fedmesh_protocol::ids::{RoundId, StoreId};
use serde::{Deserialize, Serialize};

use crate::{ModelId, Timestamp};

/// Thirty days, the default window.
pub const DEFAULT_WINDOW_SECS: u64 = 30 * 24 * 3600;

/// Why a charge or a query failed.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    /// The mechanism's parameters are invalid (bad plan or report).
    #[error("invalid DP mechanism")]
    Mechanism(#[from] AccountantError),
    /// A store reported no examples, so it cannot have trained.
    #[error("store {0} reported 0 examples")]
    NoExamples(StoreId),
    /// The plan's expected batch size or epochs are zero.
    #[error("record-level plan needs a positive batch size and epochs, got {batch} and {epochs}")]
    RecordPlan {
        /// Expected batch size in the plan.
        batch: u64,
        /// Local epochs in the plan.
        epochs: u64,
    },
    /// The cohort is empty or larger than the eligible stores it was drawn from.
    #[error("cohort of {cohort} cannot be drawn from {eligible} eligible stores")]
    Cohort {
        /// Stores in the cohort.
        cohort: usize,
        /// Stores eligible for sampling.
        eligible: usize,
    },
    /// The ledger file could not be read or written.
    #[error("ledger file {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The ledger file is not a ledger.
    #[error("ledger file {path} is corrupt: {source}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What failed to parse.
        source: serde_json::Error,
    },
}

/// The unit a charge protects; each has its own budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PrivacyUnit {
    /// A row of a store's data.
    Record,
    /// A store's whole contribution.
    Store,
}

/// Budgets and accounting parameters.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LedgerConfig {
    /// Length of the rolling window, seconds.
    pub window_secs: u64,
    /// Delta at which epsilon is reported.
    pub delta: f64,
    /// Record-level epsilon budget per store per model per window.
    pub record_budget: f64,
    /// Store-level epsilon budget per store per model per window.
    pub store_budget: f64,
    /// Fraction of a budget at which the store is alarmed.
    pub alarm_fraction: f64,
}

impl Default for LedgerConfig {
    fn default() -> Self {
        Self {
            window_secs: DEFAULT_WINDOW_SECS,
            delta: 1e-5,
            record_budget: 8.0,
            store_budget: 8.0,
            alarm_fraction: 0.8,
        }
    }
}

/// A run of the Poisson-subsampled Gaussian mechanism.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Mechanism {
    /// Sampling rate.
    pub q: f64,
    /// Noise multiplier.
    pub sigma: f64,
    /// Runs.
    pub steps: u64,
}

/// The record-level DP parameters of a plan.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RecordDpPlan {
    /// Expected batch size of the Poisson-sampled batches.
    pub batch: u64,
    /// Local epochs.
    pub epochs: u64,
    /// DP-SGD noise multiplier.
    pub noise_multiplier: f64,
}

impl RecordDpPlan {
    /// The DP-SGD run of a store that trained on `examples` rows under this plan.
    ///
    /// # Errors
    ///
    /// [`LedgerError::RecordPlan`] for a zero batch or epochs and
    /// [`LedgerError::NoExamples`] when `examples` is 0.
    pub fn mechanism(&self, store: &StoreId, examples: u64) -> Result<Mechanism, LedgerError> {
        if self.batch == 0 || self.epochs == 0 {
            return Err(LedgerError::RecordPlan {
                batch: self.batch,
                epochs: self.epochs,
            });
        }
        if examples == 0 {
            return Err(LedgerError::NoExamples(store.clone()));
        }
        let q = (self.batch as f64 / examples as f64).min(1.0);
        let steps = self.epochs.saturating_mul((examples / self.batch).max(1));
        Ok(Mechanism {
            q,
            sigma: self.noise_multiplier,
            steps,
        })
    }
}

/// One charge against a store.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Charge {
    at: Timestamp,
    round: RoundId,
    unit: PrivacyUnit,
    mechanism: Mechanism,
}

/// A store's charges for one model, and whether it has been alarmed for each unit.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct Account {
    charges: Vec<Charge>,
    record_alarmed: bool,
    store_alarmed: bool,
}

/// Where a store stands in one unit.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct UnitStatus {
    /// Epsilon spent inside the window.
    pub spent: f64,
    /// The budget.
    pub budget: f64,
    /// `budget - spent`, never below 0.
    pub remaining: f64,
    /// Whether `spent` has reached the alarm fraction of the budget.
    pub alarm: bool,
    /// Whether `spent` has reached the budget.
    pub exhausted: bool,
}

/// Where a store stands for one model: what PoPs get as policy input.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct StoreStatus {
    /// Record-level spend.
    pub record: UnitStatus,
    /// Store-level spend.
    pub store: UnitStatus,
}

impl StoreStatus {
    /// Whether the store must be left out of selection: a budget is used up.
    pub fn excluded(&self) -> bool {
        self.record.exhausted || self.store.exhausted
    }
}

/// Epsilon per store per model over a rolling window.
#[derive(Debug, Serialize, Deserialize)]
pub struct Ledger {
    config: LedgerConfig,
    accounts: BTreeMap<ModelId, BTreeMap<StoreId, Account>>,
    /// RDP curves by mechanism `(q, sigma)` bits: a store's rate barely changes between
    /// rounds, so most charges reuse a curve.
    #[serde(skip)]
    curves: Mutex<HashMap<(u64, u64), Vec<f64>>>,
}

impl Ledger {
    /// An empty ledger.
    pub fn new(config: LedgerConfig) -> Self {
        Self {
            config,
            accounts: BTreeMap::new(),
            curves: Mutex::new(HashMap::new()),
        }
    }

    /// The ledger's configuration.
    pub fn config(&self) -> &LedgerConfig {
        &self.config
    }

    /// Charges a store's record-level DP-SGD in a round, recomputed from the plan and the
    /// example count the store reported; returns its status afterwards.
    ///
    /// # Errors
    ///
    /// As [`RecordDpPlan::mechanism`], and [`LedgerError::Mechanism`] for an invalid
    /// noise multiplier. Nothing is charged on error.
    pub fn charge_record(
        &mut self,
        model: &ModelId,
        store: &StoreId,
        round: RoundId,
        now: Timestamp,
        plan: &RecordDpPlan,
        examples: u64,
    ) -> Result<StoreStatus, LedgerError> {
        let mechanism = plan.mechanism(store, examples)?;
        self.curve(mechanism.q, mechanism.sigma)?;
        let charge = Charge {
            at: now,
            round,
            unit: PrivacyUnit::Record,
            mechanism,
        };
        Ok(self.add(model, store, charge, now))
    }

    /// Charges one round of store-level noise to every eligible store: the cohort of
    /// `cohort` stores was sampled from `eligible`. Returns each store's status afterwards.
    ///
    /// # Errors
    ///
    /// [`LedgerError::Cohort`] for an empty cohort or one larger than `eligible`, and
    /// [`LedgerError::Mechanism`] for an invalid noise multiplier. Nothing is charged on
    /// error.
    pub fn charge_store_level(
        &mut self,
        model: &ModelId,
        round: RoundId,
        now: Timestamp,
        noise_multiplier: f64,
        cohort: usize,
        eligible: &[StoreId],
    ) -> Result<Vec<(StoreId, StoreStatus)>, LedgerError> {
        if cohort == 0 || cohort > eligible.len() {
            return Err(LedgerError::Cohort {
                cohort,
                eligible: eligible.len(),
            });
        }
        let mechanism = Mechanism {
            q: cohort as f64 / eligible.len() as f64,
            sigma: noise_multiplier,
            steps: 1,
        };
        self.curve(mechanism.q, mechanism.sigma)?;

        let mut statuses = Vec::with_capacity(eligible.len());
        for store in eligible {
            let charge = Charge {
                at: now,
                round,
                unit: PrivacyUnit::Store,
                mechanism,
            };
            statuses.push((store.clone(), self.add(model, store, charge, now)));
        }
        Ok(statuses)
    }

    /// A store's spend, budgets and flags for a model at `now`.
    pub fn status(&self, model: &ModelId, store: &StoreId, now: Timestamp) -> StoreStatus {
        let account = self
            .accounts
            .get(model)
            .and_then(|stores| stores.get(store));
        let charges = account.map(|a| a.charges.as_slice()).unwrap_or_default();
        StoreStatus {
            record: self.unit_status(charges, PrivacyUnit::Record, now),
            store: self.unit_status(charges, PrivacyUnit::Store, now),
        }
    }

    /// Whether a store must be left out of selection for a model at `now`.
    pub fn excluded(&self, model: &ModelId, store: &StoreId, now: Timestamp) -> bool {
        self.status(model, store, now).excluded()
    }

    /// Whether charging `planned` (unit and mechanism) at `now` would take the store past
    /// a budget. Selection that must keep every store within budget leaves out such stores,
    /// not only those already exhausted.
    ///
    /// # Errors
    ///
    /// [`LedgerError::Mechanism`] for a planned mechanism with invalid parameters.
    pub fn would_exceed(
        &self,
        model: &ModelId,
        store: &StoreId,
        now: Timestamp,
        planned: &[(PrivacyUnit, Mechanism)],
    ) -> Result<bool, LedgerError> {
        let account = self
            .accounts
            .get(model)
            .and_then(|stores| stores.get(store));
        let mut charges = account.map(|a| a.charges.clone()).unwrap_or_default();
        for &(unit, mechanism) in planned {
            self.curve(mechanism.q, mechanism.sigma)?;
            charges.push(Charge {
                at: now,
                round: RoundId(0),
                unit,
                mechanism,
            });
        }
        let record = self.unit_status(&charges, PrivacyUnit::Record, now);
        let store_level = self.unit_status(&charges, PrivacyUnit::Store, now);
        Ok(record.spent > record.budget || store_level.spent > store_level.budget)
    }

    /// Drops charges that have left the window, so that the ledger stays bounded.
    pub fn prune(&mut self, now: Timestamp) {
        let start = self.window_start(now);
        for stores in self.accounts.values_mut() {
            for account in stores.values_mut() {
                account.charges.retain(|c| c.at > start);
            }
            stores.retain(|_, account| !account.charges.is_empty());
        }
        self.accounts.retain(|_, stores| !stores.is_empty());
    }

    /// Appends a charge and raises the alarm if it crosses the alarm level.
    fn add(
        &mut self,
        model: &ModelId,
        store: &StoreId,
        charge: Charge,
        now: Timestamp,
    ) -> StoreStatus {
        // The account is taken out while the status is computed, which needs `&self`.
        let stores = self.accounts.entry(model.clone()).or_default();
        let mut account = stores.remove(store).unwrap_or_default();
        let unit = charge.unit;
        account.charges.push(charge);
        let status = StoreStatus {
            record: self.unit_status(&account.charges, PrivacyUnit::Record, now),
            store: self.unit_status(&account.charges, PrivacyUnit::Store, now),
        };

        // Alarm once per crossing; the flag resets when old charges age out.
        let (alarmed, unit_status) = match unit {
            PrivacyUnit::Record => (&mut account.record_alarmed, status.record),
            PrivacyUnit::Store => (&mut account.store_alarmed, status.store),
        };
        if unit_status.alarm && !*alarmed {
            tracing::warn!(
                model.id = %model, store.id = %store, unit = ?unit,
                epsilon = unit_status.spent, budget = unit_status.budget,
                excluded = unit_status.exhausted,
                "store reached its privacy budget alarm level"
            );
        }
        *alarmed = unit_status.alarm;
        self.accounts
            .entry(model.clone())
            .or_default()
            .insert(store.clone(), account);
        status
    }

    fn unit_status(&self, charges: &[Charge], unit: PrivacyUnit, now: Timestamp) -> UnitStatus {
        let budget = match unit {
            PrivacyUnit::Record => self.config.record_budget,
            PrivacyUnit::Store => self.config.store_budget,
        };
        let spent = self.spent(charges, unit, now);
        UnitStatus {
            spent,
            budget,
            remaining: (budget - spent).max(0.0),
            alarm: spent >= self.config.alarm_fraction * budget,
            exhausted: spent >= budget,
        }
    }

    /// Epsilon of the charges of `unit` made since the start of the window ending at `now`.
    fn spent(&self, charges: &[Charge], unit: PrivacyUnit, now: Timestamp) -> f64 {
        let start = self.window_start(now);
        let orders = default_orders();
        let mut total = vec![0.0; orders.len()];
        let mut any = false;
        // A charge stamped after `now` still counts: after a clock step back (or a status
        // asked for an earlier time) it is spend the store already made, not spend to come.
        for charge in charges.iter().filter(|c| c.unit == unit && c.at > start) {
            let m = charge.mechanism;
            // Charges were validated when made, and a file that fails here is corrupt: an
            // unreadable spend counts as unbounded rather than as nothing.
            let Ok(curve) = self.curve(m.q, m.sigma) else {
                return f64::INFINITY;
            };
            for (t, c) in total.iter_mut().zip(curve) {
                *t += m.steps as f64 * c;
            }
            any = true;
        }
        if !any {
            return 0.0;
        }
        epsilon_from_rdp(&orders, &total, self.config.delta)
            .map(|g| g.epsilon)
            .unwrap_or(f64::INFINITY)
    }

    fn curve(&self, q: f64, sigma: f64) -> Result<Vec<f64>, AccountantError> {
        let key = (q.to_bits(), sigma.to_bits());
        // A poisoned lock only means another thread panicked mid-insert; the map is a
        // cache, so start it afresh.
        let mut curves = self.curves.lock().unwrap_or_else(|poisoned| {
            let mut guard = poisoned.into_inner();
            guard.clear();
            guard
        });
        if let Some(curve) = curves.get(&key) {
            return Ok(curve.clone());
        }
        let curve = poisson_gaussian_rdp(q, sigma, &default_orders())?;
        curves.insert(key, curve.clone());
        Ok(curve)
    }

    fn window_start(&self, now: Timestamp) -> Timestamp {
        Timestamp(now.0.saturating_sub(self.config.window_secs))
    }
}

/// Writes the ledger to `path` atomically: a temporary file in the same directory, synced,
/// then renamed over the old one, so a crash leaves either the old or the new ledger.
///
/// # Errors
///
/// [`LedgerError::Io`] if any step fails; the old file is then untouched.
pub fn save(ledger: &Ledger, path: &Path) -> Result<(), LedgerError> {
    let io = |source| LedgerError::Io {
        path: path.to_owned(),
        source,
    };
    let bytes = serde_json::to_vec(ledger).map_err(|e| io(std::io::Error::other(e)))?;
    crate::atomic_write(path, &bytes).map_err(io)
}

/// Reads a ledger written by [`save`]; a missing file is an empty ledger with `config`.
///
/// # Errors
///
/// [`LedgerError::Io`] if the file cannot be read and [`LedgerError::Corrupt`] if it does
/// not parse.
pub fn load(path: &Path, config: LedgerConfig) -> Result<Ledger, LedgerError> {
    let bytes = match fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Ledger::new(config)),
        Err(source) => {
            return Err(LedgerError::Io {
                path: path.to_owned(),
                source,
            });
        }
    };
    let mut ledger: Ledger =
        serde_json::from_slice(&bytes).map_err(|source| LedgerError::Corrupt {
            path: path.to_owned(),
            source,
        })?;
    // The budgets in force are the operator's current ones, not those of the last run.
    ledger.config = config;
    Ok(ledger)
}
