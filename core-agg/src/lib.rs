//! Fedmesh's core aggregator: what turns a round's cohort sum into the next model.
//!
//! It holds the strategies that fold the unmasked sum into the global model, the privacy
//! ledger that charges each store's budget, the pure round state machine that plans,
//! selects, collects and commits, and the signed model registry. The state machine and the
//! maths read no clock and open no socket; the service drives them with the time and the
//! messages it received. The command line (`core-agg`) plans DP budgets and rolls the
//! registry back.

pub mod strategy;
