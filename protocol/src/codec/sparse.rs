//! Choosing which coordinates an update sends: top-k by magnitude, or random-k from a seed
//! that the sender and receiver share.
//!
//! Top-k indices travel on the wire as gaps, bit-packed at the width of the largest gap:
//! the first index itself, then each index minus the one before. Gaps after the first are
//! at least 1 because the indices strictly increase; a zero gap on the wire is a repeated
//! index and is rejected.
//!
//! Random-k indices never travel: both ends derive them from [`SharedSeed`] (the round's
//! seed and the round id), the dimension and `k`.

use rand_chacha::ChaCha20Rng;
use rand_core::{RngCore, SeedableRng};
use sha2::{Digest, Sha256};

use super::DecodeError;
use super::bitpack;
use crate::ids::RoundId;

/// The seed from which random-k indices are derived, known to every store of a round and
/// to whoever decodes their updates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SharedSeed {
    /// The round's random-k seed, from the plan.
    pub seed: [u8; 32],
    /// The round the indices are for: each round draws a fresh set.
    pub round: RoundId,
}

/// Indices of the `k` values of largest magnitude, in increasing order.
///
/// Ties at the threshold go to the lower indices, so the choice is deterministic. The
/// values must not be NaN (the caller checks); `k` larger than the length selects all.
pub fn top_k_indices(values: &[f32], k: usize) -> Vec<usize> {
    let n = values.len();
    if k >= n {
        return (0..n).collect();
    }
    if k == 0 {
        return Vec::new();
    }

    // On a large update, a sample gives a floor under the k-th largest magnitude, and the
    // exact selection runs over the few values above it. Everything at or above the true
    // threshold is a candidate, so the result is the same as a full selection; when the
    // floor turns out too high (fewer than k candidates), fall back to the full selection.
    if let Some(floor) = sampled_floor(values, k) {
        let candidates: Vec<usize> = values
            .iter()
            .enumerate()
            .filter(|(_, x)| x.abs() >= floor)
            .map(|(i, _)| i)
            .collect();
        if candidates.len() >= k && candidates.len() <= n / 4 {
            return top_k_among(values, candidates.iter().copied(), k);
        }
    }
    top_k_among(values, 0..n, k)
}

/// Sample size for [`sampled_floor`]; updates under 4 times this are selected directly.
const SAMPLE: usize = 1 << 14;

/// A magnitude that about `2k + 32 n / SAMPLE` values exceed, estimated from a strided
/// sample, or `None` when the update is small or `k` is not a small fraction of it.
fn sampled_floor(values: &[f32], k: usize) -> Option<f32> {
    let n = values.len();
    if n < 4 * SAMPLE {
        return None;
    }
    let stride = n / SAMPLE;
    let mut sample: Vec<f32> = values.iter().step_by(stride).map(|x| x.abs()).collect();
    let rank = (2 * k).checked_mul(sample.len())? / n + 32;
    if rank >= sample.len() / 4 {
        return None;
    }
    let (_, &mut floor, _) = sample.select_nth_unstable_by(rank, |a, b| b.total_cmp(a));
    Some(floor)
}

/// The `k` largest magnitudes among `candidates` (increasing indices, `k <= count`),
/// ties to the lower index.
fn top_k_among(
    values: &[f32],
    candidates: impl Iterator<Item = usize> + Clone,
    k: usize,
) -> Vec<usize> {
    // 1. The k-th largest magnitude, by selection in linear time.
    let mut mags: Vec<f32> = candidates.clone().map(|i| values[i].abs()).collect();
    let m = mags.len();
    let (_, &mut threshold, above) = mags.select_nth_unstable_by(m - k, f32::total_cmp);
    let greater = above.iter().filter(|&&a| a > threshold).count();

    // 2. One pass in index order: everything above the threshold, and as many values equal
    //    to it as are needed to make k.
    let mut ties = k - greater;
    let mut out = Vec::with_capacity(k);
    for i in candidates {
        let a = values[i].abs();
        if a > threshold {
            out.push(i);
        } else if a == threshold && ties > 0 {
            out.push(i);
            ties -= 1;
        }
    }
    out
}

/// `k` distinct indices below `dim`, in increasing order, derived from the shared seed.
///
/// The generator is ChaCha20 keyed with SHA-256 over a domain label, the seed, the round,
/// `dim` and `k`; indices are drawn uniformly (Lemire's rejection method) until `k` are
/// distinct. When `k` is more than half of `dim` the complement is drawn instead, so the
/// expected number of draws stays under `2k`.
pub fn random_k_indices(shared: &SharedSeed, dim: usize, k: usize) -> Vec<usize> {
    let k = k.min(dim);
    let mut hasher = Sha256::new();
    hasher.update(b"fedmesh.codec.random-k.v1");
    hasher.update(shared.seed);
    hasher.update(shared.round.0.to_le_bytes());
    hasher.update((dim as u64).to_le_bytes());
    hasher.update((k as u64).to_le_bytes());
    let mut rng = ChaCha20Rng::from_seed(hasher.finalize().into());

    let complement = k > dim / 2;
    let draws = if complement { dim - k } else { k };
    let mut chosen = vec![0u64; dim.div_ceil(64)];
    let mut n = 0;
    while n < draws {
        let i = uniform_below(&mut rng, dim as u64) as usize;
        let (word, bit) = (i / 64, 1u64 << (i % 64));
        if chosen[word] & bit == 0 {
            chosen[word] |= bit;
            n += 1;
        }
    }

    let mut out = Vec::with_capacity(k);
    for (w, &word) in chosen.iter().enumerate() {
        let mut word = if complement { !word } else { word };
        while word != 0 {
            let i = w * 64 + word.trailing_zeros() as usize;
            if i < dim {
                out.push(i);
            }
            word &= word - 1;
        }
    }
    out
}

/// A uniform integer in `0..bound` (`bound >= 1`), by Lemire's multiply-and-reject.
fn uniform_below(rng: &mut ChaCha20Rng, bound: u64) -> u64 {
    let threshold = bound.wrapping_neg() % bound;
    loop {
        let m = u128::from(rng.next_u64()) * u128::from(bound);
        if (m as u64) >= threshold {
            return (m >> 64) as u64;
        }
    }
}

/// Appends the gap encoding of strictly increasing `indices` to `body` and returns its
/// width in bits.
pub(super) fn encode_indices(indices: &[usize], body: &mut Vec<u8>) -> u8 {
    let mut gaps = Vec::with_capacity(indices.len());
    let mut prev = 0;
    for (j, &i) in indices.iter().enumerate() {
        gaps.push((if j == 0 { i } else { i - prev }) as u64);
        prev = i;
    }
    let widest = gaps.iter().fold(0u64, |acc, &g| acc | g);
    let bits = (64 - widest.leading_zeros()).max(1);
    // Every gap fits in the width of their bitwise or, so packing cannot fail.
    if let Ok(packed) = bitpack::pack(&gaps, bits) {
        body.extend_from_slice(&packed);
    }
    bits as u8
}

/// Decodes `count` gap-encoded indices, each below `dim` and strictly increasing.
pub(super) fn decode_indices(
    bytes: &[u8],
    bits: u8,
    count: usize,
    dim: usize,
) -> Result<Vec<usize>, DecodeError> {
    let gaps =
        bitpack::unpack(bytes, u32::from(bits), count).map_err(|source| DecodeError::Bitpack {
            field: "indices",
            source,
        })?;

    let mut out = Vec::with_capacity(count);
    let mut index = 0u64;
    for (position, &gap) in gaps.iter().enumerate() {
        if position > 0 && gap == 0 {
            return Err(DecodeError::RepeatedIndex { position, index });
        }
        index = match index.checked_add(gap) {
            Some(i) if i < dim as u64 => i,
            _ => return Err(DecodeError::IndexOutOfRange { position, dim }),
        };
        out.push(index as usize);
    }
    Ok(out)
}
