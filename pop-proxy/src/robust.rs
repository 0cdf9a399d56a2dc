//! Trusted-pop mode: individual plain updates decoded and combined by a Byzantine-robust
//! aggregator, after quarantining updates whose norm is an outlier.
//!
//! Robust statistics need every update at once, so memory here grows with the number of
//! stores (one `f32` vector each); this mode is for chains that trust their PoPs and run
//! cohorts small enough for it. Secure mode ([`crate::fold`]) is the default.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Instant;

use fedmesh_policy::Decision;
use fedmesh_protocol::ids::StoreId;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::fold::{RejectReason, Rejection, RoundSpec, UpdateHeader, check_header};

/// The aggregator a plan chooses.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum RobustAggregator {
    /// Per coordinate, the median (mean of the two middle values for an even count).
    CoordinateMedian,
    /// Per coordinate, the mean after dropping the `trim_fraction` smallest and largest.
    TrimmedMean {
        /// Fraction dropped at each end, in `[0, 0.5)`.
        trim_fraction: f64,
    },
    /// Krum (Blanchard et al., NeurIPS 2017): the update whose `n - f - 2` nearest
    /// neighbours are closest in squared distance.
    Krum {
        /// `f`, the number of Byzantine stores tolerated; needs `n > 2f + 2`.
        byzantine: usize,
    },
}

/// Why updates could not be aggregated.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum RobustError {
    /// No update survived.
    #[error("no updates to aggregate")]
    Empty,
    /// Updates of different lengths.
    #[error("update {index} has {got} elements, expected {expected}")]
    Shape {
        /// Which update.
        index: usize,
        /// Its length.
        got: usize,
        /// The first update's length.
        expected: usize,
    },
    /// Trimming would drop everything, or a fraction outside `[0, 0.5)`.
    #[error("trim fraction {fraction} is invalid for {count} updates")]
    Trim {
        /// The fraction.
        fraction: f64,
        /// The number of updates.
        count: usize,
    },
    /// Krum's `n > 2f + 2` does not hold.
    #[error("krum with f = {byzantine} needs more than {} updates, got {count}", 2 * byzantine + 2)]
    KrumTooFew {
        /// f.
        byzantine: usize,
        /// n.
        count: usize,
    },
}

/// A plain update that is not `len` finite little-endian `f32`s.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DecodeError {
    /// Wrong byte count.
    #[error("plain update has {got} bytes, expected {expected}")]
    Length {
        /// Bytes expected.
        expected: usize,
        /// Bytes received.
        got: usize,
    },
    /// NaN or infinity.
    #[error("element {0} is not finite")]
    NotFinite(usize),
}

/// Decodes a plain update: `len` little-endian `f32`s, all finite.
///
/// # Errors
/// [`DecodeError`].
pub fn decode_plain(bytes: &[u8], len: usize) -> Result<Vec<f32>, DecodeError> {
    if Some(bytes.len()) != len.checked_mul(4) {
        return Err(DecodeError::Length {
            expected: len.saturating_mul(4),
            got: bytes.len(),
        });
    }
    bytes
        .chunks_exact(4)
        .enumerate()
        .map(|(i, b)| {
            let v = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            if v.is_finite() {
                Ok(v)
            } else {
                Err(DecodeError::NotFinite(i))
            }
        })
        .collect()
}

/// Quarantines updates whose L2 norm exceeds `median + k * 1.4826 * MAD` of all norms
/// (1.4826 makes the MAD estimate a standard deviation for Gaussian norms).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct NormFilter {
    /// k, in robust standard deviations.
    pub k: f64,
}

impl Default for NormFilter {
    fn default() -> Self {
        Self { k: 3.0 }
    }
}

impl NormFilter {
    /// The indices kept and quarantined, each ascending.
    pub fn split(&self, updates: &[Vec<f32>]) -> (Vec<usize>, Vec<usize>) {
        let norms: Vec<f64> = updates.iter().map(|u| l2(u)).collect();
        let Some(median) = median_f64(norms.clone()) else {
            return (Vec::new(), Vec::new());
        };
        let deviations = norms.iter().map(|n| (n - median).abs()).collect();
        let mad = median_f64(deviations).unwrap_or(0.0);
        // With identical norms the MAD is 0; a relative floor keeps rounding noise from
        // quarantining honest stores.
        let spread = (1.4826 * mad).max(median * 1e-6);
        let limit = median + self.k * spread;
        (0..updates.len()).partition(|&i| norms[i] <= limit)
    }
}

/// The result of a trusted-pop round.
#[derive(Debug, Clone, PartialEq)]
pub struct RobustOutcome {
    /// The aggregate update.
    pub aggregate: Vec<f32>,
    /// Stores whose updates were aggregated.
    pub contributors: Vec<StoreId>,
    /// Stores whose updates were quarantined as norm outliers.
    pub quarantined: Vec<StoreId>,
}

/// Filters outliers, then aggregates what remains.
///
/// # Errors
/// [`RobustError`] from the aggregator.
pub fn aggregate_round(
    updates: Vec<(StoreId, Vec<f32>)>,
    aggregator: RobustAggregator,
    filter: NormFilter,
) -> Result<RobustOutcome, RobustError> {
    let (stores, vectors): (Vec<StoreId>, Vec<Vec<f32>>) = updates.into_iter().unzip();
    let (kept, quarantined) = filter.split(&vectors);
    for &i in &quarantined {
        tracing::info!(store.id = %stores[i], "update quarantined as a norm outlier");
    }
    let kept_vectors: Vec<&[f32]> = kept.iter().map(|&i| vectors[i].as_slice()).collect();
    Ok(RobustOutcome {
        aggregate: aggregator.aggregate(&kept_vectors)?,
        contributors: kept.iter().map(|&i| stores[i].clone()).collect(),
        quarantined: quarantined.iter().map(|&i| stores[i].clone()).collect(),
    })
}

/// A trusted-pop round: plain updates collected whole, after the same checks as secure
/// mode (policy, round binding, shape, cohort, one per store; no ring), then filtered and
/// aggregated when the round closes.
#[derive(Debug)]
pub struct TrustedRound {
    spec: RoundSpec,
    aggregator: RobustAggregator,
    filter: NormFilter,
    stores: BTreeSet<StoreId>,
    updates: Vec<(StoreId, Vec<f32>)>,
    rejected: BTreeMap<RejectReason, u64>,
    closed: bool,
}

impl TrustedRound {
    /// An empty round for `spec` (its ring is unused), aggregated as the plan says.
    pub fn open(spec: RoundSpec, aggregator: RobustAggregator, filter: NormFilter) -> Self {
        Self {
            spec,
            aggregator,
            filter,
            stores: BTreeSet::new(),
            updates: Vec::new(),
            rejected: BTreeMap::new(),
            closed: false,
        }
    }

    /// Rejections so far, by reason.
    pub fn rejections(&self) -> &BTreeMap<RejectReason, u64> {
        &self.rejected
    }

    /// Checks and keeps one store's plain update (`len` little-endian `f32`s), sent by
    /// `peer`, the store the transport authenticated and the policy judged.
    ///
    /// # Errors
    /// The [`Rejection`], already counted; the update is not kept.
    /// [`Rejection::IdentityMismatch`] when the header names another store than `peer`.
    pub fn accept(
        &mut self,
        peer: &StoreId,
        header: &UpdateHeader,
        decision: &Decision,
        payload: &[u8],
    ) -> Result<(), Rejection> {
        let checked = check_header(
            &self.spec,
            None,
            &self.stores,
            self.closed,
            peer,
            header,
            decision,
        )
        .and_then(|()| Ok(decode_plain(payload, self.spec.len)?));
        match checked {
            Ok(update) => {
                self.stores.insert(peer.clone());
                self.updates.push((peer.clone(), update));
                Ok(())
            }
            Err(rejection) => {
                *self.rejected.entry(rejection.reason()).or_default() += 1;
                Err(rejection)
            }
        }
    }

    /// Closes the round once every expected store has reported or `now` is past the
    /// deadline, and aggregates; `None` before that and after it closed.
    pub fn poll_close(&mut self, now: Instant) -> Option<Result<RobustOutcome, RobustError>> {
        let everyone = self.spec.expected.is_subset(&self.stores);
        if self.closed || (!everyone && now < self.spec.deadline) {
            return None;
        }
        self.closed = true;
        let updates = std::mem::take(&mut self.updates);
        Some(aggregate_round(updates, self.aggregator, self.filter))
    }
}

impl RobustAggregator {
    /// Combines `updates` (all of one length).
    ///
    /// # Errors
    /// [`RobustError`] for no updates, mixed lengths or parameters the count cannot meet.
    pub fn aggregate(&self, updates: &[&[f32]]) -> Result<Vec<f32>, RobustError> {
        let first = updates.first().ok_or(RobustError::Empty)?;
        if let Some((index, u)) = updates
            .iter()
            .enumerate()
            .find(|(_, u)| u.len() != first.len())
        {
            return Err(RobustError::Shape {
                index,
                got: u.len(),
                expected: first.len(),
            });
        }
        match *self {
            Self::CoordinateMedian => Ok(per_coordinate(updates, |column| {
                median_f64(column.to_vec()).unwrap_or(0.0)
            })),
            Self::TrimmedMean { trim_fraction } => {
                let n = updates.len();
                let cut = (trim_fraction * n as f64).floor() as usize;
                if !(0.0..0.5).contains(&trim_fraction) || 2 * cut >= n {
                    return Err(RobustError::Trim {
                        fraction: trim_fraction,
                        count: n,
                    });
                }
                Ok(per_coordinate(updates, |column| {
                    column.sort_by(f64::total_cmp);
                    let kept = &column[cut..n - cut];
                    kept.iter().sum::<f64>() / kept.len() as f64
                }))
            }
            Self::Krum { byzantine } => krum(updates, byzantine),
        }
    }
}

fn per_coordinate(updates: &[&[f32]], mut f: impl FnMut(&mut [f64]) -> f64) -> Vec<f32> {
    let mut column = vec![0f64; updates.len()];
    (0..updates[0].len())
        .map(|j| {
            for (c, u) in column.iter_mut().zip(updates) {
                *c = f64::from(u[j]);
            }
            f(&mut column) as f32
        })
        .collect()
}

fn krum(updates: &[&[f32]], byzantine: usize) -> Result<Vec<f32>, RobustError> {
    let n = updates.len();
    if n <= 2 * byzantine + 2 {
        return Err(RobustError::KrumTooFew {
            byzantine,
            count: n,
        });
    }
    let neighbours = n - byzantine - 2;
    let best = (0..n)
        .map(|i| {
            let mut distances: Vec<f64> = (0..n)
                .filter(|&j| j != i)
                .map(|j| squared_distance(updates[i], updates[j]))
                .collect();
            distances.sort_by(f64::total_cmp);
            (i, distances[..neighbours].iter().sum::<f64>())
        })
        .min_by(|a, b| a.1.total_cmp(&b.1))
        .map_or(0, |(i, _)| i);
    Ok(updates[best].to_vec())
}

fn squared_distance(a: &[f32], b: &[f32]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| {
            let d = f64::from(*x) - f64::from(*y);
            d * d
        })
        .sum()
}

fn l2(v: &[f32]) -> f64 {
    v.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt()
}

fn median_f64(mut values: Vec<f64>) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    Some(if values.len() % 2 == 1 {
        values[mid]
    } else {
        (values[mid - 1] + values[mid]) / 2.0
    })
}
