//! `store-agent`: the Fedmesh agent a store runs.
//!
//! `store-agent audit verify --log FILE` checks the audit log's hash chain and names the first
//! broken line; `store-agent config check --config FILE` checks a config file and names the
//! key at fault.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};
use fedmesh_store_agent::audit;
use fedmesh_store_agent::config::AgentConfig;

/// The Fedmesh store agent.
#[derive(Debug, Parser)]
#[command(name = "store-agent", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
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
