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

/// The real binary: starts, publishes the initial model, answers the operator API, and a
/// killed process comes back on the same state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_answers_the_operator_api_and_survives_a_kill() -> anyhow::Result<()> {
    use fedmesh_core_agg::registry::keys;
    use fedmesh_core_agg::service::model::Weights;
    use fedmesh_transport::pki::{DevPkiSpec, write_dev_pki};
    use fedmesh_transport::{Client, ClientConfig, FileSvidSource, PeerPolicy, SvidPaths};
    use std::collections::BTreeMap;
    use std::time::Duration;

    let dir = tempfile::tempdir()?;
    let root = dir.path();
    write_dev_pki(
        &root.join("pki"),
        &DevPkiSpec {
            trust_domain: "fedmesh.test".into(),
            ca_lifetime: Duration::from_secs(3600),
            svid_lifetime: Duration::from_secs(3600),
            pops: vec!["chicago".into()],
            stores: Vec::new(),
        },
    )?;
    keys::generate(&root.join("keys"))?;
    std::fs::write(
        root.join("task.toml"),
        "[model]\nkind = \"mlp\"\n[training]\nepochs = 1\n",
    )?;
    let weights = Weights::from_tensors(BTreeMap::from([(
        "layer.weight".into(),
        (vec![2], vec![1.0, 2.0]),
    )]));
    std::fs::write(root.join("initial.safetensors"), weights.to_safetensors()?)?;
    let port = std::net::UdpSocket::bind("127.0.0.1:0")?.local_addr()?;
    // The example's key and model paths are relative to the config file, as written above.
    let config = EXAMPLE.replace("127.0.0.1:7443", &port.to_string());
    let path = root.join("core.toml");
    std::fs::write(&path, config)?;

    let source = FileSvidSource::load(SvidPaths::in_dir(&root.join("pki/pop/chicago")))?;
    let client = Client::new(
        ClientConfig::new(
            port,
            PeerPolicy::Exact("spiffe://fedmesh.test/core".parse()?),
        ),
        source,
    )?;
    for run in 0..2 {
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_core-agg"))
            .args(["serve", "--config"])
            .arg(&path)
            .stderr(std::process::Stdio::null())
            .spawn()?;
        let mut status = None;
        for _ in 0..100 {
            if let Ok(response) = client.get("/v1/status").await {
                status = Some(serde_json::from_slice::<serde_json::Value>(
                    &response.bytes(1 << 20).await?,
                )?);
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        child.kill()?;
        child.wait()?;
        let status = status.ok_or_else(|| anyhow::anyhow!("run {run}: no status"))?;
        assert_eq!(status["current_version"], 0, "run {run}: {status}");
        assert_eq!(status["model"], "oj-demand");
    }
    Ok(())
}
