//! Whole rounds over random cohorts, thresholds and dropouts: the unmasked sum is exactly
//! the survivors' sum, and a round that cannot recover ends with a typed reason.

mod secagg_support;

use std::collections::{BTreeMap, BTreeSet};

use fedmesh_protocol::ids::StoreId;
use fedmesh_protocol::secagg::{
    CorePhase, Masking, PlanError, QuantisedUpdate, RoundFailure, SecAggPlan,
};
use proptest::prelude::*;
use rand_chacha::ChaCha20Rng;
use rand_core::{RngCore, SeedableRng};
use secagg_support::{Dropouts, config, run_round};

/// What the protocol must do with these dropouts, worked out from SecAgg+'s rules rather
/// than from core's code: a phase that ends with fewer than `min_survivors` stores fails;
/// a store whose live neighbours are fewer than t cannot share and leaves; every survivor's
/// seed and every dropped sharer's key (if a survivor masked with it) needs t answering
/// holders among its neighbours.
fn expected(plan: &SecAggPlan, drops: &Dropouts) -> Result<BTreeSet<usize>, CorePhase> {
    let n = plan.cohort().len();
    let m = plan.min_survivors();
    let t = plan.threshold();
    let g = plan.graph();
    let id = |i: usize| &plan.cohort()[i];
    let all: BTreeSet<usize> = (0..n).collect();

    let u1: BTreeSet<usize> = all
        .iter()
        .copied()
        .filter(|&i| !drops.before_keys.contains(id(i)))
        .collect();
    if plan.masking() == Masking::Plain {
        let u3: BTreeSet<usize> = u1
            .iter()
            .copied()
            .filter(|&i| {
                !drops.before_sharing.contains(id(i)) && !drops.before_upload.contains(id(i))
            })
            .collect();
        return if u3.len() < m {
            Err(CorePhase::CollectingUploads)
        } else {
            Ok(u3)
        };
    }
    if u1.len() < m {
        return Err(CorePhase::CollectingKeys);
    }
    let live = |i: usize, set: &BTreeSet<usize>| {
        g.neighbours(i)
            .iter()
            .filter(|&&j| set.contains(&(j as usize)))
            .count()
    };
    let u2: BTreeSet<usize> = u1
        .iter()
        .copied()
        .filter(|&i| !drops.before_sharing.contains(id(i)) && live(i, &u1) >= t)
        .collect();
    if u2.len() < m {
        return Err(CorePhase::CollectingShares);
    }
    let u3: BTreeSet<usize> = u2
        .iter()
        .copied()
        .filter(|&i| !drops.before_upload.contains(id(i)))
        .collect();
    if u3.len() < m {
        return Err(CorePhase::CollectingUploads);
    }
    let u4: BTreeSet<usize> = u3
        .iter()
        .copied()
        .filter(|&i| !drops.before_unmask.contains(id(i)))
        .collect();
    let holders = |u: usize| {
        g.neighbours(u)
            .iter()
            .filter(|&&v| u4.contains(&(v as usize)) && u2.contains(&(v as usize)))
            .count()
    };
    for &u in &u2 {
        let needed = u3.contains(&u) || g.neighbours(u).iter().any(|&v| u3.contains(&(v as usize)));
        if needed && holders(u) < t {
            return Err(CorePhase::Unmasking);
        }
    }
    Ok(u3)
}

/// A random cohort: size, an even degree (or the complete graph), t just above k/2 (where
/// dropouts decide the outcome), a minimum from t to t + 2, four dropout rates of up to 10%
/// each, a ring width and a PoP count.
#[derive(Debug, Clone)]
struct Case {
    n: usize,
    degree: u32,
    threshold: u32,
    min_survivors: u32,
    rates: [f64; 4],
    quant_bits: u32,
    d: u32,
    pops: usize,
    plain: bool,
    seed: u64,
}

fn case(max_n: usize, max_half_degree: u32) -> impl Strategy<Value = Case> {
    (3usize..=max_n, 1u32..=max_half_degree, any::<u64>()).prop_flat_map(|(n, half, seed)| {
        let k = (2 * half).min(n as u32 - 1);
        let t_low = k / 2 + 1;
        (
            Just(n),
            Just(k),
            t_low..=(t_low + 2).min(k),
            proptest::array::uniform4(0.0f64..0.1),
            2u32..=16,
            1u32..=6,
            1usize..=4,
            proptest::bool::weighted(0.1),
            Just(seed),
        )
            .prop_flat_map(|(n, k, t, rates, quant_bits, d, pops, plain, seed)| {
                (t..=(t + 2).min(n as u32)).prop_map(move |m| Case {
                    n,
                    degree: k,
                    threshold: t,
                    min_survivors: m,
                    rates,
                    quant_bits,
                    d,
                    pops,
                    plain,
                    seed,
                })
            })
    })
}

fn check_case(c: &Case) -> Result<(), TestCaseError> {
    let mut cfg = config(c.n, c.degree, c.threshold, c.min_survivors, c.d);
    cfg.quant_bits = c.quant_bits;
    cfg.guard_bits = 0;
    if c.plain {
        cfg.masking = Masking::Plain;
    }
    cfg.seed = {
        let mut s = [0u8; 32];
        s[..8].copy_from_slice(&c.seed.to_le_bytes());
        s
    };
    let plan = SecAggPlan::new(cfg).unwrap();
    let r = plan.ring_bits();
    let mut rng = ChaCha20Rng::seed_from_u64(c.seed);

    // Inputs: uniform ring elements, the hardest case for cancellation mistakes.
    let inputs: BTreeMap<StoreId, QuantisedUpdate> = plan
        .cohort()
        .iter()
        .map(|id| {
            let v = (0..c.d).map(|_| rng.next_u64() & ((1 << r) - 1)).collect();
            (id.clone(), QuantisedUpdate::from_ring(&plan, v).unwrap())
        })
        .collect();
    let mut drops = Dropouts::default();
    for id in plan.cohort() {
        let roll =
            |rate: f64, rng: &mut ChaCha20Rng| (rng.next_u64() as f64 / u64::MAX as f64) < rate;
        let sets = [
            &mut drops.before_keys,
            &mut drops.before_sharing,
            &mut drops.before_upload,
            &mut drops.before_unmask,
        ];
        for (set, rate) in sets.into_iter().zip(c.rates) {
            if roll(rate, &mut rng) {
                set.insert(id.clone());
                break;
            }
        }
    }

    let run = run_round(&plan, &inputs, &drops, c.pops, c.seed);
    match (expected(&plan, &drops), &run.outcome) {
        (Ok(survivors), Ok(outcome)) => {
            let ids: Vec<StoreId> = survivors
                .iter()
                .map(|&i| plan.cohort()[i].clone())
                .collect();
            prop_assert_eq!(&outcome.survivors, &ids);
            let mut sum = vec![0u64; c.d as usize];
            for id in &ids {
                for (s, v) in sum.iter_mut().zip(inputs[id].values()) {
                    *s = (*s + v) & ((1 << r) - 1);
                }
            }
            prop_assert_eq!(&outcome.sum, &sum);
        }
        (Err(phase), Err(failure)) => match failure {
            RoundFailure::TooFewStores {
                phase: p,
                survivors,
                needed,
            } => {
                prop_assert_eq!(*p, phase);
                prop_assert!(survivors < needed);
            }
            RoundFailure::SharesMissing { have, need, .. } => {
                prop_assert_eq!(phase, CorePhase::Unmasking);
                prop_assert!(have < need);
            }
            RoundFailure::InconsistentShares(s) => {
                prop_assert!(false, "honest shares reported inconsistent for {}", s);
            }
        },
        (want, got) => {
            prop_assert!(
                false,
                "expected {:?}, got {:?}",
                want.map(|s| s.len()),
                got.as_ref().map(|o| o.survivors.len())
            );
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(40))]

    /// Small cohorts, any neighbourhood up to the complete graph.
    #[test]
    fn unmasked_sum_is_the_survivors_sum_in_small_cohorts(c in case(40, 20)) {
        check_case(&c)?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(6))]

    /// Large cohorts with sparse SecAgg+ graphs.
    #[test]
    fn unmasked_sum_is_the_survivors_sum_in_large_cohorts(c in case(300, 6)) {
        check_case(&c)?;
    }
}

#[test]
fn round_without_dropouts_recovers_the_exact_sum() {
    let plan = SecAggPlan::new(config(12, 6, 4, 4, 5)).unwrap();
    let inputs: BTreeMap<StoreId, QuantisedUpdate> = plan
        .cohort()
        .iter()
        .enumerate()
        .map(|(i, id)| {
            (
                id.clone(),
                QuantisedUpdate::from_ring(&plan, vec![i as u64; 5]).unwrap(),
            )
        })
        .collect();
    let run = run_round(&plan, &inputs, &Dropouts::default(), 3, 1);
    // 0 + 1 + ... + 11 = 66 in every coordinate.
    assert_eq!(run.outcome.unwrap().sum, vec![66; 5]);
}

#[test]
fn round_with_too_few_uploads_fails_with_a_reason() {
    let plan = SecAggPlan::new(config(6, 5, 3, 4, 3)).unwrap();
    let inputs = plan
        .cohort()
        .iter()
        .map(|id| {
            (
                id.clone(),
                QuantisedUpdate::from_ring(&plan, vec![1; 3]).unwrap(),
            )
        })
        .collect();
    let drops = Dropouts {
        before_upload: plan.cohort()[..3].iter().cloned().collect(),
        ..Dropouts::default()
    };
    let run = run_round(&plan, &inputs, &drops, 2, 2);
    assert_eq!(
        run.outcome.unwrap_err(),
        RoundFailure::TooFewStores {
            phase: CorePhase::CollectingUploads,
            survivors: 3,
            needed: 4
        }
    );
}

#[test]
fn refuses_a_plan_whose_sum_could_wrap() {
    // 200 stores at 8 bits: 200 * 127 = 25,400 needs 16 signed bits and r = 8 + 8 + 0 fits.
    // Noise of sd 5 (635 ring units) split over 150 guaranteed stores, summed over all 200:
    // 12 sd = 12 * sqrt(200 * 635^2 / 150) = 8,798, so |sum| may reach 34,198 > 2^15 - 1.
    let mut cfg = config(200, 16, 9, 150, 10);
    cfg.guard_bits = 0;
    assert!(SecAggPlan::new(cfg.clone()).is_ok());
    cfg.noise_stddev = 5.0;
    assert!(matches!(
        SecAggPlan::new(cfg.clone()),
        Err(PlanError::WouldWrap { .. })
    ));
    cfg.guard_bits = 6;
    assert!(SecAggPlan::new(cfg).is_ok());
}

#[test]
fn refuses_a_threshold_at_or_below_half_the_degree() {
    assert!(matches!(
        SecAggPlan::new(config(20, 8, 4, 4, 1)),
        Err(PlanError::BadThreshold { .. })
    ));
}

/// Phases that end early do not pull the later deadlines in: the upload phase still ends at
/// start + keys + shares + upload, the upload deadline announced to PoPs and stores when
/// the session started, and a message at or past its phase's deadline is late even before a
/// timeout runs.
#[test]
fn phase_deadlines_add_up_from_the_start_whatever_ends_early() {
    use fedmesh_protocol::secagg::{CoreError, CoreSession, StoreSession};
    use std::time::Duration;

    let plan = SecAggPlan::new(config(4, 3, 2, 2, 3)).unwrap();
    let d = secagg_support::deadlines();
    let start = std::time::Instant::now();
    let mut core = CoreSession::new(plan.clone(), start, d);
    assert_eq!(core.next_deadline(), Some(start + d.keys));

    // 1. Every advert arrives within a millisecond: the shares phase starts at once, and
    //    still ends at start + keys + shares.
    let mut rng = ChaCha20Rng::seed_from_u64(5);
    let mut sessions = BTreeMap::new();
    let mut outgoing = Vec::new();
    let soon = start + Duration::from_millis(1);
    for id in plan.cohort() {
        let (session, advert) = StoreSession::new(plan.clone(), id.clone(), &mut rng).unwrap();
        sessions.insert(id.clone(), session);
        outgoing.extend(core.handle_key_advert(soon, advert.unwrap()).unwrap());
    }
    assert_eq!(core.phase(), CorePhase::CollectingShares);
    assert_eq!(core.next_deadline(), Some(start + d.keys + d.shares));

    // 2. A share bundle handled at that deadline, before any timeout ran, is late.
    let late = start + d.keys + d.shares;
    let mut refused = 0;
    for out in outgoing {
        let fedmesh_protocol::secagg::ToStore::NeighbourKeys(keys) = out.message else {
            panic!("expected neighbour keys");
        };
        let shares = sessions
            .get_mut(&out.to)
            .unwrap()
            .handle_neighbour_keys(&keys, &mut rng)
            .unwrap();
        let answer = core.handle_encrypted_shares(late, shares);
        assert!(
            matches!(answer, Err(CoreError::Unexpected(_))),
            "{answer:?}"
        );
        refused += 1;
    }
    assert_eq!(refused, 4);

    // 3. Plain sessions wait for uploads until the same absolute upload deadline.
    let mut plain = config(4, 3, 2, 2, 3);
    plain.masking = Masking::Plain;
    let core = CoreSession::new(SecAggPlan::new(plain).unwrap(), start, d);
    assert_eq!(
        core.next_deadline(),
        Some(start + d.keys + d.shares + d.upload)
    );
}

#[test]
fn recommended_neighbourhood_is_the_smallest_degree_that_keeps_secrets_recoverable() {
    // Reference values by exact binomial sums in Python (math.comb): the smallest even k
    // with n * P[Binomial(k, 1 - dropout) < k/2 + 1] <= 1e-6, else the complete graph.
    let cases = [
        ((3, 0.1), (2, 2)),
        ((50, 0.2), (49, 25)),
        ((100, 0.2), (74, 38)),
        ((1000, 0.2), (84, 43)),
        ((1000, 0.05), (24, 13)),
        ((10_000, 0.1), (42, 22)),
        ((200, 0.0), (2, 2)),
    ];
    for ((n, dropout), expected) in cases {
        assert_eq!(
            SecAggPlan::recommended_neighbourhood(n, dropout),
            expected,
            "n = {n}, dropout = {dropout}"
        );
    }
}
