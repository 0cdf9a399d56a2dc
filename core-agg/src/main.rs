//! `core-agg`: the Fedmesh core aggregator's command line.
//!
//! `core-agg privacy epsilon` and `core-agg privacy sigma` plan DP budgets; each prints one
//! JSON object on stdout.

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use fedmesh_protocol::accountant::{RdpAccountant, noise_multiplier_for_epsilon};
use serde_json::json;

/// Fedmesh core aggregator.
#[derive(Parser)]
#[command(name = "core-agg", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Plan differential-privacy budgets (Poisson-subsampled Gaussian, add-or-remove-one).
    #[command(subcommand)]
    Privacy(Privacy),
}

#[derive(Subcommand)]
enum Privacy {
    /// Print the epsilon that `steps` runs with noise `sigma` and sampling rate `q` spend.
    Epsilon {
        /// Noise multiplier: noise standard deviation over the clipping norm.
        #[arg(long)]
        sigma: f64,
        /// Sampling rate: expected batch over data size (records), or cohort over eligible
        /// stores (stores).
        #[arg(long)]
        q: f64,
        /// Number of runs of the mechanism (DP-SGD steps, or rounds).
        #[arg(long)]
        steps: u64,
        /// Target delta.
        #[arg(long, default_value_t = 1e-5)]
        delta: f64,
    },
    /// Print the smallest noise multiplier that keeps `steps` runs within `epsilon`.
    Sigma {
        /// Epsilon budget to meet.
        #[arg(long)]
        epsilon: f64,
        /// Sampling rate.
        #[arg(long)]
        q: f64,
        /// Number of runs of the mechanism.
        #[arg(long)]
        steps: u64,
        /// Target delta.
        #[arg(long, default_value_t = 1e-5)]
        delta: f64,
    },
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let report = match cli.command {
        Command::Privacy(privacy) => privacy_report(privacy)?,
    };
    println!("{report}");
    Ok(())
}

fn privacy_report(command: Privacy) -> Result<serde_json::Value> {
    match command {
        Privacy::Epsilon {
            sigma,
            q,
            steps,
            delta,
        } => {
            let mut accountant = RdpAccountant::new();
            accountant
                .compose_poisson_gaussian(q, sigma, steps)
                .context("invalid mechanism")?;
            let guarantee = accountant.guarantee(delta).context("invalid delta")?;
            // JSON has no infinity: an unbounded loss is written as null.
            let epsilon = guarantee.epsilon.is_finite().then_some(guarantee.epsilon);
            Ok(json!({
                "sigma": sigma, "q": q, "steps": steps, "delta": delta,
                "epsilon": epsilon, "order": guarantee.order,
            }))
        }
        Privacy::Sigma {
            epsilon,
            q,
            steps,
            delta,
        } => {
            let sigma = noise_multiplier_for_epsilon(epsilon, q, steps, delta)
                .context("cannot find a noise multiplier")?;
            let mut accountant = RdpAccountant::new();
            accountant.compose_poisson_gaussian(q, sigma, steps)?;
            Ok(json!({
                "epsilon": epsilon, "q": q, "steps": steps, "delta": delta,
                "sigma": sigma, "epsilon_at_sigma": accountant.epsilon(delta)?,
            }))
        }
    }
}
