//! `store-agent`: the Fedmesh agent a store runs.
//!
//! `store-agent run --config A.toml [--config B.toml ...]` hosts one store per config in
//! this process until SIGTERM or SIGINT; `store-agent status --config FILE [--json]` prints
//! what an operator asks about a store; `store-agent audit verify --log FILE` checks the
//! audit log's hash chain and names the first broken line; `store-agent config check
//! --config FILE` checks a config file and names the key at fault.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use fedmesh_store_agent::config::AgentConfig;
use fedmesh_store_agent::{audit, daemon};
use tokio::sync::watch;

/// The Fedmesh store agent.
#[derive(Debug, Parser)]
#[command(name = "store-agent", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the agent: one store per config file, until SIGTERM.
    Run {
        /// A store's config file (TOML); repeat to host several stores in this process.
        #[arg(long, required = true)]
        config: Vec<PathBuf>,
    },
    /// Print a store's identity, PoP reachability, model, window, queue and epsilon.
    Status {
        /// The store's config file (TOML).
        #[arg(long, default_value = "/etc/fedmesh/store-agent.toml")]
        config: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Inspect the audit log.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// Check the agent's config file.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
}

#[derive(Debug, Subcommand)]
enum ConfigCommand {
    /// Read the config as the agent would at start-up; print its training window or the
    /// key at fault.
    Check {
        /// The config file (TOML).
        #[arg(long, default_value = "/etc/fedmesh/store-agent.toml")]
        config: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
enum AuditCommand {
    /// Check the hash chain of the audit log and report the first broken link.
    Verify {
        /// The audit log (JSON lines).
        #[arg(long, default_value = "/var/lib/fedmesh-store-agent/audit.jsonl")]
        log: PathBuf,
    },
}

fn main() -> Result<ExitCode> {
    match Cli::parse().command {
        Command::Run { config } => run(&config),
        Command::Status { config, json } => status(&config, json),
        Command::Config {
            command: ConfigCommand::Check { config },
        } => {
            let config = AgentConfig::from_path(&config)?;
            println!(
                "store {} in {}: training window {}",
                config.store.id,
                config.store.region,
                config.training_window()?
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Audit {
            command: AuditCommand::Verify { log },
        } => match audit::verify(&log)? {
            Ok(verified) => {
                println!(
                    "audit log {}: {} lines verified, head {}",
                    log.display(),
                    verified.lines,
                    verified.head
                );
                Ok(ExitCode::SUCCESS)
            }
            Err(broken) => {
                println!(
                    "audit log {}: broken at line {}: {}",
                    log.display(),
                    broken.line,
                    broken.reason
                );
                Ok(ExitCode::FAILURE)
            }
        },
    }
}

/// Reads every config first (a bad one stops the start naming its key), then runs the
/// stores on one runtime until SIGTERM or SIGINT.
fn run(paths: &[PathBuf]) -> Result<ExitCode> {
    init_logging();
    let configs = paths
        .iter()
        .map(|path| AgentConfig::from_path(path))
        .collect::<Result<Vec<_>, _>>()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let outcome = runtime.block_on(async {
        let (stop, shutdown) = watch::channel(false);
        let mut stores = tokio::spawn(daemon::run(configs, shutdown));
        tokio::select! {
            // The stores ended by themselves: a store failed to start, or none was given.
            ended = &mut stores => {
                ended.context("store tasks panicked")??;
                return Ok(ExitCode::SUCCESS);
            }
            () = terminated() => {}
        }
        tracing::info!("stopping: finishing uploads at hand, leaving the rest queued");
        let _ = stop.send(true);
        match tokio::time::timeout(daemon::SHUTDOWN_GRACE, stores).await {
            Ok(ended) => ended.context("store tasks panicked")??,
            Err(_) => tracing::warn!("stores did not stop in time; their updates stay queued"),
        }
        Ok(ExitCode::SUCCESS)
    });
    // Training still running on the blocking pool is abandoned: its update was never
    // queued, so nothing is lost, and the round is not joined again.
    runtime.shutdown_timeout(Duration::from_secs(1));
    outcome
}

/// Resolves on SIGTERM or SIGINT.
async fn terminated() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

fn status(path: &std::path::Path, json: bool) -> Result<ExitCode> {
    let config = AgentConfig::from_path(path)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let report = runtime
        .block_on(daemon::status::gather(&config, Duration::from_secs(5)))
        .map_err(anyhow::Error::msg)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!("{report}");
    }
    Ok(ExitCode::SUCCESS)
}

/// Logs to stderr; `RUST_LOG` filters (default `info`), `FEDMESH_LOG_FORMAT=json` for JSON
/// lines.
fn init_logging() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if std::env::var("FEDMESH_LOG_FORMAT").is_ok_and(|f| f == "json") {
        builder.json().init();
    } else {
        builder.init();
    }
}
