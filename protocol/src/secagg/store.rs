//! The store's side of a round.
//!
//! A [`StoreSession`] is driven in this order; each call checks the round and the phase, so
//! a replayed or out-of-order message is refused rather than acted on:
//!
//! 1. [`StoreSession::new`] makes the round's key pairs and returns the [`KeyAdvert`] to
//!    send to core (none in plain mode, which starts at step 3).
//! 2. [`StoreSession::handle_neighbour_keys`] shares the mask seed and mask key among the
//!    live neighbours and returns the [`EncryptedShares`].
//! 3. [`StoreSession::handle_shares`] opens the neighbours' bundles and derives the pairwise
//!    mask keys.
//! 4. [`StoreSession::mask`] masks the quantised update (from [`SecAggPlan::quantise`]) once,
//!    returning the [`MaskedUpdate`] for the PoP. The driver keeps it for re-sends.
//! 5. [`StoreSession::handle_unmask_request`] releases shares, refusing any request that
//!    would give one peer's seed share and key share out together.

use std::collections::{BTreeMap, BTreeSet};

use rand_core::{CryptoRng, RngCore};
use serde::{Deserialize, Serialize};
use thiserror::Error;
use x25519_dalek::{PublicKey, StaticSecret};
use zeroize::{Zeroize, Zeroizing};

use super::keys::{self, Purpose};
use super::messages::{
    EncryptedShare, EncryptedShares, KeyAdvert, MaskedUpdate, NeighbourKeys, PackedVector,
    RevealedShare, SharesForStore, UnmaskRequest, UnmaskResponse, VectorError,
};
use super::plan::{Masking, PlanConfig, QuantisedUpdate, SecAggPlan};
use super::prg::{apply_mask, reduce};
use super::shamir::{self, SHARE_LEN, ShamirError, Share};
use crate::ids::{RoundId, StoreId};

/// Why a store refused a message or a step.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum StoreError {
    /// The store is not in the plan's cohort.
    #[error("store {0} is not in the round's cohort")]
    NotInCohort(StoreId),
    /// The message belongs to another round.
    #[error("message is for round {got}, this store is in round {expected}")]
    WrongRound {
        /// This session's round.
        expected: RoundId,
        /// The message's round.
        got: RoundId,
    },
    /// The message is addressed to another store.
    #[error("message is addressed to store {0}")]
    NotForThisStore(StoreId),
    /// The step does not follow the previous one.
    #[error("{step} is not allowed while the store is {phase}")]
    WrongPhase {
        /// What was attempted.
        step: &'static str,
        /// Where the session is.
        phase: &'static str,
    },
    /// A message names a store that is not a neighbour, or names one twice.
    #[error("peer {0} is not an expected neighbour here, or appears twice")]
    UnexpectedPeer(StoreId),
    /// Fewer live neighbours than the threshold: this store's secrets could never be
    /// recovered, so it leaves the round.
    #[error("{have} live neighbours, the threshold is {need}")]
    TooFewNeighbours {
        /// Live neighbours.
        have: usize,
        /// Threshold.
        need: usize,
    },
    /// A peer's public key is a low-order point.
    #[error("public key of peer {0} gives no shared secret")]
    WeakKey(StoreId),
    /// A share bundle failed authentication or did not parse.
    #[error("share bundle from {0} failed to open or parse")]
    BadBundle(StoreId),
    /// The request asks for both the seed share and the key share of one peer.
    #[error("refused: both share kinds of peer {0} would be released")]
    BothShareKinds(StoreId),
    /// The quantised update does not fit the plan.
    #[error("quantised update has {got} elements, the plan has {expected}")]
    WrongLength {
        /// Plan's vector length.
        expected: usize,
        /// Given length.
        got: usize,
    },
    /// Packing failed.
    #[error(transparent)]
    Vector(#[from] VectorError),
    /// Sharing failed (only for a plan whose threshold exceeds the live neighbours).
    #[error(transparent)]
    Shamir(#[from] ShamirError),
    /// A saved unmask state does not fit its plan.
    #[error("saved unmask state is unusable: {0}")]
    BadState(String),
}

/// What a store keeps of a round once its masked update exists: the shares it holds for its
/// neighbours and which kind of share it has released for whom. It lets a restarted store
/// answer core's unmask request, and holds none of the store's own secrets: its keys and
/// mask seed are not needed after masking. Save it again after every released share and
/// before the response leaves, so a restart cannot be talked into the other kind.
#[derive(Clone, Serialize, Deserialize)]
pub struct UnmaskState {
    plan: PlanConfig,
    me: StoreId,
    /// Per peer: its mask-seed share and its key share held here, as bytes.
    held: Vec<(StoreId, Vec<u8>, Vec<u8>)>,
    released_seed: BTreeSet<StoreId>,
    released_key: BTreeSet<StoreId>,
}

impl UnmaskState {
    /// The round.
    pub fn round(&self) -> RoundId {
        self.plan.round
    }
}

impl Drop for UnmaskState {
    fn drop(&mut self) {
        for (_, seed, key) in &mut self.held {
            seed.zeroize();
            key.zeroize();
        }
    }
}

/// Where a store is in the round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StorePhase {
    /// Keys advertised, waiting for the neighbours' keys.
    Advertised,
    /// Shares sent, waiting for the neighbours' shares.
    SharesSent,
    /// Ready to mask and upload.
    ReadyToUpload,
    /// Masked update produced; answers unmask requests.
    Uploaded,
}

impl StorePhase {
    fn name(self) -> &'static str {
        match self {
            Self::Advertised => "waiting for neighbour keys",
            Self::SharesSent => "waiting for neighbour shares",
            Self::ReadyToUpload => "ready to upload",
            Self::Uploaded => "uploaded",
        }
    }
}

/// A neighbour's public keys.
#[derive(Clone)]
struct PeerKeys {
    cipher: PublicKey,
    mask: PublicKey,
}

/// The two shares a store holds for one peer.
struct HeldShares {
    seed: Share,
    key: Share,
}

/// The store's state for one round.
pub struct StoreSession {
    plan: SecAggPlan,
    me: StoreId,
    position: usize,
    phase: StorePhase,
    cipher_secret: StaticSecret,
    mask_secret: StaticSecret,
    /// The self-mask seed b; it leaves the store only as Shamir shares.
    mask_seed: Zeroizing<[u8; 32]>,
    peers: BTreeMap<StoreId, PeerKeys>,
    /// Keys that open the bundles each neighbour sends this store.
    open_keys: BTreeMap<StoreId, Zeroizing<[u8; 32]>>,
    held: BTreeMap<StoreId, HeldShares>,
    pair_keys: Vec<(StoreId, Zeroizing<[u8; 32]>)>,
    released_seed: BTreeSet<StoreId>,
    released_key: BTreeSet<StoreId>,
}

impl StoreSession {
    /// Starts a round: draws key pairs and the mask seed from `rng`.
    ///
    /// Returns the advert to send to core in secure mode, `None` in plain mode.
    ///
    /// # Errors
    ///
    /// [`StoreError::NotInCohort`] if `me` was not selected.
    pub fn new<R: RngCore + CryptoRng>(
        plan: SecAggPlan,
        me: StoreId,
        rng: &mut R,
    ) -> Result<(Self, Option<KeyAdvert>), StoreError> {
        let position = plan
            .position(&me)
            .ok_or_else(|| StoreError::NotInCohort(me.clone()))?;
        let cipher_secret = StaticSecret::random_from_rng(&mut *rng);
        let mask_secret = StaticSecret::random_from_rng(&mut *rng);
        let mut mask_seed = Zeroizing::new([0u8; 32]);
        rng.fill_bytes(mask_seed.as_mut());

        let secure = plan.masking() == Masking::Secure;
        let advert = secure.then(|| KeyAdvert {
            round: plan.round(),
            store: me.clone(),
            cipher_key: PublicKey::from(&cipher_secret).to_bytes(),
            mask_key: PublicKey::from(&mask_secret).to_bytes(),
        });
        let phase = if secure {
            StorePhase::Advertised
        } else {
            StorePhase::ReadyToUpload
        };
        let session = Self {
            plan,
            me,
            position,
            phase,
            cipher_secret,
            mask_secret,
            mask_seed,
            peers: BTreeMap::new(),
            open_keys: BTreeMap::new(),
            held: BTreeMap::new(),
            pair_keys: Vec::new(),
            released_seed: BTreeSet::new(),
            released_key: BTreeSet::new(),
        };
        Ok((session, advert))
    }

    /// Where the session is.
    pub fn phase(&self) -> StorePhase {
        self.phase
    }

    /// The plan this session follows.
    pub fn plan(&self) -> &SecAggPlan {
        &self.plan
    }

    /// Step 2: shares the mask seed and mask key among the live neighbours, threshold t,
    /// and encrypts one bundle per neighbour.
    ///
    /// # Errors
    ///
    /// [`StoreError`] for a message of another round or store, an advert from a store that
    /// is not a neighbour, a weak key, or fewer live neighbours than the threshold.
    pub fn handle_neighbour_keys<R: RngCore + CryptoRng>(
        &mut self,
        msg: &NeighbourKeys,
        rng: &mut R,
    ) -> Result<EncryptedShares, StoreError> {
        self.check(msg.round, &msg.to, StorePhase::Advertised, "sharing keys")?;

        // 1. Every advert is from a distinct neighbour, for this round.
        let mut peers = BTreeMap::new();
        for advert in &msg.adverts {
            let neighbour = self
                .plan
                .position(&advert.store)
                .is_some_and(|p| self.plan.graph().are_neighbours(self.position, p));
            if advert.round != msg.round || !neighbour || peers.contains_key(&advert.store) {
                return Err(StoreError::UnexpectedPeer(advert.store.clone()));
            }
            let keys = PeerKeys {
                cipher: PublicKey::from(advert.cipher_key),
                mask: PublicKey::from(advert.mask_key),
            };
            peers.insert(advert.store.clone(), keys);
        }
        let t = self.plan.threshold();
        if peers.len() < t {
            return Err(StoreError::TooFewNeighbours {
                have: peers.len(),
                need: t,
            });
        }

        // 2. Shamir-share both secrets; x is the holder's cohort position plus one.
        let xs: Vec<u64> = peers.keys().map(|p| self.x_of(p)).collect();
        let seed_shares = shamir::share(&self.mask_seed, t, &xs, rng)?;
        let key_bytes = Zeroizing::new(self.mask_secret.to_bytes());
        let key_shares = shamir::share(&key_bytes, t, &xs, rng)?;

        // 3. One authenticated bundle per neighbour.
        let mut shares = Vec::with_capacity(peers.len());
        let mut open_keys = BTreeMap::new();
        for ((peer, keys), (seed, key)) in peers.iter().zip(seed_shares.iter().zip(&key_shares)) {
            let round = self.plan.round();
            // One agreement per neighbour gives both directions' keys; the receiving key is
            // kept for step 3.
            let shared = keys::agree(&self.cipher_secret, &keys.cipher)
                .ok_or_else(|| StoreError::WeakKey(peer.clone()))?;
            let enc = Zeroizing::new(keys::expand(
                &shared,
                round,
                Purpose::ShareEncryption,
                &self.me,
                peer,
            ));
            let open = keys::expand(&shared, round, Purpose::ShareEncryption, peer, &self.me);
            open_keys.insert(peer.clone(), Zeroizing::new(open));
            let mut plain = Zeroizing::new([0u8; 2 * SHARE_LEN]);
            plain[..SHARE_LEN].copy_from_slice(&seed.to_bytes());
            plain[SHARE_LEN..].copy_from_slice(&key.to_bytes());
            shares.push(EncryptedShare {
                from: self.me.clone(),
                to: peer.clone(),
                ciphertext: keys::seal(&enc, round, &self.me, peer, plain.as_ref()),
            });
        }
        self.peers = peers;
        self.open_keys = open_keys;
        self.phase = StorePhase::SharesSent;
        Ok(EncryptedShares {
            round: self.plan.round(),
            from: self.me.clone(),
            shares,
        })
    }

    /// Step 3: opens the bundles neighbours sent and derives a pairwise mask key with each
    /// of them; those neighbours, and only those, enter this store's masks.
    ///
    /// # Errors
    ///
    /// [`StoreError`] for a message of another round or store, a bundle from a store whose
    /// keys were not announced, a repeated sender, or a bundle that fails to open.
    pub fn handle_shares(&mut self, msg: &SharesForStore) -> Result<(), StoreError> {
        self.check(
            msg.round,
            &msg.to,
            StorePhase::SharesSent,
            "receiving shares",
        )?;
        let round = self.plan.round();
        let my_x = (self.position + 1) as u64;
        let mut held = BTreeMap::new();
        let mut pair_keys = Vec::with_capacity(msg.shares.len());
        for bundle in &msg.shares {
            let from = &bundle.from;
            let Some(keys) = self.peers.get(from).filter(|_| !held.contains_key(from)) else {
                return Err(StoreError::UnexpectedPeer(from.clone()));
            };
            if bundle.to != self.me {
                return Err(StoreError::NotForThisStore(bundle.to.clone()));
            }
            let enc = self
                .open_keys
                .get(from)
                .ok_or_else(|| StoreError::UnexpectedPeer(from.clone()))?;
            let plain = keys::open(enc, round, from, &self.me, &bundle.ciphertext)
                .map(Zeroizing::new)
                .ok_or_else(|| StoreError::BadBundle(from.clone()))?;
            let pair = parse_bundle(&plain)
                .filter(|p| p.seed.x == my_x && p.key.x == my_x)
                .ok_or_else(|| StoreError::BadBundle(from.clone()))?;
            let mask = keys::derive(
                &self.mask_secret,
                &keys.mask,
                round,
                Purpose::PairwiseMask,
                &self.me,
                from,
            )
            .ok_or_else(|| StoreError::WeakKey(from.clone()))?;
            held.insert(from.clone(), pair);
            pair_keys.push((from.clone(), Zeroizing::new(mask)));
        }
        self.held = held;
        self.pair_keys = pair_keys;
        self.phase = StorePhase::ReadyToUpload;
        Ok(())
    }

    /// Step 4: masks the quantised update with the self mask and the pairwise masks. It
    /// runs once per round: masking a second input with the same masks would reveal the
    /// difference of the two.
    ///
    /// # Errors
    ///
    /// [`StoreError::WrongPhase`] before step 3 or on a second call,
    /// [`StoreError::WrongLength`] for an update of another plan.
    pub fn mask(&mut self, update: &QuantisedUpdate) -> Result<MaskedUpdate, StoreError> {
        if self.phase != StorePhase::ReadyToUpload {
            return Err(self.wrong_phase("masking"));
        }
        let expected = self.plan.vector_len();
        if update.values().len() != expected {
            return Err(StoreError::WrongLength {
                expected,
                got: update.values().len(),
            });
        }
        let r = self.plan.ring_bits();
        let mut v = update.values().to_vec();
        if self.plan.masking() == Masking::Secure {
            apply_mask(&mut v, &self.mask_seed, false, r);
            // The lower id adds the pair's mask and the higher subtracts it, so the two
            // cancel in any sum that holds both.
            for (peer, key) in &self.pair_keys {
                apply_mask(&mut v, key, *peer < self.me, r);
            }
            reduce(&mut v, r);
        }
        let vector = PackedVector::pack(&v, r)?;
        self.phase = StorePhase::Uploaded;
        Ok(MaskedUpdate {
            round: self.plan.round(),
            store: self.me.clone(),
            vector,
        })
    }

    /// The state to save once the masked update exists, and after every release.
    ///
    /// # Errors
    ///
    /// [`StoreError::WrongPhase`] before masking.
    pub fn unmask_state(&self) -> Result<UnmaskState, StoreError> {
        if self.phase != StorePhase::Uploaded {
            return Err(self.wrong_phase("saving the unmask state"));
        }
        Ok(UnmaskState {
            plan: self.plan.config().clone(),
            me: self.me.clone(),
            held: self
                .held
                .iter()
                .map(|(peer, h)| {
                    (
                        peer.clone(),
                        h.seed.to_bytes().to_vec(),
                        h.key.to_bytes().to_vec(),
                    )
                })
                .collect(),
            released_seed: self.released_seed.clone(),
            released_key: self.released_key.clone(),
        })
    }

    /// A session after a restart, from its saved state: it answers unmask requests, with
    /// the releases it made before, and can do nothing else. `rng` fills the key slots a
    /// resumed session never uses.
    ///
    /// # Errors
    ///
    /// [`StoreError::BadState`] when the state's plan, store or shares do not fit.
    pub fn resume<R: RngCore + CryptoRng>(
        state: &UnmaskState,
        rng: &mut R,
    ) -> Result<Self, StoreError> {
        let bad = |why: String| StoreError::BadState(why);
        let plan = SecAggPlan::new(state.plan.clone()).map_err(|e| bad(e.to_string()))?;
        let position = plan
            .position(&state.me)
            .ok_or_else(|| bad(format!("store {} is not in the plan", state.me)))?;
        let mut held = BTreeMap::new();
        for (peer, seed, key) in &state.held {
            let neighbour = plan
                .position(peer)
                .is_some_and(|p| plan.graph().are_neighbours(position, p));
            let share = |bytes: &[u8]| Share::from_bytes(bytes).map_err(|e| bad(e.to_string()));
            let pair = HeldShares {
                seed: share(seed)?,
                key: share(key)?,
            };
            let x = (position + 1) as u64;
            if !neighbour || pair.seed.x != x || pair.key.x != x {
                return Err(bad(format!("shares of {peer} do not belong here")));
            }
            held.insert(peer.clone(), pair);
        }
        let mut mask_seed = Zeroizing::new([0u8; 32]);
        rng.fill_bytes(mask_seed.as_mut());
        Ok(Self {
            plan,
            me: state.me.clone(),
            position,
            phase: StorePhase::Uploaded,
            cipher_secret: StaticSecret::random_from_rng(&mut *rng),
            mask_secret: StaticSecret::random_from_rng(&mut *rng),
            mask_seed,
            peers: BTreeMap::new(),
            open_keys: BTreeMap::new(),
            held,
            pair_keys: Vec::new(),
            released_seed: state.released_seed.clone(),
            released_key: state.released_key.clone(),
        })
    }

    /// Step 5: releases the requested shares. All checks run before anything is released:
    /// a request naming a peer in both lists, or naming a peer for the kind other than the
    /// one already released for it, is refused whole.
    ///
    /// # Errors
    ///
    /// [`StoreError::BothShareKinds`] for such a request, [`StoreError::UnexpectedPeer`]
    /// for a peer whose shares this store does not hold, or a round, address or phase
    /// mismatch.
    pub fn handle_unmask_request(
        &mut self,
        req: &UnmaskRequest,
    ) -> Result<UnmaskResponse, StoreError> {
        self.check(req.round, &req.to, StorePhase::Uploaded, "unmasking")?;

        // 1. Refuse any peer whose other share kind is asked for or already out.
        let seed_set: BTreeSet<&StoreId> = req.seed_shares_of.iter().collect();
        let key_set: BTreeSet<&StoreId> = req.key_shares_of.iter().collect();
        if seed_set.len() != req.seed_shares_of.len() || key_set.len() != req.key_shares_of.len() {
            return Err(StoreError::UnexpectedPeer(self.me.clone()));
        }
        for peer in &seed_set {
            if key_set.contains(peer) || self.released_key.contains(*peer) {
                return Err(StoreError::BothShareKinds((*peer).clone()));
            }
        }
        if let Some(peer) = key_set.iter().find(|p| self.released_seed.contains(**p)) {
            return Err(StoreError::BothShareKinds((*peer).clone()));
        }
        let unknown = seed_set
            .iter()
            .chain(&key_set)
            .find(|p| !self.held.contains_key(**p));
        if let Some(peer) = unknown {
            return Err(StoreError::UnexpectedPeer((*peer).clone()));
        }

        // 2. Release and remember.
        let reveal = |peer: &StoreId, share: &Share| RevealedShare {
            of: peer.clone(),
            share: share.to_bytes().to_vec(),
        };
        let mut seed_shares = Vec::with_capacity(seed_set.len());
        for peer in seed_set {
            seed_shares.push(reveal(peer, &self.held[peer].seed));
            self.released_seed.insert(peer.clone());
        }
        let mut key_shares = Vec::with_capacity(key_set.len());
        for peer in key_set {
            key_shares.push(reveal(peer, &self.held[peer].key));
            self.released_key.insert(peer.clone());
        }
        Ok(UnmaskResponse {
            round: self.plan.round(),
            from: self.me.clone(),
            seed_shares,
            key_shares,
        })
    }

    fn x_of(&self, peer: &StoreId) -> u64 {
        self.plan.position(peer).map_or(0, |p| p as u64 + 1)
    }

    fn check(
        &self,
        round: RoundId,
        to: &StoreId,
        phase: StorePhase,
        step: &'static str,
    ) -> Result<(), StoreError> {
        if round != self.plan.round() {
            return Err(StoreError::WrongRound {
                expected: self.plan.round(),
                got: round,
            });
        }
        if *to != self.me {
            return Err(StoreError::NotForThisStore(to.clone()));
        }
        if self.phase != phase {
            return Err(self.wrong_phase(step));
        }
        Ok(())
    }

    fn wrong_phase(&self, step: &'static str) -> StoreError {
        StoreError::WrongPhase {
            step,
            phase: self.phase.name(),
        }
    }
}

impl std::fmt::Debug for StoreSession {
    // Secrets stay out of logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreSession")
            .field("store", &self.me)
            .field("round", &self.plan.round())
            .field("phase", &self.phase)
            .finish_non_exhaustive()
    }
}

fn parse_bundle(plain: &[u8]) -> Option<HeldShares> {
    if plain.len() != 2 * SHARE_LEN {
        return None;
    }
    Some(HeldShares {
        seed: Share::from_bytes(&plain[..SHARE_LEN]).ok()?,
        key: Share::from_bytes(&plain[SHARE_LEN..]).ok()?,
    })
}
