//! `core-agg registry rollback` is the operator's one command to undo a bad version.

use std::collections::BTreeMap;
use std::process::Command;

use ed25519_dalek::SigningKey;
use fedmesh_core_agg::registry::embedded::EmbeddedBackend;
use fedmesh_core_agg::registry::{Backend, Candidate, DpSpend, Registry, sha256_hex};
use fedmesh_core_agg::{ModelId, Timestamp};
use fedmesh_protocol::ids::ModelVersion;

fn candidate(parent: Option<u64>, blob: &[u8]) -> Candidate {
    Candidate {
        model: ModelId("oj-demand".into()),
        parent: parent.map(ModelVersion),
        blob: blob.to_vec(),
        model_spec: "mlp".into(),
        training_config_sha256: sha256_hex(b"config"),
        dp: DpSpend {
            unit: "record".into(),
            noise_multiplier: 1.0,
            clip_norm: 1.0,
            delta: 1e-5,
            epsilon: 2.0,
        },
        metrics: BTreeMap::from([("loss".into(), 1.0)]),
    }
}

#[test]
fn registry_rollback_moves_current_to_the_parent() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("registry");
    let seed = [3u8; 32];
    let key_file = dir.path().join("registry.key");
    std::fs::write(&key_file, hex::encode(seed)).unwrap();

    let registry = Registry::new(
        EmbeddedBackend::open(&root).unwrap(),
        SigningKey::from_bytes(&seed),
    );
    registry
        .publish(&candidate(None, b"v0"), 0.02, Timestamp(1))
        .unwrap();
    registry
        .publish(&candidate(Some(0), b"v1"), 0.02, Timestamp(2))
        .unwrap();

    let output = Command::new(env!("CARGO_BIN_EXE_core-agg"))
        .args(["registry", "rollback", "--model", "oj-demand"])
        .arg("--root")
        .arg(&root)
        .arg("--key")
        .arg(&key_file)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(report["current"], 0);
    let current = registry
        .backend()
        .current(&ModelId("oj-demand".into()))
        .unwrap();
    assert_eq!(current, Some(ModelVersion(0)));
}
