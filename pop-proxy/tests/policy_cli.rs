//! `pop-proxy policy test` and `pop-proxy policy eval`, as a security team runs them.

use std::path::PathBuf;
use std::process::Command;

fn pop_proxy() -> Command {
    Command::new(env!("CARGO_BIN_EXE_pop-proxy"))
}

fn default_policy() -> PathBuf {
    fedmesh_policy::default_policy_dir()
}

#[test]
fn policy_test_passes_on_the_default_policy() {
    let out = pop_proxy()
        .args(["policy", "test"])
        .arg(default_policy())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(
        stdout.contains("PASS data.fedmesh.pop_test.test_denies_expired_budget"),
        "{stdout}"
    );
    assert!(stdout.contains("32 passed, 0 failed"), "{stdout}");
}

#[test]
fn policy_test_names_a_failing_rule_and_exits_non_zero() {
    let dir = tempfile::tempdir().unwrap();
    for file in ["data.json", "fedmesh/pop/policy.rego"] {
        let to = dir.path().join(file);
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::copy(default_policy().join(file), to).unwrap();
    }
    std::fs::write(
        dir.path().join("fedmesh/pop/extra_test.rego"),
        "package fedmesh.extra_test\n\nimport data.fedmesh.pop\n\n\
         test_admin_route_allowed if pop.allow with input as {\"route\": \"/v1/admin\"}\n",
    )
    .unwrap();

    let out = pop_proxy()
        .args(["policy", "test"])
        .arg(dir.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.contains("FAIL data.fedmesh.extra_test.test_admin_route_allowed"),
        "{stdout}"
    );
}

#[test]
fn policy_eval_prints_allow_and_the_reasons_of_a_denial() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("input.json");
    std::fs::write(
        &input,
        serde_json::json!({
            "spiffe_id": "spiffe://stores.fedmesh.example/store/midwest/store-1",
            "trust_domain": "stores.fedmesh.example",
            "runtime_version": "1.4.1",
            "epsilon_remaining": 2.0,
            "region": "midwest",
            "round": 3,
            "route": "/v1/rounds/{round}/update",
            "method": "PUT"
        })
        .to_string(),
    )
    .unwrap();

    let out = pop_proxy()
        .args(["policy", "eval"])
        .arg(default_policy())
        .arg("--input")
        .arg(&input)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let decision: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(decision["allow"], false);
    assert_eq!(decision["rule"], "runtime_version");
    assert_eq!(
        decision["reasons"][0]["reason"],
        "runtime version 1.4.1 is older than the minimum 1.4.2"
    );
}
