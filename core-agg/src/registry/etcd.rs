//! The etcd registry backend: manifests and pointers in an etcd 3.4 cluster, blobs in a
//! content-addressed directory.
//!
//! ```text
//! <prefix>/manifests/<model>/<version>   signed manifest JSON, version zero-padded
//! <prefix>/current/<model>               the current version, in decimal
//! ```
//!
//! Put-if-absent and compare-and-swap are etcd transactions, so they hold across every core
//! that shares the cluster. The client knows every endpoint and each call is retried, with
//! backoff and a deadline, until a healthy member answers: a dead endpoint or a leader
//! election costs time, not a failed publish. Because a retried call may follow one that
//! landed but whose answer was lost, both writes treat finding their own value as success.
//!
//! The backend runs its own single-threaded runtime and blocks on it. Called from a task of
//! a multi-threaded tokio runtime (as `core-agg serve` does), it moves off the worker with
//! `block_in_place` first; a current-thread runtime cannot block, so there it reports an
//! error instead of stalling the runtime.

use std::future::Future;
use std::path::Path;
use std::time::{Duration, Instant};

use etcd_client::{Client, Compare, CompareOp, ConnectOptions, GetOptions, Txn, TxnOp};
use fedmesh_protocol::ids::ModelVersion;

use super::embedded::EmbeddedBackend;
use super::{Backend, RegistryError, SignedManifest, check_model_id};
use crate::ModelId;

/// How long one call keeps retrying before it reports the cluster unavailable.
const CALL_DEADLINE: Duration = Duration::from_secs(30);

/// A registry whose manifests and pointers live in etcd.
pub struct EtcdBackend {
    /// Always `Some` until drop, which shuts it down without blocking.
    runtime: Option<tokio::runtime::Runtime>,
    client: Client,
    prefix: String,
    blobs: EmbeddedBackend,
}

impl EtcdBackend {
    /// Connects to the cluster at `endpoints` (`host:port`), keeping keys under `prefix`
    /// and blobs in `blob_dir`.
    ///
    /// # Errors
    ///
    /// [`RegistryError::Storage`] if no endpoint answers before the deadline or the blob
    /// directory cannot be created.
    pub fn connect(
        endpoints: &[String],
        prefix: &str,
        blob_dir: &Path,
    ) -> Result<Self, RegistryError> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| RegistryError::Storage(format!("cannot start runtime: {e}")))?;
        let options = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(1))
            .with_timeout(Duration::from_secs(3));
        let client = blocking(|| runtime.block_on(Client::connect(endpoints, Some(options))))?
            .map_err(|e| RegistryError::Storage(format!("etcd {endpoints:?}: {e}")))?;
        Ok(Self {
            runtime: Some(runtime),
            client,
            prefix: prefix.trim_end_matches('/').to_owned(),
            blobs: EmbeddedBackend::open(blob_dir)?,
        })
    }

    /// Runs `call` against the cluster until it succeeds or the deadline passes.
    fn call<T, F, Fut>(&self, what: &str, mut call: F) -> Result<T, RegistryError>
    where
        F: FnMut(Client) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        let runtime = self
            .runtime
            .as_ref()
            .ok_or_else(|| RegistryError::Storage("etcd backend shut down".into()))?;
        blocking(|| {
            let started = Instant::now();
            let mut backoff = Duration::from_millis(50);
            loop {
                match runtime.block_on(call(self.client.clone())) {
                    Ok(value) => return Ok(value),
                    Err(error) if started.elapsed() < CALL_DEADLINE => {
                        tracing::debug!(%error, what, "etcd call failed; retrying");
                        std::thread::sleep(backoff);
                        backoff = (backoff * 2).min(Duration::from_secs(1));
                    }
                    Err(error) => {
                        return Err(RegistryError::Storage(format!("etcd {what}: {error}")));
                    }
                }
            }
        })?
    }

    fn manifest_key(&self, model: &ModelId, version: ModelVersion) -> String {
        format!("{}/manifests/{}/{:020}", self.prefix, model.0, version.0)
    }

    fn current_key(&self, model: &ModelId) -> String {
        format!("{}/current/{}", self.prefix, model.0)
    }

    fn value(&self, key: &str) -> Result<Option<Vec<u8>>, RegistryError> {
        let response = self.call("get", |mut client| {
            let key = key.to_owned();
            async move { client.get(key, None).await }
        })?;
        Ok(response.kvs().first().map(|kv| kv.value().to_vec()))
    }
}

impl Drop for EtcdBackend {
    fn drop(&mut self) {
        // Dropping a runtime blocks, which panics inside another runtime's task.
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// Runs blocking work `f`: directly outside any runtime, through `block_in_place` on a
/// multi-threaded one, and not at all on a current-thread one, which would stall.
fn blocking<T>(f: impl FnOnce() -> T) -> Result<T, RegistryError> {
    use tokio::runtime::{Handle, RuntimeFlavor};
    match Handle::try_current().map(|h| h.runtime_flavor()) {
        Err(_) => Ok(f()),
        Ok(RuntimeFlavor::MultiThread) => Ok(tokio::task::block_in_place(f)),
        Ok(_) => Err(RegistryError::Storage(
            "the etcd backend blocks; call it from a multi-threaded runtime or a plain thread"
                .into(),
        )),
    }
}

impl Backend for EtcdBackend {
    fn put_blob(&self, sha256: &str, bytes: &[u8]) -> Result<(), RegistryError> {
        self.blobs.put_blob(sha256, bytes)
    }

    fn blob(&self, sha256: &str) -> Result<Option<Vec<u8>>, RegistryError> {
        self.blobs.blob(sha256)
    }

    fn put_manifest(
        &self,
        model: &ModelId,
        version: ModelVersion,
        signed: &SignedManifest,
    ) -> Result<bool, RegistryError> {
        check_model_id(model)?;
        let key = self.manifest_key(model, version);
        let bytes =
            serde_json::to_vec(signed).map_err(|e| RegistryError::Storage(e.to_string()))?;
        let response = self.call("put manifest", |mut client| {
            // Create revision 0 means the key does not exist.
            let txn = Txn::new()
                .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
                .and_then([TxnOp::put(key.clone(), bytes.clone(), None)]);
            async move { client.txn(txn).await }
        })?;
        if response.succeeded() {
            return Ok(true);
        }
        Ok(self.value(&key)?.is_some_and(|existing| existing == bytes))
    }

    fn manifest(
        &self,
        model: &ModelId,
        version: ModelVersion,
    ) -> Result<Option<SignedManifest>, RegistryError> {
        check_model_id(model)?;
        let Some(bytes) = self.value(&self.manifest_key(model, version))? else {
            return Ok(None);
        };
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| RegistryError::Corrupt {
                model: model.clone(),
                version,
                reason: e.to_string(),
            })
    }

    fn versions(&self, model: &ModelId) -> Result<Vec<ModelVersion>, RegistryError> {
        check_model_id(model)?;
        let prefix = format!("{}/manifests/{}/", self.prefix, model.0);
        let response = self.call("list versions", |mut client| {
            let options = GetOptions::new().with_prefix().with_keys_only();
            let prefix = prefix.clone();
            async move { client.get(prefix, Some(options)).await }
        })?;
        let mut versions: Vec<ModelVersion> = response
            .kvs()
            .iter()
            .filter_map(|kv| kv.key().strip_prefix(prefix.as_bytes()))
            .filter_map(|name| std::str::from_utf8(name).ok()?.parse().ok())
            .map(ModelVersion)
            .collect();
        versions.sort();
        Ok(versions)
    }

    fn current(&self, model: &ModelId) -> Result<Option<ModelVersion>, RegistryError> {
        check_model_id(model)?;
        let Some(bytes) = self.value(&self.current_key(model))? else {
            return Ok(None);
        };
        let text = String::from_utf8_lossy(&bytes);
        let version = text
            .trim()
            .parse()
            .map_err(|_| RegistryError::Storage(format!("current of {model}: {text:?}")))?;
        Ok(Some(ModelVersion(version)))
    }

    fn swap_current(
        &self,
        model: &ModelId,
        expected: Option<ModelVersion>,
        new: ModelVersion,
    ) -> Result<bool, RegistryError> {
        check_model_id(model)?;
        let key = self.current_key(model);
        let condition = match expected {
            None => Compare::create_revision(key.clone(), CompareOp::Equal, 0),
            Some(v) => Compare::value(key.clone(), CompareOp::Equal, v.0.to_string()),
        };
        let response = self.call("swap current", |mut client| {
            let txn = Txn::new().when([condition.clone()]).and_then([TxnOp::put(
                key.clone(),
                new.0.to_string(),
                None,
            )]);
            async move { client.txn(txn).await }
        })?;
        if response.succeeded() {
            return Ok(true);
        }
        // An earlier attempt whose answer was lost may have moved it already.
        Ok(self.current(model)? == Some(new))
    }
}
