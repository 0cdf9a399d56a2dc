//! How time moves a round: planning, selection into a secure-aggregation session,
//! settling the session's outcome (decode, strategy, candidate blob, ledger), evaluation,
//! publication and the end of the round with its history record and metrics.

use std::collections::BTreeMap;

use fedmesh_protocol::ids::{Region, RoundId, StoreId};
use fedmesh_protocol::moments::{MOMENT_QUANT_BITS, StatisticsTask};
use fedmesh_protocol::secagg::{GuaranteedNoise, Masking, PlanConfig, SecAggPlan};
use fedmesh_protocol::wire::PhaseDeadlines;
use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;

use super::{COLLECTION_SLACK_S, Core, dp_spend, new_live, reason_kind};
use crate::Timestamp;
use crate::ledger::{self, RecordDpPlan};
use crate::registry::{Backend, Candidate, LOSS_METRIC, PARENT_LOSS_METRIC, sha256_hex};
use crate::rounds::{AbandonReason, Event, OnlineStore, Outcome, Phase, Round, RoundConfig};
use crate::service::config::Unit;
use crate::service::model::Weights;
use crate::service::state::{Entry, HISTORY, OpenRound, RoundRecord, StateError};
use crate::strategy::CohortSum;

impl Core {
    /// Advances on time: plans a round when enough stores are online, ends phases whose
    /// deadline passed, and carries the round through aggregation and publication.
    ///
    /// # Errors
    ///
    /// Only when state cannot be saved.
    pub fn tick(&mut self, now_ms: u64) -> Result<(), String> {
        // 1. Session deadlines.
        if let Some(live) = self.live.as_mut() {
            let before = live.session.phase();
            let outgoing = live.session.handle_timeout(live.instant(now_ms));
            live.route(outgoing);
            if live.session.phase() != before {
                self.journal
                    .append(&Entry::Timeout { at_ms: now_ms })
                    .map_err(|e| e.to_string())?;
            }
        }

        // 2. Plan a round when none is open.
        if self.state.current.is_none() {
            self.maybe_plan(now_ms)?;
        }
        self.step(now_ms).map_err(|e| e.to_string())
    }

    fn maybe_plan(&mut self, now_ms: u64) -> Result<(), String> {
        let rounds = &self.config.rounds;
        let committed_all = rounds.count != 0 && self.state.completed >= rounds.count;
        let gave_up = rounds.max_abandoned != 0 && self.state.abandoned >= rounds.max_abandoned;
        let paused = now_ms < self.state.last_ended_ms + rounds.pause_s * 1000;
        if committed_all || gave_up || paused {
            return Ok(());
        }
        if self.online_stores(now_ms).len() < rounds.min_online {
            return Ok(());
        }
        let Some(version) = self.current_version() else {
            return Ok(());
        };
        let manifest = self
            .registry
            .load_manifest(&self.model, version)
            .map_err(|e| e.to_string())?;
        let id = RoundId(self.state.next_round);
        self.state.next_round += 1;
        let seed = ChaCha20Rng::from_entropy().next_u64();
        let baseline = manifest.metrics.get(LOSS_METRIC).copied();
        let mut config = self.round_config();
        if self.statistics_due().is_some() {
            // Statistics cost a store no training and no epsilon: ask every eligible store.
            config.fraction = 1.0;
            config.over_selection = 1.0;
        }
        let round = Round::plan(
            id,
            version,
            config,
            seed,
            baseline,
            Timestamp(now_ms / 1000),
        );
        self.journal.clear().map_err(|e| e.to_string())?;
        self.live = None;
        self.state.current = Some(OpenRound {
            round,
            version,
            model_sha256: manifest.blob_sha256,
            seed,
            planned_ms: now_ms,
            plan: None,
            session_start_ms: now_ms,
            deadlines: None,
            regions: BTreeMap::new(),
            eligible: Vec::new(),
            contributions: BTreeMap::new(),
            bytes_in: 0,
            candidate: None,
            evaluation_deadline_ms: None,
            evaluation_loss: None,
            statistics: self.statistics_due(),
        });
        let kind = if self.statistics_due().is_some() {
            "statistics"
        } else {
            "training"
        };
        tracing::info!(round.id = %id, model.version = %version, round.kind = kind,
            "round planned");
        Ok(())
    }

    fn round_config(&self) -> RoundConfig {
        let r = &self.config.rounds;
        let collection = r.keys_s + r.shares_s + r.upload_s + COLLECTION_SLACK_S;
        RoundConfig {
            fraction: r.fraction,
            min_reports: r.min_cohort,
            over_selection: r.over_selection,
            region_cap: r.region_cap,
            selection_timeout_secs: r.selection_timeout_s,
            // The cohort is fixed by the secure-aggregation plan: no replacements.
            soft_deadline_secs: collection + 1,
            reporting_deadline_secs: collection,
            // The round may reach unmasking as soon as its target has reported, while the
            // secure-aggregation session still waits out the upload phase for stores that
            // shared and have not uploaded: give it the session's whole time, whose
            // deadlines add up from the round's start.
            phase_timeout_secs: (r.keys_s + r.shares_s + r.upload_s + r.unmask_s)
                .max(r.evaluation_s)
                + COLLECTION_SLACK_S,
            min_evaluations: r.evaluators,
            regression_threshold: r.regression_threshold,
        }
    }

    fn online_stores(&self, now_ms: u64) -> Vec<OnlineStore> {
        let window = self.config.rounds.online_window_s * 1000;
        self.online
            .iter()
            .filter(|(_, (_, seen))| now_ms.saturating_sub(*seen) <= window)
            .map(|(id, (region, _))| OnlineStore {
                id: id.clone(),
                region: region.clone(),
            })
            .collect()
    }

    /// Polls the round, settles the session's outcome and acts on the round's events until
    /// none is left, then saves.
    pub(super) fn step(&mut self, now_ms: u64) -> Result<(), StateError> {
        let now = Timestamp(now_ms / 1000);
        let online = self.online_stores(now_ms);
        // Bounded: each pass either consumes events or settles the session once.
        for _ in 0..16 {
            let Some(open) = self.state.current.as_mut() else {
                break;
            };
            let ledger = &self.ledger;
            let model = &self.model;
            open.round
                .poll(now, &online, &|s: &StoreId| ledger.excluded(model, s, now));
            let mut progressed = false;
            while let Some(event) = self
                .state
                .current
                .as_mut()
                .and_then(|open| open.round.poll_event())
            {
                progressed = true;
                self.handle_event(now_ms, event, &online);
            }
            if self.settle_session(now_ms, &online) {
                progressed = true;
            }
            if !progressed {
                break;
            }
        }
        self.state.save(&self.state_path, &mut self.saved)
    }

    fn handle_event(&mut self, now_ms: u64, event: Event, online: &[OnlineStore]) {
        match event {
            Event::Selected(cohort) => self.start_session(now_ms, cohort, online),
            Event::Replaced { .. } | Event::Unmask(_) => {}
            Event::Evaluate(evaluators) => {
                if let Some(open) = self.state.current.as_mut() {
                    let deadline = now_ms + self.config.rounds.evaluation_s * 1000;
                    open.evaluation_deadline_ms = Some(deadline);
                    tracing::info!(round.id = %open.round.id(),
                        evaluators = evaluators.len(), "candidate sent for evaluation");
                }
            }
            Event::Publish { loss } => self.publish(now_ms, loss),
            Event::Ended(outcome) => self.end_round(now_ms, outcome),
        }
    }

    fn start_session(&mut self, now_ms: u64, cohort: Vec<StoreId>, online: &[OnlineStore]) {
        let dimension = self.shared_len();
        let Some(open) = self.state.current.as_mut() else {
            return;
        };
        let a = &self.config.aggregation;
        let n = cohort.len() as u32;
        let (degree, threshold) = SecAggPlan::recommended_neighbourhood(n, a.expected_dropout);
        let min_survivors = (self.config.rounds.min_cohort as u32).max(threshold).min(n);
        let kept = (a.kept_fraction < 1.0)
            .then(|| ((f64::from(dimension) * a.kept_fraction).ceil() as u32).max(1));
        let noise_stddev = match (self.config.privacy.unit, self.task.dp) {
            (Unit::Store, Some(dp)) => self.config.privacy.store_noise_multiplier * dp.clip_norm,
            _ => 0.0,
        };
        // A statistics round sends every moment as two 30-bit levels, unnoised, whole.
        let (dimension, kept, quant_bits, clip, noise_stddev) = match &open.statistics {
            Some(task) => (task.levels_len() as u32, None, MOMENT_QUANT_BITS, 1.0, 0.0),
            None => (dimension, kept, a.quant_bits, a.clip, noise_stddev),
        };
        let mut seed = [0u8; 32];
        ChaCha20Rng::seed_from_u64(open.seed).fill_bytes(&mut seed);
        let config = PlanConfig {
            round: open.round.id(),
            seed,
            cohort: cohort.clone(),
            masking: Masking::Secure,
            degree,
            threshold,
            min_survivors,
            dimension,
            kept,
            quant_bits,
            clip,
            guard_bits: a.guard_bits,
            noise_stddev,
        };
        let plan = match SecAggPlan::new(config) {
            Ok(plan) => plan,
            Err(e) => {
                // The round state machine has no way in for this; core ends the round.
                let reason = format!("plan refused: {e}");
                self.end_round(
                    now_ms,
                    Outcome::Abandoned(AbandonReason::UnmaskFailed(reason)),
                );
                return;
            }
        };
        let r = &self.config.rounds;
        let keys_ms = now_ms + r.keys_s * 1000;
        let shares_ms = keys_ms + r.shares_s * 1000;
        let upload_ms = shares_ms + r.upload_s * 1000;
        open.deadlines = Some(PhaseDeadlines {
            keys_ms,
            shares_ms,
            upload_ms,
            unmask_ms: upload_ms + r.unmask_s * 1000,
        });
        open.plan = Some(plan.config().clone());
        open.session_start_ms = now_ms;
        let regions: BTreeMap<&StoreId, &Region> =
            online.iter().map(|s| (&s.id, &s.region)).collect();
        open.regions = cohort
            .iter()
            .filter_map(|s| regions.get(s).map(|r| (s.clone(), (*r).clone())))
            .collect();
        let ledger = &self.ledger;
        let now = Timestamp(now_ms / 1000);
        open.eligible = online
            .iter()
            .filter(|s| !ledger.excluded(&self.model, &s.id, now))
            .map(|s| s.id.clone())
            .collect();
        tracing::info!(round.id = %open.round.id(), cohort.size = n, secagg.degree = degree,
            secagg.threshold = threshold, secagg.ring_bits = plan.ring_bits(),
            "cohort selected");
        self.live = Some(new_live(plan, now_ms, &self.config));
    }

    fn shared_len(&self) -> u32 {
        self.current_weights()
            .map_or(0, |w| w.shared_vector(&self.task).len() as u32)
    }

    fn current_weights(&self) -> Option<Weights> {
        let (_, blob) = self.registry.load_current(&self.model).ok()?;
        Weights::from_safetensors(&blob).ok()
    }

    /// Hands a finished session's outcome to the round once the round waits for it;
    /// returns whether it did.
    fn settle_session(&mut self, now_ms: u64, online: &[OnlineStore]) -> bool {
        let Some(live) = self.live.as_mut() else {
            return false;
        };
        let Some(open) = self.state.current.as_mut() else {
            return false;
        };
        if live.settled || *open.round.phase() != Phase::Unmasking {
            return false;
        }
        let Some(outcome) = live.session.outcome().cloned() else {
            return false;
        };
        live.settled = true;
        let id = open.round.id();
        let now = Timestamp(now_ms / 1000);
        let statistics = open.statistics.clone();
        let result = match (outcome, &statistics) {
            (Err(failure), _) => Err(failure.to_string()),
            (Ok(outcome), Some(task)) => self.measure(id, task, &outcome.sum),
            (Ok(outcome), None) => {
                self.aggregate(now_ms, &outcome.sum, &outcome.survivors, outcome.noise)
            }
        };
        let Some(open) = self.state.current.as_mut() else {
            return true;
        };
        let ok = result.is_ok();
        if statistics.is_some() {
            let _ = open.round.handle_unmasked(now, id, result);
            if ok {
                let _ = open.round.handle_measured(id);
            }
            return true;
        }
        let _ = open.round.handle_unmasked(now, id, result);
        if ok {
            let _ = open.round.handle_aggregated(now, id, online);
        }
        true
    }

    /// Decodes a statistics round's sum into the cohort's statistics and makes the
    /// training rounds' task carry them.
    fn measure(&mut self, id: RoundId, task: &StatisticsTask, sum: &[u64]) -> Result<(), String> {
        let live = self.live.as_ref().ok_or("no session")?;
        let plan = live.session.plan();
        let levels: Vec<i64> = sum.iter().map(|&v| plan.centred(v)).collect();
        let stats = task
            .decode(&levels, plan.max_level())
            .map_err(|e| format!("statistics: {e}"))?;
        if !stats.mean.iter().chain(&stats.std).all(|v| v.is_finite()) {
            return Err("statistics: a mean or deviation is not finite".into());
        }
        tracing::info!(round.id = %id, rows = stats.count, features = stats.mean.len(),
            target.mean = stats.target_mean, "federated statistics measured");
        self.state.statistics = Some((id, stats));
        self.refresh_task();
        Ok(())
    }

    /// Decodes the cohort sum, applies the strategy, stores the candidate blob and charges
    /// the ledger.
    ///
    /// `guaranteed` is the noise the plan guarantees in the decoded sum (counting only the
    /// plan's minimum of survivors); store-level DP charges for it, never for the noise of
    /// the stores that happened to survive beyond that minimum.
    fn aggregate(
        &mut self,
        now_ms: u64,
        sum: &[u64],
        survivors: &[StoreId],
        guaranteed: Option<GuaranteedNoise>,
    ) -> Result<(), String> {
        let live = self.live.as_ref().ok_or("no session")?;
        let decoded = live.session.plan().decode(sum);
        let cohort_len = live.session.plan().cohort().len();
        let n = survivors.len();

        // 1. The strategy on the cohort mean of the shared parameters.
        let mut weights = self.current_weights().ok_or("current model unreadable")?;
        let mut global = weights.shared_vector(&self.task);
        let mut cohort = CohortSum::new(global.len());
        cohort
            .add_partial_sum(&decoded, n as f64, n)
            .map_err(|e| format!("aggregation failed: {e}"))?;
        let mut aggregator = self.state.aggregator.clone();
        aggregator
            .apply(&mut global, &cohort)
            .map_err(|e| format!("aggregation failed: {e}"))?;
        weights
            .set_shared(&self.task, &global)
            .map_err(|e| format!("aggregation failed: {e}"))?;

        // 2. The candidate blob, by content.
        let blob = weights.to_safetensors().map_err(|e| e.to_string())?;
        let sha = sha256_hex(&blob);
        self.registry
            .backend()
            .put_blob(&sha, &blob)
            .map_err(|e| format!("candidate blob: {e}"))?;

        // 3. The ledger.
        self.charge(now_ms, survivors, cohort_len, guaranteed)?;

        let open = self.state.current.as_mut().ok_or("no round")?;
        open.candidate = Some(sha);
        self.state.aggregator = aggregator;
        tracing::info!(round.id = %open.round.id(), survivors = n, "cohort sum aggregated");
        Ok(())
    }

    fn charge(
        &mut self,
        now_ms: u64,
        survivors: &[StoreId],
        cohort: usize,
        guaranteed: Option<GuaranteedNoise>,
    ) -> Result<(), String> {
        let open = self.state.current.as_ref().ok_or("no round")?;
        let (round, contributions, eligible) =
            (open.round.id(), &open.contributions, &open.eligible);
        let now = Timestamp(now_ms / 1000);
        match (self.config.privacy.unit, self.task.dp) {
            (Unit::Record, Some(dp)) => {
                let plan = RecordDpPlan {
                    batch: dp.expected_batch_size,
                    epochs: self.task.epochs,
                    noise_multiplier: dp.noise_multiplier,
                };
                for store in survivors {
                    let examples = contributions.get(store).map_or(0, |c| c.examples);
                    if let Err(e) =
                        self.ledger
                            .charge_record(&self.model, store, round, now, &plan, examples)
                    {
                        tracing::warn!(store.id = %store, error = %e, "record charge failed");
                    }
                }
            }
            (Unit::Store, Some(dp)) => {
                // One store moves the sum by at most clip_norm, so the multiplier is the
                // guaranteed stddev in those units.
                let noise = guaranteed.ok_or("store-level DP, but the plan carried no noise")?;
                let multiplier = noise.stddev / dp.clip_norm;
                let eligible: Vec<StoreId> = if eligible.len() >= cohort {
                    eligible.to_vec()
                } else {
                    survivors.to_vec()
                };
                self.ledger
                    .charge_store_level(
                        &self.model,
                        round,
                        now,
                        multiplier,
                        cohort.min(eligible.len()),
                        &eligible,
                    )
                    .map_err(|e| format!("ledger: {e}"))?;
            }
            // Without [training.dp] the task protects nothing: there is no epsilon to charge.
            (_, None) => {}
        }
        ledger::save(&self.ledger, &self.ledger_path).map_err(|e| format!("ledger: {e}"))?;
        self.refresh_epsilon_gauges(now);
        Ok(())
    }

    /// Sets each known store's epsilon gauge from the ledger: after a charge, and at
    /// start-up so that a restarted core reports the spend it resumed with.
    pub(super) fn refresh_epsilon_gauges(&self, now: Timestamp) {
        for store in &self.state.known_stores {
            let status = self.ledger.status(&self.model, store, now);
            self.metrics
                .epsilon
                .get_or_create(&vec![("store".into(), store.0.clone())])
                .set(status.record.spent.max(status.store.spent));
        }
    }

    fn publish(&mut self, now_ms: u64, loss: f64) {
        let Some(open) = self.state.current.as_mut() else {
            return;
        };
        open.evaluation_loss = Some(loss);
        let id = open.round.id();
        let result = (|| {
            let sha = open.candidate.clone().ok_or("no candidate")?;
            let blob = self
                .registry
                .backend()
                .blob(&sha)
                .map_err(|e| e.to_string())?
                .ok_or("candidate blob missing")?;
            // A publish that promoted this candidate before a crash lost the state write:
            // it is done, not to be tried again from a parent that is no longer current.
            let current = self.registry.backend().current(&self.model);
            if let Ok(Some(current)) = current
                && current != open.version
                && let Ok(m) = self.registry.load_manifest(&self.model, current)
                && m.parent == Some(open.version)
                && m.blob_sha256 == sha
            {
                return Ok(current);
            }
            let epsilon = self
                .state
                .known_stores
                .iter()
                .map(|s| {
                    let st = self.ledger.status(&self.model, s, Timestamp(now_ms / 1000));
                    st.record.spent.max(st.store.spent)
                })
                .fold(0.0, f64::max);
            if !epsilon.is_finite() {
                return Err("the epsilon spent is not finite; refusing to sign it".to_owned());
            }
            let candidate = Candidate {
                model: self.model.clone(),
                parent: Some(open.version),
                blob,
                model_spec: self.task.model_spec.clone(),
                training_config_sha256: self.task_sha256.clone(),
                dp: dp_spend(&self.config, &self.task, epsilon),
                metrics: std::iter::once((LOSS_METRIC.to_owned(), loss))
                    .chain(
                        open.round
                            .evaluated_baseline()
                            .map(|b| (PARENT_LOSS_METRIC.to_owned(), b)),
                    )
                    .collect(),
            };
            self.registry
                .publish(
                    &candidate,
                    self.config.rounds.regression_threshold,
                    Timestamp(now_ms / 1000),
                )
                .map(|m| m.version)
                .map_err(|e| e.to_string())
        })();
        if let Ok(version) = result {
            self.metrics.registry_version.set(version.0 as i64);
        }
        let _ = open.round.handle_published(id, result);
    }

    fn end_round(&mut self, now_ms: u64, outcome: Outcome) {
        let Some(open) = self.state.current.take() else {
            return;
        };
        let survivors: Vec<StoreId> = open.contributions.keys().cloned().collect();
        let mut by_region: BTreeMap<String, usize> = BTreeMap::new();
        for c in open.contributions.values() {
            *by_region.entry(c.region.0.clone()).or_default() += 1;
        }
        let cohort_size = open.plan.as_ref().map_or(0, |p| p.cohort.len());
        let (name, reason, version) = match &outcome {
            Outcome::Committed(v) => ("committed", None, Some(*v)),
            Outcome::Measured => ("measured", None, None),
            Outcome::Abandoned(r) => ("abandoned", Some(r.to_string()), None),
        };
        let record = RoundRecord {
            round: open.round.id(),
            base_version: open.version,
            cohort_size,
            survivors_by_region: by_region.clone(),
            survivors: survivors.clone(),
            dropouts: cohort_size.saturating_sub(survivors.len()),
            bytes_in: open.bytes_in,
            duration_ms: now_ms.saturating_sub(open.planned_ms),
            evaluation_loss: open.evaluation_loss,
            outcome: name.into(),
            reason: reason.clone(),
            model_version: version,
            ended_ms: now_ms,
        };
        match &outcome {
            Outcome::Committed(_) => self.state.completed += 1,
            // A statistics round trains nothing: it does not count towards rounds.count.
            Outcome::Measured => {}
            Outcome::Abandoned(r) => {
                self.state.abandoned += 1;
                *self
                    .state
                    .abandoned_by_reason
                    .entry(reason_kind(r).into())
                    .or_default() += 1;
            }
        }

        // Metrics.
        self.metrics.participants.clear();
        for (region, count) in &by_region {
            let labels = vec![("region".to_owned(), region.clone())];
            self.metrics
                .participants
                .get_or_create(&labels)
                .set(*count as i64);
            self.metrics
                .participants_total
                .get_or_create(&labels)
                .inc_by(*count as u64);
        }
        self.metrics.dropouts.set(record.dropouts as i64);
        self.metrics.dropouts_total.inc_by(record.dropouts as u64);
        self.metrics
            .round_duration
            .observe(record.duration_ms as f64 / 1000.0);
        self.metrics
            .rounds
            .get_or_create(&vec![("outcome".into(), name.into())])
            .inc();

        tracing::info!(round.id = %record.round, round.outcome = name,
            round.reason = reason.as_deref().unwrap_or(""), cohort.size = cohort_size,
            round.survivors = survivors.len(), round.dropouts = record.dropouts,
            round.bytes_in = record.bytes_in, round.duration_ms = record.duration_ms,
            model.version = ?version, "round ended");
        self.state.history.push_back(record);
        while self.state.history.len() > HISTORY {
            self.state.history.pop_front();
        }
        self.state.last_ended_ms = now_ms;
        self.live = None;
    }
}
