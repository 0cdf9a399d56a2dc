//! `core-agg serve`: the core aggregator as a running service.

pub mod config;
