//! Command-line configuration of the `sds` binary and what it resolves to.
//!
//! Ports default to 9100+N (control), 9200+N (mgmt) and 9700+N (data) for
//! `--index N`; each can be given explicitly (0 picks a free port, which is
//! then registered with the MDM as bound).

use std::path::PathBuf;
use std::time::Duration;

use crate::engine::EngineKind;

/// `sds`: pflex storage server.
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "sds",
    version,
    about = "pflex storage server: stores 1 MiB chunks of volumes on local devices, \
             verifies IO tokens and replicates writes to a second SDS."
)]
pub struct SdsArgs {
    /// Base URL of the MDM.
    #[arg(long, env = "PFLEX_MDM", default_value = "http://127.0.0.1:8001")]
    pub mdm: String,
    /// File holding a one-time enrollment token (`pflex sds add NAME`), used
    /// at the first start; later starts use the credential kept in the data dir.
    #[arg(long, value_name = "PATH")]
    pub enrollment_token_file: Option<PathBuf>,
    /// File holding the cluster join key (read once at start).
    #[arg(long, value_name = "PATH")]
    pub join_key_file: Option<PathBuf>,
    /// The cluster join key itself (prefer --join-key-file: argv is visible to other users).
    #[arg(long, env = "PFLEX_JOIN_KEY", hide_env_values = true)]
    pub join_key: Option<String>,
    /// Node name; re-registering with the same name is the same node.
    #[arg(long, default_value = "sds1")]
    pub name: String,
    /// Node number N: default ports are control 9100+N, mgmt 9200+N, data 9700+N.
    #[arg(long, default_value_t = 1)]
    pub index: u16,
    /// Address to listen on (`--listen` is the same flag); also the one
    /// advertised to the MDM unless `--advertise` says otherwise.
    #[arg(long, alias = "listen", default_value = "127.0.0.1")]
    pub host: String,
    /// Address peers, clients and the MDM's probes reach this node at, if
    /// not the listen address (say it listens on 0.0.0.0).
    #[arg(long)]
    pub advertise: Option<String>,
    /// Control HTTP port (health, metrics, chunk checksums); default 9100+N.
    #[arg(long)]
    pub control_port: Option<u16>,
    /// Management HTTP port (health, metrics); default 9200+N.
    #[arg(long)]
    pub mgmt_port: Option<u16>,
    /// Data-plane TCP port; default 9700+N.
    #[arg(long)]
    pub data_port: Option<u16>,
    /// Threads running the network side (connections, checks, replication);
    /// 1 runs it all on one event loop, which avoids cross-CPU wake-ups per
    /// request. Disk IO runs on one thread per device in any case.
    #[arg(long, env = "PFLEX_NETWORK_THREADS", default_value_t = 1)]
    pub network_threads: usize,
    /// Data-plane connections served at once; when all are taken, a new one
    /// takes the slot of the connection idle longest (which is closed), so
    /// idle connections cannot lock out clients, peers or the MDM's probe.
    #[arg(long, default_value_t = 1024)]
    pub max_connections: usize,
    /// Directory for `sds_local.db` and its kept credential.
    #[arg(long, default_value = "./sds-data")]
    pub data_dir: PathBuf,
    /// Device file or block device (repeatable); default DATA_DIR/dev0.img.
    #[arg(long = "device", value_name = "PATH")]
    pub devices: Vec<PathBuf>,
    /// Size of each --device, e.g. 4G or 512M (repeatable: one per device,
    /// or one for all).
    #[arg(long = "device-size", value_name = "SIZE", value_parser = parse_size)]
    pub device_sizes: Vec<u64>,
    /// Fault set of this node (the two copies of a chunk never share one);
    /// default: the node name.
    #[arg(long)]
    pub fault_set: Option<String>,
    /// Storage pool this node's capacity joins.
    #[arg(long, default_value = "default")]
    pub pool: String,
    /// Disk IO engine: `uring` (io_uring, O_DIRECT) or `sync` (pread/pwrite).
    #[arg(long, default_value = "uring")]
    pub io_engine: EngineKind,
    /// Seconds between heartbeats; default: what the MDM says at registration.
    #[arg(long)]
    pub heartbeat_interval_secs: Option<u64>,
    /// Seconds between batched IO acknowledgements to the MDM.
    #[arg(long, default_value_t = 2)]
    pub ack_interval_secs: u64,
    /// Seconds between passes that release chunks of PGs this node no longer
    /// holds a copy of (after it came back from a failure); 0 turns it off.
    #[arg(long, default_value_t = 60)]
    pub reclaim_interval_secs: u64,
    /// Data-plane connections to each peer SDS (replication); default: one
    /// per network thread.
    #[arg(long)]
    pub peer_connections: Option<usize>,
    /// Directory of this node's TLS files (`ca-cert.pem`, `cert.pem`, `key.pem`
    /// from the cluster CA): the control and management ports then serve HTTPS
    /// only, and the MDM is reached over HTTPS trusting that CA alone.
    #[arg(long, value_name = "DIR")]
    pub tls_dir: Option<PathBuf>,
    /// Length of the lease a primary holds from its secondary, in ms; a
    /// promoted copy serves only after the leases it granted ran out (see
    /// "Leases" in docs/ARCHITECTURE.md). 0 turns leases off (never in
    /// production: a primary cut off from the MDM could then serve stale
    /// reads).
    #[arg(long, default_value_t = 3000)]
    pub lease_ms: u64,
    /// Margin for clock-rate differences between copies, in ms.
    #[arg(long, default_value_t = 300)]
    pub lease_drift_ms: u64,
    /// A device IO that takes longer than this (ms) fails its device: its
    /// chunks are served from their other copies and rebuilt elsewhere.
    /// 0: wait forever.
    #[arg(long, default_value_t = 2000)]
    pub device_timeout_ms: u64,
    /// Seconds between scrub passes (both copies of every chunk read,
    /// checked against their checksums and compared); 0: only on demand.
    #[arg(long, default_value_t = 7 * 24 * 3600)]
    pub scrub_interval_secs: u64,
    /// Scrub reads at most this many MB/s (both copies counted).
    #[arg(long, default_value_t = 100)]
    pub scrub_mb_per_sec: u64,
    /// If the MDM refuses this node because its store holds chunks of
    /// another cluster (an MDM that started over, or the wrong address),
    /// erase them and join that MDM's cluster. Without it the node keeps
    /// its data and keeps asking, for its own MDM to come back.
    #[arg(long, num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    pub erase_foreign_data: bool,
    /// Accept `POST /faults/device` (make a device hang, fail or slow down):
    /// for tests and fault rehearsals only, never in production.
    #[arg(long)]
    pub fault_injection: bool,
}

/// Size of a device created when none is given.
pub const DEFAULT_DEVICE_SIZE: u64 = 1 << 30;

/// Why the arguments cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(transparent)]
    Enrollment(#[from] pflex_mdm_client::EnrollmentError),
    #[error(
        "{devices} devices but {sizes} sizes: give one --device-size per device, or one for all"
    )]
    DeviceSizes { devices: usize, sizes: usize },
    #[error("port {0} is out of range for index {1}")]
    PortRange(u32, u16),
}

/// Everything the server needs, resolved from [`SdsArgs`].
#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub mdm_url: String,
    pub enrollment: pflex_mdm_client::Enrollment,
    pub name: String,
    pub host: String,
    /// What the node registers as its address.
    pub advertise: String,
    pub control_port: u16,
    pub mgmt_port: u16,
    pub data_port: u16,
    pub data_dir: PathBuf,
    pub devices: Vec<(PathBuf, u64)>,
    pub fault_set: Option<String>,
    pub pool: String,
    pub engine: EngineKind,
    pub heartbeat_interval: Option<Duration>,
    pub ack_interval: Duration,
    pub reclaim_interval: Option<Duration>,
    pub peer_connections: usize,
    pub max_connections: usize,
    /// `None`: leases off.
    pub lease: Option<super::lease::LeaseConfig>,
    pub device_health: crate::store::DeviceHealthConfig,
    pub scrub_interval: Option<Duration>,
    pub scrub_bytes_per_sec: u64,
    /// `--tls-dir`: HTTPS on the HTTP ports, and to the MDM.
    pub tls_dir: Option<PathBuf>,
    /// `--erase-foreign-data` (see [`super::cluster_tag`]).
    pub erase_foreign_data: bool,
}

impl SdsArgs {
    /// Resolves defaults, gathers the enrollment proofs and pairs devices with sizes.
    pub fn resolve(&self) -> Result<NodeConfig, ConfigError> {
        let enrollment = pflex_mdm_client::Enrollment::resolve(
            &self.data_dir,
            self.enrollment_token_file.as_deref(),
            self.join_key_file.as_deref(),
            self.join_key.as_deref(),
        )?;
        let port = |explicit: Option<u16>, base: u32| -> Result<u16, ConfigError> {
            match explicit {
                Some(p) => Ok(p),
                None => {
                    let p = base + u32::from(self.index);
                    u16::try_from(p).map_err(|_| ConfigError::PortRange(p, self.index))
                }
            }
        };
        let device_paths = if self.devices.is_empty() {
            vec![self.data_dir.join("dev0.img")]
        } else {
            self.devices.clone()
        };
        let sizes: Vec<u64> = match self.device_sizes.len() {
            0 => vec![DEFAULT_DEVICE_SIZE; device_paths.len()],
            1 => vec![self.device_sizes[0]; device_paths.len()],
            n if n == device_paths.len() => self.device_sizes.clone(),
            n => return Err(ConfigError::DeviceSizes { devices: device_paths.len(), sizes: n }),
        };
        Ok(NodeConfig {
            mdm_url: self.mdm.clone(),
            enrollment,
            name: self.name.clone(),
            host: self.host.clone(),
            advertise: self.advertise.clone().unwrap_or_else(|| self.host.clone()),
            control_port: port(self.control_port, 9100)?,
            mgmt_port: port(self.mgmt_port, 9200)?,
            data_port: port(self.data_port, 9700)?,
            data_dir: self.data_dir.clone(),
            devices: device_paths.into_iter().zip(sizes).collect(),
            fault_set: self.fault_set.clone(),
            pool: self.pool.clone(),
            engine: self.io_engine,
            heartbeat_interval: self.heartbeat_interval_secs.map(|s| Duration::from_secs(s.max(1))),
            ack_interval: Duration::from_secs(self.ack_interval_secs.max(1)),
            reclaim_interval: (self.reclaim_interval_secs > 0)
                .then(|| Duration::from_secs(self.reclaim_interval_secs)),
            peer_connections: self.peer_connections.unwrap_or(self.network_threads).max(1),
            max_connections: self.max_connections.max(1),
            scrub_interval: (self.scrub_interval_secs > 0)
                .then(|| Duration::from_secs(self.scrub_interval_secs)),
            scrub_bytes_per_sec: self.scrub_mb_per_sec.max(1) * 1_000_000,
            tls_dir: self.tls_dir.clone(),
            erase_foreign_data: self.erase_foreign_data,
            device_health: crate::store::DeviceHealthConfig {
                io_deadline: (self.device_timeout_ms > 0)
                    .then(|| Duration::from_millis(self.device_timeout_ms)),
                fault_injection: self.fault_injection,
            },
            lease: (self.lease_ms > 0).then(|| super::lease::LeaseConfig {
                length: Duration::from_millis(self.lease_ms),
                drift: Duration::from_millis(self.lease_drift_ms),
                renew_every: Duration::from_millis((self.lease_ms / 4).max(50)),
            }),
        })
    }
}

pub use pflex_proto::size::parse_size;

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4G"), Ok(4 << 30));
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("512MiB"), Ok(512 << 20));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("4X").is_err());
        assert!(parse_size("G").is_err());
        assert!(parse_size("99999999999T").is_err());
    }

    #[test]
    fn ports_follow_the_index_and_devices_pair_with_sizes() {
        let args = SdsArgs::parse_from([
            "sds",
            "--join-key",
            "k",
            "--index",
            "3",
            "--data-port",
            "1234",
            "--device",
            "/a",
            "--device",
            "/b",
            "--device-size",
            "1G",
        ]);
        let cfg = args.resolve().unwrap();
        assert_eq!((cfg.control_port, cfg.mgmt_port, cfg.data_port), (9103, 9203, 1234));
        assert_eq!(cfg.devices, vec![("/a".into(), 1 << 30), ("/b".into(), 1 << 30)]);
        assert!(!cfg.erase_foreign_data);
        for (line, erase) in
            [(&["--erase-foreign-data"][..], true), (&["--erase-foreign-data", "false"], false)]
        {
            let args = SdsArgs::parse_from(["sds", "--join-key", "k"].iter().chain(line));
            assert_eq!(args.resolve().unwrap().erase_foreign_data, erase, "{line:?}");
        }
        let args = SdsArgs::parse_from([
            "sds",
            "--join-key",
            "k",
            "--device",
            "/a",
            "--device",
            "/b",
            "--device-size",
            "1G",
            "--device-size",
            "2G",
            "--device-size",
            "3G",
        ]);
        assert!(matches!(args.resolve(), Err(ConfigError::DeviceSizes { .. })));
        let args = SdsArgs::parse_from(["sds", "--data-dir", "/nonexistent/pflex-sds"]);
        if std::env::var_os("PFLEX_JOIN_KEY").is_none() {
            assert!(matches!(
                args.resolve(),
                Err(ConfigError::Enrollment(pflex_mdm_client::EnrollmentError::Missing { .. }))
            ));
        }
    }
}
