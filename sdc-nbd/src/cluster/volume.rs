//! One mapped volume: its routing state and its IO over the data plane.
//!
//! A [`ClusterVolume`] caches the volume's [`PlacementMap`] and an IO
//! token. Each NBD request is split at chunk boundaries
//! ([`super::split`]) and each piece goes straight to its chunk's primary
//! SDS over the shared [`super::pool::SdsPool`]: the normal IO path makes
//! no MDM call. The MDM is asked only when the data plane says the cached
//! state is out of date:
//!
//! | SDS status | what happens |
//! |---|---|
//! | `StaleEpoch`, `NotPrimary`, `UnknownVolume` | refetch the map, retry |
//! | `NoToken` | present the token with `AUTH` to that SDS, retry |
//! | `Expired`, `Revoked` | fetch a new token, retry (once) |
//! | `NotAvailable`, `ReplicaFailed`, lost connection | back off, refetch the map, retry until the retry budget is spent |
//! | `Superseded` (a newer overlapping write of ours was applied first) | retry with a fresh sequence number |
//! | no reply in time | as above: the copy still queued on the SDS can never land after the retry (write fencing, below) |
//! | anything else | fail the request with the matching NBD error |
//!
//! Every attempt takes a fresh sequence number from the token's counter,
//! since the SDS keeps a replay window per token. The counter starts at the
//! wall clock in nanoseconds and carries over to each renewed token, so for
//! the SDS a higher number from this SDC always means "sent later": that is
//! what its write fencing (a late copy never lands after a newer write)
//! compares.
//!
//! # No data cache
//!
//! The SDC caches routing, never data. NBD clients may open several
//! connections to one export (we advertise `CAN_MULTI_CONN`, which
//! promises that a FLUSH on any connection covers writes acknowledged on
//! every connection), and a volume may be mapped to several SDCs at once.
//! A read cache here would serve stale data after another SDC's write, and
//! a write-back cache would break both the FLUSH promise and the
//! one-ordering-point-per-chunk rule that keeps replicas identical. So a
//! write is acknowledged only when both replicas hold it, and a read always
//! asks the chunk's primary.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures_util::{StreamExt, TryStreamExt};
use pflex_dataplane::ClientError;
use pflex_proto::api::{MappedVolume, TokenResponse};
use pflex_proto::frame::{flags as frame_flags, FrameHeader, Op, Status};
use pflex_proto::placement::PlacementMap;
use pflex_proto::token::{AccessMode, SessionKey, SignedToken};

use super::split::{split, Piece};
use super::ClusterContext;
use crate::backend::{BackendError, ExportInfo, Extent, VolumeIo, ZeroFlags};
use crate::metrics::OpCounters;

/// Most chunks one BLOCK_STATUS answer looks at (the client asks again
/// for the rest).
const MAX_STATUS_CHUNKS: u64 = 8192;
/// Pieces of one TRIM/WRITE_ZEROES sent at once.
const ZERO_CONCURRENCY: usize = 64;
/// Rounds of FLUSH under a changing map before the flush fails.
const FLUSH_ROUNDS: usize = 5;
/// Immediate retries (fresh map, fresh token) before backing off.
const IMMEDIATE_RETRIES: u32 = 3;

/// A token as the SDC holds it: what to present and how to MAC requests.
pub struct TokenState {
    pub token_id: u64,
    /// The encoded signed token, the payload of `AUTH`.
    pub signed: Bytes,
    /// The token's session key at each SDS (by node id).
    keys: HashMap<u64, SessionKey>,
    pub mode: AccessMode,
    pub mapping_gen: u64,
    pub expires_at: u64,
    /// Unix seconds after which the token is renewed (1/3 of its life, so
    /// two thirds of it cover an MDM outage: see "IO without the MDM" in
    /// the architecture notes).
    pub renew_at: u64,
    /// Shared by every token of the volume, so numbers never repeat across
    /// a renewal (an attempt that picked the old token still draws from it).
    seq: Arc<AtomicU64>,
}

impl TokenState {
    /// `seq`: the volume's counter, shared with its previous tokens (a new
    /// one starts at [`first_sequence_number`]), so numbers grow for as long
    /// as this SDC runs: the SDS's write fencing compares them across tokens.
    pub fn from_response(
        resp: &TokenResponse,
        mode: AccessMode,
        seq: Arc<AtomicU64>,
    ) -> Result<Self, BackendError> {
        let signed = SignedToken::from_hex(&resp.token)
            .map_err(|e| BackendError::Io(format!("MDM sent a bad token: {e}")))?;
        let keys = resp
            .session_keys
            .iter()
            .map(|k| SessionKey::from_hex(&k.key).map(|key| (k.sds_id, key)))
            .collect::<Result<HashMap<_, _>, _>>()
            .map_err(|e| BackendError::Io(format!("MDM sent a bad session key: {e}")))?;
        let now = pflex_proto::unix_now();
        let life = resp.expires_at.saturating_sub(now);
        Ok(Self {
            token_id: resp.token_id,
            signed: Bytes::copy_from_slice(&signed.encode()),
            keys,
            mode,
            mapping_gen: resp.mapping_gen,
            expires_at: resp.expires_at,
            renew_at: now + life / 3,
            seq,
        })
    }

    /// The session key of this token at SDS `node_id`; none for a node that
    /// joined after the token was issued (a fresh token has it).
    pub fn key_for(&self, node_id: u64) -> Option<&SessionKey> {
        self.keys.get(&node_id)
    }

    /// The next sequence number of this token (n, n + 1, ...).
    pub fn next_seq(&self) -> u64 {
        self.seq.fetch_add(1, Ordering::Relaxed)
    }

    /// Moves the counter above an SDS's sequence floor (its `AUTH` reply),
    /// below which that SDS refuses every request as a replay.
    pub fn raise_seq_above(&self, floor: u64) {
        self.seq.fetch_max(floor.saturating_add(1), Ordering::Relaxed);
    }

    pub fn needs_renewal(&self, now: u64) -> bool {
        now >= self.renew_at
    }
}

/// Where this process's sequence numbers start: the wall clock in
/// nanoseconds, so an SDC that restarts continues above every number it
/// sent before (it sends far fewer than one request per nanosecond), and a
/// late request from its previous life is fenced like any other.
pub fn first_sequence_number() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1)
        .max(1)
}

/// Counters of one volume (read by acks, heartbeats, the SQLite writer).
#[derive(Default)]
pub struct VolumeStats {
    pub read: OpCounters,
    pub write: OpCounters,
    pub flush: OpCounters,
    pub trim: OpCounters,
    pub write_zeroes: OpCounters,
    pub block_status: OpCounters,
    /// Data-plane requests sent again after a refusal or failure.
    pub retries: AtomicU64,
    pub map_refreshes: AtomicU64,
    pub token_refreshes: AtomicU64,
    pub auths: AtomicU64,
    pub in_flight: AtomicI64,
}

impl VolumeStats {
    /// `(op name for token acks, counters)`.
    pub fn by_op(&self) -> [(&'static str, &OpCounters); 5] {
        [
            ("read", &self.read),
            ("write", &self.write),
            ("flush", &self.flush),
            ("trim", &self.trim),
            ("write_zeroes", &self.write_zeroes),
        ]
    }
}

/// Where a data-plane request goes.
#[derive(Debug, Clone, Copy)]
enum Destination {
    /// The primary of this chunk's PG (looked up in the current map).
    PrimaryOf(u64),
    /// A given SDS (FLUSH, ALLOCATION); skipped if it left the map.
    Node(u64),
}

/// A mapped volume with its cached routing.
pub struct ClusterVolume {
    id: u64,
    ctx: Arc<ClusterContext>,
    mapping: RwLock<MappedVolume>,
    map: RwLock<Arc<PlacementMap>>,
    token: RwLock<Arc<TokenState>>,
    /// Bumped by every successful map fetch (single-flight refreshes).
    map_fetches: AtomicU64,
    map_refresh: tokio::sync::Mutex<()>,
    token_refresh: tokio::sync::Mutex<()>,
    unmapped: AtomicBool,
    /// Woken when the map may have changed (a newer one was stored, or the
    /// MDM answered a report with FAILED): requests waiting on a node that
    /// may no longer be the primary look again instead of waiting out their
    /// timeout. Safe because a late copy of a write is fenced.
    reroute: Arc<tokio::sync::Notify>,
    pub stats: VolumeStats,
}

impl ClusterVolume {
    /// Fetches the map and a token from the MDM.
    pub async fn open(
        ctx: Arc<ClusterContext>,
        mapping: MappedVolume,
    ) -> Result<Arc<Self>, BackendError> {
        let mdm = ctx.mdm()?;
        let map = mdm
            .placement(mapping.volume_id)
            .await
            .map_err(|e| BackendError::Io(format!("placement of {}: {e}", mapping.name)))?;
        let resp = mdm
            .request_token(mapping.volume_id, mapping.access_mode)
            .await
            .map_err(|e| BackendError::Io(format!("token for {}: {e}", mapping.name)))?;
        let seq = Arc::new(AtomicU64::new(first_sequence_number()));
        let token = TokenState::from_response(&resp, mapping.access_mode, seq)?;
        Ok(Arc::new(Self {
            id: mapping.volume_id,
            ctx,
            mapping: RwLock::new(mapping),
            map: RwLock::new(Arc::new(map)),
            token: RwLock::new(Arc::new(token)),
            map_fetches: AtomicU64::new(1),
            map_refresh: tokio::sync::Mutex::new(()),
            token_refresh: tokio::sync::Mutex::new(()),
            unmapped: AtomicBool::new(false),
            reroute: Arc::new(tokio::sync::Notify::new()),
            stats: VolumeStats::default(),
        }))
    }

    pub fn id(&self) -> u64 {
        self.id
    }

    pub fn mapping(&self) -> MappedVolume {
        self.mapping.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn placement(&self) -> Arc<PlacementMap> {
        self.map.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn token(&self) -> Arc<TokenState> {
        self.token.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Takes a new mapping record; a changed access mode or mapping
    /// generation needs a new token (the caller renews it).
    pub fn update_mapping(&self, m: MappedVolume) -> bool {
        let mut cur = self.mapping.write().unwrap_or_else(|p| p.into_inner());
        let needs_token = cur.access_mode != m.access_mode || cur.mapping_gen != m.mapping_gen;
        *cur = m;
        needs_token
    }

    /// The volume was unmapped from this SDC: fail further IO at once.
    pub fn mark_unmapped(&self) {
        self.unmapped.store(true, Ordering::Relaxed);
    }

    pub fn is_unmapped(&self) -> bool {
        self.unmapped.load(Ordering::Relaxed)
    }

    /// Tells the MDM that SDS `node_id` could not be reached (rate-limited,
    /// in the background): if its own probes fail too, the MDM fails the
    /// node and moves its copies, and a map refetched later routes around it.
    fn report_unreachable(&self, node_id: u64) {
        if let Ok(mdm) = self.ctx.mdm() {
            let reroute = self.reroute.clone();
            self.ctx.unreachable.report_then(&mdm, node_id, move || reroute.notify_waiters());
        }
    }

    /// Refetches the placement map unless a fetch completed since
    /// `seen_fetches` (so a burst of `StaleEpoch` replies costs one MDM call).
    pub async fn refresh_map(&self, seen_fetches: u64) -> Result<(), BackendError> {
        let _single = self.map_refresh.lock().await;
        if self.map_fetches.load(Ordering::Acquire) != seen_fetches {
            return Ok(());
        }
        let map = self
            .ctx
            .mdm()?
            .placement(self.id)
            .await
            .map_err(|e| BackendError::Io(format!("refetching placement: {e}")))?;
        let newer = {
            let mut cur = self.map.write().unwrap_or_else(|p| p.into_inner());
            let newer = map.epoch > cur.epoch;
            if map.epoch >= cur.epoch {
                *cur = Arc::new(map);
            }
            newer
        };
        self.map_fetches.fetch_add(1, Ordering::Release);
        if newer {
            self.reroute.notify_waiters();
        }
        self.stats.map_refreshes.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Refetches the map now (heartbeat saw a newer epoch).
    pub async fn refresh_map_now(&self) -> Result<(), BackendError> {
        self.refresh_map(self.map_fetches.load(Ordering::Acquire)).await
    }

    /// Fetches a new token unless the current one is no longer `seen_token_id`.
    pub async fn refresh_token(&self, seen_token_id: u64) -> Result<(), BackendError> {
        let _single = self.token_refresh.lock().await;
        if self.token().token_id != seen_token_id {
            return Ok(());
        }
        let mode = self.mapping().access_mode;
        let resp = self
            .ctx
            .mdm()?
            .request_token(self.id, mode)
            .await
            .map_err(|e| BackendError::Io(format!("renewing the token: {e}")))?;
        let seq = self.token().seq.clone();
        let token = TokenState::from_response(&resp, mode, seq)?;
        *self.token.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(token);
        self.stats.token_refreshes.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Presents the current token to every SDS of the map ahead of IO, so
    /// the first requests after opening or renewing do not each pay a
    /// `NoToken` round trip. Failures are left for the IO path to handle.
    pub async fn present_token(&self) {
        let map = self.placement();
        let token = self.token();
        let presented = futures_util::future::join_all(map.nodes.iter().map(|node| {
            let (map, token) = (&map, &token);
            async move {
                let client = self.ctx.pool.client(node).await?;
                self.authenticate(&client, node.id, map, token).await
            }
        }))
        .await;
        for (node, result) in map.nodes.iter().zip(presented) {
            if let Err(e) = result {
                tracing::debug!(volume = self.id, sds = node.id, error = %e, "presenting the token failed");
            }
        }
    }

    /// Presents the token to one SDS.
    async fn authenticate(
        &self,
        client: &pflex_dataplane::DataPlaneClient,
        node_id: u64,
        map: &PlacementMap,
        token: &TokenState,
    ) -> Result<(), BackendError> {
        self.stats.auths.fetch_add(1, Ordering::Relaxed);
        let Some(key) = token.key_for(node_id) else {
            return self.refresh_token(token.token_id).await;
        };
        let header = FrameHeader {
            op: Op::Auth as u8,
            volume_id: self.id,
            epoch: map.epoch,
            token_id: token.token_id,
            seq: token.next_seq(),
            ..Default::default()
        };
        let reply = client
            .call_shared(header, key, token.signed.clone())
            .await
            .map_err(|e| BackendError::Io(format!("AUTH: {e}")))?;
        match reply.status() {
            Status::Ok => {
                token.raise_seq_above(sequence_floor(&reply.payload)?);
                Ok(())
            }
            Status::Expired | Status::Revoked => self.refresh_token(token.token_id).await,
            other => Err(BackendError::Io(format!("AUTH refused: {}", other.name()))),
        }
    }

    /// Sends one data-plane request, following the table in the module doc.
    /// Returns the reply payload (READ data, ALLOCATION bitmap).
    #[allow(clippy::too_many_arguments)]
    async fn call(
        &self,
        destination: Destination,
        chunk_index: u64,
        op: Op,
        flags: u8,
        offset: u32,
        length: u32,
        payload: Bytes,
    ) -> Result<Vec<u8>, BackendError> {
        let deadline = Instant::now() + self.ctx.config.retry_for;
        let mut attempt = 0u32;
        let mut token_renewed = false;
        loop {
            if self.is_unmapped() {
                return Err(BackendError::Io("volume is no longer mapped to this SDC".into()));
            }
            attempt += 1;
            let fetches = self.map_fetches.load(Ordering::Acquire);
            let map = self.placement();
            let token = self.token();
            let node_id = match destination {
                Destination::PrimaryOf(c) => {
                    map.pg_of(c)
                        .ok_or_else(|| BackendError::Io("placement map has no PGs".into()))?
                        .primary
                }
                Destination::Node(n) => n,
            };
            let Some(node) = map.node(node_id) else {
                if let Destination::Node(_) = destination {
                    return Ok(Vec::new());
                }
                return Err(BackendError::Io(format!("placement names unknown SDS {node_id}")));
            };
            let Some(key) = token.key_for(node_id) else {
                // An SDS newer than the token: a fresh token carries its key.
                if token_renewed {
                    return Err(BackendError::Io(format!(
                        "the MDM gave no session key for SDS {node_id}"
                    )));
                }
                token_renewed = true;
                self.refresh_token(token.token_id).await?;
                continue;
            };
            let client = self.ctx.pool.client(node).await?;
            let header = FrameHeader {
                op: op as u8,
                flags,
                volume_id: self.id,
                chunk_index,
                offset,
                length,
                epoch: map.epoch,
                token_id: token.token_id,
                seq: token.next_seq(),
                ..Default::default()
            };
            let backoff: bool;
            let reason: String;
            let request = client.call_shared(header, key, payload.clone());
            tokio::pin!(request);
            let outcome = loop {
                tokio::select! {
                    outcome = &mut request => break Some(outcome),
                    () = self.reroute.notified() => {
                        let _ = self.refresh_map(fetches).await;
                        if self.placement().epoch != map.epoch {
                            break None;
                        }
                    }
                }
            };
            let Some(outcome) = outcome else {
                // A newer map: go again under it at once.
                self.stats.retries.fetch_add(1, Ordering::Relaxed);
                continue;
            };
            match outcome {
                Ok(reply) => {
                    let status = reply.status();
                    match status {
                        Status::Ok => return Ok(reply.payload),
                        Status::StaleEpoch | Status::NotPrimary | Status::UnknownVolume => {
                            self.refresh_map(fetches).await?;
                            backoff = attempt > IMMEDIATE_RETRIES;
                        }
                        Status::NoToken => {
                            self.authenticate(&client, node_id, &map, &token).await?;
                            backoff = attempt > IMMEDIATE_RETRIES;
                        }
                        Status::Expired | Status::Revoked if !token_renewed => {
                            token_renewed = true;
                            self.refresh_token(token.token_id).await?;
                            backoff = false;
                        }
                        Status::Replay if attempt <= IMMEDIATE_RETRIES => backoff = false,
                        // A newer overlapping write of ours went first; ours
                        // goes again with a fresh (higher) number.
                        Status::Superseded => backoff = attempt > IMMEDIATE_RETRIES,
                        Status::NotAvailable | Status::ReplicaFailed => {
                            let _ = self.refresh_map(fetches).await;
                            // A new map (the MDM moved copies): go at once.
                            backoff = self.placement().epoch == map.epoch;
                        }
                        other => return Err(status_error(other, node_id)),
                    }
                    reason = format!("SDS {node_id} answered {}", status.name());
                }
                Err(
                    e @ (ClientError::Connect { .. }
                    | ClientError::Transport(_)
                    | ClientError::Timeout(_)
                    | ClientError::BadReplyCrc
                    | ClientError::BadReplyMac(_)),
                ) => {
                    self.report_unreachable(node_id);
                    let _ = self.refresh_map(fetches).await;
                    backoff = self.placement().epoch == map.epoch;
                    reason = format!("SDS {node_id}: {e}");
                }
                Err(e) => return Err(BackendError::Io(format!("SDS {node_id}: {e}"))),
            }
            self.stats.retries.fetch_add(1, Ordering::Relaxed);
            let now = Instant::now();
            if now >= deadline {
                return Err(BackendError::Io(format!(
                    "gave up after {attempt} attempts: {reason}"
                )));
            }
            tracing::debug!(volume = self.id, chunk_index, op = ?op, attempt, %reason, "retrying");
            if backoff {
                // 100, 200, 400 ms, then every 400 ms: a failover is found
                // within 0.4 s of the MDM publishing it.
                let exp = attempt.saturating_sub(IMMEDIATE_RETRIES).min(3);
                let delay = Duration::from_millis(50 << exp).min(deadline - now);
                tokio::time::sleep(delay).await;
            }
        }
    }

    fn chunk_size(&self) -> u64 {
        self.placement().chunk_size.max(1)
    }

    async fn read_pieces(&self, offset: u64, length: u32) -> Result<Bytes, BackendError> {
        let pieces: Vec<Piece> = split(offset, u64::from(length), self.chunk_size()).collect();
        let read_one = |p: &Piece| {
            self.call(
                Destination::PrimaryOf(p.chunk_index),
                p.chunk_index,
                Op::Read,
                0,
                p.offset_in_chunk,
                p.length,
                Bytes::new(),
            )
        };
        if let [only] = pieces.as_slice() {
            return read_one(only).await.map(Bytes::from);
        }
        let parts = futures_util::future::try_join_all(pieces.iter().map(read_one)).await?;
        let mut out = BytesMut::with_capacity(length as usize);
        for part in parts {
            out.extend_from_slice(&part);
        }
        Ok(out.freeze())
    }

    async fn write_pieces(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), BackendError> {
        let flags = if fua { frame_flags::FUA } else { 0 };
        let pieces: Vec<Piece> = split(offset, data.len() as u64, self.chunk_size()).collect();
        futures_util::future::try_join_all(pieces.iter().map(|p| {
            self.call(
                Destination::PrimaryOf(p.chunk_index),
                p.chunk_index,
                Op::Write,
                flags,
                p.offset_in_chunk,
                p.length,
                data.slice(p.buffer.clone()),
            )
        }))
        .await?;
        Ok(())
    }

    /// TRIM or WRITE_ZEROES over many chunks, a bounded number at a time.
    async fn zero_pieces(
        &self,
        offset: u64,
        length: u64,
        fua: bool,
        op_for: impl Fn(&Piece) -> Op,
    ) -> Result<(), BackendError> {
        let chunk_size = self.chunk_size();
        let flags = if fua { frame_flags::FUA } else { 0 };
        futures_util::stream::iter(split(offset, length, chunk_size))
            .map(|p| {
                let op = op_for(&p);
                async move {
                    self.call(
                        Destination::PrimaryOf(p.chunk_index),
                        p.chunk_index,
                        op,
                        flags,
                        p.offset_in_chunk,
                        p.length,
                        Bytes::new(),
                    )
                    .await
                }
            })
            .buffer_unordered(ZERO_CONCURRENCY)
            .try_for_each(|_| async { Ok(()) })
            .await
    }

    /// FLUSH to every SDS that is primary for some chunk of the volume;
    /// each primary flushes its secondaries before answering (under the map
    /// the SDC routed by: a primary that knows a newer one answers
    /// `StaleEpoch` and the call goes again under the new map). Ok only when
    /// one whole round ran under an unchanged map, so every copy of the
    /// current replica set is covered; if the map keeps changing, EIO rather
    /// than Ok on a partial flush.
    async fn flush_all(&self) -> Result<(), BackendError> {
        for _ in 0..FLUSH_ROUNDS {
            let map = self.placement();
            let primaries: BTreeSet<u64> = map.pgs.iter().map(|pg| pg.primary).collect();
            futures_util::future::try_join_all(primaries.iter().map(|&node| {
                self.call(Destination::Node(node), 0, Op::Flush, 0, 0, 0, Bytes::new())
            }))
            .await?;
            if self.placement().epoch == map.epoch {
                return Ok(());
            }
        }
        Err(BackendError::Io(format!(
            "FLUSH: the placement map changed during each of {FLUSH_ROUNDS} rounds; \
             not every copy is known to be flushed"
        )))
    }

    /// Allocation of the chunks covering `offset .. offset + length`, from
    /// each chunk's primary (`Op::Allocation`). Errors fall back to
    /// "everything is data", which is always a correct answer.
    async fn allocation(&self, offset: u64, length: u64) -> Vec<Extent> {
        let map = self.placement();
        let chunk_size = map.chunk_size.max(1);
        let end = offset + length;
        let first = offset / chunk_size;
        let last = end.div_ceil(chunk_size).min(first + MAX_STATUS_CHUNKS);
        let count = last - first;
        let primary_of = |c: u64| map.pg_of(c).map(|pg| pg.primary);
        let primaries: BTreeSet<u64> =
            (first..last).take(map.pgs.len().max(1)).filter_map(primary_of).collect();
        let answers = futures_util::future::join_all(primaries.iter().map(|&node| async move {
            let bitmap = self
                .call(
                    Destination::Node(node),
                    first,
                    Op::Allocation,
                    0,
                    0,
                    count as u32,
                    Bytes::new(),
                )
                .await;
            (node, bitmap)
        }))
        .await;
        let mut bitmaps = std::collections::HashMap::new();
        for (node, answer) in answers {
            match answer {
                Ok(bits) if bits.len() as u64 >= count.div_ceil(8) => {
                    bitmaps.insert(node, bits);
                }
                Ok(_) => {
                    tracing::debug!(node, "short allocation bitmap; reporting data");
                    return vec![Extent { length, hole: false }];
                }
                Err(e) => {
                    tracing::debug!(node, error = %e, "allocation query failed; reporting data");
                    return vec![Extent { length, hole: false }];
                }
            }
        }
        let mut extents: Vec<Extent> = Vec::new();
        for c in first..last {
            let i = (c - first) as usize;
            let allocated = primary_of(c)
                .and_then(|node| bitmaps.get(&node))
                .map(|bits| bits[i / 8] & (1 << (i % 8)) != 0)
                .unwrap_or(true);
            let start = (c * chunk_size).max(offset);
            let stop = ((c + 1) * chunk_size).min(end);
            let len = stop - start;
            match extents.last_mut() {
                Some(e) if e.hole != allocated => e.length += len,
                _ => extents.push(Extent { length: len, hole: !allocated }),
            }
        }
        extents
    }

    /// Runs `f`, counting it in `counters` and the in-flight gauge.
    async fn counted<T>(
        &self,
        counters: &OpCounters,
        bytes: u64,
        f: impl std::future::Future<Output = Result<T, BackendError>>,
    ) -> Result<T, BackendError> {
        let started = Instant::now();
        self.stats.in_flight.fetch_add(1, Ordering::Relaxed);
        let r = f.await;
        self.stats.in_flight.fetch_sub(1, Ordering::Relaxed);
        counters.record(bytes, r.is_ok(), started.elapsed());
        r
    }
}

fn status_error(status: Status, node: u64) -> BackendError {
    match status {
        Status::ReadOnly => BackendError::ReadOnly,
        Status::NoSpace => BackendError::NoSpace,
        Status::Invalid => BackendError::Invalid(format!("SDS {node} refused the request")),
        other => BackendError::Io(format!("SDS {node} answered {}", other.name())),
    }
}

impl VolumeIo for ClusterVolume {
    fn info(&self) -> ExportInfo {
        let m = self.mapping();
        ExportInfo {
            description: super::describe(&m),
            name: m.name,
            size: m.size_bytes,
            read_only: m.access_mode == AccessMode::ReadOnly,
        }
    }

    async fn read(&self, offset: u64, length: u32) -> Result<Bytes, BackendError> {
        self.counted(&self.stats.read, u64::from(length), self.read_pieces(offset, length)).await
    }

    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), BackendError> {
        if self.mapping().access_mode == AccessMode::ReadOnly {
            return Err(BackendError::ReadOnly);
        }
        let len = data.len() as u64;
        self.counted(&self.stats.write, len, self.write_pieces(offset, data, fua)).await
    }

    async fn flush(&self) -> Result<(), BackendError> {
        self.counted(&self.stats.flush, 0, self.flush_all()).await
    }

    async fn trim(&self, offset: u64, length: u64, fua: bool) -> Result<(), BackendError> {
        if self.mapping().access_mode == AccessMode::ReadOnly {
            return Err(BackendError::ReadOnly);
        }
        self.counted(&self.stats.trim, length, self.zero_pieces(offset, length, fua, |_| Op::Trim))
            .await
    }

    async fn write_zeroes(
        &self,
        offset: u64,
        length: u64,
        flags: ZeroFlags,
    ) -> Result<(), BackendError> {
        if self.mapping().access_mode == AccessMode::ReadOnly {
            return Err(BackendError::ReadOnly);
        }
        // Zeroing is done by the SDS without moving data over the network,
        // so it is always "fast" in the NBD sense. Whole chunks are
        // deallocated (reads give zeroes) unless the client forbids holes.
        let chunk_size = self.chunk_size();
        let no_hole = flags.no_hole;
        let op_for = move |p: &Piece| {
            if !no_hole && p.is_whole_chunk(chunk_size) {
                Op::Trim
            } else {
                Op::WriteZeroes
            }
        };
        self.counted(
            &self.stats.write_zeroes,
            length,
            self.zero_pieces(offset, length, flags.fua, op_for),
        )
        .await
    }

    async fn block_status(&self, offset: u64, length: u64) -> Result<Vec<Extent>, BackendError> {
        self.counted(&self.stats.block_status, 0, async {
            Ok(self.allocation(offset, length).await)
        })
        .await
    }
}

/// The sequence floor an `AUTH` reply carries.
fn sequence_floor(payload: &[u8]) -> Result<u64, BackendError> {
    pflex_proto::frame::decode_sequence_floor(payload).ok_or_else(|| {
        BackendError::Io(format!(
            "AUTH reply carries {} bytes, not a sequence floor",
            payload.len()
        ))
    })
}
