//! `core-agg ledger status` prints a store's remaining epsilon, the figure PoP policy reads.

use std::process::Command;

use fedmesh_core_agg::ledger::{self, Ledger, LedgerConfig, RecordDpPlan};
use fedmesh_core_agg::{ModelId, Timestamp};
use fedmesh_protocol::ids::{RoundId, StoreId};

#[test]
fn ledger_status_prints_spend_and_remaining_epsilon() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("ledger.json");
    let mut ledger = Ledger::new(LedgerConfig::default());
    let plan = RecordDpPlan {
        batch: 64,
        epochs: 12,
        noise_multiplier: 1.0,
    };
    let (model, store) = (ModelId("oj-demand".into()), StoreId("s1".into()));
    ledger
        .charge_record(&model, &store, RoundId(1), Timestamp(1000), &plan, 1070)
        .unwrap();
    ledger::save(&ledger, &file).unwrap();

    let output = Command::new(env!("CARGO_BIN_EXE_core-agg"))
        .args([
            "ledger",
            "status",
            "--model",
            "oj-demand",
            "--store",
            "s1",
            "--now",
            "2000",
        ])
        .args(["--record-budget", "10"])
        .arg("--file")
        .arg(&file)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    // 192 steps at q = 64/1070, sigma 1: 6.3290342783671605 (scripts/dp_reference.py).
    let record = &report["status"]["record"];
    let spent = record["spent"].as_f64().unwrap();
    assert!((spent / 6.3290342783671605 - 1.0).abs() < 1e-6, "{report}");
    assert!((record["remaining"].as_f64().unwrap() - (10.0 - spent)).abs() < 1e-9);
    assert_eq!(report["excluded"], false);
}
