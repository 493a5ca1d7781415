//! `husk`: the operator's command-line tool.

use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};
use husk_shim::check::{CheckName, CheckReport};

#[derive(Debug, Parser)]
#[command(name = "husk", version, about = "Husk: containers in KVM microVMs")]
struct Cli {
    #[command(subcommand)]
    command: Commands,
}

#[derive(Debug, Subcommand)]
enum Commands {
    /// Report whether this host can run Husk, and why not. Exits non-zero when it cannot.
    Check {
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
        /// Run only these checks (repeatable).
        #[arg(long, value_enum)]
        only: Vec<CheckName>,
    },
}

fn main() -> Result<ExitCode> {
    match Cli::parse().command {
        Commands::Check { json, only } => {
            let report = CheckReport::run(&only);
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", report.render_text());
            }
            Ok(if report.ready { ExitCode::SUCCESS } else { ExitCode::FAILURE })
        }
    }
}
