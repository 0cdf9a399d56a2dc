//! The store agent's one config file (TOML), read and checked at start-up.
//!
//! Every key, its meaning and its default:
//!
//! ```toml
//! [store]
//! id = "2"                          # required: the store's id, as in its SPIFFE ID
//! region = "north"                  # required: the region selection caps group it in
//! time_zone = "America/Chicago"     # required: IANA zone the training window is read in
//!
//! [pop]
//! address = "pop.fl.example:4433"   # required: the PoPs' anycast address, host:port
//!
//! [identity]                        # the store's X509-SVID, its key and the trust bundle
//! svid = "/etc/fedmesh/svid.pem"        # default
//! key = "/etc/fedmesh/svid.key.pem"     # default
//! bundle = "/etc/fedmesh/bundle.pem"    # default
//!
//! [data]
//! sales = "/srv/pos/sales.csv.gz"   # required: sales rows, CSV, optionally gzip
//! attributes = "/srv/pos/store.csv" # optional: store attributes the feature spec joins
//! feature_spec = "/etc/fedmesh/features.toml"  # required
//!
//! [window]
//! hours = "01:00-04:00"             # default: local hours in which training may run
//!
//! [resources]
//! threads = 1                       # default: libtorch threads (0: one per core)
//! memory_mib = 2048                 # default: memory the agent may use for training
//! device = "auto"                   # default: auto | cpu | cuda
//!
//! [privacy]
//! epsilon_budget = 8.0              # default: the store's own record-level budget
//! delta = 1e-5                      # default
//!
//! [state]
//! dir = "/var/lib/fedmesh-store-agent"  # default: queue, secrets, audit log, models
//! ```
//!
//! An unknown or misspelt key, a missing required key or a value of the wrong kind is an
//! error that names the key and the file, before the agent does anything else.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::task::DeviceChoice;
use crate::window::TrainingWindow;

/// Why the config file was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("config {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The TOML is malformed, or a key is unknown, missing or of the wrong kind.
    #[error("config {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's account, which names the key and its line.
        message: String,
    },
    /// A key parsed but its value is not acceptable.
    #[error("config {path}: key `{key}`: {reason}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// Dotted key, e.g. `privacy.epsilon_budget`.
        key: &'static str,
        /// What is wrong with the value.
        reason: String,
    },
}

/// The store agent's configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// Who the store is.
    pub store: StoreSection,
    /// Where its PoP is.
    pub pop: PopSection,
    /// Its identity files.
    #[serde(default)]
    pub identity: IdentitySection,
    /// Its data.
    pub data: DataSection,
    /// When it may train.
    #[serde(default)]
    pub window: WindowSection,
    /// What it may use.
    #[serde(default)]
    pub resources: ResourcesSection,
    /// Its privacy budget.
    #[serde(default)]
    pub privacy: PrivacySection,
    /// Where it keeps state.
    #[serde(default)]
    pub state: StateSection,
}

/// `[store]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreSection {
    /// The store's id.
    pub id: String,
    /// Its region.
    pub region: String,
    /// Its IANA time zone.
    pub time_zone: String,
}

/// `[pop]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PopSection {
    /// The PoPs' anycast address, `host:port`.
    pub address: String,
}

/// `[identity]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IdentitySection {
    /// The SVID certificate chain, PEM.
    pub svid: PathBuf,
    /// The SVID's PKCS#8 key, PEM.
    pub key: PathBuf,
    /// The trust bundle, PEM.
    pub bundle: PathBuf,
}

impl Default for IdentitySection {
    fn default() -> Self {
        Self {
            svid: "/etc/fedmesh/svid.pem".into(),
            key: "/etc/fedmesh/svid.key.pem".into(),
            bundle: "/etc/fedmesh/bundle.pem".into(),
        }
    }
}

/// `[data]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataSection {
    /// Sales rows.
    pub sales: PathBuf,
    /// Store attributes, if the feature spec joins them.
    #[serde(default)]
    pub attributes: Option<PathBuf>,
    /// The feature spec.
    pub feature_spec: PathBuf,
}

/// `[window]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WindowSection {
    /// Local hours, `HH:MM-HH:MM`.
    pub hours: String,
}

impl Default for WindowSection {
    fn default() -> Self {
        Self {
            hours: "01:00-04:00".into(),
        }
    }
}

/// `[resources]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ResourcesSection {
    /// libtorch threads; 0 means one per core.
    pub threads: usize,
    /// Memory budget for training, MiB.
    pub memory_mib: u64,
    /// Device choice.
    pub device: DeviceChoice,
}

impl Default for ResourcesSection {
    fn default() -> Self {
        Self {
            threads: 1,
            memory_mib: 2048,
            device: DeviceChoice::Auto,
        }
    }
}

/// `[privacy]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PrivacySection {
    /// Record-level epsilon the store will spend at most.
    pub epsilon_budget: f64,
    /// The delta of that budget.
    pub delta: f64,
}

impl Default for PrivacySection {
    fn default() -> Self {
        Self {
            epsilon_budget: 8.0,
            delta: 1e-5,
        }
    }
}

/// `[state]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StateSection {
    /// The state directory.
    pub dir: PathBuf,
}

impl Default for StateSection {
    fn default() -> Self {
        Self {
            dir: "/var/lib/fedmesh-store-agent".into(),
        }
    }
}

impl AgentConfig {
    /// Reads and checks the config at `path`.
    ///
    /// # Errors
    ///
    /// [`ConfigError`] naming the file and the key at fault.
    pub fn from_path(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Parses and checks config text; `path` names it in errors.
    ///
    /// # Errors
    ///
    /// [`ConfigError`] naming the file and the key at fault.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let config: Self = toml::from_str(text).map_err(|err| ConfigError::Parse {
            path: path.to_owned(),
            message: err.to_string().trim_end().to_owned(),
        })?;
        config.check(path)?;
        Ok(config)
    }

    /// The training window in the store's time zone.
    ///
    /// # Errors
    ///
    /// Never for a config that [`AgentConfig::parse`] accepted.
    pub fn training_window(&self) -> Result<TrainingWindow, crate::window::WindowError> {
        TrainingWindow::new(&self.window.hours, &self.store.time_zone)
    }

    fn check(&self, path: &Path) -> Result<(), ConfigError> {
        let invalid = |key, reason: String| ConfigError::Invalid {
            path: path.to_owned(),
            key,
            reason,
        };
        for (key, value) in [
            ("store.id", &self.store.id),
            ("store.region", &self.store.region),
        ] {
            let fits = !value.is_empty() && !value.contains('/');
            if !fits {
                return Err(invalid(
                    key,
                    format!("{value:?} must be non-empty, without '/'"),
                ));
            }
        }
        if let Err(err) = jiff::tz::TimeZone::get(&self.store.time_zone) {
            return Err(invalid("store.time_zone", err.to_string()));
        }
        if let Err(err) = self.training_window() {
            return Err(invalid("window.hours", err.to_string()));
        }
        let port = self
            .pop
            .address
            .rsplit_once(':')
            .map(|(_, p)| p.parse::<u16>());
        if !matches!(port, Some(Ok(p)) if p > 0) {
            let reason = format!("{:?} is not host:port", self.pop.address);
            return Err(invalid("pop.address", reason));
        }
        let budget = self.privacy.epsilon_budget;
        if !(budget.is_finite() && budget > 0.0) {
            return Err(invalid(
                "privacy.epsilon_budget",
                format!("{budget} is not > 0"),
            ));
        }
        let delta = self.privacy.delta;
        if !(delta > 0.0 && delta < 1.0) {
            return Err(invalid(
                "privacy.delta",
                format!("{delta} is not in (0, 1)"),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
[store]
id = "2"
region = "north"
time_zone = "America/Chicago"

[pop]
address = "pop.fl.example:4433"

[data]
sales = "/srv/pos/sales.csv.gz"
feature_spec = "/etc/fedmesh/features.toml"
"#;

    fn parse(text: &str) -> Result<AgentConfig, ConfigError> {
        AgentConfig::parse(text, Path::new("/etc/fedmesh/store-agent.toml"))
    }

    #[test]
    fn minimal_config_takes_the_documented_defaults() {
        let config = parse(MINIMAL).expect("valid");
        assert_eq!(config.window.hours, "01:00-04:00");
        assert_eq!(config.resources.threads, 1);
        assert_eq!(config.privacy.epsilon_budget, 8.0);
        assert_eq!(config.state.dir, Path::new("/var/lib/fedmesh-store-agent"));
        assert_eq!(config.identity.bundle, Path::new("/etc/fedmesh/bundle.pem"));
        assert!(config.training_window().is_ok());
    }

    #[test]
    fn misspelt_key_is_named_with_the_file() {
        let text = format!("{MINIMAL}\n[resources]\nthread = 2\n");
        let err = parse(&text).expect_err("unknown key").to_string();
        assert!(
            err.starts_with("config /etc/fedmesh/store-agent.toml:"),
            "{err}"
        );
        assert!(err.contains("unknown field `thread`"), "{err}");
    }

    #[test]
    fn missing_key_is_named() {
        let text = MINIMAL.replace("region = \"north\"\n", "");
        let err = parse(&text).expect_err("missing key").to_string();
        assert!(err.contains("missing field `region`"), "{err}");
    }

    #[test]
    fn bad_values_name_their_key() {
        let cases = [
            (
                "time_zone = \"America/Chicago\"",
                "time_zone = \"Chicago\"",
                "store.time_zone",
            ),
            (
                "address = \"pop.fl.example:4433\"",
                "address = \"pop.fl.example\"",
                "pop.address",
            ),
            (
                "[data]",
                "[window]\nhours = \"1-4\"\n\n[data]",
                "window.hours",
            ),
            (
                "[data]",
                "[privacy]\nepsilon_budget = -1.0\n\n[data]",
                "privacy.epsilon_budget",
            ),
            ("id = \"2\"", "id = \"north/2\"", "store.id"),
        ];
        for (from, to, key) in cases {
            let err = parse(&MINIMAL.replace(from, to))
                .expect_err(key)
                .to_string();
            assert!(err.contains(&format!("key `{key}`")), "{key}: {err}");
        }
    }

    #[test]
    fn wrong_kind_of_value_is_named() {
        let text = format!("{MINIMAL}\n[resources]\ndevice = \"tpu\"\n");
        let err = parse(&text).expect_err("bad device").to_string();
        assert!(err.contains("device"), "{err}");
    }
}
