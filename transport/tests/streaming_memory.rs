//! Large objects stream through with memory that does not grow with the object.
//!
//! Sender and receiver run in this one process, so the resident set covers both ends. Each
//! test is alone in this binary's process at a time (`--test-threads=1` is not needed: the
//! default test only runs one upload at a time, and the large one is ignored by default).

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use common::{Lab, router, start_server, write_pattern_file};
use fedmesh_transport::transfer::ObjectStore;
use fedmesh_transport::{Client, Protocol};

/// Resident set size of this process, from `/proc/self/statm` (pages of 4 KiB).
fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

/// Samples the resident set every 5 ms until dropped, keeping the peak.
struct PeakRss {
    stop: Arc<AtomicBool>,
    peak: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl PeakRss {
    fn start() -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let peak = Arc::new(AtomicU64::new(rss_bytes()));
        let thread = std::thread::spawn({
            let (stop, peak) = (Arc::clone(&stop), Arc::clone(&peak));
            move || {
                while !stop.load(Ordering::Relaxed) {
                    peak.fetch_max(rss_bytes(), Ordering::Relaxed);
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
        });
        Self {
            stop,
            peak,
            thread: Some(thread),
        }
    }

    fn finish(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        self.peak.load(Ordering::Relaxed)
    }
}

/// Uploads `size` bytes after a warm-up upload and returns (baseline RSS, peak RSS).
async fn stream_through(size: u64, force_http2: bool) -> Result<(u64, u64)> {
    let lab = Lab::new("fl.example")?;
    let store = ObjectStore::open(&lab.path("received"), 16 << 30)?;
    let server = start_server(lab.source("core", "/core")?, router(Some(&store))).await?;
    let mut config = common::client_config(&server);
    if force_http2 {
        config.quic_addr = "127.0.0.1:9".parse()?;
        config.quic_connect_timeout = Duration::from_millis(300);
    }
    let client = Client::new(config, lab.source("store", "/store/emea/0042")?)?;

    // 1. Warm up: connection, buffers, thread pools.
    let warm = lab.path("warm.bin");
    write_pattern_file(&warm, 8 << 20, 1)?;
    client.put_object(&warm).await?;
    let expected = if force_http2 {
        Protocol::Http2
    } else {
        Protocol::Http3
    };
    assert_eq!(client.protocol().await, Some(expected));

    // 2. The measured upload.
    let file = lab.path("object.bin");
    write_pattern_file(&file, size, 2)?;
    let baseline = rss_bytes();
    let sampler = PeakRss::start();
    let started = Instant::now();
    let report = client.put_object(&file).await?;
    let elapsed = started.elapsed();
    let peak = sampler.finish();

    let stored = store.object_path(&report.digest).context("object stored")?;
    assert_eq!(std::fs::metadata(stored)?.len(), size);
    println!(
        "{} MiB over {expected}: {:.1} s, {:.0} MB/s incl. hashing; RSS baseline {} MiB, peak {} MiB, growth {} MiB",
        size >> 20,
        elapsed.as_secs_f64(),
        size as f64 / 1e6 / elapsed.as_secs_f64(),
        baseline >> 20,
        peak >> 20,
        peak.saturating_sub(baseline) >> 20
    );
    Ok((baseline, peak))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn object_of_64_mib_streams_with_memory_well_below_its_size() -> Result<()> {
    let size = 64 << 20;
    let (baseline, peak) = stream_through(size, false).await?;
    // Flow-control windows (about 10 MiB of QUIC send window) and a chunk buffer on each
    // side bound the growth; a quarter of the object leaves room for allocator slack.
    let growth = peak.saturating_sub(baseline);
    assert!(
        growth < size / 4,
        "RSS grew {} MiB for a {} MiB object",
        growth >> 20,
        size >> 20
    );
    Ok(())
}

/// `cargo test --release -p fedmesh-transport --test streaming_memory -- --ignored --nocapture`
/// `FEDMESH_STREAM_MIB` changes the size (default 3072), `FEDMESH_STREAM_HTTP2=1` forces
/// the TCP fallback.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "slow: streams 3 GiB through loopback; run in release"]
async fn object_of_3_gib_streams_with_flat_memory() -> Result<()> {
    let mib: u64 = std::env::var("FEDMESH_STREAM_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3072);
    let http2 = std::env::var("FEDMESH_STREAM_HTTP2").is_ok_and(|v| v == "1");
    let (baseline, peak) = stream_through(mib << 20, http2).await?;
    let growth = peak.saturating_sub(baseline);
    assert!(growth < 128 << 20, "RSS grew {} MiB", growth >> 20);
    Ok(())
}
