//! What each MDM request does to the database.
//!
//! Every function here runs inside the one SQLite transaction of its
//! request (the HTTP layer opens it and commits only on success), so a
//! refused request never leaves a partial write. Nothing here knows about
//! HTTP beyond returning [`MdmError`]s; time comes in through [`Ctx::now`]
//! so the health rules are testable.
//!
//! - `nodes`: registration, heartbeats, node lists;
//! - `enrollment`: who may register under a name, enrollment tokens, resets, the audit log;
//! - `volumes`: volumes, mappings, placement maps;
//! - `candidates`: the nodes a placement may use, kept between requests;
//! - `tokens`: IO tokens and completion records;
//! - `health`: liveness, summary, re-placement of failed nodes' copies;
//! - `members`: MDM members removed from a replicated MDM.

mod candidates;
mod enrollment;
mod health;
mod members;
mod movement;
mod nodes;
mod rebuild;
#[cfg(test)]
mod test_support;
mod tokens;
mod volumes;

pub use candidates::CandidateCache;
pub use enrollment::{
    audit, audit_list, cluster_identity, mint_enrollment, record_cluster_identity, reset_node,
    rotate_keys, signing_history, Opened,
};
pub use health::{
    cluster_summary, health_status, metrics_sample, monitor_tick, MetricsSample, MonitorReport,
    Replace,
};
pub use health::{declare_unreachable, device_failed, sds_data_address};
pub use members::{check_new_mdm_member, mdm_member_retired, retire_mdm_member};
pub use movement::{
    movement_policy, movement_status, rebuild_progress, remove_sds, set_movement_policy,
    RebalanceReport, MAX_CONCURRENT_MOVES,
};
pub use nodes::{heartbeat, heartbeat_on_reader, record_sighting, register, sdc_list, sds_list};
pub use rebuild::{rebuild_complete, rebuild_jobs};
pub use tokens::{ack_tokens, draft_token, record_tokens, TokenDraft, TokenRecord};
pub use volumes::{
    placement_map, sdc_mappings, volume_create, volume_delete, volume_list, volume_map,
    volume_rename, volume_resize, volume_show, volume_unmap, VOLUME_PAGE_DEFAULT, VOLUME_PAGE_MAX,
};

use pflex_proto::api::NodeType;
use pflex_proto::token::AccessMode;
use rusqlite::{Connection, OptionalExtension};
use sha2::{Digest, Sha256};

use crate::error::MdmError;

/// Statements through the connection's cache. The MDM runs the same few
/// dozen statements over and over; parsing and planning each one again for
/// every request cost more than running it.
pub(crate) trait Cached {
    fn exec<P: rusqlite::Params>(&self, sql: &str, params: P) -> rusqlite::Result<usize>;
    fn row<T, P, F>(&self, sql: &str, params: P, f: F) -> rusqlite::Result<T>
    where
        P: rusqlite::Params,
        F: FnOnce(&rusqlite::Row<'_>) -> rusqlite::Result<T>;
}

impl Cached for Connection {
    fn exec<P: rusqlite::Params>(&self, sql: &str, params: P) -> rusqlite::Result<usize> {
        self.prepare_cached(sql)?.execute(params)
    }

    fn row<T, P, F>(&self, sql: &str, params: P, f: F) -> rusqlite::Result<T>
    where
        P: rusqlite::Params,
        F: FnOnce(&rusqlite::Row<'_>) -> rusqlite::Result<T>,
    {
        self.prepare_cached(sql)?.query_row(params, f)
    }
}

/// Name of the protection domain and storage pool used when none is given.
pub const DEFAULT_POOL: &str = "default";
const DEFAULT_PROTECTION_DOMAIN: &str = "default";
/// Heartbeat log rows (one per node and minute) older than this are pruned.
const HEARTBEAT_LOG_KEEP_SECS: u64 = 3600;
/// Token rows this long past expiry are pruned (completion records of a
/// token arrive within seconds of its last IO; later ones are not counted).
const TOKEN_KEEP_AFTER_EXPIRY_SECS: u64 = 600;
/// Cluster metric samples older than this are pruned.
const CLUSTER_METRICS_KEEP_SECS: u64 = 24 * 3600;
/// Finished rebuild jobs are kept this long for the record.
const FINISHED_REBUILDS_KEEP_SECS: u64 = 7 * 24 * 3600;
/// Most records one `/token/ack` batch may carry.
pub const MAX_ACK_RECORDS: usize = 10_000;
/// Most devices one SDS may report.
const MAX_DEVICES: usize = 256;

/// Health thresholds and lifetimes (from the command line).
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    pub heartbeat_interval_secs: u64,
    pub stale_after_secs: u64,
    pub failed_after_secs: u64,
    pub token_ttl_secs: u64,
    pub probe_on_report: bool,
    pub unreachable_grace_secs: u64,
    /// See `--resync-window-secs`.
    pub resync_window_secs: u64,
}

/// What every operation may need besides the database.
pub struct Ctx<'a> {
    pub settings: Settings,
    pub keys: &'a crate::keys::Keys,
    pub sightings: &'a crate::sightings::Sightings,
    /// The facts of each pool's candidate nodes (see `candidates`).
    pub candidates: &'a CandidateCache,
    pub now: u64,
}

impl Ctx<'_> {
    /// When `node` was last heard from, given its durable sighting (see
    /// [`crate::sightings`]).
    pub fn last_seen(&self, node: u64, durable: u64) -> u64 {
        self.sightings.last_seen(node, durable)
    }
}

/// Who is calling, from the bearer credential.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Caller {
    Admin,
    Node { id: u64, node_type: NodeType },
}

impl Caller {
    pub fn describe(self) -> String {
        match self {
            Caller::Admin => "the admin token".to_string(),
            Caller::Node { id, node_type } => format!("{} node {id}", node_type.as_str()),
        }
    }
}

/// Hex SHA-256, the form in which credentials are stored.
pub fn sha256_hex(value: &str) -> String {
    hex::encode(Sha256::digest(value.as_bytes()))
}

/// Constant-time equality of two hex digests.
pub(super) fn digests_equal_hex(a: &str, b: &str) -> bool {
    a.len() == b.len() && a.bytes().zip(b.bytes()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A fresh random credential (256 bits, hex).
pub fn new_credential() -> String {
    hex::encode(pflex_proto::random_bytes::<32>())
}

/// ACTIVE, STALE or FAILED from the time since a node was last heard from;
/// FAILED also when it was declared failed (`failed_at`, 0 for never) and
/// has not been heard from since.
pub fn liveness(settings: &Settings, last_seen: u64, failed_at: u64, now: u64) -> &'static str {
    let silent = now.saturating_sub(last_seen);
    if silent >= settings.failed_after_secs || (failed_at > 0 && failed_at >= last_seen) {
        "FAILED"
    } else if silent >= settings.stale_after_secs {
        "STALE"
    } else {
        "ACTIVE"
    }
}

pub(super) fn node_type_from(s: &str) -> NodeType {
    match s {
        "SDS" => NodeType::Sds,
        "SDC" => NodeType::Sdc,
        _ => NodeType::Mgmt,
    }
}

pub(super) fn access_mode_from(s: &str) -> AccessMode {
    if s == AccessMode::ReadOnly.as_str() {
        AccessMode::ReadOnly
    } else {
        AccessMode::ReadWrite
    }
}

/// Looks up the caller of a bearer credential.
pub fn authenticate(conn: &Connection, credential: &str) -> Result<Option<Caller>, MdmError> {
    let hash = sha256_hex(credential);
    let row: Option<(u64, String)> = conn
        .query_row(
            "SELECT id, node_type FROM cluster_nodes WHERE credential_sha256 = ?1",
            [&hash],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()?;
    Ok(row.map(|(id, t)| Caller::Node { id, node_type: node_type_from(&t) }))
}
