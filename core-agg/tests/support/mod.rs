//! A three-node etcd cluster on loopback ports for the tests that need one.

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// Three etcd members on loopback ports the OS handed out; killed when dropped.
pub struct Cluster {
    /// Client endpoints, `127.0.0.1:port`.
    pub endpoints: Vec<String>,
    children: Vec<Option<Child>>,
    _dir: tempfile::TempDir,
}

impl Cluster {
    /// Starts the members and waits for a leader.
    pub fn start() -> Result<Self> {
        let dir = tempfile::tempdir()?;
        // Hold all six listeners until every port is chosen, so none is handed out twice.
        let listeners: Vec<TcpListener> = (0..6)
            .map(|_| TcpListener::bind("127.0.0.1:0"))
            .collect::<Result<_, _>>()?;
        let ports: Vec<u16> = listeners
            .iter()
            .map(|l| l.local_addr().map(|a| a.port()))
            .collect::<Result<_, _>>()?;
        drop(listeners);

        let peer = |i: usize| format!("http://127.0.0.1:{}", ports[3 + i]);
        let initial: Vec<String> = (0..3).map(|i| format!("m{i}={}", peer(i))).collect();
        let mut children = Vec::new();
        let mut endpoints = Vec::new();
        for (i, client_port) in ports[..3].iter().enumerate() {
            let client = format!("http://127.0.0.1:{client_port}");
            let log = std::fs::File::create(dir.path().join(format!("m{i}.log")))?;
            let child = Command::new("etcd")
                .args(["--name", &format!("m{i}")])
                .arg("--data-dir")
                .arg(dir.path().join(format!("m{i}")))
                .args([
                    "--listen-client-urls",
                    &client,
                    "--advertise-client-urls",
                    &client,
                ])
                .args([
                    "--listen-peer-urls",
                    &peer(i),
                    "--initial-advertise-peer-urls",
                    &peer(i),
                ])
                .args(["--initial-cluster", &initial.join(",")])
                .args([
                    "--initial-cluster-state",
                    "new",
                    "--initial-cluster-token",
                    "fedmesh",
                ])
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .context("cannot start etcd (Debian package etcd-server)")?;
            children.push(Some(child));
            endpoints.push(format!("127.0.0.1:{client_port}"));
        }
        let cluster = Self {
            endpoints,
            children,
            _dir: dir,
        };
        cluster.leader().context("cluster never elected a leader")?;
        Ok(cluster)
    }

    /// Index of the current leader, asking each live member; waits up to 30 s.
    pub fn leader(&self) -> Result<usize> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(30) {
            for (i, endpoint) in self.endpoints.iter().enumerate() {
                if self.children[i].is_none() {
                    continue;
                }
                let status = runtime.block_on(async {
                    let options = etcd_client::ConnectOptions::new()
                        .with_connect_timeout(Duration::from_millis(500))
                        .with_timeout(Duration::from_millis(500));
                    let mut client =
                        etcd_client::Client::connect([endpoint], Some(options)).await?;
                    client.status().await
                });
                if let Ok(status) = status {
                    let me = status.header().map(|h| h.member_id());
                    if status.leader() != 0 && me == Some(status.leader()) {
                        return Ok(i);
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        bail!("no leader within 30 s")
    }

    /// Kills one member (no-op if already dead).
    pub fn kill(&mut self, member: usize) {
        if let Some(mut child) = self.children[member].take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Cluster {
    /// Members still running.
    pub fn alive(&self) -> usize {
        self.children.iter().flatten().count()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for member in 0..self.children.len() {
            self.kill(member);
        }
    }
}
