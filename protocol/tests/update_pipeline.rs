//! The update pipeline: delta over shared parameters, L2 clipping, and Gaussian noise.

use fedmesh_protocol::params::{ParamLayout, ParamMap, ParamSpec};
use fedmesh_protocol::update::{UpdateError, add_gaussian_noise, clip_l2, delta, l2_norm};
use proptest::prelude::*;

#[test]
fn delta_is_local_minus_global_over_shared_parameters() {
    let layout = ParamLayout::new([
        ParamSpec {
            name: "w".into(),
            shape: vec![2],
            local: false,
        },
        ParamSpec {
            name: "head".into(),
            shape: vec![1],
            local: true,
        },
    ])
    .unwrap();
    let local = ParamMap::from([("w".into(), vec![1.5, -2.0]), ("head".into(), vec![9.0])]);
    let global = ParamMap::from([("w".into(), vec![0.5, 1.0]), ("head".into(), vec![0.0])]);
    // 1.5 - 0.5 = 1.0 and -2.0 - 1.0 = -3.0; the local head is not part of the update.
    assert_eq!(delta(&layout, &local, &global).unwrap(), [1.0, -3.0]);
}

#[test]
fn delta_rejects_overflow_to_infinity() {
    let layout = ParamLayout::new([ParamSpec {
        name: "w".into(),
        shape: vec![1],
        local: false,
    }])
    .unwrap();
    let local = ParamMap::from([("w".into(), vec![f32::MAX])]);
    let global = ParamMap::from([("w".into(), vec![-f32::MAX])]);
    let err = delta(&layout, &local, &global).unwrap_err();
    assert!(matches!(err, UpdateError::NonFinite { index: 0, .. }));
}

#[test]
fn clip_scales_a_long_update_to_the_bound() {
    // (3, 4) has norm 5; clipped to 1 it is (0.6, 0.8).
    let mut u = vec![3.0f32, 4.0];
    let before = clip_l2(&mut u, 1.0).unwrap();
    assert_eq!(before, 5.0);
    assert!((u[0] - 0.6).abs() < 1e-6 && (u[1] - 0.8).abs() < 1e-6);
}

#[test]
fn clip_leaves_zero_and_short_updates_alone() {
    let mut zero = vec![0.0f32; 4];
    assert_eq!(clip_l2(&mut zero, 1.0).unwrap(), 0.0);
    assert_eq!(zero, [0.0; 4]);

    let mut short = vec![0.1f32, -0.2];
    clip_l2(&mut short, 1.0).unwrap();
    assert_eq!(short, [0.1, -0.2]);

    let mut any = vec![1.0f32, 2.0];
    clip_l2(&mut any, 0.0).unwrap();
    assert_eq!(any, [0.0, 0.0]);
}

#[test]
fn clip_rejects_nan_input_and_bad_bounds_without_touching_the_update() {
    let mut u = vec![1.0f32, f32::NAN, 2.0];
    let err = clip_l2(&mut u, 1.0).unwrap_err();
    assert!(matches!(err, UpdateError::NonFinite { index: 1, .. }));
    assert_eq!(u[0], 1.0);

    let mut inf = vec![f32::INFINITY];
    assert!(matches!(
        clip_l2(&mut inf, 1.0),
        Err(UpdateError::NonFinite { index: 0, .. })
    ));

    let mut ok = vec![1.0f32];
    assert_eq!(clip_l2(&mut ok, -1.0), Err(UpdateError::ClipNorm(-1.0)));
    assert!(matches!(
        clip_l2(&mut ok, f32::NAN),
        Err(UpdateError::ClipNorm(_))
    ));
    assert_eq!(ok, [1.0]);
}

proptest! {
    #[test]
    fn clipping_leaves_norm_at_most_the_bound(
        mut u in prop::collection::vec(-1e30f32..1e30, 0..200),
        bound in 0f32..1e6,
    ) {
        let before = l2_norm(&u).unwrap();
        let original = u.clone();
        let reported = clip_l2(&mut u, bound).unwrap();
        prop_assert_eq!(reported, before);
        prop_assert!(l2_norm(&u).unwrap() <= f64::from(bound));

        // Clipping only scales: the direction is kept (every ratio is the same factor).
        if before > f64::from(bound) && bound > 0.0 {
            let factor = f64::from(bound) / before;
            for (x, o) in u.iter().zip(&original) {
                let expected = f64::from(*o) * factor;
                prop_assert!((f64::from(*x) - expected).abs() <= 1e-5 * expected.abs() + 1e-30);
            }
        }
    }
}

const N: usize = 200_000;

/// Noise alone: what `add_gaussian_noise` adds to a zero update.
fn noise(std_dev: f64, seed: [u8; 32]) -> Vec<f32> {
    let mut v = vec![0.0f32; N];
    add_gaussian_noise(&mut v, std_dev, seed).unwrap();
    v
}

#[test]
fn noise_has_the_requested_variance() {
    let sigma = 0.75;
    let z = noise(sigma, [7; 32]);
    let n = N as f64;

    // With the mean known to be 0, n * s^2 / sigma^2 is chi-square with n degrees of
    // freedom: mean n, variance 2n. So s^2 / sigma^2 has standard deviation sqrt(2 / n)
    // (0.0032 at n = 200,000); 6 of those is a miss probability near 2e-9.
    let var = z.iter().map(|&x| f64::from(x).powi(2)).sum::<f64>() / n;
    let tol = 6.0 * (2.0 / n).sqrt();
    assert!((var / (sigma * sigma) - 1.0).abs() < tol, "variance {var}");

    // The sample mean has standard deviation sigma / sqrt(n).
    let mean = z.iter().map(|&x| f64::from(x)).sum::<f64>() / n;
    assert!(mean.abs() < 6.0 * sigma / n.sqrt(), "mean {mean}");

    // Gaussian shape: P(|Z| < sigma) = erf(1 / sqrt 2) = 0.682689; a binomial proportion
    // has standard deviation sqrt(p (1 - p) / n) = 0.00104.
    let p = 0.682_689_492;
    let inside = z.iter().filter(|&&x| f64::from(x).abs() < sigma).count() as f64 / n;
    assert!(
        (inside - p).abs() < 6.0 * (p * (1.0 - p) / n).sqrt(),
        "inside {inside}"
    );
}

#[test]
fn identical_seeds_give_identical_noise_and_different_seeds_differ() {
    let mut a = vec![1.0f32; 1000];
    let mut b = a.clone();
    let mut c = a.clone();
    add_gaussian_noise(&mut a, 0.1, [1; 32]).unwrap();
    add_gaussian_noise(&mut b, 0.1, [1; 32]).unwrap();
    let mut other = [1; 32];
    other[31] = 2;
    add_gaussian_noise(&mut c, 0.1, other).unwrap();
    assert_eq!(a, b);
    // Two independent draws agree on a coordinate with probability ~0 in f32.
    assert!(a.iter().zip(&c).filter(|(x, y)| x == y).count() < 10);
}

#[test]
fn zero_noise_leaves_the_update_and_bad_deviations_are_rejected() {
    let mut u = vec![0.25f32, -1.0];
    add_gaussian_noise(&mut u, 0.0, [0; 32]).unwrap();
    assert_eq!(u, [0.25, -1.0]);
    assert_eq!(
        add_gaussian_noise(&mut u, -1.0, [0; 32]),
        Err(UpdateError::NoiseStdDev(-1.0))
    );
    assert!(add_gaussian_noise(&mut u, f64::NAN, [0; 32]).is_err());
    assert!(add_gaussian_noise(&mut u, f64::INFINITY, [0; 32]).is_err());
}
