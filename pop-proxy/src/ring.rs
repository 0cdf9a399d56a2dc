//! The ring of masked updates, Z/2^r with 1 <= r <= 64, and the streaming decoder of its
//! wire layout.
//!
//! # Layout and representation
//!
//! A masked update of `len` elements travels bit-packed at `r` bits per element, least
//! significant bit first, `ceil(len * r / 8)` bytes with zero padding (the layout of
//! `fedmesh_protocol::codec::bitpack`). In memory every element is a `u64` lane kept
//! reduced below 2^r: sums are `wrapping_add` then a mask, correct for every r because 2^r
//! divides 2^64. One lane width for all r keeps a single fold loop; for r <= 32 it costs
//! twice the memory of `u32` lanes, still one model per open round.

use thiserror::Error;

/// A ring Z/2^r.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Ring {
    bits: u32,
}

/// A ring width outside 1..=64.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("ring width {0} bits is outside 1..=64")]
pub struct RingError(pub u32);

impl Ring {
    /// The ring Z/2^bits.
    ///
    /// # Errors
    /// [`RingError`] unless `1 <= bits <= 64`.
    pub fn new(bits: u32) -> Result<Self, RingError> {
        if (1..=64).contains(&bits) {
            Ok(Self { bits })
        } else {
            Err(RingError(bits))
        }
    }

    /// r.
    pub fn bits(self) -> u32 {
        self.bits
    }

    /// 2^r - 1: AND with it reduces a lane into the ring.
    pub fn mask(self) -> u64 {
        u64::MAX >> (64 - self.bits)
    }

    /// Bytes of a packed vector of `len` elements, `None` on overflow.
    pub fn packed_len(self, len: usize) -> Option<usize> {
        len.checked_mul(self.bits as usize)?
            .checked_add(7)
            .map(|b| b / 8)
    }

    /// Packs reduced lanes into the wire layout.
    pub fn pack(self, values: &[u64]) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.packed_len(values.len()).unwrap_or(0));
        let mut acc: u128 = 0;
        let mut acc_bits = 0u32;
        for &v in values {
            acc |= u128::from(v & self.mask()) << acc_bits;
            acc_bits += self.bits;
            while acc_bits >= 8 {
                out.push(acc as u8);
                acc >>= 8;
                acc_bits -= 8;
            }
        }
        if acc_bits > 0 {
            out.push(acc as u8);
        }
        out
    }
}

/// How a packed vector was malformed.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum PayloadError {
    /// More bytes than `len` elements need.
    #[error("payload longer than the {expected} bytes the shape needs")]
    TooLong {
        /// Bytes the shape needs.
        expected: usize,
    },
    /// The stream ended early.
    #[error("payload ended after {got} of {expected} bytes")]
    TooShort {
        /// Bytes the shape needs.
        expected: usize,
        /// Bytes received.
        got: usize,
    },
    /// The bits after the last element are not zero.
    #[error("padding bits after the last element are not zero")]
    NonzeroPadding,
}

/// Decodes a packed vector chunk by chunk into lanes, checking its length and padding.
///
/// Chunks may split elements anywhere; state carried between chunks is under 16 bytes.
#[derive(Debug, Clone)]
pub struct Unpacker {
    ring: Ring,
    len: usize,
    expected_bytes: usize,
    bytes_in: usize,
    index: usize,
    acc: u128,
    acc_bits: u32,
}

impl Unpacker {
    /// A decoder for `len` elements of `ring`, `None` if the byte length overflows.
    pub fn new(ring: Ring, len: usize) -> Option<Self> {
        Some(Self {
            ring,
            len,
            expected_bytes: ring.packed_len(len)?,
            bytes_in: 0,
            index: 0,
            acc: 0,
            acc_bits: 0,
        })
    }

    /// Bytes accepted so far.
    pub fn bytes_in(&self) -> usize {
        self.bytes_in
    }

    /// Decodes `chunk`, writing each completed element to `out[i]`.
    ///
    /// # Errors
    /// [`PayloadError::TooLong`] as soon as the stream passes the expected length.
    ///
    /// # Panics
    /// If `out` is shorter than `len` (a caller bug, not an input error).
    pub fn push(&mut self, chunk: &[u8], out: &mut [u64]) -> Result<(), PayloadError> {
        assert!(out.len() >= self.len, "output shorter than the vector");
        if chunk.len() > self.expected_bytes - self.bytes_in {
            return Err(PayloadError::TooLong {
                expected: self.expected_bytes,
            });
        }
        self.bytes_in += chunk.len();

        let bits = self.ring.bits();
        let rest = if bits.is_multiple_of(8) {
            self.push_aligned(chunk, out)
        } else {
            self.push_words(chunk, out)
        };
        for &byte in rest {
            self.feed(u64::from(byte), 8, out);
        }
        Ok(())
    }

    /// Whole lanes straight from the bytes when r is a multiple of 8; returns the tail.
    fn push_aligned<'c>(&mut self, mut chunk: &'c [u8], out: &mut [u64]) -> &'c [u8] {
        // Finish a lane split across chunks byte by byte.
        while self.acc_bits != 0 && !chunk.is_empty() {
            self.feed(u64::from(chunk[0]), 8, out);
            chunk = &chunk[1..];
        }
        let width = (self.ring.bits() / 8) as usize;
        let lanes = (chunk.len() / width).min(self.len - self.index);
        let (whole, tail) = chunk.split_at(lanes * width);
        let dest = &mut out[self.index..self.index + lanes];
        match width {
            4 => {
                for (d, b) in dest.iter_mut().zip(whole.chunks_exact(4)) {
                    *d = u64::from(u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
                }
            }
            8 => {
                for (d, b) in dest.iter_mut().zip(whole.chunks_exact(8)) {
                    let mut w = [0u8; 8];
                    w.copy_from_slice(b);
                    *d = u64::from_le_bytes(w);
                }
            }
            _ => {
                for (d, b) in dest.iter_mut().zip(whole.chunks_exact(width)) {
                    let mut w = [0u8; 8];
                    w[..width].copy_from_slice(b);
                    *d = u64::from_le_bytes(w);
                }
            }
        }
        self.index += lanes;
        tail
    }

    /// Eight bytes at a time through the bit accumulator; returns the tail.
    ///
    /// The state lives in locals for the loop (the same steps as [`Unpacker::feed`]):
    /// through `&mut self` every step would go to memory.
    fn push_words<'c>(&mut self, chunk: &'c [u8], out: &mut [u64]) -> &'c [u8] {
        if self.ring.bits() <= 32 {
            return self.push_narrow_words(chunk, out);
        }
        let bits = self.ring.bits();
        let mask = self.ring.mask();
        let (mut acc, mut acc_bits, mut index) = (self.acc, self.acc_bits, self.index);
        let out = &mut out[..self.len];
        let mut words = chunk.chunks_exact(8);
        for w in &mut words {
            let mut b = [0u8; 8];
            b.copy_from_slice(w);
            acc |= u128::from(u64::from_le_bytes(b)) << acc_bits;
            acc_bits += 64;
            while acc_bits >= bits && index < out.len() {
                out[index] = (acc as u64) & mask;
                acc >>= bits;
                acc_bits -= bits;
                index += 1;
            }
        }
        (self.acc, self.acc_bits, self.index) = (acc, acc_bits, index);
        words.remainder()
    }

    /// [`Unpacker::push_words`] for r <= 32: four bytes at a time through a 64-bit
    /// accumulator, which holds fewer than r bits between words, so 32 more always fit and
    /// no 128-bit arithmetic is needed.
    fn push_narrow_words<'c>(&mut self, chunk: &'c [u8], out: &mut [u64]) -> &'c [u8] {
        let bits = self.ring.bits();
        let mask = self.ring.mask();
        // Fewer than r <= 32 bits are carried between calls, so the cast keeps them all.
        let (mut acc, mut acc_bits, mut index) = (self.acc as u64, self.acc_bits, self.index);
        let out = &mut out[..self.len];
        let mut words = chunk.chunks_exact(4);
        for w in &mut words {
            acc |= u64::from(u32::from_le_bytes([w[0], w[1], w[2], w[3]])) << acc_bits;
            acc_bits += 32;
            while acc_bits >= bits && index < out.len() {
                out[index] = acc & mask;
                acc >>= bits;
                acc_bits -= bits;
                index += 1;
            }
        }
        (self.acc, self.acc_bits, self.index) = (u128::from(acc), acc_bits, index);
        words.remainder()
    }

    /// Appends `n` bits (n <= 64) and emits every complete element. The accumulator holds
    /// fewer than r <= 64 bits between calls, so `acc_bits + n` never exceeds 128.
    fn feed(&mut self, value: u64, n: u32, out: &mut [u64]) {
        self.acc |= u128::from(value) << self.acc_bits;
        self.acc_bits += n;
        let bits = self.ring.bits();
        let mask = self.ring.mask();
        // Bits past the last element are padding, left in the accumulator for finish().
        while self.acc_bits >= bits && self.index < self.len {
            out[self.index] = (self.acc as u64) & mask;
            self.acc >>= bits;
            self.acc_bits -= bits;
            self.index += 1;
        }
    }

    /// Checks that the stream is complete and its padding zero.
    ///
    /// # Errors
    /// [`PayloadError::TooShort`] or [`PayloadError::NonzeroPadding`].
    pub fn finish(&self) -> Result<(), PayloadError> {
        if self.bytes_in != self.expected_bytes || self.index != self.len {
            return Err(PayloadError::TooShort {
                expected: self.expected_bytes,
                got: self.bytes_in,
            });
        }
        if self.acc != 0 {
            return Err(PayloadError::NonzeroPadding);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn values_for(bits: u32, seeds: &[u64]) -> Vec<u64> {
        let mask = Ring::new(bits).unwrap().mask();
        seeds.iter().map(|s| s & mask).collect()
    }

    proptest! {
        #[test]
        fn unpacks_what_the_protocol_packs_in_any_chunking(
            bits in 1u32..=64,
            seeds in proptest::collection::vec(any::<u64>(), 0..300),
            cuts in proptest::collection::vec(0usize..64, 0..12),
        ) {
            let ring = Ring::new(bits).unwrap();
            let values = values_for(bits, &seeds);
            let packed = fedmesh_protocol::codec::bitpack::pack(&values, bits).unwrap();
            prop_assert_eq!(&ring.pack(&values), &packed);

            let mut unpacker = Unpacker::new(ring, values.len()).unwrap();
            let mut out = vec![0u64; values.len()];
            let mut rest = packed.as_slice();
            for cut in cuts {
                let (head, tail) = rest.split_at(cut.min(rest.len()));
                unpacker.push(head, &mut out).unwrap();
                rest = tail;
            }
            unpacker.push(rest, &mut out).unwrap();
            unpacker.finish().unwrap();
            prop_assert_eq!(out, values);
        }
    }

    #[test]
    fn rejects_long_short_and_padded_streams() {
        let ring = Ring::new(3).unwrap();
        // 3 elements of 3 bits: 9 bits, 2 bytes, 7 padding bits.
        let mut out = [0u64; 3];
        let mut long = Unpacker::new(ring, 3).unwrap();
        assert!(matches!(
            long.push(&[0, 0, 0], &mut out),
            Err(PayloadError::TooLong { .. })
        ));

        let mut short = Unpacker::new(ring, 3).unwrap();
        short.push(&[0], &mut out).unwrap();
        assert!(matches!(
            short.finish(),
            Err(PayloadError::TooShort { got: 1, .. })
        ));

        let mut padded = Unpacker::new(ring, 3).unwrap();
        padded.push(&[0, 0b1000_0000], &mut out).unwrap();
        assert_eq!(padded.finish(), Err(PayloadError::NonzeroPadding));
    }

    #[test]
    fn ring_width_is_checked() {
        assert_eq!(Ring::new(0), Err(RingError(0)));
        assert_eq!(Ring::new(65), Err(RingError(65)));
        assert_eq!(Ring::new(64).unwrap().mask(), u64::MAX);
        assert_eq!(Ring::new(12).unwrap().mask(), 0xfff);
    }
}
