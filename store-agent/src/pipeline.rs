//! From a round's training outcome to the bytes a store sends in trusted-pop mode: the shared
//! delta laid out in the protocol's documented order, clipped, noised and compressed.
//!
//! The maths (layout, clipping, Gaussian noise, codecs) is `fedmesh-protocol`'s; this module
//! only connects the store's named weights to it. In secure mode the same clipped vector
//! goes to the secure-aggregation quantiser instead of [`compress`].

use std::collections::BTreeMap;

use fedmesh_protocol::codec::{self, CodecConfig, Residual};
use fedmesh_protocol::params::{ParamError, ParamLayout, ParamSpec, Scope};
use fedmesh_protocol::update::{self, UpdateError};
use sha2::{Digest, Sha256};

use crate::weights::Weights;

/// How a store privatises and compresses its update.
#[derive(Debug, Clone, Copy)]
pub struct UpdateSettings {
    /// L2 norm the whole update is clipped to.
    pub clip_norm: f32,
    /// Standard deviation of the Gaussian noise added after clipping (0 for none; record-level
    /// DP adds its noise during training instead).
    pub noise_std: f64,
    /// Codec stages.
    pub codec: CodecConfig,
}

/// An update ready to queue and send.
#[derive(Debug, Clone)]
pub struct BuiltUpdate {
    /// The encoded frame (`fedmesh_protocol::codec::EncodedUpdate`).
    pub bytes: Vec<u8>,
    /// SHA-256 of `bytes`, hex.
    pub sha256: String,
    /// The update's L2 norm before clipping, for the store's own monitoring.
    pub pre_clip_norm: f64,
    /// The layout the receiver decodes against.
    pub layout: ParamLayout,
}

/// Why an update could not be built.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    /// The delta's parameters do not form a valid layout.
    #[error("update layout: {0}")]
    Layout(#[from] ParamError),
    /// Clipping or noise refused the values (non-finite training output).
    #[error("update values: {0}")]
    Values(#[from] UpdateError),
    /// A codec refused its settings or input.
    #[error("update encoding: {0}")]
    Encode(#[from] codec::EncodeError),
}

/// The protocol layout of a delta: every tensor of it is shared (local parameters never
/// appear in a delta), ordered by name as the protocol documents.
///
/// # Errors
///
/// [`ParamError`] for duplicate names.
pub fn layout_of(delta: &Weights) -> Result<ParamLayout, ParamError> {
    ParamLayout::new(delta.tensors.iter().map(|t| ParamSpec {
        name: t.name.clone(),
        shape: t.shape.clone(),
        local: false,
    }))
}

/// Clips, noises and encodes `delta`.
///
/// `residual` is the store's error-feedback state for top-k (kept between rounds); the
/// seeds must be fresh for every update (draw them from the OS generator).
///
/// # Errors
///
/// [`PipelineError`] naming the stage that refused.
pub fn build_update(
    delta: &Weights,
    settings: &UpdateSettings,
    residual: Option<&mut Residual>,
    noise_seed: [u8; 32],
) -> Result<BuiltUpdate, PipelineError> {
    // 1. Lay the shared delta out in protocol order.
    let layout = layout_of(delta)?;
    let values: BTreeMap<String, Vec<f32>> = delta
        .tensors
        .iter()
        .map(|t| (t.name.clone(), t.values.clone()))
        .collect();
    let mut flat = layout.flatten(&values, Scope::Shared)?;

    // 2. Privatise: bound the store's influence, then noise.
    let pre_clip_norm = update::clip_l2(&mut flat, settings.clip_norm)?;
    if settings.noise_std > 0.0 {
        update::add_gaussian_noise(&mut flat, settings.noise_std, noise_seed)?;
    }

    // 3. Compress.
    let bytes = codec::compress(&flat, &settings.codec, residual)?.encode();
    let sha256 = hex::encode(Sha256::digest(&bytes));
    Ok(BuiltUpdate {
        bytes,
        sha256,
        pre_clip_norm,
        layout,
    })
}
