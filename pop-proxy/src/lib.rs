//! Fedmesh's PoP: where store connections end, policy is enforced, and store updates become
//! one partial sum per metro.
//!
//! This library holds the PoP's network-free core:
//! - [`fold`]: secure-mode pre-aggregation, masked updates checked and folded into a
//!   running sum modulo 2^r as they stream in;
//! - [`durable`]: partial sums kept on disk until core acknowledges them;
//! - [`robust`]: trusted-pop mode, robust aggregation of plain updates;
//! - [`ring`]: the ring and the wire layout of masked vectors.
//!
//! - [`service`]: the running PoP (`pop-proxy serve`): the store-facing API over the
//!   transport, the link to core, health, drain and metrics.
//!
//! Policy decisions come from `fedmesh_policy`.

pub mod durable;
pub mod fold;
pub mod ring;
pub mod robust;
pub mod service;

pub use durable::{SavedRound, SavedView, StateDir, StateError};
pub use fold::{
    PartialSum, RejectReason, Rejection, RoundAccumulator, RoundSpec, UpdateFold, UpdateHeader,
};
pub use ring::{PayloadError, Ring, RingError, Unpacker};
pub use robust::{NormFilter, RobustAggregator, RobustError, RobustOutcome, TrustedRound};
