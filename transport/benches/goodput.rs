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
    let hashing = started.elapsed();
    report("sender manifest pass (SHA-256)", size, hashing, None);

    // 3. HTTP/3, then the HTTP/2 fallback.
    let core = FileSvidSource::load(pki.core.clone())?;
    let store_paths = pki.stores[0].1.clone();
    let h3 = upload(&dir.path().join("h3"), &core, &store_paths, &file, false).await?;
    report("put_object over HTTP/3", size, h3, Some(tcp));
    report(
        "  without the manifest pass",
        size,
        h3.saturating_sub(hashing),
        Some(tcp),
    );
    let h2 = upload(&dir.path().join("h2"), &core, &store_paths, &file, true).await?;
    report("put_object over HTTP/2 (fallback)", size, h2, Some(tcp));
    report(
        "  without the manifest pass",
        size,
        h2.saturating_sub(hashing),
        Some(tcp),
    );
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

/// The reference: file to socket and socket to file on two threads with 1 MiB buffers, no
/// encryption and no hashing.
async fn tcp_copy(from: &Path, to: &Path) -> Result<Duration> {
    let (from, to) = (from.to_owned(), to.to_owned());
    tokio::task::spawn_blocking(move || {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let receiver = std::thread::spawn(move || {
            let (mut socket, _) = listener.accept()?;
            let mut out = std::fs::File::create(&to)?;
            copy_1mib(&mut socket, &mut out)?;
            std::io::Write::flush(&mut out)
        });
        let started = Instant::now();
        let mut socket = std::net::TcpStream::connect(addr)?;
        copy_1mib(&mut std::fs::File::open(&from)?, &mut socket)?;
        socket.shutdown(std::net::Shutdown::Write)?;
        receiver
            .join()
            .map_err(|_| anyhow::anyhow!("receiver panicked"))??;
        Ok(started.elapsed())
    })
    .await?
}

fn copy_1mib(from: &mut impl std::io::Read, to: &mut impl std::io::Write) -> std::io::Result<()> {
    let mut buffer = vec![0u8; 1 << 20];
    loop {
        let n = from.read(&mut buffer)?;
        if n == 0 {
            return Ok(());
        }
        to.write_all(&buffer[..n])?;
    }
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
