//! Core's side of a round: relays keys and shares, collects partial sums, and removes the
//! masks.
//!
//! A [`CoreSession`] is driven by the `handle_*` calls as messages arrive and by
//! [`CoreSession::handle_timeout`] when [`CoreSession::next_deadline`] passes; every call
//! takes the current time and returns the messages to send to stores. Each phase ends early
//! once every store it waits for has answered, and otherwise at its deadline, when the stores
//! that did not answer count as dropped:
//!
//! 1. collecting keys ([`KeyAdvert`]) -> sends [`NeighbourKeys`];
//! 2. collecting shares ([`EncryptedShares`]) -> sends [`SharesForStore`];
//! 3. collecting partial sums ([`PartialSum`]), and updates re-sent on their own
//!    ([`CoreSession::handle_resent_update`]) -> sends [`UnmaskRequest`]s;
//! 4. unmasking ([`UnmaskResponse`]) -> the round's [`RoundOutcome`].
//!
//! Plain mode starts at phase 3 and ends when the uploads are in. The round fails, with a
//! [`RoundFailure`], as soon as fewer stores remain than the plan's minimum, or a secret it
//! needs can no longer be recovered.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use thiserror::Error;
use x25519_dalek::{PublicKey, StaticSecret};
use zeroize::Zeroizing;

use super::keys::{self, Purpose};
use super::messages::{
    EncryptedShare, EncryptedShares, KeyAdvert, MaskedUpdate, NeighbourKeys, PackedVector,
    PartialSum, RevealedShare, SharesForStore, UnmaskRequest, UnmaskResponse,
};
use super::noise::GuaranteedNoise;
use super::plan::{Masking, SecAggPlan};
use super::pop::{FoldError, RingSum};
use super::prg::{apply_mask, reduce};
use super::shamir::{self, SHARE_LEN, Share};
use crate::ids::{RoundId, StoreId};

/// Bytes of an encrypted share bundle: two shares and the Poly1305 tag.
const BUNDLE_LEN: usize = 2 * SHARE_LEN + 16;

/// How long each phase may last. Phase deadlines add up from the session's start: a phase
/// ends at the latest at the start plus its own length and those of the phases before it,
/// however early those ended, so that they stay the absolute deadlines announced to PoPs
/// and stores when the session started (a store or a PoP that times its upload by the
/// announcement is never late because an earlier phase finished early). A plain session
/// starts in [`CorePhase::CollectingUploads`] and still counts `keys` and `shares` in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deadlines {
    /// For key adverts.
    pub keys: Duration,
    /// For encrypted shares.
    pub shares: Duration,
    /// For partial sums.
    pub upload: Duration,
    /// For unmask responses.
    pub unmask: Duration,
}

/// The phases of a round at core.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum CorePhase {
    /// Waiting for key adverts.
    CollectingKeys,
    /// Waiting for encrypted shares.
    CollectingShares,
    /// Waiting for partial sums.
    CollectingUploads,
    /// Waiting for unmask responses.
    Unmasking,
    /// Done, with an outcome.
    Finished,
}

/// A message core sends to one store (through its PoP).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outgoing {
    /// The receiving store.
    pub to: StoreId,
    /// What to send.
    pub message: ToStore,
}

/// The messages core sends to stores.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToStore {
    /// After phase 1.
    NeighbourKeys(NeighbourKeys),
    /// After phase 2.
    Shares(SharesForStore),
    /// After phase 3.
    Unmask(UnmaskRequest),
}

/// A round that ended without a sum, and why.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum RoundFailure {
    /// Too few stores were left after a phase.
    #[error("only {survivors} stores left after {phase:?}, the round needs {needed}")]
    TooFewStores {
        /// The phase that ended.
        phase: CorePhase,
        /// Stores left.
        survivors: usize,
        /// The plan's minimum.
        needed: usize,
    },
    /// A store's secret has fewer holders (or answering holders) than the threshold.
    #[error("secret of store {store} has {have} usable shares, {need} needed")]
    SharesMissing {
        /// Whose secret.
        store: StoreId,
        /// Shares available.
        have: usize,
        /// Threshold.
        need: usize,
    },
    /// Shares recombined into something other than the secret they claim to be.
    #[error("shares of store {0} are inconsistent")]
    InconsistentShares(StoreId),
}

/// A message core refused; the round goes on without it.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum CoreError {
    /// The message belongs to another round.
    #[error("message is for round {got}, core is in round {expected}")]
    WrongRound {
        /// The session's round.
        expected: RoundId,
        /// The message's round.
        got: RoundId,
    },
    /// The message is not expected in the current phase (late, early or repeated).
    #[error("{0} is not expected now")]
    Unexpected(&'static str),
    /// The sender may not send this (not in the cohort, dropped earlier, or repeated).
    #[error("store {0} may not send this message now")]
    NotExpectedFrom(StoreId),
    /// Share bundles addressed to the wrong stores or of the wrong size.
    #[error("share bundles from {0} do not match its live neighbours")]
    BadShares(StoreId),
    /// An unmask response that does not answer its request.
    #[error("unmask response from {0} does not match its request")]
    BadResponse(StoreId),
    /// A partial sum was refused.
    #[error(transparent)]
    Fold(#[from] FoldError),
}

/// The result of a round that succeeded.
#[derive(Debug, Clone, PartialEq)]
pub struct RoundOutcome {
    /// The cohort sum of the survivors' quantised updates, modulo 2^r; decode with
    /// [`SecAggPlan::decode`].
    pub sum: Vec<u64>,
    /// Stores whose updates are in the sum.
    pub survivors: Vec<StoreId>,
    /// The noise the sum is guaranteed to carry (the planned minimum of stores' shares):
    /// what the ledger charges.
    pub noise: Option<GuaranteedNoise>,
    /// The noise the sum carries if every survivor added its share; for monitoring only.
    pub realised_noise: Option<GuaranteedNoise>,
}

/// Core's state for one round.
#[derive(Debug)]
pub struct CoreSession {
    plan: SecAggPlan,
    deadlines: Deadlines,
    phase: CorePhase,
    /// When the session started; every phase deadline counts from here.
    started: Instant,
    phase_ends: Instant,
    /// U1: stores that advertised keys, by cohort position.
    adverts: BTreeMap<usize, KeyAdvert>,
    /// U2: stores that sent their shares, with the bundles until they are forwarded.
    shared: BTreeMap<usize, Vec<EncryptedShare>>,
    /// U3 and the sum of their masked updates.
    sum: RingSum,
    /// Masked updates re-sent on their own, by cohort position, held apart until uploads
    /// close: the PoP that first took one may still forward a sum carrying it, and a sum
    /// cannot give one store's vector back. Only those still missing from `sum` then are
    /// folded.
    resent: BTreeMap<usize, PackedVector>,
    /// Stores asked in phase 4, and what each was asked for.
    requests: BTreeMap<usize, UnmaskRequest>,
    answered: BTreeSet<usize>,
    seed_shares: BTreeMap<usize, Vec<Share>>,
    key_shares: BTreeMap<usize, Vec<Share>>,
    outcome: Option<Result<RoundOutcome, RoundFailure>>,
}

impl CoreSession {
    /// Starts the round at `now`.
    pub fn new(plan: SecAggPlan, now: Instant, deadlines: Deadlines) -> Self {
        let secure = plan.masking() == Masking::Secure;
        let phase = if secure {
            CorePhase::CollectingKeys
        } else {
            CorePhase::CollectingUploads
        };
        // In plain mode every cohort store may upload directly.
        let shared = if secure {
            BTreeMap::new()
        } else {
            (0..plan.cohort().len()).map(|i| (i, Vec::new())).collect()
        };
        Self {
            sum: RingSum::new(&plan),
            resent: BTreeMap::new(),
            plan,
            deadlines,
            phase,
            started: now,
            phase_ends: phase_end(now, &deadlines, phase),
            adverts: BTreeMap::new(),
            shared,
            requests: BTreeMap::new(),
            answered: BTreeSet::new(),
            seed_shares: BTreeMap::new(),
            key_shares: BTreeMap::new(),
            outcome: None,
        }
    }

    /// The current phase.
    pub fn phase(&self) -> CorePhase {
        self.phase
    }

    /// When the current phase times out, or `None` once finished.
    pub fn next_deadline(&self) -> Option<Instant> {
        (self.phase != CorePhase::Finished).then_some(self.phase_ends)
    }

    /// The round's result, once finished.
    pub fn outcome(&self) -> Option<&Result<RoundOutcome, RoundFailure>> {
        self.outcome.as_ref()
    }

    /// The plan.
    pub fn plan(&self) -> &SecAggPlan {
        &self.plan
    }

    /// Ends the current phase if its deadline has passed.
    pub fn handle_timeout(&mut self, now: Instant) -> Vec<Outgoing> {
        if self.phase == CorePhase::Finished || now < self.phase_ends {
            return Vec::new();
        }
        self.advance()
    }

    /// Phase 1: records a store's public keys.
    ///
    /// # Errors
    ///
    /// [`CoreError`] for another round, a late or repeated advert, or a store outside the
    /// cohort.
    pub fn handle_key_advert(
        &mut self,
        now: Instant,
        advert: KeyAdvert,
    ) -> Result<Vec<Outgoing>, CoreError> {
        self.expect(now, advert.round, CorePhase::CollectingKeys, "key advert")?;
        let p = self
            .plan
            .position(&advert.store)
            .filter(|p| !self.adverts.contains_key(p))
            .ok_or_else(|| CoreError::NotExpectedFrom(advert.store.clone()))?;
        self.adverts.insert(p, advert);
        Ok(self.advance_if_complete(self.adverts.len() == self.plan.cohort().len()))
    }

    /// Phase 2: records a store's encrypted bundles, which must be addressed to exactly its
    /// neighbours that advertised keys.
    ///
    /// # Errors
    ///
    /// [`CoreError`] for another round, a late or repeated message, a sender that did not
    /// advertise, or bundles for the wrong stores.
    pub fn handle_encrypted_shares(
        &mut self,
        now: Instant,
        msg: EncryptedShares,
    ) -> Result<Vec<Outgoing>, CoreError> {
        self.expect(
            now,
            msg.round,
            CorePhase::CollectingShares,
            "encrypted shares",
        )?;
        let p = self
            .plan
            .position(&msg.from)
            .filter(|p| self.adverts.contains_key(p) && !self.shared.contains_key(p))
            .ok_or_else(|| CoreError::NotExpectedFrom(msg.from.clone()))?;

        let expected: Vec<&StoreId> = self
            .live_neighbours(p)
            .map(|q| &self.adverts[&q].store)
            .collect();
        let mut to: Vec<&StoreId> = msg.shares.iter().map(|s| &s.to).collect();
        to.sort();
        let well_formed = msg
            .shares
            .iter()
            .all(|s| s.from == msg.from && s.ciphertext.len() == BUNDLE_LEN);
        if to != expected || !well_formed {
            return Err(CoreError::BadShares(msg.from));
        }
        self.shared.insert(p, msg.shares);
        Ok(self.advance_if_complete(self.shared.len() == self.adverts.len()))
    }

    /// Phase 3: folds a PoP's partial sum.
    ///
    /// # Errors
    ///
    /// [`CoreError`] for another round, a late sum, a contributor that did not share its
    /// keys, or a contributor already counted; the sum is unchanged.
    pub fn handle_partial_sum(
        &mut self,
        now: Instant,
        partial: PartialSum,
    ) -> Result<Vec<Outgoing>, CoreError> {
        self.expect(
            now,
            partial.round,
            CorePhase::CollectingUploads,
            "partial sum",
        )?;
        for s in &partial.contributors {
            if !self
                .plan
                .position(s)
                .is_some_and(|p| self.shared.contains_key(&p))
            {
                return Err(CoreError::NotExpectedFrom(s.clone()));
            }
        }
        self.sum.fold(
            &self.plan,
            partial.round,
            &partial.contributors,
            &partial.vector,
        )?;
        Ok(self.advance_if_complete(self.uploads_complete()))
    }

    /// Phase 3: takes one store's masked update sent again on its own, after the PoP that
    /// first accepted it failed to forward it (the PoP died, or its sum is late). The update
    /// is held apart until uploads close and folded then only if no partial sum brought
    /// the same store's update meanwhile, so a store is never counted twice and a PoP's
    /// late sum is never refused for it. Memory: one vector per re-sent update.
    ///
    /// A store already counted, or already held, is answered with no change: the re-send
    /// is settled either way.
    ///
    /// # Errors
    ///
    /// [`CoreError`] for another round, a late update, a store that did not share its keys,
    /// or a vector that does not fit the plan; nothing is held then.
    pub fn handle_resent_update(
        &mut self,
        now: Instant,
        update: MaskedUpdate,
    ) -> Result<Vec<Outgoing>, CoreError> {
        self.expect(
            now,
            update.round,
            CorePhase::CollectingUploads,
            "re-sent update",
        )?;
        let p = self
            .plan
            .position(&update.store)
            .filter(|p| self.shared.contains_key(p))
            .ok_or_else(|| CoreError::NotExpectedFrom(update.store.clone()))?;
        update
            .vector
            .unpack(self.plan.ring_bits(), self.plan.vector_len())
            .map_err(FoldError::from)?;

        if self.sum.contributors().contains(&update.store) || self.resent.contains_key(&p) {
            return Ok(Vec::new());
        }
        self.resent.insert(p, update.vector);
        Ok(self.advance_if_complete(self.uploads_complete()))
    }

    /// Whether the update of `store` is in the sum or held as a re-send.
    pub fn holds_update_of(&self, store: &StoreId) -> bool {
        self.sum.contributors().contains(store)
            || self
                .plan
                .position(store)
                .is_some_and(|p| self.resent.contains_key(&p))
    }

    /// Every store that shared its keys has its update in the sum or held as a re-send.
    fn uploads_complete(&self) -> bool {
        let held = self
            .resent
            .keys()
            .filter(|&&p| !self.sum.contributors().contains(&self.plan.cohort()[p]))
            .count();
        self.sum.contributors().len() + held == self.shared.len()
    }

    /// Folds the re-sent updates of stores no partial sum brought, as uploads close.
    fn fold_resent(&mut self) {
        let round = self.plan.round();
        for (p, vector) in std::mem::take(&mut self.resent) {
            let store = self.plan.cohort()[p].clone();
            if self.sum.contributors().contains(&store) {
                continue;
            }
            // Checked when it arrived and the store is not in the sum: this cannot fail.
            let folded = self.sum.fold(&self.plan, round, &[store], &vector);
            debug_assert!(folded.is_ok(), "a held re-send no longer folds: {folded:?}");
        }
    }

    /// Phase 4: records the shares a surviving store released.
    ///
    /// # Errors
    ///
    /// [`CoreError`] for another round, a store not asked, a repeated answer, or shares that
    /// do not match the request or do not parse.
    pub fn handle_unmask_response(
        &mut self,
        now: Instant,
        resp: UnmaskResponse,
    ) -> Result<Vec<Outgoing>, CoreError> {
        self.expect(now, resp.round, CorePhase::Unmasking, "unmask response")?;
        let p = self
            .plan
            .position(&resp.from)
            .filter(|p| self.requests.contains_key(p) && !self.answered.contains(p))
            .ok_or_else(|| CoreError::NotExpectedFrom(resp.from.clone()))?;
        let req = &self.requests[&p];
        let x = p as u64 + 1;
        let bad = || CoreError::BadResponse(resp.from.clone());
        let seeds = self
            .parse_revealed(&resp.seed_shares, &req.seed_shares_of, x)
            .ok_or_else(bad)?;
        let keys = self
            .parse_revealed(&resp.key_shares, &req.key_shares_of, x)
            .ok_or_else(bad)?;

        for (of, share) in seeds {
            self.seed_shares.entry(of).or_default().push(share);
        }
        for (of, share) in keys {
            self.key_shares.entry(of).or_default().push(share);
        }
        self.answered.insert(p);
        let complete = self.enough_shares();
        Ok(self.advance_if_complete(complete))
    }

    /// Checks that a message fits the session now: its round, its phase, and before the
    /// phase's deadline (a message at or past it is late, even if no timeout ran yet).
    fn expect(
        &self,
        now: Instant,
        round: RoundId,
        phase: CorePhase,
        what: &'static str,
    ) -> Result<(), CoreError> {
        if round != self.plan.round() {
            return Err(CoreError::WrongRound {
                expected: self.plan.round(),
                got: round,
            });
        }
        if self.phase != phase || now >= self.phase_ends {
            return Err(CoreError::Unexpected(what));
        }
        Ok(())
    }

    /// Neighbours of position `p` that advertised keys (U1), ascending by id.
    fn live_neighbours(&self, p: usize) -> impl Iterator<Item = usize> + '_ {
        self.plan
            .graph()
            .neighbours(p)
            .iter()
            .map(|&q| q as usize)
            .filter(|q| self.adverts.contains_key(q))
    }

    fn advance_if_complete(&mut self, complete: bool) -> Vec<Outgoing> {
        if complete { self.advance() } else { Vec::new() }
    }

    /// Ends the current phase: checks the survivors and emits the next phase's messages.
    fn advance(&mut self) -> Vec<Outgoing> {
        if self.phase == CorePhase::CollectingUploads {
            self.fold_resent();
        }
        let needed = self.plan.min_survivors();
        let left = match self.phase {
            CorePhase::CollectingKeys => self.adverts.len(),
            CorePhase::CollectingShares => self.shared.len(),
            CorePhase::CollectingUploads => self.sum.contributors().len(),
            CorePhase::Unmasking | CorePhase::Finished => needed,
        };
        if left < needed {
            self.fail(RoundFailure::TooFewStores {
                phase: self.phase,
                survivors: left,
                needed,
            });
            return Vec::new();
        }
        match self.phase {
            CorePhase::CollectingKeys => {
                self.enter(CorePhase::CollectingShares);
                self.send_neighbour_keys()
            }
            CorePhase::CollectingShares => {
                self.enter(CorePhase::CollectingUploads);
                self.send_shares()
            }
            CorePhase::CollectingUploads if self.plan.masking() == Masking::Plain => {
                self.finish();
                Vec::new()
            }
            CorePhase::CollectingUploads => {
                self.enter(CorePhase::Unmasking);
                self.send_unmask_requests()
            }
            CorePhase::Unmasking => {
                self.unmask();
                Vec::new()
            }
            CorePhase::Finished => Vec::new(),
        }
    }

    fn enter(&mut self, phase: CorePhase) {
        self.phase = phase;
        self.phase_ends = phase_end(self.started, &self.deadlines, phase);
    }

    fn fail(&mut self, failure: RoundFailure) {
        self.phase = CorePhase::Finished;
        self.outcome = Some(Err(failure));
    }

    fn send_neighbour_keys(&self) -> Vec<Outgoing> {
        let round = self.plan.round();
        self.adverts
            .iter()
            .map(|(&p, advert)| {
                let adverts = self
                    .live_neighbours(p)
                    .map(|q| self.adverts[&q].clone())
                    .collect();
                let to = advert.store.clone();
                Outgoing {
                    to: to.clone(),
                    message: ToStore::NeighbourKeys(NeighbourKeys { round, to, adverts }),
                }
            })
            .collect()
    }

    /// Routes each bundle to its receiver; only stores that shared (U2) receive any, and
    /// only bundles from U2 exist here.
    fn send_shares(&mut self) -> Vec<Outgoing> {
        let round = self.plan.round();
        let mut inbox: BTreeMap<StoreId, Vec<EncryptedShare>> = self
            .shared
            .keys()
            .map(|p| (self.plan.cohort()[*p].clone(), Vec::new()))
            .collect();
        for bundles in self.shared.values_mut() {
            for bundle in std::mem::take(bundles) {
                if let Some(list) = inbox.get_mut(&bundle.to) {
                    list.push(bundle);
                }
            }
        }
        inbox
            .into_iter()
            .map(|(to, shares)| Outgoing {
                to: to.clone(),
                message: ToStore::Shares(SharesForStore { round, to, shares }),
            })
            .collect()
    }

    /// Asks every survivor (U3) for seed shares of its surviving neighbours and key shares
    /// of its neighbours that shared but did not upload; fails at once if some needed
    /// secret has fewer surviving holders than the threshold.
    fn send_unmask_requests(&mut self) -> Vec<Outgoing> {
        let survivors = self.survivor_positions();
        if let Some(failure) = self.unrecoverable(&survivors, &survivors) {
            self.fail(failure);
            return Vec::new();
        }
        let round = self.plan.round();
        let cohort = self.plan.cohort();
        let mut out = Vec::with_capacity(survivors.len());
        for &v in &survivors {
            let (mut seed_of, mut key_of) = (Vec::new(), Vec::new());
            for &u in self.plan.graph().neighbours(v) {
                let u = u as usize;
                if survivors.contains(&u) {
                    seed_of.push(cohort[u].clone());
                } else if self.shared.contains_key(&u) {
                    key_of.push(cohort[u].clone());
                }
            }
            let req = UnmaskRequest {
                round,
                to: cohort[v].clone(),
                seed_shares_of: seed_of,
                key_shares_of: key_of,
            };
            self.requests.insert(v, req.clone());
            out.push(Outgoing {
                to: req.to.clone(),
                message: ToStore::Unmask(req),
            });
        }
        out
    }

    fn survivor_positions(&self) -> BTreeSet<usize> {
        self.sum
            .contributors()
            .iter()
            .filter_map(|s| self.plan.position(s))
            .collect()
    }

    /// The secrets phase 4 must recover: the seed of every survivor, and the key of every
    /// store that shared, did not upload, and has a surviving neighbour (whose masked update
    /// carries a mask for it).
    fn needed_secrets(&self, survivors: &BTreeSet<usize>) -> (Vec<usize>, Vec<usize>) {
        let seeds = survivors.iter().copied().collect();
        let keys = self
            .shared
            .keys()
            .copied()
            .filter(|u| !survivors.contains(u))
            .filter(|&u| {
                self.plan
                    .graph()
                    .neighbours(u)
                    .iter()
                    .any(|&v| survivors.contains(&(v as usize)))
            })
            .collect();
        (seeds, keys)
    }

    /// The first needed secret with fewer than t holders among `holders`.
    fn unrecoverable(
        &self,
        survivors: &BTreeSet<usize>,
        holders: &BTreeSet<usize>,
    ) -> Option<RoundFailure> {
        let t = self.plan.threshold();
        let (seeds, keys) = self.needed_secrets(survivors);
        for u in seeds.into_iter().chain(keys) {
            // Holders of u's shares: its neighbours that received them (U2) and are asked.
            let have = self
                .plan
                .graph()
                .neighbours(u)
                .iter()
                .filter(|&&v| {
                    holders.contains(&(v as usize)) && self.shared.contains_key(&(v as usize))
                })
                .count();
            if have < t {
                return Some(RoundFailure::SharesMissing {
                    store: self.plan.cohort()[u].clone(),
                    have,
                    need: t,
                });
            }
        }
        None
    }

    fn enough_shares(&self) -> bool {
        let t = self.plan.threshold();
        let (seeds, keys) = self.needed_secrets(&self.survivor_positions());
        let count = |m: &BTreeMap<usize, Vec<Share>>, u: &usize| m.get(u).map_or(0, Vec::len);
        seeds.iter().all(|u| count(&self.seed_shares, u) >= t)
            && keys.iter().all(|u| count(&self.key_shares, u) >= t)
    }

    /// Checks a response list against the request: exactly the peers asked, each share
    /// parsing and held at the responder's point.
    fn parse_revealed(
        &self,
        revealed: &[RevealedShare],
        asked: &[StoreId],
        x: u64,
    ) -> Option<Vec<(usize, Share)>> {
        if revealed.len() != asked.len() {
            return None;
        }
        let mut out = Vec::with_capacity(revealed.len());
        for (r, a) in revealed.iter().zip(asked) {
            let share = Share::from_bytes(&r.share).ok().filter(|s| s.x == x)?;
            if r.of != *a {
                return None;
            }
            out.push((self.plan.position(a)?, share));
        }
        Some(out)
    }

    fn finish(&mut self) {
        let survivors: Vec<StoreId> = self.sum.contributors().iter().cloned().collect();
        let realised_noise = self.plan.noise_with(survivors.len());
        let sum = std::mem::replace(&mut self.sum, RingSum::new(&self.plan)).into_values();
        self.phase = CorePhase::Finished;
        self.outcome = Some(Ok(RoundOutcome {
            sum,
            survivors,
            noise: self.plan.planned_noise(),
            realised_noise,
        }));
    }

    /// Removes the masks, or fails with the first secret that cannot be recovered.
    fn unmask(&mut self) {
        match self.remove_masks() {
            Ok(()) => self.finish(),
            Err(failure) => self.fail(failure),
        }
    }

    fn remove_masks(&mut self) -> Result<(), RoundFailure> {
        let survivors = self.survivor_positions();
        let answered = self.answered.clone();
        if let Some(failure) = self.unrecoverable(&survivors, &answered) {
            return Err(failure);
        }
        let (seeds, keys) = self.needed_secrets(&survivors);
        let t = self.plan.threshold();
        let r = self.plan.ring_bits();
        let cohort = self.plan.cohort().to_vec();
        let inconsistent = |u: usize| RoundFailure::InconsistentShares(cohort[u].clone());
        let mut values = std::mem::take(self.sum.values_vec_mut());

        // 1. Self masks of the survivors.
        for u in seeds {
            let shares = self.seed_shares.get(&u).map_or(&[][..], Vec::as_slice);
            let seed = Zeroizing::new(shamir::reconstruct(shares, t).map_err(|_| inconsistent(u))?);
            apply_mask(&mut values, &seed, true, r);
        }

        // 2. Pairwise masks the survivors added for neighbours that dropped after sharing.
        for u in keys {
            let shares = self.key_shares.get(&u).map_or(&[][..], Vec::as_slice);
            let bytes =
                Zeroizing::new(shamir::reconstruct(shares, t).map_err(|_| inconsistent(u))?);
            let secret = StaticSecret::from(*bytes);
            if PublicKey::from(&secret).to_bytes() != self.adverts[&u].mask_key {
                return Err(inconsistent(u));
            }
            for &v in self.plan.graph().neighbours(u) {
                let v = v as usize;
                if !survivors.contains(&v) {
                    continue;
                }
                let peer = PublicKey::from(self.adverts[&v].mask_key);
                let key = keys::derive(
                    &secret,
                    &peer,
                    self.plan.round(),
                    Purpose::PairwiseMask,
                    &cohort[u],
                    &cohort[v],
                )
                .map(Zeroizing::new)
                .ok_or_else(|| inconsistent(v))?;
                // v added the mask if v < u, subtracted it otherwise; undo that.
                apply_mask(&mut values, &key, cohort[v] < cohort[u], r);
            }
        }
        reduce(&mut values, r);
        *self.sum.values_vec_mut() = values;
        Ok(())
    }
}

/// The latest end of `phase` for a session started at `started`: the lengths of the phases
/// up to and including it, added up.
fn phase_end(started: Instant, d: &Deadlines, phase: CorePhase) -> Instant {
    let lengths = [d.keys, d.shares, d.upload, d.unmask];
    let upto = match phase {
        CorePhase::CollectingKeys => 1,
        CorePhase::CollectingShares => 2,
        CorePhase::CollectingUploads => 3,
        CorePhase::Unmasking | CorePhase::Finished => 4,
    };
    started + lengths[..upto].iter().sum::<Duration>()
}
