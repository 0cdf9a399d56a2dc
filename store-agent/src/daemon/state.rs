//! What a store remembers between rounds and across restarts, in its state directory:
//!
//! - `agent-state.json`: the last round it acted on, the model version it last trained
//!   from, its record-level privacy spending (RDP) and the last good model;
//! - `models/<sha256>.safetensors` and `models/<sha256>.manifest.json`: verified model
//!   blobs with their signed manifests (the last good one is kept, older ones pruned);
//! - `local.safetensors`: the store's own checkpoint, whose local parameters (a
//!   personalised head) never leave the store and carry over from round to round.
//!
//! Every file is written whole and durably ([`write_durably`]), so a crash leaves either
//! the old or the new version.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use fedmesh_protocol::accountant::RdpAccountant;
use serde::{Deserialize, Serialize};

use crate::queue::{QueueError, write_durably};

/// A verified model version the store holds on disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelRef {
    /// The model.
    pub model: String,
    /// The version.
    pub version: u64,
    /// SHA-256 of the blob, lowercase hex.
    pub sha256: String,
}

/// The store's persistent state.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct AgentState {
    /// The highest round the store joined; it never joins a round twice, even after a
    /// restart (its round keys died with the process).
    pub last_joined_round: Option<u64>,
    /// The model version it last trained from; older versions are refused.
    pub last_trained_version: Option<u64>,
    /// The last model that verified; kept on disk to fall back to.
    pub last_good_model: Option<ModelRef>,
    /// Record-level privacy spent so far.
    pub spent: RdpAccountant,
    /// Rounds trained.
    pub rounds_trained: u64,
}

/// Why the state directory could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// File I/O failed.
    #[error("state {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// A durable write failed.
    #[error(transparent)]
    Write(#[from] QueueError),
    /// The state file is not what the agent writes.
    #[error("state file {path} is corrupt: {reason}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

/// The state directory's layout and the files in it.
#[derive(Debug, Clone)]
pub struct StateDir {
    root: PathBuf,
}

impl StateDir {
    /// Opens (creating) the state directory.
    ///
    /// # Errors
    ///
    /// I/O errors.
    pub fn open(root: &Path) -> Result<Self, StateError> {
        let models = root.join("models");
        fs::create_dir_all(&models).map_err(|source| StateError::Io {
            path: models,
            source,
        })?;
        Ok(Self {
            root: root.to_owned(),
        })
    }

    /// The root.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The upload queue's directory.
    pub fn queue_dir(&self) -> PathBuf {
        self.root.join("queue")
    }

    /// The round-secrets directory.
    pub fn secrets_dir(&self) -> PathBuf {
        self.root.join("secrets")
    }

    /// The audit log.
    pub fn audit_log(&self) -> PathBuf {
        self.root.join("audit.jsonl")
    }

    /// The store's own checkpoint (local parameters included).
    pub fn local_checkpoint(&self) -> PathBuf {
        self.root.join("local.safetensors")
    }

    /// Reads the state, or the empty state when none was written yet.
    ///
    /// # Errors
    ///
    /// I/O errors, or [`StateError::Corrupt`].
    pub fn load(&self) -> Result<AgentState, StateError> {
        let path = self.state_file();
        match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| StateError::Corrupt {
                path,
                reason: e.to_string(),
            }),
            Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(AgentState::default()),
            Err(source) => Err(StateError::Io { path, source }),
        }
    }

    /// Writes the state durably.
    ///
    /// # Errors
    ///
    /// I/O errors.
    pub fn save(&self, state: &AgentState) -> Result<(), StateError> {
        let bytes = serde_json::to_vec_pretty(state).map_err(|e| StateError::Corrupt {
            path: self.state_file(),
            reason: e.to_string(),
        })?;
        write_durably(&self.state_file(), &bytes, 0o600)?;
        Ok(())
    }

    /// Where a verified blob is kept.
    pub fn model_blob(&self, sha256: &str) -> PathBuf {
        self.root
            .join("models")
            .join(format!("{sha256}.safetensors"))
    }

    /// Where the signed manifest of a kept blob is kept.
    pub fn model_manifest(&self, sha256: &str) -> PathBuf {
        self.root
            .join("models")
            .join(format!("{sha256}.manifest.json"))
    }

    /// Keeps a verified blob and its signed manifest.
    ///
    /// # Errors
    ///
    /// I/O errors.
    pub fn keep_model(&self, sha256: &str, blob: &[u8], manifest: &[u8]) -> Result<(), StateError> {
        write_durably(&self.model_blob(sha256), blob, 0o600)?;
        write_durably(&self.model_manifest(sha256), manifest, 0o600)?;
        Ok(())
    }

    /// Removes every kept model but `keep` (the last good and the one in use).
    ///
    /// # Errors
    ///
    /// I/O errors.
    pub fn prune_models(&self, keep: &[&str]) -> Result<(), StateError> {
        let dir = self.root.join("models");
        let entries = fs::read_dir(&dir).map_err(|source| StateError::Io {
            path: dir.clone(),
            source,
        })?;
        for entry in entries.flatten() {
            let path = entry.path();
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            let sha = name.split('.').next().unwrap_or("");
            if !keep.contains(&sha) {
                fs::remove_file(&path).map_err(|source| StateError::Io { path, source })?;
            }
        }
        Ok(())
    }

    fn state_file(&self) -> PathBuf {
        self.root.join("agent-state.json")
    }
}
