//! Local evaluation: the metrics a store reports, never its rows.

use tch::{Device, Kind, Tensor};

use crate::Examples;
use crate::model::Model;
use crate::task::Objective;

/// Bins for the expected calibration error (Guo et al. 2017 use 15).
pub const ECE_BINS: usize = 15;

/// Metrics of a model on a set of examples.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
#[serde(tag = "objective", rename_all = "snake_case")]
pub enum Metrics {
    /// Regression metrics.
    Regression {
        /// Root mean squared error.
        rmse: f64,
        /// Mean absolute error.
        mae: f64,
    },
    /// Classification metrics.
    Classification {
        /// Share of rows whose most likely class is the label.
        accuracy: f64,
        /// Expected calibration error over [`ECE_BINS`] equal-width confidence bins.
        ece: f64,
    },
}

/// The model's outputs for every row, `[rows, outputs]` on the CPU, computed in batches
/// without gradients.
pub fn predict(model: &Model, examples: &Examples) -> Tensor {
    let n = examples.len() as i64;
    let x = Tensor::from_slice(&examples.features).reshape([n, examples.dim as i64]);
    tch::no_grad(|| {
        let outputs: Vec<Tensor> = (0..n)
            .step_by(4096)
            .map(|start| {
                let len = (n - start).min(4096);
                let batch = x.narrow(0, start, len).to_device(model.device());
                model
                    .forward(&batch)
                    .to_device(Device::Cpu)
                    .to_kind(Kind::Float)
            })
            .collect();
        if outputs.is_empty() {
            Tensor::zeros([0, 1], (Kind::Float, Device::Cpu))
        } else {
            Tensor::cat(&outputs, 0)
        }
    })
}

/// Evaluates `model` on `examples` (already normalised).
pub fn evaluate(model: &Model, examples: &Examples) -> Metrics {
    let outputs = predict(model, examples);
    match model.objective() {
        Objective::Regression => {
            let predictions = Vec::<f32>::try_from(&outputs.select(1, 0)).unwrap_or_default();
            Metrics::Regression {
                rmse: rmse(&predictions, &examples.targets),
                mae: mae(&predictions, &examples.targets),
            }
        }
        Objective::Classification => {
            let probs = outputs.softmax(-1, Kind::Float);
            let classes = probs.size()[1] as usize;
            let probs = Vec::<f32>::try_from(&probs.flatten(0, -1)).unwrap_or_default();
            let labels: Vec<usize> = examples.targets.iter().map(|&t| t as usize).collect();
            Metrics::Classification {
                accuracy: accuracy(&probs, classes, &labels),
                ece: expected_calibration_error(&probs, classes, &labels, ECE_BINS),
            }
        }
    }
}

/// Root mean squared error; 0 for no rows.
pub fn rmse(predictions: &[f32], targets: &[f32]) -> f64 {
    let n = predictions.len().max(1) as f64;
    let sum: f64 = predictions
        .iter()
        .zip(targets)
        .map(|(p, t)| (f64::from(*p) - f64::from(*t)).powi(2))
        .sum();
    (sum / n).sqrt()
}

/// Mean absolute error; 0 for no rows.
pub fn mae(predictions: &[f32], targets: &[f32]) -> f64 {
    let n = predictions.len().max(1) as f64;
    predictions
        .iter()
        .zip(targets)
        .map(|(p, t)| (f64::from(*p) - f64::from(*t)).abs())
        .sum::<f64>()
        / n
}

/// Share of rows of `probs` (row-major, `classes` per row) whose arg-max is the label.
pub fn accuracy(probs: &[f32], classes: usize, labels: &[usize]) -> f64 {
    let rows = probs.chunks_exact(classes.max(1));
    let hits = rows
        .zip(labels)
        .filter(|(row, label)| arg_max(row).0 == **label)
        .count();
    hits as f64 / labels.len().max(1) as f64
}

/// Expected calibration error: rows are binned by their top probability into `bins`
/// equal-width bins over (0, 1]; ECE is the row-weighted mean over bins of
/// |accuracy - mean confidence|.
pub fn expected_calibration_error(
    probs: &[f32],
    classes: usize,
    labels: &[usize],
    bins: usize,
) -> f64 {
    let bins = bins.max(1);
    let mut count = vec![0usize; bins];
    let mut correct = vec![0usize; bins];
    let mut confidence = vec![0f64; bins];
    for (row, label) in probs.chunks_exact(classes.max(1)).zip(labels) {
        let (class, p) = arg_max(row);
        // Bin b holds confidences in (b/bins, (b+1)/bins]; 0 joins the first bin.
        let bin = ((f64::from(p) * bins as f64).ceil() as usize).clamp(1, bins) - 1;
        count[bin] += 1;
        correct[bin] += usize::from(class == *label);
        confidence[bin] += f64::from(p);
    }
    let n = labels.len().max(1) as f64;
    (0..bins)
        .filter(|&b| count[b] > 0)
        .map(|b| {
            let c = count[b] as f64;
            (c / n) * (correct[b] as f64 / c - confidence[b] / c).abs()
        })
        .sum()
}

fn arg_max(row: &[f32]) -> (usize, f32) {
    row.iter()
        .copied()
        .enumerate()
        .fold((0, f32::NEG_INFINITY), |best, (i, p)| {
            if p > best.1 { (i, p) } else { best }
        })
}
