//! The rounds open at this PoP: one [`RoundAccumulator`] per partial sum, the contributors'
//! reports kept beside it, and the partial sums waiting for core's acknowledgement.
//!
//! # On disk
//!
//! Each partial sum ("part") of a round has a directory `parts/r<round>-p<part>/` under the
//! state directory, holding:
//! - `round-<round>.partial`: the sum and its contributors ([`StateDir`]), replaced at every
//!   checkpoint;
//! - `contributions.json`: each contributor's [`Contribution`] and upload id, written before
//!   the checkpoint, so every store in the sum has its report;
//! - `acked` once core acknowledged the sum (the sum itself is deleted then; the
//!   contributions stay so that a re-sent update is still known as a duplicate).
//!
//! A round's first part closes when every store whose key advert went through this PoP has
//! uploaded, or at the plan's forwarding time (`PhaseDeadlines::pop_forward_ms`, shortly
//! before the upload deadline, so that the sum reaches core in time). Uploads after an
//! early close open a further part. After a restart every part still holding a sum is
//! forwarded as it stands: its stores were acknowledged and will not upload again.
//!
//! An update a store sends again because another PoP took it and never got it to core
//! ([`wire::UpdateHeader::resent`]) gets a part of its own, marked by a `resent` file: it
//! is taken until the upload deadline, past the forwarding time, and forwarded alone as
//! soon as it is durable, so that core can hold it apart from the other PoP's sum.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use fedmesh_policy::Decision;
use fedmesh_protocol::ids::{RoundId, StoreId};
use fedmesh_protocol::secagg::SecAggPlan;
use fedmesh_protocol::wire::{self, Contribution, PartialSumHeader, RoundAnnouncement};
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::durable::{StateDir, StateError};
use crate::fold::{self, Rejection, RoundAccumulator, RoundSpec, UpdateFold};
use crate::ring::Ring;

/// Why a round or an upload could not be handled.
#[derive(Debug, Error)]
pub enum RoundError {
    /// The update was refused; it touched no sum.
    #[error(transparent)]
    Rejected(#[from] Rejection),
    /// The disk failed; the update is not acknowledged.
    #[error(transparent)]
    State(#[from] StateError),
    /// The announced plan cannot be used.
    #[error("round {round}: unusable plan: {message}")]
    BadPlan {
        /// The round.
        round: RoundId,
        /// What is wrong.
        message: String,
    },
}

/// A contributor's report and the upload id that brought it.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Contributed {
    contribution: Contribution,
    upload_id: String,
}

/// How an upload may go on after its header was checked.
#[derive(Debug)]
pub enum Admission {
    /// Stream the payload into this fold, then [`Rounds::commit`] it.
    Fold(Box<UpdateFold>),
    /// The same upload (same store and upload id) is already held durably: answer its
    /// receipt again.
    AlreadyHeld,
}

/// A closed partial sum waiting for core's acknowledgement.
#[derive(Debug, Clone)]
pub struct PendingSum {
    /// The round.
    pub round: RoundId,
    /// Which partial sum of the round.
    pub part: u32,
    /// The header core receives.
    pub header: PartialSumHeader,
    /// The packed sum.
    pub body: bytes::Bytes,
    /// Attempts so far.
    pub attempts: u32,
    /// Not before this instant.
    pub next_attempt: Instant,
}

#[derive(Debug)]
struct OpenPart {
    index: u32,
    dir: StateDir,
    acc: RoundAccumulator,
    contributed: BTreeMap<StoreId, Contributed>,
}

#[derive(Debug)]
struct RoundState {
    spec: RoundSpec,
    /// Core's upload deadline: re-sent updates are taken until then.
    upload_deadline: Instant,
    /// Parts of one re-sent update each, while the update streams in.
    resending: BTreeMap<StoreId, OpenPart>,
    advertised: BTreeSet<StoreId>,
    // Upload id of every store in any part of the round, closed parts included.
    seen: BTreeMap<StoreId, String>,
    next_part: u32,
    open: Option<OpenPart>,
    rejected: BTreeMap<String, u64>,
}

/// Every round this PoP knows, and the partial sums owed to core.
#[derive(Debug)]
pub struct Rounds {
    root: PathBuf,
    metro: String,
    rounds: BTreeMap<RoundId, RoundState>,
    // What a restart found of rounds not planned since: stores seen and the next part.
    recovered: BTreeMap<RoundId, (BTreeMap<StoreId, String>, u32)>,
    pending: Vec<PendingSum>,
    newest: Option<RoundId>,
}

impl Rounds {
    /// Opens the state under `root` and recovers every partial sum not yet acknowledged;
    /// they are pending at once.
    ///
    /// # Errors
    /// [`StateError`] when the directory cannot be read or a saved sum is corrupt.
    pub fn recover(root: &Path, metro: &str) -> Result<Self, StateError> {
        let parts = root.join("parts");
        fs::create_dir_all(&parts).map_err(|source| io_error(&parts, source))?;
        let mut rounds = Self {
            root: root.to_path_buf(),
            metro: metro.to_owned(),
            rounds: BTreeMap::new(),
            recovered: BTreeMap::new(),
            pending: Vec::new(),
            newest: None,
        };
        let entries = fs::read_dir(&parts).map_err(|source| io_error(&parts, source))?;
        let mut found = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|source| io_error(&parts, source))?;
            if let Some((round, part)) = entry.file_name().to_str().and_then(parse_part_name) {
                found.push((round, part, entry.path()));
            }
        }
        found.sort();
        for (round, part, dir) in found {
            rounds.recover_part(round, part, &dir)?;
        }
        Ok(rounds)
    }

    fn recover_part(&mut self, round: RoundId, part: u32, dir: &Path) -> Result<(), StateError> {
        let contributed = read_contributions(dir)?;
        let resent = dir.join(RESENT_MARKER).exists();
        let (seen, next) = self.recovered.entry(round).or_default();
        *next = (*next).max(part + 1);
        if dir.join("acked").exists() {
            seen.extend(
                contributed
                    .into_iter()
                    .map(|(store, c)| (store, c.upload_id)),
            );
            return Ok(());
        }
        let state = StateDir::open(dir)?;
        let Some(saved) = state.load(round)? else {
            // Nothing was ever acknowledged from this part.
            let _ = fs::remove_dir_all(dir);
            return Ok(());
        };
        let mut contributors = Vec::with_capacity(saved.contributors.len());
        for store in &saved.contributors {
            let Some(c) = contributed.get(store) else {
                return Err(StateError::Corrupt {
                    path: dir.join("contributions.json"),
                    what: format!("store {store} is in the sum but has no report"),
                });
            };
            seen.insert(store.clone(), c.upload_id.clone());
            contributors.push(c.contribution.clone());
        }
        tracing::info!(
            round.id = round.0,
            part,
            contributors = contributors.len(),
            "partial sum recovered, forwarding again"
        );
        self.pending.push(PendingSum {
            round,
            part,
            header: PartialSumHeader {
                round,
                pop: self.metro.clone(),
                ring_bits: saved.ring.bits(),
                len: saved.values.len() as u32,
                contributors,
                rejected: BTreeMap::new(),
                resent,
            },
            body: saved.ring.pack(&saved.values).into(),
            attempts: 0,
            next_attempt: Instant::now(),
        });
        Ok(())
    }

    /// Takes note of core's announcement: opens the round if it is new and `accept_new`.
    ///
    /// # Errors
    /// [`RoundError::BadPlan`] when the plan is not a usable secure-aggregation plan.
    pub fn plan(
        &mut self,
        announcement: &RoundAnnouncement,
        accept_new: bool,
    ) -> Result<bool, RoundError> {
        let round = announcement.round;
        if self.rounds.contains_key(&round) || !accept_new {
            return Ok(false);
        }
        if self.newest.is_some_and(|newest| round < newest) {
            return Ok(false);
        }
        let bad = |message: String| RoundError::BadPlan { round, message };
        if announcement.mode != wire::AggregationMode::Secure {
            return Err(bad("only secure aggregation is served".into()));
        }
        let plan = SecAggPlan::new(announcement.plan.clone()).map_err(|e| bad(e.to_string()))?;
        if plan.round() != round {
            return Err(bad(format!("plan is for round {}", plan.round())));
        }
        let ring = Ring::new(plan.ring_bits()).map_err(|e| bad(e.to_string()))?;
        let spec = RoundSpec {
            round,
            model_version: announcement.model_version,
            ring,
            len: plan.vector_len(),
            expected: plan.cohort().iter().cloned().collect(),
            // Early enough that the sum reaches core while it still collects.
            deadline: instant_of_unix_ms(announcement.deadlines.pop_forward_ms()),
        };
        let (seen, next_part) = self.recovered.remove(&round).unwrap_or_default();
        self.rounds.insert(
            round,
            RoundState {
                spec,
                upload_deadline: instant_of_unix_ms(announcement.deadlines.upload_ms),
                resending: BTreeMap::new(),
                advertised: BTreeSet::new(),
                seen,
                next_part,
                open: None,
                rejected: BTreeMap::new(),
            },
        );
        self.newest = Some(round);
        self.forget_settled_before(round);
        tracing::info!(round.id = round.0, "round opened");
        Ok(true)
    }

    /// Drops rounds before `round` whose sums core has acknowledged.
    fn forget_settled_before(&mut self, round: RoundId) {
        let pending: BTreeSet<RoundId> = self.pending.iter().map(|p| p.round).collect();
        let old: Vec<RoundId> = self
            .rounds
            .iter()
            .filter(|(id, state)| **id < round && !pending.contains(id) && state.open.is_none())
            .map(|(id, _)| *id)
            .collect();
        let forgotten: Vec<RoundId> = self
            .recovered
            .keys()
            .filter(|id| **id < round && !pending.contains(id))
            .copied()
            .collect();
        for id in old.into_iter().chain(forgotten) {
            self.rounds.remove(&id);
            self.recovered.remove(&id);
            self.remove_part_dirs(id);
        }
    }

    fn remove_part_dirs(&self, round: RoundId) {
        let prefix = format!("r{}-p", round.0);
        let parts = self.root.join("parts");
        let Ok(entries) = fs::read_dir(&parts) else {
            return;
        };
        for entry in entries.flatten() {
            if entry.file_name().to_string_lossy().starts_with(&prefix) {
                let _ = fs::remove_dir_all(entry.path());
            }
        }
    }

    /// Records that `store`'s key advert for `round` went through this PoP.
    pub fn advertised(&mut self, round: RoundId, store: StoreId) {
        if let Some(state) = self.rounds.get_mut(&round) {
            state.advertised.insert(store);
        }
    }

    /// The newest round planned here.
    pub fn newest(&self) -> Option<RoundId> {
        self.newest
    }

    /// Counts a rejection of an update for `round`.
    pub fn count_rejection(&mut self, round: RoundId, rejection: &Rejection) {
        if let Some(state) = self.rounds.get_mut(&round) {
            *state
                .rejected
                .entry(rejection.reason().as_str().to_owned())
                .or_default() += 1;
        }
    }

    /// Checks an upload's header from `store` (authenticated) and starts its fold.
    ///
    /// # Errors
    /// The [`Rejection`] (not yet counted: see [`Rounds::count_rejection`]).
    pub fn begin(
        &mut self,
        store: &StoreId,
        header: &wire::UpdateHeader,
        upload_id: &str,
        decision: &Decision,
        now: Instant,
    ) -> Result<Admission, Rejection> {
        // Policy first: a denied store learns nothing about the round.
        if !decision.allow {
            return Err(Rejection::PolicyDenied {
                rule: decision.rule.clone(),
            });
        }
        let round = header.round;
        let Some(state) = self.rounds.get_mut(&round) else {
            let open = self.newest.unwrap_or(RoundId(0));
            return Err(if round < open {
                Rejection::StaleRound { got: round, open }
            } else {
                Rejection::UnknownRound { got: round, open }
            });
        };

        // A store contributes once to a round across all of its parts; the same upload
        // re-sent after a lost answer is acknowledged again, not counted twice. `seen`
        // holds only durable contributions.
        if let Some(held) = state.seen.get(store) {
            return if held == upload_id {
                Ok(Admission::AlreadyHeld)
            } else {
                Err(Rejection::Duplicate(store.clone()))
            };
        }

        if header.resent {
            return begin_resent(&self.root, state, store, header, decision, now);
        }

        // Uploads after an early forward open a further part, until the deadline.
        if state.open.is_none() {
            if now >= state.spec.deadline {
                return Err(Rejection::RoundClosed(round));
            }
            state.open = Some(open_part(&self.root, state)?);
        }
        let part = state.open.as_mut().ok_or(Rejection::RoundClosed(round))?;
        part.acc
            .begin(store, &fold_header(store, header), decision)
            .map(|fold| Admission::Fold(Box::new(fold)))
    }

    /// Adds a fully received update to its round's open part, makes it durable with the
    /// store's report, and closes the part early when every store that advertised keys
    /// here has contributed.
    ///
    /// # Errors
    /// [`RoundError::Rejected`] (not yet counted) or [`RoundError::State`].
    pub fn commit(
        &mut self,
        round: RoundId,
        fold: UpdateFold,
        contribution: Contribution,
        upload_id: &str,
    ) -> Result<(), RoundError> {
        let Some(state) = self.rounds.get_mut(&round) else {
            return Err(Rejection::RoundClosed(round).into());
        };
        if let Some(part) = state.resending.remove(fold.store()) {
            return self.commit_resent(round, part, fold, contribution, upload_id);
        }
        let Some(part) = state.open.as_mut() else {
            return Err(Rejection::RoundClosed(round).into());
        };
        let store = contribution.store.clone();
        if state.seen.contains_key(&store) {
            part.acc.abort(fold, Rejection::Duplicate(store.clone()));
            return Err(Rejection::Duplicate(store).into());
        }

        // 1. Into the sum, durably with the store's report.
        part.hold(&self.root, round, fold, contribution, upload_id)?;
        state.seen.insert(store, upload_id.to_owned());

        // 2. Early forward once everyone who advertised here is in.
        let everyone = !state.advertised.is_empty()
            && state.advertised.iter().all(|s| state.seen.contains_key(s));
        if everyone {
            let deadline = state.spec.deadline;
            self.close_part(round, deadline);
        }
        Ok(())
    }

    /// Makes a re-sent update durable in its own part and queues that part for core.
    fn commit_resent(
        &mut self,
        round: RoundId,
        mut part: OpenPart,
        fold: UpdateFold,
        contribution: Contribution,
        upload_id: &str,
    ) -> Result<(), RoundError> {
        let dir = part.dir_path(&self.root, round);
        let store = contribution.store.clone();
        if let Err(e) = part.hold(&self.root, round, fold, contribution, upload_id) {
            let _ = fs::remove_dir_all(&dir);
            return Err(e);
        }
        let Some(state) = self.rounds.get_mut(&round) else {
            return Err(Rejection::RoundClosed(round).into());
        };
        state.seen.insert(store.clone(), upload_id.to_owned());
        let rejected = state.rejected.clone();
        let Some(sum) = part.acc.poll_close(Instant::now()) else {
            return Err(Rejection::RoundClosed(round).into());
        };
        tracing::info!(round.id = round.0, part = part.index, store.id = %store,
            "re-sent update ready for core");
        self.push_pending(round, part, sum, rejected, true);
        Ok(())
    }

    /// Drops a failed upload's fold.
    pub fn abort(&mut self, round: RoundId, fold: UpdateFold, rejection: Rejection) {
        let Some(state) = self.rounds.get_mut(&round) else {
            return;
        };
        if let Some(mut part) = state.resending.remove(fold.store()) {
            let dir = part.dir_path(&self.root, round);
            part.acc.abort(fold, rejection);
            let _ = fs::remove_dir_all(dir);
            return;
        }
        if let Some(part) = state.open.as_mut() {
            part.acc.abort(fold, rejection);
        }
    }

    /// Closes every open part whose deadline has passed at `now`.
    pub fn poll_deadlines(&mut self, now: Instant) {
        let due: Vec<RoundId> = self
            .rounds
            .iter()
            .filter(|(_, s)| s.open.is_some() && now >= s.spec.deadline)
            .map(|(id, _)| *id)
            .collect();
        for round in due {
            self.close_part(round, now);
        }
    }

    fn close_part(&mut self, round: RoundId, now: Instant) {
        let Some(state) = self.rounds.get_mut(&round) else {
            return;
        };
        let Some(mut part) = state.open.take() else {
            return;
        };
        let Some(sum) = part.acc.poll_close(now) else {
            state.open = Some(part);
            return;
        };
        let dir = part.dir_path(&self.root, round);
        if sum.contributors.is_empty() {
            let _ = fs::remove_dir_all(&dir);
            return;
        }
        let rejected = state.rejected.clone();
        self.push_pending(round, part, sum, rejected, false);
    }

    fn push_pending(
        &mut self,
        round: RoundId,
        mut part: OpenPart,
        sum: fold::PartialSum,
        rejected: BTreeMap<String, u64>,
        resent: bool,
    ) {
        let contributors: Vec<Contribution> = sum
            .contributors
            .iter()
            .filter_map(|store| part.contributed.remove(store))
            .map(|c| c.contribution)
            .collect();
        tracing::info!(
            round.id = round.0,
            part = part.index,
            contributors = contributors.len(),
            "partial sum ready for core"
        );
        self.pending.push(PendingSum {
            round,
            part: part.index,
            header: PartialSumHeader {
                round,
                pop: self.metro.clone(),
                ring_bits: sum.ring.bits(),
                len: sum.values.len() as u32,
                contributors,
                rejected,
                resent,
            },
            body: sum.ring.pack(&sum.values).into(),
            attempts: 0,
            next_attempt: Instant::now(),
        });
    }

    /// Partial sums due for an attempt at `now`.
    pub fn due(&self, now: Instant) -> Vec<PendingSum> {
        self.pending
            .iter()
            .filter(|p| p.next_attempt <= now)
            .cloned()
            .collect()
    }

    /// Partial sums not yet acknowledged.
    pub fn pending_len(&self) -> usize {
        self.pending.len()
    }

    /// Core acknowledged (or definitively refused) a partial sum: forget the sum, keep the
    /// contributors' reports for duplicate checks.
    ///
    /// # Errors
    /// [`StateError`] when the marker cannot be written; the sum is forwarded again then.
    pub fn settled(&mut self, round: RoundId, part: u32, marker: &str) -> Result<(), StateError> {
        let dir = self.root.join("parts").join(part_name(round, part));
        write_atomic(&dir.join(marker), b"")?;
        if marker != "acked" {
            write_atomic(&dir.join("acked"), b"")?;
        }
        StateDir::open(&dir)?.remove(round)?;
        self.pending
            .retain(|p| !(p.round == round && p.part == part));
        Ok(())
    }

    /// A forward failed: try again after a capped, jittered backoff.
    pub fn retry_later(&mut self, round: RoundId, part: u32, delay: Duration) {
        if let Some(p) = self
            .pending
            .iter_mut()
            .find(|p| p.round == round && p.part == part)
        {
            p.attempts += 1;
            p.next_attempt = Instant::now() + delay;
        }
    }

    /// Whether any round still takes uploads or owes core a sum (drain waits for this).
    pub fn busy(&self, now: Instant) -> bool {
        // A round needs this PoP while a part is open, or before its deadline while a store
        // that advertised its keys here has yet to upload.
        let waiting = |s: &RoundState| s.advertised.iter().any(|store| !s.seen.contains_key(store));
        !self.pending.is_empty()
            || self.rounds.values().any(|s| {
                s.open.is_some() || !s.resending.is_empty() || (now < s.spec.deadline && waiting(s))
            })
    }
}

impl OpenPart {
    fn dir_path(&self, root: &Path, round: RoundId) -> PathBuf {
        root.join("parts").join(part_name(round, self.index))
    }

    /// Adds a received update to the sum and makes both durable: the report first, then
    /// the sum, since a report without its store in the sum is harmless and a store in the
    /// sum without its report is not.
    fn hold(
        &mut self,
        root: &Path,
        round: RoundId,
        fold: UpdateFold,
        contribution: Contribution,
        upload_id: &str,
    ) -> Result<(), RoundError> {
        self.acc.commit(fold)?;
        self.contributed.insert(
            contribution.store.clone(),
            Contributed {
                contribution,
                upload_id: upload_id.to_owned(),
            },
        );
        write_contributions(self.dir_path(root, round), &self.contributed)?;
        self.acc.checkpoint(&self.dir)?;
        Ok(())
    }
}

/// Starts the fold of a re-sent update in a part of its own, which expects only `store`
/// and takes it until core's upload deadline.
fn begin_resent(
    root: &Path,
    state: &mut RoundState,
    store: &StoreId,
    header: &wire::UpdateHeader,
    decision: &Decision,
    now: Instant,
) -> Result<Admission, Rejection> {
    let round = header.round;
    if now >= state.upload_deadline {
        return Err(Rejection::RoundClosed(round));
    }
    if !state.spec.expected.contains(store) {
        return Err(Rejection::NotInCohort(store.clone()));
    }
    if state.resending.contains_key(store) {
        return Err(Rejection::Duplicate(store.clone()));
    }
    let spec = RoundSpec {
        expected: BTreeSet::from([store.clone()]),
        deadline: state.upload_deadline,
        ..state.spec.clone()
    };
    let mut part = open_part(root, state)?;
    part.acc = RoundAccumulator::open(spec);
    let marker = part.dir_path(root, round).join(RESENT_MARKER);
    write_atomic(&marker, b"").map_err(|e| Rejection::Interrupted(e.to_string()))?;
    let fold = part.acc.begin(store, &fold_header(store, header), decision);
    match fold {
        Ok(fold) => {
            state.resending.insert(store.clone(), part);
            Ok(Admission::Fold(Box::new(fold)))
        }
        Err(rejection) => {
            let _ = fs::remove_dir_all(part.dir_path(root, round));
            Err(rejection)
        }
    }
}

/// What the fold checks of an upload's header, credited to the authenticated `store`.
fn fold_header(store: &StoreId, header: &wire::UpdateHeader) -> fold::UpdateHeader {
    fold::UpdateHeader {
        store: store.clone(),
        round: header.round,
        model_version: header.model_version,
        ring_bits: header.ring_bits,
        len: header.len as usize,
    }
}

fn open_part(root: &Path, state: &mut RoundState) -> Result<OpenPart, Rejection> {
    let index = state.next_part;
    let path = root.join("parts").join(part_name(state.spec.round, index));
    let dir = StateDir::open(&path).map_err(|e| Rejection::Interrupted(e.to_string()))?;
    state.next_part += 1;
    Ok(OpenPart {
        index,
        dir,
        acc: RoundAccumulator::open(state.spec.clone()),
        contributed: BTreeMap::new(),
    })
}

/// The file that marks a part holding one re-sent update.
const RESENT_MARKER: &str = "resent";

fn part_name(round: RoundId, part: u32) -> String {
    format!("r{}-p{part}", round.0)
}

fn parse_part_name(name: &str) -> Option<(RoundId, u32)> {
    let (round, part) = name.strip_prefix('r')?.split_once("-p")?;
    Some((RoundId(round.parse().ok()?), part.parse().ok()?))
}

/// The monotonic instant of a Unix-epoch time in ms (now, if it has passed).
pub fn instant_of_unix_ms(ms: u64) -> Instant {
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    Instant::now() + Duration::from_millis(ms.saturating_sub(now_ms))
}

fn io_error(path: &Path, source: std::io::Error) -> StateError {
    StateError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn read_contributions(dir: &Path) -> Result<BTreeMap<StoreId, Contributed>, StateError> {
    let path = dir.join("contributions.json");
    match fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(|err| StateError::Corrupt {
            path,
            what: err.to_string(),
        }),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(BTreeMap::new()),
        Err(source) => Err(StateError::Io { path, source }),
    }
}

fn write_contributions(
    dir: PathBuf,
    contributed: &BTreeMap<StoreId, Contributed>,
) -> Result<(), StateError> {
    let path = dir.join("contributions.json");
    let bytes = serde_json::to_vec(contributed).map_err(|err| StateError::Corrupt {
        path: path.clone(),
        what: err.to_string(),
    })?;
    write_atomic(&path, &bytes)
}

/// Writes `bytes` to a temporary file, syncs it and renames it over `path`.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), StateError> {
    let tmp = path.with_extension("tmp");
    let mut file = fs::File::create(&tmp).map_err(|e| io_error(&tmp, e))?;
    file.write_all(bytes).map_err(|e| io_error(&tmp, e))?;
    file.sync_all().map_err(|e| io_error(&tmp, e))?;
    drop(file);
    fs::rename(&tmp, path).map_err(|e| io_error(path, e))?;
    if let Some(parent) = path.parent() {
        fs::File::open(parent)
            .and_then(|d| d.sync_all())
            .map_err(|e| io_error(parent, e))?;
    }
    Ok(())
}
