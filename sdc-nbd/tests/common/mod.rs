//! What the SDC tests add to the shared cluster harness
//! ([`pflex_testkit::cluster`]): a cluster of an MDM, three SDS and one SDC
//! serving the volumes a test asks for, external NBD tools run with a time
//! limit, and a minimal NBD client.

#![allow(dead_code)]

use std::io::Read as _;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use pflex_proto::token::AccessMode;
use pflex_testkit::cluster::{Cluster, ClusterSpec, MdmOptions};

pub const MIB: u64 = 1 << 20;

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
    pub token_ttl_secs: u64,
    pub failed_after_secs: u64,
    /// Whether the MDM fails an SDS at once when a report of it being
    /// unreachable is confirmed by its own probe (the MDM's default).
    pub probe_on_report: bool,
}

impl Default for Options {
    fn default() -> Self {
        Self { token_ttl_secs: 60, failed_after_secs: 120, probe_on_report: true }
    }
}

/// Starts MDM, three SDS and the SDC `sdc1`, creates and maps `volumes`,
/// and waits until the SDC serves them.
pub async fn start(volumes: &[VolumeSpec]) -> Cluster {
    start_with(volumes, Options::default()).await
}

pub async fn start_with(volumes: &[VolumeSpec], options: Options) -> Cluster {
    let mdm = MdmOptions {
        heartbeat_interval_secs: 1,
        stale_after_secs: Some((options.failed_after_secs / 2).clamp(1, 10)),
        failed_after_secs: Some(options.failed_after_secs),
        token_ttl_secs: Some(options.token_ttl_secs),
        probe_on_report: Some(options.probe_on_report),
        ..MdmOptions::default()
    };
    let spec = ClusterSpec {
        mdm,
        sds_count: 3,
        sds_device_size: "512M".into(),
        sdc_count: 1,
        ..ClusterSpec::default()
    };
    let cluster = Cluster::start(spec).await;
    for v in volumes {
        cluster.create_volume(v.name, v.size).await;
        cluster.map_volume(v.name, "sdc1", v.mode).await;
    }
    let names: Vec<&str> = volumes.iter().map(|v| v.name).collect();
    cluster.wait_served(0, &names).await;
    cluster
}

/// An SDC serving in-memory exports only (no cluster), stopped when dropped.
pub struct MemorySdc {
    pub child: std::process::Child,
    pub port: u16,
}

impl MemorySdc {
    /// Starts `sdc ARGS --nbd-listen IP:PORT` on a free port and waits until
    /// it accepts connections.
    pub fn start(ip: &str, args: &[&str]) -> MemorySdc {
        let port = pflex_testkit::free_port();
        let child = Command::new(pflex_testkit::workspace_binary("sdc-nbd", "sdc"))
            .args(args)
            .arg("--nbd-listen")
            .arg(format!("{ip}:{port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let sdc = MemorySdc { child, port };
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(std::time::Instant::now() < deadline, "sdc did not listen on {port}");
            std::thread::sleep(Duration::from_millis(50));
        }
        sdc
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for MemorySdc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
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
