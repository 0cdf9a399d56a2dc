//! `netlab simulate`: the federated training of the Dominick's task in one process, with no
//! network, to search and prove a training recipe before the whole mesh runs it.
//!
//! Each round runs the same library code the mesh runs, in the same order:
//! 1. core samples a cohort (the target share over-selected, as core does) and a share of it
//!    churns away;
//! 2. each store checks its record-level budget with the protocol's accountant and declines
//!    a round that would take it past the budget;
//! 3. each store trains from the global model with `store_agent::train::run_round` (FedProx,
//!    DP-SGD, its head kept under the `local` prefixes);
//! 4. its shared delta is L2-clipped and quantised into the ring by
//!    `SecAggPlan::quantise`; the sum is folded by the PoP's `RingSum` and decoded by
//!    `SecAggPlan::decode` (plain masking gives the very numbers masked aggregation does);
//! 5. core divides the sum by the survivors and applies it with `core-agg`'s `Aggregator`.
//!
//! Test RMSE is pooled over every store's test rows, each predicted by the global model with
//! that store's own head. What it leaves out: the WAN, the masks, the signatures, the PoPs;
//! the mesh's tests cover those.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use fedmesh_core_agg::strategy::{AdaptiveConfig, Aggregator, CohortSum, Strategy};
use fedmesh_protocol::accountant::RdpAccountant;
use fedmesh_protocol::ids::{RoundId, StoreId};
use fedmesh_protocol::params::{ParamLayout, Scope};
use fedmesh_protocol::secagg::{Masking, PackedVector, PlanConfig, RingSum, SecAggPlan};
use fedmesh_protocol::update;
use fedmesh_store_agent::eval::{self, Metrics};
use fedmesh_store_agent::ingest::StoreData;
use fedmesh_store_agent::pipeline;
use fedmesh_store_agent::task::{Normalisation, Optimiser, TaskConfig};
use fedmesh_store_agent::train;
use fedmesh_store_agent::weights::{NamedTensor, Weights};
use fedmesh_store_agent::{Examples, dp};
use rand::seq::index;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;
use serde::Serialize;

use crate::task_config::{self, CoreRecipe, DpRecipe, LocalRecipe, Recipe, ServerOpt};

/// Options of `netlab simulate`: a base recipe and overrides of any of its settings.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct SimulateArgs {
    /// Directory holding sales.csv.gz and stores.csv.
    #[arg(long, default_value = "data/dominicks-oj")]
    pub data: PathBuf,
    /// Feature spec (TOML); the built-in Dominick's recipe when absent.
    #[arg(long)]
    pub spec: Option<PathBuf>,
    /// Start from the DP recipe instead of the one without DP.
    #[arg(long)]
    pub dp: bool,
    /// Train without DP-SGD even when the base recipe has it.
    #[arg(long, conflicts_with = "dp")]
    pub no_dp: bool,
    /// DP-SGD noise multiplier (turns DP-SGD on).
    #[arg(long)]
    pub dp_noise: Option<f64>,
    /// DP-SGD per-example clip norm.
    #[arg(long)]
    pub dp_clip: Option<f64>,
    /// DP-SGD expected batch size.
    #[arg(long)]
    pub dp_batch: Option<usize>,
    /// Rounds.
    #[arg(long)]
    pub rounds: Option<usize>,
    /// Share of stores targeted per round.
    #[arg(long)]
    pub fraction: Option<f64>,
    /// Local epochs.
    #[arg(long)]
    pub epochs: Option<usize>,
    /// Local learning rate.
    #[arg(long)]
    pub lr: Option<f64>,
    /// Local batch size (without DP).
    #[arg(long)]
    pub batch: Option<usize>,
    /// Local optimiser: adam or sgd.
    #[arg(long, value_parser = parse_optimiser)]
    pub optimiser: Option<Optimiser>,
    /// FedProx mu.
    #[arg(long)]
    pub mu: Option<f64>,
    /// Share the output layer too (no personalised head).
    #[arg(long)]
    pub shared_head: bool,
    /// Server optimiser.
    #[arg(long, value_enum)]
    pub server_opt: Option<ServerOpt>,
    /// Server learning rate (FedAdam, FedYogi).
    #[arg(long)]
    pub server_lr: Option<f64>,
    /// L2 clip of each store's shared update.
    #[arg(long)]
    pub clip: Option<f32>,
    /// Per-coordinate clip of the quantiser.
    #[arg(long)]
    pub quant_clip: Option<f32>,
    /// Quantisation bits.
    #[arg(long)]
    pub quant_bits: Option<u32>,
    /// Share of coordinates random-k keeps each round.
    #[arg(long)]
    pub kept: Option<f64>,
    /// Cohort size over the target share (core over-selects to absorb dropouts).
    #[arg(long, default_value_t = 1.3)]
    pub over_select: f64,
    /// Probability that a selected store drops out of a round.
    #[arg(long, default_value_t = 0.1)]
    pub churn: f64,
    /// Record-level epsilon budget per store.
    #[arg(long, default_value_t = task_config::EPSILON_BUDGET)]
    pub budget: f64,
    /// Seed of the whole run: initialisation, selection, churn, batches, DP noise.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Use only the first N stores (tests, quick looks).
    #[arg(long)]
    pub stores: Option<usize>,
    /// Where to write the JSON result.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

fn parse_optimiser(text: &str) -> Result<Optimiser, String> {
    match text {
        "adam" => Ok(Optimiser::Adam),
        "sgd" => Ok(Optimiser::Sgd),
        other => Err(format!("unknown optimiser {other:?}: adam or sgd")),
    }
}

impl SimulateArgs {
    /// The base recipe with every override applied.
    pub(crate) fn recipe(&self) -> Recipe {
        let base = if self.dp {
            task_config::DP
        } else {
            task_config::NO_DP
        };
        let mut dp = base.local.dp;
        if let Some(noise) = self.dp_noise {
            let default = task_config::DP.local.dp.unwrap_or(DpRecipe {
                clip_norm: 1.0,
                noise_multiplier: noise,
                expected_batch_size: 64,
            });
            dp = Some(DpRecipe {
                noise_multiplier: noise,
                ..dp.unwrap_or(default)
            });
        }
        if let Some(dp) = &mut dp {
            dp.clip_norm = self.dp_clip.unwrap_or(dp.clip_norm);
            dp.expected_batch_size = self.dp_batch.unwrap_or(dp.expected_batch_size);
        }
        let (l, c) = (base.local, base.core);
        Recipe {
            local: LocalRecipe {
                epochs: self.epochs.unwrap_or(l.epochs),
                batch_size: self.batch.unwrap_or(l.batch_size),
                optimiser: self.optimiser.unwrap_or(l.optimiser),
                learning_rate: self.lr.unwrap_or(l.learning_rate),
                fedprox_mu: self.mu.unwrap_or(l.fedprox_mu),
                local_head: l.local_head && !self.shared_head,
                dp: if self.no_dp { None } else { dp },
            },
            core: CoreRecipe {
                rounds: self.rounds.unwrap_or(c.rounds),
                fraction: self.fraction.unwrap_or(c.fraction),
                server_opt: self.server_opt.unwrap_or(c.server_opt),
                server_lr: self.server_lr.unwrap_or(c.server_lr),
                update_clip: self.clip.unwrap_or(c.update_clip),
                quant_clip: self.quant_clip.unwrap_or(c.quant_clip),
                quant_bits: self.quant_bits.unwrap_or(c.quant_bits),
                kept_fraction: self.kept.unwrap_or(c.kept_fraction),
            },
        }
    }
}

/// How the cohort forms, apart from the recipe.
#[derive(Debug, Clone, Copy, Serialize)]
pub(crate) struct Population {
    /// Cohort size over the target share.
    pub over_select: f64,
    /// Probability that a selected store drops out.
    pub churn: f64,
    /// Record-level epsilon budget per store, at [`task_config::DELTA`].
    pub budget: f64,
    /// Seed of the run.
    pub seed: u64,
}

/// What one round did.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct RoundRecord {
    /// The round, from 1.
    pub round: u64,
    /// Stores core selected.
    pub selected: usize,
    /// Selected stores that declined because the round would pass their budget.
    pub over_budget: usize,
    /// Stores that dropped out (charged as if they trained: they may drop after).
    pub dropped: usize,
    /// Stores whose update is in the sum.
    pub survivors: usize,
    /// Test RMSE after the round, pooled over every store's test rows.
    pub test_rmse: f64,
    /// The largest epsilon any store has spent so far.
    pub max_store_epsilon: f64,
}

/// The result of a run, written as JSON.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct SimulationReport {
    /// The recipe run.
    pub recipe: Recipe,
    /// Cohort formation.
    pub population: Population,
    /// Stores in the federation.
    pub stores: usize,
    /// Test RMSE of the initial model (each store with the initial head).
    pub initial_test_rmse: f64,
    /// Test RMSE after the last round.
    pub final_test_rmse: f64,
    /// Largest epsilon a store spent, at [`task_config::DELTA`]; 0 without DP.
    pub max_store_epsilon: f64,
    /// Mean over stores of the epsilon spent.
    pub mean_store_epsilon: f64,
    /// The most rounds a store trained in.
    pub max_rounds_joined: usize,
    /// Per-store epsilon, by store id.
    pub store_epsilon: BTreeMap<String, f64>,
    /// Every round.
    pub rounds: Vec<RoundRecord>,
    /// Seconds the run took, loading excluded.
    pub wall_seconds: f64,
}

/// A store as the simulation keeps it: its rows, its head and its ledger entry.
struct SimStore {
    data: StoreData,
    test: Examples,
    checkpoint: Option<Weights>,
    spent: RdpAccountant,
    joined: usize,
}

/// Loads the data, runs the simulation, prints a line per round and writes the JSON.
pub(crate) fn run(args: &SimulateArgs) -> Result<SimulationReport> {
    let (_, dataset) = task_config::load_dominicks(&args.data, args.spec.as_deref())?;
    let mut stores = dataset.stores;
    if let Some(n) = args.stores {
        stores.truncate(n);
    }
    let population = Population {
        over_select: args.over_select,
        churn: args.churn,
        budget: args.budget,
        seed: args.seed,
    };
    let report = simulate(&args.recipe(), &population, stores, |r| {
        println!(
            "round {:>2}  selected {:>2}  over_budget {:>2}  dropped {:>2}  survivors {:>2}  \
             test_rmse {:.4}  max_epsilon {:.3}",
            r.round,
            r.selected,
            r.over_budget,
            r.dropped,
            r.survivors,
            r.test_rmse,
            r.max_store_epsilon
        );
    })?;
    println!(
        "final test_rmse {:.4}  max_store_epsilon {:.3}  (initial {:.4}, {:.0} s)",
        report.final_test_rmse,
        report.max_store_epsilon,
        report.initial_test_rmse,
        report.wall_seconds
    );
    if let Some(path) = &args.out {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(report)
}

/// Runs `recipe` over `stores`, calling `on_round` after each round.
pub(crate) fn simulate(
    recipe: &Recipe,
    population: &Population,
    stores: Vec<StoreData>,
    mut on_round: impl FnMut(&RoundRecord),
) -> Result<SimulationReport> {
    let started = Instant::now();
    let Some(first) = stores.first() else {
        bail!("no stores to simulate");
    };
    let dim = first.train.dim;
    let norm = Normalisation::fit(stores.iter().map(|s| &s.train))?;
    let base = task_config::task_config(dim, &recipe.local, norm.clone(), population.seed);
    let mut stores: Vec<SimStore> = stores
        .into_iter()
        .map(|data| {
            Ok(SimStore {
                test: data.test.normalised(&norm)?,
                data,
                checkpoint: None,
                spent: RdpAccountant::new(),
                joined: 0,
            })
        })
        .collect::<Result<_>>()?;

    // The initial model, seeded; its shared part is the first global model.
    let mut global = initial_model(&base)?;
    let layout = pipeline::layout_of(&global)?;
    let mut aggregator = Aggregator::new(strategy(&recipe.core, recipe.local.fedprox_mu))?;
    let mut rng = ChaCha20Rng::seed_from_u64(population.seed);
    let initial_test_rmse = pooled_rmse(&base, &global, &stores)?;

    let mut rounds = Vec::with_capacity(recipe.core.rounds);
    for round in 1..=recipe.core.rounds as u64 {
        let record = run_one_round(
            round,
            recipe,
            population,
            &base,
            &layout,
            &mut global,
            &mut aggregator,
            &mut stores,
            &mut rng,
        )?;
        on_round(&record);
        rounds.push(record);
    }

    let epsilons = stores
        .iter()
        .map(|s| Ok((s.data.store.0.clone(), epsilon(&s.spent)?)))
        .collect::<Result<BTreeMap<_, _>>>()?;
    let max_store_epsilon = epsilons.values().copied().fold(0.0, f64::max);
    let mean_store_epsilon = epsilons.values().sum::<f64>() / epsilons.len() as f64;
    Ok(SimulationReport {
        recipe: *recipe,
        population: *population,
        stores: stores.len(),
        initial_test_rmse,
        final_test_rmse: rounds.last().map_or(initial_test_rmse, |r| r.test_rmse),
        max_store_epsilon,
        mean_store_epsilon,
        max_rounds_joined: stores.iter().map(|s| s.joined).max().unwrap_or(0),
        store_epsilon: epsilons,
        rounds,
        wall_seconds: started.elapsed().as_secs_f64(),
    })
}

/// The shared weights of a freshly initialised model.
fn initial_model(task: &TaskConfig) -> Result<Weights> {
    train::configure_threads(task.training.threads);
    tch::manual_seed(task.training.seed as i64);
    let (device, precision) = fedmesh_store_agent::model::pick_device(task.training.device)?;
    let model = train::fresh_model(task, device, precision)?;
    Ok(model.shared_weights())
}

/// The core-agg strategy of a recipe.
fn strategy(core: &CoreRecipe, mu: f64) -> Strategy {
    let adaptive = AdaptiveConfig {
        eta: core.server_lr,
        ..AdaptiveConfig::default()
    };
    match core.server_opt {
        ServerOpt::Fedavg if mu > 0.0 => Strategy::FedProx { mu },
        ServerOpt::Fedavg => Strategy::FedAvg,
        ServerOpt::Fedadam => Strategy::FedAdam(adaptive),
        ServerOpt::Fedyogi => Strategy::FedYogi(adaptive),
    }
}

/// One round: select, check budgets, train, clip, quantise, sum, decode, apply, evaluate.
#[allow(clippy::too_many_arguments)]
fn run_one_round(
    round: u64,
    recipe: &Recipe,
    population: &Population,
    base: &TaskConfig,
    layout: &ParamLayout,
    global: &mut Weights,
    aggregator: &mut Aggregator,
    stores: &mut [SimStore],
    rng: &mut ChaCha20Rng,
) -> Result<RoundRecord> {
    // 1. Select: the target share, over-selected, then churn.
    let n = stores.len();
    let target = (recipe.core.fraction * n as f64).round().max(1.0);
    let size = ((target * population.over_select).ceil() as usize).clamp(1, n);
    let mut cohort = index::sample(rng, n, size).into_vec();
    cohort.sort_unstable();
    let plan = secagg_plan(round, recipe, layout, &cohort, stores)?;

    // 2. Budgets, then dropouts; a dropped store is charged, since it may drop after
    // training, and its head does not move, since it may drop before.
    let mut record = RoundRecord {
        round,
        selected: size,
        over_budget: 0,
        dropped: 0,
        survivors: 0,
        test_rmse: 0.0,
        max_store_epsilon: 0.0,
    };
    let mut sum = RingSum::new(&plan);
    for &i in &cohort {
        let store = &mut stores[i];
        let examples = store.data.train.len();
        let Some(after) = charge(&store.spent, recipe, examples, population.budget)? else {
            record.over_budget += 1;
            continue;
        };
        let dropped = rng.gen_bool(population.churn.clamp(0.0, 1.0));
        store.spent = after;
        store.joined += 1;
        if dropped {
            record.dropped += 1;
            continue;
        }

        // 3. Train from the global model with this store's head and its own seeds.
        let mut task = base.clone();
        task.training.seed = rng.r#gen();
        if let Some(dp) = &mut task.training.dp {
            dp.noise_seed = Some(rng.r#gen());
        }
        let outcome = train::run_round(&task, &store.data, global, store.checkpoint.as_ref())?;
        store.checkpoint = Some(outcome.checkpoint);

        // 4. Clip and quantise into the ring; the PoP's running sum folds it.
        let values = outcome
            .delta
            .tensors
            .iter()
            .map(|t| (t.name.clone(), t.values.clone()))
            .collect();
        let mut flat = layout.flatten(&values, Scope::Shared)?;
        update::clip_l2(&mut flat, recipe.core.update_clip)?;
        let quantised = plan.quantise(&flat, rng)?;
        let packed = PackedVector::pack(quantised.values(), plan.ring_bits())?;
        sum.fold(
            &plan,
            plan.round(),
            std::slice::from_ref(&store.data.store),
            &packed,
        )?;
        record.survivors += 1;
    }

    // 5. Core decodes the sum, divides by the survivors and steps the model.
    if record.survivors > 0 {
        let decoded = plan.decode(sum.values());
        let mut cohort_sum = CohortSum::new(decoded.len());
        cohort_sum.add_partial_sum(&decoded, record.survivors as f64, record.survivors)?;
        let mut flat_global = layout.flatten(&param_map(global), Scope::Shared)?;
        aggregator.apply(&mut flat_global, &cohort_sum)?;
        *global = weights_from(layout, &flat_global, global)?;
    }

    // 6. Evaluate every store with its own head.
    record.test_rmse = pooled_rmse(base, global, stores)?;
    for store in stores.iter() {
        record.max_store_epsilon = record.max_store_epsilon.max(epsilon(&store.spent)?);
    }
    Ok(record)
}

/// The round's plan: plain masking, the recipe's quantisation, no store-level noise.
fn secagg_plan(
    round: u64,
    recipe: &Recipe,
    layout: &ParamLayout,
    cohort: &[usize],
    stores: &[SimStore],
) -> Result<SecAggPlan> {
    let mut seed = [0u8; 32];
    seed[..8].copy_from_slice(&round.to_le_bytes());
    let n = cohort.len() as u32;
    let dimension = layout.len(Scope::Shared) as u32;
    let config = PlanConfig {
        round: RoundId(round),
        seed,
        cohort: cohort
            .iter()
            .map(|&i| stores[i].data.store.clone())
            .collect::<Vec<StoreId>>(),
        masking: Masking::Plain,
        degree: n.saturating_sub(1).max(1),
        threshold: n / 2 + 1,
        min_survivors: 1,
        dimension,
        kept: (recipe.core.kept_fraction < 1.0)
            .then(|| ((recipe.core.kept_fraction * f64::from(dimension)).ceil() as u32).max(1)),
        quant_bits: recipe.core.quant_bits,
        clip: recipe.core.quant_clip,
        guard_bits: 1,
        noise_stddev: 0.0,
    };
    Ok(SecAggPlan::new(config)?)
}

/// The store's ledger after one more round of the recipe, or `None` when that would pass
/// the budget (the store declines, as `store_agent::participation` decides).
fn charge(
    spent: &RdpAccountant,
    recipe: &Recipe,
    examples: usize,
    budget: f64,
) -> Result<Option<RdpAccountant>> {
    let Some(dp_recipe) = &recipe.local.dp else {
        return Ok(Some(spent.clone()));
    };
    let (q, steps) = dp::schedule(examples, dp_recipe.expected_batch_size, recipe.local.epochs);
    let mut after = spent.clone();
    after.compose_poisson_gaussian(q, dp_recipe.noise_multiplier, steps as u64)?;
    Ok((epsilon(&after)? <= budget).then_some(after))
}

/// Epsilon at the lab's delta; 0 when nothing was spent.
fn epsilon(spent: &RdpAccountant) -> Result<f64> {
    if spent.is_empty() {
        return Ok(0.0);
    }
    Ok(spent.epsilon(task_config::DELTA)?)
}

/// Test RMSE over every store's test rows, each store predicting with its own head.
fn pooled_rmse(task: &TaskConfig, global: &Weights, stores: &[SimStore]) -> Result<f64> {
    let (mut squares, mut rows) = (0.0, 0usize);
    for store in stores.iter().filter(|s| !s.test.is_empty()) {
        let model = train::build_model(task, global, store.checkpoint.as_ref())?;
        match eval::evaluate(&model, &store.test) {
            Metrics::Regression { rmse, .. } => squares += rmse * rmse * store.test.len() as f64,
            Metrics::Classification { .. } => bail!("a regression model reported class metrics"),
        }
        rows += store.test.len();
    }
    Ok((squares / rows.max(1) as f64).sqrt())
}

fn param_map(weights: &Weights) -> fedmesh_protocol::params::ParamMap {
    weights
        .tensors
        .iter()
        .map(|t| (t.name.clone(), t.values.clone()))
        .collect()
}

/// Shared weights from a flat vector in layout order, in the model order of `like`.
fn weights_from(layout: &ParamLayout, flat: &[f32], like: &Weights) -> Result<Weights> {
    let mut map = layout.unflatten(flat, Scope::Shared)?;
    let tensors = like
        .tensors
        .iter()
        .map(|t| {
            let values = map
                .remove(&t.name)
                .with_context(|| format!("parameter {} missing from the layout", t.name))?;
            Ok(NamedTensor {
                name: t.name.clone(),
                shape: t.shape.clone(),
                values,
            })
        })
        .collect::<Result<_>>()?;
    Ok(Weights { tensors })
}

#[cfg(test)]
mod tests {
    use fedmesh_protocol::accountant::dp_sgd_epsilon;

    use super::*;

    #[test]
    fn three_stores_improve_on_the_initial_model_and_spend_what_the_accountant_says() {
        let (_, dataset) =
            task_config::load_dominicks(std::path::Path::new("data/dominicks-oj"), None)
                .expect("Dominick's data");
        let stores: Vec<StoreData> = dataset.stores.into_iter().take(3).collect();
        let examples: Vec<usize> = stores.iter().map(|s| s.train.len()).collect();
        let mut recipe = task_config::DP;
        recipe.core.rounds = 2;
        recipe.core.fraction = 1.0;
        recipe.local.learning_rate = 1e-2;
        // Every store is selected and none drops, so each trains in both rounds.
        let population = Population {
            over_select: 1.0,
            churn: 0.0,
            budget: 100.0,
            seed: 3,
        };

        let mut seen = 0;
        let report = simulate(&recipe, &population, stores, |_| seen += 1).expect("simulation");

        assert_eq!(seen, 2);
        assert!(
            report.final_test_rmse < report.initial_test_rmse,
            "rmse {} after two rounds, {} before",
            report.final_test_rmse,
            report.initial_test_rmse
        );
        // Each round is one epoch of max(1, n / B) Poisson steps at rate B / n (the
        // schedule in store_agent::dp), so two rounds are twice that many steps.
        let dp = recipe.local.dp.expect("the DP recipe has DP-SGD");
        let batch = dp.expected_batch_size;
        for (store, n) in report.store_epsilon.values().zip(examples) {
            let steps = 2 * (n / batch).max(1) as u64;
            let q = batch as f64 / n as f64;
            let expected = dp_sgd_epsilon(dp.noise_multiplier, q, steps, task_config::DELTA)
                .expect("accountant");
            assert!(
                (store - expected).abs() < 1e-9,
                "{store} against {expected}"
            );
        }
        let max = report.store_epsilon.values().copied().fold(0.0, f64::max);
        assert_eq!(report.max_store_epsilon, max);
    }
}
