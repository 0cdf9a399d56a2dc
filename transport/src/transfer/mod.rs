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

mod receiver;
mod sender;

use std::fmt;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use ring::digest::{Context, SHA256};
use serde::{Deserialize, Serialize};

pub use receiver::{ObjectStore, ReceiverStats};
pub use sender::PutReport;

/// Default chunk size: 1 MiB.
pub const DEFAULT_CHUNK_SIZE: u64 = 1 << 20;
/// Smallest chunk size a receiver accepts; bounds the manifest (32 bytes a chunk) to
/// 4 MiB for an 8 GiB object.
pub const MIN_CHUNK_SIZE: u64 = 64 << 10;
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
