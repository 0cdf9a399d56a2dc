//! Training throughput of the store's MLP with tch against the PyTorch reference.
//!
//! Both sides train MLP 47-64-32-1 (ReLU, MSE, Adam 1e-3) on one thread, from the same initial
//! weights, over the same synthetic batches of 256 rows taken in the same order, and report
//! samples per second. The PyTorch side is `scripts/torch_mlp_bench.py`, run with the venv's
//! python (`$VIRTUAL_ENV/bin/python`, else `python3`). Target: tch / PyTorch >= 0.9.
//!
//! `FEDMESH_BENCH_STEPS` sets the timed steps (default 3000); each side runs 3 times,
//! interleaved, and the best run counts, since other work on the machine only slows runs down.

use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use fedmesh_store_agent::model::{Model, Precision};
use fedmesh_store_agent::task::{
    Activation, DeviceChoice, ModelSpec, Objective, Optimiser, TrainingConfig,
};
use fedmesh_store_agent::{Examples, train};
use rand::{Rng, SeedableRng};
use tch::nn::OptimizerConfig;
use tch::{Device, Tensor, nn};

const ROWS: usize = 8192;
const DIM: usize = 47;
const BATCH: usize = 256;
const WARMUP_STEPS: usize = 100;
const REPEATS: usize = 3;

fn spec() -> ModelSpec {
    ModelSpec::Mlp {
        inputs: DIM,
        hidden: vec![64, 32],
        outputs: 1,
        activation: Activation::Relu,
        objective: Objective::Regression,
        local: Vec::new(),
    }
}

/// Standard-normal-ish features and a target that depends on a few of them.
fn synthetic() -> Examples {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(47);
    let mut data = Examples::empty(DIM);
    for _ in 0..ROWS {
        let row: Vec<f32> = (0..DIM).map(|_| rng.gen_range(-1.7f32..1.7)).collect();
        let y = 9.0 + row[0] - 0.5 * row[11] + 0.3 * row[22] * row[23] + rng.gen_range(-0.3..0.3);
        data.features.extend(row);
        data.targets.push(y);
    }
    data
}

/// Samples per second and final loss of tch on the fixed batch sequence.
fn tch_run(
    data: &Examples,
    init: &fedmesh_store_agent::weights::Weights,
    steps: usize,
) -> Result<(f64, f64)> {
    let mut model = Model::new(&spec(), Device::Cpu, Precision::F32)?;
    model.load(init)?;
    let mut opt = nn::Adam::default().build(model.var_store(), 1e-3)?;
    let x = Tensor::from_slice(&data.features).reshape([ROWS as i64, DIM as i64]);
    let y = Tensor::from_slice(&data.targets).reshape([ROWS as i64, 1]);
    let batches = ROWS / BATCH;
    let mut step = |i: usize| {
        let start = ((i % batches) * BATCH) as i64;
        let (xb, yb) = (
            x.narrow(0, start, BATCH as i64),
            y.narrow(0, start, BATCH as i64),
        );
        let loss = train::batch_loss(&model, &xb, &yb);
        opt.backward_step(&loss);
        loss
    };
    for i in 0..WARMUP_STEPS {
        let _warmup_loss = step(i);
    }
    let begin = Instant::now();
    let mut loss = Tensor::from(0f32);
    for i in WARMUP_STEPS..WARMUP_STEPS + steps {
        loss = step(i);
    }
    let elapsed = begin.elapsed().as_secs_f64();
    Ok(((steps * BATCH) as f64 / elapsed, loss.double_value(&[])))
}

/// Samples per second of the store's own training loop (`train::train`, shuffled batches).
fn train_loop_run(data: &Examples, steps: usize) -> Result<f64> {
    let mut model = Model::new(&spec(), Device::Cpu, Precision::F32)?;
    let epochs = (steps * BATCH).div_ceil(ROWS);
    let config = TrainingConfig {
        epochs,
        batch_size: BATCH,
        optimiser: Optimiser::Adam,
        learning_rate: 1e-3,
        momentum: 0.0,
        fedprox_mu: 0.0,
        seed: 1,
        threads: 1,
        device: DeviceChoice::Cpu,
        dp: None,
    };
    let begin = Instant::now();
    let report = train::train(&mut model, &config, data, None)?;
    Ok((report.steps * BATCH) as f64 / begin.elapsed().as_secs_f64())
}

fn torch_run(dir: &std::path::Path, steps: usize) -> Result<(f64, f64)> {
    let python = std::env::var_os("VIRTUAL_ENV")
        .map(|venv| PathBuf::from(venv).join("bin/python"))
        .unwrap_or_else(|| PathBuf::from("python3"));
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scripts/torch_mlp_bench.py");
    let output = Command::new(&python)
        .arg(&script)
        .args(["--data", &dir.join("data.f32").display().to_string()])
        .args(["--weights", &dir.join("weights.f32").display().to_string()])
        .args(["--rows", &ROWS.to_string(), "--batch", &BATCH.to_string()])
        .args([
            "--warmup-steps",
            &WARMUP_STEPS.to_string(),
            "--steps",
            &steps.to_string(),
        ])
        .env("OMP_NUM_THREADS", "1")
        .output()
        .with_context(|| format!("running {}", python.display()))?;
    if !output.status.success() {
        bail!(
            "{} failed: {}",
            script.display(),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let report: serde_json::Value = serde_json::from_slice(&output.stdout)?;
    let field = |k: &str| {
        report[k]
            .as_f64()
            .with_context(|| format!("no {k} in {report}"))
    };
    Ok((field("samples_per_s")?, field("final_loss")?))
}

fn main() -> Result<()> {
    let steps: usize = std::env::var("FEDMESH_BENCH_STEPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3000);
    train::configure_threads(1);
    let data = synthetic();
    tch::manual_seed(3);
    let init = Model::new(&spec(), Device::Cpu, Precision::F32)?.weights();

    // The batches and the initial weights go to the PyTorch side as raw float32.
    let dir = tempfile::tempdir()?;
    let rows: Vec<u8> = data
        .features
        .chunks_exact(DIM)
        .zip(&data.targets)
        .flat_map(|(row, y)| {
            row.iter()
                .chain(std::iter::once(y))
                .flat_map(|v| v.to_le_bytes())
                .collect::<Vec<_>>()
        })
        .collect();
    std::fs::write(dir.path().join("data.f32"), rows)?;
    let weights: Vec<u8> = init
        .flatten()
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    std::fs::write(dir.path().join("weights.f32"), weights)?;

    let (mut best_tch, mut best_torch) = ((0.0, 0.0), (0.0, 0.0));
    for _ in 0..REPEATS {
        let t = tch_run(&data, &init, steps)?;
        if t.0 > best_tch.0 {
            best_tch = t;
        }
        let p = torch_run(dir.path(), steps)?;
        if p.0 > best_torch.0 {
            best_torch = p;
        }
    }
    let store_loop = train_loop_run(&data, steps)?;

    println!(
        "train_throughput: MLP 47-64-32-1, batch {BATCH}, Adam 1e-3, 1 thread, \
         {steps} steps, best of {REPEATS}"
    );
    println!(
        "  tch     {:>10.0} samples/s  (final batch loss {:.6})",
        best_tch.0, best_tch.1
    );
    println!(
        "  pytorch {:>10.0} samples/s  (final batch loss {:.6})",
        best_torch.0, best_torch.1
    );
    println!(
        "  ratio tch/pytorch {:.3} (target >= 0.9)",
        best_tch.0 / best_torch.0
    );
    println!("  store training loop (shuffled batches) {store_loop:.0} samples/s");
    Ok(())
}
