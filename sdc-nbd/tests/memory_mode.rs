//! `sdc --memory-export` serves in-memory exports without any cluster.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::run_ok;
use pflex_testkit::free_port;

struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn memory_exports_serve_real_clients_without_a_cluster() {
    let port = free_port();
    let child = Command::new(pflex_testkit::workspace_binary("sdc-nbd", "sdc"))
        .args(["--memory-export", "scratch:64M", "--memory-export", "tiny:1M"])
        .arg("--nbd-listen")
        .arg(format!("127.0.0.1:{port}"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let _guard = Killed(child);
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "sdc did not listen");
        std::thread::sleep(Duration::from_millis(50));
    }
    let list = run_ok(
        "nbdinfo",
        &["--list", "--json", &format!("nbd://127.0.0.1:{port}")],
        Duration::from_secs(60),
    );
    assert!(list.contains("\"scratch\"") && list.contains("\"tiny\""), "{list}");
    let uri = format!("nbd://127.0.0.1:{port}/scratch");
    let out = run_ok(
        "qemu-io",
        &["-f", "raw", &uri, "-c", "write -P 0x3c 1000 100000", "-c", "read -P 0x3c 1000 100000"],
        Duration::from_secs(60),
    );
    assert!(!out.contains("Pattern verification failed"), "{out}");
    assert_eq!(
        run_ok("nbdinfo", &["--size", &uri], Duration::from_secs(60)).trim(),
        (64u64 << 20).to_string()
    );
}
