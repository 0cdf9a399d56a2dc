//! Per-round secret key material (secure-aggregation keys and mask seeds) on disk.
//!
//! A store must survive a restart in the middle of a round, so its round secrets live in
//! the state directory: in a directory only the agent's user can enter (0700), each in a
//! file only it can read (0600), removed as soon as the round ends.

use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::queue::{QueueError, write_durably};

/// The round-secrets directory.
#[derive(Debug)]
pub struct RoundSecrets {
    dir: PathBuf,
}

impl RoundSecrets {
    /// Opens `dir`, creating it with mode 0700 and tightening it if it is looser.
    ///
    /// # Errors
    ///
    /// I/O errors.
    pub fn open(dir: &Path) -> Result<Self, QueueError> {
        let io_err = |source| QueueError::Io {
            path: dir.to_owned(),
            source,
        };
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io_err)?;
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(io_err)?;
        // A write cut short by a crash leaves a temporary file holding a secret.
        for entry in fs::read_dir(dir).map_err(io_err)? {
            let path = entry.map_err(io_err)?.path();
            if path.extension().is_some_and(|e| e == "tmp") {
                fs::remove_file(&path).map_err(io_err)?;
            }
        }
        Ok(Self {
            dir: dir.to_owned(),
        })
    }

    /// Stores the secrets of `round`, readable by the agent's user only.
    ///
    /// # Errors
    ///
    /// I/O errors.
    pub fn store(&self, round: u64, secret: &[u8]) -> Result<(), QueueError> {
        write_durably(&self.path(round), secret, 0o600)
    }

    /// The secrets of `round`, if stored.
    ///
    /// # Errors
    ///
    /// I/O errors other than absence.
    pub fn load(&self, round: u64) -> Result<Option<zeroize::Zeroizing<Vec<u8>>>, QueueError> {
        let path = self.path(round);
        match fs::read(&path) {
            Ok(bytes) => Ok(Some(zeroize::Zeroizing::new(bytes))),
            Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(QueueError::Io { path, source }),
        }
    }

    /// Deletes the secrets of every round up to and including `round`.
    ///
    /// # Errors
    ///
    /// I/O errors.
    pub fn forget_through(&self, round: u64) -> Result<(), QueueError> {
        let io_err = |path: &Path| {
            let path = path.to_owned();
            move |source| QueueError::Io { path, source }
        };
        for entry in fs::read_dir(&self.dir).map_err(io_err(&self.dir))? {
            let path = entry.map_err(io_err(&self.dir))?.path();
            let stored = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_prefix("round-"))
                .and_then(|n| n.strip_suffix(".key"))
                .and_then(|n| n.parse::<u64>().ok());
            if stored.is_some_and(|r| r <= round) {
                fs::remove_file(&path).map_err(io_err(&path))?;
            }
        }
        Ok(())
    }

    fn path(&self, round: u64) -> PathBuf {
        self.dir.join(format!("round-{round}.key"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_private_and_forgotten_when_the_round_ends() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("secrets");
        let secrets = RoundSecrets::open(&dir).expect("open");
        secrets.store(4, b"x25519 secret").expect("store");
        secrets.store(5, b"next round").expect("store");

        let mode = |p: &Path| fs::metadata(p).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&dir.join("round-4.key")), 0o600);
        assert_eq!(
            secrets.load(4).expect("load").as_deref().map(Vec::as_slice),
            Some(&b"x25519 secret"[..])
        );

        // A temporary file left by a crash mid-write is removed when the agent restarts.
        fs::write(dir.join("round-6.key.tmp"), b"half a secret").expect("write");
        let secrets = RoundSecrets::open(&dir).expect("reopen");
        assert!(!dir.join("round-6.key.tmp").exists());

        secrets.forget_through(4).expect("forget");
        assert!(secrets.load(4).expect("load").is_none());
        assert!(secrets.load(5).expect("load").is_some());
    }
}
