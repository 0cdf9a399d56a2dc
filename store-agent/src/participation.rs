//! Whether the store takes part in a round it was offered, and if not, why.
//!
//! A store trains only when it was selected, its runtime meets the plan's minimum, the
//! store's own clock is inside its training window, and the round would not take its
//! record-level epsilon past its budget. The reasons are the ones an operator reads in the
//! log and the audit trail, checked in that order.

use std::fmt;

use fedmesh_protocol::accountant::{AccountantError, RdpAccountant};
use jiff::Timestamp;

use crate::dp;
use crate::task::DpConfig;
use crate::window::TrainingWindow;

/// Why a store declined a round.
#[derive(Debug, Clone, PartialEq)]
pub enum Decline {
    /// Core did not select the store for this round.
    NotSelected,
    /// The plan needs a newer store-agent runtime.
    RuntimeTooOld {
        /// This agent's version.
        have: semver::Version,
        /// The plan's minimum.
        need: semver::Version,
    },
    /// The store's local clock is outside its training window.
    OutsideWindow {
        /// When the window next opens.
        opens_at: Timestamp,
    },
    /// The round would take the store's epsilon past its budget.
    OverBudget {
        /// Epsilon after the round, at the budget's delta.
        after: f64,
        /// The store's budget.
        budget: f64,
    },
}

impl fmt::Display for Decline {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotSelected => f.write_str("not selected for this round"),
            Self::RuntimeTooOld { have, need } => {
                write!(f, "runtime {have} is older than the plan's minimum {need}")
            }
            Self::OutsideWindow { opens_at } => {
                write!(f, "outside the training window (opens at {opens_at})")
            }
            Self::OverBudget { after, budget } => {
                write!(
                    f,
                    "epsilon would reach {after:.3}, over the budget of {budget}"
                )
            }
        }
    }
}

/// What the store knows about itself when a round is offered.
#[derive(Debug, Clone)]
pub struct StoreState<'a> {
    /// This agent's runtime version.
    pub runtime: &'a semver::Version,
    /// The store's training window.
    pub window: &'a TrainingWindow,
    /// Record-level epsilon budget.
    pub budget: f64,
    /// The delta the budget is stated at.
    pub delta: f64,
    /// What the store has spent so far, in RDP.
    pub spent: &'a RdpAccountant,
    /// Rows the store would train on.
    pub examples: usize,
}

/// What the plan asks of the store.
#[derive(Debug, Clone)]
pub struct RoundAsk<'a> {
    /// Whether core selected this store.
    pub selected: bool,
    /// The oldest runtime the plan accepts.
    pub min_runtime: &'a semver::Version,
    /// Local epochs.
    pub epochs: usize,
    /// DP-SGD settings, if the task protects records.
    pub dp: Option<&'a DpConfig>,
}

/// Decides whether to take part; on success returns the epsilon the store will have spent
/// after the round (unchanged when the task runs without DP-SGD).
///
/// # Errors
///
/// `Ok(Err(decline))` says why the store declines; the outer error is an accountant error
/// for DP parameters out of range (a malformed plan).
pub fn decide(
    store: &StoreState<'_>,
    ask: &RoundAsk<'_>,
    now: Timestamp,
) -> Result<Result<f64, Decline>, AccountantError> {
    if !ask.selected {
        return Ok(Err(Decline::NotSelected));
    }
    if store.runtime < ask.min_runtime {
        return Ok(Err(Decline::RuntimeTooOld {
            have: store.runtime.clone(),
            need: ask.min_runtime.clone(),
        }));
    }
    if !store.window.contains(now) {
        return Ok(Err(Decline::OutsideWindow {
            opens_at: store.window.next_open(now),
        }));
    }

    let mut after = store.spent.clone();
    if let Some(dp_config) = ask.dp {
        let (q, steps) = dp::schedule(store.examples, dp_config.expected_batch_size, ask.epochs);
        if steps > 0 {
            after.compose_poisson_gaussian(q, dp_config.noise_multiplier, steps as u64)?;
        }
    }
    let epsilon = if after.is_empty() {
        0.0
    } else {
        after.epsilon(store.delta)?
    };
    if epsilon > store.budget {
        return Ok(Err(Decline::OverBudget {
            after: epsilon,
            budget: store.budget,
        }));
    }
    Ok(Ok(epsilon))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn version(s: &str) -> semver::Version {
        semver::Version::parse(s).expect("version")
    }

    fn dp_config() -> DpConfig {
        DpConfig {
            clip_norm: 1.0,
            noise_multiplier: 1.0,
            expected_batch_size: 64,
            noise_seed: None,
        }
    }

    struct Fixture {
        runtime: semver::Version,
        window: TrainingWindow,
        spent: RdpAccountant,
    }

    impl Fixture {
        fn new() -> Self {
            Self {
                runtime: version("1.10.0"),
                window: TrainingWindow::new("01:00-04:00", "America/Chicago").expect("window"),
                spent: RdpAccountant::new(),
            }
        }

        fn store(&self, budget: f64) -> StoreState<'_> {
            StoreState {
                runtime: &self.runtime,
                window: &self.window,
                budget,
                delta: 1e-5,
                spent: &self.spent,
                examples: 1070,
            }
        }
    }

    // 2026-06-10 02:00 CDT, inside 01:00-04:00 in Chicago.
    const INSIDE: &str = "2026-06-10T07:00:00Z";

    fn at(s: &str) -> Timestamp {
        s.parse().expect("timestamp")
    }

    #[test]
    fn takes_part_and_reports_the_epsilon_after_the_round() {
        let fx = Fixture::new();
        let (min, dp) = (version("1.4.2"), dp_config());
        let ask = RoundAsk {
            selected: true,
            min_runtime: &min,
            epochs: 12,
            dp: Some(&dp),
        };
        let epsilon = decide(&fx.store(8.0), &ask, at(INSIDE))
            .expect("plan")
            .expect("joins");
        // 1,070 rows, batch 64, 12 epochs: 192 steps at q = 64/1070; the accountant (checked
        // against dp-accounting 0.6) gives 6.329 at delta 1e-5.
        assert!((epsilon - 6.329).abs() < 1e-3, "{epsilon}");
    }

    #[test]
    fn declines_with_each_reason_in_order() {
        let fx = Fixture::new();
        let (old, new, dp) = (version("1.4.2"), version("1.11.0"), dp_config());
        let ask = |selected, min| RoundAsk {
            selected,
            min_runtime: min,
            epochs: 12,
            dp: Some(&dp),
        };
        let decide_at = |ask: &RoundAsk<'_>, budget, now| {
            decide(&fx.store(budget), ask, at(now)).expect("plan")
        };

        assert_eq!(
            decide_at(&ask(false, &old), 8.0, INSIDE),
            Err(Decline::NotSelected)
        );
        // Semantic versions: 1.10.0 is older than 1.11.0 (and newer than 1.4.2 above).
        assert_eq!(
            decide_at(&ask(true, &new), 8.0, INSIDE),
            Err(Decline::RuntimeTooOld {
                have: version("1.10.0"),
                need: version("1.11.0"),
            })
        );
        // 12:00 CDT; the window opens at 01:00 CDT the next day (06:00Z).
        assert_eq!(
            decide_at(&ask(true, &old), 8.0, "2026-06-10T17:00:00Z"),
            Err(Decline::OutsideWindow {
                opens_at: at("2026-06-11T06:00:00Z"),
            })
        );
        match decide_at(&ask(true, &old), 6.0, INSIDE) {
            Err(Decline::OverBudget { after, budget }) => {
                assert!((after - 6.329).abs() < 1e-3 && budget == 6.0, "{after}");
            }
            other => panic!("expected over budget, got {other:?}"),
        }
    }

    #[test]
    fn past_spending_counts_against_the_budget() {
        let mut fx = Fixture::new();
        // One earlier round of the same size: two rounds compose to more than 8.
        fx.spent
            .compose_poisson_gaussian(64.0 / 1070.0, 1.0, 192)
            .expect("compose");
        let (min, dp) = (version("1.0.0"), dp_config());
        let ask = RoundAsk {
            selected: true,
            min_runtime: &min,
            epochs: 12,
            dp: Some(&dp),
        };
        let outcome = decide(&fx.store(8.0), &ask, at(INSIDE)).expect("plan");
        assert!(
            matches!(outcome, Err(Decline::OverBudget { .. })),
            "{outcome:?}"
        );
        // Without DP-SGD the round adds no record-level charge.
        let plain = RoundAsk { dp: None, ..ask };
        let spent = decide(&fx.store(8.0), &plain, at(INSIDE))
            .expect("plan")
            .expect("joins");
        assert!((spent - 6.329).abs() < 1e-3, "{spent}");
    }
}
