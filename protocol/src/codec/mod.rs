//! Update codecs: how a store shrinks an update before it leaves the store, and how the
//! receiver turns the bytes back into a dense update.
//!
//! [`compress`] applies up to three stages, in this order, and [`decompress`] undoes them:
//!
//! 1. **selection** ([`Selection`]): every coordinate, the top k by magnitude (indices
//!    sent, gap-encoded and bit-packed), or random k from a seed shared by the round
//!    (indices derived, not sent; see [`sparse`]);
//! 2. **quantisation** ([`quant`]): stochastic, unbiased rounding to `bits`-bit levels
//!    per block, each value within one quantisation step of its input;
//! 3. **entropy coding**: zstd over the whole body.
//!
//! The result is an [`EncodedUpdate`], whose [`EncodedUpdate::encode`] gives the framed
//! bytes (the layout is documented in the [`frame`] module) and whose
//! [`EncodedUpdate::decode`] parses them. Bytes on the wire are attacker input: every
//! malformed frame is a [`DecodeError`] naming the field, never a panic, and no length on
//! the wire can make the decoder allocate more than a small multiple of the model's size.
//!
//! # Error feedback
//!
//! What sparsification drops and quantisation rounds off is not lost if the store keeps a
//! [`Residual`]: [`compress`] adds it to the update before encoding and stores back the
//! difference between that sum and what the receiver will decode. Over rounds, the sum of
//! everything decoded plus the final residual equals the sum of the updates.
//!
//! Random-k decoding leaves the unsent coordinates at zero and does not rescale by
//! `dim / k`; a receiver that wants an unbiased estimate of one update scales itself.
//!
//! [`bitpack`] is also used on its own, by secure aggregation, for ring elements.

pub mod bitpack;
pub mod frame;
pub mod quant;
pub mod sparse;

use std::borrow::Cow;

use thiserror::Error;

pub use frame::{EncodedUpdate, Selection, Stages};
pub use sparse::SharedSeed;

use frame::Sections;

/// Values per quantisation block when the caller has no reason to choose another: the
/// scales then cost 8 bytes per 1024 values (under 1% at 8 bits).
pub const DEFAULT_BLOCK: u32 = 1024;

/// Which coordinates an update carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sparsify {
    /// All of them.
    Dense,
    /// The `k` largest in magnitude (after adding the residual).
    TopK {
        /// Coordinates to send.
        k: usize,
    },
    /// `k` coordinates chosen by the round's shared seed; the indices are not sent.
    RandomK {
        /// Coordinates to send.
        k: usize,
        /// The seed every store of the round and the receiver share.
        shared: SharedSeed,
    },
}

/// Stochastic quantisation settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quantise {
    /// Bits per level, 1..=8.
    pub bits: u8,
    /// Values per block sharing one offset and step, >= 1.
    pub block: u32,
    /// Seed of the rounding dither; use a fresh one for every update.
    pub seed: [u8; 32],
}

impl Quantise {
    /// 8-bit levels in blocks of [`DEFAULT_BLOCK`].
    pub fn eight_bit(seed: [u8; 32]) -> Self {
        Self {
            bits: 8,
            block: DEFAULT_BLOCK,
            seed,
        }
    }
}

/// Which stages [`compress`] applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CodecConfig {
    /// Selection of coordinates.
    pub sparsify: Sparsify,
    /// Quantisation of the selected values, if any.
    pub quantise: Option<Quantise>,
    /// zstd level for entropy coding of the body, if any.
    pub zstd_level: Option<i32>,
}

/// What [`decompress`] needs besides the bytes: facts the receiver knows from the plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodeParams {
    /// The length of the dense update, from the model's layout.
    pub dim: usize,
    /// The round's random-k seed, required for random-k updates.
    pub shared: Option<SharedSeed>,
}

/// The part of past updates that has not been sent yet, carried by a store from one round
/// to the next.
#[derive(Debug, Clone, PartialEq)]
pub struct Residual {
    values: Vec<f32>,
}

impl Residual {
    /// A zero residual for updates of length `dim`.
    pub fn new(dim: usize) -> Self {
        Self {
            values: vec![0.0; dim],
        }
    }

    /// The residual's values, for a store to persist between rounds.
    pub fn values(&self) -> &[f32] {
        &self.values
    }

    /// Restores a residual a store persisted.
    pub fn from_values(values: Vec<f32>) -> Self {
        Self { values }
    }
}

/// Why an update could not be encoded.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum EncodeError {
    /// An input value (or the input plus the residual) is NaN or infinite.
    #[error("value at index {index} is not finite ({value})")]
    NonFinite {
        /// Position in the update.
        index: usize,
        /// The value.
        value: f32,
    },
    /// The residual's length differs from the update's.
    #[error("residual has {residual} values, the update has {update}")]
    ResidualLength {
        /// Length of the update.
        update: usize,
        /// Length of the residual.
        residual: usize,
    },
    /// `k` is larger than the update.
    #[error("k = {k} is larger than the dimension {dim}")]
    K {
        /// The k asked for.
        k: usize,
        /// The update's length.
        dim: usize,
    },
    /// Quantisation settings are out of range.
    #[error("quantisation needs 1..=8 bits and a block of at least 1, got {bits} and {block}")]
    Quantisation {
        /// Bits asked for.
        bits: u8,
        /// Block asked for.
        block: u32,
    },
    /// A block's values span so much of the `f32` range that its top level overflows.
    #[error("block {block} spans too wide a range to quantise")]
    QuantRange {
        /// The block's index.
        block: usize,
    },
    /// zstd failed.
    #[error("zstd compression failed: {0}")]
    Zstd(String),
}

/// Why bytes could not be decoded into an update. Each variant names the field at fault.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum DecodeError {
    /// Fewer bytes than a header.
    #[error(
        "frame of {len} bytes is shorter than the {} byte header",
        frame::HEADER_LEN
    )]
    Header {
        /// Bytes present.
        len: usize,
    },
    /// The magic is not `FMUP`.
    #[error("magic is not FMUP")]
    Magic,
    /// An unknown version.
    #[error("version {found} is not supported")]
    Version {
        /// The version on the wire.
        found: u8,
    },
    /// Unknown stage bits, or both top-k and random-k.
    #[error("stages byte {bits:#04x} has unknown or conflicting bits")]
    Stages {
        /// The stages byte.
        bits: u8,
    },
    /// The reserved bytes are not zero.
    #[error("reserved field is not zero")]
    Reserved,
    /// The dimension is not the receiver's.
    #[error("dimension {found} differs from the expected {expected}")]
    Dimension {
        /// The dimension the receiver knows.
        expected: usize,
        /// The dimension on the wire.
        found: u64,
    },
    /// The count does not fit the selection and dimension.
    #[error("count {count} does not fit the selection and dimension")]
    Count {
        /// The count on the wire.
        count: u64,
    },
    /// The quantisation bits or block are out of range, or set without quantisation.
    #[error("quantisation field has bits {bits} and block {block}, out of range")]
    Quantisation {
        /// The quantisation bits on the wire.
        bits: u8,
        /// The block on the wire.
        block: u32,
    },
    /// The index width is out of range, or set without top-k.
    #[error("index bits {bits} out of range for the stages")]
    IndexBits {
        /// The index width on the wire.
        bits: u8,
    },
    /// The round is not the one the receiver decodes.
    #[error("round {found} differs from the expected {expected}")]
    Round {
        /// The round the receiver expects.
        expected: u64,
        /// The round on the wire.
        found: u64,
    },
    /// A random-k update arrived but the receiver has no shared seed.
    #[error("random-k update needs the round's shared seed")]
    MissingSeed,
    /// The declared body length is not the one the header implies.
    #[error("body length {found} differs from the {expected} bytes the header implies")]
    BodyLength {
        /// Bytes the header implies.
        expected: usize,
        /// The body length on the wire.
        found: u64,
    },
    /// An uncompressed payload's length is not the body length.
    #[error("payload has {found} bytes, the header implies {expected}")]
    PayloadLength {
        /// Bytes the header implies.
        expected: usize,
        /// Bytes present.
        found: usize,
    },
    /// The zstd payload is corrupt, or decompresses to more than the declared body length.
    #[error("zstd payload is corrupt or larger than the declared body: {0}")]
    Zstd(String),
    /// The zstd payload decompresses to fewer bytes than the declared body length.
    #[error("zstd payload decompressed to {found} bytes, the body length is {expected}")]
    Decompressed {
        /// The declared body length.
        expected: usize,
        /// Bytes decompressed.
        found: usize,
    },
    /// A bit-packed section is malformed.
    #[error("{field} section: {source}")]
    Bitpack {
        /// `indices` or `levels`.
        field: &'static str,
        /// What was wrong with it.
        source: bitpack::BitpackError,
    },
    /// A top-k index is at or past the dimension.
    #[error("index at position {position} is not below the dimension {dim}")]
    IndexOutOfRange {
        /// Position in the index list.
        position: usize,
        /// The dimension.
        dim: usize,
    },
    /// A top-k index repeats the one before it (a zero gap).
    #[error("index {index} at position {position} is repeated")]
    RepeatedIndex {
        /// Position in the index list.
        position: usize,
        /// The repeated index.
        index: u64,
    },
    /// A block's offset or step is NaN, infinite, negative, or decodes out of range.
    #[error("block {block} has an invalid {field} ({value})")]
    Scale {
        /// The block's index.
        block: usize,
        /// `offset` or `step`.
        field: &'static str,
        /// The value on the wire.
        value: f32,
    },
    /// An unquantised value is NaN or infinite.
    #[error("value at position {position} is not finite ({value})")]
    Value {
        /// Position among the values carried.
        position: usize,
        /// The value on the wire.
        value: f32,
    },
}

/// Encodes an update through the stages of `config`.
///
/// With a residual, the residual is added to the update first and afterwards holds what
/// the receiver will not see: that sum minus the decoded update.
///
/// # Errors
///
/// [`EncodeError`] for non-finite input, a residual of the wrong length, `k` larger than
/// the update, quantisation settings out of range, or a zstd failure. The residual is
/// unchanged on error.
pub fn compress(
    update: &[f32],
    config: &CodecConfig,
    residual: Option<&mut Residual>,
) -> Result<EncodedUpdate, EncodeError> {
    let dim = update.len();
    check_config(config, dim)?;
    check_finite(update)?;

    // 1. Error feedback: encode the update plus what earlier rounds left unsent.
    let corrected: Cow<'_, [f32]> = match &residual {
        Some(r) if r.values.len() != dim => {
            return Err(EncodeError::ResidualLength {
                update: dim,
                residual: r.values.len(),
            });
        }
        Some(r) => {
            let sum: Vec<f32> = update.iter().zip(&r.values).map(|(u, r)| u + r).collect();
            check_finite(&sum)?;
            Cow::Owned(sum)
        }
        None => Cow::Borrowed(update),
    };

    // 2. Selection.
    let (indices, round) = match config.sparsify {
        Sparsify::Dense => (None, 0),
        Sparsify::TopK { k } => (Some(sparse::top_k_indices(&corrected, k)), 0),
        Sparsify::RandomK { k, shared } => (
            Some(sparse::random_k_indices(&shared, dim, k)),
            shared.round.0,
        ),
    };
    let selected: Cow<'_, [f32]> = match &indices {
        Some(idx) => Cow::Owned(idx.iter().map(|&i| corrected[i]).collect()),
        None => Cow::Borrowed(&corrected),
    };

    // 3. The body: indices, then scales and levels or raw values.
    let mut body = Vec::with_capacity(selected.len() * 4 + 64);
    let mut index_bits = 0;
    if let (Sparsify::TopK { .. }, Some(idx)) = (config.sparsify, &indices) {
        index_bits = sparse::encode_indices(idx, &mut body);
    }
    // With a residual, keep what the receiver will reconstruct of the selected values.
    let mut sent = residual
        .as_ref()
        .map(|_| Vec::with_capacity(selected.len()));
    match config.quantise {
        Some(q) => quant::encode_into(
            &selected,
            q.bits,
            q.block as usize,
            q.seed,
            &mut body,
            sent.as_mut(),
        )
        .map_err(|block| EncodeError::QuantRange { block })?,
        None => {
            body.reserve(selected.len() * 4);
            selected
                .iter()
                .for_each(|x| body.extend_from_slice(&x.to_le_bytes()));
            if let Some(sent) = sent.as_mut() {
                sent.extend_from_slice(&selected);
            }
        }
    }

    // 4. Entropy coding.
    let body_len = body.len() as u64;
    let payload = match config.zstd_level {
        Some(level) => {
            zstd::bulk::compress(&body, level).map_err(|e| EncodeError::Zstd(e.to_string()))?
        }
        None => body,
    };

    // 5. The residual keeps everything the receiver will not reconstruct.
    if let (Some(r), Some(sent)) = (residual, sent) {
        r.values.copy_from_slice(&corrected);
        match &indices {
            Some(idx) => idx.iter().zip(&sent).for_each(|(&i, s)| r.values[i] -= s),
            None => r.values.iter_mut().zip(&sent).for_each(|(v, s)| *v -= s),
        }
    }

    Ok(EncodedUpdate {
        stages: Stages {
            selection: match config.sparsify {
                Sparsify::Dense => Selection::Dense,
                Sparsify::TopK { .. } => Selection::TopK,
                Sparsify::RandomK { .. } => Selection::RandomK,
            },
            quantised: config.quantise.is_some(),
            zstd: config.zstd_level.is_some(),
        },
        quant_bits: config.quantise.map_or(0, |q| q.bits),
        index_bits,
        dim: dim as u64,
        count: selected.len() as u64,
        block: config.quantise.map_or(0, |q| q.block),
        round,
        body_len,
        payload,
    })
}

/// Decodes an update into a dense vector of `params.dim` values; unsent coordinates are 0.
///
/// # Errors
///
/// [`DecodeError`] naming the field at fault: a dimension other than the receiver's, a
/// random-k update without the shared seed or for another round, a corrupt zstd payload or
/// one larger than declared, malformed or out-of-range indices, an invalid scale, or a
/// non-finite value.
pub fn decompress(frame: &EncodedUpdate, params: &DecodeParams) -> Result<Vec<f32>, DecodeError> {
    let dim = params.dim;
    if frame.dim != dim as u64 {
        return Err(DecodeError::Dimension {
            expected: dim,
            found: frame.dim,
        });
    }
    let sections = frame.sections();
    let expected = sections
        .total()
        .ok_or(DecodeError::Count { count: frame.count })?;
    let count = frame.count as usize;

    // 1. The body, with zstd bounded by the length the header implies.
    let body: Cow<'_, [u8]> = if frame.stages.zstd {
        let body = zstd::bulk::decompress(&frame.payload, expected)
            .map_err(|e| DecodeError::Zstd(e.to_string()))?;
        if body.len() != expected {
            return Err(DecodeError::Decompressed {
                expected,
                found: body.len(),
            });
        }
        Cow::Owned(body)
    } else if frame.payload.len() != expected {
        return Err(DecodeError::PayloadLength {
            expected,
            found: frame.payload.len(),
        });
    } else {
        Cow::Borrowed(&frame.payload)
    };
    let Sections {
        indices: idx_len,
        scales: scale_len,
        ..
    } = sections;
    let (idx_bytes, rest) = body.split_at(idx_len);
    let (scale_bytes, value_bytes) = rest.split_at(scale_len);

    // 2. Which coordinates the values belong to.
    let indices = match frame.stages.selection {
        Selection::Dense => None,
        Selection::TopK => Some(sparse::decode_indices(
            idx_bytes,
            frame.index_bits,
            count,
            dim,
        )?),
        Selection::RandomK => {
            let shared = params.shared.ok_or(DecodeError::MissingSeed)?;
            if shared.round.0 != frame.round {
                return Err(DecodeError::Round {
                    expected: shared.round.0,
                    found: frame.round,
                });
            }
            Some(sparse::random_k_indices(&shared, dim, count))
        }
    };

    // 3. The values.
    let values = if frame.stages.quantised {
        let block = frame.block as usize;
        quant::decode(scale_bytes, value_bytes, count, frame.quant_bits, block)?
    } else {
        raw_values(value_bytes)?
    };

    // 4. Scatter into the dense update.
    Ok(match indices {
        None => values,
        Some(idx) => {
            let mut dense = vec![0.0; dim];
            idx.iter().zip(&values).for_each(|(&i, &v)| dense[i] = v);
            dense
        }
    })
}

fn raw_values(bytes: &[u8]) -> Result<Vec<f32>, DecodeError> {
    let values: Vec<f32> = bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    match values.iter().position(|v| !v.is_finite()) {
        Some(position) => Err(DecodeError::Value {
            position,
            value: values[position],
        }),
        None => Ok(values),
    }
}

fn check_config(config: &CodecConfig, dim: usize) -> Result<(), EncodeError> {
    match config.sparsify {
        Sparsify::TopK { k } | Sparsify::RandomK { k, .. } if k > dim => {
            return Err(EncodeError::K { k, dim });
        }
        _ => {}
    }
    if let Some(q) = config.quantise
        && (!(1..=8).contains(&q.bits) || q.block == 0)
    {
        return Err(EncodeError::Quantisation {
            bits: q.bits,
            block: q.block,
        });
    }
    Ok(())
}

fn check_finite(values: &[f32]) -> Result<(), EncodeError> {
    match values.iter().position(|x| !x.is_finite()) {
        Some(index) => Err(EncodeError::NonFinite {
            index,
            value: values[index],
        }),
        None => Ok(()),
    }
}
