//! What a PoP or core can learn: masked vectors look uniform, a store never releases both
//! share kinds of one peer, the distributed noise has the planned variance, and decoders of
//! attacker bytes return errors.

mod secagg_support;

use std::collections::BTreeMap;

use fedmesh_protocol::ids::{RoundId, StoreId};
use fedmesh_protocol::secagg::{
    Masking, PackedVector, PartialSumBuilder, QuantisedUpdate, SecAggPlan, Share, StoreError,
    StoreSession, UnmaskRequest, UnmaskState,
};
use proptest::prelude::*;
use rand_chacha::ChaCha20Rng;
use rand_core::SeedableRng;
use secagg_support::{Dropouts, config, run_round};

/// Pearson's chi-square statistic of `values` (each below 2^r) over 2^bucket_bits equal
/// buckets of the ring, by their top bits.
fn chi_square(values: &[u64], ring_bits: u32, bucket_bits: u32) -> f64 {
    let buckets = 1usize << bucket_bits;
    let mut counts = vec![0u64; buckets];
    for v in values {
        counts[(v >> (ring_bits - bucket_bits)) as usize] += 1;
    }
    let expected = values.len() as f64 / buckets as f64;
    counts
        .iter()
        .map(|&c| (c as f64 - expected).powi(2) / expected)
        .sum()
}

/// Upper 1e-6 quantiles of chi-square, by the Wilson-Hilferty approximation
/// k (1 - 2/(9k) + z sqrt(2/(9k)))^3 with z = 4.753: 63 degrees of freedom -> 131.7, 15 -> 57.4.
const CHI2_63_P1E6: f64 = 131.7;
const CHI2_15_P1E6: f64 = 57.4;

fn zero_inputs(plan: &SecAggPlan) -> BTreeMap<StoreId, QuantisedUpdate> {
    plan.cohort()
        .iter()
        .map(|id| {
            let zeros = vec![0; plan.vector_len()];
            (id.clone(), QuantisedUpdate::from_ring(plan, zeros).unwrap())
        })
        .collect()
}

#[test]
fn masked_updates_seen_by_a_pop_are_uniform_in_the_ring() {
    // 20 stores upload all-zero updates (the most structured input there is) with d = 2,000
    // in a 15-bit ring (8 + 5 + 2). Pooled: 40,000 values in 64 buckets; each store: 2,000
    // values in 16 buckets. Seeds are fixed, so the test is deterministic; a uniform source
    // would fail it with probability 1e-6 per statistic.
    let plan = SecAggPlan::new(config(20, 8, 5, 10, 2_000)).unwrap();
    let r = plan.ring_bits();
    assert_eq!(r, 15);
    let run = run_round(&plan, &zero_inputs(&plan), &Dropouts::default(), 2, 11);
    assert!(run.outcome.is_ok());

    let mut pooled = Vec::new();
    for masked in run.seen_by_pops.values() {
        let v = masked.vector.unpack(r, plan.vector_len()).unwrap();
        let stat = chi_square(&v, r, 4);
        assert!(
            stat < CHI2_15_P1E6,
            "store {} chi-square {stat}",
            masked.store
        );
        pooled.extend(v);
    }
    let stat = chi_square(&pooled, r, 6);
    assert!(stat < CHI2_63_P1E6, "pooled chi-square {stat}");

    // The same statistic has power: plain-mode uploads of the same inputs fail it badly.
    let mut cfg = plan.config().clone();
    cfg.masking = Masking::Plain;
    let plain = SecAggPlan::new(cfg).unwrap();
    let run = run_round(&plain, &zero_inputs(&plain), &Dropouts::default(), 2, 11);
    let first = run.seen_by_pops.values().next().unwrap();
    let v = first.vector.unpack(r, plain.vector_len()).unwrap();
    // All 2,000 zeros fall in bucket 0: (2000 - 125)^2/125 + 15 * 125 = 30,000.
    assert!(chi_square(&v, r, 4) > 100.0 * CHI2_15_P1E6);
}

#[test]
fn store_refuses_a_request_for_both_share_kinds_of_one_peer() {
    let plan = SecAggPlan::new(config(8, 7, 5, 5, 4)).unwrap();
    let mut run = run_round(&plan, &zero_inputs(&plan), &Dropouts::default(), 1, 3);
    assert!(run.outcome.is_ok());
    let me = plan.cohort()[0].clone();
    let peer = plan.cohort()[1].clone();
    let other = plan.cohort()[2].clone();
    let store = run.stores.get_mut(&me).unwrap();
    let request = |seed: Vec<StoreId>, key: Vec<StoreId>| UnmaskRequest {
        round: RoundId(7),
        to: me.clone(),
        seed_shares_of: seed,
        key_shares_of: key,
    };

    // 1. One request naming the peer in both lists is refused whole.
    let both = request(vec![peer.clone(), other.clone()], vec![peer.clone()]);
    assert_eq!(
        store.handle_unmask_request(&both).unwrap_err(),
        StoreError::BothShareKinds(peer.clone())
    );

    // 2. The store already released seed shares in the round (core asked every survivor);
    //    a later request for the peer's key share is refused too.
    let later = request(vec![], vec![peer.clone()]);
    assert_eq!(
        store.handle_unmask_request(&later).unwrap_err(),
        StoreError::BothShareKinds(peer.clone())
    );

    // 3. Asking again for the kind already released is answered (a retry after a loss).
    let again = request(vec![peer.clone()], vec![]);
    assert_eq!(
        store
            .handle_unmask_request(&again)
            .unwrap()
            .seed_shares
            .len(),
        1
    );
}

#[test]
fn store_that_released_a_key_share_refuses_the_seed_share() {
    // Store 0's neighbour 1 drops after sharing; core asks store 0 for 1's key share.
    let plan = SecAggPlan::new(config(8, 7, 5, 5, 4)).unwrap();
    let dropped = plan.cohort()[1].clone();
    let drops = Dropouts {
        before_upload: [dropped.clone()].into(),
        ..Dropouts::default()
    };
    let mut run = run_round(&plan, &zero_inputs(&plan), &drops, 1, 4);
    assert_eq!(run.outcome.unwrap().survivors.len(), 7);
    let me = plan.cohort()[0].clone();
    let store = run.stores.get_mut(&me).unwrap();
    let req = UnmaskRequest {
        round: RoundId(7),
        to: me,
        seed_shares_of: vec![dropped.clone()],
        key_shares_of: vec![],
    };
    assert_eq!(
        store.handle_unmask_request(&req).unwrap_err(),
        StoreError::BothShareKinds(dropped)
    );
}

#[test]
fn decoded_sum_carries_the_planned_noise_variance() {
    // 10 stores, at least 8 planned to survive, 2 drop before upload: the sum carries 8
    // shares of N_Z(0, s^2). Inputs are zero, so quantisation adds nothing and the decoded
    // sum is pure noise. Planned sd 0.05 clip units = 6.35 ring units (scale 127).
    //
    // N = 20,000 coordinates. For (near-)Gaussian noise the sample variance has relative sd
    // sqrt(2/(N-1)) = 1.0%, and the sample mean has sd sigma/sqrt(N); both bounds are 6 sd
    // (false failure below 2e-9 each). Seeds are fixed, so the test is deterministic.
    let n = 20_000u32;
    let mut cfg = config(10, 9, 6, 8, n);
    cfg.noise_stddev = 0.05;
    cfg.guard_bits = 6;
    let plan = SecAggPlan::new(cfg).unwrap();
    let planned = plan.planned_noise().unwrap();
    // The guarantee is never below the plan (the per-store variance is rounded up).
    assert!(planned.stddev >= 0.05 && planned.stddev < 0.05 * 1.001);

    for (seed, dropped) in [(21u64, 2usize), (22, 0)] {
        let mut rng = ChaCha20Rng::seed_from_u64(seed);
        let zeros = vec![0.0f32; n as usize];
        let inputs = plan
            .cohort()
            .iter()
            .map(|id| (id.clone(), plan.quantise(&zeros, &mut rng).unwrap()))
            .collect();
        let drops = Dropouts {
            before_upload: plan.cohort()[..dropped].iter().cloned().collect(),
            ..Dropouts::default()
        };
        let outcome = run_round(&plan, &inputs, &drops, 3, seed).outcome.unwrap();
        // The ledger's figure counts the 8 guaranteed stores whoever survived; the sum
        // itself carries one share per survivor.
        assert_eq!(outcome.noise.unwrap().stores, 8);
        let noise = outcome.realised_noise.unwrap();
        assert_eq!(noise.stores as usize, 10 - dropped);
        let decoded = plan.decode(&outcome.sum);
        let mean = decoded.iter().map(|&x| f64::from(x)).sum::<f64>() / f64::from(n);
        let var = decoded
            .iter()
            .map(|&x| (f64::from(x) - mean).powi(2))
            .sum::<f64>()
            / f64::from(n - 1);
        let want = noise.stddev.powi(2);
        let rel_sd = (2.0 / f64::from(n - 1)).sqrt();
        assert!(
            (var / want - 1.0).abs() < 6.0 * rel_sd,
            "variance {var}, planned {want}"
        );
        assert!(
            mean.abs() < 6.0 * noise.stddev / f64::from(n).sqrt(),
            "mean {mean}"
        );
        // The shares sum to within tau of one discrete Gaussian; with s^2 = 5.04 per store
        // the first term, 10 exp(-2 pi^2 5.04 / 2) = 2.5e-21, dominates.
        assert!(noise.tau < 1e-19);
    }
}

#[test]
fn quantisation_is_unbiased() {
    // One store, plain mode, value 0.3 at 4 bits (scale 7): 2.1 ring units, rounded to 2 or
    // 3 with P[3] = 0.1. Over 40,000 coordinates the mean level has sd sqrt(0.09/40,000) =
    // 0.0015; the bound is 6 sd.
    let mut cfg = config(3, 2, 2, 1, 40_000);
    cfg.masking = Masking::Plain;
    cfg.quant_bits = 4;
    let plan = SecAggPlan::new(cfg).unwrap();
    let mut rng = ChaCha20Rng::seed_from_u64(5);
    let q = plan.quantise(&vec![0.3f32; 40_000], &mut rng).unwrap();
    let mean = q
        .values()
        .iter()
        .map(|&v| plan.centred(v) as f64)
        .sum::<f64>()
        / 40_000.0;
    assert!((mean - 2.1).abs() < 6.0 * 0.0015, "mean level {mean}");
    assert!(q.values().iter().all(|&v| v == 2 || v == 3));
}

#[test]
fn random_k_keeps_the_same_coordinates_everywhere_and_decodes_in_place() {
    let mut cfg = config(4, 3, 2, 2, 1_000);
    cfg.kept = Some(100);
    cfg.masking = Masking::Plain;
    let plan = SecAggPlan::new(cfg.clone()).unwrap();
    let again = SecAggPlan::new(cfg).unwrap();
    let kept = plan.kept_coordinates().unwrap();
    assert_eq!(kept, again.kept_coordinates().unwrap());
    assert_eq!(plan.vector_len(), 100);

    // An update equal to the clip bound everywhere decodes to 1.0 on kept coordinates only.
    let mut rng = ChaCha20Rng::seed_from_u64(1);
    let q = plan.quantise(&vec![1.0f32; 1_000], &mut rng).unwrap();
    let decoded = plan.decode(q.values());
    for (i, x) in decoded.iter().enumerate() {
        let want = if kept.binary_search(&(i as u32)).is_ok() {
            1.0
        } else {
            0.0
        };
        assert_eq!(*x, want);
    }
}

#[test]
fn pop_rejects_replayed_and_foreign_updates_without_touching_its_sum() {
    let plan = SecAggPlan::new(config(6, 5, 3, 3, 16)).unwrap();
    let run = run_round(&plan, &zero_inputs(&plan), &Dropouts::default(), 1, 9);
    let first = run.seen_by_pops.values().next().unwrap().clone();
    let mut pop = PartialSumBuilder::new(plan.clone());
    pop.fold(&first).unwrap();
    assert!(pop.fold(&first).is_err());

    let mut stale = first.clone();
    stale.round = RoundId(6);
    stale.store = plan.cohort()[1].clone();
    assert!(pop.fold(&stale).is_err());

    let mut stranger = first.clone();
    stranger.store = StoreId("not-in-cohort".into());
    assert!(pop.fold(&stranger).is_err());
    assert_eq!(pop.len(), 1);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Attacker bytes in any decoded field give an error, never a panic.
    #[test]
    fn decoders_of_attacker_bytes_return_errors(
        bytes in proptest::collection::vec(any::<u8>(), 0..200),
        ring_bits in 0u32..70,
        len in 0u32..100,
    ) {
        let _ = Share::from_bytes(&bytes);
        let v = PackedVector { ring_bits, len, bytes: bytes.clone() };
        let _ = v.unpack(ring_bits, len as usize);
        let _ = v.unpack(15, 40);
        let _ = serde_json::from_slice::<fedmesh_protocol::secagg::UnmaskResponse>(&bytes);
        let _ = serde_json::from_slice::<SecAggPlan>(&bytes);
    }
}

#[test]
fn a_plan_from_the_wire_is_checked_again() {
    let plan = SecAggPlan::new(config(6, 5, 3, 3, 16)).unwrap();
    let mut json: serde_json::Value = serde_json::to_value(&plan).unwrap();
    json["threshold"] = 1.into();
    assert!(serde_json::from_value::<SecAggPlan>(json).is_err());
    let round_trip: SecAggPlan =
        serde_json::from_value(serde_json::to_value(&plan).unwrap()).unwrap();
    assert_eq!(round_trip.graph(), plan.graph());
}

#[test]
fn a_store_resumed_from_its_saved_state_answers_as_before_and_keeps_its_refusals() {
    // Store 0 answered core's request (seed shares of its surviving neighbours), then its
    // process died; the state it saved, through JSON as the agent writes it, is all the new
    // process has.
    let plan = SecAggPlan::new(config(8, 7, 5, 5, 4)).unwrap();
    let mut run = run_round(&plan, &zero_inputs(&plan), &Dropouts::default(), 1, 5);
    assert!(run.outcome.is_ok());
    let me = plan.cohort()[0].clone();
    let store = run.stores.get_mut(&me).unwrap();
    let neighbours: Vec<StoreId> = plan
        .graph()
        .neighbours(0)
        .iter()
        .map(|&p| plan.cohort()[p as usize].clone())
        .collect();
    let request = |seed: Vec<StoreId>, key: Vec<StoreId>| UnmaskRequest {
        round: RoundId(7),
        to: me.clone(),
        seed_shares_of: seed,
        key_shares_of: key,
    };
    let asked = request(neighbours.clone(), vec![]);
    let before = store.handle_unmask_request(&asked).unwrap();
    let saved = serde_json::to_vec(&store.unmask_state().unwrap()).unwrap();

    let state: UnmaskState = serde_json::from_slice(&saved).unwrap();
    assert_eq!(state.round(), RoundId(7));
    let mut rng = ChaCha20Rng::seed_from_u64(1);
    let mut resumed = StoreSession::resume(&state, &mut rng).unwrap();
    assert_eq!(resumed.handle_unmask_request(&asked).unwrap(), before);
    assert_eq!(
        resumed
            .handle_unmask_request(&request(vec![], vec![neighbours[0].clone()]))
            .unwrap_err(),
        StoreError::BothShareKinds(neighbours[0].clone())
    );

    // A state naming a store outside the plan, or shares for a non-neighbour, is refused.
    let mut text: serde_json::Value = serde_json::from_slice(&saved).unwrap();
    text["me"] = serde_json::json!("not-a-store");
    let foreign: UnmaskState = serde_json::from_value(text).unwrap();
    assert!(matches!(
        StoreSession::resume(&foreign, &mut rng),
        Err(StoreError::BadState(_))
    ));
    // (The graph here is complete, so the one non-neighbour is the store itself.)
    let mut text: serde_json::Value = serde_json::from_slice(&saved).unwrap();
    text["held"][0][0] = serde_json::json!(me.0);
    let misplaced: UnmaskState = serde_json::from_value(text).unwrap();
    assert!(matches!(
        StoreSession::resume(&misplaced, &mut rng),
        Err(StoreError::BadState(_))
    ));
}
