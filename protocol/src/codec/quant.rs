//! Stochastic quantisation of `f32` values to `bits`-bit levels, block by block.
//!
//! Each block of `block` consecutive values is described by its minimum `lo` and a step
//! `step >= (max - lo) / L`, where `L = 2^bits - 1`. A value `x` becomes the level
//! `q = floor((x - lo) / step + u)` with `u` uniform in `[0, 1)`, and decodes to
//! `lo + q * step`. Hence:
//!
//! - **error bound**: every decoded value is within one step of its input,
//!   `|x - (lo + q * step)| <= step` (up to `f32` rounding of the final multiply-add);
//! - **unbiased**: `q` rounds up with probability equal to the fractional part of
//!   `(x - lo) / step`, so the expected decoded value is `x` (the dither has 32 bits, so
//!   any bias is below `2^-32` of a step, far under `f32` precision).
//!
//! A block whose values are all equal has step 0 and decodes exactly.
//!
//! On the wire a block's scale is `lo` then `step`, both `f32` little-endian; the levels
//! follow, bit-packed at `bits` bits per value ([`super::bitpack`]), or one byte each when
//! `bits` is 8.

use std::borrow::Cow;

use rand_chacha::ChaCha20Rng;
use rand_core::{RngCore, SeedableRng};

use super::DecodeError;
use super::bitpack;

/// Values per chunk handed to the bit-packer. A multiple of 8, so every chunk but the last
/// ends on a byte boundary and the chunks concatenate into one packed stream.
const PACK_CHUNK: usize = 4096;

/// Scales a 32-bit dither to `[0, 1)`.
const TWO_POW_MINUS_32: f64 = 1.0 / 4_294_967_296.0;

/// Bytes of one block's scale on the wire.
pub(super) const SCALE_LEN: usize = 8;

/// Number of levels minus one, `2^bits - 1`.
fn top_level(bits: u8) -> u32 {
    (1u32 << bits) - 1
}

/// Number of blocks that `count` values split into.
pub(super) fn block_count(count: usize, block: usize) -> usize {
    count.div_ceil(block)
}

/// The value level `q` of a block decodes to; encoder and decoder share it so that error
/// feedback sees exactly what the receiver sees.
fn level_value(lo: f32, step: f32, q: u32) -> f32 {
    lo + q as f32 * step
}

/// Appends the scales and then the levels of `values` to `body`, and, when `sent` is
/// given, the values a decoder will reconstruct (for error feedback).
///
/// The values must be finite, `bits` in `1..=8` and `block >= 1`; the caller checks.
///
/// # Errors
///
/// The index of the first block whose range is so close to `f32::MAX` that its top level
/// would decode to infinity.
pub(super) fn encode_into(
    values: &[f32],
    bits: u8,
    block: usize,
    seed: [u8; 32],
    body: &mut Vec<u8>,
    mut sent: Option<&mut Vec<f32>>,
) -> Result<(), usize> {
    let top = top_level(bits);
    let mut rng = ChaCha20Rng::from_seed(seed);

    // 1. Scales first, as the wire has them.
    let scales: Vec<(f32, f32)> = values.chunks(block).map(|c| block_scale(c, top)).collect();
    for (index, &(lo, step)) in scales.iter().enumerate() {
        if check_scale(index, lo, step, top).is_err() {
            return Err(index);
        }
        body.extend_from_slice(&lo.to_le_bytes());
        body.extend_from_slice(&step.to_le_bytes());
    }

    // 2. Levels, one byte each for now, written in place. The dither comes a block at a
    //    time, 32 bits per value.
    let start = body.len();
    body.resize(start + values.len(), 0);
    let mut dither = vec![0u8; 4 * block.min(values.len())];
    let blocks = values.chunks(block).zip(body[start..].chunks_mut(block));
    for ((chunk, levels), &(lo, step)) in blocks.zip(&scales) {
        let dither = &mut dither[..4 * chunk.len()];
        rng.fill_bytes(dither);

        // f64 keeps `x - lo` finite even when the block spans most of the f32 range; the
        // cast truncates toward zero (the floor here) and saturates below at 0.
        let inv = if step > 0.0 {
            1.0 / f64::from(step)
        } else {
            0.0
        };
        let lo64 = f64::from(lo);
        for ((x, q), d) in chunk
            .iter()
            .zip(levels.iter_mut())
            .zip(dither.chunks_exact(4))
        {
            let u = f64::from(u32::from_le_bytes([d[0], d[1], d[2], d[3]])) * TWO_POW_MINUS_32;
            *q = (((f64::from(*x) - lo64) * inv + u) as u32).min(top) as u8;
        }
        if let Some(sent) = sent.as_deref_mut() {
            sent.extend(levels.iter().map(|&q| level_value(lo, step, u32::from(q))));
        }
    }
    if bits < 8 {
        let levels = body.split_off(start);
        pack_levels(&levels, bits, body);
    }
    Ok(())
}

/// `lo` and the smallest `f32` step with `lo + top * step >= max` in exact arithmetic.
fn block_scale(chunk: &[f32], top: u32) -> (f32, f32) {
    let (lo, hi) = chunk
        .iter()
        .fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &x| {
            (lo.min(x), hi.max(x))
        });
    let span = f64::from(hi) - f64::from(lo);
    let mut step = (span / f64::from(top)) as f32;
    if f64::from(step) * f64::from(top) < span {
        step = step.next_up();
    }
    (lo, step)
}

fn pack_levels(levels: &[u8], bits: u8, body: &mut Vec<u8>) {
    let mut wide = Vec::with_capacity(PACK_CHUNK);
    for chunk in levels.chunks(PACK_CHUNK) {
        wide.clear();
        wide.extend(chunk.iter().map(|&q| u64::from(q)));
        // Levels are below 2^bits by construction, so packing cannot fail.
        if let Ok(packed) = bitpack::pack(&wide, u32::from(bits)) {
            body.extend_from_slice(&packed);
        }
    }
}

/// Bytes that `count` levels of `bits` bits take on the wire, or `None` on overflow.
pub(super) fn levels_len(count: usize, bits: u8) -> Option<usize> {
    bitpack::packed_len(count, u32::from(bits)).ok()
}

/// Decodes `count` values from the scales section and the levels section.
///
/// The caller has checked both sections' lengths against `count`, `bits` and `block`.
pub(super) fn decode(
    scales: &[u8],
    levels: &[u8],
    count: usize,
    bits: u8,
    block: usize,
) -> Result<Vec<f32>, DecodeError> {
    let top = top_level(bits);
    let levels = unpack_levels(levels, bits, count)?;
    let mut out = Vec::with_capacity(count);

    for (index, (scale, chunk)) in scales
        .chunks_exact(SCALE_LEN)
        .zip(levels.chunks(block))
        .enumerate()
    {
        let lo = f32::from_le_bytes([scale[0], scale[1], scale[2], scale[3]]);
        let step = f32::from_le_bytes([scale[4], scale[5], scale[6], scale[7]]);
        check_scale(index, lo, step, top)?;
        out.extend(chunk.iter().map(|&q| level_value(lo, step, u32::from(q))));
    }
    Ok(out)
}

/// Rejects a scale whose levels would decode to a non-finite value.
fn check_scale(block: usize, lo: f32, step: f32, top: u32) -> Result<(), DecodeError> {
    if !lo.is_finite() {
        return Err(DecodeError::Scale {
            block,
            field: "offset",
            value: lo,
        });
    }
    if !(step.is_finite() && step >= 0.0) {
        return Err(DecodeError::Scale {
            block,
            field: "step",
            value: step,
        });
    }
    if !level_value(lo, step, top).is_finite() {
        return Err(DecodeError::Scale {
            block,
            field: "step",
            value: step,
        });
    }
    Ok(())
}

fn unpack_levels(bytes: &[u8], bits: u8, count: usize) -> Result<Cow<'_, [u8]>, DecodeError> {
    if bits == 8 {
        return Ok(Cow::Borrowed(bytes));
    }
    // Every chunk but the last spans whole bytes (PACK_CHUNK is a multiple of 8), so the
    // stream splits at chunk boundaries; only the last chunk has padding to check.
    let chunk_bytes = PACK_CHUNK * usize::from(bits) / 8;
    let mut out = Vec::with_capacity(count);
    let mut left = count;
    for chunk in bytes.chunks(chunk_bytes) {
        let n = left.min(PACK_CHUNK);
        let wide =
            bitpack::unpack(chunk, u32::from(bits), n).map_err(|source| DecodeError::Bitpack {
                field: "levels",
                source,
            })?;
        out.extend(wide.iter().map(|&q| q as u8));
        left -= n;
    }
    Ok(Cow::Owned(out))
}
