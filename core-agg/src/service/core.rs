//! The driver: one [`Core`] owns the round, the secure-aggregation session, the ledger and
//! the registry, and every request and tick goes through it with the time the caller read.
//!
//! Each step follows the same order: check the message (round, phase, sender), journal it
//! if the session accepted it, apply it, drain the round's events, save the state. Nothing
//! here reads a clock: `now_ms` (Unix milliseconds) comes from the service loop.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use fedmesh_protocol::ids::{ModelVersion, Region, RoundId, StoreId};
use fedmesh_protocol::secagg::{
    CoreError, CoreSession, Deadlines, FoldError, Masking, Outgoing, PackedVector, PartialSum,
    PlanConfig, SecAggPlan, ToStore,
};
use fedmesh_protocol::wire::{
    self, ApiError, CoreMessage, EvaluationTask, LedgerSnapshot, ModelPointer, PartialSumAck,
    PartialSumHeader, PhaseDeadlines, ReceiptStatus, RoundAnnouncement, RoundReceipt, SecAggStep,
    StoreMessage,
};
use http::StatusCode;
use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;

use super::config::{Config, Unit};
use super::metrics::Metrics;
use super::model::{TaskFacts, Weights};
use super::state::{Entry, HISTORY, Journal, OpenRound, Persisted, RoundRecord};
use crate::ledger::{self, Ledger, LedgerConfig, RecordDpPlan};
use crate::registry::embedded::EmbeddedBackend;
use crate::registry::{Backend, Candidate, DpSpend, LOSS_METRIC, Registry, sha256_hex};
use crate::rounds::{
    AbandonReason, Event, OnlineStore, Outcome, Phase, Rejection, Round, RoundConfig, UpdateReport,
};
use crate::strategy::{Aggregator, CohortSum};
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
    task_text: String,
    task_sha256: String,
    task: TaskFacts,
    registry: Registry<EmbeddedBackend>,
    ledger: Ledger,
    ledger_path: PathBuf,
    state: Persisted,
    state_path: PathBuf,
    journal: Journal,
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
        if config.registry.backend != super::config::BackendKind::Embedded {
            return Err(StartError::Other(
                "registry.backend = \"etcd\" is not served yet; use \"embedded\"".into(),
            ));
        }
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
        std::fs::create_dir_all(&config.state_dir).map_err(|source| StartError::Read {
            what: "state dir",
            path: config.state_dir.clone(),
            source,
        })?;
        let key = crate::registry::keys::read_signing_key(&config.registry.signing_key)
            .map_err(|e| other(&e))?;
        let backend =
            EmbeddedBackend::open(&config.state_dir.join("registry")).map_err(|e| other(&e))?;
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
            task_sha256: sha256_hex(task_text.as_bytes()),
            model,
            task_text,
            task,
            registry,
            ledger,
            ledger_path,
            state,
            state_path,
            journal,
            live: None,
            online: BTreeMap::new(),
            metrics: Metrics::default(),
            config,
        };
        core.metrics
            .registry_version
            .set(core.current_version().map_or(-1, |v| v.0 as i64));

        // 3. Resume the open round.
        core.replay().map_err(|e| other(&e))?;
        Ok(core)
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

    /// `GET /v1/rounds/{round}/receipt` for `store`.
    pub fn receipt(&self, round: RoundId, store: &StoreId) -> RoundReceipt {
        let status = match &self.state.current {
            Some(open) if open.round.id() == round => {
                let uploads_over = self.live.as_ref().is_none_or(|l| {
                    l.session.phase() > fedmesh_protocol::secagg::CorePhase::CollectingUploads
                });
                if open.contributions.contains_key(store) {
                    ReceiptStatus::Included
                } else if uploads_over && open.plan.is_some() {
                    ReceiptStatus::NotIncluded
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
        })
    }

    // ----- time -----

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
        let done = self.state.completed + self.state.abandoned;
        let paused = now_ms < self.state.last_ended_ms + rounds.pause_s * 1000;
        if (rounds.count != 0 && done >= rounds.count) || paused {
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
        let round = Round::plan(
            id,
            version,
            self.round_config(),
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
        });
        tracing::info!(round.id = %id, model.version = %version, "round planned");
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
            phase_timeout_secs: r.unmask_s.max(r.evaluation_s) + COLLECTION_SLACK_S,
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
    fn step(&mut self, now_ms: u64) -> Result<(), super::state::StateError> {
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
        self.state.save(&self.state_path)
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
            quant_bits: a.quant_bits,
            clip: a.clip,
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
        let result = match outcome {
            Err(failure) => Err(failure.to_string()),
            Ok(outcome) => self.aggregate(now_ms, &outcome.sum, &outcome.survivors),
        };
        let Some(open) = self.state.current.as_mut() else {
            return true;
        };
        let ok = result.is_ok();
        let _ = open.round.handle_unmasked(now, id, result);
        if ok {
            let _ = open.round.handle_aggregated(now, id, online);
        }
        true
    }

    /// Decodes the cohort sum, applies the strategy, stores the candidate blob and charges
    /// the ledger.
    fn aggregate(&mut self, now_ms: u64, sum: &[u64], survivors: &[StoreId]) -> Result<(), String> {
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
        let open = self.state.current.as_ref().ok_or("no round")?;
        let (round, contributions, eligible) = (
            open.round.id(),
            open.contributions.clone(),
            open.eligible.clone(),
        );
        self.charge(
            now_ms,
            round,
            survivors,
            &contributions,
            &eligible,
            cohort_len,
        )?;

        let open = self.state.current.as_mut().ok_or("no round")?;
        open.candidate = Some(sha);
        self.state.aggregator = aggregator;
        tracing::info!(round.id = %open.round.id(), survivors = n, "cohort sum aggregated");
        Ok(())
    }

    fn charge(
        &mut self,
        now_ms: u64,
        round: RoundId,
        survivors: &[StoreId],
        contributions: &BTreeMap<StoreId, wire::Contribution>,
        eligible: &[StoreId],
        cohort: usize,
    ) -> Result<(), String> {
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
            (Unit::Store, Some(_)) => {
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
                        self.config.privacy.store_noise_multiplier,
                        cohort.min(eligible.len()),
                        &eligible,
                    )
                    .map_err(|e| format!("ledger: {e}"))?;
            }
            // Without [training.dp] the task protects nothing: there is no epsilon to charge.
            (_, None) => {}
        }
        ledger::save(&self.ledger, &self.ledger_path).map_err(|e| format!("ledger: {e}"))?;
        for store in &self.state.known_stores {
            let status = self.ledger.status(&self.model, store, now);
            self.metrics
                .epsilon
                .get_or_create(&vec![("store".into(), store.0.clone())])
                .set(status.record.spent.max(status.store.spent));
        }
        Ok(())
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
            let epsilon = self
                .state
                .known_stores
                .iter()
                .map(|s| {
                    let st = self.ledger.status(&self.model, s, Timestamp(now_ms / 1000));
                    st.record.spent.max(st.store.spent)
                })
                .fold(0.0, f64::max);
            let candidate = Candidate {
                model: self.model.clone(),
                parent: Some(open.version),
                blob,
                model_spec: self.task.model_spec.clone(),
                training_config_sha256: self.task_sha256.clone(),
                dp: dp_spend(&self.config, &self.task, epsilon),
                metrics: BTreeMap::from([(LOSS_METRIC.to_owned(), loss)]),
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

fn dp_spend(config: &Config, task: &TaskFacts, epsilon: f64) -> DpSpend {
    let (noise, clip) = task
        .dp
        .map_or((0.0, 0.0), |dp| (dp.noise_multiplier, dp.clip_norm));
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
