//! The store's update pipeline: a trained model's shared delta becomes a clipped, noised,
//! compressed frame that the receiver decodes back to the clipped delta (within the codec's
//! error bound), and the personalised head never leaves.

use fedmesh_protocol::codec::{self, CodecConfig, DecodeParams, EncodedUpdate, Quantise, Sparsify};
use fedmesh_protocol::params::Scope;
use fedmesh_store_agent::model::{Model, Precision};
use fedmesh_store_agent::pipeline::{UpdateSettings, build_update};
use fedmesh_store_agent::task::{Activation, ModelSpec, Objective};
use fedmesh_store_agent::weights::Weights;
use tch::Device;

fn model(seed: i64) -> Model {
    let spec = ModelSpec::Mlp {
        inputs: 47,
        hidden: vec![64, 32],
        outputs: 1,
        activation: Activation::Relu,
        objective: Objective::Regression,
        local: vec!["head".into()],
    };
    tch::manual_seed(seed);
    Model::new(&spec, Device::Cpu, Precision::F32).expect("model")
}

/// Two different initialisations stand in for global and locally trained weights.
fn shared_delta() -> Weights {
    let global = model(1).shared_weights();
    let local = model(2).shared_weights();
    local.delta(&global).expect("same layout")
}

fn settings(clip_norm: f32, noise_std: f64) -> UpdateSettings {
    UpdateSettings {
        clip_norm,
        noise_std,
        codec: CodecConfig {
            sparsify: Sparsify::Dense,
            quantise: Some(Quantise::eight_bit([7; 32])),
            zstd_level: Some(3),
        },
    }
}

#[test]
fn update_decodes_to_the_clipped_delta_within_one_quantisation_step() {
    let delta = shared_delta();
    assert!(
        delta.names().all(|n| !n.starts_with("head")),
        "local head in the delta"
    );

    let built = build_update(&delta, &settings(1.0, 0.0), None, [0; 32]).expect("build");
    let dim = built.layout.len(Scope::Shared);
    assert_eq!(dim, delta.numel());
    assert!(
        built.pre_clip_norm > 1.0,
        "the test needs a delta that clipping shrinks"
    );

    let frame = EncodedUpdate::decode(&built.bytes, dim).expect("decode frame");
    let decoded = codec::decompress(&frame, &DecodeParams { dim, shared: None }).expect("decode");
    // The clipped delta, laid out by name as the protocol documents.
    let mut names: Vec<_> = delta.tensors.iter().collect();
    names.sort_by(|a, b| a.name.as_bytes().cmp(b.name.as_bytes()));
    let scale = (1.0 / built.pre_clip_norm) as f32;
    let expected: Vec<f32> = names
        .iter()
        .flat_map(|t| t.values.iter().map(|v| v * scale))
        .collect();

    // One 8-bit step of a block spans at most the block's range / 255; every clipped value
    // lies in [-1, 1], so a step is at most 2/255.
    let step = 2.0 / 255.0;
    for (i, (d, e)) in decoded.iter().zip(&expected).enumerate() {
        assert!((d - e).abs() <= step + 1e-6, "coordinate {i}: {d} vs {e}");
    }
    let norm: f64 = decoded
        .iter()
        .map(|v| f64::from(*v).powi(2))
        .sum::<f64>()
        .sqrt();
    assert!((norm - 1.0).abs() < 0.05, "decoded norm {norm}");
    // 8-bit quantisation with zstd: at least 3.5x smaller than dense float32.
    assert!(
        built.bytes.len() * 7 < dim * 4 * 2,
        "{} bytes for {dim}",
        built.bytes.len()
    );
}

#[test]
fn noise_seed_changes_the_update_and_repeats_exactly() {
    let delta = shared_delta();
    let s = settings(1.0, 0.1);
    let a = build_update(&delta, &s, None, [1; 32]).expect("build");
    let b = build_update(&delta, &s, None, [1; 32]).expect("build");
    let c = build_update(&delta, &s, None, [2; 32]).expect("build");
    assert_eq!(a.bytes, b.bytes);
    assert_eq!(a.sha256, b.sha256);
    assert_ne!(a.bytes, c.bytes);
}

#[test]
fn non_finite_training_output_is_refused_by_name() {
    let mut delta = shared_delta();
    delta.tensors[0].values[3] = f32::NAN;
    let err = build_update(&delta, &settings(1.0, 0.0), None, [0; 32]).expect_err("NaN");
    assert!(err.to_string().starts_with("update values"), "{err}");
}
