//! Volumes: create, resize, rename, delete, map, unmap, placement maps.

use std::collections::HashMap;

use pflex_proto::api::{
    MappedVolume, Mapping, NodeType, Volume, VolumeCreate, VolumeMap, VolumeUnmap,
};
use pflex_proto::placement::{PlacementGroup, PlacementMap, SdsEndpoint, PGS_PER_VOLUME};
use pflex_proto::token::AccessMode;
use pflex_proto::CHUNK_SIZE;
use rusqlite::{params, Connection, OptionalExtension};

use crate::error::MdmError;
use crate::placement::{self, Candidate, PlacementError};
use crate::validate;

use super::*;

pub(super) use super::candidates::candidates;

pub(super) struct VolumeRow {
    pub(super) id: u64,
    pub(super) name: String,
    pub(super) pool_id: u64,
    pub(super) pool: String,
    pub(super) size_bytes: u64,
    pub(super) thick: bool,
    pub(super) epoch: u64,
    pub(super) mapping_gen: u64,
    pub(super) created_at: u64,
}

pub(super) const VOLUME_COLUMNS: &str =
    "v.id, v.name, v.pool_id, p.name, v.size_bytes, v.thick, v.epoch, v.mapping_gen, v.created_at
     FROM volumes v JOIN storage_pools p ON p.id = v.pool_id";

pub(super) fn volume_row(r: &rusqlite::Row) -> rusqlite::Result<VolumeRow> {
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
pub(super) fn find_volume(conn: &Connection, name_or_id: &str) -> Result<VolumeRow, MdmError> {
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
    if let Some(name) = deleted_volume(conn, name_or_id)? {
        return Err(MdmError::not_found(
            "volume_deleted",
            format!("volume {name_or_id} ({name:?}) was deleted"),
        ));
    }
    Err(MdmError::not_found(
        "volume_not_found",
        format!("no volume named or numbered {name_or_id:?}"),
    ))
}

/// The name a deleted volume had, if `id` is the number of one.
fn deleted_volume(conn: &Connection, id: &str) -> Result<Option<String>, MdmError> {
    let Ok(id) = id.parse::<i64>() else { return Ok(None) };
    Ok(conn
        .query_row("SELECT name FROM deleted_volumes WHERE id = ?1", [id], |r| r.get(0))
        .optional()?)
}

fn volume_json(conn: &Connection, row: VolumeRow) -> Result<Volume, MdmError> {
    let mappings = conn
        .prepare_cached(
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
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(super) struct NodeUsage {
    pub(super) placed: u64,
    pub(super) placed_primary: u64,
    pub(super) reserved: u64,
}

/// Per-node sums of the PGs of a pool, kept by triggers in `sds_load`: one
/// row per node, however many volumes there are.
pub(super) fn pool_usage(
    conn: &Connection,
    pool_id: u64,
) -> Result<HashMap<u64, NodeUsage>, MdmError> {
    Ok(conn
        .prepare_cached(
            "SELECT l.node_id, l.placed, l.placed_primary, l.reserved FROM sds_load l
             JOIN sds_nodes s ON s.node_id = l.node_id WHERE s.pool_id = ?1",
        )?
        .query_map([pool_id], |r| {
            Ok((
                r.get(0)?,
                NodeUsage { placed: r.get(1)?, placed_primary: r.get(2)?, reserved: r.get(3)? },
            ))
        })?
        .collect::<Result<_, _>>()?)
}

/// The same sums computed from every PG: what the triggers must agree with.
#[cfg(test)]
pub(super) fn pool_usage_by_scan(
    conn: &Connection,
    pool_id: u64,
) -> Result<HashMap<u64, NodeUsage>, MdmError> {
    let mut usage: HashMap<u64, NodeUsage> = HashMap::new();
    let mut stmt = conn.prepare_cached(
        "SELECT v.size_bytes, v.thick, p.pg_index, p.primary_sds, p.secondary_sds,
                (SELECT COUNT(*) FROM placement_groups q WHERE q.volume_id = v.id), p.joining_sds
         FROM placement_groups p JOIN volumes v ON v.id = p.volume_id WHERE v.pool_id = ?1",
    )?;
    let mut rows = stmt.query([pool_id])?;
    while let Some(r) = rows.next()? {
        let (size, thick, index, primary, secondary, count): (u64, bool, u64, u64, u64, u64) =
            (r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?);
        let joining: u64 = r.get(6)?;
        let bytes = placement::pg_chunk_count(size.div_ceil(CHUNK_SIZE), count, index) * CHUNK_SIZE;
        let copies = [(primary, true), (secondary, false), (joining, false)];
        for (node, is_primary) in copies.into_iter().filter(|&(node, _)| node != 0) {
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
    let taken: bool =
        conn.row("SELECT EXISTS (SELECT 1 FROM volumes WHERE name = ?1)", [&request.name], |r| {
            r.get(0)
        })?;
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
    conn.exec(
        "INSERT INTO volumes (name, pool_id, size_bytes, thick, epoch, mapping_gen, created_at)
         VALUES (?1, ?2, ?3, ?4, 1, 1, ?5)",
        params![request.name, pool_id, request.size_bytes, request.thick, ctx.now],
    )?;
    let volume_id = conn.last_insert_rowid() as u64;
    let mut insert = conn.prepare_cached(
        "INSERT INTO placement_groups (volume_id, pg_index, primary_sds, secondary_sds, bytes, thick)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )?;
    let chunks = request.size_bytes.div_ceil(CHUNK_SIZE);
    let count = pgs.len() as u64;
    for (index, pg) in pgs.iter().enumerate() {
        let bytes = placement::pg_chunk_count(chunks, count, index as u64) * CHUNK_SIZE;
        insert.execute(params![
            volume_id,
            index as u64,
            pg.primary,
            pg.secondary,
            bytes,
            request.thick
        ])?;
    }
    volume_json(conn, find_volume(conn, &request.name)?)
}

/// Volumes one page of `GET /vol/list` carries when the request says not.
pub const VOLUME_PAGE_DEFAULT: u64 = 1000;
/// Most volumes one page may carry.
pub const VOLUME_PAGE_MAX: u64 = 10_000;

/// `GET /vol/list?after=ID&limit=N`: up to `limit` volumes with ids above
/// `after`, in id order, and the `after` of the next page when there is one.
pub fn volume_list(
    conn: &Connection,
    after: u64,
    limit: u64,
) -> Result<(Vec<Volume>, Option<u64>), MdmError> {
    if limit == 0 || limit > VOLUME_PAGE_MAX {
        return Err(MdmError::bad_request(format!(
            "limit must be 1..={VOLUME_PAGE_MAX} (asked {limit})"
        )));
    }
    let after = after.min(i64::MAX as u64);
    let mut rows: Vec<VolumeRow> = conn
        .prepare_cached(&format!("SELECT {VOLUME_COLUMNS} WHERE v.id > ?1 ORDER BY v.id LIMIT ?2"))?
        .query_map(params![after, limit + 1], volume_row)?
        .collect::<Result<_, _>>()?;
    let next = (rows.len() as u64 > limit).then(|| {
        rows.truncate(limit as usize);
        rows.last().map_or(after, |r| r.id)
    });
    let volumes = rows.into_iter().map(|row| volume_json(conn, row)).collect::<Result<_, _>>()?;
    Ok((volumes, next))
}

/// `GET /vol/{name-or-id}`.
pub fn volume_show(conn: &Connection, name_or_id: &str) -> Result<Volume, MdmError> {
    volume_json(conn, find_volume(conn, name_or_id)?)
}

fn volume_pgs(conn: &Connection, volume_id: u64) -> Result<Vec<PlacementGroup>, MdmError> {
    Ok(conn
        .prepare_cached(
            "SELECT primary_sds, secondary_sds, absent_sds, joining_sds FROM placement_groups
             WHERE volume_id = ?1 ORDER BY pg_index",
        )?
        .query_map([volume_id], |r| {
            // A degraded PG keeps its absent copy in `secondary_sds` (a
            // foreign key); the map shows it as absent, with no secondary.
            let (primary, secondary, absent): (u64, u64, u64) = (r.get(0)?, r.get(1)?, r.get(2)?);
            let joining = r.get(3)?;
            Ok(if absent != 0 {
                PlacementGroup { primary, secondary: 0, absent, joining }
            } else {
                PlacementGroup { primary, secondary, absent: 0, joining }
            })
        })?
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
    conn.exec(
        "UPDATE volumes SET size_bytes = ?2, epoch = epoch + 1 WHERE id = ?1",
        params![row.id, size_bytes],
    )?;
    let count: u64 =
        conn.row("SELECT COUNT(*) FROM placement_groups WHERE volume_id = ?1", [row.id], |r| {
            r.get(0)
        })?;
    let chunks = size_bytes.div_ceil(CHUNK_SIZE);
    let mut update = conn.prepare_cached(
        "UPDATE placement_groups SET bytes = ?3 WHERE volume_id = ?1 AND pg_index = ?2",
    )?;
    for index in 0..count {
        let bytes = placement::pg_chunk_count(chunks, count, index) * CHUNK_SIZE;
        update.execute(params![row.id, index, bytes])?;
    }
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
        conn.row("SELECT EXISTS (SELECT 1 FROM volumes WHERE name = ?1)", [new_name], |r| {
            r.get(0)
        })?;
    if taken {
        return Err(MdmError::conflict(
            "volume_exists",
            format!("a volume named {new_name:?} already exists"),
        ));
    }
    conn.exec("UPDATE volumes SET name = ?2 WHERE id = ?1", params![row.id, new_name])?;
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
    conn.exec("DELETE FROM placement_groups WHERE volume_id = ?1", [volume.id])?;
    conn.exec("DELETE FROM snapshots WHERE volume_id = ?1", [volume.id])?;
    conn.exec("DELETE FROM rebuild_jobs WHERE volume_id = ?1", [volume.id])?;
    conn.exec("DELETE FROM volumes WHERE id = ?1", [volume.id])?;
    conn.exec(
        "INSERT INTO deleted_volumes (id, name, deleted_at) VALUES (?1, ?2, strftime('%s','now'))",
        params![volume.id, volume.name],
    )?;
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
    conn.exec(
        "INSERT INTO volume_mappings (volume_id, sdc_id, access_mode, mapped_at) VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT (volume_id, sdc_id) DO UPDATE SET access_mode = excluded.access_mode, mapped_at = excluded.mapped_at",
        params![row.id, sdc_id, mode, ctx.now],
    )?;
    conn.exec("UPDATE volumes SET mapping_gen = mapping_gen + 1 WHERE id = ?1", [row.id])?;
    volume_json(conn, find_volume(conn, &row.name)?)
}

/// `POST /vol/unmap`: bumps the mapping generation, revoking every token.
pub fn volume_unmap(conn: &Connection, request: &VolumeUnmap) -> Result<Volume, MdmError> {
    let row = find_volume(conn, &request.volume)?;
    let (sdc_id, sdc_name) = find_sdc(conn, &request.sdc)?;
    let removed = conn.exec(
        "DELETE FROM volume_mappings WHERE volume_id = ?1 AND sdc_id = ?2",
        params![row.id, sdc_id],
    )?;
    if removed == 0 {
        return Err(MdmError::not_found(
            "not_mapped",
            format!("volume {:?} is not mapped to SDC {sdc_name:?}", row.name),
        ));
    }
    conn.exec("UPDATE volumes SET mapping_gen = mapping_gen + 1 WHERE id = ?1", [row.id])?;
    volume_json(conn, find_volume(conn, &row.name)?)
}

pub(super) fn mapping_of(
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
        .prepare_cached(
            "SELECT n.id, n.name, n.host, n.data_port, f.name FROM cluster_nodes n
             JOIN sds_nodes s ON s.node_id = n.id JOIN fault_sets f ON f.id = s.fault_set_id
             WHERE n.id IN (SELECT primary_sds FROM placement_groups WHERE volume_id = ?1
                            UNION SELECT secondary_sds FROM placement_groups WHERE volume_id = ?1
                            UNION SELECT joining_sds FROM placement_groups WHERE volume_id = ?1)
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
        .prepare_cached(
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::service::test_support;

    /// The per-node sums the triggers keep in `sds_load` equal the sums of
    /// every PG after each kind of change a PG goes through.
    #[test]
    fn load_kept_by_triggers_matches_a_full_count() {
        let mut conn = crate::db::open_in_memory().unwrap();
        let keys = test_support::keys();
        let settings = test_support::settings();
        let sightings = crate::sightings::Sightings::default();
        let candidates = CandidateCache::default();
        let ctx = Ctx {
            settings,
            keys: &keys,
            sightings: &sightings,
            candidates: &candidates,
            now: 1_900_000_000,
        };
        let tx = conn.transaction().unwrap();
        let conn: &Connection = &tx;
        let mut sds = Vec::new();
        for i in 0..5 {
            let request = test_support::sds_request(i);
            sds.push(super::super::register(conn, &ctx, &request, true, "test").unwrap().node_id);
        }
        let same = |step: &str| {
            let kept = pool_usage(conn, 1).unwrap();
            let counted = pool_usage_by_scan(conn, 1).unwrap();
            for node in &sds {
                let kept = kept.get(node).copied().unwrap_or_default();
                let counted = counted.get(node).copied().unwrap_or_default();
                assert_eq!(kept, counted, "after {step}, SDS {node}");
            }
        };
        for (i, (size, thick)) in
            [(1u64 << 30, false), (3 << 30, true), (5 * CHUNK_SIZE + 512, true)].iter().enumerate()
        {
            let request = VolumeCreate {
                name: format!("v{i}"),
                size_bytes: *size,
                pool: None,
                thick: *thick,
            };
            volume_create(conn, &ctx, &request).unwrap();
        }
        same("creates");
        volume_resize(conn, &ctx, "v1", 7 << 30).unwrap();
        volume_resize(conn, &ctx, "v2", 300 * CHUNK_SIZE).unwrap();
        same("resizes");
        // A move under way, then a degraded PG (what the monitor pass does).
        conn.execute(
            "UPDATE placement_groups SET joining_sds = ?1 WHERE volume_id = 2 AND pg_index = 3
               AND primary_sds != ?1 AND secondary_sds != ?1",
            [sds[4]],
        )
        .unwrap();
        same("a move");
        conn.execute(
            "UPDATE placement_groups SET primary_sds = secondary_sds, secondary_sds = primary_sds,
                    absent_sds = primary_sds, joining_sds = 0 WHERE volume_id = 2 AND pg_index < 10",
            [],
        )
        .unwrap();
        same("degraded PGs");
        volume_delete(conn, "v1").unwrap();
        volume_delete(conn, "v0").unwrap();
        same("deletes");
        let left: u64 =
            conn.query_row("SELECT SUM(placed) FROM sds_load", [], |r| r.get(0)).unwrap();
        assert_eq!(left, 2 * 300 * CHUNK_SIZE, "only v2's two copies are left");
    }
}
