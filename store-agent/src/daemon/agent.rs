//! One store hosted by the daemon: its identity, client, data, queue, state and audit log,
//! and the loop that polls its PoP.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use ed25519_dalek::VerifyingKey;
use fedmesh_protocol::ids::{RoundId, StoreId};
use fedmesh_protocol::wire::{self, ReceiptStatus, RoundAnnouncement, RoundReceipt, UploadReceipt};
use rand::Rng;
use sha2::{Digest, Sha256};
use tokio::sync::{Semaphore, watch};
use tokio::time::Instant;

use super::hardware::Hardware;
use super::pop::{Pop, PopError};
use super::state::{AgentState, StateDir};
use super::{DaemonError, envelope};
use crate::audit::{AuditEvent, AuditLog};
use crate::config::AgentConfig;
use crate::ingest::{self, DataFiles, StoreData};
use crate::queue::{EntryState, QueuedUpdate, UploadQueue};
use crate::secrets::RoundSecrets;
use crate::spec::FeatureSpec;
use crate::window::TrainingWindow;

/// How often an entry's receipt is asked for at most.
const RECEIPT_INTERVAL: Duration = Duration::from_millis(500);

/// A store hosted by the daemon.
pub struct StoreAgent {
    pub(super) config: AgentConfig,
    pub(super) store: StoreId,
    pub(super) pop: Pop,
    pub(super) key: VerifyingKey,
    pub(super) data: Arc<StoreData>,
    pub(super) dataset_sha256: String,
    pub(super) dir: StateDir,
    pub(super) queue: UploadQueue,
    pub(super) secrets: RoundSecrets,
    pub(super) audit: AuditLog,
    pub(super) state: AgentState,
    pub(super) window: TrainingWindow,
    pub(super) runtime: semver::Version,
    pub(super) hardware: Arc<Hardware>,
    pub(super) trainers: Arc<Semaphore>,
    /// The last round a decision was made for, so a round is decided (and logged) once.
    pub(super) decided: Option<u64>,
    /// Candidates already evaluated, by round and digest.
    pub(super) evaluated: BTreeSet<(u64, String)>,
    /// When each queued entry's receipt may next be asked for.
    receipt_due: HashMap<String, Instant>,
    /// Entries to send (again): every open entry found at start-up.
    resend: HashSet<String>,
    /// Entries a PoP refused outright (stale round, policy): not sent again by this
    /// process; core's receipt settles them.
    refused: HashSet<String>,
}

/// Why the loop stopped a step early.
#[derive(Debug)]
pub(super) enum Stop {
    /// Shutdown was asked for.
    Shutdown,
}

impl StoreAgent {
    /// Opens a store: loads its data, opens its state, queue and audit log, and builds its
    /// client.
    ///
    /// # Errors
    ///
    /// [`DaemonError`] naming what failed to load.
    pub async fn open(
        config: AgentConfig,
        hardware: Arc<Hardware>,
        trainers: Arc<Semaphore>,
    ) -> Result<Self, DaemonError> {
        let store = StoreId(config.store.id.clone());
        let dir = StateDir::open(&config.state.dir)?;
        let queue = UploadQueue::open(&dir.queue_dir())?;
        let secrets = RoundSecrets::open(&dir.secrets_dir())?;
        let audit = AuditLog::open(&dir.audit_log())?;
        let state = dir.load()?;
        let key =
            fedmesh_core_agg::registry::keys::read_verifying_key(&config.registry.public_key)?;

        let mut spec = FeatureSpec::from_path(&config.data.feature_spec)?;
        if let Some(train_max) = config.data.train_max {
            spec.split.train_max = train_max;
        }
        let files = DataFiles {
            sales: config.data.sales.clone(),
            attributes: config.data.attributes.clone(),
        };
        let data = ingest::load_store(&spec, &files, &store)?;
        let dataset_sha256 = dataset_digest(&data);

        let window = config
            .training_window()
            .map_err(|e| DaemonError::Config(e.to_string()))?;
        let runtime = config
            .runtime_version()
            .map_err(|e| DaemonError::Config(e.to_string()))?;
        let pop = Pop::connect(&config).await?;
        let resend = queue.list()?.into_iter().map(|e| e.id).collect();
        tracing::info!(
            store.id = %store,
            store.train_rows = data.train.len(),
            store.test_rows = data.test.len(),
            "store ready"
        );
        Ok(Self {
            config,
            store,
            pop,
            key,
            data: Arc::new(data),
            dataset_sha256,
            dir,
            queue,
            secrets,
            audit,
            state,
            window,
            runtime,
            hardware,
            trainers,
            decided: None,
            evaluated: BTreeSet::new(),
            receipt_due: HashMap::new(),
            resend,
            refused: HashSet::new(),
        })
    }

    /// The store's id.
    pub fn store(&self) -> &StoreId {
        &self.store
    }

    /// Polls the PoP until `shutdown` turns true: takes part in rounds, evaluates
    /// candidates, sends and settles queued updates. Waits 100-250 ms (configurable, with
    /// jitter) between polls while the PoP answers, and backs off exponentially with full
    /// jitter while it does not.
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        let mut failures = 0u32;
        while !*shutdown.borrow() {
            let wait = match self.step(&shutdown).await {
                Ok(()) => {
                    failures = 0;
                    self.poll_wait()
                }
                Err(err) => {
                    failures = failures.saturating_add(1);
                    let wait = self.backoff(failures);
                    if err.is_transient() {
                        tracing::debug!(store.id = %self.store, error = %err, "pop unreachable");
                    } else {
                        tracing::warn!(store.id = %self.store, error = %err, "poll failed");
                    }
                    wait
                }
            };
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                _ = shutdown.changed() => {}
            }
        }
        tracing::info!(store.id = %self.store, "store stopped");
    }

    /// One poll: the round, then the queue.
    async fn step(&mut self, shutdown: &watch::Receiver<bool>) -> Result<(), PopError> {
        let round: Option<RoundAnnouncement> = self.pop.get_json(wire::ROUND).await?;
        if let Some(round) = &round {
            let evaluator = round
                .evaluation
                .as_ref()
                .is_some_and(|e| e.evaluators.contains(&self.store));
            if evaluator {
                self.evaluate(round).await;
            }
            let fresh = self.decided.is_none_or(|d| round.round.0 > d)
                && self
                    .state
                    .last_joined_round
                    .is_none_or(|j| round.round.0 > j);
            // A round this store joined in an earlier process: answer its unmask request
            // from the state saved then, once.
            let joined_before = self.decided.is_none_or(|d| round.round.0 > d)
                && self.state.last_joined_round == Some(round.round.0);
            if joined_before {
                self.decided = Some(round.round.0);
                match self.resume_unmask(round, shutdown).await {
                    Ok(_) => {}
                    Err(Stop::Shutdown) => return Ok(()),
                }
            }
            if fresh {
                let previous = self.decided.replace(round.round.0);
                match self.take_part(round, shutdown).await {
                    Ok(true) => {}
                    Ok(false) => self.decided = previous,
                    Err(Stop::Shutdown) => return Ok(()),
                }
            }
        }
        self.settle_queue().await
    }

    /// Sends what is to be sent and asks for the receipt of what was sent; settles an
    /// entry once core says the round included it or closed without it.
    pub(super) async fn settle_queue(&mut self) -> Result<(), PopError> {
        let entries = match self.queue.list() {
            Ok(entries) => entries,
            Err(err) => {
                tracing::error!(store.id = %self.store, error = %err, "upload queue unreadable");
                return Ok(());
            }
        };
        let mut unreachable = None;
        for entry in entries {
            let unsent =
                matches!(entry.state, EntryState::Queued) && !self.refused.contains(&entry.id);
            let due = unsent || self.resend.contains(&entry.id);
            if due {
                // An update a PoP acknowledged before this process started may sit in that
                // PoP's sum: sent again, it must be marked so that core holds it apart.
                let resent = matches!(entry.state, EntryState::Sent { .. });
                match self.send_entry(&entry, resent).await {
                    Ok(()) => {}
                    Err(err) if err.is_transient() => {
                        unreachable = Some(err);
                        continue;
                    }
                    Err(err) => {
                        // Refused (stale round, policy): core's receipt decides its fate.
                        tracing::warn!(store.id = %self.store, round.id = entry.meta.round,
                            error = %err, "update refused by the pop");
                        self.resend.remove(&entry.id);
                        self.refused.insert(entry.id.clone());
                    }
                }
            }
            if let Err(err) = self.check_receipt(&entry).await {
                unreachable = Some(err);
            }
        }
        match unreachable {
            Some(err) if err.is_transient() => Err(err),
            _ => Ok(()),
        }
    }

    /// Sends one queued update, `resent` when a PoP may already hold it; on the PoP's
    /// receipt, records it as sent.
    pub(super) async fn send_entry(
        &mut self,
        entry: &QueuedUpdate,
        resent: bool,
    ) -> Result<(), PopError> {
        let payload = self
            .queue
            .payload(&entry.id)
            .map_err(|e| PopError::Malformed {
                path: entry.id.clone(),
                reason: e.to_string(),
            })?;
        let (mut header, body) =
            envelope::open(&payload).map_err(|reason| PopError::Malformed {
                path: entry.id.clone(),
                reason,
            })?;
        header.upload_id = entry.id.clone();
        header.resent = resent;
        let path = wire::update(header.round);
        let receipt: UploadReceipt = match self.pop.put_update(&path, &header, body.into()).await {
            Ok(receipt) => receipt,
            Err(err) => {
                if !err.is_transient() {
                    self.refused.insert(entry.id.clone());
                }
                return Err(err);
            }
        };
        if receipt.upload_id != entry.id || receipt.round != header.round {
            return Err(PopError::Malformed {
                path,
                reason: format!("receipt for {} of {:?}", receipt.upload_id, receipt.round),
            });
        }
        let text = serde_json::to_string(&receipt).unwrap_or_default();
        if let Err(err) = self.queue.mark_sent(&entry.id, &text) {
            tracing::error!(store.id = %self.store, error = %err, "cannot record a sent update");
        }
        self.resend.remove(&entry.id);
        self.record(AuditEvent::UpdateHeld {
            round: header.round.0,
            update_sha256: entry.sha256.clone(),
            pop: receipt.pop.clone(),
        });
        tracing::debug!(store.id = %self.store, round.id = header.round.0, pop = %receipt.pop,
            "update held by the pop");
        Ok(())
    }

    async fn check_receipt(&mut self, entry: &QueuedUpdate) -> Result<(), PopError> {
        let now = Instant::now();
        if self
            .receipt_due
            .get(&entry.id)
            .is_some_and(|due| now < *due)
        {
            return Ok(());
        }
        self.receipt_due
            .insert(entry.id.clone(), now + RECEIPT_INTERVAL);
        let round = RoundId(entry.meta.round);
        let Some(receipt) = self
            .pop
            .get_json::<RoundReceipt>(&wire::receipt(round))
            .await?
        else {
            return Ok(());
        };
        if receipt.round != round || receipt.store != self.store {
            return Err(PopError::Malformed {
                path: wire::receipt(round),
                reason: format!("receipt for {} in {:?}", receipt.store, receipt.round),
            });
        }
        let included = match receipt.status {
            ReceiptStatus::Open => return Ok(()),
            ReceiptStatus::Resend => return self.resend_entry(entry).await,
            ReceiptStatus::Included => true,
            ReceiptStatus::NotIncluded => false,
        };
        self.settle(entry, included);
        Ok(())
    }

    /// Core says no PoP brought this update although the PoPs should have forwarded by now:
    /// the PoP that took it is gone. Sends it again, marked re-sent, through whichever PoP
    /// answers now; core's next receipt settles it.
    pub(super) async fn resend_entry(&mut self, entry: &QueuedUpdate) -> Result<(), PopError> {
        tracing::info!(store.id = %self.store, round.id = entry.meta.round,
            "update missing at core, sending it again");
        match self.send_entry(entry, true).await {
            Ok(()) => {
                self.record(AuditEvent::UpdateResent {
                    round: entry.meta.round,
                    update_sha256: entry.sha256.clone(),
                });
                Ok(())
            }
            Err(err) if err.is_transient() => Err(err),
            Err(err) => {
                tracing::warn!(store.id = %self.store, round.id = entry.meta.round,
                    error = %err, "re-sent update refused by the pop");
                Ok(())
            }
        }
    }

    fn settle(&mut self, entry: &QueuedUpdate, included: bool) {
        if let Err(err) = self.queue.settle(&entry.id, included) {
            tracing::error!(store.id = %self.store, error = %err, "cannot settle an update");
            return;
        }
        self.receipt_due.remove(&entry.id);
        self.resend.remove(&entry.id);
        self.refused.remove(&entry.id);
        if let Err(err) = self.secrets.forget_through(entry.meta.round) {
            tracing::error!(store.id = %self.store, error = %err, "cannot delete round secrets");
        }
        self.record(AuditEvent::UploadConfirmed {
            round: entry.meta.round,
            update_sha256: entry.sha256.clone(),
            included,
        });
        tracing::info!(
            store.id = %self.store,
            round.id = entry.meta.round,
            outcome = if included { "included" } else { "not-included" },
            "round settled"
        );
    }

    /// Appends an audit event; a failure is logged, never hidden.
    pub(super) fn record(&mut self, event: AuditEvent) {
        let now = jiff::Timestamp::now().to_string();
        if let Err(err) = self.audit.append(&now, &event) {
            tracing::error!(store.id = %self.store, error = %err, "audit log append failed");
        }
    }

    /// A wait between polls, uniform in the configured range.
    pub(super) fn poll_wait(&self) -> Duration {
        let (min, max) = (self.config.pop.poll_min_ms, self.config.pop.poll_max_ms);
        Duration::from_millis(rand::thread_rng().gen_range(min..=max))
    }

    /// Exponential backoff with full jitter after `failures` failed polls in a row.
    fn backoff(&self, failures: u32) -> Duration {
        let (floor, ceiling) = backoff_range(&self.config.pop, failures);
        Duration::from_millis(rand::thread_rng().gen_range(floor..=ceiling))
    }
}

/// The range (ms) the wait after `failures` failed polls in a row is drawn from, uniformly:
/// from the shortest poll wait up to the longest doubled per failure, capped at
/// `backoff_max_ms`. Full jitter keeps hundreds of stores that lost the WAN together from
/// coming back in step.
pub(super) fn backoff_range(pop: &crate::config::PopSection, failures: u32) -> (u64, u64) {
    let ceiling = pop
        .poll_max_ms
        .saturating_mul(1u64 << failures.min(20))
        .min(pop.backoff_max_ms);
    (pop.poll_min_ms.min(ceiling), ceiling)
}

/// SHA-256 over the loaded (redacted) rows: features and targets, train then test, as
/// little-endian float32.
fn dataset_digest(data: &StoreData) -> String {
    let mut hash = Sha256::new();
    for set in [&data.train, &data.test] {
        hash.update((set.dim as u64).to_le_bytes());
        hash.update((set.len() as u64).to_le_bytes());
        for v in set.features.iter().chain(&set.targets) {
            hash.update(v.to_le_bytes());
        }
    }
    hex::encode(hash.finalize())
}

#[cfg(test)]
mod tests {
    use super::backoff_range;
    use crate::config::PopSection;

    fn pop() -> PopSection {
        let mut pop: PopSection =
            toml::from_str("address = \"127.0.0.1:1\"").expect("a pop section");
        pop.poll_min_ms = 1_000;
        pop.poll_max_ms = 2_000;
        pop.backoff_max_ms = 30_000;
        pop
    }

    #[test]
    fn backoff_doubles_per_failure_up_to_the_cap_from_the_shortest_poll() {
        // 2 s doubled: 4, 8, 16 s, then the 30 s cap, however many failures follow.
        let pop = pop();
        let ceilings: Vec<u64> = (1..=6).map(|f| backoff_range(&pop, f).1).collect();
        assert_eq!(ceilings, [4_000, 8_000, 16_000, 30_000, 30_000, 30_000]);
        assert_eq!(backoff_range(&pop, 1_000).1, 30_000, "no overflow");
        assert!((0..40).all(|f| backoff_range(&pop, f).0 == 1_000));
    }

    #[test]
    fn a_cap_below_the_poll_wait_still_gives_a_valid_range() {
        let mut pop = pop();
        pop.backoff_max_ms = 500;
        assert_eq!(backoff_range(&pop, 3), (500, 500));
    }
}
