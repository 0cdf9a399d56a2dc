//! Peak memory while one round folds 1,000 masked updates of 1,000,000 elements (r = 32),
//! streamed in 64 KiB chunks and checkpointed every 100 updates.
//!
//! Prints the process's peak resident set (VmHWM from /proc/self/status) and its ratio to
//! one model's size: the sum is one model of u64 lanes, each upload in flight one more, so
//! a few models' worth is expected, not 1,000. Sizes: `RSS_UPDATES`, `RSS_PARAMS`.
//! Run with `cargo bench -p fedmesh-pop-proxy --bench fold_rss`.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow};
use fedmesh_policy::Decision;
use fedmesh_pop_proxy::{Ring, RoundAccumulator, RoundSpec, StateDir, UpdateHeader};
use fedmesh_protocol::ids::{ModelVersion, RoundId, StoreId};

const CHUNK: usize = 64 * 1024;

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Peak resident set size in bytes.
fn vm_hwm() -> Result<u64> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let line = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .context("no VmHWM line")?;
    let kib: u64 = line
        .split_whitespace()
        .nth(1)
        .context("VmHWM has no value")?
        .parse()?;
    Ok(kib * 1024)
}

/// Fills `chunk` with the next bytes of store `seed`'s payload (xorshift: cheap, so the
/// bench measures the fold, not the generator).
fn fill(chunk: &mut [u8], state: &mut u64) {
    for word in chunk.chunks_mut(8) {
        *state ^= *state << 13;
        *state ^= *state >> 7;
        *state ^= *state << 17;
        word.copy_from_slice(&state.to_le_bytes()[..word.len()]);
    }
}

fn main() -> Result<()> {
    let updates = env_or("RSS_UPDATES", 1_000);
    let params = env_or("RSS_PARAMS", 1_000_000);
    let ring = Ring::new(32)?;
    let payload_bytes = ring.packed_len(params).context("size overflow")?;
    let state_dir = tempfile::tempdir()?;
    let state = StateDir::open(state_dir.path())?;
    let baseline = vm_hwm()?;

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
    let mut chunk = vec![0u8; CHUNK];
    let start = Instant::now();

    for i in 0..updates {
        let header = UpdateHeader {
            store: StoreId(format!("s{i}")),
            round: RoundId(1),
            model_version: ModelVersion(1),
            ring_bits: 32,
            len: params,
        };
        let mut fold = round
            .begin(&header.store, &header, &decision)
            .map_err(|e| anyhow!("{e}"))?;
        let mut prng = 0x9e37_79b9_7f4a_7c15u64 ^ (i as u64 + 1);
        let mut left = payload_bytes;
        while left > 0 {
            let n = left.min(CHUNK);
            fill(&mut chunk[..n], &mut prng);
            fold.push(&chunk[..n]).map_err(|e| anyhow!("{e}"))?;
            left -= n;
        }
        round.commit(fold).map_err(|e| anyhow!("{e}"))?;
        if (i + 1) % 100 == 0 {
            round.checkpoint(&state)?;
        }
    }
    let elapsed = start.elapsed();
    let sum = round
        .poll_close(Instant::now())
        .context("every store reported")?;
    let peak = vm_hwm()?;

    let model_lanes = (params * 8) as f64;
    println!(
        "peak RSS folding {updates} updates of {params} elements (r = 32), {:.1} s:",
        elapsed.as_secs_f64()
    );
    println!(
        "  VmHWM {:.1} MB (baseline before the round {:.1} MB)",
        peak as f64 / 1e6,
        baseline as f64 / 1e6
    );
    println!(
        "  one model: {:.1} MB as u64 lanes, {:.1} MB on the wire",
        model_lanes / 1e6,
        payload_bytes as f64 / 1e6
    );
    println!(
        "  ratio of peak RSS to one model (u64 lanes): {:.2} (all updates held would be {updates})",
        peak as f64 / model_lanes
    );
    println!("  contributors: {}", sum.contributors.len());
    Ok(())
}
