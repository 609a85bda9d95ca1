//! What the primary needs to keep two copies identical: data-plane clients
//! to peer SDS nodes and one ordering lock per chunk.
//!
//! The primary holds a chunk's [`ChunkOrderLock`] across its local write
//! and the forward to the secondary, so writes to one chunk are applied in
//! the same order on both copies even with many concurrent writers.
//! Different chunks proceed in parallel. Locks exist only while held or
//! awaited: the table holds an entry per busy chunk, not per chunk stored.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pflex_dataplane::DataPlaneClient;
use pflex_proto::placement::SdsEndpoint;

use super::auth::ReplicationSeq;

/// How long a forward may take before the write fails as `ReplicaFailed`.
pub const REPLICA_TIMEOUT: Duration = Duration::from_secs(10);
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

/// Per-chunk ordering locks (see the module doc).
#[derive(Default)]
pub struct ChunkOrderLocks {
    busy: Mutex<HashMap<ChunkKey, Arc<tokio::sync::Mutex<()>>>>,
}

/// Held while a chunk's write is applied to both copies.
pub struct ChunkOrderLock<'a> {
    locks: &'a ChunkOrderLocks,
    key: ChunkKey,
    guard: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl ChunkOrderLocks {
    /// Waits for the chunk's turn (FIFO among waiters).
    pub async fn lock(&self, volume_id: u64, chunk_index: u64) -> ChunkOrderLock<'_> {
        let key = (volume_id, chunk_index);
        let mutex =
            self.busy.lock().unwrap_or_else(|p| p.into_inner()).entry(key).or_default().clone();
        let guard = mutex.lock_owned().await;
        ChunkOrderLock { locks: self, key, guard: Some(guard) }
    }

    /// Chunks with a held or awaited lock.
    pub fn busy(&self) -> usize {
        self.busy.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

impl Drop for ChunkOrderLock<'_> {
    fn drop(&mut self) {
        drop(self.guard.take());
        let mut busy = self.locks.busy.lock().unwrap_or_else(|p| p.into_inner());
        // Only the table's own reference left: nobody holds or awaits it.
        if busy.get(&self.key).is_some_and(|m| Arc::strong_count(m) == 1) {
            busy.remove(&self.key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn chunk_locks_serialize_one_chunk_and_are_released() {
        let locks = Arc::new(ChunkOrderLocks::default());
        let order = Arc::new(Mutex::new(Vec::new()));
        let first = locks.lock(1, 1).await;
        let other_chunk = locks.lock(1, 2).await;
        drop(other_chunk);
        let waiter = {
            let (locks, order) = (locks.clone(), order.clone());
            tokio::spawn(async move {
                let _turn = locks.lock(1, 1).await;
                order.lock().unwrap().push("second");
            })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        order.lock().unwrap().push("first");
        drop(first);
        waiter.await.unwrap();
        assert_eq!(*order.lock().unwrap(), vec!["first", "second"]);
        assert_eq!(locks.busy(), 0);
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
