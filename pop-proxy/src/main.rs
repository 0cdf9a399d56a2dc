//! `pop-proxy`: the Fedmesh PoP.
//!
//! `pop-proxy serve --config pop.toml` runs the PoP (see `pop.example.toml` for every key):
//! SIGUSR1 starts a drain, SIGTERM or SIGINT a graceful shutdown (exit status 0).
//!
//! Policy commands for security teams:
//! - `pop-proxy policy test DIR` runs the policy's `test_` rules and exits non-zero when
//!   one fails;
//! - `pop-proxy policy eval DIR --input FILE` prints the decision on one input as JSON.
//!
//! DIR is a policy directory or an OPA bundle (`.tar.gz`).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use fedmesh_policy::{DEFAULT_ENTRYPOINT, PolicyLocation, TestOutcome};

#[derive(Parser)]
#[command(name = "pop-proxy", about = "Fedmesh PoP proxy", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the PoP.
    Serve {
        /// The configuration file.
        #[arg(long)]
        config: PathBuf,
    },
    /// Check a configuration file and exit.
    CheckConfig {
        /// The configuration file.
        #[arg(long)]
        config: PathBuf,
    },
    /// Work with Rego policies.
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
    },
}

#[derive(Subcommand)]
enum PolicyCommand {
    /// Run the policy's `test_` rules.
    Test {
        /// Policy directory or bundle.
        dir: PathBuf,
        /// The decision rule the PoP evaluates.
        #[arg(long, default_value = DEFAULT_ENTRYPOINT)]
        entrypoint: String,
    },
    /// Evaluate the policy on one input document and print the decision.
    Eval {
        /// Policy directory or bundle.
        dir: PathBuf,
        /// A JSON file holding the input document.
        #[arg(long)]
        input: PathBuf,
        /// The decision rule the PoP evaluates.
        #[arg(long, default_value = DEFAULT_ENTRYPOINT)]
        entrypoint: String,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("pop-proxy: {err:#}");
            ExitCode::from(2)
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Serve { config } => {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("starting the async runtime")?;
            runtime.block_on(fedmesh_pop_proxy::service::serve(&config))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::CheckConfig { config } => {
            fedmesh_pop_proxy::service::Config::load(&config)?;
            println!("{}: ok", config.display());
            Ok(ExitCode::SUCCESS)
        }
        Command::Policy {
            command: PolicyCommand::Test { dir, entrypoint },
        } => policy_test(dir, &entrypoint),
        Command::Policy {
            command:
                PolicyCommand::Eval {
                    dir,
                    input,
                    entrypoint,
                },
        } => policy_eval(dir, &input, &entrypoint),
    }
}

fn policy_test(dir: PathBuf, entrypoint: &str) -> Result<ExitCode> {
    let policy = fedmesh_policy::load(&PolicyLocation::from_path(dir), entrypoint)?;
    let results = fedmesh_policy::run_tests(&policy);
    let mut failed = 0;
    for result in &results {
        let name = format!("{}.{}", result.package, result.name);
        match &result.outcome {
            TestOutcome::Passed => println!("PASS {name}"),
            TestOutcome::Failed => {
                failed += 1;
                println!("FAIL {name}");
            }
            TestOutcome::Error(message) => {
                failed += 1;
                println!("ERROR {name}: {message}");
            }
        }
    }
    println!(
        "{} passed, {failed} failed (policy revision {})",
        results.len() - failed,
        policy.revision()
    );
    Ok(if failed == 0 && !results.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn policy_eval(dir: PathBuf, input: &PathBuf, entrypoint: &str) -> Result<ExitCode> {
    let policy = fedmesh_policy::load(&PolicyLocation::from_path(dir), entrypoint)?;
    let text = std::fs::read_to_string(input)
        .with_context(|| format!("reading input {}", input.display()))?;
    let document: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("input {} is not json", input.display()))?;
    let decision = policy.decide_json(document);
    println!("{}", serde_json::to_string_pretty(&decision)?);
    Ok(ExitCode::SUCCESS)
}
