//! Each strategy against an aggregate worked out by hand in the comments.

use fedmesh_core_agg::strategy::{
    AdaptiveConfig, Aggregator, CohortSum, StoreReport, StoreWeight, Strategy, StrategyError,
};
use proptest::prelude::*;

fn report(examples: u64, loss: f64, update: &[f32]) -> StoreReport {
    let update_norm_sq = update.iter().map(|&u| f64::from(u) * f64::from(u)).sum();
    StoreReport {
        examples,
        loss,
        update_norm_sq,
    }
}

/// Runs one round: every store's update is weighed by the strategy and summed.
fn round(aggregator: &mut Aggregator, global: &mut [f32], stores: &[(u64, f64, Vec<f32>)]) {
    let mut cohort = CohortSum::new(global.len());
    for (examples, loss, update) in stores {
        let factors = aggregator
            .strategy()
            .store_weight(&report(*examples, *loss, update))
            .unwrap();
        cohort.add_update(update, factors).unwrap();
    }
    aggregator.apply(global, &cohort).unwrap();
}

fn assert_close(got: &[f32], expected: &[f64]) {
    for (g, e) in got.iter().zip(expected) {
        assert!(
            (f64::from(*g) - e).abs() < 1e-6,
            "got {got:?}, expected {expected:?}"
        );
    }
}

#[test]
fn fedavg_weights_updates_by_example_count() {
    // Store A: 1 example, update [1, 0]; store B: 3 examples, update [0, 4].
    // Sum = 1*[1, 0] + 3*[0, 4] = [1, 12] over weight 4 -> step [0.25, 3].
    // [1, 2] + [0.25, 3] = [1.25, 5].
    let mut aggregator = Aggregator::new(Strategy::FedAvg).unwrap();
    let mut global = vec![1.0, 2.0];
    round(
        &mut aggregator,
        &mut global,
        &[(1, 0.5, vec![1.0, 0.0]), (3, 0.5, vec![0.0, 4.0])],
    );
    assert_close(&global, &[1.25, 5.0]);
}

#[test]
fn fedprox_aggregates_like_fedavg_and_sends_mu() {
    // Same cohort as the FedAvg case: the proximal term acts at the stores only.
    let strategy = Strategy::FedProx { mu: 0.01 };
    assert_eq!(strategy.proximal_mu(), Some(0.01));
    let mut aggregator = Aggregator::new(strategy).unwrap();
    let mut global = vec![1.0, 2.0];
    round(
        &mut aggregator,
        &mut global,
        &[(1, 0.5, vec![1.0, 0.0]), (3, 0.5, vec![0.0, 4.0])],
    );
    assert_close(&global, &[1.25, 5.0]);
}

#[test]
fn qfedavg_pulls_harder_towards_stores_with_higher_loss() {
    // q = 1, L = 1. Store A: loss 2, update [1, 0], |u|^2 = 1:
    //   scale = L F^q = 2, h = q F^(q-1) L^2 |u|^2 + L F^q = 1 + 2 = 3.
    // Store B: loss 1, update [0, 2], |u|^2 = 4: scale = 1, h = 4 + 1 = 5.
    // Sum = 2*[1, 0] + 1*[0, 2] = [2, 2] over 3 + 5 = 8 -> step [0.25, 0.25].
    let mut aggregator = Aggregator::new(Strategy::QFedAvg {
        q: 1.0,
        lipschitz: 1.0,
    })
    .unwrap();
    let mut global = vec![0.0, 0.0];
    round(
        &mut aggregator,
        &mut global,
        &[(10, 2.0, vec![1.0, 0.0]), (10, 1.0, vec![0.0, 2.0])],
    );
    assert_close(&global, &[0.25, 0.25]);
}

#[test]
fn qfedavg_with_q_zero_is_an_unweighted_average() {
    // q = 0, L = 2: scale = 2, h = 2 for every store, whatever its examples or loss.
    // Sum = 2*[1, 0] + 2*[0, 2] = [2, 4] over 4 -> step [0.5, 1].
    let mut aggregator = Aggregator::new(Strategy::QFedAvg {
        q: 0.0,
        lipschitz: 2.0,
    })
    .unwrap();
    let mut global = vec![0.0, 0.0];
    round(
        &mut aggregator,
        &mut global,
        &[(1, 3.0, vec![1.0, 0.0]), (99, 0.1, vec![0.0, 2.0])],
    );
    assert_close(&global, &[0.5, 1.0]);
}

const ADAPTIVE: AdaptiveConfig = AdaptiveConfig {
    eta: 0.1,
    beta1: 0.9,
    beta2: 0.99,
    tau: 0.01,
};

#[test]
fn fedadam_takes_the_adaptive_step() {
    // One store, average update d = [1, -2], x = [0.5, 0.5], v starts at tau^2 = 1e-4.
    // m = 0.1 d = [0.1, -0.2]; v = 0.99e-4 + 0.01 d^2 = [0.010099, 0.040099].
    // x += 0.1 m / (sqrt(v) + 0.01) = [0.01 / 0.110494, -0.02 / 0.210247]
    //    = [0.0905028, -0.0951261] -> [0.5905028, 0.4048739].
    let mut aggregator = Aggregator::new(Strategy::FedAdam(ADAPTIVE)).unwrap();
    let mut global = vec![0.5, 0.5];
    round(&mut aggregator, &mut global, &[(4, 1.0, vec![1.0, -2.0])]);
    assert_close(&global, &[0.5905028, 0.4048739]);
}

#[test]
fn fedyogi_moves_the_second_moment_by_a_bounded_amount() {
    // Round 1, d = [1, -2]: v = 1e-4 < d^2, so v = 1e-4 + 0.01 d^2 = [0.0101, 0.0401];
    // m = [0.1, -0.2]; x = 0.5 + 0.1 m / (sqrt(v) + 0.01) = [0.5904988, 0.4048751].
    // Round 2, d = [0.1, 0.1], d^2 = 0.01 < v: v = v - 0.01 * 0.01 = [0.01, 0.04];
    // m = 0.9 m + 0.1 d = [0.1, -0.17]; x += 0.1 m / ([0.1, 0.2] + 0.01)
    //   = [0.0909091, -0.0809524] -> [0.6814078, 0.3239227].
    let mut aggregator = Aggregator::new(Strategy::FedYogi(ADAPTIVE)).unwrap();
    let mut global = vec![0.5, 0.5];
    round(&mut aggregator, &mut global, &[(4, 1.0, vec![1.0, -2.0])]);
    assert_close(&global, &[0.5904988, 0.4048751]);
    round(&mut aggregator, &mut global, &[(4, 1.0, vec![0.1, 0.1])]);
    assert_close(&global, &[0.6814078, 0.3239227]);
}

#[test]
fn partial_sums_aggregate_like_the_updates_they_hold() {
    // Two PoPs forward already-weighted sums: [1, 0] (weight 1) and [0, 12] (weight 3),
    // the FedAvg cohort above -> [1.25, 5].
    let mut cohort = CohortSum::new(2);
    cohort.add_partial_sum(&[1.0, 0.0], 1.0, 1).unwrap();
    cohort.add_partial_sum(&[0.0, 12.0], 3.0, 1).unwrap();
    let mut global = vec![1.0, 2.0];
    Aggregator::new(Strategy::FedAvg)
        .unwrap()
        .apply(&mut global, &cohort)
        .unwrap();
    assert_close(&global, &[1.25, 5.0]);
    assert_eq!(cohort.stores(), 2);
}

#[test]
fn refuses_an_empty_cohort_and_a_wrong_length() {
    let mut aggregator = Aggregator::new(Strategy::FedAvg).unwrap();
    let mut global = vec![1.0, 2.0];
    assert_eq!(
        aggregator.apply(&mut global, &CohortSum::new(2)),
        Err(StrategyError::EmptyCohort)
    );
    let mut cohort = CohortSum::new(2);
    let factors = StoreWeight {
        scale: 1.0,
        weight: 1.0,
    };
    assert_eq!(
        cohort.add_update(&[1.0], factors),
        Err(StrategyError::Length {
            expected: 2,
            got: 1
        })
    );
    assert_eq!(global, vec![1.0, 2.0]);
    let bad = Strategy::FedAdam(AdaptiveConfig {
        beta1: 1.5,
        ..ADAPTIVE
    });
    assert!(matches!(
        Aggregator::new(bad),
        Err(StrategyError::Parameter { name: "beta1", .. })
    ));
    let qfedavg = Strategy::QFedAvg {
        q: 1.0,
        lipschitz: 1.0,
    };
    assert_eq!(
        qfedavg.store_weight(&report(1, 0.0, &[1.0])),
        Err(StrategyError::Loss(0.0))
    );
}

proptest! {
    #[test]
    fn fedavg_of_identical_updates_is_that_update(
        update in proptest::collection::vec(-10.0f32..10.0, 1..16),
        counts in proptest::collection::vec(1u64..1000, 1..8),
    ) {
        let mut aggregator = Aggregator::new(Strategy::FedAvg).unwrap();
        let mut global = vec![0.0; update.len()];
        let stores: Vec<_> = counts.iter().map(|&n| (n, 1.0, update.clone())).collect();
        round(&mut aggregator, &mut global, &stores);
        for (g, u) in global.iter().zip(&update) {
            prop_assert!((g - u).abs() <= 1e-5 * u.abs().max(1.0));
        }
    }

    #[test]
    fn fedavg_does_not_depend_on_arrival_order(
        updates in proptest::collection::vec(
            (1u64..100, proptest::collection::vec(-5.0f32..5.0, 4)), 1..10),
    ) {
        let mut forward = vec![0.0; 4];
        let mut backward = vec![0.0; 4];
        let stores: Vec<_> = updates.iter().map(|(n, u)| (*n, 1.0, u.clone())).collect();
        let reversed: Vec<_> = stores.iter().rev().cloned().collect();
        round(&mut Aggregator::new(Strategy::FedAvg).unwrap(), &mut forward, &stores);
        round(&mut Aggregator::new(Strategy::FedAvg).unwrap(), &mut backward, &reversed);
        for (f, b) in forward.iter().zip(&backward) {
            prop_assert!((f - b).abs() <= 1e-5);
        }
    }
}
