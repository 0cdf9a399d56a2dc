//! Differential test: the default policy decides the same in regorus (in process) and in
//! the real OPA engine (OPA 1.20.2 from the `opa-golib-python-bindings` wheel, driven by
//! `scripts/opa/opa_eval.py`) on several hundred generated inputs.
//!
//! Needs the wheel unpacked by `scripts/opa/setup.sh` (into `target/opa/site`, or
//! `FEDMESH_OPA_DIR`). Without it the test fails under CI (`CI=true`) and is skipped with a
//! notice elsewhere.

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};
use fedmesh_policy::{DEFAULT_ENTRYPOINT, PolicyLocation};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::{Value, json};

/// Inputs per run; the issue asks for at least 200.
const INPUTS: usize = 400;

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn opa_dir() -> PathBuf {
    std::env::var_os("FEDMESH_OPA_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target/opa/site"))
}

fn python() -> String {
    std::env::var("FEDMESH_PYTHON").unwrap_or_else(|_| "python3".into())
}

/// Why OPA cannot run here, if it cannot.
fn opa_unavailable() -> Option<String> {
    let dir = opa_dir();
    let probe = Command::new(python())
        .args([
            "-c",
            "import sys; sys.path.insert(0, sys.argv[1]); import opa_bindings",
        ])
        .arg(&dir)
        .output();
    match probe {
        Ok(out) if out.status.success() => None,
        Ok(out) => Some(format!(
            "opa_bindings does not import from {}: {}",
            dir.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )),
        Err(err) => Some(format!("cannot run {}: {err}", python())),
    }
}

/// A seeded mix of inputs around every boundary of the default policy (data.json: trust
/// domain stores.fedmesh.example, minimum runtime 1.4.2, epsilon floor 0.5).
fn generate_inputs(count: usize) -> Vec<Value> {
    let mut rng = ChaCha8Rng::seed_from_u64(0x0fed_0e5a);
    let domains = [
        "stores.fedmesh.example",
        "stores.fedmesh.example",
        "stores.fedmesh.example",
        "evil.example",
        "stores.fedmesh.example.evil",
        "STORES.fedmesh.example",
        "",
    ];
    let regions = ["midwest", "northeast", "south", "west"];
    let store_routes = [
        ("GET", "/v1/round"),
        ("GET", "/v1/models/{model}/current"),
        ("GET", "/v1/models/{model}/versions/{version}"),
        ("GET", "/v1/blobs/{sha256}"),
        ("GET", "/v1/rounds/{round}/receipt"),
        ("GET", "/v1/ledger"),
        ("POST", "/v1/rounds/{round}/evaluation"),
        ("POST", "/v1/rounds/{round}/secagg"),
        ("GET", "/v1/rounds/{round}/secagg/{step}"),
        ("PUT", "/v1/rounds/{round}/update"),
    ];
    let other_routes = [
        "/v1/admin/drain",
        "/metrics",
        "/v1/plan/",
        "/v1/rounds/{round}/sum",
    ];
    let methods = ["GET", "POST", "PUT", "DELETE", "get"];
    let odd_versions = [
        "v1.5.0",
        "1.5",
        "01.4.2",
        "1.04.2",
        "1.4.2.0",
        "",
        "1.4.2-rc.1",
        "1.4.3-beta",
        "1.4.2+build.7",
        "2.0.0-alpha.1+exp",
        "1.10.0",
        "1.4.10",
        "1.4.02",
    ];
    let epsilons = [0.0, 0.25, 0.49999, 0.5, 0.50001, 0.51, 1.0, 3.5, -1.0, 10.0];

    (0..count)
        .map(|_| {
            let domain = *domains.choose(&mut rng).unwrap();
            let region = *regions.choose(&mut rng).unwrap();
            let spiffe_id = match rng.gen_range(0..10) {
                0 => format!("spiffe://{domain}/pop/chicago"),
                1 => format!("spiffe://stores.fedmesh.example/store/{region}/s{}", rng.r#gen::<u16>()),
                _ => format!("spiffe://{domain}/store/{region}/s{}", rng.r#gen::<u16>()),
            };
            let runtime_version = if rng.gen_bool(0.2) {
                odd_versions.choose(&mut rng).unwrap().to_string()
            } else {
                // Multi-digit parts on both sides of 1.4.2.
                let major = *[0u32, 1, 1, 1, 2, 10].choose(&mut rng).unwrap();
                let minor = *[0u32, 3, 4, 4, 4, 5, 10, 40].choose(&mut rng).unwrap();
                let patch = *[0u32, 1, 2, 3, 9, 10, 11, 19, 100].choose(&mut rng).unwrap();
                format!("{major}.{minor}.{patch}")
            };
            let epsilon = if rng.gen_bool(0.7) {
                *epsilons.choose(&mut rng).unwrap()
            } else {
                // Three decimals keep the number exactly printable by both engines.
                f64::from(rng.gen_range(0..2000u32)) / 1000.0
            };
            let (method, route) = if rng.gen_bool(0.7) {
                *store_routes.choose(&mut rng).unwrap()
            } else {
                (*methods.choose(&mut rng).unwrap(), *other_routes.choose(&mut rng).unwrap())
            };
            let mut input = json!({
                "spiffe_id": spiffe_id,
                "trust_domain": domain,
                "runtime_version": runtime_version,
                "epsilon_remaining": epsilon,
                "region": region,
                "round": if rng.gen_bool(0.8) { json!(rng.gen_range(1..500u32)) } else { Value::Null },
                "route": route,
                "method": method,
            });

            // One input in ten is malformed: a field missing or of the wrong type.
            if rng.gen_bool(0.1) {
                let field = *["trust_domain", "runtime_version", "epsilon_remaining", "route"]
                    .choose(&mut rng)
                    .unwrap();
                if rng.gen_bool(0.5) {
                    input.as_object_mut().unwrap().remove(field);
                } else {
                    input[field] = json!(["not", "a", "scalar"]);
                }
            }
            input
        })
        .collect()
}

fn opa_decisions(inputs: &[Value]) -> Result<Vec<Value>> {
    let root = repo_root();
    let mut child = Command::new(python())
        .arg(root.join("scripts/opa/opa_eval.py"))
        .arg(root.join("policy/rego"))
        .args(["--entrypoint", "fedmesh.pop.decision", "--opa-dir"])
        .arg(opa_dir())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting opa_eval.py")?;

    let mut stdin = child.stdin.take().context("opa_eval.py stdin")?;
    let lines: String = inputs.iter().map(|i| format!("{i}\n")).collect();
    let writer = std::thread::spawn(move || stdin.write_all(lines.as_bytes()));
    let out = child.wait_with_output()?;
    writer.join().expect("stdin writer")?;
    if !out.status.success() {
        bail!(
            "opa_eval.py failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    String::from_utf8(out.stdout)?
        .lines()
        .map(|line| serde_json::from_str(line).context("opa_eval.py printed invalid json"))
        .collect()
}

#[test]
fn regorus_and_opa_agree_on_generated_inputs() -> Result<()> {
    if let Some(why) = opa_unavailable() {
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            bail!("OPA reference engine missing under CI ({why}); run scripts/opa/setup.sh");
        }
        eprintln!("skipping the OPA differential test: {why}; run scripts/opa/setup.sh");
        return Ok(());
    }

    let inputs = generate_inputs(INPUTS);
    let expected = opa_decisions(&inputs)?;
    assert_eq!(expected.len(), inputs.len(), "one OPA decision per input");
    let policy = fedmesh_policy::load(
        &PolicyLocation::Dir(fedmesh_policy::default_policy_dir()),
        DEFAULT_ENTRYPOINT,
    )?;

    let mut allowed = 0;
    let mut rules_seen = BTreeSet::new();
    for (input, opa) in inputs.iter().zip(&expected) {
        assert!(opa.get("error").is_none(), "OPA failed on {input}: {opa}");
        let ours = policy.decide_json(input.clone());
        let ours_json = json!({"allow": ours.allow, "deny": ours.reasons});
        assert_eq!(&ours_json, opa, "regorus and OPA differ on {input}");

        allowed += usize::from(ours.allow);
        rules_seen.extend(ours.reasons.iter().map(|d| d.rule.clone()));
    }

    // The generator must exercise both outcomes and every rule, or agreement means little.
    assert!(
        allowed >= INPUTS / 20,
        "only {allowed} of {INPUTS} inputs allowed"
    );
    let every_rule: BTreeSet<String> = [
        "epsilon_remaining",
        "route",
        "runtime_version",
        "store_identity",
        "trust_domain",
    ]
    .map(String::from)
    .into();
    assert_eq!(rules_seen, every_rule);
    println!("regorus and OPA agree on {INPUTS} inputs ({allowed} allowed)");
    Ok(())
}
