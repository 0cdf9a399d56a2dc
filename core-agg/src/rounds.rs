//! The round state machine: plan, select, collect, unmask, aggregate, evaluate, publish.
//!
//! A [`Round`] does no I/O and reads no clock. The driver (the core service, the lab, a
//! test) calls it in this order:
//!
//! 1. [`Round::plan`] with the round's id, model version, configuration and seed;
//! 2. [`Round::poll`] whenever time passes or the set of online stores changes: it selects
//!    the cohort, replaces stores that miss the soft deadline, and ends phases whose
//!    deadline has passed;
//! 3. [`Round::handle_report`] for each store's report that its update was uploaded;
//! 4. [`Round::handle_unmasked`] once secure aggregation has removed the masks (or failed),
//!    [`Round::handle_aggregated`] once the strategy made a candidate,
//!    [`Round::handle_evaluation`] for each held-out store's metrics, and
//!    [`Round::handle_published`] once the registry holds the candidate;
//! 5. [`Round::poll_event`] after each call, to learn what to send or record.
//!
//! Every phase has a deadline, so a round always ends, committed or abandoned with a
//! reason, whoever disappears. Messages carry the round id and model version; anything for
//! another round or version, from a store outside the cohort, duplicated, late or in the
//! wrong phase is rejected, counted, and never reaches a sum.
//!
//! A round serialises whole (serde), so core can save it after every call and carry on
//! after a restart.
//!
//! Secure aggregation (`fedmesh_protocol::secagg`) runs between collection and
//! aggregation: [`Round::survivors`] and [`Round::dropped`] tell it whose masks to remove,
//! and it answers through [`Round::handle_unmasked`].

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use fedmesh_protocol::ids::{ModelVersion, Region, RoundId, StoreId};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha20Rng;
use serde::{Deserialize, Serialize};

use crate::Timestamp;

/// Most examples one store may claim to have evaluated. A report above it is refused: a
/// store with a huge count would otherwise outweigh every other evaluator.
pub const MAX_EVALUATION_EXAMPLES: u64 = 1 << 40;

/// How a round selects and how long each phase may take.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RoundConfig {
    /// Fraction of the eligible online stores that should report.
    pub fraction: f64,
    /// Fewest reports a round may aggregate; also the smallest target.
    pub min_reports: usize,
    /// Selected stores per wanted report, to absorb dropouts (1.3 selects 130%).
    pub over_selection: f64,
    /// Largest share of the selected cohort any one region may hold.
    pub region_cap: f64,
    /// Seconds selection may wait for enough eligible stores.
    pub selection_timeout_secs: u64,
    /// Seconds after selection when silent stores are dropped and may be replaced.
    pub soft_deadline_secs: u64,
    /// Seconds after selection when collection ends.
    pub reporting_deadline_secs: u64,
    /// Seconds each later phase (unmask, aggregate, evaluate, publish) may take.
    pub phase_timeout_secs: u64,
    /// Fewest evaluation reports needed to judge the candidate.
    pub min_evaluations: usize,
    /// Largest relative rise in evaluation loss over the current model that still ships.
    pub regression_threshold: f64,
}

impl Default for RoundConfig {
    fn default() -> Self {
        Self {
            fraction: 0.1,
            min_reports: 3,
            over_selection: 1.3,
            region_cap: 0.5,
            selection_timeout_secs: 300,
            soft_deadline_secs: 900,
            reporting_deadline_secs: 1800,
            phase_timeout_secs: 600,
            min_evaluations: 1,
            regression_threshold: 0.02,
        }
    }
}

/// A store that is online now, with its region for the caps.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OnlineStore {
    /// The store.
    pub id: StoreId,
    /// Its region.
    pub region: Region,
}

/// Where a round is.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Phase {
    /// Waiting for enough eligible online stores.
    Selecting,
    /// Waiting for the cohort's reports.
    Collecting,
    /// Waiting for secure aggregation to remove the masks.
    Unmasking,
    /// Waiting for the strategy to produce a candidate.
    Aggregating,
    /// Waiting for the held-out stores' metrics.
    Evaluating,
    /// Waiting for the registry to hold the candidate.
    Publishing,
    /// Over.
    Ended(Outcome),
}

/// How a round ended.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Outcome {
    /// The candidate was published as this version.
    Committed(ModelVersion),
    /// A statistics round's sum was decoded; there is no model to publish.
    Measured,
    /// The round was given up; the current model stays.
    Abandoned(AbandonReason),
}

/// Why a round was abandoned.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, thiserror::Error)]
pub enum AbandonReason {
    /// Too few stores to select, or too few reports by the reporting deadline.
    #[error("quorum not met while {phase}: {have} stores, {need} needed")]
    QuorumNotMet {
        /// `selecting` or `collecting`.
        phase: String,
        /// Stores available or reports received.
        have: usize,
        /// Stores or reports needed.
        need: usize,
    },
    /// A phase ran past its deadline.
    #[error("{phase} timed out")]
    Timeout {
        /// The phase.
        phase: String,
    },
    /// Secure aggregation could not recover the sum.
    #[error("unmasking failed: {0}")]
    UnmaskFailed(String),
    /// The candidate's loss rose more than the threshold allows.
    #[error("candidate loss {candidate} regresses from {baseline}")]
    Regressed {
        /// Example-weighted evaluation loss of the candidate.
        candidate: f64,
        /// Loss of the current model.
        baseline: f64,
    },
    /// The registry refused or failed to publish.
    #[error("publish failed: {0}")]
    PublishFailed(String),
    /// The evaluation reports combine to a loss that is not a finite number.
    #[error("candidate loss {loss} is not finite")]
    NonFiniteLoss {
        /// The combined loss.
        loss: f64,
    },
}

/// Why a message was rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Rejection {
    /// It names another round.
    StaleRound,
    /// It names another model version.
    WrongVersion,
    /// It comes from a store outside the cohort (or the evaluation set).
    NotSelected,
    /// The store already reported.
    Duplicate,
    /// The round is not in the phase that takes it (a late report lands here).
    WrongPhase,
    /// Its content is unusable (no examples, a loss that is not a number).
    Invalid,
}

/// A store's report that its (masked) update was uploaded.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UpdateReport {
    /// The round it answers.
    pub round: RoundId,
    /// The model version it trained from.
    pub version: ModelVersion,
    /// The reporting store.
    pub store: StoreId,
    /// Examples it trained on (for the ledger and the weights).
    pub examples: u64,
}

/// A held-out store's evaluation of the candidate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvaluationReport {
    /// The round it answers.
    pub round: RoundId,
    /// The model version the round started from.
    pub version: ModelVersion,
    /// The evaluating store.
    pub store: StoreId,
    /// Examples evaluated.
    pub examples: u64,
    /// Mean loss of the candidate on them.
    pub loss: f64,
    /// Mean loss on the same rows of the version the round started from, if scored.
    pub baseline_loss: Option<f64>,
}

/// What the driver must act on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Event {
    /// Send the plan to these stores.
    Selected(Vec<StoreId>),
    /// These stores were dropped at the soft deadline and replaced by those.
    Replaced {
        /// Dropped stores.
        dropped: Vec<StoreId>,
        /// Their replacements.
        replacements: Vec<StoreId>,
    },
    /// Collection is over: unmask the sum of these stores' updates.
    Unmask(Vec<StoreId>),
    /// Send the candidate to these held-out stores to evaluate.
    Evaluate(Vec<StoreId>),
    /// Publish the candidate with this evaluation loss.
    Publish {
        /// Example-weighted mean loss of the candidate.
        loss: f64,
    },
    /// The round is over.
    Ended(Outcome),
}

/// Whether a candidate's loss rises more than `threshold` (relative) above the current
/// model's, or is not finite: such a candidate is not promoted.
pub fn regresses(candidate: f64, baseline: f64, threshold: f64) -> bool {
    // A loss that is not a number compares false with everything: refuse it outright.
    !candidate.is_finite() || candidate > baseline + threshold * baseline.abs()
}

/// One round of training.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Round {
    id: RoundId,
    version: ModelVersion,
    config: RoundConfig,
    seed: u64,
    phase: Phase,
    planned_at: Timestamp,
    phase_started: Timestamp,
    selected: BTreeMap<StoreId, Region>,
    target: usize,
    reports: BTreeMap<StoreId, u64>,
    dropped: BTreeSet<StoreId>,
    replaced: bool,
    /// The held-out stores chosen to evaluate; only their reports count.
    #[serde(default)]
    evaluators: BTreeSet<StoreId>,
    /// Examples, candidate loss and baseline loss per evaluator.
    evaluations: BTreeMap<StoreId, (u64, f64, Option<f64>)>,
    baseline_loss: Option<f64>,
    rejections: BTreeMap<Rejection, u64>,
    events: VecDeque<Event>,
}

impl Round {
    /// Plans a round: it starts selecting at `now`. `seed` makes selection reproducible;
    /// `baseline_loss` is the current model's evaluation loss, if known.
    pub fn plan(
        id: RoundId,
        version: ModelVersion,
        config: RoundConfig,
        seed: u64,
        baseline_loss: Option<f64>,
        now: Timestamp,
    ) -> Self {
        Self {
            id,
            version,
            config,
            seed,
            phase: Phase::Selecting,
            planned_at: now,
            phase_started: now,
            selected: BTreeMap::new(),
            target: 0,
            reports: BTreeMap::new(),
            dropped: BTreeSet::new(),
            replaced: false,
            evaluators: BTreeSet::new(),
            evaluations: BTreeMap::new(),
            baseline_loss,
            rejections: BTreeMap::new(),
            events: VecDeque::new(),
        }
    }

    /// The round's id.
    pub fn id(&self) -> RoundId {
        self.id
    }

    /// The phase.
    pub fn phase(&self) -> &Phase {
        &self.phase
    }

    /// The selected stores, replacements included.
    pub fn selected(&self) -> impl Iterator<Item = &StoreId> {
        self.selected.keys()
    }

    /// Reports wanted: the larger of the fraction of eligible stores and the minimum.
    pub fn target(&self) -> usize {
        self.target
    }

    /// Stores whose reports arrived in time, with their example counts.
    pub fn survivors(&self) -> &BTreeMap<StoreId, u64> {
        &self.reports
    }

    /// Selected stores that did not report (for secure aggregation's dropout recovery).
    pub fn dropped(&self) -> Vec<StoreId> {
        self.selected
            .keys()
            .filter(|s| !self.reports.contains_key(*s))
            .cloned()
            .collect()
    }

    /// Rejected messages by reason.
    pub fn rejections(&self) -> &BTreeMap<Rejection, u64> {
        &self.rejections
    }

    /// The next thing the driver must act on.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// Advances on time: selects when enough stores are eligible, replaces silent stores
    /// after the soft deadline, and ends any phase whose deadline has passed.
    /// `excluded` says which stores the ledger keeps out (budget used up).
    pub fn poll(
        &mut self,
        now: Timestamp,
        online: &[OnlineStore],
        excluded: &dyn Fn(&StoreId) -> bool,
    ) {
        let elapsed = now.0.saturating_sub(self.phase_started.0);
        match self.phase {
            Phase::Selecting => self.poll_selecting(now, online, excluded),
            Phase::Collecting => {
                if elapsed >= self.config.reporting_deadline_secs {
                    self.end_collection(now);
                } else if elapsed >= self.config.soft_deadline_secs && !self.replaced {
                    self.replace_silent(online, excluded);
                }
            }
            Phase::Ended(_) => {}
            ref phase => {
                if elapsed >= self.config.phase_timeout_secs {
                    let phase = format!("{phase:?}").to_lowercase();
                    self.abandon(AbandonReason::Timeout { phase });
                }
            }
        }
    }

    /// Takes a store's report that its update was uploaded.
    ///
    /// # Errors
    ///
    /// The [`Rejection`] (also counted) when the report is not for this round, version or
    /// cohort, is a duplicate, or comes outside collection.
    pub fn handle_report(
        &mut self,
        now: Timestamp,
        report: &UpdateReport,
    ) -> Result<(), Rejection> {
        self.check(report.round, report.version, Phase::Collecting)?;
        if !self.selected.contains_key(&report.store) || self.dropped.contains(&report.store) {
            return Err(self.reject(Rejection::NotSelected));
        }
        if self.reports.contains_key(&report.store) {
            return Err(self.reject(Rejection::Duplicate));
        }
        self.reports.insert(report.store.clone(), report.examples);
        if self.reports.len() >= self.target {
            self.end_collection(now);
        }
        Ok(())
    }

    /// Takes secure aggregation's answer: the sum was recovered, or why not.
    ///
    /// # Errors
    ///
    /// [`Rejection::StaleRound`] or [`Rejection::WrongPhase`] when it does not fit.
    pub fn handle_unmasked(
        &mut self,
        now: Timestamp,
        round: RoundId,
        result: Result<(), String>,
    ) -> Result<(), Rejection> {
        self.check(round, self.version, Phase::Unmasking)?;
        match result {
            Ok(()) => self.enter(Phase::Aggregating, now),
            Err(reason) => self.abandon(AbandonReason::UnmaskFailed(reason)),
        }
        Ok(())
    }

    /// Records that the strategy produced a candidate; evaluation starts on a held-out
    /// cohort drawn from the `online` stores that were never in the training cohort
    /// (`min_evaluations` over-selected as training is). With fewer such stores than
    /// `min_evaluations` the round is abandoned.
    ///
    /// # Errors
    ///
    /// [`Rejection::StaleRound`] or [`Rejection::WrongPhase`] when it does not fit.
    pub fn handle_aggregated(
        &mut self,
        now: Timestamp,
        round: RoundId,
        online: &[OnlineStore],
    ) -> Result<(), Rejection> {
        self.check(round, self.version, Phase::Aggregating)?;
        let need = self.config.min_evaluations.max(1);
        let count = ((need as f64) * self.config.over_selection).ceil() as usize;
        let mut held_out: Vec<&StoreId> = online
            .iter()
            .map(|s| &s.id)
            .filter(|id| !self.selected.contains_key(*id))
            .collect();
        held_out.sort();
        held_out.dedup();
        if held_out.len() < need {
            self.abandon(AbandonReason::QuorumNotMet {
                phase: "evaluating".into(),
                have: held_out.len(),
                need,
            });
            return Ok(());
        }
        // A different stream from selection's, so the draw does not mirror it.
        let mut rng = ChaCha20Rng::seed_from_u64(self.seed ^ 0x6576_616c_0000_0000);
        held_out.shuffle(&mut rng);
        self.evaluators = held_out
            .into_iter()
            .take(count.max(need))
            .cloned()
            .collect();
        self.enter(Phase::Evaluating, now);
        let ids = self.evaluators.iter().cloned().collect();
        self.events.push_back(Event::Evaluate(ids));
        Ok(())
    }

    /// The current version's loss on the evaluators' own rows, weighted by their examples,
    /// once every evaluation so far scored it too. Stores differ far more than one round
    /// moves a model, so the candidate is judged against this when it is known, and against
    /// the current version's recorded loss (other stores' rows) only otherwise.
    pub fn evaluated_baseline(&self) -> Option<f64> {
        let examples: u128 = self
            .evaluations
            .values()
            .map(|(n, ..)| u128::from(*n))
            .sum();
        let weighted: Option<f64> = self
            .evaluations
            .values()
            .map(|(n, _, b)| b.map(|b| *n as f64 * b))
            .sum();
        weighted
            .filter(|_| examples > 0)
            .map(|sum| sum / examples as f64)
            .filter(|b| b.is_finite())
    }

    /// The held-out stores chosen to evaluate the candidate.
    pub fn evaluators(&self) -> impl Iterator<Item = &StoreId> {
        self.evaluators.iter()
    }

    /// Takes a held-out store's evaluation of the candidate; once enough have arrived the
    /// candidate is judged against the baseline.
    ///
    /// # Errors
    ///
    /// The [`Rejection`] (also counted) when the report does not fit: not for this round,
    /// version or phase, from a store outside the held-out cohort, a duplicate, or with a
    /// loss that is not finite or an example count of 0 or above
    /// [`MAX_EVALUATION_EXAMPLES`].
    pub fn handle_evaluation(
        &mut self,
        now: Timestamp,
        report: &EvaluationReport,
    ) -> Result<(), Rejection> {
        self.check(report.round, report.version, Phase::Evaluating)?;
        if !self.evaluators.contains(&report.store) {
            return Err(self.reject(Rejection::NotSelected));
        }
        if self.evaluations.contains_key(&report.store) {
            return Err(self.reject(Rejection::Duplicate));
        }
        if !report.loss.is_finite()
            || report.baseline_loss.is_some_and(|b| !b.is_finite())
            || report.examples == 0
            || report.examples > MAX_EVALUATION_EXAMPLES
        {
            return Err(self.reject(Rejection::Invalid));
        }
        self.evaluations.insert(
            report.store.clone(),
            (report.examples, report.loss, report.baseline_loss),
        );
        if self.evaluations.len() >= self.config.min_evaluations {
            self.judge(now);
        }
        Ok(())
    }

    /// Records the registry's answer to the publish.
    ///
    /// # Errors
    ///
    /// [`Rejection::StaleRound`] or [`Rejection::WrongPhase`] when it does not fit.
    pub fn handle_published(
        &mut self,
        round: RoundId,
        result: Result<ModelVersion, String>,
    ) -> Result<(), Rejection> {
        self.check(round, self.version, Phase::Publishing)?;
        match result {
            Ok(version) => self.end(Outcome::Committed(version)),
            Err(reason) => self.abandon(AbandonReason::PublishFailed(reason)),
        }
        Ok(())
    }

    /// Ends a statistics round whose sum was decoded: there is no candidate to evaluate or
    /// publish.
    ///
    /// # Errors
    ///
    /// [`Rejection::StaleRound`] or [`Rejection::WrongPhase`] when it does not fit.
    pub fn handle_measured(&mut self, round: RoundId) -> Result<(), Rejection> {
        self.check(round, self.version, Phase::Aggregating)?;
        tracing::info!(round.id = %self.id, "statistics round measured");
        self.end(Outcome::Measured);
        Ok(())
    }

    fn poll_selecting(
        &mut self,
        now: Timestamp,
        online: &[OnlineStore],
        excluded: &dyn Fn(&StoreId) -> bool,
    ) {
        // 1. Eligible: online and within budget.
        let eligible: Vec<&OnlineStore> = online.iter().filter(|s| !excluded(&s.id)).collect();
        let wanted = (self.config.fraction * eligible.len() as f64).ceil() as usize;
        let target = wanted.max(self.config.min_reports);
        let count = ((target as f64) * self.config.over_selection).ceil() as usize;

        // 2. Sample without replacement under the region caps.
        let chosen = self.sample(
            &eligible,
            count.min(eligible.len()),
            count,
            &BTreeMap::new(),
        );

        // 3. Enough for the target, or wait until the selection timeout.
        if chosen.len() >= target {
            self.target = target;
            self.selected = chosen.into_iter().collect();
            self.enter(Phase::Collecting, now);
            let ids = self.selected.keys().cloned().collect();
            self.events.push_back(Event::Selected(ids));
        } else if now.0.saturating_sub(self.planned_at.0) >= self.config.selection_timeout_secs {
            self.abandon(AbandonReason::QuorumNotMet {
                phase: "selecting".into(),
                have: chosen.len(),
                need: target,
            });
        }
    }

    /// Draws up to `count` stores in random order, skipping any whose region already holds
    /// its cap of a cohort of `cohort_size` (counting the `already` chosen stores).
    fn sample(
        &self,
        eligible: &[&OnlineStore],
        count: usize,
        cohort_size: usize,
        already: &BTreeMap<StoreId, Region>,
    ) -> Vec<(StoreId, Region)> {
        let cap = ((self.config.region_cap * cohort_size as f64).floor() as usize).max(1);
        let mut per_region: BTreeMap<&Region, usize> = BTreeMap::new();
        for region in already.values() {
            *per_region.entry(region).or_default() += 1;
        }

        let mut order: Vec<&OnlineStore> = eligible.to_vec();
        let mut rng = ChaCha20Rng::seed_from_u64(self.seed ^ ((already.len() as u64) << 32));
        order.shuffle(&mut rng);
        let mut chosen = Vec::with_capacity(count);
        for store in order {
            if chosen.len() == count {
                break;
            }
            let taken = per_region.entry(&store.region).or_default();
            if *taken < cap && !already.contains_key(&store.id) {
                *taken += 1;
                chosen.push((store.id.clone(), store.region.clone()));
            }
        }
        chosen
    }

    fn replace_silent(&mut self, online: &[OnlineStore], excluded: &dyn Fn(&StoreId) -> bool) {
        self.replaced = true;
        let silent = self.dropped();
        if silent.is_empty() {
            return;
        }
        let missing = self.target.saturating_sub(self.reports.len());
        let fresh: Vec<&OnlineStore> = online
            .iter()
            .filter(|s| !excluded(&s.id) && !self.selected.contains_key(&s.id))
            .collect();
        // Caps count the stores still in the cohort, not the dropped ones.
        let already: BTreeMap<_, _> = self
            .selected
            .iter()
            .filter(|(id, _)| !silent.contains(id) && !self.dropped.contains(*id))
            .map(|(id, region)| (id.clone(), region.clone()))
            .collect();
        let cohort_size = already.len() + missing;
        let replacements = self.sample(&fresh, missing.min(fresh.len()), cohort_size, &already);
        self.dropped.extend(silent.iter().cloned());
        self.selected.extend(replacements.iter().cloned());
        self.events.push_back(Event::Replaced {
            dropped: silent,
            replacements: replacements.into_iter().map(|(id, _)| id).collect(),
        });
    }

    fn end_collection(&mut self, now: Timestamp) {
        let need = self.config.min_reports;
        if self.reports.len() < need {
            self.abandon(AbandonReason::QuorumNotMet {
                phase: "collecting".into(),
                have: self.reports.len(),
                need,
            });
            return;
        }
        self.enter(Phase::Unmasking, now);
        let survivors = self.reports.keys().cloned().collect();
        self.events.push_back(Event::Unmask(survivors));
    }

    fn judge(&mut self, now: Timestamp) {
        // Each count is at most MAX_EVALUATION_EXAMPLES, so the u128 sum cannot overflow;
        // the weighted sum can still overflow f64 for huge losses, hence the finite check.
        let examples: u128 = self
            .evaluations
            .values()
            .map(|(n, ..)| u128::from(*n))
            .sum();
        let weighted: f64 = self
            .evaluations
            .values()
            .map(|(n, l, _)| *n as f64 * l)
            .sum();
        let loss = weighted / examples as f64;
        if !loss.is_finite() {
            self.abandon(AbandonReason::NonFiniteLoss { loss });
            return;
        }
        let baseline = self.evaluated_baseline().or(self.baseline_loss);
        if let Some(baseline) = baseline
            && regresses(loss, baseline, self.config.regression_threshold)
        {
            self.abandon(AbandonReason::Regressed {
                candidate: loss,
                baseline,
            });
            return;
        }
        self.enter(Phase::Publishing, now);
        self.events.push_back(Event::Publish { loss });
    }

    fn check(
        &mut self,
        round: RoundId,
        version: ModelVersion,
        phase: Phase,
    ) -> Result<(), Rejection> {
        if round != self.id {
            return Err(self.reject(Rejection::StaleRound));
        }
        if version != self.version {
            return Err(self.reject(Rejection::WrongVersion));
        }
        if self.phase != phase {
            return Err(self.reject(Rejection::WrongPhase));
        }
        Ok(())
    }

    fn reject(&mut self, why: Rejection) -> Rejection {
        *self.rejections.entry(why).or_default() += 1;
        tracing::debug!(round.id = %self.id, reason = ?why, "message rejected");
        why
    }

    fn enter(&mut self, phase: Phase, now: Timestamp) {
        self.phase = phase;
        self.phase_started = now;
    }

    fn abandon(&mut self, reason: AbandonReason) {
        tracing::warn!(round.id = %self.id, reason = %reason, "round abandoned");
        self.end(Outcome::Abandoned(reason));
    }

    fn end(&mut self, outcome: Outcome) {
        if let Outcome::Committed(version) = &outcome {
            tracing::info!(round.id = %self.id, model.version = %version, "round committed");
        }
        self.phase = Phase::Ended(outcome.clone());
        self.events.push_back(Event::Ended(outcome));
    }
}
