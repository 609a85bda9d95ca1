//! A write that fails on the secondary, then a failover: the copies are
//! reconciled before either serves the range. In a lab: block X of a chunk
//! holds A (acknowledged); the chunk's primary is cut from its secondary and
//! B is written to X, which the primary applies locally but cannot forward,
//! so the write fails; the primary is killed (the PG goes on degraded on
//! the secondary) and X reads back A; the old primary comes back and is
//! resynced. Afterwards both copies of the chunk are equal (the resync
//! asked the old primary which chunks it held ahead and copied them back)
//! and X still reads A.
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

async fn checksum(http: &reqwest::Client, sds: &str, volume: u64, chunk: u64) -> Option<u32> {
    let url = format!("{sds}/chunk/{volume}/{chunk}/checksum");
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
    let http = lab.http();
    let uri = lab.nbd_uri();
    let nodes = mdm.sds_list().await.unwrap();
    let name = |id: u64| nodes.iter().find(|n| n.id == id).unwrap().name.clone();
    let volume = mdm.volume_show("vol1").await.unwrap().id;
    let map = mdm.placement(volume).await.unwrap();
    let chunk = 5;
    let pg = *map.pg_of(chunk).unwrap();
    let (primary, secondary) = (name(pg.primary), name(pg.secondary));
    let offset = chunk * CHUNK_SIZE + 8192;

    let (ok, out) = qemu_io(&uri, &format!("write -P 0xaa {offset} 4k"));
    assert!(ok, "writing A: {out}");
    lab.run(&["cut", &primary, "--from", &secondary]);
    let (ok, out) = qemu_io(&uri, &format!("write -P 0xbb {offset} 4k"));
    assert!(!ok, "B cannot be acknowledged while {primary} cannot forward it: {out}");
    lab.run(&["kill", &primary]);
    lab.run(&["heal", &primary, "--from", &secondary]);
    let (ok, out) = qemu_io(&uri, &format!("read -P 0xaa {offset} 4k"));
    assert!(ok, "after the failover X must read A (the acknowledged write): {out}");

    lab.start(&primary);
    let deadline = Instant::now() + Duration::from_secs(90);
    let (old_primary, old_secondary) = (lab.sds_api(&primary), lab.sds_api(&secondary));
    loop {
        let map = mdm.placement(volume).await.unwrap();
        let pg = *map.pg_of(chunk).unwrap();
        let jobs = mdm.rebuild_jobs().await.unwrap();
        let settled = pg.absent == 0
            && pg.secondary != 0
            && jobs.iter().all(|j| j.state == "done" || j.state == "failed");
        let sums = (
            checksum(&http, &old_primary, volume, chunk).await,
            checksum(&http, &old_secondary, volume, chunk).await,
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
