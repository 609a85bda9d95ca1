//! `sds`: the pflex storage server binary (see `pflex_sds_uring::server`).

use clap::Parser;
use pflex_sds_uring::server::{run, SdsArgs};

fn main() -> anyhow::Result<()> {
    // Every file and directory this process creates (secrets, databases,
    // device images, logs) is for its owner only: 0600 and 0700.
    // SAFETY: umask(2) sets this process's file-mode mask and cannot fail.
    unsafe { libc::umask(0o077) };
    let _ = pflex_dataplane::runtime::raise_open_files_limit();
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
