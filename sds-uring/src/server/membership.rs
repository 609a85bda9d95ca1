//! Membership: registering with the MDM, heartbeats, IO acknowledgements
//! and placement fetches.
//!
//! Registration proves the node with its kept credential, or at its first
//! start with an enrollment token or the join key (see
//! `pflex_mdm_client::Enrollment`), and returns the node id, the credential
//! (kept 0600 in the data directory before it is used) and this node's keys:
//! the token public keys, its node key and the peer key (held in memory
//! only). Any MDM call answered 401 makes the node register again and retry
//! once; concurrent 401s cause one re-registration. If the keys changed,
//! every cached token is dropped (SDCs must present their new tokens), and
//! every placement map (the new cluster numbers its volumes and epochs
//! anew). A store holding chunks of one cluster never joins another unless
//! told to erase them (see [`super::cluster_tag`]).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use pflex_mdm_client::{MdmClient, MdmClientError};
use pflex_proto::api::{
    HeartbeatRequest, NodeType, RebuildAssignment, RegisterRequest, TokenAckBatch,
};
use pflex_proto::frame::Status;
use pflex_proto::placement::PlacementMap;

use super::cluster_tag::{self, ClusterTag, Refusal};
use super::placement::Lookup;
use super::{Identity, SdsNode};

/// Rounds of erasing another cluster's chunks before giving up.
const ERASE_ROUNDS: usize = 4;

/// Expired tokens are kept this long (seconds) so late requests get `Expired`, not `NoToken`.
const EXPIRED_TOKEN_GRACE_SECS: u64 = 300;

/// What the MDM says about a volume this node stores chunks of.
pub enum VolumeFate {
    /// It exists; its newest map.
    Live(Arc<PlacementMap>),
    /// It was deleted: every chunk of it here may be erased.
    Deleted,
    /// The MDM could not be asked: decide nothing.
    Unknown,
}

/// Why registration failed.
#[derive(Debug, thiserror::Error)]
pub enum MembershipError {
    #[error(transparent)]
    Mdm(#[from] MdmClientError),
    #[error("the MDM sent no keys for this SDS")]
    NoKeys,
    #[error("the MDM sent malformed keys: {0}")]
    BadKeys(pflex_proto::token::TokenError),
    #[error("cannot keep the credential: {0}")]
    Credential(#[from] pflex_mdm_client::EnrollmentError),
    #[error("the MDM refused this node for holding another cluster's data: {0}")]
    ForeignCluster(MdmClientError),
    #[error("the data directory's cluster record: {0}")]
    ClusterTag(std::io::Error),
    #[error("erasing another cluster's chunks: {0}")]
    Erase(crate::store::StoreError),
}

impl MembershipError {
    /// Whether retrying the same registration cannot succeed: the MDM
    /// answered with a 4xx other than timeout / rate limit, or sent
    /// something unusable.
    pub fn is_permanent(&self) -> bool {
        match self {
            MembershipError::Mdm(e) => {
                matches!(e.status(), Some(s) if (400..500).contains(&s) && s != 408 && s != 429)
                    || matches!(e, MdmClientError::InvalidUrl { .. })
            }
            MembershipError::NoKeys | MembershipError::BadKeys(_) => true,
            MembershipError::Credential(_) => true,
            MembershipError::ForeignCluster(_) => true,
            MembershipError::ClusterTag(_) | MembershipError::Erase(_) => true,
        }
    }
}

impl SdsNode {
    /// Registers (or registers again) with the MDM and installs the identity.
    pub async fn register(&self) -> Result<Arc<Identity>, MembershipError> {
        let config = &self.config;
        let anonymous = MdmClient::new(&config.mdm_url, None)?;
        let mut request = RegisterRequest {
            join_key: String::new(),
            enrollment_token: None,
            credential: None,
            node_type: NodeType::Sds,
            name: config.name.clone(),
            host: config.advertise.clone(),
            control_port: self.ports.control,
            mgmt_port: self.ports.mgmt,
            data_port: self.ports.data,
            fault_set: config.fault_set.clone(),
            pool: Some(config.pool.clone()),
            devices: self.store.devices(),
            data_cluster_id: None,
        };
        config.enrollment.fill(&mut request);
        let tag = ClusterTag::new(&config.data_dir);
        let recorded = tag.read().map_err(MembershipError::ClusterTag)?;
        request.data_cluster_id =
            cluster_tag::data_claim(recorded.as_deref(), self.store.holds_chunks());
        let reply = match anonymous.register(&request).await {
            Ok(reply) => reply,
            Err(refusal) if refusal.code() == Some("foreign_cluster_data") => {
                self.local_log.warning("foreign_cluster", refusal.to_string());
                match cluster_tag::on_refusal(config.erase_foreign_data) {
                    // As if its own MDM were unreachable: the node goes on
                    // with its cluster's sessions and asks again later.
                    Refusal::KeepAndWait => return Err(MembershipError::ForeignCluster(refusal)),
                    Refusal::EraseAndJoin => {
                        // No request of the old cluster may allocate a
                        // chunk once the erasing started.
                        self.tokens.clear();
                        let erased = self.erase_every_chunk().await?;
                        tag.forget().map_err(MembershipError::ClusterTag)?;
                        self.placement.clear();
                        tracing::warn!(chunks = erased, "erased another cluster's data to join");
                        self.local_log.health("foreign_data_erased", format!("{erased} chunks"));
                        request.data_cluster_id = None;
                        anonymous.register(&request).await?
                    }
                }
            }
            Err(e) => return Err(e.into()),
        };
        self.placement.reset_cursor();
        let keys = reply.sds_keys.as_ref().ok_or(MembershipError::NoKeys)?;
        let keys = super::auth::NodeKeys::from_api(keys).map_err(MembershipError::BadKeys)?;
        if request.credential.as_deref() != Some(reply.credential.as_str()) {
            config.enrollment.store_off_thread(&reply.credential).await?;
        }

        let previous = self.identity();
        // A new node key (a new cluster secret) invalidates every session
        // key; new token public keys (a rotation) do not: tokens already
        // verified stay valid until they expire.
        if previous.as_ref().is_some_and(|p| p.keys.node_key != keys.node_key) {
            // A new cluster secret: an MDM that came back with empty state
            // numbers volumes and epochs from 1 again, and may have given
            // this node another id. A kept map of "volume 1 at epoch 1" would
            // then be taken for the new volume's (same epoch, so never
            // refetched), with the old roles: this node refused the leases
            // its new primary asked for, for good.
            tracing::warn!(
                "this node's keys changed: dropping every cached token and placement map"
            );
            self.tokens.clear();
            self.placement.clear();
        }
        // Recorded before this node serves the cluster (before the identity
        // whose keys verify its tokens is installed).
        if !reply.cluster_id.is_empty() && recorded.as_deref() != Some(reply.cluster_id.as_str()) {
            let (tag, id) = (tag.clone(), reply.cluster_id.clone());
            tokio::task::spawn_blocking(move || tag.record(&id))
                .await
                .unwrap_or_else(|e| Err(std::io::Error::other(e)))
                .map_err(MembershipError::ClusterTag)?;
        }
        let identity = Arc::new(Identity {
            node_id: reply.node_id,
            mdm: anonymous.with_credential(reply.credential),
            keys,
            heartbeat_interval_secs: reply.heartbeat_interval_secs.max(1),
            secret_id: reply.secret_id,
            generation: previous.map_or(1, |p| p.generation + 1),
        });
        self.set_identity(identity.clone());
        self.metrics.registrations.fetch_add(1, Ordering::Relaxed);
        self.local_log.health("registered", format!("node id {}", reply.node_id));
        tracing::info!(node_id = reply.node_id, "registered with the MDM");
        Ok(identity)
    }

    /// Erases every chunk of the store (another cluster's, see
    /// [`cluster_tag`]); tokens were dropped first, but a write that passed
    /// its checks before may still allocate one, so it goes round until
    /// none is left (a few rounds at most).
    async fn erase_every_chunk(&self) -> Result<u64, MembershipError> {
        let mut erased = 0u64;
        for _ in 0..ERASE_ROUNDS {
            let chunks = self.store.allocated_chunks();
            if chunks.is_empty() {
                return Ok(erased);
            }
            for (volume, chunk) in chunks {
                self.store.erase(volume, chunk).await.map_err(MembershipError::Erase)?;
                erased += 1;
            }
        }
        if self.store.holds_chunks() {
            return Err(MembershipError::Erase(crate::store::StoreError::MapUpdate(
                "chunks kept appearing while the store was erased".into(),
            )));
        }
        Ok(erased)
    }

    /// Registers, retrying with backoff while the MDM is unreachable or
    /// failing; gives up on a refusal that retrying cannot fix (a wrong join
    /// key, a registration that conflicts with this node's data).
    pub async fn register_until_ok(&self) -> Result<Arc<Identity>, MembershipError> {
        let mut delay = Duration::from_millis(200);
        loop {
            match self.register().await {
                Ok(identity) => return Ok(identity),
                Err(e) if e.is_permanent() => {
                    self.local_log.warning("registration_refused", e.to_string());
                    return Err(e);
                }
                Err(e) => {
                    tracing::warn!(error = %e, retry_in = ?delay, "registration failed");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    /// Registers again after a call made under registration `failed_generation`
    /// was refused with 401; a no-op if someone already did.
    pub async fn reregister(&self, failed_generation: u64) -> Option<Arc<Identity>> {
        let _one_at_a_time = self.registration.lock().await;
        if let Some(current) = self.identity() {
            if current.generation != failed_generation {
                return Some(current);
            }
        }
        match self.register().await {
            Ok(identity) => Some(identity),
            Err(e) => {
                tracing::warn!(error = %e, "re-registration failed");
                None
            }
        }
    }

    /// Fetches a volume's map from the MDM and caches it.
    pub async fn fetch_placement(&self, volume_id: u64) -> Result<Arc<PlacementMap>, Status> {
        let identity = self.identity().ok_or(Status::NotAvailable)?;
        match self.ask_mdm_for_placement(identity, volume_id).await {
            Ok(map) => Ok(map),
            Err(e) if e.is_not_found() => Err(Status::UnknownVolume),
            Err(e) => {
                tracing::warn!(volume_id, error = %e, "cannot fetch the placement map");
                Err(Status::IoError)
            }
        }
    }

    /// What becomes of a volume this node stores chunks of: its newest map,
    /// or the MDM's word that it was deleted (so its chunks may go).
    pub async fn volume_fate(&self, volume_id: u64) -> VolumeFate {
        if let Some(map) = self.placement.cached(volume_id) {
            if map.epoch >= self.placement.known_epoch(volume_id) {
                return VolumeFate::Live(map);
            }
        }
        let Some(identity) = self.identity() else { return VolumeFate::Unknown };
        match self.ask_mdm_for_placement(identity, volume_id).await {
            Ok(map) => VolumeFate::Live(map),
            Err(e) if e.is_volume_deleted() => VolumeFate::Deleted,
            Err(_) => VolumeFate::Unknown,
        }
    }

    /// `GET /vol/{id}/placement`, registering again once if the MDM no
    /// longer knows this node; a map it returns is cached.
    async fn ask_mdm_for_placement(
        &self,
        identity: Arc<Identity>,
        volume_id: u64,
    ) -> Result<Arc<PlacementMap>, MdmClientError> {
        let fetched = match identity.mdm.placement(volume_id).await {
            Err(e) if e.is_unauthorized() => match self.reregister(identity.generation).await {
                Some(fresh) => fresh.mdm.placement(volume_id).await,
                None => Err(e),
            },
            other => other,
        };
        let map = fetched?;
        self.metrics.placement_fetches.fetch_add(1, Ordering::Relaxed);
        Ok(self.placement.store(map))
    }

    /// The newest map of a volume this node can have: the cached one unless
    /// a newer epoch has been heard of, else a fresh one from the MDM.
    pub async fn newest_placement(&self, volume_id: u64) -> Result<Arc<PlacementMap>, Status> {
        match self.placement.cached(volume_id) {
            Some(map) if map.epoch >= self.placement.known_epoch(volume_id) => Ok(map),
            _ => self.fetch_placement(volume_id).await,
        }
    }

    /// The map to serve a request routed with `request_epoch`: the cached
    /// one if current, else a fresh one (one fetch per volume at a time);
    /// `StaleEpoch` if the request was routed by an older map.
    pub async fn placement_for(
        &self,
        volume_id: u64,
        request_epoch: u64,
    ) -> Result<Arc<PlacementMap>, Status> {
        match self.placement.lookup(volume_id, request_epoch) {
            Lookup::Ready(map) => return Ok(map),
            Lookup::Stale => return Err(Status::StaleEpoch),
            Lookup::Fetch => {}
        }
        let lock = self.placement.fetch_lock(volume_id);
        let _one_fetch = lock.lock().await;
        match self.placement.lookup(volume_id, request_epoch) {
            Lookup::Ready(map) => return Ok(map),
            Lookup::Stale => return Err(Status::StaleEpoch),
            Lookup::Fetch => {}
        }
        let map = self.fetch_placement(volume_id).await?;
        if request_epoch < map.epoch {
            return Err(Status::StaleEpoch);
        }
        Ok(map)
    }

    /// One heartbeat; applies the volumes' generations it returns and
    /// returns the rebuild jobs the MDM assigned to this node.
    pub async fn heartbeat_once(&self) -> Vec<RebuildAssignment> {
        let Some(identity) = self.identity() else { return Vec::new() };
        let (capacity, used) = self.store.capacity();
        let request = HeartbeatRequest {
            node_id: identity.node_id,
            metrics: self.metrics.node_metrics(capacity, used),
            volumes_since: self.placement.cursor(),
        };
        match identity.mdm.heartbeat(&request).await {
            Ok(reply) if !self.mdm_term.admit(reply.mdm_term) => {
                tracing::warn!(
                    term = reply.mdm_term,
                    highest = self.mdm_term.highest(),
                    "ignored a heartbeat answer from a deposed MDM leader"
                );
            }
            Ok(reply) if !reply.secret_id.is_empty() && reply.secret_id != identity.secret_id => {
                // The MDM knows this node (its credential is in the
                // database) but derives keys from another secret: it was
                // restored from a backup. Tokens it signs would never verify
                // here, nor session keys match, until the node takes the new keys.
                tracing::warn!("the MDM's secret changed: registering again for the new keys");
                self.local_log.warning("reregister", "the MDM's secret changed".to_string());
                self.reregister(identity.generation).await;
            }
            Ok(reply) if reply.status == "removed" => {
                tracing::warn!("the MDM drained and removed this node: stopping");
                self.local_log.health("removed", "drained and removed by the MDM");
                self.removed.notify_one();
            }
            Ok(reply) => {
                self.metrics.heartbeats_sent.fetch_add(1, Ordering::Relaxed);
                self.movement.set_policy(reply.movement);
                if !reply.token_public_keys.is_empty() {
                    self.adopt_token_keys(&identity, &reply.token_public_keys);
                }
                let applied = self.placement.apply_heartbeat(
                    &reply.volumes,
                    reply.volumes_complete,
                    &reply.deleted_volumes,
                    reply.volumes_cursor,
                );
                for &volume_id in &applied.stale {
                    if let Err(status) = self.fetch_placement(volume_id).await {
                        tracing::debug!(volume_id, status = status.name(), "map refresh failed");
                    }
                }
                if !applied.stale.is_empty() || applied.forgot_maps {
                    // A copy may have moved off this node (rebalance, drain),
                    // or a volume was deleted: its chunks are released now
                    // rather than at the next periodic pass.
                    self.reclaim_now.notify_one();
                }
                return reply.rebuilds;
            }
            Err(e) if e.is_unauthorized() => {
                self.metrics.heartbeat_failures.fetch_add(1, Ordering::Relaxed);
                tracing::warn!("the MDM no longer knows this node: registering again");
                self.local_log.warning("reregister", e.to_string());
                self.reregister(identity.generation).await;
            }
            Err(e) => {
                self.metrics.heartbeat_failures.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %e, "heartbeat failed");
            }
        }
        Vec::new()
    }

    /// Takes the token public keys a heartbeat reply lists (a key rotation
    /// publishes the next key here before the MDM signs with it, and drops
    /// an old one once its tokens have expired). Cached tokens stay.
    fn adopt_token_keys(&self, identity: &Identity, listed: &[String]) {
        let keys: Result<Vec<_>, _> =
            listed.iter().map(|k| pflex_proto::token::TokenPublicKey::from_hex(k)).collect();
        let Ok(keys) = keys else {
            tracing::warn!("the MDM sent a malformed token public key; keeping the ones held");
            return;
        };
        if keys == identity.keys.token_keys {
            return;
        }
        let mut node_keys = identity.keys.clone();
        node_keys.token_keys = keys;
        let updated = Arc::new(Identity {
            node_id: identity.node_id,
            mdm: identity.mdm.clone(),
            keys: node_keys,
            heartbeat_interval_secs: identity.heartbeat_interval_secs,
            secret_id: identity.secret_id.clone(),
            generation: identity.generation,
        });
        if self.replace_identity(identity.generation, updated) {
            tracing::info!(keys = listed.len(), "token public keys updated by the MDM");
            self.local_log.health("token-keys", format!("{} token public keys", listed.len()));
        }
    }

    /// Sends the accumulated IO acknowledgements, keeping them on failure.
    pub async fn send_acks_once(&self) {
        let Some(identity) = self.identity() else { return };
        let records = self.acks.take();
        if records.is_empty() {
            return;
        }
        let batch = TokenAckBatch { records };
        match identity.mdm.ack_tokens(&batch).await {
            Ok(_) => {
                self.metrics.acks_sent.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                self.metrics.ack_failures.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(error = %e, "IO acknowledgements not taken; keeping them");
                self.acks.restore(batch.records);
                if e.is_unauthorized() {
                    self.reregister(identity.generation).await;
                }
            }
        }
    }

    fn heartbeat_interval(&self) -> Duration {
        self.config.heartbeat_interval.unwrap_or_else(|| {
            Duration::from_secs(self.identity().map_or(10, |i| i.heartbeat_interval_secs))
        })
    }
}

/// Heartbeats forever, the first one at once, and starts the rebuild jobs
/// the replies assign.
pub async fn heartbeat_loop(node: Arc<SdsNode>) {
    loop {
        let rebuilds = node.heartbeat_once().await;
        super::rebuild::RebuildRunner::start(&node, &rebuilds);
        node.tokens.purge_expired(pflex_proto::unix_now(), EXPIRED_TOKEN_GRACE_SECS);
        tokio::time::sleep(node.heartbeat_interval()).await;
    }
}

/// Sends IO acknowledgements every `--ack-interval-secs`.
pub async fn ack_loop(node: Arc<SdsNode>) {
    loop {
        tokio::time::sleep(node.config.ack_interval).await;
        node.send_acks_once().await;
    }
}
