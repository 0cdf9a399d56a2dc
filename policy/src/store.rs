//! The policy a PoP enforces now, and its reloading.
//!
//! Decisions read the current policy through an `Arc` taken under a short read lock, so a
//! reload swaps the pointer without waiting for, or changing, decisions already running:
//! they finish on the revision they started with. A reload that fails (a file that does not
//! parse, a broken bundle) is refused and the last good policy stays in force.

use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex, RwLock};
use std::thread;
use std::time::Duration;

use crate::engine::{CompileError, Decision, Policy};
use crate::input::PolicyInput;
use crate::source::{self, PolicyLocation, SourceError};

/// Why a policy could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// Its files could not be read.
    #[error(transparent)]
    Source(#[from] SourceError),
    /// It does not compile.
    #[error(transparent)]
    Compile(#[from] CompileError),
}

/// What a reload check found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reload {
    /// The files are as they were.
    Unchanged,
    /// A new policy is in force.
    Reloaded {
        /// Its revision.
        revision: String,
    },
}

/// Loads a policy from `location` for `entrypoint`.
///
/// # Errors
/// [`LoadError`] when the files cannot be read or do not compile.
pub fn load(location: &PolicyLocation, entrypoint: &str) -> Result<Policy, LoadError> {
    let source = source::read(location)?;
    Ok(Policy::compile(&source, entrypoint)?)
}

/// The policy in force, and where to reload it from.
#[derive(Debug)]
pub struct PolicyStore {
    location: PolicyLocation,
    entrypoint: String,
    current: RwLock<Arc<Policy>>,
    // The content hash of the last policy that failed, so a broken file is reported once,
    // not at every poll.
    last_failure: Mutex<Option<String>>,
}

impl PolicyStore {
    /// Loads the policy at `location`; the first load must succeed.
    ///
    /// # Errors
    /// [`LoadError`] when there is no good policy to start with.
    pub fn open(location: PolicyLocation, entrypoint: &str) -> Result<Self, LoadError> {
        let policy = load(&location, entrypoint)?;
        tracing::info!(
            policy.revision = policy.revision(),
            policy.path = %location.path().display(),
            "policy loaded",
        );
        Ok(Self {
            location,
            entrypoint: entrypoint.to_string(),
            current: RwLock::new(Arc::new(policy)),
            last_failure: Mutex::new(None),
        })
    }

    /// The policy in force now.
    pub fn current(&self) -> Arc<Policy> {
        let guard = self.current.read().unwrap_or_else(|p| p.into_inner());
        Arc::clone(&guard)
    }

    /// Decides on `input` with the policy in force.
    pub fn decide(&self, input: &PolicyInput) -> Decision {
        self.current().decide(input)
    }

    /// Re-reads the files and swaps in the new policy if they changed and compile.
    ///
    /// # Errors
    /// [`LoadError`] when the changed files are refused; the previous policy stays.
    pub fn reload_if_changed(&self) -> Result<Reload, LoadError> {
        // 1. Read and compare fingerprints: no compile when nothing changed.
        let source =
            source::read(&self.location).inspect_err(|err| self.note_failure(err, None))?;
        if source.content_hash == self.current().content_hash() {
            return Ok(Reload::Unchanged);
        }

        // 2. Compile; on failure keep what is in force.
        let policy = Policy::compile(&source, &self.entrypoint)
            .map_err(LoadError::from)
            .inspect_err(|err| self.note_failure(err, Some(&source.content_hash)))?;

        // 3. Swap.
        let revision = policy.revision().to_string();
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(policy);
        *self.last_failure.lock().unwrap_or_else(|p| p.into_inner()) = None;
        tracing::info!(policy.revision = %revision, "policy reloaded");
        Ok(Reload::Reloaded { revision })
    }

    fn note_failure(&self, err: &dyn std::fmt::Display, hash: Option<&String>) {
        let mut last = self.last_failure.lock().unwrap_or_else(|p| p.into_inner());
        let key = hash.cloned().unwrap_or_else(|| err.to_string());
        if last.as_ref() != Some(&key) {
            tracing::warn!(
                policy.path = %self.location.path().display(),
                policy.revision = self.current().revision(),
                error = %err,
                "policy refused, keeping the last good one"
            );
            *last = Some(key);
        }
    }

    /// Polls the files every `every` on a thread of its own until the returned handle is
    /// dropped.
    pub fn watch(self: &Arc<Self>, every: Duration) -> Watcher {
        let (stop, stopped) = mpsc::channel::<()>();
        let store = Arc::clone(self);
        thread::spawn(move || {
            while let Err(RecvTimeoutError::Timeout) = stopped.recv_timeout(every) {
                // Failures are logged by the store and leave the last good policy.
                let _ = store.reload_if_changed();
            }
        });
        Watcher { _stop: stop }
    }
}

/// Keeps a [`PolicyStore::watch`] thread running; dropping it stops the thread.
#[derive(Debug)]
pub struct Watcher {
    _stop: mpsc::Sender<()>,
}
