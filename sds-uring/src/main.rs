//! `sds`: the pflex storage server binary (see `pflex_sds_uring::server`).

use clap::Parser;
use pflex_sds_uring::server::{run, SdsArgs};

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let args = SdsArgs::parse();
    let runtime = pflex_dataplane::runtime::network_runtime(args.network_threads)?;
    runtime.block_on(async {
        let config = args.resolve()?;
        run(config).await?;
        Ok(())
    })
}
