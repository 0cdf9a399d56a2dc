//! A statistics round gives the cohort's means and deviations without moving rows.

use fedmesh_core_agg::statistics::{FeatureStatistics, StatisticsError, store_moments};
use fedmesh_core_agg::strategy::{CohortSum, StoreWeight};

#[test]
fn cohort_moments_give_pooled_mean_and_deviation() {
    // Store A rows (x1, x2): (1, 10), (3, 10); store B: (5, 40).
    // Pooled: n = 3; x1 mean 3, squares 1 + 9 + 25 = 35, variance 35/3 - 9 = 8/3;
    // x2 mean 20, squares 100 + 100 + 1600 = 1800, variance 600 - 400 = 200.
    let a = store_moments(&[vec![1.0, 10.0], vec![3.0, 10.0]], 2);
    let b = store_moments(&[vec![5.0, 40.0]], 2);
    assert_eq!(a, vec![2.0, 4.0, 20.0, 10.0, 200.0]);

    let mut cohort = CohortSum::new(5);
    let unit = StoreWeight {
        scale: 1.0,
        weight: 1.0,
    };
    cohort.add_update(&a, unit).unwrap();
    cohort.add_update(&b, unit).unwrap();
    let stats = FeatureStatistics::from_moments(&cohort, 2).unwrap();

    assert_eq!(stats.count, 3.0);
    assert_eq!(stats.mean, vec![3.0, 20.0]);
    assert!((stats.std[0] - (8.0f64 / 3.0).sqrt()).abs() < 1e-12);
    assert!((stats.std[1] - 200f64.sqrt()).abs() < 1e-12);
}

#[test]
fn refuses_an_empty_cohort_and_a_wrong_layout() {
    assert_eq!(
        FeatureStatistics::from_moments(&CohortSum::new(5), 2),
        Err(StatisticsError::Count(0.0))
    );
    assert_eq!(
        FeatureStatistics::from_moments(&CohortSum::new(4), 2),
        Err(StatisticsError::Length {
            features: 2,
            got: 4
        })
    );
}
