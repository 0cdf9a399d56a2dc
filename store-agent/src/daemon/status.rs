//! `store-agent status`: what an operator asks about a store, read without disturbing a
//! running agent (the queue and state are only read, never repaired).

use std::path::Path;
use std::time::{Duration, SystemTime};

use fedmesh_protocol::wire;
use fedmesh_transport::{FileSvidSource, SvidPaths, SvidSource};
use serde::Serialize;

use super::pop::{Pop, PopError};
use super::state::StateDir;
use crate::config::AgentConfig;
use crate::queue::EntryState;

/// A store's status.
#[derive(Debug, Clone, Serialize)]
pub struct StatusReport {
    /// The store.
    pub store: String,
    /// Its SPIFFE ID, from its SVID.
    pub spiffe_id: Option<String>,
    /// When its SVID expires (RFC 3339).
    pub identity_expires: Option<String>,
    /// Why the SVID did not load, if it did not.
    pub identity_error: Option<String>,
    /// Whether the PoP answered.
    pub pop_reachable: bool,
    /// Over which protocol (`HTTP/3` or the `HTTP/2` fallback).
    pub pop_protocol: Option<String>,
    /// Why it did not answer.
    pub pop_error: Option<String>,
    /// The last good model.
    pub model: Option<String>,
    /// Its version.
    pub model_version: Option<u64>,
    /// The version last trained from.
    pub last_trained_version: Option<u64>,
    /// The training window as configured.
    pub window: String,
    /// Whether it is open now.
    pub window_open: bool,
    /// When it next opens (now, when open).
    pub next_window: String,
    /// Updates in the queue: `(id, round, state)`.
    pub queued: Vec<QueuedStatus>,
    /// Record-level epsilon spent.
    pub epsilon_spent: f64,
    /// The budget.
    pub epsilon_budget: f64,
    /// What is left.
    pub epsilon_left: f64,
    /// The delta of those figures.
    pub delta: f64,
}

/// One queued update.
#[derive(Debug, Clone, Serialize)]
pub struct QueuedStatus {
    /// Queue entry id (also the upload id).
    pub id: String,
    /// Its round.
    pub round: u64,
    /// `queued`, `sent` or `settled`.
    pub state: String,
}

/// Gathers the status of the store `config` describes, asking its PoP whether it answers
/// (within `timeout`).
///
/// # Errors
///
/// A sentence when the state directory or its window cannot be read.
pub async fn gather(config: &AgentConfig, timeout: Duration) -> Result<StatusReport, String> {
    // 1. Identity.
    let paths = SvidPaths {
        chain: config.identity.svid.clone(),
        key: config.identity.key.clone(),
        bundle: config.identity.bundle.clone(),
    };
    let (spiffe_id, identity_expires, identity_error) = match FileSvidSource::load(paths) {
        Ok(source) => {
            let svid = source.svid();
            let expires = rfc3339(svid.not_after());
            (Some(svid.spiffe_id().to_string()), expires, None)
        }
        Err(e) => (None, None, Some(e.to_string())),
    };

    // 2. The PoP: any HTTP answer to the health route means it is reachable.
    let probe = async {
        let pop = Pop::connect(config).await?;
        match pop.get_bytes(wire::HEALTH, 4096).await {
            Ok(_) | Err(PopError::Refused { .. }) => Ok(pop.protocol().await),
            Err(e) => Err(e),
        }
    };
    let (pop_reachable, pop_protocol, pop_error) = match tokio::time::timeout(timeout, probe).await
    {
        Ok(Ok(protocol)) => (true, protocol.map(|p| p.to_string()), None),
        Ok(Err(e)) => (false, None, Some(e.to_string())),
        Err(_) => (false, None, Some(format!("no answer within {timeout:?}"))),
    };

    // 3. State, window, queue, privacy.
    let dir = StateDir::open(&config.state.dir).map_err(|e| e.to_string())?;
    let state = dir.load().map_err(|e| e.to_string())?;
    let window = config.training_window().map_err(|e| e.to_string())?;
    let now = jiff::Timestamp::now();
    let delta = config.privacy.delta;
    let epsilon_spent = if state.spent.is_empty() {
        0.0
    } else {
        state.spent.epsilon(delta).map_err(|e| e.to_string())?
    };
    let budget = config.privacy.epsilon_budget;
    Ok(StatusReport {
        store: config.store.id.clone(),
        spiffe_id,
        identity_expires,
        identity_error,
        pop_reachable,
        pop_protocol,
        pop_error,
        model: state.last_good_model.as_ref().map(|m| m.model.clone()),
        model_version: state.last_good_model.as_ref().map(|m| m.version),
        last_trained_version: state.last_trained_version,
        window: config.window.hours.clone(),
        window_open: window.contains(now),
        next_window: window.next_open(now).to_string(),
        queued: read_queue(&dir.queue_dir()),
        epsilon_spent,
        epsilon_budget: budget,
        epsilon_left: (budget - epsilon_spent).max(0.0),
        delta,
    })
}

impl std::fmt::Display for StatusReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let or = |v: &Option<String>, d: &str| v.clone().unwrap_or_else(|| d.to_owned());
        writeln!(f, "store {}", self.store)?;
        match &self.identity_error {
            Some(e) => writeln!(f, "  identity: unusable: {e}")?,
            None => writeln!(
                f,
                "  identity: {} (expires {})",
                or(&self.spiffe_id, "?"),
                or(&self.identity_expires, "?")
            )?,
        }
        if self.pop_reachable {
            writeln!(f, "  pop: reachable over {}", or(&self.pop_protocol, "?"))?;
        } else {
            writeln!(f, "  pop: unreachable: {}", or(&self.pop_error, "?"))?;
        }
        match (&self.model, self.model_version) {
            (Some(m), Some(v)) => writeln!(f, "  model: {m} version {v}")?,
            _ => writeln!(f, "  model: none yet")?,
        }
        let open = if self.window_open {
            "open now"
        } else {
            "closed"
        };
        writeln!(
            f,
            "  window: {} ({open}; next {})",
            self.window, self.next_window
        )?;
        writeln!(f, "  queued updates: {}", self.queued.len())?;
        for q in &self.queued {
            writeln!(f, "    {} round {} {}", q.id, q.round, q.state)?;
        }
        write!(
            f,
            "  epsilon: {:.3} spent, {:.3} left of {} (delta {})",
            self.epsilon_spent, self.epsilon_left, self.epsilon_budget, self.delta
        )
    }
}

fn rfc3339(time: SystemTime) -> Option<String> {
    jiff::Timestamp::try_from(time).ok().map(|t| t.to_string())
}

/// Lists queue entries from the file names and state files alone.
fn read_queue(dir: &Path) -> Vec<QueuedStatus> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out: Vec<QueuedStatus> = entries
        .flatten()
        .filter_map(|entry| {
            let path = entry.path();
            if path.extension().is_none_or(|e| e != "update") {
                return None;
            }
            let id = path.file_stem()?.to_str()?.to_owned();
            let round = id.strip_prefix('r')?.split('-').next()?.parse().ok()?;
            let state = std::fs::read(path.with_extension("state"))
                .ok()
                .and_then(|b| serde_json::from_slice::<EntryState>(&b).ok());
            let state = match state {
                None | Some(EntryState::Queued) => "queued",
                Some(EntryState::Sent { .. }) => "sent",
                Some(EntryState::Settled { .. }) => "settled",
            };
            Some(QueuedStatus {
                id,
                round,
                state: state.to_owned(),
            })
        })
        .collect();
    out.sort_by(|a, b| (a.round, &a.id).cmp(&(b.round, &b.id)));
    out
}
