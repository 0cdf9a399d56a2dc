//! Message checks at each tier, stepped by hand: forged, misaddressed, stale and replayed
//! messages are refused with a typed error and change nothing.

mod secagg_support;

use std::time::Instant;

use fedmesh_protocol::ids::{RoundId, StoreId};
use fedmesh_protocol::secagg::{
    CoreError, CorePhase, CoreSession, EncryptedShares, KeyAdvert, Outgoing, SecAggPlan,
    StoreError, StoreSession, ToStore,
};
use rand_chacha::ChaCha20Rng;
use rand_core::SeedableRng;
use secagg_support::{config, deadlines};

/// Four stores, complete graph, t = 2, after key sharing: the stores, core, and the
/// messages core is about to send.
fn after_sharing() -> (
    SecAggPlan,
    Vec<StoreSession>,
    CoreSession,
    Vec<EncryptedShares>,
) {
    let plan = SecAggPlan::new(config(4, 3, 2, 2, 8)).unwrap();
    let mut rng = ChaCha20Rng::seed_from_u64(1);
    let now = Instant::now();
    let mut core = CoreSession::new(plan.clone(), now, deadlines());
    let mut stores = Vec::new();
    let mut out = Vec::new();
    for id in plan.cohort() {
        let (s, advert) = StoreSession::new(plan.clone(), id.clone(), &mut rng).unwrap();
        stores.push(s);
        out.extend(core.handle_key_advert(now, advert.unwrap()).unwrap());
    }
    let mut shares = Vec::new();
    for (store, Outgoing { message, .. }) in stores.iter_mut().zip(out) {
        let ToStore::NeighbourKeys(msg) = message else {
            panic!("keys")
        };
        shares.push(store.handle_neighbour_keys(&msg, &mut rng).unwrap());
    }
    (plan, stores, core, shares)
}

#[test]
fn store_rejects_a_tampered_share_bundle() {
    let (_, mut stores, mut core, shares) = after_sharing();
    let now = Instant::now();
    let mut out = Vec::new();
    for s in shares {
        out.extend(core.handle_encrypted_shares(now, s).unwrap());
    }
    let ToStore::Shares(mut msg) = out.remove(0).message else {
        panic!("shares")
    };
    let from = msg.shares[0].from.clone();
    msg.shares[0].ciphertext[5] ^= 1;
    assert_eq!(
        stores[0].handle_shares(&msg).unwrap_err(),
        StoreError::BadBundle(from)
    );
}

#[test]
fn store_rejects_a_bundle_replayed_from_another_round() {
    let (_, mut stores, mut core, shares) = after_sharing();
    let now = Instant::now();
    let mut out = Vec::new();
    for s in shares {
        out.extend(core.handle_encrypted_shares(now, s).unwrap());
    }
    let ToStore::Shares(mut msg) = out.remove(0).message else {
        panic!("shares")
    };
    msg.round = RoundId(8);
    assert!(matches!(
        stores[0].handle_shares(&msg),
        Err(StoreError::WrongRound { .. })
    ));
}

#[test]
fn core_rejects_shares_addressed_to_stores_that_are_not_neighbours() {
    let (_, _, mut core, mut shares) = after_sharing();
    let now = Instant::now();
    let first = &mut shares[0];
    first.shares[0].to = StoreId("store-0003x".into());
    let from = first.from.clone();
    assert_eq!(
        core.handle_encrypted_shares(now, shares.remove(0))
            .unwrap_err(),
        CoreError::BadShares(from)
    );
    // The refused store is not counted: the phase waits for it until the deadline.
    for s in shares {
        assert!(core.handle_encrypted_shares(now, s).unwrap().is_empty());
    }
    assert_eq!(core.phase(), CorePhase::CollectingShares);
}

#[test]
fn core_rejects_a_second_advert_and_adverts_from_strangers() {
    let plan = SecAggPlan::new(config(4, 3, 2, 2, 8)).unwrap();
    let now = Instant::now();
    let mut core = CoreSession::new(plan.clone(), now, deadlines());
    let advert = KeyAdvert {
        round: RoundId(7),
        store: plan.cohort()[0].clone(),
        cipher_key: [9; 32],
        mask_key: [9; 32],
    };
    core.handle_key_advert(now, advert.clone()).unwrap();
    assert!(matches!(
        core.handle_key_advert(now, advert.clone()),
        Err(CoreError::NotExpectedFrom(_))
    ));
    let stranger = KeyAdvert {
        store: StoreId("elsewhere".into()),
        ..advert.clone()
    };
    assert!(matches!(
        core.handle_key_advert(now, stranger),
        Err(CoreError::NotExpectedFrom(_))
    ));
    let stale = KeyAdvert {
        round: RoundId(6),
        ..advert
    };
    assert!(matches!(
        core.handle_key_advert(now, stale),
        Err(CoreError::WrongRound { .. })
    ));
}

#[test]
fn store_leaves_a_round_with_a_low_order_peer_key() {
    let plan = SecAggPlan::new(config(4, 3, 2, 2, 8)).unwrap();
    let mut rng = ChaCha20Rng::seed_from_u64(2);
    let (mut store, _) =
        StoreSession::new(plan.clone(), plan.cohort()[0].clone(), &mut rng).unwrap();
    // The all-zero point has order 1: a Diffie-Hellman with it yields zero.
    let adverts = plan.cohort()[1..]
        .iter()
        .map(|id| KeyAdvert {
            round: RoundId(7),
            store: id.clone(),
            cipher_key: [0; 32],
            mask_key: [0; 32],
        })
        .collect();
    let msg = fedmesh_protocol::secagg::NeighbourKeys {
        round: RoundId(7),
        to: plan.cohort()[0].clone(),
        adverts,
    };
    assert!(matches!(
        store.handle_neighbour_keys(&msg, &mut rng),
        Err(StoreError::WeakKey(_))
    ));
}

#[test]
fn store_masks_only_once_per_round() {
    let mut cfg = config(3, 2, 2, 1, 4);
    cfg.masking = fedmesh_protocol::secagg::Masking::Plain;
    let plan = SecAggPlan::new(cfg).unwrap();
    let mut rng = ChaCha20Rng::seed_from_u64(3);
    let (mut store, advert) =
        StoreSession::new(plan.clone(), plan.cohort()[0].clone(), &mut rng).unwrap();
    assert!(advert.is_none());
    let q = plan.quantise(&[0.5; 4], &mut rng).unwrap();
    store.mask(&q).unwrap();
    assert!(matches!(store.mask(&q), Err(StoreError::WrongPhase { .. })));
}
