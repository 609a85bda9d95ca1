//! `sdc`: the pflex storage data client (NBD server over the cluster).

use clap::Parser;

fn main() -> anyhow::Result<()> {
    // Every file and directory this process creates (secrets, databases,
    // device images, logs) is for its owner only: 0600 and 0700.
    // SAFETY: umask(2) sets this process's file-mode mask and cannot fail.
    unsafe { libc::umask(0o077) };
    let _ = pflex_dataplane::runtime::raise_open_files_limit();
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
