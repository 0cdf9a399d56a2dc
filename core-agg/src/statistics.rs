//! Federated statistics: the normalisation that training rounds carry, computed without
//! moving rows.
//!
//! A statistics round uses the aggregation path of a training round. Each store
//! contributes the vector `[n, sum x_1 .. sum x_d, sum x_1^2 .. sum x_d^2]` of its row
//! count and per-feature sums and sums of squares (masked and noised like an update, in
//! secure mode); core adds the vectors with a [`CohortSum`] at scale 1 and turns the total
//! into means and standard deviations here.

use serde::{Deserialize, Serialize};

use crate::strategy::CohortSum;

/// The cohort's total does not describe any rows.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum StatisticsError {
    /// The vector is not `1 + 2 * features` long.
    #[error("moment vector has {got} entries, {features} features need {}", 1 + 2 * features)]
    Length {
        /// Features expected.
        features: usize,
        /// Entries found.
        got: usize,
    },
    /// The total row count is not positive (no store contributed, or noise swamped it).
    #[error("total row count must be positive, got {0}")]
    Count(f64),
}

/// Per-feature count, mean and standard deviation over the whole cohort.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FeatureStatistics {
    /// Rows across the cohort.
    pub count: f64,
    /// Mean of each feature.
    pub mean: Vec<f64>,
    /// Population standard deviation of each feature.
    pub std: Vec<f64>,
}

/// A store's contribution: its row count and per-feature sums and sums of squares.
pub fn store_moments(rows: &[Vec<f32>], features: usize) -> Vec<f32> {
    let mut moments = vec![0.0f64; 1 + 2 * features];
    for row in rows {
        moments[0] += 1.0;
        for (j, &x) in row.iter().take(features).enumerate() {
            let x = f64::from(x);
            moments[1 + j] += x;
            moments[1 + features + j] += x * x;
        }
    }
    moments.into_iter().map(|m| m as f32).collect()
}

impl FeatureStatistics {
    /// Decodes the cohort's summed moments.
    ///
    /// Noise can push a sum of squares below what the mean implies; such a variance is
    /// clamped to 0 rather than reported negative.
    ///
    /// # Errors
    ///
    /// [`StatisticsError::Length`] for a vector of the wrong length and
    /// [`StatisticsError::Count`] when the total count is not positive.
    pub fn from_moments(cohort: &CohortSum, features: usize) -> Result<Self, StatisticsError> {
        let sum = cohort.sum();
        if sum.len() != 1 + 2 * features {
            return Err(StatisticsError::Length {
                features,
                got: sum.len(),
            });
        }
        let count = sum[0];
        if !(count > 0.0 && count.is_finite()) {
            return Err(StatisticsError::Count(count));
        }
        let mean: Vec<f64> = sum[1..=features].iter().map(|s| s / count).collect();
        let std = sum[1 + features..]
            .iter()
            .zip(&mean)
            .map(|(squares, m)| (squares / count - m * m).max(0.0).sqrt())
            .collect();
        Ok(Self { count, mean, std })
    }
}
