//! Candidate evaluation: an evaluator named in a round's announcement scores the
//! candidate blob (its shared weights with the store's own local head) and the round's own
//! model on the store's test rows and posts both mean losses. Metrics leave the store, never
//! rows.

use std::sync::Arc;

use fedmesh_protocol::wire::{self, EvaluationReport, RoundAnnouncement};
use sha2::{Digest, Sha256};

use super::agent::StoreAgent;
use super::models;
use super::round::now_ms;
use crate::Examples;
use crate::task::TaskConfig;
use crate::train::{self, TrainError};
use crate::weights::Weights;

impl StoreAgent {
    /// Scores the round's candidate and the round's own model on the store's test rows, with
    /// the store's own local parameters, and posts both losses.
    pub(super) async fn evaluate(&mut self, round: &RoundAnnouncement) {
        let Some(task) = round.evaluation.as_ref() else {
            return;
        };
        let key = (round.round.0, task.candidate_sha256.clone());
        if self.evaluated.contains(&key) || now_ms() > task.deadline_ms {
            return;
        }
        self.evaluated.insert(key);
        match self.evaluate_candidate(round).await {
            Ok(report) => tracing::info!(store.id = %self.store, round.id = round.round.0,
                outcome = "evaluated", loss = report.loss, examples = report.examples,
                "candidate evaluated"),
            Err(reason) => tracing::warn!(store.id = %self.store, round.id = round.round.0,
                outcome = "evaluation-failed", reason = %reason, "candidate not evaluated"),
        }
    }

    async fn evaluate_candidate(
        &mut self,
        round: &RoundAnnouncement,
    ) -> Result<EvaluationReport, String> {
        let Some(eval) = round.evaluation.as_ref() else {
            return Err("no evaluation task".into());
        };
        let task = self.read_task(round)?;
        let path = wire::blob(&eval.candidate_sha256);
        let blob = self
            .pop
            .get_bytes(&path, models::MAX_BLOB)
            .await
            .map_err(|e| e.to_string())?
            .ok_or_else(|| format!("{path} is not served"))?;
        let digest = hex::encode(Sha256::digest(&blob));
        if digest != eval.candidate_sha256 {
            return Err(format!("candidate blob digest {digest} differs"));
        }
        let candidate = Weights::from_safetensors(&blob).map_err(|e| e.to_string())?;
        // The round's own model, verified as for training, scored on the same rows: core
        // compares like with like. Without it the report carries the candidate alone.
        let baseline = models::fetch_verified(&self.pop, &self.key, &self.dir, None, round)
            .await
            .map(|m| m.weights)
            .map_err(|e| {
                tracing::debug!(store.id = %self.store, error = %e, "no baseline to score");
            })
            .ok();
        // Fetching keeps the round's model on disk; a store that evaluates often and trains
        // rarely must not collect one per round: keep it and the last good one only.
        let last_good = self
            .state
            .last_good_model
            .as_ref()
            .map(|m| m.sha256.as_str());
        let keep: Vec<&str> = last_good
            .into_iter()
            .chain([round.model_sha256.as_str()])
            .collect();
        if let Err(e) = self.dir.prune_models(&keep) {
            tracing::warn!(store.id = %self.store, error = %e, "cannot prune old models");
        }
        let local = Weights::read(&self.dir.local_checkpoint()).ok();
        let data = Arc::clone(&self.data);
        let permit = Arc::clone(&self.trainers)
            .acquire_owned()
            .await
            .map_err(|e| e.to_string())?;
        let (examples, loss, baseline_loss) = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            let rows = normalised(&task, &data.test)?;
            if rows.is_empty() {
                return Ok((0, f64::NAN, None));
            }
            let score = |weights: &Weights| {
                let model = train::build_model(&task, weights, local.as_ref())?;
                mean_loss(&model, &rows)
            };
            let loss = score(&candidate)?;
            // A baseline that cannot be scored leaves the candidate's report as it is.
            let baseline_loss = baseline.as_ref().and_then(|w| score(w).ok());
            Ok::<_, TrainError>((rows.len(), loss, baseline_loss))
        })
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
        if examples == 0 {
            return Err("the store has no test rows".into());
        }
        let report = EvaluationReport {
            round: round.round,
            candidate_sha256: eval.candidate_sha256.clone(),
            examples: examples as u64,
            loss,
            baseline_loss,
        };
        self.pop
            .post_json(&wire::evaluation(round.round), &report)
            .await
            .map_err(|e| e.to_string())?;
        Ok(report)
    }
}

/// `rows` standardised with the task's normalisation, if it has one.
pub(super) fn normalised(task: &TaskConfig, rows: &Examples) -> Result<Examples, TrainError> {
    Ok(match &task.normalisation {
        Some(norm) => rows.normalised(norm)?,
        None => rows.clone(),
    })
}

/// The mean loss (MSE or cross-entropy) of `model` over `rows`.
pub(super) fn mean_loss(model: &crate::model::Model, rows: &Examples) -> Result<f64, TrainError> {
    if rows.is_empty() {
        return Err(TrainError::NoExamples);
    }
    let (x, y) = train::tensors(model, rows)?;
    Ok(tch::no_grad(|| {
        train::batch_loss(model, &x, &y).double_value(&[])
    }))
}
