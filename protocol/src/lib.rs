//! Fedmesh's protocol: everything the three tiers must agree on, with no I/O.
//!
//! This crate holds the wire messages, the update pipeline (flattening, clipping, noise)
//! and its codecs, the secure-aggregation maths, the differential-privacy accountant and
//! the round state machines. It opens no sockets, spawns no tasks and reads no clock: the
//! services (`store-agent`, `pop-proxy`, `core-agg`) and the lab drive it by calling its
//! `handle_*`/`poll_*` methods with the current time and the bytes they received, and send
//! what it returns. Bytes that came from the network are attacker input here: every
//! decoder returns an error for malformed input and never panics.

pub mod accountant;
pub mod codec;
pub mod ids;
pub mod moments;
pub mod params;
pub mod secagg;
pub mod update;
pub mod wire;
