//! `pop-proxy serve` as the lab starts it: SIGUSR1 starts a drain, SIGTERM ends the
//! process gracefully with status 0.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use fedmesh_transport::pki::{DevPkiSpec, write_dev_pki};

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// A plain HTTP/1.1 GET, as a routing daemon's check script does; `None` while nothing
/// listens.
fn get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: pop\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).ok()?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer).ok()?;
    let status = answer.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, answer))
}

fn signal(pid: u32, name: &str) -> Result<()> {
    let status = Command::new("kill")
        .args([format!("-{name}"), pid.to_string()])
        .status()?;
    if !status.success() {
        bail!("kill -{name} failed");
    }
    Ok(())
}

#[test]
fn sigusr1_drains_and_sigterm_exits_cleanly() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let root = dir.path();
    write_dev_pki(
        &root.join("pki"),
        &DevPkiSpec {
            trust_domain: "fedmesh.test".into(),
            ca_lifetime: Duration::from_secs(3600),
            svid_lifetime: Duration::from_secs(3600),
            pops: vec!["chicago".into()],
            stores: vec![],
        },
    )?;
    fedmesh_core_agg::registry::keys::generate(&root.join("keys"))?;
    let admin: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
    let policy = Path::new(env!("CARGO_MANIFEST_DIR")).join("../policy/rego");
    // Core is unreachable here (nothing listens on its port), so readiness is withdraw
    // from the start; the drain and the exit are what this test watches.
    let config = format!(
        r#"
metro = "chicago"
listen = "127.0.0.1:{listen}"
admin_listen = "{admin}"
core = "127.0.0.1:{core}"
identity_dir = "pki/pop/chicago"
state_dir = "state"
registry_public_key = "keys/registry.pub"
[policy]
path = "{policy}"
decision_log = "decisions.jsonl"
"#,
        listen = free_port()?,
        core = free_port()?,
        policy = policy.display(),
    );
    let config_path = root.join("pop.toml");
    std::fs::write(&config_path, config)?;

    let log_path = root.join("pop.log");
    let mut child = Command::new(env!("CARGO_BIN_EXE_pop-proxy"))
        .args(["serve", "--config"])
        .arg(&config_path)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log_path)?)
        .spawn()?;
    let log_has = |text: &str| -> Result<bool> {
        let until = Instant::now() + Duration::from_secs(5);
        while Instant::now() < until {
            if std::fs::read_to_string(&log_path)?.contains(text) {
                return Ok(true);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(false)
    };
    let result = (|| -> Result<()> {
        let until = Instant::now() + Duration::from_secs(10);
        let (status, _) = loop {
            if let Some(answer) = get(admin, "/healthz") {
                break answer;
            }
            if Instant::now() > until {
                bail!("pop-proxy never served /healthz");
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        assert_eq!(status, 200);
        let (status, body) = get(admin, "/readyz").context("readyz")?;
        assert_eq!(status, 503, "core is unreachable: {body}");

        assert!(!std::fs::read_to_string(&log_path)?.contains("pop draining"));
        signal(child.id(), "USR1")?;
        assert!(log_has("pop draining")?, "no drain after SIGUSR1");
        let (status, _) = get(admin, "/readyz").context("readyz")?;
        assert_eq!(status, 503);

        signal(child.id(), "TERM")?;
        let until = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(status) = child.try_wait()? {
                assert_eq!(status.code(), Some(0));
                assert!(log_has("pop shutting down")?);
                return Ok(());
            }
            if Instant::now() > until {
                bail!("pop-proxy did not exit after SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    })();
    let _ = child.kill();
    let _ = child.wait();
    result
}
