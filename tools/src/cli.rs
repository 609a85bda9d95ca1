//! The operator subcommands of `pflex` (like PowerFlex `scli`): cluster,
//! SDS, SDC and volume administration through the MDM API.
//!
//! Each command prints a human table by default and the MDM's JSON with
//! `--json`. The MDM address and admin token come from `--mdm` / `--token`
//! (or `PFLEX_MDM` / `PFLEX_TOKEN`), else from a local cluster's data
//! directory (`--data-dir DIR`: `DIR/cluster.json` and `DIR/mdm/admin_token`,
//! the layout `pflex up` creates; `./pflex-data` is tried when present).
//! A refusal by the MDM is printed with the MDM's own message and makes the
//! process exit non-zero.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use pflex_mdm_client::MdmClient;
use pflex_proto::api::{
    ComponentHealth, MovementPolicy, MovementPriority, MovementStatus, NodeType, Volume,
    VolumeCreate, VolumeMap, VolumeUnmap,
};
use pflex_proto::token::AccessMode;
use serde::Serialize;

use pflex_proto::size::{format_size, parse_size};

/// MDM address used when nothing else says where it is.
pub const DEFAULT_MDM: &str = "http://127.0.0.1:8001";
/// Data directory `pflex up` uses by default.
pub const DEFAULT_DATA_DIR: &str = "./pflex-data";

/// Where the MDM is and how to authenticate to it.
#[derive(Debug, Clone, Default, Args)]
pub struct ConnectionArgs {
    /// MDM base URL [default: from the data dir, else http://127.0.0.1:8001].
    #[arg(long, env = "PFLEX_MDM")]
    pub mdm: Option<String>,
    /// Admin token [default: DATA_DIR/mdm/admin_token].
    #[arg(long, env = "PFLEX_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Local cluster data directory (as made by `pflex up`) to read the MDM
    /// URL (cluster.json) and the admin token (mdm/admin_token) from.
    #[arg(long, env = "PFLEX_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
}

impl ConnectionArgs {
    /// This, with anything unset taken from `fallback`.
    pub fn or(self, fallback: &ConnectionArgs) -> ConnectionArgs {
        ConnectionArgs {
            mdm: self.mdm.or_else(|| fallback.mdm.clone()),
            token: self.token.or_else(|| fallback.token.clone()),
            data_dir: self.data_dir.or_else(|| fallback.data_dir.clone()),
        }
    }

    /// Resolves the URL and token: flags and environment first, then the
    /// data directory, then the defaults.
    pub fn client(&self) -> Result<MdmClient> {
        let data_dir = match &self.data_dir {
            Some(dir) => {
                if !dir.is_dir() {
                    bail!("data directory {} does not exist", dir.display());
                }
                Some(dir.clone())
            }
            None if self.mdm.is_none() || self.token.is_none() => {
                Some(PathBuf::from(DEFAULT_DATA_DIR)).filter(|d| d.is_dir())
            }
            None => None,
        };
        let mdm = match (&self.mdm, &data_dir) {
            (Some(url), _) => url.clone(),
            (None, Some(dir)) => mdm_url_from(dir)?,
            (None, None) => DEFAULT_MDM.to_string(),
        };
        if let Some(dir) = &data_dir {
            crate::up::trust_local_ca(dir)?;
        }
        let token = match (&self.token, &data_dir) {
            (Some(token), _) => Some(token.clone()),
            (None, Some(dir)) => Some(admin_token_from(dir)?),
            (None, None) => None,
        };
        MdmClient::new(&mdm, token).with_context(|| format!("MDM address {mdm:?}"))
    }
}

fn mdm_url_from(dir: &Path) -> Result<String> {
    #[derive(serde::Deserialize)]
    struct ClusterFile {
        mdm_url: String,
    }
    let path = dir.join("cluster.json");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let file: ClusterFile =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    Ok(file.mdm_url)
}

/// Writes a rotated admin token into the `admin_token` file of every MDM
/// of the local cluster in `dir` (`mdm`, `mdm2`, ...: the one that rotated
/// wrote its own, the others keep only its digest); the files written.
fn store_rotated_admin_token(dir: &Path, token: &str) -> Result<Vec<PathBuf>> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut written = Vec::new();
    let entries = std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))?;
    let mut members: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("mdm")))
        .map(|p| p.join("admin_token"))
        .filter(|p| p.is_file())
        .collect();
    members.sort();
    for path in members {
        let tmp = path.with_extension("new");
        let _ = std::fs::remove_file(&tmp);
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .with_context(|| format!("creating {}", tmp.display()))?;
        file.write_all(format!("{token}\n").as_bytes())
            .and_then(|()| file.sync_all())
            .with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, &path).with_context(|| format!("replacing {}", path.display()))?;
        written.push(path);
    }
    Ok(written)
}

fn admin_token_from(dir: &Path) -> Result<String> {
    let path = dir.join("mdm").join("admin_token");
    let token =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    Ok(token.trim().to_string())
}

/// Options every admin command takes.
#[derive(Debug, Clone, Args)]
pub struct CommonArgs {
    /// Print the MDM's JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub connection: ConnectionArgs,
}

#[derive(Debug, Clone, Subcommand)]
pub enum ClusterCommand {
    /// Overall health, capacity and every component's liveness.
    Status(CommonArgs),
    /// Data movement: the rate, the ETA and every copy job (resyncs of
    /// copies that came back, rebuilds of copies moved off failed SDS nodes
    /// or devices, moves of rebalance and drain).
    Rebuilds(CommonArgs),
    /// Show or set how fast each SDS may move data (rebuild, resync,
    /// rebalance, drain) and whether client IO comes first.
    RebuildPolicy {
        /// MB/s (10^6 bytes) each SDS may send; 0 means no limit.
        #[arg(long)]
        mb_per_sec: Option<u64>,
        /// Chunks each job keeps in flight (1 to 64).
        #[arg(long)]
        chunks_in_flight: Option<u32>,
        /// `client`: while clients do IO on a node, its jobs keep one chunk
        /// in flight; `movement`: always the full width.
        #[arg(long, value_parser = ["client", "movement"])]
        priority: Option<String>,
        #[command(flatten)]
        common: CommonArgs,
    },
    /// Scrub now: every SDS reads both copies of the chunks it is primary
    /// of, checks them against their block checksums and rewrites a copy
    /// that is corrupt or differs. Waits until every pass has finished.
    Scrub(CommonArgs),
    /// Rotate the key material without stopping IO: a new token signing key
    /// (sent to every SDS first, used a few heartbeats later, the old one
    /// accepted until its tokens expire), a new admin token (written where
    /// the old one was; the old one stops working at once), and every unused
    /// enrollment token and the join key revoked.
    Rotate(CommonArgs),
}

#[derive(Debug, Clone, Subcommand)]
pub enum SdsCommand {
    /// Storage servers: address, fault set, pool, capacity, liveness.
    List(CommonArgs),
    /// Mint a one-time enrollment token for a new SDS named NAME (give it to
    /// that host's `sds --enrollment-token-file`).
    Add(AddNode),
    /// Revoke SDS NAME's credential at once; its name can then be enrolled
    /// again (`pflex sds add NAME`), e.g. for a replaced host.
    Reset(NamedNode),
    /// Drain an SDS (its copies move to the pool's other nodes while IO
    /// goes on, each PG keeping two complete copies), then remove it; waits
    /// until it is removed.
    Remove {
        /// SDS name or id.
        name: String,
        /// Return once draining has started.
        #[arg(long)]
        no_wait: bool,
        /// Longest wait for the drain, in seconds.
        #[arg(long, default_value_t = 3600)]
        timeout_secs: u64,
        #[command(flatten)]
        common: CommonArgs,
    },
}

#[derive(Debug, Clone, Subcommand)]
pub enum SdcCommand {
    /// Clients: address, NBD port, liveness, mapped volumes.
    List(CommonArgs),
    /// Mint a one-time enrollment token for a new SDC (client host) named
    /// NAME (give it to that host's `sdc --enrollment-token-file`).
    Add(AddNode),
    /// Revoke SDC NAME's credential at once; its name can then be enrolled again.
    Reset(NamedNode),
}

/// `sds add` / `sdc add`: the node's name and how long its token lasts.
#[derive(Debug, Clone, Args)]
pub struct AddNode {
    pub name: String,
    /// How long the token may be used, in seconds.
    #[arg(long, default_value_t = 3600)]
    pub ttl_secs: u64,
    /// Also issue the node a certificate from the cluster CA (the data dir's
    /// `tls/ca`), for these host names and addresses (comma separated), into
    /// `--tls-out`; copy that directory to the new host and start the node
    /// with `--tls-dir` pointing at it.
    #[arg(long, value_delimiter = ',', requires = "tls_out")]
    pub tls_host: Vec<String>,
    /// Directory the certificate, its key and the CA certificate go to
    /// (created 0700, files 0600).
    #[arg(long, requires = "tls_host")]
    pub tls_out: Option<PathBuf>,
    #[command(flatten)]
    pub common: CommonArgs,
}

/// A command about one node, by name.
#[derive(Debug, Clone, Args)]
pub struct NamedNode {
    pub name: String,
    #[command(flatten)]
    pub common: CommonArgs,
}

/// Whether a mapping change waits until the SDCs concerned serve it.
#[derive(Debug, Clone, Default, Args)]
pub struct WaitArgs {
    /// Return once the MDM has recorded the change, without waiting for the SDC to serve it
    /// (it then takes effect at the SDC's next heartbeat, within a few seconds).
    #[arg(long)]
    pub no_wait: bool,
}

#[derive(Debug, Clone, Subcommand)]
pub enum VolumeCommand {
    /// Create a volume (thin unless --thick).
    Create {
        /// Name: 1 to 64 of A-Z a-z 0-9 _ . - (not all digits).
        name: String,
        /// Size, e.g. 4G, 512M, 1T (binary units), or bytes.
        #[arg(long, value_parser = parse_size)]
        size: u64,
        /// Reserve the whole size (both copies) now; fails when the pool lacks space.
        #[arg(long)]
        thick: bool,
        /// Storage pool [default: default].
        #[arg(long)]
        pool: Option<String>,
        #[command(flatten)]
        common: CommonArgs,
    },
    /// All volumes.
    List(CommonArgs),
    /// One volume, its mappings and where its copies are.
    Show {
        /// Volume name or id.
        volume: String,
        #[command(flatten)]
        common: CommonArgs,
    },
    /// Grow a volume; returns once every SDC it is mapped to exports the new size.
    Resize {
        /// Volume name or id.
        volume: String,
        /// New size (larger than the current one).
        #[arg(long, value_parser = parse_size)]
        size: u64,
        #[command(flatten)]
        wait: WaitArgs,
        #[command(flatten)]
        common: CommonArgs,
    },
    /// Rename a volume; returns once every SDC it is mapped to exports the new name.
    Rename {
        /// Volume name or id.
        volume: String,
        /// The new name.
        new_name: String,
        #[command(flatten)]
        wait: WaitArgs,
        #[command(flatten)]
        common: CommonArgs,
    },
    /// Delete a volume (refused while it is mapped).
    Delete {
        /// Volume name or id.
        volume: String,
        #[command(flatten)]
        common: CommonArgs,
    },
    /// Map a volume to an SDC; returns once the SDC exports it over NBD.
    Map {
        /// Volume name or id.
        volume: String,
        /// SDC name or id.
        #[arg(long)]
        sdc: String,
        /// Let the SDC read but not write.
        #[arg(long)]
        read_only: bool,
        #[command(flatten)]
        wait: WaitArgs,
        #[command(flatten)]
        common: CommonArgs,
    },
    /// Unmap a volume from an SDC (revokes its IO tokens); returns once the SDC stops exporting it.
    Unmap {
        /// Volume name or id.
        volume: String,
        /// SDC name or id.
        #[arg(long)]
        sdc: String,
        #[command(flatten)]
        wait: WaitArgs,
        #[command(flatten)]
        common: CommonArgs,
    },
}

/// The administration commands (one arm of the top-level command enum).
#[derive(Debug, Clone, Subcommand)]
pub enum AdminCommand {
    /// Cluster-wide status.
    #[command(subcommand)]
    Cluster(ClusterCommand),
    /// Storage data servers.
    #[command(subcommand)]
    Sds(SdsCommand),
    /// Storage data clients.
    #[command(subcommand)]
    Sdc(SdcCommand),
    /// Volumes: create, list, show, resize, rename, delete, map, unmap.
    #[command(subcommand)]
    Volume(VolumeCommand),
    /// The audit log: enrollments, resets and refused registrations, newest first.
    Audit(CommonArgs),
    /// The MDM cluster: members, leader, term, log positions; membership
    /// changes; backups.
    #[command(subcommand)]
    Mdm(MdmCommand),
}

#[derive(Debug, Clone, Subcommand)]
pub enum MdmCommand {
    /// Every member given (`--mdm URL,URL,URL`): its role, term, log
    /// positions and lag behind the leader.
    Status(CommonArgs),
    /// Issue member ID its certificate from the cluster CA (the data dir's
    /// `tls/ca`) before it starts, on a cluster with TLS: its peers take
    /// Raft messages as member ID only from the holder of that certificate.
    Enroll {
        id: u64,
        /// Host names and addresses the member is reached at (comma
        /// separated).
        #[arg(long, value_delimiter = ',', required = true)]
        tls_host: Vec<String>,
        /// Directory the certificate, its key and the CA certificate go to
        /// (created 0700, files 0600): start the member with `--tls-dir`
        /// pointing at a copy of it.
        #[arg(long)]
        tls_out: PathBuf,
        #[command(flatten)]
        common: CommonArgs,
    },
    /// Add a member (started with `mdm --mdm-id ID`, the cluster's
    /// `cluster_secret` and, with TLS, the certificate of `pflex mdm
    /// enroll`): it catches up as a learner, then votes.
    Add {
        id: u64,
        /// Base URL of its API, as the other members reach it.
        url: String,
        #[command(flatten)]
        common: CommonArgs,
    },
    /// Remove member ID (a dead one, or one to retire) while the rest serve.
    /// The id is retired: its Raft messages and certificate are refused from
    /// then on, and a replacement joins under a new id.
    Remove {
        id: u64,
        #[command(flatten)]
        common: CommonArgs,
    },
    /// Write a consistent copy of the MDM database to FILE (restore: start
    /// a new MDM with that file as `DATA_DIR/powerflex.db`; see the README).
    Backup {
        file: PathBuf,
        #[command(flatten)]
        common: CommonArgs,
    },
}

impl AdminCommand {
    fn common(&self) -> &CommonArgs {
        match self {
            AdminCommand::Cluster(
                ClusterCommand::Status(c)
                | ClusterCommand::Rebuilds(c)
                | ClusterCommand::Scrub(c)
                | ClusterCommand::Rotate(c),
            )
            | AdminCommand::Sds(SdsCommand::List(c))
            | AdminCommand::Sdc(SdcCommand::List(c))
            | AdminCommand::Audit(c)
            | AdminCommand::Mdm(MdmCommand::Status(c))
            | AdminCommand::Volume(VolumeCommand::List(c)) => c,
            AdminCommand::Mdm(
                MdmCommand::Add { common, .. }
                | MdmCommand::Enroll { common, .. }
                | MdmCommand::Remove { common, .. }
                | MdmCommand::Backup { common, .. },
            ) => common,
            AdminCommand::Cluster(ClusterCommand::RebuildPolicy { common, .. })
            | AdminCommand::Sds(SdsCommand::Remove { common, .. })
            | AdminCommand::Sds(SdsCommand::Add(AddNode { common, .. }))
            | AdminCommand::Sdc(SdcCommand::Add(AddNode { common, .. }))
            | AdminCommand::Sds(SdsCommand::Reset(NamedNode { common, .. }))
            | AdminCommand::Sdc(SdcCommand::Reset(NamedNode { common, .. })) => common,
            AdminCommand::Volume(
                VolumeCommand::Create { common, .. }
                | VolumeCommand::Show { common, .. }
                | VolumeCommand::Resize { common, .. }
                | VolumeCommand::Rename { common, .. }
                | VolumeCommand::Delete { common, .. }
                | VolumeCommand::Map { common, .. }
                | VolumeCommand::Unmap { common, .. },
            ) => common,
        }
    }
}

/// With `--tls-host`/`--tls-out`: issues `add.name` a certificate from the
/// cluster CA kept in the data dir (`tls/ca`, as `pflex up` made it).
fn issue_node_certificate(connection: &ConnectionArgs, add: &AddNode) -> Result<()> {
    let Some(out) = &add.tls_out else { return Ok(()) };
    issue_certificate(connection, &add.name, &add.tls_host, out)
}

/// Issues `name` a certificate from the cluster CA kept in the data dir
/// (`tls/ca`), for the host names and addresses `hosts`, into `out`.
fn issue_certificate(
    connection: &ConnectionArgs,
    name: &str,
    hosts: &[String],
    out: &Path,
) -> Result<()> {
    let data_dir = connection
        .data_dir
        .clone()
        .or_else(|| Some(PathBuf::from(DEFAULT_DATA_DIR)).filter(|d| d.is_dir()))
        .context("--tls-out needs the data dir that holds the cluster CA (--data-dir)")?;
    let ca_dir = data_dir.join("tls").join("ca");
    let ca = pflex_tls::ClusterCa::load(&ca_dir)
        .with_context(|| format!("loading the cluster CA from {}", ca_dir.display()))?;
    ca.issue(name, hosts, out, pflex_tls::Layout::Node)
        .with_context(|| format!("issuing a certificate into {}", out.display()))?;
    eprintln!(
        "certificate for {name} ({}) in {}: copy the directory to that host and add `--tls-dir DIR`",
        hosts.join(", "),
        out.display()
    );
    Ok(())
}

/// Mints and prints a one-time enrollment token for `name`.
async fn enroll_node(
    client: &MdmClient,
    role: NodeType,
    add: AddNode,
    json: bool,
) -> Result<String> {
    let AddNode { name, ttl_secs, .. } = add;
    let request = pflex_proto::api::EnrollmentRequest {
        role,
        name: Some(name.clone()),
        ttl_secs: Some(ttl_secs),
    };
    let minted = client.create_enrollment(&request).await?;
    if json {
        return to_json(&minted);
    }
    let binary = if role == NodeType::Sds { "sds" } else { "sdc" };
    eprintln!(
        "one-time enrollment token for {} {name}, valid {ttl_secs} s: put it in a file (mode 0600) \
         on that host and start `{binary} --name {name} --enrollment-token-file FILE ...`",
        role.as_str()
    );
    Ok(format!("{}\n", minted.token))
}

/// Revokes `name`'s credential so the name can enroll again.
async fn reset_node(client: &MdmClient, role: NodeType, name: &str, json: bool) -> Result<String> {
    let reply = client.reset_node(role, name).await?;
    if json {
        return to_json(&reply);
    }
    let command = if role == NodeType::Sds { "sds" } else { "sdc" };
    Ok(format!(
        "{} {name}: credential revoked; enroll it again with `pflex {command} add {name}`\n",
        role.as_str()
    ))
}

/// Starts a scrub pass on every ACTIVE SDS (`POST /scrub` on its control
/// port) and waits until each has finished one; returns each one's
/// `GET /scrub` state.
async fn scrub_every_sds(
    nodes: &[pflex_proto::api::SdsInfo],
) -> Result<Vec<(String, serde_json::Value)>> {
    let http = pflex_mdm_client::trust::http_client_builder().build()?;
    let scheme = pflex_mdm_client::trust::scheme();
    let mut started = Vec::new();
    for node in nodes.iter().filter(|n| n.status == "ACTIVE") {
        let url = format!("{scheme}://{}:{}/scrub", node.host, node.control_port);
        // A pass that runs already may have passed some chunks: wait for it
        // to end, then start a fresh one.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3600);
        loop {
            let status: serde_json::Value = http.get(&url).send().await?.json().await?;
            if status["running"] == false {
                let passes = status["passes"].as_u64().unwrap_or(0);
                if http.post(&url).send().await?.status() == reqwest::StatusCode::ACCEPTED {
                    started.push((node.name.clone(), url, passes + 1));
                    break;
                }
            }
            if std::time::Instant::now() > deadline {
                anyhow::bail!("{}: its running scrub pass did not end within an hour", node.name);
            }
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
    }
    let mut reports = Vec::new();
    for (name, url, wanted) in started {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3600);
        loop {
            let status: serde_json::Value = http.get(&url).send().await?.json().await?;
            if status["passes"].as_u64().unwrap_or(0) >= wanted {
                reports.push((name, status));
                break;
            }
            if std::time::Instant::now() > deadline {
                anyhow::bail!("{name}: the scrub pass did not finish within an hour");
            }
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
    }
    Ok(reports)
}

/// Runs one admin command; `outer` holds connection flags given before the
/// subcommand. Returns the text to print.
pub async fn run(command: AdminCommand, outer: &ConnectionArgs) -> Result<String> {
    let common = command.common().clone();
    let connection = common.connection.clone().or(outer);
    let client = connection.client()?;
    let json = common.json;
    match command {
        AdminCommand::Cluster(ClusterCommand::Status(_)) => {
            let summary = client.cluster_summary().await?;
            let health = client.health_status().await?;
            if json {
                return to_json(&serde_json::json!({ "summary": summary, "health": health }));
            }
            let mut out = String::new();
            let _ = writeln!(out, "Cluster:      {}", summary.overall);
            let _ =
                writeln!(out, "Nodes:        {} SDS, {} SDC", summary.sds_count, summary.sdc_count);
            let _ = writeln!(
                out,
                "Volumes:      {} ({} provisioned, {} reserved by thick volumes)",
                summary.volume_count,
                format_size(summary.provisioned_bytes),
                format_size(summary.reserved_bytes)
            );
            let _ = writeln!(
                out,
                "Capacity:     {} raw, {} used",
                format_size(summary.capacity_bytes),
                format_size(summary.used_bytes)
            );
            let _ = writeln!(
                out,
                "Degraded:     {} chunks, {} rebuild jobs active",
                summary.degraded_chunks, summary.rebuild_jobs_active
            );
            out.push('\n');
            out.push_str(&components_table(&health.components));
            Ok(out)
        }
        AdminCommand::Cluster(ClusterCommand::Rotate(_)) => {
            let r = client.cluster_rotate().await?;
            // The local cluster's files, when this command was pointed at it
            // (as `ConnectionArgs::client` resolves it).
            let local = connection.data_dir.clone().or_else(|| {
                (connection.mdm.is_none() || connection.token.is_none())
                    .then(|| PathBuf::from(DEFAULT_DATA_DIR))
                    .filter(|d| d.is_dir())
            });
            let stored = match &local {
                Some(dir) => store_rotated_admin_token(dir, &r.admin_token)?,
                None => Vec::new(),
            };
            if json {
                return to_json(&r);
            }
            let kept = if stored.is_empty() {
                r.admin_token_file.clone()
            } else {
                stored.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
            };
            Ok(format!(
                "signing key generation {} signs new tokens from {} (unix); older keys accepted \
                 until {}\nnew admin token in {kept} (the old one no longer works)\n{} unused \
                 enrollment tokens revoked{}\n",
                r.signing_generation,
                r.signs_from,
                r.previous_accepted_until,
                r.enrollment_tokens_revoked,
                if r.join_key_disabled { "; the join key no longer works" } else { "" }
            ))
        }
        AdminCommand::Cluster(ClusterCommand::Scrub(_)) => {
            let reports = scrub_every_sds(&client.sds_list().await?).await?;
            if json {
                return to_json(&reports);
            }
            let rows = reports
                .iter()
                .map(|(name, r)| {
                    let n = |k: &str| r["last"][k].as_u64().unwrap_or(0).to_string();
                    vec![
                        name.clone(),
                        n("chunks_checked"),
                        n("repaired_here"),
                        n("repaired_there"),
                        n("unchecked"),
                    ]
                })
                .collect();
            Ok(table(
                &["SDS", "CHECKED", "REPAIRED (PRIMARY)", "REPAIRED (SECONDARY)", "UNCHECKED"],
                rows,
            ))
        }
        AdminCommand::Cluster(ClusterCommand::RebuildPolicy {
            mb_per_sec,
            chunks_in_flight,
            priority,
            ..
        }) => {
            let mut policy = client.movement_policy().await?;
            let changing = mb_per_sec.is_some() || chunks_in_flight.is_some() || priority.is_some();
            if changing {
                policy.mb_per_sec = mb_per_sec.unwrap_or(policy.mb_per_sec);
                policy.chunks_in_flight = chunks_in_flight.unwrap_or(policy.chunks_in_flight);
                if let Some(p) = priority {
                    policy.priority = if p == "movement" {
                        MovementPriority::Movement
                    } else {
                        MovementPriority::Client
                    };
                }
                policy = client.set_movement_policy(&policy).await?;
            }
            if json {
                return to_json(&policy);
            }
            Ok(format!("{}\n", policy_line(&policy)))
        }
        AdminCommand::Cluster(ClusterCommand::Rebuilds(_)) => {
            let jobs = client.rebuild_jobs().await?;
            let status = client.movement_status().await?;
            if json {
                return to_json(&serde_json::json!({ "status": status, "jobs": jobs }));
            }
            let mut out = movement_summary(&status);
            let rows = jobs
                .iter()
                .map(|j| {
                    vec![
                        j.job_id.to_string(),
                        j.volume_id.to_string(),
                        j.pg_index.to_string(),
                        j.kind.as_str().to_string(),
                        j.failed_sds.to_string(),
                        format!("{} -> {}", j.source_sds, j.target_sds),
                        j.state.clone(),
                        if j.chunks_total > 0 {
                            format!("{}/{}", j.chunks_copied, j.chunks_total)
                        } else {
                            j.chunks_copied.to_string()
                        },
                        ago(j.updated_at),
                    ]
                })
                .collect();
            out.push_str(&table(
                &["JOB", "VOLUME", "PG", "KIND", "REPLACES", "COPY", "STATE", "CHUNKS", "UPDATED"],
                rows,
            ));
            Ok(out)
        }
        AdminCommand::Sds(SdsCommand::Remove { name, no_wait, timeout_secs, .. }) => {
            let info = client.remove_sds(&name).await?;
            if no_wait {
                return if json {
                    to_json(&info)
                } else {
                    Ok(format!("draining SDS {} (id {})\n", info.name, info.id))
                };
            }
            wait_removed(&client, info.id, Duration::from_secs(timeout_secs)).await?;
            if json {
                return to_json(&info);
            }
            Ok(format!("SDS {} (id {}) drained and removed\n", info.name, info.id))
        }
        AdminCommand::Sds(SdsCommand::Add(add)) => {
            issue_node_certificate(&connection, &add)?;
            enroll_node(&client, NodeType::Sds, add, json).await
        }
        AdminCommand::Sdc(SdcCommand::Add(add)) => {
            issue_node_certificate(&connection, &add)?;
            enroll_node(&client, NodeType::Sdc, add, json).await
        }
        AdminCommand::Sds(SdsCommand::Reset(node)) => {
            reset_node(&client, NodeType::Sds, &node.name, json).await
        }
        AdminCommand::Sdc(SdcCommand::Reset(node)) => {
            reset_node(&client, NodeType::Sdc, &node.name, json).await
        }
        AdminCommand::Mdm(MdmCommand::Status(_)) => {
            let each = client.mdm_status_each().await;
            if json {
                let value: Vec<serde_json::Value> = each
                    .iter()
                    .map(|(url, answer)| match answer {
                        Ok(status) => serde_json::json!({ "url": url, "status": status }),
                        Err(e) => serde_json::json!({ "url": url, "error": e.to_string() }),
                    })
                    .collect();
                return to_json(&value);
            }
            Ok(mdm_status_table(&each))
        }
        AdminCommand::Mdm(MdmCommand::Enroll { id, tls_host, tls_out, .. }) => {
            let name = pflex_tls::mdm_member_name(id);
            issue_certificate(&connection, &name, &tls_host, &tls_out)?;
            if json {
                return to_json(
                    &serde_json::json!({ "id": id, "certificate": name, "dir": tls_out }),
                );
            }
            Ok(format!("MDM member {id} enrolled: certificate {name} in {}\n", tls_out.display()))
        }
        AdminCommand::Mdm(MdmCommand::Add { id, url, .. }) => {
            let status = client.mdm_add(id, &url).await?;
            if json {
                return to_json(&status);
            }
            Ok(format!("MDM {id} at {url} added; members now:\n{}", members_table(&status)))
        }
        AdminCommand::Mdm(MdmCommand::Remove { id, .. }) => {
            let status = client.mdm_remove(id).await?;
            if json {
                return to_json(&status);
            }
            Ok(format!("MDM {id} removed; members now:\n{}", members_table(&status)))
        }
        AdminCommand::Mdm(MdmCommand::Backup { file, .. }) => {
            let bytes = client.mdm_backup().await?;
            let tmp = file.with_extension("partial");
            std::fs::write(&tmp, &bytes).with_context(|| format!("writing {}", tmp.display()))?;
            std::fs::rename(&tmp, &file).with_context(|| format!("writing {}", file.display()))?;
            Ok(format!(
                "MDM database ({}) written to {}\n",
                format_size(bytes.len() as u64),
                file.display()
            ))
        }
        AdminCommand::Audit(_) => {
            let rows = client.audit().await?;
            if json {
                return to_json(&rows);
            }
            let text = |row: &serde_json::Value, k: &str| {
                row.get(k)
                    .map(|v| v.as_str().map_or_else(|| v.to_string(), str::to_string))
                    .unwrap_or_default()
            };
            let rows = rows
                .iter()
                .map(|row| {
                    ["at", "outcome", "action", "target", "source", "detail"]
                        .iter()
                        .map(|k| text(row, k))
                        .collect()
                })
                .collect();
            Ok(table(&["AT", "OUTCOME", "ACTION", "TARGET", "FROM", "DETAIL"], rows))
        }
        AdminCommand::Sds(SdsCommand::List(_)) => {
            let list = client.sds_list().await?;
            if json {
                return to_json(&list);
            }
            let rows = list
                .iter()
                .map(|s| {
                    vec![
                        s.id.to_string(),
                        s.name.clone(),
                        format!("{}:{}", s.host, s.data_port),
                        s.fault_set.clone(),
                        s.pool.clone(),
                        format_size(s.capacity_bytes),
                        format_size(s.used_bytes),
                        if s.draining {
                            format!("{} (draining)", s.status)
                        } else {
                            s.status.clone()
                        },
                        ago(s.last_seen),
                    ]
                })
                .collect();
            Ok(table(
                &["ID", "NAME", "DATA", "FAULT SET", "POOL", "CAPACITY", "USED", "STATUS", "SEEN"],
                rows,
            ))
        }
        AdminCommand::Sdc(SdcCommand::List(_)) => {
            let list = client.sdc_list().await?;
            if json {
                return to_json(&list);
            }
            let rows = list
                .iter()
                .map(|s| {
                    vec![
                        s.id.to_string(),
                        s.name.clone(),
                        format!("{}:{}", s.host, s.nbd_port),
                        s.mapped_volumes.to_string(),
                        s.status.clone(),
                        ago(s.last_seen),
                    ]
                })
                .collect();
            Ok(table(&["ID", "NAME", "NBD", "VOLUMES", "STATUS", "SEEN"], rows))
        }
        AdminCommand::Volume(command) => volume(&client, command, json).await,
    }
}

async fn volume(client: &MdmClient, command: VolumeCommand, json: bool) -> Result<String> {
    let done = |verb: &str, volume: Volume| -> Result<String> {
        if json {
            to_json(&volume)
        } else {
            Ok(format!(
                "{verb} volume {} (id {})\n{}",
                volume.name,
                volume.id,
                volume_details(&volume)
            ))
        }
    };
    match command {
        VolumeCommand::Create { name, size, thick, pool, .. } => {
            let volume =
                client.volume_create(&VolumeCreate { name, size_bytes: size, pool, thick }).await?;
            done("Created", volume)
        }
        VolumeCommand::List(_) => {
            let list = client.volume_list().await?;
            if json {
                return to_json(&list);
            }
            let rows = list
                .iter()
                .map(|v| {
                    vec![
                        v.id.to_string(),
                        v.name.clone(),
                        format_size(v.size_bytes),
                        if v.thick { "thick" } else { "thin" }.to_string(),
                        v.pool.clone(),
                        mapping_list(v),
                        v.epoch.to_string(),
                    ]
                })
                .collect();
            Ok(table(&["ID", "NAME", "SIZE", "TYPE", "POOL", "MAPPED TO", "EPOCH"], rows))
        }
        VolumeCommand::Show { volume, .. } => {
            let shown = client.volume_show(&volume).await?;
            let placement = client.placement(shown.id).await?;
            if json {
                return to_json(&serde_json::json!({ "volume": shown, "placement": placement }));
            }
            let mut out =
                format!("Volume {} (id {})\n{}", shown.name, shown.id, volume_details(&shown));
            let _ = writeln!(
                out,
                "\nPlacement: {} groups, chunk {} (chunk i -> group i mod {})",
                placement.pgs.len(),
                format_size(placement.chunk_size),
                placement.pgs.len()
            );
            let rows = placement
                .nodes
                .iter()
                .map(|node| {
                    let primary = placement.pgs.iter().filter(|pg| pg.primary == node.id).count();
                    let secondary =
                        placement.pgs.iter().filter(|pg| pg.secondary == node.id).count();
                    vec![
                        node.name.clone(),
                        format!("{}:{}", node.host, node.data_port),
                        node.fault_set.clone(),
                        primary.to_string(),
                        secondary.to_string(),
                    ]
                })
                .collect();
            out.push_str(&table(&["SDS", "DATA", "FAULT SET", "PRIMARY", "SECONDARY"], rows));
            Ok(out)
        }
        VolumeCommand::Resize { volume, size, wait, .. } => {
            let resized = client.volume_resize(&volume, size).await?;
            settle(client, &resized, None, &wait).await?;
            done("Resized", resized)
        }
        VolumeCommand::Rename { volume, new_name, wait, .. } => {
            let renamed = client.volume_rename(&volume, &new_name).await?;
            settle(client, &renamed, None, &wait).await?;
            done("Renamed", renamed)
        }
        VolumeCommand::Delete { volume, .. } => {
            let deleted = client.volume_delete(&volume).await?;
            if json {
                return to_json(&deleted);
            }
            Ok(format!("Deleted volume {} (id {})\n", deleted.name, deleted.id))
        }
        VolumeCommand::Map { volume, sdc, read_only, wait, .. } => {
            let access_mode = if read_only { AccessMode::ReadOnly } else { AccessMode::ReadWrite };
            let mapped = client.volume_map(&VolumeMap { volume, sdc, access_mode }).await?;
            settle(client, &mapped, None, &wait).await?;
            done("Mapped", mapped)
        }
        VolumeCommand::Unmap { volume, sdc, wait, .. } => {
            let before = client.volume_show(&volume).await?;
            let unmapped = client.volume_unmap(&VolumeUnmap { volume, sdc }).await?;
            let gone: Vec<u64> = before
                .mappings
                .iter()
                .filter(|m| !unmapped.mappings.iter().any(|n| n.sdc_id == m.sdc_id))
                .map(|m| m.sdc_id)
                .collect();
            settle(client, &unmapped, Some(&gone), &wait).await?;
            done("Unmapped", unmapped)
        }
    }
}

/// Waits until every SDC `volume` is mapped to serves it as the MDM now
/// describes it, and every SDC in `unmapped_from` has stopped exporting it.
/// Says on stderr where each SDC serves it (stdout stays the command's
/// table or JSON).
async fn settle(
    client: &MdmClient,
    volume: &Volume,
    unmapped_from: Option<&[u64]>,
    wait: &WaitArgs,
) -> Result<()> {
    use crate::sdc_wait::{wait_in_effect, Expected, DEFAULT_WAIT};
    if wait.no_wait {
        eprintln!("pflex: the SDCs concerned pick this up at their next heartbeat");
        return Ok(());
    }
    let sdcs = client.sdc_list().await.context("listing SDCs to wait for")?;
    let http = pflex_mdm_client::trust::http_client_builder().build()?;
    for sdc in &sdcs {
        let expected = if volume.mappings.iter().any(|m| m.sdc_id == sdc.id) {
            Expected::Served {
                volume_id: volume.id,
                name: volume.name.clone(),
                size_bytes: volume.size_bytes,
            }
        } else if unmapped_from.is_some_and(|ids| ids.contains(&sdc.id)) {
            Expected::Gone { volume_id: volume.id }
        } else {
            continue;
        };
        match wait_in_effect(&http, sdc, &expected, DEFAULT_WAIT).await? {
            Some(entry) => eprintln!("pflex: {} serves it at {}", sdc.name, entry.nbd_uri),
            None => eprintln!("pflex: {} no longer exports it", sdc.name),
        }
    }
    Ok(())
}

fn to_json(value: &impl Serialize) -> Result<String> {
    Ok(serde_json::to_string_pretty(value)? + "\n")
}

fn mapping_list(volume: &Volume) -> String {
    if volume.mappings.is_empty() {
        return "-".to_string();
    }
    volume
        .mappings
        .iter()
        .map(|m| match m.access_mode {
            AccessMode::ReadOnly => format!("{} (ro)", m.sdc_name),
            AccessMode::ReadWrite => m.sdc_name.clone(),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fn volume_details(volume: &Volume) -> String {
    format!(
        "  size:        {} ({} bytes)\n  type:        {}\n  pool:        {}\n  mapped to:   {}\n  epoch:       {}\n  mapping gen: {}\n",
        format_size(volume.size_bytes),
        volume.size_bytes,
        if volume.thick { "thick" } else { "thin" },
        volume.pool,
        mapping_list(volume),
        volume.epoch,
        volume.mapping_gen,
    )
}

fn components_table(components: &[ComponentHealth]) -> String {
    let rows = components
        .iter()
        .map(|c| {
            vec![
                c.node_id.to_string(),
                c.node_type.as_str().to_string(),
                c.name.clone(),
                c.host.clone(),
                c.status.clone(),
                ago(c.last_seen),
            ]
        })
        .collect();
    table(&["ID", "TYPE", "NAME", "HOST", "STATUS", "SEEN"], rows)
}

/// `12s ago` from a Unix timestamp.
/// One line: the movement policy.
fn policy_line(policy: &MovementPolicy) -> String {
    let limit = if policy.mb_per_sec == 0 {
        "no limit".to_string()
    } else {
        format!("{} MB/s per SDS", policy.mb_per_sec)
    };
    format!(
        "Policy:       {limit}, {} chunks in flight per job, {} first",
        policy.chunks_in_flight,
        policy.priority.as_str()
    )
}

/// Rate, ETA, outstanding jobs and drains, above the job table.
fn movement_summary(status: &MovementStatus) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "{}", policy_line(&status.policy));
    let _ = writeln!(
        out,
        "Outstanding:  {} rebuild, {} resync, {} move jobs; {}/{} chunks sent",
        status.rebuild_jobs,
        status.resync_jobs,
        status.move_jobs,
        status.chunks_copied,
        status.chunks_total
    );
    let eta = status.eta_secs.map_or("-".to_string(), |s| format!("{s} s"));
    let _ = writeln!(out, "Rate:         {}/s, ETA {eta}", format_size(status.rate_bytes_per_sec));
    if !status.draining.is_empty() {
        let _ = writeln!(out, "Draining:     {}", status.draining.join(", "));
    }
    out.push('\n');
    out
}

/// Polls until SDS `id` is gone from the list (drained and removed).
async fn wait_removed(client: &MdmClient, id: u64, timeout: Duration) -> Result<()> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if !client.sds_list().await?.iter().any(|s| s.id == id) {
            return Ok(());
        }
        if std::time::Instant::now() >= deadline {
            let status = client.movement_status().await?;
            bail!(
                "SDS {id} still drains after {} s ({} move jobs outstanding)",
                timeout.as_secs(),
                status.move_jobs
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

fn ago(unix_secs: u64) -> String {
    let secs = pflex_proto::unix_now().saturating_sub(unix_secs);
    match secs {
        0..=119 => format!("{secs}s ago"),
        120..=7199 => format!("{}m ago", secs / 60),
        7200..=172_799 => format!("{}h ago", secs / 3600),
        _ => format!("{}d ago", secs / 86_400),
    }
}

/// Left-aligned columns separated by two spaces.
pub fn table(headers: &[&str], rows: Vec<Vec<String>>) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let line = |out: &mut String, cells: Vec<&str>| {
        let mut text = String::new();
        for (i, (cell, width)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == cells.len() {
                text.push_str(cell);
            } else {
                let _ = write!(text, "{cell:<width$}  ");
            }
        }
        out.push_str(text.trim_end());
        out.push('\n');
    };
    line(&mut out, headers.to_vec());
    for row in &rows {
        line(&mut out, row.iter().map(String::as_str).collect());
    }
    if rows.is_empty() {
        out.push_str("(none)\n");
    }
    out
}

/// `pflex mdm status`: one row per member address.
fn mdm_status_table(
    each: &[(
        String,
        Result<pflex_proto::api::MdmClusterStatus, pflex_mdm_client::MdmClientError>,
    )],
) -> String {
    let leader_index = each
        .iter()
        .filter_map(|(_, a)| a.as_ref().ok())
        .find(|s| s.role == "Leader")
        .and_then(|s| s.last_log_index);
    let rows = each
        .iter()
        .map(|(url, answer)| match answer {
            Ok(s) if !s.replicated => vec![
                url.clone(),
                "-".into(),
                "single".into(),
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
            ],
            Ok(s) => {
                let opt = |v: Option<u64>| v.map_or("-".to_string(), |v| v.to_string());
                let lag = match (leader_index, s.applied_index) {
                    (Some(l), Some(a)) => l.saturating_sub(a).to_string(),
                    _ => "-".to_string(),
                };
                vec![
                    url.clone(),
                    s.id.to_string(),
                    s.role.to_lowercase(),
                    s.term.to_string(),
                    opt(s.committed_index),
                    opt(s.applied_index),
                    lag,
                ]
            }
            Err(e) => vec![
                url.clone(),
                "-".into(),
                if e.status().is_some() {
                    format!("error ({e})")
                } else {
                    "unreachable".to_string()
                },
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
            ],
        })
        .collect();
    table(&["MDM", "ID", "ROLE", "TERM", "COMMITTED", "APPLIED", "LAG"], rows)
}

fn members_table(status: &pflex_proto::api::MdmClusterStatus) -> String {
    let rows = status
        .members
        .iter()
        .map(|m| {
            vec![
                m.id.to_string(),
                m.url.clone(),
                if m.voter { "voter" } else { "learner" }.to_string(),
                m.matched_index.map_or("-".to_string(), |i| i.to_string()),
            ]
        })
        .collect();
    table(&["ID", "URL", "KIND", "MATCHED"], rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_aligns_columns() {
        let out = table(&["A", "LONGER"], vec![vec!["xyz".into(), "1".into()]]);
        assert_eq!(out, "A    LONGER\nxyz  1\n");
        assert!(table(&["A"], vec![]).ends_with("(none)\n"));
    }

    #[test]
    fn connection_from_data_dir() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("mdm")).unwrap();
        std::fs::write(dir.path().join("cluster.json"), r#"{"mdm_url":"http://127.0.0.1:18001"}"#)
            .unwrap();
        std::fs::write(dir.path().join("mdm/admin_token"), "tok\n").unwrap();
        let args = ConnectionArgs { data_dir: Some(dir.path().into()), ..Default::default() };
        let client = args.client().unwrap();
        assert_eq!(client.base_url(), "http://127.0.0.1:18001");
        assert_eq!(client.credential(), Some("tok"));
        // Explicit flags win over the data dir.
        let args = ConnectionArgs {
            mdm: Some("http://127.0.0.1:1".into()),
            token: Some("other".into()),
            data_dir: Some(dir.path().into()),
        };
        let client = args.client().unwrap();
        assert_eq!(client.base_url(), "http://127.0.0.1:1");
        assert_eq!(client.credential(), Some("other"));
        let missing =
            ConnectionArgs { data_dir: Some(dir.path().join("nope")), ..Default::default() };
        assert!(missing.client().is_err());
    }
}
