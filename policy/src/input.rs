//! The input document every PoP decision is made on.
//!
//! The PoP builds it from what it has authenticated and what core told it, never from what
//! a store claims about itself:
//!
//! | field | JSON type | source |
//! | --- | --- | --- |
//! | `spiffe_id` | string | URI SAN of the store's verified client certificate, normalised (`spiffe://<trust-domain>/store/<region>/<store-id>`) |
//! | `trust_domain` | string | the trust domain part of `spiffe_id` |
//! | `runtime_version` | string | the store-agent runtime version the store reports at connect (a semantic version) |
//! | `epsilon_remaining` | number | the store's remaining privacy budget from core's ledger for the plan's model |
//! | `region` | string | the store's region (the selection group) |
//! | `round` | number or null | the round the request belongs to, null outside a round |
//! | `route` | string | the route template the request matched, e.g. `/v1/rounds/{round}/update` |
//! | `method` | string | the HTTP method, upper case |
//!
//! No certificate bytes and no update contents ever enter the document, so a decision log
//! line that copies the input is safe to keep.

use fedmesh_protocol::ids::{Region, RoundId};
use serde::{Deserialize, Serialize};

/// The input document of a policy decision (see the module docs for each field's source).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PolicyInput {
    /// The authenticated, normalised SPIFFE ID of the caller.
    pub spiffe_id: String,
    /// The trust domain of `spiffe_id`.
    pub trust_domain: String,
    /// The caller's runtime version, a semantic version such as `1.10.0`.
    pub runtime_version: String,
    /// Remaining epsilon according to core's ledger.
    pub epsilon_remaining: f64,
    /// The store's region.
    pub region: Region,
    /// The round the request belongs to, if any.
    pub round: Option<RoundId>,
    /// The matched route template.
    pub route: String,
    /// The HTTP method, upper case.
    pub method: String,
}
