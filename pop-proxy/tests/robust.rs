//! Trusted-pop robust aggregation: hand-computed values, and resistance to a store that
//! scales its update by 100.

use fedmesh_pop_proxy::robust::{self, NormFilter, RobustAggregator, RobustError};
use fedmesh_protocol::ids::StoreId;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn refs(updates: &[Vec<f32>]) -> Vec<&[f32]> {
    updates.iter().map(Vec::as_slice).collect()
}

/// Five two-element updates, one of them wild in the first coordinate.
fn five() -> Vec<Vec<f32>> {
    vec![
        vec![1.0, 10.0],
        vec![2.0, 20.0],
        vec![3.0, 30.0],
        vec![4.0, 40.0],
        vec![100.0, -5.0],
    ]
}

#[test]
fn coordinate_median_matches_hand_computation() {
    // Column 0 sorted: 1 2 [3] 4 100; column 1 sorted: -5 10 [20] 30 40.
    let got = RobustAggregator::CoordinateMedian
        .aggregate(&refs(&five()))
        .unwrap();
    assert_eq!(got, vec![3.0, 20.0]);

    // Even count: mean of the two middle values, (2 + 3) / 2 and (20 + 30) / 2.
    let four = &five()[..4];
    let got = RobustAggregator::CoordinateMedian
        .aggregate(&refs(four))
        .unwrap();
    assert_eq!(got, vec![2.5, 25.0]);
}

#[test]
fn trimmed_mean_matches_hand_computation() {
    // floor(0.2 * 5) = 1 dropped at each end: (2 + 3 + 4) / 3 = 3, (10 + 20 + 30) / 3 = 20.
    let agg = RobustAggregator::TrimmedMean { trim_fraction: 0.2 };
    assert_eq!(agg.aggregate(&refs(&five())).unwrap(), vec![3.0, 20.0]);

    // Trimming everything is refused.
    let agg = RobustAggregator::TrimmedMean {
        trim_fraction: 0.49,
    };
    let two = &five()[..2];
    assert!(agg.aggregate(&refs(two)).is_ok());
    let agg = RobustAggregator::TrimmedMean { trim_fraction: 0.5 };
    assert!(matches!(
        agg.aggregate(&refs(two)),
        Err(RobustError::Trim { .. })
    ));
}

#[test]
fn krum_matches_hand_computation() {
    // n = 5, f = 1: each score sums the 5 - 1 - 2 = 2 smallest squared distances.
    // [0]: 4 + 9 = 13; [2]: 1 + 4 = 5; [3]: 1 + 9 = 10; [7]: 16 + 25 = 41; [100]: huge.
    let updates: Vec<Vec<f32>> = [0.0, 2.0, 3.0, 7.0, 100.0]
        .iter()
        .map(|v| vec![*v])
        .collect();
    let got = RobustAggregator::Krum { byzantine: 1 }
        .aggregate(&refs(&updates))
        .unwrap();
    assert_eq!(got, vec![2.0]);

    // n must exceed 2f + 2.
    let err = RobustAggregator::Krum { byzantine: 2 }
        .aggregate(&refs(&updates))
        .unwrap_err();
    assert_eq!(
        err,
        RobustError::KrumTooFew {
            byzantine: 2,
            count: 5
        }
    );
}

fn distance(a: &[f32], b: &[f32]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (f64::from(*x) - f64::from(*y)).powi(2))
        .sum::<f64>()
        .sqrt()
}

/// Nine honest stores near a common update, and one that sends 100 times its honest one.
fn honest_and_scaled() -> (Vec<f32>, Vec<(StoreId, Vec<f32>)>) {
    let mut rng = ChaCha8Rng::seed_from_u64(100);
    let truth: Vec<f32> = (0..256).map(|_| rng.gen_range(-1.0..1.0)).collect();
    let updates = (0..10)
        .map(|i| {
            let mut u: Vec<f32> = truth.iter().map(|t| t + rng.gen_range(-0.1..0.1)).collect();
            if i == 4 {
                u.iter_mut().for_each(|x| *x *= 100.0);
            }
            (StoreId(format!("store-{i}")), u)
        })
        .collect();
    (truth, updates)
}

#[test]
fn norm_filter_quarantines_a_scaled_update_only() {
    let (_, updates) = honest_and_scaled();
    let vectors: Vec<Vec<f32>> = updates.iter().map(|(_, u)| u.clone()).collect();
    let (kept, quarantined) = NormFilter::default().split(&vectors);
    assert_eq!(quarantined, vec![4]);
    assert_eq!(kept.len(), 9);
}

#[test]
fn robust_aggregators_resist_a_scaled_by_100_update() {
    let (truth, updates) = honest_and_scaled();
    let vectors: Vec<Vec<f32>> = updates.iter().map(|(_, u)| u.clone()).collect();
    let norm_truth = distance(&truth, &vec![0.0; truth.len()]);

    // The plain mean is dragged about 10x the update's norm away: the attack is real.
    let mean: Vec<f32> = (0..truth.len())
        .map(|j| vectors.iter().map(|u| u[j]).sum::<f32>() / vectors.len() as f32)
        .collect();
    assert!(distance(&mean, &truth) > 5.0 * norm_truth);

    // Each robust aggregator, even without the norm filter, stays near the honest update
    // (per-coordinate noise is at most 0.1).
    for aggregator in [
        RobustAggregator::CoordinateMedian,
        RobustAggregator::TrimmedMean { trim_fraction: 0.1 },
        RobustAggregator::Krum { byzantine: 1 },
    ] {
        let got = aggregator.aggregate(&refs(&vectors)).unwrap();
        assert!(
            distance(&got, &truth) < 0.2 * norm_truth,
            "{aggregator:?} moved {} from the honest update",
            distance(&got, &truth)
        );
    }

    // With the filter, the attacker is named and left out.
    let outcome = robust::aggregate_round(
        updates,
        RobustAggregator::TrimmedMean { trim_fraction: 0.1 },
        NormFilter::default(),
    )
    .unwrap();
    assert_eq!(outcome.quarantined, vec![StoreId("store-4".into())]);
    assert_eq!(outcome.contributors.len(), 9);
}

#[test]
fn plain_update_decoding_refuses_bad_input() {
    let bytes: Vec<u8> = [1.5f32, -2.0]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    assert_eq!(robust::decode_plain(&bytes, 2).unwrap(), vec![1.5, -2.0]);
    assert!(robust::decode_plain(&bytes, 3).is_err());
    let nan: Vec<u8> = [1.0f32, f32::NAN]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    assert_eq!(
        robust::decode_plain(&nan, 2),
        Err(robust::DecodeError::NotFinite(1))
    );
}

mod trusted_round {
    use std::time::{Duration, Instant};

    use fedmesh_policy::Decision;
    use fedmesh_pop_proxy::{
        NormFilter, RejectReason, Ring, RobustAggregator, RoundSpec, TrustedRound, UpdateHeader,
    };
    use fedmesh_protocol::ids::{ModelVersion, RoundId, StoreId};

    fn decision(allow: bool) -> Decision {
        Decision {
            allow,
            rule: if allow { "allow" } else { "trust_domain" }.into(),
            reasons: Vec::new(),
            revision: "test".into(),
        }
    }

    fn peer(store: usize) -> StoreId {
        StoreId(format!("store-{store}"))
    }

    fn header(store: usize, round: u64) -> UpdateHeader {
        UpdateHeader {
            store: peer(store),
            round: RoundId(round),
            model_version: ModelVersion(1),
            ring_bits: 0,
            len: 1,
        }
    }

    fn bytes(v: f32) -> Vec<u8> {
        v.to_le_bytes().to_vec()
    }

    #[test]
    fn checks_each_update_then_aggregates_the_accepted_ones() {
        let spec = RoundSpec {
            round: RoundId(4),
            model_version: ModelVersion(1),
            ring: Ring::new(32).unwrap(),
            len: 1,
            expected: (0..4).map(|i| StoreId(format!("store-{i}"))).collect(),
            deadline: Instant::now() + Duration::from_secs(60),
        };
        let mut round = TrustedRound::open(
            spec,
            RobustAggregator::CoordinateMedian,
            NormFilter::default(),
        );
        for (i, v) in [1.0f32, 2.0, 4.0].into_iter().enumerate() {
            round
                .accept(&peer(i), &header(i, 4), &decision(true), &bytes(v))
                .unwrap();
        }

        let cases = [
            (
                header(0, 4),
                decision(true),
                bytes(9.0),
                RejectReason::Duplicate,
            ),
            (
                header(3, 3),
                decision(true),
                bytes(9.0),
                RejectReason::StaleRound,
            ),
            (
                header(3, 4),
                decision(false),
                bytes(9.0),
                RejectReason::PolicyDenied,
            ),
            (
                header(3, 4),
                decision(true),
                bytes(f32::NAN),
                RejectReason::Malformed,
            ),
            (
                header(3, 4),
                decision(true),
                vec![0; 8],
                RejectReason::Malformed,
            ),
        ];
        for (h, d, payload, reason) in &cases {
            let err = round.accept(&h.store, h, d, payload).unwrap_err();
            assert_eq!(err.reason(), *reason, "{err}");
        }
        assert_eq!(round.poll_close(Instant::now()), None);

        // Store 3 never sent a valid update: the deadline closes the round. Median of
        // 1, 2, 4 is 2.
        let outcome = round
            .poll_close(Instant::now() + Duration::from_secs(61))
            .unwrap()
            .unwrap();
        assert_eq!(outcome.aggregate, vec![2.0]);
        assert_eq!(outcome.contributors.len(), 3);
    }

    #[test]
    fn store_cannot_submit_a_plain_update_as_another_store() {
        let spec = RoundSpec {
            round: RoundId(4),
            model_version: ModelVersion(1),
            ring: Ring::new(32).unwrap(),
            len: 1,
            expected: (0..2).map(peer).collect(),
            deadline: Instant::now() + Duration::from_secs(60),
        };
        let mut round = TrustedRound::open(
            spec,
            RobustAggregator::CoordinateMedian,
            NormFilter::default(),
        );

        // Store 0, authenticated and allowed, names store 1 in its header.
        let err = round
            .accept(&peer(0), &header(1, 4), &decision(true), &bytes(1e6))
            .unwrap_err();
        assert_eq!(err.reason(), RejectReason::IdentityMismatch, "{err}");
        assert_eq!(round.rejections()[&RejectReason::IdentityMismatch], 1);

        // Store 1's own update is still taken; with it alone, the median is its value.
        round
            .accept(&peer(1), &header(1, 4), &decision(true), &bytes(2.0))
            .unwrap();
        let outcome = round
            .poll_close(Instant::now() + Duration::from_secs(61))
            .unwrap()
            .unwrap();
        assert_eq!(outcome.aggregate, vec![2.0]);
        assert_eq!(outcome.contributors, vec![peer(1)]);
    }
}
