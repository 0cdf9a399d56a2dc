//! Updates re-sent on their own after the PoP that accepted them failed: core counts each
//! store once, whether the failed PoP's sum never comes or comes after the re-sends.

mod secagg_support;

use std::collections::BTreeMap;
use std::time::Instant;

use fedmesh_protocol::ids::StoreId;
use fedmesh_protocol::secagg::{
    CoreError, CorePhase, CoreSession, FoldError, MaskedUpdate, PackedVector, QuantisedUpdate,
    SecAggPlan, VectorError,
};
use secagg_support::{Dropouts, config, deadlines, run_round};

/// Store i's update is i + 1 in every coordinate, so the sum of n stores is n(n+1)/2.
fn inputs(plan: &SecAggPlan) -> BTreeMap<StoreId, QuantisedUpdate> {
    plan.cohort()
        .iter()
        .enumerate()
        .map(|(i, id)| {
            let v = vec![i as u64 + 1; plan.vector_len()];
            (id.clone(), QuantisedUpdate::from_ring(plan, v).unwrap())
        })
        .collect()
}

#[test]
fn updates_re_sent_after_their_pop_died_are_counted_once_and_unmask_exactly() {
    let plan = SecAggPlan::new(config(12, 6, 4, 6, 5)).unwrap();
    let drops = Dropouts {
        resent_from_pop: Some(1),
        ..Dropouts::default()
    };
    let run = run_round(&plan, &inputs(&plan), &drops, 3, 11);
    let outcome = run.outcome.unwrap();
    // 1 + 2 + ... + 12 = 78: every store once, the dead PoP's four through their re-sends.
    assert_eq!(outcome.sum, vec![78; 5]);
    assert_eq!(outcome.survivors.len(), 12);
}

#[test]
fn a_late_sum_carrying_re_sent_updates_is_taken_and_the_re_sends_dropped() {
    let plan = SecAggPlan::new(config(12, 6, 4, 6, 5)).unwrap();
    let drops = Dropouts {
        resent_from_pop: Some(0),
        late_sum_arrives: true,
        ..Dropouts::default()
    };
    let run = run_round(&plan, &inputs(&plan), &drops, 3, 12);
    // The late sum is folded (not refused for its contributors) and the held re-sends are
    // not added on top: 78, not 78 + the four stores' 1 + 4 + 7 + 10.
    assert_eq!(run.outcome.unwrap().sum, vec![78; 5]);
}

#[test]
fn re_sends_and_dropouts_together_still_give_the_survivors_sum() {
    let plan = SecAggPlan::new(config(12, 11, 6, 6, 5)).unwrap();
    let dropped = plan.cohort()[2].clone();
    let drops = Dropouts {
        before_upload: [dropped].into(),
        resent_from_pop: Some(1),
        late_sum_arrives: true,
        ..Dropouts::default()
    };
    let run = run_round(&plan, &inputs(&plan), &drops, 2, 13);
    // Store 2 (input 3) never uploaded: 78 - 3.
    let outcome = run.outcome.unwrap();
    assert_eq!(outcome.sum, vec![75; 5]);
    assert_eq!(outcome.survivors.len(), 11);
}

#[test]
fn refuses_re_sends_of_another_round_or_before_uploads_open() {
    let plan = SecAggPlan::new(config(3, 2, 2, 2, 4)).unwrap();
    let now = Instant::now();
    let mut core = CoreSession::new(plan.clone(), now, deadlines());
    let update = MaskedUpdate {
        round: plan.round(),
        store: plan.cohort()[0].clone(),
        vector: PackedVector::pack(&[1, 2, 3, 4], plan.ring_bits()).unwrap(),
    };
    // Before uploads open (keys are still being collected) a re-send is unexpected.
    assert_eq!(
        core.handle_resent_update(now, update.clone()),
        Err(CoreError::Unexpected("re-sent update"))
    );
    assert_eq!(core.phase(), CorePhase::CollectingKeys);

    let mut other_round = update;
    other_round.round.0 += 1;
    assert!(matches!(
        core.handle_resent_update(now, other_round),
        Err(CoreError::WrongRound { .. })
    ));
}

#[test]
fn a_re_send_is_held_once_and_a_malformed_one_is_refused() {
    // Plain mode opens uploads at once, which lets the test reach phase 3 directly.
    let mut cfg = config(4, 3, 2, 2, 4);
    cfg.masking = fedmesh_protocol::secagg::Masking::Plain;
    let plan = SecAggPlan::new(cfg).unwrap();
    let now = Instant::now();
    let mut core = CoreSession::new(plan.clone(), now, deadlines());
    let store = plan.cohort()[1].clone();
    let update = MaskedUpdate {
        round: plan.round(),
        store: store.clone(),
        vector: PackedVector::pack(&[5, 5, 5, 5], plan.ring_bits()).unwrap(),
    };

    let short = MaskedUpdate {
        vector: PackedVector::pack(&[5, 5, 5], plan.ring_bits()).unwrap(),
        ..update.clone()
    };
    assert_eq!(
        core.handle_resent_update(now, short),
        Err(CoreError::Fold(FoldError::Vector(VectorError::Length {
            expected: 4,
            got: 3
        })))
    );
    assert!(!core.holds_update_of(&store));

    let stranger = MaskedUpdate {
        store: StoreId("store-9999".into()),
        ..update.clone()
    };
    assert_eq!(
        core.handle_resent_update(now, stranger),
        Err(CoreError::NotExpectedFrom(StoreId("store-9999".into())))
    );

    assert_eq!(
        core.handle_resent_update(now, update.clone()),
        Ok(Vec::new())
    );
    assert!(core.holds_update_of(&store));
    // The same re-send again (a second PoP, a retry) changes nothing.
    assert_eq!(core.handle_resent_update(now, update), Ok(Vec::new()));
    assert_eq!(core.phase(), CorePhase::CollectingUploads);
}
