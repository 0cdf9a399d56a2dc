//! The model registry: signed manifests, content-addressed blobs, a current pointer per
//! model.
//!
//! A published model version is a [`Manifest`] signed with ed25519 by the registry's key
//! and a safetensors blob named by its SHA-256. Blobs are never overwritten, manifests are
//! put-if-absent, and the "current" pointer of each model moves only by compare-and-swap,
//! so a rollback is moving the pointer back to an earlier signed version. Everything read
//! back is checked: a manifest whose signature fails, or a blob whose digest or size
//! differs from its manifest, is refused.
//!
//! Storage sits behind [`Backend`]; [`embedded::EmbeddedBackend`] keeps it in a directory
//! and is the default, and `etcd::EtcdBackend` (feature `etcd`) keeps manifests and
//! pointers in an etcd cluster.

pub mod embedded;
#[cfg(feature = "etcd")]
pub mod etcd;
pub mod keys;

use std::collections::BTreeMap;

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use fedmesh_protocol::ids::ModelVersion;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::rounds::regresses;
use crate::{ModelId, Timestamp};

/// Prefix of every signed message, so that a manifest signature cannot be replayed as a
/// signature over anything else.
const SIGNING_CONTEXT: &[u8] = b"fedmesh-manifest-v1\0";

/// The metric that decides promotion; lower is better.
pub const LOSS_METRIC: &str = "loss";

/// The metric holding the parent version's loss on the same evaluation rows as the
/// candidate's [`LOSS_METRIC`]; when present, promotion compares against it rather than the
/// parent's own recorded loss, which other stores' rows produced.
pub const PARENT_LOSS_METRIC: &str = "parent_loss";

/// Why a registry operation failed.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The storage failed.
    #[error("registry storage: {0}")]
    Storage(String),
    /// A model id is unusable as a key.
    #[error("model id {0:?} must be 1-128 characters of [A-Za-z0-9._-] not starting with '.'")]
    ModelId(String),
    /// Nothing is stored under this name.
    #[error("{model} {version} not found")]
    NotFound {
        /// The model.
        model: ModelId,
        /// The version asked for.
        version: ModelVersion,
    },
    /// The model has no current version.
    #[error("{0} has no current version")]
    NoCurrent(ModelId),
    /// A stored manifest is not a manifest.
    #[error("manifest of {model} {version} is corrupt: {reason}")]
    Corrupt {
        /// The model.
        model: ModelId,
        /// The version.
        version: ModelVersion,
        /// What is wrong.
        reason: String,
    },
    /// A manifest's signature does not verify under the registry's key.
    #[error("manifest of {model} {version} has a bad signature")]
    BadSignature {
        /// The model.
        model: ModelId,
        /// The version.
        version: ModelVersion,
    },
    /// A blob's content differs from what its manifest says.
    #[error("blob {expected} does not match its manifest: {reason}")]
    BlobMismatch {
        /// The SHA-256 the manifest names.
        expected: String,
        /// What differs.
        reason: String,
    },
    /// Another manifest already holds this version.
    #[error("{model} {version} already exists with different content")]
    VersionTaken {
        /// The model.
        model: ModelId,
        /// The version.
        version: ModelVersion,
    },
    /// The current pointer moved since it was read.
    #[error("current pointer of {model} is {actual:?}, expected {expected:?}")]
    Conflict {
        /// The model.
        model: ModelId,
        /// What the caller expected.
        expected: Option<ModelVersion>,
        /// What it is.
        actual: Option<ModelVersion>,
    },
    /// The candidate's loss regresses beyond the threshold; it was recorded, not promoted.
    #[error("{version} not promoted: loss {candidate} regresses from {baseline}")]
    Regressed {
        /// The recorded, unpromoted version.
        version: ModelVersion,
        /// The candidate's loss.
        candidate: f64,
        /// The current version's loss.
        baseline: f64,
    },
    /// There is no earlier version to roll back to.
    #[error("{0} has no parent to roll back to")]
    NoParent(ModelId),
    /// A metric is not a finite number; JSON cannot carry it, so it is never signed.
    #[error("metric {metric:?} is {value}, not a finite number")]
    NonFiniteMetric {
        /// The metric's name.
        metric: String,
        /// Its value.
        value: f64,
    },
    /// A DP figure is not a finite number; JSON cannot carry it, so it is never signed.
    #[error("dp.{field} is {value}, not a finite number")]
    NonFiniteDp {
        /// The field of [`DpSpend`].
        field: &'static str,
        /// Its value.
        value: f64,
    },
    /// A rollback target is not an ancestor of the current version.
    #[error("{model} {version} is not on the parent chain of current {current}")]
    NotAnAncestor {
        /// The model.
        model: ModelId,
        /// The version asked for.
        version: ModelVersion,
        /// The current version.
        current: ModelVersion,
    },
}

/// The DP guarantee a version was trained under.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DpSpend {
    /// The unit protected: `record` or `store`.
    pub unit: String,
    /// Noise multiplier.
    pub noise_multiplier: f64,
    /// Clipping norm.
    pub clip_norm: f64,
    /// Delta.
    pub delta: f64,
    /// Epsilon spent by the training that produced this version (worst store).
    pub epsilon: f64,
}

/// The signed description of a model version.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// The model.
    pub model: ModelId,
    /// This version.
    pub version: ModelVersion,
    /// The version it was trained from.
    pub parent: Option<ModelVersion>,
    /// SHA-256 of the safetensors blob, lowercase hex.
    pub blob_sha256: String,
    /// Size of the blob in bytes.
    pub blob_size: u64,
    /// The model's architecture, as the task describes it.
    pub model_spec: String,
    /// SHA-256 of the training configuration, lowercase hex.
    pub training_config_sha256: String,
    /// DP parameters and the epsilon spent.
    pub dp: DpSpend,
    /// Federated evaluation metrics; [`LOSS_METRIC`] decides promotion.
    pub metrics: BTreeMap<String, f64>,
    /// When it was published.
    pub created_at: Timestamp,
}

/// A manifest as stored: its exact JSON bytes and the signature over them. The bytes are
/// kept verbatim because re-serialising parsed floats need not give the same bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedManifest {
    /// The manifest's JSON.
    pub manifest: String,
    /// Ed25519 signature over the context `fedmesh-manifest-v1\0` followed by the JSON,
    /// lowercase hex.
    pub signature: String,
}

/// What a round hands the registry to publish.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    /// The model.
    pub model: ModelId,
    /// The version it was trained from (the current one when the round started).
    pub parent: Option<ModelVersion>,
    /// The safetensors bytes.
    pub blob: Vec<u8>,
    /// Architecture description.
    pub model_spec: String,
    /// SHA-256 of the training configuration.
    pub training_config_sha256: String,
    /// DP parameters and spend.
    pub dp: DpSpend,
    /// Evaluation metrics.
    pub metrics: BTreeMap<String, f64>,
}

/// Storage for blobs, manifests and pointers. Implementations must make `put_blob`
/// idempotent and never overwrite, `put_manifest` put-if-absent and `swap_current` an
/// atomic compare-and-swap.
pub trait Backend {
    /// Stores a blob under its SHA-256 (lowercase hex), unless already there.
    fn put_blob(&self, sha256: &str, bytes: &[u8]) -> Result<(), RegistryError>;
    /// A blob's bytes, if stored.
    fn blob(&self, sha256: &str) -> Result<Option<Vec<u8>>, RegistryError>;
    /// Stores a manifest unless the version exists; returns whether it was stored.
    fn put_manifest(
        &self,
        model: &ModelId,
        version: ModelVersion,
        signed: &SignedManifest,
    ) -> Result<bool, RegistryError>;
    /// A stored manifest.
    fn manifest(
        &self,
        model: &ModelId,
        version: ModelVersion,
    ) -> Result<Option<SignedManifest>, RegistryError>;
    /// Versions with a manifest, ascending.
    fn versions(&self, model: &ModelId) -> Result<Vec<ModelVersion>, RegistryError>;
    /// The current pointer.
    fn current(&self, model: &ModelId) -> Result<Option<ModelVersion>, RegistryError>;
    /// Sets the current pointer to `new` if it is `expected`; returns whether it did.
    fn swap_current(
        &self,
        model: &ModelId,
        expected: Option<ModelVersion>,
        new: ModelVersion,
    ) -> Result<bool, RegistryError>;
}

/// A boxed backend, so that a service can choose its storage at start-up.
impl<B: Backend + ?Sized> Backend for Box<B> {
    fn put_blob(&self, sha256: &str, bytes: &[u8]) -> Result<(), RegistryError> {
        (**self).put_blob(sha256, bytes)
    }
    fn blob(&self, sha256: &str) -> Result<Option<Vec<u8>>, RegistryError> {
        (**self).blob(sha256)
    }
    fn put_manifest(
        &self,
        model: &ModelId,
        version: ModelVersion,
        signed: &SignedManifest,
    ) -> Result<bool, RegistryError> {
        (**self).put_manifest(model, version, signed)
    }
    fn manifest(
        &self,
        model: &ModelId,
        version: ModelVersion,
    ) -> Result<Option<SignedManifest>, RegistryError> {
        (**self).manifest(model, version)
    }
    fn versions(&self, model: &ModelId) -> Result<Vec<ModelVersion>, RegistryError> {
        (**self).versions(model)
    }
    fn current(&self, model: &ModelId) -> Result<Option<ModelVersion>, RegistryError> {
        (**self).current(model)
    }
    fn swap_current(
        &self,
        model: &ModelId,
        expected: Option<ModelVersion>,
        new: ModelVersion,
    ) -> Result<bool, RegistryError> {
        (**self).swap_current(model, expected, new)
    }
}

/// Checks that a model id is safe as a file name or key segment.
///
/// # Errors
///
/// [`RegistryError::ModelId`] otherwise.
pub fn check_model_id(model: &ModelId) -> Result<(), RegistryError> {
    let id = &model.0;
    let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
    if id.is_empty() || id.len() > 128 || id.starts_with('.') || !id.chars().all(allowed) {
        return Err(RegistryError::ModelId(id.clone()));
    }
    Ok(())
}

/// Lowercase hex SHA-256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// The registry: signs on publish, verifies on load.
pub struct Registry<B> {
    backend: B,
    verifying_key: VerifyingKey,
    signing_key: Option<SigningKey>,
}

impl<B: Backend> Registry<B> {
    /// A registry that can publish, signing with `signing_key`.
    pub fn new(backend: B, signing_key: SigningKey) -> Self {
        Self {
            backend,
            verifying_key: signing_key.verifying_key(),
            signing_key: Some(signing_key),
        }
    }

    /// A registry that only reads and verifies, as a store or PoP holds it.
    pub fn read_only(backend: B, verifying_key: VerifyingKey) -> Self {
        Self {
            backend,
            verifying_key,
            signing_key: None,
        }
    }

    /// The storage.
    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// Publishes a candidate as the next version and promotes it, unless its loss regresses
    /// more than `regression_threshold` from the current version's: its
    /// [`PARENT_LOSS_METRIC`] when the candidate carries one, else the parent's recorded loss.
    ///
    /// The steps are each idempotent, so a publish interrupted anywhere can be run again
    /// with the same candidate: the blob is stored by content, the manifest is put-if-absent
    /// at the next free version (a retry finds and reuses the one it recorded, so no version
    /// is lost or doubled), and the pointer moves from `parent` by compare-and-swap.
    ///
    /// # Errors
    ///
    /// [`RegistryError::NonFiniteMetric`] or [`RegistryError::NonFiniteDp`] before anything
    /// is stored when a metric or a DP figure is NaN or infinite,
    /// [`RegistryError::Regressed`] when the version was recorded but not promoted,
    /// [`RegistryError::Conflict`] when the current pointer is no longer `parent`, and
    /// storage errors.
    pub fn publish(
        &self,
        candidate: &Candidate,
        regression_threshold: f64,
        now: Timestamp,
    ) -> Result<Manifest, RegistryError> {
        let Some(signing_key) = &self.signing_key else {
            return Err(RegistryError::Storage("registry opened read-only".into()));
        };
        check_model_id(&candidate.model)?;
        // serde_json writes NaN and infinities as null, which would sign a manifest that
        // never parses back.
        if let Some((metric, &value)) = candidate.metrics.iter().find(|(_, v)| !v.is_finite()) {
            return Err(RegistryError::NonFiniteMetric {
                metric: metric.clone(),
                value,
            });
        }
        let dp = &candidate.dp;
        let figures = [
            ("noise_multiplier", dp.noise_multiplier),
            ("clip_norm", dp.clip_norm),
            ("delta", dp.delta),
            ("epsilon", dp.epsilon),
        ];
        if let Some(&(field, value)) = figures.iter().find(|(_, v)| !v.is_finite()) {
            return Err(RegistryError::NonFiniteDp { field, value });
        }
        let model = &candidate.model;
        let current = self.backend.current(model)?;
        if current != candidate.parent {
            return Err(RegistryError::Conflict {
                model: model.clone(),
                expected: candidate.parent,
                actual: current,
            });
        }

        // 1. The blob, by content.
        let blob_sha256 = sha256_hex(&candidate.blob);
        self.backend.put_blob(&blob_sha256, &candidate.blob)?;

        // 2. The manifest, at the next version nobody holds; or, when a publish of this
        //    very candidate stopped before promotion, the version it already recorded.
        let existing = self.backend.versions(model)?;
        let resumed = match existing.last() {
            Some(&last) if Some(last) != current => {
                let recorded = self.load_manifest(model, last)?;
                let same = recorded.parent == candidate.parent
                    && recorded.blob_sha256 == blob_sha256
                    && recorded.training_config_sha256 == candidate.training_config_sha256;
                same.then_some(recorded)
            }
            _ => None,
        };
        let manifest = match resumed {
            Some(recorded) => recorded,
            None => {
                let version = existing
                    .last()
                    .map_or(ModelVersion(0), |v| ModelVersion(v.0 + 1));
                let manifest = Manifest {
                    model: model.clone(),
                    version,
                    parent: candidate.parent,
                    blob_sha256,
                    blob_size: candidate.blob.len() as u64,
                    model_spec: candidate.model_spec.clone(),
                    training_config_sha256: candidate.training_config_sha256.clone(),
                    dp: candidate.dp.clone(),
                    metrics: candidate.metrics.clone(),
                    created_at: now,
                };
                let signed = sign(signing_key, &manifest)?;
                if !self.backend.put_manifest(model, version, &signed)? {
                    return Err(RegistryError::VersionTaken {
                        model: model.clone(),
                        version,
                    });
                }
                manifest
            }
        };
        let version = manifest.version;

        // 3. Promotion, unless the candidate regresses.
        if let Some(parent) = candidate.parent {
            let parent = self.load_manifest(model, parent)?;
            let baseline = manifest
                .metrics
                .get(PARENT_LOSS_METRIC)
                .or_else(|| parent.metrics.get(LOSS_METRIC));
            let losses = (manifest.metrics.get(LOSS_METRIC), baseline);
            if let (Some(&candidate), Some(&baseline)) = losses
                && regresses(candidate, baseline, regression_threshold)
            {
                tracing::warn!(model.id = %model, model.version = %version, candidate,
                    baseline, "candidate regressed; not promoted");
                return Err(RegistryError::Regressed {
                    version,
                    candidate,
                    baseline,
                });
            }
        }
        self.move_current(model, candidate.parent, version)?;
        tracing::info!(model.id = %model, model.version = %version, "model version published");
        Ok(manifest)
    }

    /// A version's manifest, after checking its signature.
    ///
    /// # Errors
    ///
    /// [`RegistryError::NotFound`], [`RegistryError::BadSignature`] or
    /// [`RegistryError::Corrupt`].
    pub fn load_manifest(
        &self,
        model: &ModelId,
        version: ModelVersion,
    ) -> Result<Manifest, RegistryError> {
        check_model_id(model)?;
        let Some(signed) = self.backend.manifest(model, version)? else {
            return Err(RegistryError::NotFound {
                model: model.clone(),
                version,
            });
        };
        verify_manifest(&signed, &self.verifying_key, model, Some(version))
    }

    /// A version's manifest and blob, after checking the signature, digest and size.
    ///
    /// # Errors
    ///
    /// As [`Self::load_manifest`], and [`RegistryError::BlobMismatch`] for a blob that is
    /// missing or differs from its manifest.
    pub fn load(
        &self,
        model: &ModelId,
        version: ModelVersion,
    ) -> Result<(Manifest, Vec<u8>), RegistryError> {
        let manifest = self.load_manifest(model, version)?;
        let mismatch = |reason: &str| RegistryError::BlobMismatch {
            expected: manifest.blob_sha256.clone(),
            reason: reason.into(),
        };
        let Some(blob) = self.backend.blob(&manifest.blob_sha256)? else {
            return Err(mismatch("blob is missing"));
        };
        if blob.len() as u64 != manifest.blob_size {
            return Err(mismatch("size differs"));
        }
        if sha256_hex(&blob) != manifest.blob_sha256 {
            return Err(mismatch("sha-256 differs"));
        }
        Ok((manifest, blob))
    }

    /// The current version's manifest and blob, checked as [`Self::load`] does.
    ///
    /// # Errors
    ///
    /// [`RegistryError::NoCurrent`] when nothing was promoted yet, and as [`Self::load`].
    pub fn load_current(&self, model: &ModelId) -> Result<(Manifest, Vec<u8>), RegistryError> {
        check_model_id(model)?;
        let Some(version) = self.backend.current(model)? else {
            return Err(RegistryError::NoCurrent(model.clone()));
        };
        self.load(model, version)
    }

    /// Moves the current pointer back to `to`, or to the current version's parent, after
    /// checking that version loads (signature, digest and size). `to` must be an ancestor
    /// of the current version, so a rollback never jumps forward or onto a version that
    /// was recorded but never promoted. Returns the version now current.
    ///
    /// # Errors
    ///
    /// [`RegistryError::NoCurrent`] or [`RegistryError::NoParent`] when there is nothing
    /// to go back to, [`RegistryError::NotAnAncestor`] when `to` is not on the current
    /// version's parent chain, the errors of [`Self::load`] for the target, and
    /// [`RegistryError::Conflict`] if the pointer moved meanwhile.
    pub fn rollback(
        &self,
        model: &ModelId,
        to: Option<ModelVersion>,
    ) -> Result<ModelVersion, RegistryError> {
        check_model_id(model)?;
        let Some(current) = self.backend.current(model)? else {
            return Err(RegistryError::NoCurrent(model.clone()));
        };
        let parent = self.load_manifest(model, current)?.parent;
        let target = match to {
            Some(version) => {
                self.check_ancestor(model, current, parent, version)?;
                version
            }
            None => parent.ok_or_else(|| RegistryError::NoParent(model.clone()))?,
        };
        self.load(model, target)?;
        self.move_current(model, Some(current), target)?;
        tracing::info!(model.id = %model, from = %current, to = %target, "model rolled back");
        Ok(target)
    }

    /// Walks the parent chain back from `current` (whose parent is `parent`) looking for
    /// `version`; every manifest on the way is verified.
    fn check_ancestor(
        &self,
        model: &ModelId,
        current: ModelVersion,
        mut parent: Option<ModelVersion>,
        version: ModelVersion,
    ) -> Result<(), RegistryError> {
        let not_ancestor = || RegistryError::NotAnAncestor {
            model: model.clone(),
            version,
            current,
        };
        // Parents are earlier versions, so each step must go down: that bounds the walk even
        // over manifests signed with a loop in them, and it stops once past `version`.
        let mut below = current;
        while let Some(step) = parent {
            if step == version {
                return Ok(());
            }
            if step.0 >= below.0 || step.0 < version.0 {
                return Err(not_ancestor());
            }
            below = step;
            parent = self.load_manifest(model, step)?.parent;
        }
        Err(not_ancestor())
    }

    fn move_current(
        &self,
        model: &ModelId,
        expected: Option<ModelVersion>,
        new: ModelVersion,
    ) -> Result<(), RegistryError> {
        if self.backend.swap_current(model, expected, new)? {
            return Ok(());
        }
        Err(RegistryError::Conflict {
            model: model.clone(),
            expected,
            actual: self.backend.current(model)?,
        })
    }
}

/// Checks a signed manifest as a store or PoP receives it (from `GET
/// /v1/models/{model}/versions/{version}`): the signature under the registry's public key,
/// the JSON, and that it describes `model` and, when given, `version`. Pure: no storage and
/// no clock, so any process holding the public key (see [`keys`]) runs the same checks as
/// [`Registry::load_manifest`]. The blob is checked apart, against the returned manifest's
/// `blob_sha256` and `blob_size`.
///
/// # Errors
///
/// [`RegistryError::ModelId`] for an unusable model id, [`RegistryError::BadSignature`]
/// when the signature does not verify, and [`RegistryError::Corrupt`] when the signature is
/// malformed, the JSON is not a manifest, or the manifest names another model or version
/// (a validly signed manifest replayed under another name).
pub fn verify_manifest(
    signed: &SignedManifest,
    key: &VerifyingKey,
    model: &ModelId,
    version: Option<ModelVersion>,
) -> Result<Manifest, RegistryError> {
    check_model_id(model)?;
    // Until the JSON is parsed and checked, errors name the version asked for (or, when
    // none was, the version the unverified bytes claim, which is only a label).
    let label = version.unwrap_or(ModelVersion(0));
    let corrupt = |version: ModelVersion, reason: String| RegistryError::Corrupt {
        model: model.clone(),
        version,
        reason,
    };
    let signature = hex::decode(&signed.signature)
        .ok()
        .and_then(|bytes| Signature::from_slice(&bytes).ok())
        .ok_or_else(|| corrupt(label, "signature is not 64 hex-encoded bytes".into()))?;
    let message = [SIGNING_CONTEXT, signed.manifest.as_bytes()].concat();
    if key.verify_strict(&message, &signature).is_err() {
        return Err(RegistryError::BadSignature {
            model: model.clone(),
            version: label,
        });
    }
    let manifest: Manifest =
        serde_json::from_str(&signed.manifest).map_err(|e| corrupt(label, e.to_string()))?;
    let version_ok = version.is_none_or(|v| v == manifest.version);
    if &manifest.model != model || !version_ok {
        return Err(corrupt(
            label,
            format!("it describes {} {}", manifest.model, manifest.version),
        ));
    }
    Ok(manifest)
}

/// Serialises and signs a manifest.
fn sign(key: &SigningKey, manifest: &Manifest) -> Result<SignedManifest, RegistryError> {
    let json =
        serde_json::to_string(manifest).map_err(|e| RegistryError::Storage(e.to_string()))?;
    let message = [SIGNING_CONTEXT, json.as_bytes()].concat();
    let signature = key.sign(&message);
    Ok(SignedManifest {
        manifest: json,
        signature: hex::encode(signature.to_bytes()),
    })
}
