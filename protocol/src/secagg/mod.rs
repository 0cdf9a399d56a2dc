//! Secure aggregation: SecAgg+ (Bell et al., CCS 2020) with dropout recovery, quantisation
//! into a small ring, random-k coordinates and distributed discrete Gaussian noise.
//!
//! Three state machines, no I/O, one per tier:
//! - [`StoreSession`] (store): keys, shares, masking, releasing shares;
//! - [`PartialSumBuilder`] (PoP): the fold of masked updates modulo 2^r;
//! - [`CoreSession`] (core): relaying, collecting, unmasking, with deadlines.
//!
//! A round starts from a [`SecAggPlan`], checked when core plans it; the same plan with
//! [`Masking::Plain`] runs the same code without masks (trusted-pop mode and tests). What
//! a PoP sees of one store is uniform in the ring; pairwise masks cancel, and self masks are
//! removed, only in the cohort sum at core.
//!
//! Not covered here: signatures on adverts (the transport's mutual TLS binds each message
//! to a SPIFFE identity), and consistency checks against a core that lies to different
//! stores about who dropped (the threshold t > degree/2 and the per-store refusal to release
//! both share kinds of one peer keep a single store's update hidden from such a core).

mod core;
mod graph;
mod keys;
mod messages;
mod noise;
mod plan;
mod pop;
mod prg;
mod shamir;
mod store;

pub use self::core::{
    CoreError, CorePhase, CoreSession, Deadlines, Outgoing, RoundFailure, RoundOutcome, ToStore,
};
pub use self::graph::NeighbourGraph;
pub use self::messages::{
    EncryptedShare, EncryptedShares, KeyAdvert, MaskedUpdate, NeighbourKeys, PackedVector,
    PartialSum, RevealedShare, SharesForStore, UnmaskRequest, UnmaskResponse, VectorError,
};
pub use self::noise::{DiscreteGaussian, GuaranteedNoise, VARIANCE_DENOMINATOR, sum_distance};
pub use self::plan::{
    MAX_RING_BITS, Masking, PlanConfig, PlanError, QuantisedUpdate, SecAggPlan, UpdateError,
};
pub use self::pop::{FoldError, PartialSumBuilder, RingSum};
pub use self::shamir::{SHARE_LEN, ShamirError, Share, reconstruct, share};
pub use self::store::{StoreError, StorePhase, StoreSession, UnmaskState};
