//! `mdm`: the pflex metadata manager binary (see the `pflex_mdm` library).

use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    pflex_mdm::run(pflex_mdm::MdmConfig::parse()).await
}
