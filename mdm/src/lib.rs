//! The pflex metadata manager (MDM).
//!
//! Owns the cluster's metadata in `powerflex.db`: topology (protection
//! domains, pools, fault sets, SDS nodes and devices, SDC clients), volumes
//! and their compact placement, mappings, IO tokens, health and metrics.
//! It never touches data: SDCs fetch placement maps and capability tokens
//! from it, then talk to SDS nodes directly.
//!
//! - [`config`]: command line;
//! - [`db`]: schema and migrations;
//! - [`placement`]: the placement policy (pure);
//! - [`service`]: what each request does, inside one transaction;
//! - [`http`]: routes, authentication, JSON errors;
//! - [`writer`]: the database thread and its group commit;
//! - [`probe`]: the MDM's own check of an SDS reported unreachable;
//! - [`sightings`]: when components were last heard from (kept in memory);
//! - [`raft`] and [`changeset`]: the replicated MDM;
//! - [`metrics`]: Prometheus text.
//!
//! [`run`] starts everything; [`prepare`] creates the data directory's
//! files on first boot (cluster secret and admin token, both mode 0600).

pub mod changeset;
pub mod config;
pub mod db;
pub mod error;
pub mod http;
pub mod keys;
pub mod metrics;
pub mod placement;
pub mod probe;
pub mod raft;
pub mod rebalance;
pub mod secrets;
pub mod service;
pub mod sightings;
pub mod validate;
pub mod writer;

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use pflex_proto::token::ClusterSecret;

pub use config::MdmConfig;
use http::AppState;
use service::Settings;

/// File names inside the MDM data directory.
pub const DB_FILE: &str = "powerflex.db";
pub const CLUSTER_SECRET_FILE: &str = "cluster_secret";
pub const ADMIN_TOKEN_FILE: &str = "admin_token";

/// Reader connections (requests that only read run on them, beside the
/// writer's batches).
const READERS: usize = 4;

/// Why the MDM could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("{path}: {detail}")]
    BadFile { path: String, detail: String },
    #[error("database: {0}")]
    Db(#[from] db::DbError),
    #[error("invalid settings: {0}")]
    Settings(String),
    #[error("reading the signing key history: {0}")]
    SigningKeys(String),
    #[error("reading the cluster id: {0}")]
    ClusterIdentity(String),
    #[error("replication: {0}")]
    Raft(#[from] raft::RaftStartError),
}

/// Writes a secret file (0600) through a temporary file renamed over
/// `path`, so a reader sees the old value or the new one, never half.
pub(crate) fn write_secret(path: &Path, value: &str) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    file.write_all(value.as_bytes())?;
    file.write_all(b"\n")?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)
}

/// Reads a 0600 secret file, or creates it with `make()` on first boot.
fn read_or_create_secret(path: &Path, make: impl FnOnce() -> String) -> Result<String, StartError> {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let mode = std::fs::metadata(path)?.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                tracing::warn!(path = %path.display(), mode = format!("{mode:o}"), "secret file is readable by others; fixing to 0600");
                std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
            }
            Ok(text.trim().to_string())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let value = make();
            write_secret(path, &value)?;
            Ok(value)
        }
        Err(e) => Err(e.into()),
    }
}

/// What a started MDM needs from its data directory.
pub struct Prepared {
    pub state: Arc<AppState>,
}

/// Creates the data directory and its files when missing, opens the
/// database, starts replication when configured and builds the shared state.
pub async fn prepare(config: &MdmConfig, join_key: Option<&str>) -> Result<Prepared, StartError> {
    if config.stale_after_secs >= config.failed_after_secs {
        return Err(StartError::Settings(format!(
            "--stale-after-secs ({}) must be below --failed-after-secs ({})",
            config.stale_after_secs, config.failed_after_secs
        )));
    }
    std::fs::create_dir_all(&config.data_dir)?;
    let secret_path = config.data_dir.join(CLUSTER_SECRET_FILE);
    let secret_hex = read_or_create_secret(&secret_path, || ClusterSecret::generate().to_hex())?;
    let secret = ClusterSecret::from_hex(&secret_hex).map_err(|_| StartError::BadFile {
        path: secret_path.display().to_string(),
        detail: "not 64 hex digits".to_string(),
    })?;
    let admin_path = config.data_dir.join(ADMIN_TOKEN_FILE);
    let admin_token = read_or_create_secret(&admin_path, service::new_credential)?;
    if admin_token.is_empty() {
        return Err(StartError::BadFile {
            path: admin_path.display().to_string(),
            detail: "empty".into(),
        });
    }
    let db_path = config.data_dir.join(DB_FILE);
    let conn = db::open(&db_path)?;
    db::start_checkpointer(&db_path, db::CheckpointPolicy::default())?;
    // Every member derives the same id from the shared secret; a restored
    // backup brings its own.
    let opened = service::record_cluster_identity(&conn, &secret.cluster_id(), &secret.secret_id())
        .map_err(db::DbError::from)?;
    if let service::Opened::Restored { next_volume_id } = opened {
        tracing::warn!(
            next_volume_id,
            "this database was last opened with another cluster secret (a restored backup): \
             volume numbers continue far above the backup's, and every node registers again \
             for keys from this secret"
        );
    }
    let history =
        service::signing_history(&conn).map_err(|e| StartError::SigningKeys(e.to_string()))?;
    let timing = keys::KeyTiming {
        publish_for: std::time::Duration::from_secs(3 * config.heartbeat_interval_secs.max(1)),
        token_ttl: std::time::Duration::from_secs(config.token_ttl_secs),
    };
    // The files' secrets, unless a rotation recorded newer ones. A single
    // MDM's admin token is its file (a rotation rewrites it, and an operator
    // may replace it to recover); a replicated one's is what was committed.
    let adopter = secrets::Adopter {
        secrets: Arc::new(secrets::AdminSecrets::new(&admin_token, join_key)),
        keys: Arc::new(keys::Keys::new(secret.clone(), timing, history)),
    };
    let cluster_id =
        service::cluster_identity(&conn).map_err(|e| StartError::ClusterIdentity(e.to_string()))?;
    adopter.keys.adopt_cluster_id(cluster_id);
    let mut stored = secrets::stored(&conn).map_err(db::DbError::from)?;
    if config.mdm_id.is_none() {
        stored.admin_token_sha256 = None;
    }
    adopter.secrets.adopt(&stored);
    let replication = match config.mdm_id {
        None => None,
        Some(id) => {
            let members = match &config.mdm_peers {
                Some(text) => raft::parse_members(text).map_err(StartError::Settings)?,
                None => Default::default(),
            };
            if !members.is_empty() && !members.contains_key(&id) {
                return Err(StartError::Settings(format!(
                    "--mdm-peers does not list this member ({id})"
                )));
            }
            Some(
                raft::Replication::start(
                    id,
                    &config.data_dir,
                    &members,
                    raft::peer_key(&secret),
                    config.mdm_snapshot_every,
                    adopter.clone(),
                )
                .await?,
            )
        }
    };
    let settings = Settings {
        heartbeat_interval_secs: config.heartbeat_interval_secs,
        stale_after_secs: config.stale_after_secs,
        failed_after_secs: config.failed_after_secs,
        token_ttl_secs: config.token_ttl_secs,
        probe_on_report: config.probe_on_report,
        unreachable_grace_secs: config.unreachable_grace_secs,
        resync_window_secs: config.resync_window_secs,
    };
    Ok(Prepared {
        state: Arc::new(AppState::new(
            conn,
            writer::DbReaders::open(&db_path, READERS)?,
            settings,
            adopter.keys,
            http::Credentials { secrets: adopter.secrets, admin_token_path: admin_path },
            replication,
        )?),
    })
}

/// Re-places copies of failed SDS nodes and samples metrics, every
/// heartbeat interval, until the process ends.
async fn monitor(state: Arc<AppState>) {
    let period = std::time::Duration::from_secs(state.settings.heartbeat_interval_secs);
    let mut interval = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    // After a restart, nodes get a full failure timeout to heartbeat again
    // before their copies are moved: silence while the MDM was down is not
    // evidence of failure. The same holds for a member that becomes leader:
    // heartbeats sent during the election were refused.
    let mut replace_after = pflex_proto::unix_now() + state.settings.failed_after_secs;
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut unrebuilt_survivors = 0;
    let mut leading = state.replication.is_none();
    loop {
        interval.tick().await;
        if state.replication.is_some() {
            let leader_now = state.check_leader().is_ok();
            if leader_now && !leading {
                replace_after = pflex_proto::unix_now() + state.settings.failed_after_secs;
                if let Err(e) = state.reload_signing_history().await {
                    tracing::error!(error = %e, "reading the signing key history");
                    continue;
                }
                tracing::warn!(term = state.term(), "this MDM leads the cluster");
            }
            leading = leader_now;
            if !leading {
                continue;
            }
        }
        let replace = if pflex_proto::unix_now() >= replace_after {
            service::Replace::EveryFailedNode
        } else {
            service::Replace::Nothing
        };
        let sample = match state.read(service::metrics_sample).await {
            Ok(sample) => Some(sample),
            Err(e) => {
                tracing::error!(error = %e, "sampling the cluster's metrics");
                None
            }
        };
        let outcome = state
            .transact(move |conn, ctx| service::monitor_tick(conn, ctx, replace, sample))
            .await;
        if let Ok(report) = &outcome {
            if report.unrebuilt_survivors != unrebuilt_survivors {
                unrebuilt_survivors = report.unrebuilt_survivors;
                if unrebuilt_survivors > 0 {
                    tracing::error!(
                        pgs = unrebuilt_survivors,
                        "PGs unavailable: their only live copy was still being rebuilt"
                    );
                }
            }
        }
        match outcome {
            Ok(report) if report.copies_replaced > 0 => {
                state.counters.copies_replaced.fetch_add(report.copies_replaced, Ordering::Relaxed);
                tracing::warn!(
                    copies = report.copies_replaced,
                    volumes = report.volumes_replaced,
                    "re-placed copies held by failed SDS nodes"
                );
            }
            Ok(_) => {}
            Err(e) => tracing::error!(error = %e, "health monitor pass failed"),
        }
    }
}

/// Runs the MDM until SIGINT/SIGTERM.
pub async fn run(config: MdmConfig) -> anyhow::Result<()> {
    let join_key = config.resolve_join_key()?;
    if let Some(dir) = &config.tls_dir {
        // Raft messages to the other members go over HTTPS too (the client
        // that sends them is built in `prepare`).
        pflex_mdm_client::trust::trust_cluster_ca(dir)?;
    }
    let Prepared { state } = prepare(&config, join_key.as_deref()).await?;
    // A member of a replicated MDM is asked for its member certificate (see
    // `raft::peer_auth`); other callers may present theirs or none.
    let acceptor = if config.mdm_id.is_some() {
        pflex_httpd::tls_acceptor_naming_clients
    } else {
        pflex_httpd::tls_acceptor
    };
    let tls = config.tls_dir.as_deref().map(acceptor).transpose()?;
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", config.listen))?;
    tracing::info!(listen = %config.listen, data_dir = %config.data_dir.display(), "MDM serving");
    let monitor_task = tokio::spawn(monitor(Arc::clone(&state)));
    let limits = pflex_httpd::Limits {
        max_connections: connection_limit(config.max_connections),
        ..pflex_httpd::Limits::default()
    };
    pflex_httpd::serve(listener, http::router(state), limits, tls, shutdown_signal()).await;
    monitor_task.abort();
    tracing::info!("MDM stopped");
    Ok(())
}

/// Files kept for everything but client connections (databases, the Raft
/// log, connections to the other members, probes).
const RESERVED_FILES: u64 = 256;

/// `--max-connections`, within what the open-files limit allows.
fn connection_limit(wanted: u64) -> usize {
    match pflex_dataplane::runtime::raise_open_files_limit() {
        Ok(files) if files.saturating_sub(RESERVED_FILES) < wanted => {
            let allowed = files.saturating_sub(RESERVED_FILES).max(16);
            tracing::warn!(
                wanted,
                allowed,
                open_files = files,
                "the open-files limit bounds --max-connections"
            );
            allowed as usize
        }
        Ok(_) => wanted as usize,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the open-files limit");
            wanted as usize
        }
    }
}

async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(signal) => signal,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
