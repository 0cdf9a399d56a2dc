//! Aggregates many updates into one cohort sum and prints time and peak memory.
//!
//! The target (issue 4): 200 updates of 10 million parameters, with memory a small constant
//! times one model, not growing with the number of updates. Each update is generated in
//! place, as a store's upload would arrive, and dropped after it is added.
//!
//! `cargo bench -p fedmesh-core-agg --bench aggregate [-- STORES PARAMETERS]`

use std::time::Instant;

use fedmesh_core_agg::strategy::{Aggregator, CohortSum, StoreReport, Strategy};

fn main() -> anyhow::Result<()> {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let stores = args.first().copied().unwrap_or(200);
    let parameters = args.get(1).copied().unwrap_or(10_000_000);
    let model_bytes = parameters * std::mem::size_of::<f32>();

    let mut aggregator = Aggregator::new(Strategy::FedAvg)?;
    let mut global = vec![0.0f32; parameters];
    let mut cohort = CohortSum::new(parameters);
    let mut update = vec![0.0f32; parameters];
    let baseline = peak_rss_bytes();

    let start = Instant::now();
    for store in 0..stores {
        // A cheap deterministic update; the arithmetic of interest is the sum.
        let shift = store as f32 * 1e-3;
        for (i, u) in update.iter_mut().enumerate() {
            *u = ((i % 97) as f32 - 48.0) * 1e-4 + shift;
        }
        let report = StoreReport {
            examples: 100 + store as u64,
            loss: 1.0,
            update_norm_sq: 0.0,
        };
        let factors = aggregator.strategy().store_weight(&report)?;
        cohort.add_update(&update, factors)?;
    }
    aggregator.apply(&mut global, &cohort)?;
    let elapsed = start.elapsed().as_secs_f64();

    let peak = peak_rss_bytes();
    let mb = |bytes: usize| bytes as f64 / 1e6;
    println!(
        "aggregate: {stores} updates x {parameters} parameters (f32 model {:.0} MB)",
        mb(model_bytes)
    );
    println!(
        "time {elapsed:.2} s, {:.0} M parameter-updates/s",
        (stores * parameters) as f64 / elapsed / 1e6
    );
    println!(
        "peak RSS {:.0} MB = {:.2} x model (before aggregation {:.0} MB); \
         target: a small constant, independent of the {stores} updates",
        mb(peak),
        peak as f64 / model_bytes as f64,
        mb(baseline),
    );
    println!("check: global[0] = {}", global[0]);
    Ok(())
}

/// Peak resident set size of this process (VmHWM), in bytes; 0 where /proc is missing.
fn peak_rss_bytes() -> usize {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|rest| {
            rest.trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<usize>()
                .ok()
        })
        .map_or(0, |kb| kb * 1024)
}
