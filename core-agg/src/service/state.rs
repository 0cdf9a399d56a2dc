//! What core keeps on disk between steps: `state.json` (rewritten atomically after every
//! step) and `journal.jsonl` (the open round's accepted secure-aggregation messages,
//! appended and synced before they are acknowledged).
//!
//! `CoreSession` holds keys in memory and has no serialised form, so it is rebuilt after a
//! restart by replaying the journal into a fresh session at the times the messages arrived:
//! the session is deterministic, so the replay reaches the state it had, including the
//! replies stores are still polling for.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::io::Write;
use std::path::{Path, PathBuf};

use fedmesh_protocol::ids::{ModelVersion, Region, RoundId, StoreId};
use fedmesh_protocol::moments::{CohortStatistics, StatisticsTask};
use fedmesh_protocol::secagg::{
    EncryptedShares, KeyAdvert, MaskedUpdate, PartialSum, PlanConfig, UnmaskResponse,
};
use fedmesh_protocol::wire::{Contribution, PhaseDeadlines};
use serde::{Deserialize, Serialize};

use crate::rounds::Round;
use crate::strategy::Aggregator;

/// Rounds kept in the history.
pub const HISTORY: usize = 200;

/// Why state could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// File I/O failed.
    #[error("state file {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A state file does not parse.
    #[error("state file {path} is corrupt: {reason}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

/// One ended round, as `/v1/status` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoundRecord {
    /// The round.
    pub round: RoundId,
    /// The version the cohort trained from.
    pub base_version: ModelVersion,
    /// Selected stores.
    pub cohort_size: usize,
    /// Stores in the sum, by region.
    pub survivors_by_region: BTreeMap<String, usize>,
    /// The stores in the sum (receipts of past rounds are answered from this).
    pub survivors: Vec<StoreId>,
    /// Selected stores not in the sum.
    pub dropouts: usize,
    /// Partial-sum bytes received.
    pub bytes_in: u64,
    /// Milliseconds from plan to end.
    pub duration_ms: u64,
    /// Example-weighted evaluation loss of the candidate, if it was evaluated.
    pub evaluation_loss: Option<f64>,
    /// `committed` or `abandoned`.
    pub outcome: String,
    /// Why it was abandoned.
    pub reason: Option<String>,
    /// The version published by the round, if any.
    pub model_version: Option<ModelVersion>,
    /// Unix ms of the end.
    pub ended_ms: u64,
}

/// The open round.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OpenRound {
    /// The pure state machine.
    pub round: Round,
    /// The version trained from.
    pub version: ModelVersion,
    /// SHA-256 of that version's blob.
    pub model_sha256: String,
    /// Selection seed.
    pub seed: u64,
    /// Unix ms of the plan.
    pub planned_ms: u64,
    /// The secure-aggregation plan, once the cohort is selected.
    pub plan: Option<PlanConfig>,
    /// Unix ms at which the session started (the journal's time origin).
    pub session_start_ms: u64,
    /// The announced deadlines.
    pub deadlines: Option<PhaseDeadlines>,
    /// The cohort's regions.
    pub regions: BTreeMap<StoreId, Region>,
    /// Stores online and within budget at selection (store-level charges).
    pub eligible: Vec<StoreId>,
    /// Contributions in accepted partial sums.
    pub contributions: BTreeMap<StoreId, Contribution>,
    /// Partial-sum bytes received.
    pub bytes_in: u64,
    /// The candidate blob's SHA-256, once aggregated.
    pub candidate: Option<String>,
    /// Unix ms when evaluation ends.
    pub evaluation_deadline_ms: Option<u64>,
    /// Evaluation loss passed to publish.
    pub evaluation_loss: Option<f64>,
    /// Set for a federated-statistics round.
    #[serde(default)]
    pub statistics: Option<StatisticsTask>,
}

/// Everything in `state.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Persisted {
    /// The next round id.
    pub next_round: u64,
    /// Rounds committed.
    pub completed: u64,
    /// Rounds abandoned.
    pub abandoned: u64,
    /// Abandoned rounds by reason kind.
    pub abandoned_by_reason: BTreeMap<String, u64>,
    /// Rejected messages by reason.
    pub rejections: BTreeMap<String, u64>,
    /// The last rounds, oldest first.
    pub history: VecDeque<RoundRecord>,
    /// The strategy with its server state.
    pub aggregator: Aggregator,
    /// The open round.
    pub current: Option<OpenRound>,
    /// Unix ms when the last round ended.
    pub last_ended_ms: u64,
    /// Every store ever seen, for the ledger snapshot.
    pub known_stores: BTreeSet<StoreId>,
    /// The statistics round's result, once measured, with its round.
    #[serde(default)]
    pub statistics: Option<(RoundId, CohortStatistics)>,
}

impl Persisted {
    /// Fresh state.
    pub fn new(aggregator: Aggregator) -> Self {
        Self {
            next_round: 1,
            completed: 0,
            abandoned: 0,
            abandoned_by_reason: BTreeMap::new(),
            rejections: BTreeMap::new(),
            history: VecDeque::new(),
            aggregator,
            current: None,
            last_ended_ms: 0,
            known_stores: BTreeSet::new(),
            statistics: None,
        }
    }

    /// Reads `path`, or `None` if it does not exist.
    ///
    /// # Errors
    ///
    /// [`StateError`] when it cannot be read or parsed.
    pub fn load(path: &Path) -> Result<Option<Self>, StateError> {
        let bytes = match std::fs::read(path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(StateError::Io {
                    path: path.to_owned(),
                    source,
                });
            }
        };
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| StateError::Corrupt {
                path: path.to_owned(),
                reason: e.to_string(),
            })
    }

    /// Replaces `path` atomically, unless the state equals `last_saved` (what the last
    /// call wrote, which it updates): the driver saves after every tick, and most ticks
    /// change nothing.
    ///
    /// # Errors
    ///
    /// [`StateError::Io`].
    pub fn save(&self, path: &Path, last_saved: &mut Vec<u8>) -> Result<(), StateError> {
        let io = |source| StateError::Io {
            path: path.to_owned(),
            source,
        };
        let json = serde_json::to_vec(self).map_err(|e| io(std::io::Error::other(e)))?;
        if json == *last_saved {
            return Ok(());
        }
        crate::atomic_write(path, &json).map_err(io)?;
        *last_saved = json;
        Ok(())
    }
}

/// One accepted message of the open round, with its arrival time.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Entry {
    /// A key advert.
    KeyAdvert {
        /// Unix ms.
        at_ms: u64,
        /// The message.
        message: KeyAdvert,
    },
    /// Encrypted shares.
    Shares {
        /// Unix ms.
        at_ms: u64,
        /// The message.
        message: EncryptedShares,
    },
    /// A partial sum with its contributors' details.
    PartialSum {
        /// Unix ms.
        at_ms: u64,
        /// The sum.
        partial: PartialSum,
        /// What the PoP declared about each contributor.
        contributions: Vec<Contribution>,
        /// Body bytes.
        bytes: u64,
    },
    /// One store's update sent again on its own, held apart by the session.
    Resent {
        /// Unix ms.
        at_ms: u64,
        /// The update.
        update: MaskedUpdate,
        /// What the PoP declared about the store.
        contribution: Contribution,
        /// Body bytes.
        bytes: u64,
    },
    /// An unmask response.
    Unmask {
        /// Unix ms.
        at_ms: u64,
        /// The message.
        message: UnmaskResponse,
    },
    /// A phase deadline passed and the session moved on.
    Timeout {
        /// Unix ms.
        at_ms: u64,
    },
}

/// The append-only journal of the open round.
pub struct Journal {
    path: PathBuf,
}

impl Journal {
    /// The journal at `path`.
    pub fn new(path: PathBuf) -> Self {
        Self { path }
    }

    /// Appends one entry and syncs it.
    ///
    /// # Errors
    ///
    /// [`StateError::Io`].
    pub fn append(&self, entry: &Entry) -> Result<(), StateError> {
        let io = |source| StateError::Io {
            path: self.path.clone(),
            source,
        };
        let mut line = serde_json::to_vec(entry).map_err(|e| io(std::io::Error::other(e)))?;
        line.push(b'\n');
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .map_err(io)?;
        file.write_all(&line).map_err(io)?;
        file.sync_data().map_err(io)
    }

    /// Every entry; a torn last line (a crash mid-append) is ignored.
    ///
    /// # Errors
    ///
    /// [`StateError`] when the file cannot be read or a line before the last is corrupt.
    pub fn entries(&self) -> Result<Vec<Entry>, StateError> {
        let text = match std::fs::read_to_string(&self.path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => {
                return Err(StateError::Io {
                    path: self.path.clone(),
                    source,
                });
            }
        };
        let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
        let mut entries = Vec::with_capacity(lines.len());
        for (i, line) in lines.iter().enumerate() {
            match serde_json::from_str(line) {
                Ok(entry) => entries.push(entry),
                Err(_) if i + 1 == lines.len() => break,
                Err(e) => {
                    return Err(StateError::Corrupt {
                        path: self.path.clone(),
                        reason: format!("line {}: {e}", i + 1),
                    });
                }
            }
        }
        Ok(entries)
    }

    /// Empties the journal (a new round starts).
    ///
    /// # Errors
    ///
    /// [`StateError::Io`].
    pub fn clear(&self) -> Result<(), StateError> {
        crate::atomic_write(&self.path, b"").map_err(|source| StateError::Io {
            path: self.path.clone(),
            source,
        })
    }
}
