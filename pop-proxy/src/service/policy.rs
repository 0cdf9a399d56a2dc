//! The policy in force at this PoP: the security team's Rego with this deployment's data
//! values laid over it, reloaded when its files change, every decision logged.

use std::fs::{File, OpenOptions};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use fedmesh_policy::source::{self, PolicySource};
use fedmesh_policy::{Decision, DecisionLog, LoadError, Policy, PolicyInput, PolicyLocation};
use serde_json::Value;

use super::config::{PolicyConfig, PolicyData};

/// The compiled policy and its decision log.
#[derive(Debug)]
pub struct PolicyGate {
    location: PolicyLocation,
    entrypoint: String,
    overrides: PolicyData,
    current: RwLock<Arc<Policy>>,
    log: DecisionLog<File>,
}

impl PolicyGate {
    /// Loads the policy of `config`; the first load must succeed.
    ///
    /// # Errors
    /// [`LoadError`] when the policy cannot be read or compiled, or the decision log opened.
    pub fn open(config: &PolicyConfig) -> Result<Self, LoadError> {
        let location = PolicyLocation::from_path(&config.path);
        let policy = compile(&location, &config.entrypoint, &config.data)?;
        if let Some(parent) = config.decision_log.parent() {
            std::fs::create_dir_all(parent).map_err(|e| log_error(config, e))?;
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&config.decision_log)
            .map_err(|e| log_error(config, e))?;
        tracing::info!(
            policy.revision = policy.revision(),
            policy.path = %config.path.display(),
            "policy loaded"
        );
        Ok(Self {
            location,
            entrypoint: config.entrypoint.clone(),
            overrides: config.data.clone(),
            current: RwLock::new(Arc::new(policy)),
            log: DecisionLog::new(file),
        })
    }

    /// Decides on `input` with the policy in force and logs the decision.
    pub fn decide(&self, input: &PolicyInput) -> Decision {
        let policy = Arc::clone(&self.current.read().unwrap_or_else(|p| p.into_inner()));
        let decision = policy.decide(input);
        if let Err(error) = self.log.record(&decision, input) {
            tracing::warn!(%error, "decision log write failed");
        }
        if !decision.allow {
            tracing::info!(
                store.id = %input.spiffe_id,
                policy.rule = %decision.rule,
                policy.revision = %decision.revision,
                "store denied by policy"
            );
        }
        decision
    }

    /// Re-reads the files and swaps in the new policy if they changed and compile; a
    /// broken change is logged and the last good policy stays.
    pub fn reload_if_changed(&self) {
        let hash = self
            .current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .content_hash()
            .to_owned();
        let source = match source::read(&self.location) {
            Ok(source) if source.content_hash == hash => return,
            Ok(source) => source,
            Err(error) => {
                tracing::warn!(%error, "policy unreadable, keeping the last good one");
                return;
            }
        };
        match compile_source(source, &self.entrypoint, &self.overrides) {
            Ok(policy) => {
                tracing::info!(policy.revision = policy.revision(), "policy reloaded");
                *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(policy);
            }
            Err(error) => {
                tracing::warn!(%error, "policy refused, keeping the last good one");
            }
        }
    }

    /// Reloads every `every` until the task is aborted.
    pub fn watch(self: &Arc<Self>, every: Duration) -> tokio::task::JoinHandle<()> {
        let gate = Arc::clone(self);
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(every);
            ticker.tick().await;
            loop {
                ticker.tick().await;
                let gate = Arc::clone(&gate);
                let _ = tokio::task::spawn_blocking(move || gate.reload_if_changed()).await;
            }
        })
    }
}

fn log_error(config: &PolicyConfig, error: std::io::Error) -> LoadError {
    LoadError::Source(source::SourceError::Io {
        path: config.decision_log.clone(),
        source: error,
    })
}

fn compile(
    location: &PolicyLocation,
    entrypoint: &str,
    overrides: &PolicyData,
) -> Result<Policy, LoadError> {
    compile_source(source::read(location)?, entrypoint, overrides)
}

fn compile_source(
    mut source: PolicySource,
    entrypoint: &str,
    overrides: &PolicyData,
) -> Result<Policy, LoadError> {
    overlay(&mut source.data, overrides);
    Ok(Policy::compile(&source, entrypoint)?)
}

/// Lays the configured values over `data.fedmesh.config`.
fn overlay(data: &mut Value, overrides: &PolicyData) {
    let mut values = serde_json::Map::new();
    if let Some(v) = &overrides.stores_trust_domain {
        values.insert("stores_trust_domain".into(), Value::from(v.clone()));
    }
    if let Some(v) = &overrides.min_runtime_version {
        values.insert("min_runtime_version".into(), Value::from(v.clone()));
    }
    if let Some(v) = overrides.min_epsilon_remaining {
        values.insert("min_epsilon_remaining".into(), Value::from(v));
    }
    if let Some(routes) = &overrides.store_routes {
        values.insert(
            "store_routes".into(),
            serde_json::to_value(routes).unwrap_or(Value::Null),
        );
    }
    if values.is_empty() {
        return;
    }
    if !data.is_object() {
        *data = Value::Object(Default::default());
    }
    let mut node = data;
    for key in ["fedmesh", "config"] {
        let Some(object) = node.as_object_mut() else {
            return;
        };
        node = object
            .entry(key)
            .or_insert_with(|| Value::Object(Default::default()));
        if !node.is_object() {
            *node = Value::Object(Default::default());
        }
    }
    if let Some(config) = node.as_object_mut() {
        config.extend(values);
    }
}
