//! What the SDS tests add to the shared cluster harness
//! ([`pflex_testkit::cluster`]): the flags their MDM and SDS nodes run
//! with, and a test-side SDC that registers over HTTP, obtains real tokens
//! and drives the data plane with `DataPlaneClient` (raw frames included).

#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use pflex_dataplane::{DataPlaneClient, Reply};
use pflex_mdm_client::MdmClient;
use pflex_proto::frame::{crc32, FrameHeader, Op, Status, HEADER_LEN};
use pflex_proto::placement::PlacementMap;
use pflex_proto::token::{AccessMode, SessionKey, SignedToken};
use pflex_proto::CHUNK_SIZE;
use pflex_testkit::cluster::{Cluster, ClusterSpec, MdmOptions};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// How the MDM decides an SDS has failed.
#[derive(Debug, Clone, Copy)]
pub struct FailureDetection {
    /// Silence after which a node is FAILED and its copies move.
    pub failed_after_secs: u64,
    /// Whether a peer's unreachable report, confirmed by the MDM's probe,
    /// fails a node at once.
    pub probe_on_report: bool,
}

/// Starts an MDM and `sds_count` SDS nodes (each its own fault set) and
/// waits until all are registered. The MDM fails a node only after 120 s of
/// silence, so tests can kill and restart nodes without their copies moving.
pub async fn start_cluster(sds_count: usize) -> Cluster {
    let detection = FailureDetection { failed_after_secs: 120, probe_on_report: false };
    start_cluster_with(sds_count, detection).await
}

/// As [`start_cluster`], with the MDM's failure detection as given.
pub async fn start_cluster_with(sds_count: usize, detection: FailureDetection) -> Cluster {
    start_cluster_with_mdm_flags(sds_count, detection, &[]).await
}

/// As [`start_cluster_with`], with more `--flag value` pairs for the MDM.
pub async fn start_cluster_with_mdm_flags(
    sds_count: usize,
    detection: FailureDetection,
    mdm_flags: &[&str],
) -> Cluster {
    let mdm = MdmOptions {
        flags: mdm_flags.iter().map(|f| f.to_string()).collect(),
        heartbeat_interval_secs: 1,
        stale_after_secs: Some((detection.failed_after_secs / 4).max(2)),
        failed_after_secs: Some(detection.failed_after_secs),
        probe_on_report: Some(detection.probe_on_report),
        unreachable_grace_secs: Some(2),
        token_ttl_secs: Some(600),
    };
    let sds_flags = [
        "--ack-interval-secs",
        "1",
        // Every test also checks that reclaiming never touches live copies.
        "--reclaim-interval-secs",
        "1",
    ];
    Cluster::start(ClusterSpec {
        mdm,
        sds_count,
        sds_device_size: "128M".into(),
        sds_flags: sds_flags.map(String::from).to_vec(),
        ..ClusterSpec::default()
    })
    .await
}

/// The test-side SDC view of one volume: its map, a token and clients.
pub struct VolumeSession {
    pub volume_id: u64,
    pub map: PlacementMap,
    pub token: SignedToken,
    /// The token's session key at each SDS.
    pub keys: std::collections::HashMap<u64, SessionKey>,
    seq: Arc<AtomicU64>,
    clients: Vec<(u64, DataPlaneClient)>,
}

impl VolumeSession {
    /// Fetches the map and a token of `mode` from the MDM as `sdc`.
    pub async fn open(sdc: &MdmClient, volume_id: u64, mode: AccessMode) -> VolumeSession {
        let map = sdc.placement(volume_id).await.expect("placement map");
        let issued = sdc.request_token(volume_id, mode).await.expect("token");
        let token = SignedToken::from_hex(&issued.token).unwrap();
        let keys = issued
            .session_keys
            .iter()
            .map(|k| (k.sds_id, SessionKey::from_hex(&k.key).unwrap()))
            .collect();
        Self::with_token(map, token, keys)
    }

    /// A session using a token the test made itself.
    pub fn with_token(
        map: PlacementMap,
        token: SignedToken,
        keys: std::collections::HashMap<u64, SessionKey>,
    ) -> VolumeSession {
        let clients = map
            .nodes
            .iter()
            .map(|n| {
                let addr: SocketAddr = format!("{}:{}", n.host, n.data_port).parse().unwrap();
                (n.id, DataPlaneClient::new(addr, 2))
            })
            .collect();
        VolumeSession {
            volume_id: map.volume_id,
            map,
            token,
            keys,
            // As the SDC does: numbers start at the wall clock in ns, so a
            // session opened later (a new token) numbers above an earlier
            // one, which the SDS's write fencing relies on.
            seq: Arc::new(AtomicU64::new(
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_nanos() as u64,
            )),
            clients,
        }
    }

    /// The token's session key at SDS `node_id`.
    pub fn key(&self, node_id: u64) -> &SessionKey {
        self.keys.get(&node_id).expect("a session key for every SDS")
    }

    pub fn next_seq(&self) -> u64 {
        self.seq.fetch_add(1, Ordering::Relaxed)
    }

    pub fn client(&self, node_id: u64) -> &DataPlaneClient {
        &self.clients.iter().find(|(id, _)| *id == node_id).expect("node in the map").1
    }

    pub fn primary_of(&self, chunk: u64) -> u64 {
        self.map.pg_of(chunk).unwrap().primary
    }

    pub fn secondary_of(&self, chunk: u64) -> u64 {
        self.map.pg_of(chunk).unwrap().secondary
    }

    /// A request header for this volume (seq, epoch, token filled in).
    pub fn header(&self, op: Op, chunk: u64, offset: u32, length: u32) -> FrameHeader {
        FrameHeader {
            op: op as u8,
            volume_id: self.volume_id,
            chunk_index: chunk,
            offset,
            length,
            epoch: self.map.epoch,
            token_id: self.token.token.token_id,
            seq: self.next_seq(),
            ..Default::default()
        }
    }

    /// Presents the token to SDS `node_id` (`IoError` if it cannot be reached).
    pub async fn auth(&self, node_id: u64) -> Status {
        let header = FrameHeader {
            op: Op::Auth as u8,
            volume_id: self.token.token.volume_id,
            token_id: self.token.token.token_id,
            ..Default::default()
        };
        let reply =
            self.client(node_id).call(header, self.key(node_id), &self.token.encode()).await;
        let Ok(reply) = reply else { return Status::IoError };
        if reply.status() == Status::Ok {
            let floor = pflex_proto::frame::decode_sequence_floor(&reply.payload)
                .expect("AUTH reply carries the floor");
            self.seq.fetch_max(floor + 1, Ordering::Relaxed);
        }
        reply.status()
    }

    /// Presents the token to every SDS of the map.
    pub async fn auth_all(&self) {
        for (id, _) in &self.clients {
            assert_eq!(self.auth(*id).await, Status::Ok, "AUTH on node {id}");
        }
    }

    /// Sends a request to node `node_id`.
    pub async fn call(&self, node_id: u64, header: FrameHeader, payload: &[u8]) -> Reply {
        self.client(node_id).call(header, self.key(node_id), payload).await.expect("reply")
    }

    /// Writes to a chunk through its primary.
    pub async fn write(&self, chunk: u64, offset: u32, data: &[u8]) -> Status {
        let header = self.header(Op::Write, chunk, offset, data.len() as u32);
        self.call(self.primary_of(chunk), header, data).await.status()
    }

    /// Reads from a chunk's primary.
    pub async fn read(&self, chunk: u64, offset: u32, length: u32) -> (Status, Vec<u8>) {
        let header = self.header(Op::Read, chunk, offset, length);
        let reply = self.call(self.primary_of(chunk), header, &[]).await;
        (reply.status(), reply.payload)
    }
}

/// Sends raw header bytes (and payload) on a fresh connection and returns
/// the reply header: for frames `DataPlaneClient` would never produce.
pub async fn send_raw(addr: SocketAddr, raw: &[u8; HEADER_LEN], payload: &[u8]) -> FrameHeader {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(raw).await.unwrap();
    stream.write_all(payload).await.unwrap();
    let mut reply = [0u8; HEADER_LEN];
    tokio::time::timeout(Duration::from_secs(20), stream.read_exact(&mut reply))
        .await
        .expect("reply in time")
        .unwrap();
    let header = FrameHeader::decode(&reply).unwrap();
    let mut rest = vec![0u8; header.payload_len(true)];
    stream.read_exact(&mut rest).await.unwrap();
    header
}

/// A sealed raw request (request id, CRC and MAC set as the client would).
pub fn sealed(mut header: FrameHeader, key: &SessionKey, payload: &[u8]) -> [u8; HEADER_LEN] {
    header.request_id = 1;
    header.payload_crc = crc32(payload);
    header.seal(key, payload);
    header.encode()
}

/// The 1 MiB model of a chunk, as the checksum query would report it.
pub fn model_crc(model: &[u8]) -> u32 {
    assert_eq!(model.len() as u64, CHUNK_SIZE);
    crc32(model)
}

/// Deterministic test bytes.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Sum of every sample of metric `name` (any labels) in Prometheus text.
pub fn metric_sum(text: &str, name: &str) -> u64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.split(['{', ' ']).next() == Some(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}
