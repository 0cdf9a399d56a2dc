//! Retry timing and connection liveness.
//!
//! Liveness is a transport matter, separate from training progress: a store that trains for
//! an hour keeps its connection because keepalives flow, and a peer that vanishes is noticed
//! within [`KeepAlive::timeout`] whatever the application is doing.

use std::time::Duration;

use rand::Rng;

/// Capped exponential backoff with full jitter.
///
/// The wait before retry `n` (counting from 0) is uniform in `[0, min(cap, base * 2^n)]`, so
/// many stores that lost the same PoP do not come back in lockstep.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    /// The ceiling of the first wait.
    pub base: Duration,
    /// The largest ceiling any wait can have.
    pub cap: Duration,
    /// How many attempts in total, the first included; at least 1.
    pub max_attempts: u32,
}

impl RetryPolicy {
    /// The wait before retry number `retry` (0 for the first retry).
    pub fn delay(&self, retry: u32, rng: &mut impl Rng) -> Duration {
        let ceiling = self.ceiling(retry);
        if ceiling.is_zero() {
            return Duration::ZERO;
        }
        rng.gen_range(Duration::ZERO..=ceiling)
    }

    /// The upper bound of the wait before retry number `retry`: `min(cap, base * 2^retry)`.
    pub fn ceiling(&self, retry: u32) -> Duration {
        // Past 2^31 the product has long passed any sensible cap.
        let factor = 1u32.checked_shl(retry.min(31)).unwrap_or(u32::MAX);
        self.base.saturating_mul(factor).min(self.cap)
    }
}

impl Default for RetryPolicy {
    /// 200 ms first ceiling, 30 s cap, 8 attempts: about two minutes of trying at most.
    fn default() -> Self {
        Self {
            base: Duration::from_millis(200),
            cap: Duration::from_secs(30),
            max_attempts: 8,
        }
    }
}

/// Keepalive timing for both HTTP/3 (QUIC PINGs) and HTTP/2 (PING frames).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KeepAlive {
    /// How often an idle connection sends a ping. Must be well below `timeout`, and below
    /// the NAT binding lifetime of store routers (often 30 s for UDP).
    pub interval: Duration,
    /// How long without hearing from the peer before the connection is declared dead.
    pub timeout: Duration,
}

impl Default for KeepAlive {
    /// Ping every 5 s, dead after 15 s of silence.
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(5),
            timeout: Duration::from_secs(15),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand::SeedableRng;

    #[test]
    fn ceiling_doubles_then_stops_at_cap() {
        let policy = RetryPolicy {
            base: Duration::from_millis(100),
            cap: Duration::from_millis(1000),
            max_attempts: 10,
        };
        // 100 * 2^n: 100, 200, 400, 800, then 1600 capped to 1000.
        let ceilings: Vec<u128> = (0..6).map(|n| policy.ceiling(n).as_millis()).collect();
        assert_eq!(ceilings, vec![100, 200, 400, 800, 1000, 1000]);
    }

    proptest! {
        #[test]
        fn delay_never_exceeds_ceiling(
            seed in any::<u64>(),
            retry in 0u32..200,
            base in 1u64..5000,
        ) {
            let policy = RetryPolicy {
                base: Duration::from_millis(base),
                cap: Duration::from_secs(30),
                max_attempts: 8,
            };
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let delay = policy.delay(retry, &mut rng);
            prop_assert!(delay <= policy.ceiling(retry));
            prop_assert!(delay <= policy.cap);
        }
    }

    #[test]
    fn delays_are_spread_over_the_whole_window() {
        // Full jitter: with 1,000 draws from [0, 1 s], both the lowest and highest tenth of
        // the window are hit (probability of missing one is 0.9^1000, about 1e-46).
        let policy = RetryPolicy {
            base: Duration::from_secs(1),
            cap: Duration::from_secs(1),
            max_attempts: 2,
        };
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let draws: Vec<Duration> = (0..1000).map(|_| policy.delay(0, &mut rng)).collect();
        assert!(draws.iter().any(|d| *d < Duration::from_millis(100)));
        assert!(draws.iter().any(|d| *d > Duration::from_millis(900)));
    }
}
