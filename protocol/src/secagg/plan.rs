//! The secure-aggregation part of a round's plan, checked once when core plans the round and
//! again by every store that receives it.
//!
//! The plan fixes everything the tiers must agree on: the cohort and its neighbour graph, the
//! Shamir threshold, the ring, the quantisation, the coordinates kept, and the noise. The
//! ring is `r = b + ceil(log2 n) + guard` bits; a plan whose cohort sum (quantised values
//! plus twelve standard deviations of the summed noise) could leave the signed range of that
//! ring is refused, so a sum that decodes has not wrapped.

use std::collections::BTreeMap;

use rand_core::{CryptoRng, RngCore};
use serde::{Deserialize, Serialize};
use thiserror::Error;

use super::graph::{NeighbourGraph, below, seeded_rng};
use super::noise::{
    DiscreteGaussian, GuaranteedNoise, MAX_VARIANCE, VARIANCE_DENOMINATOR, sum_distance,
};
use super::prg::ring_mask;
use crate::ids::{RoundId, StoreId};

/// Standard deviations of the summed noise the ring must hold besides the values; a
/// Gaussian passes 12 sd with probability below 4e-33 per coordinate.
const NOISE_TAIL_SDS: f64 = 12.0;

/// The widest ring: elements are u64 and keystream words are at most 8 bytes.
pub const MAX_RING_BITS: u32 = 62;

/// Whether updates are masked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Masking {
    /// SecAgg+: pairwise and self masks; only the cohort sum is visible, at core.
    Secure,
    /// No masks: quantised (and noised) updates are summed as they are. For trusted-pop
    /// mode and for tests; the rest of the round runs the same code.
    Plain,
}

/// The secure-aggregation settings core chooses for a round.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlanConfig {
    /// The round the plan belongs to.
    pub round: RoundId,
    /// Public per-round randomness: the neighbour graph and the kept coordinates.
    pub seed: [u8; 32],
    /// The selected stores; order does not matter.
    pub cohort: Vec<StoreId>,
    /// Masked or plain aggregation.
    pub masking: Masking,
    /// Neighbours per store; even, or at least `cohort - 1` for the complete graph.
    pub degree: u32,
    /// Shamir threshold t among a store's neighbours; more than half the degree.
    pub threshold: u32,
    /// The fewest surviving stores the round accepts, at least t; the noise is sized so that
    /// this many stores' shares carry the planned noise.
    pub min_survivors: u32,
    /// Length of the (flattened, clipped) update.
    pub dimension: u32,
    /// Coordinates kept by random-k, `None` to keep all.
    pub kept: Option<u32>,
    /// Quantisation bits b per coordinate.
    pub quant_bits: u32,
    /// The clip bound: every coordinate is taken to lie in `[-clip, clip]`.
    pub clip: f32,
    /// Extra ring bits, beyond b + ceil(log2 n), that hold the noise.
    pub guard_bits: u32,
    /// Standard deviation of the noise the cohort sum must carry, in update units; 0 for
    /// none.
    pub noise_stddev: f64,
}

/// Why a plan was refused.
#[derive(Debug, Error, PartialEq)]
pub enum PlanError {
    /// The cohort is empty or names a store twice.
    #[error("cohort is empty or names store {0:?} twice")]
    BadCohort(Option<StoreId>),
    /// Degree and threshold cannot give secure sharing.
    #[error("degree {degree} and threshold {threshold} need 2t > k and t <= k (k = {effective})")]
    BadThreshold {
        /// Degree asked for.
        degree: u32,
        /// The degree after capping at `cohort - 1`.
        effective: u32,
        /// Threshold asked for.
        threshold: u32,
    },
    /// A degree below `cohort - 1` must be even.
    #[error("degree {0} is odd and below the cohort size minus one")]
    OddDegree(u32),
    /// The survivor minimum is below the threshold or above the cohort.
    #[error("min_survivors {min} is not between {low} and the cohort size {cohort}")]
    BadMinSurvivors {
        /// Minimum asked for.
        min: u32,
        /// Lowest allowed value.
        low: u32,
        /// Cohort size.
        cohort: u32,
    },
    /// Dimension or kept coordinates out of range.
    #[error("dimension {dimension} with {kept:?} kept coordinates is out of range")]
    BadDimension {
        /// Update length.
        dimension: u32,
        /// Kept coordinates.
        kept: Option<u32>,
    },
    /// Quantisation bits, clip or noise out of range.
    #[error("quantisation out of range: {0}")]
    BadQuantisation(&'static str),
    /// The ring would be wider than [`MAX_RING_BITS`].
    #[error("ring of {0} bits is wider than {MAX_RING_BITS}")]
    RingTooWide(u32),
    /// The cohort sum could wrap around the ring.
    #[error(
        "cohort sum could wrap: it needs {needed_bits} bits but the ring has {ring_bits}; \
         add guard bits or lower the noise"
    )]
    WouldWrap {
        /// Bits the worst-case sum needs, sign included.
        needed_bits: u32,
        /// Bits of the planned ring.
        ring_bits: u32,
    },
}

/// A local update that does not fit the plan.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum UpdateError {
    /// The update has the wrong length.
    #[error("update has {got} coordinates, the plan has {expected}")]
    WrongDimension {
        /// Plan's length.
        expected: usize,
        /// Given length.
        got: usize,
    },
    /// A coordinate is NaN or infinite.
    #[error("update coordinate {0} is not finite")]
    NotFinite(usize),
    /// A ring element is not below 2^r.
    #[error("ring element at {0} is not below 2^r")]
    OutOfRing(usize),
    /// An integer level is beyond the plan's b-bit range.
    #[error("level at {0} is beyond the plan's quantisation range")]
    LevelOutOfRange(usize),
}

/// A checked plan with its derived quantities (ring, graph, noise, kept coordinates).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(try_from = "PlanConfig", into = "PlanConfig")]
pub struct SecAggPlan {
    config: PlanConfig,
    ring_bits: u32,
    positions: BTreeMap<StoreId, u32>,
    graph: NeighbourGraph,
    noise: Option<DiscreteGaussian>,
    coordinates: Option<Vec<u32>>,
}

/// A store's update quantised into the ring, noise included, ready to mask.
#[derive(Clone, PartialEq, Eq)]
pub struct QuantisedUpdate {
    values: Vec<u64>,
}

impl QuantisedUpdate {
    /// Wraps ring elements that were quantised elsewhere (or chosen by a test).
    ///
    /// # Errors
    ///
    /// [`UpdateError`] when the length differs from the plan's vector or an element is not
    /// below 2^r.
    pub fn from_ring(plan: &SecAggPlan, values: Vec<u64>) -> Result<Self, UpdateError> {
        if values.len() != plan.vector_len() {
            return Err(UpdateError::WrongDimension {
                expected: plan.vector_len(),
                got: values.len(),
            });
        }
        let mask = ring_mask(plan.ring_bits);
        match values.iter().position(|&v| v & !mask != 0) {
            Some(i) => Err(UpdateError::OutOfRing(i)),
            None => Ok(Self { values }),
        }
    }

    /// The ring elements.
    pub fn values(&self) -> &[u64] {
        &self.values
    }
}

impl std::fmt::Debug for QuantisedUpdate {
    // A quantised update is still one store's update; never print it.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QuantisedUpdate")
            .field("len", &self.values.len())
            .finish_non_exhaustive()
    }
}

impl SecAggPlan {
    /// Checks a configuration and derives the ring, graph, noise and coordinates.
    ///
    /// # Errors
    ///
    /// [`PlanError`] names the first setting that is out of range, and refuses any plan
    /// whose cohort sum could wrap the ring.
    pub fn new(mut config: PlanConfig) -> Result<Self, PlanError> {
        // 1. Cohort: sorted, unique, positions for lookups.
        config.cohort.sort();
        if let Some(pair) = config.cohort.windows(2).find(|p| p[0] == p[1]) {
            return Err(PlanError::BadCohort(Some(pair[0].clone())));
        }
        let n = config.cohort.len() as u32;
        if n == 0 {
            return Err(PlanError::BadCohort(None));
        }

        // 2. Neighbourhood and threshold.
        let effective = config.degree.min(n - 1);
        if config.masking == Masking::Secure {
            if effective < n - 1 && effective % 2 == 1 {
                return Err(PlanError::OddDegree(config.degree));
            }
            let t = config.threshold;
            if effective == 0 || t > effective || 2 * t <= effective {
                return Err(PlanError::BadThreshold {
                    degree: config.degree,
                    effective,
                    threshold: t,
                });
            }
        }
        let low = match config.masking {
            Masking::Secure => config.threshold.max(1),
            Masking::Plain => 1,
        };
        if config.min_survivors < low || config.min_survivors > n {
            return Err(PlanError::BadMinSurvivors {
                min: config.min_survivors,
                low,
                cohort: n,
            });
        }

        // 3. Vector shape.
        let kept_ok = config.kept.is_none_or(|k| k >= 1 && k <= config.dimension);
        if config.dimension == 0 || config.dimension > 1 << 30 || !kept_ok {
            return Err(PlanError::BadDimension {
                dimension: config.dimension,
                kept: config.kept,
            });
        }

        // 4. Quantisation, ring and noise; then the wrap check.
        if !(2..=30).contains(&config.quant_bits) {
            return Err(PlanError::BadQuantisation("quant_bits must be 2 to 30"));
        }
        if !(config.clip.is_finite() && config.clip > 0.0) {
            return Err(PlanError::BadQuantisation(
                "clip must be finite and positive",
            ));
        }
        if !(config.noise_stddev.is_finite() && config.noise_stddev >= 0.0) {
            return Err(PlanError::BadQuantisation(
                "noise_stddev must be finite, >= 0",
            ));
        }
        // The widths come from a deserialised plan: a sum past u32 is a ring too wide, not
        // a panic.
        let ring_bits = config
            .quant_bits
            .checked_add(ceil_log2(n))
            .and_then(|bits| bits.checked_add(config.guard_bits))
            .ok_or(PlanError::RingTooWide(u32::MAX))?;
        if ring_bits > MAX_RING_BITS {
            return Err(PlanError::RingTooWide(ring_bits));
        }
        let noise = per_store_noise(&config)?;
        check_wrap(&config, ring_bits, noise.as_ref())?;

        // 5. Derived structures every tier recomputes from the seed.
        let graph = NeighbourGraph::new(&config.seed, n as usize, config.degree as usize);
        let coordinates = config
            .kept
            .filter(|&k| k < config.dimension)
            .map(|k| kept_coordinates(&config.seed, config.dimension, k));
        let positions = config
            .cohort
            .iter()
            .enumerate()
            .map(|(i, s)| (s.clone(), i as u32))
            .collect();
        Ok(Self {
            config,
            ring_bits,
            positions,
            graph,
            noise,
            coordinates,
        })
    }

    /// Degree and threshold for `n` stores that keep every store's secrets recoverable with
    /// probability at least 1 - 1e-6 per round when each store drops independently with
    /// probability `dropout`: the smallest even degree k with t = k/2 + 1 such that
    /// n * P[Binomial(k, 1 - dropout) < t] <= 1e-6, or the complete graph if none is smaller.
    pub fn recommended_neighbourhood(n: u32, dropout: f64) -> (u32, u32) {
        let complete = n.saturating_sub(1);
        let mut k = 2;
        while k < complete {
            let t = k / 2 + 1;
            if f64::from(n) * binomial_below(k, 1.0 - dropout, t) <= 1e-6 {
                return (k, t);
            }
            k += 2;
        }
        (complete, complete / 2 + 1)
    }

    /// The configuration the plan was built from (cohort sorted).
    pub fn config(&self) -> &PlanConfig {
        &self.config
    }

    /// The round.
    pub fn round(&self) -> RoundId {
        self.config.round
    }

    /// Ring width r: elements live in Z_{2^r}.
    pub fn ring_bits(&self) -> u32 {
        self.ring_bits
    }

    /// Length of the quantised, masked vector: kept coordinates or the whole update.
    pub fn vector_len(&self) -> usize {
        self.coordinates
            .as_ref()
            .map_or(self.config.dimension as usize, Vec::len)
    }

    /// The cohort, sorted.
    pub fn cohort(&self) -> &[StoreId] {
        &self.config.cohort
    }

    /// A store's position in the sorted cohort.
    pub fn position(&self, store: &StoreId) -> Option<usize> {
        self.positions.get(store).map(|&p| p as usize)
    }

    /// The neighbour graph over cohort positions.
    pub fn graph(&self) -> &NeighbourGraph {
        &self.graph
    }

    /// Shamir threshold.
    pub fn threshold(&self) -> usize {
        self.config.threshold as usize
    }

    /// Masked or plain.
    pub fn masking(&self) -> Masking {
        self.config.masking
    }

    /// The fewest survivors the round accepts.
    pub fn min_survivors(&self) -> usize {
        self.config.min_survivors as usize
    }

    /// Coordinates kept by random-k, ascending, or `None` when all are kept.
    pub fn kept_coordinates(&self) -> Option<&[u32]> {
        self.coordinates.as_deref()
    }

    /// Quantisation scale: ring units per update unit.
    pub fn scale(&self) -> f64 {
        f64::from(max_level(self.config.quant_bits)) / f64::from(self.config.clip)
    }

    /// The noise the decoded sum carries when `survivors` honest stores contributed (never
    /// fewer than `min_survivors`: with fewer the round fails instead). `None` when the plan
    /// adds no noise. The ledger charges [`SecAggPlan::planned_noise`], not this.
    pub fn noise_with(&self, survivors: usize) -> Option<GuaranteedNoise> {
        let g = self.noise?;
        let stores = survivors.max(self.min_survivors()) as u32;
        let ring_variance = g.variance() * f64::from(stores);
        Some(GuaranteedNoise {
            stddev: ring_variance.sqrt() / self.scale(),
            ring_variance,
            stores,
            tau: sum_distance(g.variance(), stores),
        })
    }

    /// The guaranteed noise, counting only `min_survivors` stores' shares: the figure the
    /// ledger charges, before or after the round, since stores beyond the minimum are hoped
    /// for, not guaranteed.
    pub fn planned_noise(&self) -> Option<GuaranteedNoise> {
        self.noise_with(self.min_survivors())
    }

    /// Quantises a clipped update: keeps the planned coordinates, clamps each to the clip
    /// bound, rounds it stochastically (unbiased) to b bits, and adds this store's share of
    /// the noise.
    ///
    /// # Errors
    ///
    /// [`UpdateError`] for a wrong length or a non-finite coordinate.
    pub fn quantise<R: RngCore + CryptoRng>(
        &self,
        update: &[f32],
        rng: &mut R,
    ) -> Result<QuantisedUpdate, UpdateError> {
        if update.len() != self.config.dimension as usize {
            return Err(UpdateError::WrongDimension {
                expected: self.config.dimension as usize,
                got: update.len(),
            });
        }
        if let Some(i) = update.iter().position(|v| !v.is_finite()) {
            return Err(UpdateError::NotFinite(i));
        }
        let clip = self.config.clip;
        let scale = self.scale();
        let mask = ring_mask(self.ring_bits);
        let level = |x: f32, rng: &mut R| {
            let y = f64::from(x.clamp(-clip, clip)) * scale;
            // |y| <= 2^(b-1), so the cast is exact after truncation; stepping down for
            // negative non-integers gives the floor without a libm call.
            let truncated = y as i64;
            let floor = truncated - i64::from((truncated as f64) > y);
            // Round up with probability equal to the fraction, so E[level] = y.
            let u = f64::from(rng.next_u32()) * (1.0 / 4_294_967_296.0);
            let mut q = floor + i64::from(u < y - floor as f64);
            if let Some(g) = &self.noise {
                q += g.sample(rng);
            }
            q as u64 & mask
        };
        let values = match &self.coordinates {
            Some(idx) => idx
                .iter()
                .map(|&i| level(update[i as usize], rng))
                .collect(),
            None => update.iter().map(|&x| level(x, rng)).collect(),
        };
        Ok(QuantisedUpdate { values })
    }

    /// Maps integer levels a store computed itself (each within +-(2^(b-1) - 1), as
    /// [`SecAggPlan::quantise`] would produce) into the ring, adding this store's share of
    /// the noise. A statistics round sends its fixed-point moments this way.
    ///
    /// # Errors
    ///
    /// [`UpdateError`] for a wrong length or a level out of range.
    pub fn levels<R: RngCore + CryptoRng>(
        &self,
        levels: &[i64],
        rng: &mut R,
    ) -> Result<QuantisedUpdate, UpdateError> {
        if levels.len() != self.vector_len() {
            return Err(UpdateError::WrongDimension {
                expected: self.vector_len(),
                got: levels.len(),
            });
        }
        let max = i64::from(max_level(self.config.quant_bits));
        if let Some(i) = levels.iter().position(|l| l.abs() > max) {
            return Err(UpdateError::LevelOutOfRange(i));
        }
        let mask = ring_mask(self.ring_bits);
        let values = levels
            .iter()
            .map(|&l| {
                let noise = self.noise.as_ref().map_or(0, |g| g.sample(rng));
                (l + noise) as u64 & mask
            })
            .collect();
        Ok(QuantisedUpdate { values })
    }

    /// The largest level b bits allow: 2^(b-1) - 1.
    pub fn max_level(&self) -> i64 {
        i64::from(max_level(self.config.quant_bits))
    }

    /// Decodes a cohort sum from the ring into update units: the centred lift of each
    /// element divided by the scale, placed back at its coordinate (zero where random-k
    /// dropped it).
    pub fn decode(&self, sum: &[u64]) -> Vec<f32> {
        let scale = self.scale();
        let lift = |v: u64| self.centred(v) as f64 / scale;
        match &self.coordinates {
            Some(idx) => {
                let mut out = vec![0.0f32; self.config.dimension as usize];
                for (&i, &v) in idx.iter().zip(sum) {
                    out[i as usize] = lift(v) as f32;
                }
                out
            }
            None => sum.iter().map(|&v| lift(v) as f32).collect(),
        }
    }

    /// The signed integer in (-2^(r-1), 2^(r-1)] congruent to `v` modulo 2^r.
    pub fn centred(&self, v: u64) -> i64 {
        let r = self.ring_bits;
        let v = v & ring_mask(r);
        if v >= 1u64 << (r - 1) {
            v as i64 - (1i64 << r)
        } else {
            v as i64
        }
    }
}

impl TryFrom<PlanConfig> for SecAggPlan {
    type Error = PlanError;

    fn try_from(config: PlanConfig) -> Result<Self, PlanError> {
        Self::new(config)
    }
}

impl From<SecAggPlan> for PlanConfig {
    fn from(plan: SecAggPlan) -> Self {
        plan.config
    }
}

/// The largest quantisation level, 2^(b-1) - 1, so that levels are symmetric around zero.
fn max_level(bits: u32) -> u32 {
    (1u32 << (bits - 1)) - 1
}

fn ceil_log2(n: u32) -> u32 {
    u32::BITS - n.saturating_sub(1).leading_zeros()
}

/// The per-store discrete Gaussian: planned ring variance over the guaranteed survivors,
/// rounded up to the next multiple of 2^-10.
fn per_store_noise(config: &PlanConfig) -> Result<Option<DiscreteGaussian>, PlanError> {
    if config.noise_stddev == 0.0 {
        return Ok(None);
    }
    let scale = f64::from(max_level(config.quant_bits)) / f64::from(config.clip);
    let total = (config.noise_stddev * scale).powi(2);
    let per_store = total / f64::from(config.min_survivors);
    if per_store > MAX_VARIANCE {
        return Err(PlanError::BadQuantisation(
            "noise per store above 2^40 ring units",
        ));
    }
    let num = (per_store * VARIANCE_DENOMINATOR as f64).ceil() as u64;
    Ok(Some(DiscreteGaussian::new(num)))
}

/// Refuses a ring in which n full-scale values plus the noise tail could leave the signed
/// range.
fn check_wrap(
    config: &PlanConfig,
    ring_bits: u32,
    noise: Option<&DiscreteGaussian>,
) -> Result<(), PlanError> {
    let n = config.cohort.len() as f64;
    let values = n * f64::from(max_level(config.quant_bits));
    let tail = noise.map_or(0.0, |g| NOISE_TAIL_SDS * (g.variance() * n).sqrt());
    let worst = values + tail;
    // Signed range: |sum| <= 2^(r-1) - 1.
    let needed_bits = (worst + 1.0).log2().ceil() as u32 + 1;
    if needed_bits > ring_bits {
        return Err(PlanError::WouldWrap {
            needed_bits,
            ring_bits,
        });
    }
    Ok(())
}

/// The random-k coordinates of a round: a uniform k-subset of 0..d from the seed, ascending.
fn kept_coordinates(seed: &[u8; 32], d: u32, k: u32) -> Vec<u32> {
    let mut rng = seeded_rng(seed, b"kept coordinates");
    let mut all: Vec<u32> = (0..d).collect();
    // Partial Fisher-Yates: the first k slots end up a uniform k-subset.
    for i in 0..k as usize {
        let j = i + below(&mut rng, u64::from(d) - i as u64) as usize;
        all.swap(i, j);
    }
    all.truncate(k as usize);
    all.sort_unstable();
    all
}

/// P[Binomial(k, p) < t], summed in log space.
fn binomial_below(k: u32, p: f64, t: u32) -> f64 {
    let ln_choose = |k: u32, j: u32| -> f64 {
        (1..=j)
            .map(|i| (f64::from(k - j + i) / f64::from(i)).ln())
            .sum()
    };
    (0..t.min(k + 1))
        .map(|j| {
            (ln_choose(k, j) + f64::from(j) * p.ln() + f64::from(k - j) * (1.0 - p).ln()).exp()
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ceil_log2_matches_hand_values() {
        assert_eq!(
            [1, 2, 3, 4, 5, 200].map(ceil_log2),
            [0, 1, 2, 2, 3, 8] // 2^8 = 256 is the first power >= 200
        );
    }

    #[test]
    fn refuses_guard_bits_that_overflow_the_ring_width() {
        // 8 + ceil(log2 3) + (u32::MAX - 5) = u32::MAX + 5: past u32, so too wide.
        let config = PlanConfig {
            round: RoundId(1),
            seed: [7; 32],
            cohort: (0..3).map(|i| StoreId(format!("store-{i}"))).collect(),
            masking: Masking::Secure,
            degree: 2,
            threshold: 2,
            min_survivors: 2,
            dimension: 4,
            kept: None,
            quant_bits: 8,
            clip: 1.0,
            guard_bits: 4_294_967_290,
            noise_stddev: 0.0,
        };
        assert_eq!(
            SecAggPlan::new(config).err(),
            Some(PlanError::RingTooWide(u32::MAX))
        );
    }

    #[test]
    fn binomial_tail_matches_hand_value() {
        // P[Bin(4, 1/2) < 2] = (1 + 4) / 16.
        assert!((binomial_below(4, 0.5, 2) - 5.0 / 16.0).abs() < 1e-12);
    }
}
