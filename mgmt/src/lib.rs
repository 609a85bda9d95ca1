//! The MGMT component: a web dashboard over the cluster.
//!
//! It registers with the MDM like every component (join key → MGMT
//! credential, which may only read), polls the MDM's health, summary,
//! volumes, SDS and SDC lists, and each SDS/SDC mgmt port, every
//! `--poll-interval-secs`; keeps what it saw in its own `mgmt.db`; raises an
//! alert when a component goes STALE/FAILED, the cluster is not HEALTHY,
//! chunks are degraded or the MDM is unreachable, and resolves it by itself
//! when the condition clears. The dashboard needs a login (users and
//! sessions in `mgmt.db`; an `admin` user with a random password written to
//! `<data-dir>/admin_password` on first boot).

pub mod accounts;
pub mod db;
pub mod poller;
pub mod web;

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;

/// Command-line options of `mgmt`.
#[derive(Debug, Clone, clap::Parser)]
#[command(name = "mgmt", about = "pflex dashboard: health, topology, volumes, alerts")]
pub struct Config {
    /// Address of the dashboard.
    #[arg(long, default_value = "127.0.0.1:5000")]
    pub listen: std::net::SocketAddr,
    /// MDM base URL.
    #[arg(long, env = "PFLEX_MDM", default_value = "http://127.0.0.1:8001")]
    pub mdm: String,
    /// File holding a one-time enrollment token (role MGMT), used at the first
    /// start; later starts use the credential kept in the data dir.
    #[arg(long)]
    pub enrollment_token_file: Option<PathBuf>,
    /// File holding the cluster's join key.
    #[arg(long)]
    pub join_key_file: Option<PathBuf>,
    /// The join key itself (prefer --join-key-file).
    #[arg(long, env = "PFLEX_JOIN_KEY", hide_env_values = true)]
    pub join_key: Option<String>,
    /// Directory for mgmt.db and the admin password.
    #[arg(long, default_value = "./mgmt-data")]
    pub data_dir: PathBuf,
    /// Name this dashboard registers under.
    #[arg(long, default_value = "mgmt1")]
    pub name: String,
    /// Seconds between polls of the MDM and the components.
    #[arg(long, default_value_t = 10)]
    pub poll_interval_secs: u64,
    /// Directory of this node's TLS files (`ca-cert.pem`, `cert.pem`, `key.pem`
    /// from the cluster CA): the dashboard is then served over HTTPS only, and
    /// the MDM and the components are reached over HTTPS trusting that CA alone.
    #[arg(long)]
    pub tls_dir: Option<PathBuf>,
}

/// State shared by the poller and the web handlers.
pub struct Shared {
    pub db: std::sync::Mutex<db::MgmtDb>,
    pub config: Config,
    pub started: std::time::Instant,
    pub last_overview: std::sync::Mutex<Option<poller::Overview>>,
    pub registered: std::sync::atomic::AtomicBool,
    /// Failed logins per client address.
    pub limiter: accounts::LoginLimiter,
    /// Password hashes computed at once.
    pub hashing: tokio::sync::Semaphore,
}

/// Runs the dashboard until the process is stopped.
pub async fn run(config: Config) -> anyhow::Result<()> {
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("creating {}", config.data_dir.display()))?;
    let https = config.tls_dir.as_deref().map(pflex_httpd::tls_acceptor).transpose()?;
    if let Some(dir) = &config.tls_dir {
        pflex_mdm_client::trust::trust_cluster_ca(dir)?;
    }
    let enrollment = pflex_mdm_client::Enrollment::resolve(
        &config.data_dir,
        config.enrollment_token_file.as_deref(),
        config.join_key_file.as_deref(),
        config.join_key.as_deref(),
    )?;
    // The first admin password is hashed with Argon2id: not on an async thread.
    let data_dir = config.data_dir.clone();
    let db = tokio::task::spawn_blocking(move || {
        let db = db::MgmtDb::open(&data_dir.join("mgmt.db"))?;
        db.ensure_admin(&data_dir.join("admin_password"))?;
        anyhow::Ok(db)
    })
    .await??;
    let shared = Arc::new(Shared {
        db: std::sync::Mutex::new(db),
        config: config.clone(),
        started: std::time::Instant::now(),
        last_overview: std::sync::Mutex::new(None),
        registered: std::sync::atomic::AtomicBool::new(false),
        limiter: accounts::LoginLimiter::default(),
        hashing: tokio::sync::Semaphore::new(accounts::HASHING_AT_ONCE),
    });
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("binding {}", config.listen))?;
    tracing::info!("dashboard on {}://{}", pflex_mdm_client::trust::scheme(), config.listen);
    tokio::spawn(poller::run(shared.clone(), enrollment));
    let limits = pflex_httpd::Limits::default();
    pflex_httpd::serve(listener, web::router(shared), limits, https, std::future::pending()).await;
    Ok(())
}
