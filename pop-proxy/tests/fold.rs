//! Secure-mode pre-aggregation: what reaches the partial sum and what is refused.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use fedmesh_policy::{Decision, PolicyLocation};
use fedmesh_pop_proxy::{
    PartialSum, RejectReason, Rejection, Ring, RoundAccumulator, RoundSpec, StateDir, UpdateHeader,
};
use fedmesh_protocol::ids::{ModelVersion, RoundId, StoreId};
use proptest::prelude::*;

fn store(i: usize) -> StoreId {
    StoreId(format!("store-{i:03}"))
}

fn allowed() -> Decision {
    Decision {
        allow: true,
        rule: "allow".into(),
        reasons: Vec::new(),
        revision: "test".into(),
    }
}

fn spec(bits: u32, len: usize, stores: usize, deadline: Instant) -> RoundSpec {
    RoundSpec {
        round: RoundId(7),
        model_version: ModelVersion(3),
        ring: Ring::new(bits).unwrap(),
        len,
        expected: (0..stores).map(store).collect(),
        deadline,
    }
}

fn header(spec: &RoundSpec, who: usize) -> UpdateHeader {
    UpdateHeader {
        store: store(who),
        round: spec.round,
        model_version: spec.model_version,
        ring_bits: spec.ring.bits(),
        len: spec.len,
    }
}

/// A masked vector made by the protocol crate's packer, the layout stores upload.
fn packed(values: &[u64], bits: u32) -> Vec<u8> {
    fedmesh_protocol::codec::bitpack::pack(values, bits).unwrap()
}

/// An upload from the store its header names, as an honest store sends it.
fn upload(
    round: &mut RoundAccumulator,
    header: &UpdateHeader,
    decision: &Decision,
    bytes: &[u8],
    chunk: usize,
) -> Result<(), Rejection> {
    upload_as(round, &header.store, header, decision, bytes, chunk)
}

/// An upload over a connection the transport authenticated as `peer`.
fn upload_as(
    round: &mut RoundAccumulator,
    peer: &StoreId,
    header: &UpdateHeader,
    decision: &Decision,
    bytes: &[u8],
    chunk: usize,
) -> Result<(), Rejection> {
    let mut fold = round.begin(peer, header, decision)?;
    for piece in bytes.chunks(chunk.max(1)) {
        if let Err(rejection) = fold.push(piece) {
            round.abort(fold, rejection.clone());
            return Err(rejection);
        }
    }
    round.commit(fold)
}

fn close_now(round: &mut RoundAccumulator) -> PartialSum {
    round
        .poll_close(round.spec().deadline)
        .expect("the round closes at its deadline")
}

fn far() -> Instant {
    Instant::now() + Duration::from_secs(3600)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn partial_sum_equals_modular_sum_of_accepted_updates(
        bits in 1u32..=64,
        len in 1usize..40,
        vectors in proptest::collection::vec(proptest::collection::vec(any::<u64>(), 40), 1..8),
        denied in proptest::collection::vec(any::<bool>(), 8),
        chunk in 1usize..50,
    ) {
        let spec = spec(bits, len, vectors.len(), far());
        let mask = spec.ring.mask();
        let mut round = RoundAccumulator::open(spec.clone());
        let mut expected = vec![0u64; len];
        let mut accepted = BTreeSet::new();

        for (i, raw) in vectors.iter().enumerate() {
            let values: Vec<u64> = raw[..len].iter().map(|v| v & mask).collect();
            let decision = if denied[i] {
                Decision { allow: false, rule: "epsilon_remaining".into(), ..allowed() }
            } else {
                allowed()
            };
            let result = upload(&mut round, &header(&spec, i), &decision, &packed(&values, bits), chunk);
            if denied[i] {
                let denied = matches!(result, Err(Rejection::PolicyDenied { .. }));
                prop_assert!(denied, "a denied store was not refused: {:?}", result);
            } else {
                prop_assert_eq!(result, Ok(()));
                // Reference: big-integer-free modular sum, (a + b) mod 2^r one by one.
                for (e, v) in expected.iter_mut().zip(&values) {
                    *e = ((u128::from(*e) + u128::from(*v)) % (1u128 << bits)) as u64;
                }
                accepted.insert(store(i));
            }
        }

        let sum = close_now(&mut round);
        prop_assert_eq!(sum.values, expected);
        prop_assert_eq!(sum.contributors.into_iter().collect::<BTreeSet<_>>(), accepted);
    }
}

#[test]
fn rejects_each_bad_update_with_its_reason() {
    let spec = spec(16, 5, 3, far());
    let mut round = RoundAccumulator::open(spec.clone());
    let good = packed(&[1, 2, 3, 4, 5], 16);
    upload(&mut round, &header(&spec, 0), &allowed(), &good, 3).unwrap();

    let cases: Vec<(UpdateHeader, Vec<u8>, RejectReason)> = vec![
        (header(&spec, 0), good.clone(), RejectReason::Duplicate),
        (
            UpdateHeader {
                round: RoundId(6),
                ..header(&spec, 1)
            },
            good.clone(),
            RejectReason::StaleRound,
        ),
        (
            UpdateHeader {
                round: RoundId(8),
                ..header(&spec, 1)
            },
            good.clone(),
            RejectReason::UnknownRound,
        ),
        (
            UpdateHeader {
                model_version: ModelVersion(2),
                ..header(&spec, 1)
            },
            good.clone(),
            RejectReason::WrongModelVersion,
        ),
        (
            UpdateHeader {
                len: 6,
                ..header(&spec, 1)
            },
            packed(&[1, 2, 3, 4, 5, 6], 16),
            RejectReason::WrongShape,
        ),
        (
            UpdateHeader {
                ring_bits: 32,
                ..header(&spec, 1)
            },
            packed(&[1, 2, 3, 4, 5], 32),
            RejectReason::WrongRing,
        ),
        (header(&spec, 9), good.clone(), RejectReason::NotInCohort),
        // The header says 5 elements but 6 arrive: refused while streaming.
        (
            header(&spec, 1),
            packed(&[1, 2, 3, 4, 5, 6], 16),
            RejectReason::Malformed,
        ),
        // And 4 elements: refused at the end of the stream.
        (
            header(&spec, 1),
            packed(&[1, 2, 3, 4], 16),
            RejectReason::Malformed,
        ),
    ];
    for (header, bytes, reason) in &cases {
        let err = upload(&mut round, header, &allowed(), bytes, 4).unwrap_err();
        assert_eq!(err.reason(), *reason, "{err}");
    }

    let counts = round.rejections();
    assert_eq!(counts[&RejectReason::Malformed], 2);
    assert_eq!(counts.values().sum::<u64>(), cases.len() as u64);
    // None of them touched the sum: it is still store 0's update alone.
    assert_eq!(close_now(&mut round).values, vec![1, 2, 3, 4, 5]);
}

#[test]
fn store_cannot_fold_its_update_as_another_store() {
    let spec = spec(16, 3, 2, far());
    let mut round = RoundAccumulator::open(spec.clone());
    let forged = packed(&[9, 9, 9], 16);

    // Store 0 is authenticated and allowed, but its header names store 1.
    let err = upload_as(
        &mut round,
        &store(0),
        &header(&spec, 1),
        &allowed(),
        &forged,
        2,
    )
    .unwrap_err();
    assert_eq!(
        err,
        Rejection::IdentityMismatch {
            authenticated: store(0),
            claimed: store(1),
        }
    );
    assert_eq!(round.rejections()[&RejectReason::IdentityMismatch], 1);
    assert!(round.contributors().is_empty());

    // Store 1's own upload is still taken, not refused as a duplicate.
    upload(
        &mut round,
        &header(&spec, 1),
        &allowed(),
        &packed(&[1, 2, 3], 16),
        2,
    )
    .unwrap();
    let sum = close_now(&mut round);
    assert_eq!(sum.values, vec![1, 2, 3]);
    assert_eq!(sum.contributors, vec![store(1)]);
}

#[test]
fn denied_store_update_never_reaches_the_sum() {
    // A real denial from the default policy: the store's budget is spent.
    let policy = fedmesh_policy::load(
        &PolicyLocation::Dir(fedmesh_policy::default_policy_dir()),
        fedmesh_policy::DEFAULT_ENTRYPOINT,
    )
    .unwrap();
    let decision = policy.decide_json(serde_json::json!({
        "spiffe_id": "spiffe://stores.fedmesh.example/store/midwest/store-001",
        "trust_domain": "stores.fedmesh.example",
        "runtime_version": "1.10.0",
        "epsilon_remaining": 0.0,
        "region": "midwest",
        "round": 7,
        "route": "/v1/rounds/{round}/update",
        "method": "PUT",
    }));
    assert!(!decision.allow);

    let spec = spec(32, 3, 2, far());
    let mut round = RoundAccumulator::open(spec.clone());
    upload(
        &mut round,
        &header(&spec, 0),
        &allowed(),
        &packed(&[10, 20, 30], 32),
        5,
    )
    .unwrap();
    let err = upload(
        &mut round,
        &header(&spec, 1),
        &decision,
        &packed(&[1, 1, 1], 32),
        5,
    )
    .unwrap_err();
    assert_eq!(
        err,
        Rejection::PolicyDenied {
            rule: "epsilon_remaining".into()
        }
    );

    let sum = close_now(&mut round);
    assert_eq!(sum.values, vec![10, 20, 30]);
    assert_eq!(sum.contributors, vec![store(0)]);
}

#[test]
fn interrupted_stream_never_touches_the_sum_and_the_store_may_retry() {
    let spec = spec(32, 4, 2, far());
    let mut round = RoundAccumulator::open(spec.clone());
    let bytes = packed(&[7, 7, 7, 7], 32);

    let mut fold = round
        .begin(&store(0), &header(&spec, 0), &allowed())
        .unwrap();
    fold.push(&bytes[..9]).unwrap();
    round.abort(fold, Rejection::Interrupted("connection reset".into()));
    assert_eq!(round.rejections()[&RejectReason::Interrupted], 1);

    upload(&mut round, &header(&spec, 0), &allowed(), &bytes, 16).unwrap();
    assert_eq!(close_now(&mut round).values, vec![7, 7, 7, 7]);
}

#[test]
fn closes_when_every_expected_store_has_reported() {
    let spec = spec(8, 2, 2, far());
    let mut round = RoundAccumulator::open(spec.clone());
    upload(&mut round, &header(&spec, 0), &allowed(), &[200, 100], 1).unwrap();
    assert_eq!(round.poll_close(Instant::now()), None);
    upload(&mut round, &header(&spec, 1), &allowed(), &[100, 1], 1).unwrap();

    // 200 + 100 = 300 = 44 mod 256; 100 + 1 = 101.
    let sum = round
        .poll_close(Instant::now())
        .expect("all stores reported");
    assert_eq!(sum.values, vec![44, 101]);
    assert_eq!(sum.contributors, vec![store(0), store(1)]);

    let late = upload(&mut round, &header(&spec, 1), &allowed(), &[1, 1], 1).unwrap_err();
    assert_eq!(late.reason(), RejectReason::RoundClosed);
}

#[test]
fn closes_at_the_deadline_with_whoever_reported() {
    let start = Instant::now();
    let spec = spec(8, 1, 3, start + Duration::from_secs(30));
    let mut round = RoundAccumulator::open(spec.clone());
    upload(&mut round, &header(&spec, 2), &allowed(), &[9], 1).unwrap();
    assert_eq!(round.poll_close(start + Duration::from_secs(29)), None);

    let sum = round.poll_close(start + Duration::from_secs(30)).unwrap();
    assert_eq!(sum.contributors, vec![store(2)]);
    assert_eq!(sum.values, vec![9]);
}

#[test]
fn restart_recovers_every_acknowledged_update() {
    let dir = tempfile::tempdir().unwrap();
    let state = StateDir::open(dir.path()).unwrap();
    let spec = spec(20, 3, 4, far());
    let updates: [[u64; 3]; 4] = [[1, 2, 3], [1 << 19, 5, 6], [1 << 19, 7, 8], [9, 9, 9]];

    // Before the crash: three updates folded and checkpointed (acknowledged), a fourth
    // folded after the checkpoint (never acknowledged).
    let mut round = RoundAccumulator::open(spec.clone());
    for (i, u) in updates.iter().enumerate().take(3) {
        upload(&mut round, &header(&spec, i), &allowed(), &packed(u, 20), 4).unwrap();
    }
    let acked = round.checkpoint(&state).unwrap();
    assert_eq!(acked, vec![store(0), store(1), store(2)]);
    upload(
        &mut round,
        &header(&spec, 3),
        &allowed(),
        &packed(&updates[3], 20),
        4,
    )
    .unwrap();
    drop(round);

    // After: the acknowledged three are back; the fourth store re-sends, as it still holds
    // its upload, and a re-send of an acknowledged one is a duplicate.
    let mut round = RoundAccumulator::recover(spec.clone(), &state).unwrap();
    assert_eq!(round.contributors().len(), 3);
    let dup = upload(
        &mut round,
        &header(&spec, 1),
        &allowed(),
        &packed(&updates[1], 20),
        4,
    );
    assert_eq!(dup.unwrap_err().reason(), RejectReason::Duplicate);
    upload(
        &mut round,
        &header(&spec, 3),
        &allowed(),
        &packed(&updates[3], 20),
        4,
    )
    .unwrap();
    assert_eq!(round.checkpoint(&state).unwrap(), vec![store(3)]);

    // 2^19 + 2^19 = 2^20 = 0 mod 2^20 in the first element: 1 + 0 + 9 = 10.
    let sum = round.poll_close(Instant::now()).unwrap();
    assert_eq!(sum.values, vec![10, 2 + 5 + 7 + 9, 3 + 6 + 8 + 9]);

    // Core acknowledged: the state is gone.
    assert_eq!(state.rounds().unwrap(), vec![RoundId(7)]);
    state.remove(RoundId(7)).unwrap();
    assert!(state.rounds().unwrap().is_empty());
}

#[test]
fn corrupt_or_mismatched_state_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let state = StateDir::open(dir.path()).unwrap();
    let spec = spec(16, 2, 1, far());
    let mut round = RoundAccumulator::open(spec.clone());
    upload(
        &mut round,
        &header(&spec, 0),
        &allowed(),
        &packed(&[1, 2], 16),
        4,
    )
    .unwrap();
    round.checkpoint(&state).unwrap();

    let other_plan = RoundSpec {
        len: 3,
        ..spec.clone()
    };
    let err = RoundAccumulator::recover(other_plan, &state).unwrap_err();
    assert!(err.to_string().contains("elements saved"), "{err}");

    let file = dir.path().join("round-7.partial");
    let mut bytes = std::fs::read(&file).unwrap();
    let last = bytes.len() - 40;
    bytes[last] ^= 1;
    std::fs::write(&file, bytes).unwrap();
    let err = RoundAccumulator::recover(spec, &state).unwrap_err();
    assert!(err.to_string().contains("checksum"), "{err}");
}
