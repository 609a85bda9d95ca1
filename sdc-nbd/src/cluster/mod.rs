//! The cluster backend: NBD exports are the volumes mapped to this SDC.
//!
//! [`ClusterBackend`] keeps the list of mappings (`GET /sdc/mappings`,
//! refreshed every heartbeat and whenever a client asks for an export name
//! it does not know) and one [`ClusterVolume`] per mapped volume with its
//! cached placement map and token. The IO itself is in [`volume`].

pub mod pool;
pub mod split;
pub mod volume;

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use pflex_mdm_client::{MdmClient, MdmClientError, UnreachableReports};
use pflex_proto::api::MappedVolume;
use pflex_proto::token::AccessMode;

use crate::backend::{BackendError, BlockBackend, ExportInfo};
pub use volume::ClusterVolume;

/// Tunables of the cluster IO path.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// Data-plane connections per SDS.
    pub connections_per_sds: usize,
    /// How long one piece of IO keeps retrying (SDS restart, map change).
    pub retry_for: Duration,
    /// Wait for one data-plane reply. Short, so a frozen SDS (whose kernel
    /// still holds the connection open) is reported within seconds; a retry
    /// after a timeout is safe because a late copy of a write is fenced.
    pub request_timeout: Duration,
    pub connect_timeout: Duration,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        Self {
            connections_per_sds: 4,
            retry_for: Duration::from_secs(30),
            request_timeout: Duration::from_millis(1500),
            connect_timeout: Duration::from_secs(2),
        }
    }
}

/// What every volume shares: the MDM handle, the SDS connections, the config.
pub struct ClusterContext {
    mdm: RwLock<Option<MdmClient>>,
    pub pool: pool::SdsPool,
    /// SDS nodes this SDC could not reach, reported to the MDM (rate-limited).
    pub unreachable: UnreachableReports,
    pub config: ClusterConfig,
}

impl ClusterContext {
    pub fn new(config: ClusterConfig) -> Arc<Self> {
        Arc::new(Self {
            mdm: RwLock::new(None),
            unreachable: UnreachableReports::default(),
            pool: pool::SdsPool::new(
                config.connections_per_sds,
                config.request_timeout,
                config.connect_timeout,
            ),
            config,
        })
    }

    /// The MDM client with this SDC's credential; an error until registered.
    pub fn mdm(&self) -> Result<MdmClient, BackendError> {
        self.mdm
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .ok_or_else(|| BackendError::Io("not registered with the MDM yet".into()))
    }

    pub fn set_mdm(&self, client: MdmClient) {
        *self.mdm.write().unwrap_or_else(|p| p.into_inner()) = Some(client);
    }
}

/// Human-readable export description (NBD_INFO_DESCRIPTION, LIST).
pub fn describe(m: &MappedVolume) -> String {
    let mode = match m.access_mode {
        AccessMode::ReadOnly => "read-only",
        AccessMode::ReadWrite => "read-write",
    };
    format!("pflex volume {} (id {}, {mode})", m.name, m.volume_id)
}

/// Least time between two mapping fetches triggered by unknown export names.
const UNKNOWN_NAME_REFRESH: Duration = Duration::from_millis(500);

/// Least time between two mapping fetches asked for on the control port.
pub const MIN_REFRESH: Duration = Duration::from_millis(100);

/// The exports of this SDC.
pub struct ClusterBackend {
    ctx: Arc<ClusterContext>,
    mappings: RwLock<Vec<MappedVolume>>,
    volumes: RwLock<HashMap<u64, Arc<ClusterVolume>>>,
    /// Serializes opening volumes and refreshing mappings.
    open_lock: tokio::sync::Mutex<()>,
    last_refresh: std::sync::Mutex<Option<Instant>>,
}

impl ClusterBackend {
    pub fn new(ctx: Arc<ClusterContext>) -> Arc<Self> {
        Arc::new(Self {
            ctx,
            mappings: RwLock::new(Vec::new()),
            volumes: RwLock::new(HashMap::new()),
            open_lock: tokio::sync::Mutex::new(()),
            last_refresh: std::sync::Mutex::new(None),
        })
    }

    pub fn context(&self) -> &Arc<ClusterContext> {
        &self.ctx
    }

    /// The mappings as last fetched, sorted by name.
    pub fn mappings(&self) -> Vec<MappedVolume> {
        self.mappings.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Volumes with routing state (opened), by id.
    pub fn volumes(&self) -> Vec<Arc<ClusterVolume>> {
        let mut v: Vec<_> =
            self.volumes.read().unwrap_or_else(|p| p.into_inner()).values().cloned().collect();
        v.sort_by_key(|v| v.id());
        v
    }

    pub fn volume(&self, id: u64) -> Option<Arc<ClusterVolume>> {
        self.volumes.read().unwrap_or_else(|p| p.into_inner()).get(&id).cloned()
    }

    /// Fetches this SDC's mappings, drops volumes no longer mapped, updates
    /// the others and opens new ones (map and token fetched now, so the
    /// first NBD request does not wait for the MDM).
    pub async fn refresh_mappings(&self) -> Result<(), MdmClientError> {
        let Ok(mdm) = self.ctx.mdm() else {
            return Ok(());
        };
        let mut fresh = mdm.sdc_mappings().await?;
        fresh.sort_by(|a, b| a.name.cmp(&b.name));
        let _guard = self.open_lock.lock().await;
        *self.last_refresh.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
        *self.mappings.write().unwrap_or_else(|p| p.into_inner()) = fresh.clone();
        let mut renew = Vec::new();
        {
            let mut volumes = self.volumes.write().unwrap_or_else(|p| p.into_inner());
            volumes.retain(|id, v| {
                let keep = fresh.iter().any(|m| m.volume_id == *id);
                if !keep {
                    tracing::info!(volume = id, "volume unmapped from this SDC");
                    v.mark_unmapped();
                }
                keep
            });
            for m in &fresh {
                if let Some(v) = volumes.get(&m.volume_id) {
                    if v.update_mapping(m.clone()) {
                        renew.push(v.clone());
                    }
                }
            }
        }
        for v in renew {
            let seen = v.token().token_id;
            if let Err(e) = v.refresh_token(seen).await {
                tracing::warn!(volume = v.id(), error = %e, "token renewal after a mapping change failed");
            }
        }
        for m in fresh {
            if self.volume(m.volume_id).is_none() {
                match ClusterVolume::open(self.ctx.clone(), m.clone()).await {
                    Ok(v) => {
                        tracing::info!(volume = m.volume_id, name = %m.name, "volume mapped");
                        v.present_token().await;
                        self.volumes
                            .write()
                            .unwrap_or_else(|p| p.into_inner())
                            .insert(m.volume_id, v);
                    }
                    Err(e) => {
                        tracing::warn!(volume = m.volume_id, error = %e, "cannot open volume")
                    }
                }
            }
        }
        Ok(())
    }

    /// [`Self::refresh_mappings`], unless one finished less than
    /// [`MIN_REFRESH`] ago: a caller polling for a change it just made
    /// cannot make this SDC hammer the MDM.
    pub async fn refresh_mappings_soon(&self) -> Result<(), MdmClientError> {
        let recent = self
            .last_refresh
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some_and(|t| t.elapsed() < MIN_REFRESH);
        if recent {
            return Ok(());
        }
        self.refresh_mappings().await
    }

    fn find_mapping(&self, name: &str) -> Option<MappedVolume> {
        let mappings = self.mappings.read().unwrap_or_else(|p| p.into_inner());
        if name.is_empty() {
            return mappings.first().cloned();
        }
        mappings.iter().find(|m| m.name == name).cloned()
    }
}

impl BlockBackend for ClusterBackend {
    type Volume = ClusterVolume;

    async fn list(&self) -> Vec<ExportInfo> {
        self.mappings()
            .into_iter()
            .map(|m| ExportInfo {
                description: describe(&m),
                name: m.name,
                size: m.size_bytes,
                read_only: m.access_mode == AccessMode::ReadOnly,
            })
            .collect()
    }

    async fn open(&self, name: &str) -> Option<Arc<ClusterVolume>> {
        let mut mapping = self.find_mapping(name);
        if mapping.is_none() {
            let recent = self
                .last_refresh
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .is_some_and(|t| t.elapsed() < UNKNOWN_NAME_REFRESH);
            if !recent {
                if let Err(e) = self.refresh_mappings().await {
                    tracing::warn!(error = %e, "refreshing mappings for an unknown export failed");
                }
                mapping = self.find_mapping(name);
            }
        }
        let mapping = mapping?;
        if let Some(v) = self.volume(mapping.volume_id) {
            return Some(v);
        }
        let _guard = self.open_lock.lock().await;
        if let Some(v) = self.volume(mapping.volume_id) {
            return Some(v);
        }
        match ClusterVolume::open(self.ctx.clone(), mapping.clone()).await {
            Ok(v) => {
                self.volumes
                    .write()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(mapping.volume_id, v.clone());
                Some(v)
            }
            Err(e) => {
                tracing::warn!(volume = mapping.volume_id, error = %e, "cannot open volume");
                None
            }
        }
    }
}
