//! Encode and decode throughput of each update codec on a 10-million-parameter update.
//!
//! Throughput is in GB/s of float32 input (4 bytes per parameter, 40 MB at the default
//! size), compared with a plain memcpy of the same 40 MB. Each figure is the best of three
//! samples of at least 200 ms each, timed by the thread's CPU time where Linux reports it,
//! so that other jobs on a shared machine do not skew it. The size can be set with
//! `FEDMESH_BENCH_DIM`.
//!
//! Run with `cargo bench -p fedmesh-protocol --bench codec`.

use std::hint::black_box;
use std::sync::LazyLock;
use std::time::{Duration, Instant};

use anyhow::Result;
use fedmesh_protocol::codec::{
    CodecConfig, DecodeParams, EncodedUpdate, Quantise, SharedSeed, Sparsify, bitpack, compress,
    decompress,
};
use fedmesh_protocol::ids::RoundId;
use fedmesh_protocol::update::add_gaussian_noise;

const RUNS: usize = 3;

/// Origin of the wall clock, for platforms without a thread CPU clock.
static EPOCH: LazyLock<Instant> = LazyLock::new(Instant::now);
const ZSTD_LEVEL: i32 = 3;

/// The calling thread's time on a CPU, from Linux's scheduler statistics. On a machine
/// shared with other jobs this is the figure that does not depend on their load. The
/// kernel updates it at scheduler ticks (a few milliseconds), hence [`MIN_SAMPLE`].
fn cpu_time() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    let ns = stat.split_whitespace().next()?.parse().ok()?;
    Some(Duration::from_nanos(ns))
}

/// Shortest time one sample runs `f` for, repeating it as needed, so that the clock's tick
/// is at most 2% of a sample.
const MIN_SAMPLE: Duration = Duration::from_millis(200);

/// The best of [`RUNS`] samples of the time one call of `f` takes, in CPU time where the
/// platform reports it and in wall-clock time otherwise.
fn best_of<T>(mut f: impl FnMut() -> T) -> (Duration, T) {
    let clock = || cpu_time().unwrap_or_else(|| Instant::now().duration_since(*EPOCH));
    let mut best = Duration::MAX;
    let mut last = None;
    for _ in 0..RUNS {
        let start = clock();
        let mut calls = 0u32;
        while calls == 0 || clock() - start < MIN_SAMPLE {
            last = Some(black_box(f()));
            calls += 1;
        }
        best = best.min((clock() - start) / calls);
    }
    (best, last.expect("RUNS is at least 1"))
}

fn gbps(bytes: usize, time: Duration) -> f64 {
    bytes as f64 / time.as_secs_f64() / 1e9
}

fn main() -> Result<()> {
    let dim: usize = std::env::var("FEDMESH_BENCH_DIM")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000_000);
    let bytes = dim * 4;

    // An update that looks like a clipped, noised delta: Gaussian, small values.
    let mut update = vec![0f32; dim];
    add_gaussian_noise(&mut update, 0.01, [3; 32])?;

    // The reference: copying the same bytes into a buffer that already exists.
    let mut copy = vec![0f32; dim];
    let (memcpy, _) = best_of(|| copy.copy_from_slice(black_box(&update)));
    let memcpy_gbps = gbps(bytes, memcpy);

    let shared = SharedSeed {
        seed: [5; 32],
        round: RoundId(1),
    };
    let k = dim / 100;
    let q8 = Some(Quantise::eight_bit([7; 32]));
    let q4 = Some(Quantise {
        bits: 4,
        block: 1024,
        seed: [7; 32],
    });
    let codecs: [(&str, CodecConfig); 7] = [
        (
            "quant8",
            CodecConfig {
                sparsify: Sparsify::Dense,
                quantise: q8,
                zstd_level: None,
            },
        ),
        (
            "top-k 1%",
            CodecConfig {
                sparsify: Sparsify::TopK { k },
                quantise: None,
                zstd_level: None,
            },
        ),
        (
            "random-k 1%",
            CodecConfig {
                sparsify: Sparsify::RandomK { k, shared },
                quantise: None,
                zstd_level: None,
            },
        ),
        (
            "bitpack (quant 4-bit)",
            CodecConfig {
                sparsify: Sparsify::Dense,
                quantise: q4,
                zstd_level: None,
            },
        ),
        (
            "zstd",
            CodecConfig {
                sparsify: Sparsify::Dense,
                quantise: None,
                zstd_level: Some(ZSTD_LEVEL),
            },
        ),
        (
            "quant8+zstd",
            CodecConfig {
                sparsify: Sparsify::Dense,
                quantise: q8,
                zstd_level: Some(ZSTD_LEVEL),
            },
        ),
        (
            "top-k 1%+quant8+zstd",
            CodecConfig {
                sparsify: Sparsify::TopK { k },
                quantise: q8,
                zstd_level: Some(ZSTD_LEVEL),
            },
        ),
    ];

    println!(
        "codec throughput, {dim} float32 parameters ({:.0} MB), best of {RUNS}",
        bytes as f64 / 1e6
    );
    let clock = if cpu_time().is_some() {
        "CPU time of this thread"
    } else {
        "wall clock"
    };
    println!("memcpy reference: {memcpy_gbps:.2} GB/s; zstd level {ZSTD_LEVEL}; timed by {clock}");
    println!();
    println!(
        "{:<22} {:>10} {:>9} {:>10} {:>10} {:>9} {:>10}",
        "codec", "encode", "x memcpy", "decode", "x memcpy", "wire MB", "shrink"
    );
    let params = DecodeParams {
        dim,
        shared: Some(shared),
    };
    for (name, config) in &codecs {
        let (enc, frame) = best_of(|| compress(&update, config, None).map(|f| f.encode()));
        let wire = frame?;
        let (dec, out) =
            best_of(|| EncodedUpdate::decode(&wire, dim).and_then(|f| decompress(&f, &params)));
        anyhow::ensure!(out?.len() == dim, "{name} decoded the wrong length");
        print_row(name, bytes, enc, dec, memcpy_gbps, wire.len());
    }

    // Secure aggregation packs ring elements with the bit-packer directly; 20-bit elements,
    // one per parameter, timed against the same 40 MB of float32 parameters.
    let ring: Vec<u64> = update
        .iter()
        .map(|&x| u64::from(x.to_bits() >> 12))
        .collect();
    let (enc, packed) = best_of(|| bitpack::pack(&ring, 20));
    let packed = packed?;
    let (dec, unpacked) = best_of(|| bitpack::unpack(&packed, 20, dim));
    anyhow::ensure!(unpacked? == ring, "bitpack did not round-trip");
    print_row(
        "bitpack 20-bit ring",
        bytes,
        enc,
        dec,
        memcpy_gbps,
        packed.len(),
    );
    Ok(())
}

fn print_row(name: &str, bytes: usize, enc: Duration, dec: Duration, memcpy: f64, wire: usize) {
    let (e, d) = (gbps(bytes, enc), gbps(bytes, dec));
    println!(
        "{:<22} {:>5.2} GB/s {:>9.3} {:>5.2} GB/s {:>9.3} {:>9.2} {:>9.1}x",
        name,
        e,
        e / memcpy,
        d,
        d / memcpy,
        wire as f64 / 1e6,
        bytes as f64 / wire as f64
    );
}
