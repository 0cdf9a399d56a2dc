//! Runs a scenario as a whole mesh with `netlab run` and hands back what it wrote, for the
//! tests in `mesh.rs`.
//!
//! The binaries come from the target folder the tests themselves were built into: a
//! workspace `cargo test` builds `netlab`, `core-agg`, `pop-proxy` and `store-agent` there
//! before any test runs. Meshes run one at a time: two at once on a small machine would
//! measure the machine, not Fedmesh.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

use anyhow::{Context, Result, bail};

/// One mesh at a time across the test threads.
static ONE_MESH: Mutex<()> = Mutex::new(());

/// What a finished run left behind.
pub struct Run {
    /// `summary.json`.
    pub summary: serde_json::Value,
    /// The output folder (configs, state, logs, report).
    pub out: PathBuf,
    /// Keeps the folder until the test ends.
    _dir: tempfile::TempDir,
}

impl Run {
    /// Every service log of the run (core, PoPs, store processes), concatenated.
    ///
    /// # Errors
    /// When the logs folder cannot be read.
    pub fn logs(&self) -> Result<String> {
        let mut all = String::new();
        for entry in std::fs::read_dir(self.out.join("logs"))? {
            all.push_str(&std::fs::read_to_string(entry?.path())?);
        }
        Ok(all)
    }

    /// The audit log of one store, one JSON value per line.
    ///
    /// # Errors
    /// When it is missing or a line is not JSON.
    pub fn audit(&self, store: &str) -> Result<Vec<serde_json::Value>> {
        let path = self.out.join("state/store").join(store).join("audit.jsonl");
        let text = std::fs::read_to_string(&path).with_context(|| path.display().to_string())?;
        text.lines()
            .map(|l| serde_json::from_str(l).context("audit line"))
            .collect()
    }
}

/// The folder holding the workspace's binaries: two up from this test executable
/// (`target/<profile>/deps/mesh-<hash>`).
///
/// # Errors
/// When a service binary is missing there.
pub fn bin_dir() -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .context("the test executable has no target folder")?
        .to_path_buf();
    for name in ["netlab", "core-agg", "pop-proxy", "store-agent"] {
        if !dir.join(name).exists() {
            bail!(
                "{name} is not built in {}: run the workspace's tests (cargo xtask test), \
                 which build every binary first",
                dir.display()
            );
        }
    }
    Ok(dir)
}

/// Runs `tests/scenarios/<name>` to the end and reads its summary.
///
/// # Errors
/// When netlab fails or writes no summary.
pub fn run(name: &str) -> Result<Run> {
    let _one = ONE_MESH
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let scenario = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("scenarios")
        .join(name);
    let dir = tempfile::tempdir()?;
    let out = dir.path().join("run");
    let bins = bin_dir()?;
    let output = Command::new(bins.join("netlab"))
        .args(["run", "--skip-baselines", "--scenario"])
        .arg(&scenario)
        .arg("--out")
        .arg(&out)
        .output()
        .context("starting netlab")?;
    if !output.status.success() {
        bail!(
            "netlab run {name} failed ({}):\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let text = std::fs::read_to_string(out.join("summary.json")).context("summary.json")?;
    Ok(Run {
        summary: serde_json::from_str(&text)?,
        out,
        _dir: dir,
    })
}
