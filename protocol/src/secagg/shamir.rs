//! Shamir secret sharing of 32-byte secrets over GF(p), p = 2^61 - 1.
//!
//! A secret is cut into five chunks of at most 56 bits (7, 7, 7, 7 and 4 bytes), each below
//! p, and each chunk is shared with its own random polynomial of degree `t - 1`. Any `t`
//! shares give the secret back by Lagrange interpolation at zero; `t - 1` shares are
//! uniformly distributed whatever the secret, so they say nothing about it. The Mersenne
//! prime keeps multiplication to one 128-bit product and two folds.

use rand_core::{CryptoRng, RngCore};
use thiserror::Error;
use zeroize::Zeroize;

/// The field modulus, the Mersenne prime 2^61 - 1.
pub const MODULUS: u64 = (1 << 61) - 1;

/// Number of field elements a 32-byte secret is cut into.
const CHUNKS: usize = 5;

/// Bytes per chunk; 7 bytes (56 bits) always lie below the modulus.
const CHUNK_BYTES: usize = 7;

/// Length of an encoded share: the x coordinate and one y per chunk, little-endian u64s.
pub const SHARE_LEN: usize = 8 * (1 + CHUNKS);

/// Why a share could not be made, decoded or combined.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ShamirError {
    /// The threshold is zero or larger than the number of holders.
    #[error("threshold {threshold} is not between 1 and the {holders} share holders")]
    BadThreshold {
        /// The threshold asked for.
        threshold: usize,
        /// The number of holders.
        holders: usize,
    },
    /// A holder's x coordinate is zero (the secret itself) or not a field element.
    #[error("share x coordinate {0} is zero or outside the field")]
    BadX(u64),
    /// Two shares (or two holders) have the same x coordinate.
    #[error("two shares have the same x coordinate {0}")]
    DuplicateX(u64),
    /// Fewer shares than the threshold were given.
    #[error("{have} shares given, {need} needed")]
    TooFewShares {
        /// Shares given.
        have: usize,
        /// Threshold.
        need: usize,
    },
    /// Encoded share bytes have the wrong length or a y value outside the field.
    #[error("malformed share: {0}")]
    Malformed(&'static str),
    /// Interpolation produced a chunk that no 32-byte secret has: the shares disagree.
    #[error("shares are inconsistent: they do not interpolate to a 32-byte secret")]
    Inconsistent,
}

/// One holder's share of a 32-byte secret.
#[derive(Clone, PartialEq, Eq)]
pub struct Share {
    /// The holder's evaluation point, never zero.
    pub x: u64,
    /// The polynomial values at `x`, one per chunk.
    pub y: [u64; CHUNKS],
}

impl Share {
    /// Encodes the share as [`SHARE_LEN`] bytes.
    pub fn to_bytes(&self) -> [u8; SHARE_LEN] {
        let mut out = [0u8; SHARE_LEN];
        out[..8].copy_from_slice(&self.x.to_le_bytes());
        for (i, y) in self.y.iter().enumerate() {
            out[8 * (i + 1)..8 * (i + 2)].copy_from_slice(&y.to_le_bytes());
        }
        out
    }

    /// Decodes a share from untrusted bytes.
    ///
    /// # Errors
    ///
    /// [`ShamirError::Malformed`] for a wrong length or a value outside the field,
    /// [`ShamirError::BadX`] for a zero x coordinate.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, ShamirError> {
        if bytes.len() != SHARE_LEN {
            return Err(ShamirError::Malformed("wrong length"));
        }
        let word = |i: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&bytes[8 * i..8 * (i + 1)]);
            u64::from_le_bytes(w)
        };
        let x = word(0);
        if x == 0 || x >= MODULUS {
            return Err(ShamirError::BadX(x));
        }
        let mut y = [0u64; CHUNKS];
        for (i, slot) in y.iter_mut().enumerate() {
            *slot = word(i + 1);
            if *slot >= MODULUS {
                return Err(ShamirError::Malformed("y value outside the field"));
            }
        }
        Ok(Self { x, y })
    }
}

impl Drop for Share {
    fn drop(&mut self) {
        self.y.zeroize();
    }
}

impl std::fmt::Debug for Share {
    // The values are secret material; only the holder's point is printed.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Share")
            .field("x", &self.x)
            .finish_non_exhaustive()
    }
}

/// Shares `secret` among holders at points `xs` so that any `threshold` of them recover it.
///
/// # Errors
///
/// [`ShamirError::BadThreshold`], [`ShamirError::BadX`] or [`ShamirError::DuplicateX`] when
/// the parameters make no sharing.
pub fn share<R: RngCore + CryptoRng>(
    secret: &[u8; 32],
    threshold: usize,
    xs: &[u64],
    rng: &mut R,
) -> Result<Vec<Share>, ShamirError> {
    check_points(threshold, xs)?;
    let mut coefficients = vec![[0u64; CHUNKS]; threshold];
    coefficients[0] = chunks_of(secret);
    for row in coefficients.iter_mut().skip(1) {
        for c in row.iter_mut() {
            *c = random_element(rng);
        }
    }
    let shares = evaluate(&coefficients, xs);
    for row in coefficients.iter_mut() {
        row.zeroize();
    }
    Ok(shares)
}

/// Recovers a secret from at least `threshold` shares (the first `threshold` by x are used).
///
/// # Errors
///
/// [`ShamirError::TooFewShares`], [`ShamirError::DuplicateX`], or
/// [`ShamirError::Inconsistent`] when the shares cannot come from one 32-byte secret.
pub fn reconstruct(shares: &[Share], threshold: usize) -> Result<[u8; 32], ShamirError> {
    if threshold == 0 || shares.len() < threshold {
        return Err(ShamirError::TooFewShares {
            have: shares.len(),
            need: threshold.max(1),
        });
    }
    let mut used: Vec<&Share> = shares.iter().collect();
    used.sort_by_key(|s| s.x);
    for pair in used.windows(2) {
        if pair[0].x == pair[1].x {
            return Err(ShamirError::DuplicateX(pair[0].x));
        }
    }
    used.truncate(threshold);

    // Lagrange basis at zero: l_j = prod_{m != j} x_m / (x_m - x_j).
    let mut chunks = [0u64; CHUNKS];
    for (j, sj) in used.iter().enumerate() {
        let mut num = 1u64;
        let mut den = 1u64;
        for (m, sm) in used.iter().enumerate() {
            if m != j {
                num = mul(num, sm.x);
                den = mul(den, sub(sm.x, sj.x));
            }
        }
        let basis = mul(num, inverse(den));
        for (c, y) in chunks.iter_mut().zip(sj.y.iter()) {
            *c = add(*c, mul(basis, *y));
        }
    }
    let secret = secret_of(&chunks);
    chunks.zeroize();
    secret
}

/// Checks threshold and evaluation points before sharing.
fn check_points(threshold: usize, xs: &[u64]) -> Result<(), ShamirError> {
    if threshold == 0 || threshold > xs.len() {
        return Err(ShamirError::BadThreshold {
            threshold,
            holders: xs.len(),
        });
    }
    let mut sorted = xs.to_vec();
    sorted.sort_unstable();
    for pair in sorted.windows(2) {
        if pair[0] == pair[1] {
            return Err(ShamirError::DuplicateX(pair[0]));
        }
    }
    match sorted.iter().find(|&&x| x == 0 || x >= MODULUS) {
        Some(&x) => Err(ShamirError::BadX(x)),
        None => Ok(()),
    }
}

/// Evaluates the chunk polynomials (coefficients lowest degree first) at every point.
fn evaluate(coefficients: &[[u64; CHUNKS]], xs: &[u64]) -> Vec<Share> {
    xs.iter()
        .map(|&x| {
            // Horner's rule, highest coefficient first.
            let mut y = [0u64; CHUNKS];
            for row in coefficients.iter().rev() {
                for (acc, c) in y.iter_mut().zip(row.iter()) {
                    *acc = add(mul(*acc, x), *c);
                }
            }
            Share { x, y }
        })
        .collect()
}

fn chunks_of(secret: &[u8; 32]) -> [u64; CHUNKS] {
    let mut out = [0u64; CHUNKS];
    for (i, piece) in secret.chunks(CHUNK_BYTES).enumerate() {
        let mut w = [0u8; 8];
        w[..piece.len()].copy_from_slice(piece);
        out[i] = u64::from_le_bytes(w);
    }
    out
}

fn secret_of(chunks: &[u64; CHUNKS]) -> Result<[u8; 32], ShamirError> {
    let mut out = [0u8; 32];
    for (i, piece) in out.chunks_mut(CHUNK_BYTES).enumerate() {
        let bytes = chunks[i].to_le_bytes();
        // Anything above the chunk's width means the shares were not of one secret.
        if bytes[piece.len()..].iter().any(|&b| b != 0) {
            return Err(ShamirError::Inconsistent);
        }
        piece.copy_from_slice(&bytes[..piece.len()]);
    }
    Ok(out)
}

/// A uniform field element, by rejection of the one 61-bit value that is not below p.
pub(crate) fn random_element<R: RngCore>(rng: &mut R) -> u64 {
    loop {
        let v = rng.next_u64() >> 3;
        if v < MODULUS {
            return v;
        }
    }
}

pub(crate) fn add(a: u64, b: u64) -> u64 {
    let s = a + b;
    if s >= MODULUS { s - MODULUS } else { s }
}

pub(crate) fn sub(a: u64, b: u64) -> u64 {
    if a >= b { a - b } else { a + MODULUS - b }
}

pub(crate) fn mul(a: u64, b: u64) -> u64 {
    // 2^61 = 1 (mod p), so the high part folds back onto the low part.
    let p = u128::from(a) * u128::from(b);
    let folded = (p as u64 & MODULUS) + (p >> 61) as u64;
    if folded >= MODULUS {
        folded - MODULUS
    } else {
        folded
    }
}

/// The inverse by Fermat's little theorem; the caller never passes zero.
fn inverse(a: u64) -> u64 {
    let mut result = 1u64;
    let mut base = a;
    let mut e = MODULUS - 2;
    while e > 0 {
        if e & 1 == 1 {
            result = mul(result, base);
        }
        base = mul(base, base);
        e >>= 1;
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand_chacha::ChaCha20Rng;
    use rand_core::{RngCore, SeedableRng};

    fn rng(seed: u64) -> ChaCha20Rng {
        ChaCha20Rng::seed_from_u64(seed)
    }

    #[test]
    fn field_inverse_and_mul_agree() {
        let mut r = rng(1);
        for _ in 0..1000 {
            let a = random_element(&mut r);
            if a != 0 {
                assert_eq!(mul(a, inverse(a)), 1);
            }
        }
        // (p - 1)^2 = 1 (mod p), computed by hand from (-1)^2.
        assert_eq!(mul(MODULUS - 1, MODULUS - 1), 1);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn any_threshold_subset_reconstructs(
            secret in any::<[u8; 32]>(),
            holders in 1usize..20,
            t_frac in 0.0f64..1.0,
            seed in any::<u64>(),
            pick_seed in any::<u64>(),
        ) {
            let t = 1 + ((holders - 1) as f64 * t_frac) as usize;
            let xs: Vec<u64> = (1..=holders as u64).map(|x| x * 7919).collect();
            let shares = share(&secret, t, &xs, &mut rng(seed)).unwrap();
            // A random t-subset, chosen by a seeded shuffle.
            let mut order: Vec<usize> = (0..holders).collect();
            let mut pr = rng(pick_seed);
            for i in (1..order.len()).rev() {
                order.swap(i, (pr.next_u64() % (i as u64 + 1)) as usize);
            }
            let subset: Vec<Share> = order[..t].iter().map(|&i| shares[i].clone()).collect();
            prop_assert_eq!(reconstruct(&subset, t).unwrap(), secret);
            let too_few = matches!(
                reconstruct(&subset[..t - 1], t),
                Err(ShamirError::TooFewShares { .. })
            );
            prop_assert!(too_few);
        }

        /// Perfect secrecy: for t - 1 shares of secret A and any other secret B there is
        /// exactly one polynomial with constant B through those shares, so the same t - 1
        /// shares arise from sharing B with (different, equally likely) coefficients.
        #[test]
        fn fewer_than_threshold_shares_fit_every_secret(
            a in any::<[u8; 32]>(),
            b in any::<[u8; 32]>(),
            t in 2usize..8,
            seed in any::<u64>(),
        ) {
            let xs: Vec<u64> = (1..=t as u64 + 2).collect();
            let shares = share(&a, t, &xs, &mut rng(seed)).unwrap();
            let seen = &shares[..t - 1];

            // Interpolate through (0, B) and the t - 1 seen shares: t points, degree t - 1.
            let b_chunks = chunks_of(&b);
            let coefficients = interpolate_coefficients(&b_chunks, seen);
            prop_assert_eq!(coefficients.len(), t);
            prop_assert_eq!(coefficients[0], b_chunks);

            // Sharing B with those coefficients reproduces exactly the seen shares.
            let redone = evaluate(&coefficients, &seen.iter().map(|s| s.x).collect::<Vec<_>>());
            for (r, s) in redone.iter().zip(seen.iter()) {
                prop_assert_eq!(r.y, s.y);
            }
        }

        #[test]
        fn share_bytes_round_trip_and_reject_garbage(
            bytes in proptest::collection::vec(any::<u8>(), 0..64),
        ) {
            if let Ok(s) = Share::from_bytes(&bytes) {
                prop_assert_eq!(s.to_bytes().to_vec(), bytes);
            }
        }
    }

    /// Coefficients (lowest first) of the polynomial through (0, c0) and the given shares.
    fn interpolate_coefficients(c0: &[u64; CHUNKS], shares: &[Share]) -> Vec<[u64; CHUNKS]> {
        let mut xs = vec![0u64];
        xs.extend(shares.iter().map(|s| s.x));
        let n = xs.len();
        let mut out = vec![[0u64; CHUNKS]; n];
        for k in 0..CHUNKS {
            let mut ys = vec![c0[k]];
            ys.extend(shares.iter().map(|s| s.y[k]));
            // Sum of y_j * L_j(X), with L_j expanded into monomials.
            for j in 0..n {
                let mut poly = vec![1u64];
                let mut den = 1u64;
                for m in 0..n {
                    if m == j {
                        continue;
                    }
                    let mut next = vec![0u64; poly.len() + 1];
                    for (i, &c) in poly.iter().enumerate() {
                        next[i + 1] = add(next[i + 1], c);
                        next[i] = sub(next[i], mul(c, xs[m]));
                    }
                    poly = next;
                    den = mul(den, sub(xs[j], xs[m]));
                }
                let scale = mul(ys[j], inverse(den));
                for (i, c) in poly.iter().enumerate() {
                    out[i][k] = add(out[i][k], mul(*c, scale));
                }
            }
        }
        out
    }

    #[test]
    fn detects_a_tampered_share_in_the_last_chunk() {
        let secret = [0xabu8; 32];
        let xs = [1, 2, 3];
        let mut shares = share(&secret, 2, &xs, &mut rng(3)).unwrap();
        shares[0].y[CHUNKS - 1] = add(shares[0].y[CHUNKS - 1], 0x0123_4567_89ab_cdef);
        // The last chunk is 32 bits wide, so a tampered value passes with probability 2^-29
        // (2^32 of the 2^61 field values); core also checks a recovered masking key against
        // its public key.
        assert_eq!(reconstruct(&shares[..2], 2), Err(ShamirError::Inconsistent));
    }

    #[test]
    fn rejects_duplicate_and_zero_points() {
        let s = [1u8; 32];
        assert_eq!(
            share(&s, 2, &[1, 1, 2], &mut rng(0)).unwrap_err(),
            ShamirError::DuplicateX(1)
        );
        assert_eq!(
            share(&s, 2, &[0, 1, 2], &mut rng(0)).unwrap_err(),
            ShamirError::BadX(0)
        );
        assert!(matches!(
            share(&s, 4, &[1, 2, 3], &mut rng(0)),
            Err(ShamirError::BadThreshold { .. })
        ));
    }
}
