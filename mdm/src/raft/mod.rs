//! The replicated MDM: 3 or 5 members keep identical copies of
//! `powerflex.db` through a Raft log, with openraft as the engine.
//!
//! - [`log_store`]: the log, in its own SQLite file;
//! - [`state_machine`]: `powerflex.db`, applying committed changesets;
//! - [`network`]: messages between members over the MDM API;
//! - [`peer_auth`]: which messages and answers a member takes (the peer
//!   key, and over TLS each member's own certificate).
//!
//! One log entry is one batch of the group commit (see [`crate::writer`]):
//! the leader runs the batch, records its changeset, rolls it back, and
//! answers the batch's requests only once the entry is committed by a
//! majority and applied. Only the leader serves requests (followers answer
//! `503 not_leader` with the leader's address), and only while a majority
//! confirmed it within the last [`LEADER_LEASE`]: a leader cut off from
//! its peers stops answering before the others can elect a new one.

// openraft's storage traits return its `StorageError` (over 200 bytes);
// the helpers that build one return it too.
#[allow(clippy::result_large_err)]
pub mod log_store;
pub mod network;
pub mod peer_auth;
#[allow(clippy::result_large_err)]
pub mod state_machine;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Cursor;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use openraft::error::{ClientWriteError, RaftError};
use openraft::{BasicNode, ServerState};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::MdmError;

openraft::declare_raft_types!(
    /// The MDM's Raft types: an entry carries one batch's changeset.
    pub TypeConfig:
        D = Batch,
        R = (),
);

pub type NodeId = u64;
pub type Node = BasicNode;
pub type Raft = openraft::Raft<TypeConfig>;

/// Header carrying the peer key on Raft messages.
pub const PEER_KEY_HEADER: &str = "x-pflex-mdm-peer";

/// Interval of the leader's heartbeats to its followers.
pub const HEARTBEAT: Duration = Duration::from_millis(200);
/// A follower that hears no leader for a random time in this range starts an
/// election (and none votes before the longest has passed since it last
/// heard the leader: openraft's own leader lease).
pub const ELECTION_TIMEOUT: (Duration, Duration) =
    (Duration::from_millis(1000), Duration::from_millis(1500));
/// A leader acts only while a majority confirmed it this recently (counted
/// from when it asked): below the election timeout, so a partitioned or
/// frozen leader has stopped before the majority side can have elected
/// another.
pub const LEADER_LEASE: Duration = Duration::from_millis(800);
/// How often a leader asks a majority to confirm it.
const LEASE_RENEWAL: Duration = Duration::from_millis(150);
/// Longest a batch waits for a majority before its callers are answered
/// `503 unreplicated`.
const COMMIT_WAIT: Duration = Duration::from_secs(2);
/// How long a new leader waits to have applied every entry before its
/// first batch, and a request waits for a leader to be elected.
const CATCH_UP: Duration = Duration::from_secs(3);

/// One batch of the group commit: the net change it made to the database.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Batch {
    #[serde(with = "hex_bytes")]
    pub changes: Vec<u8>,
}

mod hex_bytes {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let text = String::deserialize(d)?;
        hex::decode(text).map_err(serde::de::Error::custom)
    }
}

/// The key members present to each other: derived from the cluster secret
/// they all hold (an MDM is provisioned with it like with its TLS files).
pub fn peer_key(secret: &pflex_proto::token::ClusterSecret) -> String {
    let mut hasher = Sha256::new();
    hasher.update(b"pflex mdm peer key\0");
    hasher.update(secret.to_hex().as_bytes());
    hex::encode(hasher.finalize())
}

/// Why replication could not start.
#[derive(Debug, thiserror::Error)]
pub enum RaftStartError {
    #[error("raft log: {0}")]
    Log(#[from] rusqlite::Error),
    #[error("state machine: {0}")]
    StateMachine(#[from] crate::db::DbError),
    #[error("raft configuration: {0}")]
    Config(String),
    #[error("raft: {0}")]
    Fatal(String),
}

/// Worker threads of the runtime Raft runs on (see [`RaftRuntime`]).
const RAFT_THREADS: usize = 2;

/// The runtime openraft runs on, apart from the one serving requests: its
/// replication streams, log appends, applies and lease renewals then do
/// not wait in a run queue or blocking pool behind thousands of
/// heartbeats a second, so a batch's commit and the leader's lease hold
/// under request load. Dropped, it stops without waiting (so it may be
/// dropped from async code).
struct RaftRuntime(Option<tokio::runtime::Runtime>);

impl RaftRuntime {
    fn start() -> Result<Self, RaftStartError> {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(RAFT_THREADS)
            .thread_name("mdm-raft")
            .enable_all()
            .build()
            .map(|runtime| Self(Some(runtime)))
            .map_err(|e| RaftStartError::Fatal(format!("starting the raft runtime: {e}")))
    }

    fn handle(&self) -> tokio::runtime::Handle {
        match &self.0 {
            Some(runtime) => runtime.handle().clone(),
            None => unreachable!("the raft runtime is taken only when dropped"),
        }
    }
}

impl Drop for RaftRuntime {
    fn drop(&mut self) {
        if let Some(runtime) = self.0.take() {
            runtime.shutdown_background();
        }
    }
}

/// This member's handle on the replicated MDM.
pub struct Replication {
    pub raft: Raft,
    pub id: NodeId,
    pub machine: state_machine::StateMachine,
    pub peer_key: String,
    /// When the last confirmation by a majority that this member leads was
    /// asked for (see [`Replication::check_leader`]).
    confirmed: std::sync::Mutex<Option<std::time::Instant>>,
    /// Leader changes this member saw (for `/metrics`).
    pub leader_changes: std::sync::atomic::AtomicU64,
    /// Where openraft's tasks run; it lives as long as this handle.
    runtime: RaftRuntime,
}

impl Replication {
    /// Starts member `id` with its log and state machine in `data_dir`.
    /// `members` (id → base URL) initialises a new cluster: the lowest id
    /// of it does so when its log is empty; the others wait to be contacted.
    /// A snapshot is taken every `snapshot_every` entries (plus a tenth of
    /// that per member id, up to four tenths) and the log is purged up to a
    /// fifth of that behind it.
    pub async fn start(
        id: NodeId,
        data_dir: &Path,
        members: &BTreeMap<NodeId, String>,
        peer_key: String,
        snapshot_every: u64,
        adopter: crate::secrets::Adopter,
    ) -> Result<Arc<Self>, RaftStartError> {
        let config = openraft::Config {
            cluster_name: "pflex-mdm".to_string(),
            heartbeat_interval: HEARTBEAT.as_millis() as u64,
            election_timeout_min: ELECTION_TIMEOUT.0.as_millis() as u64,
            election_timeout_max: ELECTION_TIMEOUT.1.as_millis() as u64,
            max_payload_entries: 64,
            // Members take theirs a tenth apart, so that members sharing a
            // host (a lab, a bench) do not all copy the database at once.
            snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(
                snapshot_every + (id.saturating_sub(1) % 5) * (snapshot_every / 10),
            ),
            max_in_snapshot_log_to_keep: snapshot_every / 5,
            ..Default::default()
        }
        .validate()
        .map_err(|e| RaftStartError::Config(e.to_string()))?;
        let log = log_store::LogStore::open(&data_dir.join("raft-log.db"))?;
        let machine =
            state_machine::StateMachine::open(&data_dir.join(crate::DB_FILE), data_dir, adopter)?;
        if log.is_pristine()? {
            // A database restored from a backup (`pflex mdm backup`) into a
            // member with no log: its history starts afresh from this content.
            machine.forget_applied()?;
        }
        let network = network::Network::new(peer_key.clone())
            .map_err(|e| RaftStartError::Config(e.to_string()))?;
        let runtime = RaftRuntime::start()?;
        let on_raft_runtime = runtime.handle();
        // openraft spawns its tasks where it is started.
        let raft = on_raft_runtime
            .spawn(start_raft(id, config, network, log, machine.clone(), members.clone()))
            .await
            .map_err(|e| RaftStartError::Fatal(e.to_string()))??;
        let replication = Arc::new(Self {
            raft,
            id,
            machine,
            peer_key,
            confirmed: Default::default(),
            leader_changes: Default::default(),
            runtime,
        });
        on_raft_runtime.spawn(keep_lease(Arc::downgrade(&replication)));
        Ok(replication)
    }

    /// A handle on the runtime Raft runs on (see [`RaftRuntime`]).
    pub fn runtime(&self) -> tokio::runtime::Handle {
        self.runtime.handle()
    }

    /// The leader's id and URL, as this member knows it.
    pub fn leader(&self) -> Option<(NodeId, String)> {
        let metrics = self.raft.metrics().borrow().clone();
        let leader = metrics.current_leader?;
        let url =
            metrics.membership_config.membership().get_node(&leader).map(|n| n.addr.clone())?;
        Some((leader, url))
    }

    /// The current term.
    pub fn term(&self) -> u64 {
        self.raft.metrics().borrow().current_term
    }

    /// Ok when this member may act as the leader now: it is the leader and
    /// a majority confirmed so within [`LEADER_LEASE`], measured on this
    /// process's clock when asked (a leader frozen or cut off and back
    /// knows its lease ran out without having to hear from anyone).
    pub fn check_leader(&self) -> Result<(), MdmError> {
        let metrics = self.raft.metrics().borrow().clone();
        if metrics.state != ServerState::Leader {
            return Err(self.not_leader(&metrics));
        }
        let confirmed = *self.confirmed.lock().unwrap_or_else(|p| p.into_inner());
        if confirmed.is_none_or(|at| at.elapsed() >= LEADER_LEASE) {
            return Err(MdmError::NotLeader { leader: None });
        }
        Ok(())
    }

    fn not_leader(&self, metrics: &openraft::RaftMetrics<NodeId, Node>) -> MdmError {
        let leader = metrics.current_leader.filter(|&l| l != self.id).and_then(|l| {
            metrics.membership_config.membership().get_node(&l).map(|n| n.addr.clone())
        });
        MdmError::NotLeader { leader }
    }

    /// Waits (up to a few seconds) until this leader has applied every entry
    /// before its term's first: a batch must run on the whole history, or
    /// its changeset would not apply after the entries it missed.
    pub async fn wait_caught_up(&self) -> Result<(), MdmError> {
        let deadline = std::time::Instant::now() + CATCH_UP;
        let mut metrics = self.raft.metrics();
        loop {
            let now = metrics.borrow().clone();
            if now.state != ServerState::Leader {
                return Err(self.not_leader(&now));
            }
            let applied_own_term =
                now.last_applied.is_some_and(|l| l.leader_id.term == now.current_term);
            let applied_all = now.last_applied.map(|l| l.index) == now.last_log_index;
            if applied_own_term && applied_all {
                return Ok(());
            }
            if std::time::Instant::now() >= deadline {
                return Err(MdmError::Unreplicated(
                    "the new leader has not applied the log yet".to_string(),
                ));
            }
            let wait = tokio::time::timeout(Duration::from_millis(100), metrics.changed()).await;
            if let Ok(Err(_)) = wait {
                return Err(MdmError::Unreplicated("raft has stopped".to_string()));
            }
        }
    }

    /// Commits `changes` through the log; returns once a majority holds it
    /// and this member has applied it.
    pub async fn propose(&self, changes: Vec<u8>) -> Result<(), MdmError> {
        match self.raft.client_write(Batch { changes }).await {
            Ok(_) => Ok(()),
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(forward))) => {
                Err(MdmError::NotLeader {
                    leader: forward
                        .leader_node
                        .map(|n| n.addr)
                        .filter(|_| forward.leader_id.is_some_and(|leader| leader != self.id)),
                })
            }
            Err(e) => Err(MdmError::Unreplicated(e.to_string())),
        }
    }

    /// Whether `id` is in the membership this member knows (voter or
    /// learner).
    pub fn knows_member(&self, id: NodeId) -> bool {
        self.raft.metrics().borrow().membership_config.membership().get_node(&id).is_some()
    }

    /// The cluster as this member sees it.
    pub fn status(&self) -> pflex_proto::api::MdmClusterStatus {
        let metrics = self.raft.metrics().borrow().clone();
        let membership = metrics.membership_config.membership();
        let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
        let members = membership
            .nodes()
            .map(|(&id, node)| pflex_proto::api::MdmMember {
                id,
                url: node.addr.clone(),
                voter: voters.contains(&id),
                matched_index: metrics
                    .replication
                    .as_ref()
                    .and_then(|r| r.get(&id).cloned().flatten().map(|l| l.index))
                    .or_else(|| {
                        (id == self.id && metrics.state == ServerState::Leader)
                            .then_some(metrics.last_log_index)
                            .flatten()
                    }),
            })
            .collect();
        pflex_proto::api::MdmClusterStatus {
            replicated: true,
            id: self.id,
            role: format!("{:?}", metrics.state),
            leader_id: metrics.current_leader,
            leader_url: self.leader().map(|(_, url)| url),
            term: metrics.current_term,
            last_log_index: metrics.last_log_index,
            committed_index: self.committed_index(&metrics),
            applied_index: metrics.last_applied.map(|l| l.index),
            members,
        }
    }

    fn committed_index(&self, metrics: &openraft::RaftMetrics<NodeId, Node>) -> Option<u64> {
        // The leader commits what a majority of voters hold; elsewhere what
        // this member applied is the best it knows.
        if metrics.state != ServerState::Leader {
            return metrics.last_applied.map(|l| l.index);
        }
        let membership = metrics.membership_config.membership();
        let mut matched: Vec<u64> = membership
            .voter_ids()
            .map(|id| {
                if id == self.id {
                    metrics.last_log_index.unwrap_or(0)
                } else {
                    metrics
                        .replication
                        .as_ref()
                        .and_then(|r| r.get(&id).cloned().flatten())
                        .map_or(0, |l| l.index)
                }
            })
            .collect();
        matched.sort_unstable_by(|a, b| b.cmp(a));
        matched.get(matched.len() / 2).copied()
    }

    /// Adds member `id` at `url`: as a learner first (it receives the log or
    /// a snapshot), then as a voter.
    pub async fn add_member(&self, id: NodeId, url: String) -> Result<(), MdmError> {
        self.check_leader()?;
        self.raft
            .add_learner(id, BasicNode { addr: url }, true)
            .await
            .map_err(|e| MdmError::Unreplicated(e.to_string()))?;
        let mut voters: BTreeSet<NodeId> =
            self.raft.metrics().borrow().membership_config.membership().voter_ids().collect();
        voters.insert(id);
        self.raft
            .change_membership(voters, false)
            .await
            .map_err(|e| MdmError::Unreplicated(e.to_string()))?;
        Ok(())
    }

    /// Removes member `id` from the voters and the cluster.
    pub async fn remove_member(&self, id: NodeId) -> Result<(), MdmError> {
        self.check_leader()?;
        let mut voters: BTreeSet<NodeId> =
            self.raft.metrics().borrow().membership_config.membership().voter_ids().collect();
        if !voters.remove(&id) {
            return Err(MdmError::not_found("no_such_mdm", format!("no MDM member {id}")));
        }
        if voters.is_empty() {
            return Err(MdmError::conflict("last_mdm", "the last MDM member cannot be removed"));
        }
        self.raft
            .change_membership(voters, false)
            .await
            .map_err(|e| MdmError::Unreplicated(e.to_string()))?;
        Ok(())
    }
}

/// Starts openraft on the calling runtime, and initialises a new cluster
/// if this member is the lowest of `members` and the log is empty.
async fn start_raft(
    id: NodeId,
    config: openraft::Config,
    network: network::Network,
    log: log_store::LogStore,
    machine: state_machine::StateMachine,
    members: BTreeMap<NodeId, String>,
) -> Result<Raft, RaftStartError> {
    let raft = Raft::new(id, Arc::new(config), network, log, machine)
        .await
        .map_err(|e| RaftStartError::Fatal(e.to_string()))?;
    let initialized =
        raft.is_initialized().await.map_err(|e| RaftStartError::Fatal(e.to_string()))?;
    if !initialized && members.keys().next() == Some(&id) {
        let nodes: BTreeMap<NodeId, Node> =
            members.iter().map(|(&n, url)| (n, BasicNode { addr: url.clone() })).collect();
        raft.initialize(nodes).await.map_err(|e| RaftStartError::Fatal(e.to_string()))?;
        tracing::info!(members = members.len(), "initialised the MDM cluster");
    }
    Ok(raft)
}

/// While this member leads, asks a majority every [`LEASE_RENEWAL`] to
/// confirm it, and records when each successful round was asked.
async fn keep_lease(replication: std::sync::Weak<Replication>) {
    let mut tick = tokio::time::interval(LEASE_RENEWAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_leader = None;
    loop {
        tick.tick().await;
        let Some(replication) = replication.upgrade() else { return };
        let (leading, leader) = {
            let metrics = replication.raft.metrics().borrow().clone();
            (metrics.state == ServerState::Leader, metrics.current_leader)
        };
        if leader.is_some() && leader != last_leader {
            if last_leader.is_some() {
                replication.leader_changes.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tracing::warn!(leader = ?leader, "the MDM leader changed");
            }
            last_leader = leader;
        }
        let asked = std::time::Instant::now();
        let confirmed = leading
            && tokio::time::timeout(LEADER_LEASE, replication.raft.ensure_linearizable())
                .await
                .is_ok_and(|r| r.is_ok());
        if leading && !confirmed {
            tracing::warn!(
                waited_ms = asked.elapsed().as_millis() as u64,
                "no majority confirmed this leader in time: it stops serving until one does"
            );
        }
        let mut slot = replication.confirmed.lock().unwrap_or_else(|p| p.into_inner());
        if confirmed {
            *slot = Some(asked);
        } else if !leading {
            *slot = None;
        }
    }
}

/// How the writer commits a batch on a replicated MDM (see
/// [`crate::writer::Commit`]): through the log, as the leader only.
pub struct ReplicatedCommit {
    pub replication: Arc<Replication>,
    pub runtime: tokio::runtime::Handle,
}

impl crate::writer::Commit for ReplicatedCommit {
    fn before_batch(&self) -> Result<(), MdmError> {
        self.replication.check_leader()?;
        self.runtime.block_on(self.replication.wait_caught_up())
    }

    fn commit(&self, changes: Vec<u8>) -> Result<(), MdmError> {
        // A leader that lost its majority after accepting the batch would
        // wait forever: its callers get an answer (and go elsewhere) instead.
        self.runtime.block_on(async {
            match tokio::time::timeout(COMMIT_WAIT, self.replication.propose(changes)).await {
                Ok(outcome) => outcome,
                Err(_) => Err(MdmError::Unreplicated(format!(
                    "no majority confirmed the change within {} s (it is committed only if \
                     this member keeps the lead)",
                    COMMIT_WAIT.as_secs()
                ))),
            }
        })
    }
}

/// Parses `--mdm-peers`: `ID=URL,ID=URL,...`.
pub fn parse_members(text: &str) -> Result<BTreeMap<NodeId, String>, String> {
    text.split(',')
        .filter(|part| !part.trim().is_empty())
        .map(|part| {
            let (id, url) =
                part.split_once('=').ok_or_else(|| format!("{part:?} is not ID=URL"))?;
            let id: NodeId = id.trim().parse().map_err(|_| format!("{id:?} is not a member id"))?;
            if id == 0 {
                return Err("member ids start at 1".to_string());
            }
            let url = url.trim().trim_end_matches('/');
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                return Err(format!("{url:?} is not an http(s) URL"));
            }
            Ok((id, url.to_string()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn member_lists_parse_or_say_why_not() {
        let members = parse_members("1=http://a:1,2=http://b:2/,3=https://c:3").unwrap();
        assert_eq!(members.len(), 3);
        assert_eq!(members[&2], "http://b:2");
        for bad in ["1", "x=http://a", "0=http://a", "1=ftp://a"] {
            assert!(parse_members(bad).is_err(), "{bad}");
        }
    }
}
