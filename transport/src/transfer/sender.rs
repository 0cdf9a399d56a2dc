//! The sending side: [`Client::put_object`].

use std::io;
use std::path::Path;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, StatusCode};
use tracing::debug;

use super::{
    HEADER_CHUNK_SIZE, HEADER_FIRST_CHUNK, HEADER_OBJECT_SIZE, Manifest, ObjectDigest,
    ObjectStatus, manifest_of_file,
};
use crate::body::SendBody;
use crate::client::{Client, ClientError};

/// What [`Client::put_object`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PutReport {
    /// The object's name.
    pub digest: ObjectDigest,
    /// Its size in bytes.
    pub size: u64,
    /// The first chunk of each chunks request sent: one entry per (re)start.
    pub resumed_from: Vec<u64>,
    /// Whether the receiver already had the whole object, so nothing was sent.
    pub already_present: bool,
}

impl Client {
    /// Uploads the file at `path` as a content-addressed object, resuming after dropped
    /// connections from the last chunk the receiver acknowledged.
    ///
    /// Idempotent: an object the receiver already holds is not sent again. Failed attempts
    /// are retried with backoff; an attempt that made progress resets the retry count.
    ///
    /// # Errors
    /// [`ClientError::ObjectTooLarge`] before anything is sent if the file exceeds
    /// [`ClientConfig::max_object_size`](crate::ClientConfig::max_object_size);
    /// [`ClientError::File`] when the file cannot be read; the last transport or status
    /// error once retries are spent.
    pub async fn put_object(&self, path: &Path) -> Result<PutReport, ClientError> {
        let file_error = |source| ClientError::File {
            path: path.to_owned(),
            source,
        };
        let size = tokio::fs::metadata(path).await.map_err(file_error)?.len();
        let limit = self.config().max_object_size;
        if size > limit {
            return Err(ClientError::ObjectTooLarge { size, limit });
        }

        // 1. One pass over the file for the manifest; only digests stay in memory.
        let chunk_size = self.config().chunk_size;
        let owned = path.to_owned();
        let hashed =
            tokio::task::spawn_blocking(move || manifest_of_file(&owned, chunk_size)).await;
        let (digest, manifest) = hashed
            .map_err(|e| file_error(io::Error::other(e)))?
            .map_err(file_error)?;
        let mut report = PutReport {
            digest,
            size,
            resumed_from: Vec::new(),
            already_present: false,
        };

        // 2. Status, manifest, chunks; again from the receiver's status after any failure.
        let policy = self.config().retry;
        let mut failures = 0;
        let mut acked_at_last_failure = None;
        loop {
            match self.put_attempt(path, &manifest, &mut report).await {
                Ok(true) => return Ok(report),
                Ok(false) if failures + 1 < policy.max_attempts => failures += 1,
                Ok(false) => {
                    return Err(ClientError::Malformed(
                        "receiver keeps refusing the chunks".into(),
                    ));
                }
                Err(error) if error.is_retryable() && failures + 1 < policy.max_attempts => {
                    // Failures only count in a row: an attempt that started further on than
                    // the one before made progress, so a long upload over a flaky link
                    // keeps going while the receiver keeps acknowledging chunks.
                    let acked = report.resumed_from.last().copied();
                    if acked > acked_at_last_failure {
                        failures = 0;
                    }
                    acked_at_last_failure = acked;
                    let delay = policy.delay(failures, &mut rand::thread_rng());
                    debug!(
                        object.digest = %digest,
                        %error,
                        delay.ms = delay.as_millis() as u64,
                        "upload interrupted; resuming",
                    );
                    tokio::time::sleep(delay).await;
                    failures += 1;
                }
                Err(error) => return Err(error),
            }
        }
    }

    /// One attempt; `Ok(true)` once the receiver holds the object.
    async fn put_attempt(
        &self,
        path: &Path,
        manifest: &Manifest,
        report: &mut PutReport,
    ) -> Result<bool, ClientError> {
        let digest = report.digest;
        let status = self.object_status(&digest).await?;
        if status.as_ref().is_some_and(|s| s.complete) {
            report.already_present = report.resumed_from.is_empty();
            return Ok(true);
        }

        let status = match status {
            Some(s) if s.chunk_size == manifest.chunk_size && s.size == manifest.size => s,
            _ => {
                let mut headers = HeaderMap::new();
                headers.insert(HEADER_OBJECT_SIZE, HeaderValue::from(manifest.size));
                headers.insert(HEADER_CHUNK_SIZE, HeaderValue::from(manifest.chunk_size));
                let body = SendBody::from_bytes(manifest.encode_chunks());
                let path = format!("/objects/{digest}/manifest");
                let response = self
                    .request(Method::PUT, &path, headers, body)
                    .await?
                    .success()
                    .await?;
                parse_status(response.bytes(64 << 10).await?)?
            }
        };
        if status.complete {
            return Ok(true);
        }

        // The receiver's numbers are input: a count past the manifest is a malformed reply,
        // refused before it becomes a file offset.
        let total = manifest.chunks.len() as u64;
        let first = status.received_chunks;
        if first > total {
            return Err(ClientError::Malformed(format!(
                "object status: received_chunks {first} exceeds the {total} chunks of {digest}"
            )));
        }
        let offset = first
            .checked_mul(manifest.chunk_size)
            .map_or(manifest.size, |offset| offset.min(manifest.size));
        report.resumed_from.push(first);
        let file = tokio::fs::File::open(path)
            .await
            .map_err(|source| ClientError::File {
                path: path.to_owned(),
                source,
            })?;
        let mut headers = HeaderMap::new();
        headers.insert(HEADER_FIRST_CHUNK, HeaderValue::from(first));
        let body = SendBody::from_file(file, offset, manifest.size - offset);
        let response = self
            .request(
                Method::PUT,
                &format!("/objects/{digest}/chunks"),
                headers,
                body,
            )
            .await?;
        if response.status() == StatusCode::CONFLICT {
            // The receiver's staging moved (restarted, or another upload): re-read status.
            return Ok(false);
        }
        let status = parse_status(response.success().await?.bytes(64 << 10).await?)?;
        Ok(status.complete)
    }

    /// What the receiver holds of `digest`; `None` if nothing.
    ///
    /// # Errors
    /// Transport errors, or [`ClientError::Malformed`] for an unreadable answer.
    pub async fn object_status(
        &self,
        digest: &ObjectDigest,
    ) -> Result<Option<ObjectStatus>, ClientError> {
        let path = format!("/objects/{digest}");
        let response = self
            .request(Method::GET, &path, HeaderMap::new(), SendBody::empty())
            .await?;
        if response.status() == StatusCode::NOT_FOUND {
            return Ok(None);
        }
        let bytes = response.success().await?.bytes(64 << 10).await?;
        parse_status(bytes).map(Some)
    }
}

fn parse_status(bytes: Bytes) -> Result<ObjectStatus, ClientError> {
    serde_json::from_slice(&bytes)
        .map_err(|e| ClientError::Malformed(format!("object status: {e}")))
}
