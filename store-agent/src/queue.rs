//! The upload queue: built updates on disk until core settles their round.
//!
//! An update is written to the queue before it is sent and leaves it only when core
//! confirms that its round included it or closed without it. Every step is a whole file
//! made durable before the next step starts, so killing the store agent at any moment
//! leaves the queue in a state that [`UploadQueue::open`] recovers:
//!
//! 1. `enqueue`: write `<id>.update.tmp`, fsync, rename to `<id>.update`, fsync the
//!    directory. The rename is the commit point; a left-over `.tmp` is an update that was
//!    never queued (and never sent) and is removed on open.
//! 2. `mark_sent`: write `<id>.state` (`sent`, with the PoP's receipt) the same way. An
//!    entry without a state file is `queued`. Sending again after a crash is safe: an update
//!    is bound to its round and store and carries its digest, so the PoP and core accept
//!    one copy and answer a re-send with the same receipt.
//! 3. `settle`: write `<id>.state` as `settled`, then remove the update, then the state.
//!    A crash in between leaves a `settled` entry, or a state file without its update,
//!    which open finishes removing; neither is sent again.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Metadata stored with each queued update.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpdateMeta {
    /// The round the update belongs to.
    pub round: u64,
    /// The model version it was trained from.
    pub model_version: u64,
}

/// Where a queued update stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum EntryState {
    /// Written, not yet acknowledged by a PoP.
    Queued,
    /// A PoP acknowledged it; core has not yet settled the round.
    Sent {
        /// The PoP's receipt.
        receipt: String,
    },
    /// Core settled the round; the entry is being removed.
    Settled {
        /// Whether the round included the update.
        included: bool,
    },
}

/// One update in the queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueuedUpdate {
    /// Stable id: the round and the update's digest.
    pub id: String,
    /// SHA-256 of the payload, hex.
    pub sha256: String,
    /// Round and model version.
    pub meta: UpdateMeta,
    /// Where it stands.
    pub state: EntryState,
}

/// Why the queue could not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// File I/O failed.
    #[error("upload queue {path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// A queue file is not what the queue writes.
    #[error("upload queue file {path} is corrupt: {reason}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// No entry with that id.
    #[error("no queued update {0}")]
    NotFound(String),
}

/// The durable upload queue in a state directory.
#[derive(Debug)]
pub struct UploadQueue {
    dir: PathBuf,
}

const MAGIC: &[u8; 8] = b"FMQUEUE1";

impl UploadQueue {
    /// Opens the queue in `dir`, creating it, and finishes whatever a crash interrupted.
    ///
    /// # Errors
    ///
    /// I/O errors, or a corrupt entry.
    pub fn open(dir: &Path) -> Result<Self, QueueError> {
        fs::create_dir_all(dir).map_err(io_at(dir))?;
        let queue = Self {
            dir: dir.to_owned(),
        };
        for entry in fs::read_dir(dir).map_err(io_at(dir))? {
            let path = entry.map_err(io_at(dir))?.path();
            let ext = path.extension().and_then(|e| e.to_str());
            // A state file whose update is gone was left by a crash in `settle`.
            let orphan = ext == Some("state") && !path.with_extension("update").exists();
            if ext == Some("tmp") || orphan {
                fs::remove_file(&path).map_err(io_at(&path))?;
            }
        }
        for update in queue.list()? {
            if let EntryState::Settled { .. } = update.state {
                queue.remove(&update.id)?;
            }
        }
        sync_dir(dir)?;
        Ok(queue)
    }

    /// Writes an update durably and returns its entry.
    ///
    /// Enqueuing the same payload for the same round again returns the existing entry.
    ///
    /// # Errors
    ///
    /// I/O errors.
    pub fn enqueue(&self, meta: UpdateMeta, payload: &[u8]) -> Result<QueuedUpdate, QueueError> {
        let sha256 = hex::encode(Sha256::digest(payload));
        let id = format!("r{}-{}", meta.round, &sha256[..16]);
        let path = self.update_path(&id);
        if !path.exists() {
            let header = serde_json::to_vec(&meta).expect("meta serialises");
            let mut bytes = Vec::with_capacity(MAGIC.len() + 4 + header.len() + payload.len());
            bytes.extend_from_slice(MAGIC);
            bytes.extend_from_slice(&(header.len() as u32).to_le_bytes());
            bytes.extend_from_slice(&header);
            bytes.extend_from_slice(payload);
            write_durably(&path, &bytes, 0o600)?;
            fail::fail_point!("queue.enqueue.after_commit");
        }
        self.entry(&id)
    }

    /// Records that a PoP acknowledged the update with `receipt`.
    ///
    /// # Errors
    ///
    /// [`QueueError::NotFound`] or I/O errors.
    pub fn mark_sent(&self, id: &str, receipt: &str) -> Result<(), QueueError> {
        self.entry(id)?;
        let state = EntryState::Sent {
            receipt: receipt.to_owned(),
        };
        let bytes = serde_json::to_vec(&state).expect("state serialises");
        write_durably(&self.state_path(id), &bytes, 0o600)
    }

    /// Records core's outcome for the update's round and removes it from the queue.
    ///
    /// # Errors
    ///
    /// [`QueueError::NotFound`] or I/O errors.
    pub fn settle(&self, id: &str, included: bool) -> Result<(), QueueError> {
        self.entry(id)?;
        let bytes = serde_json::to_vec(&EntryState::Settled { included }).expect("serialises");
        write_durably(&self.state_path(id), &bytes, 0o600)?;
        fail::fail_point!("queue.settle.after_mark");
        self.remove(id)
    }

    /// Every update still in the queue, oldest round first.
    ///
    /// # Errors
    ///
    /// I/O errors, or a corrupt entry.
    pub fn list(&self) -> Result<Vec<QueuedUpdate>, QueueError> {
        let mut out = Vec::new();
        for entry in fs::read_dir(&self.dir).map_err(io_at(&self.dir))? {
            let path = entry.map_err(io_at(&self.dir))?.path();
            let is_update = path.extension().is_some_and(|e| e == "update");
            let Some(stem) = path
                .file_stem()
                .and_then(|s| s.to_str())
                .filter(|_| is_update)
            else {
                continue;
            };
            match self.entry(stem) {
                Ok(entry) => out.push(entry),
                // One damaged file must not hide every other queued update: set it aside
                // for inspection and carry on.
                Err(QueueError::Corrupt { path, reason }) => quarantine(&path, &reason)?,
                Err(err) => return Err(err),
            }
        }
        out.sort_by(|a, b| (a.meta.round, &a.id).cmp(&(b.meta.round, &b.id)));
        Ok(out)
    }

    /// The payload of a queued update, verified against its digest.
    ///
    /// # Errors
    ///
    /// [`QueueError::NotFound`], [`QueueError::Corrupt`] or I/O errors.
    pub fn payload(&self, id: &str) -> Result<Vec<u8>, QueueError> {
        let (_, payload) = self.read_update(id)?;
        Ok(payload)
    }

    fn entry(&self, id: &str) -> Result<QueuedUpdate, QueueError> {
        let (meta, payload) = self.read_update(id)?;
        let sha256 = hex::encode(Sha256::digest(&payload));
        let state_path = self.state_path(id);
        let state = match fs::read(&state_path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|err| QueueError::Corrupt {
                path: state_path.clone(),
                reason: err.to_string(),
            })?,
            Err(err) if err.kind() == io::ErrorKind::NotFound => EntryState::Queued,
            Err(err) => return Err(io_at(&state_path)(err)),
        };
        Ok(QueuedUpdate {
            id: id.to_owned(),
            sha256,
            meta,
            state,
        })
    }

    fn read_update(&self, id: &str) -> Result<(UpdateMeta, Vec<u8>), QueueError> {
        let path = self.update_path(id);
        let mut bytes = Vec::new();
        match File::open(&path) {
            Ok(mut f) => f.read_to_end(&mut bytes).map_err(io_at(&path))?,
            Err(err) if err.kind() == io::ErrorKind::NotFound => {
                return Err(QueueError::NotFound(id.to_owned()));
            }
            Err(err) => return Err(io_at(&path)(err)),
        };
        let corrupt = |reason: &str| QueueError::Corrupt {
            path: path.clone(),
            reason: reason.to_owned(),
        };
        let rest = bytes
            .strip_prefix(MAGIC)
            .ok_or_else(|| corrupt("bad magic"))?;
        let (len, rest) = rest
            .split_first_chunk::<4>()
            .ok_or_else(|| corrupt("truncated"))?;
        let len = u32::from_le_bytes(*len) as usize;
        if rest.len() < len {
            return Err(corrupt("truncated header"));
        }
        let meta = serde_json::from_slice(&rest[..len]).map_err(|e| corrupt(&e.to_string()))?;
        let payload = rest[len..].to_vec();
        if !id.ends_with(&hex::encode(Sha256::digest(&payload))[..16]) {
            return Err(corrupt("payload does not match its digest"));
        }
        Ok((meta, payload))
    }

    fn remove(&self, id: &str) -> Result<(), QueueError> {
        let update = self.update_path(id);
        fs::remove_file(&update).map_err(io_at(&update))?;
        sync_dir(&self.dir)?;
        fail::fail_point!("queue.settle.after_remove_update");
        let state = self.state_path(id);
        match fs::remove_file(&state) {
            Ok(()) => {}
            Err(err) if err.kind() == io::ErrorKind::NotFound => {}
            Err(err) => return Err(io_at(&state)(err)),
        }
        sync_dir(&self.dir)
    }

    fn update_path(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.update"))
    }

    fn state_path(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.state"))
    }
}

/// Writes `bytes` to `path` so that after a crash the file is either absent (or its old
/// contents) or complete: temporary file, fsync, rename, fsync of the directory.
///
/// # Errors
///
/// I/O errors.
pub fn write_durably(path: &Path, bytes: &[u8], mode: u32) -> Result<(), QueueError> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};

    let tmp = path.with_extension(format!(
        "{}.tmp",
        path.extension().and_then(|e| e.to_str()).unwrap_or("")
    ));
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io_at(&tmp))?;
    // `mode` applies only when the file is created: tighten a left-over one too.
    file.set_permissions(fs::Permissions::from_mode(mode))
        .map_err(io_at(&tmp))?;
    file.write_all(bytes).map_err(io_at(&tmp))?;
    file.sync_all().map_err(io_at(&tmp))?;
    drop(file);
    fail::fail_point!("queue.write.before_rename");
    fs::rename(&tmp, path).map_err(io_at(path))?;
    let dir = path.parent().unwrap_or(Path::new("."));
    sync_dir(dir)
}

/// Renames a damaged queue file to `<name>.corrupt`, which the queue never reads again.
fn quarantine(path: &Path, reason: &str) -> Result<(), QueueError> {
    let mut aside = path.as_os_str().to_owned();
    aside.push(".corrupt");
    tracing::warn!(
        queue.file = %path.display(),
        queue.reason = reason,
        "quarantining a damaged queue file",
    );
    fs::rename(path, &aside).map_err(io_at(path))
}

fn sync_dir(dir: &Path) -> Result<(), QueueError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_at(dir))
}

fn io_at(path: &Path) -> impl Fn(io::Error) -> QueueError + '_ {
    move |source| QueueError::Io {
        path: path.to_owned(),
        source,
    }
}
