//! Goodput of a large upload over loopback: HTTP/3, the HTTP/2 fallback, and a plain TCP
//! copy of the same bytes as the reference.
//!
//! `cargo bench -p fedmesh-transport --bench goodput`; `FEDMESH_BENCH_MIB` sets the size
//! (default 256). Every transfer reads the file from disk and the receiver writes it to
//! disk, so the reference pays the same file I/O; the transport additionally hashes every
//! chunk on both sides and the whole object on both sides.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use fedmesh_transport::pki::{DevPkiSpec, write_dev_pki};
use fedmesh_transport::transfer::{ObjectStore, manifest_of_file};
use fedmesh_transport::{
    Client, ClientConfig, FileSvidSource, PeerPolicy, Protocol, Server, ServerConfig, SvidPaths,
};
use tokio::io::AsyncWriteExt;

fn main() -> Result<()> {
    let mib: u64 = std::env::var("FEDMESH_BENCH_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(run(mib << 20))
}

async fn run(size: u64) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let spec = DevPkiSpec {
        trust_domain: "fl.example".into(),
        ca_lifetime: Duration::from_secs(86400),
        svid_lifetime: Duration::from_secs(86400),
        pops: vec![],
        stores: vec![("emea".into(), "0042".into())],
    };
    let pki = write_dev_pki(&dir.path().join("pki"), &spec)?;
    let file = dir.path().join("object.bin");
    write_random(&file, size)?;

    // 1. Reference: the same bytes from file to file over one loopback TCP connection.
    let tcp = tcp_copy(&file, &dir.path().join("tcp-copy.bin")).await?;
    report("plain TCP copy", size, tcp, None);

    // 2. Hashing alone, the sender's pass before it sends anything.
    let started = Instant::now();
    manifest_of_file(&file, 1 << 20)?;
    report(
        "sender manifest pass (SHA-256)",
        size,
        started.elapsed(),
        None,
    );

    // 3. HTTP/3, then the HTTP/2 fallback.
    let core = FileSvidSource::load(pki.core.clone())?;
    let store_paths = pki.stores[0].1.clone();
    let h3 = upload(&dir.path().join("h3"), &core, &store_paths, &file, false).await?;
    report("put_object over HTTP/3", size, h3, Some(tcp));
    let h2 = upload(&dir.path().join("h2"), &core, &store_paths, &file, true).await?;
    report("put_object over HTTP/2 (fallback)", size, h2, Some(tcp));
    Ok(())
}

async fn upload(
    root: &Path,
    core: &Arc<FileSvidSource>,
    store: &SvidPaths,
    file: &Path,
    http2: bool,
) -> Result<Duration> {
    let objects = ObjectStore::open(root, 16 << 30)?;
    let config = ServerConfig::new("127.0.0.1:0".parse()?);
    let server = Server::bind(config, core.clone(), objects.routes(Default::default())).await?;
    let mut config = ClientConfig::new(server.quic_addr(), PeerPolicy::AnyInTrustDomain);
    config.tcp_addr = server.tcp_addr().context("tcp")?;
    if http2 {
        // Nothing listens on UDP port 9 of loopback.
        config.quic_addr = "127.0.0.1:9".parse()?;
        config.quic_connect_timeout = Duration::from_millis(200);
    }
    let client = Client::new(config, FileSvidSource::load(store.clone())?)?;
    client
        .get("/objects/0000000000000000000000000000000000000000000000000000000000000000")
        .await
        .ok();
    let expected = if http2 {
        Protocol::Http2
    } else {
        Protocol::Http3
    };
    anyhow::ensure!(client.protocol().await == Some(expected), "wrong protocol");

    let started = Instant::now();
    client.put_object(file).await?;
    Ok(started.elapsed())
}

async fn tcp_copy(from: &Path, to: &Path) -> Result<Duration> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let to = to.to_owned();
    let receiver = tokio::spawn(async move {
        let (mut socket, _) = listener.accept().await?;
        let mut out = tokio::fs::File::create(&to).await?;
        tokio::io::copy(&mut socket, &mut out).await?;
        out.flush().await?;
        anyhow::Ok(())
    });
    let started = Instant::now();
    let mut socket = tokio::net::TcpStream::connect(addr).await?;
    let mut input = tokio::fs::File::open(from).await?;
    tokio::io::copy(&mut input, &mut socket).await?;
    socket.shutdown().await?;
    receiver.await??;
    Ok(started.elapsed())
}

fn report(what: &str, size: u64, took: Duration, reference: Option<Duration>) {
    let rate = size as f64 / 1e6 / took.as_secs_f64();
    match reference {
        Some(reference) => {
            let ratio = reference.as_secs_f64() / took.as_secs_f64();
            println!(
                "{what:<36} {:>6} MiB in {:>6.2} s = {rate:>7.1} MB/s, {ratio:.2}x plain TCP",
                size >> 20,
                took.as_secs_f64()
            );
        }
        None => println!(
            "{what:<36} {:>6} MiB in {:>6.2} s = {rate:>7.1} MB/s",
            size >> 20,
            took.as_secs_f64()
        ),
    }
}

/// Incompressible bytes (xorshift64), written 1 MiB at a time.
fn write_random(path: &Path, len: u64) -> Result<()> {
    use std::io::Write;
    let mut out = std::io::BufWriter::new(std::fs::File::create(path)?);
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut block = vec![0u8; 1 << 20];
    let mut left = len;
    while left > 0 {
        for word in block.chunks_exact_mut(8) {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            word.copy_from_slice(&state.to_le_bytes());
        }
        let n = left.min(block.len() as u64) as usize;
        out.write_all(&block[..n])?;
        left -= n as u64;
    }
    out.flush()?;
    Ok(())
}
