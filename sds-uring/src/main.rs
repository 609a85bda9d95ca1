//! `sds`: the pflex storage server binary (see `pflex_sds_uring::server`).

use clap::Parser;
use pflex_sds_uring::server::{run, SdsArgs};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let args = SdsArgs::parse();
    let config = args.resolve()?;
    run(config).await?;
    Ok(())
}
