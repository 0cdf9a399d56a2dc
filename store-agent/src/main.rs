//! `store-agent`: the Fedmesh agent a store runs.
//!
//! `store-agent audit verify --log FILE` checks the audit log's hash chain and names the first
//! broken line.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};
use fedmesh_store_agent::audit;

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
