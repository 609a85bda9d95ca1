//! Components joining and reporting: registration, heartbeats, node lists.

use pflex_proto::api::{
    HeartbeatRequest, HeartbeatResponse, NodeType, RegisterRequest, RegisterResponse, SdcInfo,
    SdsInfo, VolumeGeneration,
};
use rusqlite::{params, Connection, OptionalExtension};

use crate::error::MdmError;
use crate::validate;

use super::health::nodes;
use super::*;

fn ensure_protection_domain(conn: &Connection, now: u64) -> Result<u64, MdmError> {
    conn.exec(
        "INSERT OR IGNORE INTO protection_domains (name, created_at) VALUES (?1, ?2)",
        params![DEFAULT_PROTECTION_DOMAIN, now],
    )?;
    Ok(conn.row(
        "SELECT id FROM protection_domains WHERE name = ?1",
        [DEFAULT_PROTECTION_DOMAIN],
        |r| r.get(0),
    )?)
}

fn ensure_pool(conn: &Connection, pd: u64, name: &str, now: u64) -> Result<u64, MdmError> {
    conn.exec(
        "INSERT OR IGNORE INTO storage_pools (protection_domain_id, name, created_at) VALUES (?1, ?2, ?3)",
        params![pd, name, now],
    )?;
    Ok(conn.row("SELECT id FROM storage_pools WHERE name = ?1", [name], |r| r.get(0))?)
}

fn ensure_fault_set(conn: &Connection, pd: u64, name: &str, now: u64) -> Result<u64, MdmError> {
    conn.exec(
        "INSERT OR IGNORE INTO fault_sets (protection_domain_id, name, created_at) VALUES (?1, ?2, ?3)",
        params![pd, name, now],
    )?;
    Ok(conn.row(
        "SELECT id FROM fault_sets WHERE protection_domain_id = ?1 AND name = ?2",
        params![pd, name],
        |r| r.get(0),
    )?)
}

/// `POST /discovery/register`. `join_key` says whether the caller presented
/// the cluster's join key (checked by the HTTP layer); the name's holder, the
/// credential and the enrollment token are checked here ([`enrollment::admit`]),
/// before anything is written.
pub fn register(
    conn: &Connection,
    ctx: &Ctx,
    request: &RegisterRequest,
    join_key: bool,
    source: &str,
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

    let (existing, holder, credential_matches) = enrollment::holder_of(
        conn,
        request.node_type,
        &request.name,
        request.credential.as_deref(),
    )?;
    let enrollment_check = enrollment::check_enrollment(
        conn,
        ctx.now,
        request.enrollment_token.as_deref(),
        request.node_type,
        &request.name,
    )?;
    let proofs = enrollment::Proofs { credential_matches, enrollment: enrollment_check, join_key };
    let admission = enrollment::admit(holder, proofs)?;
    refuse_foreign_data(ctx, request)?;
    let credential = match (admission, &request.credential) {
        (enrollment::Admission::SameNode, Some(kept)) => kept.clone(),
        _ => new_credential(),
    };
    let credential_hash = sha256_hex(&credential);
    let node_type = request.node_type.as_str();
    let node_id = match existing {
        Some(id) => {
            conn.exec(
                "UPDATE cluster_nodes SET host = ?2, control_port = ?3, mgmt_port = ?4, data_port = ?5,
                 credential_sha256 = ?6, last_seen = ?7, legacy = 0 WHERE id = ?1",
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
            conn.exec(
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
    conn.exec(
        "INSERT INTO registration_history (node_id, host, at) VALUES (?1, ?2, ?3)",
        params![node_id, request.host, ctx.now],
    )?;
    let how = match admission {
        enrollment::Admission::SameNode => "credential",
        enrollment::Admission::Enrolled
            if enrollment_check == enrollment::EnrollmentCheck::Valid =>
        {
            let token = request.enrollment_token.as_deref().unwrap_or_default();
            enrollment::consume_enrollment(conn, ctx.now, token, node_id)?;
            "enrollment token"
        }
        enrollment::Admission::Enrolled => "join key",
    };
    if admission == enrollment::Admission::Enrolled {
        let target = format!("{node_type} {}", request.name);
        enrollment::audit(conn, ctx.now, &target, "node.enroll", &target, source, "ok", how)?;
    }
    conn.exec(
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
            conn.exec(
                "INSERT INTO sds_nodes (node_id, fault_set_id, pool_id, capacity_bytes, used_bytes)
                 VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT (node_id) DO UPDATE SET fault_set_id = excluded.fault_set_id,
                 pool_id = excluded.pool_id, capacity_bytes = excluded.capacity_bytes,
                 used_bytes = excluded.used_bytes, removed_at = 0",
                params![node_id, fault_set_id, pool_id, capacity, used],
            )?;
            conn.exec("DELETE FROM sds_devices WHERE sds_id = ?1", [node_id])?;
            for device in &request.devices {
                conn.exec(
                    "INSERT INTO sds_devices (sds_id, path, capacity_bytes, used_bytes) VALUES (?1, ?2, ?3, ?4)",
                    params![node_id, device.path, device.capacity_bytes, device.used_bytes],
                )?;
            }
        }
        NodeType::Sdc => {
            conn.exec("INSERT OR IGNORE INTO sdc_clients (node_id) VALUES (?1)", [node_id])?;
        }
        NodeType::Mgmt => {}
    }

    Ok(RegisterResponse {
        status: "registered".to_string(),
        node_id,
        credential,
        sds_keys: is_sds.then(|| ctx.keys.sds_keys(node_id)),
        heartbeat_interval_secs: ctx.settings.heartbeat_interval_secs,
        cluster_id: ctx.keys.cluster_id(),
        secret_id: ctx.keys.secret_id().to_string(),
    })
}

/// An SDS whose store holds chunks of another cluster is refused: volume
/// numbers and epochs are unique only within one cluster, so this cluster's
/// volume 1 would read the other's volume 1 wherever it has not written.
/// (The node decides what to do: keep its data and wait for its own MDM, or
/// erase it and join; see the SDS's `--erase-foreign-data`.)
fn refuse_foreign_data(ctx: &Ctx, request: &RegisterRequest) -> Result<(), MdmError> {
    let Some(theirs) = request.data_cluster_id.as_deref() else { return Ok(()) };
    let ours = ctx.keys.cluster_id();
    if theirs == ours {
        return Ok(());
    }
    let theirs: String = theirs.chars().take(64).collect();
    Err(MdmError::conflict(
        "foreign_cluster_data",
        format!(
            "this node's store holds data of cluster {theirs}, this MDM is cluster {ours}: \
             point it at its own MDM, or restart it with --erase-foreign-data to erase that \
             data and join this cluster"
        ),
    ))
}

fn holds_copies(conn: &Connection, sds_id: u64) -> Result<bool, MdmError> {
    Ok(conn.row(
        "SELECT EXISTS (SELECT 1 FROM placement_groups
                        WHERE primary_sds = ?1 OR secondary_sds = ?1 OR joining_sds = ?1)",
        [sds_id],
        |r| r.get(0),
    )?)
}

/// The caller of a heartbeat, checked against the request.
fn heartbeat_caller(
    caller: Caller,
    request: &HeartbeatRequest,
) -> Result<(u64, NodeType), MdmError> {
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
    Ok((id, node_type))
}

/// `POST /health/heartbeat`, answered on a reader connection: the reply,
/// and whether the sighting must also be written ([`record_sighting`],
/// queued behind the answer; see [`crate::sightings::must_write`]). The
/// sighting is kept in memory either way. `None` when the node is an SDS
/// with rebuild jobs to be handed out, which writes: [`heartbeat`] then
/// answers on the writer.
pub fn heartbeat_on_reader(
    conn: &Connection,
    ctx: &Ctx,
    caller: Caller,
    request: &HeartbeatRequest,
) -> Result<Option<(HeartbeatResponse, bool)>, MdmError> {
    let (id, node_type) = heartbeat_caller(caller, request)?;
    let durable = conn
        .row(
            "SELECT n.last_seen, n.failed_at, COALESCE(s.capacity_bytes, 0), COALESCE(s.used_bytes, 0)
             FROM cluster_nodes n LEFT JOIN sds_nodes s ON s.node_id = n.id WHERE n.id = ?1",
            [id],
            |r| {
                Ok(crate::sightings::DurableSighting {
                    last_seen: r.get(0)?,
                    failed_at: r.get(1)?,
                    capacity_bytes: r.get(2)?,
                    used_bytes: r.get(3)?,
                })
            },
        )
        .optional()?;
    let Some(durable) = durable else { return Ok(None) };
    let reported = crate::sightings::Reported {
        is_sds: node_type == NodeType::Sds,
        capacity_bytes: request.metrics.capacity_bytes,
        used_bytes: request.metrics.used_bytes,
    };
    if reported.is_sds && super::rebuild::has_unfinished_jobs(conn, id)? {
        return Ok(None);
    }
    let every = crate::sightings::persist_after(&ctx.settings, id);
    let write = crate::sightings::must_write(&durable, &reported, ctx.now, every);
    ctx.sightings.record(id, ctx.now);
    let reply = heartbeat_reply(conn, ctx, id, node_type, request, Rebuilds::NoneUnfinished)?;
    Ok(Some((reply, write)))
}

/// Writes a heartbeat's sighting, metrics and beat counts (with the beats
/// answered since the last write): behind an answer given on a reader.
pub fn record_sighting(
    conn: &Connection,
    ctx: &Ctx,
    caller: Caller,
    request: &HeartbeatRequest,
) -> Result<(), MdmError> {
    let (id, node_type) = heartbeat_caller(caller, request)?;
    let beats = ctx.sightings.take_unwritten(id, ctx.now);
    write_sighting(conn, ctx, id, node_type, request, beats)
}

/// `POST /health/heartbeat` on the writer (an SDS with rebuild jobs to be
/// handed out): the sighting is written, then the reply hands them out.
pub fn heartbeat(
    conn: &Connection,
    ctx: &Ctx,
    caller: Caller,
    request: &HeartbeatRequest,
) -> Result<HeartbeatResponse, MdmError> {
    let (id, node_type) = heartbeat_caller(caller, request)?;
    let beats = 1 + ctx.sightings.take_unwritten(id, ctx.now);
    write_sighting(conn, ctx, id, node_type, request, beats)?;
    heartbeat_reply(conn, ctx, id, node_type, request, Rebuilds::HandOut)
}

fn write_sighting(
    conn: &Connection,
    ctx: &Ctx,
    id: u64,
    node_type: NodeType,
    request: &HeartbeatRequest,
    beats: u64,
) -> Result<(), MdmError> {
    let m = &request.metrics;
    conn.exec("UPDATE cluster_nodes SET last_seen = ?2 WHERE id = ?1", params![id, ctx.now])?;
    conn.exec(
        "UPDATE component_health SET capacity_bytes = ?2, used_bytes = ?3, read_ops = ?4, write_ops = ?5,
         read_bytes = ?6, write_bytes = ?7, errors = ?8, heartbeats = heartbeats + ?10, updated_at = ?9
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
            ctx.now,
            beats
        ],
    )?;
    if node_type == NodeType::Sds && m.capacity_bytes > 0 {
        conn.exec(
            "UPDATE sds_nodes SET capacity_bytes = ?2, used_bytes = ?3 WHERE node_id = ?1",
            params![id, m.capacity_bytes, m.used_bytes],
        )?;
    }
    // Beats are counted in the minute they are written.
    conn.prepare_cached(
        "INSERT INTO heartbeat_log (node_id, minute, beats) VALUES (?1, ?2, ?3)
         ON CONFLICT (node_id, minute) DO UPDATE SET beats = beats + excluded.beats",
    )?
    .execute(params![id, ctx.now / 60, beats])?;
    Ok(())
}

/// Whether a heartbeat reply hands out rebuild jobs (which writes).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Rebuilds {
    HandOut,
    /// The node is the source of none (checked on the same snapshot).
    NoneUnfinished,
}

/// What a heartbeat is answered: volume changes, and for an SDS its rebuild
/// assignments, the movement policy and the token public keys.
fn heartbeat_reply(
    conn: &Connection,
    ctx: &Ctx,
    id: u64,
    node_type: NodeType,
    request: &HeartbeatRequest,
    rebuilds: Rebuilds,
) -> Result<HeartbeatResponse, MdmError> {
    // An SDC hears only of the volumes mapped to it: the others are none of
    // its business, and there are far more SDCs than SDS nodes.
    let only_mapped_to = (node_type == NodeType::Sdc).then_some(id);
    let changes = volume_changes(conn, request.volumes_since, only_mapped_to)?;
    if super::movement::is_removed(conn, id, node_type)? {
        // Drained and removed: the node is told so and stops.
        return Ok(HeartbeatResponse {
            status: "removed".to_string(),
            volumes: changes.volumes,
            volumes_complete: changes.complete,
            deleted_volumes: changes.deleted,
            volumes_cursor: changes.cursor,
            volumes_more: changes.more,
            rebuilds: Vec::new(),
            movement: Default::default(),
            token_public_keys: Vec::new(),
            secret_id: String::new(),
            mdm_term: 0,
        });
    }
    let is_sds = node_type == NodeType::Sds;
    let (rebuilds, movement, token_public_keys) = if is_sds {
        (
            match rebuilds {
                Rebuilds::HandOut => super::rebuild::assignments(conn, ctx, id)?,
                Rebuilds::NoneUnfinished => Vec::new(),
            },
            super::movement::movement_policy(conn)?,
            ctx.keys.token_public_keys(),
        )
    } else {
        (Vec::new(), Default::default(), Vec::new())
    };
    Ok(HeartbeatResponse {
        status: "ok".to_string(),
        volumes: changes.volumes,
        volumes_complete: changes.complete,
        deleted_volumes: changes.deleted,
        volumes_cursor: changes.cursor,
        volumes_more: changes.more,
        rebuilds,
        movement,
        token_public_keys,
        secret_id: if is_sds { ctx.keys.secret_id().to_string() } else { String::new() },
        mdm_term: 0,
    })
}

/// What a heartbeat reply says about volumes.
struct VolumeChanges {
    volumes: Vec<VolumeGeneration>,
    complete: bool,
    deleted: Vec<u64>,
    cursor: u64,
    /// Changes after `cursor` were left for the next replies.
    more: bool,
}

/// Most changes (changed volumes and deletions together) one SDS heartbeat
/// reply carries; the cursor then stops at the last one listed, and the
/// node's next heartbeats carry the rest. Without a bound, a burst (many
/// volumes mapped, or a failed node's volumes re-placed) is sent to every
/// SDS within one heartbeat interval: nodes times changes, all at once.
/// A node learns late, never wrongly: an IO with a newer epoch than its map
/// makes it fetch the map. What waits longer during a burst is a node's
/// refusal of tokens from before an unmap (one more heartbeat per
/// `CHANGES_PER_REPLY` changes ahead of it).
pub const CHANGES_PER_REPLY: usize = 256;

/// Every volume when `since` is `None` (or from another history: a cursor
/// beyond this database's), else the volumes whose generations changed and
/// those deleted after `since`: what changed, not what exists. With
/// `only_mapped_to`, only volumes mapped to that SDC (a mapped volume
/// cannot be deleted, so no deletions); without, at most
/// [`CHANGES_PER_REPLY`] changes, the oldest first.
///
/// A volume created since and never changed (epoch and mapping generation
/// both still the 1 it is created with) is left out: a node learns nothing
/// from it. Nobody has mapped it, so no token names it; a node counts a
/// volume it has not heard of as generation 0, and fetches its map at its
/// first IO. Listing them made every SDS heartbeat during bulk creates
/// carry every volume created since the node's previous one.
fn volume_changes(
    conn: &Connection,
    since: Option<u64>,
    only_mapped_to: Option<u64>,
) -> Result<VolumeChanges, MdmError> {
    let cursor: u64 = conn.row("SELECT value FROM change_seq", [], |r| r.get(0))?;
    let generation = |r: &rusqlite::Row| {
        Ok(VolumeGeneration { volume_id: r.get(0)?, epoch: r.get(1)?, mapping_gen: r.get(2)? })
    };
    let (since, complete) = match since {
        Some(since) if since <= cursor => (since, false),
        _ => (0, true),
    };
    match only_mapped_to {
        Some(sdc) => {
            let volumes = conn
                .prepare_cached(
                    "SELECT v.id, v.epoch, v.mapping_gen FROM volume_mappings m
                     JOIN volumes v ON v.id = m.volume_id
                     WHERE m.sdc_id = ?1 AND (?2 OR v.changed_seq > ?3) ORDER BY v.id",
                )?
                .query_map(params![sdc, complete, since], generation)?
                .collect::<Result<_, _>>()?;
            Ok(VolumeChanges { volumes, complete, deleted: Vec::new(), cursor, more: false })
        }
        None if complete => {
            let volumes = conn
                .prepare_cached("SELECT id, epoch, mapping_gen FROM volumes ORDER BY id")?
                .query_map([], generation)?
                .collect::<Result<_, _>>()?;
            Ok(VolumeChanges { volumes, complete, deleted: Vec::new(), cursor, more: false })
        }
        None => changes_since(conn, since, cursor),
    }
}

/// The changes after `since` for an SDS, oldest first, at most
/// [`CHANGES_PER_REPLY`] of them (see [`volume_changes`]); `latest` is the
/// cursor when they all fit.
fn changes_since(conn: &Connection, since: u64, latest: u64) -> Result<VolumeChanges, MdmError> {
    // One more than fits of each kind tells whether the rest is cut off.
    let limit = CHANGES_PER_REPLY as u64 + 1;
    let changed: Vec<(u64, VolumeGeneration)> = conn
        .prepare_cached(
            "SELECT changed_seq, id, epoch, mapping_gen FROM volumes
             INDEXED BY volumes_changed_since_created
             WHERE changed_seq > ?1 AND (epoch > 1 OR mapping_gen > 1)
             ORDER BY changed_seq LIMIT ?2",
        )?
        .query_map(params![since, limit], |r| {
            Ok((
                r.get(0)?,
                VolumeGeneration { volume_id: r.get(1)?, epoch: r.get(2)?, mapping_gen: r.get(3)? },
            ))
        })?
        .collect::<Result<_, _>>()?;
    let deleted: Vec<(u64, u64)> = conn
        .prepare_cached(
            "SELECT deleted_seq, id FROM deleted_volumes WHERE deleted_seq > ?1
             ORDER BY deleted_seq LIMIT ?2",
        )?
        .query_map(params![since, limit], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<Result<_, _>>()?;
    // Every change has a sequence number of its own (one per row, from
    // `change_seq`), so the cut falls between two changes.
    let cut = cut_after(changed.iter().map(|c| c.0), deleted.iter().map(|d| d.0));
    let keep = |seq: u64| cut.is_none_or(|last| seq <= last);
    Ok(VolumeChanges {
        volumes: changed.into_iter().filter(|c| keep(c.0)).map(|c| c.1).collect(),
        complete: false,
        deleted: deleted.into_iter().filter(|d| keep(d.0)).map(|d| d.1).collect(),
        cursor: cut.unwrap_or(latest),
        more: cut.is_some(),
    })
}

/// Given the sequence numbers of two ascending lists of changes, the last
/// one a reply may carry when together they hold more than
/// [`CHANGES_PER_REPLY`]; `None` when they all fit.
fn cut_after(
    changed: impl Iterator<Item = u64>,
    deleted: impl Iterator<Item = u64>,
) -> Option<u64> {
    let mut all: Vec<u64> = changed.chain(deleted).collect();
    if all.len() <= CHANGES_PER_REPLY {
        return None;
    }
    all.sort_unstable();
    Some(all[CHANGES_PER_REPLY - 1])
}

/// `GET /sds/list`.
pub fn sds_list(conn: &Connection, ctx: &Ctx) -> Result<Vec<SdsInfo>, MdmError> {
    Ok(conn
        .prepare_cached(
            "SELECT n.id, n.name, n.host, n.data_port, n.control_port, n.mgmt_port, f.name, p.name,
                    s.capacity_bytes, s.used_bytes, n.last_seen, n.failed_at, s.draining
             FROM sds_nodes s JOIN cluster_nodes n ON n.id = s.node_id
             JOIN fault_sets f ON f.id = s.fault_set_id JOIN storage_pools p ON p.id = s.pool_id
             WHERE s.removed_at = 0 ORDER BY n.id",
        )?
        .query_map([], |r| {
            let (last_seen, failed_at): (u64, u64) = (r.get(10)?, r.get(11)?);
            let last_seen = ctx.last_seen(r.get(0)?, last_seen);
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
                status: liveness(&ctx.settings, last_seen, failed_at, ctx.now).to_string(),
                last_seen,
                draining: r.get(12)?,
            })
        })?
        .collect::<Result<_, _>>()?)
}

/// `GET /sdc/list`.
pub fn sdc_list(conn: &Connection, ctx: &Ctx) -> Result<Vec<SdcInfo>, MdmError> {
    let rows = nodes(conn, ctx, Some(NodeType::Sdc))?;
    rows.into_iter()
        .map(|n| {
            let mapped_volumes: u64 =
                conn.row("SELECT COUNT(*) FROM volume_mappings WHERE sdc_id = ?1", [n.id], |r| {
                    r.get(0)
                })?;
            Ok(SdcInfo {
                id: n.id,
                status: liveness(&ctx.settings, n.last_seen, n.failed_at, ctx.now).to_string(),
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

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use pflex_proto::api::VolumeCreate;

    use super::*;
    use crate::service::candidates::CandidateCache;
    use crate::service::test_support;

    /// After a burst of changes an SDS hears of them in replies of at most
    /// [`CHANGES_PER_REPLY`], oldest first, and ends up knowing every
    /// change and deletion exactly as the database holds them.
    #[test]
    fn an_sds_catches_up_on_a_burst_in_bounded_replies() {
        let mut conn = crate::db::open_in_memory().unwrap();
        let (keys, settings) = (test_support::keys(), test_support::settings());
        let (sightings, candidates) =
            (crate::sightings::Sightings::default(), CandidateCache::default());
        let now = pflex_proto::unix_now();
        let ctx =
            Ctx { settings, keys: &keys, sightings: &sightings, candidates: &candidates, now };
        let tx = conn.transaction().unwrap();
        let conn: &Connection = &tx;
        for i in 0..2 {
            register(conn, &ctx, &test_support::sds_request(i), true, "test").unwrap();
        }
        for i in 0..400 {
            let request = VolumeCreate {
                name: format!("v{i}"),
                size_bytes: 1 << 30,
                pool: None,
                thick: false,
            };
            super::super::volume_create(conn, &ctx, &request).unwrap();
        }
        let before: u64 = conn.row("SELECT value FROM change_seq", [], |r| r.get(0)).unwrap();
        // 300 volumes change, 50 unchanged ones are deleted, then 10 of the
        // changed ones change again (their earlier change is superseded).
        conn.exec("UPDATE volumes SET epoch = epoch + 1 WHERE id % 4 != 0", []).unwrap();
        let doomed: Vec<u64> = conn
            .prepare("SELECT id FROM volumes WHERE id % 4 = 0 ORDER BY id LIMIT 50")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        for id in &doomed {
            super::super::volume_delete(conn, &id.to_string()).unwrap();
        }
        conn.exec("UPDATE volumes SET mapping_gen = mapping_gen + 1 WHERE id % 40 = 1", [])
            .unwrap();
        let latest: u64 = conn.row("SELECT value FROM change_seq", [], |r| r.get(0)).unwrap();

        let (mut known, mut deleted, mut replies) = (BTreeMap::new(), BTreeSet::new(), Vec::new());
        let mut cursor = before;
        while cursor != latest {
            assert!(replies.len() < 10, "no end to the catch-up: {replies:?}");
            let changes = volume_changes(conn, Some(cursor), None).unwrap();
            assert!(!changes.complete);
            assert!(changes.cursor > cursor, "the cursor moves on");
            assert_eq!(changes.more, changes.cursor != latest);
            replies.push(changes.volumes.len() + changes.deleted.len());
            for v in changes.volumes {
                known.insert(v.volume_id, (v.epoch, v.mapping_gen));
            }
            deleted.extend(changes.deleted);
            cursor = changes.cursor;
        }
        assert_eq!(replies[0], CHANGES_PER_REPLY, "the first reply is full: {replies:?}");
        assert!(replies.iter().all(|&n| n <= CHANGES_PER_REPLY), "{replies:?}");
        let expected: BTreeMap<u64, (u64, u64)> = conn
            .prepare("SELECT id, epoch, mapping_gen FROM volumes WHERE id % 4 != 0")
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, (r.get(1)?, r.get(2)?))))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(known, expected);
        assert_eq!(deleted, doomed.into_iter().collect::<BTreeSet<u64>>());
        // Caught up: nothing more, at the latest cursor.
        let quiet = volume_changes(conn, Some(latest), None).unwrap();
        assert!(quiet.volumes.is_empty() && quiet.deleted.is_empty());
        assert_eq!(quiet.cursor, latest);
    }

    /// The cut falls after the [`CHANGES_PER_REPLY`]-th change of the two
    /// lists together, whichever list it is in.
    #[test]
    fn the_cut_counts_both_kinds_of_change() {
        let n = CHANGES_PER_REPLY as u64;
        assert_eq!(cut_after(1..=n, std::iter::empty()), None);
        assert_eq!(cut_after(1..=n + 1, std::iter::empty()), Some(n));
        let odd = (0..=n).map(|i| 2 * i + 1);
        let even = (1..=n).map(|i| 2 * i);
        assert_eq!(cut_after(odd, even), Some(n));
        assert_eq!(cut_after(std::iter::empty(), 10..=10 + n), Some(9 + n));
    }
}
