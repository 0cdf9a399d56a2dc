//! Partial sums kept on disk until core acknowledges them, so that a PoP that crashes loses
//! no update it acknowledged.
//!
//! One file per open round, `round-<id>.partial`, replaced atomically: written to a
//! temporary file, synced, renamed over the old one, and the directory synced. Layout:
//!
//! ```text
//! b"FMPSUM01"                    magic and format version
//! u32 little-endian              header length H
//! H bytes of JSON                {"round", "model_version", "ring_bits", "len", "contributors"}
//! ceil(len * r / 8) bytes        the sum, bit-packed as on the wire (crate::ring)
//! 32 bytes                       SHA-256 of everything above
//! ```

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use fedmesh_protocol::ids::{ModelVersion, RoundId, StoreId};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use thiserror::Error;

use crate::ring::{Ring, Unpacker};

const MAGIC: &[u8; 8] = b"FMPSUM01";
/// Largest header accepted: a contributor list of some hundred thousand stores.
const MAX_HEADER: usize = 64 * 1024 * 1024;

/// A directory holding the partial sums not yet acknowledged by core.
#[derive(Debug, Clone)]
pub struct StateDir {
    dir: PathBuf,
}

/// A round's saved state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SavedRound {
    /// The round.
    pub round: RoundId,
    /// Its model version.
    pub model_version: ModelVersion,
    /// Its ring.
    pub ring: Ring,
    /// Stores in the sum.
    pub contributors: Vec<StoreId>,
    /// The sum, reduced.
    pub values: Vec<u64>,
}

/// A round's state to save, borrowed from the accumulator.
#[derive(Debug, Clone, Copy)]
pub struct SavedView<'a> {
    /// The round.
    pub round: RoundId,
    /// Its model version.
    pub model_version: ModelVersion,
    /// Its ring.
    pub ring: Ring,
    /// Stores in the sum.
    pub contributors: &'a [StoreId],
    /// The sum, reduced.
    pub values: &'a [u64],
}

#[derive(Serialize, Deserialize)]
struct Header {
    round: RoundId,
    model_version: ModelVersion,
    ring_bits: u32,
    len: usize,
    contributors: Vec<StoreId>,
}

/// Why state could not be saved or recovered.
#[derive(Debug, Error)]
pub enum StateError {
    /// The disk failed.
    #[error("state file {path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The file is damaged (truncated, bad checksum, bad header).
    #[error("state file {path} is corrupt: {what}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        what: String,
    },
    /// The saved round does not match the plan it is recovered for.
    #[error("saved round does not match the plan: {0}")]
    PlanMismatch(String),
}

impl SavedRound {
    /// Checks the saved state against the plan's version, ring and length.
    ///
    /// # Errors
    /// [`StateError::PlanMismatch`] naming the field.
    pub fn check_plan(
        &self,
        model_version: ModelVersion,
        ring: Ring,
        len: usize,
    ) -> Result<(), StateError> {
        if self.model_version != model_version {
            return Err(StateError::PlanMismatch(format!(
                "model {} saved, {} planned",
                self.model_version, model_version
            )));
        }
        if self.ring != ring {
            return Err(StateError::PlanMismatch(format!(
                "ring {} bits saved, {} planned",
                self.ring.bits(),
                ring.bits()
            )));
        }
        if self.values.len() != len {
            return Err(StateError::PlanMismatch(format!(
                "{} elements saved, {len} planned",
                self.values.len()
            )));
        }
        Ok(())
    }
}

impl StateDir {
    /// Uses `dir`, creating it if needed.
    ///
    /// # Errors
    /// [`StateError::Io`] if it cannot be created.
    pub fn open(dir: impl Into<PathBuf>) -> Result<Self, StateError> {
        let dir = dir.into();
        fs::create_dir_all(&dir).map_err(|source| StateError::Io {
            path: dir.clone(),
            source,
        })?;
        Ok(Self { dir })
    }

    fn path(&self, round: RoundId) -> PathBuf {
        self.dir.join(format!("round-{}.partial", round.0))
    }

    /// Replaces the round's saved state with `state`, durably.
    ///
    /// # Errors
    /// [`StateError::Io`]; the previous state is intact then.
    pub fn save(&self, state: SavedView<'_>) -> Result<(), StateError> {
        // 1. Serialise.
        let path = self.path(state.round);
        let header = serde_json::to_vec(&Header {
            round: state.round,
            model_version: state.model_version,
            ring_bits: state.ring.bits(),
            len: state.values.len(),
            contributors: state.contributors.to_vec(),
        })
        .map_err(|err| StateError::Corrupt {
            path: path.clone(),
            what: err.to_string(),
        })?;
        let header_len = u32::try_from(header.len()).map_err(|_| StateError::Corrupt {
            path: path.clone(),
            what: "header over 4 GiB".into(),
        })?;
        let packed = state.ring.pack(state.values);
        let mut bytes = Vec::with_capacity(12 + header.len() + packed.len() + 32);
        bytes.extend_from_slice(MAGIC);
        bytes.extend_from_slice(&header_len.to_le_bytes());
        bytes.extend_from_slice(&header);
        bytes.extend_from_slice(&packed);
        drop(packed);
        let digest = Sha256::digest(&bytes);
        bytes.extend_from_slice(&digest);

        // 2. Write a temporary file and sync it, then rename over the old state and sync
        //    the directory so the rename itself survives a power cut.
        let tmp = path.with_extension("partial.tmp");
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| StateError::Io { path, source }
        };
        let mut file = fs::File::create(&tmp).map_err(io(&tmp))?;
        file.write_all(&bytes).map_err(io(&tmp))?;
        file.sync_all().map_err(io(&tmp))?;
        drop(file);
        fs::rename(&tmp, &path).map_err(io(&path))?;
        fs::File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io(&self.dir))
    }

    /// The saved state of `round`, if any.
    ///
    /// # Errors
    /// [`StateError::Io`] or [`StateError::Corrupt`].
    pub fn load(&self, round: RoundId) -> Result<Option<SavedRound>, StateError> {
        let path = self.path(round);
        let bytes = match fs::read(&path) {
            Ok(bytes) => bytes,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(StateError::Io { path, source }),
        };
        let corrupt = |what: &str| StateError::Corrupt {
            path: path.clone(),
            what: what.to_string(),
        };

        // 1. Checksum over everything before the trailing digest.
        if bytes.len() < MAGIC.len() + 4 + 32 || &bytes[..8] != MAGIC {
            return Err(corrupt("missing magic"));
        }
        let (body, digest) = bytes.split_at(bytes.len() - 32);
        if Sha256::digest(body).as_slice() != digest {
            return Err(corrupt("checksum mismatch"));
        }

        // 2. Header.
        let mut len_bytes = [0u8; 4];
        len_bytes.copy_from_slice(&body[8..12]);
        let header_len = u32::from_le_bytes(len_bytes) as usize;
        if header_len > MAX_HEADER || body.len() < 12 + header_len {
            return Err(corrupt("header length out of range"));
        }
        let header: Header = serde_json::from_slice(&body[12..12 + header_len])
            .map_err(|err| corrupt(&format!("header: {err}")))?;
        if header.round != round {
            return Err(corrupt("file holds another round"));
        }
        let ring = Ring::new(header.ring_bits).map_err(|err| corrupt(&err.to_string()))?;

        // 3. The sum, checked for exact length and zero padding by the wire decoder.
        let packed = &body[12 + header_len..];
        let mut unpacker =
            Unpacker::new(ring, header.len).ok_or_else(|| corrupt("length overflows"))?;
        if ring.packed_len(header.len) != Some(packed.len()) {
            return Err(corrupt("sum length does not match the header"));
        }
        let mut values = vec![0u64; header.len];
        unpacker
            .push(packed, &mut values)
            .and_then(|()| unpacker.finish())
            .map_err(|err| corrupt(&err.to_string()))?;

        Ok(Some(SavedRound {
            round,
            model_version: header.model_version,
            ring,
            contributors: header.contributors,
            values,
        }))
    }

    /// Forgets `round` once core has acknowledged its partial sum.
    ///
    /// # Errors
    /// [`StateError::Io`] other than the file being gone already.
    pub fn remove(&self, round: RoundId) -> Result<(), StateError> {
        let path = self.path(round);
        match fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(StateError::Io { path, source }),
        }
    }

    /// Rounds with saved state, to re-forward after a restart.
    ///
    /// # Errors
    /// [`StateError::Io`] if the directory cannot be listed.
    pub fn rounds(&self) -> Result<Vec<RoundId>, StateError> {
        let io = |source| StateError::Io {
            path: self.dir.clone(),
            source,
        };
        let mut rounds = Vec::new();
        for entry in fs::read_dir(&self.dir).map_err(io)? {
            let name = entry.map_err(io)?.file_name();
            let id = name
                .to_str()
                .and_then(|n| n.strip_prefix("round-"))
                .and_then(|n| n.strip_suffix(".partial"))
                .and_then(|n| n.parse().ok());
            if let Some(id) = id {
                rounds.push(RoundId(id));
            }
        }
        rounds.sort();
        Ok(rounds)
    }
}
