//! Every codec decodes what it encodes, within its stated error bound, and error feedback
//! keeps what a round did not send.

use fedmesh_protocol::codec::{
    CodecConfig, DecodeParams, EncodedUpdate, Quantise, Residual, Selection, SharedSeed, Sparsify,
    compress, decompress, sparse,
};
use fedmesh_protocol::ids::RoundId;
use proptest::prelude::*;

fn config(sparsify: Sparsify, quantise: Option<Quantise>, zstd: bool) -> CodecConfig {
    CodecConfig {
        sparsify,
        quantise,
        zstd_level: zstd.then_some(3),
    }
}

fn shared(round: u64) -> SharedSeed {
    SharedSeed {
        seed: [42; 32],
        round: RoundId(round),
    }
}

/// Encodes, sends through bytes, and decodes.
fn round_trip(update: &[f32], config: &CodecConfig, residual: Option<&mut Residual>) -> Vec<f32> {
    let frame = compress(update, config, residual).unwrap();
    let bytes = frame.encode();
    let params = DecodeParams {
        dim: update.len(),
        shared: Some(shared(7)),
    };
    let parsed = EncodedUpdate::decode(&bytes, update.len()).unwrap();
    assert_eq!(parsed, frame);
    decompress(&parsed, &params).unwrap()
}

fn update_strategy() -> impl Strategy<Value = Vec<f32>> {
    prop::collection::vec(-1e3f32..1e3, 0..300)
}

/// The bound of the quant module: within one step of the block's range over `2^bits - 1`,
/// plus `f32` rounding of `lo + q * step`.
fn assert_within_one_step(input: &[f32], output: &[f32], bits: u8, block: usize) {
    let top = f64::from((1u32 << bits) - 1);
    for (xs, ys) in input.chunks(block).zip(output.chunks(block)) {
        let lo = xs.iter().fold(f32::INFINITY, |a, &b| a.min(b));
        let hi = xs.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
        let step = (f64::from(hi) - f64::from(lo)) / top;
        let rounding = 4.0 * f64::from(f32::EPSILON) * f64::from(lo.abs().max(hi.abs()));
        for (&x, &y) in xs.iter().zip(ys) {
            let err = (f64::from(x) - f64::from(y)).abs();
            assert!(
                err <= step * (1.0 + 1e-6) + rounding,
                "{x} -> {y}, step {step}"
            );
        }
    }
}

proptest! {
    #[test]
    fn dense_codecs_decode_exactly(u in update_strategy(), zstd in any::<bool>()) {
        prop_assert_eq!(round_trip(&u, &config(Sparsify::Dense, None, zstd), None), u);
    }

    #[test]
    fn quantised_values_are_within_one_step(
        u in update_strategy(),
        bits in 1u8..=8,
        block in 1u32..100,
        seed in any::<[u8; 32]>(),
        zstd in any::<bool>(),
    ) {
        let q = Quantise { bits, block, seed };
        let out = round_trip(&u, &config(Sparsify::Dense, Some(q), zstd), None);
        prop_assert_eq!(out.len(), u.len());
        assert_within_one_step(&u, &out, bits, block as usize);
    }

    #[test]
    fn top_k_sends_the_largest_values_exactly(
        u in update_strategy(),
        frac in 0.0f64..=1.0,
        zstd in any::<bool>(),
    ) {
        let k = (u.len() as f64 * frac) as usize;
        let out = round_trip(&u, &config(Sparsify::TopK { k }, None, zstd), None);

        let sent: Vec<usize> = (0..u.len()).filter(|&i| out[i] != 0.0).collect();
        prop_assert!(sent.len() <= k);
        let min_sent = sent.iter().map(|&i| u[i].abs()).fold(f32::INFINITY, f32::min);
        for i in 0..u.len() {
            if out[i] != 0.0 {
                prop_assert_eq!(out[i], u[i]);
            } else {
                // Whatever was left out is no larger than anything that was sent.
                prop_assert!(u[i].abs() <= min_sent || u[i] == 0.0);
            }
        }
    }

    #[test]
    fn sparse_and_quantised_chain_is_within_one_step_on_the_sent_values(
        u in prop::collection::vec(-1e3f32..1e3, 1..300),
        seed in any::<[u8; 32]>(),
    ) {
        let k = u.len().div_ceil(4);
        let q = Quantise { bits: 8, block: 16, seed };
        let frame = compress(&u, &config(Sparsify::TopK { k }, Some(q), true), None).unwrap();
        let params = DecodeParams { dim: u.len(), shared: None };
        let out = decompress(&EncodedUpdate::decode(&frame.encode(), u.len()).unwrap(), &params)
            .unwrap();

        let idx = sparse::top_k_indices(&u, k);
        let picked: Vec<f32> = idx.iter().map(|&i| u[i]).collect();
        let got: Vec<f32> = idx.iter().map(|&i| out[i]).collect();
        assert_within_one_step(&picked, &got, 8, 16);
    }

    #[test]
    fn random_k_sends_the_shared_coordinates_exactly(
        u in update_strategy(),
        frac in 0.0f64..=1.0,
    ) {
        let k = (u.len() as f64 * frac) as usize;
        let sparsify = Sparsify::RandomK { k, shared: shared(7) };
        let out = round_trip(&u, &config(sparsify, None, false), None);
        let idx = sparse::random_k_indices(&shared(7), u.len(), k);
        prop_assert_eq!(idx.len(), k);
        prop_assert!(idx.windows(2).all(|w| w[0] < w[1]));
        for i in 0..u.len() {
            let expected = if idx.binary_search(&i).is_ok() { u[i] } else { 0.0 };
            prop_assert_eq!(out[i], expected);
        }
    }

    #[test]
    fn error_feedback_sends_every_input_eventually(
        rounds in prop::collection::vec(prop::collection::vec(-10f32..10.0, 64), 1..6),
        quantised in any::<bool>(),
        random in any::<bool>(),
        seed in any::<[u8; 32]>(),
    ) {
        // Over the rounds, sum(decoded) + final residual = sum(inputs): what top-k drops and
        // quantisation rounds off stays in the residual.
        let dim = 64;
        let mut residual = Residual::new(dim);
        let mut inputs = vec![0f64; dim];
        let mut decoded = vec![0f64; dim];
        for (r, u) in rounds.iter().enumerate() {
            let sparsify = if random {
                Sparsify::RandomK { k: 8, shared: shared(r as u64) }
            } else {
                Sparsify::TopK { k: 8 }
            };
            let q = quantised.then_some(Quantise { bits: 4, block: 8, seed });
            let frame = compress(u, &config(sparsify, q, false), Some(&mut residual)).unwrap();
            let params = DecodeParams { dim, shared: Some(shared(r as u64)) };
            let out = decompress(&frame, &params).unwrap();
            for i in 0..dim {
                inputs[i] += f64::from(u[i]);
                decoded[i] += f64::from(out[i]);
            }
        }
        for i in 0..dim {
            let total = decoded[i] + f64::from(residual.values()[i]);
            // f32 rounding of the running residual, a few ulps of values below 60 per round.
            prop_assert!((total - inputs[i]).abs() < 1e-4 * rounds.len() as f64,
                "coordinate {}: {} vs {}", i, total, inputs[i]);
        }
    }
}

#[test]
fn stochastic_quantisation_is_unbiased() {
    // Each trial's error has variance at most step^2 / 4 (a two-point distribution on an
    // interval of one step), so the mean of N trials has standard deviation at most
    // step / (2 sqrt N); we allow 6 of those.
    let u: Vec<f32> = (0..32).map(|i| (i as f32 * 0.37).sin()).collect();
    let (bits, trials) = (2u8, 3000);
    let step = 2.0 / 3.0; // the sines span under [-1, 1], 2 bits give 3 steps
    let mut mean = vec![0f64; u.len()];
    for t in 0..trials {
        let mut seed = [0u8; 32];
        seed[..4].copy_from_slice(&(t as u32).to_le_bytes());
        let q = Quantise {
            bits,
            block: 32,
            seed,
        };
        let frame = compress(&u, &config(Sparsify::Dense, Some(q), false), None).unwrap();
        let out = decompress(
            &frame,
            &DecodeParams {
                dim: u.len(),
                shared: None,
            },
        )
        .unwrap();
        mean.iter_mut()
            .zip(&out)
            .for_each(|(m, &y)| *m += f64::from(y) / f64::from(trials));
    }
    let tol = 6.0 * step / (2.0 * f64::from(trials).sqrt());
    for (m, &x) in mean.iter().zip(&u) {
        assert!((m - f64::from(x)).abs() < tol, "mean {m} for {x}");
    }
}

#[test]
fn constant_blocks_quantise_exactly() {
    let u = vec![3.25f32; 50];
    let q = Quantise {
        bits: 3,
        block: 16,
        seed: [1; 32],
    };
    assert_eq!(
        round_trip(&u, &config(Sparsify::Dense, Some(q), false), None),
        u
    );
}

#[test]
fn random_k_indices_depend_on_seed_and_round_only() {
    let a = sparse::random_k_indices(&shared(1), 10_000, 100);
    assert_eq!(a, sparse::random_k_indices(&shared(1), 10_000, 100));
    assert_ne!(a, sparse::random_k_indices(&shared(2), 10_000, 100));
    let other = SharedSeed {
        seed: [43; 32],
        round: RoundId(1),
    };
    assert_ne!(a, sparse::random_k_indices(&other, 10_000, 100));
    // More than half: drawn through the complement, still k distinct sorted indices.
    let most = sparse::random_k_indices(&shared(1), 1000, 990);
    assert_eq!(most.len(), 990);
    assert!(most.windows(2).all(|w| w[0] < w[1]) && most[989] < 1000);
}

#[test]
fn random_k_frames_carry_no_indices() {
    let u = vec![1.0f32; 1000];
    let frame = compress(
        &u,
        &config(
            Sparsify::RandomK {
                k: 10,
                shared: shared(7),
            },
            None,
            false,
        ),
        None,
    )
    .unwrap();
    assert_eq!(frame.stages().selection, Selection::RandomK);
    // 10 f32 values and nothing else.
    assert_eq!(frame.payload_len(), 40);
}

#[test]
fn top_k_breaks_ties_towards_lower_indices() {
    assert_eq!(
        sparse::top_k_indices(&[1.0, -2.0, 2.0, 0.5, -2.0], 2),
        [1, 2]
    );
    assert_eq!(sparse::top_k_indices(&[0.0; 4], 3), [0, 1, 2]);
}

#[test]
fn eight_bit_quantisation_with_zstd_shrinks_a_smooth_update() {
    let u: Vec<f32> = (0..4096).map(|i| (i as f32 / 300.0).sin() * 0.01).collect();
    let q = Quantise::eight_bit([5; 32]);
    let frame = compress(&u, &config(Sparsify::Dense, Some(q), true), None).unwrap();
    // 8-bit levels alone are a quarter of the f32 bytes; zstd must not make them larger.
    assert!(
        frame.encode().len() < u.len() + 100,
        "{} bytes",
        frame.encode().len()
    );
}

/// Indices by the definition of top-k: larger magnitude first, then lower index.
fn by_magnitude(values: &[f32]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..values.len()).collect();
    order.sort_by(|&a, &b| values[b].abs().total_cmp(&values[a].abs()).then(a.cmp(&b)));
    order
}

#[test]
fn top_k_on_large_updates_matches_a_full_sort() {
    // Large enough for the sampled threshold, with three shapes: Gaussian values; spikes
    // placed off the sampling stride (the sample then misses them and selection falls
    // back); and heavy ties.
    let n = 100_000;
    let mut gaussian = vec![0f32; n];
    fedmesh_protocol::update::add_gaussian_noise(&mut gaussian, 1.0, [8; 32]).unwrap();
    let mut spikes = vec![0.001f32; n];
    for i in 0..2000 {
        spikes[i * 37 + 1] = 100.0 + i as f32;
    }
    let ties: Vec<f32> = (0..n).map(|i| (i % 7) as f32).collect();

    for values in [&gaussian, &spikes, &ties] {
        let order = by_magnitude(values);
        for k in [1, 1000, 2000, 30_000] {
            let mut expected = order[..k].to_vec();
            expected.sort_unstable();
            assert_eq!(sparse::top_k_indices(values, k), expected, "k = {k}");
        }
    }
}

#[test]
fn rejects_bad_input_and_settings_leaving_the_residual_alone() {
    use fedmesh_protocol::codec::EncodeError;

    let dense = config(Sparsify::Dense, None, false);
    let mut residual = Residual::from_values(vec![0.5; 3]);
    let err = compress(&[1.0, f32::NAN, 0.0], &dense, Some(&mut residual)).unwrap_err();
    assert!(matches!(err, EncodeError::NonFinite { index: 1, .. }));
    assert_eq!(residual.values(), [0.5; 3]);

    // The update plus the residual overflows to infinity.
    let mut big = Residual::from_values(vec![f32::MAX]);
    let err = compress(&[f32::MAX], &dense, Some(&mut big)).unwrap_err();
    assert!(matches!(err, EncodeError::NonFinite { index: 0, .. }));
    assert_eq!(big.values(), [f32::MAX]);

    let err = compress(&[1.0; 4], &dense, Some(&mut residual)).unwrap_err();
    assert_eq!(
        err,
        EncodeError::ResidualLength {
            update: 4,
            residual: 3
        }
    );

    let err = compress(
        &[1.0; 4],
        &config(Sparsify::TopK { k: 5 }, None, false),
        None,
    );
    assert_eq!(err.unwrap_err(), EncodeError::K { k: 5, dim: 4 });

    for (bits, block) in [(0, 16), (9, 16), (8, 0)] {
        let q = Quantise {
            bits,
            block,
            seed: [0; 32],
        };
        let err = compress(&[1.0; 4], &config(Sparsify::Dense, Some(q), false), None);
        assert_eq!(err.unwrap_err(), EncodeError::Quantisation { bits, block });
    }

    // A block spanning nearly all of f32 has a top level that would decode to infinity.
    let q = Quantise {
        bits: 8,
        block: 2,
        seed: [0; 32],
    };
    let err = compress(
        &[-f32::MAX, f32::MAX],
        &config(Sparsify::Dense, Some(q), false),
        None,
    );
    assert_eq!(err.unwrap_err(), EncodeError::QuantRange { block: 0 });
}
