//! Fixed-width bit-packing of unsigned integers.
//!
//! # Bit order
//!
//! Value `i` of a packed stream occupies stream bits `i * bits .. (i + 1) * bits`, least
//! significant bit first. Stream bit `j` is bit `j % 8` (counting from the least significant
//! bit) of byte `j / 8`. Equivalently: the stream is one long little-endian integer and
//! value `i` is its bit field at offset `i * bits`. A stream of `count` values is exactly
//! `ceil(count * bits / 8)` bytes long, and the unused high bits of its last byte are zero.
//!
//! Packing moves 64-bit words through a 128-bit accumulator rather than single bits;
//! unpacking reads each value with one unaligned 64-bit load (widths up to 57) or through
//! the same accumulator (wider), so neither direction touches bits one at a time.

use thiserror::Error;

/// Why a stream could not be packed or unpacked.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum BitpackError {
    /// The width is outside `1..=64`.
    #[error("bit width {bits} is outside 1..=64")]
    BitWidth {
        /// The width asked for.
        bits: u32,
    },
    /// A value needs more bits than the width allows.
    #[error("value {value} at index {index} does not fit in {bits} bits")]
    ValueTooWide {
        /// Position of the value in the input.
        index: usize,
        /// The value itself.
        value: u64,
        /// The width asked for.
        bits: u32,
    },
    /// `count * bits` overflows the address space.
    #[error("count {count} at {bits} bits overflows the stream length")]
    CountOverflow {
        /// The count asked for.
        count: usize,
        /// The width asked for.
        bits: u32,
    },
    /// The stream is not exactly `ceil(count * bits / 8)` bytes.
    #[error("packed length is {actual} bytes, expected {expected} for the declared count")]
    Length {
        /// Bytes the declared count and width need.
        expected: usize,
        /// Bytes present.
        actual: usize,
    },
    /// The unused bits after the last value are not zero.
    #[error("padding bits after the last value are not zero")]
    NonzeroPadding,
}

/// Bytes needed to hold `count` values of `bits` bits each.
///
/// # Errors
///
/// [`BitpackError::BitWidth`] for a width outside `1..=64`, and
/// [`BitpackError::CountOverflow`] when the length does not fit in `usize`.
pub fn packed_len(count: usize, bits: u32) -> Result<usize, BitpackError> {
    check_width(bits)?;
    let total_bits = count
        .checked_mul(bits as usize)
        .ok_or(BitpackError::CountOverflow { count, bits })?;
    Ok(total_bits.div_ceil(8))
}

/// Packs each value into exactly `bits` bits, in the order described in the module docs.
///
/// # Errors
///
/// [`BitpackError::BitWidth`] for a width outside `1..=64`, and
/// [`BitpackError::ValueTooWide`] for the first value that is `>= 2^bits`.
pub fn pack(values: &[u64], bits: u32) -> Result<Vec<u8>, BitpackError> {
    let len = packed_len(values.len(), bits)?;
    let limit = mask(bits);
    let mut out = Vec::with_capacity(len + 8);
    let mut acc: u128 = 0;
    let mut filled: u32 = 0;

    for (index, &value) in values.iter().enumerate() {
        if value & !limit != 0 {
            return Err(BitpackError::ValueTooWide { index, value, bits });
        }
        acc |= u128::from(value) << filled;
        filled += bits;
        // `filled` stays below 128: it is under 64 before each value and a value adds <= 64.
        if filled >= 64 {
            out.extend_from_slice(&(acc as u64).to_le_bytes());
            acc >>= 64;
            filled -= 64;
        }
    }

    // The last partial word: only the bytes that hold bits, the rest of `acc` is zero.
    let tail = (filled as usize).div_ceil(8);
    out.extend_from_slice(&(acc as u64).to_le_bytes()[..tail]);
    debug_assert_eq!(out.len(), len);
    Ok(out)
}

/// Unpacks `count` values of `bits` bits each, the inverse of [`pack`].
///
/// The output is allocated only after the input length has been checked against `count`,
/// so a hostile count cannot make this allocate more than 64 times the input's size.
///
/// # Errors
///
/// [`BitpackError::BitWidth`] for a width outside `1..=64`, [`BitpackError::CountOverflow`]
/// or [`BitpackError::Length`] when `bytes` is not exactly the packed length of `count`
/// values (truncated or with trailing bytes), and [`BitpackError::NonzeroPadding`] when the
/// unused bits of the last byte are set.
pub fn unpack(bytes: &[u8], bits: u32, count: usize) -> Result<Vec<u64>, BitpackError> {
    let expected = packed_len(count, bits)?;
    if bytes.len() != expected {
        return Err(BitpackError::Length {
            expected,
            actual: bytes.len(),
        });
    }
    let used = count * bits as usize;
    if !used.is_multiple_of(8) && bytes[expected - 1] >> (used % 8) != 0 {
        return Err(BitpackError::NonzeroPadding);
    }

    let limit = mask(bits);
    let mut out = Vec::with_capacity(count);
    if bits <= 57 {
        // A value starts at most 7 bits into its first byte, so one unaligned 64-bit read
        // holds all of it; this loop has no data-dependent branch but the stream's end.
        for i in 0..count {
            let offset = i * bits as usize;
            let rest = &bytes[offset / 8..];
            let word = match rest.first_chunk::<8>() {
                Some(chunk) => u64::from_le_bytes(*chunk),
                None => tail_word(rest),
            };
            out.push((word >> (offset % 8)) & limit);
        }
        return Ok(out);
    }

    let mut words = bytes.chunks_exact(8);
    let mut acc: u128 = 0;
    let mut filled: u32 = 0;
    for _ in 0..count {
        if filled < bits {
            // Refill a whole word; `filled + 64 < 128` because `filled < bits <= 64`.
            let word = match words.next() {
                Some(chunk) => u64::from_le_bytes(chunk.try_into().unwrap_or([0; 8])),
                None => tail_word(words.remainder()),
            };
            acc |= u128::from(word) << filled;
            filled += 64;
        }
        out.push(acc as u64 & limit);
        acc >>= bits;
        filled -= bits;
    }
    Ok(out)
}

/// The final partial word of a stream, zero-extended.
fn tail_word(rest: &[u8]) -> u64 {
    let mut word = [0u8; 8];
    word[..rest.len()].copy_from_slice(rest);
    u64::from_le_bytes(word)
}

fn check_width(bits: u32) -> Result<(), BitpackError> {
    if (1..=64).contains(&bits) {
        Ok(())
    } else {
        Err(BitpackError::BitWidth { bits })
    }
}

/// The largest value of `bits` bits; `bits` is in `1..=64`.
fn mask(bits: u32) -> u64 {
    u64::MAX >> (64 - bits)
}
