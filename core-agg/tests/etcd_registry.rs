//! The etcd backend on a real three-node cluster: killing the leader in the middle of a
//! publish loses no version, doubles none, and the registry keeps serving.
//!
//! Needs the `etcd` binary (Debian `etcd-server` 3.4) and the `etcd` feature:
//! `cargo test -p fedmesh-core-agg --features etcd --test etcd_registry`.
#![cfg(feature = "etcd")]

mod support;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use anyhow::Result;
use ed25519_dalek::SigningKey;
use fedmesh_core_agg::registry::etcd::EtcdBackend;
use fedmesh_core_agg::registry::{
    Backend, Candidate, DpSpend, Registry, RegistryError, SignedManifest, sha256_hex,
};
use fedmesh_core_agg::{ModelId, Timestamp};
use fedmesh_protocol::ids::ModelVersion;
use support::Cluster;

/// The etcd backend, with a hook that runs once just before the pointer moves: the moment
/// after the manifest is stored and before the publish is visible.
struct KillBeforeSwap {
    inner: EtcdBackend,
    hook: Mutex<Option<Box<dyn FnOnce() + Send>>>,
}

impl Backend for KillBeforeSwap {
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
        let hook = self.hook.lock().unwrap().take();
        if let Some(hook) = hook {
            hook();
        }
        self.inner.swap_current(model, expected, new)
    }
}

fn candidate(parent: Option<u64>, blob: &[u8]) -> Candidate {
    Candidate {
        model: ModelId("oj-demand".into()),
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
        metrics: BTreeMap::from([("loss".into(), 1.0)]),
    }
}

#[test]
fn leader_killed_mid_publish_loses_and_doubles_no_version() -> Result<()> {
    let cluster = Arc::new(Mutex::new(Cluster::start()?));
    let blobs = tempfile::tempdir()?;
    let endpoints = cluster.lock().unwrap().endpoints.clone();
    let backend = EtcdBackend::connect(&endpoints, "/fedmesh/test", blobs.path())?;
    let killer = Arc::clone(&cluster);
    let backend = KillBeforeSwap {
        inner: backend,
        hook: Mutex::new(Some(Box::new(move || {
            let mut cluster = killer.lock().unwrap();
            let leader = cluster.leader().expect("a leader before the kill");
            cluster.kill(leader);
        }))),
    };
    let registry = Registry::new(backend, SigningKey::from_bytes(&[5; 32]));
    let model = ModelId("oj-demand".into());

    // The leader dies between the manifest and the pointer of the first publish.
    let first = candidate(None, b"weights-0");
    let published = match registry.publish(&first, 0.02, Timestamp(1)) {
        Ok(manifest) => manifest,
        // Whatever failed, the same call is safe to repeat.
        Err(_) => registry.publish(&first, 0.02, Timestamp(2))?,
    };
    let alive = cluster.lock().unwrap().alive();
    assert_eq!(alive, 2, "the leader was killed during the publish");
    assert_eq!(published.version, ModelVersion(0));
    assert_eq!(registry.backend().versions(&model)?, vec![ModelVersion(0)]);
    assert_eq!(registry.backend().current(&model)?, Some(ModelVersion(0)));

    // Two members left: still a quorum, and the registry keeps serving and publishing.
    assert_eq!(registry.load_current(&model)?.1, b"weights-0");
    let next = registry.publish(&candidate(Some(0), b"weights-1"), 0.02, Timestamp(3))?;
    assert_eq!(next.version, ModelVersion(1));
    assert_eq!(
        registry.backend().versions(&model)?,
        vec![ModelVersion(0), ModelVersion(1)]
    );
    assert_eq!(registry.load_current(&model)?.1, b"weights-1");
    Ok(())
}
