//! `core-agg serve`: the core aggregator as a running service.
//!
//! [`config`] reads `core.toml`; [`core::Core`] drives the round state machine, the
//! secure-aggregation session, the ledger and the registry; [`http`] serves the API of
//! `fedmesh_protocol::wire` over fedmesh-transport and owns the one task that drives the
//! core; [`state`] keeps what survives a restart; [`metrics`] is `/metrics`.

pub mod config;
pub mod core;
pub mod http;
pub mod metrics;
pub mod model;
pub mod state;

pub use self::core::open_backend;
pub use http::{Running, ServeError, start};
