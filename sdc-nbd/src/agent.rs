//! The SDC's control-plane duties, all off the IO path.
//!
//! - registration with the join key (retried until the MDM answers; again
//!   whenever the MDM no longer knows the credential);
//! - heartbeats carrying IO totals; each one also refreshes the mappings,
//!   and a volume whose epoch or mapping generation moved on refetches its
//!   map or token at once;
//! - token renewal at 2/3 of each token's life;
//! - batched completion records (`POST /token/ack`).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pflex_mdm_client::MdmClient;
use pflex_proto::api::{
    HeartbeatRequest, NodeMetrics, NodeType, RegisterRequest, TokenAck, TokenAckBatch,
};

use crate::cluster::ClusterBackend;

/// Who this SDC is, for registration.
#[derive(Debug, Clone)]
pub struct Identity {
    pub mdm_url: String,
    /// How this SDC proves itself at registration, and where its credential is kept.
    pub enrollment: pflex_mdm_client::Enrollment,
    pub name: String,
    pub host: String,
    pub nbd_port: u16,
    pub control_port: u16,
    pub mgmt_port: u16,
    /// Overrides the interval the MDM suggests.
    pub heartbeat_interval: Option<Duration>,
}

/// Registration state, shown on `/health`.
#[derive(Default)]
pub struct NodeState {
    pub registered: AtomicBool,
    pub node_id: AtomicU64,
    pub heartbeats_sent: AtomicU64,
    pub heartbeats_failed: AtomicU64,
    pub acks_sent: AtomicU64,
    /// The MDM's volume change cursor from the last heartbeat reply (0:
    /// none yet, ask for every volume).
    pub volumes_cursor: AtomicU64,
    /// The highest MDM term heard: answers from an older (deposed) leader
    /// are ignored.
    pub mdm_term: pflex_proto::fence::TermFence,
}

/// Runs the control-plane loops.
pub struct Agent {
    identity: Identity,
    backend: Arc<ClusterBackend>,
    pub state: Arc<NodeState>,
}

impl Agent {
    pub fn new(identity: Identity, backend: Arc<ClusterBackend>, state: Arc<NodeState>) -> Self {
        Self { identity, backend, state }
    }

    /// Registers (retrying until it works) and returns the heartbeat interval.
    async fn register(&self) -> Duration {
        let mut delay = Duration::from_millis(200);
        loop {
            match self.try_register().await {
                Ok(interval) => return interval,
                Err(e) => {
                    tracing::warn!(error = %e, "registration with the MDM failed; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    async fn try_register(&self) -> Result<Duration, String> {
        let id = &self.identity;
        let anonymous = MdmClient::new(&id.mdm_url, None).map_err(|e| e.to_string())?;
        let mut request = RegisterRequest {
            join_key: String::new(),
            enrollment_token: None,
            credential: None,
            node_type: NodeType::Sdc,
            name: id.name.clone(),
            host: id.host.clone(),
            control_port: id.control_port,
            mgmt_port: id.mgmt_port,
            data_port: id.nbd_port,
            fault_set: None,
            pool: None,
            devices: Vec::new(),
            data_cluster_id: None,
        };
        id.enrollment.fill(&mut request);
        let resp = anonymous.register(&request).await.map_err(|e| e.to_string())?;
        if request.credential.as_deref() != Some(resp.credential.as_str()) {
            id.enrollment.store_off_thread(&resp.credential).await.map_err(|e| e.to_string())?;
        }
        let client = anonymous.with_credential(resp.credential.clone());
        self.backend.context().set_mdm(client);
        self.state.node_id.store(resp.node_id, Ordering::Relaxed);
        self.state.volumes_cursor.store(0, Ordering::Relaxed);
        tracing::info!(node_id = resp.node_id, name = %id.name, "registered with the MDM");
        if let Err(e) = self.backend.refresh_mappings().await {
            tracing::warn!(error = %e, "fetching mappings after registration failed");
        }
        self.state.registered.store(true, Ordering::Relaxed);
        let suggested = Duration::from_secs(resp.heartbeat_interval_secs.max(1));
        Ok(id.heartbeat_interval.unwrap_or(suggested))
    }

    /// Registers, then heartbeats and maintains tokens forever.
    pub async fn run(self) {
        let interval = self.register().await;
        let mut next_heartbeat = Instant::now() + interval;
        let mut next_ack = Instant::now() + ACK_INTERVAL;
        let mut acked: HashMap<(u64, &'static str), (u64, u64, u64)> = HashMap::new();
        loop {
            tokio::time::sleep(Duration::from_secs(1).min(interval)).await;
            self.renew_tokens().await;
            if Instant::now() >= next_heartbeat {
                next_heartbeat = Instant::now() + interval;
                self.heartbeat().await;
            }
            if Instant::now() >= next_ack {
                next_ack = Instant::now() + ACK_INTERVAL;
                self.send_acks(&mut acked).await;
            }
        }
    }

    async fn renew_tokens(&self) {
        let now = pflex_proto::unix_now();
        for v in self.backend.volumes() {
            let token = v.token();
            if token.needs_renewal(now) {
                match v.refresh_token(token.token_id).await {
                    Ok(()) => {
                        tracing::debug!(volume = v.id(), "token renewed");
                        v.present_token().await;
                    }
                    Err(e) => tracing::warn!(volume = v.id(), error = %e, "token renewal failed"),
                }
            }
        }
    }

    async fn heartbeat(&self) {
        let Ok(mdm) = self.backend.context().mdm() else {
            return;
        };
        let mut metrics = NodeMetrics::default();
        for v in self.backend.volumes() {
            metrics.read_ops += v.stats.read.ops();
            metrics.read_bytes += v.stats.read.bytes();
            metrics.write_ops += v.stats.write.ops();
            metrics.write_bytes += v.stats.write.bytes();
            for (_, c) in v.stats.by_op() {
                metrics.errors += c.errors();
            }
        }
        let cursor = self.state.volumes_cursor.load(Ordering::Relaxed);
        let request = HeartbeatRequest {
            node_id: self.state.node_id.load(Ordering::Relaxed),
            metrics,
            volumes_since: (cursor > 0).then_some(cursor),
        };
        match mdm.heartbeat(&request).await {
            Ok(resp) if !self.state.mdm_term.admit(resp.mdm_term) => {
                tracing::warn!(
                    term = resp.mdm_term,
                    highest = self.state.mdm_term.highest(),
                    "ignored a heartbeat answer from a deposed MDM leader"
                );
                return;
            }
            Ok(resp) => {
                self.state.heartbeats_sent.fetch_add(1, Ordering::Relaxed);
                self.state.volumes_cursor.store(resp.volumes_cursor, Ordering::Relaxed);
                for g in resp.volumes {
                    let Some(v) = self.backend.volume(g.volume_id) else { continue };
                    if g.epoch > v.placement().epoch {
                        if let Err(e) = v.refresh_map_now().await {
                            tracing::warn!(volume = g.volume_id, error = %e, "map refresh failed");
                        }
                    }
                }
            }
            Err(e) => {
                self.state.heartbeats_failed.fetch_add(1, Ordering::Relaxed);
                if e.is_unauthorized() || e.is_not_found() {
                    tracing::warn!(error = %e, "the MDM no longer knows this SDC; registering again");
                    self.state.registered.store(false, Ordering::Relaxed);
                    let _ = self.try_register().await;
                } else {
                    tracing::warn!(error = %e, "heartbeat failed");
                }
                return;
            }
        }
        // Mapping changes (and revocations) arrive with the mappings.
        if let Err(e) = self.backend.refresh_mappings().await {
            tracing::warn!(error = %e, "refreshing mappings failed");
        }
    }

    /// Sends per-token IO totals accumulated since the last batch.
    async fn send_acks(&self, acked: &mut HashMap<(u64, &'static str), (u64, u64, u64)>) {
        let Ok(mdm) = self.backend.context().mdm() else {
            return;
        };
        let mut records = Vec::new();
        let mut next = Vec::new();
        for v in self.backend.volumes() {
            let token_id = v.token().token_id;
            for (op, c) in v.stats.by_op() {
                let now = (c.ops(), c.bytes(), c.errors());
                let before = acked.get(&(v.id(), op)).copied().unwrap_or_default();
                if now.0 > before.0 {
                    records.push(TokenAck {
                        token_id,
                        volume_id: v.id(),
                        op: op.to_string(),
                        ops: now.0 - before.0,
                        bytes: now.1.saturating_sub(before.1),
                        errors: now.2.saturating_sub(before.2),
                    });
                }
                next.push(((v.id(), op), now));
            }
        }
        if records.is_empty() {
            return;
        }
        match mdm.ack_tokens(&TokenAckBatch { records }).await {
            Ok(_) => {
                self.state.acks_sent.fetch_add(1, Ordering::Relaxed);
                acked.extend(next);
            }
            Err(e) => tracing::debug!(error = %e, "token ack batch failed; will resend"),
        }
    }
}

/// How often completion records go to the MDM.
const ACK_INTERVAL: Duration = Duration::from_secs(5);
