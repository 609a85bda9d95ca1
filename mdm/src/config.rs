//! Command-line configuration of the `mdm` binary.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Parser;

/// pflex metadata manager: cluster topology, volumes, placement, IO tokens
/// and health, over HTTP. Keeps its state in DATA_DIR/powerflex.db.
#[derive(Debug, Clone, Parser)]
#[command(name = "mdm", version)]
pub struct MdmConfig {
    /// Address of the HTTP API.
    #[arg(long, default_value = "127.0.0.1:8001")]
    pub listen: SocketAddr,

    /// Directory of this node's TLS files (`ca-cert.pem`, `cert.pem`, `key.pem`
    /// from the cluster CA): the API is then served over HTTPS only.
    #[arg(long)]
    pub tls_dir: Option<PathBuf>,

    /// Directory of the MDM's state: powerflex.db, cluster_secret and
    /// admin_token (both created 0600 on first boot).
    #[arg(long, default_value = "./mdm-data")]
    pub data_dir: PathBuf,

    /// File holding a join key: a multi-use bootstrap secret for scripted
    /// installs that lets a component of any role register a new name
    /// (surrounding whitespace ignored). Without one, components enroll
    /// with one-time tokens (`pflex sds add`, `pflex sdc add`).
    #[arg(long, conflicts_with = "join_key")]
    pub join_key_file: Option<PathBuf>,

    /// The join key itself (prefer --join-key-file: command lines are visible
    /// to other local users).
    #[arg(long, env = "PFLEX_JOIN_KEY", hide_env_values = true)]
    pub join_key: Option<String>,

    /// Heartbeat interval told to components at registration, in seconds;
    /// also how often the MDM re-checks health and re-places copies of
    /// failed SDS nodes.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
    pub heartbeat_interval_secs: u64,

    /// A component not heard from for this many seconds is STALE.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..))]
    pub stale_after_secs: u64,

    /// A component not heard from for this many seconds is FAILED; a FAILED
    /// SDS gets no new copies and its copies are re-placed elsewhere.
    #[arg(long, default_value_t = 120, value_parser = clap::value_parser!(u64).range(1..))]
    pub failed_after_secs: u64,

    /// How long a PG whose copy was lost with a FAILED SDS runs degraded (on
    /// its other copy, which logs what it writes) waiting for that SDS to
    /// come back and be resynced with only those chunks, before the copy is
    /// rebuilt in full elsewhere. 0: rebuild elsewhere at once.
    #[arg(long, default_value_t = 0)]
    pub resync_window_secs: u64,

    /// Act on unreachable-SDS reports from peers and clients: probe the
    /// SDS's data port and, if it is down too, declare it FAILED at once.
    /// With `false`, only the failure timeout fails a node.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub probe_on_report: bool,

    /// How long an SDS must stay unreachable to the MDM's probes (made on
    /// reports, at most one a second) before it is declared FAILED: an SDS
    /// restarting in place is not a failed one.
    #[arg(long, default_value_t = 2)]
    pub unreachable_grace_secs: u64,

    /// Lifetime of an IO token, in seconds. SDCs renew at a third of it, so
    /// the data path keeps working through an MDM outage of two thirds of
    /// it (40 minutes by default). Revocation does not wait for expiry: an
    /// unmap or mode change bumps the mapping generation, which every SDS
    /// learns within a heartbeat and then refuses older tokens.
    #[arg(long, default_value_t = 3600, value_parser = clap::value_parser!(u64).range(1..))]
    pub token_ttl_secs: u64,

    /// This MDM's member id in a replicated MDM cluster (3 or 5 members,
    /// one Raft log; see `--mdm-peers`). Without it the MDM runs alone.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub mdm_id: Option<u64>,

    /// The members a new replicated cluster starts with, `ID=URL,...` (each
    /// URL the base of that member's API, this one's included). The lowest
    /// id initialises the cluster when its log is empty; a member added
    /// later (`pflex mdm add`) starts with `--mdm-id` only. Every member
    /// holds the same `cluster_secret` file and, with `--tls-dir`, its own
    /// certificate naming its id (`pflex mdm enroll`).
    #[arg(long, requires = "mdm_id")]
    pub mdm_peers: Option<String>,

    /// A replicated MDM snapshots its database every this many log entries
    /// and drops the entries before (keeping a fifth of that); a member too
    /// far behind, or new, receives the snapshot.
    #[arg(long, default_value_t = 5000, value_parser = clap::value_parser!(u64).range(10..))]
    pub mdm_snapshot_every: u64,

    /// HTTP connections kept open at once; beyond it the least recently
    /// used idle one is closed. Every SDS, SDC and MGMT keeps one open (its
    /// heartbeats reuse it), so this should exceed the number of nodes:
    /// below that, connections are closed and opened again all the time.
    /// Bounded by the open-files limit (raised to its hard limit at start).
    #[arg(long, default_value_t = 16_384, value_parser = clap::value_parser!(u64).range(16..))]
    pub max_connections: u64,
}

impl MdmConfig {
    /// The join key from the file or the flag, if one is given; an error when
    /// it cannot be read or is empty.
    pub fn resolve_join_key(&self) -> Result<Option<String>, std::io::Error> {
        let key = match (&self.join_key_file, &self.join_key) {
            (Some(path), _) => std::fs::read_to_string(path).map_err(|e| {
                std::io::Error::new(
                    e.kind(),
                    format!("reading join key file {}: {e}", path.display()),
                )
            })?,
            (None, Some(key)) => key.clone(),
            (None, None) => return Ok(None),
        };
        let key = key.trim().to_string();
        if key.is_empty() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "the join key is empty",
            ));
        }
        Ok(Some(key))
    }
}
