//! NBD over TLS (STARTTLS, x509 with client certificates) against real
//! clients: libnbd's `nbdinfo` (`nbds://`) and `qemu-io` (`tls-creds`).
//! On a non-loopback address TLS is required: plain clients and clients
//! with a certificate from another CA get nothing, not even the export list.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{run, run_ok};
use pflex_testkit::free_port;
use pflex_tls::{ClusterCa, Layout};

struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_sdc(listen: &str, tls_dir: &Path, extra: &[&str]) -> Killed {
    let child = Command::new(pflex_testkit::workspace_binary("sdc-nbd", "sdc"))
        .args(["--memory-export", "scratch:64M", "--nbd-listen", listen, "--tls-dir"])
        .arg(tls_dir)
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    Killed(child)
}

fn wait_listening(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "sdc did not listen on {port}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// CA, the SDC's certificate, our client's, and a stranger's (another CA).
struct Certs {
    _tmp: tempfile::TempDir,
    server: std::path::PathBuf,
    client: std::path::PathBuf,
    stranger: std::path::PathBuf,
}

fn certs() -> Certs {
    let tmp = tempfile::tempdir().unwrap();
    let ca = ClusterCa::create(&tmp.path().join("ca")).unwrap();
    let server = tmp.path().join("sdc1");
    ca.issue("sdc1", &["localhost".into(), "127.0.0.1".into()], &server, Layout::Node).unwrap();
    let client = tmp.path().join("client");
    ca.issue("nbd-client", &[], &client, Layout::NbdClient).unwrap();
    let other = ClusterCa::create(&tmp.path().join("other-ca")).unwrap();
    let stranger = tmp.path().join("stranger");
    other.issue("stranger", &[], &stranger, Layout::NbdClient).unwrap();
    // The stranger trusts our server; only its own certificate is foreign.
    std::fs::copy(client.join(pflex_tls::CA_CERT), stranger.join(pflex_tls::CA_CERT)).unwrap();
    Certs { _tmp: tmp, server, client, stranger }
}

fn tls_uri(port: u16, certs: &Path) -> String {
    format!("nbds://localhost:{port}/scratch?tls-certificates={}", certs.display())
}

#[test]
fn tls_required_on_a_non_loopback_listener_serves_only_certified_clients() {
    let certs = certs();
    let port = free_port();
    let _sdc = start_sdc(&format!("0.0.0.0:{port}"), &certs.server, &[]);
    wait_listening(port);
    let minute = Duration::from_secs(60);

    // libnbd over TLS with our client certificate.
    let size = run_ok("nbdinfo", &["--size", &tls_uri(port, &certs.client)], minute);
    assert_eq!(size.trim(), (64u64 << 20).to_string());
    // qemu over TLS: data written is read back.
    let creds = format!("tls-creds-x509,id=tls0,dir={},endpoint=client", certs.client.display());
    let image = format!(
        "driver=raw,file.driver=nbd,file.host=localhost,file.port={port},file.export=scratch,\
         file.tls-creds=tls0"
    );
    let out = run_ok(
        "qemu-io",
        &[
            "--object",
            &creds,
            "--image-opts",
            &image,
            "-c",
            "write -P 0x5a 4096 65536",
            "-c",
            "read -P 0x5a 4096 65536",
        ],
        minute,
    );
    assert!(!out.contains("Pattern verification failed"), "{out}");

    // Plain NBD: no size (the refusal names TLS), no export list.
    let out = run("nbdinfo", &["--size", &format!("nbd://localhost:{port}/scratch")], minute);
    assert!(!out.status.success(), "plain NBD was served");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.to_lowercase().contains("tls"), "{stderr}");
    let out = run("nbdinfo", &["--list", &format!("nbd://localhost:{port}")], minute);
    assert!(!out.status.success(), "exports were listed in the clear");
    // A certificate from another CA.
    let out = run("nbdinfo", &["--size", &tls_uri(port, &certs.stranger)], minute);
    assert!(!out.status.success(), "a client certificate of another CA was accepted");
}

/// On loopback TLS is offered: both kinds of client are served, unless
/// `--nbd-tls-required`.
#[test]
fn tls_is_offered_on_loopback_and_required_on_request() {
    let certs = certs();
    let minute = Duration::from_secs(60);
    let port = free_port();
    let sdc = start_sdc(&format!("127.0.0.1:{port}"), &certs.server, &[]);
    wait_listening(port);
    let plain = format!("nbd://localhost:{port}/scratch");
    run_ok("nbdinfo", &["--size", &plain], minute);
    run_ok("nbdinfo", &["--size", &tls_uri(port, &certs.client)], minute);
    drop(sdc);

    let port = free_port();
    let _sdc = start_sdc(&format!("127.0.0.1:{port}"), &certs.server, &["--nbd-tls-required"]);
    wait_listening(port);
    let plain = format!("nbd://localhost:{port}/scratch");
    assert!(!run("nbdinfo", &["--size", &plain], minute).status.success());
    run_ok("nbdinfo", &["--size", &tls_uri(port, &certs.client)], minute);
}
