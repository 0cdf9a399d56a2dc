//! The PoP's configuration file (`pop-proxy serve --config pop.toml`).
//!
//! Every key is documented, with its default, in `pop-proxy/pop.example.toml`. Unknown keys
//! are refused, so a misspelt key fails at start-up instead of being ignored.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use thiserror::Error;

/// Why the configuration could not be used.
#[derive(Debug, Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("config {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The file is not valid TOML or holds an unknown key or a value of the wrong type.
    #[error("config {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message, naming the key and line.
        message: String,
    },
    /// A key holds a value the PoP cannot use.
    #[error("config {path}: key `{key}`: {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// The key, dotted (`policy.reload_ms`).
        key: &'static str,
        /// What is wrong.
        message: String,
    },
}

/// The whole configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The metro this PoP stands in; must match the PoP's SVID (`/pop/<metro>`).
    pub metro: String,
    /// Address stores reach: HTTP/3 on UDP and the HTTP/2 fallback on TCP, one port.
    pub listen: SocketAddr,
    /// Optional plain-HTTP address for `/healthz`, `/readyz` and `/metrics` (routing
    /// daemons' health checks and Prometheus); keep it on a loopback or management address.
    #[serde(default)]
    pub admin_listen: Option<SocketAddr>,
    /// Core's address (UDP and TCP).
    pub core: SocketAddr,
    /// Directory holding this PoP's `svid.pem`, `svid.key.pem` and `bundle.pem`.
    pub identity_dir: PathBuf,
    /// Directory for partial sums not yet acknowledged by core; survives restarts.
    pub state_dir: PathBuf,
    /// The registry's public key (`registry.pub` from `core-agg registry keygen`): the
    /// model cache serves only manifests it signed.
    pub registry_public_key: PathBuf,
    /// A file holding the QUIC stateless-reset key shared by every PoP behind the same
    /// anycast address (64 hex digits, `openssl rand -hex 32`; keep it mode 0600). With it,
    /// when one PoP dies, the PoP that receives its stores' packets resets their
    /// connections at once, instead of leaving them to their 15 s idle timeout. Absent: a
    /// key of this process, and stores of a dead PoP wait out the timeout.
    #[serde(default)]
    pub stateless_reset_key_file: Option<PathBuf>,
    /// Uploads decoded at once; further uploads wait for a slot.
    #[serde(default = "default_max_uploads")]
    pub max_uploads_in_flight: usize,
    /// How often core's ledger is fetched for the policy's remaining epsilon, ms.
    #[serde(default = "default_ledger_refresh_ms")]
    pub ledger_refresh_ms: u64,
    /// How often the PoP polls core for the round plan, ms.
    #[serde(default = "default_plan_poll_ms")]
    pub plan_poll_ms: u64,
    /// Readiness withdraws when core has not answered for this long, ms.
    #[serde(default = "default_core_timeout_ms")]
    pub core_unreachable_after_ms: u64,
    /// On SIGTERM, how long in-flight uploads may take to finish, ms.
    #[serde(default = "default_shutdown_grace_ms")]
    pub shutdown_grace_ms: u64,
    /// Largest model blob or manifest the cache keeps, bytes.
    #[serde(default = "default_cache_max_object")]
    pub cache_max_object_bytes: usize,
    /// SPIFFE ID paths allowed to call `POST /v1/admin/drain`: a caller's path matches an
    /// entry equal to it or a parent of it.
    #[serde(default = "default_admin_paths")]
    pub admin_paths: Vec<String>,
    /// The policy.
    pub policy: PolicyConfig,
}

/// The `[policy]` table.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    /// A policy directory or an OPA bundle (`.tar.gz`).
    pub path: PathBuf,
    /// The decision rule.
    #[serde(default = "default_entrypoint")]
    pub entrypoint: String,
    /// How often the policy files are checked for changes, ms.
    #[serde(default = "default_reload_ms")]
    pub reload_ms: u64,
    /// The decision log (JSON lines, appended).
    pub decision_log: PathBuf,
    /// Values that replace the policy's own `data.fedmesh.config` entries.
    #[serde(default)]
    pub data: PolicyData,
}

/// The `[policy.data]` table: per-deployment values of the policy's configuration.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyData {
    /// The trust domain stores' SVIDs come from.
    pub stores_trust_domain: Option<String>,
    /// The oldest store runtime allowed (semantic version).
    pub min_runtime_version: Option<String>,
    /// A store needs more remaining epsilon than this.
    pub min_epsilon_remaining: Option<f64>,
    /// The `(method, route)` pairs stores may use.
    pub store_routes: Option<Vec<StoreRoute>>,
}

/// One allowed store route.
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct StoreRoute {
    /// Upper-case HTTP method.
    pub method: String,
    /// The route template, e.g. `/v1/rounds/{round}/update`.
    pub route: String,
    /// Whether the route needs budget left (the default policy exempts only routes marked
    /// `false`: reading rounds, models and receipts).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budgeted: Option<bool>,
}

fn default_max_uploads() -> usize {
    64
}
fn default_ledger_refresh_ms() -> u64 {
    2_000
}
fn default_plan_poll_ms() -> u64 {
    250
}
fn default_core_timeout_ms() -> u64 {
    10_000
}
fn default_shutdown_grace_ms() -> u64 {
    10_000
}
fn default_cache_max_object() -> usize {
    256 << 20
}
fn default_admin_paths() -> Vec<String> {
    vec!["/core".into(), "/operator".into()]
}
fn default_entrypoint() -> String {
    fedmesh_policy::DEFAULT_ENTRYPOINT.into()
}
fn default_reload_ms() -> u64 {
    2_000
}

impl Config {
    /// Reads and checks `path`. Relative paths inside the file are taken relative to the
    /// file's directory.
    ///
    /// # Errors
    /// [`ConfigError`] naming the file and the key at fault.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let mut config = Self::parse(&text, path)?;
        if let Some(base) = path.parent() {
            config.resolve_relative(base);
        }
        Ok(config)
    }

    /// Parses and checks `text`; `path` names the file in errors.
    ///
    /// # Errors
    /// [`ConfigError::Parse`] or [`ConfigError::Invalid`].
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let config: Self = toml::from_str(text).map_err(|err| ConfigError::Parse {
            path: path.to_path_buf(),
            message: err.to_string().trim_end().replace('\n', " "),
        })?;
        config.check(path)?;
        Ok(config)
    }

    fn check(&self, path: &Path) -> Result<(), ConfigError> {
        let invalid = |key, message: &str| ConfigError::Invalid {
            path: path.to_path_buf(),
            key,
            message: message.to_owned(),
        };
        if fedmesh_protocol::wire::Workload::from_path(&format!("/pop/{}", self.metro)).is_none() {
            return Err(invalid(
                "metro",
                "must be 1-64 letters, digits, '-', '_' or '.'",
            ));
        }
        let positive = [
            ("max_uploads_in_flight", self.max_uploads_in_flight as u64),
            ("ledger_refresh_ms", self.ledger_refresh_ms),
            ("plan_poll_ms", self.plan_poll_ms),
            ("core_unreachable_after_ms", self.core_unreachable_after_ms),
            ("cache_max_object_bytes", self.cache_max_object_bytes as u64),
            ("policy.reload_ms", self.policy.reload_ms),
        ];
        if let Some((key, _)) = positive.iter().find(|(_, v)| *v == 0) {
            return Err(invalid(key, "must be above zero"));
        }
        if self.admin_paths.iter().any(|p| !p.starts_with('/')) {
            return Err(invalid("admin_paths", "each entry must start with '/'"));
        }
        let data = &self.policy.data;
        if let Some(version) = &data.min_runtime_version
            && semver::Version::parse(version).is_err()
        {
            return Err(invalid(
                "policy.data.min_runtime_version",
                "must be a semantic version such as 1.4.2",
            ));
        }
        if data
            .min_epsilon_remaining
            .is_some_and(|e| !e.is_finite() || e < 0.0)
        {
            return Err(invalid(
                "policy.data.min_epsilon_remaining",
                "must be a finite number >= 0",
            ));
        }
        Ok(())
    }

    fn resolve_relative(&mut self, base: &Path) {
        for path in [
            &mut self.identity_dir,
            &mut self.state_dir,
            &mut self.registry_public_key,
            &mut self.policy.path,
            &mut self.policy.decision_log,
        ] {
            if path.is_relative() {
                *path = base.join(&*path);
            }
        }
        if let Some(path) = self.stateless_reset_key_file.as_mut()
            && path.is_relative()
        {
            *path = base.join(&*path);
        }
    }

    /// [`Config::ledger_refresh_ms`] as a duration.
    pub fn ledger_refresh(&self) -> Duration {
        Duration::from_millis(self.ledger_refresh_ms)
    }

    /// [`Config::plan_poll_ms`] as a duration.
    pub fn plan_poll(&self) -> Duration {
        Duration::from_millis(self.plan_poll_ms)
    }

    /// [`Config::core_unreachable_after_ms`] as a duration.
    pub fn core_unreachable_after(&self) -> Duration {
        Duration::from_millis(self.core_unreachable_after_ms)
    }

    /// [`Config::shutdown_grace_ms`] as a duration.
    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_millis(self.shutdown_grace_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = include_str!("../../pop.example.toml");

    #[test]
    fn example_config_parses_with_every_key() {
        let config = Config::parse(EXAMPLE, Path::new("pop.example.toml")).unwrap();
        assert_eq!(config.metro, "chicago");
        assert!(config.admin_listen.is_some());
        assert_eq!(
            config.policy.data.min_runtime_version.as_deref(),
            Some("0.1.0")
        );
    }

    #[test]
    fn unknown_key_is_refused_naming_key_and_file() {
        let text = EXAMPLE.replace("plan_poll_ms", "plan_pol_ms");
        let err = Config::parse(&text, Path::new("/etc/pop.toml")).unwrap_err();
        let message = err.to_string();
        assert!(message.contains("/etc/pop.toml"), "{message}");
        assert!(message.contains("plan_pol_ms"), "{message}");
    }

    #[test]
    fn bad_value_names_its_key() {
        let text = EXAMPLE.replace(
            "min_runtime_version = \"0.1.0\"",
            "min_runtime_version = \"0.1\"",
        );
        let err = Config::parse(&text, Path::new("pop.toml")).unwrap_err();
        assert!(
            err.to_string().contains("policy.data.min_runtime_version"),
            "{err}"
        );
    }
}
