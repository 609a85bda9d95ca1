//! NBD over TLS (STARTTLS, x509 with client certificates) against real
//! clients: libnbd's `nbdinfo` (`nbds://`) and `qemu-io` (`tls-creds`).
//! On a non-loopback address TLS is required: plain clients and clients
//! with a certificate from another CA get nothing, not even the export list.

mod common;

use std::path::Path;
use std::time::Duration;

use common::{run, run_ok, MemorySdc};
use pflex_tls::{ClusterCa, Layout};

fn start_sdc(ip: &str, tls_dir: &Path, extra: &[&str]) -> MemorySdc {
    let tls_dir = tls_dir.display().to_string();
    let mut args = vec!["--memory-export", "scratch:64M", "--tls-dir", &tls_dir];
    args.extend(extra);
    MemorySdc::start(ip, &args)
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
    let sdc = start_sdc("0.0.0.0", &certs.server, &[]);
    let port = sdc.port;
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
    let sdc = start_sdc("127.0.0.1", &certs.server, &[]);
    let port = sdc.port;
    let plain = format!("nbd://localhost:{port}/scratch");
    run_ok("nbdinfo", &["--size", &plain], minute);
    run_ok("nbdinfo", &["--size", &tls_uri(port, &certs.client)], minute);
    drop(sdc);

    let sdc = start_sdc("127.0.0.1", &certs.server, &["--nbd-tls-required"]);
    let port = sdc.port;
    let plain = format!("nbd://localhost:{port}/scratch");
    assert!(!run("nbdinfo", &["--size", &plain], minute).status.success());
    run_ok("nbdinfo", &["--size", &tls_uri(port, &certs.client)], minute);
}
