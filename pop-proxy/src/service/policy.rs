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

#[cfg(test)]
mod tests {
    use std::path::Path;

    use fedmesh_protocol::ids::{Region, RoundId};

    use super::*;

    fn input(runtime: &str) -> PolicyInput {
        PolicyInput {
            spiffe_id: "spiffe://fedmesh.test/store/north/2".into(),
            trust_domain: "fedmesh.test".into(),
            runtime_version: runtime.into(),
            epsilon_remaining: 3.0,
            region: Region("north".into()),
            round: Some(RoundId(1)),
            route: "/v1/rounds/{round}/update".into(),
            method: "PUT".into(),
        }
    }

    fn copy_dir(from: &Path, to: &Path) {
        std::fs::create_dir_all(to).unwrap();
        for entry in std::fs::read_dir(from).unwrap() {
            let entry = entry.unwrap();
            let target = to.join(entry.file_name());
            if entry.file_type().unwrap().is_dir() {
                copy_dir(&entry.path(), &target);
            } else {
                std::fs::copy(entry.path(), target).unwrap();
            }
        }
    }

    fn config(dir: &Path, policy: &Path, min_runtime: &str) -> PolicyConfig {
        let text = format!(
            "path = {policy:?}\ndecision_log = {log:?}\n[data]\n\
             stores_trust_domain = \"fedmesh.test\"\nmin_runtime_version = \"{min_runtime}\"\n",
            log = dir.join("decisions.jsonl"),
        );
        toml::from_str(&text).unwrap()
    }

    #[test]
    fn configured_data_replaces_the_policys_own_values() {
        let dir = tempfile::tempdir().unwrap();
        let policy = fedmesh_policy::default_policy_dir();

        // The shipped data names another trust domain and a 1.4.2 minimum; the config's
        // values decide instead.
        let gate = PolicyGate::open(&config(dir.path(), &policy, "2.0.0")).unwrap();
        let old = gate.decide(&input("1.10.0"));
        assert!(!old.allow);
        let rules: Vec<&str> = old.reasons.iter().map(|d| d.rule.as_str()).collect();
        assert_eq!(rules, ["runtime_version"]);
        assert!(gate.decide(&input("2.1.0")).allow);

        let log = std::fs::read_to_string(dir.path().join("decisions.jsonl")).unwrap();
        assert_eq!(log.lines().count(), 2);
    }

    #[test]
    fn broken_policy_change_keeps_the_last_good_one_and_a_good_change_applies() {
        let dir = tempfile::tempdir().unwrap();
        let policy = dir.path().join("rego");
        copy_dir(&fedmesh_policy::default_policy_dir(), &policy);
        let gate = PolicyGate::open(&config(dir.path(), &policy, "0.1.0")).unwrap();
        assert!(gate.decide(&input("0.2.0")).allow);

        // 1. A module that does not parse: refused, decisions unchanged.
        let extra = policy.join("fedmesh/pop/extra.rego");
        std::fs::write(&extra, "package fedmesh.pop\nthis is not rego").unwrap();
        gate.reload_if_changed();
        assert!(gate.decide(&input("0.2.0")).allow);

        // 2. A rule that denies everything from the north region: in force at once.
        std::fs::write(
            &extra,
            "package fedmesh.pop\nimport rego.v1\n\
             deny contains {\"rule\": \"north_closed\", \"reason\": \"closed\"} \
             if input.region == \"north\"\n",
        )
        .unwrap();
        gate.reload_if_changed();
        let decision = gate.decide(&input("0.2.0"));
        assert!(!decision.allow);
        assert_eq!(decision.reasons[0].rule, "north_closed");
    }
}
