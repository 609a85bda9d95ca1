//! The `sdc` process: command line, and the wiring of the NBD server, the
//! cluster backend, the control-plane agent, the HTTP ports and the
//! periodic SQLite writer.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use tokio::net::TcpListener;

use crate::agent::{Agent, Identity, NodeState};
use crate::cluster::{ClusterBackend, ClusterConfig};
use crate::http::{control_router, mgmt_router, HttpState};
use crate::metrics::NbdStats;
use crate::nbd::server::{NbdServer, NbdTls, ServerConfig};
use crate::state_db::{StateDb, VolumeSnapshot};

/// The pflex SDC: serves the volumes mapped to this client over NBD.
#[derive(Debug, Clone, Parser)]
#[command(name = "sdc", version, about)]
pub struct Args {
    /// Base URL of the MDM.
    #[arg(long, env = "PFLEX_MDM", default_value = "http://127.0.0.1:8001")]
    pub mdm: String,
    /// File holding a one-time enrollment token (`pflex sdc add NAME`; `pflex up`
    /// writes one), used at the first start; later starts use the credential kept
    /// in the data dir.
    #[arg(long)]
    pub enrollment_token_file: Option<PathBuf>,
    /// File holding the cluster join key.
    #[arg(long)]
    pub join_key_file: Option<PathBuf>,
    /// The join key itself (prefer --join-key-file: command lines are visible to other users).
    #[arg(long, env = "PFLEX_JOIN_KEY", hide_env_values = true)]
    pub join_key: Option<String>,
    /// Name of this SDC; registering again with the same name is the same SDC.
    #[arg(long, default_value = "sdc1")]
    pub name: String,
    /// Directory of the SDC's own state (sdc_local.db, sdc_chunks.db).
    #[arg(long, default_value = "./pflex-data/sdc1")]
    pub data_dir: PathBuf,
    /// Address of the NBD server. On a non-loopback address TLS is required
    /// (`--tls-dir`), unless `--insecure`: plain NBD has no access control.
    #[arg(long, default_value = "127.0.0.1:10809")]
    pub nbd_listen: SocketAddr,
    /// Serve plain NBD on a non-loopback address anyway: anyone who can reach
    /// it can read and write every volume mapped to this SDC.
    #[arg(long)]
    pub insecure: bool,
    /// Directory of this node's TLS files (`ca-cert.pem`, `cert.pem`,
    /// `key.pem`, issued by the cluster CA). With it the NBD server offers
    /// STARTTLS and accepts only clients with a certificate from that CA, the
    /// HTTP ports serve HTTPS only, and the MDM is reached over HTTPS trusting
    /// that CA alone.
    #[arg(long)]
    pub tls_dir: Option<PathBuf>,
    /// Require TLS on NBD even on a loopback address (it is always required
    /// on a non-loopback one unless `--insecure`).
    #[arg(long)]
    pub nbd_tls_required: bool,
    /// Port of the control API (GET /volumes).
    #[arg(long, default_value_t = 8003)]
    pub control_port: u16,
    /// Port of the management API (GET /health, GET /metrics).
    #[arg(long, default_value_t = 8004)]
    pub mgmt_port: u16,
    /// Address the HTTP ports bind to (`--listen` is the same flag); also
    /// the one this SDC registers with unless `--advertise` says otherwise.
    #[arg(long, alias = "listen", default_value = "127.0.0.1")]
    pub host: String,
    /// Address the MDM and the CLI reach this SDC at, if not the listen address.
    #[arg(long)]
    pub advertise: Option<String>,
    /// Heartbeat interval; by default the one the MDM suggests at registration.
    #[arg(long)]
    pub heartbeat_interval_secs: Option<u64>,
    /// Threads running NBD and data-plane connections; 1 runs them on one
    /// event loop, which avoids cross-CPU wake-ups per request.
    #[arg(long, env = "PFLEX_NETWORK_THREADS", default_value_t = 1)]
    pub network_threads: usize,
    /// Data-plane connections to each SDS; default: one per network thread
    /// (more connections than threads only split the batches each write
    /// and read syscall could carry).
    #[arg(long, env = "PFLEX_SDS_CONNECTIONS")]
    pub connections_per_sds: Option<usize>,
    /// Requests one NBD connection may have in flight.
    #[arg(long, default_value_t = 256)]
    pub max_in_flight: usize,
    /// NBD sessions (past the handshake) served at once; more are closed.
    #[arg(long, default_value_t = 1024)]
    pub max_connections: usize,
    /// NBD connections in the handshake at once; a new one evicts the one
    /// waiting longest, so idle sockets cannot lock clients out.
    #[arg(long, default_value_t = 64)]
    pub max_handshakes: usize,
    /// Payload bytes all NBD sessions together may hold in flight (the cap
    /// on the SDC's memory for client data).
    #[arg(long, default_value = "512M", value_parser = pflex_proto::size::parse_size)]
    pub max_in_flight_total: u64,
    /// How long one IO keeps retrying through SDS restarts and map changes before failing with EIO.
    #[arg(long, default_value_t = 30)]
    pub io_retry_secs: u64,
    /// How often the state files (sdc_local.db, sdc_chunks.db) are written.
    #[arg(long, default_value_t = 5)]
    pub state_interval_secs: u64,
    /// Serve in-memory exports NAME:SIZE (e.g. `scratch:1G`, repeatable)
    /// instead of the cluster: no MDM, nothing kept. For checking NBD
    /// clients and measuring the protocol layer alone.
    #[arg(long, value_name = "NAME:SIZE", value_parser = parse_memory_export)]
    pub memory_export: Vec<(String, u64)>,
}

fn parse_memory_export(s: &str) -> Result<(String, u64), String> {
    let (name, size) = s.split_once(':').ok_or("expected NAME:SIZE")?;
    let bytes = pflex_proto::size::parse_size(size)?;
    if name.is_empty() || bytes == 0 {
        return Err("name and size must be non-empty".into());
    }
    Ok((name.to_owned(), bytes))
}

/// Serves only in-memory exports (see `--memory-export`).
async fn run_memory(args: Args, tls: Option<NbdTls>) -> Result<(), StartError> {
    let backend = Arc::new(crate::memory::MemoryBackend::new());
    for (name, size) in &args.memory_export {
        backend.add(name, *size, false);
    }
    let listener = listen(args.nbd_listen.to_string()).await?;
    let server = NbdServer::new(
        backend,
        ServerConfig {
            max_in_flight_requests: args.max_in_flight,
            max_connections: args.max_connections,
            max_handshakes: args.max_handshakes,
            max_total_in_flight_bytes: args.max_in_flight_total as usize,
            tls,
            ..ServerConfig::default()
        },
        Arc::new(NbdStats::default()),
    );
    tracing::info!(nbd = %args.nbd_listen, exports = args.memory_export.len(), "serving in-memory exports");
    tokio::select! {
        () = server.serve(listener) => Ok(()),
        () = stop_signal() => Ok(()),
    }
}

/// Why the SDC could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Enrollment(#[from] pflex_mdm_client::EnrollmentError),
    #[error(
        "refusing to serve plain NBD on {0}: anyone who can reach a non-loopback address could \
         read and write every mapped volume (NBD has no access control without TLS). Give \
         --tls-dir to require TLS with client certificates, listen on a loopback address, or \
         pass --insecure to accept that"
    )]
    InsecureListen(SocketAddr),
    #[error("--nbd-tls-required needs --tls-dir")]
    TlsRequiredWithoutFiles,
    #[error("loading the TLS files: {0}")]
    Tls(#[from] pflex_tls::TlsError),
    #[error("creating the data dir {path}: {source}")]
    DataDir { path: PathBuf, source: std::io::Error },
    #[error("opening the state databases: {0}")]
    StateDb(#[from] crate::state_db::StateDbError),
    #[error("listening on {addr}: {source}")]
    Listen { addr: String, source: std::io::Error },
    #[error("HTTP server: {0}")]
    Http(std::io::Error),
}

impl Args {
    pub fn enrollment(&self) -> Result<pflex_mdm_client::Enrollment, StartError> {
        Ok(pflex_mdm_client::Enrollment::resolve(
            &self.data_dir,
            self.enrollment_token_file.as_deref(),
            self.join_key_file.as_deref(),
            self.join_key.as_deref(),
        )?)
    }
}

async fn listen(addr: String) -> Result<TcpListener, StartError> {
    TcpListener::bind(&addr).await.map_err(|source| StartError::Listen { addr, source })
}

/// How the NBD server treats TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NbdTlsPolicy {
    /// No TLS (loopback only, or `--insecure`).
    Plain,
    /// STARTTLS offered, plain clients served too.
    Offered,
    /// Nothing is served before STARTTLS.
    Required,
}

/// Decides the NBD server's TLS policy from where it listens and the flags.
pub fn nbd_tls_policy(
    listen: SocketAddr,
    tls_configured: bool,
    tls_required_flag: bool,
    insecure: bool,
) -> Result<NbdTlsPolicy, StartError> {
    let exposed = !listen.ip().is_loopback();
    match (tls_configured, exposed, tls_required_flag, insecure) {
        (false, _, true, _) => Err(StartError::TlsRequiredWithoutFiles),
        (false, true, false, false) => Err(StartError::InsecureListen(listen)),
        (false, _, false, _) => Ok(NbdTlsPolicy::Plain),
        (true, _, true, _) | (true, true, false, false) => Ok(NbdTlsPolicy::Required),
        (true, _, false, _) => Ok(NbdTlsPolicy::Offered),
    }
}

impl Args {
    /// The NBD server's TLS, loaded from `--tls-dir` under the policy.
    fn nbd_tls(&self) -> Result<Option<NbdTls>, StartError> {
        let policy = nbd_tls_policy(
            self.nbd_listen,
            self.tls_dir.is_some(),
            self.nbd_tls_required,
            self.insecure,
        )?;
        let Some(dir) = self.tls_dir.as_ref().filter(|_| policy != NbdTlsPolicy::Plain) else {
            return Ok(None);
        };
        let acceptor = pflex_tls::NodeTls::new(dir).acceptor(pflex_tls::ClientAuth::Required)?;
        Ok(Some(NbdTls { acceptor, required: policy == NbdTlsPolicy::Required }))
    }
}

/// Runs the SDC until the process is stopped.
pub async fn run(args: Args) -> Result<(), StartError> {
    let nbd_tls = args.nbd_tls()?;
    if let Some(dir) = &args.tls_dir {
        pflex_mdm_client::trust::trust_cluster_ca(dir)?;
    }
    if !args.memory_export.is_empty() {
        return run_memory(args, nbd_tls).await;
    }
    let enrollment = args.enrollment()?;
    std::fs::create_dir_all(&args.data_dir)
        .map_err(|source| StartError::DataDir { path: args.data_dir.clone(), source })?;
    let mut db = StateDb::open(&args.data_dir)?;

    let ctx = crate::cluster::ClusterContext::new(ClusterConfig {
        connections_per_sds: args.connections_per_sds.unwrap_or(args.network_threads).max(1),
        retry_for: Duration::from_secs(args.io_retry_secs.max(1)),
        ..ClusterConfig::default()
    });
    let backend = ClusterBackend::new(ctx);
    let nbd_stats = Arc::new(NbdStats::default());
    let node = Arc::new(NodeState::default());

    let nbd_listener = listen(args.nbd_listen.to_string()).await?;
    let mgmt_listener = listen(format!("{}:{}", args.host, args.mgmt_port)).await?;
    let control_listener = listen(format!("{}:{}", args.host, args.control_port)).await?;
    let nbd_port = nbd_listener.local_addr().map(|a| a.port()).unwrap_or(args.nbd_listen.port());

    let http_state = Arc::new(HttpState {
        name: args.name.clone(),
        started: Instant::now(),
        node: node.clone(),
        backend: backend.clone(),
        nbd: nbd_stats.clone(),
        nbd_address: format!("{}:{}", args.nbd_listen.ip(), nbd_port),
    });
    let limits = pflex_httpd::Limits::default();
    let https = args.tls_dir.as_deref().map(pflex_httpd::tls_acceptor).transpose()?;
    let mgmt = pflex_httpd::serve(
        mgmt_listener,
        mgmt_router(http_state.clone()),
        limits,
        https.clone(),
        std::future::pending(),
    );
    let control = pflex_httpd::serve(
        control_listener,
        control_router(http_state),
        limits,
        https,
        std::future::pending(),
    );

    let server = NbdServer::new(
        backend.clone(),
        ServerConfig {
            max_in_flight_requests: args.max_in_flight,
            max_connections: args.max_connections,
            max_handshakes: args.max_handshakes,
            max_total_in_flight_bytes: args.max_in_flight_total as usize,
            tls: nbd_tls.clone(),
            ..ServerConfig::default()
        },
        nbd_stats,
    );
    tracing::info!(nbd = %args.nbd_listen, mgmt = args.mgmt_port, control = args.control_port,
                   mdm = %args.mdm, "SDC starting");
    tokio::spawn(server.serve(nbd_listener));

    let agent = Agent::new(
        Identity {
            mdm_url: args.mdm.clone(),
            enrollment,
            name: args.name.clone(),
            host: args.advertise.clone().unwrap_or_else(|| args.host.clone()),
            nbd_port,
            control_port: args.control_port,
            mgmt_port: args.mgmt_port,
            heartbeat_interval: args.heartbeat_interval_secs.map(Duration::from_secs),
        },
        backend.clone(),
        node,
    );
    tokio::spawn(agent.run());

    let state_backend = backend.clone();
    let interval = Duration::from_secs(args.state_interval_secs.max(1));
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(interval).await;
            let snapshot = snapshot(&state_backend);
            let result = tokio::task::spawn_blocking(move || {
                let r = db.record(pflex_proto::unix_now(), &snapshot);
                (db, r)
            })
            .await;
            match result {
                Ok((back, r)) => {
                    db = back;
                    if let Err(e) = r {
                        tracing::warn!(error = %e, "writing the state databases failed");
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, "state writer task failed; state files no longer updated");
                    return;
                }
            }
        }
    });

    // Stopping needs no draining: the SDC holds no dirty data (every
    // acknowledged write is on both replicas), so clients only see their
    // connection close, as on any server restart.
    tokio::select! {
        () = mgmt => Ok(()),
        () = control => Ok(()),
        () = stop_signal() => {
            tracing::info!("SDC stopping");
            Ok(())
        }
    }
}

/// Resolves on SIGINT or SIGTERM.
async fn stop_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch SIGTERM");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

/// Per-volume snapshot for the state files.
fn snapshot(backend: &ClusterBackend) -> Vec<VolumeSnapshot> {
    backend
        .mappings()
        .into_iter()
        .map(|m| {
            let v = backend.volume(m.volume_id);
            let mut s = VolumeSnapshot {
                volume_id: m.volume_id,
                name: m.name.clone(),
                size_bytes: m.size_bytes,
                access_mode: m.access_mode.as_str().into(),
                mapping_gen: m.mapping_gen,
                ..Default::default()
            };
            if let Some(v) = v {
                let token = v.token();
                s.epoch = v.placement().epoch;
                s.token_id = Some(token.token_id);
                s.token_expires_at = token.expires_at;
                s.in_flight = v.stats.in_flight.load(std::sync::atomic::Ordering::Relaxed);
                s.ops = v
                    .stats
                    .by_op()
                    .iter()
                    .map(|(op, c)| {
                        (
                            *op,
                            c.ops(),
                            c.bytes(),
                            c.errors(),
                            c.latency.quantile_us(0.5),
                            c.latency.quantile_us(0.99),
                        )
                    })
                    .collect();
            }
            s
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_export_sizes() {
        assert_eq!(parse_memory_export("a:1G"), Ok(("a".into(), 1 << 30)));
        assert_eq!(parse_memory_export("b:512m"), Ok(("b".into(), 512 << 20)));
        assert_eq!(parse_memory_export("c:4096"), Ok(("c".into(), 4096)));
        assert!(parse_memory_export("d").is_err());
        assert!(parse_memory_export(":1G").is_err());
        assert_eq!(parse_memory_export("e:1T"), Ok(("e".into(), 1 << 40)));
        assert!(parse_memory_export("e:1Q").is_err());
        assert!(parse_memory_export("f:0").is_err());
    }

    /// (listen, --tls-dir, --nbd-tls-required, --insecure) -> policy.
    #[test]
    fn nbd_tls_policy_table() {
        use NbdTlsPolicy::*;
        let lo: SocketAddr = "127.0.0.1:10809".parse().unwrap();
        let any: SocketAddr = "0.0.0.0:10809".parse().unwrap();
        let ok = |l, t, r, i| nbd_tls_policy(l, t, r, i).ok();
        assert_eq!(ok(lo, false, false, false), Some(Plain));
        assert_eq!(ok(lo, true, false, false), Some(Offered));
        assert_eq!(ok(lo, true, true, false), Some(Required));
        assert_eq!(ok(any, true, false, false), Some(Required));
        assert_eq!(ok(any, true, false, true), Some(Offered));
        assert_eq!(ok(any, false, false, true), Some(Plain));
        assert!(matches!(
            nbd_tls_policy(any, false, false, false),
            Err(StartError::InsecureListen(_))
        ));
        assert!(matches!(
            nbd_tls_policy(lo, false, true, false),
            Err(StartError::TlsRequiredWithoutFiles)
        ));
    }
}
