//! The embedded registry backend: one directory, one process, survives restarts.
//!
//! ```text
//! <root>/blobs/<sha256>                  safetensors bytes
//! <root>/manifests/<model>/<version>     signed manifest JSON, version zero-padded
//! <root>/current/<model>                 the current version, in decimal
//! ```
//!
//! Every write goes to a temporary file that is synced first. Blobs and manifests are then
//! hard-linked into place, which fails if the name exists, so they are never overwritten;
//! the pointer is renamed over, under a lock, after checking its old value. Only one
//! process may open a directory at a time; that is what the lock assumes.

use std::fs;
use std::io::{ErrorKind, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use fedmesh_protocol::ids::ModelVersion;

use super::{Backend, RegistryError, SignedManifest, check_model_id};
use crate::ModelId;

/// A registry kept in a local directory.
#[derive(Debug)]
pub struct EmbeddedBackend {
    root: PathBuf,
    pointer_lock: Mutex<()>,
}

impl EmbeddedBackend {
    /// Opens (creating if needed) the registry at `root`.
    ///
    /// # Errors
    ///
    /// [`RegistryError::Storage`] if the directories cannot be created.
    pub fn open(root: &Path) -> Result<Self, RegistryError> {
        for dir in ["blobs", "manifests", "current"] {
            fs::create_dir_all(root.join(dir)).map_err(|e| storage(&root.join(dir), e))?;
        }
        Ok(Self {
            root: root.to_owned(),
            pointer_lock: Mutex::new(()),
        })
    }

    /// The path a blob is stored at (for tests and operators).
    pub fn blob_path(&self, sha256: &str) -> PathBuf {
        self.root.join("blobs").join(sha256)
    }

    /// The path a manifest is stored at (for tests and operators).
    pub fn manifest_path(&self, model: &ModelId, version: ModelVersion) -> PathBuf {
        self.root
            .join("manifests")
            .join(&model.0)
            .join(format!("{:020}", version.0))
    }

    /// Writes `bytes` to `path` unless it exists; returns whether it wrote.
    fn put_if_absent(&self, path: &Path, bytes: &[u8]) -> Result<bool, RegistryError> {
        let dir = path.parent().unwrap_or(&self.root);
        fs::create_dir_all(dir).map_err(|e| storage(dir, e))?;
        let temporary = dir.join(format!(".tmp.{}.{}", std::process::id(), unique()));
        let write = || -> std::io::Result<()> {
            let mut file = fs::File::create_new(&temporary)?;
            file.write_all(bytes)?;
            file.sync_all()
        };
        write().map_err(|e| storage(&temporary, e))?;

        // link(2) refuses an existing name: that is the put-if-absent.
        let linked = fs::hard_link(&temporary, path);
        let _ = fs::remove_file(&temporary);
        match linked {
            Ok(()) => {
                fs::File::open(dir)
                    .and_then(|d| d.sync_all())
                    .map_err(|e| storage(dir, e))?;
                Ok(true)
            }
            Err(e) if e.kind() == ErrorKind::AlreadyExists => Ok(false),
            Err(e) => Err(storage(path, e)),
        }
    }
}

impl Backend for EmbeddedBackend {
    fn put_blob(&self, sha256: &str, bytes: &[u8]) -> Result<(), RegistryError> {
        if sha256.len() != 64 || !sha256.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err(RegistryError::Storage(format!(
                "{sha256:?} is not a sha-256"
            )));
        }
        self.put_if_absent(&self.blob_path(sha256), bytes)?;
        Ok(())
    }

    fn blob(&self, sha256: &str) -> Result<Option<Vec<u8>>, RegistryError> {
        if sha256.len() != 64 || !sha256.chars().all(|c| c.is_ascii_hexdigit()) {
            return Ok(None);
        }
        read_optional(&self.blob_path(sha256))
    }

    fn put_manifest(
        &self,
        model: &ModelId,
        version: ModelVersion,
        signed: &SignedManifest,
    ) -> Result<bool, RegistryError> {
        check_model_id(model)?;
        let bytes =
            serde_json::to_vec(signed).map_err(|e| RegistryError::Storage(e.to_string()))?;
        let path = self.manifest_path(model, version);
        if self.put_if_absent(&path, &bytes)? {
            return Ok(true);
        }
        // A retried publish finds its own manifest: the same bytes count as stored.
        Ok(read_optional(&path)?.is_some_and(|existing| existing == bytes))
    }

    fn manifest(
        &self,
        model: &ModelId,
        version: ModelVersion,
    ) -> Result<Option<SignedManifest>, RegistryError> {
        check_model_id(model)?;
        let path = self.manifest_path(model, version);
        let Some(bytes) = read_optional(&path)? else {
            return Ok(None);
        };
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| RegistryError::Corrupt {
                model: model.clone(),
                version,
                reason: e.to_string(),
            })
    }

    fn versions(&self, model: &ModelId) -> Result<Vec<ModelVersion>, RegistryError> {
        check_model_id(model)?;
        let dir = self.root.join("manifests").join(&model.0);
        let entries = match fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(storage(&dir, e)),
        };
        let mut versions = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| storage(&dir, e))?;
            // Temporary files start with a dot and do not parse; skip anything else too.
            if let Some(version) = entry.file_name().to_str().and_then(|n| n.parse().ok()) {
                versions.push(ModelVersion(version));
            }
        }
        versions.sort();
        Ok(versions)
    }

    fn current(&self, model: &ModelId) -> Result<Option<ModelVersion>, RegistryError> {
        check_model_id(model)?;
        let path = self.root.join("current").join(&model.0);
        let Some(bytes) = read_optional(&path)? else {
            return Ok(None);
        };
        let text = String::from_utf8_lossy(&bytes);
        let version = text.trim().parse().map_err(|_| {
            RegistryError::Storage(format!("{}: not a version: {text:?}", path.display()))
        })?;
        Ok(Some(ModelVersion(version)))
    }

    fn swap_current(
        &self,
        model: &ModelId,
        expected: Option<ModelVersion>,
        new: ModelVersion,
    ) -> Result<bool, RegistryError> {
        let _guard = self.pointer_lock.lock().unwrap_or_else(|p| p.into_inner());
        if self.current(model)? != expected {
            return Ok(false);
        }
        let path = self.root.join("current").join(&model.0);
        crate::atomic_write(&path, new.0.to_string().as_bytes()).map_err(|e| storage(&path, e))?;
        Ok(true)
    }
}

fn read_optional(path: &Path) -> Result<Option<Vec<u8>>, RegistryError> {
    match fs::read(path) {
        Ok(bytes) => Ok(Some(bytes)),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
        Err(e) => Err(storage(path, e)),
    }
}

fn storage(path: &Path, error: std::io::Error) -> RegistryError {
    RegistryError::Storage(format!("{}: {error}", path.display()))
}

/// A number unique within this process, for temporary file names.
fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}
