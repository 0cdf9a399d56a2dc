//! The PoP's Prometheus metrics, served at `/metrics` in the text exposition format.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// A policy decision's labels.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DecisionLabels {
    /// `allow` or `deny`.
    pub result: String,
    /// The rule that decided.
    pub rule: String,
}

/// A rejection's label.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    /// The fold's reject reason.
    pub reason: String,
}

/// A relayed route's label.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    /// The route template.
    pub route: String,
}

/// Every metric the PoP exports.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Open QUIC connections from stores, sampled at each scrape.
    pub connections: Gauge,
    /// Requests served, by route template.
    pub requests: Family<RouteLabels, Counter>,
    /// Policy decisions by result and rule.
    pub decisions: Family<DecisionLabels, Counter>,
    /// Updates folded into a partial sum.
    pub updates_folded: Counter,
    /// Updates refused, by reason.
    pub updates_rejected: Family<ReasonLabels, Counter>,
    /// Bytes received from stores (uploads and relayed bodies).
    pub bytes_in: Counter,
    /// Bytes sent (relayed and cached answers to stores, partial sums to core).
    pub bytes_out: Counter,
    /// Partial sums core acknowledged.
    pub partial_sums_forwarded: Counter,
    /// Payload bytes decoded and folded.
    pub fold_bytes: Counter,
    /// Time spent decoding and folding, in microseconds (fold throughput is
    /// `rate(fold_bytes) / rate(fold_micros) * 1e6`).
    pub fold_micros: Counter,
    /// The last upload's fold throughput, bytes per second.
    pub fold_throughput: Gauge<f64, AtomicU64>,
    /// 1 while the PoP asks for its anycast route to be withdrawn.
    pub withdrawn: Gauge,
}

impl Metrics {
    /// Registers every metric under the `fedmesh_pop` prefix.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("fedmesh_pop");
        let metrics = Self {
            connections: Gauge::default(),
            requests: Family::default(),
            decisions: Family::default(),
            updates_folded: Counter::default(),
            updates_rejected: Family::default(),
            bytes_in: Counter::default(),
            bytes_out: Counter::default(),
            partial_sums_forwarded: Counter::default(),
            fold_bytes: Counter::default(),
            fold_micros: Counter::default(),
            fold_throughput: Gauge::default(),
            withdrawn: Gauge::default(),
            registry: Registry::default(),
        };
        registry.register(
            "connections",
            "Open QUIC connections",
            metrics.connections.clone(),
        );
        registry.register("requests", "Requests served", metrics.requests.clone());
        registry.register(
            "policy_decisions",
            "Policy decisions by result and rule",
            metrics.decisions.clone(),
        );
        registry.register(
            "updates_folded",
            "Updates folded into a partial sum",
            metrics.updates_folded.clone(),
        );
        registry.register(
            "updates_rejected",
            "Updates refused, by reason",
            metrics.updates_rejected.clone(),
        );
        registry.register("bytes_in", "Bytes received", metrics.bytes_in.clone());
        registry.register("bytes_out", "Bytes sent", metrics.bytes_out.clone());
        registry.register(
            "partial_sums_forwarded",
            "Partial sums acknowledged by core",
            metrics.partial_sums_forwarded.clone(),
        );
        registry.register(
            "fold_bytes",
            "Payload bytes decoded and folded",
            metrics.fold_bytes.clone(),
        );
        registry.register(
            "fold_micros",
            "Microseconds spent decoding and folding",
            metrics.fold_micros.clone(),
        );
        registry.register(
            "fold_throughput_bytes_per_second",
            "Fold throughput of the last upload",
            metrics.fold_throughput.clone(),
        );
        registry.register(
            "withdrawn",
            "1 while the PoP asks for its anycast route to be withdrawn",
            metrics.withdrawn.clone(),
        );
        Self {
            registry,
            ..metrics
        }
    }

    /// Counts a policy decision.
    pub fn decision(&self, allow: bool, rule: &str) {
        let result = if allow { "allow" } else { "deny" };
        self.decisions
            .get_or_create(&DecisionLabels {
                result: result.into(),
                rule: rule.into(),
            })
            .inc();
    }

    /// Counts a refused update.
    pub fn rejected(&self, reason: &str) {
        self.updates_rejected
            .get_or_create(&ReasonLabels {
                reason: reason.into(),
            })
            .inc();
    }

    /// Counts a request on `route`.
    pub fn request(&self, route: &str) {
        self.requests
            .get_or_create(&RouteLabels {
                route: route.into(),
            })
            .inc();
    }

    /// The text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    /// Reads a counter family's value for `reason` (tests and status pages).
    pub fn rejected_count(&self, reason: &str) -> u64 {
        self.updates_rejected
            .get_or_create(&ReasonLabels {
                reason: reason.into(),
            })
            .get()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
