//! The HTTP API between the tiers: routes, headers and the JSON bodies they carry.
//!
//! Stores talk only to their PoP (at the anycast address). The PoP answers plan, model and
//! upload requests itself and relays the secure-aggregation messages to core, adding the
//! store's authenticated SPIFFE ID in [`STORE_HEADER`]. Core accepts that header only from
//! a peer whose SPIFFE ID is a PoP's (`.../pop/<metro>`); a store can never assert another
//! store's identity, because the PoP takes it from the store's certificate.
//!
//! | route | who calls | body in | body out |
//! | --- | --- | --- | --- |
//! | `GET` [`ROUND`] | store -> PoP -> core | - | [`RoundAnnouncement`], `204` when none is open |
//! | `GET /v1/models/{model}/current` | store -> PoP -> core | - | [`ModelPointer`] |
//! | `GET /v1/models/{model}/versions/{version}` | store -> PoP -> core | - | signed manifest JSON |
//! | `GET /v1/blobs/{sha256}` | store -> PoP -> core | - | blob bytes |
//! | `POST /v1/rounds/{round}/secagg` | store -> PoP -> core | [`StoreMessage`] | `202` |
//! | `GET /v1/rounds/{round}/secagg/{step}` | store -> PoP -> core | - | [`SecAggStep`] reply, `204` until ready |
//! | `PUT /v1/rounds/{round}/update` | store -> PoP | packed ring elements, [`UPDATE_HEADER`] | [`UploadReceipt`] |
//! | `GET /v1/rounds/{round}/receipt` | store -> PoP -> core | - | [`RoundReceipt`] |
//! | `POST /v1/rounds/{round}/evaluation` | store -> PoP -> core | [`EvaluationReport`] | `202` |
//! | `POST /v1/rounds/{round}/partial-sums` | PoP -> core | packed ring elements, [`PARTIAL_SUM_HEADER`] | [`PartialSumAck`] |
//! | `GET` [`LEDGER`] | PoP -> core, operators | - | [`LedgerSnapshot`] |
//!
//! Errors are JSON [`ApiError`] bodies with a 4xx or 5xx status. Every body is attacker
//! input to its receiver: the receiver checks the round, the sender and every length.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::ids::{ModelVersion, Region, RoundId, StoreId};
use crate::moments::StatisticsTask;
use crate::secagg::{
    EncryptedShares, KeyAdvert, NeighbourKeys, PlanConfig, SharesForStore, UnmaskRequest,
    UnmaskResponse,
};

/// The open round, or the one a store should look at next.
pub const ROUND: &str = "/v1/round";
/// The privacy ledger's remaining epsilon per store, for PoP policy input.
pub const LEDGER: &str = "/v1/ledger";
/// Liveness: the process serves requests.
pub const HEALTH: &str = "/healthz";
/// Readiness: a PoP that answers `200` here wants traffic; `503` with
/// [`Readiness::Withdraw`] means pull the anycast announcement.
pub const READY: &str = "/readyz";
/// Prometheus text exposition.
pub const METRICS: &str = "/metrics";

/// Set by a PoP on requests it relays to core: the store's SPIFFE ID, taken from the
/// store's verified certificate.
pub const STORE_HEADER: &str = "fedmesh-store";
/// Set by a store: its runtime version (semantic version), a policy input.
pub const RUNTIME_HEADER: &str = "fedmesh-runtime";
/// On an update upload: the [`UpdateHeader`] as JSON.
pub const UPDATE_HEADER: &str = "fedmesh-update";
/// On a partial-sum upload: the [`PartialSumHeader`] as JSON.
pub const PARTIAL_SUM_HEADER: &str = "fedmesh-partial-sum";

/// The largest JSON body any route accepts, in bytes; larger bodies are refused unread.
pub const MAX_JSON_BODY: usize = 4 << 20;

/// Path of a model's current pointer.
pub fn model_current(model: &str) -> String {
    format!("/v1/models/{model}/current")
}

/// Path of one signed manifest.
pub fn model_version(model: &str, version: ModelVersion) -> String {
    format!("/v1/models/{model}/versions/{}", version.0)
}

/// Path of a content-addressed blob.
pub fn blob(sha256: &str) -> String {
    format!("/v1/blobs/{sha256}")
}

/// Path a store posts its secure-aggregation messages to.
pub fn secagg(round: RoundId) -> String {
    format!("/v1/rounds/{}/secagg", round.0)
}

/// Path a store polls for core's reply at one step.
pub fn secagg_step(round: RoundId, step: SecAggStep) -> String {
    format!("/v1/rounds/{}/secagg/{}", round.0, step.as_str())
}

/// Path of a store's upload.
pub fn update(round: RoundId) -> String {
    format!("/v1/rounds/{}/update", round.0)
}

/// Path a store asks whether its update is in the round's sum.
pub fn receipt(round: RoundId) -> String {
    format!("/v1/rounds/{}/receipt", round.0)
}

/// Path an evaluator posts its metrics to.
pub fn evaluation(round: RoundId) -> String {
    format!("/v1/rounds/{}/evaluation", round.0)
}

/// Path a PoP forwards its partial sum to.
pub fn partial_sums(round: RoundId) -> String {
    format!("/v1/rounds/{}/partial-sums", round.0)
}

/// The workload a SPIFFE ID path names: `/store/<region>/<store>`, `/pop/<metro>` or
/// `/core`. Anything else is `None`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Workload {
    /// A store.
    Store(Region, StoreId),
    /// A PoP, by metro.
    Pop(String),
    /// The core aggregator.
    Core,
}

impl Workload {
    /// Parses the path of a SPIFFE ID (the part after the trust domain).
    pub fn from_path(path: &str) -> Option<Self> {
        let segments: Vec<&str> = path.strip_prefix('/')?.split('/').collect();
        let ok = |s: &str| {
            !s.is_empty()
                && s.len() <= 64
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        };
        match segments.as_slice() {
            ["store", region, store] if ok(region) && ok(store) => Some(Self::Store(
                Region((*region).to_owned()),
                StoreId((*store).to_owned()),
            )),
            ["pop", metro] if ok(metro) => Some(Self::Pop((*metro).to_owned())),
            ["core"] => Some(Self::Core),
            _ => None,
        }
    }
}

/// How updates are aggregated in a round.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AggregationMode {
    /// SecAgg+: PoPs fold masked vectors; only the cohort sum is visible, at core.
    Secure,
    /// PoPs decode individual (noised, compressed) updates and aggregate them robustly.
    TrustedPop,
}

/// Deadlines of a round, in milliseconds since the Unix epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PhaseDeadlines {
    /// Key adverts are due.
    pub keys_ms: u64,
    /// Encrypted shares are due.
    pub shares_ms: u64,
    /// Updates are due at core, inside partial sums; PoPs stop taking uploads and forward
    /// what they hold at [`PhaseDeadlines::pop_forward_ms`], a little earlier.
    pub upload_ms: u64,
    /// Unmask responses are due.
    pub unmask_ms: u64,
}

impl PhaseDeadlines {
    /// Fewest and most milliseconds a PoP leaves between forwarding and `upload_ms`.
    const FORWARD_MARGIN_MS: (u64, u64) = (500, 3_000);

    /// When a PoP closes a round's partial sum and forwards it: a fifth of the upload window
    /// (from `shares_ms` to `upload_ms`) before the upload deadline, at least 500 ms and at
    /// most 3 s. A sum forwarded at `upload_ms` itself reaches core after core stopped
    /// collecting, so one silent store at a PoP would cost every update that PoP held.
    pub fn pop_forward_ms(&self) -> u64 {
        let (least, most) = Self::FORWARD_MARGIN_MS;
        let window = self.upload_ms.saturating_sub(self.shares_ms);
        let margin = (window / 5).clamp(least, most);
        self.upload_ms.saturating_sub(margin).max(self.shares_ms)
    }
}

/// A candidate model the round's evaluators score on their own data.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EvaluationTask {
    /// SHA-256 of the candidate's safetensors blob (served at [`blob`]).
    pub candidate_sha256: String,
    /// The stores asked to evaluate.
    pub evaluators: Vec<StoreId>,
    /// When core stops waiting, ms since the Unix epoch.
    pub deadline_ms: u64,
}

/// What core announces for a round: everything a store needs to decide, train and upload.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoundAnnouncement {
    /// The round.
    pub round: RoundId,
    /// The model trained.
    pub model: String,
    /// The version the cohort trains from.
    pub model_version: ModelVersion,
    /// SHA-256 of that version's blob, lowercase hex.
    pub model_sha256: String,
    /// The task config (TOML): model spec, training settings (FedProx mu, DP-SGD) and
    /// normalisation.
    pub task: String,
    /// SHA-256 of `task`, lowercase hex; recorded in the audit log and the manifest.
    pub task_sha256: String,
    /// The oldest store runtime (semantic version) the round accepts.
    pub min_runtime: String,
    /// Secure or trusted-pop aggregation.
    pub mode: AggregationMode,
    /// The secure-aggregation plan; its cohort is the selected stores.
    pub plan: PlanConfig,
    /// Phase deadlines.
    pub deadlines: PhaseDeadlines,
    /// Set while the round's candidate is being evaluated.
    pub evaluation: Option<EvaluationTask>,
    /// Set for a federated-statistics round: the cohort contributes the moments of its
    /// features and target instead of a model update, and trains nothing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub statistics: Option<StatisticsTask>,
}

/// A store's secure-aggregation message, posted to [`secagg`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum StoreMessage {
    /// Step 1: public keys.
    KeyAdvert(KeyAdvert),
    /// Step 2: encrypted shares for the neighbours.
    EncryptedShares(EncryptedShares),
    /// Step 4: the shares core asked for.
    UnmaskResponse(UnmaskResponse),
}

/// The steps at which a store polls core for a reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SecAggStep {
    /// Reply: [`NeighbourKeys`].
    Keys,
    /// Reply: [`SharesForStore`].
    Shares,
    /// Reply: [`UnmaskRequest`].
    Unmask,
}

impl SecAggStep {
    /// The path segment.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Keys => "keys",
            Self::Shares => "shares",
            Self::Unmask => "unmask",
        }
    }

    /// Parses a path segment.
    pub fn parse(segment: &str) -> Option<Self> {
        match segment {
            "keys" => Some(Self::Keys),
            "shares" => Some(Self::Shares),
            "unmask" => Some(Self::Unmask),
            _ => None,
        }
    }
}

/// Core's reply at one step, as the store receives it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum CoreMessage {
    /// After step 1.
    NeighbourKeys(NeighbourKeys),
    /// After step 2.
    Shares(SharesForStore),
    /// After step 3.
    Unmask(UnmaskRequest),
}

/// What a store declares, in [`UPDATE_HEADER`], before the bytes of its update.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UpdateHeader {
    /// The round the update was made for.
    pub round: RoundId,
    /// The model version it was trained from.
    pub model_version: ModelVersion,
    /// Ring width r the elements are packed at (secure mode).
    pub ring_bits: u32,
    /// Element count.
    pub len: u32,
    /// Examples the store trained on: core recomputes the store's record-level epsilon
    /// from it and the plan.
    pub examples: u64,
    /// Mean training loss of the round's global model on the store's data, before
    /// training (q-FedAvg weighs by it).
    pub loss: f64,
    /// Identifies this upload across retries (the store's queue entry id), so a re-send
    /// after a lost acknowledgement is recognised and not counted twice.
    pub upload_id: String,
    /// Sent again because core's receipt said [`ReceiptStatus::Resend`]: the PoP that first
    /// held it never got it to core. A PoP takes such an update until the upload deadline,
    /// past its own forwarding time, and forwards it on its own at once.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub resent: bool,
}

/// The PoP's answer to an accepted upload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UploadReceipt {
    /// The round.
    pub round: RoundId,
    /// The store credited (from its certificate).
    pub store: StoreId,
    /// The upload id from the header.
    pub upload_id: String,
    /// The PoP that holds the update durably.
    pub pop: String,
}

/// A store's contribution to a partial sum, as the PoP reports it to core.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Contribution {
    /// The store (authenticated by the PoP).
    pub store: StoreId,
    /// The store's region.
    pub region: Region,
    /// Examples it trained on.
    pub examples: u64,
    /// Its pre-training loss.
    pub loss: f64,
    /// Bytes of its upload.
    pub bytes: u64,
}

/// What a PoP declares, in [`PARTIAL_SUM_HEADER`], before the bytes of a partial sum.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PartialSumHeader {
    /// The round.
    pub round: RoundId,
    /// The PoP (its metro), for metrics.
    pub pop: String,
    /// Ring width r.
    pub ring_bits: u32,
    /// Element count.
    pub len: u32,
    /// Stores whose updates are in the sum, ascending by store id.
    pub contributors: Vec<Contribution>,
    /// Updates the PoP refused this round, by reason.
    pub rejected: BTreeMap<String, u64>,
    /// One store's update sent again on its own ([`UpdateHeader::resent`]): core holds it
    /// apart and counts it only if no other partial sum brings that store's update before
    /// uploads close.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub resent: bool,
}

/// Core's acknowledgement of a partial sum: the PoP may forget it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartialSumAck {
    /// The round.
    pub round: RoundId,
    /// Contributors core counted or holds (a store already counted through another PoP is
    /// not counted again, and its whole partial sum is refused unless it is a re-send; see
    /// core's docs).
    pub accepted: Vec<StoreId>,
}

/// Whether a store's update made it into a round.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ReceiptStatus {
    /// The round has not settled: keep the update queued (and re-send it if no PoP holds
    /// it).
    Open,
    /// Core holds a partial sum with the store's update.
    Included,
    /// The round closed (or moved past uploads) without the store's update: drop it.
    NotIncluded,
    /// Uploads are still open, the PoPs' forwarding time has passed, and no PoP brought
    /// the store's update: the PoP that acknowledged it is gone or cut off, or the store's
    /// own upload never got through. A store with the round's update still queued sends
    /// it, marked [`UpdateHeader::resent`], through whichever PoP answers (PoPs take such
    /// an update until the upload deadline); a store with nothing queued ignores this.
    Resend,
}

/// Core's answer to [`receipt`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoundReceipt {
    /// The round.
    pub round: RoundId,
    /// The store asked about.
    pub store: StoreId,
    /// The status.
    pub status: ReceiptStatus,
}

/// An evaluator's metrics for a round's candidate (metrics only, never data).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvaluationReport {
    /// The round.
    pub round: RoundId,
    /// SHA-256 of the blob evaluated.
    pub candidate_sha256: String,
    /// Test examples scored.
    pub examples: u64,
    /// Mean loss (MSE for regression) over them.
    pub loss: f64,
    /// Mean loss over the same rows of the model the round started from, so that core
    /// judges the candidate against the same stores' data; absent when the store could not
    /// score it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub baseline_loss: Option<f64>,
}

/// The current version of a model.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelPointer {
    /// The model.
    pub model: String,
    /// Its current version.
    pub version: ModelVersion,
}

/// Remaining epsilon per store, for PoP policy input.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LedgerSnapshot {
    /// The model the budgets are for.
    pub model: String,
    /// The per-store budget.
    pub budget: f64,
    /// Epsilon left per store; a store not listed has its whole budget left.
    pub remaining: BTreeMap<StoreId, f64>,
}

/// A PoP's readiness, the body of [`READY`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Readiness {
    /// Serving: keep announcing the anycast address.
    Ready,
    /// Draining or unable to reach core: withdraw the announcement.
    Withdraw,
}

/// An error body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiError {
    /// A stable, machine-readable reason (`stale-round`, `policy-denied`, ...).
    pub reason: String,
    /// A sentence for the operator.
    pub message: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_messages_carry_their_kind_on_the_wire() {
        let msg = StoreMessage::KeyAdvert(KeyAdvert {
            round: RoundId(3),
            store: StoreId("s1".into()),
            cipher_key: [1; 32],
            mask_key: [2; 32],
        });
        let json = serde_json::to_value(&msg).unwrap();
        assert_eq!(json["kind"], "key-advert");
        let back: StoreMessage = serde_json::from_value(json).unwrap();
        assert_eq!(back, msg);
    }

    #[test]
    fn workload_paths_parse_and_odd_ones_are_refused() {
        assert_eq!(
            Workload::from_path("/store/north/12"),
            Some(Workload::Store(
                Region("north".into()),
                StoreId("12".into())
            ))
        );
        assert_eq!(
            Workload::from_path("/pop/chicago"),
            Some(Workload::Pop("chicago".into()))
        );
        assert_eq!(Workload::from_path("/core"), Some(Workload::Core));
        for bad in [
            "",
            "/",
            "/store/north",
            "/store/north/12/x",
            "/store//12",
            "/pop/a b",
        ] {
            assert_eq!(Workload::from_path(bad), None, "{bad}");
        }
    }

    #[test]
    fn pops_forward_a_fifth_of_the_upload_window_early_within_bounds() {
        let at = |shares_ms, upload_ms| PhaseDeadlines {
            keys_ms: 0,
            shares_ms,
            upload_ms,
            unmask_ms: upload_ms + 4_000,
        };
        // 15 s window: 3 s early. 5 s: 1 s. 1 s: the 500 ms floor. 60 s: the 3 s ceiling.
        assert_eq!(at(10_000, 25_000).pop_forward_ms(), 22_000);
        assert_eq!(at(10_000, 15_000).pop_forward_ms(), 14_000);
        assert_eq!(at(10_000, 11_000).pop_forward_ms(), 10_500);
        assert_eq!(at(10_000, 70_000).pop_forward_ms(), 67_000);
        // Never before the shares are due, even for a window shorter than the floor.
        assert_eq!(at(10_000, 10_200).pop_forward_ms(), 10_000);
    }

    #[test]
    fn step_segments_round_trip_and_unknown_ones_are_refused() {
        for step in [SecAggStep::Keys, SecAggStep::Shares, SecAggStep::Unmask] {
            assert_eq!(SecAggStep::parse(step.as_str()), Some(step));
            assert!(secagg_step(RoundId(9), step).ends_with(step.as_str()));
        }
        assert_eq!(SecAggStep::parse("everything"), None);
    }
}
