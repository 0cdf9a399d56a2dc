//! A whole secure-aggregation round stepped in memory: stores, PoPs and core exchange the
//! protocol's messages directly, with dropouts injected at each phase and virtual time for
//! the deadlines.

#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use fedmesh_protocol::ids::{RoundId, StoreId};
use fedmesh_protocol::secagg::{
    CoreSession, Deadlines, MaskedUpdate, Masking, Outgoing, PartialSumBuilder, PlanConfig,
    QuantisedUpdate, RoundFailure, RoundOutcome, SecAggPlan, StoreSession, ToStore,
};
use rand_chacha::ChaCha20Rng;
use rand_core::SeedableRng;

/// Stores that stop answering at each phase.
#[derive(Debug, Clone, Default)]
pub struct Dropouts {
    /// Never start the round (no key advert).
    pub before_keys: BTreeSet<StoreId>,
    /// Advertise keys, then never share.
    pub before_sharing: BTreeSet<StoreId>,
    /// Share, then never upload.
    pub before_upload: BTreeSet<StoreId>,
    /// Upload, then never answer the unmask request.
    pub before_unmask: BTreeSet<StoreId>,
    /// A PoP (by index) whose stores re-send their masked updates to core one by one, as
    /// stores do when the PoP that accepted them fails to forward them.
    pub resent_from_pop: Option<usize>,
    /// Whether that PoP's own sum still reaches core, after the re-sends.
    pub late_sum_arrives: bool,
}

/// What a round produced, and what the PoPs saw.
pub struct RoundRun {
    /// Core's outcome.
    pub outcome: Result<RoundOutcome, RoundFailure>,
    /// Every masked update a PoP received, by store.
    pub seen_by_pops: BTreeMap<StoreId, MaskedUpdate>,
    /// Stores that uploaded.
    pub uploaded: BTreeSet<StoreId>,
    /// Store sessions left after the round, for probing their refusals.
    pub stores: BTreeMap<StoreId, StoreSession>,
}

/// Deadlines for a simulated round; only their order matters.
pub fn deadlines() -> Deadlines {
    let s = Duration::from_secs(30);
    Deadlines {
        keys: s,
        shares: s,
        upload: s,
        unmask: s,
    }
}

/// A config with the given cohort size and neighbourhood and small, wrap-free defaults.
pub fn config(n: usize, degree: u32, threshold: u32, min_survivors: u32, d: u32) -> PlanConfig {
    PlanConfig {
        round: RoundId(7),
        seed: [42; 32],
        cohort: (0..n).map(|i| StoreId(format!("store-{i:04}"))).collect(),
        masking: Masking::Secure,
        degree,
        threshold,
        min_survivors,
        dimension: d,
        kept: None,
        quant_bits: 8,
        clip: 1.0,
        guard_bits: 2,
        noise_stddev: 0.0,
    }
}

/// Runs one round. `inputs` gives each store's quantised update; `pops` PoPs split the
/// uploads by store position.
pub fn run_round(
    plan: &SecAggPlan,
    inputs: &BTreeMap<StoreId, QuantisedUpdate>,
    drops: &Dropouts,
    pops: usize,
    seed: u64,
) -> RoundRun {
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    let mut now = Instant::now();
    let mut core = CoreSession::new(plan.clone(), now, deadlines());
    let mut stores = BTreeMap::new();
    let mut outbox = Vec::new();

    // 1. Key adverts.
    for id in plan.cohort() {
        if drops.before_keys.contains(id) {
            continue;
        }
        let (session, advert) = StoreSession::new(plan.clone(), id.clone(), &mut rng).unwrap();
        stores.insert(id.clone(), session);
        if let Some(advert) = advert {
            outbox.extend(core.handle_key_advert(now, advert).unwrap());
        }
    }
    // Plain mode has no key phase: core waits for uploads straight away.
    if outbox.is_empty() && plan.masking() == Masking::Secure {
        outbox = flush(&mut core, &mut now);
    }

    // 2. Share keys.
    if plan.masking() == Masking::Secure {
        let mut next = Vec::new();
        for Outgoing { to, message } in std::mem::take(&mut outbox) {
            let ToStore::NeighbourKeys(msg) = message else {
                panic!("expected keys")
            };
            if drops.before_sharing.contains(&to) {
                continue;
            }
            let store = stores.get_mut(&to).unwrap();
            // A store with fewer live neighbours than t leaves the round here.
            let Ok(shares) = store.handle_neighbour_keys(&msg, &mut rng) else {
                continue;
            };
            next.extend(core.handle_encrypted_shares(now, shares).unwrap());
        }
        outbox = if next.is_empty() {
            flush(&mut core, &mut now)
        } else {
            next
        };

        for Outgoing { to, message } in std::mem::take(&mut outbox) {
            let ToStore::Shares(msg) = message else {
                panic!("expected shares")
            };
            stores.get_mut(&to).unwrap().handle_shares(&msg).unwrap();
        }
    }

    // 3. Upload through the PoPs.
    let mut builders: Vec<PartialSumBuilder> = (0..pops)
        .map(|_| PartialSumBuilder::new(plan.clone()))
        .collect();
    let mut seen_by_pops = BTreeMap::new();
    let mut uploaded = BTreeSet::new();
    for (id, store) in stores.iter_mut() {
        let dropped = drops.before_sharing.contains(id) || drops.before_upload.contains(id);
        let ready = store.phase() == fedmesh_protocol::secagg::StorePhase::ReadyToUpload;
        if dropped || !ready {
            continue;
        }
        let masked = store.mask(&inputs[id]).unwrap();
        let pop = plan.position(id).unwrap() % pops;
        builders[pop].fold(&masked).unwrap();
        seen_by_pops.insert(id.clone(), masked);
        uploaded.insert(id.clone());
    }
    let mut next = Vec::new();
    if let Some(failed) = drops.resent_from_pop {
        // The failed PoP's stores re-send first; its own sum comes late, if at all, but
        // while uploads are still open (the other PoPs' sums are not in yet).
        for (id, masked) in &seen_by_pops {
            if plan.position(id).unwrap() % pops == failed {
                next.extend(core.handle_resent_update(now, masked.clone()).unwrap());
            }
        }
        let late = std::mem::replace(&mut builders[failed], PartialSumBuilder::new(plan.clone()));
        if drops.late_sum_arrives
            && let Some(partial) = late.finish().unwrap()
        {
            next.extend(core.handle_partial_sum(now, partial).unwrap());
        }
    }
    for b in builders {
        if let Some(partial) = b.finish().unwrap()
            && core.outcome().is_none()
        {
            next.extend(core.handle_partial_sum(now, partial).unwrap());
        }
    }
    outbox = if next.is_empty() {
        flush(&mut core, &mut now)
    } else {
        next
    };

    // 4. Unmask.
    let mut next = Vec::new();
    for Outgoing { to, message } in std::mem::take(&mut outbox) {
        let ToStore::Unmask(req) = message else {
            panic!("expected unmask request")
        };
        if drops.before_unmask.contains(&to) {
            continue;
        }
        let resp = stores
            .get_mut(&to)
            .unwrap()
            .handle_unmask_request(&req)
            .unwrap();
        if core.outcome().is_none() {
            next.extend(core.handle_unmask_response(now, resp).unwrap());
        }
    }
    assert!(next.is_empty());
    if core.outcome().is_none() {
        flush(&mut core, &mut now);
    }
    let outcome = core
        .outcome()
        .cloned()
        .expect("the round ends at its last deadline");
    RoundRun {
        outcome,
        seen_by_pops,
        uploaded,
        stores,
    }
}

/// Lets the current phase's deadline pass and returns what core sends.
fn flush(core: &mut CoreSession, now: &mut Instant) -> Vec<Outgoing> {
    match core.next_deadline() {
        Some(deadline) => {
            // One tick before the deadline nothing happens; at the deadline the phase ends.
            assert!(
                core.handle_timeout(deadline - Duration::from_millis(1))
                    .is_empty()
            );
            *now = deadline;
            core.handle_timeout(*now)
        }
        None => Vec::new(),
    }
}
