//! Bodies of the HTTP control plane (MDM API, SDS/SDC mgmt ports).
//!
//! All requests reject unknown fields. Sizes are bytes. Credentials travel
//! as `Authorization: Bearer <credential>`. Errors are [`ApiError`] with a
//! 4xx/5xx status.
//!
//! MDM endpoints (all but `/discovery/register` need a credential):
//!
//! | method, path | body → reply | who |
//! |---|---|---|
//! | POST /discovery/register | [`RegisterRequest`] → [`RegisterResponse`] | SDS, SDC, MGMT (join key) |
//! | POST /health/heartbeat | [`HeartbeatRequest`] → [`HeartbeatResponse`] | components |
//! | GET /health/status | → [`HealthStatus`] | any |
//! | POST /token/request | [`TokenRequest`] → [`TokenResponse`] | SDC |
//! | POST /token/ack | [`TokenAckBatch`] → [`AckResponse`] | SDS, SDC |
//! | POST /health/unreachable | [`UnreachableReport`] → [`UnreachableVerdict`] | SDS, SDC |
//! | POST /rebuild/complete | [`RebuildComplete`] → [`RebuildJob`] | SDS (the job's source) |
//! | POST /rebuild/progress | [`RebuildProgress`] → [`RebuildJob`] | SDS (the job's source) |
//! | GET /rebuild/jobs | → `Vec<RebuildJob>` | admin, MGMT |
//! | GET /rebuild/status | → [`MovementStatus`] | admin, MGMT |
//! | PUT /rebuild/policy | [`MovementPolicy`] → [`MovementPolicy`] | admin |
//! | POST /vol/create | [`VolumeCreate`] → [`Volume`] | admin |
//! | GET /vol/list | → `Vec<Volume>` | admin, MGMT |
//! | GET /vol/{name-or-id} | → [`Volume`] | admin, MGMT |
//! | POST /vol/{name-or-id}/resize | [`VolumeResize`] → [`Volume`] | admin |
//! | POST /vol/{name-or-id}/rename | [`VolumeRename`] → [`Volume`] | admin |
//! | DELETE /vol/{name-or-id} | → [`Volume`] (409 while mapped) | admin |
//! | GET /vol/{name-or-id}/placement | → [`PlacementMap`](crate::placement::PlacementMap) | SDC, SDS, admin |
//! | POST /vol/map | [`VolumeMap`] → [`Volume`] | admin |
//! | POST /vol/unmap | [`VolumeUnmap`] → [`Volume`] | admin |
//! | GET /sdc/mappings | → `Vec<MappedVolume>` (the calling SDC's) | SDC |
//! | GET /sds/list | → `Vec<SdsInfo>` | admin, MGMT |
//! | POST /sds/{name-or-id}/remove | → [`SdsInfo`] (draining) | admin |
//! | GET /sdc/list | → `Vec<SdcInfo>` | admin, MGMT |
//! | GET /cluster/summary | → [`ClusterSummary`] | admin, MGMT |
//! | GET /metrics | Prometheus text | any credential |

use serde::{Deserialize, Serialize};

use crate::token::AccessMode;

/// Error body of every failed request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiError {
    /// Stable machine-readable code, e.g. `not_found`, `bad_request`.
    pub error: String,
    pub message: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum NodeType {
    Sds,
    Sdc,
    Mgmt,
}

impl NodeType {
    pub fn as_str(self) -> &'static str {
        match self {
            NodeType::Sds => "SDS",
            NodeType::Sdc => "SDC",
            NodeType::Mgmt => "MGMT",
        }
    }
}

/// One SDS device (a preallocated file or a disk).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceInfo {
    pub path: String,
    pub capacity_bytes: u64,
    #[serde(default)]
    pub used_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegisterRequest {
    /// The cluster's join key (a bootstrap secret for scripted installs; it
    /// can add nodes but never take over a registered name).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub join_key: String,
    /// A one-time enrollment token minted for this role (and maybe name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enrollment_token: Option<String>,
    /// This node's current credential: registering again under a name that is
    /// taken needs it (or an admin reset of the name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credential: Option<String>,
    pub node_type: NodeType,
    /// Unique per node type; re-registering with the same name is the same node.
    pub name: String,
    pub host: String,
    #[serde(default)]
    pub control_port: u16,
    #[serde(default)]
    pub mgmt_port: u16,
    /// SDS: data plane; SDC: NBD port.
    #[serde(default)]
    pub data_port: u16,
    /// SDS only; defaults to a fault set named after the node.
    #[serde(default)]
    pub fault_set: Option<String>,
    /// SDS only; defaults to pool `default` in protection domain `default`.
    #[serde(default)]
    pub pool: Option<String>,
    #[serde(default)]
    pub devices: Vec<DeviceInfo>,
    /// SDS only: the cluster whose chunks this node's store holds (absent
    /// when it holds none). An MDM of another cluster refuses the node
    /// (409 `foreign_cluster_data`): its volume numbers mean other volumes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_cluster_id: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegisterResponse {
    pub status: String,
    pub node_id: u64,
    /// Bearer credential for every later call of this node (the one it
    /// presented when it proved itself with it).
    pub credential: String,
    /// Only ever sent to SDS nodes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sds_keys: Option<SdsKeys>,
    pub heartbeat_interval_secs: u64,
    /// The cluster's public id (see `ClusterSecret::cluster_id`).
    #[serde(default)]
    pub cluster_id: String,
    /// The public name of the secret this node's keys derive from (see
    /// `ClusterSecret::secret_id`).
    #[serde(default)]
    pub secret_id: String,
}

/// The key material of one SDS (see [`crate::token`]): it verifies tokens and
/// derives its own session keys, but cannot sign tokens or derive another
/// node's session keys.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SdsKeys {
    /// Hex Ed25519 public keys that sign tokens (the current one first).
    pub token_public_keys: Vec<String>,
    /// Hex; this node's key.
    pub node_key: String,
    /// Hex; the key of replication frames between SDS nodes.
    pub peer_key: String,
}

impl std::fmt::Debug for SdsKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SdsKeys").field("token_public_keys", &self.token_public_keys).finish()
    }
}

/// `POST /admin/enrollments`: mint a one-time enrollment token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnrollmentRequest {
    pub role: NodeType,
    /// Bind the token to this node name (any name when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Lifetime; default one hour, at most a week.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_secs: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnrollmentResponse {
    pub token: String,
    pub role: NodeType,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub expires_at: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeMetrics {
    #[serde(default)]
    pub capacity_bytes: u64,
    #[serde(default)]
    pub used_bytes: u64,
    #[serde(default)]
    pub read_ops: u64,
    #[serde(default)]
    pub write_ops: u64,
    #[serde(default)]
    pub read_bytes: u64,
    #[serde(default)]
    pub write_bytes: u64,
    #[serde(default)]
    pub errors: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeartbeatRequest {
    pub node_id: u64,
    #[serde(default)]
    pub metrics: NodeMetrics,
    /// The `volumes_cursor` of the last reply this node applied: the reply
    /// then lists only the volumes changed (and deleted) since. `None`
    /// asks for every volume.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volumes_since: Option<u64>,
}

fn complete_by_default() -> bool {
    true
}

/// Current generations of every volume, so SDS nodes notice map changes
/// and revocations within one heartbeat.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeGeneration {
    pub volume_id: u64,
    pub epoch: u64,
    pub mapping_gen: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeartbeatResponse {
    pub status: String,
    /// Every volume (for an SDC, every volume mapped to it) when
    /// `volumes_complete`, or those whose generations
    /// changed since the request's `volumes_since`.
    pub volumes: Vec<VolumeGeneration>,
    /// Whether `volumes` is the whole list (volumes not in it are gone)
    /// rather than the changes since the cursor.
    #[serde(default = "complete_by_default")]
    pub volumes_complete: bool,
    /// Volumes deleted since `volumes_since` (only in a list of changes).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deleted_volumes: Vec<u64>,
    /// What to send as `volumes_since` next time.
    #[serde(default)]
    pub volumes_cursor: u64,
    /// More changes follow the cursor: the MDM lists a bounded number per
    /// reply, and the next heartbeats carry the rest.
    #[serde(default)]
    pub volumes_more: bool,
    /// Copies this SDS must rebuild (only for an SDS, only the jobs it is
    /// the source of: it is the PG's primary and holds the data).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rebuilds: Vec<RebuildAssignment>,
    /// How fast an SDS may move data (only for an SDS).
    #[serde(default)]
    pub movement: MovementPolicy,
    /// The token public keys an SDS accepts from now on (only for an SDS):
    /// after `pflex cluster rotate` the next key is here before the MDM signs
    /// with it, and the previous one until tokens it signed have expired.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub token_public_keys: Vec<String>,
    /// The public name of the MDM's secret (only for an SDS): one that
    /// differs from the registration's means the MDM was restored onto a
    /// new secret, and the node registers again for its new keys.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub secret_id: String,
    /// The Raft term of the MDM leader that answered (0: a single,
    /// unreplicated MDM). A node keeps the highest term it has heard and
    /// ignores answers from an older one: they come from a deposed leader.
    #[serde(default)]
    pub mdm_term: u64,
}

/// What `POST /cluster/rotate` did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RotateResponse {
    /// The signing key generation tokens are signed with from
    /// `signs_from` (unix seconds) on.
    pub signing_generation: u32,
    pub signs_from: u64,
    /// Tokens signed with older keys are accepted until then (unix seconds).
    pub previous_accepted_until: u64,
    /// Where the new admin token is on the MDM that answered (the old one
    /// no longer works, on any member).
    pub admin_token_file: String,
    /// The new admin token itself (the other members of a replicated MDM
    /// keep only its digest, so their files still hold the old one).
    pub admin_token: String,
    /// Enrollment tokens not yet used that no longer work.
    pub enrollment_tokens_revoked: u64,
    /// A join key was configured and no longer works.
    pub join_key_disabled: bool,
}

/// How data movement (rebuild, resync, rebalance, drain) shares each SDS
/// with client IO; set cluster-wide on the MDM, handed to every SDS with
/// its heartbeat reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MovementPolicy {
    /// Bytes per second one SDS sends for data movement, in MB/s (10^6);
    /// 0 means no limit.
    pub mb_per_sec: u64,
    /// Chunks one job keeps in flight at once (1..=64).
    pub chunks_in_flight: u32,
    pub priority: MovementPriority,
}

impl Default for MovementPolicy {
    fn default() -> Self {
        MovementPolicy { mb_per_sec: 0, chunks_in_flight: 4, priority: MovementPriority::Client }
    }
}

/// Who wins when client IO and data movement compete on a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MovementPriority {
    /// While the node serves client IO, a job keeps one chunk in flight
    /// (the MB/s limit still applies); at full width when clients are idle.
    #[default]
    Client,
    /// Jobs keep `chunks_in_flight` chunks in flight whatever the client
    /// load, up to the MB/s limit.
    Movement,
}

impl MovementPriority {
    pub fn as_str(self) -> &'static str {
        match self {
            MovementPriority::Client => "client",
            MovementPriority::Movement => "movement",
        }
    }
}

/// `POST /health/unreachable`: the caller could not reach SDS `node_id` on
/// its data port. The MDM probes that port itself; only if its probe fails
/// too is the SDS declared FAILED (and its copies moved) at once, instead of
/// after the failure timeout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UnreachableReport {
    pub node_id: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnreachableVerdict {
    pub node_id: u64,
    /// The MDM's probe result; `None` when it did not probe (one probe per
    /// node per second, or reports are switched off).
    pub reachable: Option<bool>,
    /// The node's liveness after the report: ACTIVE, STALE or FAILED.
    pub status: String,
    /// Copies moved off the node by this report.
    pub copies_replaced: u64,
}

/// `POST /sds/device-failed`: one of the caller's devices failed (missed an
/// IO deadline or reported that it is gone). The caller no longer serves
/// the chunks it held; `pgs` are the (volume, PG) pairs that had a chunk on
/// it, and the MDM moves the caller's copies of those PGs elsewhere.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceFailure {
    pub path: String,
    pub reason: String,
    pub pgs: Vec<PgRef>,
}

/// One placement group of one volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PgRef {
    pub volume_id: u64,
    pub pg_index: u64,
}

/// What the MDM did about a [`DeviceFailure`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceFailureVerdict {
    /// Copies moved off the caller (each with a rebuild job).
    pub copies_replaced: u64,
    /// PGs that could not move because their other copy has missed data
    /// (an unfinished rebuild target); they stay unavailable.
    pub unrebuilt_survivors: u64,
}

/// One copy to rebuild: every chunk of PG `pg_index` of the volume that the
/// source holds goes to `target_sds`, the PG's new secondary. Until the
/// source reports it complete, the target is never promoted to primary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RebuildAssignment {
    pub job_id: u64,
    pub volume_id: u64,
    pub pg_index: u64,
    pub target_sds: u64,
    /// Placement epoch that made this assignment; the source copies under
    /// this map or a newer one.
    pub epoch: u64,
    /// A full rebuild (every chunk of the PG) or a resync (only the chunks
    /// the source logged while the target was away), or a move.
    #[serde(default)]
    pub kind: CopyKind,
    /// For a move: the copy the target replaces (the source itself, or the
    /// PG's secondary); 0 otherwise.
    #[serde(default)]
    pub replaces: u64,
}

/// What a rebuild job copies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CopyKind {
    /// Every chunk of the PG, to a node that had none of them.
    #[default]
    Rebuild,
    /// The chunks written while the target's copy was out of the set.
    Resync,
    /// Every chunk of the PG, to a node joining it as a third copy, which
    /// then takes the place of one of the two (rebalance or drain): the PG
    /// keeps two complete copies throughout.
    Move,
}

impl CopyKind {
    pub fn as_str(self) -> &'static str {
        match self {
            CopyKind::Rebuild => "rebuild",
            CopyKind::Resync => "resync",
            CopyKind::Move => "move",
        }
    }
}

/// `POST /rebuild/complete`: the source copied every chunk and the target
/// flushed them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RebuildComplete {
    pub job_id: u64,
    /// Chunks copied (allocated on the source).
    pub chunks_copied: u64,
    /// Chunks released on the target because the source does not hold them.
    #[serde(default)]
    pub chunks_released: u64,
}

/// `POST /rebuild/progress`: how far the source is with a job. A job the
/// MDM no longer runs is answered 409, and the source stops it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RebuildProgress {
    pub job_id: u64,
    /// Chunks of the PG the source holds (the ones to send).
    pub chunks_total: u64,
    pub chunks_copied: u64,
    pub bytes_copied: u64,
}

/// `GET /rebuild/status`: all data movement at a glance.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MovementStatus {
    pub policy: MovementPolicy,
    /// Jobs pending or running, by kind.
    pub rebuild_jobs: u64,
    pub resync_jobs: u64,
    pub move_jobs: u64,
    /// Over the unfinished jobs that reported progress.
    pub chunks_total: u64,
    pub chunks_copied: u64,
    /// Bytes sent by every job over the last few seconds, per second.
    pub rate_bytes_per_sec: u64,
    /// Seconds until the known remaining chunks are sent at that rate;
    /// `None` while nothing moves.
    pub eta_secs: Option<u64>,
    /// SDS nodes being drained (their copies move away, then they are
    /// removed).
    pub draining: Vec<String>,
}

/// A rebuild job as the MDM records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RebuildJob {
    pub job_id: u64,
    pub volume_id: u64,
    pub pg_index: u64,
    /// The copy this job replaces: the failed node's, the absent one's
    /// (resync), or the one a move takes away.
    pub failed_sds: u64,
    pub source_sds: u64,
    pub target_sds: u64,
    /// pending, running, done or failed (superseded by a later change).
    pub state: String,
    #[serde(default)]
    pub kind: CopyKind,
    pub chunks_copied: u64,
    /// Chunks to send (known once the source reported progress).
    #[serde(default)]
    pub chunks_total: u64,
    #[serde(default)]
    pub bytes_copied: u64,
    pub created_at: u64,
    pub updated_at: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ComponentHealth {
    pub node_id: u64,
    pub name: String,
    pub node_type: NodeType,
    /// ACTIVE, STALE or FAILED.
    pub status: String,
    /// Unix seconds of the last heartbeat (or registration).
    pub last_seen: u64,
    pub host: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthStatus {
    /// HEALTHY, DEGRADED or CRITICAL.
    pub overall: String,
    pub components: Vec<ComponentHealth>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenRequest {
    pub volume_id: u64,
    pub mode: AccessMode,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenResponse {
    pub token_id: u64,
    /// Hex of the signed token ([`crate::token::SignedToken`]).
    pub token: String,
    /// The token's session key at each SDS (hex), one per storage node.
    pub session_keys: Vec<NodeSessionKey>,
    pub expires_at: u64,
    pub mapping_gen: u64,
}

/// The session key of a token at one SDS.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeSessionKey {
    pub sds_id: u64,
    pub key: String,
}

impl std::fmt::Debug for NodeSessionKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "NodeSessionKey {{ sds_id: {}, .. }}", self.sds_id)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenAck {
    pub token_id: u64,
    pub volume_id: u64,
    /// `read`, `write`, `flush`, `trim`, `write_zeroes`.
    pub op: String,
    pub ops: u64,
    pub bytes: u64,
    #[serde(default)]
    pub errors: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenAckBatch {
    pub records: Vec<TokenAck>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AckResponse {
    pub status: String,
    pub recorded: u64,
}

/// Response header of a follower MDM's `503 not_leader`: the base URL of
/// the leader it knows of.
pub const MDM_LEADER_HEADER: &str = "x-pflex-mdm-leader";

/// One member of a replicated MDM cluster (`GET /mdm/status`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MdmMember {
    pub id: u64,
    /// Base URL of its API.
    pub url: String,
    /// Votes in elections and counts for commits (else a learner catching up).
    pub voter: bool,
    /// Highest log index known to be on it (leader's view; absent elsewhere).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub matched_index: Option<u64>,
}

/// The replicated MDM cluster as one member sees it (`GET /mdm/status`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MdmClusterStatus {
    /// Whether this MDM runs replicated (false: a single MDM, nothing below
    /// but `id` applies).
    pub replicated: bool,
    /// The member that answered.
    pub id: u64,
    /// `Leader`, `Follower`, `Candidate` or `Learner`.
    pub role: String,
    pub leader_id: Option<u64>,
    pub leader_url: Option<String>,
    pub term: u64,
    pub last_log_index: Option<u64>,
    pub committed_index: Option<u64>,
    pub applied_index: Option<u64>,
    pub members: Vec<MdmMember>,
}

/// Body of `POST /mdm/add`: a new member (it joins as a learner, catches up,
/// then becomes a voter) and of `POST /mdm/remove` (only `id`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MdmMemberChange {
    pub id: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
}

/// Response header of `GET /vol/list`: the `after` of the next page, present
/// only when there is one.
pub const NEXT_PAGE_HEADER: &str = "x-next-after";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VolumeCreate {
    pub name: String,
    pub size_bytes: u64,
    /// Storage pool name; `default` when absent.
    #[serde(default)]
    pub pool: Option<String>,
    /// Thin (default) reserves nothing; thick reserves the whole size.
    #[serde(default)]
    pub thick: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VolumeResize {
    /// New size; may only grow.
    pub size_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VolumeRename {
    pub new_name: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VolumeMap {
    /// Volume name or numeric id.
    pub volume: String,
    /// SDC name or numeric id.
    pub sdc: String,
    #[serde(default = "default_access")]
    pub access_mode: AccessMode,
}

fn default_access() -> AccessMode {
    AccessMode::ReadWrite
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VolumeUnmap {
    pub volume: String,
    pub sdc: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mapping {
    pub sdc_id: u64,
    pub sdc_name: String,
    pub access_mode: AccessMode,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Volume {
    pub id: u64,
    pub name: String,
    pub size_bytes: u64,
    pub pool: String,
    pub thick: bool,
    pub epoch: u64,
    pub mapping_gen: u64,
    pub mappings: Vec<Mapping>,
    pub created_at: u64,
}

/// A volume mapped to the calling SDC.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MappedVolume {
    pub volume_id: u64,
    pub name: String,
    pub size_bytes: u64,
    pub access_mode: AccessMode,
    pub mapping_gen: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SdsInfo {
    pub id: u64,
    pub name: String,
    pub host: String,
    pub data_port: u16,
    pub control_port: u16,
    pub mgmt_port: u16,
    pub fault_set: String,
    pub pool: String,
    pub capacity_bytes: u64,
    pub used_bytes: u64,
    pub status: String,
    pub last_seen: u64,
    /// Being drained by `POST /sds/{name}/remove`.
    #[serde(default)]
    pub draining: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SdcInfo {
    pub id: u64,
    pub name: String,
    pub host: String,
    pub nbd_port: u16,
    pub control_port: u16,
    pub mgmt_port: u16,
    pub status: String,
    pub last_seen: u64,
    pub mapped_volumes: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterSummary {
    pub overall: String,
    pub sds_count: u64,
    pub sdc_count: u64,
    pub volume_count: u64,
    pub capacity_bytes: u64,
    pub used_bytes: u64,
    /// Sum of volume sizes (thin volumes included).
    pub provisioned_bytes: u64,
    /// Capacity reserved by thick volumes.
    pub reserved_bytes: u64,
    /// Chunks with fewer than two live copies.
    pub degraded_chunks: u64,
    pub rebuild_jobs_active: u64,
}

/// JSON health document of a component's mgmt port.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ComponentStatus {
    pub component: String,
    pub name: String,
    pub status: String,
    pub node_id: Option<u64>,
    pub registered: bool,
    pub uptime_secs: u64,
}

/// Reply of an SDS's per-chunk checksum query
/// (`GET /chunk/{volume_id}/{chunk_index}/checksum` on its control port).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkChecksum {
    pub volume_id: u64,
    pub chunk_index: u64,
    /// False when the chunk was never written (reads as zeroes).
    pub allocated: bool,
    /// CRC32 of the full 1 MiB content (zeroes when unallocated).
    pub crc32: u32,
    pub generation: u64,
}
