//! `pflex`: the operator CLI. Parses the command line and hands each
//! subcommand to its module; see the `pflex_tools` library.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use pflex_tools::bench::{self, BenchArgs};
use pflex_tools::cli::{self, AdminCommand, ConnectionArgs};
use pflex_tools::up::{self, UpArgs};
use pflex_tools::verify::{self, VerifyArgs};

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
    /// Start a whole local cluster (MDM, SDS x3, SDC, dashboard) serving volume vol1 over NBD.
    Up(UpArgs),
    /// Stop a cluster started with `pflex up --detach`.
    Down {
        /// Data dir of that cluster [default: ./pflex-data].
        #[arg(long = "data-dir", value_name = "DIR")]
        data_dir: Option<std::path::PathBuf>,
    },
    /// A cluster over emulated hosts (network namespaces) whose links and processes can be
    /// cut, killed and frozen: rehearse faults.
    Lab(pflex_tools::lab::LabArgs),
    /// Bring back a component of a `pflex up` cluster (after a crash or a kill), with its data.
    #[command(subcommand)]
    Node(NodeCommand),
    /// Run the fio jobs against pflex, qemu-nbd and the local disk, and print the ratios.
    Bench(BenchArgs),
    /// Prove no acknowledged write is lost: write self-describing blocks, later check them.
    Verify(VerifyArgs),
}

/// Components of a cluster started with `pflex up`.
#[derive(Debug, Subcommand)]
enum NodeCommand {
    /// Start component NAME (mdm, sds1, sds2, …, sdc1, mgmt) again from the command line
    /// `pflex up` recorded, and wait until it is back; Ctrl-C of `pflex up` or `pflex down`
    /// stops it like the others.
    Start {
        /// The component's name, as in `pflex up`'s output and `logs/pids`.
        name: String,
        /// Data dir of that cluster [default: ./pflex-data].
        #[arg(long = "data-dir", value_name = "DIR")]
        data_dir: Option<std::path::PathBuf>,
    },
}

fn data_dir(flag: Option<std::path::PathBuf>, conn: &ConnectionArgs) -> std::path::PathBuf {
    flag.or_else(|| conn.data_dir.clone()).unwrap_or_else(|| "./pflex-data".into())
}

async fn dispatch(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Admin(command) => {
            let out = cli::run(command, &cli.connection).await?;
            print!("{out}");
        }
        Command::Up(mut args) => {
            args.data_dir = data_dir(args.data_dir_flag.take(), &cli.connection);
            up::run(args).await?;
        }
        Command::Down { data_dir: dir } => up::down(&data_dir(dir, &cli.connection)).await?,
        Command::Node(NodeCommand::Start { name, data_dir: dir }) => {
            up::node_start(&data_dir(dir, &cli.connection), &name).await?
        }
        Command::Bench(args) => bench::run(args).await?,
        Command::Lab(args) => pflex_tools::lab::run(args).await?,
        Command::Verify(args) => verify::run(args).await?,
    }
    Ok(())
}

#[tokio::main]
async fn main() -> ExitCode {
    // Every file and directory this process creates (secrets, databases,
    // device images, logs) is for its owner only: 0600 and 0700.
    // SAFETY: umask(2) sets this process's file-mode mask and cannot fail.
    unsafe { libc::umask(0o077) };
    let cli = Cli::parse();
    match dispatch(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
