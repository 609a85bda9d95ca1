//! A write that fails on the secondary, then a failover: the copies are
//! reconciled before either serves the range. In a lab: block X of a chunk
//! whose primary is sds1 and secondary sds2 holds A (acknowledged); sds1 is
//! cut from sds2 and B is written to X, which sds1 applies locally but
//! cannot forward, so the write fails; sds1 is killed (the PG goes on
//! degraded on sds2) and X reads back A; sds1 comes back and is resynced.
//! Afterwards both copies of the chunk are equal (the resync asked sds1
//! which chunks it held ahead and copied them back) and X still reads A.
//! Needs root and qemu-io.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{lab_can_run, Lab};
use pflex_proto::CHUNK_SIZE;

/// `qemu-io -c COMMAND` on the lab's volume; its output and whether the
/// command succeeded (qemu-io reports a failed IO on stdout).
fn qemu_io(uri: &str, command: &str) -> (bool, String) {
    let out = Command::new("qemu-io")
        .args(["-f", "raw", "-c", command, uri])
        .output()
        .expect("run qemu-io");
    let text =
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let failed = !out.status.success() || text.contains("failed") || text.contains("error");
    (!failed, text)
}

async fn checksum(http: &reqwest::Client, address: &str, volume: u64, chunk: u64) -> Option<u32> {
    let url = format!("http://{address}:9100/chunk/{volume}/{chunk}/checksum");
    let sum: serde_json::Value = http.get(&url).send().await.ok()?.json().await.ok()?;
    sum["crc32"].as_u64().map(|c| c as u32)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_that_failed_on_the_secondary_is_reconciled_after_a_failover() {
    if !lab_can_run(&["qemu-io"]) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let lab = Lab::up(
        &tmp.path().join("lab"),
        &[
            "--name",
            "cdiv",
            "--net",
            "220",
            "--device-size",
            "256M",
            "--volume-size",
            "64M",
            "--heartbeat-interval-secs",
            "1",
            "--io-retry-secs",
            "10",
        ],
    );
    let mdm = lab.mdm();
    let http = reqwest::Client::new();
    let uri = lab.nbd_uri();
    let nodes = mdm.sds_list().await.unwrap();
    let id = |name: &str| nodes.iter().find(|n| n.name == name).unwrap().id;
    let volume = mdm.volume_show("vol1").await.unwrap().id;
    let map = mdm.placement(volume).await.unwrap();
    let chunk = (0..map.chunk_count())
        .find(|&c| {
            let pg = map.pg_of(c).unwrap();
            pg.primary == id("sds1") && pg.secondary == id("sds2")
        })
        .expect("a chunk with sds1 primary and sds2 secondary");
    let offset = chunk * CHUNK_SIZE + 8192;

    let (ok, out) = qemu_io(&uri, &format!("write -P 0xaa {offset} 4k"));
    assert!(ok, "writing A: {out}");
    lab.run(&["cut", "sds1", "--from", "sds2"]);
    let (ok, out) = qemu_io(&uri, &format!("write -P 0xbb {offset} 4k"));
    assert!(!ok, "B cannot be acknowledged while sds1 cannot forward it: {out}");
    lab.run(&["kill", "sds1"]);
    lab.run(&["heal", "sds1", "--from", "sds2"]);
    let (ok, out) = qemu_io(&uri, &format!("read -P 0xaa {offset} 4k"));
    assert!(ok, "after the failover X must read A (the acknowledged write): {out}");

    lab.start("sds1");
    let deadline = Instant::now() + Duration::from_secs(90);
    let (sds1, sds2) = (lab.address("sds1"), lab.address("sds2"));
    loop {
        let map = mdm.placement(volume).await.unwrap();
        let pg = *map.pg_of(chunk).unwrap();
        let jobs = mdm.rebuild_jobs().await.unwrap();
        let settled = pg.absent == 0
            && pg.secondary != 0
            && jobs.iter().all(|j| j.state == "done" || j.state == "failed");
        let sums = (
            checksum(&http, &sds1, volume, chunk).await,
            checksum(&http, &sds2, volume, chunk).await,
        );
        if settled && sums.0.is_some() && sums.0 == sums.1 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the copies of chunk {chunk} did not converge: PG {pg:?}, checksums {sums:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let (ok, out) = qemu_io(&uri, &format!("read -P 0xaa {offset} 4k"));
    assert!(ok, "X must still read A: {out}");
}
