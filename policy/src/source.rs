//! Reading a policy from disk: a directory of `.rego` and `data.json` files, or an OPA
//! bundle (`.tar.gz` holding the same files and a `.manifest`).
//!
//! Both follow OPA's layout: a `data.json` is merged into `data` at the path of its
//! directory (`a/b/data.json` lands under `data.a.b`), and an optional `.manifest` gives
//! the revision and the Rego version (`"rego_version": 0` for the whole policy,
//! `"file_rego_versions": {"path.rego": 0}` per file). Rego v1 is the default.

use std::collections::BTreeMap;
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

/// The most bytes a policy may hold once unpacked; a bundle that inflates past this is
/// refused rather than read into memory.
pub const MAX_POLICY_BYTES: u64 = 64 * 1024 * 1024;

/// Where a policy is read from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PolicyLocation {
    /// A directory of `.rego` and `data.json` files (and optionally a `.manifest`).
    Dir(PathBuf),
    /// An OPA bundle: a gzipped tar with the same files.
    Bundle(PathBuf),
}

impl PolicyLocation {
    /// A directory if `path` is one, otherwise a bundle file.
    pub fn from_path(path: impl Into<PathBuf>) -> Self {
        let path = path.into();
        if path.is_dir() {
            Self::Dir(path)
        } else {
            Self::Bundle(path)
        }
    }

    /// The path this location reads.
    pub fn path(&self) -> &Path {
        match self {
            Self::Dir(path) | Self::Bundle(path) => path,
        }
    }
}

/// The Rego dialect a module is parsed as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RegoVersion {
    /// Rego before OPA 1.0 (`allow { ... }` without `if`).
    V0,
    /// Rego v1, the default.
    V1,
}

/// One Rego module of a policy.
#[derive(Debug, Clone)]
pub struct RegoModule {
    /// Path inside the policy directory or bundle, `/`-separated.
    pub path: String,
    /// The module source.
    pub text: String,
    /// The dialect to parse it as.
    pub version: RegoVersion,
}

/// A policy as read from disk, before compilation.
#[derive(Debug, Clone)]
pub struct PolicySource {
    /// The Rego modules, sorted by path.
    pub modules: Vec<RegoModule>,
    /// The merged data document.
    pub data: Value,
    /// The manifest revision, or `sha256:<hash of every file>` when there is none.
    pub revision: String,
    /// Hash of every file read, whatever the manifest says; a change means a reload.
    pub content_hash: String,
}

/// Why a policy could not be read.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// A file or directory could not be read.
    #[error("cannot read policy file {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A `data.json` or `.manifest` is not valid JSON of the right shape.
    #[error("invalid json in policy file {path}: {source}")]
    Json {
        /// The file, inside the policy.
        path: String,
        /// The cause.
        source: serde_json::Error,
    },
    /// A `.rego` file is not UTF-8.
    #[error("policy file {path} is not utf-8")]
    NotUtf8 {
        /// The file, inside the policy.
        path: String,
    },
    /// Two data documents set the same key to different non-object values.
    #[error("data conflict at {key} (from {path})")]
    DataConflict {
        /// The dotted key.
        key: String,
        /// The data file that collided.
        path: String,
    },
    /// The policy is larger than [`MAX_POLICY_BYTES`].
    #[error("policy at {path} exceeds {MAX_POLICY_BYTES} bytes")]
    TooLarge {
        /// The directory or bundle.
        path: PathBuf,
    },
    /// A bundle entry's path leaves the bundle (`..`) or is not UTF-8.
    #[error("bundle {path} has an invalid entry path {entry}")]
    BadEntryPath {
        /// The bundle.
        path: PathBuf,
        /// The entry as read.
        entry: String,
    },
    /// The policy holds no Rego module.
    #[error("policy at {path} has no .rego file")]
    NoModules {
        /// The directory or bundle.
        path: PathBuf,
    },
}

#[derive(Debug, Default, Deserialize)]
struct Manifest {
    #[serde(default)]
    revision: Option<String>,
    #[serde(default)]
    rego_version: Option<u8>,
    #[serde(default)]
    file_rego_versions: BTreeMap<String, u8>,
}

/// Reads the policy at `location`.
///
/// # Errors
/// Any unreadable file, invalid JSON, non-UTF-8 Rego, conflicting data, oversized or empty
/// policy.
pub fn read(location: &PolicyLocation) -> Result<PolicySource, SourceError> {
    let files = match location {
        PolicyLocation::Dir(dir) => read_dir_files(dir)?,
        PolicyLocation::Bundle(file) => read_bundle_files(file)?,
    };
    assemble(location.path(), files)
}

/// The relevant files of a policy, by `/`-separated relative path.
type Files = BTreeMap<String, Vec<u8>>;

fn is_policy_file(rel: &str) -> bool {
    let name = rel.rsplit('/').next().unwrap_or(rel);
    name.ends_with(".rego") || name == "data.json" || rel == ".manifest"
}

fn read_dir_files(dir: &Path) -> Result<Files, SourceError> {
    let mut files = Files::new();
    let mut total = 0u64;
    let mut pending = vec![dir.to_path_buf()];
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| SourceError::Io { path, source }
    };

    while let Some(current) = pending.pop() {
        for entry in fs::read_dir(&current).map_err(io(&current))? {
            let entry = entry.map_err(io(&current))?;
            let path = entry.path();
            let kind = entry.file_type().map_err(io(&path))?;
            if kind.is_dir() {
                pending.push(path);
                continue;
            }
            let Some(rel) = relative(dir, &path) else {
                continue;
            };
            if !is_policy_file(&rel) {
                continue;
            }
            // Read through a limit: a file's size (or a link to an endless device) is not
            // to be trusted with memory, so at most one byte past the budget is read.
            let file = fs::File::open(&path).map_err(io(&path))?;
            let mut bytes = Vec::new();
            file.take(MAX_POLICY_BYTES - total + 1)
                .read_to_end(&mut bytes)
                .map_err(io(&path))?;
            total += bytes.len() as u64;
            if total > MAX_POLICY_BYTES {
                return Err(SourceError::TooLarge {
                    path: dir.to_path_buf(),
                });
            }
            files.insert(rel, bytes);
        }
    }
    Ok(files)
}

fn relative(root: &Path, path: &Path) -> Option<String> {
    let rel = path.strip_prefix(root).ok()?;
    let parts: Option<Vec<&str>> = rel.components().map(|c| c.as_os_str().to_str()).collect();
    Some(parts?.join("/"))
}

fn read_bundle_files(file: &Path) -> Result<Files, SourceError> {
    let io = |source| SourceError::Io {
        path: file.to_path_buf(),
        source,
    };
    let reader = fs::File::open(file).map_err(io)?;
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(reader));
    let mut files = Files::new();
    let mut total = 0u64;

    for entry in archive.entries().map_err(io)? {
        let mut entry = entry.map_err(io)?;
        if !entry.header().entry_type().is_file() {
            continue;
        }
        let raw = entry.path_bytes().into_owned();
        let rel = bundle_entry_path(&raw).ok_or_else(|| SourceError::BadEntryPath {
            path: file.to_path_buf(),
            entry: String::from_utf8_lossy(&raw).into_owned(),
        })?;
        if !is_policy_file(&rel) {
            continue;
        }

        // Read through a limit: the header's size is the bundle author's claim.
        let mut bytes = Vec::new();
        let budget = MAX_POLICY_BYTES - total + 1;
        entry
            .by_ref()
            .take(budget)
            .read_to_end(&mut bytes)
            .map_err(io)?;
        total += bytes.len() as u64;
        if total > MAX_POLICY_BYTES {
            return Err(SourceError::TooLarge {
                path: file.to_path_buf(),
            });
        }
        files.insert(rel, bytes);
    }
    Ok(files)
}

/// `/a/./b.rego` and `a/b.rego` name the same entry; `..` and empty paths are refused.
fn bundle_entry_path(raw: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(raw).ok()?;
    let mut parts = Vec::new();
    for part in text.split('/') {
        match part {
            "" | "." => {}
            ".." => return None,
            part => parts.push(part),
        }
    }
    (!parts.is_empty()).then(|| parts.join("/"))
}

fn assemble(root: &Path, files: Files) -> Result<PolicySource, SourceError> {
    // 1. Fingerprint everything, so any edit (even to a manifest) counts as a change.
    let mut hasher = Sha256::new();
    for (path, bytes) in &files {
        hasher.update((path.len() as u64).to_le_bytes());
        hasher.update(path.as_bytes());
        hasher.update((bytes.len() as u64).to_le_bytes());
        hasher.update(bytes);
    }
    let content_hash = format!("sha256:{}", hex::encode(hasher.finalize()));

    // 2. The manifest, if any.
    let manifest: Manifest = match files.get(".manifest") {
        Some(bytes) => serde_json::from_slice(bytes).map_err(|source| SourceError::Json {
            path: ".manifest".into(),
            source,
        })?,
        None => Manifest::default(),
    };
    let default_version = version_of(manifest.rego_version);

    // 3. Modules and data.
    let mut modules = Vec::new();
    let mut data = Value::Object(Map::new());
    for (path, bytes) in &files {
        if path.ends_with(".rego") {
            let text = String::from_utf8(bytes.clone())
                .map_err(|_| SourceError::NotUtf8 { path: path.clone() })?;
            let version = manifest
                .file_rego_versions
                .get(path)
                .map_or(default_version, |v| version_of(Some(*v)));
            modules.push(RegoModule {
                path: path.clone(),
                text,
                version,
            });
        } else if path.ends_with("data.json") {
            let value = serde_json::from_slice(bytes).map_err(|source| SourceError::Json {
                path: path.clone(),
                source,
            })?;
            let prefix: Vec<&str> = path.split('/').collect();
            let prefix = &prefix[..prefix.len() - 1];
            merge_at(&mut data, prefix, value, path)?;
        }
    }
    if modules.is_empty() {
        return Err(SourceError::NoModules {
            path: root.to_path_buf(),
        });
    }

    let revision = manifest
        .revision
        .filter(|r| !r.is_empty())
        .unwrap_or_else(|| content_hash.clone());
    Ok(PolicySource {
        modules,
        data,
        revision,
        content_hash,
    })
}

fn version_of(declared: Option<u8>) -> RegoVersion {
    match declared {
        Some(0) => RegoVersion::V0,
        _ => RegoVersion::V1,
    }
}

fn merge_at(
    data: &mut Value,
    prefix: &[&str],
    value: Value,
    path: &str,
) -> Result<(), SourceError> {
    let mut target = data;
    for (depth, key) in prefix.iter().enumerate() {
        let conflict = || SourceError::DataConflict {
            key: prefix[..=depth].join("."),
            path: path.to_string(),
        };
        let object = target.as_object_mut().ok_or_else(conflict)?;
        target = object
            .entry(key.to_string())
            .or_insert_with(|| Value::Object(Map::new()));
    }
    deep_merge(target, value, &prefix.join("."), path)
}

fn deep_merge(target: &mut Value, value: Value, key: &str, path: &str) -> Result<(), SourceError> {
    match (target, value) {
        (Value::Object(existing), Value::Object(incoming)) => {
            for (k, v) in incoming {
                let child_key = if key.is_empty() {
                    k.clone()
                } else {
                    format!("{key}.{k}")
                };
                match existing.get_mut(&k) {
                    Some(slot) => deep_merge(slot, v, &child_key, path)?,
                    None => {
                        existing.insert(k, v);
                    }
                }
            }
            Ok(())
        }
        _ => Err(SourceError::DataConflict {
            key: key.to_string(),
            path: path.to_string(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bundle_entry_paths_are_normalised_and_escapes_refused() {
        assert_eq!(
            bundle_entry_path(b"/a/./b.rego").as_deref(),
            Some("a/b.rego")
        );
        assert_eq!(bundle_entry_path(b"../etc/passwd"), None);
        assert_eq!(bundle_entry_path(b"/"), None);
    }

    #[test]
    fn nested_data_lands_under_its_directory() {
        let mut data = Value::Object(Map::new());
        merge_at(
            &mut data,
            &[],
            serde_json::json!({"a": {"x": 1}}),
            "data.json",
        )
        .unwrap();
        merge_at(
            &mut data,
            &["a", "b"],
            serde_json::json!({"y": 2}),
            "a/b/data.json",
        )
        .unwrap();
        assert_eq!(data, serde_json::json!({"a": {"x": 1, "b": {"y": 2}}}));

        let clash = merge_at(
            &mut data,
            &["a"],
            serde_json::json!({"x": 3}),
            "a/data.json",
        );
        assert!(matches!(clash, Err(SourceError::DataConflict { key, .. }) if key == "a.x"));
    }
}
