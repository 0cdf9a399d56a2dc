//! The round state machine, stepped by hand with virtual time.

use std::collections::BTreeMap;

use fedmesh_core_agg::ledger::{Ledger, LedgerConfig, RecordDpPlan};
use fedmesh_core_agg::rounds::{
    AbandonReason, EvaluationReport, Event, OnlineStore, Outcome, Phase, Rejection, Round,
    RoundConfig, UpdateReport,
};
use fedmesh_core_agg::{ModelId, Timestamp};
use fedmesh_protocol::ids::{ModelVersion, Region, RoundId, StoreId};

const T0: Timestamp = Timestamp(1_800_000_000);
const ROUND: RoundId = RoundId(7);
const VERSION: ModelVersion = ModelVersion(3);

fn at(secs: u64) -> Timestamp {
    Timestamp(T0.0 + secs)
}

fn stores(region: &str, count: usize) -> Vec<OnlineStore> {
    (0..count)
        .map(|i| OnlineStore {
            id: StoreId(format!("{region}-{i}")),
            region: Region(region.into()),
        })
        .collect()
}

fn no_exclusion(_: &StoreId) -> bool {
    false
}

fn report(store: &StoreId) -> UpdateReport {
    UpdateReport {
        round: ROUND,
        version: VERSION,
        store: store.clone(),
        examples: 100,
    }
}

fn events(round: &mut Round) -> Vec<Event> {
    std::iter::from_fn(|| round.poll_event()).collect()
}

/// A round with 10 stores in each of 3 regions, selected at T0: target 3, 4 selected.
fn selected_round(config: RoundConfig) -> (Round, Vec<OnlineStore>) {
    selected_round_from(config, Some(1.0))
}

/// As [`selected_round`], with the current model's loss `baseline`.
fn selected_round_from(config: RoundConfig, baseline: Option<f64>) -> (Round, Vec<OnlineStore>) {
    let online: Vec<_> = ["east", "west", "north"]
        .iter()
        .flat_map(|r| stores(r, 10))
        .collect();
    let mut round = Round::plan(ROUND, VERSION, config, 42, baseline, T0);
    round.poll(T0, &online, &no_exclusion);
    assert_eq!(round.phase(), &Phase::Collecting);
    (round, online)
}

#[test]
fn selection_honours_region_caps_and_over_selection() {
    // 100 eligible stores, 70 of them in one region. Fraction 0.1 -> target 10;
    // over-selection 1.3 -> 13 selected; cap 0.5 -> at most floor(6.5) = 6 per region.
    let online: Vec<_> = [
        stores("big", 70),
        stores("b", 10),
        stores("c", 10),
        stores("d", 10),
    ]
    .concat();
    let region_of: BTreeMap<_, _> = online
        .iter()
        .map(|s| (s.id.clone(), s.region.clone()))
        .collect();
    for seed in 0..20 {
        let mut round = Round::plan(ROUND, VERSION, RoundConfig::default(), seed, None, T0);
        round.poll(T0, &online, &no_exclusion);
        assert_eq!(round.target(), 10);
        let selected: Vec<_> = round.selected().cloned().collect();
        assert_eq!(selected.len(), 13);
        let mut per_region: BTreeMap<&Region, usize> = BTreeMap::new();
        for store in &selected {
            *per_region.entry(&region_of[store]).or_default() += 1;
        }
        assert!(
            per_region.values().all(|&n| n <= 6),
            "seed {seed}: {per_region:?}"
        );
        assert_eq!(events(&mut round), vec![Event::Selected(selected)]);
    }
}

#[test]
fn quorum_not_met_at_selection_ends_the_round() {
    // Two stores online, three reports needed: wait, then give up at the timeout.
    let online = stores("east", 2);
    let mut round = Round::plan(ROUND, VERSION, RoundConfig::default(), 1, None, T0);
    round.poll(at(10), &online, &no_exclusion);
    assert_eq!(round.phase(), &Phase::Selecting);
    round.poll(at(300), &online, &no_exclusion);
    let expected = Outcome::Abandoned(AbandonReason::QuorumNotMet {
        phase: "selecting".into(),
        have: 2,
        need: 3,
    });
    assert_eq!(round.phase(), &Phase::Ended(expected.clone()));
    assert_eq!(events(&mut round), vec![Event::Ended(expected)]);
}

#[test]
fn quorum_not_met_at_the_reporting_deadline_ends_the_round() {
    let (mut round, online) = selected_round(RoundConfig::default());
    let first = round.selected().next().unwrap().clone();
    round.handle_report(at(5), &report(&first)).unwrap();
    round.poll(at(1800), &online, &no_exclusion);
    assert!(matches!(
        round.phase(),
        Phase::Ended(Outcome::Abandoned(AbandonReason::QuorumNotMet {
            have: 1,
            need: 3,
            ..
        }))
    ));
}

#[test]
fn rejects_update_from_stale_round_and_counts_it() {
    let (mut round, _) = selected_round(RoundConfig::default());
    let store = round.selected().next().unwrap().clone();
    let stale = UpdateReport {
        round: RoundId(6),
        ..report(&store)
    };
    assert_eq!(
        round.handle_report(at(1), &stale),
        Err(Rejection::StaleRound)
    );
    let old_model = UpdateReport {
        version: ModelVersion(2),
        ..report(&store)
    };
    assert_eq!(
        round.handle_report(at(1), &old_model),
        Err(Rejection::WrongVersion)
    );
    let stranger = report(&StoreId("not-selected".into()));
    assert_eq!(
        round.handle_report(at(1), &stranger),
        Err(Rejection::NotSelected)
    );
    round.handle_report(at(1), &report(&store)).unwrap();
    assert_eq!(
        round.handle_report(at(2), &report(&store)),
        Err(Rejection::Duplicate)
    );

    let counts = round.rejections();
    assert_eq!(counts[&Rejection::StaleRound], 1);
    assert_eq!(counts[&Rejection::WrongVersion], 1);
    assert_eq!(counts[&Rejection::NotSelected], 1);
    assert_eq!(counts[&Rejection::Duplicate], 1);
    assert_eq!(round.survivors().len(), 1, "rejected reports never count");
}

#[test]
fn store_at_budget_is_never_selected() {
    // Stores east-0..east-4 have spent their whole record budget.
    let model = ModelId("oj-demand".into());
    let config = LedgerConfig {
        record_budget: 1.0,
        ..LedgerConfig::default()
    };
    let mut ledger = Ledger::new(config);
    let plan = RecordDpPlan {
        batch: 64,
        epochs: 12,
        noise_multiplier: 1.0,
    };
    let spent: Vec<_> = (0..5).map(|i| StoreId(format!("east-{i}"))).collect();
    for store in &spent {
        ledger
            .charge_record(&model, store, RoundId(1), T0, &plan, 1070)
            .unwrap();
    }
    let online = [stores("east", 10), stores("west", 10)].concat();
    let excluded = |s: &StoreId| ledger.excluded(&model, s, T0);
    for seed in 0..30 {
        let mut round = Round::plan(ROUND, VERSION, RoundConfig::default(), seed, None, T0);
        round.poll(T0, &online, &excluded);
        assert_eq!(round.phase(), &Phase::Collecting);
        assert!(round.selected().all(|s| !spent.contains(s)), "seed {seed}");
    }
}

#[test]
fn silent_stores_are_replaced_after_the_soft_deadline() {
    let (mut round, online) = selected_round(RoundConfig::default());
    let first: Vec<_> = round.selected().cloned().collect();
    events(&mut round);
    round.handle_report(at(10), &report(&first[0])).unwrap();
    round.poll(at(900), &online, &no_exclusion);

    let Some(Event::Replaced {
        dropped,
        replacements,
    }) = round.poll_event()
    else {
        panic!("no replacement");
    };
    assert_eq!(dropped, first[1..].to_vec());
    assert_eq!(replacements.len(), 2, "target 3 less 1 report");
    assert!(replacements.iter().all(|s| !first.contains(s)));
    // A dropped store's late report no longer counts; a replacement's does.
    assert_eq!(
        round.handle_report(at(901), &report(&first[1])),
        Err(Rejection::NotSelected)
    );
    round
        .handle_report(at(902), &report(&replacements[0]))
        .unwrap();
}

#[test]
fn a_full_round_commits_the_published_version() {
    let (mut round, online) = selected_round(RoundConfig::default());
    let cohort: Vec<_> = round.selected().cloned().collect();
    events(&mut round);
    for store in &cohort[..3] {
        round.handle_report(at(20), &report(store)).unwrap();
    }
    assert_eq!(
        events(&mut round),
        vec![Event::Unmask(cohort[..3].to_vec())]
    );
    assert_eq!(round.dropped(), vec![cohort[3].clone()]);
    round.handle_unmasked(at(30), ROUND, Ok(())).unwrap();
    round.handle_aggregated(at(31), ROUND, &online).unwrap();
    let evaluators: Vec<_> = round.evaluators().cloned().collect();
    let evaluation = EvaluationReport {
        round: ROUND,
        version: VERSION,
        store: evaluators[0].clone(),
        examples: 50,
        loss: 0.9,
        baseline_loss: None,
    };
    round.handle_evaluation(at(40), &evaluation).unwrap();
    round.handle_published(ROUND, Ok(ModelVersion(4))).unwrap();
    assert_eq!(
        events(&mut round),
        vec![
            Event::Evaluate(evaluators),
            Event::Publish { loss: 0.9 },
            Event::Ended(Outcome::Committed(ModelVersion(4)))
        ]
    );
}

#[test]
fn a_regressed_candidate_is_not_published() {
    // Baseline loss 1.0, threshold 2%: a candidate at 1.1 stops the round.
    let (mut round, online) = selected_round(RoundConfig::default());
    let cohort: Vec<_> = round.selected().cloned().collect();
    for store in &cohort[..3] {
        round.handle_report(at(20), &report(store)).unwrap();
    }
    round.handle_unmasked(at(30), ROUND, Ok(())).unwrap();
    round.handle_aggregated(at(31), ROUND, &online).unwrap();
    let evaluators: Vec<_> = round.evaluators().cloned().collect();
    let evaluation = EvaluationReport {
        round: ROUND,
        version: VERSION,
        store: evaluators[0].clone(),
        examples: 50,
        loss: 1.1,
        baseline_loss: None,
    };
    round.handle_evaluation(at(40), &evaluation).unwrap();
    assert_eq!(
        round.phase(),
        &Phase::Ended(Outcome::Abandoned(AbandonReason::Regressed {
            candidate: 1.1,
            baseline: 1.0
        }))
    );
}

/// The current version's recorded loss (1.0, from other stores) says nothing about how a
/// candidate does on this round's evaluators: with both losses from the same rows the
/// candidate is judged against those.
#[test]
fn a_candidate_is_judged_against_the_current_model_on_the_same_evaluators() {
    let judged = |loss: f64, baseline: f64| {
        let (mut round, evaluators) = evaluating_round(RoundConfig::default());
        let report = EvaluationReport {
            baseline_loss: Some(baseline),
            ..evaluation(&evaluators[0], 50, loss)
        };
        round.handle_evaluation(at(40), &report).unwrap();
        round.phase().clone()
    };
    // 1.1 on rows where the current model scores 1.2: better, although above 1.0.
    assert_eq!(judged(1.1, 1.2), Phase::Publishing);
    // 0.9 on rows where the current model scores 0.8: worse by more than 2%, although
    // below the recorded 1.0.
    assert_eq!(
        judged(0.9, 0.8),
        Phase::Ended(Outcome::Abandoned(AbandonReason::Regressed {
            candidate: 0.9,
            baseline: 0.8
        }))
    );
    // A non-finite baseline is refused like a non-finite loss.
    let (mut round, evaluators) = evaluating_round(RoundConfig::default());
    let report = EvaluationReport {
        baseline_loss: Some(f64::NAN),
        ..evaluation(&evaluators[0], 50, 0.9)
    };
    assert!(round.handle_evaluation(at(40), &report).is_err());
}

#[test]
fn a_round_ends_when_unmasking_never_answers() {
    let (mut round, online) = selected_round(RoundConfig::default());
    let cohort: Vec<_> = round.selected().cloned().collect();
    for store in &cohort[..3] {
        round.handle_report(at(20), &report(store)).unwrap();
    }
    assert_eq!(round.phase(), &Phase::Unmasking);
    round.poll(at(20 + 599), &online, &no_exclusion);
    assert_eq!(round.phase(), &Phase::Unmasking);
    round.poll(at(20 + 600), &online, &no_exclusion);
    assert!(matches!(
        round.phase(),
        Phase::Ended(Outcome::Abandoned(AbandonReason::Timeout { .. }))
    ));
}

#[test]
fn a_round_survives_a_restart_mid_collection() {
    // Core saves the round after every call; a new process reads it back and carries on.
    let (mut round, online) = selected_round(RoundConfig::default());
    let cohort: Vec<_> = round.selected().cloned().collect();
    round.handle_report(at(20), &report(&cohort[0])).unwrap();
    let saved = serde_json::to_string(&round).unwrap();

    let mut restarted: Round = serde_json::from_str(&saved).unwrap();
    assert_eq!(
        restarted.handle_report(at(21), &report(&cohort[0])),
        Err(Rejection::Duplicate)
    );
    restarted
        .handle_report(at(22), &report(&cohort[1]))
        .unwrap();
    restarted
        .handle_report(at(23), &report(&cohort[2]))
        .unwrap();
    assert_eq!(restarted.phase(), &Phase::Unmasking);
    restarted.poll(at(23), &online, &no_exclusion);
    assert_eq!(restarted.survivors().len(), 3);
}

/// A round in evaluation: 3 reports in, aggregated, held-out cohort chosen from `online`.
fn evaluating_round(config: RoundConfig) -> (Round, Vec<StoreId>) {
    evaluating_round_from(config, Some(1.0))
}

/// As [`evaluating_round`], with the current model's loss `baseline`.
fn evaluating_round_from(config: RoundConfig, baseline: Option<f64>) -> (Round, Vec<StoreId>) {
    let (mut round, online) = selected_round_from(config, baseline);
    let cohort: Vec<_> = round.selected().cloned().collect();
    for store in &cohort[..3] {
        round.handle_report(at(20), &report(store)).unwrap();
    }
    round.handle_unmasked(at(30), ROUND, Ok(())).unwrap();
    round.handle_aggregated(at(31), ROUND, &online).unwrap();
    let evaluators: Vec<_> = round.evaluators().cloned().collect();
    (round, evaluators)
}

fn evaluation(store: &StoreId, examples: u64, loss: f64) -> EvaluationReport {
    EvaluationReport {
        round: ROUND,
        version: VERSION,
        store: store.clone(),
        examples,
        loss,
        baseline_loss: None,
    }
}

#[test]
fn evaluation_is_held_out_from_the_training_cohort() {
    let (round, evaluators) = evaluating_round(RoundConfig::default());
    // min_evaluations 1 over-selected by 1.3 gives ceil(1.3) = 2 evaluators.
    assert_eq!(evaluators.len(), 2);
    let cohort: Vec<_> = round.selected().collect();
    assert!(evaluators.iter().all(|e| !cohort.contains(&e)));
}

#[test]
fn rejects_evaluation_from_a_store_outside_the_held_out_cohort() {
    let (mut round, evaluators) = evaluating_round(RoundConfig::default());
    let trainer = round.selected().next().cloned().unwrap();
    let stranger = StoreId("not-online".into());
    for store in [&trainer, &stranger] {
        assert_eq!(
            round.handle_evaluation(at(40), &evaluation(store, 50, 0.5)),
            Err(Rejection::NotSelected)
        );
    }
    assert_eq!(round.rejections().get(&Rejection::NotSelected), Some(&2));
    assert_eq!(round.phase(), &Phase::Evaluating);
    // The chosen evaluator is still heard.
    round
        .handle_evaluation(at(41), &evaluation(&evaluators[0], 50, 0.9))
        .unwrap();
    assert!(matches!(round.phase(), Phase::Publishing));
}

#[test]
fn rejects_evaluation_with_an_absurd_example_count() {
    // u64::MAX examples at loss -1e300 would weigh to -inf and publish.
    let (mut round, evaluators) = evaluating_round(RoundConfig::default());
    assert_eq!(
        round.handle_evaluation(at(40), &evaluation(&evaluators[0], u64::MAX, -1e300)),
        Err(Rejection::Invalid)
    );
    assert_eq!(
        round.handle_evaluation(at(40), &evaluation(&evaluators[0], 0, 0.5)),
        Err(Rejection::Invalid)
    );
    assert_eq!(round.phase(), &Phase::Evaluating);
}

#[test]
fn large_example_counts_sum_without_overflow() {
    // Two reports of 2^40 examples each: the sum 2^41 is exact, and the weighted mean of
    // losses 0.5 and 0.7 with equal weights is 0.6 (hand computation).
    let config = RoundConfig {
        min_evaluations: 2,
        ..RoundConfig::default()
    };
    let (mut round, evaluators) = evaluating_round(config);
    let big = fedmesh_core_agg::rounds::MAX_EVALUATION_EXAMPLES;
    round
        .handle_evaluation(at(40), &evaluation(&evaluators[0], big, 0.5))
        .unwrap();
    round
        .handle_evaluation(at(41), &evaluation(&evaluators[1], big, 0.7))
        .unwrap();
    let published = events(&mut round).into_iter().find_map(|e| match e {
        Event::Publish { loss } => Some(loss),
        _ => None,
    });
    let loss = published.expect("publishes");
    assert!((loss - 0.6).abs() < 1e-12, "loss {loss}");
}

#[test]
fn a_candidate_whose_loss_is_not_finite_is_not_published() {
    // Losses of 1e308 on 2^40 examples each overflow the f64 weighted sum to +inf; no
    // baseline, so only the finite check can stop it.
    let config = RoundConfig {
        min_evaluations: 2,
        ..RoundConfig::default()
    };
    let (mut round, evaluators) = evaluating_round_from(config, None);
    let big = fedmesh_core_agg::rounds::MAX_EVALUATION_EXAMPLES;
    for (i, store) in evaluators.iter().take(2).enumerate() {
        round
            .handle_evaluation(at(40 + i as u64), &evaluation(store, big, 1e308))
            .unwrap();
    }
    assert!(matches!(
        round.phase(),
        Phase::Ended(Outcome::Abandoned(AbandonReason::NonFiniteLoss { .. }))
    ));
    assert!(
        !events(&mut round)
            .iter()
            .any(|e| matches!(e, Event::Publish { .. }))
    );
}

#[test]
fn a_candidate_with_a_nan_loss_counts_as_a_regression() {
    assert!(fedmesh_core_agg::rounds::regresses(f64::NAN, 1.0, 0.02));
    assert!(fedmesh_core_agg::rounds::regresses(
        f64::INFINITY,
        1.0,
        0.02
    ));
    assert!(!fedmesh_core_agg::rounds::regresses(1.01, 1.0, 0.02));
}
