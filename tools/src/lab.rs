//! `pflex lab`: a cluster spread over emulated hosts, to rehearse faults.
//!
//! Each component host (the MDM with the dashboard, every SDS, the SDC) is a
//! network namespace of its own with one address, `10.N.0.H/32` on its
//! loopback. Every pair of hosts is joined by its own veth pair with a /32
//! route over it, so one link can be cut (taken down) without touching the
//! others: "cut sds1 from the MDM only" is one `ip link set … down` on each
//! side. The root namespace has a management link to every host (address
//! `10.N.0.254`), so `nbdinfo nbd://10.N.0.2:10809/vol1`, fio and the `pflex`
//! CLI work unchanged from the root namespace; cutting a host leaves that
//! link up. Nothing leaves the machine: the only addresses are the ones the
//! lab creates, inside namespaces it creates.
//!
//! Components run under `ip netns exec`, detached, with their command lines
//! and PIDs recorded exactly as `pflex up --detach` records them, so
//! `pflex node start NAME --data-dir DIR` brings a killed one back and
//! `pflex lab down` stops everything and removes every namespace, link and
//! device file (the logs stay).
//! The lab's layout is kept in `DIR/lab.json`.
//!
//! Like `pflex up`, the lab runs TLS unless told otherwise (`--no-tls`):
//! every HTTP API is HTTPS with certificates from the lab's CA naming each
//! host's address, and the MDM members of a replicated MDM know each other
//! by the member ids in their certificates, so kills and partitions are
//! rehearsed on the configuration a cluster runs in. The NBD export stays
//! plain for clients without a certificate (STARTTLS is offered).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use pflex_mdm_client::MdmClient;
use pflex_proto::api::NodeType;
use serde::{Deserialize, Serialize};

use crate::up::{self, RecordedCommand, UpArgs};

/// `pflex lab …`.
#[derive(Debug, Clone, clap::Args)]
pub struct LabArgs {
    /// Where the lab keeps its state (lab.json, logs, device files).
    #[arg(
        long = "data-dir",
        value_name = "DIR",
        default_value = "/var/tmp/pflex-lab",
        global = true
    )]
    pub data_dir: PathBuf,
    #[command(subcommand)]
    pub command: LabCommand,
}

#[derive(Debug, Clone, clap::Subcommand)]
pub enum LabCommand {
    /// Create the hosts and links and start the cluster on them; waits until the
    /// volume serves over NBD, then prints how to reach it.
    Up(LabUp),
    /// Cut HOST's links to every other lab host, or only the one to --from.
    Cut {
        host: String,
        #[arg(long)]
        from: Option<String>,
    },
    /// Restore what `cut` took down (the same HOST and --from).
    Heal {
        host: String,
        #[arg(long)]
        from: Option<String>,
    },
    /// `kill -9` HOST's component (bring it back with `pflex node start HOST --data-dir DIR`).
    Kill { host: String },
    /// Freeze HOST's component (SIGSTOP): its kernel still accepts connections.
    Stop { host: String },
    /// Resume a frozen component (SIGCONT).
    Cont { host: String },
    /// Make a device of SDS host HOST hang, fail with EIO or slow down (lab
    /// SDS nodes run with `--fault-injection`); `none` clears it, and a hung
    /// device then completes what it held.
    Fault {
        host: String,
        #[arg(value_enum)]
        fault: FaultKind,
        /// Device index (or path) on that SDS.
        #[arg(long, default_value = "0")]
        device: String,
        /// Delay of each IO with `slow`, ms.
        #[arg(long, default_value_t = 500)]
        delay_ms: u64,
    },
    /// Hosts, addresses, links (up or cut) and processes.
    Status,
    /// Stop every component and remove every namespace and link the lab made.
    Down,
    /// Run fault scenarios, each in a fresh lab under DIR, with `pflex verify`
    /// writing at queue depth 1 and 16 while the fault happens, then check.
    Chaos(crate::chaos::ChaosArgs),
    /// Measure a rebuild's cost to client IO at each movement limit, one
    /// fresh lab per case (sds3 killed, fio during the rebuild).
    RebuildBench(crate::rebuild_bench::RebuildBenchArgs),
}

/// The dashboard's port, on the MDM's host.
const MGMT_PORT: u16 = 8080;

/// A device fault `pflex lab fault` injects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum FaultKind {
    Hang,
    Eio,
    Slow,
    None,
}

/// Options of `pflex lab up`.
#[derive(Debug, Clone, clap::Args)]
pub struct LabUp {
    /// Number of SDS hosts, each its own fault set.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u16).range(2..=32))]
    pub sds: u16,
    /// SDS hosts made ready but not started (after the others, each its
    /// own fault set): start one with `pflex node start sdsN` to add it to
    /// the pool and watch the rebalance.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u16).range(0..=8))]
    pub spare_sds: u16,
    /// MDMs, each on its own host (`mdm`, `mdm2`, ...): 1, or 3 or 5 kept
    /// identical by a Raft log (kill or cut the leader and watch another
    /// take over).
    #[arg(long = "mdm", default_value_t = 1, value_parser = up::mdm_count)]
    pub mdm_count: u16,
    /// With several MDMs: make a replacement member ready without starting
    /// it (`mdmN+1`, member id N+1, an empty database, on the last member's
    /// host and address). Rehearse replacing a dead MDM: kill `mdmN`,
    /// `pflex mdm remove N`, `pflex node start mdmN+1`, `pflex mdm add N+1 URL`.
    #[arg(long)]
    pub spare_mdm: bool,
    /// Prefix of the namespaces' and root links' names (at most 6 characters).
    #[arg(long, default_value = "pflex")]
    pub name: String,
    /// Second octet of the lab's addresses (10.N.0.0/24).
    #[arg(long, default_value_t = 213)]
    pub net: u8,
    /// Size of each SDS device file.
    #[arg(long, default_value = "2G", value_parser = pflex_proto::size::parse_size)]
    pub device_size: u64,
    /// Size of the volume vol1.
    #[arg(long, default_value = "1G", value_parser = pflex_proto::size::parse_size)]
    pub volume_size: u64,
    /// Heartbeat interval of every component, seconds.
    #[arg(long, default_value_t = 2)]
    pub heartbeat_interval_secs: u64,
    /// The MDM fails a silent SDS after this many seconds (its copies move).
    #[arg(long, default_value_t = 120)]
    pub failure_timeout_secs: u64,
    /// IO token lifetime in seconds (the data path needs the MDM for renewal
    /// only, at a third of it).
    #[arg(long, default_value_t = 3600)]
    pub token_ttl_secs: u64,
    /// How long the SDC retries one IO before failing it with EIO.
    #[arg(long, default_value_t = 30)]
    pub io_retry_secs: u64,
    /// Directory holding the component binaries (default: next to `pflex`).
    #[arg(long)]
    pub bin_dir: Option<PathBuf>,
    /// Plain HTTP between the components (by default every HTTP API is
    /// HTTPS with certificates from the lab's CA, as with `pflex up`).
    #[arg(long)]
    pub no_tls: bool,
    /// The CA that issues the lab's certificates, made when missing
    /// (default DIR/tls/ca). Labs made one after another by one process
    /// share one; its certificate is copied to DIR/tls/ca either way.
    #[arg(long, value_name = "DIR")]
    pub ca_dir: Option<PathBuf>,
}

/// One emulated host.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LabHost {
    pub name: String,
    pub namespace: String,
    pub address: String,
}

/// What `lab.json` keeps.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LabLayout {
    pub name: String,
    pub net: u8,
    pub hosts: Vec<LabHost>,
    /// Name of each root-namespace management link, by host.
    pub root_links: BTreeMap<String, String>,
    pub nbd_uri: String,
    pub mdm_url: String,
    /// Whether the components serve HTTPS (a lab written before TLS did not).
    #[serde(default)]
    pub tls: bool,
}

impl LabLayout {
    /// `https` or `http`, as the lab's HTTP APIs speak.
    pub fn scheme(&self) -> &'static str {
        if self.tls {
            "https"
        } else {
            "http"
        }
    }

    /// The URL of `path` on the HTTP port `port` of lab host `host`.
    pub fn url(&self, host: &str, port: u16, path: &str) -> Result<String> {
        Ok(format!("{}://{}:{port}{path}", self.scheme(), self.host(host)?.address))
    }

    fn host(&self, name: &str) -> Result<&LabHost> {
        self.hosts.iter().find(|h| h.name == name).with_context(|| {
            let names: Vec<_> = self.hosts.iter().map(|h| h.name.as_str()).collect();
            format!("no lab host {name} (hosts: {})", names.join(", "))
        })
    }
}

/// The link inside `host`'s namespace that leads to `peer`.
fn link_name(peer: &str) -> String {
    format!("to-{peer}")
}

fn layout_file(dir: &Path) -> PathBuf {
    dir.join("lab.json")
}

fn load(dir: &Path) -> Result<LabLayout> {
    let path = layout_file(dir);
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("reading {} (is a lab up in this data dir?)", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

/// Runs `ip ARGS…`; an error carries its stderr.
fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip").args(args).output().context("running ip (iproute2)")?;
    if !out.status.success() {
        bail!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// `pflex lab …`.
pub async fn run(args: LabArgs) -> Result<()> {
    let dir = &args.data_dir;
    match args.command {
        LabCommand::Up(up_args) => {
            let layout = up_lab(dir, &up_args).await?;
            print_ready(dir, &layout);
            Ok(())
        }
        LabCommand::Cut { host, from } => set_links(dir, &host, from.as_deref(), false),
        LabCommand::Heal { host, from } => set_links(dir, &host, from.as_deref(), true),
        LabCommand::Kill { host } => signal(dir, &host, libc::SIGKILL),
        LabCommand::Stop { host } => signal(dir, &host, libc::SIGSTOP),
        LabCommand::Cont { host } => signal(dir, &host, libc::SIGCONT),
        LabCommand::Fault { host, fault, device, delay_ms } => {
            inject_fault(dir, &host, fault, &device, delay_ms).await
        }
        LabCommand::Status => status(dir),
        LabCommand::Down => down(dir).await,
        LabCommand::Chaos(chaos) => crate::chaos::run(dir, chaos).await,
        LabCommand::RebuildBench(bench) => crate::rebuild_bench::run(dir, bench).await,
    }
}

/// `pflex lab fault`: POSTs the fault to the SDS's control port.
pub async fn inject_fault(
    dir: &Path,
    host: &str,
    fault: FaultKind,
    device: &str,
    delay_ms: u64,
) -> Result<()> {
    let layout = load(dir)?;
    layout.host(host)?;
    if !host.starts_with("sds") {
        bail!("{host} is not an SDS host: only SDS devices take faults");
    }
    let body = match fault {
        FaultKind::Hang => serde_json::json!({"device": device, "fault": "hang"}),
        FaultKind::Eio => serde_json::json!({"device": device, "fault": "eio"}),
        FaultKind::Slow => {
            serde_json::json!({"device": device, "fault": "slow", "delay_ms": delay_ms})
        }
        FaultKind::None => serde_json::json!({"device": device, "fault": "none"}),
    };
    let url = layout.url(host, 9100, "/faults/device")?;
    up::trust_local_ca(dir)?;
    let reply = pflex_mdm_client::trust::http_client_builder()
        .build()?
        .post(&url)
        .json(&body)
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .with_context(|| format!("POST {url}"))?;
    let status = reply.status();
    let text = reply.text().await.unwrap_or_default();
    if !status.is_success() {
        bail!("{host} refused the fault ({status}): {text}");
    }
    println!("{host}: device faults now {text}");
    Ok(())
}

/// Builds the namespaces and links; on any failure removes what it made.
fn build_network(layout: &LabLayout) -> Result<()> {
    let root_addr = format!("10.{}.0.254", layout.net);
    for h in &layout.hosts {
        ip(&["netns", "add", &h.namespace])?;
        ip(&["-n", &h.namespace, "link", "set", "lo", "up"])?;
        ip(&["-n", &h.namespace, "addr", "add", &format!("{}/32", h.address), "dev", "lo"])?;
        // The management link from the root namespace.
        let root_link = &layout.root_links[&h.name];
        ip(&[
            "link",
            "add",
            root_link,
            "type",
            "veth",
            "peer",
            "name",
            "to-root",
            "netns",
            &h.namespace,
        ])?;
        ip(&["addr", "add", &format!("{root_addr}/32"), "dev", root_link])?;
        ip(&["link", "set", root_link, "up"])?;
        ip(&["route", "add", &format!("{}/32", h.address), "dev", root_link, "src", &root_addr])?;
        ip(&["-n", &h.namespace, "link", "set", "to-root", "up"])?;
        ip(&[
            "-n",
            &h.namespace,
            "route",
            "add",
            &format!("{root_addr}/32"),
            "dev",
            "to-root",
            "src",
            &h.address,
        ])?;
    }
    for (i, a) in layout.hosts.iter().enumerate() {
        for b in &layout.hosts[i + 1..] {
            ip(&[
                "link",
                "add",
                &link_name(&b.name),
                "netns",
                &a.namespace,
                "type",
                "veth",
                "peer",
                "name",
                &link_name(&a.name),
                "netns",
                &b.namespace,
            ])?;
            link_up(a, b)?;
            link_up(b, a)?;
        }
    }
    Ok(())
}

/// Brings `from`'s link to `to` up and routes `to`'s address over it.
fn link_up(from: &LabHost, to: &LabHost) -> Result<()> {
    let link = link_name(&to.name);
    ip(&["-n", &from.namespace, "link", "set", &link, "up"])?;
    ip(&[
        "-n",
        &from.namespace,
        "route",
        "replace",
        &format!("{}/32", to.address),
        "dev",
        &link,
        "src",
        &from.address,
    ])
}

fn link_down(from: &LabHost, to: &LabHost) -> Result<()> {
    ip(&["-n", &from.namespace, "link", "set", &link_name(&to.name), "down"])
}

fn set_links(dir: &Path, host: &str, from: Option<&str>, up: bool) -> Result<()> {
    let layout = load(dir)?;
    let a = layout.host(host)?;
    let peers: Vec<&LabHost> = match from {
        Some(peer) => vec![layout.host(peer)?],
        None => layout.hosts.iter().filter(|h| h.name != a.name).collect(),
    };
    for b in peers {
        if up {
            link_up(a, b)?;
            link_up(b, a)?;
        } else {
            link_down(a, b)?;
            link_down(b, a)?;
        }
        println!("{} {} <-> {}", if up { "healed" } else { "cut" }, a.name, b.name);
    }
    Ok(())
}

pub(crate) fn signal(dir: &Path, host: &str, signal: libc::c_int) -> Result<()> {
    let layout = load(dir)?;
    layout.host(host)?;
    let Some(pid) = up::running_pid(dir, host) else {
        bail!("{host}'s component is not running (bring it back: pflex node start {host} --data-dir {})", dir.display());
    };
    // SAFETY: kill(2) on a PID the lab recorded for this host, checked by
    // `running_pid` to still be that component.
    if unsafe { libc::kill(pid, signal) } != 0 {
        bail!("signalling {host} (pid {pid}): {}", std::io::Error::last_os_error());
    }
    println!("{host}: pid {pid} signalled ({signal})");
    Ok(())
}

fn status(dir: &Path) -> Result<()> {
    let layout = load(dir)?;
    println!(
        "lab {} (10.{}.0.0/24): NBD {}  MDM {}",
        layout.name, layout.net, layout.nbd_uri, layout.mdm_url
    );
    for h in &layout.hosts {
        let pid =
            up::running_pid(dir, &h.name).map(|p| p.to_string()).unwrap_or_else(|| "-".into());
        let out = Command::new("ip").args(["-n", &h.namespace, "-o", "link", "show"]).output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        let cut: Vec<String> = text
            .lines()
            .filter(|l| l.contains("to-") && !l.contains("to-root") && !l.contains(",UP"))
            .filter_map(|l| l.split_whitespace().nth(1))
            .map(|n| n.trim_end_matches(':').split('@').next().unwrap_or("").to_string())
            .collect();
        println!(
            "  {:<6} {:<15} ns {:<14} pid {:<8} cut: {}",
            h.name,
            h.address,
            h.namespace,
            pid,
            if cut.is_empty() { "-".into() } else { cut.join(" ") }
        );
    }
    Ok(())
}

/// `pflex lab down`: stops the components, deletes the namespaces (which
/// removes their links and the root ends with them) and `lab.json`.
pub async fn down(dir: &Path) -> Result<()> {
    let layout = load(dir)?;
    up::stop_recorded(dir, &[]).await;
    for h in &layout.hosts {
        let _ = ip(&["netns", "del", &h.namespace]);
        let _ = ip(&["link", "del", &layout.root_links[&h.name]]);
    }
    let _ = std::fs::remove_file(dir.join("logs").join("pids"));
    // Everything but the logs: the device files are preallocated, and the
    // next `pflex lab up` starts from nothing.
    for h in &layout.hosts {
        let _ = std::fs::remove_dir_all(dir.join(&h.name));
    }
    let _ = std::fs::remove_dir_all(dir.join("mgmt"));
    for file in ["cluster.json", "components.json"] {
        let _ = std::fs::remove_file(dir.join(file));
    }
    std::fs::remove_file(layout_file(dir))?;
    eprintln!("lab {} removed (logs kept in {})", layout.name, dir.join("logs").display());
    Ok(())
}

fn plan(args: &LabUp) -> Result<LabLayout> {
    if args.name.is_empty()
        || args.name.len() > 6
        || !args.name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
    {
        bail!("--name must be 1 to 6 of a-z 0-9 -");
    }
    let addr = |h: u16| format!("10.{}.0.{h}", args.net);
    let scheme = if args.no_tls { "http" } else { "https" };
    let mut hosts = vec![("mdm".to_string(), addr(1)), ("sdc1".to_string(), addr(2))];
    for n in 1..args.mdm_count {
        hosts.push((up::mdm_member_name(n), addr(2 + n)));
    }
    for n in 1..=args.sds + args.spare_sds {
        hosts.push((format!("sds{n}"), addr(10 + n)));
    }
    let hosts: Vec<LabHost> = hosts
        .into_iter()
        .map(|(name, address)| LabHost {
            namespace: format!("{}-{name}", args.name),
            name,
            address,
        })
        .collect();
    let root_links =
        hosts.iter().map(|h| (h.name.clone(), format!("{}-{}", args.name, h.name))).collect();
    Ok(LabLayout {
        name: args.name.clone(),
        net: args.net,
        nbd_uri: format!("nbd://{}:10809/vol1", addr(2)),
        mdm_url: (0..args.mdm_count)
            .map(|n| format!("{scheme}://{}:8001", addr(if n == 0 { 1 } else { 2 + n })))
            .collect::<Vec<_>>()
            .join(","),
        hosts,
        root_links,
        tls: !args.no_tls,
    })
}

/// The lab's CA: `--ca-dir`, or DIR/tls/ca. Every later command on the lab
/// (`pflex node start`, `pflex lab fault`) trusts DIR/tls/ca, so the
/// certificate of a CA kept elsewhere is copied there.
fn lab_ca(dir: &Path, args: &LabUp) -> Result<pflex_tls::ClusterCa> {
    let local = dir.join("tls").join("ca");
    let ca_dir = args.ca_dir.clone().unwrap_or_else(|| local.clone());
    let ca = pflex_tls::ClusterCa::open_or_create(&ca_dir)
        .with_context(|| format!("the lab's CA in {}", ca_dir.display()))?;
    if ca_dir != local {
        std::fs::create_dir_all(&local)?;
        std::fs::copy(ca_dir.join(pflex_tls::CA_CERT), local.join(pflex_tls::CA_CERT))
            .with_context(|| format!("copying the CA certificate to {}", local.display()))?;
    }
    Ok(ca)
}

/// Issues the certificate naming `identity` for lab host address `address`
/// into `DIR/COMPONENT/tls`; the flag that gives it to the component.
fn issue_tls(
    ca: Option<&pflex_tls::ClusterCa>,
    dir: &Path,
    component: &str,
    identity: &str,
    address: &str,
) -> Result<Vec<String>> {
    let Some(ca) = ca else { return Ok(Vec::new()) };
    let node_dir = dir.join(component).join("tls");
    ca.issue(identity, &[address.to_string()], &node_dir, pflex_tls::Layout::Node)
        .with_context(|| format!("issuing {component}'s certificate"))?;
    Ok(vec!["--tls-dir".into(), node_dir.display().to_string()])
}

/// Runs `binary` with `args` on lab host `host` and records it.
fn start_on(
    dir: &Path,
    layout: &LabLayout,
    host: &str,
    binary: &Path,
    args: Vec<String>,
) -> Result<()> {
    start_as(dir, layout, host, host, binary, args)
}

/// Records how to start `binary` on `host` without starting it (a spare:
/// `pflex node start HOST` starts it).
fn record_on(
    dir: &Path,
    layout: &LabLayout,
    host: &str,
    binary: &Path,
    args: Vec<String>,
) -> Result<()> {
    recorded(dir, layout, host, host, binary, args).map(|_| ())
}

/// The command that runs `binary` in `host`'s namespace, recorded under
/// `component`.
fn recorded(
    dir: &Path,
    layout: &LabLayout,
    host: &str,
    component: &str,
    binary: &Path,
    args: Vec<String>,
) -> Result<RecordedCommand> {
    let h = layout.host(host)?;
    let mut full = vec!["netns".to_string(), "exec".into(), h.namespace.clone()];
    full.push(binary.display().to_string());
    let health_url = up::health_url_of(component, &args);
    full.extend(args);
    let command = RecordedCommand { program: PathBuf::from("ip"), args: full, health_url };
    up::record_command(dir, component, &command)?;
    Ok(command)
}

/// Starts `component` in `host`'s namespace (the dashboard shares the
/// MDM's host), recorded under the component's name.
fn start_as(
    dir: &Path,
    layout: &LabLayout,
    host: &str,
    component: &str,
    binary: &Path,
    args: Vec<String>,
) -> Result<()> {
    let command = recorded(dir, layout, host, component, binary, args)?;
    let child = up::spawn_component(component, &command, dir, true)?;
    // Detached: `pflex lab down` (or `pflex down`) stops it by its recorded PID.
    std::mem::forget(child);
    Ok(())
}

/// Polls `ready` every 100 ms until it holds, or fails naming `what`.
pub(crate) async fn wait_until<F, Fut>(what: &str, limit: Duration, mut ready: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while !ready().await {
        if start.elapsed() > limit {
            bail!("{what} not ready after {} s", limit.as_secs());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

/// `pflex lab up`: builds the lab and starts the cluster on it.
pub async fn up_lab(dir: &Path, args: &LabUp) -> Result<LabLayout> {
    if layout_file(dir).exists() {
        bail!("a lab is already up in {} (pflex lab down --data-dir {0} first)", dir.display());
    }
    if dir.join("mdm").exists() {
        bail!(
            "{} holds an earlier lab's state; a lab starts from nothing: remove it or use another --data-dir",
            dir.display()
        );
    }
    let layout = plan(args)?;
    // Never touch what another lab made: refuse before creating anything.
    let existing = Command::new("ip").args(["netns", "list"]).output().context("running ip")?;
    let existing = String::from_utf8_lossy(&existing.stdout);
    for h in &layout.hosts {
        if existing.lines().any(|l| l.split_whitespace().next() == Some(h.namespace.as_str())) {
            bail!(
                "network namespace {} exists already (another lab named {}? use --name and --net)",
                h.namespace,
                layout.name
            );
        }
    }
    std::fs::create_dir_all(dir.join("logs"))?;
    let _ = std::fs::remove_file(dir.join("logs").join("pids"));
    std::fs::write(layout_file(dir), serde_json::to_string_pretty(&layout)?)?;
    if let Err(e) = build_network(&layout) {
        let _ = down(dir).await;
        return Err(e.context("building the lab's network"));
    }
    match start_cluster(dir, &layout, args).await {
        Ok(()) => Ok(layout),
        Err(e) => {
            let _ = down(dir).await;
            Err(e)
        }
    }
}

fn print_ready(dir: &Path, layout: &LabLayout) {
    println!(
        "pflex lab {name}: ready\n  volume  vol1 at {nbd}\n  MDM     {mdm}   (admin token: {d}/mdm/admin_token)\n  dashboard {scheme}://{dash}:{MGMT_PORT}   (user admin, password in {d}/mgmt/admin_password)\n{ca}  hosts   {hosts}\n\nTry: nbdinfo {nbd}\n     pflex lab cut sds1 --from mdm --data-dir {d}; pflex lab heal sds1 --from mdm --data-dir {d}\n     pflex lab kill sds2 --data-dir {d}; pflex node start sds2 --data-dir {d}\n     pflex lab fault sds1 eio --data-dir {d}\n     pflex lab down --data-dir {d}",
        name = layout.name,
        scheme = layout.scheme(),
        ca = if layout.tls {
            format!("  CA      {}/tls/ca/ca-cert.pem   (every HTTP API is HTTPS with this CA)\n", dir.display())
        } else {
            String::new()
        },
        nbd = layout.nbd_uri,
        mdm = layout.mdm_url,
        dash = layout.hosts.iter().find(|h| h.name == "mdm").map_or("?", |h| h.address.as_str()),
        d = dir.display(),
        hosts = layout
            .hosts
            .iter()
            .map(|h| format!("{}={}", h.name, h.address))
            .collect::<Vec<_>>()
            .join(" "),
    );
}

async fn start_cluster(dir: &Path, layout: &LabLayout, args: &LabUp) -> Result<()> {
    let bins = match &args.bin_dir {
        Some(d) => d.clone(),
        None => std::env::current_exe()?.parent().context("pflex has no directory")?.to_path_buf(),
    };
    let hb = args.heartbeat_interval_secs.to_string();
    let ca = if layout.tls { Some(lab_ca(dir, args)?) } else { None };
    up::trust_local_ca(dir)?;
    let http = pflex_mdm_client::trust::http_client_builder().build()?;
    let mdm_host = layout.host("mdm")?;
    std::fs::write(
        dir.join("cluster.json"),
        serde_json::to_string_pretty(
            &serde_json::json!({ "mdm_url": layout.mdm_url, "nbd_uri": layout.nbd_uri }),
        )?,
    )?;

    let mdm_dir = dir.join("mdm");
    std::fs::create_dir_all(&mdm_dir)?;
    if args.spare_mdm && args.mdm_count < 2 {
        bail!("--spare-mdm replaces a member of a replicated MDM: give --mdm 3 or 5");
    }
    let spare = u16::from(args.spare_mdm);
    if args.mdm_count > 1 {
        up::provision_mdm_secrets(dir, args.mdm_count + spare)?;
    }
    let member_urls: Vec<String> = layout.mdm_url.split(',').map(str::to_string).collect();
    for n in 0..args.mdm_count + spare {
        let name = up::mdm_member_name(n);
        let is_spare = n == args.mdm_count;
        // The spare takes over the last member's host (and so its address).
        let host = layout.host(&up::mdm_member_name(n.min(args.mdm_count - 1)))?;
        let member_dir = dir.join(&name);
        std::fs::create_dir_all(&member_dir)?;
        let mut mdm_args = up::mdm_args(&format!("{}:8001", host.address), &member_dir, None, &hb);
        mdm_args.extend([
            "--failed-after-secs".into(),
            args.failure_timeout_secs.to_string(),
            "--stale-after-secs".into(),
            (args.failure_timeout_secs / 2).max(1).to_string(),
            "--token-ttl-secs".into(),
            args.token_ttl_secs.to_string(),
            // A copy lost with a FAILED node waits that long to come back and be
            // resynced before it is rebuilt elsewhere.
            "--resync-window-secs".into(),
            args.failure_timeout_secs.to_string(),
        ]);
        // A replicated member's certificate names its member id: its peers
        // take Raft messages only from the member they claim.
        let identity = if args.mdm_count > 1 {
            pflex_tls::mdm_member_name(u64::from(n) + 1)
        } else {
            name.clone()
        };
        mdm_args.extend(issue_tls(ca.as_ref(), dir, &name, &identity, &host.address)?);
        if is_spare {
            // A member added later starts with its id alone.
            mdm_args.extend(["--mdm-id".into(), (n + 1).to_string()]);
            recorded(dir, layout, &host.name, &name, &up::binary(&bins, "mdm")?, mdm_args)?;
        } else {
            mdm_args.extend(pflex_launch::mdm_member_args(usize::from(n), &member_urls));
            start_on(dir, layout, &name, &up::binary(&bins, "mdm")?, mdm_args)?;
        }
    }
    let token_path = mdm_dir.join("admin_token");
    wait_until("the MDM", Duration::from_secs(60), || {
        let token = std::fs::read_to_string(&token_path).ok();
        let urls = layout.mdm_url.clone();
        async move {
            let Some(token) = token else { return false };
            // Through the client: with several MDMs it finds the leader.
            match MdmClient::new(&urls, Some(token.trim().to_string())) {
                Ok(mdm) => mdm.health_status().await.is_ok(),
                Err(_) => false,
            }
        }
    })
    .await?;
    let admin = std::fs::read_to_string(&token_path)?.trim().to_string();
    let mdm = MdmClient::new(&layout.mdm_url, Some(admin))?;

    for n in 1..=args.sds + args.spare_sds {
        let name = format!("sds{n}");
        let host = layout.host(&name)?;
        let sds_dir = dir.join(&name);
        std::fs::create_dir_all(&sds_dir)?;
        let token = up::enrollment_file(&mdm, NodeType::Sds, &name, &sds_dir).await?;
        let mut sds_args = up::sds_args(&up::NodeLaunch {
            mdm_url: &layout.mdm_url,
            enroll: up::Enroll::TokenFile(&token),
            name: &name,
            host: &host.address,
            dir: &sds_dir,
            heartbeat: &hb,
            ports: [9100, 9200, 9700],
        });
        sds_args.extend([
            "--device-size".into(),
            args.device_size.to_string(),
            "--fault-set".into(),
            format!("fs{n}"),
            // A lab is for rehearsing faults: `pflex lab fault` needs it.
            "--fault-injection".into(),
        ]);
        sds_args.extend(issue_tls(ca.as_ref(), dir, &name, &name, &host.address)?);
        if n <= args.sds {
            start_on(dir, layout, &name, &up::binary(&bins, "sds")?, sds_args)?;
        } else {
            record_on(dir, layout, &name, &up::binary(&bins, "sds")?, sds_args)?;
        }
    }
    for n in 1..=args.sds {
        let host = layout.host(&format!("sds{n}"))?;
        let url = layout.url(&host.name, 9200, "/health")?;
        wait_until(&format!("sds{n}"), Duration::from_secs(120), || {
            let (http, url) = (http.clone(), url.clone());
            async move { up::registered(&http, &url).await.unwrap_or(false) }
        })
        .await?;
    }

    let sdc = layout.host("sdc1")?;
    let sdc_dir = dir.join("sdc1");
    std::fs::create_dir_all(&sdc_dir)?;
    let token = up::enrollment_file(&mdm, NodeType::Sdc, "sdc1", &sdc_dir).await?;
    let mut sdc_args = up::sdc_args(&up::NodeLaunch {
        mdm_url: &layout.mdm_url,
        enroll: up::Enroll::TokenFile(&token),
        name: "sdc1",
        host: &sdc.address,
        dir: &sdc_dir,
        heartbeat: &hb,
        ports: [8003, 8004, 10809],
    });
    sdc_args.extend(["--io-retry-secs".into(), args.io_retry_secs.to_string()]);
    // The lab's SDC serves NBD on its namespace's address, reachable only
    // from this machine: plain NBD there is accepted on purpose.
    sdc_args.push("--insecure".into());
    sdc_args.extend(issue_tls(ca.as_ref(), dir, "sdc1", "sdc1", &sdc.address)?);
    start_on(dir, layout, "sdc1", &up::binary(&bins, "sdc")?, sdc_args)?;
    let url = layout.url("sdc1", 8004, "/health")?;
    wait_until("sdc1", Duration::from_secs(60), || {
        let (http, url) = (http.clone(), url.clone());
        async move { up::registered(&http, &url).await.unwrap_or(false) }
    })
    .await?;

    // The dashboard, on the MDM's host: it is not on the data path.
    let mgmt_dir = dir.join("mgmt");
    std::fs::create_dir_all(&mgmt_dir)?;
    let listen = format!("{}:{MGMT_PORT}", mdm_host.address);
    let token = up::enrollment_file(&mdm, NodeType::Mgmt, "mgmt1", &mgmt_dir).await?;
    let mut mgmt_args =
        up::mgmt_args(&layout.mdm_url, up::Enroll::TokenFile(&token), &mgmt_dir, &listen);
    mgmt_args.extend(issue_tls(ca.as_ref(), dir, "mgmt", "mgmt", &mdm_host.address)?);
    start_as(dir, layout, "mdm", "mgmt", &up::binary(&bins, "mgmt")?, mgmt_args)?;
    let url = layout.url("mdm", MGMT_PORT, "/health")?;
    wait_until("the dashboard", Duration::from_secs(60), || {
        let (http, url) = (http.clone(), url.clone());
        async move { http.get(&url).send().await.is_ok_and(|r| r.status().is_success()) }
    })
    .await?;

    let mut volume = UpArgs::for_bench(dir, "uring");
    volume.volume_size = args.volume_size;
    up::ensure_volume(&mdm, &volume).await?;
    let nbd = (sdc.address.clone(), 10809u16);
    wait_until("the NBD export", Duration::from_secs(60), || {
        let nbd = nbd.clone();
        async move { crate::nbd_probe::export_listed(nbd, "vol1").await.unwrap_or(false) }
    })
    .await?;
    Ok(())
}
