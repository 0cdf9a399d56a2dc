//! The PoP as a running service: the store-facing API, the link to core, health, drain
//! and metrics, around the network-free [`crate::fold`] and [`crate::durable`].

pub mod config;

pub use config::{Config, ConfigError};
