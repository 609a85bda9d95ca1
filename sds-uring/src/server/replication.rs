//! What the primary needs to keep two copies identical: data-plane clients
//! to peer SDS nodes and one ordering lock per chunk.
//!
//! The primary holds a [`ChunkOrderLock`] on the written range across its
//! local write and the forward to the secondary, so overlapping writes to a
//! chunk are applied in the same order on both copies even with many
//! concurrent writers; writes to disjoint ranges, and to other chunks,
//! proceed in parallel. Locks exist only while held or awaited: the table
//! holds an entry per busy chunk, not per chunk stored.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use pflex_dataplane::{ClientError, DataPlaneClient, Reply};
use pflex_proto::frame::{FrameHeader, Status};
use pflex_proto::placement::SdsEndpoint;
use pflex_proto::token::SessionKey;
use tokio::sync::watch;

use super::auth::ReplicationSeq;

/// How long a forward may take before the write fails as `ReplicaFailed`.
/// Short: the primary holds the chunk's ordering lock meanwhile, so a frozen
/// secondary would otherwise hold up every retry behind it. A forward that
/// is given up may still arrive late; the secondary fences it.
pub const REPLICA_TIMEOUT: Duration = Duration::from_secs(2);
const PEER_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Pooled data-plane clients to peer SDS nodes, by node id.
pub struct PeerClients {
    peers: Mutex<HashMap<u64, Peer>>,
    connections: usize,
}

/// The link to one peer: its client and the sequence numbers of the frames
/// sent to it. One counter per peer keeps each receiver's replay window
/// dense, so frames to other peers cannot push this one's out of it.
#[derive(Clone)]
pub struct Peer {
    pub client: DataPlaneClient,
    pub seq: Arc<ReplicationSeq>,
}

impl Peer {
    /// Sends a replication frame. A receiver that restarted refuses it as
    /// `Replay` with its new floor in the reply's `seq`: the counter moves
    /// above the floor and the frame goes again, once, with a new number
    /// (the caller still holds whatever ordering lock it took the first
    /// number under, so the order of numbers stays the order of frames).
    pub async fn call(
        &self,
        mut header: FrameHeader,
        key: &SessionKey,
        payload: Bytes,
    ) -> Result<Reply, ClientError> {
        let reply = self.client.call_shared(header, key, payload.clone()).await?;
        let floor = reply.header.seq;
        if reply.status() != Status::Replay || floor <= header.seq || !self.seq.raise_above(floor) {
            return Ok(reply);
        }
        header.seq = self.seq.next();
        self.client.call_shared(header, key, payload).await
    }
}

/// A peer's advertised address is not an IP address and port.
#[derive(Debug, thiserror::Error)]
#[error("peer SDS {name} has an unusable address {host}:{port}")]
pub struct BadPeerAddress {
    pub name: String,
    pub host: String,
    pub port: u16,
}

impl PeerClients {
    pub fn new(connections: usize) -> Self {
        Self { peers: Mutex::new(HashMap::new()), connections: connections.max(1) }
    }

    /// The link to `peer`; its client is replaced if the peer's address
    /// changed (the sequence counter stays: the receiver's window is per
    /// sender, not per address).
    pub fn get(&self, peer: &SdsEndpoint) -> Result<Peer, BadPeerAddress> {
        let ip: IpAddr = peer.host.parse().map_err(|_| BadPeerAddress {
            name: peer.name.clone(),
            host: peer.host.clone(),
            port: peer.data_port,
        })?;
        let addr = SocketAddr::new(ip, peer.data_port);
        let mut peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        match peers.get_mut(&peer.id) {
            Some(link) if link.client.addr() == addr => Ok(link.clone()),
            existing => {
                let client = DataPlaneClient::with_timeouts(
                    addr,
                    self.connections,
                    REPLICA_TIMEOUT,
                    PEER_CONNECT_TIMEOUT,
                );
                let seq = existing.map(|link| link.seq.clone()).unwrap_or_default();
                let link = Peer { client, seq };
                peers.insert(peer.id, link.clone());
                Ok(link)
            }
        }
    }
}

type ChunkKey = (u64, u64);

/// Writes are ordered in units of this many bytes: two writes touching the
/// same 4 KiB block are ordered, since the store rewrites whole blocks.
const ORDER_GRANULE: u64 = 4096;

/// Per-chunk ordering of writes (see the module doc). Writes whose 4 KiB
/// ranges overlap are applied one after the other, in the order they
/// arrived; writes to disjoint ranges of the same chunk proceed in
/// parallel, since the order between them cannot change either copy.
#[derive(Default)]
pub struct ChunkOrderLocks {
    busy: Mutex<HashMap<ChunkKey, Vec<RangeHolder>>>,
    next_id: AtomicU64,
}

/// A write that holds or awaits its range.
struct RangeHolder {
    id: u64,
    start: u64,
    end: u64,
    /// Closes when the holder is done (its sender is dropped).
    done: watch::Receiver<()>,
}

/// Held while a write is applied to both copies; dropping it lets the next
/// overlapping write go.
pub struct ChunkOrderLock<'a> {
    locks: &'a ChunkOrderLocks,
    key: ChunkKey,
    id: u64,
    _done: watch::Sender<()>,
}

impl ChunkOrderLocks {
    /// Waits until every earlier write overlapping `offset .. offset + len`
    /// of the chunk has finished. Cancel-safe: a dropped wait leaves the queue.
    pub async fn lock(
        &self,
        volume_id: u64,
        chunk_index: u64,
        offset: u32,
        len: u32,
    ) -> ChunkOrderLock<'_> {
        let key = (volume_id, chunk_index);
        let start = u64::from(offset) / ORDER_GRANULE * ORDER_GRANULE;
        let end =
            (u64::from(offset) + u64::from(len).max(1)).div_ceil(ORDER_GRANULE) * ORDER_GRANULE;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (done_tx, done_rx) = watch::channel(());
        let earlier: Vec<watch::Receiver<()>> = {
            let mut busy = self.busy.lock().unwrap_or_else(|p| p.into_inner());
            let holders = busy.entry(key).or_default();
            let overlapping =
                holders.iter().filter(|h| h.start < end && start < h.end).map(|h| h.done.clone());
            let earlier = overlapping.collect();
            holders.push(RangeHolder { id, start, end, done: done_rx });
            earlier
        };
        let guard = ChunkOrderLock { locks: self, key, id, _done: done_tx };
        for mut previous in earlier {
            // Nothing is ever sent: this resolves when the holder drops its sender.
            while previous.changed().await.is_ok() {}
        }
        guard
    }

    /// Chunks with a write holding or awaiting a range.
    pub fn busy(&self) -> usize {
        self.busy.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

impl Drop for ChunkOrderLock<'_> {
    fn drop(&mut self) {
        let mut busy = self.locks.busy.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(holders) = busy.get_mut(&self.key) {
            holders.retain(|h| h.id != self.id);
            if holders.is_empty() {
                busy.remove(&self.key);
            }
        }
        // `_done` drops after this, waking the writes queued behind this one.
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn overlapping_writes_are_ordered_disjoint_ones_are_not() {
        let locks = Arc::new(ChunkOrderLocks::default());
        let order = Arc::new(Mutex::new(Vec::new()));
        let first = locks.lock(1, 1, 0, 8192).await;
        // Disjoint range of the same chunk, and another chunk: no wait.
        let disjoint = locks.lock(1, 1, 8192, 4096).await;
        let other_chunk = locks.lock(1, 2, 0, 8192).await;
        drop((disjoint, other_chunk));
        // Shares the 4 KiB block at 4096 with `first` (bytes 5000..5001).
        let waiter = {
            let (locks, order) = (locks.clone(), order.clone());
            tokio::spawn(async move {
                let _turn = locks.lock(1, 1, 5000, 1).await;
                order.lock().unwrap().push("second");
            })
        };
        // A later write overlapping the waiter queues behind it, not around it.
        let third = {
            let (locks, order) = (locks.clone(), order.clone());
            tokio::spawn(async move {
                tokio::task::yield_now().await;
                let _turn = locks.lock(1, 1, 4096, 100).await;
                order.lock().unwrap().push("third");
            })
        };
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        order.lock().unwrap().push("first");
        drop(first);
        waiter.await.unwrap();
        third.await.unwrap();
        assert_eq!(*order.lock().unwrap(), vec!["first", "second", "third"]);
        assert_eq!(locks.busy(), 0);
    }

    #[tokio::test]
    async fn a_cancelled_wait_leaves_the_queue() {
        let locks = ChunkOrderLocks::default();
        let held = locks.lock(3, 0, 0, 4096).await;
        let gave_up =
            tokio::time::timeout(Duration::from_millis(10), locks.lock(3, 0, 0, 4096)).await;
        assert!(gave_up.is_err(), "the overlapping write had to wait");
        drop(held);
        let _next = locks.lock(3, 0, 0, 4096).await;
        assert_eq!(locks.busy(), 1);
    }

    #[test]
    fn peer_clients_follow_address_changes() {
        let peers = PeerClients::new(2);
        let mut endpoint = SdsEndpoint {
            id: 4,
            name: "sds4".into(),
            host: "127.0.0.1".into(),
            data_port: 9704,
            fault_set: "fs4".into(),
        };
        let a = peers.get(&endpoint).unwrap();
        let first = a.seq.next();
        assert_eq!(peers.get(&endpoint).unwrap().client.addr(), a.client.addr());
        endpoint.data_port = 9804;
        let moved = peers.get(&endpoint).unwrap();
        assert_eq!(moved.client.addr().port(), 9804);
        assert!(moved.seq.next() > first, "the sequence survives an address change");
        endpoint.host = "not-an-ip".into();
        assert!(peers.get(&endpoint).is_err());
    }
}
