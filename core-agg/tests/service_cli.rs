//! `core-agg serve --config` refuses a config it cannot use, naming the file and the key.

use std::process::Command;

fn serve(config: &str) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("core.toml");
    std::fs::write(&path, config).unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_core-agg"))
        .args(["serve", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

const EXAMPLE: &str = include_str!("../core.example.toml");

#[test]
fn serve_refuses_an_unknown_key_and_names_it() {
    let (ok, stderr) = serve(&EXAMPLE.replace("min_online = 3", "min_onlne = 3"));
    assert!(!ok);
    assert!(stderr.contains("core.toml"), "{stderr}");
    assert!(stderr.contains("min_onlne"), "{stderr}");
}

#[test]
fn serve_refuses_a_value_out_of_range_and_names_the_key() {
    let (ok, stderr) = serve(&EXAMPLE.replace("region_cap = 0.5", "region_cap = 0.0"));
    assert!(!ok);
    assert!(stderr.contains("rounds.region_cap"), "{stderr}");
}

#[test]
fn serve_names_a_missing_task_file() {
    // The example's paths do not exist next to the temporary config.
    let (ok, stderr) = serve(EXAMPLE);
    assert!(!ok);
    assert!(
        stderr.contains("identity") || stderr.contains("task"),
        "{stderr}"
    );
}
