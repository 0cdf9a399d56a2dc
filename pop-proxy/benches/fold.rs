//! Fold throughput on one core: masked-update bytes decoded, checked and added into a
//! round's sum, against a plain copy of the same bytes (the memory-bandwidth reference).
//!
//! Prints GB/s for each and their ratio, for a byte-aligned ring (r = 32, the fast path)
//! and an unaligned one (r = 20). Size: `FOLD_PARAMS` elements (default 1,000,000) per
//! update, `FOLD_UPDATES` updates (default 40), 64 KiB chunks as they come off the network.
//! Times are this thread's CPU time (`/proc/thread-self/schedstat`), so other processes on
//! a busy machine do not distort the figures.
//! Run with `cargo bench -p fedmesh-pop-proxy --bench fold`.

use std::hint::black_box;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use fedmesh_policy::Decision;
use fedmesh_pop_proxy::{Ring, RoundAccumulator, RoundSpec, UpdateHeader};
use fedmesh_protocol::ids::{ModelVersion, RoundId, StoreId};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const CHUNK: usize = 64 * 1024;

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Seconds this thread has run on a CPU.
fn thread_cpu_secs() -> Result<f64> {
    let stat = std::fs::read_to_string("/proc/thread-self/schedstat")?;
    let first = stat.split_whitespace().next().context("empty schedstat")?;
    Ok(first.parse::<u64>()? as f64 / 1e9)
}

fn main() -> Result<()> {
    let params = env_or("FOLD_PARAMS", 1_000_000);
    let updates = env_or("FOLD_UPDATES", 40);
    println!("fold throughput, 1 core: {updates} updates of {params} elements, 64 KiB chunks");
    for bits in [32, 20] {
        bench_ring(bits, params, updates)?;
    }
    Ok(())
}

fn bench_ring(bits: u32, params: usize, updates: usize) -> Result<()> {
    let ring = Ring::new(bits)?;
    let mut rng = ChaCha8Rng::seed_from_u64(u64::from(bits));
    // Four distinct payloads, reused round robin: enough to defeat caches at 1M elements.
    let payloads: Vec<Vec<u8>> = (0..4)
        .map(|_| {
            let values: Vec<u64> = (0..params)
                .map(|_| rng.r#gen::<u64>() & ring.mask())
                .collect();
            ring.pack(&values)
        })
        .collect();
    let bytes_per_update = payloads[0].len();

    // 1. Fold.
    let spec = RoundSpec {
        round: RoundId(1),
        model_version: ModelVersion(1),
        ring,
        len: params,
        expected: (0..updates).map(|i| StoreId(format!("s{i}"))).collect(),
        deadline: Instant::now() + Duration::from_secs(3600),
    };
    let decision = Decision {
        allow: true,
        rule: "allow".into(),
        reasons: Vec::new(),
        revision: "bench".into(),
    };
    let mut round = RoundAccumulator::open(spec);
    let start = thread_cpu_secs()?;
    for i in 0..updates {
        let header = UpdateHeader {
            store: StoreId(format!("s{i}")),
            round: RoundId(1),
            model_version: ModelVersion(1),
            ring_bits: bits,
            len: params,
        };
        let mut fold = round
            .begin(&header.store, &header, &decision)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        for chunk in payloads[i % payloads.len()].chunks(CHUNK) {
            fold.push(chunk).map_err(|e| anyhow::anyhow!("{e}"))?;
        }
        round.commit(fold).map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    let fold_secs = thread_cpu_secs()? - start;
    black_box(round.poll_close(Instant::now() + Duration::from_secs(7200)));

    // 2. The same bytes copied chunk by chunk into a buffer of one payload's size.
    let mut sink = vec![0u8; bytes_per_update];
    let start = thread_cpu_secs()?;
    for i in 0..updates {
        for (offset, chunk) in payloads[i % payloads.len()].chunks(CHUNK).enumerate() {
            let at = offset * CHUNK;
            sink[at..at + chunk.len()].copy_from_slice(chunk);
        }
        black_box(&mut sink);
    }
    let copy_secs = thread_cpu_secs()? - start;

    let total = (bytes_per_update * updates) as f64;
    let fold_rate = total / fold_secs / 1e9;
    let copy_rate = total / copy_secs / 1e9;
    println!(
        "  r = {bits:2}: fold {fold_rate:.2} GB/s, memcpy {copy_rate:.2} GB/s, \
         ratio {:.2} ({:.0} MB folded)",
        fold_rate / copy_rate,
        total / 1e6
    );
    Ok(())
}
