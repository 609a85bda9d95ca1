//! Test fixture shared by the data-plane and crash tests: a real `mdm` and
//! real `sds` processes on loopback, and a test-side SDC that registers
//! over HTTP, obtains real tokens and drives the data plane with
//! `DataPlaneClient`.
//!
//! Every process is killed by PID when its guard drops, pass or fail.
//! Readiness is polled over HTTP; ports are picked free per cluster.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pflex_dataplane::{DataPlaneClient, Reply};
use pflex_mdm_client::MdmClient;
use pflex_proto::api::{
    ChunkChecksum, ComponentStatus, NodeType, RegisterRequest, VolumeCreate, VolumeMap,
};
use pflex_proto::frame::{crc32, FrameHeader, Op, Status, HEADER_LEN};
use pflex_proto::placement::PlacementMap;
use pflex_proto::token::{AccessMode, ClusterSecret, SessionKey, SignedToken};
use pflex_proto::CHUNK_SIZE;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const READY_TIMEOUT: Duration = Duration::from_secs(90);

pub use pflex_testkit::{free_port, ProcessGuard};

/// Path of the `mdm` binary, building it if it is not there yet.
pub fn mdm_binary() -> PathBuf {
    pflex_testkit::workspace_binary("mdm", "mdm")
}

fn spawn(name: &str, program: &Path, args: &[String], logs: &Path) -> ProcessGuard {
    pflex_testkit::spawn_logged(name, program, args, &logs.join(format!("{name}.log")))
}

/// Polls `probe` until it says ready; panics with the log on timeout or exit.
async fn wait_until<F, Fut>(what: &str, guard: &mut ProcessGuard, logs: &Path, mut probe: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        if probe().await {
            return;
        }
        if let Some(status) = guard.exited() {
            let log = std::fs::read_to_string(logs.join(format!("{}.log", guard.name)))
                .unwrap_or_default();
            panic!("{what} exited ({status}) before it was ready:\n{log}");
        }
        assert!(Instant::now() < deadline, "{what} not ready after {READY_TIMEOUT:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Starts an MDM with state in `mdm_dir` and waits until it answers the
/// admin token it wrote; returns it and an admin client.
async fn start_mdm(
    root: &Path,
    mdm_dir: &Path,
    port: u16,
    join_key_file: &Path,
    http: &reqwest::Client,
    detection: FailureDetection,
) -> (ProcessGuard, MdmClient) {
    let logs = root.join("logs");
    let mdm_url = format!("http://127.0.0.1:{port}");
    let args: Vec<String> = [
        "--listen",
        &format!("127.0.0.1:{port}"),
        "--data-dir",
        mdm_dir.to_str().unwrap(),
        "--join-key-file",
        join_key_file.to_str().unwrap(),
        "--heartbeat-interval-secs",
        "1",
        "--stale-after-secs",
        &(detection.failed_after_secs / 4).max(2).to_string(),
        "--failed-after-secs",
        &detection.failed_after_secs.to_string(),
        "--probe-on-report",
        &detection.probe_on_report.to_string(),
        "--unreachable-grace-secs",
        "2",
        "--token-ttl-secs",
        "600",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut mdm = spawn(&format!("mdm-{}", unique()), &mdm_binary(), &args, &logs);
    let token_path = mdm_dir.join("admin_token");
    wait_until("mdm", &mut mdm, &logs, || {
        let (http, url, token_path) =
            (http.clone(), format!("{mdm_url}/health/status"), token_path.clone());
        async move {
            let Ok(token) = std::fs::read_to_string(&token_path) else { return false };
            let reply = http.get(url).bearer_auth(token.trim()).send().await;
            matches!(reply, Ok(r) if r.status().is_success())
        }
    })
    .await;
    let admin_token = std::fs::read_to_string(&token_path).unwrap().trim().to_string();
    (mdm, MdmClient::new(&mdm_url, Some(admin_token)).unwrap())
}

/// How the MDM decides an SDS has failed.
#[derive(Debug, Clone, Copy)]
pub struct FailureDetection {
    /// Silence after which a node is FAILED and its copies move.
    pub failed_after_secs: u64,
    /// Whether a peer's unreachable report, confirmed by the MDM's probe,
    /// fails a node at once.
    pub probe_on_report: bool,
}

/// One SDS process and how to start it again.
pub struct SdsNode {
    pub name: String,
    pub control_port: u16,
    pub mgmt_port: u16,
    pub data_port: u16,
    args: Vec<String>,
    pub process: Option<ProcessGuard>,
}

impl SdsNode {
    pub fn data_addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.data_port))
    }
}

/// A running MDM and SDS nodes in a temp dir.
pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub mdm_url: String,
    pub admin: MdmClient,
    pub sds: Vec<SdsNode>,
    mdm: ProcessGuard,
    http: reqwest::Client,
    join_key_file: PathBuf,
    pub mdm_port: u16,
    detection: FailureDetection,
    /// The running MDM's data directory.
    pub mdm_dir: PathBuf,
}

impl Cluster {
    /// Starts an MDM and `sds_count` SDS nodes (each its own fault set) and
    /// waits until all are registered.
    /// The MDM fails a node only after 120 s of silence, so tests can kill
    /// and restart nodes without their copies moving.
    pub async fn start(sds_count: usize) -> Cluster {
        Self::start_with(
            sds_count,
            FailureDetection { failed_after_secs: 120, probe_on_report: false },
        )
        .await
    }

    /// As [`Cluster::start`], with the MDM's failure detection as given.
    pub async fn start_with(sds_count: usize, detection: FailureDetection) -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let join_key_file = dir.path().join("join_key");
        std::fs::write(&join_key_file, "test-join-key-0123456789").unwrap();
        let mdm_port = free_port();
        let mdm_url = format!("http://127.0.0.1:{mdm_port}");
        let http = reqwest::Client::new();
        let (mdm, admin) = start_mdm(
            dir.path(),
            &dir.path().join("mdm"),
            mdm_port,
            &join_key_file,
            &http,
            detection,
        )
        .await;
        let mut cluster = Cluster {
            mdm_dir: dir.path().join("mdm"),
            dir,
            mdm_url,
            admin,
            sds: Vec::new(),
            mdm,
            http,
            join_key_file,
            mdm_port,
            detection,
        };
        for n in 1..=sds_count {
            cluster.add_sds(n).await;
        }
        cluster
    }

    /// Replaces the MDM by one with empty state (new cluster secret, no
    /// registrations) on the same address: every SDS must notice (401)
    /// and register again.
    pub async fn restart_mdm_with_fresh_state(&mut self) {
        self.mdm.kill_hard();
        let fresh = self.dir.path().join(format!("mdm-{}", unique()));
        let (mdm, admin) = start_mdm(
            self.dir.path(),
            &fresh,
            self.mdm_port,
            &self.join_key_file,
            &self.http,
            self.detection,
        )
        .await;
        self.mdm = mdm;
        self.admin = admin;
        self.mdm_dir = fresh;
    }

    fn logs(&self) -> PathBuf {
        self.dir.path().join("logs")
    }

    async fn add_sds(&mut self, n: usize) {
        let mdm_url = self.mdm_url.clone();
        self.add_sds_via(n, &mdm_url).await;
    }

    /// Adds SDS number `n` (the next one) that reaches the MDM at `mdm_url`
    /// (say a [`pflex_testkit::TcpRelay`] in front of it, to cut that link
    /// alone) and waits until it is registered.
    pub async fn add_sds_via(&mut self, n: usize, mdm_url: &str) {
        let name = format!("sds{n}");
        let data_dir = self.dir.path().join(&name);
        let (control_port, mgmt_port, data_port) = (free_port(), free_port(), free_port());
        let engine = std::env::var("PFLEX_TEST_IO_ENGINE").unwrap_or_else(|_| "uring".into());
        let args: Vec<String> = vec![
            "--mdm".into(),
            mdm_url.to_string(),
            "--join-key-file".into(),
            self.join_key_file.display().to_string(),
            "--name".into(),
            name.clone(),
            "--index".into(),
            n.to_string(),
            "--host".into(),
            "127.0.0.1".into(),
            "--control-port".into(),
            control_port.to_string(),
            "--mgmt-port".into(),
            mgmt_port.to_string(),
            "--data-port".into(),
            data_port.to_string(),
            "--data-dir".into(),
            data_dir.display().to_string(),
            "--device".into(),
            data_dir.join("dev0.img").display().to_string(),
            "--device-size".into(),
            "128M".into(),
            "--fault-set".into(),
            format!("fs{n}"),
            "--io-engine".into(),
            engine,
            "--heartbeat-interval-secs".into(),
            "1".into(),
            "--ack-interval-secs".into(),
            "1".into(),
            // Every test also checks that reclaiming never touches live copies.
            "--reclaim-interval-secs".into(),
            "1".into(),
        ];
        self.sds.push(SdsNode { name, control_port, mgmt_port, data_port, args, process: None });
        self.start_sds(self.sds.len() - 1).await;
    }

    /// (Re)starts SDS `i` with its original arguments and waits until it
    /// is registered.
    pub async fn start_sds(&mut self, i: usize) {
        let logs = self.logs();
        let node = &mut self.sds[i];
        let log_name = format!("{}-{}", node.name, unique());
        let mut guard = spawn(&log_name, Path::new(env!("CARGO_BIN_EXE_sds")), &node.args, &logs);
        let url = format!("http://127.0.0.1:{}/health", node.mgmt_port);
        let http = self.http.clone();
        wait_until(&node.name.clone(), &mut guard, &logs, || {
            let (http, url) = (http.clone(), url.clone());
            async move {
                let Ok(reply) = http.get(url).send().await else { return false };
                // Registered, and past the wait a restarted process observes
                // before it serves as a primary (leases it may have granted
                // in its earlier life): ACTIVE, not RECOVERING. A test's raw
                // requests are not retried like an SDC's.
                matches!(
                    reply.json::<ComponentStatus>().await,
                    Ok(s) if s.registered && s.status == "ACTIVE"
                )
            }
        })
        .await;
        node.process = Some(guard);
    }

    /// Gives SDS `i` fresh ports for its next start (it is stopped).
    pub fn move_sds_to_new_ports(&mut self, i: usize) {
        let node = &mut self.sds[i];
        assert!(node.process.is_none(), "stop the SDS first");
        let (control, mgmt, data) = (free_port(), free_port(), free_port());
        for (flag, port) in
            [("--control-port", control), ("--mgmt-port", mgmt), ("--data-port", data)]
        {
            let at = node.args.iter().position(|a| a == flag).unwrap();
            node.args[at + 1] = port.to_string();
        }
        (node.control_port, node.mgmt_port, node.data_port) = (control, mgmt, data);
    }

    /// Starts an extra `sds` with `join_key` (not waited for); its log is
    /// `logs/{name}.log`.
    pub fn spawn_sds_with_join_key(&self, name: &str, join_key: &str) -> ProcessGuard {
        let key_file = self.dir.path().join(format!("{name}-join-key"));
        std::fs::write(&key_file, join_key).unwrap();
        let data_dir = self.dir.path().join(name);
        let args: Vec<String> = vec![
            "--mdm".into(),
            self.mdm_url.clone(),
            "--join-key-file".into(),
            key_file.display().to_string(),
            "--name".into(),
            name.into(),
            "--control-port".into(),
            free_port().to_string(),
            "--mgmt-port".into(),
            free_port().to_string(),
            "--data-port".into(),
            free_port().to_string(),
            "--data-dir".into(),
            data_dir.display().to_string(),
            "--device-size".into(),
            "16M".into(),
            "--io-engine".into(),
            "sync".into(),
        ];
        spawn(name, Path::new(env!("CARGO_BIN_EXE_sds")), &args, &self.logs())
    }

    /// The log of a process started by the cluster.
    pub fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.logs().join(format!("{name}.log"))).unwrap_or_default()
    }

    /// Sends SIGTERM to SDS `i` and returns its exit status.
    pub async fn terminate_sds(&mut self, i: usize) -> std::process::ExitStatus {
        let mut process = self.sds[i].process.take().expect("SDS is running");
        let pid = libc::pid_t::try_from(process.pid()).unwrap();
        // SAFETY: kill(2) with a PID this test spawned and still owns (not yet reaped).
        let sent = unsafe { libc::kill(pid, libc::SIGTERM) };
        assert_eq!(sent, 0, "SIGTERM to {pid}");
        process.wait_exit(Duration::from_secs(20)).await.expect("SDS stops on SIGTERM")
    }

    /// `kill -9` of SDS `i`.
    pub fn kill_sds(&mut self, i: usize) {
        if let Some(mut process) = self.sds[i].process.take() {
            process.kill_hard();
        }
    }

    /// The SDS with MDM node id `node_id`.
    pub async fn sds_by_node_id(&self, node_id: u64) -> &SdsNode {
        &self.sds[self.sds_index(node_id).await]
    }

    /// The index in `sds` (for `kill_sds`, `start_sds`) of running node
    /// `node_id`.
    /// The node id SDS `i` registered under.
    pub async fn node_id(&self, i: usize) -> u64 {
        let url = format!("http://127.0.0.1:{}/health", self.sds[i].mgmt_port);
        let status: ComponentStatus =
            self.http.get(url).send().await.unwrap().json().await.unwrap();
        status.node_id.expect("registered")
    }

    pub async fn sds_index(&self, node_id: u64) -> usize {
        for (index, node) in self.sds.iter().enumerate().filter(|(_, n)| n.process.is_some()) {
            let url = format!("http://127.0.0.1:{}/health", node.mgmt_port);
            let status: ComponentStatus =
                self.http.get(url).send().await.unwrap().json().await.unwrap();
            if status.node_id == Some(node_id) {
                return index;
            }
        }
        panic!("no SDS with node id {node_id}");
    }

    /// A chunk's checksum as SDS `node` reports it on its control port.
    pub async fn checksum(&self, node: &SdsNode, volume_id: u64, chunk: u64) -> ChunkChecksum {
        let url =
            format!("http://127.0.0.1:{}/chunk/{volume_id}/{chunk}/checksum", node.control_port);
        let reply = self.http.get(url).send().await.unwrap();
        assert!(reply.status().is_success(), "checksum query: {}", reply.status());
        reply.json().await.unwrap()
    }

    /// An SDS's `/metrics` text (mgmt port).
    pub async fn metrics(&self, node: &SdsNode) -> String {
        let url = format!("http://127.0.0.1:{}/metrics", node.mgmt_port);
        self.http.get(url).send().await.unwrap().text().await.unwrap()
    }

    /// The cluster secret as the MDM stored it (tests sign tokens with it).
    pub fn cluster_secret(&self) -> ClusterSecret {
        let text = std::fs::read_to_string(self.mdm_dir.join("cluster_secret")).unwrap();
        ClusterSecret::from_hex(&text).unwrap()
    }

    /// Registers a test SDC over HTTP and returns its MDM client and id.
    pub async fn register_sdc(&self, name: &str) -> (MdmClient, u64) {
        let anonymous = MdmClient::new(&self.mdm_url, None).unwrap();
        let join_key = std::fs::read_to_string(&self.join_key_file).unwrap();
        let reply = anonymous
            .register(&RegisterRequest {
                join_key: join_key.trim().into(),
                node_type: NodeType::Sdc,
                name: name.into(),
                host: "127.0.0.1".into(),
                control_port: 0,
                mgmt_port: 0,
                data_port: 0,
                fault_set: None,
                pool: None,
                devices: vec![],
            })
            .await
            .expect("register the test SDC");
        assert!(reply.cluster_secret.is_none(), "an SDC must never receive the cluster secret");
        (anonymous.with_credential(reply.credential), reply.node_id)
    }

    /// Creates a volume and maps it to `sdc` with `mode`; returns its id.
    pub async fn create_mapped_volume(&self, name: &str, size: u64, sdc: &str) -> u64 {
        let volume = self
            .admin
            .volume_create(&VolumeCreate {
                name: name.into(),
                size_bytes: size,
                pool: None,
                thick: false,
            })
            .await
            .expect("create volume");
        self.admin
            .volume_map(&VolumeMap {
                volume: name.into(),
                sdc: sdc.into(),
                access_mode: AccessMode::ReadWrite,
            })
            .await
            .expect("map volume");
        volume.id
    }
}

fn unique() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// The test-side SDC view of one volume: its map, a token and clients.
pub struct VolumeSession {
    pub volume_id: u64,
    pub map: PlacementMap,
    pub token: SignedToken,
    pub key: SessionKey,
    seq: Arc<AtomicU64>,
    clients: Vec<(u64, DataPlaneClient)>,
}

impl VolumeSession {
    /// Fetches the map and a token of `mode` from the MDM as `sdc`.
    pub async fn open(sdc: &MdmClient, volume_id: u64, mode: AccessMode) -> VolumeSession {
        let map = sdc.placement(volume_id).await.expect("placement map");
        let issued = sdc.request_token(volume_id, mode).await.expect("token");
        let token = SignedToken::from_hex(&issued.token).unwrap();
        let key = SessionKey::from_hex(&issued.session_key).unwrap();
        Self::with_token(map, token, key)
    }

    /// A session using a token the test made itself.
    pub fn with_token(map: PlacementMap, token: SignedToken, key: SessionKey) -> VolumeSession {
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
            key,
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
        let reply = self.client(node_id).call(header, &self.key, &self.token.encode()).await;
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
        self.client(node_id).call(header, &self.key, payload).await.expect("reply")
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
    header.seal(key);
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
