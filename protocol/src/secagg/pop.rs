//! The PoP's fold: masked updates summed modulo 2^r as they arrive, in memory that grows
//! with the vector, not with the number of stores (plus the list of contributors that core
//! needs to learn who dropped).
//!
//! A PoP cannot read what it sums: each masked update is uniform in the ring on its own.
//! Core folds the PoPs' partial sums with the same [`RingSum`].

use std::collections::BTreeSet;

use thiserror::Error;

use super::messages::{MaskedUpdate, PackedVector, PartialSum, VectorError};
use super::plan::SecAggPlan;
use super::prg::ring_mask;
use crate::ids::{RoundId, StoreId};

/// Why a masked update or partial sum was refused; a refused vector never touches the sum.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum FoldError {
    /// The vector belongs to another round.
    #[error("vector is for round {got}, the sum is for round {expected}")]
    WrongRound {
        /// The sum's round.
        expected: RoundId,
        /// The vector's round.
        got: RoundId,
    },
    /// The contributor is not in the cohort.
    #[error("store {0} is not in the round's cohort")]
    NotInCohort(StoreId),
    /// The contributor is already in the sum (a duplicate or replay).
    #[error("store {0} is already in the sum")]
    Duplicate(StoreId),
    /// A partial sum with no contributors.
    #[error("partial sum names no contributors")]
    Empty,
    /// The vector does not fit the plan.
    #[error(transparent)]
    Vector(#[from] VectorError),
}

/// A running sum of ring vectors with the set of stores in it.
#[derive(Debug, Clone)]
pub struct RingSum {
    round: RoundId,
    ring_bits: u32,
    sum: Vec<u64>,
    contributors: BTreeSet<StoreId>,
}

impl RingSum {
    /// An empty sum for the plan's round and vector shape.
    pub fn new(plan: &SecAggPlan) -> Self {
        Self {
            round: plan.round(),
            ring_bits: plan.ring_bits(),
            sum: vec![0; plan.vector_len()],
            contributors: BTreeSet::new(),
        }
    }

    /// Adds a vector contributed by `stores`, after checking all of it: round, membership,
    /// duplicates, width and length.
    ///
    /// # Errors
    ///
    /// [`FoldError`]; the sum is unchanged on error.
    pub fn fold(
        &mut self,
        plan: &SecAggPlan,
        round: RoundId,
        stores: &[StoreId],
        vector: &PackedVector,
    ) -> Result<(), FoldError> {
        if round != self.round {
            return Err(FoldError::WrongRound {
                expected: self.round,
                got: round,
            });
        }
        if stores.is_empty() {
            return Err(FoldError::Empty);
        }
        let mut incoming = BTreeSet::new();
        for s in stores {
            if plan.position(s).is_none() {
                return Err(FoldError::NotInCohort(s.clone()));
            }
            if self.contributors.contains(s) || !incoming.insert(s) {
                return Err(FoldError::Duplicate(s.clone()));
            }
        }
        let values = vector.unpack(self.ring_bits, self.sum.len())?;

        let mask = ring_mask(self.ring_bits);
        for (acc, v) in self.sum.iter_mut().zip(values) {
            *acc = acc.wrapping_add(v) & mask;
        }
        self.contributors.extend(stores.iter().cloned());
        Ok(())
    }

    /// Stores whose vectors are in the sum.
    pub fn contributors(&self) -> &BTreeSet<StoreId> {
        &self.contributors
    }

    /// The sum so far, each element below 2^r.
    pub fn values(&self) -> &[u64] {
        &self.sum
    }

    /// The sum's storage, for core to remove masks in place.
    pub(crate) fn values_vec_mut(&mut self) -> &mut Vec<u64> {
        &mut self.sum
    }

    /// The sum, consumed.
    pub fn into_values(self) -> Vec<u64> {
        self.sum
    }
}

/// The PoP's partial sum for one round.
#[derive(Debug, Clone)]
pub struct PartialSumBuilder {
    plan: SecAggPlan,
    sum: RingSum,
}

impl PartialSumBuilder {
    /// An empty partial sum for the plan.
    pub fn new(plan: SecAggPlan) -> Self {
        let sum = RingSum::new(&plan);
        Self { plan, sum }
    }

    /// Folds one store's masked update into the partial sum.
    ///
    /// # Errors
    ///
    /// [`FoldError`] for another round, a store outside the cohort, a duplicate or a vector
    /// that does not fit; the partial sum is unchanged.
    pub fn fold(&mut self, update: &MaskedUpdate) -> Result<(), FoldError> {
        let stores = std::slice::from_ref(&update.store);
        self.sum
            .fold(&self.plan, update.round, stores, &update.vector)
    }

    /// How many stores are in the partial sum.
    pub fn len(&self) -> usize {
        self.sum.contributors().len()
    }

    /// Whether no store is in the partial sum yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The partial sum to forward to core, or `None` if no store contributed.
    ///
    /// # Errors
    ///
    /// [`VectorError`] only if the sum could not be packed, which the fold's checks rule out.
    pub fn finish(self) -> Result<Option<PartialSum>, VectorError> {
        if self.is_empty() {
            return Ok(None);
        }
        let round = self.plan.round();
        let ring_bits = self.plan.ring_bits();
        let contributors = self.sum.contributors().iter().cloned().collect();
        let vector = PackedVector::pack(self.sum.values(), ring_bits)?;
        Ok(Some(PartialSum {
            round,
            contributors,
            vector,
        }))
    }
}
