//! Source side of a rebuild: copy one PG's chunks to its new secondary.
//!
//! The MDM hands a job to the PG's primary (the surviving copy) in its
//! heartbeat reply. The primary copies each chunk it holds as a full-chunk
//! replica write, under the same per-chunk ordering lock client writes take,
//! so a client write lands on the target either before the copy (and is
//! overwritten by a copy that contains it) or after it (and is forwarded as
//! usual). Chunks the target holds but the source does not are released on
//! the target. Then the target is flushed and the job reported complete;
//! until then the MDM never makes the target the only copy.
//!
//! A resync job (the target's copy was out of the set for a while and came
//! back) copies only the chunks in this node's dirty log for the PG, the
//! ones written meanwhile (see [`super::dirty`]), each taken out of the log
//! once the target has it.
//!
//! A failed attempt is retried when the next heartbeat hands the job out
//! again; copying a chunk twice is harmless.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures_util::{StreamExt, TryStreamExt};
use pflex_dataplane::{ClientError, Reply};
use pflex_proto::api::{CopyKind, RebuildAssignment, RebuildComplete, RebuildProgress};
use pflex_proto::frame::{flags, FrameHeader, Op, Status, MAX_ALLOCATION_CHUNKS};
use pflex_proto::placement::PlacementMap;
use pflex_proto::CHUNK_SIZE;

use super::dataplane::refresh_after_unreachable_peer;
use super::replication::Peer;
use super::{Identity, SdsNode};

/// Why a rebuild attempt stopped.
#[derive(Debug, thiserror::Error)]
pub enum RebuildError {
    #[error("not registered with the MDM")]
    NotRegistered,
    #[error("placement map unavailable: {0}")]
    Placement(&'static str),
    #[error(
        "PG {pg} of volume {volume} no longer has this node as primary and {target} as secondary"
    )]
    Moved { volume: u64, pg: u64, target: u64 },
    #[error("target {0} is not in the placement map or has an unusable address")]
    Target(u64),
    #[error("reading chunk {chunk} locally: {error}")]
    Read { chunk: u64, error: String },
    #[error("writing chunk {chunk} locally: {error}")]
    Write { chunk: u64, error: String },
    #[error("target refused {what} of chunk {chunk}: {}", .status.name())]
    Refused { what: &'static str, chunk: u64, status: Status },
    #[error("target unreachable: {0}")]
    Transport(String),
    #[error("the MDM did not take the report: {0}")]
    Report(String),
    #[error("a write's forward to the joining copy failed; the move starts over")]
    MoveBroken,
}

/// Rebuild jobs this node is running, so a job handed out again by a later
/// heartbeat is not started twice. Jobs run one after another.
#[derive(Default)]
pub struct RebuildRunner {
    running: Mutex<HashSet<u64>>,
    one_at_a_time: tokio::sync::Mutex<()>,
}

impl RebuildRunner {
    /// Starts each assignment that is not already running.
    pub fn start(node: &Arc<SdsNode>, assignments: &[RebuildAssignment]) {
        for job in assignments {
            let fresh =
                node.rebuilds.running.lock().unwrap_or_else(|p| p.into_inner()).insert(job.job_id);
            if !fresh {
                continue;
            }
            let (node, job) = (node.clone(), *job);
            tokio::spawn(async move {
                let outcome = {
                    let _turn = node.rebuilds.one_at_a_time.lock().await;
                    rebuild(&node, &job).await
                };
                match outcome {
                    Ok(done) => {
                        node.metrics.rebuilds_completed.fetch_add(1, Ordering::Relaxed);
                        tracing::info!(
                            job = job.job_id,
                            volume = job.volume_id,
                            pg = job.pg_index,
                            target = job.target_sds,
                            copied = done.chunks_copied,
                            released = done.chunks_released,
                            "rebuild complete"
                        );
                        node.local_log.health(
                            "rebuild",
                            format!(
                                "job {} volume {} PG {}: {} chunks copied to SDS {}",
                                job.job_id,
                                job.volume_id,
                                job.pg_index,
                                done.chunks_copied,
                                job.target_sds
                            ),
                        );
                    }
                    Err(e) => {
                        node.metrics.rebuild_failures.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(job = job.job_id, error = %e, "rebuild stopped; retried at a later heartbeat");
                    }
                }
                node.rebuilds.running.lock().unwrap_or_else(|p| p.into_inner()).remove(&job.job_id);
            });
        }
    }
}

/// How often a running job reports its progress to the MDM.
const PROGRESS_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

/// Counters of a running job.
#[derive(Default)]
struct Tally {
    copied: AtomicU64,
    released: AtomicU64,
    bytes: AtomicU64,
}

/// Copies the PG, flushes the target and reports to the MDM; a move then
/// swaps the target in (see [`finish_move`]).
async fn rebuild(node: &SdsNode, job: &RebuildAssignment) -> Result<RebuildComplete, RebuildError> {
    let identity = node.identity().ok_or(RebuildError::NotRegistered)?;
    // The newest map (other PGs of the volume may have moved since the job
    // was handed out), as long as this PG still has this source and target.
    let map = current_map(node, &identity, job).await?;
    let endpoint = map.node(job.target_sds).ok_or(RebuildError::Target(job.target_sds))?;
    let peer = node.peers.get(endpoint).map_err(|_| RebuildError::Target(job.target_sds))?;
    let pg_key = (job.volume_id, job.pg_index);
    if job.kind == CopyKind::Move {
        node.movement.start_move(pg_key);
    }
    let on_target = target_allocation(node, &identity, &peer, job, &map).await?;

    let pg_count = map.pgs.len().max(1);
    let pg_chunks: Vec<u64> = (job.pg_index..map.chunk_count()).step_by(pg_count).collect();
    let chunks: Vec<u64> = match job.kind {
        CopyKind::Rebuild | CopyKind::Move => pg_chunks.clone(),
        // Only what was written while the target was away (this node's
        // dirty log), and what the target itself may hold ahead of this
        // copy (writes it applied as primary whose forward failed).
        CopyKind::Resync => {
            let mut chunks: std::collections::BTreeSet<u64> =
                node.dirty.chunks(pg_key).into_iter().collect();
            chunks.extend(target_dirty_list(node, &identity, &peer, job, &map).await?);
            chunks.into_iter().collect()
        }
    };
    // What there is to send (a chunk allocated meanwhile is sent too).
    let total = chunks
        .iter()
        .filter(|&&c| node.store.is_allocated(job.volume_id, c) || on_target.contains(&c))
        .count() as u64;
    let tally = Tally::default();
    let copy_all = futures_util::stream::iter(chunks.iter().copied())
        .map(|chunk| copy_one(node, &identity, &peer, job, &on_target, &tally, chunk))
        .buffer_unordered(node.movement.width())
        .try_collect::<Vec<()>>();
    tokio::pin!(copy_all);
    let mut ticker = tokio::time::interval(PROGRESS_INTERVAL);
    ticker.tick().await;
    loop {
        tokio::select! {
            outcome = &mut copy_all => { outcome?; break; }
            _ = ticker.tick() => report_progress(&identity, job, total, &tally).await?,
        }
    }
    report_progress(&identity, job, total, &tally).await?;
    let done = RebuildComplete {
        job_id: job.job_id,
        chunks_copied: tally.copied.load(Ordering::Relaxed),
        chunks_released: tally.released.load(Ordering::Relaxed),
    };
    if job.kind == CopyKind::Move {
        finish_move(node, &identity, &peer, job, &pg_chunks, &done).await?;
    } else {
        send(node, &identity, &peer, job, Op::Flush, 0, Bytes::new()).await?;
        identity
            .mdm
            .rebuild_complete(&done)
            .await
            .map_err(|e| RebuildError::Report(e.to_string()))?;
    }
    Ok(done)
}

/// Sends one chunk as it is now, under its ordering lock (a write in
/// flight may be creating it): its data, or a release if the target holds
/// it and this node does not.
async fn copy_one(
    node: &SdsNode,
    identity: &Identity,
    peer: &Peer,
    job: &RebuildAssignment,
    on_target: &HashSet<u64>,
    tally: &Tally,
    chunk: u64,
) -> Result<(), RebuildError> {
    let pg_key = (job.volume_id, job.pg_index);
    if job.kind == CopyKind::Move && node.movement.move_broken(pg_key) {
        return Err(RebuildError::MoveBroken);
    }
    let held = node.store.is_allocated(job.volume_id, chunk);
    let _lane = if held || on_target.contains(&chunk) {
        node.movement.admit(CHUNK_SIZE).await
    } else {
        None
    };
    let _in_order = node.chunk_locks.lock(job.volume_id, chunk, 0, CHUNK_SIZE as u32).await;
    if node.store.is_allocated(job.volume_id, chunk) {
        let data = node
            .store
            .read(job.volume_id, chunk, 0, CHUNK_SIZE as u32)
            .await
            .map_err(|e| RebuildError::Read { chunk, error: e.to_string() })?;
        send(node, identity, peer, job, Op::Write, chunk, Bytes::from(data)).await?;
        tally.copied.fetch_add(1, Ordering::Relaxed);
        tally.bytes.fetch_add(CHUNK_SIZE, Ordering::Relaxed);
        node.metrics.rebuild_chunks_copied.fetch_add(1, Ordering::Relaxed);
    } else if on_target.contains(&chunk) {
        send(node, identity, peer, job, Op::Trim, chunk, Bytes::new()).await?;
        tally.released.fetch_add(1, Ordering::Relaxed);
    }
    if job.kind != CopyKind::Move {
        // The target has the chunk as it is now: a dirty entry is settled
        // (one logged later, by a forward that fails after this, stays). A
        // move's dirty entries are about the secondary, not the target.
        node.dirty
            .clear(pg_key, chunk)
            .await
            .map_err(|e| RebuildError::Read { chunk, error: e.to_string() })?;
    }
    Ok(())
}

/// Tells the MDM how far the job is; a job it no longer runs stops here.
async fn report_progress(
    identity: &Identity,
    job: &RebuildAssignment,
    total: u64,
    tally: &Tally,
) -> Result<(), RebuildError> {
    let copied = tally.copied.load(Ordering::Relaxed) + tally.released.load(Ordering::Relaxed);
    let progress = RebuildProgress {
        job_id: job.job_id,
        chunks_total: total.max(copied),
        chunks_copied: copied,
        bytes_copied: tally.bytes.load(Ordering::Relaxed),
    };
    match identity.mdm.rebuild_progress(&progress).await {
        Ok(_) => Ok(()),
        Err(e) if e.status() == Some(409) => Err(RebuildError::Report(e.to_string())),
        // The MDM is briefly unreachable: the copy goes on.
        Err(e) => {
            tracing::debug!(job = job.job_id, error = %e, "progress not reported");
            Ok(())
        }
    }
}

/// Ends a move with every write to the PG held back: the PG's chunk locks
/// are all taken (writes already past them have landed on all three
/// copies), the copy that stays is made equal to the target where this
/// node's dirty log says it may differ, the target is flushed, and the MDM
/// swaps the target in for the leaving copy. Writes waiting for the locks
/// then find the new epoch and are retried under the new map.
async fn finish_move(
    node: &SdsNode,
    identity: &Identity,
    peer: &Peer,
    job: &RebuildAssignment,
    pg_chunks: &[u64],
    done: &RebuildComplete,
) -> Result<(), RebuildError> {
    let pg_key = (job.volume_id, job.pg_index);
    let mut held = Vec::with_capacity(pg_chunks.len());
    for &chunk in pg_chunks {
        held.push(node.chunk_locks.lock(job.volume_id, chunk, 0, CHUNK_SIZE as u32).await);
    }
    if node.movement.move_broken(pg_key) {
        return Err(RebuildError::MoveBroken);
    }
    let map = current_map(node, identity, job).await?;
    let pg = map.pgs[job.pg_index as usize];
    for chunk in node.dirty.chunks(pg_key) {
        if job.replaces == identity.node_id && pg.secondary != 0 {
            // This copy leaves and the secondary stays: it must hold what
            // this copy (and so the target) holds.
            push_chunk(node, identity, &map, pg.secondary, chunk).await?;
        }
        // Either way the two copies that remain are now equal here.
        node.dirty
            .clear(pg_key, chunk)
            .await
            .map_err(|e| RebuildError::Read { chunk, error: e.to_string() })?;
    }
    if job.replaces == identity.node_id && pg.secondary != 0 {
        let endpoint = map.node(pg.secondary).ok_or(RebuildError::Target(pg.secondary))?;
        let secondary = node.peers.get(endpoint).map_err(|_| RebuildError::Target(pg.secondary))?;
        flush_peer(identity, &secondary, &map).await?;
    }
    send(node, identity, peer, job, Op::Flush, 0, Bytes::new()).await?;
    identity.mdm.rebuild_complete(done).await.map_err(|e| RebuildError::Report(e.to_string()))?;
    // Learn the new map before the writes held back go on.
    let _ = node.fetch_placement(job.volume_id).await;
    drop(held);
    if job.replaces == identity.node_id && pg.secondary != 0 {
        release_lease(node, identity, &map, job, pg.secondary).await;
    }
    Ok(())
}

/// This node, primary until the move, tells the promoted copy that it no
/// longer serves the PG, so that copy need not wait out the lease it
/// granted (a pause of the PG's IO as long as a lease). Only once this node
/// knows the map that moved the role (it refuses requests routed by older
/// maps from then on); without that, or if the message is lost, the
/// promoted copy waits the lease out as after a failover.
async fn release_lease(
    node: &SdsNode,
    identity: &Identity,
    old_map: &PlacementMap,
    job: &RebuildAssignment,
    promoted: u64,
) {
    let known = node.placement.known_epoch(job.volume_id);
    let Some(map) = node.placement.cached(job.volume_id).filter(|m| m.epoch == known) else {
        return;
    };
    let moved = map.pgs.get(job.pg_index as usize).is_some_and(|pg| {
        pg.primary == promoted && pg.secondary != identity.node_id && pg.joining != identity.node_id
    });
    if map.epoch <= old_map.epoch || !moved {
        return;
    }
    let Some(peer) = map.node(promoted).and_then(|e| node.peers.get(e).ok()) else { return };
    let header = replica_header(identity, &peer, &map, Op::LeaseRelease, job.pg_index, 0);
    match peer.call(header, &identity.keys.peer_key, Bytes::new()).await {
        Ok(reply) if reply.status() == Status::Ok => {}
        outcome => tracing::debug!(
            promoted,
            outcome = ?outcome.map(|r| r.status()),
            "lease release not taken: the promoted copy waits the lease out"
        ),
    }
}

/// A flush of `peer` under `map`.
async fn flush_peer(
    identity: &Identity,
    peer: &Peer,
    map: &PlacementMap,
) -> Result<(), RebuildError> {
    let header = replica_header(identity, peer, map, Op::Flush, 0, 0);
    let reply = peer
        .call(header, &identity.keys.peer_key, Bytes::new())
        .await
        .map_err(|e| RebuildError::Transport(e.to_string()))?;
    match reply.status() {
        Status::Ok => Ok(()),
        status => Err(RebuildError::Refused { what: "the flush", chunk: 0, status }),
    }
}

/// Reads `chunk` whole from the copy on `source` under `map` (the copy
/// checks its own block checksums: a corrupt copy answers `IoError`).
pub(super) async fn pull_chunk(
    node: &SdsNode,
    identity: &Identity,
    map: &PlacementMap,
    source: u64,
    chunk: u64,
) -> Result<Vec<u8>, RebuildError> {
    let endpoint = map.node(source).ok_or(RebuildError::Target(source))?;
    let peer = node.peers.get(endpoint).map_err(|_| RebuildError::Target(source))?;
    let header = replica_header(identity, &peer, map, Op::Read, chunk, CHUNK_SIZE as u32);
    let reply = peer
        .call(header, &identity.keys.peer_key, Bytes::new())
        .await
        .map_err(|e| RebuildError::Transport(e.to_string()))?;
    match reply.status() {
        Status::Ok => Ok(reply.payload),
        status => Err(RebuildError::Refused { what: "the read", chunk, status }),
    }
}

/// Rewrites this node's copy of `chunk` from the copy on `source` (it
/// checks its own block checksums) and returns the data; the caller holds
/// the chunk's ordering lock.
pub(super) async fn rewrite_from_copy(
    node: &SdsNode,
    identity: &Identity,
    map: &PlacementMap,
    source: u64,
    chunk: u64,
) -> Result<Vec<u8>, RebuildError> {
    let good = pull_chunk(node, identity, map, source, chunk).await?;
    node.store
        .write(map.volume_id, chunk, 0, &good, true)
        .await
        .map_err(|e| RebuildError::Write { chunk, error: e.to_string() })?;
    Ok(good)
}

/// Copies `chunk` whole from this node to `target` under `map`: its data if
/// this node holds it, else a release of the whole chunk. The caller holds
/// the chunk's ordering lock, so no client write interleaves.
pub(super) async fn push_chunk(
    node: &SdsNode,
    identity: &Identity,
    map: &PlacementMap,
    target: u64,
    chunk: u64,
) -> Result<(), RebuildError> {
    let endpoint = map.node(target).ok_or(RebuildError::Target(target))?;
    let peer = node.peers.get(endpoint).map_err(|_| RebuildError::Target(target))?;
    let (op, payload, length) = if node.store.is_allocated(map.volume_id, chunk) {
        let data = node
            .store
            .read(map.volume_id, chunk, 0, CHUNK_SIZE as u32)
            .await
            .map_err(|e| RebuildError::Read { chunk, error: e.to_string() })?;
        (Op::Write, Bytes::from(data), 0)
    } else {
        (Op::Trim, Bytes::new(), CHUNK_SIZE as u32)
    };
    let header = replica_header(identity, &peer, map, op, chunk, length);
    let reply = peer
        .call(header, &identity.keys.peer_key, payload)
        .await
        .map_err(|e| RebuildError::Transport(e.to_string()))?;
    match reply.status() {
        Status::Ok => Ok(()),
        status => Err(RebuildError::Refused { what: op_label(op), chunk, status }),
    }
}

/// The newest map, if the job's PG still has this node as primary and the
/// job's target as secondary (a change elsewhere in the volume is fine).
async fn current_map(
    node: &SdsNode,
    identity: &Identity,
    job: &RebuildAssignment,
) -> Result<Arc<PlacementMap>, RebuildError> {
    let map = node
        .newest_placement(job.volume_id)
        .await
        .map_err(|status| RebuildError::Placement(status.name()))?;
    let pg = map.pgs.get(job.pg_index as usize);
    let ours = pg.is_some_and(|pg| {
        let target = if job.kind == CopyKind::Move { pg.joining } else { pg.secondary };
        pg.primary == identity.node_id && target == job.target_sds
    });
    if map.epoch < job.epoch || !ours {
        return Err(RebuildError::Moved {
            volume: job.volume_id,
            pg: job.pg_index,
            target: job.target_sds,
        });
    }
    Ok(map)
}

/// The chunks of the job's PG the target logged as possibly ahead of this
/// copy ([`Op::DirtyList`]).
async fn target_dirty_list(
    node: &SdsNode,
    identity: &Identity,
    peer: &Peer,
    job: &RebuildAssignment,
    map: &PlacementMap,
) -> Result<Vec<u64>, RebuildError> {
    let header = replica_header(identity, peer, map, Op::DirtyList, job.pg_index, 0);
    let reply = peer.call(header, &identity.keys.peer_key, Bytes::new()).await;
    let reply = target_reached(node, job, reply).await?;
    if reply.status() != Status::Ok {
        return Err(RebuildError::Refused {
            what: "the dirty-list query",
            chunk: job.pg_index,
            status: reply.status(),
        });
    }
    Ok(reply
        .payload
        .chunks_exact(8)
        .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
        .collect())
}

/// The chunks of the volume the target holds (from its allocation bitmap).
async fn target_allocation(
    node: &SdsNode,
    identity: &Identity,
    peer: &Peer,
    job: &RebuildAssignment,
    map: &PlacementMap,
) -> Result<HashSet<u64>, RebuildError> {
    let mut held = HashSet::new();
    let mut start = 0;
    while start < map.chunk_count() {
        let count = (map.chunk_count() - start).min(u64::from(MAX_ALLOCATION_CHUNKS));
        let header = replica_header(identity, peer, map, Op::Allocation, start, count as u32);
        let reply = peer.call(header, &identity.keys.peer_key, Bytes::new()).await;
        let reply = target_reached(node, job, reply).await?;
        if reply.status() != Status::Ok {
            return Err(RebuildError::Refused {
                what: "the allocation query",
                chunk: start,
                status: reply.status(),
            });
        }
        let bits = &reply.payload;
        for i in 0..count {
            if bits.get((i / 8) as usize).is_some_and(|b| b & (1 << (i % 8)) != 0) {
                held.insert(start + i);
            }
        }
        start += count;
    }
    Ok(held)
}

/// How many times a frame the target refuses as stale is sent again, each
/// time under the newest map.
const STALE_RETRIES: usize = 3;

/// One replica frame to the target under the newest map: a full-chunk write
/// or trim, or a flush. A target that knows a newer epoch makes the source
/// refetch its map and send again (another PG of the volume may have moved).
async fn send(
    node: &SdsNode,
    identity: &Identity,
    peer: &Peer,
    job: &RebuildAssignment,
    op: Op,
    chunk: u64,
    payload: Bytes,
) -> Result<(), RebuildError> {
    let length = if op == Op::Trim { CHUNK_SIZE as u32 } else { 0 };
    let mut attempt = 0;
    loop {
        let map = current_map(node, identity, job).await?;
        let header = replica_header(identity, peer, &map, op, chunk, length);
        let reply = peer.call(header, &identity.keys.peer_key, payload.clone()).await;
        let reply = target_reached(node, job, reply).await?;
        match reply.status() {
            Status::Ok => return Ok(()),
            Status::StaleEpoch if attempt < STALE_RETRIES => {
                attempt += 1;
                let _ = node.fetch_placement(job.volume_id).await;
            }
            status => return Err(RebuildError::Refused { what: op_label(op), chunk, status }),
        }
    }
}

/// The target's reply; a target that cannot be reached is reported to the
/// MDM like any peer, so a dead target is replaced by another one.
async fn target_reached(
    node: &SdsNode,
    job: &RebuildAssignment,
    reply: Result<Reply, ClientError>,
) -> Result<Reply, RebuildError> {
    match reply {
        Ok(reply) => Ok(reply),
        Err(e) => {
            refresh_after_unreachable_peer(node, job.target_sds, job.volume_id, &e).await;
            Err(RebuildError::Transport(e.to_string()))
        }
    }
}

/// A replication frame from this node to `peer` under `map` (the client
/// sets a write's length from its payload).
fn replica_header(
    identity: &Identity,
    peer: &Peer,
    map: &PlacementMap,
    op: Op,
    chunk_index: u64,
    length: u32,
) -> FrameHeader {
    FrameHeader {
        op: op as u8,
        flags: flags::REPLICA,
        volume_id: map.volume_id,
        chunk_index,
        length,
        epoch: map.epoch,
        token_id: identity.node_id,
        seq: peer.seq.next(),
        ..FrameHeader::default()
    }
}

fn op_label(op: Op) -> &'static str {
    match op {
        Op::Write => "the copy",
        Op::Trim => "the release",
        _ => "the flush",
    }
}
