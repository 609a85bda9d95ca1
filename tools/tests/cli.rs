//! Drives the `pflex` CLI against a real `mdm` process on loopback, with
//! the data-directory layout that `pflex up` creates.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use pflex_mdm_client::MdmClient;
use pflex_proto::api::{DeviceInfo, NodeType, RegisterRequest, Volume};

const JOIN_KEY: &str = "cli-test-join-key";

/// The `mdm` binary, built next to `pflex` with the same profile.
fn mdm_binary() -> PathBuf {
    pflex_testkit::workspace_binary("mdm", "mdm")
}

/// A running MDM, killed by PID on drop.
struct Mdm {
    child: Child,
    url: String,
}

impl Drop for Mdm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_mdm(data_dir: &Path) -> Mdm {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let url = format!("http://127.0.0.1:{port}");
    std::fs::create_dir_all(data_dir).unwrap();
    std::fs::write(data_dir.join("join_key"), JOIN_KEY).unwrap();
    std::fs::write(data_dir.join("cluster.json"), format!(r#"{{"mdm_url":"{url}"}}"#)).unwrap();
    let child = Command::new(mdm_binary())
        .arg("--listen")
        .arg(format!("127.0.0.1:{port}"))
        .arg("--data-dir")
        .arg(data_dir.join("mdm"))
        .arg("--join-key-file")
        .arg(data_dir.join("join_key"))
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(data_dir.join("mdm.log")).unwrap())
        .spawn()
        .expect("spawn mdm");
    let mdm = Mdm { child, url };
    let deadline = Instant::now() + Duration::from_secs(30);
    let token_file = data_dir.join("mdm").join("admin_token");
    loop {
        if let Ok(token) = std::fs::read_to_string(&token_file) {
            let out =
                pflex(data_dir, &["--data-dir", data_dir.to_str().unwrap(), "cluster", "status"]);
            if out.status.success() && !token.trim().is_empty() {
                return mdm;
            }
        }
        assert!(Instant::now() < deadline, "mdm did not become ready");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Runs `pflex args…` in `cwd` with no PFLEX_* variables inherited.
fn pflex(cwd: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_pflex"))
        .args(args)
        .current_dir(cwd)
        .env_remove("PFLEX_MDM")
        .env_remove("PFLEX_TOKEN")
        .env_remove("PFLEX_DATA_DIR")
        .output()
        .expect("run pflex")
}

struct Run {
    dir: PathBuf,
}

impl Run {
    /// `pflex <args> --data-dir DIR`, which must succeed; returns stdout.
    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "pflex {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }
    /// Must fail; returns stderr.
    fn fails(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(!out.status.success(), "pflex {args:?} should have failed");
        assert!(out.stdout.is_empty());
        String::from_utf8(out.stderr).unwrap()
    }
    fn json<T: serde::de::DeserializeOwned>(&self, args: &[&str]) -> T {
        let mut args = args.to_vec();
        args.push("--json");
        serde_json::from_str(&self.ok(&args)).unwrap()
    }
    fn run(&self, args: &[&str]) -> Output {
        let mut all: Vec<&str> = args.to_vec();
        all.extend(["--data-dir", self.dir.to_str().unwrap()]);
        pflex(&self.dir, &all)
    }
}

async fn register(url: &str, node_type: NodeType, name: &str) {
    let client = MdmClient::new(url, None).unwrap();
    let is_sds = node_type == NodeType::Sds;
    client
        .register(&RegisterRequest {
            join_key: JOIN_KEY.into(),
            enrollment_token: None,
            credential: None,
            node_type,
            name: name.into(),
            host: "127.0.0.1".into(),
            control_port: 9101,
            mgmt_port: 9201,
            data_port: if is_sds { 9701 } else { 10809 },
            fault_set: None,
            pool: None,
            devices: if is_sds {
                vec![DeviceInfo {
                    path: format!("/{name}/dev0.img"),
                    capacity_bytes: 16 << 30,
                    used_bytes: 0,
                }]
            } else {
                vec![]
            },
            data_cluster_id: None,
        })
        .await
        .unwrap();
}

#[tokio::test]
async fn cli_manages_volumes_against_a_running_mdm() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("pflex-data");
    let mdm = start_mdm(&dir);
    for name in ["sds1", "sds2", "sds3"] {
        register(&mdm.url, NodeType::Sds, name).await;
    }
    register(&mdm.url, NodeType::Sdc, "sdc1").await;
    let cli = Run { dir: dir.clone() };

    let status = cli.ok(&["cluster", "status"]);
    assert!(
        status.contains("HEALTHY") && status.contains("sds2") && status.contains("48.0 GiB"),
        "{status}"
    );
    // No node has failed, so there is nothing to rebuild.
    let rebuilds: serde_json::Value = cli.json(&["cluster", "rebuilds"]);
    assert_eq!(rebuilds["jobs"], serde_json::json!([]), "{rebuilds}");
    assert_eq!(rebuilds["status"]["rebuild_jobs"], 0, "{rebuilds}");
    let table = cli.ok(&["cluster", "rebuilds"]);
    assert!(table.contains("REPLACES") && table.contains("(none)"), "{table}");
    assert!(table.contains("Rate:") && table.contains("no limit"), "{table}");
    // The movement policy: shown, changed, refused when out of range.
    let policy = cli.ok(&["cluster", "rebuild-policy", "--mb-per-sec", "150"]);
    assert!(policy.contains("150 MB/s per SDS") && policy.contains("client first"), "{policy}");
    let refused = cli.fails(&["cluster", "rebuild-policy", "--chunks-in-flight", "0"]);
    assert!(refused.contains("chunks_in_flight"), "{refused}");
    let sds = cli.ok(&["sds", "list"]);
    assert_eq!(sds.lines().count(), 4, "{sds}");
    assert!(sds.contains("FAULT SET") && sds.contains("127.0.0.1:9701"), "{sds}");
    let sds_json: Vec<serde_json::Value> = cli.json(&["sds", "list"]);
    assert_eq!(sds_json.len(), 3);
    assert!(cli.ok(&["sdc", "list"]).contains("127.0.0.1:10809"));

    let created = cli.ok(&["volume", "create", "vol1", "--size", "4G"]);
    assert!(created.contains("Created volume vol1") && created.contains("4.0 GiB"), "{created}");
    let err = cli.fails(&["volume", "create", "vol1", "--size", "4G"]);
    assert!(err.contains("a volume named \"vol1\" already exists"), "{err}");
    let err = cli.fails(&["volume", "create", "bad name", "--size", "1G"]);
    assert!(err.contains("not a valid name"), "{err}");
    let thick: Volume = cli.json(&["volume", "create", "thick1", "--size", "1G", "--thick"]);
    assert!(thick.thick);

    let list = cli.ok(&["volume", "list"]);
    assert!(list.contains("vol1") && list.contains("thin") && list.contains("thick1"), "{list}");
    let volumes: Vec<Volume> = cli.json(&["volume", "list"]);
    assert_eq!(volumes.len(), 2);
    assert_eq!(volumes[0].size_bytes, 4 << 30);

    // The SDC here is registered through the API only (no process), so
    // nothing would ever serve the change: --no-wait.
    let mapped: Volume =
        cli.json(&["volume", "map", "vol1", "--sdc", "sdc1", "--read-only", "--no-wait"]);
    assert_eq!(mapped.mappings.len(), 1);
    assert_eq!(mapped.mappings[0].access_mode, pflex_proto::token::AccessMode::ReadOnly);
    let show = cli.ok(&["volume", "show", "vol1"]);
    assert!(
        show.contains("sdc1 (ro)") && show.contains("PRIMARY") && show.contains("sds3"),
        "{show}"
    );
    let shown: serde_json::Value = cli.json(&["volume", "show", "vol1"]);
    assert_eq!(shown["placement"]["pgs"].as_array().unwrap().len(), 64);

    let resized: Volume = cli.json(&["volume", "resize", "vol1", "--size", "8G", "--no-wait"]);
    assert_eq!(resized.size_bytes, 8 << 30);
    assert!(resized.epoch > volumes[0].epoch);
    let err = cli.fails(&["volume", "resize", "vol1", "--size", "1G", "--no-wait"]);
    assert!(err.contains("can only grow"), "{err}");

    let err = cli.fails(&["volume", "delete", "vol1"]);
    assert!(err.contains("unmap it first"), "{err}");
    let unmapped = cli.ok(&["volume", "unmap", "vol1", "--sdc", "sdc1", "--no-wait"]);
    assert!(unmapped.contains("Unmapped volume vol1"), "{unmapped}");
    cli.ok(&["volume", "rename", "vol1", "data", "--no-wait"]);
    let err = cli.fails(&["volume", "show", "vol1"]);
    assert!(err.contains("no volume named or numbered \"vol1\""), "{err}");
    assert!(cli.ok(&["volume", "delete", "data"]).contains("Deleted volume data"));
    let volumes: Vec<Volume> = cli.json(&["volume", "list"]);
    assert_eq!(volumes.iter().map(|v| v.name.as_str()).collect::<Vec<_>>(), ["thick1"]);

    // Flags and environment instead of a data dir.
    let token = std::fs::read_to_string(dir.join("mdm/admin_token")).unwrap();
    let elsewhere = tmp.path();
    let out = pflex(elsewhere, &["--mdm", &mdm.url, "--token", token.trim(), "volume", "list"]);
    assert!(out.status.success() && String::from_utf8_lossy(&out.stdout).contains("thick1"));
    let out = Command::new(env!("CARGO_BIN_EXE_pflex"))
        .args(["sds", "list", "--json"])
        .current_dir(elsewhere)
        .env("PFLEX_MDM", &mdm.url)
        .env("PFLEX_TOKEN", token.trim())
        .env_remove("PFLEX_DATA_DIR")
        .output()
        .unwrap();
    assert!(out.status.success());
    // A wrong token, bad input and an unreachable MDM all fail with a message.
    let out = pflex(elsewhere, &["--mdm", &mdm.url, "--token", "wrong", "volume", "list"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown credential"));
    let out = pflex(
        elsewhere,
        &["--mdm", &mdm.url, "--token", "x", "volume", "create", "v", "--size", "4X"],
    );
    assert_eq!(out.status.code(), Some(2), "usage errors exit 2");
    drop(mdm);
    let err = cli.fails(&["volume", "list"]);
    assert!(err.contains("cannot reach the MDM"), "{err}");
}
