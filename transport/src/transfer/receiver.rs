//! The receiving side: an object store that serves the transfer routes.

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::BytesMut;
use http::{HeaderMap, Method, StatusCode};
use ring::digest::SHA256;
use tracing::{debug, info};

use super::{
    HEADER_CHUNK_SIZE, HEADER_FIRST_CHUNK, HEADER_OBJECT_SIZE, MAX_CHUNK_SIZE, MIN_CHUNK_SIZE,
    Manifest, ObjectDigest, ObjectStatus, TransferError, hash_file,
};
use crate::body::SendBody;
use crate::server::{Request, Response, Router};

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
///
/// The slot also records the SPIFFE ID of the peer whose upload is in progress, so that
/// another peer cannot reset or take over that upload; it lives in memory only, and the
/// first peer to touch the object after a receiver restart claims it.
#[derive(Default)]
struct Slot {
    lock: tokio::sync::Mutex<()>,
    generation: AtomicU64,
    owner: Mutex<Option<String>>,
}

impl Slot {
    /// Claims the upload for `peer`; `false` if another peer holds it.
    fn claim(&self, peer: &str) -> bool {
        let mut owner = self.owner.lock().unwrap_or_else(|e| e.into_inner());
        match owner.as_deref() {
            Some(current) if current != peer => false,
            Some(_) => true,
            None => {
                *owner = Some(peer.to_owned());
                true
            }
        }
    }

    /// Hands the upload to `peer`, for a peer that may start it over.
    fn hand_to(&self, peer: &str) {
        *self.owner.lock().unwrap_or_else(|e| e.into_inner()) = Some(peer.to_owned());
    }
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
        // Read only: a chunk may be half written under the slot's lock right now, so the
        // tail is trimmed only by the locked paths.
        let (received, _) = self.acknowledged_chunks(digest, &manifest).await?;
        Ok(Some(staged_status(digest, &manifest, received)))
    }

    /// Chunks acknowledged so far, from the staging file's length, and whether the file
    /// has a torn tail past them. Changes nothing.
    async fn acknowledged_chunks(
        &self,
        digest: &ObjectDigest,
        manifest: &Manifest,
    ) -> Result<(u64, bool), TransferError> {
        let path = self.staging_path(digest, "part");
        let len = match tokio::fs::metadata(&path).await {
            Ok(meta) => meta.len(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok((0, false)),
            Err(source) => return Err(TransferError::Io { path, source }),
        };
        let total = manifest.chunks.len() as u64;
        let received = if len >= manifest.size {
            total
        } else {
            len / manifest.chunk_size
        };
        Ok((received, len != acknowledged_len(manifest, received)))
    }

    /// Chunks acknowledged so far; trims a torn tail. Only with the slot's lock held.
    async fn staged_chunks(
        &self,
        digest: &ObjectDigest,
        manifest: &Manifest,
    ) -> Result<u64, TransferError> {
        let (received, torn) = self.acknowledged_chunks(digest, manifest).await?;
        if torn {
            let path = self.staging_path(digest, "part");
            let file = tokio::fs::OpenOptions::new().write(true).open(&path).await;
            let file = file.map_err(|source| TransferError::Io {
                path: path.clone(),
                source,
            })?;
            file.set_len(acknowledged_len(manifest, received))
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
            info!(
                peer.id = %request.peer(),
                object.size = size,
                "object refused: over the size limit",
            );
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

        // 3. Keep progress for the same manifest; a different one starts over. Only the peer
        //    whose upload is in progress may touch it.
        let slot = self.slot(digest);
        let _guard = slot.lock.lock().await;
        let peer = request.peer().spiffe_id().to_string();
        let existing = match self.read_manifest(&digest).await {
            Ok(existing) => existing,
            Err(error) => return internal(&error),
        };
        if existing.is_some() && !slot.claim(&peer) {
            return upload_taken(&digest, &peer);
        }
        slot.hand_to(&peer);
        match existing {
            Some(existing) if existing == manifest => {}
            _ => {
                let part = self.staging_path(&digest, "part");
                let _ = tokio::fs::remove_file(&part).await;
                let path = self.staging_path(&digest, "manifest");
                if let Err(source) = write_file(&path, &manifest.encode()).await {
                    return internal(&TransferError::Io { path, source });
                }
            }
        }
        match self.staged_chunks(&digest, &manifest).await {
            Ok(received) => {
                Response::json(StatusCode::OK, &staged_status(&digest, &manifest, received))
            }
            Err(error) => internal(&error),
        }
    }

    async fn handle_chunks(self: Arc<Self>, mut request: Request) -> Response {
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
        let peer = request.peer().spiffe_id().to_string();
        if !slot.claim(&peer) {
            return upload_taken(&digest, &peer);
        }
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
        self: &Arc<Self>,
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
        let file = file.map_err(|source| {
            internal(&TransferError::Io {
                path: path.clone(),
                source,
            })
        })?;
        let file = Arc::new(file.into_std().await);
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
                    debug!(
                        peer.id = %peer,
                        %error,
                        chunks.received = received,
                        "upload interrupted",
                    );
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
                // The write and its count run to completion together even if this handler
                // is cancelled (a dropped connection, a server shutting down): a chunk on
                // disk is an acknowledged chunk, and the count must say so.
                let write = tokio::task::spawn_blocking({
                    let (store, file) = (Arc::clone(self), Arc::clone(&file));
                    let offset = index * manifest.chunk_size;
                    move || -> io::Result<()> {
                        file.write_all_at(&chunk, offset)?;
                        store.chunks_written.fetch_add(1, Ordering::Relaxed);
                        store.progress.send_modify(|count| *count += 1);
                        Ok(())
                    }
                });
                let written = write
                    .await
                    .unwrap_or_else(|join| Err(io::Error::other(join)));
                written.map_err(|source| {
                    internal(&TransferError::Io {
                        path: path.clone(),
                        source,
                    })
                })?;
                received = index + 1;
                index += 1;
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

/// Bytes of the staging file that `received` acknowledged chunks fill.
fn acknowledged_len(manifest: &Manifest, received: u64) -> u64 {
    received
        .saturating_mul(manifest.chunk_size)
        .min(manifest.size)
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

/// The 409 answer to a peer that would disturb another peer's upload in progress.
fn upload_taken(digest: &ObjectDigest, peer: &str) -> Response {
    debug!(peer.id = peer, object.digest = %digest, "upload refused: another peer's in progress");
    Response::text(
        StatusCode::CONFLICT,
        format!("another peer is uploading {digest}"),
    )
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

async fn write_file(path: &Path, contents: &[u8]) -> io::Result<()> {
    let tmp = path.with_extension("tmp");
    tokio::fs::write(&tmp, contents).await?;
    tokio::fs::rename(&tmp, path).await
}
