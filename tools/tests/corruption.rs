//! Silent corruption never reaches a client: in a lab, 1 MiB of distinct
//! blocks goes to chunk 0 of vol1 through NBD; then one block is
//! overwritten on the primary's device file behind its SDS's back, and
//! another on the secondary's. Reads through NBD still return what was
//! written (the primary finds the block does not match its checksum and
//! rewrites the chunk from the secondary), and after `pflex cluster scrub`
//! both copies are equal again, with no garbage left on either device.
//! Needs root and nbdcopy.

mod common;

use std::io::{Seek, SeekFrom, Write};
use std::path::Path;
use std::process::Command;

use common::{lab_can_run, pflex, Lab};

const BLOCK: usize = 4096;
const GARBAGE: u8 = 0xe7;

/// 256 distinct 4 KiB blocks: block `i` repeats "blk-NNNN-pflex!!".
fn content() -> Vec<u8> {
    (0..256).flat_map(|i| format!("blk-{i:04}-pflex!!").into_bytes().repeat(BLOCK / 16)).collect()
}

/// Overwrites, in the device file, the 4 KiB block holding `block`'s bytes.
fn corrupt(device: &Path, block: &[u8]) {
    let bytes = std::fs::read(device).unwrap();
    let at = bytes
        .chunks(BLOCK)
        .position(|b| b == block)
        .unwrap_or_else(|| panic!("the block is not on {}", device.display()));
    let mut file = std::fs::OpenOptions::new().write(true).open(device).unwrap();
    file.seek(SeekFrom::Start((at * BLOCK) as u64)).unwrap();
    file.write_all(&[GARBAGE; BLOCK]).unwrap();
    file.sync_all().unwrap();
}

/// vol1's first MiB through NBD (the whole volume is copied).
fn read_back(uri: &str, dir: &Path) -> Vec<u8> {
    let out = dir.join("read.img");
    let _ = std::fs::remove_file(&out);
    let copy = Command::new("nbdcopy").arg(uri).arg(&out).output().unwrap();
    assert!(copy.status.success(), "nbdcopy: {}", String::from_utf8_lossy(&copy.stderr));
    let mut bytes = std::fs::read(&out).unwrap();
    bytes.truncate(256 * BLOCK);
    bytes
}

async fn checksum(http: &reqwest::Client, sds: &str, volume: u64) -> serde_json::Value {
    let url = format!("{sds}/chunk/{volume}/0/checksum");
    http.get(&url).send().await.unwrap().json().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_block_on_either_copy_is_never_served_and_scrub_repairs_it() {
    if !lab_can_run(&["nbdcopy"]) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let lab = Lab::up(
        &tmp.path().join("lab"),
        &["--name", "ccrc", "--net", "221", "--device-size", "256M", "--volume-size", "64M"],
    );
    let mdm = lab.mdm();
    let http = lab.http();
    let data = content();
    let source = tmp.path().join("content.img");
    std::fs::write(&source, &data).unwrap();
    let copy = Command::new("nbdcopy").arg("--flush").arg(&source).arg(lab.nbd_uri()).output();
    let copy = copy.unwrap();
    assert!(copy.status.success(), "nbdcopy: {}", String::from_utf8_lossy(&copy.stderr));

    let volume = mdm.volume_show("vol1").await.unwrap().id;
    let map = mdm.placement(volume).await.unwrap();
    let pg = *map.pg_of(0).unwrap();
    let nodes = mdm.sds_list().await.unwrap();
    let name = |id: u64| nodes.iter().find(|n| n.id == id).unwrap().name.clone();
    let (primary, secondary) = (name(pg.primary), name(pg.secondary));

    corrupt(&lab.device(&primary), &data[7 * BLOCK..8 * BLOCK]);
    assert!(read_back(&lab.nbd_uri(), tmp.path()) == data, "a corrupt block was served");

    corrupt(&lab.device(&secondary), &data[9 * BLOCK..10 * BLOCK]);
    assert!(read_back(&lab.nbd_uri(), tmp.path()) == data, "the data changed");
    let before = (
        checksum(&http, &lab.sds_api(&primary), volume).await,
        checksum(&http, &lab.sds_api(&secondary), volume).await,
    );
    assert_ne!(
        before.1["crc32"], before.0["crc32"],
        "the secondary's corruption must be visible first"
    );

    let report = pflex(&lab.dir, &["cluster", "scrub", "--json"]);
    let after = (
        checksum(&http, &lab.sds_api(&primary), volume).await,
        checksum(&http, &lab.sds_api(&secondary), volume).await,
    );
    assert_eq!(after.0["crc32"], after.1["crc32"], "copies differ after scrub:\n{report}");
    assert!(report.contains("repaired_there"), "scrub report:\n{report}");
    for host in [&primary, &secondary] {
        let bytes = std::fs::read(lab.device(host)).unwrap();
        let garbage = bytes.chunks(BLOCK).any(|b| b.iter().all(|&x| x == GARBAGE));
        assert!(!garbage, "{host}'s device still holds the corrupt block");
    }
    assert!(read_back(&lab.nbd_uri(), tmp.path()) == data);
}
