//! What the integration tests of several pflex crates share.
//!
//! - [`free_port`]: a loopback port not handed out before in this process;
//! - [`ProcessGuard`] and [`spawn_logged`]: a spawned component with its
//!   output in a log file, killed by its own PID when the guard drops, pass
//!   or fail (never by name or pattern);
//! - [`wait_for`]: polls a condition until it holds, or fails the test;
//! - [`TcpRelay`]: one link of a cluster that a test can cut and heal;
//! - [`term_relay::TermRelay`]: a node's link to its MDM that plays leader
//!   changes and delivers a deposed leader's answer late;
//! - [`workspace_binary`]: a package's binary from the same target
//!   directory, brought up to date once per test process (cargo only builds
//!   the binaries of the package under test, and only before the run);
//! - [`cluster`]: a whole cluster of real processes (MDM, SDS, SDC, MGMT),
//!   the one harness every crate's integration tests start components with.

pub mod cluster;
pub mod flood;
pub mod linearizability;
pub mod mdm_cluster;
pub mod tamper;
pub mod term_relay;

use std::collections::HashSet;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// A loopback port nobody in this process was given before (bound and
/// released, so another process could still take it; that is unlikely).
pub fn free_port() -> u16 {
    static GIVEN: OnceLock<Mutex<HashSet<u16>>> = OnceLock::new();
    let given = GIVEN.get_or_init(|| Mutex::new(HashSet::new()));
    loop {
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        if given.lock().unwrap().insert(port) {
            return port;
        }
    }
}

/// A spawned process, killed by its PID (and reaped) when dropped.
#[derive(Debug)]
pub struct ProcessGuard {
    child: Child,
    pub name: String,
}

impl ProcessGuard {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGTERM (the process exits on its own; see [`ProcessGuard::wait_exit`]).
    pub fn terminate(&mut self) {
        let pid = libc::pid_t::try_from(self.pid()).expect("a PID fits pid_t");
        // SAFETY: kill(2) with the PID of a child this guard spawned and has
        // not reaped, so the PID cannot belong to another process.
        unsafe {
            libc::kill(pid, libc::SIGTERM);
        }
    }

    /// `kill -9` and reap.
    pub fn kill_hard(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// The exit status, if the process has exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Polls until the process exits, for at most `limit`.
    pub async fn wait_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Some(status) = self.exited() {
                return Some(status);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        None
    }
}

/// Polls `check` every 100 ms until it holds; panics naming `what` once
/// `timeout` has passed. For waiting on state, never as a sleep.
pub async fn wait_for<F, Fut>(what: &str, timeout: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

impl Drop for ProcessGuard {
    fn drop(&mut self) {
        self.kill_hard();
    }
}

/// Starts `program` with `args`, `RUST_LOG=info`, no stdin, and stdout and
/// stderr appended to the file `log` (so a restarted process keeps the log
/// of its earlier lives).
pub fn spawn_logged(name: &str, program: &Path, args: &[String], log: &Path) -> ProcessGuard {
    if let Some(dir) = log.parent() {
        std::fs::create_dir_all(dir).unwrap();
    }
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap_or_else(|e| panic!("cannot open {}: {e}", log.display()));
    let child = Command::new(program)
        .args(args)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", program.display()));
    ProcessGuard { child, name: name.to_string() }
}

/// The profile directory of the running test (`target/debug` or
/// `target/release`): tests run from its `deps/`.
fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("the test knows its own path");
    exe.parent().and_then(Path::parent).expect("tests run from <profile>/deps").to_path_buf()
}

/// The binary `name` of package `package` in this profile directory, built
/// (or brought up to date: `cargo build` is a no-op when it is) once per test
/// process, so a test never runs a binary older than the sources.
pub fn workspace_binary(package: &str, name: &str) -> PathBuf {
    static BUILT: OnceLock<Mutex<HashSet<String>>> = OnceLock::new();
    let built = BUILT.get_or_init(|| Mutex::new(HashSet::new()));
    let dir = profile_dir();
    let path = dir.join(name);
    let mut built = built.lock().unwrap_or_else(|p| p.into_inner());
    if !built.contains(name) {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut args = vec!["build", "--quiet", "-p", package, "--bin", name];
        if dir.ends_with("release") {
            args.push("--release");
        }
        let mut build = Command::new(cargo);
        build.args(&args);
        if let Some(target) = dir.parent() {
            build.env("CARGO_TARGET_DIR", target);
        }
        let status = build.status().expect("run cargo build");
        assert!(status.success(), "cargo build -p {package} --bin {name} failed");
        built.insert(name.to_string());
    }
    assert!(path.exists(), "no {name} binary at {}", path.display());
    path
}

/// A TCP relay on loopback that a test can cut and heal: one link of the
/// cluster (say an SDS's connection to the MDM) goes through it while the
/// others stay direct, so a node can be cut off from one peer only.
/// Cutting closes every relayed connection and refuses new ones (accepted,
/// then closed at once); healing relays again. Stops when dropped.
pub struct TcpRelay {
    pub port: u16,
    cut: std::sync::Arc<tokio::sync::watch::Sender<bool>>,
    task: tokio::task::JoinHandle<()>,
}

impl TcpRelay {
    /// Relays `127.0.0.1:{port}` to `target`.
    pub async fn start(target: std::net::SocketAddr) -> TcpRelay {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (cut, _) = tokio::sync::watch::channel(false);
        let cut = std::sync::Arc::new(cut);
        let watch = cut.clone();
        let task = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if *watch.borrow() {
                    continue; // dropped: the peer sees the connection close
                }
                let mut cut_rx = watch.subscribe();
                tokio::spawn(async move {
                    let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = cut_rx.wait_for(|cut| *cut) => {}
                    }
                });
            }
        });
        TcpRelay { port, cut, task }
    }

    /// `http://127.0.0.1:{port}`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn cut(&self) {
        self.cut.send_replace(true);
    }

    pub fn heal(&self) {
        self.cut.send_replace(false);
    }
}

impl Drop for TcpRelay {
    fn drop(&mut self) {
        self.task.abort();
    }
}
