//! `mgmt`: the pflex dashboard. All logic is in the library.

use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    pflex_mgmt::run(pflex_mgmt::Config::parse()).await
}
