//! Fedmesh's core aggregator: what turns a round's cohort sum into the next model.
//!
//! It holds the strategies that fold the unmasked sum into the global model, the privacy
//! ledger that charges each store's budget, the pure round state machine that plans,
//! selects, collects and commits, and the signed model registry. The state machine and the
//! maths read no clock and open no socket; the service drives them with the time and the
//! messages it received. The command line (`core-agg`) plans DP budgets and rolls the
//! registry back.
//!
//! Not here: the network service around these parts (the JSON API, Prometheus `/metrics`)
//! and the secure-aggregation maths, which live in `fedmesh_protocol::secagg`; a round hands
//! its survivors to that code and takes the answer back through
//! [`rounds::Round::handle_unmasked`].

pub mod ledger;
pub mod registry;
pub mod rounds;
pub mod service;
pub mod strategy;

use std::fmt;

use serde::{Deserialize, Serialize};

/// A model that core trains and publishes, such as `oj-demand`; versions are counted per
/// model.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ModelId(pub String);

impl fmt::Display for ModelId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Seconds since the Unix epoch, always passed in by the driver: nothing in this crate but
/// the binary reads a clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Timestamp(pub u64);

/// Replaces `path` with `bytes` so that a crash leaves either the old or the new content:
/// write a temporary file beside it, sync it, rename it over `path`, sync the directory.
pub(crate) fn atomic_write(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;

    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => std::path::Path::new("."),
    };
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let temporary = dir.join(format!(".{name}.tmp.{}", std::process::id()));

    let mut file = std::fs::File::create(&temporary)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    drop(file);
    std::fs::rename(&temporary, path)?;
    std::fs::File::open(dir)?.sync_all()
}
