//! A statistics round's moments: what a store sends, and what core decodes from the sum.

use fedmesh_protocol::ids::{RoundId, StoreId};
use fedmesh_protocol::moments::{MomentsError, StatisticsTask};
use fedmesh_protocol::secagg::{Masking, PlanConfig, SecAggPlan};
use rand_chacha::ChaCha20Rng;
use rand_core::{RngCore, SeedableRng};

fn task(features: u32, max_rows: u64, bound: f64) -> StatisticsTask {
    StatisticsTask {
        features,
        max_rows,
        bound,
    }
}

fn close(a: f64, b: f64, rel: f64) -> bool {
    (a - b).abs() <= rel * b.abs().max(1.0)
}

/// The level scale of a 30-bit plan: 2^29 - 1.
const L: i64 = (1 << 29) - 1;

/// The moments a vector of hi and lo levels carries: (hi + lo / L) / L.
fn moments_of(levels: &[i64]) -> Vec<f64> {
    let d = levels.len() / 2;
    let l = L as f64;
    (0..d)
        .map(|k| (levels[k] as f64 + levels[d + k] as f64 / l) / l)
        .collect()
}

fn add(a: &[i64], b: &[i64]) -> Vec<i64> {
    a.iter().zip(b).map(|(x, y)| x + y).collect()
}

#[test]
fn two_stores_moments_give_the_pooled_means_and_deviations() {
    // Store A rows (x1, x2; y): (1, 10; 2), (3, 10; 4); store B: (5, 40; 6).
    // A's vector at R = 10, B = 100: n 2/10; sums 4, 20, 6 over 1000; squares 10, 200, 20
    // over 100000. Pooled: n 3; x1 mean 3, variance 35/3 - 9 = 8/3; x2 mean 20, variance
    // 1800/3 - 400 = 200; y mean 4, variance 56/3 - 16 = 8/3.
    let t = task(2, 10, 100.0);
    let a = t
        .encode(2, &[1.0, 10.0, 3.0, 10.0], &[2.0, 4.0], L)
        .unwrap();
    let expected = [0.2, 0.004, 0.02, 0.006, 1e-4, 2e-3, 2e-4];
    assert_eq!(a.len(), 2 * t.dimension());
    assert!(a.iter().all(|v| v.abs() <= L), "levels within 30 bits");
    for (got, want) in moments_of(&a).iter().zip(expected) {
        assert!((got - want).abs() < 1e-15, "{got} vs {want}");
    }
    let b = t.encode(2, &[5.0, 40.0], &[6.0], L).unwrap();
    let stats = t.decode(&add(&a, &b), L).unwrap();
    assert!(close(stats.count, 3.0, 1e-12));
    assert!(close(stats.mean[0], 3.0, 1e-12) && close(stats.mean[1], 20.0, 1e-12));
    assert!(close(stats.std[0], (8.0f64 / 3.0).sqrt(), 1e-9));
    assert!(close(stats.std[1], 200f64.sqrt(), 1e-9));
    assert!(close(stats.target_mean, 4.0, 1e-12));
    assert!(close(stats.target_std, (8.0f64 / 3.0).sqrt(), 1e-9));
}

#[test]
fn values_clamp_to_the_bound_and_rows_stop_at_max_rows() {
    // Bound 10: the 500 counts as 10. max_rows 2: the third row is not counted.
    let t = task(1, 2, 10.0);
    let v = t
        .encode(1, &[500.0, -1.0, 7.0], &[1.0, 1.0, 1.0], L)
        .unwrap();
    // n 2/2; sums (10 - 1)/20, 2/20; squares (100 + 1)/200, 2/200.
    let expected = [1.0, 0.45, 0.1, 0.505, 0.01];
    for (got, want) in moments_of(&v).iter().zip(expected) {
        assert!((got - want).abs() < 1e-15, "{got} vs {want}");
    }
}

#[test]
fn bad_rows_tasks_and_sums_are_refused_by_name() {
    let t = task(2, 10, 100.0);
    assert_eq!(
        t.encode(2, &[1.0, f32::NAN], &[0.0], L),
        Err(MomentsError::NotFinite { row: 0, column: 1 })
    );
    assert_eq!(
        t.encode(2, &[1.0, 2.0], &[f32::INFINITY], L),
        Err(MomentsError::NotFinite { row: 0, column: 2 })
    );
    assert_eq!(
        t.encode(3, &[1.0, 2.0, 3.0], &[0.0], L),
        Err(MomentsError::Width {
            expected: 2,
            got: 3
        })
    );
    assert!(matches!(
        t.encode(2, &[1.0, 2.0, 3.0], &[0.0], L),
        Err(MomentsError::Rows { .. })
    ));
    assert_eq!(
        t.decode(&[0; 14], L),
        Err(MomentsError::Count(0.0)),
        "an empty cohort"
    );
    assert_eq!(
        t.decode(&[0; 7], L),
        Err(MomentsError::Length {
            expected: 14,
            got: 7
        })
    );
    for bad in [task(0, 10, 1.0), task(1, 0, 1.0), task(1, 10, f64::NAN)] {
        assert!(
            matches!(bad.validate(), Err(MomentsError::Task(_))),
            "{bad:?}"
        );
    }
}

#[test]
fn summed_in_the_ring_of_a_30_bit_plan_the_statistics_match_the_pooled_ones() {
    // 40 stores of 50-400 rows, 3 features on different scales (one near 10.5 with a
    // deviation of 0.09, where E[x^2] - E[x]^2 cancels four digits), summed in the ring at
    // the 30 bits a statistics round plans, loose bounds (100,000 rows, |x| <= 100); the
    // reference is the plain f64 pooled computation.
    let mut rng = ChaCha20Rng::seed_from_u64(5);
    let t = task(3, 100_000, 100.0);
    let n = 40u32;
    let plan = SecAggPlan::new(PlanConfig {
        round: RoundId(1),
        seed: [1; 32],
        cohort: (0..n).map(|i| StoreId(format!("s{i:02}"))).collect(),
        masking: Masking::Plain,
        degree: 0,
        threshold: 0,
        min_survivors: n,
        dimension: t.levels_len() as u32,
        kept: None,
        quant_bits: 30,
        clip: 1.0,
        guard_bits: 2,
        noise_stddev: 0.0,
    })
    .unwrap();
    let mut ring = vec![0u64; t.levels_len()];
    let (mut count, mut sum, mut sq) = (0.0f64, [0.0f64; 4], [0.0f64; 4]);
    let uniform = |rng: &mut ChaCha20Rng| f64::from(rng.next_u32()) / f64::from(u32::MAX);
    for _ in 0..n {
        let rows = 50 + (rng.next_u32() % 350) as usize;
        let (mut x, mut y) = (Vec::new(), Vec::new());
        for _ in 0..rows {
            let row = [
                10.5 + 0.3 * uniform(&mut rng),
                -1.0 + 2.0 * uniform(&mut rng),
                f64::from(rng.next_u32() % 2),
                9.0 + uniform(&mut rng),
            ];
            for (j, v) in row.iter().enumerate() {
                let v = f64::from(*v as f32);
                sum[j] += v;
                sq[j] += v * v;
            }
            count += 1.0;
            x.extend(row[..3].iter().map(|&v| v as f32));
            y.push(row[3] as f32);
        }
        let encoded = t.encode(3, &x, &y, plan.max_level()).unwrap();
        let q = plan.levels(&encoded, &mut rng).unwrap();
        for (acc, v) in ring.iter_mut().zip(q.values()) {
            *acc = acc.wrapping_add(*v);
        }
    }
    let levels: Vec<i64> = ring.into_iter().map(|v| plan.centred(v)).collect();
    let stats = t.decode(&levels, plan.max_level()).unwrap();
    assert!(
        close(stats.count, count, 1e-12),
        "{} vs {count}",
        stats.count
    );
    for j in 0..4 {
        let mean = sum[j] / count;
        let std = (sq[j] / count - mean * mean).sqrt();
        let (got_mean, got_std) = if j < 3 {
            (stats.mean[j], stats.std[j])
        } else {
            (stats.target_mean, stats.target_std)
        };
        assert!(
            close(got_mean, mean, 1e-9),
            "column {j}: mean {got_mean} vs {mean}"
        );
        assert!(
            (got_std - std).abs() <= 1e-6 * std,
            "column {j}: std {got_std} vs {std}"
        );
    }
}
