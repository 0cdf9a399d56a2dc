//! `netlab`: Fedmesh's lab.
//!
//! `netlab baseline` trains the reference models on the vendored Dominick's data and prints
//! their test RMSE as one JSON object, the yardstick federated runs are compared with;
//! `netlab task-config` prints the winning recipe's task config with its normalisation
//! statistics; `netlab simulate` runs federated training in process to search recipes;
//! `netlab pki` writes a development PKI (CA and SVIDs) for labs and tests;
//! `netlab run` runs a scenario as a whole mesh of processes and writes its report.

mod baseline;
mod launch;
mod pki;
mod plots;
mod report;
mod ridge;
mod simulate;
mod task_config;

use std::io::IsTerminal;
use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand};

/// Fedmesh's lab.
#[derive(Debug, Parser)]
#[command(name = "netlab", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

// Parsed once per process; boxing the large variant would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
enum Command {
    /// Train the centralised and local reference models and print their test RMSE as JSON.
    Baseline(BaselineArgs),
    /// Print the Dominick's task config (TOML) with normalisation from the pooled training rows.
    TaskConfig(task_config::TaskConfigArgs),
    /// Run federated training of the Dominick's task in process and print RMSE per round.
    Simulate(simulate::SimulateArgs),
    /// Write a development PKI: a trust domain's CA and SVIDs for core, PoPs and stores.
    Pki(pki::PkiArgs),
    /// Run a scenario: core, PoPs and stores as processes over the emulated WAN; write the
    /// report (summary.json, report.md, plots) into --out.
    Run(launch::RunArgs),
}

/// Options of `netlab baseline`.
#[derive(Debug, clap::Args)]
pub(crate) struct BaselineArgs {
    /// Directory holding sales.csv.gz and stores.csv.
    #[arg(long, default_value = "data/dominicks-oj")]
    pub data: PathBuf,
    /// Feature spec (TOML); the built-in Dominick's recipe when absent.
    #[arg(long)]
    pub spec: Option<PathBuf>,
    /// Seed for model initialisation and shuffling.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// libtorch threads.
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// Epochs for the MLPs.
    #[arg(long, default_value_t = 20)]
    pub epochs: usize,
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();

    match Cli::parse().command {
        Command::Baseline(args) => {
            let report = baseline::run(&args)?;
            println!("{}", serde_json::to_string(&report)?);
        }
        Command::TaskConfig(args) => print!("{}", task_config::run(&args)?),
        Command::Simulate(args) => {
            simulate::run(&args)?;
        }
        Command::Pki(args) => print!("{}", pki::run(&args)?),
        Command::Run(args) => launch::run(&args)?,
    }
    Ok(())
}
