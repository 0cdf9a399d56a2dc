//! Distributed differential-privacy noise: exact discrete Gaussian samples in the ring.
//!
//! Each store adds discrete Gaussian noise N_Z(0, s^2) to every coordinate of its quantised
//! update, with s^2 the planned total variance divided by the planned minimum number of
//! surviving stores. Fedmesh uses the discrete Gaussian rather than Skellam because it has an
//! exact sampler that needs only integer arithmetic and uniform random bits, with a constant
//! expected number of draws at any variance (Canonne, Kamath and Steinke, NeurIPS 2020);
//! Skellam's closure under sums is exact, but exact Poisson sampling at the variances a
//! cohort needs costs time linear in the mean or falls back to floating point. The sum of m
//! discrete Gaussian shares is within tau = 10 * sum_{k=1}^{m-1} exp(-2 pi^2 s^2 k/(k+1)) of
//! N_Z(0, m s^2) in every privacy measure (Kairouz, Liu and Steinke, ICML 2021); for s^2 >= 4
//! tau is below 1e-15 at any cohort size, and it is reported so the ledger can charge it.
//!
//! The variance is held as an exact rational `num / 2^10`, rounded up from the plan, so the
//! guarantee is never below what was planned.

use rand_core::{CryptoRng, RngCore};
use serde::{Deserialize, Serialize};

/// Denominator of every per-store variance: s^2 = num / 2^10.
pub const VARIANCE_DENOMINATOR: u64 = 1 << 10;

/// The largest per-store variance accepted (2^40 ring units squared, s of about 10^6), which
/// keeps every intermediate of the sampler inside 128-bit integers.
pub const MAX_VARIANCE: f64 = (1u64 << 40) as f64;

/// The noise a round is guaranteed to carry, for the ledger.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct GuaranteedNoise {
    /// Standard deviation of the noise in the decoded (float) sum, counting only the stores
    /// that are guaranteed to contribute.
    pub stddev: f64,
    /// The same, in ring units (quantised), squared.
    pub ring_variance: f64,
    /// How many stores' shares the figure counts on.
    pub stores: u32,
    /// Total-variation-style distance between the sum of shares and one discrete Gaussian of
    /// the summed variance (Kairouz, Liu and Steinke 2021, Theorem 2's tau).
    pub tau: f64,
}

/// An exact discrete Gaussian sampler of variance parameter `num / 2^10`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiscreteGaussian {
    num: u64,
    /// floor(sigma) + 1, the scale of the discrete Laplace proposal.
    t: u64,
}

impl DiscreteGaussian {
    /// A sampler of variance parameter `num / 2^10`; `num` is at least 1.
    pub fn new(num: u64) -> Self {
        let num = num.max(1);
        let t = isqrt(num / VARIANCE_DENOMINATOR) + 1;
        Self { num, t }
    }

    /// The variance parameter, sigma^2.
    pub fn variance(&self) -> f64 {
        self.num as f64 / VARIANCE_DENOMINATOR as f64
    }

    /// Draws one sample (Canonne, Kamath and Steinke 2020, Algorithm 3): a discrete Laplace
    /// proposal of scale t, accepted with probability exp(-(|z| - sigma^2/t)^2 / (2 sigma^2)).
    pub fn sample<R: RngCore + CryptoRng>(&self, rng: &mut R) -> i64 {
        let den = u128::from(VARIANCE_DENOMINATOR);
        let num = u128::from(self.num);
        let t = u128::from(self.t);
        loop {
            // 1. Discrete Laplace of scale t: U uniform below t, accepted with exp(-U/t),
            //    plus t times a geometric count of exp(-1) successes.
            let u = uniform_below(rng, t);
            if !bernoulli_exp(rng, u, t) {
                continue;
            }
            let mut v = 0u128;
            while bernoulli_exp(rng, 1, 1) {
                v += 1;
            }
            let x = u + t * v;
            let negative = rng.next_u32() & 1 == 1;
            if negative && x == 0 {
                continue;
            }

            // 2. Accept with exp(-gamma), gamma = (x t den - num)^2 / (2 num den t^2). A
            //    proposal so far out that this overflows has probability below 2^-100 of
            //    acceptance; it is rejected.
            let Some(gamma) = acceptance_exponent(x, t, num, den) else {
                continue;
            };
            if bernoulli_exp(rng, gamma.0, gamma.1) {
                let x = i64::try_from(x).unwrap_or(i64::MAX);
                return if negative { -x } else { x };
            }
        }
    }
}

/// tau of Kairouz, Liu and Steinke (2021) for `m` shares of variance `s2` each.
pub fn sum_distance(s2: f64, m: u32) -> f64 {
    let pi2 = std::f64::consts::PI * std::f64::consts::PI;
    (1..m.max(1))
        .map(|k| {
            let k = f64::from(k);
            (-2.0 * pi2 * s2 * k / (k + 1.0)).exp()
        })
        .sum::<f64>()
        * 10.0
}

fn acceptance_exponent(x: u128, t: u128, num: u128, den: u128) -> Option<(u128, u128)> {
    let scaled = x.checked_mul(t)?.checked_mul(den)?;
    let diff = scaled.abs_diff(num);
    let top = diff.checked_mul(diff)?;
    let bottom = num
        .checked_mul(den)?
        .checked_mul(t)?
        .checked_mul(t)?
        .checked_mul(2)?;
    Some((top, bottom))
}

/// A Bernoulli trial of probability exp(-n/d), exactly (Canonne et al., Algorithm 2).
fn bernoulli_exp<R: RngCore>(rng: &mut R, n: u128, d: u128) -> bool {
    if n <= d {
        // exp(-g) for g in [0, 1]: the parity of the first k with a failed Bernoulli(g/k).
        let mut k = 1u128;
        loop {
            let Some(dk) = d.checked_mul(k) else {
                return k % 2 == 1;
            };
            if uniform_below(rng, dk) >= n {
                return k % 2 == 1;
            }
            k += 1;
        }
    }
    let whole = n / d;
    for _ in 0..whole {
        if !bernoulli_exp(rng, 1, 1) {
            return false;
        }
    }
    bernoulli_exp(rng, n % d, d)
}

/// A uniform integer in `0..bound`, bound > 0, by rejection.
fn uniform_below<R: RngCore>(rng: &mut R, bound: u128) -> u128 {
    if let Ok(b) = u64::try_from(bound) {
        // Lemire's multiply-and-shift: the high word of v * b is uniform below b once the
        // low word clears 2^64 mod b, which needs a division only in the rare near-miss.
        let mut m = u128::from(rng.next_u64()) * u128::from(b);
        if (m as u64) < b {
            let floor = b.wrapping_neg() % b;
            while (m as u64) < floor {
                m = u128::from(rng.next_u64()) * u128::from(b);
            }
        }
        return m >> 64;
    }
    let zone = u128::MAX - (u128::MAX % bound);
    loop {
        let v = (u128::from(rng.next_u64()) << 64) | u128::from(rng.next_u64());
        if v < zone {
            return v % bound;
        }
    }
}

fn isqrt(v: u64) -> u64 {
    // The float root is within one of the answer; fix it up in exact arithmetic.
    let mut r = (v as f64).sqrt() as u64;
    while r.checked_mul(r).is_none_or(|s| s > v) {
        r -= 1;
    }
    while (r + 1).checked_mul(r + 1).is_some_and(|s| s <= v) {
        r += 1;
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand_chacha::ChaCha20Rng;
    use rand_core::SeedableRng;

    /// The probability mass at zero of N_Z(0, 1/4), from the definition
    /// exp(-x^2/(2 s^2)) / sum_y exp(-y^2/(2 s^2)): 1 / (1 + 2e^-2 + 2e^-8 + ...) = 0.78657.
    #[test]
    fn small_variance_puts_the_right_mass_at_zero() {
        let g = DiscreteGaussian::new(VARIANCE_DENOMINATOR / 4);
        let mut rng = ChaCha20Rng::seed_from_u64(7);
        let n = 100_000;
        let zeros = (0..n).filter(|_| g.sample(&mut rng) == 0).count() as f64;
        // Binomial sd = sqrt(n p (1 - p)) = 129.6; the bound is 6 sd.
        let expected = 0.786_57 * n as f64;
        assert!((zeros - expected).abs() < 6.0 * 129.6, "zeros {zeros}");
    }

    #[test]
    fn bernoulli_exp_matches_its_probability() {
        let mut rng = ChaCha20Rng::seed_from_u64(8);
        let n = 200_000;
        // exp(-3/2) = 0.22313; sd = sqrt(n p (1 - p)) = 186.
        let hits = (0..n).filter(|_| bernoulli_exp(&mut rng, 3, 2)).count() as f64;
        assert!(
            (hits - 0.223_13 * n as f64).abs() < 6.0 * 186.2,
            "hits {hits}"
        );
    }

    #[test]
    fn isqrt_is_floor() {
        for v in [0u64, 1, 2, 3, 4, 15, 16, 17, u64::MAX] {
            let r = isqrt(v);
            assert!(r * r <= v && (r + 1).checked_mul(r + 1).is_none_or(|s| s > v));
        }
    }
}
