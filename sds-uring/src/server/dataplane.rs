//! The data plane on TCP 9700+N: request dispatch, every check before any
//! IO, and two-copy replication.
//!
//! Each connection has one reader loop and one writer task; every request
//! is served by its own task, so requests on one connection overlap and
//! replies leave in completion order. A framing error closes the
//! connection (the byte stream can no longer be trusted).
//!
//! A client request (from an SDC) is checked in this order, and a refused
//! request touches nothing: frame fields (`Invalid`), known token
//! (`NoToken`), header MAC under the token's session key (`BadMac`), token
//! scope (`Expired`, `WrongVolume`, `ReadOnly`, `Revoked`), placement epoch
//! (`StaleEpoch`), chunk inside the volume (`Invalid`), this node is the
//! chunk's primary (`NotPrimary`), payload CRC (`BadCrc`), replay window
//! (`Replay`). The sequence number is accepted last, so a request refused
//! for another reason can be corrected and sent again with the same one.
//! Under the chunk's ordering lock a write is then refused as `Superseded`
//! if a newer write of the same SDC to an overlapping range was applied
//! first (a late copy: see [`super::fencing`]).
//!
//! A replication frame (flag `REPLICA`, from the chunk's primary) is MACed
//! with the peer key and carries the sender's node id in `token_id`; the
//! receiver checks the MAC, the epoch, that it is the chunk's secondary and
//! the sender its primary, the CRC and the sender's replay window.
//!
//! On the primary, a write-type request takes the ordering lock of its
//! range of the chunk, then writes locally and forwards to the secondary concurrently, and
//! replies when both finished: `Ok` only if both succeeded, the local
//! error if the local write failed, `ReplicaFailed` if only the secondary
//! did (and `StaleEpoch` if the secondary knows a newer map).

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use pflex_dataplane::{read_request, ClientError, ReplyWriter};
use pflex_proto::frame::{crc32, flags, FrameHeader, Op, Status, HEADER_LEN};
use pflex_proto::placement::{PlacementGroup, PlacementMap};
use pflex_proto::token::SessionKey;
use pflex_proto::{unix_now, CHUNK_SIZE};
use tokio::io::BufReader;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use super::auth::{authenticate_auth, check_auth_scope, check_client_request, VerifiedToken};
use super::lease::PrimaryLease;
use super::metrics::op_name;
use super::replication::ChunkOrderLock;
use super::{Identity, SdsNode};
use crate::store::StoreError;

/// Requests served concurrently per connection before reading pauses.
const MAX_IN_FLIGHT_PER_CONNECTION: usize = 256;
const READ_BUFFER: usize = 256 * 1024;
/// Least time between map refreshes caused by an unreachable peer.
const PEER_REFRESH_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

/// Accepts data-plane connections forever.
pub async fn serve(node: Arc<SdsNode>, listener: TcpListener) {
    let slots = pflex_dataplane::Slots::new(node.config.max_connections);
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                let _ = stream.set_nodelay(true);
                node.metrics.connections_accepted.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(%peer, "data-plane connection");
                let slot = slots.admit();
                tokio::spawn(serve_connection(node.clone(), stream, slot));
            }
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}

async fn serve_connection(node: Arc<SdsNode>, stream: TcpStream, mut slot: pflex_dataplane::Slot) {
    let (read_half, write_half) = stream.into_split();
    let mut requests = BufReader::with_capacity(READ_BUFFER, read_half);
    let (replies, _writer) = ReplyWriter::spawn(write_half);
    let in_flight = Arc::new(Semaphore::new(MAX_IN_FLIGHT_PER_CONNECTION));
    loop {
        let read = tokio::select! {
            read = read_request(&mut requests) => read,
            _ = &mut slot.evicted => {
                // Idle longest while every slot was taken: make room.
                node.metrics.connections_evicted.fetch_add(1, Ordering::Relaxed);
                break;
            }
        };
        slot.touch();
        let (header, raw, payload) = match read {
            Ok(Some(request)) => request,
            Ok(None) => break,
            Err(e) => {
                node.metrics.framing_errors.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(error = %e, "closing data-plane connection");
                break;
            }
        };
        let Ok(permit) = in_flight.clone().acquire_owned().await else { break };
        let (node, replies) = (node.clone(), replies.clone());
        let received = std::time::Instant::now();
        tokio::spawn(async move {
            let _permit = permit;
            let (status, data, key) = handle_request(&node, &header, &raw, payload).await;
            let replica = header.flags & flags::REPLICA != 0;
            let op = Op::from_u8(header.op);
            node.metrics.count_reply(op, status, replica);
            if let Some(op) = op {
                node.metrics.observe_latency(op, replica, received.elapsed());
            }
            if status != Status::Ok {
                tracing::debug!(
                    op = header.op,
                    volume = header.volume_id,
                    chunk = header.chunk_index,
                    status = status.name(),
                    "request refused"
                );
            }
            if replica && status == Status::Replay {
                // The sender learns the floor this node's windows start
                // above (it restarted) and numbers its frames above it.
                let mut refusal = header.reply(status, 0, 0);
                refusal.seq = node.peer_windows.floor();
                if let Some(key) = &key {
                    refusal.seal_reply(key, &header.mac, &[]);
                }
                let _ = replies.send(&refusal, Vec::new()).await;
            } else {
                let _ = replies.reply(&header, status, data, key.as_ref()).await;
            }
        });
    }
}

/// Serves one request; the reply's status and payload, and the key to seal
/// the reply with (the request's, once its MAC verified; none before).
pub async fn handle_request(
    node: &SdsNode,
    header: &FrameHeader,
    raw: &[u8; HEADER_LEN],
    payload: Vec<u8>,
) -> (Status, Vec<u8>, Option<SessionKey>) {
    let mut key = None;
    let outcome = async {
        let op = header.validate_request()?;
        if op == Op::Ping {
            return Ok(Vec::new());
        }
        let identity = node.identity().ok_or(Status::NotAvailable)?;
        if header.flags & flags::REPLICA != 0 {
            serve_replica(node, &identity, op, header, raw, payload, &mut key).await
        } else if op == Op::Auth {
            serve_auth(node, &identity, header, raw, &payload, &mut key).await
        } else {
            serve_client(node, &identity, op, header, raw, payload, &mut key).await
        }
    }
    .await;
    match outcome {
        Ok(data) => (Status::Ok, data, key),
        Err(status) => (status, Vec::new(), key),
    }
}

async fn serve_auth(
    node: &SdsNode,
    identity: &Identity,
    header: &FrameHeader,
    raw: &[u8; HEADER_LEN],
    payload: &[u8],
    sealing_key: &mut Option<SessionKey>,
) -> Result<Vec<u8>, Status> {
    // Authenticated first: nothing unauthenticated may make this node call
    // the MDM. Replies from here on are sealed with the token's session key.
    let (signed, session_key) = authenticate_auth(&identity.keys, header, raw, payload)?;
    *sealing_key = Some(session_key.clone());
    let volume_id = signed.token.volume_id;
    if node.placement.mapping_gen(volume_id) == 0 {
        // Unknown volume so far: learn its mapping generation (revocation).
        let _ = node.placement_for(volume_id, 0).await;
    }
    let mapping_gen = node.placement.mapping_gen(volume_id);
    check_auth_scope(&signed, unix_now(), mapping_gen)?;
    // A token signed for a newer mapping generation than this node heard of
    // (it may be cut off from the MDM) is proof of a remap: older tokens of
    // the volume are revoked from now on, here and, through the lease, on
    // the secondary's say.
    node.placement.raise_mapping_gen(volume_id, signed.token.mapping_gen);
    if node.tokens.insert(&signed, session_key) {
        node.local_log.token_verified(&signed);
    }
    Ok(pflex_proto::frame::encode_sequence_floor(node.tokens.floor()))
}

async fn serve_client(
    node: &SdsNode,
    identity: &Identity,
    op: Op,
    header: &FrameHeader,
    raw: &[u8; HEADER_LEN],
    payload: Vec<u8>,
    sealing_key: &mut Option<SessionKey>,
) -> Result<Vec<u8>, Status> {
    node.movement.client_io();
    let token = node.tokens.get(header.token_id).ok_or(Status::NoToken)?;
    let mapping_gen = node.placement.mapping_gen(header.volume_id);
    let checked = check_client_request(&token, header, raw, &payload, op, unix_now(), mapping_gen);
    if checked != Err(Status::BadMac) {
        *sealing_key = Some(token.session_key.clone());
    }
    checked?;
    let bytes = u64::from(header.length);
    let outcome = serve_checked_client(node, identity, &token, op, header, payload).await;
    if op != Op::Allocation {
        node.acks.record(
            token.token.token_id,
            header.volume_id,
            op_name(op),
            bytes,
            outcome.is_ok(),
        );
    }
    outcome
}

async fn serve_checked_client(
    node: &SdsNode,
    identity: &Identity,
    token: &VerifiedToken,
    op: Op,
    header: &FrameHeader,
    payload: Vec<u8>,
) -> Result<Vec<u8>, Status> {
    let map = node.placement_for(header.volume_id, header.epoch).await?;
    if token.token.mapping_gen < map.mapping_gen {
        return Err(Status::Revoked);
    }
    match op {
        Op::Flush => {
            accept_seq(token, header.seq)?;
            flush_volume(node, identity, &map).await?;
            Ok(Vec::new())
        }
        Op::Allocation => {
            accept_seq(token, header.seq)?;
            Ok(allocation_bitmap(node, &map, header))
        }
        Op::Read | Op::Write | Op::Trim | Op::WriteZeroes => {
            let pg = chunk_group(&map, header)?;
            if pg.primary != identity.node_id {
                return Err(Status::NotPrimary);
            }
            if op == Op::Write && crc32(&payload) != header.payload_crc {
                return Err(Status::BadCrc);
            }
            accept_seq(token, header.seq)?;
            hold_lease(node, identity, &map, header.chunk_index, pg).await?;
            reconcile_if_dirty(node, identity, &map, pg, header).await?;
            if op == Op::Read {
                return match read_local(node, header).await {
                    Err(Status::DataCorrupt) => {
                        repair_from_copy(node, identity, &map, pg, header).await
                    }
                    other => other,
                };
            }
            replicate_write(node, identity, &map, pg, op, header, payload, token.token.sdc_id)
                .await?;
            Ok(Vec::new())
        }
        Op::Auth | Op::Ping | Op::Lease | Op::DirtyList | Op::LeaseRelease => Err(Status::Invalid),
    }
}

/// Longest lease wait a request sits through; longer ones are refused as
/// `NotAvailable` and retried by the SDC.
const MAX_LEASE_WAIT_IN_REQUEST: std::time::Duration = std::time::Duration::from_millis(500);

/// How long a primary waits for a lease reply before it stops counting on it.
const LEASE_REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_millis(1000);

/// A primary serves a PG only under a lease from its secondary, and only
/// once every lease this node granted for the PG (as its secondary, or
/// before a restart) has run out: see [`super::lease`]. Renews inline when
/// the lease is missing; `NotAvailable` if the secondary does not grant it
/// (the SDC backs off and refetches the map).
async fn hold_lease(
    node: &SdsNode,
    identity: &Identity,
    map: &PlacementMap,
    chunk_index: u64,
    pg: PlacementGroup,
) -> Result<(), Status> {
    let Some(leases) = &node.leases else { return Ok(()) };
    let pg_index = map.pg_index_of(chunk_index).unwrap_or(0) as usize;
    let secondary = (pg.secondary != identity.node_id && pg.secondary != 0).then_some(pg.secondary);
    for _ in 0..3 {
        let now = std::time::Instant::now();
        match leases.check_primary(map.volume_id, pg_index, map.epoch, secondary, now) {
            PrimaryLease::Valid => return Ok(()),
            PrimaryLease::WaitOut(wait) => {
                node.metrics.lease_waits.fetch_add(1, Ordering::Relaxed);
                if wait > MAX_LEASE_WAIT_IN_REQUEST {
                    // Longer than is worth holding a request (the SDC's
                    // request timeout is 2 s): it backs off and comes back.
                    return Err(Status::NotAvailable);
                }
                tokio::time::sleep(wait).await;
            }
            PrimaryLease::Renew => {
                let secondary = secondary.ok_or(Status::NotAvailable)?;
                renew_lease(node, identity, map, secondary).await?;
            }
        }
    }
    Err(Status::NotAvailable)
}

/// Asks `secondary` for a lease on `map`'s volume under `map.epoch`.
async fn renew_lease(
    node: &SdsNode,
    identity: &Identity,
    map: &PlacementMap,
    secondary: u64,
) -> Result<(), Status> {
    let leases = node.leases.as_ref().ok_or(Status::Invalid)?;
    let endpoint = map.node(secondary).ok_or(Status::NotAvailable)?;
    let peer = node.peers.get(endpoint).map_err(|_| Status::NotAvailable)?;
    let header = FrameHeader {
        op: Op::Lease as u8,
        flags: flags::REPLICA,
        volume_id: map.volume_id,
        // A volume-wide op: the chunk field carries the mapping generation
        // this node knows (a secondary that knows a newer one refuses, so a
        // primary cut off from the MDM cannot go on serving revoked tokens),
        // the offset field the lease length in ms (the grantor honours the
        // longer of its own and this).
        chunk_index: node.placement.mapping_gen(map.volume_id),
        offset: u32::try_from(leases.config().length.as_millis()).unwrap_or(u32::MAX),
        epoch: map.epoch,
        token_id: identity.node_id,
        seq: peer.seq.next(),
        ..FrameHeader::default()
    };
    let sent = std::time::Instant::now();
    let call = peer.call(header, &identity.keys.peer_key, Bytes::new());
    let status = match tokio::time::timeout(LEASE_REQUEST_TIMEOUT, call).await {
        Ok(Ok(reply)) => reply.status(),
        Ok(Err(e)) => {
            // Unreachable: tell the MDM, and look for a newer address.
            refresh_after_unreachable_peer(node, secondary, map.volume_id, &e).await;
            Status::NotAvailable
        }
        Err(_) => {
            let timeout = ClientError::Timeout(LEASE_REQUEST_TIMEOUT);
            refresh_after_unreachable_peer(node, secondary, map.volume_id, &timeout).await;
            Status::NotAvailable
        }
    };
    match status {
        Status::Ok => {
            leases.record_held(map.volume_id, secondary, map.epoch, sent);
            node.metrics.leases_renewed.fetch_add(1, Ordering::Relaxed);
            Ok(())
        }
        Status::StaleEpoch | Status::Revoked => {
            // The secondary knows a newer map or mapping generation: it will
            // not vouch for us under what we know. Stop serving under it and
            // learn the new map.
            leases.drop_held(map.volume_id, secondary, map.epoch);
            node.metrics.lease_failures.fetch_add(1, Ordering::Relaxed);
            let _ = node.fetch_placement(map.volume_id).await;
            Err(status)
        }
        _ => {
            node.metrics.lease_failures.fetch_add(1, Ordering::Relaxed);
            Err(Status::NotAvailable)
        }
    }
}

/// Renews, ahead of need, the leases of every volume this node is primary
/// in, so IO rarely waits for one.
pub async fn lease_loop(node: Arc<SdsNode>) {
    let Some(config) = node.leases.as_ref().map(|l| l.config()) else { return };
    let mut tick = tokio::time::interval(config.renew_every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(identity) = node.identity() else { continue };
        let mut renewals = Vec::new();
        for map in node.placement.all() {
            let secondaries: BTreeSet<u64> = map
                .pgs
                .iter()
                .filter(|pg| pg.primary == identity.node_id && pg.secondary != identity.node_id)
                .map(|pg| pg.secondary)
                .filter(|id| map.node(*id).is_some())
                .collect();
            for secondary in secondaries {
                let (node, identity, map) = (&node, &identity, map.clone());
                renewals.push(async move {
                    let _ = renew_lease(node, identity, &map, secondary).await;
                });
            }
        }
        futures_util::future::join_all(renewals).await;
    }
}

fn accept_seq(token: &VerifiedToken, seq: u64) -> Result<(), Status> {
    if token.accept_seq(seq) {
        Ok(())
    } else {
        Err(Status::Replay)
    }
}

/// The chunk's PG, if the chunk lies inside the volume.
fn chunk_group(map: &PlacementMap, header: &FrameHeader) -> Result<PlacementGroup, Status> {
    if header.chunk_index >= map.chunk_count() {
        return Err(Status::Invalid);
    }
    map.pg_of(header.chunk_index).copied().ok_or(Status::NotAvailable)
}

/// A read of the primary's copy found blocks that do not match their
/// checksums: the chunk is read from the secondary (which checks its own),
/// written back here whole, and the request answered from it, all under the
/// chunk's ordering lock so no client write interleaves. `IoError` if the
/// PG has no other copy or it is bad too.
async fn repair_from_copy(
    node: &SdsNode,
    identity: &Identity,
    map: &PlacementMap,
    pg: PlacementGroup,
    header: &FrameHeader,
) -> Result<Vec<u8>, Status> {
    let (vol, chunk) = (header.volume_id, header.chunk_index);
    if pg.secondary == 0 {
        return Err(Status::IoError);
    }
    let _whole_chunk = node.chunk_locks.lock(vol, chunk, 0, CHUNK_SIZE as u32).await;
    let good = super::rebuild::rewrite_from_copy(node, identity, map, pg.secondary, chunk)
        .await
        .map_err(|e| {
            tracing::error!(vol, chunk, error = %e, "cannot repair a corrupt chunk from its other copy");
            Status::IoError
        })?;
    node.metrics.checksum_repairs.fetch_add(1, Ordering::Relaxed);
    tracing::warn!(vol, chunk, "repaired a corrupt chunk from the other copy");
    let from = header.offset as usize;
    Ok(good[from..from + header.length as usize].to_vec())
}

async fn read_local(node: &SdsNode, header: &FrameHeader) -> Result<Vec<u8>, Status> {
    let data = node
        .store
        .read(header.volume_id, header.chunk_index, header.offset, header.length)
        .await
        .map_err(|e| store_status(&e))?;
    node.metrics.read_bytes.fetch_add(u64::from(header.length), Ordering::Relaxed);
    Ok(data)
}

/// Applies a write-type op to the local copy.
async fn apply_local(
    node: &SdsNode,
    op: Op,
    header: &FrameHeader,
    payload: &[u8],
) -> Result<(), Status> {
    let (vol, chunk, offset, len) =
        (header.volume_id, header.chunk_index, header.offset, header.length);
    let fua = header.flags & flags::FUA != 0;
    let outcome = match op {
        Op::Write => node.store.write(vol, chunk, offset, payload, fua).await,
        Op::WriteZeroes => node.store.write_zeroes(vol, chunk, offset, len, fua).await,
        Op::Trim => match node.store.trim(vol, chunk, offset, len).await {
            Ok(()) if fua => node.store.flush().await,
            other => other,
        },
        _ => return Err(Status::Invalid),
    };
    outcome.map_err(|e| {
        tracing::warn!(vol, chunk, error = %e, "local write failed");
        store_status(&e)
    })?;
    if op == Op::Write {
        node.metrics.write_bytes.fetch_add(u64::from(len), Ordering::Relaxed);
    }
    Ok(())
}

fn store_status(e: &StoreError) -> Status {
    match e {
        StoreError::NoSpace => Status::NoSpace,
        StoreError::OutOfRange { .. } => Status::Invalid,
        // Served from the other copy once the MDM has moved this one.
        StoreError::DeviceFailed { .. } => Status::NotAvailable,
        StoreError::Corrupt { .. } => Status::DataCorrupt,
        _ => Status::IoError,
    }
}

/// Primary side: local write and forward under the chunk's ordering lock,
/// unless a newer write of the same SDC (`sdc_id`) to an overlapping range
/// was applied first ([`super::fencing`]).
#[allow(clippy::too_many_arguments)]
async fn replicate_write(
    node: &SdsNode,
    identity: &Identity,
    map: &PlacementMap,
    pg: PlacementGroup,
    op: Op,
    header: &FrameHeader,
    payload: Vec<u8>,
    sdc_id: u64,
) -> Result<(), Status> {
    let pg_key = (header.volume_id, map.pg_index_of(header.chunk_index).unwrap_or(0));
    if pg.secondary == 0 {
        return write_degraded(node, map, op, header, &payload, sdc_id, pg_key).await;
    }
    let secondary = map
        .node(pg.secondary)
        .filter(|_| pg.secondary != identity.node_id)
        .ok_or(Status::ReplicaFailed)?;
    let peer = node.peers.get(secondary).map_err(|e| {
        tracing::warn!(error = %e, "cannot reach the secondary");
        Status::ReplicaFailed
    })?;
    let _in_order = lock_in_order(node, header, map).await?;
    let fence_key = (sdc_id, header.volume_id, header.chunk_index);
    if !node.fences.admit(fence_key, header.offset, header.length, header.seq) {
        return Err(Status::Superseded);
    }
    // The sequence number is taken in order, after the wait for the chunk,
    // so a write queued behind others cannot fall out of the peer's window.
    let forward = FrameHeader {
        op: header.op,
        flags: flags::REPLICA | (header.flags & flags::FUA),
        volume_id: header.volume_id,
        chunk_index: header.chunk_index,
        offset: header.offset,
        length: header.length,
        epoch: map.epoch,
        token_id: identity.node_id,
        seq: peer.seq.next(),
        ..FrameHeader::default()
    };
    let payload = Bytes::from(payload);
    // A node joining the PG (a move) gets every write too; it is not part
    // of the acknowledgement, but a write it misses breaks the move.
    let joining = joining_peer(node, identity, map, pg, pg_key);
    let to_joining = async {
        let (id, peer) = joining.as_ref()?;
        let mut frame = forward;
        frame.seq = peer.seq.next();
        Some((*id, peer.call(frame, &identity.keys.peer_key, payload.clone()).await))
    };
    let (remote, joined, local) = tokio::join!(
        peer.call(forward, &identity.keys.peer_key, payload.clone()),
        to_joining,
        async {
            // Let the forward leave first: a local write alone on its device
            // is submitted from this thread (an `io_uring_enter`), and the
            // copy on the secondary is the longer path.
            tokio::task::yield_now().await;
            apply_local(node, op, header, &payload).await
        }
    );
    node.metrics.forwards.fetch_add(1, Ordering::Relaxed);
    if let Some((joining_id, outcome)) = joined {
        let ok = matches!(&outcome, Ok(reply) if reply.status() == Status::Ok);
        if !ok {
            tracing::warn!(peer = joining_id, outcome = ?outcome.as_ref().map(|r| r.status()), "forward to the joining copy failed: the move starts over");
            node.movement.break_move(pg_key);
            if let Err(e) = &outcome {
                refresh_after_unreachable_peer(node, joining_id, header.volume_id, e).await;
            }
        }
    }
    let remote_status = match remote {
        Ok(reply) => reply.status(),
        Err(e) => {
            tracing::warn!(peer = %secondary.name, error = %e, "forward to the secondary failed");
            refresh_after_unreachable_peer(node, pg.secondary, header.volume_id, &e).await;
            Status::ReplicaFailed
        }
    };
    if remote_status != Status::Ok {
        node.metrics.forward_failures.fetch_add(1, Ordering::Relaxed);
        if local.is_ok() {
            // This copy may now be ahead of the secondary's: never serve the
            // chunk again before the secondary has it (or has left the set).
            mark_dirty(node, pg_key, header.chunk_index).await?;
        }
    }
    local?;
    match remote_status {
        Status::Ok => Ok(()),
        Status::StaleEpoch => {
            // The secondary knows a newer map; so will we, and the SDC retries.
            let _ = node.fetch_placement(header.volume_id).await;
            Err(Status::StaleEpoch)
        }
        other => {
            tracing::warn!(peer = %secondary.name, status = other.name(), "secondary refused");
            Err(Status::ReplicaFailed)
        }
    }
}

/// The joining copy of `pg` (a move under way) and a client to it, if any;
/// one that cannot be addressed breaks the move.
fn joining_peer(
    node: &SdsNode,
    identity: &Identity,
    map: &PlacementMap,
    pg: PlacementGroup,
    pg_key: super::dirty::PgKey,
) -> Option<(u64, super::replication::Peer)> {
    if pg.joining == 0 || pg.joining == identity.node_id {
        return None;
    }
    let peer = map.node(pg.joining).and_then(|endpoint| node.peers.get(endpoint).ok());
    if peer.is_none() {
        tracing::warn!(node = pg.joining, "cannot address the joining copy: the move starts over");
        node.movement.break_move(pg_key);
    }
    Some((pg.joining, peer?))
}

async fn mark_dirty(node: &SdsNode, pg: super::dirty::PgKey, chunk: u64) -> Result<(), Status> {
    node.dirty.mark(pg, chunk).await.map_err(|e| {
        tracing::error!(error = %e, "cannot log a dirty chunk");
        Status::IoError
    })
}

/// A write to a degraded PG (no secondary): logged as dirty (durably,
/// before it is applied), so the copy that comes back gets it by resync,
/// then applied locally only.
async fn write_degraded(
    node: &SdsNode,
    map: &PlacementMap,
    op: Op,
    header: &FrameHeader,
    payload: &[u8],
    sdc_id: u64,
    pg_key: super::dirty::PgKey,
) -> Result<(), Status> {
    let _in_order = lock_in_order(node, header, map).await?;
    let fence_key = (sdc_id, header.volume_id, header.chunk_index);
    if !node.fences.admit(fence_key, header.offset, header.length, header.seq) {
        return Err(Status::Superseded);
    }
    mark_dirty(node, pg_key, header.chunk_index).await?;
    node.metrics.degraded_writes.fetch_add(1, Ordering::Relaxed);
    apply_local(node, op, header, payload).await
}

/// A chunk in the dirty log is served only once the PG's secondary has it:
/// the whole chunk is copied there first (under the chunk's ordering lock),
/// then taken out of the log. A degraded PG (no secondary) serves it as it
/// is: this copy is the only one. `NotAvailable` if the copy fails (the SDC
/// retries; the MDM takes an unreachable secondary out of the set).
async fn reconcile_if_dirty(
    node: &SdsNode,
    identity: &Identity,
    map: &PlacementMap,
    pg: PlacementGroup,
    header: &FrameHeader,
) -> Result<(), Status> {
    let chunk = header.chunk_index;
    let pg_key = (header.volume_id, map.pg_index_of(chunk).unwrap_or(0));
    if pg.secondary == 0 || !node.dirty.contains(pg_key, chunk) {
        return Ok(());
    }
    let _whole_chunk = node.chunk_locks.lock(header.volume_id, chunk, 0, CHUNK_SIZE as u32).await;
    if !node.dirty.contains(pg_key, chunk) {
        return Ok(()); // copied by someone else meanwhile
    }
    if node.placement.known_epoch(header.volume_id) != map.epoch {
        return Err(Status::StaleEpoch);
    }
    super::rebuild::push_chunk(node, identity, map, pg.secondary, chunk).await.map_err(|e| {
        tracing::warn!(chunk, secondary = pg.secondary, error = %e, "cannot reconcile a dirty chunk");
        Status::NotAvailable
    })?;
    node.dirty.clear(pg_key, chunk).await.map_err(|_| Status::IoError)?;
    node.metrics.chunks_reconciled.fetch_add(1, Ordering::Relaxed);
    Ok(())
}

/// Waits for the written range's ordering lock, then refuses the write as
/// `StaleEpoch` if a newer map arrived meanwhile: a rebuild copies a chunk
/// under the same lock for the secondary of the newest map, so a write
/// applied or forwarded under the older map could miss the new copy.
async fn lock_in_order<'a>(
    node: &'a SdsNode,
    header: &FrameHeader,
    map: &PlacementMap,
) -> Result<ChunkOrderLock<'a>, Status> {
    let lock = node
        .chunk_locks
        .lock(header.volume_id, header.chunk_index, header.offset, header.length)
        .await;
    if node.placement.known_epoch(header.volume_id) != map.epoch {
        return Err(Status::StaleEpoch);
    }
    Ok(lock)
}

/// A peer that cannot be reached is reported to the MDM, which fails it at
/// once if its own probe fails too (both rate-limited). It may also have
/// registered again at another address (which does not change the epoch):
/// refetch the map, rate-limited.
pub(super) async fn refresh_after_unreachable_peer(
    node: &SdsNode,
    peer_id: u64,
    volume_id: u64,
    error: &ClientError,
) {
    let unreachable = matches!(
        error,
        ClientError::Connect { .. } | ClientError::Transport(_) | ClientError::Timeout(_)
    );
    if unreachable {
        if let Some(identity) = node.identity() {
            node.unreachable.report(&identity.mdm, peer_id);
        }
    }
    if unreachable && node.placement.peer_refresh_due(volume_id, PEER_REFRESH_INTERVAL) {
        let _ = node.fetch_placement(volume_id).await;
    }
}

/// Client FLUSH: `fdatasync` here and on every secondary of the volume's
/// PGs this node is primary of, concurrently.
async fn flush_volume(
    node: &SdsNode,
    identity: &Identity,
    map: &PlacementMap,
) -> Result<(), Status> {
    let me = identity.node_id;
    let secondaries: BTreeSet<u64> = map
        .pgs
        .iter()
        .filter(|pg| pg.primary == me && pg.secondary != me && pg.secondary != 0)
        .map(|pg| pg.secondary)
        .collect();
    let mut forwards = tokio::task::JoinSet::new();
    for secondary in secondaries {
        let Some(endpoint) = map.node(secondary) else { return Err(Status::ReplicaFailed) };
        let peer = node.peers.get(endpoint).map_err(|_| Status::ReplicaFailed)?;
        let forward = FrameHeader {
            op: Op::Flush as u8,
            flags: flags::REPLICA,
            volume_id: map.volume_id,
            epoch: map.epoch,
            token_id: me,
            seq: peer.seq.next(),
            ..FrameHeader::default()
        };
        let key = identity.keys.peer_key.clone();
        forwards.spawn(async move { (secondary, peer.call(forward, &key, Bytes::new()).await) });
    }
    let local = node.store.flush().await;
    let mut replicas_ok = true;
    while let Some(joined) = forwards.join_next().await {
        let ok = matches!(joined, Ok((_, Ok(ref reply))) if reply.status() == Status::Ok);
        if !ok {
            tracing::warn!(outcome = ?joined, "flush on a secondary failed");
            if let Ok((secondary, Err(e))) = &joined {
                refresh_after_unreachable_peer(node, *secondary, map.volume_id, e).await;
            }
            replicas_ok = false;
        }
    }
    local.map_err(|e| store_status(&e))?;
    if replicas_ok {
        Ok(())
    } else {
        Err(Status::ReplicaFailed)
    }
}

/// Bitmap of the chunks in the request's range this node holds.
fn allocation_bitmap(node: &SdsNode, map: &PlacementMap, header: &FrameHeader) -> Vec<u8> {
    let count = u64::from(header.length);
    let mut bits = vec![0u8; count.div_ceil(8) as usize];
    let end = header.chunk_index.saturating_add(count).min(map.chunk_count());
    for chunk in header.chunk_index..end {
        if node.store.is_allocated(header.volume_id, chunk) {
            let i = (chunk - header.chunk_index) as usize;
            bits[i / 8] |= 1 << (i % 8);
        }
    }
    bits
}

/// Secondary side of replication and of rebuild copies.
async fn serve_replica(
    node: &SdsNode,
    identity: &Identity,
    op: Op,
    header: &FrameHeader,
    raw: &[u8; HEADER_LEN],
    payload: Vec<u8>,
    sealing_key: &mut Option<SessionKey>,
) -> Result<Vec<u8>, Status> {
    if op == Op::Auth {
        return Err(Status::Invalid);
    }
    if !FrameHeader::verify_mac(raw, &identity.keys.peer_key, &payload) {
        return Err(Status::BadMac);
    }
    *sealing_key = Some(identity.keys.peer_key.clone());
    let map = node.placement_for(header.volume_id, header.epoch).await?;
    let sender = header.token_id;
    let accept = |seq| {
        if node.peer_windows.accept(sender, seq) {
            Ok(())
        } else {
            Err(Status::Replay)
        }
    };
    match op {
        Op::Flush => {
            accept(header.seq)?;
            node.store.flush().await.map_err(|e| store_status(&e))?;
            Ok(Vec::new())
        }
        Op::Allocation => {
            accept(header.seq)?;
            Ok(allocation_bitmap(node, &map, header))
        }
        Op::Read => {
            let pg = chunk_group(&map, header)?;
            if pg.primary != identity.node_id && pg.secondary != identity.node_id {
                return Err(Status::NotPrimary);
            }
            accept(header.seq)?;
            read_local(node, header).await
        }
        Op::Write | Op::Trim | Op::WriteZeroes => {
            let pg = chunk_group(&map, header)?;
            let copy_here = pg.secondary == identity.node_id || pg.joining == identity.node_id;
            if !copy_here || pg.primary != sender {
                return Err(Status::NotPrimary);
            }
            if op == Op::Write && crc32(&payload) != header.payload_crc {
                return Err(Status::BadCrc);
            }
            accept(header.seq)?;
            // The same ordering lock the primary takes: if this node becomes
            // a primary and copies the chunk for a rebuild, a copy from the
            // old primary that passed the epoch check lands before that copy
            // reads the chunk, or is refused after it.
            let _in_order = lock_in_order(node, header, &map).await?;
            // A forward the primary gave up on (its reply timed out) may still
            // arrive after later forwards of the same blocks: the peer
            // sequence number is taken under the primary's lock, so a lower
            // one is older.
            let key = (sender, header.volume_id, header.chunk_index);
            if !node.replica_fences.admit(key, header.offset, header.length, header.seq) {
                return Err(Status::Superseded);
            }
            apply_local(node, op, header, &payload).await?;
            let whole_chunk = header.offset == 0 && u64::from(header.length) == CHUNK_SIZE;
            let pg_key = (header.volume_id, map.pg_index_of(header.chunk_index).unwrap_or(0));
            if whole_chunk && node.dirty.contains(pg_key, header.chunk_index) {
                // This copy now equals the primary's for the whole chunk:
                // whatever it was ahead with is gone.
                node.dirty.clear(pg_key, header.chunk_index).await.map_err(|_| Status::IoError)?;
            }
            Ok(Vec::new())
        }
        Op::DirtyList => {
            // Only to the PG's primary, for a PG where this node is the
            // secondary being resynced.
            let pg = map.pgs.get(header.chunk_index as usize).ok_or(Status::Invalid)?;
            if pg.primary != sender || pg.secondary != identity.node_id {
                return Err(Status::NotPrimary);
            }
            accept(header.seq)?;
            let chunks = node.dirty.chunks((header.volume_id, header.chunk_index));
            Ok(chunks.iter().flat_map(|c| c.to_le_bytes()).collect())
        }
        Op::Lease => {
            // Granted only under the newest map this node knows
            // (`placement_for` refused older epochs), for the PGs where it is
            // the sender's secondary.
            let pgs: Vec<usize> = map
                .pgs
                .iter()
                .enumerate()
                .filter(|(_, pg)| pg.primary == sender && pg.secondary == identity.node_id)
                .map(|(i, _)| i)
                .collect();
            if pgs.is_empty() || map.epoch != header.epoch {
                return Err(Status::NotPrimary);
            }
            let Some(leases) = &node.leases else {
                // Leases are off here: vouching without recording would let
                // this node serve as primary before the holder's lease ends.
                return Err(Status::Invalid);
            };
            if header.chunk_index < node.placement.mapping_gen(header.volume_id) {
                return Err(Status::Revoked);
            }
            accept(header.seq)?;
            let asked = std::time::Duration::from_millis(u64::from(header.offset));
            if !leases.keep_horizon(leases.config().length.max(asked)).await {
                return Err(Status::IoError);
            }
            let volume = header.volume_id;
            let still_current = || node.placement.known_epoch(volume) == header.epoch;
            if !leases.grant(volume, &pgs, asked, std::time::Instant::now(), still_current) {
                return Err(Status::StaleEpoch);
            }
            Ok(Vec::new())
        }
        Op::LeaseRelease => {
            let index = header.chunk_index as usize;
            let pg = map.pgs.get(index).ok_or(Status::Invalid)?;
            let sender_holds_copy =
                pg.primary == sender || pg.secondary == sender || pg.joining == sender;
            if pg.primary != identity.node_id || sender_holds_copy {
                return Err(Status::NotPrimary);
            }
            accept(header.seq)?;
            if let Some(leases) = &node.leases {
                leases.release(header.volume_id, index);
            }
            Ok(Vec::new())
        }
        Op::Auth | Op::Ping => Err(Status::Invalid),
    }
}
