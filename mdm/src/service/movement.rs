//! Data movement besides failure handling: rebalance onto new or emptier
//! nodes, draining a node before it is removed, the movement policy every
//! SDS applies, and progress, rate and ETA of all copy jobs.
//!
//! A move never leaves a PG with a single complete copy: the receiving node
//! joins the PG as a third copy (`joining_sds`; the primary forwards every
//! write to it and copies the PG's chunks to it), and only when the
//! primary reports the copy complete does the MDM swap it in for the copy
//! that leaves, in one epoch change. Moves start only while no rebuild or
//! resync is pending (lost redundancy comes first), a few at a time.

use pflex_proto::api::{
    MovementPolicy, MovementPriority, MovementStatus, NodeType, RebuildJob, RebuildProgress,
    SdsInfo,
};
use pflex_proto::CHUNK_SIZE;
use rusqlite::{params, Connection, OptionalExtension};

use crate::error::MdmError;
use crate::rebalance::{self, MovablePg, NodeLoad};

use super::*;

/// Moves running at once in the whole cluster.
pub const MAX_CONCURRENT_MOVES: usize = 4;

/// Rebalance stops once every node's fill is within this many percentage
/// points of every other's.
pub const REBALANCE_SPREAD_POINTS: u64 = 2;

/// Seconds over which the movement rate is averaged.
const RATE_WINDOW_SECS: u64 = 5;

/// `GET` side of `PUT /rebuild/policy`.
pub fn movement_policy(conn: &Connection) -> Result<MovementPolicy, MdmError> {
    Ok(conn.row(
        "SELECT mb_per_sec, chunks_in_flight, priority FROM movement_policy WHERE id = 1",
        [],
        |r| {
            Ok(MovementPolicy {
                mb_per_sec: r.get(0)?,
                chunks_in_flight: r.get(1)?,
                priority: if r.get::<_, String>(2)? == "movement" {
                    MovementPriority::Movement
                } else {
                    MovementPriority::Client
                },
            })
        },
    )?)
}

/// Largest MB/s limit accepted (100 GB/s: beyond any device).
const MAX_MB_PER_SEC: u64 = 100_000;
/// Most chunks one job may keep in flight.
pub const MAX_CHUNKS_IN_FLIGHT: u32 = 64;

/// `PUT /rebuild/policy`.
pub fn set_movement_policy(
    conn: &Connection,
    policy: &MovementPolicy,
) -> Result<MovementPolicy, MdmError> {
    if policy.mb_per_sec > MAX_MB_PER_SEC {
        return Err(MdmError::bad_request(format!(
            "mb_per_sec must be 0 (no limit) to {MAX_MB_PER_SEC}"
        )));
    }
    if !(1..=MAX_CHUNKS_IN_FLIGHT).contains(&policy.chunks_in_flight) {
        return Err(MdmError::bad_request(format!(
            "chunks_in_flight must be 1 to {MAX_CHUNKS_IN_FLIGHT}"
        )));
    }
    conn.exec(
        "UPDATE movement_policy SET mb_per_sec = ?1, chunks_in_flight = ?2, priority = ?3 WHERE id = 1",
        params![policy.mb_per_sec, policy.chunks_in_flight, policy.priority.as_str()],
    )?;
    movement_policy(conn)
}

/// `POST /rebuild/progress`, from the job's source only; 409 once the job
/// is no longer running (the source then stops it).
pub fn rebuild_progress(
    conn: &Connection,
    ctx: &Ctx,
    caller: Caller,
    progress: &RebuildProgress,
) -> Result<RebuildJob, MdmError> {
    let Caller::Node { id, .. } = caller else {
        return Err(MdmError::forbidden("only the job's source SDS reports progress"));
    };
    let (source, state, bytes_before): (u64, String, u64) = conn
        .query_row(
            "SELECT source_sds, state, bytes_copied FROM rebuild_jobs WHERE id = ?1",
            [progress.job_id],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .optional()?
        .ok_or_else(|| {
            MdmError::not_found("no_such_job", format!("no rebuild job {}", progress.job_id))
        })?;
    if source != id {
        return Err(MdmError::forbidden(format!(
            "rebuild job {} belongs to SDS {source}, not {id}",
            progress.job_id
        )));
    }
    if state != "running" && state != "pending" {
        return Err(MdmError::conflict(
            "job_finished",
            format!("rebuild job {} is already {state}", progress.job_id),
        ));
    }
    if progress.chunks_copied > progress.chunks_total {
        return Err(MdmError::bad_request("chunks_copied exceeds chunks_total"));
    }
    conn.exec(
        "UPDATE rebuild_jobs SET chunks_total = ?2, chunks_copied = ?3, bytes_copied = ?4,
                updated_at = ?5 WHERE id = ?1",
        params![
            progress.job_id,
            progress.chunks_total,
            progress.chunks_copied,
            progress.bytes_copied.max(bytes_before),
            ctx.now
        ],
    )?;
    let added = progress.bytes_copied.saturating_sub(bytes_before);
    if added > 0 {
        conn.exec(
            "INSERT INTO movement_bytes (at, bytes) VALUES (?1, ?2)
             ON CONFLICT (at) DO UPDATE SET bytes = bytes + ?2",
            params![ctx.now, added],
        )?;
    }
    super::rebuild::rebuild_jobs(conn)?
        .into_iter()
        .find(|j| j.job_id == progress.job_id)
        .ok_or_else(|| MdmError::not_found("no_such_job", "the job was just updated"))
}

/// `GET /rebuild/status`.
pub fn movement_status(conn: &Connection, ctx: &Ctx) -> Result<MovementStatus, MdmError> {
    let count = |kind: &str| -> Result<u64, MdmError> {
        Ok(conn.row(
            "SELECT COUNT(*) FROM rebuild_jobs WHERE kind = ?1 AND state IN ('pending', 'running')",
            [kind],
            |r| r.get(0),
        )?)
    };
    let (chunks_total, chunks_copied): (u64, u64) = conn.row(
        "SELECT COALESCE(SUM(chunks_total), 0), COALESCE(SUM(chunks_copied), 0)
         FROM rebuild_jobs WHERE state IN ('pending', 'running')",
        [],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )?;
    let recent: u64 = conn.row(
        "SELECT COALESCE(SUM(bytes), 0) FROM movement_bytes WHERE at > ?1",
        [ctx.now.saturating_sub(RATE_WINDOW_SECS)],
        |r| r.get(0),
    )?;
    let rate = recent / RATE_WINDOW_SECS;
    let remaining = chunks_total.saturating_sub(chunks_copied) * CHUNK_SIZE;
    let draining = conn
        .prepare_cached(
            "SELECT n.name FROM sds_nodes s JOIN cluster_nodes n ON n.id = s.node_id
             WHERE s.draining != 0 ORDER BY n.id",
        )?
        .query_map([], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    Ok(MovementStatus {
        policy: movement_policy(conn)?,
        rebuild_jobs: count("rebuild")?,
        resync_jobs: count("resync")?,
        move_jobs: count("move")?,
        chunks_total,
        chunks_copied,
        rate_bytes_per_sec: rate,
        eta_secs: (rate > 0).then(|| remaining.div_ceil(rate)),
        draining,
    })
}

/// `POST /sds/{name-or-id}/remove`: starts draining the node (its copies
/// move to the pool's other nodes; then it is removed). Refused when the
/// rest of its pool could not hold two copies in two fault sets.
pub fn remove_sds(conn: &Connection, ctx: &Ctx, name_or_id: &str) -> Result<SdsInfo, MdmError> {
    let found: Option<(u64, u64, u64)> = conn
        .query_row(
            "SELECT n.id, s.pool_id, s.removed_at FROM cluster_nodes n
             JOIN sds_nodes s ON s.node_id = n.id
             WHERE n.node_type = 'SDS' AND (n.name = ?1 OR CAST(n.id AS TEXT) = ?1)",
            [name_or_id],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .optional()?;
    let Some((id, pool, removed_at)) = found else {
        return Err(MdmError::not_found("no_such_sds", format!("no SDS {name_or_id:?}")));
    };
    if removed_at != 0 {
        return Err(MdmError::conflict("sds_removed", format!("SDS {name_or_id:?} was removed")));
    }
    let remaining_fault_sets: u64 = conn.row(
        "SELECT COUNT(DISTINCT s.fault_set_id) FROM sds_nodes s
         WHERE s.pool_id = ?1 AND s.node_id != ?2 AND s.draining = 0 AND s.removed_at = 0",
        params![pool, id],
        |r| r.get(0),
    )?;
    if remaining_fault_sets < 2 {
        return Err(MdmError::conflict(
            "too_few_fault_sets",
            format!(
                "without SDS {name_or_id:?} its pool has {remaining_fault_sets} fault set(s); two copies need two"
            ),
        ));
    }
    conn.exec("UPDATE sds_nodes SET draining = 1 WHERE node_id = ?1", [id])?;
    super::nodes::sds_list(conn, ctx)?
        .into_iter()
        .find(|s| s.id == id)
        .ok_or_else(|| MdmError::not_found("no_such_sds", format!("no SDS {name_or_id:?}")))
}

/// What one rebalance pass did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RebalanceReport {
    pub moves_started: u64,
    pub moves_abandoned: u64,
    pub nodes_removed: u64,
}

/// Gives up the moves whose receiving node `gone` says is gone (the PG
/// keeps its two copies; the move may be planned again).
pub(super) fn abandon_moves(
    conn: &Connection,
    ctx: &Ctx,
    gone: impl Fn(u64) -> bool,
) -> Result<u64, MdmError> {
    let joining: Vec<(u64, u64, u64)> = conn
        .prepare_cached(
            "SELECT volume_id, pg_index, joining_sds FROM placement_groups WHERE joining_sds != 0",
        )?
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
        .collect::<Result<_, _>>()?;
    let mut abandoned = 0;
    for (volume_id, index, node) in joining.into_iter().filter(|j| gone(j.2)) {
        conn.exec(
            "UPDATE placement_groups SET joining_sds = 0 WHERE volume_id = ?1 AND pg_index = ?2",
            params![volume_id, index],
        )?;
        conn.exec(
            "UPDATE rebuild_jobs SET state = 'failed', updated_at = ?3
             WHERE volume_id = ?1 AND pg_index = ?2 AND kind = 'move'
               AND state IN ('pending', 'running')",
            params![volume_id, index, ctx.now],
        )?;
        conn.exec("UPDATE volumes SET epoch = epoch + 1 WHERE id = ?1", [volume_id])?;
        tracing::warn!(volume_id, pg = index, target = node, "move abandoned");
        abandoned += 1;
    }
    Ok(abandoned)
}

/// Periodic pass (with the health monitor, once failures are handled):
/// gives up moves onto FAILED nodes, removes drained nodes that hold
/// nothing any more, and starts moves (drains first, then balance) while
/// no rebuild or resync is outstanding.
pub(super) fn rebalance_tick(conn: &Connection, ctx: &Ctx) -> Result<RebalanceReport, MdmError> {
    let mut report = RebalanceReport::default();
    let status = super::health::sds_liveness(conn, ctx)?;
    let failed = |id: u64| status.get(&id).copied().unwrap_or("FAILED") == "FAILED";
    report.moves_abandoned = abandon_moves(conn, ctx, failed)?;

    let drained: Vec<u64> = conn
        .prepare_cached(
            "SELECT node_id FROM sds_nodes s WHERE draining != 0 AND NOT EXISTS (
                 SELECT 1 FROM placement_groups p WHERE p.primary_sds = s.node_id
                    OR p.secondary_sds = s.node_id OR p.absent_sds = s.node_id
                    OR p.joining_sds = s.node_id)",
        )?
        .query_map([], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    for id in drained {
        conn.exec(
            "UPDATE sds_nodes SET draining = 0, removed_at = ?2 WHERE node_id = ?1",
            params![id, ctx.now],
        )?;
        tracing::info!(sds = id, "drained SDS removed from the cluster");
        report.nodes_removed += 1;
    }

    let (copies_outstanding, moves_running): (u64, u64) = conn.row(
        "SELECT COALESCE(SUM(kind != 'move'), 0), COALESCE(SUM(kind = 'move'), 0)
         FROM rebuild_jobs WHERE state IN ('pending', 'running')",
        [],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )?;
    let room = MAX_CONCURRENT_MOVES.saturating_sub(moves_running as usize);
    if copies_outstanding > 0 || room == 0 {
        return Ok(report);
    }
    let pools: Vec<u64> = conn
        .prepare_cached("SELECT DISTINCT pool_id FROM sds_nodes WHERE removed_at = 0")?
        .query_map([], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    let mut changed_volumes = std::collections::BTreeSet::new();
    for pool in pools {
        let room = MAX_CONCURRENT_MOVES
            .saturating_sub(moves_running as usize + report.moves_started as usize);
        if room == 0 {
            break;
        }
        let usage = super::volumes::pool_usage(conn, pool)?;
        let eligible: std::collections::HashSet<u64> =
            super::volumes::candidates(conn, ctx, pool)?.into_iter().map(|c| c.id).collect();
        let nodes: Vec<NodeLoad> = conn
            .prepare_cached(
                "SELECT s.node_id, f.name, s.capacity_bytes, s.draining FROM sds_nodes s
                 JOIN fault_sets f ON f.id = s.fault_set_id
                 WHERE s.pool_id = ?1 AND s.removed_at = 0 ORDER BY s.node_id",
            )?
            .query_map([pool], |r| {
                let id: u64 = r.get(0)?;
                Ok(NodeLoad {
                    id,
                    fault_set: r.get(1)?,
                    capacity_bytes: r.get(2)?,
                    placed_bytes: usage.get(&id).map_or(0, |u| u.placed),
                    draining: r.get(3)?,
                    eligible: eligible.contains(&id),
                })
            })?
            .collect::<Result<_, _>>()?;
        let Some(examined) = rebalance::nodes_to_examine(&nodes, room, REBALANCE_SPREAD_POINTS)
        else {
            continue;
        };
        let pgs: Vec<MovablePg> = super::health::pg_rows_of_nodes(conn, examined)?
            .into_values()
            .filter(|pg| pg.pool_id == pool && pg.secondary != 0 && pg.absent == 0)
            .filter(|pg| pg.joining == 0 && !failed(pg.primary) && !failed(pg.secondary))
            .map(|pg| MovablePg {
                volume_id: pg.volume_id,
                index: pg.index,
                primary: pg.primary,
                secondary: pg.secondary,
                bytes: pg.bytes.max(CHUNK_SIZE),
            })
            .collect();
        for m in rebalance::plan(&nodes, &pgs, room, REBALANCE_SPREAD_POINTS) {
            let primary: u64 = conn.row(
                "SELECT primary_sds FROM placement_groups WHERE volume_id = ?1 AND pg_index = ?2",
                params![m.volume_id, m.index],
                |r| r.get(0),
            )?;
            conn.exec(
                "UPDATE placement_groups SET joining_sds = ?3 WHERE volume_id = ?1 AND pg_index = ?2",
                params![m.volume_id, m.index, m.to],
            )?;
            conn.exec(
                "INSERT INTO rebuild_jobs (volume_id, pg_index, failed_sds, source_sds, target_sds,
                                           state, kind, created_at, updated_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, 'pending', 'move', ?6, ?6)",
                params![m.volume_id, m.index, m.from, primary, m.to, ctx.now],
            )?;
            changed_volumes.insert(m.volume_id);
            report.moves_started += 1;
        }
    }
    for volume_id in &changed_volumes {
        conn.exec("UPDATE volumes SET epoch = epoch + 1 WHERE id = ?1", [volume_id])?;
    }
    conn.exec(
        "DELETE FROM movement_bytes WHERE at < ?1",
        [ctx.now.saturating_sub(10 * RATE_WINDOW_SECS)],
    )?;
    Ok(report)
}

/// Whether `node` was removed (its heartbeats are answered `removed`).
pub(super) fn is_removed(
    conn: &Connection,
    node: u64,
    node_type: NodeType,
) -> Result<bool, MdmError> {
    if node_type != NodeType::Sds {
        return Ok(false);
    }
    Ok(conn
        .query_row("SELECT removed_at != 0 FROM sds_nodes WHERE node_id = ?1", [node], |r| r.get(0))
        .optional()?
        .unwrap_or(false))
}
