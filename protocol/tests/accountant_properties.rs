//! Properties the accountant must have whatever the parameters: spending more never lowers
//! epsilon, more noise never raises it, and composition is addition.

use fedmesh_protocol::accountant::{RdpAccountant, dp_sgd_epsilon, noise_multiplier_for_epsilon};
use proptest::prelude::*;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(16))]

    #[test]
    fn epsilon_grows_with_steps(sigma in 0.6f64..5.0, q in 0.001f64..1.0, steps in 1u64..500) {
        let fewer = dp_sgd_epsilon(sigma, q, steps, 1e-5).unwrap();
        let more = dp_sgd_epsilon(sigma, q, steps + 1, 1e-5).unwrap();
        prop_assert!(more >= fewer, "{more} < {fewer}");
    }

    #[test]
    fn epsilon_falls_with_noise(sigma in 0.6f64..5.0, q in 0.001f64..1.0, steps in 1u64..500) {
        let less_noise = dp_sgd_epsilon(sigma, q, steps, 1e-5).unwrap();
        let more_noise = dp_sgd_epsilon(sigma * 1.1, q, steps, 1e-5).unwrap();
        prop_assert!(more_noise <= less_noise, "{more_noise} > {less_noise}");
    }

    #[test]
    fn composing_in_parts_equals_composing_at_once(
        sigma in 0.6f64..5.0,
        q in 0.001f64..0.5,
        first in 1u64..300,
        second in 1u64..300,
    ) {
        let mut parts = RdpAccountant::new();
        parts.compose_poisson_gaussian(q, sigma, first).unwrap();
        let mut rest = RdpAccountant::new();
        rest.compose_poisson_gaussian(q, sigma, second).unwrap();
        parts.compose(&rest).unwrap();
        let whole = dp_sgd_epsilon(sigma, q, first + second, 1e-5).unwrap();
        let split = parts.epsilon(1e-5).unwrap();
        prop_assert!(((whole - split) / whole).abs() < 1e-12, "{whole} vs {split}");
    }

    #[test]
    fn noise_search_meets_its_target(
        target in 0.5f64..10.0,
        q in 0.001f64..0.3,
        steps in 1u64..300,
    ) {
        let sigma = noise_multiplier_for_epsilon(target, q, steps, 1e-5).unwrap();
        prop_assert!(dp_sgd_epsilon(sigma, q, steps, 1e-5).unwrap() <= target);
    }
}
