//! Strategies: how a round's cohort sum becomes the next global model.
//!
//! Every strategy here has the same shape, which is what lets it run under secure
//! aggregation: each store scales its update `u_k = w_k - w` by a factor only it can compute
//! and contributes a scalar weight, the cohort adds both up (core only ever sees the sums),
//! and core moves the model by `sum_k scale_k u_k / sum_k weight_k`, either directly or as
//! the pseudo-gradient of a server optimiser.
//!
//! | strategy | store's scale | store's weight | server step |
//! | --- | --- | --- | --- |
//! | FedAvg | `n_k` | `n_k` | `w += avg` |
//! | FedProx | as FedAvg | as FedAvg | as FedAvg; `mu` goes to stores in the plan |
//! | q-FedAvg | `L F_k^q` | `q F_k^(q-1) L^2 ‖u_k‖² + L F_k^q` | `w += sum / sum` |
//! | FedAdam, FedYogi | `n_k` | `n_k` | adaptive step on the average |
//!
//! `n_k` is the store's example count and `F_k` its loss on the global model at the start
//! of the round. q-FedAvg is Algorithm 2 of Li, Sanjabi, Beirami and Smith, "Fair Resource
//! Allocation in Federated Learning" (ICLR 2020), with `Δw_k = L (w - w_k) = -L u_k`;
//! FedAdam and FedYogi are Algorithm 2 of Reddi et al., "Adaptive Federated Optimization"
//! (ICLR 2021), without bias correction and with `v` starting at `tau^2`.
//!
//! Vectors are the flat shared parameters only. Parameters a task marks local (a store's
//! own head, its embedding row) are never put in the flat vector, so no strategy can
//! aggregate them; they stay on the store. Sums are kept in f64 and one at a time, so
//! memory is a constant number of model-sized vectors whatever the cohort size.

use serde::{Deserialize, Serialize};

/// Why an aggregation step could not run; the caller passed inconsistent inputs.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum StrategyError {
    /// A vector does not have the model's length.
    #[error("vector has {got} parameters, the model has {expected}")]
    Length {
        /// The model's parameter count.
        expected: usize,
        /// The vector's parameter count.
        got: usize,
    },
    /// The cohort's total weight is zero, so there is nothing to average.
    #[error("cohort sum has no weight (no store contributed)")]
    EmptyCohort,
    /// A weight or scale is negative or not finite.
    #[error("store weight must be finite and non-negative, got {0}")]
    Weight(f64),
    /// q-FedAvg needs a positive, finite loss from each store.
    #[error("q-FedAvg needs a positive finite loss, got {0}")]
    Loss(f64),
    /// A strategy parameter is out of range.
    #[error("strategy parameter {name} is out of range: {value}")]
    Parameter {
        /// The parameter's name.
        name: &'static str,
        /// The value given.
        value: f64,
    },
}

/// Hyper-parameters of the adaptive server optimisers (Reddi et al. 2021).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AdaptiveConfig {
    /// Server learning rate.
    pub eta: f64,
    /// First-moment decay.
    pub beta1: f64,
    /// Second-moment decay.
    pub beta2: f64,
    /// Adaptivity: added to the root of the second moment, and its square seeds it.
    pub tau: f64,
}

impl Default for AdaptiveConfig {
    /// The values Reddi et al. tune around: eta 0.01, beta1 0.9, beta2 0.99, tau 1e-3.
    fn default() -> Self {
        Self {
            eta: 0.01,
            beta1: 0.9,
            beta2: 0.99,
            tau: 1e-3,
        }
    }
}

/// How the cohort sum becomes the next model.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Strategy {
    /// Average of updates weighted by example counts.
    FedAvg,
    /// FedAvg at core; stores add the proximal term `mu/2 ‖w - w_global‖²` locally.
    FedProx {
        /// Proximal coefficient, sent to stores in the plan.
        mu: f64,
    },
    /// q-FedAvg: stores with a higher loss pull harder, for fairness across stores.
    QFedAvg {
        /// Fairness exponent; 0 gives an unweighted average.
        q: f64,
        /// Lipschitz constant of the loss's gradient (the inverse local learning rate).
        lipschitz: f64,
    },
    /// FedAdam server optimiser on the FedAvg pseudo-gradient.
    FedAdam(AdaptiveConfig),
    /// FedYogi server optimiser on the FedAvg pseudo-gradient.
    FedYogi(AdaptiveConfig),
}

/// What a store reports about its update so that its contribution can be weighed.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct StoreReport {
    /// Examples the store trained on.
    pub examples: u64,
    /// Loss of the round's global model on the store's data, before training.
    pub loss: f64,
    /// Squared L2 norm of the store's update.
    pub update_norm_sq: f64,
}

/// A store's contribution factors: its update enters the sum multiplied by `scale`, and
/// `weight` enters the sum of weights.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct StoreWeight {
    /// Factor on the store's update.
    pub scale: f64,
    /// Term of the cohort's total weight.
    pub weight: f64,
}

impl Strategy {
    /// Checks the strategy's parameters.
    ///
    /// # Errors
    ///
    /// [`StrategyError::Parameter`] naming the first parameter out of range.
    pub fn validate(&self) -> Result<(), StrategyError> {
        let bad = |name, value| Err(StrategyError::Parameter { name, value });
        match *self {
            Strategy::FedAvg => Ok(()),
            Strategy::FedProx { mu } if !(mu >= 0.0 && mu.is_finite()) => bad("mu", mu),
            Strategy::FedProx { .. } => Ok(()),
            Strategy::QFedAvg { q, .. } if !(q >= 0.0 && q.is_finite()) => bad("q", q),
            Strategy::QFedAvg { lipschitz, .. } if !(lipschitz > 0.0 && lipschitz.is_finite()) => {
                bad("lipschitz", lipschitz)
            }
            Strategy::QFedAvg { .. } => Ok(()),
            Strategy::FedAdam(c) | Strategy::FedYogi(c) => c.validate(),
        }
    }

    /// The proximal coefficient stores must use, if the strategy is FedProx.
    pub fn proximal_mu(&self) -> Option<f64> {
        match *self {
            Strategy::FedProx { mu } => Some(mu),
            _ => None,
        }
    }

    /// The factors a store applies to its update under this strategy.
    ///
    /// # Errors
    ///
    /// [`StrategyError::Loss`] when q-FedAvg gets a loss that is not positive and finite,
    /// [`StrategyError::Weight`] when the result is not a finite non-negative number.
    pub fn store_weight(&self, report: &StoreReport) -> Result<StoreWeight, StrategyError> {
        let examples = report.examples as f64;
        let weight = match *self {
            Strategy::QFedAvg { q, lipschitz } => {
                if !(report.loss > 0.0 && report.loss.is_finite()) {
                    return Err(StrategyError::Loss(report.loss));
                }
                let loss_q = report.loss.powf(q);
                let lipschitz_sq = lipschitz * lipschitz;
                let h = q * report.loss.powf(q - 1.0) * lipschitz_sq * report.update_norm_sq
                    + lipschitz * loss_q;
                StoreWeight {
                    scale: lipschitz * loss_q,
                    weight: h,
                }
            }
            _ => StoreWeight {
                scale: examples,
                weight: examples,
            },
        };
        for value in [weight.scale, weight.weight] {
            if !(value >= 0.0 && value.is_finite()) {
                return Err(StrategyError::Weight(value));
            }
        }
        Ok(weight)
    }
}

impl AdaptiveConfig {
    fn validate(&self) -> Result<(), StrategyError> {
        let checks = [
            ("eta", self.eta, self.eta > 0.0),
            ("beta1", self.beta1, (0.0..1.0).contains(&self.beta1)),
            ("beta2", self.beta2, (0.0..1.0).contains(&self.beta2)),
            ("tau", self.tau, self.tau > 0.0),
        ];
        for (name, value, ok) in checks {
            if !(ok && value.is_finite()) {
                return Err(StrategyError::Parameter { name, value });
            }
        }
        Ok(())
    }
}

/// The running sum of a cohort's scaled updates and of their weights.
///
/// Holds one f64 per parameter however many stores are added.
#[derive(Debug, Clone, PartialEq)]
pub struct CohortSum {
    sum: Vec<f64>,
    weight: f64,
    stores: usize,
}

impl CohortSum {
    /// An empty sum for a model with `parameters` shared parameters.
    pub fn new(parameters: usize) -> Self {
        Self {
            sum: vec![0.0; parameters],
            weight: 0.0,
            stores: 0,
        }
    }

    /// Adds one store's update with its factors (trusted-PoP mode, or tests).
    ///
    /// # Errors
    ///
    /// [`StrategyError::Length`] for an update of the wrong length; the sum is unchanged.
    pub fn add_update(
        &mut self,
        update: &[f32],
        factors: StoreWeight,
    ) -> Result<(), StrategyError> {
        self.check_length(update.len())?;
        for (total, &u) in self.sum.iter_mut().zip(update) {
            *total += factors.scale * f64::from(u);
        }
        self.weight += factors.weight;
        self.stores += 1;
        Ok(())
    }

    /// Adds a sum that is already scaled, such as the decoded output of secure aggregation
    /// or a PoP's partial sum, with its total weight and the number of stores in it.
    ///
    /// # Errors
    ///
    /// [`StrategyError::Length`] for a vector of the wrong length and
    /// [`StrategyError::Weight`] for a weight that is negative or not finite.
    pub fn add_partial_sum(
        &mut self,
        partial: &[f32],
        weight: f64,
        stores: usize,
    ) -> Result<(), StrategyError> {
        self.check_length(partial.len())?;
        if !(weight >= 0.0 && weight.is_finite()) {
            return Err(StrategyError::Weight(weight));
        }
        for (total, &p) in self.sum.iter_mut().zip(partial) {
            *total += f64::from(p);
        }
        self.weight += weight;
        self.stores += stores;
        Ok(())
    }

    /// The running sum of scaled updates.
    pub fn sum(&self) -> &[f64] {
        &self.sum
    }

    /// Stores added so far.
    pub fn stores(&self) -> usize {
        self.stores
    }

    /// Total weight added so far.
    pub fn weight(&self) -> f64 {
        self.weight
    }

    /// Number of parameters.
    pub fn len(&self) -> usize {
        self.sum.len()
    }

    /// Whether the model has no parameters.
    pub fn is_empty(&self) -> bool {
        self.sum.is_empty()
    }

    fn check_length(&self, got: usize) -> Result<(), StrategyError> {
        if got != self.sum.len() {
            return Err(StrategyError::Length {
                expected: self.sum.len(),
                got,
            });
        }
        Ok(())
    }
}

/// A strategy with the server state it carries across rounds (the adaptive moments).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Aggregator {
    strategy: Strategy,
    /// First moment, empty until the first adaptive step.
    first_moment: Vec<f64>,
    /// Second moment, empty until the first adaptive step.
    second_moment: Vec<f64>,
}

impl Aggregator {
    /// An aggregator with fresh server state.
    ///
    /// # Errors
    ///
    /// [`StrategyError::Parameter`] for a strategy parameter out of range.
    pub fn new(strategy: Strategy) -> Result<Self, StrategyError> {
        strategy.validate()?;
        Ok(Self {
            strategy,
            first_moment: Vec::new(),
            second_moment: Vec::new(),
        })
    }

    /// The strategy.
    pub fn strategy(&self) -> &Strategy {
        &self.strategy
    }

    /// Moves `global` by the cohort's sum: the candidate model of the round.
    ///
    /// # Errors
    ///
    /// [`StrategyError::EmptyCohort`] when no weight was added and
    /// [`StrategyError::Length`] when the sum and the model differ in length; `global` is
    /// unchanged then.
    pub fn apply(&mut self, global: &mut [f32], cohort: &CohortSum) -> Result<(), StrategyError> {
        cohort.check_length(global.len())?;
        if cohort.weight <= 0.0 {
            return Err(StrategyError::EmptyCohort);
        }
        let total = cohort.weight;
        let average = cohort.sum.iter().map(|s| s / total);

        match self.strategy {
            Strategy::FedAvg | Strategy::FedProx { .. } | Strategy::QFedAvg { .. } => {
                for (w, step) in global.iter_mut().zip(average) {
                    *w = (f64::from(*w) + step) as f32;
                }
            }
            Strategy::FedAdam(config) | Strategy::FedYogi(config) => {
                let yogi = matches!(self.strategy, Strategy::FedYogi(_));
                self.adaptive_step(global, average, config, yogi);
            }
        }
        Ok(())
    }

    /// One FedAdam or FedYogi step with pseudo-gradient `delta` (Reddi et al., Alg. 2).
    fn adaptive_step(
        &mut self,
        global: &mut [f32],
        delta: impl Iterator<Item = f64>,
        config: AdaptiveConfig,
        yogi: bool,
    ) {
        if self.first_moment.len() != global.len() {
            self.first_moment = vec![0.0; global.len()];
            self.second_moment = vec![config.tau * config.tau; global.len()];
        }
        let moments = self
            .first_moment
            .iter_mut()
            .zip(self.second_moment.iter_mut());
        for ((w, d), (m, v)) in global.iter_mut().zip(delta).zip(moments) {
            *m = config.beta1 * *m + (1.0 - config.beta1) * d;
            let d2 = d * d;
            *v = if yogi {
                // Yogi moves v towards d^2 by a bounded amount instead of averaging;
                // sign(0) is 0 here, unlike f64::signum.
                let sign = if *v > d2 {
                    1.0
                } else if *v < d2 {
                    -1.0
                } else {
                    0.0
                };
                *v - (1.0 - config.beta2) * d2 * sign
            } else {
                config.beta2 * *v + (1.0 - config.beta2) * d2
            };
            *w = (f64::from(*w) + config.eta * *m / (v.sqrt() + config.tau)) as f32;
        }
    }
}
