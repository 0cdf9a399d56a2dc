//! The framed wire format of an encoded update.
//!
//! # Layout
//!
//! A frame is a 48-byte header followed by the payload; integers are little-endian.
//!
//! | offset | size | field | meaning |
//! | --- | --- | --- | --- |
//! | 0 | 4 | magic | `FMUP` |
//! | 4 | 1 | version | 1 |
//! | 5 | 1 | stages | bit 0 top-k, bit 1 random-k (not both), bit 2 quantised, bit 3 zstd |
//! | 6 | 1 | quant bits | 1..=8 when quantised, else 0 |
//! | 7 | 1 | index bits | 1..=64 for top-k, else 0 |
//! | 8 | 8 | dimension | length of the dense update |
//! | 16 | 8 | count | values carried: the dimension when dense, else k <= dimension |
//! | 24 | 4 | block | values per quantisation block (>= 1) when quantised, else 0 |
//! | 28 | 4 | reserved | 0 |
//! | 32 | 8 | round | the random-k round, else 0 |
//! | 40 | 8 | body length | bytes of the body before zstd |
//!
//! The body is the concatenation of, in order: the top-k indices (gap-encoded, see
//! [`super::sparse`]); the quantisation scales (8 bytes per block, see [`super::quant`]);
//! the values (the quantised levels, or `f32` little-endian). The body length is implied by
//! the header and is checked against it. With the zstd stage the payload is one or more
//! zstd frames that decompress to exactly the body; otherwise the payload is the body.
//!
//! Decoding takes the dimension the receiver expects (it knows the model), so no length on
//! the wire can make the decoder allocate more than a small multiple of the model's size.

use super::{DecodeError, quant};
use crate::codec::bitpack;

/// The first bytes of every frame.
pub const MAGIC: [u8; 4] = *b"FMUP";
/// The frame version this code writes and reads.
pub const VERSION: u8 = 1;
/// Bytes in the frame header.
pub const HEADER_LEN: usize = 48;

const TOP_K: u8 = 1;
const RANDOM_K: u8 = 2;
const QUANTISED: u8 = 4;
const ZSTD: u8 = 8;

/// How an update chose the coordinates it carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Selection {
    /// Every coordinate, in order.
    Dense,
    /// The k largest in magnitude; their indices are in the body.
    TopK,
    /// k coordinates derived from the round's shared seed; no indices are sent.
    RandomK,
}

/// The stages applied to an update, in the order the encoder applies them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stages {
    /// Sparsification.
    pub selection: Selection,
    /// Whether the values are quantised.
    pub quantised: bool,
    /// Whether the body is zstd-compressed.
    pub zstd: bool,
}

impl Stages {
    fn to_bits(self) -> u8 {
        let selection = match self.selection {
            Selection::Dense => 0,
            Selection::TopK => TOP_K,
            Selection::RandomK => RANDOM_K,
        };
        selection | if self.quantised { QUANTISED } else { 0 } | if self.zstd { ZSTD } else { 0 }
    }

    fn from_bits(bits: u8) -> Result<Self, DecodeError> {
        let selection = match bits & (TOP_K | RANDOM_K) {
            0 => Selection::Dense,
            TOP_K => Selection::TopK,
            RANDOM_K => Selection::RandomK,
            _ => return Err(DecodeError::Stages { bits }),
        };
        if bits & !(TOP_K | RANDOM_K | QUANTISED | ZSTD) != 0 {
            return Err(DecodeError::Stages { bits });
        }
        Ok(Self {
            selection,
            quantised: bits & QUANTISED != 0,
            zstd: bits & ZSTD != 0,
        })
    }
}

/// An encoded update: the header fields and the payload, as on the wire.
///
/// Built by [`super::compress`] or by [`EncodedUpdate::decode`], which checks every header
/// field, so its fields are consistent with one another.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncodedUpdate {
    pub(super) stages: Stages,
    pub(super) quant_bits: u8,
    pub(super) index_bits: u8,
    pub(super) dim: u64,
    pub(super) count: u64,
    pub(super) block: u32,
    pub(super) round: u64,
    pub(super) body_len: u64,
    pub(super) payload: Vec<u8>,
}

/// Byte lengths of the body's sections, implied by the header.
pub(super) struct Sections {
    pub(super) indices: usize,
    pub(super) scales: usize,
    pub(super) values: usize,
}

impl Sections {
    pub(super) fn total(&self) -> Option<usize> {
        self.indices
            .checked_add(self.scales)?
            .checked_add(self.values)
    }
}

impl EncodedUpdate {
    /// The stages the encoder applied.
    pub fn stages(&self) -> Stages {
        self.stages
    }

    /// Length of the dense update.
    pub fn dim(&self) -> u64 {
        self.dim
    }

    /// Number of values carried.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// The random-k round, or 0.
    pub fn round(&self) -> u64 {
        self.round
    }

    /// Bytes of the payload (compressed, with the zstd stage).
    pub fn payload_len(&self) -> usize {
        self.payload.len()
    }

    /// The frame as bytes: header then payload.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_LEN + self.payload.len());
        out.extend_from_slice(&MAGIC);
        out.push(VERSION);
        out.push(self.stages.to_bits());
        out.push(self.quant_bits);
        out.push(self.index_bits);
        out.extend_from_slice(&self.dim.to_le_bytes());
        out.extend_from_slice(&self.count.to_le_bytes());
        out.extend_from_slice(&self.block.to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
        out.extend_from_slice(&self.round.to_le_bytes());
        out.extend_from_slice(&self.body_len.to_le_bytes());
        out.extend_from_slice(&self.payload);
        out
    }

    /// Parses a frame and checks its header against itself and against the dimension the
    /// receiver expects. The payload's content is checked by [`super::decompress`].
    ///
    /// # Errors
    ///
    /// A [`DecodeError`] naming the first header field that is wrong: a short header, the
    /// magic, version, stages, bit widths, dimension, count, block, reserved bytes, body
    /// length, or (without zstd) a payload whose length is not the body length.
    pub fn decode(bytes: &[u8], expected_dim: usize) -> Result<Self, DecodeError> {
        let Some((header, payload)) = bytes.split_first_chunk::<HEADER_LEN>() else {
            return Err(DecodeError::Header { len: bytes.len() });
        };
        let u32_at = |at: usize| {
            u32::from_le_bytes([header[at], header[at + 1], header[at + 2], header[at + 3]])
        };
        let u64_at = |at: usize| u64::from(u32_at(at)) | u64::from(u32_at(at + 4)) << 32;

        // 1. Identity of the format.
        if header[0..4] != MAGIC {
            return Err(DecodeError::Magic);
        }
        if header[4] != VERSION {
            return Err(DecodeError::Version { found: header[4] });
        }
        let frame = Self {
            stages: Stages::from_bits(header[5])?,
            quant_bits: header[6],
            index_bits: header[7],
            dim: u64_at(8),
            count: u64_at(16),
            block: u32_at(24),
            round: u64_at(32),
            body_len: u64_at(40),
            payload: payload.to_vec(),
        };
        if u32_at(28) != 0 {
            return Err(DecodeError::Reserved);
        }

        // 2. Each field against the stages and the expected dimension.
        frame.check_fields(expected_dim)?;

        // 3. The body length the header implies, and the payload against it.
        let implied = frame
            .sections()
            .total()
            .ok_or(DecodeError::Count { count: frame.count })?;
        if frame.body_len != implied as u64 {
            return Err(DecodeError::BodyLength {
                expected: implied,
                found: frame.body_len,
            });
        }
        if !frame.stages.zstd && frame.payload.len() != implied {
            return Err(DecodeError::PayloadLength {
                expected: implied,
                found: frame.payload.len(),
            });
        }
        Ok(frame)
    }

    fn check_fields(&self, expected_dim: usize) -> Result<(), DecodeError> {
        if self.dim != expected_dim as u64 {
            return Err(DecodeError::Dimension {
                expected: expected_dim,
                found: self.dim,
            });
        }
        let count_ok = match self.stages.selection {
            Selection::Dense => self.count == self.dim,
            Selection::TopK | Selection::RandomK => self.count <= self.dim,
        };
        if !count_ok {
            return Err(DecodeError::Count { count: self.count });
        }

        let quant_ok = match self.stages.quantised {
            true => (1..=8).contains(&self.quant_bits) && self.block >= 1,
            false => self.quant_bits == 0 && self.block == 0,
        };
        if !quant_ok {
            return Err(DecodeError::Quantisation {
                bits: self.quant_bits,
                block: self.block,
            });
        }

        let index_ok = match self.stages.selection {
            Selection::TopK => (1..=64).contains(&self.index_bits),
            _ => self.index_bits == 0,
        };
        if !index_ok {
            return Err(DecodeError::IndexBits {
                bits: self.index_bits,
            });
        }
        if self.stages.selection != Selection::RandomK && self.round != 0 {
            return Err(DecodeError::Round {
                expected: 0,
                found: self.round,
            });
        }
        Ok(())
    }

    /// Section lengths; `check_fields` has bounded the count by the expected dimension, so
    /// only the bit-packed lengths can overflow, and those report `usize::MAX`.
    pub(super) fn sections(&self) -> Sections {
        let count = self.count as usize;
        let packed = |bits: u8| bitpack::packed_len(count, u32::from(bits)).unwrap_or(usize::MAX);
        let indices = match self.stages.selection {
            Selection::TopK => packed(self.index_bits),
            _ => 0,
        };
        let (scales, values) = match self.stages.quantised {
            true => (
                quant::block_count(count, self.block as usize).saturating_mul(quant::SCALE_LEN),
                quant::levels_len(count, self.quant_bits).unwrap_or(usize::MAX),
            ),
            false => (0, count.saturating_mul(4)),
        };
        Sections {
            indices,
            scales,
            values,
        }
    }
}
