//! `netlab pki` writes a usable development PKI and refuses malformed store names.

use std::process::Command;

use fedmesh_transport::identity::{Svid, SvidPaths};

#[test]
fn pki_command_writes_ca_and_svids_for_every_named_identity() {
    let out = tempfile::tempdir().expect("tempdir");
    let status = Command::new(env!("CARGO_BIN_EXE_netlab"))
        .args(["pki", "--out"])
        .arg(out.path())
        .args(["--trust-domain", "FL.example", "--pop", "chicago"])
        .args(["--store", "north/2", "--store", "south/5"])
        .status()
        .expect("run netlab pki");
    assert!(status.success());
    for (dir, id) in [
        ("core", "spiffe://fl.example/core"),
        ("pop/chicago", "spiffe://fl.example/pop/chicago"),
        ("store/north/2", "spiffe://fl.example/store/north/2"),
        ("store/south/5", "spiffe://fl.example/store/south/5"),
    ] {
        // Each SVID passes the X509-SVID checks the transport applies, and names its
        // identity in the lowercased trust domain.
        let paths = SvidPaths::in_dir(&out.path().join(dir));
        let chain = std::fs::read(&paths.chain).expect("chain");
        let key = std::fs::read(&paths.key).expect("key");
        let svid = Svid::from_pem(&chain, &key, &paths.chain).expect("valid SVID");
        assert_eq!(svid.spiffe_id().to_string(), id);
        assert!(paths.bundle.is_file());
    }
}

#[test]
fn pki_command_names_a_malformed_store() {
    let out = tempfile::tempdir().expect("tempdir");
    let output = Command::new(env!("CARGO_BIN_EXE_netlab"))
        .args(["pki", "--out"])
        .arg(out.path())
        .args(["--store", "north-2"])
        .output()
        .expect("run netlab pki");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("\"north-2\" is not REGION/STORE"),
        "{stderr}"
    );
}
