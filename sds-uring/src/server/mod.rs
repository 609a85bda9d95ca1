//! The SDS server: membership with the MDM, the data plane, replication and
//! the HTTP ports, around the chunk store.
//!
//! One [`SdsNode`] holds the shared state; tasks hold it in an `Arc`:
//! - [`membership`]: registration (enrollment token or kept credential →
//!   node id, credential, this node's keys), heartbeats with capacity and IO counters, batched
//!   IO acknowledgements, re-registration when the MDM answers 401;
//! - [`dataplane`]: the TCP data plane (AUTH, READ, WRITE, FLUSH, TRIM,
//!   WRITE_ZEROES, ALLOCATION, PING), every check before any IO, and
//!   two-copy replication; a peer it cannot reach is reported to the MDM;
//! - [`rebuild`]: copying a PG to its new secondary (or to a node joining
//!   it, for a move) when the MDM's heartbeat reply assigns a job, paced by
//!   [`movement`]; [`reclaim`]: releasing the chunks of PGs that moved away;
//! - [`http`]: `/health`, `/metrics` on both HTTP ports and the per-chunk
//!   checksum query on the control port;
//! - [`device_health`]: a failed device's copies reported to the MDM,
//!   which moves them;
//! - [`dirty`]: the chunks a PG's other copy may lack (degraded writes,
//!   failed forwards), resynced when it comes back;
//! - [`scrub`]: both copies of every chunk read, checked and made equal;
//! - [`fencing`]: late copies of writes never land after newer ones;
//!   [`lease`]: a primary serves only while its secondary vouches for it;
//! - [`cluster_tag`]: the store's chunks belong to one cluster; an MDM of
//!   another refuses the node rather than have it serve them;
//! - [`auth`], [`placement`], [`replication`], [`acks`], [`metrics`],
//!   [`local_log`]: the state those use.
//!
//! Startup order: open the store, bind every port (so a port clash fails
//! fast), serve HTTP (health says `registered: false`), register with the
//! MDM (retrying), then serve the data plane and start the background loops.

pub mod acks;
pub mod auth;
pub mod cluster_tag;
pub mod config;
pub mod dataplane;
pub mod device_health;
pub mod dirty;
pub mod fencing;
pub mod http;
pub mod lease;
pub mod local_log;
pub mod membership;
pub mod metrics;
pub mod movement;
pub mod placement;
pub mod rebuild;
pub mod reclaim;
pub mod replication;
pub mod scrub;

use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::Instant;

use pflex_mdm_client::MdmClient;
use tokio::net::TcpListener;

use crate::store::{ChunkStore, StoreConfig, StoreError};
use acks::AckBatcher;
use auth::{PeerReplayWindows, TokenCache};
pub use config::{NodeConfig, SdsArgs};
use local_log::LocalLog;
use metrics::{Gauges, SdsMetrics};
use placement::PlacementCache;
use replication::{ChunkOrderLocks, PeerClients};

/// Why the server could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error("cannot create the data directory {path}: {source}")]
    DataDir { path: String, source: std::io::Error },
    #[error("cannot open the chunk store: {0}")]
    Store(#[from] StoreError),
    #[error("loading the TLS files: {0}")]
    Tls(#[from] pflex_tls::TlsError),
    #[error(transparent)]
    DirtyLog(#[from] dirty::DirtyLogError),
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: String, source: std::io::Error },
    #[error(transparent)]
    Membership(#[from] membership::MembershipError),
}

/// Who this node is in the cluster, as the last registration said.
pub struct Identity {
    pub node_id: u64,
    /// MDM client carrying this node's credential.
    pub mdm: MdmClient,
    /// The token public keys and this node's own keys (among them the peer
    /// key of replication frames).
    pub keys: auth::NodeKeys,
    pub heartbeat_interval_secs: u64,
    /// The public name of the MDM secret `keys` derive from.
    pub secret_id: String,
    /// Counts registrations, so concurrent 401s trigger one re-registration.
    pub generation: u64,
}

/// Ports actually bound (0 in the config means "any free port").
#[derive(Debug, Clone, Copy)]
pub struct BoundPorts {
    pub control: u16,
    pub mgmt: u16,
    pub data: u16,
}

/// Shared state of one SDS process.
pub struct SdsNode {
    pub config: NodeConfig,
    pub store: Arc<ChunkStore>,
    pub ports: BoundPorts,
    identity: RwLock<Option<Arc<Identity>>>,
    registration: tokio::sync::Mutex<()>,
    pub tokens: TokenCache,
    pub peer_windows: PeerReplayWindows,
    pub placement: PlacementCache,
    pub peers: PeerClients,
    pub chunk_locks: ChunkOrderLocks,
    pub fences: fencing::WriteFences,
    /// The same rule on the secondary, per sending primary, by the forward's
    /// peer sequence number (taken under the primary's ordering lock).
    pub replica_fences: fencing::WriteFences,
    /// `None` when leases are off (`--lease-ms 0`).
    pub leases: Option<lease::Leases>,
    pub metrics: SdsMetrics,
    pub acks: AckBatcher,
    pub local_log: LocalLog,
    pub rebuilds: rebuild::RebuildRunner,
    /// Peers this node could not reach, reported to the MDM (rate-limited).
    pub unreachable: pflex_mdm_client::UnreachableReports,
    /// Scrub passes (see [`scrub`]).
    pub scrubber: scrub::Scrubber,
    /// Chunks the other copy of their PG may lack (see [`dirty`]).
    pub dirty: dirty::DirtyLog,
    /// Wakes the reclaim pass early (a volume this node served was deleted).
    pub reclaim_now: tokio::sync::Notify,
    /// Pacing of copy jobs and the state of moves (see [`movement`]).
    pub movement: movement::MovementState,
    /// The MDM drained and removed this node: the process stops.
    pub removed: tokio::sync::Notify,
    /// The highest MDM term heard: answers from an older (deposed) leader
    /// are ignored.
    pub mdm_term: pflex_proto::fence::TermFence,
    started: Instant,
}

impl SdsNode {
    /// The current identity, if registered.
    pub fn identity(&self) -> Option<Arc<Identity>> {
        self.identity.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn set_identity(&self, identity: Arc<Identity>) {
        *self.identity.write().unwrap_or_else(|p| p.into_inner()) = Some(identity);
    }

    /// Replaces the identity only if it is still the one of registration
    /// `generation` (a concurrent re-registration wins).
    fn replace_identity(&self, generation: u64, identity: Arc<Identity>) -> bool {
        let mut slot = self.identity.write().unwrap_or_else(|p| p.into_inner());
        if slot.as_ref().is_some_and(|current| current.generation == generation) {
            *slot = Some(identity);
            true
        } else {
            false
        }
    }

    pub fn uptime_secs(&self) -> u64 {
        self.started.elapsed().as_secs()
    }

    /// Values for `/metrics` that are not counters.
    pub fn gauges(&self) -> Gauges {
        let (capacity_bytes, used_bytes) = self.store.capacity();
        Gauges {
            capacity_bytes,
            used_bytes,
            cached_tokens: self.tokens.len() as u64,
            cached_placements: self.placement.len() as u64,
            dirty_chunks: self.dirty.len() as u64,
            registered: self.identity().is_some(),
            uptime_secs: self.uptime_secs(),
        }
    }
}

/// Runs an SDS until SIGINT/SIGTERM.
pub async fn run(config: NodeConfig) -> Result<(), ServerError> {
    std::fs::create_dir_all(&config.data_dir).map_err(|source| ServerError::DataDir {
        path: config.data_dir.display().to_string(),
        source,
    })?;
    let store = ChunkStore::open(StoreConfig {
        data_dir: config.data_dir.clone(),
        devices: config.devices.clone(),
        engine: config.engine,
        health: config.device_health,
    })?;
    let https = config.tls_dir.as_deref().map(pflex_httpd::tls_acceptor).transpose()?;
    if let Some(dir) = &config.tls_dir {
        pflex_mdm_client::trust::trust_cluster_ca(dir)?;
    }
    let control = bind(&config.host, config.control_port).await?;
    let mgmt = bind(&config.host, config.mgmt_port).await?;
    let data = bind(&config.host, config.data_port).await?;
    let port_of = |l: &TcpListener| l.local_addr().map(|a| a.port()).unwrap_or(0);
    let ports =
        BoundPorts { control: port_of(&control), mgmt: port_of(&mgmt), data: port_of(&data) };
    tracing::info!(
        name = %config.name,
        control = ports.control,
        mgmt = ports.mgmt,
        data = ports.data,
        engine = %config.engine,
        "SDS listening"
    );

    let dirty = dirty::DirtyLog::open(store.db_path())?;
    let leases =
        config.lease.map(|c| lease::Leases::open(c, config.data_dir.join("lease_horizon")));
    let node = Arc::new(SdsNode {
        local_log: LocalLog::open(store.db_path()),
        peers: PeerClients::new(config.peer_connections),
        config,
        store,
        ports,
        identity: RwLock::new(None),
        registration: tokio::sync::Mutex::new(()),
        tokens: TokenCache::default(),
        peer_windows: PeerReplayWindows::default(),
        placement: PlacementCache::default(),
        mdm_term: Default::default(),
        chunk_locks: ChunkOrderLocks::default(),
        fences: fencing::WriteFences::default(),
        replica_fences: fencing::WriteFences::default(),
        leases,
        metrics: SdsMetrics::default(),
        acks: AckBatcher::default(),
        rebuilds: rebuild::RebuildRunner::default(),
        unreachable: pflex_mdm_client::UnreachableReports::default(),
        reclaim_now: tokio::sync::Notify::new(),
        scrubber: scrub::Scrubber::default(),
        dirty,
        movement: movement::MovementState::default(),
        removed: tokio::sync::Notify::new(),
        started: Instant::now(),
    });
    node.local_log.health("started", format!("data port {}", ports.data));

    tokio::spawn(http::serve(control, http::control_router(node.clone()), https.clone()));
    tokio::spawn(http::serve(mgmt, http::mgmt_router(node.clone()), https));

    tokio::select! {
        registered = node.register_until_ok() => {
            if let Err(e) = registered {
                tracing::error!(error = %e, "the MDM refused this node");
                return Err(e.into());
            }
        }
        _ = shutdown_signal() => {
            tracing::info!("stopped before registration");
            return Ok(());
        }
    }
    tokio::spawn(dataplane::serve(node.clone(), data));
    tokio::spawn(membership::heartbeat_loop(node.clone()));
    tokio::spawn(dataplane::lease_loop(node.clone()));
    tokio::spawn(membership::ack_loop(node.clone()));
    tokio::spawn(device_health::device_watch(node.clone()));
    if let Some(every) = node.config.scrub_interval {
        tokio::spawn(scrub::scrub_loop(node.clone(), every));
    }
    if let Some(every) = node.config.reclaim_interval {
        tokio::spawn(reclaim::reclaim_loop(node.clone(), every));
    }

    let why = tokio::select! {
        _ = shutdown_signal() => "signal",
        _ = node.removed.notified() => "removed from the cluster",
    };
    tracing::info!(why, "shutting down: flushing the chunk store");
    if let Err(e) = node.store.flush().await {
        tracing::warn!(error = %e, "flush at shutdown failed");
    }
    node.local_log.health("stopped", why);
    Ok(())
}

async fn bind(host: &str, port: u16) -> Result<TcpListener, ServerError> {
    let addr = format!("{host}:{port}");
    let parsed: Result<SocketAddr, _> = addr.parse();
    let listener = match parsed {
        Ok(a) => TcpListener::bind(a).await,
        Err(_) => TcpListener::bind(&addr).await,
    };
    listener.map_err(|source| ServerError::Bind { addr, source })
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}
