//! `pflex up`: a whole local cluster in one command.
//!
//! Starts the MDM, N SDS nodes (each in its own fault set, devices under the
//! data dir), one SDC and the MGMT dashboard as separate processes on
//! loopback, creates and maps the thin volume `vol1`, waits until the volume
//! answers an NBD handshake, prints how to use it, and stays in the
//! foreground. A component that dies on its own is reported (name, exit
//! status, log) and the others keep serving: losing one node is what the
//! cluster is built to survive. `pflex node start NAME` brings it back from
//! the command line recorded in `components.json`, with its data. Ctrl-C (or
//! SIGTERM) stops every component, newest first, restarted ones included.
//! Running it again with the same data dir reuses everything: the join key,
//! the MDM database, the SDS devices and the volume.
//!
//! Children of the foreground `pflex up` get `PR_SET_PDEATHSIG`, so even a
//! `kill -9` of `pflex up` leaves none of them behind; components started by
//! `pflex node start` (or `--detach`) live in their own process group and
//! are stopped through the PIDs recorded in `logs/pids`.

use std::collections::BTreeMap;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use pflex_mdm_client::MdmClient;
use pflex_proto::api::{NodeType, VolumeCreate, VolumeMap};
use pflex_proto::token::AccessMode;
use tokio::process::{Child, Command};

use crate::nbd_probe;

// The command lines: shared with `pflex lab` and the integration-test cluster.
pub(crate) use pflex_launch::{mdm_args, mgmt_args, sdc_args, sds_args, Enroll, NodeLaunch};

/// Options of `pflex up`.
#[derive(Debug, Clone, clap::Args)]
pub struct UpArgs {
    /// Where every component keeps its state (created if missing, reused if present)
    /// [default: ./pflex-data].
    #[arg(long = "data-dir", value_name = "DIR")]
    pub data_dir_flag: Option<PathBuf>,
    /// The data dir in use, resolved from `--data-dir` here or before the subcommand.
    #[arg(skip)]
    pub data_dir: PathBuf,
    /// Name of the volume to create (if missing) and map to the SDC.
    #[arg(long, default_value = "vol1")]
    pub volume: String,
    /// Size of that volume when it is created (thin: nothing is reserved).
    #[arg(long, default_value = "4G", value_parser = pflex_proto::size::parse_size)]
    pub volume_size: u64,
    /// Number of SDS nodes, each in its own fault set.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u16).range(2..=32))]
    pub sds_count: u16,
    /// Size of each SDS device file.
    #[arg(long, default_value = "4G", value_parser = pflex_proto::size::parse_size)]
    pub device_size: u64,
    /// SDS IO engine: `uring` (io_uring + O_DIRECT) or `sync` (pread/pwrite).
    #[arg(long, default_value = "uring")]
    pub io_engine: String,
    /// MDM HTTP port (of the first MDM; member N of a replicated MDM
    /// listens on this + 10 × (N − 1)).
    #[arg(long, default_value_t = 8001)]
    pub mdm_port: u16,
    /// How many MDMs: 1 (the default, the lightest), or 3 or 5 kept
    /// identical by a Raft log, any one of which can be lost (two of five).
    #[arg(long = "mdm", default_value_t = 1, value_parser = mdm_count)]
    pub mdm_count: u16,
    /// NBD port of the SDC.
    #[arg(long, default_value_t = 10809)]
    pub nbd_port: u16,
    /// SDC control port (its mgmt port is this + 1).
    #[arg(long, default_value_t = 8003)]
    pub sdc_control_port: u16,
    /// Base of SDS ports: SDS n uses base+n (control), base+100+n (mgmt), base+600+n (data).
    #[arg(long, default_value_t = 9100)]
    pub sds_base_port: u16,
    /// MGMT dashboard port (0 = do not start the dashboard).
    #[arg(long, default_value_t = 5000)]
    pub mgmt_port: u16,
    /// Heartbeat interval of every component, seconds.
    #[arg(long, default_value_t = 2)]
    pub heartbeat_interval_secs: u64,
    /// Serve NBD without TLS (by default the SDC offers STARTTLS with a certificate
    /// from a cluster CA this command creates; loopback clients may still use plain NBD).
    #[arg(long)]
    pub no_tls: bool,
    /// Lease length of every SDS in ms (its default when not given); 0 turns leases off,
    /// which is unsafe when a node can be cut off and is meant for measuring their cost.
    #[arg(long)]
    pub lease_ms: Option<u64>,
    /// Directory holding the `mdm`, `sds`, `sdc` and `mgmt` binaries (default: next to `pflex`).
    #[arg(long)]
    pub bin_dir: Option<PathBuf>,
    /// Start, print, and exit at once leaving the cluster running (for scripts); stop it
    /// with `pflex down --data-dir DIR`.
    #[arg(long)]
    pub detach: bool,
}

/// One running component.
struct Component {
    name: String,
    child: Child,
}

/// The running cluster; stops every component when dropped.
pub struct LocalCluster {
    components: Vec<Component>,
    /// Where the components' logs are, to quote one that died while starting.
    data_dir: PathBuf,
}

impl LocalCluster {
    async fn spawn(
        &mut self,
        name: &str,
        program: &Path,
        args: &[String],
        data_dir: &Path,
        detach: bool,
    ) -> Result<()> {
        let recorded = RecordedCommand {
            program: program.to_path_buf(),
            args: args.to_vec(),
            health_url: health_url_of(name, args),
        };
        record_command(data_dir, name, &recorded)?;
        let child = spawn_component(name, &recorded, data_dir, detach)?;
        self.components.push(Component { name: name.to_string(), child });
        Ok(())
    }

    /// Reports components that exited since the last look (name, status, log,
    /// how to bring them back) and forgets them; the others keep running.
    fn reap_exited(&mut self, data_dir: &Path) {
        self.components.retain_mut(|c| match c.child.try_wait() {
            Ok(Some(status)) => {
                report_exit(&c.name, &status.to_string(), data_dir);
                false
            }
            _ => true,
        });
    }

    /// Fails if a component has exited (while the cluster is starting), quoting the
    /// end of its log so the cause is in the error itself.
    fn check_alive(&mut self) -> Result<()> {
        for c in &mut self.components {
            if let Some(status) = c.child.try_wait()? {
                let log = log_path(&self.data_dir, &c.name);
                let tail = log_tail(&log, 20);
                bail!("{} exited ({status}); last lines of {}:\n{tail}", c.name, log.display());
            }
        }
        Ok(())
    }

    /// Stops every component, newest first: SIGTERM, then SIGKILL after 10 s.
    pub async fn stop(&mut self) {
        while let Some(mut c) = self.components.pop() {
            if let Some(pid) = c.child.id() {
                // SAFETY: kill(2) on a PID we spawned and have not yet reaped, so the PID
                // cannot have been reused by another process.
                unsafe {
                    libc::kill(pid as libc::pid_t, libc::SIGTERM);
                }
            }
            match tokio::time::timeout(Duration::from_secs(10), c.child.wait()).await {
                Ok(_) => eprintln!("pflex: stopped {}", c.name),
                Err(_) => {
                    let _ = c.child.kill().await;
                    eprintln!("pflex: killed {} (did not stop within 10 s)", c.name);
                }
            }
        }
    }
}

/// How a component was started, kept in `DATA_DIR/components.json` so
/// `pflex node start` can bring it back exactly as it was.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct RecordedCommand {
    /// The program (for a lab host: `ip`, with `netns exec NS BINARY` first).
    pub program: PathBuf,
    pub args: Vec<String>,
    /// Polled until the component is back: a `/health` answering
    /// `registered: true`, or (for the MDM) any HTTP answer.
    pub health_url: Option<String>,
}

fn components_file(data_dir: &Path) -> PathBuf {
    data_dir.join("components.json")
}

fn recorded_commands(data_dir: &Path) -> Result<BTreeMap<String, RecordedCommand>> {
    let path = components_file(data_dir);
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(BTreeMap::new()),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

pub(crate) fn record_command(data_dir: &Path, name: &str, command: &RecordedCommand) -> Result<()> {
    let mut all = recorded_commands(data_dir)?;
    all.insert(name.to_string(), command.clone());
    let path = components_file(data_dir);
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_string_pretty(&all)?)
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, &path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// Where a component says it is up, read from its own command line
/// (HTTPS when it was given `--tls-dir`).
pub(crate) fn health_url_of(name: &str, args: &[String]) -> Option<String> {
    let flag = |f: &str| args.iter().position(|a| a == f).and_then(|i| args.get(i + 1));
    let scheme = if flag("--tls-dir").is_some() { "https" } else { "http" };
    if let Some(port) = flag("--mgmt-port") {
        let host = flag("--host").map_or("127.0.0.1", String::as_str);
        return Some(format!("{scheme}://{host}:{port}/health"));
    }
    let listen = flag("--listen")?;
    if is_mdm(name) {
        // Answered by every member of a replicated MDM, leader or not.
        Some(format!("{scheme}://{listen}/mdm/status"))
    } else {
        Some(format!("{scheme}://{listen}/health"))
    }
}

fn log_path(data_dir: &Path, name: &str) -> PathBuf {
    data_dir.join("logs").join(format!("{name}.log"))
}

/// The last `lines` lines of the log at `path` (or why it cannot be read).
fn log_tail(path: &Path, lines: usize) -> String {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let all: Vec<&str> = text.lines().collect();
            let tail = &all[all.len().saturating_sub(lines)..];
            if tail.is_empty() {
                "(the log is empty)".to_string()
            } else {
                tail.join("\n")
            }
        }
        Err(e) => format!("(cannot read the log: {e})"),
    }
}

/// Starts one component with its output appended to its log and records its
/// PID in `logs/pids`. A foreground child dies with `pflex up`
/// (`PR_SET_PDEATHSIG`); a detached one gets its own process group.
pub(crate) fn spawn_component(
    name: &str,
    command: &RecordedCommand,
    data_dir: &Path,
    detach: bool,
) -> Result<Child> {
    let log_path = log_path(data_dir, name);
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .with_context(|| format!("opening {}", log_path.display()))?;
    let mut cmd = std::process::Command::new(&command.program);
    cmd.args(&command.args)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()));
    if detach {
        cmd.process_group(0);
    } else {
        // SAFETY: the closure runs in the forked child before exec and only calls
        // prctl(2), which is async-signal-safe; it touches no memory of the parent.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    let child = Command::from(cmd)
        .kill_on_drop(!detach)
        .spawn()
        .with_context(|| format!("starting {} ({})", name, command.program.display()))?;
    if let Some(pid) = child.id() {
        let pids = pids_file(data_dir);
        let mut f = std::fs::OpenOptions::new().create(true).append(true).open(pids)?;
        use std::io::Write;
        writeln!(f, "{pid} {name}")?;
    }
    Ok(child)
}

fn pids_file(data_dir: &Path) -> PathBuf {
    data_dir.join("logs").join("pids")
}

/// `(pid, name)` pairs recorded in `logs/pids`, oldest first.
fn recorded_pids(data_dir: &Path) -> Vec<(i32, String)> {
    std::fs::read_to_string(pids_file(data_dir))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let (pid, name) = l.split_once(' ')?;
            Some((pid.parse().ok()?, name.to_string()))
        })
        .collect()
}

/// Whether `pid` is alive and still the component `name` we started (its
/// command name matches), so a reused PID is never signalled.
fn is_component(pid: i32, name: &str) -> bool {
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    let expected = name.trim_end_matches(|c: char| c.is_ascii_digit());
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // A zombie (state Z) has exited; only its parent's wait is missing.
    let zombie = stat.rsplit_once(')').is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'));
    !comm.is_empty() && comm.trim().starts_with(expected) && !zombie
}

/// The live PID of component `name`, if `logs/pids` records one.
pub(crate) fn running_pid(data_dir: &Path, name: &str) -> Option<i32> {
    recorded_pids(data_dir)
        .into_iter()
        .rev()
        .find(|(pid, n)| n == name && is_component(*pid, n))
        .map(|(pid, _)| pid)
}

fn report_exit(name: &str, status: &str, data_dir: &Path) {
    eprintln!(
        "pflex: {name} exited ({status}); log: {log}; the others keep serving. Bring it back \
         with: pflex node start {name} --data-dir {dir}",
        log = log_path(data_dir, name).display(),
        dir = data_dir.display(),
    );
}

/// Sends SIGTERM to the recorded component `pid` and waits up to 10 s for it to go.
async fn stop_pid(pid: i32, name: &str) {
    // SAFETY: kill(2) with a PID from our own record, checked by the caller
    // (`is_component`) to still be the component we started.
    unsafe {
        libc::kill(pid, libc::SIGTERM);
    }
    let start = Instant::now();
    while is_component(pid, name) && start.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    if is_component(pid, name) {
        // SAFETY: as above; the process has not exited, so the PID is still its own.
        unsafe {
            libc::kill(pid, libc::SIGKILL);
        }
        eprintln!("pflex: killed {name} (pid {pid}, did not stop within 10 s)");
    } else {
        eprintln!("pflex: stopped {name} (pid {pid})");
    }
}

/// Stops every component recorded in `logs/pids` that is still running,
/// newest first, except the PIDs in `skip`.
pub(crate) async fn stop_recorded(data_dir: &Path, skip: &[i32]) {
    let mut entries = recorded_pids(data_dir);
    entries.reverse();
    for (pid, name) in entries {
        if !skip.contains(&pid) && is_component(pid, &name) {
            stop_pid(pid, &name).await;
        }
    }
}

/// `pflex node start NAME`: starts a component of a `pflex up` cluster
/// again, from its recorded command line and with its data, and waits until
/// it is back (registered with the MDM, or serving HTTP for the MDM).
pub async fn node_start(data_dir: &Path, name: &str) -> Result<()> {
    let commands = recorded_commands(data_dir)?;
    let Some(command) = commands.get(name) else {
        let known: Vec<_> = commands.keys().cloned().collect();
        bail!(
            "no component {name} recorded in {} (known: {})",
            components_file(data_dir).display(),
            if known.is_empty() {
                "none; was this cluster started with `pflex up`?".into()
            } else {
                known.join(", ")
            }
        );
    };
    if let Some(pid) = running_pid(data_dir, name) {
        bail!("{name} is already running (pid {pid})");
    }
    trust_local_ca(data_dir)?;
    let mut child = spawn_component(name, command, data_dir, true)?;
    let pid = child.id().unwrap_or(0);
    let http = pflex_mdm_client::trust::http_client_builder().build()?;
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait()? {
            bail!("{name} exited at once ({status}); see {}", log_path(data_dir, name).display());
        }
        let ready = match &command.health_url {
            None => true,
            Some(url) if is_mdm(name) => {
                http.get(url).timeout(Duration::from_secs(2)).send().await.is_ok()
            }
            Some(url) => registered(&http, url).await.unwrap_or(false),
        };
        if ready {
            break;
        }
        if start.elapsed() > Duration::from_secs(120) {
            bail!(
                "{name} (pid {pid}) is not ready after 120 s; see {}",
                log_path(data_dir, name).display()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The component outlives this command: it is stopped by `pflex up`'s
    // Ctrl-C or by `pflex down`, through its recorded PID.
    std::mem::forget(child);
    println!(
        "pflex: {name} running again as pid {pid} (log: {})",
        log_path(data_dir, name).display()
    );
    Ok(())
}

fn bin_dir(args: &UpArgs) -> Result<PathBuf> {
    if let Some(d) = &args.bin_dir {
        return Ok(d.clone());
    }
    let exe = std::env::current_exe().context("locating the pflex binary")?;
    Ok(exe.parent().context("pflex binary has no parent directory")?.to_path_buf())
}

pub(crate) fn binary(dir: &Path, name: &str) -> Result<PathBuf> {
    let p = dir.join(name);
    if !p.is_file() {
        bail!(
            "{} not found: build every component first (`cargo build --release`) or pass --bin-dir",
            p.display()
        );
    }
    Ok(p)
}

/// Name of the file a component's one-time enrollment token is written to.
pub const ENROLLMENT_TOKEN_FILE: &str = "enrollment_token";

/// The path of `node_dir`'s enrollment token file, holding a fresh one-time
/// token for `name` unless the node keeps a credential already (it enrolled
/// at an earlier start, and the file is not read again).
pub(crate) async fn enrollment_file(
    mdm: &MdmClient,
    role: NodeType,
    name: &str,
    node_dir: &Path,
) -> Result<String> {
    let path = node_dir.join(ENROLLMENT_TOKEN_FILE);
    if !node_dir.join(pflex_mdm_client::CREDENTIAL_FILE).exists() {
        let request = pflex_proto::api::EnrollmentRequest {
            role,
            name: Some(name.to_string()),
            ttl_secs: None,
        };
        let minted = mdm
            .create_enrollment(&request)
            .await
            .with_context(|| format!("minting an enrollment token for {name}"))?;
        let _ = std::fs::remove_file(&path);
        read_or_create_secret(&path, || minted.token)?;
    }
    Ok(path.display().to_string())
}

/// Reads `path`, or creates it (mode 0600) holding `make()`.
pub(crate) fn read_or_create_secret(path: &Path, make: impl FnOnce() -> String) -> Result<String> {
    if let Ok(s) = std::fs::read_to_string(path) {
        let s = s.trim().to_string();
        if !s.is_empty() {
            return Ok(s);
        }
    }
    let value = make();
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    use std::io::Write;
    writeln!(f, "{value}")?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(value)
}

/// Polls `probe` every 100 ms until it succeeds, a component dies, or `timeout` passes.
async fn wait_for<F, Fut>(
    cluster: &mut LocalCluster,
    what: &str,
    timeout: Duration,
    mut probe: F,
) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<bool>>,
{
    let start = Instant::now();
    let mut last_err = None;
    loop {
        cluster.check_alive()?;
        match probe().await {
            Ok(true) => return Ok(()),
            Ok(false) => {}
            Err(e) => last_err = Some(e),
        }
        if start.elapsed() > timeout {
            let why = last_err.map(|e| format!(": {e:#}")).unwrap_or_default();
            bail!("{what} not ready after {} s{why}", timeout.as_secs());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn http_ok(client: &reqwest::Client, url: &str) -> Result<bool> {
    let resp = client.get(url).timeout(Duration::from_secs(2)).send().await?;
    Ok(resp.status().is_success())
}

impl UpArgs {
    /// A cluster for `pflex bench`: its own ports, so it can run beside `pflex up`.
    pub fn for_bench(data_dir: &Path, io_engine: &str) -> Self {
        UpArgs {
            data_dir_flag: None,
            data_dir: data_dir.to_path_buf(),
            volume: "vol1".into(),
            volume_size: 2 << 30,
            sds_count: 3,
            // Devices are preallocated: 3 × 2 GiB holds the 2 GiB volume twice over
            // and leaves room on small disks (the tour runs this beside `pflex up`).
            device_size: 2 << 30,
            io_engine: io_engine.into(),
            mdm_port: 8101,
            mdm_count: 1,
            nbd_port: 10819,
            sdc_control_port: 8113,
            sds_base_port: 9150,
            mgmt_port: 0,
            heartbeat_interval_secs: 2,
            lease_ms: None,
            no_tls: false,
            bin_dir: None,
            detach: false,
        }
    }
}

/// `pflex up`.
pub async fn run(args: UpArgs) -> Result<()> {
    let mut cluster = start(&args).await?;
    print_ready(&args);
    if args.detach {
        for c in &mut cluster.components {
            eprintln!("pflex: {} running as pid {}", c.name, c.child.id().unwrap_or(0));
        }
        std::mem::forget(cluster);
        return Ok(());
    }
    let outcome = supervise(&mut cluster, &args.data_dir).await;
    let ours: Vec<i32> =
        cluster.components.iter().filter_map(|c| c.child.id()).map(|p| p as i32).collect();
    // Components brought back by `pflex node start` are not our children:
    // stop them through their recorded PIDs, then our own, newest first.
    stop_recorded(&args.data_dir, &ours).await;
    cluster.stop().await;
    outcome
}

/// Starts every component and waits until the volume serves over NBD.
/// On failure, whatever was started is stopped again.
pub async fn start(args: &UpArgs) -> Result<LocalCluster> {
    ensure_ports_free(args)?;
    let dir = &args.data_dir;
    let logs = dir.join("logs");
    std::fs::create_dir_all(&logs).with_context(|| format!("creating {}", logs.display()))?;
    let _ = std::fs::remove_file(logs.join("pids"));
    let bins = bin_dir(args)?;
    let scheme = if args.no_tls { "http" } else { "https" };
    if !args.no_tls {
        cluster_ca(dir)?;
        trust_local_ca(dir)?;
    }
    let mdm_urls: Vec<String> = (0..args.mdm_count)
        .map(|n| format!("{scheme}://127.0.0.1:{}", mdm_member_port(args, n)))
        .collect();
    let mdm_url = mdm_urls.join(",");
    std::fs::write(
        dir.join("cluster.json"),
        serde_json::to_string_pretty(&serde_json::json!({
            "mdm_url": mdm_url,
            "nbd_uri": format!("nbd://127.0.0.1:{}/{}", args.nbd_port, args.volume),
        }))?,
    )?;
    let hb = args.heartbeat_interval_secs.to_string();
    let http = pflex_mdm_client::trust::http_client_builder().build()?;
    let mut cluster = LocalCluster { components: Vec::new(), data_dir: dir.to_path_buf() };
    let result = async {
        // MDM (one, or the members of a replicated one).
        let mdm_dir = dir.join("mdm");
        std::fs::create_dir_all(&mdm_dir)?;
        if args.mdm_count > 1 {
            provision_mdm_secrets(dir, args.mdm_count)?;
        }
        for n in 0..args.mdm_count {
            let name = mdm_member_name(n);
            let member_dir = dir.join(&name);
            std::fs::create_dir_all(&member_dir)?;
            let listen = format!("127.0.0.1:{}", mdm_member_port(args, n));
            let mut mdm_args = mdm_args(&listen, &member_dir, None, &hb);
            // An SDS back within the failure timeout (the MDM's default, 120 s)
            // is resynced with what it missed instead of rebuilt elsewhere.
            mdm_args.extend(["--resync-window-secs".to_string(), "120".to_string()]);
            mdm_args.extend(pflex_launch::mdm_member_args(usize::from(n), &mdm_urls));
            if !args.no_tls {
                // A replicated member's certificate names its member id: its
                // peers take Raft messages only from the member they claim.
                let identity = if args.mdm_count > 1 {
                    pflex_tls::mdm_member_name(u64::from(n) + 1)
                } else {
                    name.clone()
                };
                let tls = issue_tls_as(dir, &name, &identity)?;
                mdm_args.extend(["--tls-dir".into(), tls.display().to_string()]);
            }
            cluster.spawn(&name, &binary(&bins, "mdm")?, &mdm_args, dir, args.detach).await?;
        }
        let token_path = mdm_dir.join("admin_token");
        let mut admin = String::new();
        wait_for(&mut cluster, "MDM", Duration::from_secs(30), || {
            let token = std::fs::read_to_string(&token_path).ok().map(|s| s.trim().to_string());
            let admin_out = &mut admin;
            if let Some(t) = &token {
                admin_out.clone_from(t);
            }
            let url = mdm_url.clone();
            async move {
                let Some(token) = token else { return Ok(false) };
                // Through the client: with several MDMs it finds the leader.
                let mdm = MdmClient::new(&url, Some(token))?;
                Ok(mdm.health_status().await.is_ok())
            }
        })
        .await?;
        eprintln!("pflex: mdm ready at {mdm_url}");
        let mdm = MdmClient::new(&mdm_url, Some(admin.clone()))?;

        // SDS nodes.
        for n in 0..args.sds_count {
            let name = format!("sds{}", n + 1);
            let sds_dir = dir.join(&name);
            std::fs::create_dir_all(&sds_dir)?;
            let token = enrollment_file(&mdm, NodeType::Sds, &name, &sds_dir).await?;
            let mut sds_args = sds_args(&NodeLaunch {
                mdm_url: &mdm_url,
                enroll: Enroll::TokenFile(&token),
                name: &name,
                host: "127.0.0.1",
                dir: &sds_dir,
                heartbeat: &hb,
                ports: [
                    args.sds_base_port + n,
                    args.sds_base_port + 100 + n,
                    args.sds_base_port + 600 + n,
                ],
            });
            sds_args.extend([
                "--device-size".into(),
                args.device_size.to_string(),
                "--fault-set".into(),
                format!("fs{}", n + 1),
                "--io-engine".into(),
                args.io_engine.clone(),
            ]);
            if !args.no_tls {
                sds_args.extend(["--tls-dir".into(), issue_tls(dir, &name)?.display().to_string()]);
            }
            if let Some(ms) = args.lease_ms {
                sds_args.extend(["--lease-ms".into(), ms.to_string()]);
            }
            cluster.spawn(&name, &binary(&bins, "sds")?, &sds_args, dir, args.detach).await?;
        }
        for n in 0..args.sds_count {
            let url = format!("{scheme}://127.0.0.1:{}/health", args.sds_base_port + 100 + n);
            let what = format!("sds{}", n + 1);
            wait_for(&mut cluster, &what, Duration::from_secs(120), || registered(&http, &url))
                .await?;
        }
        eprintln!("pflex: {} SDS nodes registered", args.sds_count);

        // SDC.
        let sdc_dir = dir.join("sdc1");
        std::fs::create_dir_all(&sdc_dir)?;
        let token = enrollment_file(&mdm, NodeType::Sdc, "sdc1", &sdc_dir).await?;
        let sdc_args = sdc_args(&NodeLaunch {
            mdm_url: &mdm_url,
            enroll: Enroll::TokenFile(&token),
            name: "sdc1",
            host: "127.0.0.1",
            dir: &sdc_dir,
            heartbeat: &hb,
            ports: [args.sdc_control_port, args.sdc_control_port + 1, args.nbd_port],
        });
        let mut sdc_args = sdc_args;
        if !args.no_tls {
            sdc_args.extend(["--tls-dir".into(), issue_tls(dir, "sdc1")?.display().to_string()]);
            let ca = cluster_ca(dir)?;
            ca.issue("nbd-client", &[], &nbd_client_tls_dir(dir), pflex_tls::Layout::NbdClient)?;
        }
        cluster.spawn("sdc1", &binary(&bins, "sdc")?, &sdc_args, dir, args.detach).await?;
        let url = format!("{scheme}://127.0.0.1:{}/health", args.sdc_control_port + 1);
        wait_for(&mut cluster, "sdc1", Duration::from_secs(30), || registered(&http, &url)).await?;

        // MGMT (optional).
        if args.mgmt_port != 0 {
            if let Ok(mgmt_bin) = binary(&bins, "mgmt") {
                let mgmt_dir = dir.join("mgmt");
                std::fs::create_dir_all(&mgmt_dir)?;
                let listen = format!("127.0.0.1:{}", args.mgmt_port);
                let token = enrollment_file(&mdm, NodeType::Mgmt, "mgmt1", &mgmt_dir).await?;
                let mut mgmt_args =
                    mgmt_args(&mdm_url, Enroll::TokenFile(&token), &mgmt_dir, &listen);
                if !args.no_tls {
                    let tls = issue_tls(dir, "mgmt")?;
                    mgmt_args.extend(["--tls-dir".into(), tls.display().to_string()]);
                }
                cluster.spawn("mgmt", &mgmt_bin, &mgmt_args, dir, args.detach).await?;
                let url = format!("{scheme}://127.0.0.1:{}/health", args.mgmt_port);
                wait_for(&mut cluster, "mgmt", Duration::from_secs(30), || http_ok(&http, &url))
                    .await?;
            }
        }

        // The volume.
        ensure_volume(&mdm, args).await?;
        let port = args.nbd_port;
        let vol = args.volume.clone();
        wait_for(&mut cluster, "NBD export", Duration::from_secs(60), || {
            let vol = vol.clone();
            async move { nbd_probe::export_listed(("127.0.0.1", port), &vol).await }
        })
        .await?;
        anyhow::Ok(())
    }
    .await;
    match result {
        Ok(()) => Ok(cluster),
        Err(e) => {
            cluster.stop().await;
            Err(e)
        }
    }
}

pub(crate) fn mdm_count(text: &str) -> Result<u16, String> {
    match text.parse::<u16>() {
        Ok(n @ (1 | 3 | 5)) => Ok(n),
        _ => Err("the MDM runs as 1, 3 or 5 members".to_string()),
    }
}

/// Port of MDM member `n` (from 0).
fn mdm_member_port(args: &UpArgs, n: u16) -> u16 {
    args.mdm_port + 10 * n
}

/// Whether component `name` is an MDM (`mdm`, or member `mdmN`).
pub(crate) fn is_mdm(name: &str) -> bool {
    name.strip_prefix("mdm").is_some_and(|rest| rest.chars().all(|c| c.is_ascii_digit()))
}

/// Component name (and data directory) of MDM member `n` (from 0).
pub(crate) fn mdm_member_name(n: u16) -> String {
    if n == 0 {
        "mdm".to_string()
    } else {
        format!("mdm{}", n + 1)
    }
}

/// The secrets every member of a replicated MDM holds alike (the cluster
/// secret signs tokens and authenticates the members to each other): made
/// once, copied to each member's directory (0600) unless already there.
pub(crate) fn provision_mdm_secrets(dir: &Path, members: u16) -> Result<()> {
    let first = dir.join(mdm_member_name(0));
    std::fs::create_dir_all(&first)?;
    let secret_path = first.join("cluster_secret");
    let admin_path = first.join("admin_token");
    if !secret_path.exists() {
        write_private(&secret_path, &pflex_proto::token::ClusterSecret::generate().to_hex())?;
    }
    if !admin_path.exists() {
        let mut bytes = [0u8; 32];
        getrandom::getrandom(&mut bytes).map_err(|e| anyhow::anyhow!("random admin token: {e}"))?;
        write_private(&admin_path, &hex::encode(bytes))?;
    }
    for n in 1..members {
        let member = dir.join(mdm_member_name(n));
        std::fs::create_dir_all(&member)?;
        for file in [&secret_path, &admin_path] {
            let target = member.join(file.file_name().expect("a file name"));
            if !target.exists() {
                write_private(&target, std::fs::read_to_string(file)?.trim())?;
            }
        }
    }
    Ok(())
}

fn write_private(path: &Path, value: &str) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    file.write_all(value.as_bytes())?;
    file.write_all(b"\n")?;
    file.sync_all()?;
    Ok(())
}

/// Every port the cluster will listen on must be free: otherwise a component
/// would fail to bind while a probe answered by someone else's process made
/// the cluster look ready.
fn ensure_ports_free(args: &UpArgs) -> Result<()> {
    let mut ports = vec![args.nbd_port, args.sdc_control_port, args.sdc_control_port + 1];
    ports.extend((0..args.mdm_count).map(|n| mdm_member_port(args, n)));
    for n in 0..args.sds_count {
        ports.extend([
            args.sds_base_port + n,
            args.sds_base_port + 100 + n,
            args.sds_base_port + 600 + n,
        ]);
    }
    if args.mgmt_port != 0 {
        ports.push(args.mgmt_port);
    }
    for port in ports {
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_err() {
            bail!(
                "port {port} on 127.0.0.1 is already in use (another `pflex up` running? \
                 stop it with Ctrl-C or `pflex down --data-dir DIR`)"
            );
        }
    }
    Ok(())
}

pub(crate) async fn registered(http: &reqwest::Client, url: &str) -> Result<bool> {
    let resp = http.get(url).timeout(Duration::from_secs(2)).send().await?;
    if !resp.status().is_success() {
        return Ok(false);
    }
    let v: serde_json::Value = resp.json().await?;
    Ok(v.get("registered").and_then(|r| r.as_bool()).unwrap_or(false))
}

pub(crate) async fn ensure_volume(mdm: &MdmClient, args: &UpArgs) -> Result<()> {
    let volumes = mdm.volume_list().await.context("listing volumes")?;
    let vol = match volumes.into_iter().find(|v| v.name == args.volume) {
        Some(v) => v,
        None => mdm
            .volume_create(&VolumeCreate {
                name: args.volume.clone(),
                size_bytes: args.volume_size,
                pool: None,
                thick: false,
            })
            .await
            .with_context(|| format!("creating volume {}", args.volume))?,
    };
    if !vol.mappings.iter().any(|m| m.sdc_name == "sdc1") {
        mdm.volume_map(&VolumeMap {
            volume: vol.name.clone(),
            sdc: "sdc1".into(),
            access_mode: AccessMode::ReadWrite,
        })
        .await
        .with_context(|| format!("mapping volume {} to sdc1", vol.name))?;
    }
    Ok(())
}

/// The cluster CA of a local cluster (made on first use, in `DIR/tls/ca`).
fn cluster_ca(dir: &Path) -> Result<pflex_tls::ClusterCa> {
    let ca_dir = dir.join("tls").join("ca");
    pflex_tls::ClusterCa::open_or_create(&ca_dir)
        .with_context(|| format!("cluster CA in {}", ca_dir.display()))
}

/// The directory of the NBD client certificate `pflex up` issues
/// (libnbd's and qemu's file names).
pub fn nbd_client_tls_dir(dir: &Path) -> PathBuf {
    dir.join("tls").join("nbd-client")
}

/// Issues (again, on every start) the certificate of component `name`, for
/// the loopback names, into `DIR/NAME/tls`.
fn issue_tls(dir: &Path, name: &str) -> Result<PathBuf> {
    issue_tls_as(dir, name, name)
}

/// Like [`issue_tls`], the certificate naming `identity`.
fn issue_tls_as(dir: &Path, name: &str, identity: &str) -> Result<PathBuf> {
    let ca = cluster_ca(dir)?;
    let sans = ["localhost".to_string(), "127.0.0.1".to_string()];
    let node_dir = dir.join(name).join("tls");
    ca.issue(identity, &sans, &node_dir, pflex_tls::Layout::Node)?;
    Ok(node_dir)
}

/// Makes this process trust the CA of the local cluster in `data_dir` (if
/// it has one) for its HTTPS calls.
pub(crate) fn trust_local_ca(data_dir: &Path) -> Result<()> {
    let ca_dir = data_dir.join("tls").join("ca");
    if ca_dir.join(pflex_tls::CA_CERT).exists() {
        pflex_mdm_client::trust::trust_cluster_ca(&ca_dir)
            .with_context(|| format!("trusting the cluster CA in {}", ca_dir.display()))?;
    }
    Ok(())
}

fn print_ready(args: &UpArgs) {
    let uri = format!("nbd://127.0.0.1:{}/{}", args.nbd_port, args.volume);
    let dir = args.data_dir.display();
    let scheme = if args.no_tls { "http" } else { "https" };
    let dashboard = if args.mgmt_port == 0 {
        String::new()
    } else {
        format!(
            "  dashboard {scheme}://127.0.0.1:{}   (user admin, password in {dir}/mgmt/admin_password)\n",
            args.mgmt_port
        )
    };
    let ca = if args.no_tls {
        String::new()
    } else {
        format!("  CA      {dir}/tls/ca/ca-cert.pem   (every HTTP API is HTTPS with this CA)\n")
    };
    println!(
        r#"pflex: ready
  volume  {vol} served at {uri}
  MDM     {scheme}://127.0.0.1:{mdm}   (admin token: {dir}/mdm/admin_token)
{dashboard}{ca}  logs    {dir}/logs/

Try it (in another shell):
  nbdinfo {uri}
{tls}  pflex --data-dir {dir} cluster status
  fio --ioengine=nbd --uri={uri} fio-jobs/nbd/randwrite-4k-qd1.fio

A file system through FUSE and a loop device (works without the kernel nbd module):
  mkdir -p /tmp/pflex-fuse /mnt/pflex && nbdfuse /tmp/pflex-fuse/{vol} {uri} &
  dev=$(losetup -f --show /tmp/pflex-fuse/{vol}) && mkfs.ext4 -q $dev && mount $dev /mnt/pflex
  umount /mnt/pflex; losetup -d $dev; fusermount3 -u /tmp/pflex-fuse

With the kernel nbd module (modprobe nbd):
  nbd-client 127.0.0.1 {port} /dev/nbd0 -N {vol} -b 4096 && mkfs.ext4 /dev/nbd0 && mount /dev/nbd0 /mnt/pflex

If a component dies the others keep serving; `pflex node start NAME --data-dir {dir}` brings it
back. Ctrl-C stops the cluster; running `pflex up` again reuses its data."#,
        vol = args.volume,
        mdm = args.mdm_port,
        port = args.nbd_port,
        tls = if args.no_tls {
            String::new()
        } else {
            let certs = nbd_client_tls_dir(&args.data_dir);
            let certs = certs.display();
            format!(
                "  nbdinfo 'nbds://localhost:{port}/{vol}?tls-certificates={certs}'   (TLS, client certificate)\n",
                port = args.nbd_port,
                vol = args.volume,
            )
        },
    );
}

/// Waits for Ctrl-C / SIGTERM. A component that dies meanwhile (a child of
/// ours, or one that `pflex node start` brought back) is reported once; the
/// rest of the cluster keeps serving.
async fn supervise(cluster: &mut LocalCluster, data_dir: &Path) -> Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    let mut restarted_alive: Vec<(i32, String)> = Vec::new();
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => { eprintln!("pflex: stopping (Ctrl-C)"); return Ok(()); }
            _ = term.recv() => { eprintln!("pflex: stopping (SIGTERM)"); return Ok(()); }
            _ = tick.tick() => {
                cluster.reap_exited(data_dir);
                let ours: Vec<i32> =
                    cluster.components.iter().filter_map(|c| c.child.id()).map(|p| p as i32).collect();
                let now: Vec<(i32, String)> = recorded_pids(data_dir)
                    .into_iter()
                    .filter(|(pid, name)| !ours.contains(pid) && is_component(*pid, name))
                    .collect();
                for (pid, name) in &restarted_alive {
                    if !now.iter().any(|(p, _)| p == pid) {
                        report_exit(name, &format!("pid {pid} is gone"), data_dir);
                    }
                }
                restarted_alive = now;
            }
        }
    }
}

/// `pflex down`: stops a cluster started with `pflex up --detach` (and any
/// component `pflex node start` brought back), by the PIDs it recorded.
pub async fn down(data_dir: &Path) -> Result<()> {
    let pids_path = pids_file(data_dir);
    if !pids_path.exists() {
        bail!(
            "{} does not exist: no cluster was started in {}",
            pids_path.display(),
            data_dir.display()
        );
    }
    stop_recorded(data_dir, &[]).await;
    let _ = std::fs::remove_file(&pids_path);
    Ok(())
}
