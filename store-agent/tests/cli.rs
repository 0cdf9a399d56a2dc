//! The `store-agent` commands an operator runs: `audit verify` and `config check`.

use std::process::Command;

use fedmesh_store_agent::audit::{AuditEvent, AuditLog};

fn verify(log: &std::path::Path) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_store-agent"))
        .args(["audit", "verify", "--log"])
        .arg(log)
        .output()
        .expect("run store-agent");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[test]
fn audit_verify_names_the_edited_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("audit.jsonl");
    let mut log = AuditLog::open(&path).expect("open");
    for round in 1..=4 {
        let event = AuditEvent::UpdateQueued {
            round,
            update_sha256: format!("{round:064x}"),
            bytes: 1000 + round,
        };
        log.append("2026-12-03T02:00:00Z", &event).expect("append");
    }

    let (ok, out) = verify(&path);
    assert!(ok, "{out}");
    assert!(out.contains("4 lines verified"), "{out}");

    // A regulator's copy where someone changed the size recorded for round 3.
    let text = std::fs::read_to_string(&path).expect("read");
    std::fs::write(&path, text.replace("\"bytes\":1003", "\"bytes\":1004")).expect("write");
    let (ok, out) = verify(&path);
    assert!(!ok);
    assert!(out.contains("broken at line 3"), "{out}");
}

#[test]
fn config_check_accepts_the_shipped_example_and_names_a_bad_key() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/packaging/store-agent.toml");
    let out = Command::new(env!("CARGO_BIN_EXE_store-agent"))
        .args(["config", "check", "--config", example])
        .output()
        .expect("run store-agent");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("01:00-04:00 America/Chicago"), "{stdout}");

    let dir = tempfile::tempdir().expect("tempdir");
    let bad = dir.path().join("store-agent.toml");
    let text = std::fs::read_to_string(example).expect("read example");
    std::fs::write(&bad, text.replace("memory_mib", "memory_mb")).expect("write");
    let out = Command::new(env!("CARGO_BIN_EXE_store-agent"))
        .args(["config", "check", "--config"])
        .arg(&bad)
        .output()
        .expect("run store-agent");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("unknown field `memory_mb`"), "{stderr}");
    assert!(stderr.contains(&bad.display().to_string()), "{stderr}");
}
