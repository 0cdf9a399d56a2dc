//! DP-SGD pieces: per-example gradients, per-example clipping, Poisson sampling and Gaussian
//! noise from a cryptographically secure generator (Abadi et al. 2016).
//!
//! Per-example gradients of an MLP come from one backward pass: for a linear layer
//! `z = a W^T + b`, the gradient of the summed loss with respect to `z` has one row per example
//! (`g`, row `i` depends on example `i` only), so example `i`'s weight gradient is the outer
//! product `g_i a_i^T` and its bias gradient is `g_i`. Other models fall back to one backward
//! pass per example.

use rand::Rng;
use rand::rngs::OsRng;
use rand_chacha::ChaCha20Rng;
use rand_core::SeedableRng;
use rand_distr::{Distribution, Normal};
use tch::{Kind, Tensor};

use crate::model::Model;
use crate::task::Objective;

/// The DP-SGD schedule for `examples` rows: the Poisson sampling rate and the number of
/// steps. Training runs exactly this, and the store's budget check and core's ledger charge
/// exactly this: `q = min(1, batch / n)`, `steps = epochs * max(1, n / batch)` (whole batches).
pub fn schedule(examples: usize, expected_batch_size: usize, epochs: usize) -> (f64, usize) {
    let rate = (expected_batch_size as f64 / examples.max(1) as f64).min(1.0);
    let per_epoch = (examples / expected_batch_size.max(1)).max(1);
    (rate, epochs * per_epoch)
}

/// The loss of each example, `[batch]`: squared error averaged over outputs for regression,
/// cross-entropy for classification (targets are class indices, int64 `[batch]`).
pub fn per_example_loss(objective: Objective, output: &Tensor, target: &Tensor) -> Tensor {
    match objective {
        Objective::Regression => (output - target).square().mean_dim(-1, false, Kind::Float),
        Objective::Classification => {
            let log_probs = output.log_softmax(-1, Kind::Float);
            -log_probs
                .gather(1, &target.unsqueeze(1), false)
                .squeeze_dim(1)
        }
    }
}

/// Per-example gradients of [`per_example_loss`]: one tensor per model parameter, in model
/// order, each `[batch, ..parameter shape]`. Uses the one-pass method for an MLP and
/// [`per_example_gradients_looped`] otherwise.
///
/// # Errors
/// [`tch::TchError`] when libtorch fails (e.g. out of memory).
pub fn per_example_gradients(
    model: &Model,
    x: &Tensor,
    y: &Tensor,
) -> Result<Vec<Tensor>, tch::TchError> {
    if !model.is_mlp() {
        return per_example_gradients_looped(model, x, y);
    }
    let (output, trace) = model.forward_traced(x);
    let loss = per_example_loss(model.objective(), &output, y).sum(Kind::Float);
    let outputs: Vec<&Tensor> = trace.iter().map(|t| &t.output).collect();
    let grads = Tensor::f_run_backward(&[&loss], &outputs, false, false)?;

    let mut out = Vec::with_capacity(2 * trace.len());
    for (layer, g) in trace.iter().zip(grads) {
        let g = g.to_kind(Kind::Float);
        let a = layer.input.detach().to_kind(Kind::Float);
        out.push(Tensor::f_einsum("bo,bi->boi", &[&g, &a], None::<&[i64]>)?);
        out.push(g);
    }
    Ok(out)
}

/// Per-example gradients by one forward and backward pass per example: slow, works for any
/// model, and is the reference the fast path is tested against.
///
/// # Errors
/// [`tch::TchError`] when libtorch fails.
pub fn per_example_gradients_looped(
    model: &Model,
    x: &Tensor,
    y: &Tensor,
) -> Result<Vec<Tensor>, tch::TchError> {
    let params: Vec<&Tensor> = model.parameters().iter().map(|p| &p.tensor).collect();
    let batch = x.size()[0];
    let mut per_param: Vec<Vec<Tensor>> = (0..params.len())
        .map(|_| Vec::with_capacity(batch as usize))
        .collect();
    for i in 0..batch {
        let output = model.forward(&x.narrow(0, i, 1));
        let loss =
            per_example_loss(model.objective(), &output, &y.narrow(0, i, 1)).sum(Kind::Float);
        let grads = Tensor::f_run_backward(&[&loss], &params, false, false)?;
        for (slot, g) in per_param.iter_mut().zip(grads) {
            slot.push(g);
        }
    }
    per_param.iter().map(|gs| Tensor::f_stack(gs, 0)).collect()
}

/// Each example's gradient L2 norm over all parameters, `[batch]`.
pub fn per_example_norms(per_example: &[Tensor]) -> Tensor {
    let squares: Vec<Tensor> = per_example
        .iter()
        .map(|g| {
            g.flatten(1, -1)
                .square()
                .sum_dim_intlist(1, false, Kind::Float)
        })
        .collect();
    Tensor::stack(&squares, 0)
        .sum_dim_intlist(0, false, Kind::Float)
        .sqrt()
}

/// Scales each example's gradient to L2 norm at most `clip_norm` (unchanged when already
/// within it). Returns the clipped per-example gradients.
pub fn clip_per_example(per_example: &[Tensor], clip_norm: f64) -> Vec<Tensor> {
    let factors = clip_factors(per_example, clip_norm);
    per_example
        .iter()
        .map(|g| g * broadcast(&factors, g))
        .collect()
}

/// The sum over the batch of the clipped per-example gradients, one tensor per parameter.
pub fn clipped_sum(per_example: &[Tensor], clip_norm: f64) -> Vec<Tensor> {
    let factors = clip_factors(per_example, clip_norm);
    per_example
        .iter()
        .map(|g| (g * broadcast(&factors, g)).sum_dim_intlist(0, false, Kind::Float))
        .collect()
}

fn clip_factors(per_example: &[Tensor], clip_norm: f64) -> Tensor {
    // The small constant keeps a zero gradient finite; it only ever shrinks the factor.
    (per_example_norms(per_example) + 1e-6)
        .reciprocal()
        .multiply_scalar(clip_norm)
        .clamp_max(1.0)
}

fn broadcast(factors: &Tensor, like: &Tensor) -> Tensor {
    let mut shape = vec![-1i64];
    shape.extend(std::iter::repeat_n(1, like.dim() - 1));
    factors.reshape(shape)
}

/// The randomness of DP-SGD: Poisson batch sampling and Gaussian noise, both from ChaCha20.
pub struct DpRng {
    rng: ChaCha20Rng,
}

impl DpRng {
    /// Seeded from the OS (production), or from `seed` (tests and reproducible lab runs).
    pub fn new(seed: Option<u64>) -> Self {
        let rng = match seed {
            Some(seed) => ChaCha20Rng::seed_from_u64(seed),
            None => ChaCha20Rng::from_rng(OsRng).unwrap_or_else(|_| ChaCha20Rng::from_entropy()),
        };
        DpRng { rng }
    }

    /// Indices of a Poisson-sampled batch: each of `n` examples independently with
    /// probability `rate`.
    pub fn poisson_batch(&mut self, n: usize, rate: f64) -> Vec<i64> {
        (0..n as i64)
            .filter(|_| self.rng.gen_bool(rate.clamp(0.0, 1.0)))
            .collect()
    }

    /// `count` independent draws from N(0, std^2).
    pub fn gaussian(&mut self, count: usize, std: f64) -> Vec<f32> {
        match Normal::new(0.0, std) {
            Ok(normal) => (0..count)
                .map(|_| normal.sample(&mut self.rng) as f32)
                .collect(),
            // Normal::new rejects only a negative or non-finite std, which configs forbid.
            Err(_) => vec![0.0; count],
        }
    }
}
