//! Key agreement and share encryption.
//!
//! Each store holds two X25519 key pairs per round, as in SecAgg+: the cipher pair encrypts
//! the shares it sends, the mask pair seeds its pairwise masks. They must differ because
//! core may reconstruct a dropped store's mask secret; with a single pair that secret would
//! also open every share the store received. Shared secrets go through HKDF-SHA256 with the
//! round and both store ids in the info, so a key is never reused across rounds, pairs or
//! purposes, and share keys are directional so the two ciphertexts between a pair never
//! share a key and nonce.

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};
use hkdf::Hkdf;
use sha2::Sha256;
use x25519_dalek::{PublicKey, SharedSecret, StaticSecret};

use crate::ids::{RoundId, StoreId};

/// What the derived key is for; part of the HKDF info.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Purpose {
    /// Encrypting shares from the first store named to the second.
    ShareEncryption,
    /// The pairwise mask between two stores, the same key on both sides.
    PairwiseMask,
}

/// Derives a 256-bit key from an X25519 agreement, or `None` when the peer's public key is a
/// low-order point (the agreement contributes nothing and the key would be predictable).
pub(crate) fn derive(
    secret: &StaticSecret,
    peer: &PublicKey,
    round: RoundId,
    purpose: Purpose,
    a: &StoreId,
    b: &StoreId,
) -> Option<[u8; 32]> {
    let shared = agree(secret, peer)?;
    Some(expand(&shared, round, purpose, a, b))
}

/// The X25519 agreement, or `None` for a low-order peer key.
pub(crate) fn agree(secret: &StaticSecret, peer: &PublicKey) -> Option<SharedSecret> {
    let shared = secret.diffie_hellman(peer);
    shared.was_contributory().then_some(shared)
}

/// HKDF-SHA256 from an agreement to the key for one purpose, round and pair.
pub(crate) fn expand(
    shared: &SharedSecret,
    round: RoundId,
    purpose: Purpose,
    a: &StoreId,
    b: &StoreId,
) -> [u8; 32] {
    // Mask keys name the pair in a fixed order so both ends derive the same key; share keys
    // keep sender then receiver.
    let (first, second) = match purpose {
        Purpose::PairwiseMask if b < a => (b, a),
        _ => (a, b),
    };
    let label: &[u8] = match purpose {
        Purpose::ShareEncryption => b"share encryption",
        Purpose::PairwiseMask => b"pairwise mask",
    };
    let mut info = Vec::with_capacity(64 + first.0.len() + second.0.len());
    info.extend_from_slice(label);
    info.extend_from_slice(&round.0.to_le_bytes());
    for id in [first, second] {
        info.extend_from_slice(&(id.0.len() as u64).to_le_bytes());
        info.extend_from_slice(id.0.as_bytes());
    }

    let hk = Hkdf::<Sha256>::new(Some(b"fedmesh secagg v1"), shared.as_bytes());
    let mut key = [0u8; 32];
    // 32 bytes is far below HKDF-SHA256's 8160-byte limit, so expand cannot fail.
    let _ = hk.expand(&info, &mut key);
    key
}

/// Associated data binding a share ciphertext to its round, sender and receiver.
fn associated_data(round: RoundId, from: &StoreId, to: &StoreId) -> Vec<u8> {
    let mut ad = Vec::with_capacity(32 + from.0.len() + to.0.len());
    ad.extend_from_slice(b"fedmesh secagg shares v1");
    ad.extend_from_slice(&round.0.to_le_bytes());
    for id in [from, to] {
        ad.extend_from_slice(&(id.0.len() as u64).to_le_bytes());
        ad.extend_from_slice(id.0.as_bytes());
    }
    ad
}

/// Encrypts a share bundle. Each key encrypts exactly one message, so a zero nonce is safe.
pub(crate) fn seal(
    key: &[u8; 32],
    round: RoundId,
    from: &StoreId,
    to: &StoreId,
    plaintext: &[u8],
) -> Vec<u8> {
    let cipher = ChaCha20Poly1305::new(Key::from_slice(key));
    let ad = associated_data(round, from, to);
    let payload = Payload {
        msg: plaintext,
        aad: &ad,
    };
    // Encryption only fails for plaintexts beyond 256 GiB; ours are 96 bytes.
    cipher
        .encrypt(Nonce::from_slice(&[0u8; 12]), payload)
        .unwrap_or_default()
}

/// Decrypts a share bundle, or `None` if it was forged, altered or meant for another
/// round, sender or receiver.
pub(crate) fn open(
    key: &[u8; 32],
    round: RoundId,
    from: &StoreId,
    to: &StoreId,
    ciphertext: &[u8],
) -> Option<Vec<u8>> {
    let cipher = ChaCha20Poly1305::new(Key::from_slice(key));
    let ad = associated_data(round, from, to);
    let payload = Payload {
        msg: ciphertext,
        aad: &ad,
    };
    cipher.decrypt(Nonce::from_slice(&[0u8; 12]), payload).ok()
}
