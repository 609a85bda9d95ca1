//! Rebuild jobs: which copies a source SDS must copy to a new secondary,
//! and their completion.
//!
//! When an SDS fails, [`monitor_tick`](super::monitor_tick) moves each of
//! its copies to a new node (the target) and records a job whose source is
//! the surviving copy, now the PG's primary. The source learns its jobs
//! from its heartbeat reply, copies every chunk of the PG it holds under
//! the same per-chunk ordering lock as client writes, flushes the target,
//! and reports here. Until then the target is a secondary that has missed
//! data: it receives new writes, but it is never promoted to primary.
//!
//! A move job (see [`super::movement`]) copies to the PG's joining node;
//! its completion swaps that node in for the copy that leaves.

use std::collections::HashMap;

use pflex_proto::api::{CopyKind, RebuildAssignment, RebuildComplete, RebuildJob};
use rusqlite::{params, Connection, OptionalExtension};

use crate::error::MdmError;

use super::*;

/// Whether `sds` is the source of unfinished jobs (handing them out in a
/// heartbeat reply writes).
pub(super) fn has_unfinished_jobs(conn: &Connection, sds: u64) -> Result<bool, MdmError> {
    Ok(conn.row(
        "SELECT EXISTS (SELECT 1 FROM rebuild_jobs
                        WHERE source_sds = ?1 AND state IN ('pending', 'running'))",
        [sds],
        |r| r.get(0),
    )?)
}

/// Unfinished jobs whose source is `sds` and whose PG still has that source
/// as primary and that target as secondary; handing them out marks them
/// running. Jobs the placement has moved past are marked failed.
pub(super) fn assignments(
    conn: &Connection,
    ctx: &Ctx,
    sds: u64,
) -> Result<Vec<RebuildAssignment>, MdmError> {
    conn.exec(
        "UPDATE rebuild_jobs SET state = 'failed', updated_at = ?2
         WHERE source_sds = ?1 AND state IN ('pending', 'running') AND NOT EXISTS (
             SELECT 1 FROM placement_groups p WHERE p.volume_id = rebuild_jobs.volume_id
               AND p.pg_index = rebuild_jobs.pg_index
               AND p.primary_sds = rebuild_jobs.source_sds
               AND ((rebuild_jobs.kind != 'move' AND p.secondary_sds = rebuild_jobs.target_sds)
                    OR (rebuild_jobs.kind = 'move' AND p.joining_sds = rebuild_jobs.target_sds)))",
        params![sds, ctx.now],
    )?;
    conn.exec(
        "UPDATE rebuild_jobs SET state = 'running', updated_at = ?2
         WHERE source_sds = ?1 AND state = 'pending'",
        params![sds, ctx.now],
    )?;
    let jobs = conn
        .prepare_cached(
            "SELECT j.id, j.volume_id, j.pg_index, j.target_sds, v.epoch, j.kind, j.failed_sds
             FROM rebuild_jobs j JOIN volumes v ON v.id = j.volume_id
             WHERE j.source_sds = ?1 AND j.state = 'running' ORDER BY j.id",
        )?
        .query_map([sds], |r| {
            Ok(RebuildAssignment {
                job_id: r.get(0)?,
                volume_id: r.get(1)?,
                pg_index: r.get(2)?,
                target_sds: r.get(3)?,
                epoch: r.get(4)?,
                kind: copy_kind(&r.get::<_, String>(5)?),
                replaces: r.get(6)?,
            })
        })?
        .collect::<Result<_, _>>()?;
    Ok(jobs)
}

/// The target of each PG copy still being rebuilt, by (volume, PG index):
/// a node that has missed data and must not serve it alone.
pub(super) fn unfinished_targets(conn: &Connection) -> Result<HashMap<(u64, u64), u64>, MdmError> {
    let targets = conn
        .prepare_cached(
            "SELECT volume_id, pg_index, target_sds FROM rebuild_jobs
             WHERE state IN ('pending', 'running') AND kind != 'move'",
        )?
        .query_map([], |r| Ok(((r.get(0)?, r.get(1)?), r.get(2)?)))?
        .collect::<Result<_, _>>()?;
    Ok(targets)
}

/// `POST /rebuild/complete`, from the job's source SDS only. Refused when
/// the job is finished or the PG no longer has that source and target:
/// the copy may then have gone to a node that is not the secondary.
pub fn rebuild_complete(
    conn: &Connection,
    ctx: &Ctx,
    caller: Caller,
    request: &RebuildComplete,
) -> Result<RebuildJob, MdmError> {
    let Caller::Node { id, .. } = caller else {
        return Err(MdmError::forbidden("only the job's source SDS completes a rebuild"));
    };
    let job = job(conn, request.job_id)?.ok_or_else(|| {
        MdmError::not_found("no_such_job", format!("no rebuild job {}", request.job_id))
    })?;
    if job.source_sds != id {
        return Err(MdmError::forbidden(format!(
            "rebuild job {} belongs to SDS {}, not {id}",
            job.job_id, job.source_sds
        )));
    }
    if job.state != "running" && job.state != "pending" {
        return Err(MdmError::conflict(
            "job_finished",
            format!("rebuild job {} is already {}", job.job_id, job.state),
        ));
    }
    let current: Option<(u64, u64, u64)> = conn
        .query_row(
            "SELECT primary_sds, secondary_sds, joining_sds FROM placement_groups
             WHERE volume_id = ?1 AND pg_index = ?2",
            params![job.volume_id, job.pg_index],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .optional()?;
    let still_placed = match (job.kind, current) {
        (CopyKind::Move, Some((primary, secondary, joining))) => {
            primary == job.source_sds
                && joining == job.target_sds
                && (job.failed_sds == primary || job.failed_sds == secondary)
        }
        (_, Some((primary, secondary, _))) => {
            (primary, secondary) == (job.source_sds, job.target_sds)
        }
        (_, None) => false,
    };
    if !still_placed {
        // (The job itself is marked failed by `assignments` at the source's
        // next heartbeat; an error here rolls back whatever this call wrote.)
        return Err(MdmError::conflict(
            "placement_changed",
            format!(
                "PG {} of volume {} has moved since job {}",
                job.pg_index, job.volume_id, job.job_id
            ),
        ));
    }
    if job.kind == CopyKind::Move {
        // The joining copy is complete: it takes the leaving copy's place
        // (if the primary leaves, the secondary becomes primary), in one
        // epoch change.
        let (primary, secondary, _) = current.expect("checked above");
        let (new_primary, new_secondary) = if job.failed_sds == secondary {
            (primary, job.target_sds)
        } else {
            (secondary, job.target_sds)
        };
        conn.exec(
            "UPDATE placement_groups SET primary_sds = ?3, secondary_sds = ?4, joining_sds = 0
             WHERE volume_id = ?1 AND pg_index = ?2",
            params![job.volume_id, job.pg_index, new_primary, new_secondary],
        )?;
        conn.exec("UPDATE volumes SET epoch = epoch + 1 WHERE id = ?1", [job.volume_id])?;
    }
    conn.exec(
        "UPDATE rebuild_jobs SET state = 'done', chunks_copied = ?2, updated_at = ?3,
                chunks_total = MAX(chunks_total, ?2) WHERE id = ?1",
        params![job.job_id, request.chunks_copied, ctx.now],
    )?;
    Ok(self::job(conn, job.job_id)?.expect("the job was just updated"))
}

/// `GET /rebuild/jobs`: every job, newest first.
pub fn rebuild_jobs(conn: &Connection) -> Result<Vec<RebuildJob>, MdmError> {
    let jobs = conn
        .prepare_cached(&format!("{JOB_COLUMNS} ORDER BY id DESC"))?
        .query_map([], job_row)?
        .collect::<Result<_, _>>()?;
    Ok(jobs)
}

const JOB_COLUMNS: &str =
    "SELECT id, volume_id, pg_index, failed_sds, source_sds, target_sds, state,
        chunks_copied, created_at, updated_at, kind, chunks_total, bytes_copied FROM rebuild_jobs";

fn job(conn: &Connection, job_id: u64) -> Result<Option<RebuildJob>, MdmError> {
    Ok(conn.row(&format!("{JOB_COLUMNS} WHERE id = ?1"), [job_id], job_row).optional()?)
}

fn job_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<RebuildJob> {
    Ok(RebuildJob {
        job_id: r.get(0)?,
        volume_id: r.get(1)?,
        pg_index: r.get(2)?,
        failed_sds: r.get(3)?,
        source_sds: r.get(4)?,
        target_sds: r.get(5)?,
        state: r.get(6)?,
        chunks_copied: r.get(7)?,
        created_at: r.get(8)?,
        updated_at: r.get(9)?,
        kind: copy_kind(&r.get::<_, String>(10)?),
        chunks_total: r.get(11)?,
        bytes_copied: r.get(12)?,
    })
}

fn copy_kind(s: &str) -> CopyKind {
    match s {
        "resync" => CopyKind::Resync,
        "move" => CopyKind::Move,
        _ => CopyKind::Rebuild,
    }
}
