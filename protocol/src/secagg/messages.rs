//! Wire messages of a secure-aggregation round, one per step, each bound to its round.
//!
//! The messages are serde structs; the transport chooses the encoding. Whatever the encoding
//! yields is attacker input: the state machines check the round, the sender and every
//! length before use, and [`PackedVector::unpack`] refuses any vector that does not match
//! the plan.
//!
//! Flow (S: store, P: PoP, C: core):
//! 1. S -> C [`KeyAdvert`]; C -> S [`NeighbourKeys`].
//! 2. S -> C [`EncryptedShares`]; C -> S [`SharesForStore`].
//! 3. S -> P [`MaskedUpdate`]; P -> C [`PartialSum`].
//! 4. C -> S [`UnmaskRequest`]; S -> C [`UnmaskResponse`].

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::codec::bitpack::{self, BitpackError};
use crate::ids::{RoundId, StoreId};

/// Step 1: a store's two public keys for the round.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyAdvert {
    /// Round the keys are for.
    pub round: RoundId,
    /// The advertising store.
    pub store: StoreId,
    /// X25519 public key that share encryption agrees with.
    pub cipher_key: [u8; 32],
    /// X25519 public key that pairwise masks agree with.
    pub mask_key: [u8; 32],
}

/// Step 1 reply: the adverts of a store's neighbours that advertised in time.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NeighbourKeys {
    /// Round.
    pub round: RoundId,
    /// The store this is addressed to.
    pub to: StoreId,
    /// One advert per live neighbour.
    pub adverts: Vec<KeyAdvert>,
}

/// One share bundle (a share of the sender's mask seed and of its mask key), encrypted for
/// one neighbour.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EncryptedShare {
    /// The store whose secrets these are shares of.
    pub from: StoreId,
    /// The neighbour that can open it.
    pub to: StoreId,
    /// ChaCha20-Poly1305 ciphertext, its associated data binding round, sender and receiver.
    pub ciphertext: Vec<u8>,
}

/// Step 2: a store's encrypted shares, one per live neighbour.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EncryptedShares {
    /// Round.
    pub round: RoundId,
    /// The sharing store.
    pub from: StoreId,
    /// The bundles.
    pub shares: Vec<EncryptedShare>,
}

/// Step 2 reply: the bundles other stores addressed to this store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SharesForStore {
    /// Round.
    pub round: RoundId,
    /// The receiving store.
    pub to: StoreId,
    /// The bundles, one per neighbour that completed step 2.
    pub shares: Vec<EncryptedShare>,
}

/// Ring elements packed at r bits each.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PackedVector {
    /// Ring width r.
    pub ring_bits: u32,
    /// Number of elements.
    pub len: u32,
    /// The packed bits.
    pub bytes: Vec<u8>,
}

/// Step 3: a store's masked update, sent to its PoP.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MaskedUpdate {
    /// Round.
    pub round: RoundId,
    /// The uploading store.
    pub store: StoreId,
    /// Quantised update plus noise plus masks, modulo 2^r.
    pub vector: PackedVector,
}

/// Step 3, PoP to core: the sum modulo 2^r of the masked updates a PoP accepted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartialSum {
    /// Round.
    pub round: RoundId,
    /// Stores whose masked updates are in the sum, ascending.
    pub contributors: Vec<StoreId>,
    /// The sum.
    pub vector: PackedVector,
}

/// Step 4: core asks a surviving store for shares. A store answers only if no peer appears
/// in both lists, now or in any earlier request of the round.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnmaskRequest {
    /// Round.
    pub round: RoundId,
    /// The store asked.
    pub to: StoreId,
    /// Neighbours that uploaded: their mask-seed shares remove their self masks.
    pub seed_shares_of: Vec<StoreId>,
    /// Neighbours that shared keys but did not upload: their mask-key shares remove the
    /// pairwise masks survivors added for them.
    pub key_shares_of: Vec<StoreId>,
}

/// A share the store releases for one peer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevealedShare {
    /// The peer whose secret this is a share of.
    pub of: StoreId,
    /// The encoded Shamir share.
    pub share: Vec<u8>,
}

/// Step 4 reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnmaskResponse {
    /// Round.
    pub round: RoundId,
    /// The answering store.
    pub from: StoreId,
    /// Mask-seed shares, for the peers in `seed_shares_of`.
    pub seed_shares: Vec<RevealedShare>,
    /// Mask-key shares, for the peers in `key_shares_of`.
    pub key_shares: Vec<RevealedShare>,
}

/// A packed vector that does not match the plan.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum VectorError {
    /// Ring width differs from the plan's.
    #[error("vector packed at {got} bits, the ring has {expected}")]
    RingBits {
        /// Plan's r.
        expected: u32,
        /// Claimed r.
        got: u32,
    },
    /// Element count differs from the plan's.
    #[error("vector has {got} elements, the plan has {expected}")]
    Length {
        /// Plan's length.
        expected: usize,
        /// Claimed length.
        got: usize,
    },
    /// The bytes do not unpack.
    #[error("vector bytes do not unpack: {0}")]
    Bitpack(#[from] BitpackError),
}

impl PackedVector {
    /// Packs ring elements (each below 2^r) at r bits.
    ///
    /// # Errors
    ///
    /// [`VectorError::Bitpack`] if an element is not below 2^r.
    pub fn pack(values: &[u64], ring_bits: u32) -> Result<Self, VectorError> {
        let len = u32::try_from(values.len()).map_err(|_| VectorError::Length {
            expected: u32::MAX as usize,
            got: values.len(),
        })?;
        Ok(Self {
            ring_bits,
            len,
            bytes: bitpack::pack(values, ring_bits)?,
        })
    }

    /// Unpacks, checking ring width and length against what the plan expects before any
    /// allocation.
    ///
    /// # Errors
    ///
    /// [`VectorError`] for a width, length or byte count that does not match.
    pub fn unpack(&self, ring_bits: u32, len: usize) -> Result<Vec<u64>, VectorError> {
        if self.ring_bits != ring_bits {
            return Err(VectorError::RingBits {
                expected: ring_bits,
                got: self.ring_bits,
            });
        }
        if self.len as usize != len {
            return Err(VectorError::Length {
                expected: len,
                got: self.len as usize,
            });
        }
        Ok(bitpack::unpack(&self.bytes, ring_bits, len)?)
    }
}
