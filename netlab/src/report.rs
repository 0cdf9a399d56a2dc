//! The report of a `netlab run`: `summary.json`, `report.md` and PNG plots in the output
//! folder, plus the per-round samples and process figures the launcher collects.

use std::collections::{BTreeMap, BTreeSet};

use anyhow::{Context, Result};
use fedmesh_store_agent::Examples;
use fedmesh_store_agent::model::{Model, Precision};
use fedmesh_store_agent::weights::Weights;
use serde::Serialize;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::launch::{Layout, MODEL, Outcome};
use fedmesh_netlab::scenario::Scenario;

/// One ended round as the launcher saw it.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct RoundSample {
    pub round: u64,
    pub outcome: String,
    pub reason: Option<String>,
    pub cohort: u64,
    pub survivors: u64,
    pub survivors_by_region: BTreeMap<String, u64>,
    pub dropouts: u64,
    pub duration_s: f64,
    pub evaluation_loss: Option<f64>,
    pub model_version: Option<u64>,
    /// Upload payload per surviving store: the packed masked vector of the round's plan.
    pub payload_bytes_per_store: Option<u64>,
    /// Epsilon spent per store after the round (from core's ledger).
    pub epsilon: BTreeMap<String, f64>,
    /// Test RMSE of the round's published model (filled in by the report).
    pub test_rmse: Option<f64>,
}

impl RoundSample {
    /// Reads one `history` record of core's `/v1/status`.
    pub fn from_record(record: &Value) -> Self {
        let by_region = record["survivors_by_region"]
            .as_object()
            .map(|m| {
                m.iter()
                    .map(|(k, v)| (k.clone(), v.as_u64().unwrap_or(0)))
                    .collect()
            })
            .unwrap_or_default();
        Self {
            round: record["round"].as_u64().unwrap_or(0),
            outcome: record["outcome"].as_str().unwrap_or("unknown").to_owned(),
            reason: record["reason"].as_str().map(str::to_owned),
            cohort: record["cohort_size"].as_u64().unwrap_or(0),
            survivors: record["survivors"].as_array().map_or(0, |a| a.len() as u64),
            survivors_by_region: by_region,
            dropouts: record["dropouts"].as_u64().unwrap_or(0),
            duration_s: record["duration_ms"].as_u64().unwrap_or(0) as f64 / 1e3,
            evaluation_loss: record["evaluation_loss"].as_f64(),
            model_version: record["model_version"].as_u64(),
            payload_bytes_per_store: None,
            epsilon: BTreeMap::new(),
            test_rmse: None,
        }
    }

    /// The line printed when the round ends.
    pub fn progress_line(&self) -> String {
        let regions: Vec<String> = self
            .survivors_by_region
            .iter()
            .map(|(r, n)| format!("{r} {n}"))
            .collect();
        let mut line = format!(
            "round {:>3} {:<9} cohort {:>3}  in sum {:>3} ({})  dropped {:>2}  {:>5.1} s",
            self.round,
            self.outcome,
            self.cohort,
            self.survivors,
            regions.join(", "),
            self.dropouts,
            self.duration_s,
        );
        if let Some(loss) = self.evaluation_loss {
            line += &format!("  eval loss {loss:.4}");
        }
        if let Some(v) = self.model_version {
            line += &format!("  -> v{v}");
        }
        if let Some(reason) = &self.reason {
            line += &format!("  ({reason})");
        }
        line
    }
}

/// CPU and memory of one process, from /proc.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct ProcessFigures {
    pub name: String,
    pub pid: u32,
    pub stores: usize,
    pub cpu_seconds: f64,
    pub idle_cpu_cores: f64,
    pub peak_rss_mib: f64,
}

fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which may hold spaces, start after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    // USER_HZ is 100 on every Linux this runs on.
    Some(ticks / 100.0)
}

fn peak_rss_mib(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

/// Samples each process's CPU over an idle two seconds and its peak RSS.
pub(crate) async fn process_figures(procs: &[(String, u32, usize)]) -> Vec<ProcessFigures> {
    let before: Vec<Option<f64>> = procs.iter().map(|(_, pid, _)| cpu_seconds(*pid)).collect();
    let window = std::time::Duration::from_secs(2);
    tokio::time::sleep(window).await;
    procs
        .iter()
        .zip(before)
        .map(|((name, pid, stores), before)| {
            let after = cpu_seconds(*pid);
            let idle = match (before, after) {
                (Some(b), Some(a)) => (a - b) / window.as_secs_f64(),
                _ => f64::NAN,
            };
            ProcessFigures {
                name: name.clone(),
                pid: *pid,
                stores: *stores,
                cpu_seconds: after.unwrap_or(f64::NAN),
                idle_cpu_cores: idle,
                peak_rss_mib: peak_rss_mib(*pid).unwrap_or(f64::NAN),
            }
        })
        .collect()
}

/// Test RMSE of `blob` pooled over the honest stores' test rows, each store scored with
/// its own local head from its state folder.
fn pooled_rmse(outcome: &Outcome, tests: &BTreeMap<String, Examples>, blob: &[u8]) -> Result<f64> {
    let shared = Weights::from_safetensors(blob)?;
    let (mut predictions, mut targets) = (Vec::new(), Vec::new());
    for store in outcome.stores.iter().filter(|s| s.adversary.is_none()) {
        let Some(test) = tests.get(&store.id) else {
            continue;
        };
        let mut model = fedmesh_store_agent::train::fresh_model(
            &outcome.task,
            tch::Device::Cpu,
            Precision::F32,
        )?;
        // The store's checkpoint holds every parameter; only its local ones (the head) are
        // the store's own, the shared ones come from the published blob. A store that never
        // trained has no checkpoint and keeps the fresh head it would start from (at the
        // announced target mean), never whatever head the blob may carry.
        let checkpoint = store.state_dir.join("local.safetensors");
        let mut combined = if checkpoint.exists() {
            Weights::read(&checkpoint)?
        } else {
            model.weights()
        };
        let local: BTreeSet<&str> = model
            .parameters()
            .iter()
            .filter(|p| p.local)
            .map(|p| p.name.as_str())
            .collect();
        for tensor in &mut combined.tensors {
            if let (false, Some(global)) = (
                local.contains(tensor.name.as_str()),
                shared.get(&tensor.name),
            ) {
                *tensor = global.clone();
            }
        }
        model.load(&combined)?;
        let predicted = fedmesh_store_agent::eval::predict(&model, test);
        let values: Vec<f32> = Vec::<f32>::try_from(predicted.flatten(0, -1))?;
        predictions.extend(values);
        targets.extend_from_slice(&test.targets);
    }
    anyhow::ensure!(!targets.is_empty(), "no test rows to score");
    Ok(fedmesh_store_agent::eval::rmse(&predictions, &targets))
}

/// Checks the signed manifest with the registry's public key and the blob against it.
fn verify(outcome: &Outcome) -> Result<(bool, u64, String)> {
    use fedmesh_core_agg::registry::{SignedManifest, keys, verify_manifest};
    let signed = outcome
        .signed_manifest
        .clone()
        .context("no published manifest")?;
    let signed: SignedManifest = serde_json::from_value(signed)?;
    let key = keys::read_verifying_key(&outcome.registry_public_key)
        .map_err(|e| anyhow::anyhow!("registry public key: {e}"))?;
    let model = fedmesh_core_agg::ModelId(MODEL.into());
    let manifest = match verify_manifest(&signed, &key, &model, None) {
        Ok(manifest) => manifest,
        Err(e) => {
            tracing::warn!(error = %e, "manifest does not verify");
            return Ok((false, 0, String::new()));
        }
    };
    let blob = outcome.blob.as_deref().unwrap_or_default();
    let digest = hex::encode(Sha256::digest(blob));
    Ok((
        digest == manifest.blob_sha256,
        manifest.version.0,
        manifest.blob_sha256,
    ))
}

/// Writes summary.json, report.md and the plots.
pub(crate) fn write(
    scenario: &Scenario,
    layout: &Layout,
    outcome: &mut Outcome,
    skip_baselines: bool,
) -> Result<()> {
    // 1. Test rows of every honest store, normalised as the task says.
    let (_, dataset) =
        crate::task_config::load_dominicks(&scenario.data.dir, Some(&scenario.data.spec))?;
    let mut tests = BTreeMap::new();
    for data in &dataset.stores {
        tests.insert(
            data.store.0.clone(),
            data.test.normalised(&outcome.normalisation)?,
        );
    }

    // 2. RMSE per published version, and of the final model.
    let mut per_version = BTreeMap::new();
    for (version, blob) in &outcome.version_blobs {
        match pooled_rmse(outcome, &tests, blob) {
            Ok(rmse) => {
                per_version.insert(*version, rmse);
            }
            Err(e) => tracing::warn!(version, error = %e, "cannot score version"),
        }
    }
    for sample in &mut outcome.samples {
        sample.test_rmse = sample
            .model_version
            .and_then(|v| per_version.get(&v).copied());
    }
    let final_rmse = match &outcome.blob {
        Some(blob) => Some(pooled_rmse(outcome, &tests, blob)?),
        None => None,
    };
    let (signature_verified, model_version, model_sha256) =
        verify(outcome).unwrap_or((false, 0, String::new()));

    // 3. Baselines over the same stores' data.
    let baselines = if skip_baselines {
        Value::Null
    } else {
        let args = crate::BaselineArgs {
            data: scenario.data.dir.clone(),
            spec: Some(scenario.data.spec.clone()),
            seed: scenario.seed,
            threads: 1,
            epochs: 20,
        };
        serde_json::to_value(crate::baseline::run(&args)?)?
    };

    // 4. Figures.
    let status = &outcome.status;
    // Training rounds' uploads; a statistics round sends moments, not an update.
    let payload: Vec<u64> = outcome
        .samples
        .iter()
        .filter(|s| s.outcome != "measured")
        .filter_map(|s| s.payload_bytes_per_store)
        .collect();
    let uplink = median(&payload);
    let shared = Model::new(&outcome.task.model, tch::Device::Cpu, Precision::F32)?
        .shared_weights()
        .numel();
    let dense = shared as u64 * 4;
    let final_epsilon = outcome.ledger.as_ref().map(crate::launch::spent);
    let max_epsilon = outcome
        .samples
        .iter()
        .flat_map(|s| s.epsilon.values().copied())
        .chain(final_epsilon.iter().flat_map(|m| m.values().copied()))
        .fold(0.0f64, f64::max);
    let abandoned: Vec<Value> = outcome
        .samples
        .iter()
        .filter(|s| s.outcome == "abandoned")
        .map(|s| json!({"round": s.round, "reason": s.reason}))
        .collect();
    let durations: Vec<f64> = outcome.samples.iter().map(|s| s.duration_s).collect();
    // Updates a PoP acknowledged that a committed round went without: a PoP lost them.
    let held_not_included = &outcome.stores_at_end["held_not_included_by_round"];
    let accepted_lost: u64 = outcome
        .samples
        .iter()
        .filter(|s| s.outcome == "committed")
        .filter_map(|s| held_not_included[s.round.to_string()].as_u64())
        .sum();
    let summary = json!({
        "scenario": scenario.name,
        "rounds_completed": status["rounds_completed"],
        "rounds_abandoned": abandoned,
        "abandoned_by_reason": status["abandoned_by_reason"],
        "final_test_rmse": final_rmse,
        "baseline_pooled_rmse": baselines["pooled_mlp_store_onehot"],
        "baseline_local_rmse": baselines["local"],
        "baselines": baselines,
        "uplink_bytes_per_store_round": uplink,
        "dense_f32_bytes_per_store_round": dense,
        "uplink_wire_bytes_per_store": outcome.relay_bytes_up,
        "max_store_epsilon": max_epsilon,
        "rejected": status["rejections"],
        "model_version": model_version,
        "model_sha256": model_sha256,
        "signature_verified": signature_verified,
        "federated_statistics": outcome.statistics,
        "stores_at_end": outcome.stores_at_end,
        "accepted_updates_lost": accepted_lost,
        "wall_seconds": outcome.wall_seconds,
        "startup_seconds": outcome.startup_seconds,
        "round_wall_seconds_median": median_f(&durations),
        "processes": outcome.processes,
        "faults": outcome.faults,
        "rounds": outcome.samples,
    });
    let path = layout.root.join("summary.json");
    std::fs::write(&path, serde_json::to_string_pretty(&summary)?)?;

    // 5. Plots and the readable report.
    let plots = crate::plots::draw(&layout.root, outcome, &baselines);
    let plots = match plots {
        Ok(files) => files,
        Err(e) => {
            tracing::warn!(error = %e, "plots not drawn");
            Vec::new()
        }
    };
    std::fs::write(
        layout.root.join("report.md"),
        markdown(scenario, &summary, &plots),
    )?;
    println!("{}", serde_json::to_string_pretty(&headline(&summary))?);
    println!("report: {}", layout.root.join("report.md").display());
    Ok(())
}

fn headline(summary: &Value) -> Value {
    let keys = [
        "rounds_completed",
        "final_test_rmse",
        "baseline_pooled_rmse",
        "baseline_local_rmse",
        "uplink_bytes_per_store_round",
        "dense_f32_bytes_per_store_round",
        "max_store_epsilon",
        "rejected",
        "signature_verified",
        "startup_seconds",
        "round_wall_seconds_median",
        "wall_seconds",
    ];
    Value::Object(
        keys.iter()
            .map(|k| ((*k).to_owned(), summary[*k].clone()))
            .collect(),
    )
}

fn median(values: &[u64]) -> Option<u64> {
    let mut v = values.to_vec();
    v.sort_unstable();
    v.get(v.len() / 2).copied()
}

fn median_f(values: &[f64]) -> Option<f64> {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied()
}

fn markdown(scenario: &Scenario, summary: &Value, plots: &[String]) -> String {
    let mut out = format!("# {}\n\n{}\n\n", scenario.name, scenario.description);
    out += "| figure | value |\n| --- | --- |\n";
    for (key, value) in headline(summary).as_object().into_iter().flatten() {
        out += &format!("| {key} | {value} |\n");
    }
    out += "\n## Processes\n\n| process | stores | peak RSS MiB | idle CPU cores | CPU s |\n";
    out += "| --- | --- | --- | --- | --- |\n";
    for p in summary["processes"].as_array().into_iter().flatten() {
        out += &format!(
            "| {} | {} | {:.1} | {:.3} | {:.1} |\n",
            p["name"].as_str().unwrap_or("?"),
            p["stores"],
            p["peak_rss_mib"].as_f64().unwrap_or(f64::NAN),
            p["idle_cpu_cores"].as_f64().unwrap_or(f64::NAN),
            p["cpu_seconds"].as_f64().unwrap_or(f64::NAN),
        );
    }
    out += "\n## Rounds\n\n| round | outcome | cohort | in sum | dropped | s | test RMSE | max eps |\n";
    out += "| --- | --- | --- | --- | --- | --- | --- | --- |\n";
    for r in summary["rounds"].as_array().into_iter().flatten() {
        let eps = r["epsilon"]
            .as_object()
            .map(|m| m.values().filter_map(Value::as_f64).fold(0.0f64, f64::max))
            .unwrap_or(0.0);
        out += &format!(
            "| {} | {} | {} | {} | {} | {:.1} | {} | {:.2} |\n",
            r["round"],
            r["outcome"].as_str().unwrap_or("?"),
            r["cohort"],
            r["survivors"],
            r["dropouts"],
            r["duration_s"].as_f64().unwrap_or(0.0),
            r["test_rmse"]
                .as_f64()
                .map_or("-".into(), |v| format!("{v:.4}")),
            eps,
        );
    }
    let stats = &summary["federated_statistics"];
    if !stats.is_null() {
        out += &format!(
            "\n## Normalisation\n\nMeasured by federated statistics round {} over {} rows \
             of {} stores: means within {:.2e} pooled deviations and deviations within \
             {:.2e} (relative) of the lab's fit on the same stores' pooled training rows.\n",
            stats["round"],
            stats["rows"],
            stats["stores"],
            stats["max_mean_error_in_pooled_std"]
                .as_f64()
                .unwrap_or(f64::NAN),
            stats["max_std_relative_error"].as_f64().unwrap_or(f64::NAN),
        );
    }
    if !summary["faults"].as_array().is_none_or(Vec::is_empty) {
        out += "\n## Faults injected\n\n";
        for f in summary["faults"].as_array().into_iter().flatten() {
            out += &format!("- {}\n", f.as_str().unwrap_or("?"));
        }
    }
    out += "\n## Plots\n\n";
    for plot in plots {
        out += &format!("![{plot}]({plot})\n\n");
    }
    out
}
