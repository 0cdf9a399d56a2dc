//! Federated statistics: the moments a store contributes to a statistics round, and the
//! cohort's means and standard deviations decoded from their sum.
//!
//! A statistics round runs the aggregation path of a training round (masked in secure mode,
//! folded at the PoPs, unmasked at core) on a different vector. Over its first `max_rows`
//! training rows a store sums, per column (the features, then the target), the value and its
//! square, each value clamped to `[-bound, bound]`; the vector is
//!
//! ```text
//! [ n / R,  s_1 / (R B) .. s_c / (R B),  q_1 / (R B^2) .. q_c / (R B^2) ]
//! ```
//!
//! with R = `max_rows`, B = `bound`, c columns, sums s and sums of squares q, so that every
//! entry m lies in [-1, 1]. Each entry travels as two integer levels of the plan's b bits
//! (L = 2^(b-1) - 1): hi = floor(m L) and lo = round((m L - hi) L), so the ring carries m to
//! about 1/L^2 instead of 1/L. A variance is a small difference of two large moments (a
//! feature near 10.5 with deviation 0.09 loses four digits to it), which one b-bit level
//! would leave mostly rounding. The cohort's sum, scaled back, gives the pooled count,
//! means and population deviations: the normalisation that later training rounds carry.
//!
//! The rounding is deterministic and no noise is added: a statistics round releases the
//! cohort's aggregate moments to core, which secure aggregation keeps from any single
//! store's.

use serde::{Deserialize, Serialize};

/// Quantisation bits a statistics round plans: the widest level the ring takes.
pub const MOMENT_QUANT_BITS: u32 = 30;

/// What a statistics round asks of each selected store.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatisticsTask {
    /// Feature columns per row; the target is one more column after them.
    pub features: u32,
    /// Rows a store counts at most: the scale of the count.
    pub max_rows: u64,
    /// Bound on the magnitude of every feature and the target; values clamp to it.
    pub bound: f64,
}

/// A statistics task, a store's rows or a cohort sum that cannot be used.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum MomentsError {
    /// A setting of the task is out of range.
    #[error("statistics task: {0}")]
    Task(&'static str),
    /// The rows do not have the task's width.
    #[error("rows have {got} features, the statistics task has {expected}")]
    Width {
        /// The task's features.
        expected: usize,
        /// The rows' features.
        got: usize,
    },
    /// Features and targets disagree on the number of rows.
    #[error("{features} feature values for {targets} targets of width {dim}")]
    Rows {
        /// Feature values.
        features: usize,
        /// Targets.
        targets: usize,
        /// Width.
        dim: usize,
    },
    /// A value is NaN or infinite.
    #[error("row {row} column {column} is not a finite number")]
    NotFinite {
        /// Row index.
        row: usize,
        /// Column index (the target is the last).
        column: usize,
    },
    /// The summed vector is not this task's length.
    #[error("moment vector has {got} entries, the task needs {expected}")]
    Length {
        /// Entries the task needs.
        expected: usize,
        /// Entries given.
        got: usize,
    },
    /// The summed row count is not at least one row.
    #[error("the cohort's row count is {0}, not at least one row")]
    Count(f64),
}

/// The pooled statistics of a cohort.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CohortStatistics {
    /// Rows counted across the cohort.
    pub count: f64,
    /// Mean of each feature.
    pub mean: Vec<f64>,
    /// Population standard deviation of each feature; 1 for a constant feature, which then
    /// maps to zero rather than to infinity.
    pub std: Vec<f64>,
    /// Mean of the target.
    pub target_mean: f64,
    /// Population standard deviation of the target.
    pub target_std: f64,
}

impl StatisticsTask {
    /// Columns summed: the features and the target.
    pub fn columns(&self) -> usize {
        self.features as usize + 1
    }

    /// Length of a store's vector: the count, then sums, then sums of squares.
    pub fn dimension(&self) -> usize {
        1 + 2 * self.columns()
    }

    /// Checks the settings.
    ///
    /// # Errors
    ///
    /// [`MomentsError::Task`] naming the setting out of range.
    pub fn validate(&self) -> Result<(), MomentsError> {
        if self.features == 0 || self.features > 1 << 20 {
            return Err(MomentsError::Task("features must be 1 to 2^20"));
        }
        if self.max_rows == 0 || self.max_rows > 1 << 40 {
            return Err(MomentsError::Task("max_rows must be 1 to 2^40"));
        }
        if !(self.bound.is_finite() && self.bound > 0.0) {
            return Err(MomentsError::Task("bound must be finite and positive"));
        }
        Ok(())
    }

    /// Length of a store's vector of levels: hi and lo of every moment.
    pub fn levels_len(&self) -> usize {
        2 * self.dimension()
    }

    /// A store's moments over its first `max_rows` rows (`features` holds `dim` values a
    /// row, `targets` one), as hi and lo levels of scale `max_level` (L).
    ///
    /// # Errors
    ///
    /// [`MomentsError`] for a task out of range, rows of another width, features and
    /// targets of different lengths, or a value that is not finite.
    pub fn encode(
        &self,
        dim: usize,
        features: &[f32],
        targets: &[f32],
        max_level: i64,
    ) -> Result<Vec<i64>, MomentsError> {
        let moments = self.moments(dim, features, targets)?;
        if max_level < 1 {
            return Err(MomentsError::Task("max_level must be positive"));
        }
        let l = max_level as f64;
        let (mut hi, mut lo) = (Vec::with_capacity(moments.len()), Vec::new());
        for m in moments {
            let y = m.clamp(-1.0, 1.0) * l;
            let h = y.floor();
            hi.push(h as i64);
            lo.push((((y - h) * l).round() as i64).min(max_level));
        }
        hi.extend(lo);
        Ok(hi)
    }

    /// A store's scaled moments in [-1, 1], in f64.
    fn moments(
        &self,
        dim: usize,
        features: &[f32],
        targets: &[f32],
    ) -> Result<Vec<f64>, MomentsError> {
        self.validate()?;
        if dim != self.features as usize {
            return Err(MomentsError::Width {
                expected: self.features as usize,
                got: dim,
            });
        }
        if features.len() != dim * targets.len() {
            return Err(MomentsError::Rows {
                features: features.len(),
                targets: targets.len(),
                dim,
            });
        }
        let c = self.columns();
        let mut sums = vec![0.0f64; c];
        let mut squares = vec![0.0f64; c];
        let rows = features
            .chunks_exact(dim)
            .zip(targets)
            .take(usize::try_from(self.max_rows).unwrap_or(usize::MAX));
        let mut n = 0u64;
        for (row_index, (row, &y)) in rows.enumerate() {
            for (column, &v) in row.iter().chain(std::iter::once(&y)).enumerate() {
                if !v.is_finite() {
                    return Err(MomentsError::NotFinite {
                        row: row_index,
                        column,
                    });
                }
                let v = f64::from(v).clamp(-self.bound, self.bound);
                sums[column] += v;
                squares[column] += v * v;
            }
            n += 1;
        }
        let r = self.max_rows as f64;
        let b = self.bound;
        let mut out = Vec::with_capacity(self.dimension());
        out.push(n as f64 / r);
        out.extend(sums.iter().map(|s| s / (r * b)));
        out.extend(squares.iter().map(|q| q / (r * b * b)));
        Ok(out)
    }

    /// The cohort's statistics from the sum of its stores' levels (centred lifts of the
    /// ring sum), at the scale `max_level` they were encoded with.
    ///
    /// Rounding can push a sum of squares a little below what the mean implies; such a
    /// variance is taken as 0, and a variance at the level of quantisation error (a
    /// constant column) gives a deviation of 1.
    ///
    /// # Errors
    ///
    /// [`MomentsError::Length`] for a vector of another task and [`MomentsError::Count`]
    /// when it counts less than one row.
    pub fn decode(&self, sum: &[i64], max_level: i64) -> Result<CohortStatistics, MomentsError> {
        self.validate()?;
        let c = self.columns();
        let d = self.dimension();
        if sum.len() != self.levels_len() {
            return Err(MomentsError::Length {
                expected: self.levels_len(),
                got: sum.len(),
            });
        }
        let l = max_level.max(1) as f64;
        let sum: Vec<f64> = (0..d)
            .map(|k| (sum[k] as f64 + sum[d + k] as f64 / l) / l)
            .collect();
        let r = self.max_rows as f64;
        let b = self.bound;
        // Rows are whole: the count's last bits are the fixed point's rounding.
        let count = (sum[0] * r).round();
        if count.is_nan() || count < 1.0 {
            return Err(MomentsError::Count(count));
        }
        let mean: Vec<f64> = (0..c).map(|j| sum[1 + j] * r * b / count).collect();
        let std: Vec<f64> = (0..c)
            .map(|j| {
                let second = sum[1 + c + j] * r * b * b / count;
                let var = (second - mean[j] * mean[j]).max(0.0);
                // Below 1e-12 of the column's second moment the spread is rounding.
                if var > 1e-12 * second.abs().max(1e-12) {
                    var.sqrt()
                } else {
                    1.0
                }
            })
            .collect();
        let f = self.features as usize;
        Ok(CohortStatistics {
            count,
            target_mean: mean[f],
            target_std: std[f],
            mean: mean[..f].to_vec(),
            std: std[..f].to_vec(),
        })
    }
}
