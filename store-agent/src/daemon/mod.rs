//! The store agent as a running daemon: `store-agent run --config A.toml [--config B.toml]`.
//!
//! One tokio runtime hosts one task per store ([`agent::StoreAgent`]), each with its own
//! identity, client, data, upload queue, state directory and audit log. Training runs on
//! the blocking pool behind a semaphore of `resources.threads` permits, so libtorch's
//! threads (set once per process) are never oversubscribed by stores training at once.
//!
//! What a store does each poll is MESH step 3: see [`agent`] for the loop and the queue,
//! and the `round` module for one round. What it does not do: resume a round's secure
//! aggregation after a restart. The round keys live only in the process (the protocol's
//! session cannot be exported), so a restarted store re-sends its queued update, cannot
//! answer that round's unmask request (its neighbours' shares cover it), and waits for
//! the next round.

pub mod agent;
mod evaluate;
pub mod hardware;
pub mod models;
pub mod pop;
mod round;
pub mod state;
pub mod status;

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Semaphore, watch};

use crate::config::AgentConfig;
use agent::StoreAgent;
use hardware::Hardware;

/// Why the daemon could not start a store.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// A config value is unusable.
    #[error("config: {0}")]
    Config(String),
    /// The state directory failed.
    #[error(transparent)]
    State(#[from] state::StateError),
    /// The upload queue or round secrets failed.
    #[error(transparent)]
    Queue(#[from] crate::queue::QueueError),
    /// The audit log failed or does not verify.
    #[error(transparent)]
    Audit(#[from] crate::audit::AuditError),
    /// The registry's public key file failed.
    #[error("registry public key: {0}")]
    RegistryKey(#[from] fedmesh_core_agg::registry::keys::KeyFileError),
    /// The feature spec failed.
    #[error(transparent)]
    Spec(#[from] crate::spec::SpecError),
    /// The store's data failed to load.
    #[error(transparent)]
    Ingest(#[from] crate::ingest::IngestError),
    /// The PoP client could not be set up.
    #[error(transparent)]
    Pop(#[from] pop::PopError),
    /// The hardware does not fit the config (CUDA asked for, none present).
    #[error("hardware: {0}")]
    Hardware(#[from] crate::model::ModelError),
}

/// Runs every configured store until `shutdown` turns true, then returns once each store
/// has finished the step at hand (an upload in flight completes or stays queued).
///
/// # Errors
///
/// [`DaemonError`] when a store cannot start; no store runs then.
pub async fn run(
    configs: Vec<AgentConfig>,
    shutdown: watch::Receiver<bool>,
) -> Result<(), DaemonError> {
    // 1. Stores share nothing on disk: two with one state directory would share a queue.
    let Some(first) = configs.first() else {
        return Ok(());
    };
    for (i, config) in configs.iter().enumerate() {
        let clash = configs[..i]
            .iter()
            .find(|other| other.state.dir == config.state.dir || other.store.id == config.store.id);
        if let Some(other) = clash {
            return Err(DaemonError::Config(format!(
                "stores {} and {} share a store id or state.dir {}",
                other.store.id,
                config.store.id,
                config.state.dir.display()
            )));
        }
    }

    // 2. The machine, once: libtorch's threads are process-wide.
    let mut resources = first.resources.clone();
    resources.threads = configs
        .iter()
        .map(|c| c.resources.threads)
        .max()
        .unwrap_or(1);
    let hardware = Arc::new(Hardware::detect(&resources)?);
    crate::train::configure_threads(hardware.threads);
    tracing::info!(
        hardware.cuda = hardware.cuda,
        hardware.bf16 = hardware.bf16,
        hardware.cores = hardware.cores,
        hardware.memory_available_mib = hardware.memory_available_mib,
        device = ?hardware.device,
        precision = if hardware.precision_bf16 { "bf16" } else { "f32" },
        threads = hardware.threads,
        batch_cap = hardware.batch_cap,
        training_memory_mib = hardware.training_memory_mib,
        stores = configs.len(),
        "hardware detected"
    );
    let trainers = Arc::new(Semaphore::new(hardware.threads.max(1)));

    // 3. Every store opens before any runs, so a bad config stops the process whole.
    let mut agents = Vec::with_capacity(configs.len());
    for config in configs {
        agents.push(StoreAgent::open(config, Arc::clone(&hardware), Arc::clone(&trainers)).await?);
    }
    let tasks: Vec<_> = agents
        .into_iter()
        .map(|agent| tokio::spawn(agent.run(shutdown.clone())))
        .collect();
    for task in tasks {
        if let Err(err) = task.await {
            tracing::error!(error = %err, "store task ended abnormally");
        }
    }
    Ok(())
}

/// How long `run` waits for stores to finish after shutdown before the process exits.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(60);

/// The queue payload of an update: the [`wire::UpdateHeader`] (without its upload id,
/// which is the queue entry's id) and the packed bytes, so that a restarted agent can
/// send it again exactly as built.
///
/// [`wire::UpdateHeader`]: fedmesh_protocol::wire::UpdateHeader
pub mod envelope {
    use fedmesh_protocol::wire::UpdateHeader;

    /// `[u32 LE header length][header JSON][body]`.
    pub fn seal(header: &UpdateHeader, body: &[u8]) -> Vec<u8> {
        let json = serde_json::to_vec(header).unwrap_or_default();
        let mut out = Vec::with_capacity(4 + json.len() + body.len());
        out.extend_from_slice(&(json.len() as u32).to_le_bytes());
        out.extend_from_slice(&json);
        out.extend_from_slice(body);
        out
    }

    /// Splits a sealed payload.
    ///
    /// # Errors
    ///
    /// A sentence naming what is wrong.
    pub fn open(payload: &[u8]) -> Result<(UpdateHeader, Vec<u8>), String> {
        let (len, rest) = payload
            .split_first_chunk::<4>()
            .ok_or("update envelope truncated")?;
        let len = u32::from_le_bytes(*len) as usize;
        if rest.len() < len {
            return Err("update envelope header truncated".into());
        }
        let header = serde_json::from_slice(&rest[..len])
            .map_err(|e| format!("update envelope header: {e}"))?;
        Ok((header, rest[len..].to_vec()))
    }
}
