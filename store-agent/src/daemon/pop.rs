//! The store's side of the HTTP API: one [`Client`] to the PoPs' anycast address, the
//! runtime header on every request, JSON in and out, and `204` read as "not yet".

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use fedmesh_protocol::wire::{self, ApiError, MAX_JSON_BODY};
use fedmesh_transport::{
    Client, ClientConfig, ClientError, FileSvidSource, PeerPolicy, Protocol, RetryPolicy, SendBody,
    SvidPaths,
};
use http::{HeaderMap, HeaderValue, Method, StatusCode};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::config::AgentConfig;

/// Why a request to the PoP failed.
#[derive(Debug, thiserror::Error)]
pub enum PopError {
    /// The PoP could not be reached, or the exchange broke: worth retrying later.
    #[error("pop unreachable: {0}")]
    Unreachable(ClientError),
    /// The PoP (or core behind it) answered with an error status.
    #[error("pop answered {status} ({reason}): {message}")]
    Refused {
        /// The status.
        status: StatusCode,
        /// The machine-readable reason of the [`ApiError`] body, or `unknown`.
        reason: String,
        /// The operator sentence.
        message: String,
    },
    /// The answer is not what the route returns.
    #[error("malformed answer from {path}: {reason}")]
    Malformed {
        /// The route.
        path: String,
        /// What is wrong.
        reason: String,
    },
    /// The client could not be set up (identity files, address).
    #[error("pop client setup: {0}")]
    Setup(String),
}

impl PopError {
    /// Whether trying again later may help.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Unreachable(_) => true,
            Self::Refused { status, .. } => {
                status.is_server_error()
                    || *status == StatusCode::REQUEST_TIMEOUT
                    || *status == StatusCode::TOO_MANY_REQUESTS
            }
            Self::Malformed { .. } | Self::Setup(_) => false,
        }
    }
}

/// A connection to the PoPs, shared by one store's tasks.
#[derive(Clone)]
pub struct Pop {
    client: Client,
    runtime: HeaderValue,
}

impl Pop {
    /// Resolves the configured addresses and builds the client from the store's SVID.
    ///
    /// # Errors
    ///
    /// [`PopError::Setup`] when an address does not resolve or the identity files do not
    /// load.
    pub async fn connect(config: &AgentConfig) -> Result<Self, PopError> {
        let quic_addr = resolve(&config.pop.address).await?;
        let tcp_addr = match &config.pop.fallback_tcp_address {
            Some(address) => resolve(address).await?,
            None => quic_addr,
        };
        let paths = SvidPaths {
            chain: config.identity.svid.clone(),
            key: config.identity.key.clone(),
            bundle: config.identity.bundle.clone(),
        };
        let source = FileSvidSource::load(paths).map_err(|e| PopError::Setup(e.to_string()))?;
        let mut client_config =
            ClientConfig::new(quic_addr, PeerPolicy::PathPrefix("/pop/".into()));
        client_config.tcp_addr = tcp_addr;
        // The agent paces its own retries (polls and backoff); one attempt per call here.
        client_config.retry = RetryPolicy {
            base: Duration::from_millis(50),
            cap: Duration::from_millis(200),
            max_attempts: 1,
        };
        client_config.quic_connect_timeout = Duration::from_secs(2);
        client_config.tcp_connect_timeout = Duration::from_secs(5);
        let client =
            Client::new(client_config, source).map_err(|e| PopError::Setup(e.to_string()))?;
        let runtime = config
            .runtime_version()
            .map_err(|e| PopError::Setup(e.to_string()))?
            .to_string();
        let runtime =
            HeaderValue::from_str(&runtime).map_err(|e| PopError::Setup(e.to_string()))?;
        Ok(Self { client, runtime })
    }

    /// The protocol of the open connection, if any.
    pub async fn protocol(&self) -> Option<Protocol> {
        self.client.protocol().await
    }

    /// `GET path` answered with JSON; `None` for `204`.
    ///
    /// # Errors
    ///
    /// [`PopError`].
    pub async fn get_json<T: DeserializeOwned>(&self, path: &str) -> Result<Option<T>, PopError> {
        let Some(bytes) = self.get_bytes(path, MAX_JSON_BODY).await? else {
            return Ok(None);
        };
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| malformed(path, e.to_string()))
    }

    /// `GET path` with a body of at most `limit` bytes; `None` for `204`.
    ///
    /// # Errors
    ///
    /// [`PopError`].
    pub async fn get_bytes(&self, path: &str, limit: usize) -> Result<Option<Bytes>, PopError> {
        let response = self
            .send(Method::GET, path, HeaderMap::new(), Bytes::new())
            .await?;
        if response.status() == StatusCode::NO_CONTENT {
            return Ok(None);
        }
        let response = check(response).await?;
        let bytes = response.bytes(limit).await.map_err(PopError::Unreachable)?;
        Ok(Some(bytes))
    }

    /// `POST path` with a JSON body; the answer's body is ignored.
    ///
    /// # Errors
    ///
    /// [`PopError`].
    pub async fn post_json<T: Serialize>(&self, path: &str, body: &T) -> Result<(), PopError> {
        let bytes = serde_json::to_vec(body).map_err(|e| malformed(path, e.to_string()))?;
        let mut headers = HeaderMap::new();
        headers.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        let response = self.send(Method::POST, path, headers, bytes.into()).await?;
        check(response).await?;
        Ok(())
    }

    /// `PUT` an update with its header; returns the PoP's JSON answer.
    ///
    /// # Errors
    ///
    /// [`PopError`].
    pub async fn put_update<T: DeserializeOwned>(
        &self,
        path: &str,
        header: &wire::UpdateHeader,
        body: Bytes,
    ) -> Result<T, PopError> {
        let json = serde_json::to_string(header).map_err(|e| malformed(path, e.to_string()))?;
        let value = HeaderValue::from_str(&json).map_err(|e| malformed(path, e.to_string()))?;
        let mut headers = HeaderMap::new();
        headers.insert(wire::UPDATE_HEADER, value);
        let response = self.send(Method::PUT, path, headers, body).await?;
        let bytes = check(response)
            .await?
            .bytes(MAX_JSON_BODY)
            .await
            .map_err(PopError::Unreachable)?;
        serde_json::from_slice(&bytes).map_err(|e| malformed(path, e.to_string()))
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        mut headers: HeaderMap,
        body: Bytes,
    ) -> Result<fedmesh_transport::ClientResponse, PopError> {
        headers.insert(wire::RUNTIME_HEADER, self.runtime.clone());
        self.client
            .request(method, path, headers, SendBody::from_bytes(body))
            .await
            .map_err(PopError::Unreachable)
    }
}

/// Turns a non-2xx answer into [`PopError::Refused`], reading its [`ApiError`] body.
async fn check(
    response: fedmesh_transport::ClientResponse,
) -> Result<fedmesh_transport::ClientResponse, PopError> {
    let status = response.status();
    if status.is_success() {
        return Ok(response);
    }
    let body = response.bytes(4096).await.unwrap_or_default();
    let (reason, message) = match serde_json::from_slice::<ApiError>(&body) {
        Ok(err) => (err.reason, err.message),
        Err(_) => (
            "unknown".into(),
            String::from_utf8_lossy(&body).into_owned(),
        ),
    };
    Err(PopError::Refused {
        status,
        reason,
        message,
    })
}

fn malformed(path: &str, reason: String) -> PopError {
    PopError::Malformed {
        path: path.to_owned(),
        reason,
    }
}

async fn resolve(address: &str) -> Result<SocketAddr, PopError> {
    let mut addrs = tokio::net::lookup_host(address)
        .await
        .map_err(|e| PopError::Setup(format!("cannot resolve {address}: {e}")))?;
    addrs
        .next()
        .ok_or_else(|| PopError::Setup(format!("{address} resolves to no address")))
}
