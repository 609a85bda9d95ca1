//! Deleting a volume releases its chunks on every SDS, also on one that
//! was down when it happened: in a lab (network namespaces), 16 MiB of a
//! recognisable pattern go to vol1 through NBD; sds3 (which holds copies)
//! is killed; vol1 is unmapped and deleted; sds3 comes back. Then no SDS
//! holds a chunk of vol1, every device's used bytes are zero, and no block
//! of the pattern is left in any device file. The lab runs as a cluster
//! does, HTTPS only, which the test checks first. Needs root.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{lab_can_run, Lab};
use pflex_proto::api::VolumeUnmap;

const PATTERN: u8 = 0x5a;

/// The chunks of `volume` an SDS holds (`None` while it does not answer).
async fn chunks_of(http: &reqwest::Client, sds: &str, volume: u64) -> Option<Vec<(u64, u64)>> {
    let url = format!("{sds}/chunks?volume={volume}");
    http.get(&url).send().await.ok()?.json().await.ok()
}

/// Bytes its devices' allocated slots take (`None` while it does not answer).
async fn used_bytes(http: &reqwest::Client, sds: &str) -> Option<u64> {
    let url = format!("{sds}/devices");
    let devices: Vec<serde_json::Value> = http.get(&url).send().await.ok()?.json().await.ok()?;
    Some(devices.iter().map(|d| d["used_bytes"].as_u64().unwrap_or(u64::MAX)).sum())
}

/// Whether any 4 KiB block of the device file is all `PATTERN`.
fn holds_pattern(path: &Path) -> bool {
    let bytes = std::fs::read(path).unwrap();
    bytes.chunks(4096).any(|block| block.len() == 4096 && block.iter().all(|&b| b == PATTERN))
}

/// Every HTTP API of the lab's hosts (MDM, dashboard, SDS control and
/// management, SDC management) answers HTTPS with a certificate from the
/// lab's CA naming the host's address, and nothing in plain HTTP.
async fn lab_speaks_https_only(lab: &Lab) {
    let plain_client = reqwest::Client::builder().timeout(Duration::from_secs(10)).build().unwrap();
    let trusted = lab.http();
    let ports =
        [("mdm", 8001, "/health/status"), ("mdm", 8080, "/health"), ("sds1", 9100, "/health")];
    let ports = ports.into_iter().chain([("sds2", 9200, "/health"), ("sdc1", 8004, "/health")]);
    for (host, port, path) in ports {
        let reply = trusted.get(lab.url(host, port, path)).send().await;
        assert!(reply.is_ok(), "no HTTPS answer from {host}:{port}: {reply:?}");
        let plain = format!("http://{}:{port}{path}", lab.address(host));
        let reply = plain_client.get(&plain).send().await;
        assert!(reply.is_err(), "{host}:{port} answered plain HTTP: {reply:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_volume_is_released_on_every_sds_even_one_that_was_down() {
    if !lab_can_run(&["nbdcopy"]) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let lab = Lab::up(
        &tmp.path().join("lab"),
        &["--name", "cdel", "--net", "218", "--device-size", "256M", "--volume-size", "64M"],
    );
    let mdm = lab.mdm();
    let http = lab.http();
    lab_speaks_https_only(&lab).await;

    // 16 MiB of the pattern through NBD, flushed.
    let source = tmp.path().join("pattern.img");
    std::fs::write(&source, vec![PATTERN; 16 << 20]).unwrap();
    let copy = Command::new("nbdcopy").arg("--flush").arg(&source).arg(lab.nbd_uri()).output();
    let copy = copy.unwrap();
    assert!(copy.status.success(), "nbdcopy: {}", String::from_utf8_lossy(&copy.stderr));
    let volume = mdm.volume_show("vol1").await.unwrap().id;
    let held = chunks_of(&http, &lab.sds_api("sds3"), volume).await.expect("sds3 answers");
    assert!(!held.is_empty(), "sds3 must hold copies of vol1 for the test to mean anything");
    assert!(holds_pattern(&lab.device("sds3")), "the pattern must be on sds3's device first");

    lab.run(&["kill", "sds3"]);
    mdm.volume_unmap(&VolumeUnmap { volume: "vol1".into(), sdc: "sdc1".into() }).await.unwrap();
    mdm.volume_delete("vol1").await.unwrap();
    let refused = mdm.placement(volume).await.expect_err("a deleted volume has no map");
    assert!(refused.is_volume_deleted(), "the MDM must say it was deleted: {refused}");
    lab.start("sds3");

    let deadline = Instant::now() + Duration::from_secs(90);
    for host in ["sds1", "sds2", "sds3"] {
        let at = lab.sds_api(host);
        loop {
            let left = chunks_of(&http, &at, volume).await.map(|c| c.len());
            let used = used_bytes(&http, &at).await;
            if left == Some(0) && used == Some(0) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{host} still holds {left:?} chunks ({used:?} bytes) of the deleted volume"
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    for host in ["sds1", "sds2", "sds3"] {
        assert!(!holds_pattern(&lab.device(host)), "{host}'s device still holds deleted data");
    }
}
