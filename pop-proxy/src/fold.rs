//! Secure-mode pre-aggregation: masked updates folded into one running sum per round while
//! they stream in.
//!
//! # Order of calls
//!
//! 1. [`RoundAccumulator::open`] (or [`RoundAccumulator::recover`] after a restart) when
//!    the plan arrives.
//! 2. Per upload: [`RoundAccumulator::begin`] with the store's authenticated identity
//!    (from the transport's peer certificate), the update's header and the policy
//!    decision for that identity; [`UpdateFold::push`] for each chunk as it arrives;
//!    [`RoundAccumulator::commit`] at the end of the stream, or
//!    [`RoundAccumulator::abort`] when the stream fails.
//! 3. [`RoundAccumulator::checkpoint`] before acknowledging stores: it makes the sum
//!    durable and returns the stores that may now be acknowledged. Calling it once per
//!    batch of commits bounds the disk traffic.
//! 4. [`RoundAccumulator::poll_close`] with the current time; it yields the
//!    [`PartialSum`] once every expected store has reported or the deadline has passed.
//!
//! # Memory
//!
//! Each upload decodes into a scratch vector of its own and touches the round's sum only in
//! `commit`, after every check has passed, so a rejected or broken stream never reaches the
//! sum. Memory is the sum plus one scratch vector per upload in flight, whatever the number
//! of stores: the driver bounds uploads in flight. Scratch vectors are reused.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Instant;

use fedmesh_policy::Decision;
use fedmesh_protocol::ids::{ModelVersion, RoundId, StoreId};
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::durable::{SavedView, StateDir, StateError};
use crate::ring::{PayloadError, Ring, Unpacker};

/// Scratch vectors kept for reuse beyond those in flight.
const SCRATCH_POOL: usize = 4;

/// What the plan fixes for one round at this PoP.
#[derive(Debug, Clone)]
pub struct RoundSpec {
    /// The round.
    pub round: RoundId,
    /// The model version the cohort trains from.
    pub model_version: ModelVersion,
    /// The secure-aggregation ring.
    pub ring: Ring,
    /// Elements per masked update.
    pub len: usize,
    /// The stores of the cohort expected at this PoP.
    pub expected: BTreeSet<StoreId>,
    /// When the PoP stops waiting and forwards what it has.
    pub deadline: Instant,
}

/// What an upload declares before its bytes: the binding of the update to its round.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpdateHeader {
    /// The store the update claims to come from. Client-supplied: it must equal the
    /// authenticated store (from its SVID) passed alongside, or the update is refused.
    pub store: StoreId,
    /// The round the update was made for.
    pub round: RoundId,
    /// The model version it was trained from.
    pub model_version: ModelVersion,
    /// The ring width it was masked in.
    pub ring_bits: u32,
    /// Its element count.
    pub len: usize,
}

/// Why an update was refused. A refused update never touches the sum.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum Rejection {
    /// The policy denied the store.
    #[error("policy denied the store (rule {rule})")]
    PolicyDenied {
        /// The rule that denied.
        rule: String,
    },
    /// The header names another store than the authenticated peer.
    #[error("store {authenticated} sent an update claiming to be from store {claimed}")]
    IdentityMismatch {
        /// The store the transport authenticated (its SPIFFE ID).
        authenticated: StoreId,
        /// The store the header names.
        claimed: StoreId,
    },
    /// The update is for an earlier round.
    #[error("update is for round {got}, an earlier round than the open {open}")]
    StaleRound {
        /// The update's round.
        got: RoundId,
        /// The open round.
        open: RoundId,
    },
    /// The update is for a round this PoP has not opened.
    #[error("update is for round {got}, which is not open here (open: {open})")]
    UnknownRound {
        /// The update's round.
        got: RoundId,
        /// The open round.
        open: RoundId,
    },
    /// The update was trained from another model version.
    #[error("update is for model {got}, the round trains {expected}")]
    WrongModelVersion {
        /// The update's version.
        got: ModelVersion,
        /// The plan's version.
        expected: ModelVersion,
    },
    /// The element count differs from the plan's.
    #[error("update has {got} elements, the plan has {expected}")]
    WrongShape {
        /// The update's count.
        got: usize,
        /// The plan's count.
        expected: usize,
    },
    /// The ring width differs from the plan's.
    #[error("update is masked in a {got}-bit ring, the plan's is {expected}-bit")]
    WrongRing {
        /// The update's width.
        got: u32,
        /// The plan's width.
        expected: u32,
    },
    /// The store's update is already in the sum.
    #[error("store {0} already contributed to this round")]
    Duplicate(StoreId),
    /// The store is not in the cohort expected here.
    #[error("store {0} is not in the round's cohort at this PoP")]
    NotInCohort(StoreId),
    /// The round has closed.
    #[error("round {0} is closed")]
    RoundClosed(RoundId),
    /// The bytes are not a well-formed packed vector.
    #[error("malformed payload: {0}")]
    Malformed(#[from] PayloadError),
    /// A trusted-pop plain update is not finite `f32`s of the right length.
    #[error("malformed plain update: {0}")]
    MalformedPlain(#[from] crate::robust::DecodeError),
    /// The stream broke before its end (connection lost, timeout).
    #[error("upload interrupted: {0}")]
    Interrupted(String),
}

/// The kind of a [`Rejection`], for counting and metrics labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RejectReason {
    /// [`Rejection::PolicyDenied`].
    PolicyDenied,
    /// [`Rejection::IdentityMismatch`].
    IdentityMismatch,
    /// [`Rejection::StaleRound`].
    StaleRound,
    /// [`Rejection::UnknownRound`].
    UnknownRound,
    /// [`Rejection::WrongModelVersion`].
    WrongModelVersion,
    /// [`Rejection::WrongShape`].
    WrongShape,
    /// [`Rejection::WrongRing`].
    WrongRing,
    /// [`Rejection::Duplicate`].
    Duplicate,
    /// [`Rejection::NotInCohort`].
    NotInCohort,
    /// [`Rejection::RoundClosed`].
    RoundClosed,
    /// [`Rejection::Malformed`].
    Malformed,
    /// [`Rejection::Interrupted`].
    Interrupted,
}

impl RejectReason {
    /// The metrics label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::PolicyDenied => "policy_denied",
            Self::IdentityMismatch => "identity_mismatch",
            Self::StaleRound => "stale_round",
            Self::UnknownRound => "unknown_round",
            Self::WrongModelVersion => "wrong_model_version",
            Self::WrongShape => "wrong_shape",
            Self::WrongRing => "wrong_ring",
            Self::Duplicate => "duplicate",
            Self::NotInCohort => "not_in_cohort",
            Self::RoundClosed => "round_closed",
            Self::Malformed => "malformed",
            Self::Interrupted => "interrupted",
        }
    }
}

impl Rejection {
    /// The kind of this rejection.
    pub fn reason(&self) -> RejectReason {
        match self {
            Self::PolicyDenied { .. } => RejectReason::PolicyDenied,
            Self::IdentityMismatch { .. } => RejectReason::IdentityMismatch,
            Self::StaleRound { .. } => RejectReason::StaleRound,
            Self::UnknownRound { .. } => RejectReason::UnknownRound,
            Self::WrongModelVersion { .. } => RejectReason::WrongModelVersion,
            Self::WrongShape { .. } => RejectReason::WrongShape,
            Self::WrongRing { .. } => RejectReason::WrongRing,
            Self::Duplicate(_) => RejectReason::Duplicate,
            Self::NotInCohort(_) => RejectReason::NotInCohort,
            Self::RoundClosed(_) => RejectReason::RoundClosed,
            Self::Malformed(_) | Self::MalformedPlain(_) => RejectReason::Malformed,
            Self::Interrupted(_) => RejectReason::Interrupted,
        }
    }
}

/// One upload being decoded. Obtained from [`RoundAccumulator::begin`].
#[derive(Debug)]
pub struct UpdateFold {
    store: StoreId,
    scratch: Vec<u64>,
    unpacker: Unpacker,
}

impl UpdateFold {
    /// The store uploading.
    pub fn store(&self) -> &StoreId {
        &self.store
    }

    /// Payload bytes received so far.
    pub fn bytes_in(&self) -> usize {
        self.unpacker.bytes_in()
    }

    /// Decodes the next chunk of the payload.
    ///
    /// # Errors
    /// [`Rejection::Malformed`] when the payload runs past its length; pass the rejection
    /// to [`RoundAccumulator::abort`].
    pub fn push(&mut self, chunk: &[u8]) -> Result<(), Rejection> {
        Ok(self.unpacker.push(chunk, &mut self.scratch)?)
    }
}

/// A round's sum, ready for core.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartialSum {
    /// The round.
    pub round: RoundId,
    /// The model version.
    pub model_version: ModelVersion,
    /// The ring.
    pub ring: Ring,
    /// The sum of the contributors' masked updates modulo 2^r.
    pub values: Vec<u64>,
    /// Whose updates are in the sum, sorted.
    pub contributors: Vec<StoreId>,
}

/// The running sum of one round at one PoP.
#[derive(Debug)]
pub struct RoundAccumulator {
    spec: RoundSpec,
    sum: Vec<u64>,
    contributors: BTreeSet<StoreId>,
    durable: BTreeSet<StoreId>,
    pool: Vec<Vec<u64>>,
    rejected: BTreeMap<RejectReason, u64>,
    folded_bytes: u64,
    closed: bool,
}

impl RoundAccumulator {
    /// An empty sum for `spec`.
    pub fn open(spec: RoundSpec) -> Self {
        Self {
            sum: vec![0; spec.len],
            spec,
            contributors: BTreeSet::new(),
            durable: BTreeSet::new(),
            pool: Vec::new(),
            rejected: BTreeMap::new(),
            folded_bytes: 0,
            closed: false,
        }
    }

    /// Reopens `spec`'s round from its last checkpoint in `dir`, or empty if it has none.
    /// Stores whose updates were folded after that checkpoint were never acknowledged and
    /// re-send them.
    ///
    /// # Errors
    /// [`StateError`] when the saved state is unreadable, corrupt or for another plan.
    pub fn recover(spec: RoundSpec, dir: &StateDir) -> Result<Self, StateError> {
        let mut round = Self::open(spec);
        let Some(saved) = dir.load(round.spec.round)? else {
            return Ok(round);
        };
        saved.check_plan(round.spec.model_version, round.spec.ring, round.spec.len)?;
        round.sum = saved.values;
        round.contributors = saved.contributors.into_iter().collect();
        round.durable = round.contributors.clone();
        tracing::info!(
            round.id = round.spec.round.0,
            contributors = round.contributors.len(),
            "partial sum recovered"
        );
        Ok(round)
    }

    /// The plan of this round.
    pub fn spec(&self) -> &RoundSpec {
        &self.spec
    }

    /// Stores whose updates are in the sum.
    pub fn contributors(&self) -> &BTreeSet<StoreId> {
        &self.contributors
    }

    /// Rejections so far, by reason.
    pub fn rejections(&self) -> &BTreeMap<RejectReason, u64> {
        &self.rejected
    }

    /// Payload bytes of committed updates.
    pub fn folded_bytes(&self) -> u64 {
        self.folded_bytes
    }

    /// Checks an upload's header and the policy decision for `peer`, the store the
    /// transport authenticated, and starts decoding it. The update is credited to `peer`.
    ///
    /// # Errors
    /// The [`Rejection`], already counted; [`Rejection::IdentityMismatch`] when the header
    /// names another store than `peer`.
    pub fn begin(
        &mut self,
        peer: &StoreId,
        header: &UpdateHeader,
        decision: &Decision,
    ) -> Result<UpdateFold, Rejection> {
        let checked = check_header(
            &self.spec,
            Some(self.spec.ring),
            &self.contributors,
            self.closed,
            peer,
            header,
            decision,
        );
        let unpacker = checked
            .and_then(|()| {
                Unpacker::new(self.spec.ring, self.spec.len).ok_or(Rejection::WrongShape {
                    got: header.len,
                    expected: self.spec.len,
                })
            })
            .map_err(|rejection| self.count(rejection))?;

        // Every lane is written by the decoder before commit reads it, so a reused
        // scratch vector needs no clearing.
        let scratch = self.pool.pop().unwrap_or_else(|| vec![0; self.spec.len]);
        Ok(UpdateFold {
            store: peer.clone(),
            scratch,
            unpacker,
        })
    }

    fn count(&mut self, rejection: Rejection) -> Rejection {
        *self.rejected.entry(rejection.reason()).or_default() += 1;
        tracing::debug!(
            round.id = self.spec.round.0,
            reason = rejection.reason().as_str(),
            "update rejected"
        );
        rejection
    }

    fn recycle(&mut self, scratch: Vec<u64>) {
        if self.pool.len() < SCRATCH_POOL {
            self.pool.push(scratch);
        }
    }

    /// Adds a fully received update to the sum. Not yet durable: see
    /// [`RoundAccumulator::checkpoint`].
    ///
    /// # Errors
    /// [`Rejection::Malformed`] for a short or badly padded stream,
    /// [`Rejection::Duplicate`] if the store's other upload committed first,
    /// [`Rejection::RoundClosed`] if the round closed meanwhile; the sum is unchanged.
    pub fn commit(&mut self, fold: UpdateFold) -> Result<(), Rejection> {
        let UpdateFold {
            store,
            scratch,
            unpacker,
        } = fold;
        let verdict = if self.closed {
            Err(Rejection::RoundClosed(self.spec.round))
        } else if self.contributors.contains(&store) {
            Err(Rejection::Duplicate(store.clone()))
        } else {
            unpacker.finish().map_err(Rejection::from)
        };
        if let Err(rejection) = verdict {
            self.recycle(scratch);
            return Err(self.count(rejection));
        }

        let mask = self.spec.ring.mask();
        for (acc, v) in self.sum.iter_mut().zip(&scratch[..]) {
            *acc = acc.wrapping_add(*v) & mask;
        }
        self.folded_bytes += unpacker.bytes_in() as u64;
        self.contributors.insert(store);
        self.recycle(scratch);
        Ok(())
    }

    /// Drops an upload that failed, counting why.
    pub fn abort(&mut self, fold: UpdateFold, rejection: Rejection) {
        self.count(rejection);
        self.recycle(fold.scratch);
    }

    /// Saves the sum and its contributors to `dir` (atomically, synced) and returns the
    /// stores folded since the last checkpoint: they may be acknowledged now.
    ///
    /// # Errors
    /// [`StateError`] from the disk; nothing may be acknowledged then.
    pub fn checkpoint(&mut self, dir: &StateDir) -> Result<Vec<StoreId>, StateError> {
        let fresh: Vec<StoreId> = self
            .contributors
            .difference(&self.durable)
            .cloned()
            .collect();
        if fresh.is_empty() || self.closed {
            return Ok(Vec::new());
        }
        let contributors: Vec<StoreId> = self.contributors.iter().cloned().collect();
        dir.save(SavedView {
            round: self.spec.round,
            model_version: self.spec.model_version,
            ring: self.spec.ring,
            contributors: &contributors,
            values: &self.sum,
        })?;
        self.durable.extend(fresh.iter().cloned());
        Ok(fresh)
    }

    /// Closes the round and yields its partial sum once every expected store has reported
    /// or `now` is past the deadline; `None` before that and after it closed.
    ///
    /// Only durable contributions are in the yielded sum's guarantee: call
    /// [`RoundAccumulator::checkpoint`] first.
    pub fn poll_close(&mut self, now: Instant) -> Option<PartialSum> {
        if self.closed {
            return None;
        }
        let everyone = self.spec.expected.is_subset(&self.contributors);
        if !everyone && now < self.spec.deadline {
            return None;
        }
        self.closed = true;
        self.pool.clear();
        tracing::info!(
            round.id = self.spec.round.0,
            contributors = self.contributors.len(),
            expected = self.spec.expected.len(),
            "partial sum closed"
        );
        Some(PartialSum {
            round: self.spec.round,
            model_version: self.spec.model_version,
            ring: self.spec.ring,
            values: std::mem::take(&mut self.sum),
            contributors: self.contributors.iter().cloned().collect(),
        })
    }
}

/// The checks every update passes before its payload is read, in both modes: policy, the
/// header's store against the authenticated `peer`, round binding, shape (and ring, when
/// `ring` is given), cohort membership and one update per store.
pub(crate) fn check_header(
    spec: &RoundSpec,
    ring: Option<Ring>,
    contributors: &BTreeSet<StoreId>,
    closed: bool,
    peer: &StoreId,
    header: &UpdateHeader,
    decision: &Decision,
) -> Result<(), Rejection> {
    // 1. Policy first: a denied store learns nothing else about the round.
    if !decision.allow {
        return Err(Rejection::PolicyDenied {
            rule: decision.rule.clone(),
        });
    }

    // 2. Identity binding: the decision was made for `peer`, so a header naming another
    // store would be credited to a store whose policy was never checked, and would turn
    // that store's own upload into a duplicate.
    if header.store != *peer {
        return Err(Rejection::IdentityMismatch {
            authenticated: peer.clone(),
            claimed: header.store.clone(),
        });
    }

    // 3. Round binding.
    let open = spec.round;
    if header.round < open {
        return Err(Rejection::StaleRound {
            got: header.round,
            open,
        });
    }
    if header.round != open {
        return Err(Rejection::UnknownRound {
            got: header.round,
            open,
        });
    }
    if closed {
        return Err(Rejection::RoundClosed(open));
    }
    if header.model_version != spec.model_version {
        return Err(Rejection::WrongModelVersion {
            got: header.model_version,
            expected: spec.model_version,
        });
    }

    // 4. Shape and ring.
    if let Some(ring) = ring.filter(|r| r.bits() != header.ring_bits) {
        return Err(Rejection::WrongRing {
            got: header.ring_bits,
            expected: ring.bits(),
        });
    }
    if header.len != spec.len {
        return Err(Rejection::WrongShape {
            got: header.len,
            expected: spec.len,
        });
    }

    // 5. Membership and one update per store.
    if !spec.expected.contains(&header.store) {
        return Err(Rejection::NotInCohort(header.store.clone()));
    }
    if contributors.contains(&header.store) {
        return Err(Rejection::Duplicate(header.store.clone()));
    }
    Ok(())
}
