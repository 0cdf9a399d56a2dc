//! One round at a store, MESH step 3: decide, fetch and verify the model, run the
//! secure-aggregation steps, train, build the masked update, queue it, send it, answer
//! the unmask request.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fedmesh_protocol::ids::RoundId;
use fedmesh_protocol::moments::StatisticsTask;
use fedmesh_protocol::params::Scope;
use fedmesh_protocol::secagg::{Masking, PackedVector, SecAggPlan, StoreSession, UnmaskState};
use fedmesh_protocol::update::clip_l2;
use fedmesh_protocol::wire::{
    self, CoreMessage, ReceiptStatus, RoundAnnouncement, RoundReceipt, SecAggStep, StoreMessage,
    UpdateHeader,
};
use rand::RngCore;
use rand::rngs::OsRng;
use rand_chacha::ChaCha20Rng;
use rand_core::SeedableRng;
use sha2::{Digest, Sha256};
use tokio::sync::watch;

use super::agent::{Stop, StoreAgent};
use super::envelope;
use super::evaluate::{mean_loss, normalised};
use super::hardware::Hardware;
use super::models::{self, ModelRefused, VerifiedModel};
use super::pop::PopError;
use crate::audit::AuditEvent;
use crate::ingest::StoreData;
use crate::participation::{self, RoundAsk, StoreState};
use crate::pipeline::layout_of;
use crate::queue::{QueuedUpdate, UpdateMeta};
use crate::task::TaskConfig;
use crate::train::{self, TrainError, TrainReport};
use crate::weights::Weights;

/// Slack after a phase deadline before the store stops waiting for core.
const DEADLINE_SLACK_MS: u64 = 2_000;

/// How often a store waiting for its unmask request asks whether core misses its update.
const RESEND_CHECK: Duration = Duration::from_millis(250);

/// How a round ended for the store, as logged.
enum Outcome {
    /// Nothing was joined and the PoP did not answer: decide again at the next poll.
    Retry(String),
    Declined(String),
    Failed(String),
    Uploaded,
    Queued,
}

/// What training hands back to the round.
struct Trained {
    delta: Weights,
    checkpoint: Weights,
    report: TrainReport,
    loss_before: f64,
}

impl StoreAgent {
    /// Takes part in `round` if the store should; logs and audits the outcome. Returns
    /// whether the round is decided (false: ask again at the next poll).
    pub(super) async fn take_part(
        &mut self,
        round: &RoundAnnouncement,
        shutdown: &watch::Receiver<bool>,
    ) -> Result<bool, Stop> {
        let outcome = self.round_steps(round, shutdown).await?;
        let round_id = round.round.0;
        match &outcome {
            Outcome::Retry(reason) => {
                tracing::debug!(store.id = %self.store, round.id = round_id, reason = %reason,
                    "round not decided yet");
                return Ok(false);
            }
            Outcome::Declined(reason) => {
                self.record(AuditEvent::RoundDeclined {
                    round: round_id,
                    reason: reason.clone(),
                });
                tracing::info!(store.id = %self.store, round.id = round_id,
                    outcome = "declined", reason = %reason, "round declined");
            }
            Outcome::Failed(reason) => {
                tracing::warn!(store.id = %self.store, round.id = round_id,
                    outcome = "failed", reason = %reason, "round failed");
            }
            Outcome::Uploaded => {
                tracing::info!(store.id = %self.store, round.id = round_id,
                    outcome = "uploaded", "update uploaded");
            }
            Outcome::Queued => {
                tracing::info!(store.id = %self.store, round.id = round_id,
                    outcome = "queued", "update queued, not yet held by a pop");
            }
        }
        Ok(true)
    }

    async fn round_steps(
        &mut self,
        round: &RoundAnnouncement,
        shutdown: &watch::Receiver<bool>,
    ) -> Result<Outcome, Stop> {
        // 1. Decide: selected, runtime, window, budget, still in time.
        let task = match self.decide(round) {
            Ok(task) => task,
            Err(outcome) => return Ok(outcome),
        };

        // A statistics round trains nothing: the moments of the rows take the update's way.
        if let Some(statistics) = &round.statistics {
            return self
                .contribute_statistics(round, statistics, shutdown)
                .await;
        }

        // 2. The model, verified; from here on the round counts as joined.
        let model = match self.join(round).await {
            Ok(model) => model,
            Err(outcome) => return Ok(outcome),
        };

        // 3. Secure aggregation up to masking (in plain mode there is nothing to agree).
        let mut session = match self.start_secagg(round, shutdown).await? {
            Ok(session) => session,
            Err(outcome) => return Ok(outcome),
        };

        // 4. Train in the shared pool. Stopping now leaves nothing behind: the update was
        //    never built, so it never leaves the store.
        let trained = match self.train(task.clone(), model.weights).await {
            Ok(trained) => trained,
            Err(reason) => return Ok(Outcome::Failed(reason)),
        };
        if *shutdown.borrow() {
            return Err(Stop::Shutdown);
        }
        if let Err(reason) = self.account(round.round.0, round.model_version.0, &trained) {
            return Ok(Outcome::Failed(reason));
        }

        // 5. Clip, quantise, mask, pack; queue durably before anything is sent.
        let examples = trained.report.examples as u64;
        let entry = match self.build(&task, &trained, &mut session) {
            Ok(masked) => self.queue_update(round, examples, trained.loss_before, &masked),
            Err(reason) => Err(Outcome::Failed(reason)),
        };
        let entry = match entry {
            Ok(entry) => entry,
            Err(outcome) => return Ok(outcome),
        };
        self.send_and_unmask(&entry, &mut session, round, shutdown)
            .await
    }

    /// Steps 6 and 7 of a round: sends the queued update, then answers the unmask request.
    async fn send_and_unmask(
        &mut self,
        entry: &QueuedUpdate,
        session: &mut StoreSession,
        round: &RoundAnnouncement,
        shutdown: &watch::Receiver<bool>,
    ) -> Result<Outcome, Stop> {
        // What answers the unmask request after a restart goes to disk before anything is
        // sent (mode 0600, deleted when the round settles).
        if session.plan().masking() == Masking::Secure
            && let Err(reason) = self.save_unmask_state(session)
        {
            return Ok(Outcome::Failed(reason));
        }

        // 6. Send; a failed send stays queued and the loop sends it again.
        let sent = self.send_entry(entry, false).await;
        if *shutdown.borrow() {
            return Err(Stop::Shutdown);
        }

        // A crash between the upload and the unmask step (tests).
        fail::fail_point!("round.before_unmask", |_| Ok(Outcome::Queued));

        // 7. Unmask: release the shares core asks for.
        if session.plan().masking() == Masking::Secure
            && let Err(reason) = self.unmask(session, round, Some(entry), shutdown).await?
        {
            tracing::warn!(store.id = %self.store, round.id = round.round.0,
                reason = %reason, "unmask step not answered");
        }
        Ok(match sent {
            Ok(()) => Outcome::Uploaded,
            Err(_) => Outcome::Queued,
        })
    }

    /// A federated-statistics round: joins it, agrees keys, and sends the count, sums and
    /// sums of squares of the training rows' features and target as fixed-point levels,
    /// masked and queued like an update. Nothing is trained and no epsilon is spent.
    async fn contribute_statistics(
        &mut self,
        round: &RoundAnnouncement,
        statistics: &StatisticsTask,
        shutdown: &watch::Receiver<bool>,
    ) -> Result<Outcome, Stop> {
        let round_id = round.round.0;
        self.state.last_joined_round = Some(round_id);
        if let Err(e) = self.dir.save(&self.state) {
            return Ok(Outcome::Failed(e.to_string()));
        }
        let train = &self.data.train;
        let rows = (train.len() as u64).min(statistics.max_rows);
        self.record(AuditEvent::StatisticsJoined {
            round: round_id,
            rows,
        });
        self.record(AuditEvent::DatasetSnapshot {
            round: round_id,
            sha256: self.dataset_sha256.clone(),
            rows: (self.data.train.len() + self.data.test.len()) as u64,
        });
        let mut session = match self.start_secagg(round, shutdown).await? {
            Ok(session) => session,
            Err(outcome) => return Ok(outcome),
        };
        let train = &self.data.train;
        let max_level = session.plan().max_level();
        let levels = match statistics.encode(train.dim, &train.features, &train.targets, max_level)
        {
            Ok(levels) => levels,
            Err(e) => return Ok(Outcome::Failed(format!("statistics: {e}"))),
        };
        let masked = session
            .plan()
            .levels(&levels, &mut OsRng)
            .map_err(|e| format!("statistics: {e}"))
            .and_then(|q| session.mask(&q).map_err(|e| format!("mask: {e}")));
        let entry = match masked {
            Ok(masked) => self.queue_update(round, rows, 0.0, &masked.vector),
            Err(reason) => return Ok(Outcome::Failed(reason)),
        };
        let entry = match entry {
            Ok(entry) => entry,
            Err(outcome) => return Ok(outcome),
        };
        self.send_and_unmask(&entry, &mut session, round, shutdown)
            .await
    }

    /// Checks the round's plan and runs secure aggregation up to masking.
    async fn start_secagg(
        &mut self,
        round: &RoundAnnouncement,
        shutdown: &watch::Receiver<bool>,
    ) -> Result<Result<StoreSession, Outcome>, Stop> {
        let plan = match SecAggPlan::new(round.plan.clone()) {
            Ok(plan) => plan,
            Err(e) => return Ok(Err(Outcome::Failed(format!("plan refused: {e}")))),
        };
        Ok(self
            .agree(plan, round, shutdown)
            .await?
            .map_err(Outcome::Failed))
    }

    /// The task to train, or why the store does not take part.
    fn decide(&self, round: &RoundAnnouncement) -> Result<TaskConfig, Outcome> {
        let task = self.read_task(round).map_err(Outcome::Failed)?;
        let min_runtime = semver::Version::parse(&round.min_runtime)
            .map_err(|e| Outcome::Failed(format!("min_runtime: {e}")))?;
        let store = StoreState {
            runtime: &self.runtime,
            window: &self.window,
            budget: self.config.privacy.epsilon_budget,
            delta: self.config.privacy.delta,
            spent: &self.state.spent,
            examples: self.data.train.len(),
        };
        let ask = RoundAsk {
            selected: round.plan.cohort.contains(&self.store),
            min_runtime: &min_runtime,
            epochs: task.training.epochs,
            // A statistics round spends no epsilon.
            dp: task
                .training
                .dp
                .as_ref()
                .filter(|_| round.statistics.is_none()),
        };
        match participation::decide(&store, &ask, jiff::Timestamp::now()) {
            Ok(Ok(_)) => {}
            Ok(Err(decline)) => return Err(Outcome::Declined(decline.to_string())),
            Err(e) => return Err(Outcome::Failed(format!("plan's dp settings: {e}"))),
        }
        // A secure round is joined by advertising keys; a plain one by uploading.
        let due = match round.plan.masking {
            Masking::Secure => round.deadlines.keys_ms,
            Masking::Plain => round.deadlines.upload_ms,
        };
        if now_ms() > due {
            let reason = "joined too late: the round is past its deadline";
            return Err(Outcome::Declined(reason.into()));
        }
        Ok(task)
    }

    /// Fetches and verifies the round's model, then records the round as joined: in the
    /// state (never joined twice), the kept models and the audit log. A refused model
    /// leaves the last good one in place.
    async fn join(&mut self, round: &RoundAnnouncement) -> Result<VerifiedModel, Outcome> {
        let last = self.state.last_trained_version;
        let fetched = models::fetch_verified(&self.pop, &self.key, &self.dir, last, round).await;
        let model = match fetched {
            Ok(model) => model,
            Err(ModelRefused::Fetch(err)) if err.is_transient() => {
                return Err(Outcome::Retry(format!("model fetch failed: {err}")));
            }
            Err(ModelRefused::Fetch(err)) => {
                return Err(Outcome::Failed(format!("model fetch failed: {err}")));
            }
            Err(refused) => {
                tracing::warn!(store.id = %self.store, round.id = round.round.0,
                    model.version = round.model_version.0, error = %refused, "model refused");
                return Err(Outcome::Declined(format!("model refused: {refused}")));
            }
        };

        let previous = self.state.last_good_model.replace(model.reference.clone());
        self.state.last_joined_round = Some(round.round.0);
        self.dir
            .save(&self.state)
            .map_err(|e| Outcome::Failed(e.to_string()))?;
        let keep: Vec<&str> = [Some(&model.reference), previous.as_ref()]
            .into_iter()
            .flatten()
            .map(|m| m.sha256.as_str())
            .collect();
        if let Err(e) = self.dir.prune_models(&keep) {
            tracing::warn!(store.id = %self.store, error = %e, "cannot prune old models");
        }

        let round_id = round.round.0;
        self.record(AuditEvent::RoundJoined {
            round: round_id,
            model_version: round.model_version.0,
            model_sha256: model.reference.sha256.clone(),
        });
        self.record(AuditEvent::DatasetSnapshot {
            round: round_id,
            sha256: self.dataset_sha256.clone(),
            rows: (self.data.train.len() + self.data.test.len()) as u64,
        });
        self.record(AuditEvent::TrainingConfig {
            round: round_id,
            sha256: round.task_sha256.clone(),
        });
        Ok(model)
    }

    /// Writes the masked update, with the header it goes out with, to the upload queue.
    fn queue_update(
        &mut self,
        round: &RoundAnnouncement,
        examples: u64,
        loss: f64,
        masked: &PackedVector,
    ) -> Result<QueuedUpdate, Outcome> {
        let header = UpdateHeader {
            round: round.round,
            model_version: round.model_version,
            ring_bits: masked.ring_bits,
            len: masked.len,
            examples,
            loss,
            // The queue entry's id, set when it is sent.
            upload_id: String::new(),
            resent: false,
        };
        let meta = UpdateMeta {
            round: round.round.0,
            model_version: round.model_version.0,
        };
        let entry = self
            .queue
            .enqueue(meta, &envelope::seal(&header, &masked.bytes))
            .map_err(|e| Outcome::Failed(format!("cannot queue the update: {e}")))?;
        self.record(AuditEvent::UpdateQueued {
            round: round.round.0,
            update_sha256: entry.sha256.clone(),
            bytes: masked.bytes.len() as u64,
        });
        Ok(entry)
    }

    /// The announced task, checked against its digest, with the device, threads and batch
    /// size this machine was given.
    pub(super) fn read_task(&self, round: &RoundAnnouncement) -> Result<TaskConfig, String> {
        let digest = hex::encode(Sha256::digest(round.task.as_bytes()));
        if digest != round.task_sha256 {
            return Err(format!(
                "task digest {digest} differs from the announced {}",
                round.task_sha256
            ));
        }
        let mut task = TaskConfig::from_toml_str(&round.task).map_err(|e| e.to_string())?;
        let hw: &Hardware = &self.hardware;
        task.training.threads = hw.threads;
        task.training.device = hw.device;
        task.training.batch_size = hw.batch_size(&task.model, task.training.batch_size);
        Ok(task)
    }

    /// Key advert, neighbour keys, shares: until the session is ready to mask.
    async fn agree(
        &mut self,
        plan: SecAggPlan,
        round: &RoundAnnouncement,
        shutdown: &watch::Receiver<bool>,
    ) -> Result<Result<StoreSession, String>, Stop> {
        let (mut session, advert) = match StoreSession::new(plan, self.store.clone(), &mut OsRng) {
            Ok(started) => started,
            Err(e) => return Ok(Err(e.to_string())),
        };
        let Some(advert) = advert else {
            return Ok(Ok(session));
        };
        let path = wire::secagg(round.round);
        let msg = StoreMessage::KeyAdvert(advert);
        let posted = self.post_step(&path, &msg, round.deadlines.keys_ms, shutdown);
        if let Err(e) = posted.await? {
            return Ok(Err(format!("key advert: {e}")));
        }
        let keys = self
            .poll_step(
                round,
                SecAggStep::Keys,
                round.deadlines.shares_ms,
                None,
                shutdown,
            )
            .await?;
        let shares = match keys {
            Ok(CoreMessage::NeighbourKeys(keys)) => {
                match session.handle_neighbour_keys(&keys, &mut OsRng) {
                    Ok(shares) => shares,
                    Err(e) => return Ok(Err(format!("neighbour keys: {e}"))),
                }
            }
            Ok(_) => return Ok(Err("core answered keys with another step".into())),
            Err(e) => return Ok(Err(format!("neighbour keys: {e}"))),
        };
        let msg = StoreMessage::EncryptedShares(shares);
        let posted = self.post_step(&path, &msg, round.deadlines.shares_ms, shutdown);
        if let Err(e) = posted.await? {
            return Ok(Err(format!("encrypted shares: {e}")));
        }
        let shares = self
            .poll_step(
                round,
                SecAggStep::Shares,
                round.deadlines.upload_ms,
                None,
                shutdown,
            )
            .await?;
        match shares {
            Ok(CoreMessage::Shares(shares)) => match session.handle_shares(&shares) {
                Ok(()) => Ok(Ok(session)),
                Err(e) => Ok(Err(format!("neighbour shares: {e}"))),
            },
            Ok(_) => Ok(Err("core answered shares with another step".into())),
            Err(e) => Ok(Err(format!("neighbour shares: {e}"))),
        }
    }

    async fn unmask(
        &mut self,
        session: &mut StoreSession,
        round: &RoundAnnouncement,
        entry: Option<&QueuedUpdate>,
        shutdown: &watch::Receiver<bool>,
    ) -> Result<Result<(), String>, Stop> {
        let unmask_ms = round.deadlines.unmask_ms;
        let request = self
            .poll_step(round, SecAggStep::Unmask, unmask_ms, entry, shutdown)
            .await?;
        let request = match request {
            Ok(CoreMessage::Unmask(request)) => request,
            Ok(_) => return Ok(Err("core answered unmask with another step".into())),
            Err(e) => return Ok(Err(e.to_string())),
        };
        let response = match session.handle_unmask_request(&request) {
            Ok(response) => response,
            Err(e) => return Ok(Err(format!("unmask request refused: {e}"))),
        };
        // The release is on disk before the shares leave: a restarted store must not be
        // talked into the other kind for the same peer.
        if let Err(reason) = self.save_unmask_state(session) {
            return Ok(Err(reason));
        }
        let msg = StoreMessage::UnmaskResponse(response);
        let path = wire::secagg(round.round);
        let posted = self.post_step(&path, &msg, round.deadlines.unmask_ms, shutdown);
        Ok(posted.await?.map_err(|e| e.to_string()))
    }

    /// Asks core's receipt for `entry` and sends the update again if core says no PoP
    /// brought it; a failure is retried at the next check.
    async fn resend_if_missing(&mut self, round: RoundId, entry: &QueuedUpdate) {
        let receipt = self
            .pop
            .get_json::<RoundReceipt>(&wire::receipt(round))
            .await;
        if let Ok(Some(r)) = receipt
            && r.round == round
            && r.status == ReceiptStatus::Resend
        {
            let _ = self.resend_entry(entry).await;
        }
    }

    /// Saves what answers this round's unmask request, readable by the agent only.
    fn save_unmask_state(&self, session: &StoreSession) -> Result<(), String> {
        let state = session.unmask_state().map_err(|e| e.to_string())?;
        let bytes = zeroize::Zeroizing::new(serde_json::to_vec(&state).map_err(|e| e.to_string())?);
        self.secrets
            .store(session.plan().round().0, &bytes)
            .map_err(|e| format!("cannot save the round's unmask state: {e}"))
    }

    /// After a restart: if this store saved an unmask state for the announced round, it
    /// answers the round's unmask request from it. Returns whether it found one.
    pub(super) async fn resume_unmask(
        &mut self,
        round: &RoundAnnouncement,
        shutdown: &watch::Receiver<bool>,
    ) -> Result<bool, Stop> {
        let saved = match self.secrets.load(round.round.0) {
            Ok(Some(saved)) => saved,
            Ok(None) => return Ok(false),
            Err(e) => {
                tracing::warn!(store.id = %self.store, error = %e, "cannot read round secrets");
                return Ok(false);
            }
        };
        let session = serde_json::from_slice::<UnmaskState>(&saved)
            .map_err(|e| e.to_string())
            .and_then(|state| StoreSession::resume(&state, &mut OsRng).map_err(|e| e.to_string()));
        let announced = SecAggPlan::new(round.plan.clone()).ok();
        let same_plan = |s: &StoreSession| {
            announced
                .as_ref()
                .is_some_and(|p| p.config() == s.plan().config())
        };
        let mut session = match session {
            Ok(session) if same_plan(&session) => session,
            Ok(_) => {
                tracing::warn!(store.id = %self.store, round.id = round.round.0,
                    "saved unmask state is for another plan; not resumed");
                return Ok(false);
            }
            Err(e) => {
                tracing::warn!(store.id = %self.store, round.id = round.round.0, error = %e,
                    "saved unmask state unusable; not resumed");
                return Ok(false);
            }
        };
        tracing::info!(store.id = %self.store, round.id = round.round.0,
            "resuming the round's unmask step after a restart");
        // This round's update, if it is still queued: kept alive while the request is
        // awaited, in case the PoP that held it died with the process.
        let entry = self
            .queue
            .list()
            .ok()
            .and_then(|entries| entries.into_iter().find(|e| e.meta.round == round.round.0));
        if let Err(reason) = self
            .unmask(&mut session, round, entry.as_ref(), shutdown)
            .await?
        {
            tracing::warn!(store.id = %self.store, round.id = round.round.0,
                reason = %reason, "unmask step not answered");
        }
        Ok(true)
    }

    /// Posts a secure-aggregation message, again after transient failures until the phase
    /// deadline (plus slack). A `409` after a failed attempt means the first attempt
    /// reached core and only its answer was lost: core refuses a repeated message.
    async fn post_step(
        &self,
        path: &str,
        msg: &StoreMessage,
        deadline_ms: u64,
        shutdown: &watch::Receiver<bool>,
    ) -> Result<Result<(), PopError>, Stop> {
        let mut retried = false;
        loop {
            if *shutdown.borrow() {
                return Err(Stop::Shutdown);
            }
            match self.pop.post_json(path, msg).await {
                Ok(()) => return Ok(Ok(())),
                Err(PopError::Refused { status, .. })
                    if retried && status == http::StatusCode::CONFLICT =>
                {
                    return Ok(Ok(()));
                }
                Err(e) if e.is_transient() && now_ms() <= deadline_ms + DEADLINE_SLACK_MS => {
                    retried = true;
                }
                Err(e) => return Ok(Err(e)),
            }
            tokio::time::sleep(self.poll_wait()).await;
        }
    }

    /// Polls one secure-aggregation step until core answers, the deadline (plus slack)
    /// passes, or shutdown is asked for.
    ///
    /// Meanwhile `upload`, the round's queued update, is kept alive while uploads are open:
    /// when core's receipt says no PoP brought it (the PoP that acknowledged it died before
    /// forwarding), it is sent again through whichever PoP answers now.
    async fn poll_step(
        &mut self,
        round: &RoundAnnouncement,
        step: SecAggStep,
        deadline_ms: u64,
        upload: Option<&QueuedUpdate>,
        shutdown: &watch::Receiver<bool>,
    ) -> Result<Result<CoreMessage, PopError>, Stop> {
        let path = wire::secagg_step(round.round, step);
        let mut receipt_due = Instant::now();
        loop {
            if *shutdown.borrow() {
                return Err(Stop::Shutdown);
            }
            let transient = match self.pop.get_json::<CoreMessage>(&path).await {
                Ok(Some(msg)) => return Ok(Ok(msg)),
                Ok(None) => None,
                Err(e) if e.is_transient() => Some(e),
                Err(e) => return Ok(Err(e)),
            };
            if let Some(entry) = upload
                && now_ms() < round.deadlines.upload_ms
                && Instant::now() >= receipt_due
            {
                receipt_due = Instant::now() + RESEND_CHECK;
                self.resend_if_missing(round.round, entry).await;
            }
            if now_ms() > deadline_ms + DEADLINE_SLACK_MS {
                let reason = format!("no {} reply before the deadline", step.as_str());
                return Ok(Err(
                    transient.unwrap_or(PopError::Malformed { path, reason })
                ));
            }
            tokio::time::sleep(self.poll_wait()).await;
        }
    }

    /// Runs local training on the blocking pool, at most `threads` stores at once.
    async fn train(&mut self, task: TaskConfig, global: Weights) -> Result<Trained, String> {
        // No checkpoint yet (the first round): local parameters start from the seed.
        let local = Weights::read(&self.dir.local_checkpoint()).ok();
        let data = Arc::clone(&self.data);
        let permit = Arc::clone(&self.trainers)
            .acquire_owned()
            .await
            .map_err(|e| e.to_string())?;
        let trained = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            train_blocking(&task, &data, &global, local.as_ref())
        })
        .await
        .map_err(|e| format!("training task: {e}"))?
        .map_err(|e| format!("training: {e}"))?;
        // The personalised head stays here, for the next round and for evaluations.
        trained
            .checkpoint
            .to_safetensors()
            .map_err(|e| e.to_string())
            .and_then(|bytes| {
                crate::queue::write_durably(&self.dir.local_checkpoint(), &bytes, 0o600)
                    .map_err(|e| e.to_string())
            })?;
        Ok(trained)
    }

    /// Charges the round's DP-SGD to the store's own accountant and audits it.
    fn account(&mut self, round: u64, version: u64, trained: &Trained) -> Result<(), String> {
        if let Some(dp) = &trained.report.dp {
            self.state
                .spent
                .compose_poisson_gaussian(dp.sampling_rate, dp.noise_multiplier, dp.steps as u64)
                .map_err(|e| e.to_string())?;
            let delta = self.config.privacy.delta;
            let epsilon_after = self.state.spent.epsilon(delta).map_err(|e| e.to_string())?;
            self.record(AuditEvent::Privacy {
                round,
                noise_multiplier: dp.noise_multiplier,
                clip_norm: dp.clip_norm,
                steps: dp.steps as u64,
                sample_rate: dp.sampling_rate,
                epsilon_after,
                delta,
            });
        }
        self.state.last_trained_version = Some(version);
        self.state.rounds_trained += 1;
        self.dir.save(&self.state).map_err(|e| e.to_string())
    }

    /// The shared delta in protocol order, L2-clipped, quantised and masked.
    fn build(
        &mut self,
        task: &TaskConfig,
        trained: &Trained,
        session: &mut StoreSession,
    ) -> Result<PackedVector, String> {
        let layout = layout_of(&trained.delta).map_err(|e| e.to_string())?;
        let values: BTreeMap<String, Vec<f32>> = trained
            .delta
            .tensors
            .iter()
            .map(|t| (t.name.clone(), t.values.clone()))
            .collect();
        let mut flat = layout
            .flatten(&values, Scope::Shared)
            .map_err(|e| e.to_string())?;
        if let Some(dp) = &task.training.dp {
            clip_l2(&mut flat, dp.clip_norm as f32).map_err(|e| e.to_string())?;
        }
        // The stochastic rounding and this store's noise share come from a seed the audit
        // log commits to.
        let mut seed = [0u8; 32];
        OsRng.fill_bytes(&mut seed);
        self.record(AuditEvent::NoiseSeedCommitment {
            round: session.plan().round().0,
            commitment: hex::encode(Sha256::digest(seed)),
        });
        let mut rng = ChaCha20Rng::from_seed(seed);
        let quantised = session
            .plan()
            .quantise(&flat, &mut rng)
            .map_err(|e| format!("quantise: {e}"))?;
        let masked = session.mask(&quantised).map_err(|e| format!("mask: {e}"))?;
        Ok(masked.vector)
    }
}

/// Training proper: the loss of the global model on the training rows first (the
/// update header's `loss`), then the round.
fn train_blocking(
    task: &TaskConfig,
    data: &StoreData,
    global: &Weights,
    local: Option<&Weights>,
) -> Result<Trained, TrainError> {
    let rows = normalised(task, &data.train)?;
    let before = train::build_model(task, global, local)?;
    let loss_before = mean_loss(&before, &rows)?;
    drop(before);
    let outcome = train::run_round(task, data, global, local)?;
    Ok(Trained {
        delta: outcome.delta,
        checkpoint: outcome.checkpoint,
        report: outcome.report,
        loss_before,
    })
}

/// Milliseconds since the Unix epoch.
pub(super) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
