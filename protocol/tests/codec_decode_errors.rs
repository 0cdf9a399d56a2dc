//! Decoding attacker bytes: every malformed frame is an error naming the field, never a
//! panic, and no length on the wire makes the decoder allocate beyond the model's size.

use fedmesh_protocol::codec::bitpack;
use fedmesh_protocol::codec::{
    CodecConfig, DecodeError, DecodeParams, EncodedUpdate, Quantise, SharedSeed, Sparsify,
    compress, decompress,
};
use fedmesh_protocol::ids::RoundId;
use proptest::prelude::*;

const SHARED: SharedSeed = SharedSeed {
    seed: [9; 32],
    round: RoundId(3),
};

fn params(dim: usize) -> DecodeParams {
    DecodeParams {
        dim,
        shared: Some(SHARED),
    }
}

fn decode(bytes: &[u8], dim: usize) -> Result<Vec<f32>, DecodeError> {
    decompress(&EncodedUpdate::decode(bytes, dim)?, &params(dim))
}

/// A header laid out as the frame module documents it.
#[allow(clippy::too_many_arguments)]
fn header(
    stages: u8,
    qbits: u8,
    ibits: u8,
    dim: u64,
    count: u64,
    block: u32,
    body: u64,
) -> Vec<u8> {
    let mut h = b"FMUP".to_vec();
    h.extend([1, stages, qbits, ibits]);
    h.extend(dim.to_le_bytes());
    h.extend(count.to_le_bytes());
    h.extend(block.to_le_bytes());
    h.extend(0u32.to_le_bytes());
    h.extend(0u64.to_le_bytes());
    h.extend(body.to_le_bytes());
    h
}

fn f32s(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// Every combination of stages, on a small update.
fn all_configs() -> Vec<CodecConfig> {
    let mut out = Vec::new();
    for sparsify in [
        Sparsify::Dense,
        Sparsify::TopK { k: 5 },
        Sparsify::RandomK {
            k: 5,
            shared: SHARED,
        },
    ] {
        for quantise in [
            None,
            Some(Quantise {
                bits: 5,
                block: 4,
                seed: [1; 32],
            }),
        ] {
            for zstd_level in [None, Some(1)] {
                out.push(CodecConfig {
                    sparsify,
                    quantise,
                    zstd_level,
                });
            }
        }
    }
    out
}

fn sample_update() -> Vec<f32> {
    (0..20).map(|i| (i as f32 - 7.5) * 0.3).collect()
}

#[test]
fn every_truncation_of_a_valid_frame_is_an_error() {
    let u = sample_update();
    for config in all_configs() {
        let bytes = compress(&u, &config, None).unwrap().encode();
        assert!(decode(&bytes, u.len()).is_ok());
        for cut in 0..bytes.len() {
            assert!(
                decode(&bytes[..cut], u.len()).is_err(),
                "{config:?} cut at {cut}"
            );
        }
    }
}

proptest! {
    #[test]
    fn random_bytes_never_panic(
        bytes in prop::collection::vec(any::<u8>(), 0..200),
        dim in 0usize..64,
    ) {
        let _ = decode(&bytes, dim);
    }

    #[test]
    fn random_bodies_behind_a_valid_header_never_panic(
        config in prop::sample::select(all_configs()),
        body in prop::collection::vec(any::<u8>(), 0..200),
    ) {
        // Keep a real header so decoding gets past the header checks into the sections.
        let u = sample_update();
        let mut bytes = compress(&u, &config, None).unwrap().encode();
        bytes.truncate(48);
        bytes.extend(body);
        let _ = decode(&bytes, u.len());
    }

    #[test]
    fn corrupted_frames_never_panic(
        config in prop::sample::select(all_configs()),
        flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
    ) {
        let u = sample_update();
        let mut bytes = compress(&u, &config, None).unwrap().encode();
        for (at, value) in flips {
            let i = at.index(bytes.len());
            bytes[i] = value;
        }
        if let Ok(out) = decode(&bytes, u.len()) {
            // Whatever decodes is a finite update of the expected length.
            prop_assert_eq!(out.len(), u.len());
            prop_assert!(out.iter().all(|x| x.is_finite()));
        }
    }
}

#[test]
fn rejects_wrong_magic_version_stages_and_reserved_bytes() {
    let good = header(0, 0, 0, 1, 1, 0, 4)
        .into_iter()
        .chain(f32s(&[1.0]))
        .collect::<Vec<_>>();
    assert_eq!(decode(&good, 1).unwrap(), [1.0]);

    let mut bad = good.clone();
    bad[0] = b'X';
    assert_eq!(decode(&bad, 1), Err(DecodeError::Magic));

    let mut bad = good.clone();
    bad[4] = 2;
    assert_eq!(decode(&bad, 1), Err(DecodeError::Version { found: 2 }));

    // Top-k and random-k together, then an undefined bit.
    for stages in [0b11, 0b1_0000] {
        let mut bad = good.clone();
        bad[5] = stages;
        assert_eq!(decode(&bad, 1), Err(DecodeError::Stages { bits: stages }));
    }

    let mut bad = good.clone();
    bad[30] = 1;
    assert_eq!(decode(&bad, 1), Err(DecodeError::Reserved));

    assert_eq!(decode(&good[..47], 1), Err(DecodeError::Header { len: 47 }));
}

#[test]
fn rejects_lengths_that_disagree_with_the_header() {
    // Dense with count != dim, and a dimension other than the receiver's.
    let bytes = [header(0, 0, 0, 2, 1, 0, 4), f32s(&[1.0])].concat();
    assert_eq!(decode(&bytes, 2), Err(DecodeError::Count { count: 1 }));
    let bytes = [header(0, 0, 0, 2, 2, 0, 8), f32s(&[1.0, 2.0])].concat();
    assert_eq!(
        decode(&bytes, 3),
        Err(DecodeError::Dimension {
            expected: 3,
            found: 2
        })
    );

    // A declared body length far beyond what dim and count imply is refused before any
    // allocation; so is a payload of the wrong length.
    let bytes = header(0, 0, 0, 2, 2, 0, u64::MAX);
    assert_eq!(
        decode(&bytes, 2),
        Err(DecodeError::BodyLength {
            expected: 8,
            found: u64::MAX
        })
    );
    let bytes = [header(0, 0, 0, 2, 2, 0, 8), f32s(&[1.0])].concat();
    assert_eq!(
        decode(&bytes, 2),
        Err(DecodeError::PayloadLength {
            expected: 8,
            found: 4
        })
    );

    // A huge count with top-k is bounded by the expected dimension.
    let bytes = header(1, 0, 64, 10, u64::MAX, 0, 0);
    assert_eq!(
        decode(&bytes, 10),
        Err(DecodeError::Count { count: u64::MAX })
    );
}

#[test]
fn rejects_a_zstd_bomb_larger_than_the_declared_body() {
    // The header declares 2 f32 values (8 bytes); the zstd payload holds 1 MiB of zeros.
    let bomb = zstd::bulk::compress(&vec![0u8; 1 << 20], 19).unwrap();
    let bytes = [header(0b1000, 0, 0, 2, 2, 0, 8), bomb].concat();
    assert!(matches!(decode(&bytes, 2), Err(DecodeError::Zstd(_))));

    // And one that is smaller than declared.
    let short = zstd::bulk::compress(&[0u8; 4], 1).unwrap();
    let bytes = [header(0b1000, 0, 0, 2, 2, 0, 8), short].concat();
    assert!(decode(&bytes, 2).is_err());
}

#[test]
fn rejects_repeated_and_out_of_range_indices() {
    // Top-k, dim 10, 3 indices as gaps at 4 bits: 1, 0 (repeats index 1), 2.
    let gaps = bitpack::pack(&[1, 0, 2], 4).unwrap();
    let body = [gaps, f32s(&[1.0, 2.0, 3.0])].concat();
    let bytes = [header(1, 0, 4, 10, 3, 0, body.len() as u64), body].concat();
    assert_eq!(
        decode(&bytes, 10),
        Err(DecodeError::RepeatedIndex {
            position: 1,
            index: 1
        })
    );

    // Gaps 3, 4, 5 reach index 12, past the dimension 10.
    let gaps = bitpack::pack(&[3, 4, 5], 4).unwrap();
    let body = [gaps, f32s(&[1.0, 2.0, 3.0])].concat();
    let bytes = [header(1, 0, 4, 10, 3, 0, body.len() as u64), body].concat();
    assert_eq!(
        decode(&bytes, 10),
        Err(DecodeError::IndexOutOfRange {
            position: 2,
            dim: 10
        })
    );

    // Gaps 3, 4, 1 are indices 3, 7, 8: accepted and scattered.
    let gaps = bitpack::pack(&[3, 4, 1], 4).unwrap();
    let body = [gaps, f32s(&[1.0, 2.0, 3.0])].concat();
    let bytes = [header(1, 0, 4, 10, 3, 0, body.len() as u64), body].concat();
    let out = decode(&bytes, 10).unwrap();
    assert_eq!(
        (out[3], out[7], out[8], out.iter().sum::<f32>()),
        (1.0, 2.0, 3.0, 6.0)
    );
}

#[test]
fn rejects_nan_scales_and_values() {
    // Dense, quantised at 8 bits in one block of 2: offset, step, then 2 levels.
    let quantised = |lo: f32, step: f32| {
        let body = [f32s(&[lo, step]), vec![0, 255]].concat();
        [header(0b100, 8, 0, 2, 2, 2, body.len() as u64), body].concat()
    };
    // Levels 0 and 255 decode to -1 + 0 * 0.5 = -1 and -1 + 255 * 0.5 = 126.5.
    assert_eq!(decode(&quantised(-1.0, 0.5), 2).unwrap(), [-1.0, 126.5]);
    assert!(matches!(
        decode(&quantised(f32::NAN, 0.5), 2),
        Err(DecodeError::Scale {
            block: 0,
            field: "offset",
            ..
        })
    ));
    assert!(matches!(
        decode(&quantised(0.0, f32::NAN), 2),
        Err(DecodeError::Scale {
            block: 0,
            field: "step",
            ..
        })
    ));
    assert!(matches!(
        decode(&quantised(0.0, -1.0), 2),
        Err(DecodeError::Scale { field: "step", .. })
    ));
    // Finite, but the top level 255 * 1e37 overflows f32.
    assert!(matches!(
        decode(&quantised(0.0, 1e37), 2),
        Err(DecodeError::Scale { .. })
    ));

    let bytes = [header(0, 0, 0, 2, 2, 0, 8), f32s(&[1.0, f32::INFINITY])].concat();
    assert!(matches!(
        decode(&bytes, 2),
        Err(DecodeError::Value { position: 1, .. })
    ));
}

#[test]
fn rejects_random_k_without_the_seed_or_for_another_round() {
    let u = sample_update();
    let config = CodecConfig {
        sparsify: Sparsify::RandomK {
            k: 5,
            shared: SHARED,
        },
        quantise: None,
        zstd_level: None,
    };
    let frame = compress(&u, &config, None).unwrap();
    let none = DecodeParams {
        dim: u.len(),
        shared: None,
    };
    assert_eq!(decompress(&frame, &none), Err(DecodeError::MissingSeed));
    let later = DecodeParams {
        dim: u.len(),
        shared: Some(SharedSeed {
            round: RoundId(4),
            ..SHARED
        }),
    };
    assert_eq!(
        decompress(&frame, &later),
        Err(DecodeError::Round {
            expected: 4,
            found: 3
        })
    );
}

#[test]
fn rejects_nonzero_padding_in_packed_levels() {
    // 3 levels of 5 bits use 15 bits of 2 bytes; the top bit of byte 2 is padding.
    let mut levels = bitpack::pack(&[1, 2, 3], 5).unwrap();
    levels[1] |= 0x80;
    let body = [f32s(&[0.0, 1.0]), levels].concat();
    let bytes = [header(0b100, 5, 0, 3, 3, 4, body.len() as u64), body].concat();
    assert!(matches!(
        decode(&bytes, 3),
        Err(DecodeError::Bitpack {
            field: "levels",
            ..
        })
    ));
}
