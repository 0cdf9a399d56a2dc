//! The lab creates the registry's key pair with `core-agg registry keygen`, core signs with
//! the secret file, and stores verify manifests with only the public file.

use std::collections::BTreeMap;
use std::process::Command;

use fedmesh_core_agg::registry::embedded::EmbeddedBackend;
use fedmesh_core_agg::registry::{
    Backend, Candidate, DpSpend, Registry, RegistryError, SignedManifest, keys, sha256_hex,
    verify_manifest,
};
use fedmesh_core_agg::{ModelId, Timestamp};
use fedmesh_protocol::ids::ModelVersion;

fn model() -> ModelId {
    ModelId("oj-demand".into())
}

fn candidate() -> Candidate {
    Candidate {
        model: model(),
        parent: None,
        blob: b"weights-0".to_vec(),
        model_spec: "mlp".into(),
        training_config_sha256: sha256_hex(b"config"),
        dp: DpSpend {
            unit: "record".into(),
            noise_multiplier: 1.0,
            clip_norm: 1.0,
            delta: 1e-5,
            epsilon: 2.5,
        },
        metrics: BTreeMap::from([("loss".into(), 1.0)]),
    }
}

/// Runs `core-agg registry keygen` into `dir`, publishes one version signed with the
/// secret file and returns the stored signed manifest.
fn keygen_and_publish(dir: &std::path::Path) -> SignedManifest {
    let output = Command::new(env!("CARGO_BIN_EXE_core-agg"))
        .args(["registry", "keygen", "--out"])
        .arg(dir.join("keys"))
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let secret = keys::read_signing_key(&dir.join("keys/registry.key")).unwrap();
    let registry = Registry::new(
        EmbeddedBackend::open(&dir.join("registry")).unwrap(),
        secret,
    );
    registry.publish(&candidate(), 0.02, Timestamp(7)).unwrap();
    registry
        .backend()
        .manifest(&model(), ModelVersion(0))
        .unwrap()
        .unwrap()
}

#[test]
fn a_store_holding_only_the_public_file_verifies_a_published_manifest() {
    let dir = tempfile::tempdir().unwrap();
    let signed = keygen_and_publish(dir.path());
    let public = keys::read_verifying_key(&dir.path().join("keys/registry.pub")).unwrap();

    let manifest = verify_manifest(&signed, &public, &model(), Some(ModelVersion(0))).unwrap();
    assert_eq!(manifest.blob_sha256, sha256_hex(b"weights-0"));
    assert_eq!(manifest.version, ModelVersion(0));
    // Without a version asked for, the manifest's own version is accepted.
    assert!(verify_manifest(&signed, &public, &model(), None).is_ok());
}

#[test]
fn verify_manifest_refuses_any_single_tampered_byte() {
    let dir = tempfile::tempdir().unwrap();
    let signed = keygen_and_publish(dir.path());
    let public = keys::read_verifying_key(&dir.path().join("keys/registry.pub")).unwrap();

    // Flip one bit in each byte of the manifest JSON in turn: none may verify.
    let bytes = signed.manifest.as_bytes();
    for i in 0..bytes.len() {
        let mut tampered = bytes.to_vec();
        tampered[i] ^= 0x01;
        let Ok(json) = String::from_utf8(tampered) else {
            continue;
        };
        let forged = SignedManifest {
            manifest: json,
            signature: signed.signature.clone(),
        };
        let refused = verify_manifest(&forged, &public, &model(), Some(ModelVersion(0)));
        assert!(
            matches!(refused, Err(RegistryError::BadSignature { .. })),
            "byte {i}: {refused:?}"
        );
    }

    // And a tampered signature.
    let mut signature = hex::decode(&signed.signature).unwrap();
    signature[10] ^= 0x80;
    let forged = SignedManifest {
        manifest: signed.manifest.clone(),
        signature: hex::encode(signature),
    };
    assert!(verify_manifest(&forged, &public, &model(), None).is_err());
}

#[test]
fn verify_manifest_refuses_another_signer_and_another_name() {
    let dir = tempfile::tempdir().unwrap();
    let signed = keygen_and_publish(dir.path());
    let public = keys::read_verifying_key(&dir.path().join("keys/registry.pub")).unwrap();

    let other = ed25519_dalek::SigningKey::from_bytes(&[9; 32]).verifying_key();
    let refused = verify_manifest(&signed, &other, &model(), Some(ModelVersion(0)));
    assert!(
        matches!(refused, Err(RegistryError::BadSignature { .. })),
        "{refused:?}"
    );

    // A genuine manifest presented as another version or model is a replay.
    let replayed = verify_manifest(&signed, &public, &model(), Some(ModelVersion(3)));
    assert!(
        matches!(replayed, Err(RegistryError::Corrupt { .. })),
        "{replayed:?}"
    );
    let elsewhere = verify_manifest(&signed, &public, &ModelId("other".into()), None);
    assert!(
        matches!(elsewhere, Err(RegistryError::Corrupt { .. })),
        "{elsewhere:?}"
    );
}

#[test]
fn keygen_never_overwrites_a_key_and_bad_key_files_are_named() {
    let dir = tempfile::tempdir().unwrap();
    keygen_and_publish(dir.path());
    let again = keys::generate(&dir.path().join("keys"));
    assert!(
        matches!(again, Err(keys::KeyFileError::Exists(_))),
        "{again:?}"
    );

    let bad = dir.path().join("bad.pub");
    std::fs::write(&bad, "abcd\n").unwrap();
    let message = keys::read_verifying_key(&bad).unwrap_err().to_string();
    assert!(message.contains("bad.pub"), "{message}");
    assert!(message.contains("found 2 bytes"), "{message}");
}

#[test]
fn publish_refuses_a_dp_figure_that_is_not_finite_before_signing() {
    let dir = tempfile::tempdir().unwrap();
    let registry = Registry::new(
        EmbeddedBackend::open(dir.path()).unwrap(),
        ed25519_dalek::SigningKey::from_bytes(&[4; 32]),
    );
    for value in [f64::INFINITY, f64::NAN] {
        let mut unbounded = candidate();
        unbounded.dp.epsilon = value;
        let refused = registry.publish(&unbounded, 0.02, Timestamp(1));
        assert!(
            matches!(
                refused,
                Err(RegistryError::NonFiniteDp {
                    field: "epsilon",
                    ..
                })
            ),
            "{refused:?}"
        );
    }
    // Nothing was stored.
    assert!(registry.backend().versions(&model()).unwrap().is_empty());
}
