//! What each MDM request does to the database.
//!
//! Every function here runs inside the one SQLite transaction of its
//! request (the HTTP layer opens it and commits only on success), so a
//! refused request never leaves a partial write. Nothing here knows about
//! HTTP beyond returning [`MdmError`]s; time comes in through [`Ctx::now`]
//! so the health rules are testable.

use std::collections::HashMap;

use pflex_proto::api::{
    AckResponse, ClusterSummary, ComponentHealth, HealthStatus, HeartbeatRequest,
    HeartbeatResponse, MappedVolume, Mapping, NodeType, RegisterRequest, RegisterResponse, SdcInfo,
    SdsInfo, TokenAckBatch, TokenRequest, TokenResponse, Volume, VolumeCreate, VolumeGeneration,
    VolumeMap, VolumeUnmap,
};
use pflex_proto::placement::{PlacementGroup, PlacementMap, SdsEndpoint, PGS_PER_VOLUME};
use pflex_proto::token::{AccessMode, ClusterSecret, IoToken};
use pflex_proto::CHUNK_SIZE;
use rusqlite::{params, Connection, OptionalExtension};
use sha2::{Digest, Sha256};

use crate::error::MdmError;
use crate::placement::{self, Candidate, PlacementError};
use crate::validate;

/// Name of the protection domain and storage pool used when none is given.
pub const DEFAULT_POOL: &str = "default";
const DEFAULT_PROTECTION_DOMAIN: &str = "default";
/// Heartbeat log rows older than this are pruned.
const HEARTBEAT_LOG_KEEP_SECS: u64 = 3600;
/// Token rows this long past expiry are pruned.
const TOKEN_KEEP_AFTER_EXPIRY_SECS: u64 = 3600;
/// Cluster metric samples older than this are pruned.
const CLUSTER_METRICS_KEEP_SECS: u64 = 24 * 3600;
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
}

/// What every operation may need besides the database.
pub struct Ctx<'a> {
    pub settings: Settings,
    pub secret: &'a ClusterSecret,
    pub now: u64,
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

/// A fresh random credential (256 bits, hex).
pub fn new_credential() -> String {
    hex::encode(pflex_proto::random_bytes::<32>())
}

/// ACTIVE, STALE or FAILED from the time since a node was last heard from.
pub fn liveness(settings: &Settings, last_seen: u64, now: u64) -> &'static str {
    let silent = now.saturating_sub(last_seen);
    if silent >= settings.failed_after_secs {
        "FAILED"
    } else if silent >= settings.stale_after_secs {
        "STALE"
    } else {
        "ACTIVE"
    }
}

fn node_type_from(s: &str) -> NodeType {
    match s {
        "SDS" => NodeType::Sds,
        "SDC" => NodeType::Sdc,
        _ => NodeType::Mgmt,
    }
}

fn access_mode_from(s: &str) -> AccessMode {
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

// ---------------------------------------------------------------- topology

fn ensure_protection_domain(conn: &Connection, now: u64) -> Result<u64, MdmError> {
    conn.execute(
        "INSERT OR IGNORE INTO protection_domains (name, created_at) VALUES (?1, ?2)",
        params![DEFAULT_PROTECTION_DOMAIN, now],
    )?;
    Ok(conn.query_row(
        "SELECT id FROM protection_domains WHERE name = ?1",
        [DEFAULT_PROTECTION_DOMAIN],
        |r| r.get(0),
    )?)
}

fn ensure_pool(conn: &Connection, pd: u64, name: &str, now: u64) -> Result<u64, MdmError> {
    conn.execute(
        "INSERT OR IGNORE INTO storage_pools (protection_domain_id, name, created_at) VALUES (?1, ?2, ?3)",
        params![pd, name, now],
    )?;
    Ok(conn.query_row("SELECT id FROM storage_pools WHERE name = ?1", [name], |r| r.get(0))?)
}

fn ensure_fault_set(conn: &Connection, pd: u64, name: &str, now: u64) -> Result<u64, MdmError> {
    conn.execute(
        "INSERT OR IGNORE INTO fault_sets (protection_domain_id, name, created_at) VALUES (?1, ?2, ?3)",
        params![pd, name, now],
    )?;
    Ok(conn.query_row(
        "SELECT id FROM fault_sets WHERE protection_domain_id = ?1 AND name = ?2",
        params![pd, name],
        |r| r.get(0),
    )?)
}

/// `POST /discovery/register`. The join key has been checked by the caller.
pub fn register(
    conn: &Connection,
    ctx: &Ctx,
    request: &RegisterRequest,
) -> Result<RegisterResponse, MdmError> {
    let what = match request.node_type {
        NodeType::Sds => "SDS name",
        NodeType::Sdc => "SDC name",
        NodeType::Mgmt => "MGMT name",
    };
    validate::name(what, &request.name)?;
    validate::host(&request.host)?;
    let is_sds = request.node_type == NodeType::Sds;
    if !is_sds
        && (request.fault_set.is_some() || request.pool.is_some() || !request.devices.is_empty())
    {
        return Err(MdmError::invalid(
            "bad_request",
            "fault_set, pool and devices are only for SDS registrations",
        ));
    }
    if is_sds && request.data_port == 0 {
        return Err(MdmError::invalid("bad_request", "an SDS must give its data_port"));
    }
    let fault_set = request.fault_set.clone().unwrap_or_else(|| request.name.clone());
    let pool = request.pool.clone().unwrap_or_else(|| DEFAULT_POOL.to_string());
    if is_sds {
        validate::name("fault set", &fault_set)?;
        validate::name("pool", &pool)?;
        if request.devices.len() > MAX_DEVICES {
            return Err(MdmError::bad_request(format!("at most {MAX_DEVICES} devices per SDS")));
        }
        let mut paths: Vec<&str> = Vec::new();
        for device in &request.devices {
            if device.path.is_empty() || device.path.len() > 4096 {
                return Err(MdmError::bad_request("device path must be 1 to 4096 bytes"));
            }
            if device.used_bytes > device.capacity_bytes {
                return Err(MdmError::bad_request(format!(
                    "device {}: used_bytes exceeds capacity_bytes",
                    device.path
                )));
            }
            if device.capacity_bytes > validate::MAX_VOLUME_BYTES * 64 {
                return Err(MdmError::bad_request(format!(
                    "device {}: capacity_bytes is implausibly large",
                    device.path
                )));
            }
            if paths.contains(&device.path.as_str()) {
                return Err(MdmError::bad_request(format!("device {} listed twice", device.path)));
            }
            paths.push(&device.path);
        }
    }

    let credential = new_credential();
    let credential_hash = sha256_hex(&credential);
    let node_type = request.node_type.as_str();
    let existing: Option<u64> = conn
        .query_row(
            "SELECT id FROM cluster_nodes WHERE node_type = ?1 AND name = ?2",
            params![node_type, request.name],
            |r| r.get(0),
        )
        .optional()?;
    let node_id = match existing {
        Some(id) => {
            conn.execute(
                "UPDATE cluster_nodes SET host = ?2, control_port = ?3, mgmt_port = ?4, data_port = ?5,
                 credential_sha256 = ?6, last_seen = ?7 WHERE id = ?1",
                params![
                    id,
                    request.host,
                    request.control_port,
                    request.mgmt_port,
                    request.data_port,
                    credential_hash,
                    ctx.now
                ],
            )?;
            id
        }
        None => {
            conn.execute(
                "INSERT INTO cluster_nodes (node_type, name, host, control_port, mgmt_port, data_port,
                 credential_sha256, registered_at, last_seen) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?8)",
                params![
                    node_type,
                    request.name,
                    request.host,
                    request.control_port,
                    request.mgmt_port,
                    request.data_port,
                    credential_hash,
                    ctx.now
                ],
            )?;
            conn.last_insert_rowid() as u64
        }
    };
    conn.execute(
        "INSERT INTO registration_history (node_id, host, at) VALUES (?1, ?2, ?3)",
        params![node_id, request.host, ctx.now],
    )?;
    conn.execute(
        "INSERT INTO component_health (node_id, updated_at) VALUES (?1, ?2)
         ON CONFLICT (node_id) DO UPDATE SET updated_at = excluded.updated_at",
        params![node_id, ctx.now],
    )?;

    match request.node_type {
        NodeType::Sds => {
            let pd = ensure_protection_domain(conn, ctx.now)?;
            let pool_id = ensure_pool(conn, pd, &pool, ctx.now)?;
            let fault_set_id = ensure_fault_set(conn, pd, &fault_set, ctx.now)?;
            let capacity: u64 = request.devices.iter().map(|d| d.capacity_bytes).sum();
            let used: u64 = request.devices.iter().map(|d| d.used_bytes).sum();
            let previous: Option<(u64, u64)> = conn
                .query_row(
                    "SELECT fault_set_id, pool_id FROM sds_nodes WHERE node_id = ?1",
                    [node_id],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .optional()?;
            if let Some((old_fault_set, old_pool)) = previous {
                if (old_fault_set != fault_set_id || old_pool != pool_id)
                    && holds_copies(conn, node_id)?
                {
                    return Err(MdmError::conflict(
                        "sds_in_use",
                        format!(
                            "SDS {} holds volume data; it cannot move to another fault set or pool",
                            request.name
                        ),
                    ));
                }
            }
            conn.execute(
                "INSERT INTO sds_nodes (node_id, fault_set_id, pool_id, capacity_bytes, used_bytes)
                 VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT (node_id) DO UPDATE SET fault_set_id = excluded.fault_set_id,
                 pool_id = excluded.pool_id, capacity_bytes = excluded.capacity_bytes,
                 used_bytes = excluded.used_bytes",
                params![node_id, fault_set_id, pool_id, capacity, used],
            )?;
            conn.execute("DELETE FROM sds_devices WHERE sds_id = ?1", [node_id])?;
            for device in &request.devices {
                conn.execute(
                    "INSERT INTO sds_devices (sds_id, path, capacity_bytes, used_bytes) VALUES (?1, ?2, ?3, ?4)",
                    params![node_id, device.path, device.capacity_bytes, device.used_bytes],
                )?;
            }
        }
        NodeType::Sdc => {
            conn.execute("INSERT OR IGNORE INTO sdc_clients (node_id) VALUES (?1)", [node_id])?;
        }
        NodeType::Mgmt => {}
    }

    Ok(RegisterResponse {
        status: "registered".to_string(),
        node_id,
        credential,
        cluster_secret: is_sds.then(|| ctx.secret.to_hex()),
        heartbeat_interval_secs: ctx.settings.heartbeat_interval_secs,
    })
}

fn holds_copies(conn: &Connection, sds_id: u64) -> Result<bool, MdmError> {
    Ok(conn.query_row(
        "SELECT EXISTS (SELECT 1 FROM placement_groups WHERE primary_sds = ?1 OR secondary_sds = ?1)",
        [sds_id],
        |r| r.get(0),
    )?)
}

/// `POST /health/heartbeat`.
pub fn heartbeat(
    conn: &Connection,
    ctx: &Ctx,
    caller: Caller,
    request: &HeartbeatRequest,
) -> Result<HeartbeatResponse, MdmError> {
    let Caller::Node { id, node_type } = caller else {
        return Err(MdmError::forbidden("heartbeats come from components, not the admin token"));
    };
    if id != request.node_id {
        return Err(MdmError::forbidden(format!(
            "this credential belongs to node {id}, not node {}",
            request.node_id
        )));
    }
    let m = &request.metrics;
    if m.used_bytes > m.capacity_bytes {
        return Err(MdmError::bad_request("metrics.used_bytes exceeds metrics.capacity_bytes"));
    }
    conn.execute("UPDATE cluster_nodes SET last_seen = ?2 WHERE id = ?1", params![id, ctx.now])?;
    conn.execute(
        "UPDATE component_health SET capacity_bytes = ?2, used_bytes = ?3, read_ops = ?4, write_ops = ?5,
         read_bytes = ?6, write_bytes = ?7, errors = ?8, heartbeats = heartbeats + 1, updated_at = ?9
         WHERE node_id = ?1",
        params![
            id,
            m.capacity_bytes,
            m.used_bytes,
            m.read_ops,
            m.write_ops,
            m.read_bytes,
            m.write_bytes,
            m.errors,
            ctx.now
        ],
    )?;
    if node_type == NodeType::Sds && m.capacity_bytes > 0 {
        conn.execute(
            "UPDATE sds_nodes SET capacity_bytes = ?2, used_bytes = ?3 WHERE node_id = ?1",
            params![id, m.capacity_bytes, m.used_bytes],
        )?;
    }
    conn.execute("INSERT INTO heartbeat_log (node_id, at) VALUES (?1, ?2)", params![id, ctx.now])?;
    conn.execute(
        "DELETE FROM heartbeat_log WHERE at < ?1",
        [ctx.now.saturating_sub(HEARTBEAT_LOG_KEEP_SECS)],
    )?;
    let volumes = conn
        .prepare("SELECT id, epoch, mapping_gen FROM volumes ORDER BY id")?
        .query_map([], |r| {
            Ok(VolumeGeneration { volume_id: r.get(0)?, epoch: r.get(1)?, mapping_gen: r.get(2)? })
        })?
        .collect::<Result<_, _>>()?;
    Ok(HeartbeatResponse { status: "ok".to_string(), volumes })
}

// ------------------------------------------------------------------ health

struct NodeRow {
    id: u64,
    name: String,
    node_type: NodeType,
    host: String,
    control_port: u16,
    mgmt_port: u16,
    data_port: u16,
    last_seen: u64,
}

fn nodes(conn: &Connection, node_type: Option<NodeType>) -> Result<Vec<NodeRow>, MdmError> {
    let mut stmt = conn.prepare(
        "SELECT id, name, node_type, host, control_port, mgmt_port, data_port, last_seen
         FROM cluster_nodes WHERE ?1 IS NULL OR node_type = ?1 ORDER BY id",
    )?;
    let rows = stmt
        .query_map([node_type.map(|t| t.as_str())], |r| {
            Ok(NodeRow {
                id: r.get(0)?,
                name: r.get(1)?,
                node_type: node_type_from(&r.get::<_, String>(2)?),
                host: r.get(3)?,
                control_port: r.get(4)?,
                mgmt_port: r.get(5)?,
                data_port: r.get(6)?,
                last_seen: r.get(7)?,
            })
        })?
        .collect::<Result<_, _>>()?;
    Ok(rows)
}

/// Chunk-level state of the stored data, derived from PGs and liveness.
struct DataHealth {
    degraded_chunks: u64,
    /// PGs with neither copy on a live node.
    unavailable_pgs: u64,
}

fn data_health(conn: &Connection, ctx: &Ctx) -> Result<DataHealth, MdmError> {
    let status: HashMap<u64, &'static str> = nodes(conn, Some(NodeType::Sds))?
        .into_iter()
        .map(|n| (n.id, liveness(&ctx.settings, n.last_seen, ctx.now)))
        .collect();
    let rebuilding: std::collections::HashSet<(u64, u64)> = conn
        .prepare(
            "SELECT volume_id, pg_index FROM rebuild_jobs WHERE state IN ('pending', 'running')",
        )?
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<Result<_, _>>()?;
    let mut stmt = conn.prepare(
        "SELECT v.id, v.size_bytes, p.pg_index, p.primary_sds, p.secondary_sds,
                (SELECT COUNT(*) FROM placement_groups q WHERE q.volume_id = v.id)
         FROM placement_groups p JOIN volumes v ON v.id = p.volume_id",
    )?;
    let mut rows = stmt.query([])?;
    let mut health = DataHealth { degraded_chunks: 0, unavailable_pgs: 0 };
    while let Some(r) = rows.next()? {
        let (volume_id, size, index, primary, secondary, count): (u64, u64, u64, u64, u64, u64) =
            (r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?);
        let live = |id: u64| status.get(&id).copied() == Some("ACTIVE");
        let dead = |id: u64| status.get(&id).copied().unwrap_or("FAILED") == "FAILED";
        if dead(primary) && dead(secondary) {
            health.unavailable_pgs += 1;
        }
        if !live(primary) || !live(secondary) || rebuilding.contains(&(volume_id, index)) {
            health.degraded_chunks +=
                placement::pg_chunk_count(size.div_ceil(CHUNK_SIZE), count, index);
        }
    }
    Ok(health)
}

/// HEALTHY when every component is ACTIVE and every chunk has two live
/// copies; CRITICAL when some data has no live copy (or volumes exist and no
/// SDS is alive); DEGRADED otherwise.
fn overall(
    conn: &Connection,
    ctx: &Ctx,
    components: &[ComponentHealth],
) -> Result<String, MdmError> {
    let data = data_health(conn, ctx)?;
    let volume_count: u64 = conn.query_row("SELECT COUNT(*) FROM volumes", [], |r| r.get(0))?;
    let live_sds =
        components.iter().filter(|c| c.node_type == NodeType::Sds && c.status != "FAILED").count();
    let state = if data.unavailable_pgs > 0 || (volume_count > 0 && live_sds == 0) {
        "CRITICAL"
    } else if data.degraded_chunks > 0 || components.iter().any(|c| c.status != "ACTIVE") {
        "DEGRADED"
    } else {
        "HEALTHY"
    };
    Ok(state.to_string())
}

/// `GET /health/status`.
pub fn health_status(conn: &Connection, ctx: &Ctx) -> Result<HealthStatus, MdmError> {
    let components: Vec<ComponentHealth> = nodes(conn, None)?
        .into_iter()
        .map(|n| ComponentHealth {
            node_id: n.id,
            status: liveness(&ctx.settings, n.last_seen, ctx.now).to_string(),
            name: n.name,
            node_type: n.node_type,
            last_seen: n.last_seen,
            host: n.host,
        })
        .collect();
    let overall = overall(conn, ctx, &components)?;
    Ok(HealthStatus { overall, components })
}

// ----------------------------------------------------------------- volumes

struct VolumeRow {
    id: u64,
    name: String,
    pool_id: u64,
    pool: String,
    size_bytes: u64,
    thick: bool,
    epoch: u64,
    mapping_gen: u64,
    created_at: u64,
}

const VOLUME_COLUMNS: &str =
    "v.id, v.name, v.pool_id, p.name, v.size_bytes, v.thick, v.epoch, v.mapping_gen, v.created_at
     FROM volumes v JOIN storage_pools p ON p.id = v.pool_id";

fn volume_row(r: &rusqlite::Row) -> rusqlite::Result<VolumeRow> {
    Ok(VolumeRow {
        id: r.get(0)?,
        name: r.get(1)?,
        pool_id: r.get(2)?,
        pool: r.get(3)?,
        size_bytes: r.get(4)?,
        thick: r.get(5)?,
        epoch: r.get(6)?,
        mapping_gen: r.get(7)?,
        created_at: r.get(8)?,
    })
}

/// Finds a volume by name, or else by numeric id.
fn find_volume(conn: &Connection, name_or_id: &str) -> Result<VolumeRow, MdmError> {
    let by_name = conn
        .query_row(&format!("SELECT {VOLUME_COLUMNS} WHERE v.name = ?1"), [name_or_id], volume_row)
        .optional()?;
    if let Some(row) = by_name {
        return Ok(row);
    }
    if let Ok(id) = name_or_id.parse::<u64>() {
        if id <= i64::MAX as u64 {
            if let Some(row) = conn
                .query_row(&format!("SELECT {VOLUME_COLUMNS} WHERE v.id = ?1"), [id], volume_row)
                .optional()?
            {
                return Ok(row);
            }
        }
    }
    Err(MdmError::not_found(
        "volume_not_found",
        format!("no volume named or numbered {name_or_id:?}"),
    ))
}

fn volume_json(conn: &Connection, row: VolumeRow) -> Result<Volume, MdmError> {
    let mappings = conn
        .prepare(
            "SELECT m.sdc_id, n.name, m.access_mode FROM volume_mappings m
             JOIN cluster_nodes n ON n.id = m.sdc_id WHERE m.volume_id = ?1 ORDER BY m.sdc_id",
        )?
        .query_map([row.id], |r| {
            Ok(Mapping {
                sdc_id: r.get(0)?,
                sdc_name: r.get(1)?,
                access_mode: access_mode_from(&r.get::<_, String>(2)?),
            })
        })?
        .collect::<Result<_, _>>()?;
    Ok(Volume {
        id: row.id,
        name: row.name,
        size_bytes: row.size_bytes,
        pool: row.pool,
        thick: row.thick,
        epoch: row.epoch,
        mapping_gen: row.mapping_gen,
        mappings,
        created_at: row.created_at,
    })
}

/// Bytes placed on, primaried by and reserved on each SDS of a pool.
#[derive(Debug, Default, Clone, Copy)]
struct NodeUsage {
    placed: u64,
    placed_primary: u64,
    reserved: u64,
}

fn pool_usage(conn: &Connection, pool_id: u64) -> Result<HashMap<u64, NodeUsage>, MdmError> {
    let mut usage: HashMap<u64, NodeUsage> = HashMap::new();
    let mut stmt = conn.prepare(
        "SELECT v.size_bytes, v.thick, p.pg_index, p.primary_sds, p.secondary_sds,
                (SELECT COUNT(*) FROM placement_groups q WHERE q.volume_id = v.id)
         FROM placement_groups p JOIN volumes v ON v.id = p.volume_id WHERE v.pool_id = ?1",
    )?;
    let mut rows = stmt.query([pool_id])?;
    while let Some(r) = rows.next()? {
        let (size, thick, index, primary, secondary, count): (u64, bool, u64, u64, u64, u64) =
            (r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?);
        let bytes = placement::pg_chunk_count(size.div_ceil(CHUNK_SIZE), count, index) * CHUNK_SIZE;
        for (node, is_primary) in [(primary, true), (secondary, false)] {
            let entry = usage.entry(node).or_default();
            entry.placed += bytes;
            if is_primary {
                entry.placed_primary += bytes;
            }
            if thick {
                entry.reserved += bytes;
            }
        }
    }
    Ok(usage)
}

/// SDS nodes of a pool that may receive copies (not FAILED), with their
/// fault sets and load.
fn candidates(conn: &Connection, ctx: &Ctx, pool_id: u64) -> Result<Vec<Candidate>, MdmError> {
    let usage = pool_usage(conn, pool_id)?;
    let mut stmt = conn.prepare(
        "SELECT n.id, f.name, s.capacity_bytes, s.used_bytes, n.last_seen
         FROM sds_nodes s JOIN cluster_nodes n ON n.id = s.node_id
         JOIN fault_sets f ON f.id = s.fault_set_id WHERE s.pool_id = ?1 ORDER BY n.id",
    )?;
    let mut rows = stmt.query([pool_id])?;
    let mut out = Vec::new();
    while let Some(r) = rows.next()? {
        let (id, fault_set, capacity, used, last_seen): (u64, String, u64, u64, u64) =
            (r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?);
        if liveness(&ctx.settings, last_seen, ctx.now) == "FAILED" {
            continue;
        }
        let load = usage.get(&id).copied().unwrap_or_default();
        out.push(Candidate {
            id,
            fault_set,
            free_bytes: capacity.saturating_sub(used).saturating_sub(load.reserved),
            placed_bytes: load.placed,
            placed_primary_bytes: load.placed_primary,
        });
    }
    Ok(out)
}

fn placement_error(pool: &str, e: PlacementError) -> MdmError {
    match e {
        PlacementError::NoNodes => MdmError::conflict(
            "no_storage",
            format!("storage pool {pool:?} has no live SDS node to hold the volume"),
        ),
        PlacementError::TooFewFaultSets { found } => MdmError::conflict(
            "insufficient_fault_sets",
            format!(
                "storage pool {pool:?} has live SDS nodes in {found} fault set(s); two copies need at least 2 fault sets"
            ),
        ),
    }
}

/// Refuses a thick reservation of `pgs` that some node cannot hold.
fn check_thick_capacity(
    candidates: &[Candidate],
    pgs: &[PlacementGroup],
    size_bytes: u64,
    already_reserved_bytes: u64,
) -> Result<(), MdmError> {
    let chunks = size_bytes.div_ceil(CHUNK_SIZE);
    let old_chunks = already_reserved_bytes.div_ceil(CHUNK_SIZE);
    let count = pgs.len() as u64;
    let mut needed: HashMap<u64, u64> = HashMap::new();
    for (index, pg) in pgs.iter().enumerate() {
        let index = index as u64;
        let extra = (placement::pg_chunk_count(chunks, count, index)
            - placement::pg_chunk_count(old_chunks, count, index))
            * CHUNK_SIZE;
        *needed.entry(pg.primary).or_default() += extra;
        *needed.entry(pg.secondary).or_default() += extra;
    }
    for candidate in candidates {
        let need = needed.get(&candidate.id).copied().unwrap_or(0);
        if need > candidate.free_bytes {
            return Err(MdmError::InsufficientCapacity(format!(
                "thick volume needs {need} bytes on SDS {} which has {} free",
                candidate.id, candidate.free_bytes
            )));
        }
    }
    Ok(())
}

fn pool_id_of(conn: &Connection, pool: &str) -> Result<Option<u64>, MdmError> {
    Ok(conn
        .query_row("SELECT id FROM storage_pools WHERE name = ?1", [pool], |r| r.get(0))
        .optional()?)
}

/// `POST /vol/create`.
pub fn volume_create(
    conn: &Connection,
    ctx: &Ctx,
    request: &VolumeCreate,
) -> Result<Volume, MdmError> {
    validate::volume_name(&request.name)?;
    validate::volume_size(request.size_bytes)?;
    let pool = request.pool.clone().unwrap_or_else(|| DEFAULT_POOL.to_string());
    validate::name("pool", &pool)?;
    let taken: bool = conn.query_row(
        "SELECT EXISTS (SELECT 1 FROM volumes WHERE name = ?1)",
        [&request.name],
        |r| r.get(0),
    )?;
    if taken {
        return Err(MdmError::conflict(
            "volume_exists",
            format!("a volume named {:?} already exists", request.name),
        ));
    }
    let pool_id = match pool_id_of(conn, &pool)? {
        Some(id) => id,
        None if pool == DEFAULT_POOL => {
            return Err(placement_error(&pool, PlacementError::NoNodes))
        }
        None => {
            return Err(MdmError::not_found(
                "pool_not_found",
                format!("no storage pool named {pool:?}"),
            ))
        }
    };
    let candidates = candidates(conn, ctx, pool_id)?;
    let pgs = placement::place(
        &candidates,
        PGS_PER_VOLUME,
        placement::pg_bytes(request.size_bytes, PGS_PER_VOLUME as u64),
    )
    .map_err(|e| placement_error(&pool, e))?;
    if request.thick {
        check_thick_capacity(&candidates, &pgs, request.size_bytes, 0)?;
    }
    conn.execute(
        "INSERT INTO volumes (name, pool_id, size_bytes, thick, epoch, mapping_gen, created_at)
         VALUES (?1, ?2, ?3, ?4, 1, 1, ?5)",
        params![request.name, pool_id, request.size_bytes, request.thick, ctx.now],
    )?;
    let volume_id = conn.last_insert_rowid() as u64;
    let mut insert = conn.prepare(
        "INSERT INTO placement_groups (volume_id, pg_index, primary_sds, secondary_sds) VALUES (?1, ?2, ?3, ?4)",
    )?;
    for (index, pg) in pgs.iter().enumerate() {
        insert.execute(params![volume_id, index as u64, pg.primary, pg.secondary])?;
    }
    volume_json(conn, find_volume(conn, &request.name)?)
}

/// `GET /vol/list`.
pub fn volume_list(conn: &Connection) -> Result<Vec<Volume>, MdmError> {
    let rows: Vec<VolumeRow> = conn
        .prepare(&format!("SELECT {VOLUME_COLUMNS} ORDER BY v.id"))?
        .query_map([], volume_row)?
        .collect::<Result<_, _>>()?;
    rows.into_iter().map(|row| volume_json(conn, row)).collect()
}

/// `GET /vol/{name-or-id}`.
pub fn volume_show(conn: &Connection, name_or_id: &str) -> Result<Volume, MdmError> {
    volume_json(conn, find_volume(conn, name_or_id)?)
}

fn volume_pgs(conn: &Connection, volume_id: u64) -> Result<Vec<PlacementGroup>, MdmError> {
    Ok(conn
        .prepare(
            "SELECT primary_sds, secondary_sds FROM placement_groups WHERE volume_id = ?1 ORDER BY pg_index",
        )?
        .query_map([volume_id], |r| Ok(PlacementGroup { primary: r.get(0)?, secondary: r.get(1)? }))?
        .collect::<Result<_, _>>()?)
}

/// `POST /vol/{name-or-id}/resize`: grow only; bumps the epoch.
pub fn volume_resize(
    conn: &Connection,
    ctx: &Ctx,
    name_or_id: &str,
    size_bytes: u64,
) -> Result<Volume, MdmError> {
    validate::volume_size(size_bytes)?;
    let row = find_volume(conn, name_or_id)?;
    if size_bytes < row.size_bytes {
        return Err(MdmError::invalid(
            "shrink_not_supported",
            format!(
                "volume {:?} is {} bytes; volumes can only grow (asked {size_bytes})",
                row.name, row.size_bytes
            ),
        ));
    }
    if size_bytes == row.size_bytes {
        return volume_json(conn, row);
    }
    if row.thick {
        let pgs = volume_pgs(conn, row.id)?;
        let candidates = candidates(conn, ctx, row.pool_id)?;
        check_thick_capacity(&candidates, &pgs, size_bytes, row.size_bytes)?;
    }
    conn.execute(
        "UPDATE volumes SET size_bytes = ?2, epoch = epoch + 1 WHERE id = ?1",
        params![row.id, size_bytes],
    )?;
    volume_json(conn, find_volume(conn, &row.name)?)
}

/// `POST /vol/{name-or-id}/rename`.
pub fn volume_rename(
    conn: &Connection,
    name_or_id: &str,
    new_name: &str,
) -> Result<Volume, MdmError> {
    validate::volume_name(new_name)?;
    let row = find_volume(conn, name_or_id)?;
    if row.name == new_name {
        return volume_json(conn, row);
    }
    let taken: bool =
        conn.query_row("SELECT EXISTS (SELECT 1 FROM volumes WHERE name = ?1)", [new_name], |r| {
            r.get(0)
        })?;
    if taken {
        return Err(MdmError::conflict(
            "volume_exists",
            format!("a volume named {new_name:?} already exists"),
        ));
    }
    conn.execute("UPDATE volumes SET name = ?2 WHERE id = ?1", params![row.id, new_name])?;
    volume_json(conn, find_volume(conn, new_name)?)
}

/// `DELETE /vol/{name-or-id}`: refused while mapped.
pub fn volume_delete(conn: &Connection, name_or_id: &str) -> Result<Volume, MdmError> {
    let row = find_volume(conn, name_or_id)?;
    let volume = volume_json(conn, row)?;
    if !volume.mappings.is_empty() {
        let names: Vec<&str> = volume.mappings.iter().map(|m| m.sdc_name.as_str()).collect();
        return Err(MdmError::conflict(
            "volume_mapped",
            format!("volume {:?} is mapped to {}; unmap it first", volume.name, names.join(", ")),
        ));
    }
    conn.execute("DELETE FROM placement_groups WHERE volume_id = ?1", [volume.id])?;
    conn.execute("DELETE FROM snapshots WHERE volume_id = ?1", [volume.id])?;
    conn.execute("DELETE FROM rebuild_jobs WHERE volume_id = ?1", [volume.id])?;
    conn.execute("DELETE FROM volumes WHERE id = ?1", [volume.id])?;
    Ok(volume)
}

/// Finds an SDC by name, or else by numeric id.
fn find_sdc(conn: &Connection, name_or_id: &str) -> Result<(u64, String), MdmError> {
    let sql =
        "SELECT n.id, n.name FROM cluster_nodes n JOIN sdc_clients c ON c.node_id = n.id WHERE ";
    if let Some(found) = conn
        .query_row(&format!("{sql} n.name = ?1"), [name_or_id], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?
    {
        return Ok(found);
    }
    if let Ok(id) = name_or_id.parse::<u64>() {
        if id <= i64::MAX as u64 {
            if let Some(found) = conn
                .query_row(&format!("{sql} n.id = ?1"), [id], |r| Ok((r.get(0)?, r.get(1)?)))
                .optional()?
            {
                return Ok(found);
            }
        }
    }
    Err(MdmError::not_found("sdc_not_found", format!("no SDC named or numbered {name_or_id:?}")))
}

/// `POST /vol/map`: idempotent for the same mode; a new mode bumps the
/// mapping generation (revoking tokens of the old mode).
pub fn volume_map(conn: &Connection, ctx: &Ctx, request: &VolumeMap) -> Result<Volume, MdmError> {
    let row = find_volume(conn, &request.volume)?;
    let (sdc_id, _) = find_sdc(conn, &request.sdc)?;
    let mode = request.access_mode.as_str();
    let current: Option<String> = conn
        .query_row(
            "SELECT access_mode FROM volume_mappings WHERE volume_id = ?1 AND sdc_id = ?2",
            params![row.id, sdc_id],
            |r| r.get(0),
        )
        .optional()?;
    if current.as_deref() == Some(mode) {
        return volume_json(conn, row);
    }
    conn.execute(
        "INSERT INTO volume_mappings (volume_id, sdc_id, access_mode, mapped_at) VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT (volume_id, sdc_id) DO UPDATE SET access_mode = excluded.access_mode, mapped_at = excluded.mapped_at",
        params![row.id, sdc_id, mode, ctx.now],
    )?;
    conn.execute("UPDATE volumes SET mapping_gen = mapping_gen + 1 WHERE id = ?1", [row.id])?;
    volume_json(conn, find_volume(conn, &row.name)?)
}

/// `POST /vol/unmap`: bumps the mapping generation, revoking every token.
pub fn volume_unmap(conn: &Connection, request: &VolumeUnmap) -> Result<Volume, MdmError> {
    let row = find_volume(conn, &request.volume)?;
    let (sdc_id, sdc_name) = find_sdc(conn, &request.sdc)?;
    let removed = conn.execute(
        "DELETE FROM volume_mappings WHERE volume_id = ?1 AND sdc_id = ?2",
        params![row.id, sdc_id],
    )?;
    if removed == 0 {
        return Err(MdmError::not_found(
            "not_mapped",
            format!("volume {:?} is not mapped to SDC {sdc_name:?}", row.name),
        ));
    }
    conn.execute("UPDATE volumes SET mapping_gen = mapping_gen + 1 WHERE id = ?1", [row.id])?;
    volume_json(conn, find_volume(conn, &row.name)?)
}

fn mapping_of(
    conn: &Connection,
    volume_id: u64,
    sdc_id: u64,
) -> Result<Option<AccessMode>, MdmError> {
    let mode: Option<String> = conn
        .query_row(
            "SELECT access_mode FROM volume_mappings WHERE volume_id = ?1 AND sdc_id = ?2",
            params![volume_id, sdc_id],
            |r| r.get(0),
        )
        .optional()?;
    Ok(mode.as_deref().map(access_mode_from))
}

/// `GET /vol/{name-or-id}/placement`. An SDC may only read the map of a
/// volume mapped to it.
pub fn placement_map(
    conn: &Connection,
    caller: Caller,
    name_or_id: &str,
) -> Result<PlacementMap, MdmError> {
    let row = find_volume(conn, name_or_id)?;
    if let Caller::Node { id, node_type: NodeType::Sdc } = caller {
        if mapping_of(conn, row.id, id)?.is_none() {
            return Err(MdmError::Forbidden {
                code: "not_mapped",
                message: format!("volume {:?} is not mapped to this SDC", row.name),
            });
        }
    }
    let pgs = volume_pgs(conn, row.id)?;
    let nodes = conn
        .prepare(
            "SELECT n.id, n.name, n.host, n.data_port, f.name FROM cluster_nodes n
             JOIN sds_nodes s ON s.node_id = n.id JOIN fault_sets f ON f.id = s.fault_set_id
             WHERE n.id IN (SELECT primary_sds FROM placement_groups WHERE volume_id = ?1
                            UNION SELECT secondary_sds FROM placement_groups WHERE volume_id = ?1)
             ORDER BY n.id",
        )?
        .query_map([row.id], |r| {
            Ok(SdsEndpoint {
                id: r.get(0)?,
                name: r.get(1)?,
                host: r.get(2)?,
                data_port: r.get(3)?,
                fault_set: r.get(4)?,
            })
        })?
        .collect::<Result<_, _>>()?;
    Ok(PlacementMap {
        volume_id: row.id,
        volume_name: row.name,
        size_bytes: row.size_bytes,
        chunk_size: CHUNK_SIZE,
        epoch: row.epoch,
        mapping_gen: row.mapping_gen,
        pgs,
        nodes,
    })
}

/// `GET /sdc/mappings`: the calling SDC's volumes.
pub fn sdc_mappings(conn: &Connection, sdc_id: u64) -> Result<Vec<MappedVolume>, MdmError> {
    Ok(conn
        .prepare(
            "SELECT v.id, v.name, v.size_bytes, m.access_mode, v.mapping_gen FROM volume_mappings m
             JOIN volumes v ON v.id = m.volume_id WHERE m.sdc_id = ?1 ORDER BY v.id",
        )?
        .query_map([sdc_id], |r| {
            Ok(MappedVolume {
                volume_id: r.get(0)?,
                name: r.get(1)?,
                size_bytes: r.get(2)?,
                access_mode: access_mode_from(&r.get::<_, String>(3)?),
                mapping_gen: r.get(4)?,
            })
        })?
        .collect::<Result<_, _>>()?)
}

// ------------------------------------------------------------------ tokens

/// `POST /token/request` from SDC `sdc_id`.
pub fn request_token(
    conn: &Connection,
    ctx: &Ctx,
    sdc_id: u64,
    request: &TokenRequest,
) -> Result<TokenResponse, MdmError> {
    if request.volume_id > i64::MAX as u64 {
        return Err(MdmError::not_found(
            "volume_not_found",
            format!("no volume {}", request.volume_id),
        ));
    }
    let row = conn
        .query_row(
            &format!("SELECT {VOLUME_COLUMNS} WHERE v.id = ?1"),
            [request.volume_id],
            volume_row,
        )
        .optional()?
        .ok_or_else(|| {
            MdmError::not_found("volume_not_found", format!("no volume {}", request.volume_id))
        })?;
    let Some(mapped_mode) = mapping_of(conn, row.id, sdc_id)? else {
        return Err(MdmError::Forbidden {
            code: "not_mapped",
            message: format!("volume {:?} is not mapped to this SDC", row.name),
        });
    };
    if request.mode == AccessMode::ReadWrite && mapped_mode == AccessMode::ReadOnly {
        return Err(MdmError::Forbidden {
            code: "read_only_mapping",
            message: format!("volume {:?} is mapped read-only to this SDC", row.name),
        });
    }
    let token_id = loop {
        // Ids stay within SQLite's signed 64-bit range.
        let candidate = u64::from_le_bytes(pflex_proto::random_bytes()) >> 1;
        let used: bool = conn.query_row(
            "SELECT EXISTS (SELECT 1 FROM io_tokens WHERE token_id = ?1)",
            [candidate],
            |r| r.get(0),
        )?;
        if candidate != 0 && !used {
            break candidate;
        }
    };
    let token = IoToken {
        token_id,
        volume_id: row.id,
        sdc_id,
        mode: request.mode,
        mapping_gen: row.mapping_gen,
        expires_at: ctx.now + ctx.settings.token_ttl_secs,
    };
    let signed = ctx.secret.sign(&token);
    let session_key = ctx.secret.session_key(&signed);
    conn.execute(
        "INSERT INTO io_tokens (token_id, volume_id, sdc_id, access_mode, mapping_gen, epoch, issued_at,
         expires_at, signature) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
        params![
            token_id,
            row.id,
            sdc_id,
            request.mode.as_str(),
            row.mapping_gen,
            row.epoch,
            ctx.now,
            token.expires_at,
            hex::encode(signed.signature)
        ],
    )?;
    conn.execute(
        "DELETE FROM io_tokens WHERE expires_at < ?1",
        [ctx.now.saturating_sub(TOKEN_KEEP_AFTER_EXPIRY_SECS)],
    )?;
    Ok(TokenResponse {
        token_id,
        token: signed.to_hex(),
        session_key: session_key.to_hex(),
        expires_at: token.expires_at,
        mapping_gen: row.mapping_gen,
    })
}

const ACK_OPS: &[&str] = &["read", "write", "flush", "trim", "write_zeroes"];

/// `POST /token/ack`: batched completion records. Records of tokens the MDM
/// no longer knows (pruned long after expiry) are counted nowhere; the
/// reply says how many were recorded. An SDC may only ack its own tokens.
pub fn ack_tokens(
    conn: &Connection,
    ctx: &Ctx,
    caller: Caller,
    batch: &TokenAckBatch,
) -> Result<AckResponse, MdmError> {
    if batch.records.len() > MAX_ACK_RECORDS {
        return Err(MdmError::bad_request(format!(
            "{} records in one batch; at most {MAX_ACK_RECORDS}",
            batch.records.len()
        )));
    }
    for record in &batch.records {
        if !ACK_OPS.contains(&record.op.as_str()) {
            return Err(MdmError::invalid(
                "invalid_op",
                format!("op {:?} is not one of {}", record.op, ACK_OPS.join(", ")),
            ));
        }
        if record.token_id > i64::MAX as u64 || record.volume_id > i64::MAX as u64 {
            return Err(MdmError::bad_request("token_id and volume_id must be below 2^63"));
        }
    }
    let mut recorded = 0;
    for record in &batch.records {
        let owner: Option<(u64, u64)> = conn
            .query_row(
                "SELECT sdc_id, volume_id FROM io_tokens WHERE token_id = ?1",
                [record.token_id],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        let Some((sdc_id, volume_id)) = owner else { continue };
        if volume_id != record.volume_id {
            return Err(MdmError::bad_request(format!(
                "token {} is for volume {volume_id}, not {}",
                record.token_id, record.volume_id
            )));
        }
        if let Caller::Node { id, node_type: NodeType::Sdc } = caller {
            if id != sdc_id {
                return Err(MdmError::forbidden(format!(
                    "token {} belongs to another SDC",
                    record.token_id
                )));
            }
        }
        let (ops, bytes, errors) = (
            record.ops.min(i64::MAX as u64),
            record.bytes.min(i64::MAX as u64),
            record.errors.min(i64::MAX as u64),
        );
        conn.execute(
            "UPDATE io_tokens SET ops = MIN(ops + ?2, 9223372036854775807), bytes = MIN(bytes + ?3, 9223372036854775807),
             errors = MIN(errors + ?4, 9223372036854775807), last_ack_at = ?5 WHERE token_id = ?1",
            params![record.token_id, ops, bytes, errors, ctx.now],
        )?;
        conn.execute(
            "INSERT INTO volume_io_stats (volume_id, op, ops, bytes, errors) VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT (volume_id, op) DO UPDATE SET ops = MIN(ops + excluded.ops, 9223372036854775807),
             bytes = MIN(bytes + excluded.bytes, 9223372036854775807), errors = MIN(errors + excluded.errors, 9223372036854775807)",
            params![volume_id, record.op, ops, bytes, errors],
        )?;
        recorded += 1;
    }
    Ok(AckResponse { status: "recorded".to_string(), recorded })
}

// ------------------------------------------------------------------- lists

/// `GET /sds/list`.
pub fn sds_list(conn: &Connection, ctx: &Ctx) -> Result<Vec<SdsInfo>, MdmError> {
    Ok(conn
        .prepare(
            "SELECT n.id, n.name, n.host, n.data_port, n.control_port, n.mgmt_port, f.name, p.name,
                    s.capacity_bytes, s.used_bytes, n.last_seen
             FROM sds_nodes s JOIN cluster_nodes n ON n.id = s.node_id
             JOIN fault_sets f ON f.id = s.fault_set_id JOIN storage_pools p ON p.id = s.pool_id
             ORDER BY n.id",
        )?
        .query_map([], |r| {
            let last_seen: u64 = r.get(10)?;
            Ok(SdsInfo {
                id: r.get(0)?,
                name: r.get(1)?,
                host: r.get(2)?,
                data_port: r.get(3)?,
                control_port: r.get(4)?,
                mgmt_port: r.get(5)?,
                fault_set: r.get(6)?,
                pool: r.get(7)?,
                capacity_bytes: r.get(8)?,
                used_bytes: r.get(9)?,
                status: liveness(&ctx.settings, last_seen, ctx.now).to_string(),
                last_seen,
            })
        })?
        .collect::<Result<_, _>>()?)
}

/// `GET /sdc/list`.
pub fn sdc_list(conn: &Connection, ctx: &Ctx) -> Result<Vec<SdcInfo>, MdmError> {
    let rows = nodes(conn, Some(NodeType::Sdc))?;
    rows.into_iter()
        .map(|n| {
            let mapped_volumes: u64 = conn.query_row(
                "SELECT COUNT(*) FROM volume_mappings WHERE sdc_id = ?1",
                [n.id],
                |r| r.get(0),
            )?;
            Ok(SdcInfo {
                id: n.id,
                status: liveness(&ctx.settings, n.last_seen, ctx.now).to_string(),
                name: n.name,
                host: n.host,
                nbd_port: n.data_port,
                control_port: n.control_port,
                mgmt_port: n.mgmt_port,
                last_seen: n.last_seen,
                mapped_volumes,
            })
        })
        .collect()
}

/// `GET /cluster/summary`.
pub fn cluster_summary(conn: &Connection, ctx: &Ctx) -> Result<ClusterSummary, MdmError> {
    let health = health_status(conn, ctx)?;
    let count = |sql: &str| -> Result<u64, MdmError> { Ok(conn.query_row(sql, [], |r| r.get(0))?) };
    let (capacity_bytes, used_bytes): (u64, u64) = conn.query_row(
        "SELECT COALESCE(SUM(capacity_bytes), 0), COALESCE(SUM(used_bytes), 0) FROM sds_nodes",
        [],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )?;
    let mut reserved_bytes = 0;
    let pools: Vec<u64> = conn
        .prepare("SELECT id FROM storage_pools")?
        .query_map([], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    for pool in pools {
        reserved_bytes += pool_usage(conn, pool)?.values().map(|u| u.reserved).sum::<u64>();
    }
    Ok(ClusterSummary {
        overall: health.overall,
        sds_count: count("SELECT COUNT(*) FROM sds_nodes")?,
        sdc_count: count("SELECT COUNT(*) FROM sdc_clients")?,
        volume_count: count("SELECT COUNT(*) FROM volumes")?,
        capacity_bytes,
        used_bytes,
        provisioned_bytes: count("SELECT COALESCE(SUM(size_bytes), 0) FROM volumes")?,
        reserved_bytes,
        degraded_chunks: data_health(conn, ctx)?.degraded_chunks,
        rebuild_jobs_active: count(
            "SELECT COUNT(*) FROM rebuild_jobs WHERE state IN ('pending', 'running')",
        )?,
    })
}

// ----------------------------------------------------------------- monitor

/// What one health-monitor pass did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct MonitorReport {
    /// PG copies moved off FAILED SDS nodes.
    pub copies_replaced: u64,
    /// Volumes whose placement epoch was bumped.
    pub volumes_replaced: u64,
}

/// Periodic pass: re-places every copy held by a FAILED SDS onto a live
/// node outside the surviving copy's fault set (the survivor becomes
/// primary, since it holds the data), records a rebuild job per moved copy,
/// bumps the epoch of each changed volume, and samples cluster metrics.
/// With `replace` false only the metrics are sampled.
pub fn monitor_tick(
    conn: &Connection,
    ctx: &Ctx,
    replace: bool,
) -> Result<MonitorReport, MdmError> {
    let status: HashMap<u64, &'static str> = nodes(conn, Some(NodeType::Sds))?
        .into_iter()
        .map(|n| (n.id, liveness(&ctx.settings, n.last_seen, ctx.now)))
        .collect();
    let failed = |id: u64| status.get(&id).copied().unwrap_or("FAILED") == "FAILED";
    let fault_sets: HashMap<u64, String> = conn
        .prepare(
            "SELECT s.node_id, f.name FROM sds_nodes s JOIN fault_sets f ON f.id = s.fault_set_id",
        )?
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<Result<_, _>>()?;
    struct AffectedPg {
        volume_id: u64,
        pool_id: u64,
        index: u64,
        primary: u64,
        secondary: u64,
        bytes: u64,
    }
    let affected: Vec<AffectedPg> = conn
        .prepare(
            "SELECT v.id, v.pool_id, p.pg_index, p.primary_sds, p.secondary_sds, v.size_bytes,
                    (SELECT COUNT(*) FROM placement_groups q WHERE q.volume_id = v.id)
             FROM placement_groups p JOIN volumes v ON v.id = p.volume_id ORDER BY v.id, p.pg_index",
        )?
        .query_map([], |r| {
            let (size, index, count): (u64, u64, u64) = (r.get(5)?, r.get(2)?, r.get(6)?);
            Ok(AffectedPg {
                volume_id: r.get(0)?,
                pool_id: r.get(1)?,
                index,
                primary: r.get(3)?,
                secondary: r.get(4)?,
                bytes: placement::pg_chunk_count(size.div_ceil(CHUNK_SIZE), count, index)
                    * CHUNK_SIZE,
            })
        })?
        .collect::<Result<Vec<_>, _>>()?
        .into_iter()
        .filter(|pg| replace && failed(pg.primary) != failed(pg.secondary))
        .collect();
    let mut report = MonitorReport::default();
    let mut changed_volumes = std::collections::BTreeSet::new();
    let mut pool_candidates: HashMap<u64, Vec<Candidate>> = HashMap::new();
    for pg in affected {
        let AffectedPg { volume_id, pool_id, index, primary, secondary, bytes } = pg;
        let (survivor, lost) =
            if failed(primary) { (secondary, primary) } else { (primary, secondary) };
        let candidates = match pool_candidates.entry(pool_id) {
            std::collections::hash_map::Entry::Occupied(entry) => entry.into_mut(),
            std::collections::hash_map::Entry::Vacant(entry) => {
                entry.insert(candidates(conn, ctx, pool_id)?)
            }
        };
        let survivor_fault_set = fault_sets.get(&survivor).cloned().unwrap_or_default();
        let Some(target) = placement::replacement(
            candidates,
            survivor,
            &survivor_fault_set,
            bytes.max(CHUNK_SIZE),
        ) else {
            continue;
        };
        if let Some(c) = candidates.iter_mut().find(|c| c.id == target) {
            c.placed_bytes += bytes;
        }
        conn.execute(
            "UPDATE placement_groups SET primary_sds = ?3, secondary_sds = ?4 WHERE volume_id = ?1 AND pg_index = ?2",
            params![volume_id, index, survivor, target],
        )?;
        conn.execute(
            "INSERT INTO rebuild_jobs (volume_id, pg_index, failed_sds, source_sds, target_sds, state, created_at, updated_at)
             VALUES (?1, ?2, ?3, ?4, ?5, 'pending', ?6, ?6)",
            params![volume_id, index, lost, survivor, target, ctx.now],
        )?;
        report.copies_replaced += 1;
        changed_volumes.insert(volume_id);
    }
    for volume_id in &changed_volumes {
        conn.execute("UPDATE volumes SET epoch = epoch + 1 WHERE id = ?1", [volume_id])?;
    }
    report.volumes_replaced = changed_volumes.len() as u64;

    let summary = cluster_summary(conn, ctx)?;
    let sds_active = status.values().filter(|s| **s == "ACTIVE").count() as u64;
    conn.execute(
        "INSERT INTO cluster_metrics (at, capacity_bytes, used_bytes, provisioned_bytes, volumes, sds_active, degraded_chunks)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        params![
            ctx.now,
            summary.capacity_bytes,
            summary.used_bytes,
            summary.provisioned_bytes,
            summary.volume_count,
            sds_active,
            summary.degraded_chunks
        ],
    )?;
    conn.execute(
        "DELETE FROM cluster_metrics WHERE at < ?1",
        [ctx.now.saturating_sub(CLUSTER_METRICS_KEEP_SECS)],
    )?;
    Ok(report)
}
