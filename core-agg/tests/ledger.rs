//! The privacy ledger charges what the plan and reports imply, alarms, excludes, forgets
//! what leaves the window, and survives a restart.

use fedmesh_core_agg::ledger::{self, Ledger, LedgerConfig, LedgerError, RecordDpPlan};
use fedmesh_core_agg::{ModelId, Timestamp};
use fedmesh_protocol::accountant::dp_sgd_epsilon;
use fedmesh_protocol::ids::{RoundId, StoreId};

const DAY: u64 = 24 * 3600;
const T0: Timestamp = Timestamp(1_800_000_000);

fn model() -> ModelId {
    ModelId("oj-demand".into())
}

fn store(name: &str) -> StoreId {
    StoreId(name.into())
}

/// Batch 64, 12 epochs, noise 1.0: a store with 1,070 rows runs 12 * (1070 / 64) = 192
/// steps at q = 64 / 1070.
const PLAN: RecordDpPlan = RecordDpPlan {
    batch: 64,
    epochs: 12,
    noise_multiplier: 1.0,
};

#[test]
fn record_charge_is_recomputed_from_plan_and_reported_examples() {
    let mut ledger = Ledger::new(LedgerConfig::default());
    let status = ledger
        .charge_record(&model(), &store("s1"), RoundId(1), T0, &PLAN, 1070)
        .unwrap();
    // dp-accounting 0.6 gives 6.3290342783671605 for sigma 1, q 64/1070, 192 steps
    // (scripts/dp_reference.py).
    assert!(
        (status.record.spent / 6.3290342783671605 - 1.0).abs() < 1e-6,
        "{status:?}"
    );
    assert_eq!(status.store.spent, 0.0);
}

#[test]
fn record_charges_compose_over_rounds() {
    let mut ledger = Ledger::new(LedgerConfig::default());
    for round in 1..=3 {
        let at = Timestamp(T0.0 + round * DAY);
        ledger
            .charge_record(&model(), &store("s1"), RoundId(round), at, &PLAN, 1070)
            .unwrap();
    }
    let spent = ledger
        .status(&model(), &store("s1"), Timestamp(T0.0 + 3 * DAY))
        .record
        .spent;
    // Three rounds of 192 steps are one run of 576 steps.
    let expected = dp_sgd_epsilon(1.0, 64.0 / 1070.0, 576, 1e-5).unwrap();
    assert!(
        (spent / expected - 1.0).abs() < 1e-12,
        "{spent} vs {expected}"
    );
}

#[test]
fn store_level_charges_every_eligible_store_selected_or_not() {
    let mut ledger = Ledger::new(LedgerConfig::default());
    let eligible: Vec<_> = (0..10).map(|i| store(&format!("s{i}"))).collect();
    let statuses = ledger
        .charge_store_level(&model(), RoundId(1), T0, 2.0, 3, &eligible)
        .unwrap();
    assert_eq!(statuses.len(), 10);
    // A cohort of 3 out of 10 eligible stores: one step at q = 0.3 with noise 2.
    let expected = dp_sgd_epsilon(2.0, 0.3, 1, 1e-5).unwrap();
    for s in &eligible {
        let spent = ledger.status(&model(), s, T0).store.spent;
        assert!((spent / expected - 1.0).abs() < 1e-12);
    }
    assert_eq!(
        ledger.status(&model(), &store("elsewhere"), T0).store.spent,
        0.0
    );
}

#[test]
fn charges_leave_the_window_after_thirty_days() {
    let mut ledger = Ledger::new(LedgerConfig::default());
    ledger
        .charge_record(&model(), &store("s1"), RoundId(1), T0, &PLAN, 1070)
        .unwrap();
    let inside = Timestamp(T0.0 + 30 * DAY - 1);
    let outside = Timestamp(T0.0 + 30 * DAY);
    assert!(ledger.status(&model(), &store("s1"), inside).record.spent > 6.0);
    assert_eq!(
        ledger.status(&model(), &store("s1"), outside).record.spent,
        0.0
    );
    ledger.prune(outside);
    assert_eq!(
        ledger.status(&model(), &store("s1"), inside).record.spent,
        0.0
    );
}

#[test]
fn counts_charges_stamped_after_now_when_the_clock_steps_back() {
    let mut ledger = Ledger::new(LedgerConfig::default());
    ledger
        .charge_record(&model(), &store("s1"), RoundId(1), T0, &PLAN, 1070)
        .unwrap();
    let at_charge = ledger.status(&model(), &store("s1"), T0).record.spent;
    assert!(at_charge > 6.0);
    // The clock steps back an hour: the spend already made must not vanish.
    let earlier = Timestamp(T0.0 - 3600);
    assert_eq!(
        ledger.status(&model(), &store("s1"), earlier).record.spent,
        at_charge
    );
}

#[test]
fn alarms_at_eighty_percent_and_excludes_at_budget() {
    let one_round = dp_sgd_epsilon(1.0, 64.0 / 1070.0, 192, 1e-5).unwrap();
    let two_rounds = dp_sgd_epsilon(1.0, 64.0 / 1070.0, 384, 1e-5).unwrap();
    // A budget one round spends 85% of, and two rounds more than all of.
    let budget = one_round / 0.85;
    assert!(two_rounds >= budget);
    let config = LedgerConfig {
        record_budget: budget,
        ..LedgerConfig::default()
    };
    let mut ledger = Ledger::new(config);

    let first = ledger
        .charge_record(&model(), &store("s1"), RoundId(1), T0, &PLAN, 1070)
        .unwrap();
    assert!(first.record.alarm);
    assert!(!first.excluded());
    assert!((first.record.remaining - (budget - one_round)).abs() < 1e-9);

    let second = ledger
        .charge_record(&model(), &store("s1"), RoundId(2), T0, &PLAN, 1070)
        .unwrap();
    assert!(second.excluded());
    assert_eq!(second.record.remaining, 0.0);
    assert!(ledger.excluded(&model(), &store("s1"), T0));
    assert!(!ledger.excluded(&model(), &store("s2"), T0));
}

#[test]
fn survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ledger.json");
    let mut ledger = ledger::load(&path, LedgerConfig::default()).unwrap();
    ledger
        .charge_record(&model(), &store("s1"), RoundId(1), T0, &PLAN, 1070)
        .unwrap();
    let eligible = [store("s1"), store("s2")];
    ledger
        .charge_store_level(&model(), RoundId(1), T0, 2.0, 1, &eligible)
        .unwrap();
    ledger::save(&ledger, &path).unwrap();

    let restarted = ledger::load(&path, LedgerConfig::default()).unwrap();
    for s in &eligible {
        assert_eq!(
            restarted.status(&model(), s, T0),
            ledger.status(&model(), s, T0)
        );
    }
}

#[test]
fn refuses_a_corrupt_file_and_a_store_without_examples() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ledger.json");
    std::fs::write(&path, b"{\"config\": 3").unwrap();
    assert!(matches!(
        ledger::load(&path, LedgerConfig::default()),
        Err(LedgerError::Corrupt { .. })
    ));

    let mut ledger = Ledger::new(LedgerConfig::default());
    let result = ledger.charge_record(&model(), &store("s1"), RoundId(1), T0, &PLAN, 0);
    assert!(matches!(result, Err(LedgerError::NoExamples(_))));
    assert_eq!(ledger.status(&model(), &store("s1"), T0).record.spent, 0.0);
}

#[test]
fn projects_whether_the_next_round_would_pass_the_budget() {
    let one_round = dp_sgd_epsilon(1.0, 64.0 / 1070.0, 192, 1e-5).unwrap();
    let config = LedgerConfig {
        record_budget: one_round / 0.85,
        ..LedgerConfig::default()
    };
    let mut ledger = Ledger::new(config);
    let next = [(
        ledger::PrivacyUnit::Record,
        PLAN.mechanism(&store("s1"), 1070).unwrap(),
    )];

    // A fresh store can afford one round; after it, a second would pass the budget even
    // though the store is not yet exhausted.
    assert!(
        !ledger
            .would_exceed(&model(), &store("s1"), T0, &next)
            .unwrap()
    );
    ledger
        .charge_record(&model(), &store("s1"), RoundId(1), T0, &PLAN, 1070)
        .unwrap();
    assert!(!ledger.excluded(&model(), &store("s1"), T0));
    assert!(
        ledger
            .would_exceed(&model(), &store("s1"), T0, &next)
            .unwrap()
    );
}
