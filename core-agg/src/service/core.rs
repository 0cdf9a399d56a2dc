//! The driver: one [`Core`] owns the round, the secure-aggregation session, the ledger and
//! the registry, and every request and tick goes through it with the time the caller read.
//!
//! Each step follows the same order: check the message (round, phase, sender), journal it
//! if the session accepted it, apply it, drain the round's events, save the state. Nothing
//! here reads a clock: `now_ms` (Unix milliseconds) comes from the service loop.

mod lifecycle;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use fedmesh_protocol::ids::{ModelVersion, Region, RoundId, StoreId};
use fedmesh_protocol::moments::StatisticsTask;
use fedmesh_protocol::secagg::{
    CoreError, CoreSession, Deadlines, FoldError, MaskedUpdate, Outgoing, PackedVector, PartialSum,
    SecAggPlan, ToStore,
};
use fedmesh_protocol::wire::{
    self, ApiError, CoreMessage, EvaluationTask, LedgerSnapshot, ModelPointer, PartialSumAck,
    PartialSumHeader, ReceiptStatus, RoundAnnouncement, RoundReceipt, SecAggStep, StoreMessage,
};
use http::StatusCode;

use super::config::{BackendKind, Config, Unit};
use super::metrics::Metrics;
use super::model::{TaskFacts, Weights};
use super::state::{Entry, Journal, OpenRound, Persisted};
use crate::ledger::{self, Ledger, LedgerConfig};
use crate::registry::embedded::EmbeddedBackend;
use crate::registry::{Backend, Candidate, DpSpend, Registry, RegistryError, sha256_hex};
use crate::rounds::{AbandonReason, Phase, Rejection, UpdateReport};
use crate::strategy::Aggregator;
use crate::{ModelId, Timestamp};

/// Seconds the round state machine's collection deadline trails the session's upload
/// deadline: the round counts whole seconds, the session milliseconds, and the session
/// must decide first.
const COLLECTION_SLACK_S: u64 = 2;

/// Why core could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A file could not be read.
    #[error("{what} {path}: {source}")]
    Read {
        /// What the file is.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// Anything else, with its message.
    #[error("{0}")]
    Other(String),
}

/// A refusal, as the API answers it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// HTTP status.
    pub status: StatusCode,
    /// The JSON body.
    pub body: ApiError,
}

impl Refusal {
    fn new(status: StatusCode, reason: &str, message: impl Into<String>) -> Self {
        Self {
            status,
            body: ApiError {
                reason: reason.into(),
                message: message.into(),
            },
        }
    }
}

/// The live secure-aggregation session and its clock: wall milliseconds map onto the
/// session's `Instant`s affinely from the session's start, so a session replayed after a
/// restart sees the same durations it saw live.
struct Live {
    session: CoreSession,
    base: Instant,
    base_ms: u64,
    outbox: BTreeMap<(&'static str, StoreId), CoreMessage>,
    /// Whether the session's outcome was handed to the round.
    settled: bool,
}

impl Live {
    fn instant(&self, ms: u64) -> Instant {
        self.base + Duration::from_millis(ms.saturating_sub(self.base_ms))
    }

    fn route(&mut self, outgoing: Vec<Outgoing>) {
        for Outgoing { to, message } in outgoing {
            let (step, message) = match message {
                ToStore::NeighbourKeys(m) => (SecAggStep::Keys, CoreMessage::NeighbourKeys(m)),
                ToStore::Shares(m) => (SecAggStep::Shares, CoreMessage::Shares(m)),
                ToStore::Unmask(m) => (SecAggStep::Unmask, CoreMessage::Unmask(m)),
            };
            self.outbox.insert((step.as_str(), to), message);
        }
    }
}

/// The core aggregator's state and logic.
pub struct Core {
    config: Config,
    model: ModelId,
    /// The task file's text, as configured.
    base_task_text: String,
    /// The text announced: the base, plus `[normalisation]` once statistics are measured.
    task_text: String,
    task_sha256: String,
    task: TaskFacts,
    registry: Registry<Box<dyn Backend + Send>>,
    ledger: Ledger,
    ledger_path: PathBuf,
    state: Persisted,
    state_path: PathBuf,
    journal: Journal,
    /// The bytes of the last state write.
    saved: Vec<u8>,
    live: Option<Live>,
    online: BTreeMap<StoreId, (Region, u64)>,
    metrics: Metrics,
}

impl Core {
    /// Opens the state under `config.state_dir`, publishes the initial model if the
    /// registry is empty, and resumes an open round by replaying its journal.
    ///
    /// # Errors
    ///
    /// [`StartError`] naming the file or setting that is unusable.
    pub fn open(config: Config, now_ms: u64) -> Result<Self, StartError> {
        let other = |e: &dyn std::fmt::Display| StartError::Other(e.to_string());
        let read = |what, path: &PathBuf| {
            std::fs::read(path).map_err(|source| StartError::Read {
                what,
                path: path.clone(),
                source,
            })
        };
        let task_bytes = read("task config", &config.task)?;
        let task_text = String::from_utf8(task_bytes).map_err(|_| {
            StartError::Other(format!("task {} is not UTF-8", config.task.display()))
        })?;
        let task = TaskFacts::parse(&task_text).map_err(|e| other(&e))?;
        if config.statistics.enabled && !task.has_normalisation && task.inputs.is_none() {
            return Err(StartError::Other(format!(
                "statistics.enabled needs model.inputs in the task {}",
                config.task.display()
            )));
        }
        std::fs::create_dir_all(&config.state_dir).map_err(|source| StartError::Read {
            what: "state dir",
            path: config.state_dir.clone(),
            source,
        })?;
        let key = crate::registry::keys::read_signing_key(&config.registry.signing_key)
            .map_err(|e| other(&e))?;
        let backend = open_backend(&config).map_err(|e| other(&e))?;
        let registry = Registry::new(backend, key);
        let model = ModelId(config.model.clone());

        // 1. The first version, from the initial model, when the registry has none.
        if registry
            .backend()
            .current(&model)
            .map_err(|e| other(&e))?
            .is_none()
        {
            let blob = read("initial model", &config.initial_model)?;
            Weights::from_safetensors(&blob).map_err(|e| other(&e))?;
            let candidate = Candidate {
                model: model.clone(),
                parent: None,
                blob,
                model_spec: task.model_spec.clone(),
                training_config_sha256: sha256_hex(task_text.as_bytes()),
                dp: dp_spend(&config, &task, 0.0),
                metrics: BTreeMap::new(),
            };
            registry
                .publish(
                    &candidate,
                    config.rounds.regression_threshold,
                    Timestamp(now_ms / 1000),
                )
                .map_err(|e| other(&e))?;
        }

        // 2. The ledger and the round state.
        let ledger_config = LedgerConfig {
            window_secs: config.privacy.window_days * 24 * 3600,
            delta: config.privacy.delta,
            record_budget: config.privacy.budget,
            store_budget: config.privacy.budget,
            ..LedgerConfig::default()
        };
        let ledger_path = config.state_dir.join("ledger.json");
        let ledger = if ledger_path.exists() {
            ledger::load(&ledger_path, ledger_config).map_err(|e| other(&e))?
        } else {
            Ledger::new(ledger_config)
        };
        let state_path = config.state_dir.join("state.json");
        let state = match Persisted::load(&state_path).map_err(|e| other(&e))? {
            Some(state) => state,
            None => Persisted::new(
                Aggregator::new(config.aggregation.strategy()).map_err(|e| other(&e))?,
            ),
        };
        let journal = Journal::new(config.state_dir.join("journal.jsonl"));
        let mut core = Self {
            task_sha256: String::new(),
            model,
            base_task_text: task_text.clone(),
            task_text,
            task,
            registry,
            ledger,
            ledger_path,
            state,
            state_path,
            journal,
            saved: Vec::new(),
            live: None,
            online: BTreeMap::new(),
            metrics: Metrics::default(),
            config,
        };
        core.metrics
            .registry_version
            .set(core.current_version().map_or(-1, |v| v.0 as i64));
        core.refresh_epsilon_gauges(Timestamp(now_ms / 1000));
        core.refresh_task();

        // 3. Resume the open round.
        core.replay().map_err(|e| other(&e))?;
        Ok(core)
    }

    /// The announced task: the configured text, with the measured statistics if any.
    pub(super) fn refresh_task(&mut self) {
        self.task_text = match &self.state.statistics {
            Some((round, stats)) => {
                TaskFacts::with_normalisation(&self.base_task_text, *round, stats)
            }
            None => self.base_task_text.clone(),
        };
        self.task_sha256 = sha256_hex(self.task_text.as_bytes());
    }

    /// The statistics round to run next, if the task still needs its normalisation.
    pub(super) fn statistics_due(&self) -> Option<StatisticsTask> {
        let s = &self.config.statistics;
        if !s.enabled || self.task.has_normalisation || self.state.statistics.is_some() {
            return None;
        }
        Some(StatisticsTask {
            features: self.task.inputs?,
            max_rows: s.max_rows,
            bound: s.bound,
        })
    }

    fn current_version(&self) -> Option<ModelVersion> {
        self.registry.backend().current(&self.model).ok().flatten()
    }

    /// Rebuilds the session of the open round from the journal.
    fn replay(&mut self) -> Result<(), String> {
        let Some(open) = &self.state.current else {
            return Ok(());
        };
        let Some(plan_config) = open.plan.clone() else {
            return Ok(());
        };
        let plan = SecAggPlan::new(plan_config).map_err(|e| e.to_string())?;
        let start_ms = open.session_start_ms;
        let mut live = new_live(plan, start_ms, &self.config);
        let entries = self.journal.entries().map_err(|e| e.to_string())?;
        let count = entries.len();
        for entry in entries {
            let at = |ms: u64| live.instant(ms);
            let result = match entry {
                Entry::KeyAdvert { at_ms, message } => {
                    live.session.handle_key_advert(at(at_ms), message)
                }
                Entry::Shares { at_ms, message } => {
                    live.session.handle_encrypted_shares(at(at_ms), message)
                }
                Entry::Unmask { at_ms, message } => {
                    live.session.handle_unmask_response(at(at_ms), message)
                }
                Entry::Timeout { at_ms } => Ok(live.session.handle_timeout(at(at_ms))),
                Entry::Resent {
                    at_ms,
                    update,
                    contribution,
                    bytes,
                } => {
                    let result = live.session.handle_resent_update(at(at_ms), update);
                    if let (Ok(_), Some(open)) = (&result, self.state.current.as_mut())
                        && !open.contributions.contains_key(&contribution.store)
                    {
                        open.bytes_in += bytes;
                        report(open, Timestamp(at_ms / 1000), &contribution);
                        open.contributions
                            .insert(contribution.store.clone(), contribution);
                    }
                    result
                }
                Entry::PartialSum {
                    at_ms,
                    partial,
                    contributions,
                    bytes,
                } => {
                    let result = live.session.handle_partial_sum(at(at_ms), partial);
                    // A crash between the journal and state.json loses the round's view
                    // of these contributors; put it back.
                    if let (Ok(_), Some(open)) = (&result, self.state.current.as_mut()) {
                        let fresh: Vec<_> = contributions
                            .into_iter()
                            .filter(|c| !open.contributions.contains_key(&c.store))
                            .collect();
                        if !fresh.is_empty() {
                            open.bytes_in += bytes;
                        }
                        for c in fresh {
                            report(open, Timestamp(at_ms / 1000), &c);
                            open.contributions.insert(c.store.clone(), c);
                        }
                    }
                    result
                }
            };
            if let Ok(outgoing) = result {
                live.route(outgoing);
            }
        }
        tracing::info!(round.id = %open_id(&self.state), journal.entries = count,
            "open round resumed after restart");
        self.live = Some(live);
        Ok(())
    }

    /// The metrics, rendered.
    pub fn metrics_text(&self) -> String {
        self.metrics.render()
    }

    fn reject(&mut self, reason: &str) {
        *self.state.rejections.entry(reason.to_owned()).or_default() += 1;
        self.metrics.reject(reason);
    }

    fn refuse(&mut self, status: StatusCode, reason: &str, message: impl Into<String>) -> Refusal {
        self.reject(reason);
        Refusal::new(status, reason, message)
    }

    /// Counts a request refused before it reached core's state (bad header, wrong peer).
    pub fn refused_at_door(&mut self, reason: &str) {
        self.reject(reason);
    }

    // ----- requests -----

    /// `GET /v1/round`: marks a relayed store online and answers the announcement.
    pub fn announcement(
        &mut self,
        now_ms: u64,
        store: Option<(StoreId, Region)>,
    ) -> Option<RoundAnnouncement> {
        if let Some((id, region)) = store {
            self.state.known_stores.insert(id.clone());
            self.online.insert(id, (region, now_ms));
        }
        let open = self.state.current.as_ref()?;
        let plan = open.plan.clone()?;
        if matches!(open.round.phase(), Phase::Ended(_)) {
            return None;
        }
        let evaluation = match (&open.candidate, open.evaluation_deadline_ms) {
            (Some(sha), Some(deadline_ms)) if *open.round.phase() == Phase::Evaluating => {
                Some(EvaluationTask {
                    candidate_sha256: sha.clone(),
                    evaluators: open.round.evaluators().cloned().collect(),
                    deadline_ms,
                })
            }
            _ => None,
        };
        Some(RoundAnnouncement {
            round: open.round.id(),
            model: self.model.0.clone(),
            model_version: open.version,
            model_sha256: open.model_sha256.clone(),
            task: self.task_text.clone(),
            task_sha256: self.task_sha256.clone(),
            min_runtime: self.config.min_runtime.clone(),
            mode: self.config.aggregation.mode,
            plan,
            deadlines: open.deadlines?,
            evaluation,
            statistics: open.statistics.clone(),
        })
    }

    /// `POST /v1/rounds/{round}/secagg` from `store` (authenticated by its PoP).
    ///
    /// # Errors
    ///
    /// A [`Refusal`] naming the reason (counted).
    pub fn secagg_message(
        &mut self,
        now_ms: u64,
        round: RoundId,
        store: &StoreId,
        message: StoreMessage,
    ) -> Result<(), Refusal> {
        let sender = match &message {
            StoreMessage::KeyAdvert(m) => (&m.store, m.round),
            StoreMessage::EncryptedShares(m) => (&m.from, m.round),
            StoreMessage::UnmaskResponse(m) => (&m.from, m.round),
        };
        if sender.0 != store {
            return Err(self.refuse(
                StatusCode::FORBIDDEN,
                "store-mismatch",
                "the message names another store than the certificate",
            ));
        }
        if sender.1 != round {
            return Err(self.refuse(
                StatusCode::BAD_REQUEST,
                "round-mismatch",
                "the message's round differs from the path's",
            ));
        }
        self.check_open_round(round)?;
        let Some(live) = self.live.as_mut() else {
            return Err(self.refuse(StatusCode::CONFLICT, "wrong-phase", "no cohort yet"));
        };
        let now = live.instant(now_ms);
        let (result, entry) = match message {
            StoreMessage::KeyAdvert(m) => (
                live.session.handle_key_advert(now, m.clone()),
                Entry::KeyAdvert {
                    at_ms: now_ms,
                    message: m,
                },
            ),
            StoreMessage::EncryptedShares(m) => (
                live.session.handle_encrypted_shares(now, m.clone()),
                Entry::Shares {
                    at_ms: now_ms,
                    message: m,
                },
            ),
            StoreMessage::UnmaskResponse(m) => (
                live.session.handle_unmask_response(now, m.clone()),
                Entry::Unmask {
                    at_ms: now_ms,
                    message: m,
                },
            ),
        };
        match result {
            Ok(outgoing) => {
                live.route(outgoing);
                self.journal_and_step(now_ms, &entry)
            }
            Err(e) => Err(self.core_error(&e)),
        }
    }

    /// `GET /v1/rounds/{round}/secagg/{step}`: core's reply to `store`, `None` until ready.
    ///
    /// # Errors
    ///
    /// A [`Refusal`] for another round.
    pub fn secagg_reply(
        &mut self,
        round: RoundId,
        step: SecAggStep,
        store: &StoreId,
    ) -> Result<Option<CoreMessage>, Refusal> {
        self.check_open_round(round)?;
        Ok(self
            .live
            .as_ref()
            .and_then(|live| live.outbox.get(&(step.as_str(), store.clone())).cloned()))
    }

    /// `POST /v1/rounds/{round}/partial-sums` from PoP `pop`.
    ///
    /// # Errors
    ///
    /// A [`Refusal`] naming the reason (counted); nothing is folded then.
    pub fn partial_sum(
        &mut self,
        now_ms: u64,
        round: RoundId,
        header: PartialSumHeader,
        body: Vec<u8>,
    ) -> Result<PartialSumAck, Refusal> {
        if header.round != round {
            return Err(self.refuse(
                StatusCode::BAD_REQUEST,
                "round-mismatch",
                "the header's round differs from the path's",
            ));
        }
        self.check_open_round(round)?;
        let contributors: Vec<StoreId> = header
            .contributors
            .iter()
            .map(|c| c.store.clone())
            .collect();

        // 1. A re-send after a lost acknowledgement: every contributor is already counted.
        let open =
            self.state.current.as_ref().ok_or_else(|| {
                Refusal::new(StatusCode::CONFLICT, "stale-round", "no round is open")
            })?;
        if !contributors.is_empty()
            && contributors
                .iter()
                .all(|s| open.contributions.contains_key(s))
        {
            return Ok(PartialSumAck {
                round,
                accepted: contributors,
            });
        }
        if header.resent {
            return self.resent_update(now_ms, round, header, body);
        }
        let Some(live) = self.live.as_mut() else {
            return Err(self.refuse(StatusCode::CONFLICT, "wrong-phase", "no cohort yet"));
        };

        // 2. Fold it.
        let partial = PartialSum {
            round,
            contributors: contributors.clone(),
            vector: PackedVector {
                ring_bits: header.ring_bits,
                len: header.len,
                bytes: body,
            },
        };
        let bytes = partial.vector.bytes.len() as u64;
        let now = live.instant(now_ms);
        match live.session.handle_partial_sum(now, partial.clone()) {
            Ok(outgoing) => live.route(outgoing),
            Err(e) => return Err(self.core_error(&e)),
        }

        // 3. Journal, then credit the contributors.
        let entry = Entry::PartialSum {
            at_ms: now_ms,
            partial,
            contributions: header.contributors.clone(),
            bytes,
        };
        self.journal.append(&entry).map_err(|e| internal(&e))?;
        self.metrics.bytes_in.inc_by(bytes);
        if let Some(open) = self.state.current.as_mut() {
            open.bytes_in += bytes;
            for c in header.contributors {
                report(open, Timestamp(now_ms / 1000), &c);
                open.contributions.insert(c.store.clone(), c);
            }
        }
        tracing::debug!(round.id = %round, pop = %header.pop, stores = contributors.len(),
            "partial sum folded");
        self.step(now_ms).map_err(|e| internal(&e))?;
        Ok(PartialSumAck {
            round,
            accepted: contributors,
        })
    }

    /// One store's update sent again on its own, after the PoP that first held it failed to
    /// forward it: held apart by the session (see [`CoreSession::handle_resent_update`])
    /// and credited to the store now, since it will be in the sum either way.
    fn resent_update(
        &mut self,
        now_ms: u64,
        round: RoundId,
        mut header: PartialSumHeader,
        body: Vec<u8>,
    ) -> Result<PartialSumAck, Refusal> {
        if header.contributors.len() != 1 {
            return Err(self.refuse(
                StatusCode::BAD_REQUEST,
                "bad-resend",
                "a re-sent update names exactly one contributor",
            ));
        }
        let Some(live) = self.live.as_mut() else {
            return Err(self.refuse(StatusCode::CONFLICT, "wrong-phase", "no cohort yet"));
        };
        let contribution = header.contributors.remove(0);
        let update = MaskedUpdate {
            round,
            store: contribution.store.clone(),
            vector: PackedVector {
                ring_bits: header.ring_bits,
                len: header.len,
                bytes: body,
            },
        };
        let bytes = update.vector.bytes.len() as u64;
        let now = live.instant(now_ms);
        match live.session.handle_resent_update(now, update.clone()) {
            Ok(outgoing) => live.route(outgoing),
            Err(e) => return Err(self.core_error(&e)),
        }

        let store = contribution.store.clone();
        let entry = Entry::Resent {
            at_ms: now_ms,
            update,
            contribution: contribution.clone(),
            bytes,
        };
        self.journal.append(&entry).map_err(|e| internal(&e))?;
        self.metrics.bytes_in.inc_by(bytes);
        if let Some(open) = self.state.current.as_mut() {
            open.bytes_in += bytes;
            report(open, Timestamp(now_ms / 1000), &contribution);
            open.contributions.insert(store.clone(), contribution);
        }
        tracing::info!(round.id = %round, pop = %header.pop, store.id = %store,
            "re-sent update held");
        self.step(now_ms).map_err(|e| internal(&e))?;
        Ok(PartialSumAck {
            round,
            accepted: vec![store],
        })
    }

    /// Whether a store whose update no PoP has brought should send it again: uploads are
    /// open and every live PoP should have forwarded by now (a quarter of the margin after
    /// the plan's forwarding time, for the sums on their way).
    fn resend_due(&self, now_ms: u64) -> bool {
        let Some(d) = self.state.current.as_ref().and_then(|o| o.deadlines) else {
            return false;
        };
        let forward = d.pop_forward_ms();
        let grace = d.upload_ms.saturating_sub(forward) / 4;
        now_ms >= forward + grace && now_ms < d.upload_ms
    }

    /// `GET /v1/rounds/{round}/receipt` for `store`, at `now_ms`.
    pub fn receipt(&self, now_ms: u64, round: RoundId, store: &StoreId) -> RoundReceipt {
        let status = match &self.state.current {
            Some(open) if open.round.id() == round => {
                let uploads_over = self.live.as_ref().is_none_or(|l| {
                    l.session.phase() > fedmesh_protocol::secagg::CorePhase::CollectingUploads
                });
                if open.contributions.contains_key(store) {
                    ReceiptStatus::Included
                } else if uploads_over && open.plan.is_some() {
                    ReceiptStatus::NotIncluded
                } else if self.resend_due(now_ms) {
                    ReceiptStatus::Resend
                } else {
                    ReceiptStatus::Open
                }
            }
            _ if round.0 >= self.state.next_round => ReceiptStatus::Open,
            _ => {
                let included = self
                    .state
                    .history
                    .iter()
                    .find(|r| r.round == round)
                    .is_some_and(|r| r.survivors.contains(store));
                if included {
                    ReceiptStatus::Included
                } else {
                    ReceiptStatus::NotIncluded
                }
            }
        };
        RoundReceipt {
            round,
            store: store.clone(),
            status,
        }
    }

    /// `POST /v1/rounds/{round}/evaluation` from `store`.
    ///
    /// # Errors
    ///
    /// A [`Refusal`] naming the reason (counted).
    pub fn evaluation(
        &mut self,
        now_ms: u64,
        round: RoundId,
        store: &StoreId,
        report: wire::EvaluationReport,
    ) -> Result<(), Refusal> {
        if report.round != round {
            return Err(self.refuse(StatusCode::BAD_REQUEST, "round-mismatch", "round differs"));
        }
        self.check_open_round(round)?;
        let Some(open) = self.state.current.as_mut() else {
            return Err(self.refuse(StatusCode::CONFLICT, "stale-round", "no round is open"));
        };
        if open.candidate.as_deref() != Some(report.candidate_sha256.as_str()) {
            return Err(self.refuse(
                StatusCode::CONFLICT,
                "wrong-candidate",
                "the report scores another blob than the round's candidate",
            ));
        }
        let evaluation = crate::rounds::EvaluationReport {
            round,
            version: open.version,
            store: store.clone(),
            examples: report.examples,
            loss: report.loss,
            baseline_loss: report.baseline_loss,
        };
        if let Err(rejection) = open
            .round
            .handle_evaluation(Timestamp(now_ms / 1000), &evaluation)
        {
            let (status, reason) = rejection_reason(rejection);
            return Err(self.refuse(status, reason, format!("evaluation refused: {reason}")));
        }
        self.step(now_ms).map_err(|e| internal(&e))
    }

    /// `GET /v1/ledger`.
    pub fn ledger_snapshot(&self, now_ms: u64) -> LedgerSnapshot {
        let now = Timestamp(now_ms / 1000);
        let remaining = self
            .state
            .known_stores
            .iter()
            .map(|store| {
                let status = self.ledger.status(&self.model, store, now);
                (
                    store.clone(),
                    status.record.remaining.min(status.store.remaining),
                )
            })
            .collect();
        LedgerSnapshot {
            model: self.model.0.clone(),
            budget: self.config.privacy.budget,
            remaining,
        }
    }

    /// `GET /v1/models/{model}/current`.
    pub fn model_current(&self, model: &str) -> Option<ModelPointer> {
        (model == self.model.0).then_some(())?;
        Some(ModelPointer {
            model: model.to_owned(),
            version: self.current_version()?,
        })
    }

    /// `GET /v1/models/{model}/versions/{version}`: the signed manifest as stored.
    pub fn manifest(&self, model: &str, version: ModelVersion) -> Option<serde_json::Value> {
        let model = ModelId(model.to_owned());
        crate::registry::check_model_id(&model).ok()?;
        let signed = self.registry.backend().manifest(&model, version).ok()??;
        serde_json::to_value(signed).ok()
    }

    /// `GET /v1/blobs/{sha256}`.
    pub fn blob(&self, sha256: &str) -> Option<Vec<u8>> {
        let valid = sha256.len() == 64
            && sha256
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        valid.then_some(())?;
        self.registry.backend().blob(sha256).ok()?
    }

    /// `GET /v1/status`.
    pub fn status(&self, now_ms: u64) -> serde_json::Value {
        let window = self.config.rounds.online_window_s * 1000;
        let online = self
            .online
            .values()
            .filter(|(_, seen)| now_ms.saturating_sub(*seen) <= window)
            .count();
        let round = self.state.current.as_ref().map(|open| {
            serde_json::json!({
                "id": open.round.id(),
                "phase": phase_name(open.round.phase()),
                "secagg_phase": self.live.as_ref().map(|l| format!("{:?}", l.session.phase())),
                "base_version": open.version,
                "cohort": open.round.selected().collect::<Vec<_>>(),
                "contributors": open.contributions.keys().collect::<Vec<_>>(),
                "bytes_in": open.bytes_in,
                "candidate_sha256": open.candidate,
                "rejections": open.round.rejections(),
            })
        });
        serde_json::json!({
            "model": self.model,
            "current_version": self.current_version(),
            "online_stores": online,
            "round": round,
            "rounds_completed": self.state.completed,
            "rounds_abandoned": self.state.abandoned,
            "abandoned_by_reason": self.state.abandoned_by_reason,
            "rejections": self.state.rejections,
            "history": self.state.history,
            "statistics": self.state.statistics.as_ref().map(|(round, stats)| {
                serde_json::json!({ "round": round, "result": stats })
            }),
        })
    }

    fn check_open_round(&mut self, round: RoundId) -> Result<(), Refusal> {
        let current = self.state.current.as_ref().map(|o| o.round.id());
        if current == Some(round) {
            return Ok(());
        }
        Err(self.refuse(
            StatusCode::CONFLICT,
            "stale-round",
            format!("round {round} is not open (open: {current:?})"),
        ))
    }

    fn core_error(&mut self, error: &CoreError) -> Refusal {
        let (status, reason) = match error {
            CoreError::WrongRound { .. } => (StatusCode::CONFLICT, "stale-round"),
            CoreError::Unexpected(_) => (StatusCode::CONFLICT, "wrong-phase"),
            CoreError::NotExpectedFrom(_) => (StatusCode::FORBIDDEN, "not-expected"),
            CoreError::Fold(FoldError::Duplicate(_)) => (StatusCode::CONFLICT, "duplicate"),
            CoreError::Fold(FoldError::NotInCohort(_)) => (StatusCode::FORBIDDEN, "not-selected"),
            CoreError::Fold(_) | CoreError::BadShares(_) | CoreError::BadResponse(_) => {
                (StatusCode::BAD_REQUEST, "invalid")
            }
        };
        self.refuse(status, reason, error.to_string())
    }

    fn journal_and_step(&mut self, now_ms: u64, entry: &Entry) -> Result<(), Refusal> {
        self.journal.append(entry).map_err(|e| internal(&e))?;
        self.step(now_ms).map_err(|e| internal(&e))
    }
}

fn new_live(plan: SecAggPlan, start_ms: u64, config: &Config) -> Live {
    let r = &config.rounds;
    let deadlines = Deadlines {
        keys: Duration::from_secs(r.keys_s),
        shares: Duration::from_secs(r.shares_s),
        upload: Duration::from_secs(r.upload_s),
        unmask: Duration::from_secs(r.unmask_s),
    };
    let base = Instant::now();
    Live {
        session: CoreSession::new(plan, base, deadlines),
        base,
        base_ms: start_ms,
        outbox: BTreeMap::new(),
        settled: false,
    }
}

/// Reports a contributor to the round (rejections are counted by the round itself; a
/// report after collection ended changes nothing, the session's sum is what counts).
fn report(open: &mut OpenRound, now: Timestamp, c: &wire::Contribution) {
    let report = UpdateReport {
        round: open.round.id(),
        version: open.version,
        store: c.store.clone(),
        examples: c.examples,
    };
    let _ = open.round.handle_report(now, &report);
}

fn open_id(state: &Persisted) -> String {
    state
        .current
        .as_ref()
        .map_or("-".into(), |o| o.round.id().to_string())
}

fn internal(error: &dyn std::fmt::Display) -> Refusal {
    tracing::error!(error = %error, "core state could not be saved");
    Refusal::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "internal",
        "core could not record the message",
    )
}

/// The registry storage `[registry]` names: the embedded store under `state_dir`, or etcd
/// for manifests and pointers with blobs under `state_dir`.
pub fn open_backend(config: &Config) -> Result<Box<dyn Backend + Send>, RegistryError> {
    let dir = config.state_dir.join("registry");
    match config.registry.backend {
        BackendKind::Embedded => Ok(Box::new(EmbeddedBackend::open(&dir)?)),
        #[cfg(feature = "etcd")]
        BackendKind::Etcd => {
            let r = &config.registry;
            tracing::info!(endpoints = ?r.etcd_endpoints, prefix = %r.etcd_prefix,
                "registry in etcd");
            Ok(Box::new(crate::registry::etcd::EtcdBackend::connect(
                &r.etcd_endpoints,
                &r.etcd_prefix,
                &dir,
            )?))
        }
        #[cfg(not(feature = "etcd"))]
        BackendKind::Etcd => Err(RegistryError::Storage(
            "registry.backend = \"etcd\": this core-agg was built without the etcd feature \
             (cargo build -p fedmesh-core-agg --features etcd)"
                .into(),
        )),
    }
}

fn dp_spend(config: &Config, task: &TaskFacts, epsilon: f64) -> DpSpend {
    // Record-level DP noises each store's steps; store-level DP noises the cohort sum.
    let (noise, clip) = task.dp.map_or((0.0, 0.0), |dp| match config.privacy.unit {
        Unit::Record => (dp.noise_multiplier, dp.clip_norm),
        Unit::Store => (config.privacy.store_noise_multiplier, dp.clip_norm),
    });
    DpSpend {
        unit: match config.privacy.unit {
            Unit::Record => "record".into(),
            Unit::Store => "store".into(),
        },
        noise_multiplier: noise,
        clip_norm: clip,
        delta: config.privacy.delta,
        epsilon,
    }
}

fn rejection_reason(rejection: Rejection) -> (StatusCode, &'static str) {
    match rejection {
        Rejection::StaleRound => (StatusCode::CONFLICT, "stale-round"),
        Rejection::WrongVersion => (StatusCode::CONFLICT, "wrong-version"),
        Rejection::NotSelected => (StatusCode::FORBIDDEN, "not-selected"),
        Rejection::Duplicate => (StatusCode::CONFLICT, "duplicate"),
        Rejection::WrongPhase => (StatusCode::CONFLICT, "wrong-phase"),
        Rejection::Invalid => (StatusCode::BAD_REQUEST, "invalid"),
    }
}

fn reason_kind(reason: &AbandonReason) -> &'static str {
    match reason {
        AbandonReason::QuorumNotMet { .. } => "quorum-not-met",
        AbandonReason::Timeout { .. } => "timeout",
        AbandonReason::UnmaskFailed(_) => "unmask-failed",
        AbandonReason::Regressed { .. } => "regressed",
        AbandonReason::PublishFailed(_) => "publish-failed",
        AbandonReason::NonFiniteLoss { .. } => "non-finite-loss",
    }
}

fn phase_name(phase: &Phase) -> &'static str {
    match phase {
        Phase::Selecting => "selecting",
        Phase::Collecting => "collecting",
        Phase::Unmasking => "unmasking",
        Phase::Aggregating => "aggregating",
        Phase::Evaluating => "evaluating",
        Phase::Publishing => "publishing",
        Phase::Ended(_) => "ended",
    }
}
