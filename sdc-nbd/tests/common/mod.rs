//! Test fixture: a whole pflex cluster (MDM, three SDS, one SDC) as real
//! processes on loopback, with ports of its own and a temporary data dir.
//!
//! Every process is killed by PID when the [`Cluster`] is dropped, pass or
//! fail; on failure the tail of each process log is printed. Readiness is
//! always polled (HTTP endpoints, files), never slept for.

#![allow(dead_code)]

use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use pflex_mdm_client::MdmClient;
use pflex_proto::api::{ChunkChecksum, ComponentStatus, VolumeCreate, VolumeMap};
use pflex_proto::token::AccessMode;

pub const MIB: u64 = 1 << 20;
const READY_TIMEOUT: Duration = Duration::from_secs(90);

/// Directory holding the workspace's binaries (this test's profile).
pub fn bin_dir() -> PathBuf {
    Path::new(env!("CARGO_BIN_EXE_sdc")).parent().expect("binary dir").to_path_buf()
}

/// Brings the MDM and SDS binaries up to date (once per test process).
fn build_peers() {
    pflex_testkit::workspace_binary("mdm", "mdm");
    pflex_testkit::workspace_binary("sds-uring", "sds");
}

pub use pflex_testkit::free_port;

/// Ports of one SDS.
#[derive(Debug, Clone, Copy)]
pub struct SdsPorts {
    pub control: u16,
    pub mgmt: u16,
    pub data: u16,
}

/// All ports of one cluster.
#[derive(Debug, Clone)]
pub struct Ports {
    pub mdm: u16,
    pub sds: Vec<SdsPorts>,
    pub nbd: u16,
    pub sdc_control: u16,
    pub sdc_mgmt: u16,
}

impl Ports {
    fn allocate() -> Self {
        Self {
            mdm: free_port(),
            sds: (0..3)
                .map(|_| SdsPorts { control: free_port(), mgmt: free_port(), data: free_port() })
                .collect(),
            nbd: free_port(),
            sdc_control: free_port(),
            sdc_mgmt: free_port(),
        }
    }
}

struct Proc {
    name: String,
    child: Child,
    log: PathBuf,
}

/// A volume to create and map to the SDC.
#[derive(Debug, Clone)]
pub struct VolumeSpec {
    pub name: &'static str,
    pub size: u64,
    pub mode: AccessMode,
}

pub fn rw(name: &'static str, size: u64) -> VolumeSpec {
    VolumeSpec { name, size, mode: AccessMode::ReadWrite }
}

/// Knobs of a test cluster.
#[derive(Debug, Clone)]
pub struct Options {
    pub device_size: &'static str,
    pub token_ttl_secs: u64,
    pub failed_after_secs: u64,
    /// Whether the MDM fails an SDS at once when a report of it being
    /// unreachable is confirmed by its own probe (the MDM's default).
    pub probe_on_report: bool,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            device_size: "512M",
            token_ttl_secs: 60,
            failed_after_secs: 120,
            probe_on_report: true,
        }
    }
}

/// A running cluster.
pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub ports: Ports,
    pub volumes: Vec<VolumeSpec>,
    procs: Vec<Proc>,
    rt: tokio::runtime::Runtime,
    http: reqwest::Client,
    options: Options,
}

impl Cluster {
    /// Starts MDM, three SDS and the SDC, creates and maps `volumes`, and
    /// waits until the SDC serves them.
    pub fn start(volumes: &[VolumeSpec]) -> Self {
        Self::start_with(volumes, Options::default())
    }

    pub fn start_with(volumes: &[VolumeSpec], options: Options) -> Self {
        build_peers();
        let dir = tempfile::Builder::new().prefix("pflex-test-").tempdir().unwrap();
        let key = dir.path().join("join_key");
        std::fs::write(&key, hex_random()).unwrap();
        let mut cluster = Cluster {
            dir,
            ports: Ports::allocate(),
            volumes: volumes.to_vec(),
            procs: Vec::new(),
            rt: tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap(),
            http: reqwest::Client::builder().timeout(Duration::from_secs(10)).build().unwrap(),
            options,
        };
        cluster.spawn_all();
        let admin = cluster.admin();
        for v in volumes {
            let create =
                VolumeCreate { name: v.name.into(), size_bytes: v.size, pool: None, thick: false };
            cluster.rt.block_on(admin.volume_create(&create)).expect("creating a volume");
            let map = VolumeMap { volume: v.name.into(), sdc: "sdc1".into(), access_mode: v.mode };
            cluster.rt.block_on(admin.volume_map(&map)).expect("mapping a volume");
        }
        cluster.wait_volumes_served();
        cluster
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    pub fn mdm_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.ports.mdm)
    }

    pub fn nbd_uri(&self, volume: &str) -> String {
        format!("nbd://127.0.0.1:{}/{volume}", self.ports.nbd)
    }

    /// An MDM client with the admin token.
    pub fn admin(&self) -> MdmClient {
        let token = std::fs::read_to_string(self.path("mdm/admin_token")).unwrap();
        MdmClient::new(&self.mdm_url(), Some(token.trim().to_string())).unwrap()
    }

    pub fn block_on<F: std::future::Future>(&self, f: F) -> F::Output {
        self.rt.block_on(f)
    }

    fn spawn(&mut self, name: &str, program: &str, args: Vec<String>) {
        std::fs::create_dir_all(self.path("logs")).unwrap();
        let log = self.path(&format!("logs/{name}.log"));
        let out = std::fs::OpenOptions::new().create(true).append(true).open(&log).unwrap();
        let child = Command::new(bin_dir().join(program))
            .args(&args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {program}: {e}"));
        self.procs.push(Proc { name: name.into(), child, log });
    }

    fn spawn_all(&mut self) {
        let key = self.path("join_key").display().to_string();
        let root = self.dir.path().to_path_buf();
        let d = move |p: &str| root.join(p).display().to_string();
        let mdm_args = vec![
            "--listen".into(),
            format!("127.0.0.1:{}", self.ports.mdm),
            "--data-dir".into(),
            d("mdm"),
            "--join-key-file".into(),
            key.clone(),
            "--heartbeat-interval-secs".into(),
            "1".into(),
            "--stale-after-secs".into(),
            (self.options.failed_after_secs / 2).clamp(1, 10).to_string(),
            "--failed-after-secs".into(),
            self.options.failed_after_secs.to_string(),
            "--token-ttl-secs".into(),
            self.options.token_ttl_secs.to_string(),
            "--probe-on-report".into(),
            self.options.probe_on_report.to_string(),
        ];
        self.spawn("mdm", "mdm", mdm_args);
        self.wait_until("MDM ready", || self.mdm_ready());
        for i in 0..3 {
            let p = self.ports.sds[i];
            let n = i + 1;
            let args = vec![
                "--mdm".into(),
                self.mdm_url(),
                "--join-key-file".into(),
                key.clone(),
                "--name".into(),
                format!("sds{n}"),
                "--index".into(),
                n.to_string(),
                "--control-port".into(),
                p.control.to_string(),
                "--mgmt-port".into(),
                p.mgmt.to_string(),
                "--data-port".into(),
                p.data.to_string(),
                "--host".into(),
                "127.0.0.1".into(),
                "--data-dir".into(),
                d(&format!("sds{n}")),
                "--device".into(),
                d(&format!("sds{n}/dev0.img")),
                "--device-size".into(),
                self.options.device_size.into(),
                "--heartbeat-interval-secs".into(),
                "1".into(),
            ];
            self.spawn(&format!("sds{n}"), "sds", args);
        }
        for i in 0..3 {
            let port = self.ports.sds[i].mgmt;
            self.wait_until(&format!("sds{} registered", i + 1), || self.registered(port));
        }
        let sdc_args = vec![
            "--mdm".into(),
            self.mdm_url(),
            "--join-key-file".into(),
            key,
            "--name".into(),
            "sdc1".into(),
            "--data-dir".into(),
            d("sdc1"),
            "--nbd-listen".into(),
            format!("127.0.0.1:{}", self.ports.nbd),
            "--control-port".into(),
            self.ports.sdc_control.to_string(),
            "--mgmt-port".into(),
            self.ports.sdc_mgmt.to_string(),
            "--host".into(),
            "127.0.0.1".into(),
            "--heartbeat-interval-secs".into(),
            "1".into(),
        ];
        self.spawn("sdc", "sdc", sdc_args);
        let port = self.ports.sdc_mgmt;
        self.wait_until("sdc registered", || self.registered(port));
    }

    /// Starts another SDC named `name`, maps `volume` to it as well, and
    /// waits until it serves the volume; returns its NBD port.
    pub fn add_sdc(&mut self, name: &str, volume: &str) -> u16 {
        let (nbd, control, mgmt) = (free_port(), free_port(), free_port());
        let args = vec![
            "--mdm".into(),
            self.mdm_url(),
            "--join-key-file".into(),
            self.path("join_key").display().to_string(),
            "--name".into(),
            name.into(),
            "--data-dir".into(),
            self.path(name).display().to_string(),
            "--nbd-listen".into(),
            format!("127.0.0.1:{nbd}"),
            "--control-port".into(),
            control.to_string(),
            "--mgmt-port".into(),
            mgmt.to_string(),
            "--host".into(),
            "127.0.0.1".into(),
            "--heartbeat-interval-secs".into(),
            "1".into(),
        ];
        self.spawn(name, "sdc", args);
        self.wait_until(&format!("{name} registered"), || self.registered(mgmt));
        let map = VolumeMap {
            volume: volume.into(),
            sdc: name.into(),
            access_mode: AccessMode::ReadWrite,
        };
        self.rt.block_on(self.admin().volume_map(&map)).expect("mapping to the second SDC");
        self.wait_until(&format!("{volume} served by {name}"), || {
            self.get_json::<Vec<serde_json::Value>>(control, "/volumes")
                .is_some_and(|l| l.iter().any(|v| v["name"] == volume && v["routed"] == true))
        });
        nbd
    }

    fn mdm_ready(&self) -> bool {
        let Ok(token) = std::fs::read_to_string(self.path("mdm/admin_token")) else {
            return false;
        };
        let url = format!("{}/health/status", self.mdm_url());
        self.rt.block_on(async {
            matches!(self.http.get(url).bearer_auth(token.trim()).send().await,
                     Ok(r) if r.status().is_success())
        })
    }

    /// GET a JSON document from a loopback port.
    pub fn get_json<T: serde::de::DeserializeOwned>(&self, port: u16, path: &str) -> Option<T> {
        let url = format!("http://127.0.0.1:{port}{path}");
        self.rt.block_on(async {
            let r = self.http.get(url).send().await.ok()?;
            if !r.status().is_success() {
                return None;
            }
            r.json::<T>().await.ok()
        })
    }

    pub fn get_text(&self, port: u16, path: &str) -> Option<String> {
        let url = format!("http://127.0.0.1:{port}{path}");
        self.rt.block_on(async { self.http.get(url).send().await.ok()?.text().await.ok() })
    }

    fn registered(&self, mgmt_port: u16) -> bool {
        self.get_json::<ComponentStatus>(mgmt_port, "/health").is_some_and(|s| s.registered)
    }

    /// Waits until the SDC has routing for every volume of the spec.
    pub fn wait_volumes_served(&mut self) {
        let names: Vec<&str> = self.volumes.iter().map(|v| v.name).collect();
        self.wait_until("volumes served by the SDC", || {
            let Some(list) =
                self.get_json::<Vec<serde_json::Value>>(self.ports.sdc_control, "/volumes")
            else {
                return false;
            };
            names.iter().all(|n| list.iter().any(|v| v["name"] == *n && v["routed"] == true))
        });
    }

    /// Polls `ready` until true; fails with the logs when a process died
    /// or time ran out.
    fn wait_until(&self, what: &str, mut ready: impl FnMut() -> bool) {
        let deadline = Instant::now() + READY_TIMEOUT;
        while Instant::now() < deadline {
            if ready() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("timed out waiting for {what}\n{}", self.log_tails());
    }

    /// Whether every process is still running.
    pub fn all_alive(&mut self) -> bool {
        self.procs.iter_mut().all(|p| matches!(p.child.try_wait(), Ok(None)))
    }

    pub fn sdc_alive(&mut self) -> bool {
        self.procs
            .iter_mut()
            .filter(|p| p.name == "sdc")
            .all(|p| matches!(p.child.try_wait(), Ok(None)))
    }

    /// Kills one process (`mdm`, `sds1`..`sds3`, `sdc`) by PID, as a crash would.
    pub fn kill(&mut self, name: &str) {
        let i = self.procs.iter().position(|p| p.name == name).expect("no such process");
        let mut p = self.procs.remove(i);
        let _ = p.child.kill();
        let _ = p.child.wait();
    }

    /// Stops every process (SIGTERM, then SIGKILL after 5 s), by PID.
    pub fn stop(&mut self) {
        for p in self.procs.iter_mut().rev() {
            let _ = Command::new("kill").arg("-TERM").arg(p.child.id().to_string()).status();
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = p.child.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = p.child.kill();
            let _ = p.child.wait();
        }
        self.procs.clear();
    }

    /// Stops the whole cluster and starts it again on the same data.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn_all();
        self.wait_volumes_served();
    }

    pub fn log_tails(&self) -> String {
        let mut out = String::new();
        let mut logs: Vec<PathBuf> = std::fs::read_dir(self.path("logs"))
            .map(|d| d.filter_map(|e| e.ok()).map(|e| e.path()).collect())
            .unwrap_or_default();
        logs.sort();
        for log in logs {
            let mut text = String::new();
            let _ = std::fs::File::open(&log).and_then(|mut f| f.read_to_string(&mut text));
            let lines: Vec<&str> = text.lines().collect();
            let tail = &lines[lines.len().saturating_sub(25)..];
            out.push_str(&format!("--- {} ---\n{}\n", log.display(), tail.join("\n")));
        }
        out
    }

    /// Compares both replicas of chunks `chunks` of `volume` through the
    /// SDS control ports; returns how many chunks hold data. Panics on any
    /// mismatch.
    pub fn check_replicas(&self, volume: &str, chunks: std::ops::Range<u64>) -> usize {
        let admin = self.admin();
        let map = self.rt.block_on(admin.placement(volume)).expect("placement");
        let sds = self.rt.block_on(admin.sds_list()).expect("sds list");
        let control_port =
            |id: u64| sds.iter().find(|s| s.id == id).expect("SDS in list").control_port;
        let mut allocated = 0;
        for c in chunks {
            let pg = map.pg_of(c).expect("pg");
            let path = format!("/chunk/{}/{c}/checksum", map.volume_id);
            let a: ChunkChecksum = self
                .get_json(control_port(pg.primary), &path)
                .unwrap_or_else(|| panic!("checksum of chunk {c} from the primary"));
            let b: ChunkChecksum = self
                .get_json(control_port(pg.secondary), &path)
                .unwrap_or_else(|| panic!("checksum of chunk {c} from the secondary"));
            assert_eq!(
                (a.allocated, a.crc32),
                (b.allocated, b.crc32),
                "replicas of chunk {c} of {volume} differ (primary {}, secondary {})",
                pg.primary,
                pg.secondary
            );
            if a.allocated {
                allocated += 1;
            }
        }
        allocated
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("cluster logs:\n{}", self.log_tails());
        }
        self.stop();
    }
}

fn hex_random() -> String {
    let bytes: [u8; 16] = pflex_proto::random_bytes();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Runs a command to completion within `timeout`, killing it (by PID) if
/// it takes longer.
pub fn run(program: &str, args: &[&str], timeout: Duration) -> Output {
    let child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("starting {program}: {e}"));
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(timeout) {
        Ok(out) => out.unwrap(),
        Err(_) => {
            let _ = Command::new("kill").arg("-KILL").arg(pid.to_string()).status();
            panic!("{program} {args:?} did not finish within {timeout:?}");
        }
    }
}

/// Like [`run`], and fails the test unless the command succeeded.
pub fn run_ok(program: &str, args: &[&str], timeout: Duration) -> String {
    let out = run(program, args, timeout);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}\nstdout: {stdout}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// Deterministic pseudo-random bytes (xorshift), for test data.
pub fn pseudo_random(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// A minimal blocking NBD client: fixed newstyle, `NBD_OPT_GO`, simple
/// replies, one request at a time.
pub struct NbdClient {
    pub s: std::net::TcpStream,
    next_cookie: u64,
}

pub mod cmd {
    pub const READ: u16 = 0;
    pub const WRITE: u16 = 1;
    pub const FLUSH: u16 = 3;
}

impl NbdClient {
    pub fn open(port: u16, export: &str) -> Self {
        use std::io::Write;
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        let mut greeting = [0u8; 18];
        s.read_exact(&mut greeting).unwrap();
        assert_eq!(&greeting[..16], b"NBDMAGICIHAVEOPT");
        s.write_all(&3u32.to_be_bytes()).unwrap();
        let mut data = (export.len() as u32).to_be_bytes().to_vec();
        data.extend_from_slice(export.as_bytes());
        data.extend_from_slice(&0u16.to_be_bytes());
        let mut opt = b"IHAVEOPT".to_vec();
        opt.extend_from_slice(&7u32.to_be_bytes());
        opt.extend_from_slice(&(data.len() as u32).to_be_bytes());
        opt.extend_from_slice(&data);
        s.write_all(&opt).unwrap();
        loop {
            let mut h = [0u8; 20];
            s.read_exact(&mut h).unwrap();
            let kind = u32::from_be_bytes(h[12..16].try_into().unwrap());
            let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
            let mut body = vec![0u8; len as usize];
            s.read_exact(&mut body).unwrap();
            assert_eq!(kind & (1 << 31), 0, "GO for {export} failed");
            if kind == 1 {
                return Self { s, next_cookie: 1 };
            }
        }
    }

    /// Sends one request and waits for its reply: the READ data, or the
    /// NBD error value.
    pub fn request(
        &mut self,
        command: u16,
        offset: u64,
        len: u32,
        payload: &[u8],
    ) -> Result<Vec<u8>, u32> {
        use std::io::Write;
        let cookie = self.next_cookie;
        self.next_cookie += 1;
        let mut r = 0x2560_9513u32.to_be_bytes().to_vec();
        r.extend_from_slice(&0u16.to_be_bytes());
        r.extend_from_slice(&command.to_be_bytes());
        r.extend_from_slice(&cookie.to_be_bytes());
        r.extend_from_slice(&offset.to_be_bytes());
        r.extend_from_slice(&len.to_be_bytes());
        r.extend_from_slice(payload);
        self.s.write_all(&r).unwrap();
        let mut h = [0u8; 16];
        self.s.read_exact(&mut h).unwrap();
        assert_eq!(
            u32::from_be_bytes(h[0..4].try_into().unwrap()),
            0x6744_6698,
            "simple reply magic"
        );
        assert_eq!(u64::from_be_bytes(h[8..16].try_into().unwrap()), cookie);
        let error = u32::from_be_bytes(h[4..8].try_into().unwrap());
        if error != 0 {
            return Err(error);
        }
        let mut data = vec![0u8; if command == cmd::READ { len as usize } else { 0 }];
        self.s.read_exact(&mut data).unwrap();
        Ok(data)
    }
}
