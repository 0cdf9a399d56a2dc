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
//!
//! ```no_run
//! use std::path::Path;
//! use fedmesh_transport::server::{Request, Response};
//! use fedmesh_transport::transfer::ObjectStore;
//! use fedmesh_transport::{
//!     Client, ClientConfig, FileSvidSource, PeerPolicy, Router, Server, ServerConfig,
//!     SvidPaths,
//! };
//! use http::{Method, StatusCode};
//!
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! // A PoP: its SVID files, re-read every 5 s; routes see who is calling.
//! let pop = FileSvidSource::load(SvidPaths::in_dir(Path::new("pki/pop/chicago")))?;
//! let _watch = pop.watch(std::time::Duration::from_secs(5));
//! let objects = ObjectStore::open(Path::new("/var/lib/fedmesh/objects"), 8 << 30)?;
//! let router = objects.routes(Router::new().route(Method::GET, "/plan", |r: Request| async move {
//!     Response::text(StatusCode::OK, format!("plan for {}", r.peer().spiffe_id()))
//! }));
//! let server = Server::bind(ServerConfig::new("0.0.0.0:4433".parse()?), pop, router).await?;
//!
//! // A store: accepts any PoP of its trust domain, HTTP/3 or HTTP/2 alike.
//! let store = FileSvidSource::load(SvidPaths::in_dir(Path::new("pki/store/emea/0042")))?;
//! let config = ClientConfig::new(server.quic_addr(), PeerPolicy::PathPrefix("/pop/".into()));
//! let client = Client::new(config, store)?;
//! let plan = client.get("/plan").await?.bytes(1 << 20).await?;
//! let report = client.put_object(Path::new("update.bin")).await?;
//! # let _ = (plan, report);
//! # Ok(())
//! # }
//! ```

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
pub use server::{Request, ResetKey, Response, Router, Server, ServerConfig, ServerError};
pub use spiffe::{SpiffeId, TrustDomain};
