//! Resumable, content-addressed transfers of large objects.
//!
//! An object is named by the SHA-256 of its bytes and cut into chunks (1 MiB by default),
//! each with its own SHA-256, listed in a manifest. The HTTP API, identical over HTTP/3 and
//! HTTP/2:
//!
//! | request | meaning |
//! | --- | --- |
//! | `GET /objects/{sha256}` | [`ObjectStatus`] as JSON; 404 if the receiver knows nothing |
//! | `PUT /objects/{sha256}/manifest` | body: the chunk digests, 32 bytes each; headers `fedmesh-object-size`, `fedmesh-chunk-size`; 413 over the limit |
//! | `PUT /objects/{sha256}/chunks` | body: chunks from `fedmesh-first-chunk` on, back to back; answers [`ObjectStatus`] |
//! | `GET /objects/{sha256}/data` | the complete object |
//!
//! The receiver writes chunks in order into a staging file and acknowledges a chunk once it
//! is written and its digest matched; the staging file's length is the acknowledgement, so
//! it survives a receiver restart. A sender that lost its connection asks for the status
//! and continues from `received_chunks`. When every chunk is in, the receiver hashes the
//! whole staging file, and only if that matches the object's name renames it into place.
//! Re-sending a complete object changes nothing. Neither side holds more than a chunk.
//!
//! Chunks are not fsynced one by one: after a power loss the final whole-object check
//! catches a torn staging file and the upload starts over.

use std::collections::HashMap;
use std::fmt;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, HeaderValue, Method, StatusCode};
use ring::digest::{Context, SHA256};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncSeekExt, AsyncWriteExt};
use tracing::{debug, info};

use crate::body::SendBody;
use crate::client::{Client, ClientError};
use crate::server::{Request, Response, Router};

/// Default chunk size: 1 MiB.
pub const DEFAULT_CHUNK_SIZE: u64 = 1 << 20;
/// Smallest chunk size a receiver accepts.
pub const MIN_CHUNK_SIZE: u64 = 4 << 10;
/// Largest chunk size a receiver accepts; bounds its memory per upload.
pub const MAX_CHUNK_SIZE: u64 = 16 << 20;

/// Header: total object size in bytes.
pub const HEADER_OBJECT_SIZE: &str = "fedmesh-object-size";
/// Header: chunk size in bytes.
pub const HEADER_CHUNK_SIZE: &str = "fedmesh-chunk-size";
/// Header: index of the first chunk in a chunks body.
pub const HEADER_FIRST_CHUNK: &str = "fedmesh-first-chunk";

/// The SHA-256 of an object's bytes, its name.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct ObjectDigest([u8; 32]);

impl ObjectDigest {
    /// The digest bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Display for ObjectDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for ObjectDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ObjectDigest({self})")
    }
}

impl FromStr for ObjectDigest {
    type Err = TransferError;

    /// Parses 64 lowercase hex digits.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let invalid = || TransferError::InvalidDigest(s.chars().take(80).collect());
        if s.len() != 64 || s.bytes().any(|b| b.is_ascii_uppercase()) {
            return Err(invalid());
        }
        let mut bytes = [0u8; 32];
        hex::decode_to_slice(s, &mut bytes).map_err(|_| invalid())?;
        Ok(Self(bytes))
    }
}

/// What a receiver holds of an object.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObjectStatus {
    /// The object's name, hex.
    pub digest: String,
    /// Object size in bytes.
    pub size: u64,
    /// Chunk size of the staged upload; 0 once complete.
    pub chunk_size: u64,
    /// Chunks written and verified, in order from chunk 0.
    pub received_chunks: u64,
    /// Chunks in the object.
    pub total_chunks: u64,
    /// Whether the whole object is stored and verified.
    pub complete: bool,
}

/// A manifest: object size, chunk size and each chunk's digest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Manifest {
    size: u64,
    chunk_size: u64,
    chunks: Vec<[u8; 32]>,
}

impl Manifest {
    /// Number of chunks for `size` bytes in `chunk_size` pieces.
    fn count(size: u64, chunk_size: u64) -> u64 {
        size.div_ceil(chunk_size)
    }

    /// Length of chunk `index`.
    fn chunk_len(&self, index: u64) -> u64 {
        (self.size - index * self.chunk_size).min(self.chunk_size)
    }

    fn encode_chunks(&self) -> Vec<u8> {
        self.chunks.iter().flatten().copied().collect()
    }

    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(16 + self.chunks.len() * 32);
        out.extend_from_slice(&self.size.to_be_bytes());
        out.extend_from_slice(&self.chunk_size.to_be_bytes());
        out.extend_from_slice(&self.encode_chunks());
        out
    }

    fn decode(bytes: &[u8]) -> Option<Self> {
        let size = u64::from_be_bytes(bytes.get(..8)?.try_into().ok()?);
        let chunk_size = u64::from_be_bytes(bytes.get(8..16)?.try_into().ok()?);
        Self::from_parts(size, chunk_size, bytes.get(16..)?)
    }

    /// Checks sizes and splits the digests; `None` if they disagree.
    fn from_parts(size: u64, chunk_size: u64, digests: &[u8]) -> Option<Self> {
        if !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&chunk_size) {
            return None;
        }
        let count = Self::count(size, chunk_size);
        if digests.len() as u64 != count * 32 {
            return None;
        }
        let chunks = digests
            .chunks_exact(32)
            .map(|c| c.try_into().unwrap_or([0; 32]))
            .collect();
        Some(Self {
            size,
            chunk_size,
            chunks,
        })
    }
}

/// Counters of what a receiver wrote; they let an operator (and a test) see that resumed
/// uploads did not send acknowledged chunks again.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReceiverStats {
    /// Chunks written to staging after their digest matched.
    pub chunks_written: u64,
    /// Chunks received again although already acknowledged, and discarded.
    pub duplicate_chunks: u64,
    /// Chunks whose digest did not match the manifest.
    pub corrupt_chunks: u64,
    /// Objects completed and verified.
    pub objects_completed: u64,
}

/// The receiving side of transfers: stores objects under a directory.
///
/// Layout: `<root>/objects/<sha256>` for complete objects, `<root>/staging/<sha256>.part`
/// and `.manifest` for uploads in progress.
pub struct ObjectStore {
    root: PathBuf,
    max_object_size: u64,
    slots: Mutex<HashMap<ObjectDigest, Arc<Slot>>>,
    chunks_written: AtomicU64,
    duplicate_chunks: AtomicU64,
    corrupt_chunks: AtomicU64,
    objects_completed: AtomicU64,
    progress: tokio::sync::watch::Sender<u64>,
}

/// Per-object write coordination. A new upload of the same object takes over from an old
/// one whose connection died but whose handler has not noticed yet: it bumps the
/// generation, and the old handler stops at its next chunk.
#[derive(Default)]
struct Slot {
    lock: tokio::sync::Mutex<()>,
    generation: AtomicU64,
}

impl ObjectStore {
    /// A store under `root` that refuses objects larger than `max_object_size` bytes.
    ///
    /// # Errors
    /// [`TransferError::Io`] when the directories cannot be created.
    pub fn open(root: &Path, max_object_size: u64) -> Result<Arc<Self>, TransferError> {
        for dir in [root.join("objects"), root.join("staging")] {
            std::fs::create_dir_all(&dir)
                .map_err(|source| TransferError::Io { path: dir, source })?;
        }
        Ok(Arc::new(Self {
            root: root.to_owned(),
            max_object_size,
            slots: Mutex::default(),
            chunks_written: AtomicU64::new(0),
            duplicate_chunks: AtomicU64::new(0),
            corrupt_chunks: AtomicU64::new(0),
            objects_completed: AtomicU64::new(0),
            progress: tokio::sync::watch::Sender::new(0),
        }))
    }

    /// Adds the transfer routes to `router`.
    pub fn routes(self: &Arc<Self>, router: Router) -> Router {
        let (status, manifest, chunks, data) = (
            Arc::clone(self),
            Arc::clone(self),
            Arc::clone(self),
            Arc::clone(self),
        );
        router
            .route(Method::GET, "/objects/{digest}", move |r| {
                let store = Arc::clone(&status);
                async move { store.handle_status(r).await }
            })
            .route(Method::PUT, "/objects/{digest}/manifest", move |r| {
                let store = Arc::clone(&manifest);
                async move { store.handle_manifest(r).await }
            })
            .route(Method::PUT, "/objects/{digest}/chunks", move |r| {
                let store = Arc::clone(&chunks);
                async move { store.handle_chunks(r).await }
            })
            .route(Method::GET, "/objects/{digest}/data", move |r| {
                let store = Arc::clone(&data);
                async move { store.handle_data(r).await }
            })
    }

    /// Path of a complete object, if stored.
    pub fn object_path(&self, digest: &ObjectDigest) -> Option<PathBuf> {
        let path = self.complete_path(digest);
        path.is_file().then_some(path)
    }

    /// What has been written so far.
    pub fn stats(&self) -> ReceiverStats {
        ReceiverStats {
            chunks_written: self.chunks_written.load(Ordering::Relaxed),
            duplicate_chunks: self.duplicate_chunks.load(Ordering::Relaxed),
            corrupt_chunks: self.corrupt_chunks.load(Ordering::Relaxed),
            objects_completed: self.objects_completed.load(Ordering::Relaxed),
        }
    }

    /// Watches the running count of chunks written, for progress reports.
    pub fn progress(&self) -> tokio::sync::watch::Receiver<u64> {
        self.progress.subscribe()
    }

    fn complete_path(&self, digest: &ObjectDigest) -> PathBuf {
        self.root.join("objects").join(digest.to_string())
    }

    fn staging_path(&self, digest: &ObjectDigest, extension: &str) -> PathBuf {
        self.root
            .join("staging")
            .join(format!("{digest}.{extension}"))
    }

    fn slot(&self, digest: ObjectDigest) -> Arc<Slot> {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        Arc::clone(slots.entry(digest).or_default())
    }

    fn forget_slot(&self, digest: &ObjectDigest) {
        self.slots
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(digest);
    }

    async fn read_manifest(
        &self,
        digest: &ObjectDigest,
    ) -> Result<Option<Manifest>, TransferError> {
        let path = self.staging_path(digest, "manifest");
        match tokio::fs::read(&path).await {
            Ok(bytes) => Ok(Manifest::decode(&bytes)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(TransferError::Io { path, source }),
        }
    }

    /// Current status; `None` if nothing is known about the object.
    async fn status(&self, digest: &ObjectDigest) -> Result<Option<ObjectStatus>, TransferError> {
        let complete = self.complete_path(digest);
        if let Ok(meta) = tokio::fs::metadata(&complete).await {
            return Ok(Some(ObjectStatus {
                digest: digest.to_string(),
                size: meta.len(),
                chunk_size: 0,
                received_chunks: 0,
                total_chunks: 0,
                complete: true,
            }));
        }
        let Some(manifest) = self.read_manifest(digest).await? else {
            return Ok(None);
        };
        let received = self.staged_chunks(digest, &manifest).await?;
        Ok(Some(staged_status(digest, &manifest, received)))
    }

    /// Chunks acknowledged so far, from the staging file's length; trims a torn tail.
    async fn staged_chunks(
        &self,
        digest: &ObjectDigest,
        manifest: &Manifest,
    ) -> Result<u64, TransferError> {
        let path = self.staging_path(digest, "part");
        let len = match tokio::fs::metadata(&path).await {
            Ok(meta) => meta.len(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
            Err(source) => return Err(TransferError::Io { path, source }),
        };
        let total = manifest.chunks.len() as u64;
        let received = if len >= manifest.size {
            total
        } else {
            len / manifest.chunk_size
        };
        let acknowledged_len = (received * manifest.chunk_size).min(manifest.size);
        if len != acknowledged_len {
            let file = tokio::fs::OpenOptions::new().write(true).open(&path).await;
            let file = file.map_err(|source| TransferError::Io {
                path: path.clone(),
                source,
            })?;
            file.set_len(acknowledged_len)
                .await
                .map_err(|source| TransferError::Io {
                    path: path.clone(),
                    source,
                })?;
        }
        Ok(received)
    }

    async fn handle_status(&self, request: Request) -> Response {
        let digest = match digest_param(&request) {
            Ok(digest) => digest,
            Err(response) => return *response,
        };
        match self.status(&digest).await {
            Ok(Some(status)) => Response::json(StatusCode::OK, &status),
            Ok(None) => Response::text(StatusCode::NOT_FOUND, format!("no object {digest}")),
            Err(error) => internal(&error),
        }
    }

    async fn handle_manifest(&self, mut request: Request) -> Response {
        let digest = match digest_param(&request) {
            Ok(digest) => digest,
            Err(response) => return *response,
        };
        let (size, chunk_size) = match (
            header_u64(request.headers(), HEADER_OBJECT_SIZE),
            header_u64(request.headers(), HEADER_CHUNK_SIZE),
        ) {
            (Ok(size), Ok(chunk_size)) => (size, chunk_size),
            (Err(response), _) | (_, Err(response)) => return *response,
        };

        // 1. The limit, before reading anything more.
        if size > self.max_object_size {
            info!(peer.id = %request.peer(), object.size = size, "object refused: over the size limit");
            return Response::text(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!(
                    "object of {size} bytes exceeds the {}-byte limit",
                    self.max_object_size
                ),
            );
        }
        if !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&chunk_size) {
            return Response::text(
                StatusCode::BAD_REQUEST,
                format!("chunk size {chunk_size} outside {MIN_CHUNK_SIZE}..={MAX_CHUNK_SIZE}"),
            );
        }
        if let Ok(Some(status)) = self.status(&digest).await
            && status.complete
        {
            return Response::json(StatusCode::OK, &status);
        }

        // 2. The digests: exactly 32 bytes per chunk.
        let expected = Manifest::count(size, chunk_size) * 32;
        let limit = usize::try_from(expected).unwrap_or(usize::MAX);
        let digests = match request.body_mut().to_bytes(limit).await {
            Ok(bytes) => bytes,
            Err(error) => {
                return Response::text(StatusCode::BAD_REQUEST, format!("manifest: {error}"));
            }
        };
        let Some(manifest) = Manifest::from_parts(size, chunk_size, &digests) else {
            return Response::text(
                StatusCode::BAD_REQUEST,
                format!("manifest has {} bytes, expected {expected}", digests.len()),
            );
        };

        // 3. Keep progress for the same manifest; a different one starts over.
        let slot = self.slot(digest);
        let _guard = slot.lock.lock().await;
        match self.read_manifest(&digest).await {
            Ok(Some(existing)) if existing == manifest => {}
            Ok(_) => {
                let part = self.staging_path(&digest, "part");
                let _ = tokio::fs::remove_file(&part).await;
                let path = self.staging_path(&digest, "manifest");
                if let Err(source) = write_file(&path, &manifest.encode()).await {
                    return internal(&TransferError::Io { path, source });
                }
            }
            Err(error) => return internal(&error),
        }
        match self.staged_chunks(&digest, &manifest).await {
            Ok(received) => {
                Response::json(StatusCode::OK, &staged_status(&digest, &manifest, received))
            }
            Err(error) => internal(&error),
        }
    }

    async fn handle_chunks(&self, mut request: Request) -> Response {
        let digest = match digest_param(&request) {
            Ok(digest) => digest,
            Err(response) => return *response,
        };
        let first = match header_u64(request.headers(), HEADER_FIRST_CHUNK) {
            Ok(first) => first,
            Err(response) => return *response,
        };
        let manifest = match self.read_manifest(&digest).await {
            Ok(Some(manifest)) => manifest,
            Ok(None) => {
                // Complete already, or never announced.
                return match self.status(&digest).await {
                    Ok(Some(status)) => Response::json(StatusCode::OK, &status),
                    Ok(None) => {
                        Response::text(StatusCode::NOT_FOUND, format!("no manifest for {digest}"))
                    }
                    Err(error) => internal(&error),
                };
            }
            Err(error) => return internal(&error),
        };

        // 1. Take over the object and find where the staging file ends.
        let slot = self.slot(digest);
        let generation = slot.generation.fetch_add(1, Ordering::SeqCst) + 1;
        let received = {
            let _guard = slot.lock.lock().await;
            match self.staged_chunks(&digest, &manifest).await {
                Ok(received) => received,
                Err(error) => return internal(&error),
            }
        };
        let total = manifest.chunks.len() as u64;
        if first > received.min(total) {
            let status = staged_status(&digest, &manifest, received);
            return Response::json(StatusCode::CONFLICT, &status);
        }

        // 2. Stream the body into chunks; write each new one once its digest matches.
        let written = self
            .receive_chunks(
                &mut request,
                &digest,
                &manifest,
                &slot,
                generation,
                first,
                received,
            )
            .await;
        let received = match written {
            Ok(received) => received,
            Err(response) => return response,
        };

        // 3. All chunks in: verify the whole object and move it into place.
        if received == total {
            return self.complete(&digest, &manifest).await;
        }
        Response::json(StatusCode::OK, &staged_status(&digest, &manifest, received))
    }

    #[allow(clippy::too_many_arguments)] // The upload's state, threaded through one loop.
    async fn receive_chunks(
        &self,
        request: &mut Request,
        digest: &ObjectDigest,
        manifest: &Manifest,
        slot: &Slot,
        generation: u64,
        first: u64,
        mut received: u64,
    ) -> Result<u64, Response> {
        let path = self.staging_path(digest, "part");
        let file = tokio::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .await;
        let mut file = file.map_err(|source| {
            internal(&TransferError::Io {
                path: path.clone(),
                source,
            })
        })?;
        let total = manifest.chunks.len() as u64;
        let mut index = first;
        let mut buffer = BytesMut::new();
        let peer = request.peer().clone();

        loop {
            let piece = match request.body_mut().chunk().await {
                Ok(Some(piece)) => piece,
                Ok(None) => return Ok(received),
                Err(error) => {
                    // The sender went away; what is written stays acknowledged.
                    debug!(peer.id = %peer, %error, chunks.received = received, "upload interrupted");
                    return Ok(received);
                }
            };
            buffer.extend_from_slice(&piece);
            while index < total && buffer.len() as u64 >= manifest.chunk_len(index) {
                let chunk = buffer.split_to(manifest.chunk_len(index) as usize);
                if index < received {
                    self.duplicate_chunks.fetch_add(1, Ordering::Relaxed);
                    index += 1;
                    continue;
                }
                if ring::digest::digest(&SHA256, &chunk).as_ref() != manifest.chunks[index as usize]
                {
                    self.corrupt_chunks.fetch_add(1, Ordering::Relaxed);
                    return Err(Response::text(
                        StatusCode::UNPROCESSABLE_ENTITY,
                        format!("chunk {index} does not match its digest"),
                    ));
                }
                let _guard = slot.lock.lock().await;
                if slot.generation.load(Ordering::SeqCst) != generation {
                    return Err(Response::text(
                        StatusCode::CONFLICT,
                        "a newer upload took over",
                    ));
                }
                write_chunk(&mut file, index * manifest.chunk_size, &chunk)
                    .await
                    .map_err(|source| {
                        internal(&TransferError::Io {
                            path: path.clone(),
                            source,
                        })
                    })?;
                received = index + 1;
                index += 1;
                self.chunks_written.fetch_add(1, Ordering::Relaxed);
                self.progress.send_modify(|count| *count += 1);
            }
            if index == total && !buffer.is_empty() {
                return Err(Response::text(
                    StatusCode::BAD_REQUEST,
                    "body runs past the object size",
                ));
            }
        }
    }

    async fn complete(&self, digest: &ObjectDigest, manifest: &Manifest) -> Response {
        let part = self.staging_path(digest, "part");
        let verify_path = part.clone();
        let whole = tokio::task::spawn_blocking(move || hash_file(&verify_path)).await;
        let (actual, _) = match whole {
            Ok(Ok(hashed)) => hashed,
            Ok(Err(source)) => return internal(&TransferError::Io { path: part, source }),
            Err(e) => {
                return internal(&TransferError::Io {
                    path: part,
                    source: io::Error::other(e),
                });
            }
        };
        let manifest_path = self.staging_path(digest, "manifest");
        if actual != *digest {
            // Every chunk matched, so the manifest itself lied about the object: start over.
            let _ = tokio::fs::remove_file(&part).await;
            let _ = tokio::fs::remove_file(&manifest_path).await;
            return Response::text(
                StatusCode::UNPROCESSABLE_ENTITY,
                format!("object hashes to {actual}, not {digest}"),
            );
        }
        let complete = self.complete_path(digest);
        if let Err(source) = tokio::fs::rename(&part, &complete).await {
            return internal(&TransferError::Io {
                path: complete,
                source,
            });
        }
        let _ = tokio::fs::remove_file(&manifest_path).await;
        self.forget_slot(digest);
        self.objects_completed.fetch_add(1, Ordering::Relaxed);
        debug!(object.digest = %digest, object.size = manifest.size, "object complete");
        let status = ObjectStatus {
            digest: digest.to_string(),
            size: manifest.size,
            chunk_size: 0,
            received_chunks: 0,
            total_chunks: 0,
            complete: true,
        };
        Response::json(StatusCode::OK, &status)
    }

    async fn handle_data(&self, request: Request) -> Response {
        let digest = match digest_param(&request) {
            Ok(digest) => digest,
            Err(response) => return *response,
        };
        let path = self.complete_path(&digest);
        let file = match tokio::fs::File::open(&path).await {
            Ok(file) => file,
            Err(_) => return Response::text(StatusCode::NOT_FOUND, format!("no object {digest}")),
        };
        let len = match file.metadata().await {
            Ok(meta) => meta.len(),
            Err(source) => return internal(&TransferError::Io { path, source }),
        };
        Response::new(StatusCode::OK, SendBody::from_file(file, 0, len))
    }
}

impl fmt::Debug for ObjectStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ObjectStore")
            .field("root", &self.root)
            .finish_non_exhaustive()
    }
}

fn staged_status(digest: &ObjectDigest, manifest: &Manifest, received: u64) -> ObjectStatus {
    ObjectStatus {
        digest: digest.to_string(),
        size: manifest.size,
        chunk_size: manifest.chunk_size,
        received_chunks: received,
        total_chunks: manifest.chunks.len() as u64,
        complete: false,
    }
}

/// The `{digest}` path parameter, or the 400 answer to send (boxed: it is the rare path).
fn digest_param(request: &Request) -> Result<ObjectDigest, Box<Response>> {
    let raw = request.param("digest").unwrap_or_default();
    raw.parse().map_err(|e: TransferError| {
        Box::new(Response::text(StatusCode::BAD_REQUEST, e.to_string()))
    })
}

fn header_u64(headers: &HeaderMap, name: &str) -> Result<u64, Box<Response>> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| {
            Box::new(Response::text(
                StatusCode::BAD_REQUEST,
                format!("header {name} missing or not a number"),
            ))
        })
}

fn internal(error: &TransferError) -> Response {
    tracing::warn!(%error, "transfer failed on the receiver");
    Response::text(StatusCode::INTERNAL_SERVER_ERROR, error.to_string())
}

async fn write_chunk(file: &mut tokio::fs::File, offset: u64, chunk: &[u8]) -> io::Result<()> {
    file.seek(io::SeekFrom::Start(offset)).await?;
    file.write_all(chunk).await?;
    file.flush().await
}

async fn write_file(path: &Path, contents: &[u8]) -> io::Result<()> {
    let tmp = path.with_extension("tmp");
    tokio::fs::write(&tmp, contents).await?;
    tokio::fs::rename(&tmp, path).await
}

/// Hashes a file in 1 MiB reads: its whole digest and its size.
fn hash_file(path: &Path) -> io::Result<(ObjectDigest, u64)> {
    let mut file = std::fs::File::open(path)?;
    let mut whole = Context::new(&SHA256);
    let mut buffer = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = file.read(&mut buffer)?;
        if n == 0 {
            break;
        }
        whole.update(&buffer[..n]);
        size += n as u64;
    }
    Ok((ObjectDigest(to_array(whole.finish())), size))
}

/// Reads a file once and builds its manifest: each chunk's digest and the whole digest.
///
/// # Errors
/// The I/O error of reading `path`.
pub fn manifest_of_file(path: &Path, chunk_size: u64) -> io::Result<(ObjectDigest, Manifest)> {
    let mut file = std::fs::File::open(path)?;
    let size = file.metadata()?.len();
    let mut whole = Context::new(&SHA256);
    let chunk_len = usize::try_from(chunk_size).map_err(io::Error::other)?;
    let mut buffer = vec![0u8; chunk_len];
    let mut chunks = Vec::with_capacity(Manifest::count(size, chunk_size) as usize);
    let mut left = size;
    while left > 0 {
        let n = chunk_len.min(usize::try_from(left).unwrap_or(usize::MAX));
        file.read_exact(&mut buffer[..n])?;
        whole.update(&buffer[..n]);
        chunks.push(to_array(ring::digest::digest(&SHA256, &buffer[..n])));
        left -= n as u64;
    }
    let digest = ObjectDigest(to_array(whole.finish()));
    Ok((
        digest,
        Manifest {
            size,
            chunk_size,
            chunks,
        },
    ))
}

fn to_array(digest: ring::digest::Digest) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(digest.as_ref());
    out
}

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
                    debug!(object.digest = %digest, %error, delay.ms = delay.as_millis() as u64, "upload interrupted; resuming");
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

        let first = status.received_chunks;
        report.resumed_from.push(first);
        let offset = (first * manifest.chunk_size).min(manifest.size);
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

/// A transfer-level error on the receiving side.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TransferError {
    /// The object name is not 64 lowercase hex digits.
    #[error("invalid object digest {0:?}: expected 64 lowercase hex digits")]
    InvalidDigest(String),
    /// A file of the store could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: io::Error,
    },
}
