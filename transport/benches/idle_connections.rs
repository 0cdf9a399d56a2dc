//! Server memory per idle store connection.
//!
//! The server runs in a child process (this binary again, with `FEDMESH_BENCH_ROLE=server`)
//! so its resident set is measured alone. The parent opens `FEDMESH_BENCH_CONNECTIONS`
//! (default 5000) mutually authenticated HTTP/3 connections, one client each as stores
//! have, makes one request on each, lets them sit idle with keepalives flowing, and reads
//! the server's VmRSS before and after.
//!
//! `cargo bench -p fedmesh-transport --bench idle_connections`

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use fedmesh_transport::pki::{DevPkiSpec, write_dev_pki};
use fedmesh_transport::server::{Request, Response};
use fedmesh_transport::{
    Client, ClientConfig, FileSvidSource, PeerPolicy, Router, Server, ServerConfig, SvidPaths,
};
use http::{Method, StatusCode};

fn main() -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    if std::env::var("FEDMESH_BENCH_ROLE").is_ok_and(|r| r == "server") {
        return runtime.block_on(serve());
    }
    let count: usize = std::env::var("FEDMESH_BENCH_CONNECTIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5000);
    runtime.block_on(measure(count))
}

/// Child: serve `/ping` until stdin closes.
async fn serve() -> Result<()> {
    let dir = std::env::var("FEDMESH_BENCH_SVID").context("FEDMESH_BENCH_SVID")?;
    let source = FileSvidSource::load(SvidPaths::in_dir(std::path::Path::new(&dir)))?;
    let router = Router::new().route(Method::GET, "/ping", |_: Request| async {
        Response::text(StatusCode::OK, "pong")
    });
    let mut config = ServerConfig::new("127.0.0.1:0".parse()?);
    config.tcp_addr = None;
    let server = Server::bind(config, source, router).await?;
    println!("READY {}", server.quic_addr());
    std::io::stdout().flush()?;
    tokio::task::spawn_blocking(|| {
        let mut line = String::new();
        while std::io::stdin()
            .read_line(&mut line)
            .map(|n| n > 0)
            .unwrap_or(false)
        {}
    })
    .await?;
    Ok(())
}

async fn measure(count: usize) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let spec = DevPkiSpec {
        trust_domain: "fl.example".into(),
        ca_lifetime: Duration::from_secs(86400),
        svid_lifetime: Duration::from_secs(86400),
        pops: vec![],
        stores: vec![("emea".into(), "0042".into())],
    };
    let pki = write_dev_pki(dir.path(), &spec)?;

    // 1. The server, alone in its process.
    let core_dir = pki.core.chain.parent().context("core dir")?;
    let mut child = Command::new(std::env::current_exe()?)
        .env("FEDMESH_BENCH_ROLE", "server")
        .env("FEDMESH_BENCH_SVID", core_dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()?;
    let mut line = String::new();
    BufReader::new(child.stdout.take().context("stdout")?).read_line(&mut line)?;
    let addr = line
        .trim()
        .strip_prefix("READY ")
        .context("server did not start")?
        .parse()?;
    let pid = child.id();

    // 2. Warm up with one connection, then open the rest, 64 handshakes at a time.
    let store = FileSvidSource::load(pki.stores[0].1.clone())?;
    let mut config = ClientConfig::new(addr, PeerPolicy::AnyInTrustDomain);
    // This measures QUIC only (the server serves no TCP); on a loaded machine a burst of
    // handshakes can take longer than the default fallback timeout.
    config.quic_connect_timeout = Duration::from_secs(20);
    let warm = Client::new(config.clone(), store.clone())?;
    warm.get("/ping").await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = vm_rss(pid)?;

    let started = Instant::now();
    let mut clients = Vec::with_capacity(count);
    let semaphore = Arc::new(tokio::sync::Semaphore::new(64));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..count {
        let permit = Arc::clone(&semaphore).acquire_owned().await?;
        let client = Client::new(config.clone(), store.clone())?;
        clients.push(client.clone());
        tasks.spawn(async move {
            let result = client.get("/ping").await.map(|_| ());
            drop(permit);
            result
        });
    }
    let mut failed = 0;
    while let Some(done) = tasks.join_next().await {
        if let Ok(Err(error)) = &done
            && failed == 0
        {
            println!("first failure: {error}");
        }
        if !matches!(done, Ok(Ok(()))) {
            failed += 1;
        }
    }
    let opened = started.elapsed();

    // 3. Idle long enough for several keepalive rounds, then measure.
    tokio::time::sleep(Duration::from_secs(12)).await;
    let after = vm_rss(pid)?;
    let open = count - failed;
    println!(
        "opened {open} mutually authenticated HTTP/3 connections in {:.1} s ({failed} failed)",
        opened.as_secs_f64()
    );
    println!(
        "server VmRSS: {} KiB with 1 connection, {} KiB with {} idle: {:.1} KiB per idle connection",
        before / 1024,
        after / 1024,
        open + 1,
        (after.saturating_sub(before)) as f64 / 1024.0 / open.max(1) as f64
    );
    drop(clients);
    drop(child.stdin.take());
    let _ = child.wait();
    Ok(())
}

fn vm_rss(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .context("VmRSS")?;
    let kib: u64 = line
        .split_whitespace()
        .nth(1)
        .context("VmRSS value")?
        .parse()?;
    Ok(kib * 1024)
}
