//! Fedmesh transport: every hop (store to PoP, PoP to core) runs over this crate.
//!
//! What it does:
//! - HTTP/3 over QUIC (quinn + h3) with mutual TLS 1.3, and an HTTP/2-over-TLS-on-TCP fallback
//!   for networks that drop UDP. Both serve the same [`Router`] and the same [`Client`] API.
//! - Identities are X.509 SVIDs: each side presents one and checks the other's SPIFFE ID
//!   against the trust bundle ([`identity`]). Handlers see the caller as a normalised
//!   [`PeerIdentity`]. SVID files are re-read when they change ([`FileSvidSource`]).
//! - Large bodies move as content-addressed, resumable chunked transfers ([`transfer`]).
//! - Retries use capped exponential backoff with full jitter ([`RetryPolicy`]); keepalives
//!   keep idle connections open and detect dead peers ([`KeepAlive`]).
//! - A development PKI for labs and tests ([`pki`]).
//!
//! What it does not do: decide what a caller may do. Handlers receive the authenticated
//! identity and apply policy themselves.

pub mod body;
pub mod client;
pub mod identity;
pub mod pki;
pub mod retry;
pub mod server;
pub mod transfer;

mod tls;
mod verify;

pub use body::{Protocol, RecvBody, SendBody};
pub use client::{Client, ClientConfig, ClientError, ClientResponse};
pub use identity::{
    FileSvidSource, IdentityError, PeerIdentity, PeerPolicy, Svid, SvidPaths, SvidSource,
    TrustBundle,
};
pub use retry::{KeepAlive, RetryPolicy};
pub use server::{Request, Response, Router, Server, ServerConfig, ServerError};
pub use spiffe::{SpiffeId, TrustDomain};
