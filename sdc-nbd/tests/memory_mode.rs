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

/// Plain NBD on a non-loopback address is refused with a clear error unless
/// `--insecure` says to accept it.
#[test]
fn plain_nbd_on_a_non_loopback_address_needs_insecure() {
    let port = free_port();
    let sdc = |extra: &[&str]| {
        Command::new(pflex_testkit::workspace_binary("sdc-nbd", "sdc"))
            .args(["--memory-export", "scratch:1M", "--nbd-listen", &format!("0.0.0.0:{port}")])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let mut refused = Killed(sdc(&[]));
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = refused.0.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "the SDC served plain NBD on 0.0.0.0");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(!status.success());
    let mut stderr = String::new();
    std::io::Read::read_to_string(refused.0.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    assert!(stderr.contains("--insecure"), "{stderr}");

    let _accepted = Killed(sdc(&["--insecure"]));
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "sdc --insecure did not listen");
        std::thread::sleep(Duration::from_millis(50));
    }
}
