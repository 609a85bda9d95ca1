//! `sdc`: the pflex storage data client (NBD server over the cluster).

use clap::Parser;

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let args = pflex_sdc_nbd::app::Args::parse();
    let runtime = pflex_dataplane::runtime::network_runtime(args.network_threads)?;
    runtime.block_on(pflex_sdc_nbd::app::run(args))?;
    Ok(())
}
