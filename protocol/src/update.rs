//! The store-side update pipeline before compression: delta, clipping and Gaussian noise.
//!
//! A store turns its trained weights into an update in three steps, in this order:
//!
//! 1. [`delta`]: local minus global weights over the shared parameters, flattened in the
//!    order of [`ParamLayout`];
//! 2. [`clip_l2`]: scale the update down so its L2 norm is at most the plan's clip norm,
//!    which bounds any one store's influence on the sum;
//! 3. [`add_gaussian_noise`]: add the store's share of the differential-privacy noise,
//!    drawn from a ChaCha20 generator seeded by the caller.
//!
//! The result then goes to a codec ([`crate::codec`]) or to secure aggregation.
//! Non-finite values are errors at every step: a NaN must never reach a sum.

use rand_chacha::ChaCha20Rng;
use rand_core::SeedableRng;
use rand_distr::{Distribution, StandardNormal};
use thiserror::Error;

use crate::params::{ParamError, ParamLayout, ParamMap, Scope};

/// Why an update could not be formed, clipped or noised.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum UpdateError {
    /// The weights do not match the layout.
    #[error(transparent)]
    Params(#[from] ParamError),
    /// Two vectors that must align have different lengths.
    #[error("local weights have {local} shared values, global weights have {global}")]
    Length {
        /// Length of the local vector.
        local: usize,
        /// Length of the global vector.
        global: usize,
    },
    /// A value is NaN or infinite.
    #[error("value at index {index} is not finite ({value})")]
    NonFinite {
        /// Position in the flat vector.
        index: usize,
        /// The value.
        value: f32,
    },
    /// The clip norm is negative, NaN or infinite.
    #[error("clip norm {0} is not a finite non-negative number")]
    ClipNorm(f32),
    /// The noise standard deviation is negative, NaN or infinite.
    #[error("noise standard deviation {0} is not a finite non-negative number")]
    NoiseStdDev(f64),
}

/// `local - global` over the shared parameters, flattened in layout order.
///
/// Local parameters (a personalised head) are left out: they never leave the store.
///
/// # Errors
///
/// [`UpdateError::Params`] when either map does not match the layout, and
/// [`UpdateError::NonFinite`] when the difference has a NaN or infinite value.
pub fn delta(
    layout: &ParamLayout,
    local: &ParamMap,
    global: &ParamMap,
) -> Result<Vec<f32>, UpdateError> {
    let mut update = layout.flatten(local, Scope::Shared)?;
    let global = layout.flatten(global, Scope::Shared)?;
    subtract_in_place(&mut update, &global)?;
    Ok(update)
}

/// Subtracts `global` from `local` in place, for weights already flattened.
///
/// # Errors
///
/// [`UpdateError::Length`] when the lengths differ and [`UpdateError::NonFinite`] when the
/// difference has a NaN or infinite value.
pub fn subtract_in_place(local: &mut [f32], global: &[f32]) -> Result<(), UpdateError> {
    if local.len() != global.len() {
        return Err(UpdateError::Length {
            local: local.len(),
            global: global.len(),
        });
    }
    for (l, g) in local.iter_mut().zip(global) {
        *l -= g;
    }
    check_finite(local)
}

/// The L2 norm, accumulated in `f64` so that rounding stays far below `f32` precision.
///
/// # Errors
///
/// [`UpdateError::NonFinite`] for the first NaN or infinite value.
pub fn l2_norm(update: &[f32]) -> Result<f64, UpdateError> {
    check_finite(update)?;
    Ok(norm_unchecked(update))
}

/// Scales `update` so that its L2 norm is at most `max_norm`, and returns the norm it had
/// before.
///
/// An update already within the bound is left untouched, the zero vector included. After a
/// clip the norm is at most `max_norm` as [`l2_norm`] computes it, despite the rounding of
/// the scaled `f32` values.
///
/// # Errors
///
/// [`UpdateError::ClipNorm`] when `max_norm` is negative or not finite, and
/// [`UpdateError::NonFinite`] when the update has a NaN or infinite value; the update is
/// unchanged in both cases.
pub fn clip_l2(update: &mut [f32], max_norm: f32) -> Result<f64, UpdateError> {
    if !(max_norm.is_finite() && max_norm >= 0.0) {
        return Err(UpdateError::ClipNorm(max_norm));
    }
    let norm = l2_norm(update)?;
    let bound = f64::from(max_norm);
    if norm <= bound {
        return Ok(norm);
    }

    // Rounding each scaled value to f32 can leave the norm a few ulps over the bound, so
    // shrink once more by a hair until it holds; the first pass almost always does.
    let mut factor = bound / norm;
    for _ in 0..8 {
        update
            .iter_mut()
            .for_each(|x| *x = (f64::from(*x) * factor) as f32);
        if norm_unchecked(update) <= bound {
            return Ok(norm);
        }
        factor = 1.0 - 1e-6;
    }
    // Not reached for finite input; zero is the one vector sure to be within any bound.
    update.fill(0.0);
    Ok(norm)
}

/// Adds independent Gaussian noise of standard deviation `std_dev` to every value.
///
/// The noise comes from [`ChaCha20Rng`] seeded with `seed` and the ziggurat sampler of
/// `rand_distr`'s `StandardNormal` (an exact Gaussian, not an approximation), drawn in `f64`
/// and scaled before the sum is rounded to `f32`. The same seed gives the same noise; the
/// caller must never reuse a seed across updates, or the noise would cancel in differences.
///
/// # Errors
///
/// [`UpdateError::NoiseStdDev`] when `std_dev` is negative or not finite, and
/// [`UpdateError::NonFinite`] when a noised value overflows `f32`.
pub fn add_gaussian_noise(
    update: &mut [f32],
    std_dev: f64,
    seed: [u8; 32],
) -> Result<(), UpdateError> {
    if !(std_dev.is_finite() && std_dev >= 0.0) {
        return Err(UpdateError::NoiseStdDev(std_dev));
    }
    let mut rng = ChaCha20Rng::from_seed(seed);
    for x in update.iter_mut() {
        let z: f64 = StandardNormal.sample(&mut rng);
        *x = (f64::from(*x) + std_dev * z) as f32;
    }
    check_finite(update)
}

fn norm_unchecked(update: &[f32]) -> f64 {
    update
        .iter()
        .map(|&x| f64::from(x) * f64::from(x))
        .sum::<f64>()
        .sqrt()
}

fn check_finite(values: &[f32]) -> Result<(), UpdateError> {
    match values.iter().position(|x| !x.is_finite()) {
        Some(index) => Err(UpdateError::NonFinite {
            index,
            value: values[index],
        }),
        None => Ok(()),
    }
}
