//! Models a store trains from: fetched through the PoP, verified before anything loads
//! them, kept on disk.
//!
//! A model is accepted only when its manifest carries the registry's ed25519 signature
//! (checked by core-agg's pure `verify_manifest`), names the model and version the round
//! announced, names the blob digest the round announced, and the blob's SHA-256 and size
//! match it. A version older than the one the store last trained from is refused, so a
//! replayed announcement cannot roll the store back.

use ed25519_dalek::VerifyingKey;
use fedmesh_core_agg::ModelId;
use fedmesh_core_agg::registry::{RegistryError, SignedManifest, sha256_hex, verify_manifest};
use fedmesh_protocol::ids::ModelVersion;
use fedmesh_protocol::wire::{self, RoundAnnouncement};

use super::pop::{Pop, PopError};
use super::state::{ModelRef, StateDir, StateError};
use crate::weights::{Weights, WeightsError};

/// The largest model blob a store fetches.
pub const MAX_BLOB: usize = 1 << 30;

/// Why a model was refused.
#[derive(Debug, thiserror::Error)]
pub enum ModelRefused {
    /// The manifest's signature, JSON or names failed verification.
    #[error("manifest refused: {0}")]
    Manifest(#[from] RegistryError),
    /// The signed manifest names another blob than the round announced.
    #[error("manifest names blob {signed}, the round announced {announced}")]
    AnnouncedDigest {
        /// What the manifest signs.
        signed: String,
        /// What the announcement said.
        announced: String,
    },
    /// The blob differs from its manifest.
    #[error("blob refused: {0}")]
    Blob(String),
    /// The blob is not float32 safetensors.
    #[error("blob does not load: {0}")]
    Weights(#[from] WeightsError),
    /// The version is older than the one the store last trained from.
    #[error("model version {offered} is older than version {trained} the store last trained from")]
    Older {
        /// The version offered.
        offered: u64,
        /// The version last trained from.
        trained: u64,
    },
    /// The model could not be fetched.
    #[error("model fetch failed: {0}")]
    Fetch(#[from] PopError),
    /// The PoP answered `204` where a model was due.
    #[error("model {0} is not served")]
    Missing(String),
    /// The state directory failed.
    #[error(transparent)]
    State(#[from] StateError),
}

/// A verified model, ready to train from.
#[derive(Debug, Clone)]
pub struct VerifiedModel {
    /// Which model it is.
    pub reference: ModelRef,
    /// Its weights (shared parameters only).
    pub weights: Weights,
}

/// Fetches (or finds on disk) the model a round announces and verifies it.
///
/// # Errors
///
/// [`ModelRefused`] saying why; nothing is written for a refused model.
pub async fn fetch_verified(
    pop: &Pop,
    key: &VerifyingKey,
    dir: &StateDir,
    last_trained: Option<u64>,
    round: &RoundAnnouncement,
) -> Result<VerifiedModel, ModelRefused> {
    let version = round.model_version;
    if let Some(trained) = last_trained.filter(|&t| version.0 < t) {
        return Err(ModelRefused::Older {
            offered: version.0,
            trained,
        });
    }
    let model = ModelId(round.model.clone());

    // 1. A copy kept on disk is verified again: the disk is not trusted more than the wire.
    let kept = (
        std::fs::read(dir.model_manifest(&round.model_sha256)),
        std::fs::read(dir.model_blob(&round.model_sha256)),
    );
    if let (Ok(manifest), Ok(blob)) = kept
        && let Ok(verified) = verify(key, &model, version, &round.model_sha256, &manifest, blob)
    {
        return Ok(verified);
    }

    // 2. The signed manifest, then the blob it names.
    let path = wire::model_version(&round.model, version);
    let manifest = pop
        .get_bytes(&path, wire::MAX_JSON_BODY)
        .await?
        .ok_or_else(|| ModelRefused::Missing(path.clone()))?;
    let signed = parse_signed(&manifest)?;
    let checked = verify_manifest(&signed, key, &model, Some(version))?;
    if checked.blob_sha256 != round.model_sha256 {
        return Err(ModelRefused::AnnouncedDigest {
            signed: checked.blob_sha256,
            announced: round.model_sha256.clone(),
        });
    }
    let limit = usize::try_from(checked.blob_size)
        .unwrap_or(MAX_BLOB)
        .min(MAX_BLOB);
    let blob_path = wire::blob(&checked.blob_sha256);
    let blob = pop
        .get_bytes(&blob_path, limit)
        .await?
        .ok_or_else(|| ModelRefused::Missing(blob_path.clone()))?;
    let verified = verify(
        key,
        &model,
        version,
        &round.model_sha256,
        &manifest,
        blob.to_vec(),
    )?;

    // 3. Kept for the next round and as the fallback.
    dir.keep_model(&round.model_sha256, &blob, &manifest)?;
    Ok(verified)
}

/// Loads the last good model kept on disk, verified again.
///
/// # Errors
///
/// [`ModelRefused`] when it is missing or no longer verifies.
pub fn load_kept(
    key: &VerifyingKey,
    dir: &StateDir,
    reference: &ModelRef,
) -> Result<VerifiedModel, ModelRefused> {
    let read = |path: std::path::PathBuf| {
        std::fs::read(&path).map_err(|e| ModelRefused::Blob(format!("{}: {e}", path.display())))
    };
    let manifest = read(dir.model_manifest(&reference.sha256))?;
    let blob = read(dir.model_blob(&reference.sha256))?;
    let model = ModelId(reference.model.clone());
    let version = ModelVersion(reference.version);
    verify(key, &model, version, &reference.sha256, &manifest, blob)
}

fn parse_signed(bytes: &[u8]) -> Result<SignedManifest, ModelRefused> {
    serde_json::from_slice(bytes)
        .map_err(|e| ModelRefused::Blob(format!("signed manifest is not JSON: {e}")))
}

fn verify(
    key: &VerifyingKey,
    model: &ModelId,
    version: ModelVersion,
    announced: &str,
    manifest: &[u8],
    blob: Vec<u8>,
) -> Result<VerifiedModel, ModelRefused> {
    let signed = parse_signed(manifest)?;
    let checked = verify_manifest(&signed, key, model, Some(version))?;
    if checked.blob_sha256 != announced {
        return Err(ModelRefused::AnnouncedDigest {
            signed: checked.blob_sha256,
            announced: announced.to_owned(),
        });
    }
    if blob.len() as u64 != checked.blob_size {
        return Err(ModelRefused::Blob(format!(
            "{} bytes, the manifest says {}",
            blob.len(),
            checked.blob_size
        )));
    }
    let sha256 = sha256_hex(&blob);
    if sha256 != checked.blob_sha256 {
        return Err(ModelRefused::Blob(format!(
            "sha-256 {sha256} differs from the manifest's {}",
            checked.blob_sha256
        )));
    }
    let weights = Weights::from_safetensors(&blob)?;
    Ok(VerifiedModel {
        reference: ModelRef {
            model: model.0.clone(),
            version: version.0,
            sha256,
        },
        weights,
    })
}
