//! One pflex cluster of real processes for the integration tests of every
//! crate: the MDM, N SDS nodes, SDCs and, if asked, the MGMT dashboard, on
//! loopback, under a temporary directory of its own.
//!
//! Why one harness: the MDM, SDS and SDC tests used to carry a fixture each,
//! each finding binaries, choosing flags and waiting for readiness its own
//! way. Here every test starts components the same way:
//!
//! - every binary comes from [`workspace_binary`], the package under test
//!   included, so a test never runs a binary older than the sources;
//! - command lines come from [`pflex_launch`], the builders `pflex up` and
//!   `pflex lab` use, plus what a test adds ([`ClusterSpec`],
//!   [`NodeOverrides`]);
//! - ports come from [`free_port`]; state lives under [`Cluster::dir`]
//!   (printed when the cluster starts), removed when the cluster drops
//!   unless `PFLEX_KEEP_TEST_DIR` is set, for a failure's databases and
//!   logs to be read afterwards;
//! - readiness is polled over HTTP (the MDM's `/health/status` with the admin
//!   token it wrote; an SDS's `/health` saying registered and ACTIVE; an
//!   SDC's or the dashboard's saying registered), never slept for. A
//!   component that exits while awaited fails the test at once, with its log;
//! - every process is killed by its own PID when the cluster drops, pass or
//!   fail (never by name or pattern); when a test fails, the tail of every
//!   log is printed.
//!
//! A component is named by [`Component`]; [`Cluster::kill`],
//! [`Cluster::terminate`], [`Cluster::start_again`] and [`Cluster::restart`]
//! work on any of them. A link can be cut by starting a node behind a
//! [`crate::TcpRelay`] ([`NodeOverrides::mdm_url`]). Tests that need no real
//! SDS or SDC register fakes over HTTP ([`Cluster::register_sds`] and
//! friends), exactly as real ones do.

mod admin;
mod inspect;
mod spec;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use pflex_launch::NodeLaunch;
use pflex_mdm_client::MdmClient;
use pflex_proto::api::ComponentStatus;
use pflex_proto::token::ClusterSecret;

use crate::{free_port, spawn_logged, workspace_binary, ProcessGuard};

pub use admin::{fake_request, fake_sds, heartbeat_token_keys, RegisteredNode};
use spec::with_flags;
pub use spec::{ClusterSpec, MdmOptions, NodeOverrides};

/// The join key of every test cluster.
pub const JOIN_KEY: &str = "test-join-key-0123456789";

/// How long a component may take to become ready.
const READY_TIMEOUT: Duration = Duration::from_secs(90);
/// How long [`Cluster::stop_all`] gives a component after SIGTERM.
const STOP_GRACE: Duration = Duration::from_secs(5);
/// How long [`Cluster::terminate`] waits for a component to exit.
const TERMINATE_TIMEOUT: Duration = Duration::from_secs(20);
/// Lines of each log shown when a test fails.
const LOG_TAIL_LINES: usize = 25;

/// One process of the cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Component {
    Mdm,
    /// The i-th SDS (0-based: `Sds(0)` is `sds1`).
    Sds(usize),
    /// The i-th SDC (0-based: `Sdc(0)` is `sdc1`).
    Sdc(usize),
    Mgmt,
}

/// What an SDS or SDC node is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Sds,
    Sdc,
}

/// An SDS or SDC of the cluster, and how to start it (again).
#[derive(Debug)]
pub struct Node {
    pub name: String,
    pub role: Role,
    pub control_port: u16,
    pub mgmt_port: u16,
    /// SDS: the data-plane port. SDC: the NBD port.
    pub data_port: u16,
    dir: PathBuf,
    mdm_url: String,
    flags: Vec<String>,
    process: Option<ProcessGuard>,
}

impl Node {
    /// The PID of the running process.
    pub fn pid(&self) -> Option<u32> {
        self.process.as_ref().map(ProcessGuard::pid)
    }

    /// `127.0.0.1:{data_port}`.
    pub fn data_addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.data_port))
    }

    /// The node's data directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn is_started(&self) -> bool {
        self.process.is_some()
    }

    fn command_line(&self, join_key_file: &Path, heartbeat: u64) -> Vec<String> {
        let (join_key, heartbeat) = (join_key_file.display().to_string(), heartbeat.to_string());
        let launch = NodeLaunch {
            mdm_url: &self.mdm_url,
            enroll: pflex_launch::Enroll::JoinKeyFile(&join_key),
            name: &self.name,
            host: "127.0.0.1",
            dir: &self.dir,
            heartbeat: &heartbeat,
            ports: [self.control_port, self.mgmt_port, self.data_port],
        };
        let base = match self.role {
            Role::Sds => pflex_launch::sds_args(&launch),
            Role::Sdc => pflex_launch::sdc_args(&launch),
        };
        with_flags(base, &self.flags)
    }
}

/// The MDM process and where its state is.
struct Mdm {
    port: u16,
    dir: PathBuf,
    options: MdmOptions,
    admin_token: String,
    process: Option<ProcessGuard>,
}

/// The dashboard process, and how to start it (again).
struct Mgmt {
    port: u16,
    dir: PathBuf,
    mdm_url: String,
    flags: Vec<String>,
    process: Option<ProcessGuard>,
}

/// A running cluster; every process is killed by PID when it drops.
pub struct Cluster {
    mdm: Mdm,
    sds: Vec<Node>,
    sdc: Vec<Node>,
    mgmt: Option<Mgmt>,
    spec: ClusterSpec,
    admin: MdmClient,
    http: reqwest::Client,
    join_key_file: PathBuf,
    /// Last: removed once every process is gone.
    dir: tempfile::TempDir,
}

impl Cluster {
    /// Starts the MDM, then every SDS, then every SDC, then the dashboard,
    /// each group waited for before the next.
    pub async fn start(spec: ClusterSpec) -> Cluster {
        let mut dir = tempfile::Builder::new().prefix("pflex-test-").tempdir().expect("a temp dir");
        dir.disable_cleanup(std::env::var_os("PFLEX_KEEP_TEST_DIR").is_some());
        eprintln!("cluster dir: {}", dir.path().display());
        let join_key_file = dir.path().join("join_key");
        std::fs::write(&join_key_file, format!("{JOIN_KEY}\n")).expect("writing the join key");
        let mdm_port = free_port();
        let mut cluster = Cluster {
            mdm: Mdm {
                port: mdm_port,
                dir: dir.path().join("mdm"),
                options: spec.mdm.clone(),
                admin_token: String::new(),
                process: None,
            },
            sds: Vec::new(),
            sdc: Vec::new(),
            mgmt: None,
            admin: MdmClient::new(&format!("http://127.0.0.1:{mdm_port}"), None).unwrap(),
            http: reqwest::Client::builder().timeout(Duration::from_secs(10)).build().unwrap(),
            join_key_file,
            spec,
            dir,
        };
        for _ in 0..cluster.spec.sds_count {
            cluster.define_sds(NodeOverrides::default());
        }
        for _ in 0..cluster.spec.sdc_count {
            let name = format!("sdc{}", cluster.sdc.len() + 1);
            cluster.define_sdc(&name, NodeOverrides::default());
        }
        if cluster.spec.mgmt {
            cluster.define_mgmt(NodeOverrides::default());
        }
        cluster.start_all_again().await;
        cluster
    }

    // ----- where things are -----

    /// The cluster's temporary root: every component's data dir, `logs/`.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// `rel` under [`Cluster::dir`].
    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    pub fn join_key_file(&self) -> &Path {
        &self.join_key_file
    }

    pub fn mdm_port(&self) -> u16 {
        self.mdm.port
    }

    /// Where the MDM listens (a [`crate::TcpRelay`] in front of it relays to this).
    pub fn mdm_addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.mdm.port))
    }

    pub fn mdm_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.mdm.port)
    }

    /// The running MDM's data directory.
    /// The MDM's PID, while it runs.
    pub fn mdm_pid(&self) -> Option<u32> {
        self.mdm.process.as_ref().map(ProcessGuard::pid)
    }

    pub fn mdm_dir(&self) -> &Path {
        &self.mdm.dir
    }

    /// The admin token the running MDM wrote.
    pub fn admin_token(&self) -> &str {
        &self.mdm.admin_token
    }

    /// An MDM client with the admin token.
    pub fn admin(&self) -> MdmClient {
        self.admin.clone()
    }

    /// An MDM client without any credential.
    pub fn anonymous(&self) -> MdmClient {
        MdmClient::new(&self.mdm_url(), None).unwrap()
    }

    /// The cluster secret as the MDM stored it (tests sign tokens with it).
    pub fn cluster_secret(&self) -> ClusterSecret {
        let text = std::fs::read_to_string(self.mdm.dir.join("cluster_secret")).unwrap();
        ClusterSecret::from_hex(&text).unwrap()
    }

    /// SDS `i` (0-based).
    pub fn sds(&self, i: usize) -> &Node {
        &self.sds[i]
    }

    pub fn sds_nodes(&self) -> &[Node] {
        &self.sds
    }

    /// SDC `i` (0-based).
    pub fn sdc(&self, i: usize) -> &Node {
        &self.sdc[i]
    }

    /// `nbd://` URI of `volume` on the first SDC.
    pub fn nbd_uri(&self, volume: &str) -> String {
        format!("nbd://127.0.0.1:{}/{volume}", self.sdc[0].data_port)
    }

    /// The dashboard's data directory, if it has one.
    pub fn mgmt_dir(&self) -> Option<&Path> {
        self.mgmt.as_ref().map(|m| m.dir.as_path())
    }

    /// The dashboard's base URL, if the cluster has one.
    pub fn mgmt_url(&self) -> Option<String> {
        self.mgmt.as_ref().map(|m| format!("http://127.0.0.1:{}", m.port))
    }

    // ----- adding nodes -----

    /// Adds an SDS (the next number) and waits until it is registered and
    /// ACTIVE; returns its index.
    pub async fn add_sds(&mut self, overrides: NodeOverrides) -> usize {
        let i = self.define_sds(overrides);
        self.start_again(Component::Sds(i)).await;
        i
    }

    /// Adds an SDC named `name` and waits until it is registered; returns
    /// its index.
    pub async fn add_sdc(&mut self, name: &str, overrides: NodeOverrides) -> usize {
        let i = self.define_sdc(name, overrides);
        self.start_again(Component::Sdc(i)).await;
        i
    }

    /// Adds the dashboard (the spec asked for none) and waits until it is
    /// registered.
    pub async fn add_mgmt(&mut self, overrides: NodeOverrides) {
        self.define_mgmt(overrides);
        self.start_again(Component::Mgmt).await;
    }

    /// Starts an extra `sds` named `name` with `join_key` (not waited for,
    /// not part of the cluster); its log is `logs/{name}.log`.
    pub fn spawn_sds_with_join_key(&self, name: &str, join_key: &str) -> ProcessGuard {
        let key_file = self.path(&format!("{name}-join-key"));
        std::fs::write(&key_file, join_key).unwrap();
        let node = Node {
            name: name.into(),
            role: Role::Sds,
            control_port: free_port(),
            mgmt_port: free_port(),
            data_port: free_port(),
            dir: self.path(name),
            mdm_url: self.mdm_url(),
            flags: strings(&["--device-size", "16M", "--io-engine", "sync"]),
            process: None,
        };
        let args = node.command_line(&key_file, self.spec.heartbeat_interval_secs);
        spawn_logged(name, &workspace_binary("sds-uring", "sds"), &args, &self.log_path(name))
    }

    fn define_sds(&mut self, overrides: NodeOverrides) -> usize {
        let n = self.sds.len() + 1;
        let engine = std::env::var("PFLEX_TEST_IO_ENGINE").unwrap_or_else(|_| "uring".into());
        let own = [
            "--index".into(),
            n.to_string(),
            "--fault-set".into(),
            format!("fs{n}"),
            "--device-size".into(),
            self.spec.sds_device_size.clone(),
            "--io-engine".into(),
            engine,
        ];
        let flags = with_flags(with_flags(own.to_vec(), &self.spec.sds_flags), &overrides.flags);
        let node = self.node(Role::Sds, &format!("sds{n}"), overrides.mdm_url, flags);
        self.sds.push(node);
        self.sds.len() - 1
    }

    fn define_sdc(&mut self, name: &str, overrides: NodeOverrides) -> usize {
        let node = self.node(Role::Sdc, name, overrides.mdm_url, overrides.flags);
        self.sdc.push(node);
        self.sdc.len() - 1
    }

    fn define_mgmt(&mut self, overrides: NodeOverrides) {
        assert!(self.mgmt.is_none(), "the cluster has a dashboard already");
        self.mgmt = Some(Mgmt {
            port: free_port(),
            dir: self.path("mgmt"),
            mdm_url: overrides.mdm_url.unwrap_or_else(|| self.mdm_url()),
            flags: overrides.flags,
            process: None,
        });
    }

    fn node(&self, role: Role, name: &str, mdm_url: Option<String>, flags: Vec<String>) -> Node {
        Node {
            name: name.into(),
            role,
            control_port: free_port(),
            mgmt_port: free_port(),
            data_port: free_port(),
            dir: self.path(name),
            mdm_url: mdm_url.unwrap_or_else(|| self.mdm_url()),
            flags,
            process: None,
        }
    }

    /// Gives a stopped SDS or SDC fresh ports for its next start.
    pub fn move_to_new_ports(&mut self, component: Component) {
        let node = self.node_mut(component);
        assert!(node.process.is_none(), "stop {} first", node.name);
        (node.control_port, node.mgmt_port, node.data_port) =
            (free_port(), free_port(), free_port());
    }

    // ----- stopping and starting -----

    /// `kill -9` of one component, by PID (a no-op if it is not running).
    pub fn kill(&mut self, component: Component) {
        if let Some(mut process) = self.process_mut(component).take() {
            process.kill_hard();
        }
    }

    /// SIGTERM to one component; returns its exit status.
    pub async fn terminate(&mut self, component: Component) -> ExitStatus {
        let name = self.name(component);
        let mut process =
            self.process_mut(component).take().unwrap_or_else(|| panic!("{name} is not running"));
        process.terminate();
        match process.wait_exit(TERMINATE_TIMEOUT).await {
            Some(status) => status,
            None => panic!("{name} did not stop within {TERMINATE_TIMEOUT:?} of SIGTERM"),
        }
    }

    /// Starts a stopped (or exited) component again, with its data and
    /// command line (ports included), and waits until it is ready.
    pub async fn start_again(&mut self, component: Component) {
        self.spawn(component);
        self.wait_ready(component).await;
    }

    /// Kills a component (if it runs) and starts it again on the same data.
    pub async fn restart(&mut self, component: Component) {
        self.kill(component);
        self.start_again(component).await;
    }

    /// Replaces the MDM by one with empty state (new cluster secret, no
    /// registrations) on the same address: every node must notice (401) and
    /// register again. Returns the state directory it replaced.
    pub async fn restart_mdm_with_fresh_state(&mut self) -> PathBuf {
        let fresh = (1..).find(|k| !self.path(&format!("mdm-{k}")).exists()).unwrap();
        self.restart_mdm_on(self.path(&format!("mdm-{fresh}"))).await
    }

    /// Replaces the MDM by one on the state in `dir` (say, the one
    /// [`Cluster::restart_mdm_with_fresh_state`] replaced), on the same
    /// address. Returns the state directory it replaced.
    pub async fn restart_mdm_on(&mut self, dir: PathBuf) -> PathBuf {
        self.kill(Component::Mdm);
        let replaced = std::mem::replace(&mut self.mdm.dir, dir);
        self.start_again(Component::Mdm).await;
        replaced
    }

    /// Adds command-line flags to a stopped SDS or SDC for its next starts.
    pub fn add_flags(&mut self, component: Component, flags: &[&str]) {
        let node = self.node_mut(component);
        assert!(node.process.is_none(), "stop {} first", node.name);
        node.flags.extend(flags.iter().map(|f| f.to_string()));
    }

    /// Stops every component, newest first: SIGTERM, then SIGKILL after 5 s.
    pub async fn stop_all(&mut self) {
        for component in self.components().into_iter().rev() {
            if let Some(mut process) = self.process_mut(component).take() {
                process.terminate();
                if process.wait_exit(STOP_GRACE).await.is_none() {
                    process.kill_hard();
                }
            }
        }
    }

    /// Starts every stopped component, as [`Cluster::start`] does.
    pub async fn start_all_again(&mut self) {
        self.start_group(&[Component::Mdm]).await;
        let sds: Vec<_> = (0..self.sds.len()).map(Component::Sds).collect();
        self.start_group(&sds).await;
        let sdc: Vec<_> = (0..self.sdc.len()).map(Component::Sdc).collect();
        self.start_group(&sdc).await;
        if self.mgmt.is_some() {
            self.start_group(&[Component::Mgmt]).await;
        }
    }

    /// Stops the whole cluster and starts it again on the same data.
    pub async fn restart_all(&mut self) {
        self.stop_all().await;
        self.start_all_again().await;
    }

    /// Whether `component` was started and has not exited since.
    pub fn is_running(&mut self, component: Component) -> bool {
        match self.process_mut(component) {
            Some(process) => process.exited().is_none(),
            None => false,
        }
    }

    async fn start_group(&mut self, group: &[Component]) {
        let stopped: Vec<Component> =
            group.iter().copied().filter(|c| !self.is_running(*c)).collect();
        for component in &stopped {
            self.spawn(*component);
        }
        for component in stopped {
            self.wait_ready(component).await;
        }
    }

    fn components(&self) -> Vec<Component> {
        let mut all = vec![Component::Mdm];
        all.extend((0..self.sds.len()).map(Component::Sds));
        all.extend((0..self.sdc.len()).map(Component::Sdc));
        all.extend(self.mgmt.as_ref().map(|_| Component::Mgmt));
        all
    }

    fn spawn(&mut self, component: Component) {
        let name = self.name(component);
        assert!(!self.is_running(component), "{name} is running already");
        let (program, args) = self.command(component);
        let guard = spawn_logged(&name, &program, &args, &self.log_path(&name));
        *self.process_mut(component) = Some(guard);
    }

    /// The binary and command line of `component`.
    fn command(&self, component: Component) -> (PathBuf, Vec<String>) {
        let join_key = self.join_key_file.display().to_string();
        match component {
            Component::Mdm => {
                let listen = format!("127.0.0.1:{}", self.mdm.port);
                let heartbeat = self.mdm.options.heartbeat_interval_secs.to_string();
                let mut args =
                    pflex_launch::mdm_args(&listen, &self.mdm.dir, Some(&join_key), &heartbeat);
                args.extend(self.mdm.options.flags());
                (workspace_binary("mdm", "mdm"), args)
            }
            Component::Sds(_) | Component::Sdc(_) => {
                let node = self.node_ref(component);
                let args =
                    node.command_line(&self.join_key_file, self.spec.heartbeat_interval_secs);
                let program = match node.role {
                    Role::Sds => workspace_binary("sds-uring", "sds"),
                    Role::Sdc => workspace_binary("sdc-nbd", "sdc"),
                };
                (program, args)
            }
            Component::Mgmt => {
                let mgmt = self.mgmt.as_ref().expect("the cluster has a dashboard");
                let listen = format!("127.0.0.1:{}", mgmt.port);
                let enroll = pflex_launch::Enroll::JoinKeyFile(&join_key);
                let args = pflex_launch::mgmt_args(&mgmt.mdm_url, enroll, &mgmt.dir, &listen);
                (workspace_binary("mgmt", "mgmt"), with_flags(args, &mgmt.flags))
            }
        }
    }

    fn name(&self, component: Component) -> String {
        match component {
            Component::Mdm => "mdm".into(),
            Component::Mgmt => "mgmt".into(),
            Component::Sds(_) | Component::Sdc(_) => self.node_ref(component).name.clone(),
        }
    }

    fn node_ref(&self, component: Component) -> &Node {
        match component {
            Component::Sds(i) => &self.sds[i],
            Component::Sdc(i) => &self.sdc[i],
            other => panic!("{other:?} is not an SDS or SDC"),
        }
    }

    fn node_mut(&mut self, component: Component) -> &mut Node {
        match component {
            Component::Sds(i) => &mut self.sds[i],
            Component::Sdc(i) => &mut self.sdc[i],
            other => panic!("{other:?} is not an SDS or SDC"),
        }
    }

    fn process_mut(&mut self, component: Component) -> &mut Option<ProcessGuard> {
        match component {
            Component::Mdm => &mut self.mdm.process,
            Component::Mgmt => {
                &mut self.mgmt.as_mut().expect("the cluster has a dashboard").process
            }
            node => &mut self.node_mut(node).process,
        }
    }

    // ----- readiness -----

    /// Polls `component`'s readiness until it holds; fails the test, with
    /// the component's log, when it exits or time runs out.
    async fn wait_ready(&mut self, component: Component) {
        let name = self.name(component);
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if self.is_ready(component).await {
                return;
            }
            if let Some(status) = self.process_mut(component).as_mut().and_then(|p| p.exited()) {
                panic!("{name} exited ({status}) before it was ready:\n{}", self.log(&name));
            }
            if Instant::now() > deadline {
                panic!("{name} not ready after {READY_TIMEOUT:?}:\n{}", self.log_tails());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn is_ready(&mut self, component: Component) -> bool {
        match component {
            Component::Mdm => self.mdm_ready().await,
            Component::Sds(i) => self
                .node_status(self.sds[i].mgmt_port)
                .await
                // Registered, and past the wait a restarted node observes
                // before it serves as a primary (leases it may have granted
                // in its earlier life): ACTIVE, not RECOVERING.
                .is_some_and(|s| s.registered && s.status == "ACTIVE"),
            Component::Sdc(i) => {
                self.node_status(self.sdc[i].mgmt_port).await.is_some_and(|s| s.registered)
            }
            Component::Mgmt => {
                let port = self.mgmt.as_ref().expect("the cluster has a dashboard").port;
                self.node_status(port).await.is_some_and(|s| s.registered)
            }
        }
    }

    /// Whether the MDM answers its admin token (the file it writes at
    /// start); once it does, the admin client uses that token.
    async fn mdm_ready(&mut self) -> bool {
        let Ok(token) = std::fs::read_to_string(self.mdm.dir.join("admin_token")) else {
            return false;
        };
        let token = token.trim().to_string();
        let url = format!("{}/health/status", self.mdm_url());
        let reply =
            self.http.get(url).bearer_auth(&token).timeout(Duration::from_secs(2)).send().await;
        if !matches!(reply, Ok(r) if r.status().is_success()) {
            return false;
        }
        self.admin = MdmClient::new(&self.mdm_url(), Some(token.clone())).unwrap();
        self.mdm.admin_token = token;
        true
    }

    async fn node_status(&self, mgmt_port: u16) -> Option<ComponentStatus> {
        let url = format!("http://127.0.0.1:{mgmt_port}/health");
        let reply = self.http.get(url).timeout(Duration::from_secs(2)).send().await.ok()?;
        reply.json().await.ok()
    }

    // ----- logs -----

    fn log_path(&self, name: &str) -> PathBuf {
        self.path(&format!("logs/{name}.log"))
    }

    /// The log of the process named `name` (every life of it).
    pub fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.log_path(name)).unwrap_or_default()
    }

    /// The last lines of every log.
    pub fn log_tails(&self) -> String {
        let mut logs: Vec<PathBuf> = std::fs::read_dir(self.path("logs"))
            .map(|d| d.filter_map(|e| e.ok()).map(|e| e.path()).collect())
            .unwrap_or_default();
        logs.sort();
        logs.iter().map(|log| format!("--- {} ---\n{}\n", log.display(), tail(log))).collect()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("cluster logs:\n{}", self.log_tails());
        }
        for component in self.components().into_iter().rev() {
            self.kill(component);
        }
    }
}

fn strings(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| s.to_string()).collect()
}

/// The last [`LOG_TAIL_LINES`] lines of a file.
fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n")
}
