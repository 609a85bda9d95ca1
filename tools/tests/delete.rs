//! Deleting a volume releases its chunks on every SDS, also on one that
//! was down when it happened: in a lab (network namespaces), 16 MiB of a
//! recognisable pattern go to vol1 through NBD; sds3 (which holds copies)
//! is killed; vol1 is unmapped and deleted; sds3 comes back. Then no SDS
//! holds a chunk of vol1, every device's used bytes are zero, and no block
//! of the pattern is left in any device file. Needs root.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use pflex_mdm_client::MdmClient;
use pflex_proto::api::VolumeUnmap;
use pflex_testkit::workspace_binary;

const PATTERN: u8 = 0x5a;

fn pflex(dir: &Path, args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_pflex"))
        .args(args)
        .args(["--data-dir", &dir.display().to_string()])
        .output()
        .expect("run pflex");
    assert!(
        out.status.success(),
        "pflex {} failed:\n{}\n{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `lab down` whatever happens to the test.
struct Lab<'a>(&'a Path);

impl Drop for Lab<'_> {
    fn drop(&mut self) {
        let _ = Command::new(env!("CARGO_BIN_EXE_pflex"))
            .args(["lab", "down", "--data-dir", &self.0.display().to_string()])
            .status();
    }
}

fn can_make_namespaces() -> Result<(), String> {
    // SAFETY: geteuid(2) has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err("not root".into());
    }
    for tool in [["ip", "-V"], ["nbdcopy", "--version"]] {
        if Command::new(tool[0]).arg(tool[1]).output().is_err() {
            return Err(format!("{} is not installed", tool[0]));
        }
    }
    Ok(())
}

/// The chunks of `volume` an SDS holds (`None` while it does not answer).
async fn chunks_of(http: &reqwest::Client, address: &str, volume: u64) -> Option<Vec<(u64, u64)>> {
    let url = format!("http://{address}:9100/chunks?volume={volume}");
    http.get(&url).send().await.ok()?.json().await.ok()
}

/// Bytes its devices' allocated slots take (`None` while it does not answer).
async fn used_bytes(http: &reqwest::Client, address: &str) -> Option<u64> {
    let url = format!("http://{address}:9100/devices");
    let devices: Vec<serde_json::Value> = http.get(&url).send().await.ok()?.json().await.ok()?;
    Some(devices.iter().map(|d| d["used_bytes"].as_u64().unwrap_or(u64::MAX)).sum())
}

/// Whether any 4 KiB block of the device file is all `PATTERN`.
fn holds_pattern(path: &Path) -> bool {
    let bytes = std::fs::read(path).unwrap();
    bytes.chunks(4096).any(|block| block.len() == 4096 && block.iter().all(|&b| b == PATTERN))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_volume_is_released_on_every_sds_even_one_that_was_down() {
    if let Err(why) = can_make_namespaces() {
        assert!(std::env::var_os("PFLEX_REQUIRE_TOOLS").is_none(), "cannot run: {why}");
        eprintln!("skipping: {why}");
        return;
    }
    for (package, bin) in [("mdm", "mdm"), ("sds-uring", "sds"), ("sdc-nbd", "sdc")] {
        workspace_binary(package, bin);
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("lab");
    let _lab = Lab(&dir);
    pflex(
        &dir,
        &[
            "lab",
            "up",
            "--name",
            "cdel",
            "--net",
            "218",
            "--device-size",
            "256M",
            "--volume-size",
            "64M",
        ],
    );
    let layout: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("lab.json")).unwrap()).unwrap();
    let address = |host: &str| -> String {
        let hosts = layout["hosts"].as_array().unwrap();
        let h = hosts.iter().find(|h| h["name"] == host).unwrap();
        h["address"].as_str().unwrap().to_string()
    };
    let nbd_uri = layout["nbd_uri"].as_str().unwrap().to_string();
    let token = std::fs::read_to_string(dir.join("mdm/admin_token")).unwrap();
    let mdm = MdmClient::new(layout["mdm_url"].as_str().unwrap(), Some(token.trim().to_string()))
        .unwrap();
    let http = reqwest::Client::new();

    // 16 MiB of the pattern through NBD, flushed.
    let source = tmp.path().join("pattern.img");
    std::fs::write(&source, vec![PATTERN; 16 << 20]).unwrap();
    let copy = Command::new("nbdcopy").arg("--flush").arg(&source).arg(&nbd_uri).output().unwrap();
    assert!(copy.status.success(), "nbdcopy: {}", String::from_utf8_lossy(&copy.stderr));
    let volume = mdm.volume_show("vol1").await.unwrap().id;
    let sds3 = address("sds3");
    let held = chunks_of(&http, &sds3, volume).await.expect("sds3 answers");
    assert!(!held.is_empty(), "sds3 must hold copies of vol1 for the test to mean anything");
    let device3 = dir.join("sds3/dev0.img");
    assert!(holds_pattern(&device3), "the pattern must be on sds3's device first");

    pflex(&dir, &["lab", "kill", "sds3"]);
    mdm.volume_unmap(&VolumeUnmap { volume: "vol1".into(), sdc: "sdc1".into() }).await.unwrap();
    mdm.volume_delete("vol1").await.unwrap();
    let refused = mdm.placement(volume).await.expect_err("a deleted volume has no map");
    assert!(refused.is_volume_deleted(), "the MDM must say it was deleted: {refused}");

    let out = Command::new(env!("CARGO_BIN_EXE_pflex"))
        .args(["node", "start", "sds3", "--data-dir", &dir.display().to_string()])
        .output()
        .unwrap();
    assert!(out.status.success(), "restart sds3: {}", String::from_utf8_lossy(&out.stderr));

    let deadline = Instant::now() + Duration::from_secs(90);
    for host in ["sds1", "sds2", "sds3"] {
        let at = address(host);
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
        let device = dir.join(host).join("dev0.img");
        assert!(!holds_pattern(&device), "{host}'s device still holds the deleted volume's data");
    }
}
