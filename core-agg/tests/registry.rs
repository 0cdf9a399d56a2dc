//! The registry publishes signed, immutable versions and refuses anything tampered with.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};

use ed25519_dalek::SigningKey;
use fedmesh_core_agg::registry::embedded::EmbeddedBackend;
use fedmesh_core_agg::registry::{
    Backend, Candidate, DpSpend, PARENT_LOSS_METRIC, Registry, RegistryError, SignedManifest,
    sha256_hex,
};
use fedmesh_core_agg::{ModelId, Timestamp};
use fedmesh_protocol::ids::ModelVersion;

const NOW: Timestamp = Timestamp(1_800_000_000);

fn key(seed: u8) -> SigningKey {
    SigningKey::from_bytes(&[seed; 32])
}

fn model() -> ModelId {
    ModelId("oj-demand".into())
}

fn candidate(parent: Option<u64>, blob: &[u8], loss: f64) -> Candidate {
    Candidate {
        model: model(),
        parent: parent.map(ModelVersion),
        blob: blob.to_vec(),
        model_spec: "mlp 47-64-32-1".into(),
        training_config_sha256: sha256_hex(b"epochs = 2"),
        dp: DpSpend {
            unit: "record".into(),
            noise_multiplier: 1.0,
            clip_norm: 1.0,
            delta: 1e-5,
            epsilon: 6.33,
        },
        metrics: BTreeMap::from([("loss".into(), loss)]),
    }
}

fn registry(dir: &std::path::Path) -> Registry<EmbeddedBackend> {
    Registry::new(EmbeddedBackend::open(dir).unwrap(), key(7))
}

#[test]
fn publishes_a_signed_version_that_loads_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let published = registry(dir.path()).publish(&candidate(None, b"weights-0", 1.0), 0.02, NOW);
    let published = published.unwrap();
    assert_eq!(published.version, ModelVersion(0));
    assert_eq!(published.blob_sha256, sha256_hex(b"weights-0"));
    assert_eq!(published.blob_size, 9);

    // A fresh process holding only the public key.
    let reader = Registry::read_only(
        EmbeddedBackend::open(dir.path()).unwrap(),
        key(7).verifying_key(),
    );
    let (manifest, blob) = reader.load_current(&model()).unwrap();
    assert_eq!(manifest, published);
    assert_eq!(blob, b"weights-0");
}

#[test]
fn manifests_cannot_be_overwritten() {
    let dir = tempfile::tempdir().unwrap();
    let registry = registry(dir.path());
    registry
        .publish(&candidate(None, b"weights-0", 1.0), 0.02, NOW)
        .unwrap();
    let backend = registry.backend();
    let original = backend
        .manifest(&model(), ModelVersion(0))
        .unwrap()
        .unwrap();

    let forged = SignedManifest {
        manifest: original.manifest.replace("1.0", "0.1"),
        ..original.clone()
    };
    assert!(
        !backend
            .put_manifest(&model(), ModelVersion(0), &forged)
            .unwrap()
    );
    assert_eq!(
        backend
            .manifest(&model(), ModelVersion(0))
            .unwrap()
            .unwrap(),
        original
    );

    // Blobs are named by content and never rewritten either.
    let digest = sha256_hex(b"weights-0");
    backend.put_blob(&digest, b"something else").unwrap();
    assert_eq!(backend.blob(&digest).unwrap().unwrap(), b"weights-0");
}

#[test]
fn refuses_a_tampered_blob_on_load() {
    let dir = tempfile::tempdir().unwrap();
    let registry = registry(dir.path());
    registry
        .publish(&candidate(None, b"weights-0", 1.0), 0.02, NOW)
        .unwrap();
    let path = registry.backend().blob_path(&sha256_hex(b"weights-0"));
    std::fs::write(&path, b"weights-X").unwrap();
    let refused = registry.load_current(&model());
    assert!(
        matches!(refused, Err(RegistryError::BlobMismatch { .. })),
        "{refused:?}"
    );
    std::fs::write(&path, b"weights-0 and more").unwrap();
    assert!(matches!(
        registry.load_current(&model()),
        Err(RegistryError::BlobMismatch { .. })
    ));
}

#[test]
fn refuses_a_tampered_manifest_or_a_foreign_signature() {
    let dir = tempfile::tempdir().unwrap();
    let registry = registry(dir.path());
    registry
        .publish(&candidate(None, b"weights-0", 1.0), 0.02, NOW)
        .unwrap();
    let path = registry.backend().manifest_path(&model(), ModelVersion(0));
    let original = std::fs::read_to_string(&path).unwrap();

    // Edit the epsilon in place, keeping the signature.
    std::fs::write(&path, original.replace("6.33", "0.5")).unwrap();
    let refused = registry.load_current(&model());
    assert!(
        matches!(refused, Err(RegistryError::BadSignature { .. })),
        "{refused:?}"
    );

    // A registry trusting another key refuses the genuine manifest.
    std::fs::write(&path, &original).unwrap();
    let stranger = Registry::read_only(
        EmbeddedBackend::open(dir.path()).unwrap(),
        key(8).verifying_key(),
    );
    assert!(matches!(
        stranger.load_current(&model()),
        Err(RegistryError::BadSignature { .. })
    ));
    assert!(registry.load_current(&model()).is_ok());
}

#[test]
fn a_regressed_candidate_is_recorded_but_not_promoted() {
    let dir = tempfile::tempdir().unwrap();
    let registry = registry(dir.path());
    registry
        .publish(&candidate(None, b"weights-0", 1.0), 0.02, NOW)
        .unwrap();
    // Loss 1.5 against 1.0 with a 2% threshold.
    let refused = registry.publish(&candidate(Some(0), b"weights-1", 1.5), 0.02, NOW);
    assert!(matches!(
        refused,
        Err(RegistryError::Regressed {
            version: ModelVersion(1),
            ..
        })
    ));
    assert_eq!(
        registry.backend().current(&model()).unwrap(),
        Some(ModelVersion(0))
    );
    // Within the threshold it ships.
    let shipped = registry
        .publish(&candidate(Some(0), b"weights-2", 1.01), 0.02, NOW)
        .unwrap();
    assert_eq!(shipped.version, ModelVersion(2));
    assert_eq!(
        registry.backend().current(&model()).unwrap(),
        Some(ModelVersion(2))
    );
}

/// With the parent's loss on the candidate's own evaluation rows, promotion compares
/// against that figure, not the parent's recorded loss from other stores' rows.
#[test]
fn promotion_compares_against_the_parents_loss_on_the_same_rows_when_given() {
    let dir = tempfile::tempdir().unwrap();
    let registry = registry(dir.path());
    registry
        .publish(&candidate(None, b"weights-0", 1.0), 0.02, NOW)
        .unwrap();
    let paired = |blob: &[u8], loss: f64, parent_loss: f64| {
        let mut c = candidate(Some(0), blob, loss);
        c.metrics.insert(PARENT_LOSS_METRIC.to_owned(), parent_loss);
        c
    };
    // 1.5 is above the recorded 1.0, but the parent scored 1.6 on these rows: it ships.
    let shipped = registry
        .publish(&paired(b"weights-1", 1.5, 1.6), 0.02, NOW)
        .unwrap();
    assert_eq!(shipped.version, ModelVersion(1));
    // 0.9 is below v1's recorded 1.5, but v1 scored 0.8 on these rows: refused.
    let refused = registry.publish(
        &{
            let mut c = paired(b"weights-2", 0.9, 0.8);
            c.parent = Some(ModelVersion(1));
            c
        },
        0.02,
        NOW,
    );
    assert!(
        matches!(refused, Err(RegistryError::Regressed { baseline, .. }) if baseline == 0.8),
        "{refused:?}"
    );
    assert_eq!(
        registry.backend().current(&model()).unwrap(),
        Some(ModelVersion(1))
    );
}

#[test]
fn rollback_moves_current_back_to_the_parent() {
    let dir = tempfile::tempdir().unwrap();
    let registry = registry(dir.path());
    registry
        .publish(&candidate(None, b"weights-0", 1.0), 0.02, NOW)
        .unwrap();
    registry
        .publish(&candidate(Some(0), b"weights-1", 0.9), 0.02, NOW)
        .unwrap();
    assert_eq!(registry.rollback(&model(), None).unwrap(), ModelVersion(0));
    assert_eq!(registry.load_current(&model()).unwrap().1, b"weights-0");
}

#[test]
fn rollback_to_an_explicit_version_walks_the_parent_chain() {
    // v0 <- v1 <- v2, all promoted: --to 0 from v2 skips a generation.
    let dir = tempfile::tempdir().unwrap();
    let registry = registry(dir.path());
    for (parent, blob) in [
        (None, b"weights-0"),
        (Some(0), b"weights-1"),
        (Some(1), b"weights-2"),
    ] {
        registry
            .publish(&candidate(parent, blob, 1.0), 0.02, NOW)
            .unwrap();
    }
    assert_eq!(
        registry.rollback(&model(), Some(ModelVersion(0))).unwrap(),
        ModelVersion(0)
    );
    assert_eq!(registry.load_current(&model()).unwrap().1, b"weights-0");
}

#[test]
fn rollback_refuses_a_later_an_unpromoted_or_a_missing_version() {
    let dir = tempfile::tempdir().unwrap();
    let registry = registry(dir.path());
    registry
        .publish(&candidate(None, b"weights-0", 1.0), 0.02, NOW)
        .unwrap();
    registry
        .publish(&candidate(Some(0), b"weights-1", 0.9), 0.02, NOW)
        .unwrap();
    // v2 regresses (1.5 against 0.9): recorded, never promoted.
    assert!(matches!(
        registry.publish(&candidate(Some(1), b"weights-2", 1.5), 0.02, NOW),
        Err(RegistryError::Regressed { .. })
    ));
    // From v1 neither the unpromoted v2 nor a missing v9 is an ancestor; back at v0, v1
    // is later.
    for (to, current) in [(2, 1), (9, 1)] {
        let refused = registry.rollback(&model(), Some(ModelVersion(to)));
        assert!(
            matches!(
                &refused,
                Err(RegistryError::NotAnAncestor { version, current: c, .. })
                    if *version == ModelVersion(to) && *c == ModelVersion(current)
            ),
            "--to {to}: {refused:?}"
        );
    }
    registry.rollback(&model(), None).unwrap();
    assert!(matches!(
        registry.rollback(&model(), Some(ModelVersion(1))),
        Err(RegistryError::NotAnAncestor { .. })
    ));
    assert_eq!(
        registry.backend().current(&model()).unwrap(),
        Some(ModelVersion(0))
    );
}

#[test]
fn publish_refuses_a_metric_that_is_not_finite_before_signing() {
    let dir = tempfile::tempdir().unwrap();
    let registry = registry(dir.path());
    for value in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
        let refused = registry.publish(&candidate(None, b"weights-0", value), 0.02, NOW);
        assert!(
            matches!(
                &refused,
                Err(RegistryError::NonFiniteMetric { metric, .. }) if metric == "loss"
            ),
            "{value}: {refused:?}"
        );
    }
    // Nothing was recorded, so the registry still publishes and loads.
    assert!(registry.backend().versions(&model()).unwrap().is_empty());
    registry
        .publish(&candidate(None, b"weights-0", 1.0), 0.02, NOW)
        .unwrap();
    assert_eq!(registry.load_current(&model()).unwrap().1, b"weights-0");
}

#[test]
fn publish_from_a_stale_parent_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let registry = registry(dir.path());
    registry
        .publish(&candidate(None, b"weights-0", 1.0), 0.02, NOW)
        .unwrap();
    registry
        .publish(&candidate(Some(0), b"weights-1", 0.9), 0.02, NOW)
        .unwrap();
    let stale = registry.publish(&candidate(Some(0), b"weights-2", 0.8), 0.02, NOW);
    assert!(matches!(stale, Err(RegistryError::Conflict { .. })));
}

/// An embedded backend whose pointer swap fails once, as if core died mid-publish.
struct FailsOnce {
    inner: EmbeddedBackend,
    failed: AtomicBool,
}

impl Backend for FailsOnce {
    fn put_blob(&self, sha256: &str, bytes: &[u8]) -> Result<(), RegistryError> {
        self.inner.put_blob(sha256, bytes)
    }
    fn blob(&self, sha256: &str) -> Result<Option<Vec<u8>>, RegistryError> {
        self.inner.blob(sha256)
    }
    fn put_manifest(
        &self,
        model: &ModelId,
        version: ModelVersion,
        signed: &SignedManifest,
    ) -> Result<bool, RegistryError> {
        self.inner.put_manifest(model, version, signed)
    }
    fn manifest(
        &self,
        model: &ModelId,
        version: ModelVersion,
    ) -> Result<Option<SignedManifest>, RegistryError> {
        self.inner.manifest(model, version)
    }
    fn versions(&self, model: &ModelId) -> Result<Vec<ModelVersion>, RegistryError> {
        self.inner.versions(model)
    }
    fn current(&self, model: &ModelId) -> Result<Option<ModelVersion>, RegistryError> {
        self.inner.current(model)
    }
    fn swap_current(
        &self,
        model: &ModelId,
        expected: Option<ModelVersion>,
        new: ModelVersion,
    ) -> Result<bool, RegistryError> {
        if !self.failed.swap(true, Ordering::SeqCst) {
            return Err(RegistryError::Storage("connection lost".into()));
        }
        self.inner.swap_current(model, expected, new)
    }
}

#[test]
fn an_interrupted_publish_can_be_retried_without_losing_or_doubling_a_version() {
    let dir = tempfile::tempdir().unwrap();
    let backend = FailsOnce {
        inner: EmbeddedBackend::open(dir.path()).unwrap(),
        failed: AtomicBool::new(false),
    };
    let registry = Registry::new(backend, key(7));
    let first = candidate(None, b"weights-0", 1.0);
    assert!(registry.publish(&first, 0.02, NOW).is_err());
    let retried = registry
        .publish(&first, 0.02, Timestamp(NOW.0 + 60))
        .unwrap();
    assert_eq!(retried.version, ModelVersion(0));
    assert_eq!(
        registry.backend().versions(&model()).unwrap(),
        vec![ModelVersion(0)]
    );
    assert_eq!(
        registry.backend().current(&model()).unwrap(),
        Some(ModelVersion(0))
    );
}
