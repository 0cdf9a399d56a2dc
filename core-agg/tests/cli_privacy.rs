//! `core-agg privacy ...` prints one JSON object an operator can plan budgets with.

use std::process::Command;

fn run(args: &[&str]) -> serde_json::Value {
    let output = Command::new(env!("CARGO_BIN_EXE_core-agg"))
        .args(args)
        .output()
        .expect("core-agg runs");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("stdout is one JSON object")
}

#[test]
fn privacy_epsilon_prints_the_references_value() {
    // dp-accounting 0.6 gives 2.101366525420273 (scripts/dp_reference.py).
    let report = run(&[
        "privacy", "epsilon", "--sigma", "1.0", "--q", "0.01", "--steps", "1000", "--delta", "1e-5",
    ]);
    let epsilon = report["epsilon"].as_f64().unwrap();
    assert!((epsilon / 2.101366525420273 - 1.0).abs() < 1e-6, "{report}");
    assert_eq!(report["order"].as_f64(), Some(7.8));
}

#[test]
fn privacy_sigma_prints_the_smallest_noise_that_meets_the_target() {
    // dp-accounting 0.6 calibrates 1.51312216260721 for epsilon 1 (scripts/dp_reference.py).
    let report = run(&[
        "privacy",
        "sigma",
        "--epsilon",
        "1.0",
        "--q",
        "0.01",
        "--steps",
        "1000",
        "--delta",
        "1e-5",
    ]);
    let sigma = report["sigma"].as_f64().unwrap();
    assert!((sigma / 1.51312216260721 - 1.0).abs() < 1e-6, "{report}");
    assert!(report["epsilon_at_sigma"].as_f64().unwrap() <= 1.0);
}

#[test]
fn privacy_epsilon_refuses_a_rate_above_one() {
    let output = Command::new(env!("CARGO_BIN_EXE_core-agg"))
        .args([
            "privacy", "epsilon", "--sigma", "1", "--q", "2", "--steps", "10",
        ])
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("sampling rate"));
}
