//! Policy decisions per second with the shipped default policy, on one core.
//!
//! Prints the rate and its ratio to the 40,000 decisions per second (25 us each) that
//! DESIGN.md budgets for regorus. The rate is per second of this thread's CPU time
//! (`/proc/thread-self/schedstat`), so a busy machine does not distort it; wall time is
//! printed beside it. Run with `cargo bench -p fedmesh-policy`.

use std::hint::black_box;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use fedmesh_policy::{DEFAULT_ENTRYPOINT, PolicyInput, PolicyLocation};
use fedmesh_protocol::ids::{Region, RoundId};

/// DESIGN.md: "about 25 us a decision".
const REFERENCE_PER_SECOND: f64 = 40_000.0;
const RUN_FOR: Duration = Duration::from_secs(5);

/// Nanoseconds this thread has run on a CPU.
fn thread_cpu_ns() -> Result<u64> {
    let stat = std::fs::read_to_string("/proc/thread-self/schedstat")?;
    let first = stat.split_whitespace().next().context("empty schedstat")?;
    Ok(first.parse()?)
}

fn main() -> Result<()> {
    let policy = fedmesh_policy::load(
        &PolicyLocation::Dir(fedmesh_policy::default_policy_dir()),
        DEFAULT_ENTRYPOINT,
    )?;

    // A mix the PoP sees: mostly allowed uploads, some denials of each kind.
    let inputs: Vec<PolicyInput> = (0..64u32)
        .map(|i| PolicyInput {
            spiffe_id: format!("spiffe://stores.fedmesh.example/store/midwest/s{i}"),
            trust_domain: if i % 16 == 1 {
                "evil.example"
            } else {
                "stores.fedmesh.example"
            }
            .into(),
            runtime_version: if i % 8 == 2 { "1.3.9" } else { "1.10.0" }.into(),
            epsilon_remaining: if i % 8 == 3 { 0.25 } else { 2.0 },
            region: Region("midwest".into()),
            round: Some(RoundId(7)),
            route: if i % 16 == 4 {
                "/v1/admin/drain"
            } else {
                "/v1/rounds/{round}/update"
            }
            .into(),
            method: "PUT".into(),
        })
        .collect();

    // Warm up, then count decisions for RUN_FOR.
    for input in &inputs {
        black_box(policy.decide(input));
    }
    let start = Instant::now();
    let cpu_start = thread_cpu_ns()?;
    let mut decisions = 0u64;
    let mut allowed = 0u64;
    while start.elapsed() < RUN_FOR {
        for input in &inputs {
            allowed += u64::from(black_box(policy.decide(input)).allow);
        }
        decisions += inputs.len() as u64;
    }
    let cpu = (thread_cpu_ns()? - cpu_start) as f64 / 1e9;
    let elapsed = start.elapsed().as_secs_f64();
    let rate = decisions as f64 / cpu;

    println!(
        "policy decisions (default policy, 1 thread): {decisions} in {cpu:.2} s CPU \
         ({elapsed:.2} s wall)"
    );
    println!("  {rate:.0} decisions/s, {:.1} us/decision", 1e6 / rate);
    println!(
        "  allowed: {:.0}%",
        100.0 * allowed as f64 / decisions as f64
    );
    println!(
        "  ratio to the 40,000/s reference: {:.2}",
        rate / REFERENCE_PER_SECOND
    );
    Ok(())
}
