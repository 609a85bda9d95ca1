//! `pflex verify` against a real NBD server: nbdkit's `file` plugin on a
//! temporary file, which the tests then damage the way a broken cluster
//! would (an older copy, zeroes, a flipped byte) and expect `check` to say
//! so. nbdkit must be installed (test.sh installs it); without it these
//! tests fail.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use pflex_testkit::{free_port, spawn_logged, wait_for, ProcessGuard};
use serde_json::Value;

const BLOCK: u64 = 4096;

fn nbdkit_binary() -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join("nbdkit"))
        .find(|p| p.is_file())
        .expect("nbdkit is not installed (apt-get install nbdkit); these tests need it")
}

/// nbdkit serving `disk` on a fresh loopback port, killed on drop.
struct Nbdkit {
    _guard: ProcessGuard,
    uri: String,
}

async fn start_nbdkit(disk: &Path) -> Nbdkit {
    let port = free_port();
    let args: Vec<String> = [
        "--foreground",
        "--exit-with-parent",
        "-p",
        &port.to_string(),
        "-i",
        "127.0.0.1",
        "file",
        disk.to_str().unwrap(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let log = disk.with_file_name(format!("nbdkit-{port}.log"));
    let mut guard = spawn_logged("nbdkit", &nbdkit_binary(), &args, &log);
    wait_for("nbdkit to serve", Duration::from_secs(20), || async move {
        pflex_tools::nbd_probe::list_exports(("127.0.0.1", port)).await.is_ok()
    })
    .await;
    assert!(guard.exited().is_none(), "nbdkit exited: {}", std::fs::read_to_string(&log).unwrap());
    Nbdkit { _guard: guard, uri: format!("nbd://127.0.0.1:{port}/") }
}

/// Runs `pflex ARGS --json`; returns the exit success, the JSON and stderr.
async fn pflex(args: &[&str]) -> (bool, Value, String) {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_pflex"))
        .args(args)
        .arg("--json")
        .stdin(Stdio::null())
        .output()
        .await
        .expect("run pflex");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let json = serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("pflex {args:?}: no JSON ({e}): {stdout}\nstderr: {stderr}"));
    (out.status.success(), json, stderr)
}

fn num(v: &Value, key: &str) -> u64 {
    v[key].as_u64().unwrap_or_else(|| panic!("no number {key} in {v:#}"))
}

struct Region {
    dir: tempfile::TempDir,
}

impl Region {
    /// A scratch dir with a 4 MiB backing file.
    fn new() -> Region {
        let dir = tempfile::tempdir().unwrap();
        let disk = std::fs::File::create(dir.path().join("disk")).unwrap();
        disk.set_len(4 << 20).unwrap();
        Region { dir }
    }

    fn disk(&self) -> PathBuf {
        self.dir.path().join("disk")
    }

    fn state(&self) -> String {
        self.dir.path().join("state").to_str().unwrap().to_string()
    }

    /// `pflex verify write` of `writes` writes at `qd` over `blocks` blocks; must succeed.
    async fn write(&self, uri: &str, qd: u32, writes: u64, blocks: u64) -> Value {
        let (ok, summary, stderr) = pflex(&[
            "verify",
            "write",
            uri,
            "--state",
            &self.state(),
            "--qd",
            &qd.to_string(),
            "--writes",
            &writes.to_string(),
            "--blocks",
            &blocks.to_string(),
            "--seed",
            "42",
        ])
        .await;
        assert!(ok, "write failed: {stderr}\n{summary:#}");
        assert_eq!(num(&summary, "issued"), writes, "{summary:#}");
        assert_eq!(num(&summary, "acknowledged"), writes, "{summary:#}");
        assert_eq!(num(&summary, "errors"), 0, "{summary:#}");
        assert_eq!(summary["flushed"], true, "{summary:#}");
        summary
    }

    async fn check(&self, uri: &str) -> (bool, Value, String) {
        pflex(&["verify", "check", uri, "--state", &self.state()]).await
    }
}

#[tokio::test]
async fn writes_at_qd_1_and_16_check_clean() {
    let r = Region::new();
    let server = start_nbdkit(&r.disk()).await;
    let blocks = 200;
    let first = r.write(&server.uri, 1, 2000, blocks).await;
    let second = r.write(&server.uri, 16, 3000, blocks).await;
    assert_eq!(num(&first, "run"), 1);
    assert_eq!(num(&second, "run"), 2, "the second run continues the state file");
    assert_eq!(num(&second, "qd"), 16);
    let (ok, c, stderr) = r.check(&server.uri).await;
    assert!(ok, "check failed: {stderr}\n{c:#}");
    assert_eq!(num(&c, "acknowledged_writes"), 5000);
    assert_eq!(num(&c, "blocks_checked"), blocks);
    assert_eq!(num(&c, "ok") + num(&c, "never_written"), blocks);
    assert!(num(&c, "ok") > blocks * 9 / 10, "5000 writes over {blocks} blocks: {c:#}");
    for bad in ["lost", "stale", "torn", "unexpected", "read_errors"] {
        assert_eq!(num(&c, bad), 0, "{bad}: {c:#}");
    }
    assert_eq!(c["passed"], true);
    assert_eq!(num(&c, "runs"), 2);
    let stall = num(&first, "longest_stall_ms").max(num(&second, "longest_stall_ms"));
    assert_eq!(num(&c, "longest_stall_ms"), stall, "check reports the runs' longest stall");
}

#[tokio::test]
async fn an_older_copy_of_the_disk_is_stale() {
    let r = Region::new();
    let server = start_nbdkit(&r.disk()).await;
    r.write(&server.uri, 4, 1500, 64).await;
    let older = r.dir.path().join("disk.older");
    std::fs::copy(r.disk(), &older).unwrap();
    r.write(&server.uri, 4, 1500, 64).await;
    drop(server);
    std::fs::copy(&older, r.disk()).unwrap();
    let server = start_nbdkit(&r.disk()).await;
    let (ok, c, stderr) = r.check(&server.uri).await;
    assert!(!ok, "check must fail: {c:#}");
    assert!(stderr.contains("failed verification"), "{stderr}");
    assert!(num(&c, "stale") > 0, "{c:#}");
    assert_eq!(num(&c, "torn"), 0, "{c:#}");
    assert_eq!(c["passed"], false);
    let first = &c["bad"][0];
    assert!(first["found_gen"].as_u64().unwrap() < first["last_acked_gen"].as_u64().unwrap());
}

#[tokio::test]
async fn a_zeroed_disk_is_lost() {
    let r = Region::new();
    let server = start_nbdkit(&r.disk()).await;
    r.write(&server.uri, 8, 1000, 128).await;
    let zeroes = vec![0u8; 4 << 20];
    std::fs::write(r.disk(), &zeroes).unwrap();
    let (ok, c, _) = r.check(&server.uri).await;
    assert!(!ok, "check must fail: {c:#}");
    let written = 128 - num(&c, "never_written");
    assert_eq!(num(&c, "lost"), written, "every written block is lost: {c:#}");
    assert!(written > 100, "{c:#}");
    assert_eq!(num(&c, "ok") + num(&c, "stale") + num(&c, "torn"), 0, "{c:#}");
    assert_eq!(c["bad"][0]["verdict"], "lost");
}

#[tokio::test]
async fn a_flipped_byte_is_torn() {
    let r = Region::new();
    let server = start_nbdkit(&r.disk()).await;
    r.write(&server.uri, 2, 1000, 32).await;
    // Block 3 is all but certainly written by 1000 writes over 32 blocks;
    // a block never written would show up as never_written below.
    let at = 3 * BLOCK + 1234;
    let mut disk = std::fs::read(r.disk()).unwrap();
    assert_ne!(disk[3 * BLOCK as usize..4 * BLOCK as usize], [0u8; BLOCK as usize]);
    disk[at as usize] ^= 0x40;
    std::fs::write(r.disk(), &disk).unwrap();
    let (ok, c, _) = r.check(&server.uri).await;
    assert!(!ok, "check must fail: {c:#}");
    assert_eq!(num(&c, "torn"), 1, "{c:#}");
    assert_eq!(num(&c, "lost") + num(&c, "stale"), 0, "{c:#}");
    assert_eq!(c["bad"][0]["block"], 3);
    assert_eq!(c["bad"][0]["verdict"], "torn");
    assert!(c["bad"][0]["detail"].as_str().unwrap().contains("checksum"), "{c:#}");
}

#[tokio::test]
async fn a_killed_writer_never_makes_a_false_loss() {
    let r = Region::new();
    let server = start_nbdkit(&r.disk()).await;
    let mut writer = tokio::process::Command::new(env!("CARGO_BIN_EXE_pflex"))
        .args(["verify", "write", &server.uri, "--state", &r.state(), "--qd", "16"])
        .args(["--blocks", "64", "--duration", "60", "--seed", "42"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let state = PathBuf::from(r.state());
    wait_for("the writer to record 4000 writes", Duration::from_secs(30), || {
        let state = state.clone();
        async move { std::fs::metadata(&state).map(|m| m.len() > 200_000).unwrap_or(false) }
    })
    .await;
    // SIGKILL mid-run: the newest records never reach the file.
    writer.kill().await.unwrap();
    let (ok, c, stderr) = r.check(&server.uri).await;
    assert!(ok, "check after a killed writer: {stderr}\n{c:#}");
    assert!(num(&c, "acknowledged_writes") > 1000, "{c:#}");
    // The next run continues after the cut-off records.
    let next = r.write(&server.uri, 4, 500, 64).await;
    assert_eq!(num(&next, "run"), 2);
    let (ok, c, stderr) = r.check(&server.uri).await;
    assert!(ok, "check after the next run: {stderr}\n{c:#}");
    assert_eq!(num(&c, "lost") + num(&c, "stale") + num(&c, "torn"), 0, "{c:#}");
}

#[tokio::test]
async fn a_malformed_state_file_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    std::fs::write(
        &state,
        "pflex-verify 1 seed=1 block_size=4096 blocks=8 offset=0\nrun 1 0\nissued 99 4294967297\n",
    )
    .unwrap();
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_pflex"))
        .args(["verify", "check", "nbd://127.0.0.1:1/", "--state", state.to_str().unwrap()])
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("line 3") && stderr.contains("outside the region"), "{stderr}");
}
