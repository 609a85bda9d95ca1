//! Liveness, overall health, the cluster summary and the periodic
//! re-placement of copies held by failed SDS nodes.

use std::collections::HashMap;

use pflex_proto::api::{
    ClusterSummary, ComponentHealth, DeviceFailure, DeviceFailureVerdict, HealthStatus, NodeType,
    UnreachableVerdict,
};
use pflex_proto::CHUNK_SIZE;
use rusqlite::{params, Connection, OptionalExtension};

use crate::error::MdmError;
use crate::placement::{self, Candidate};

use super::volumes::candidates;
use super::*;

pub(super) struct NodeRow {
    pub(super) id: u64,
    pub(super) name: String,
    pub(super) node_type: NodeType,
    pub(super) host: String,
    pub(super) control_port: u16,
    pub(super) mgmt_port: u16,
    pub(super) data_port: u16,
    pub(super) last_seen: u64,
    pub(super) failed_at: u64,
}

pub(super) fn nodes(
    conn: &Connection,
    ctx: &Ctx,
    node_type: Option<NodeType>,
) -> Result<Vec<NodeRow>, MdmError> {
    let mut stmt = conn.prepare_cached(
        "SELECT id, name, node_type, host, control_port, mgmt_port, data_port, last_seen, failed_at
         FROM cluster_nodes WHERE (?1 IS NULL OR node_type = ?1)
           AND id NOT IN (SELECT node_id FROM sds_nodes WHERE removed_at != 0) ORDER BY id",
    )?;
    let mut rows: Vec<NodeRow> = stmt
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
                failed_at: r.get(8)?,
            })
        })?
        .collect::<Result<_, _>>()?;
    ctx.sightings.overlay(&mut rows, |n| (n.id, &mut n.last_seen));
    Ok(rows)
}

/// Chunk-level state of the stored data, derived from PGs and liveness.
pub(super) struct DataHealth {
    pub(super) degraded_chunks: u64,
    /// PGs with no complete copy on a live node.
    pub(super) unavailable_pgs: u64,
}

fn data_health(conn: &Connection, ctx: &Ctx) -> Result<DataHealth, MdmError> {
    let status = sds_liveness(conn, ctx)?;
    let rebuilding = super::rebuild::unfinished_targets(conn)?;
    // Only a PG touching a node that is not ACTIVE, degraded, or being
    // rebuilt can count here: the others are read from their indexes, not
    // found by reading every PG.
    let not_live =
        sds_ids(conn)?.into_iter().filter(|id| status.get(id).copied() != Some("ACTIVE"));
    let mut pgs = pg_rows_of_nodes(conn, not_live)?;
    for pg in pg_rows_where(conn, "p.absent_sds != 0", [])? {
        pgs.insert((pg.volume_id, pg.index), pg);
    }
    for &(volume_id, index) in rebuilding.keys() {
        if let Some(pg) = pg_row(conn, volume_id, index)? {
            pgs.insert((volume_id, index), pg);
        }
    }
    let mut health = DataHealth { degraded_chunks: 0, unavailable_pgs: 0 };
    for pg in pgs.values() {
        let live = |id: u64| status.get(&id).copied() == Some("ACTIVE");
        let dead = |id: u64| status.get(&id).copied().unwrap_or("FAILED") == "FAILED";
        let target = rebuilding.get(&(pg.volume_id, pg.index)).copied();
        // A copy still being rebuilt has missed data: it does not count.
        let usable = |id: u64| !dead(id) && target != Some(id);
        if !usable(pg.primary) && !usable(pg.secondary) {
            health.unavailable_pgs += 1;
        }
        if !live(pg.primary) || !live(pg.secondary) || target.is_some() {
            health.degraded_chunks += pg.bytes / CHUNK_SIZE;
        }
    }
    Ok(health)
}

/// HEALTHY when every SDS and SDC is ACTIVE and every chunk has two live
/// copies; CRITICAL when some data has no live copy (or volumes exist and no
/// SDS is alive); DEGRADED otherwise. MGMT nodes are listed with their own
/// liveness but do not count: the dashboard is not on the data path.
fn overall(
    conn: &Connection,
    data: &DataHealth,
    components: &[ComponentHealth],
) -> Result<String, MdmError> {
    let volume_count: u64 = conn.row("SELECT volumes FROM volume_totals", [], |r| r.get(0))?;
    let live_sds =
        components.iter().filter(|c| c.node_type == NodeType::Sds && c.status != "FAILED").count();
    let state = if data.unavailable_pgs > 0 || (volume_count > 0 && live_sds == 0) {
        "CRITICAL"
    } else if data.degraded_chunks > 0
        || components.iter().any(|c| c.node_type != NodeType::Mgmt && c.status != "ACTIVE")
    {
        "DEGRADED"
    } else {
        "HEALTHY"
    };
    Ok(state.to_string())
}

/// `GET /health/status`.
pub fn health_status(conn: &Connection, ctx: &Ctx) -> Result<HealthStatus, MdmError> {
    Ok(health_and_data(conn, ctx)?.0)
}

/// The health status and the data health it was judged from.
fn health_and_data(conn: &Connection, ctx: &Ctx) -> Result<(HealthStatus, DataHealth), MdmError> {
    let components: Vec<ComponentHealth> = nodes(conn, ctx, None)?
        .into_iter()
        .map(|n| ComponentHealth {
            node_id: n.id,
            status: liveness(&ctx.settings, n.last_seen, n.failed_at, ctx.now).to_string(),
            name: n.name,
            node_type: n.node_type,
            last_seen: n.last_seen,
            host: n.host,
        })
        .collect();
    let data = data_health(conn, ctx)?;
    let overall = overall(conn, &data, &components)?;
    Ok((HealthStatus { overall, components }, data))
}

/// `GET /cluster/summary`.
pub fn cluster_summary(conn: &Connection, ctx: &Ctx) -> Result<ClusterSummary, MdmError> {
    let (health, data) = health_and_data(conn, ctx)?;
    let count = |sql: &str| -> Result<u64, MdmError> { Ok(conn.row(sql, [], |r| r.get(0))?) };
    let (capacity_bytes, used_bytes): (u64, u64) = conn.row(
        "SELECT COALESCE(SUM(capacity_bytes), 0), COALESCE(SUM(used_bytes), 0) FROM sds_nodes",
        [],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )?;
    let reserved_bytes =
        count("SELECT COALESCE(SUM(l.reserved), 0) FROM sds_load l JOIN sds_nodes s ON s.node_id = l.node_id")?;
    Ok(ClusterSummary {
        overall: health.overall,
        sds_count: count("SELECT COUNT(*) FROM sds_nodes")?,
        sdc_count: count("SELECT COUNT(*) FROM sdc_clients")?,
        volume_count: count("SELECT volumes FROM volume_totals")?,
        capacity_bytes,
        used_bytes,
        provisioned_bytes: count("SELECT provisioned_bytes FROM volume_totals")?,
        reserved_bytes,
        degraded_chunks: data.degraded_chunks,
        rebuild_jobs_active: count(
            "SELECT COUNT(*) FROM rebuild_jobs WHERE state IN ('pending', 'running')",
        )?,
    })
}

/// Whose copies a health-monitor pass may move.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Replace {
    /// None: right after an MDM restart, silence is not evidence.
    Nothing,
    /// Every FAILED node's.
    EveryFailedNode,
    /// Only this node's (declared FAILED on evidence), whatever the others'
    /// liveness.
    Only(u64),
}

/// What one health-monitor pass did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct MonitorReport {
    /// PG copies moved off FAILED SDS nodes.
    pub copies_replaced: u64,
    /// Volumes whose placement epoch was bumped.
    pub volumes_replaced: u64,
    /// PGs left unavailable because their only live copy was still being
    /// rebuilt.
    pub unrebuilt_survivors: u64,
    /// PGs that went degraded (their lost copy may come back and be resynced).
    pub pgs_degraded: u64,
    /// Degraded PGs whose absent copy came back (a resync job each).
    pub pgs_resynced: u64,
    /// Rebalance and drain (see [`super::movement`]).
    pub movement: super::movement::RebalanceReport,
}

/// Periodic pass: moves the copies of FAILED SDS nodes as `replace` allows
/// (with [`Replace::Nothing`], nothing moves; see `replace_copies`), then
/// samples cluster metrics and prunes old metrics and finished rebuild jobs.
/// One row of `cluster_metrics`: taken on a reader before a monitor pass
/// (it reads every node, which the writer need not wait for), written by
/// the pass.
pub struct MetricsSample {
    at: u64,
    summary: ClusterSummary,
    sds_active: u64,
}

/// The cluster's figures now, for the next monitor pass to record.
pub fn metrics_sample(conn: &Connection, ctx: &Ctx) -> Result<MetricsSample, MdmError> {
    let summary = cluster_summary(conn, ctx)?;
    let sds_active = nodes(conn, ctx, Some(NodeType::Sds))?
        .iter()
        .filter(|n| liveness(&ctx.settings, n.last_seen, n.failed_at, ctx.now) == "ACTIVE")
        .count() as u64;
    Ok(MetricsSample { at: ctx.now, summary, sds_active })
}

pub fn monitor_tick(
    conn: &Connection,
    ctx: &Ctx,
    replace: Replace,
    sample: Option<MetricsSample>,
) -> Result<MonitorReport, MdmError> {
    let mut report = replace_copies(conn, ctx, replace)?;
    let resolved = resolve_degraded(conn, ctx, replace)?;
    report.copies_replaced += resolved.copies_replaced;
    report.volumes_replaced += resolved.volumes_replaced;
    report.pgs_resynced += resolved.pgs_resynced;
    match replace {
        // Moves need no evidence of failure (they run between live nodes
        // only), so they also run right after an MDM restart.
        Replace::Nothing | Replace::EveryFailedNode => {
            report.movement = super::movement::rebalance_tick(conn, ctx)?;
        }
        Replace::Only(node) => {
            report.movement.moves_abandoned =
                super::movement::abandon_moves(conn, ctx, |id| id == node)?;
        }
    }
    if let Some(sample) = sample {
        conn.exec(
            "INSERT INTO cluster_metrics (at, capacity_bytes, used_bytes, provisioned_bytes, volumes, sds_active, degraded_chunks)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![
                sample.at,
                sample.summary.capacity_bytes,
                sample.summary.used_bytes,
                sample.summary.provisioned_bytes,
                sample.summary.volume_count,
                sample.sds_active,
                sample.summary.degraded_chunks
            ],
        )?;
    }
    conn.exec(
        "DELETE FROM cluster_metrics WHERE at < ?1",
        [ctx.now.saturating_sub(CLUSTER_METRICS_KEEP_SECS)],
    )?;
    conn.exec(
        "DELETE FROM rebuild_jobs WHERE state IN ('done', 'failed') AND updated_at < ?1",
        [ctx.now.saturating_sub(FINISHED_REBUILDS_KEEP_SECS)],
    )?;
    // The growing tables are pruned here, a pass's worth at a time, rather
    // than by every request: one row per node and minute of heartbeats, one
    // row per token until a while after it expired.
    conn.exec(
        "DELETE FROM heartbeat_log WHERE minute < ?1",
        [ctx.now.saturating_sub(HEARTBEAT_LOG_KEEP_SECS) / 60],
    )?;
    conn.exec(
        "DELETE FROM io_tokens WHERE expires_at < ?1",
        [ctx.now.saturating_sub(TOKEN_KEEP_AFTER_EXPIRY_SECS)],
    )?;
    Ok(report)
}

/// Re-places every copy held by a FAILED SDS (with [`Replace::Only`], only
/// that node's copies) onto a live node outside the surviving copy's fault
/// set (the survivor becomes primary, since it holds the data), records a
/// rebuild job per moved copy (a survivor that is itself an unfinished
/// rebuild target is not promoted), and bumps the epoch of each changed
/// volume.
fn replace_copies(
    conn: &Connection,
    ctx: &Ctx,
    replace: Replace,
) -> Result<MonitorReport, MdmError> {
    let failed = failed_nodes(conn, ctx)?;
    // Only PGs with a copy on a node whose copies may move are read.
    let moving_nodes: Vec<u64> = match replace {
        Replace::Nothing => Vec::new(),
        Replace::EveryFailedNode => sds_ids(conn)?.into_iter().filter(|&id| failed(id)).collect(),
        Replace::Only(node) => vec![node],
    };
    let lost: Vec<LostCopy> = pg_rows_of_nodes(conn, moving_nodes)?
        .into_values()
        .filter(|pg| {
            let moving = match replace {
                Replace::Nothing => false,
                Replace::EveryFailedNode => true,
                Replace::Only(node) => pg.primary == node || pg.secondary == node,
            };
            // A degraded PG has lost one copy already; nothing can replace
            // the other if it fails too.
            moving && pg.secondary != 0 && failed(pg.primary) != failed(pg.secondary)
        })
        .map(|pg| {
            let (survivor, lost) = if failed(pg.primary) {
                (pg.secondary, pg.primary)
            } else {
                (pg.primary, pg.secondary)
            };
            LostCopy { pg, survivor, lost }
        })
        .collect();
    if ctx.settings.resync_window_secs == 0 {
        return move_lost_copies(conn, ctx, lost);
    }
    degrade(conn, ctx, lost)
}

/// Takes each lost copy out of its PG, which goes on degraded on the
/// survivor (now primary; it logs the chunks it writes) until the lost node
/// comes back to be resynced or the resync window closes (see
/// [`resolve_degraded`]). A copy that was itself still being rebuilt has no
/// complete data to come back with: it is rebuilt elsewhere at once.
fn degrade(
    conn: &Connection,
    ctx: &Ctx,
    lost_copies: Vec<LostCopy>,
) -> Result<MonitorReport, MdmError> {
    let rebuilding = super::rebuild::unfinished_targets(conn)?;
    let mut report = MonitorReport::default();
    let mut rebuild_now = Vec::new();
    let mut changed_volumes = std::collections::BTreeSet::new();
    for copy in lost_copies {
        let key = (copy.pg.volume_id, copy.pg.index);
        match rebuilding.get(&key) {
            Some(&target) if target == copy.survivor => {
                // The survivor has missed data itself: the PG is unavailable
                // until the lost copy comes back.
                report.unrebuilt_survivors += 1;
                continue;
            }
            Some(_) => {
                rebuild_now.push(copy);
                continue;
            }
            None => {}
        }
        conn.exec(
            "UPDATE placement_groups SET primary_sds = ?3, secondary_sds = ?4, absent_sds = ?4,
                    absent_since = ?5, joining_sds = 0
             WHERE volume_id = ?1 AND pg_index = ?2",
            params![key.0, key.1, copy.survivor, copy.lost, ctx.now],
        )?;
        // A move under way needed both copies: given up.
        conn.exec(
            "UPDATE rebuild_jobs SET state = 'failed', updated_at = ?3
             WHERE volume_id = ?1 AND pg_index = ?2 AND kind = 'move'
               AND state IN ('pending', 'running')",
            params![key.0, key.1, ctx.now],
        )?;
        report.pgs_degraded += 1;
        changed_volumes.insert(key.0);
    }
    for volume_id in &changed_volumes {
        conn.exec("UPDATE volumes SET epoch = epoch + 1 WHERE id = ?1", [volume_id])?;
    }
    let moved = move_lost_copies(conn, ctx, rebuild_now)?;
    report.copies_replaced = moved.copies_replaced;
    report.unrebuilt_survivors += moved.unrebuilt_survivors;
    report.volumes_replaced = moved.volumes_replaced + changed_volumes.len() as u64;
    Ok(report)
}

/// Ends degraded states: a PG whose absent copy's node is ACTIVE again
/// takes it back as secondary with a resync job (the primary copies the
/// chunks it logged meanwhile; until that is done the node is never
/// promoted); a PG whose resync window has closed gets a new secondary and a
/// full rebuild (only when `replace` allows moves).
fn resolve_degraded(
    conn: &Connection,
    ctx: &Ctx,
    replace: Replace,
) -> Result<MonitorReport, MdmError> {
    let status = sds_liveness(conn, ctx)?;
    let degraded: Vec<(u64, u64, u64, u64, u64)> = conn
        .prepare_cached(
            "SELECT volume_id, pg_index, primary_sds, absent_sds, absent_since
             FROM placement_groups WHERE absent_sds != 0",
        )?
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)))?
        .collect::<Result<_, _>>()?;
    let mut report = MonitorReport::default();
    let mut changed_volumes = std::collections::BTreeSet::new();
    let mut expired = Vec::new();
    for (volume_id, index, primary, absent, since) in degraded {
        let back = status.get(&absent) == Some(&"ACTIVE") && has_healthy_device(conn, absent)?;
        if back && status.get(&primary) == Some(&"ACTIVE") {
            conn.exec(
                "UPDATE placement_groups SET secondary_sds = ?3, absent_sds = 0, absent_since = 0
                 WHERE volume_id = ?1 AND pg_index = ?2",
                params![volume_id, index, absent],
            )?;
            conn.exec(
                "INSERT INTO rebuild_jobs (volume_id, pg_index, failed_sds, source_sds, target_sds,
                                           state, kind, created_at, updated_at)
                 VALUES (?1, ?2, ?3, ?4, ?3, 'pending', 'resync', ?5, ?5)",
                params![volume_id, index, absent, primary, ctx.now],
            )?;
            report.pgs_resynced += 1;
            changed_volumes.insert(volume_id);
        } else if ctx.now >= since + ctx.settings.resync_window_secs
            && !matches!(replace, Replace::Nothing)
        {
            expired.push((volume_id, index, absent));
        }
    }
    for volume_id in &changed_volumes {
        conn.exec("UPDATE volumes SET epoch = epoch + 1 WHERE id = ?1", [volume_id])?;
    }
    report.volumes_replaced = changed_volumes.len() as u64;
    if !expired.is_empty() {
        let mut lost = Vec::with_capacity(expired.len());
        for (volume_id, index, absent) in expired {
            if let Some(pg) = pg_row(conn, volume_id, index)? {
                let survivor = pg.primary;
                lost.push(LostCopy { pg, survivor, lost: absent });
            }
        }
        let moved = move_lost_copies(conn, ctx, lost)?;
        report.copies_replaced += moved.copies_replaced;
        report.unrebuilt_survivors += moved.unrebuilt_survivors;
        report.volumes_replaced += moved.volumes_replaced;
    }
    Ok(report)
}

/// Re-places the copies SDS `node` lost with a failed device: each listed
/// PG of which it is primary or secondary, and whose other copy is on a
/// node that is not FAILED, moves off `node` exactly as if `node` had
/// failed (the other copy becomes primary, a rebuild job fills the new
/// secondary). The node's other PGs stay where they are.
pub(super) fn replace_device_copies(
    conn: &Connection,
    ctx: &Ctx,
    node: u64,
    pgs: &std::collections::BTreeSet<(u64, u64)>,
) -> Result<MonitorReport, MdmError> {
    let failed = failed_nodes(conn, ctx)?;
    let lost: Vec<LostCopy> = pg_rows_of_nodes(conn, [node])?
        .into_values()
        .filter(|pg| pgs.contains(&(pg.volume_id, pg.index)))
        .filter_map(|pg| {
            let survivor = match node {
                n if n == pg.primary => pg.secondary,
                n if n == pg.secondary => pg.primary,
                // The copy waiting to be resynced is gone with the device:
                // rebuild it elsewhere now.
                n if n == pg.absent => pg.primary,
                _ => return None,
            };
            (!failed(survivor) && survivor != node).then_some(LostCopy { pg, survivor, lost: node })
        })
        .collect();
    move_lost_copies(conn, ctx, lost)
}

/// Whether SDS `node` has a device that has not failed (or reported none).
fn has_healthy_device(conn: &Connection, node: u64) -> Result<bool, MdmError> {
    Ok(conn.row(
        "SELECT NOT EXISTS (SELECT 1 FROM sds_devices WHERE sds_id = ?1)
             OR EXISTS (SELECT 1 FROM sds_devices WHERE sds_id = ?1 AND failed_reason IS NULL)",
        [node],
        |r| r.get(0),
    )?)
}

/// ACTIVE, STALE or FAILED, per SDS id.
pub(super) fn sds_liveness(
    conn: &Connection,
    ctx: &Ctx,
) -> Result<HashMap<u64, &'static str>, MdmError> {
    Ok(nodes(conn, ctx, Some(NodeType::Sds))?
        .into_iter()
        .map(|n| (n.id, liveness(&ctx.settings, n.last_seen, n.failed_at, ctx.now)))
        .collect())
}

/// Whether an SDS is FAILED now (an unknown id counts as failed).
fn failed_nodes(conn: &Connection, ctx: &Ctx) -> Result<impl Fn(u64) -> bool, MdmError> {
    let status = sds_liveness(conn, ctx)?;
    Ok(move |id: u64| status.get(&id).copied().unwrap_or("FAILED") == "FAILED")
}

/// One PG of a volume, with its copies and the bytes it holds (`secondary`
/// is 0 while the PG is degraded).
#[derive(Clone)]
pub(super) struct PgRow {
    pub(super) volume_id: u64,
    pub(super) pool_id: u64,
    pub(super) index: u64,
    pub(super) primary: u64,
    pub(super) secondary: u64,
    /// The copy taken out while the PG is degraded (0 otherwise).
    pub(super) absent: u64,
    /// The node a copy is moving to (0 otherwise).
    pub(super) joining: u64,
    pub(super) bytes: u64,
}

const PG_SELECT: &str = "SELECT v.id, v.pool_id, p.pg_index, p.primary_sds,
        CASE WHEN p.absent_sds != 0 THEN 0 ELSE p.secondary_sds END, p.bytes, p.absent_sds,
        p.joining_sds
     FROM placement_groups p JOIN volumes v ON v.id = p.volume_id";

fn pg_from_row(r: &rusqlite::Row) -> rusqlite::Result<PgRow> {
    Ok(PgRow {
        volume_id: r.get(0)?,
        pool_id: r.get(1)?,
        index: r.get(2)?,
        primary: r.get(3)?,
        secondary: r.get(4)?,
        bytes: r.get(5)?,
        absent: r.get(6)?,
        joining: r.get(7)?,
    })
}

/// The PGs matching `condition` (on `p`, the PG, and `v`, its volume).
pub(super) fn pg_rows_where<P: rusqlite::Params>(
    conn: &Connection,
    condition: &str,
    params: P,
) -> Result<Vec<PgRow>, MdmError> {
    Ok(conn
        .prepare_cached(&format!("{PG_SELECT} WHERE {condition}"))?
        .query_map(params, pg_from_row)?
        .collect::<Result<Vec<_>, _>>()?)
}

/// PG `index` of volume `volume_id`.
pub(super) fn pg_row(
    conn: &Connection,
    volume_id: u64,
    index: u64,
) -> Result<Option<PgRow>, MdmError> {
    Ok(pg_rows_where(conn, "p.volume_id = ?1 AND p.pg_index = ?2", params![volume_id, index])?
        .pop())
}

/// Every PG in which one of `nodes` holds, lost or receives a copy, by
/// (volume, index): four index lookups per node, whatever the number of
/// PGs elsewhere.
pub(super) fn pg_rows_of_nodes(
    conn: &Connection,
    nodes: impl IntoIterator<Item = u64>,
) -> Result<std::collections::BTreeMap<(u64, u64), PgRow>, MdmError> {
    let mut out = std::collections::BTreeMap::new();
    for node in nodes {
        for condition in [
            "p.primary_sds = ?1",
            "p.secondary_sds = ?1",
            "p.absent_sds = ?1 AND p.absent_sds != 0",
            "p.joining_sds = ?1 AND p.joining_sds != 0",
        ] {
            for pg in pg_rows_where(conn, condition, [node])? {
                out.insert((pg.volume_id, pg.index), pg);
            }
        }
    }
    Ok(out)
}

/// Every SDS id, removed ones included (they count as FAILED).
pub(super) fn sds_ids(conn: &Connection) -> Result<Vec<u64>, MdmError> {
    Ok(conn
        .prepare_cached("SELECT node_id FROM sds_nodes ORDER BY node_id")?
        .query_map([], |r| r.get(0))?
        .collect::<Result<_, _>>()?)
}

/// A PG copy that is gone (on `lost`) while `survivor` holds the data.
struct LostCopy {
    pg: PgRow,
    survivor: u64,
    lost: u64,
}

/// Moves each lost copy onto a live node outside the survivor's fault set
/// (the survivor becomes primary), records a rebuild job per moved copy
/// (a survivor that is itself an unfinished rebuild target is not
/// promoted), and bumps the epoch of each changed volume.
fn move_lost_copies(
    conn: &Connection,
    ctx: &Ctx,
    lost_copies: Vec<LostCopy>,
) -> Result<MonitorReport, MdmError> {
    let fault_sets: HashMap<u64, String> = conn
        .prepare_cached(
            "SELECT s.node_id, f.name FROM sds_nodes s JOIN fault_sets f ON f.id = s.fault_set_id",
        )?
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<Result<_, _>>()?;
    let rebuilding = super::rebuild::unfinished_targets(conn)?;
    let mut report = MonitorReport::default();
    let mut changed_volumes = std::collections::BTreeSet::new();
    let mut pool_candidates: HashMap<u64, Vec<Candidate>> = HashMap::new();
    for LostCopy { pg, survivor, lost } in lost_copies {
        let PgRow { volume_id, pool_id, index, bytes, .. } = pg;
        if rebuilding.get(&(volume_id, index)) == Some(&survivor) {
            // The survivor is a copy still being rebuilt: it has missed data,
            // so it must not become the only copy. The PG stays unavailable
            // until its source comes back (and finishes the copy).
            report.unrebuilt_survivors += 1;
            continue;
        }
        let candidates = match pool_candidates.entry(pool_id) {
            std::collections::hash_map::Entry::Occupied(entry) => entry.into_mut(),
            std::collections::hash_map::Entry::Vacant(entry) => {
                entry.insert(candidates(conn, ctx, pool_id)?)
            }
        };
        // The node that lost the copy (a failed device on a live node) must
        // not get it back.
        let eligible: Vec<Candidate> =
            candidates.iter().filter(|c| c.id != lost).cloned().collect();
        let survivor_fault_set = fault_sets.get(&survivor).cloned().unwrap_or_default();
        let Some(target) =
            placement::replacement(&eligible, survivor, &survivor_fault_set, bytes.max(CHUNK_SIZE))
        else {
            continue;
        };
        if let Some(c) = candidates.iter_mut().find(|c| c.id == target) {
            c.placed_bytes += bytes;
        }
        conn.exec(
            "UPDATE placement_groups SET primary_sds = ?3, secondary_sds = ?4, absent_sds = 0,
                    absent_since = 0, joining_sds = 0
             WHERE volume_id = ?1 AND pg_index = ?2",
            params![volume_id, index, survivor, target],
        )?;
        // An older job for this PG copied to a node that is no longer its
        // secondary (the target failed): superseded.
        conn.exec(
            "UPDATE rebuild_jobs SET state = 'failed', updated_at = ?3
             WHERE volume_id = ?1 AND pg_index = ?2 AND state IN ('pending', 'running')",
            params![volume_id, index, ctx.now],
        )?;
        conn.exec(
            "INSERT INTO rebuild_jobs (volume_id, pg_index, failed_sds, source_sds, target_sds, state, created_at, updated_at)
             VALUES (?1, ?2, ?3, ?4, ?5, 'pending', ?6, ?6)",
            params![volume_id, index, lost, survivor, target, ctx.now],
        )?;
        report.copies_replaced += 1;
        changed_volumes.insert(volume_id);
    }
    for volume_id in &changed_volumes {
        conn.exec("UPDATE volumes SET epoch = epoch + 1 WHERE id = ?1", [volume_id])?;
    }
    report.volumes_replaced = changed_volumes.len() as u64;
    Ok(report)
}

/// `POST /sds/device-failed`: records the device as failed and moves the
/// caller's copies of the PGs it held (see [`replace_device_copies`]).
pub fn device_failed(
    conn: &Connection,
    ctx: &Ctx,
    caller: Caller,
    report: &DeviceFailure,
) -> Result<DeviceFailureVerdict, MdmError> {
    let Caller::Node { id: node, node_type: NodeType::Sds } = caller else {
        return Err(MdmError::forbidden("only an SDS reports its own devices"));
    };
    if report.path.is_empty() || report.path.len() > 4096 || report.reason.len() > 4096 {
        return Err(MdmError::bad_request("device path and reason must be 1..4096 bytes"));
    }
    conn.exec(
        "UPDATE sds_devices SET failed_reason = ?3 WHERE sds_id = ?1 AND path = ?2",
        params![node, report.path, report.reason],
    )?;
    let healthy_devices: u64 = conn.row(
        "SELECT COUNT(*) FROM sds_devices WHERE sds_id = ?1 AND failed_reason IS NULL",
        [node],
        |r| r.get(0),
    )?;
    let pgs: std::collections::BTreeSet<(u64, u64)> = if healthy_devices == 0 {
        // No device left: the node can hold no copy at all, so every PG it
        // is in moves, not only those that had a chunk on this device.
        conn.prepare_cached(
            "SELECT volume_id, pg_index FROM placement_groups
             WHERE primary_sds = ?1 OR secondary_sds = ?1 OR absent_sds = ?1",
        )?
        .query_map([node], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<Result<_, _>>()?
    } else {
        report.pgs.iter().map(|pg| (pg.volume_id, pg.pg_index)).collect()
    };
    // Copies moving onto the node go elsewhere later.
    super::movement::abandon_moves(conn, ctx, |id| id == node)?;
    let moved = replace_device_copies(conn, ctx, node, &pgs)?;
    tracing::warn!(
        sds = node,
        device = %report.path,
        reason = %report.reason,
        pgs = pgs.len(),
        copies_replaced = moved.copies_replaced,
        "an SDS device failed"
    );
    Ok(DeviceFailureVerdict {
        copies_replaced: moved.copies_replaced,
        unrebuilt_survivors: moved.unrebuilt_survivors,
    })
}

/// Host and data port of SDS `node_id`, for the MDM's own probe.
pub fn sds_data_address(conn: &Connection, node_id: u64) -> Result<(String, u16), MdmError> {
    conn.row(
        "SELECT host, data_port FROM cluster_nodes WHERE id = ?1 AND node_type = 'SDS'",
        [node_id],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )
    .optional()?
    .ok_or_else(|| MdmError::not_found("no_such_sds", format!("no SDS with id {node_id}")))
}

/// After a report that SDS `node_id` is unreachable, with the MDM's probe
/// result: when `declare` (the MDM's probes have failed for the grace
/// period), the node is FAILED from now until it is heard from again and its
/// copies move at once, unless it was heard from after `probe_started`.
pub fn declare_unreachable(
    conn: &Connection,
    ctx: &Ctx,
    node_id: u64,
    reachable: Option<bool>,
    declare: bool,
    probe_started: u64,
) -> Result<UnreachableVerdict, MdmError> {
    let mut copies_replaced = 0;
    // Heard from since the probes started (a heartbeat not yet written).
    let heard_since = ctx.last_seen(node_id, 0) > probe_started;
    if declare && !heard_since {
        let declared = conn.exec(
            "UPDATE cluster_nodes SET failed_at = ?2
             WHERE id = ?1 AND node_type = 'SDS' AND last_seen <= ?3",
            params![node_id, ctx.now, probe_started],
        )?;
        if declared > 0 {
            copies_replaced = replace_copies(conn, ctx, Replace::Only(node_id))?.copies_replaced;
        }
    }
    let (last_seen, failed_at): (u64, u64) =
        conn.row("SELECT last_seen, failed_at FROM cluster_nodes WHERE id = ?1", [node_id], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })?;
    let last_seen = ctx.last_seen(node_id, last_seen);
    Ok(UnreachableVerdict {
        node_id,
        reachable,
        status: liveness(&ctx.settings, last_seen, failed_at, ctx.now).to_string(),
        copies_replaced,
    })
}
