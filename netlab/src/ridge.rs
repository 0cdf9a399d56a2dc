//! Closed-form ridge regression, the linear baselines.

/// A fitted linear model `y = w . x + b`.
pub(crate) struct Ridge {
    weights: Vec<f64>,
    intercept: f64,
}

impl Ridge {
    /// Fits `rows` (row-major, `dim` per row) to `targets` minimising
    /// `|y - Xw - b|^2 + alpha |w|^2`; the intercept is not penalised (the data is centred).
    pub(crate) fn fit(rows: &[f32], dim: usize, targets: &[f32], alpha: f64) -> Ridge {
        let n = targets.len().max(1) as f64;
        let mut x_mean = vec![0.0; dim];
        for row in rows.chunks_exact(dim) {
            for (m, &v) in x_mean.iter_mut().zip(row) {
                *m += f64::from(v) / n;
            }
        }
        let y_mean = targets.iter().map(|&y| f64::from(y)).sum::<f64>() / n;

        // Normal equations on centred data: (Xc^T Xc + alpha I) w = Xc^T yc.
        let mut gram = vec![0.0; dim * dim];
        let mut rhs = vec![0.0; dim];
        let mut centred = vec![0.0; dim];
        for (row, &y) in rows.chunks_exact(dim).zip(targets) {
            for (c, (&v, m)) in centred.iter_mut().zip(row.iter().zip(&x_mean)) {
                *c = f64::from(v) - m;
            }
            let yc = f64::from(y) - y_mean;
            for i in 0..dim {
                rhs[i] += centred[i] * yc;
                for j in 0..=i {
                    gram[i * dim + j] += centred[i] * centred[j];
                }
            }
        }
        for i in 0..dim {
            for j in 0..i {
                gram[j * dim + i] = gram[i * dim + j];
            }
            gram[i * dim + i] += alpha;
        }
        let weights = solve_spd(gram, rhs, dim);
        let intercept = y_mean - weights.iter().zip(&x_mean).map(|(w, m)| w * m).sum::<f64>();
        Ridge { weights, intercept }
    }

    /// Predictions for `rows`.
    pub(crate) fn predict(&self, rows: &[f32]) -> Vec<f32> {
        rows.chunks_exact(self.weights.len())
            .map(|row| {
                let dot: f64 = row
                    .iter()
                    .zip(&self.weights)
                    .map(|(&x, w)| f64::from(x) * w)
                    .sum();
                (dot + self.intercept) as f32
            })
            .collect()
    }
}

/// Solves `a x = b` for a symmetric positive definite `a` (`n` x `n`, row-major) by Cholesky.
/// A pivot that is not positive (a singular system, impossible with `alpha > 0`) is treated as
/// a tiny positive number, so the solve always returns finite values.
fn solve_spd(mut a: Vec<f64>, mut b: Vec<f64>, n: usize) -> Vec<f64> {
    // 1. Factor a = L L^T in place (lower triangle).
    for j in 0..n {
        let mut d = a[j * n + j];
        for k in 0..j {
            d -= a[j * n + k] * a[j * n + k];
        }
        let d = d.max(1e-12).sqrt();
        a[j * n + j] = d;
        for i in j + 1..n {
            let mut s = a[i * n + j];
            for k in 0..j {
                s -= a[i * n + k] * a[j * n + k];
            }
            a[i * n + j] = s / d;
        }
    }
    // 2. Forward substitution L z = b, then back substitution L^T x = z.
    for i in 0..n {
        let s: f64 = (0..i).map(|k| a[i * n + k] * b[k]).sum();
        b[i] = (b[i] - s) / a[i * n + i];
    }
    for i in (0..n).rev() {
        let s: f64 = (i + 1..n).map(|k| a[k * n + i] * b[k]).sum();
        b[i] = (b[i] - s) / a[i * n + i];
    }
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recovers_an_exact_linear_relation() {
        // y = 2 x0 - 3 x1 + 5 on four points; with a negligible alpha the fit is exact.
        let rows = [0.0, 0.0, 1.0, 0.0, 0.0, 1.0, 1.0, 1.0];
        let targets = [5.0, 7.0, 2.0, 4.0];
        let model = Ridge::fit(&rows, 2, &targets, 1e-9);
        let predictions = model.predict(&rows);
        for (p, t) in predictions.iter().zip(targets) {
            assert!((p - t).abs() < 1e-4, "{p} vs {t}");
        }
    }
}
