//! The neighbour graph of a round: who shares secrets and pairwise masks with whom.
//!
//! SecAgg+ (Bell et al., CCS 2020) replaces the complete graph of the original protocol by a
//! sparse random one so that each store's work grows with log n, not n. Fedmesh places the
//! cohort on a ring in an order drawn from the round seed and joins each store to the
//! `degree / 2` nearest stores on either side (a Harary graph under a random permutation):
//! every store has exactly `degree` neighbours, the relation is symmetric, and every tier
//! computes the same graph from the plan alone.

use rand_chacha::ChaCha20Rng;
use rand_core::{RngCore, SeedableRng};
use sha2::{Digest, Sha256};

/// A symmetric neighbour relation over cohort positions (indices into the sorted cohort).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NeighbourGraph {
    neighbours: Vec<Vec<u32>>,
}

impl NeighbourGraph {
    /// Builds the graph for `n` stores, each with `min(degree, n - 1)` neighbours.
    ///
    /// A `degree` below `n - 1` must be even (the plan checks this); an odd one is rounded
    /// down so that the ring construction stays symmetric.
    pub fn new(seed: &[u8; 32], n: usize, degree: usize) -> Self {
        if degree + 1 >= n {
            let neighbours = (0..n)
                .map(|i| (0..n as u32).filter(|&j| j as usize != i).collect())
                .collect();
            return Self { neighbours };
        }

        // 1. A uniformly random ring order, by Fisher-Yates from the round seed.
        let mut rng = seeded_rng(seed, b"neighbour graph");
        let mut order: Vec<u32> = (0..n as u32).collect();
        for i in (1..n).rev() {
            let j = below(&mut rng, i as u64 + 1) as usize;
            order.swap(i, j);
        }

        // 2. Join each position to the half-degree nearest positions on each side.
        let half = degree / 2;
        let mut neighbours = vec![Vec::with_capacity(2 * half); n];
        for p in 0..n {
            for step in 1..=half {
                let q = (p + step) % n;
                neighbours[order[p] as usize].push(order[q]);
                neighbours[order[q] as usize].push(order[p]);
            }
        }
        for list in neighbours.iter_mut() {
            list.sort_unstable();
        }
        Self { neighbours }
    }

    /// The neighbours of the store at cohort position `i`, in ascending order.
    pub fn neighbours(&self, i: usize) -> &[u32] {
        self.neighbours.get(i).map_or(&[], Vec::as_slice)
    }

    /// Whether the stores at positions `i` and `j` are neighbours.
    pub fn are_neighbours(&self, i: usize, j: usize) -> bool {
        self.neighbours(i).binary_search(&(j as u32)).is_ok()
    }

    /// Number of stores in the graph.
    pub fn len(&self) -> usize {
        self.neighbours.len()
    }

    /// Whether the graph has no stores.
    pub fn is_empty(&self) -> bool {
        self.neighbours.is_empty()
    }
}

/// A ChaCha20 generator for one purpose, keyed by SHA-256 of a label and the round seed so
/// that the graph, the coordinate choice and anything else drawn from the seed never share a
/// stream.
pub(crate) fn seeded_rng(seed: &[u8; 32], label: &[u8]) -> ChaCha20Rng {
    let mut h = Sha256::new();
    h.update(b"fedmesh secagg seed v1\0");
    h.update(label);
    h.update([0]);
    h.update(seed);
    ChaCha20Rng::from_seed(h.finalize().into())
}

/// A uniform integer in `0..bound` (bound > 0), by rejection so that there is no modulo bias.
pub(crate) fn below<R: RngCore>(rng: &mut R, bound: u64) -> u64 {
    let zone = u64::MAX - (u64::MAX % bound);
    loop {
        let v = rng.next_u64();
        if v < zone {
            return v % bound;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        #[test]
        fn graph_is_symmetric_and_regular(
            n in 2usize..300,
            half in 1usize..12,
            seed in any::<[u8; 32]>(),
        ) {
            let degree = 2 * half;
            let g = NeighbourGraph::new(&seed, n, degree);
            let expected = degree.min(n - 1);
            for i in 0..n {
                prop_assert_eq!(g.neighbours(i).len(), expected);
                prop_assert!(!g.are_neighbours(i, i));
                for &j in g.neighbours(i) {
                    prop_assert!(g.are_neighbours(j as usize, i));
                }
            }
            prop_assert_eq!(g, NeighbourGraph::new(&seed, n, degree));
        }
    }
}
