//! `mgmt`: the pflex dashboard. All logic is in the library.

use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // Every file and directory this process creates (secrets, databases,
    // device images, logs) is for its owner only: 0600 and 0700.
    // SAFETY: umask(2) sets this process's file-mode mask and cannot fail.
    unsafe { libc::umask(0o077) };
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    pflex_mgmt::run(pflex_mgmt::Config::parse()).await
}
