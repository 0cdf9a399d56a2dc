//! The model cache: manifests and blobs fetched once from core and served to stores.
//!
//! Blobs are content-addressed: a blob is kept only when its SHA-256 equals the digest it
//! was asked by. Manifests are immutable per version: the first copy is kept, and a later
//! copy from core that differs is refused rather than served. Memory is bounded; the oldest
//! entries go first.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use bytes::Bytes;
use sha2::{Digest, Sha256};

/// Cached manifests and blobs, by request path.
#[derive(Debug)]
pub struct ModelCache {
    max_object: usize,
    max_total: usize,
    inner: Mutex<Inner>,
    // Serialises misses, so that concurrent stores asking for the same blob cause one
    // fetch from core.
    fill: tokio::sync::Mutex<()>,
}

#[derive(Debug, Default)]
struct Inner {
    entries: HashMap<String, Bytes>,
    order: VecDeque<String>,
    total: usize,
}

impl ModelCache {
    /// A cache keeping objects up to `max_object` bytes, eight of them at most in size.
    pub fn new(max_object: usize) -> Self {
        Self {
            max_object,
            max_total: max_object.saturating_mul(8),
            inner: Mutex::default(),
            fill: tokio::sync::Mutex::new(()),
        }
    }

    /// The largest object kept.
    pub fn max_object(&self) -> usize {
        self.max_object
    }

    /// The object at `key`, if cached.
    pub fn get(&self, key: &str) -> Option<Bytes> {
        let inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        inner.entries.get(key).cloned()
    }

    /// Takes the fill lock: hold it from a miss until the object is inserted.
    pub async fn fill_lock(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.fill.lock().await
    }

    /// Keeps `bytes` under `key`, evicting the oldest entries beyond the bound.
    pub fn insert(&self, key: String, bytes: Bytes) {
        if bytes.len() > self.max_object {
            return;
        }
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if inner.entries.contains_key(&key) {
            return;
        }
        while inner.total + bytes.len() > self.max_total {
            let Some(old) = inner.order.pop_front() else {
                break;
            };
            if let Some(gone) = inner.entries.remove(&old) {
                inner.total -= gone.len();
            }
        }
        inner.total += bytes.len();
        inner.order.push_back(key.clone());
        inner.entries.insert(key, bytes);
    }
}

/// Whether `digest` is a SHA-256 in lowercase hex.
pub fn is_sha256_hex(digest: &str) -> bool {
    digest.len() == 64
        && digest
            .bytes()
            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// The SHA-256 of `bytes`, lowercase hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oldest_objects_go_first_when_full() {
        let cache = ModelCache::new(4);
        for i in 0..9 {
            cache.insert(format!("k{i}"), Bytes::from(vec![0u8; 4]));
        }
        // Eight objects of four bytes fit; the first one left.
        assert!(cache.get("k0").is_none());
        assert!(cache.get("k8").is_some());
        assert!(cache.get("k1").is_some());
    }

    #[test]
    fn digests_must_be_lowercase_sha256_hex() {
        let digest = sha256_hex(b"abc");
        // Reference: sha256("abc") from FIPS 180-2, appendix B.1.
        assert_eq!(
            digest,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert!(is_sha256_hex(&digest));
        assert!(!is_sha256_hex(&digest.to_uppercase()));
        assert!(!is_sha256_hex("../etc/passwd"));
    }
}
