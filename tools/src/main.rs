//! `pflex`: the operator CLI. Parses the command line and hands each
//! subcommand to its module; see the `pflex_tools` library.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use pflex_tools::cli::{self, AdminCommand, ConnectionArgs};

/// Operate a pflex cluster: inspect health, manage volumes and mappings.
#[derive(Debug, Parser)]
#[command(name = "pflex", version)]
struct Cli {
    /// Connection flags may also be given before the subcommand.
    #[command(flatten)]
    connection: ConnectionArgs,
    #[command(subcommand)]
    command: Command,
}

/// Every subcommand; each arm dispatches to its own module.
#[derive(Debug, Subcommand)]
enum Command {
    #[command(flatten)]
    Admin(AdminCommand),
}

async fn dispatch(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Admin(command) => {
            let out = cli::run(command, &cli.connection).await?;
            print!("{out}");
        }
    }
    Ok(())
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match dispatch(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
