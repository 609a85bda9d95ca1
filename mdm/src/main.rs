//! `mdm`: the pflex metadata manager binary (see the `pflex_mdm` library).

use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // Every file and directory this process creates (secrets, databases,
    // device images, logs) is for its owner only: 0600 and 0700.
    // SAFETY: umask(2) sets this process's file-mode mask and cannot fail.
    unsafe { libc::umask(0o077) };
    pflex_mdm::db::disable_memory_statistics();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                // openraft logs every failed message to an unreachable
                // member, several times a second; the MDM logs leadership
                // and membership changes itself.
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,openraft=off")),
        )
        .with_writer(std::io::stderr)
        .init();
    pflex_mdm::run(pflex_mdm::MdmConfig::parse()).await
}
