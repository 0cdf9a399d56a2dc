//! Fedmesh's policy engine: the Rego policies every PoP enforces, evaluated in process with
//! regorus.
//!
//! - [`source`] reads a policy from a directory or an OPA bundle;
//! - [`Policy`] is one compiled revision and decides on a [`PolicyInput`];
//! - [`PolicyStore`] holds the policy in force and reloads it when its files change,
//!   keeping the last good one when a change is broken;
//! - [`run_tests`] runs a policy's `test_` rules;
//! - [`DecisionLog`] writes one JSON line per decision.
//!
//! The default policy lives in `policy/rego/` ([`default_policy_dir`]). This crate does no
//! networking: the PoP builds the input from what it has authenticated and asks for a
//! decision.

pub mod engine;
pub mod input;
pub mod log;
pub mod rego_test;
pub mod source;
pub mod store;

use std::path::PathBuf;

pub use engine::{DEFAULT_ENTRYPOINT, Decision, Denial, Policy};
pub use input::PolicyInput;
pub use log::DecisionLog;
pub use rego_test::{RegoTestResult, TestOutcome, run_tests};
pub use source::{PolicyLocation, PolicySource, RegoVersion};
pub use store::{LoadError, PolicyStore, Reload, Watcher, load};

/// The directory of the default policy shipped in this repository.
pub fn default_policy_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("rego")
}
