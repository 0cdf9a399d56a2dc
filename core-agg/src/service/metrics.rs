//! Prometheus metrics of the core service, served at `/metrics` in the text format.
//!
//! Counters start at zero when the process starts (Prometheus handles resets); gauges are
//! set from the durable state, so they are right again after a restart.

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

type Labels = Vec<(String, String)>;

/// The metrics core exports.
pub struct Metrics {
    registry: Registry,
    /// Survivors of the last ended round, by region.
    pub participants: Family<Labels, Gauge>,
    /// Survivors over all rounds, by region.
    pub participants_total: Family<Labels, Counter>,
    /// Selected stores that did not make it into the last ended round.
    pub dropouts: Gauge,
    /// Dropouts over all rounds.
    pub dropouts_total: Counter,
    /// Wall time from plan to end, per round.
    pub round_duration: Histogram,
    /// Partial-sum bytes received.
    pub bytes_in: Counter,
    /// Epsilon spent per store (record or store unit, whichever is larger).
    pub epsilon: Family<Labels, Gauge<f64, AtomicU64>>,
    /// Current registry version of the model.
    pub registry_version: Gauge,
    /// Rejected messages by reason.
    pub rejections: Family<Labels, Counter>,
    /// Ended rounds by outcome (`committed`, `abandoned`).
    pub rounds: Family<Labels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut metrics = Self {
            registry: Registry::with_prefix("fedmesh_core"),
            participants: Family::default(),
            participants_total: Family::default(),
            dropouts: Gauge::default(),
            dropouts_total: Counter::default(),
            round_duration: Histogram::new(exponential_buckets(0.5, 2.0, 14)),
            bytes_in: Counter::default(),
            epsilon: Family::default(),
            registry_version: Gauge::default(),
            rejections: Family::default(),
            rounds: Family::default(),
        };
        let r = &mut metrics.registry;
        r.register(
            "round_participants",
            "Stores in the last ended round's sum, by region",
            metrics.participants.clone(),
        );
        r.register(
            "participants",
            "Stores in a round's sum, by region",
            metrics.participants_total.clone(),
        );
        r.register(
            "round_dropouts",
            "Selected stores missing from the last ended round's sum",
            metrics.dropouts.clone(),
        );
        r.register(
            "dropouts",
            "Selected stores missing from a round's sum",
            metrics.dropouts_total.clone(),
        );
        r.register(
            "round_duration_seconds",
            "Time from plan to end of a round",
            metrics.round_duration.clone(),
        );
        r.register(
            "bytes_in",
            "Partial-sum bytes received from PoPs",
            metrics.bytes_in.clone(),
        );
        r.register(
            "store_epsilon",
            "Epsilon spent by a store in the ledger window",
            metrics.epsilon.clone(),
        );
        r.register(
            "registry_version",
            "Current version of the model in the registry",
            metrics.registry_version.clone(),
        );
        r.register(
            "rejections",
            "Messages rejected, by reason",
            metrics.rejections.clone(),
        );
        r.register("rounds", "Rounds ended, by outcome", metrics.rounds.clone());
        metrics
    }
}

impl Metrics {
    /// The text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }

    /// Counts a rejection.
    pub fn reject(&self, reason: &str) {
        self.rejections
            .get_or_create(&vec![("reason".into(), reason.into())])
            .inc();
    }
}
