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
//! poll_min_ms = 100                 # default: shortest wait between round polls
//! poll_max_ms = 250                 # default: longest wait (uniform jitter in between)
//! backoff_max_ms = 30000            # default: cap of the backoff while the PoP is unreachable
//! # fallback_tcp_address = "pop.fl.example:4443"  # optional: HTTP/2 fallback host:port
//!                                   # (default: address)
//!
//! [registry]
//! public_key = "/etc/fedmesh/registry.pub"  # default: ed25519 public key, 32 bytes in hex
//!
//! [identity]                        # the store's X509-SVID, its key and the trust bundle
//! svid = "/etc/fedmesh/svid.pem"        # default
//! key = "/etc/fedmesh/svid.key.pem"     # default
//! bundle = "/etc/fedmesh/bundle.pem"    # default
//!
//! [data]
//! sales = "/srv/pos/sales.csv.gz"   # required: sales rows, CSV, optionally gzip
//! attributes = "/srv/pos/store.csv" # optional: store attributes the feature spec joins
//! feature_spec = "/etc/fedmesh/features.toml"  # required; its [split] picks train/test rows
//! train_max = 140.0                 # optional: overrides the spec's split.train_max (rows
//!                                   # with split column <= it train, the rest test)
//!
//! [window]
//! hours = "01:00-04:00"             # default: local hours in which training may run;
//!                                   # "00:00-24:00" means always
//!
//! [resources]
//! threads = 1                       # default: libtorch threads (0: one per core); with
//!                                   # several stores in a process, also how many train at once
//! memory_mib = 2048                 # default: memory the agent may use for training
//! device = "auto"                   # default: auto | cpu | cuda
//! batch_size = 0                    # default: 0 lets the agent cap the task's batch size
//!                                   # to fit memory_mib; n > 0 caps it at n
//!
//! [runtime]
//! version = "0.1.0"                 # optional: the runtime version declared to the PoP and
//!                                   # checked against a plan's min_runtime (default: this
//!                                   # build's version); for tests and staged roll-outs
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
    /// The registry whose signature models must carry.
    #[serde(default)]
    pub registry: RegistrySection,
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
    /// The runtime version it declares.
    #[serde(default)]
    pub runtime: RuntimeSection,
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
    /// The PoPs' anycast address, `host:port` (UDP for HTTP/3, TCP for the fallback).
    pub address: String,
    /// The HTTP/2 fallback's `host:port`, when it differs from `address`.
    #[serde(default)]
    pub fallback_tcp_address: Option<String>,
    /// Shortest wait between two round polls, ms.
    #[serde(default = "default_poll_min_ms")]
    pub poll_min_ms: u64,
    /// Longest wait between two round polls, ms; each wait is drawn uniformly in between.
    #[serde(default = "default_poll_max_ms")]
    pub poll_max_ms: u64,
    /// Cap of the exponential backoff (with full jitter) while the PoP is unreachable, ms.
    #[serde(default = "default_backoff_max_ms")]
    pub backoff_max_ms: u64,
}

fn default_poll_min_ms() -> u64 {
    100
}

fn default_poll_max_ms() -> u64 {
    250
}

fn default_backoff_max_ms() -> u64 {
    30_000
}

/// `[registry]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RegistrySection {
    /// The registry's ed25519 public key: a file holding 32 bytes in hex.
    pub public_key: PathBuf,
}

impl Default for RegistrySection {
    fn default() -> Self {
        Self {
            public_key: "/etc/fedmesh/registry.pub".into(),
        }
    }
}

/// `[runtime]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RuntimeSection {
    /// The runtime version declared to the PoP; `None` is this build's version.
    pub version: Option<String>,
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
    /// Overrides the spec's `split.train_max`.
    #[serde(default)]
    pub train_max: Option<f64>,
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
    /// Cap on the training batch size; 0 lets the agent choose from `memory_mib`.
    pub batch_size: usize,
}

impl Default for ResourcesSection {
    fn default() -> Self {
        Self {
            threads: 1,
            memory_mib: 2048,
            device: DeviceChoice::Auto,
            batch_size: 0,
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

    /// The runtime version the agent declares: `runtime.version`, or this build's.
    ///
    /// # Errors
    ///
    /// Never for a config that [`AgentConfig::parse`] accepted.
    pub fn runtime_version(&self) -> Result<semver::Version, semver::Error> {
        let version = self
            .runtime
            .version
            .as_deref()
            .unwrap_or(env!("CARGO_PKG_VERSION"));
        semver::Version::parse(version)
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
        let addresses = [
            ("pop.address", Some(&self.pop.address)),
            (
                "pop.fallback_tcp_address",
                self.pop.fallback_tcp_address.as_ref(),
            ),
        ];
        for (key, address) in addresses {
            let Some(address) = address else { continue };
            let port = address.rsplit_once(':').map(|(_, p)| p.parse::<u16>());
            if !matches!(port, Some(Ok(p)) if p > 0) {
                return Err(invalid(key, format!("{address:?} is not host:port")));
            }
        }
        let (min, max) = (self.pop.poll_min_ms, self.pop.poll_max_ms);
        if min == 0 || min > max {
            let reason = format!("{min}..{max} ms: need 0 < poll_min_ms <= poll_max_ms");
            return Err(invalid("pop.poll_min_ms", reason));
        }
        if self.pop.backoff_max_ms < max {
            let reason = format!("{} is below poll_max_ms", self.pop.backoff_max_ms);
            return Err(invalid("pop.backoff_max_ms", reason));
        }
        if let Err(err) = self.runtime_version() {
            return Err(invalid("runtime.version", err.to_string()));
        }
        if let Some(train_max) = self.data.train_max
            && !train_max.is_finite()
        {
            return Err(invalid(
                "data.train_max",
                format!("{train_max} is not finite"),
            ));
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
        assert_eq!((config.pop.poll_min_ms, config.pop.poll_max_ms), (100, 250));
        assert_eq!(config.resources.batch_size, 0);
        assert_eq!(
            config.runtime_version().expect("version").to_string(),
            env!("CARGO_PKG_VERSION")
        );
    }

    #[test]
    fn shipped_example_documents_every_key_and_parses() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging/store-agent.toml");
        let config = AgentConfig::from_path(&path).expect("example config parses");
        assert_eq!(config.data.train_max, Some(140.0));
        // An always-open window, as the lab runs it.
        let always = MINIMAL.replace("[data]", "[window]\nhours = \"00:00-24:00\"\n\n[data]");
        let window = parse(&always)
            .expect("valid")
            .training_window()
            .expect("window");
        assert!(window.contains("2026-03-08T08:30:00Z".parse().expect("timestamp")));
        assert!(window.contains("2026-06-10T04:59:59Z".parse().expect("timestamp")));
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
            (
                "address = \"pop.fl.example:4433\"",
                "address = \"pop.fl.example:4433\"\npoll_min_ms = 300",
                "pop.poll_min_ms",
            ),
            (
                "[data]",
                "[runtime]\nversion = \"one\"\n\n[data]",
                "runtime.version",
            ),
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
