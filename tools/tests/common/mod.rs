//! What the tests that drive `pflex lab` share: the capability check (root,
//! iproute2 and the tools a test names), a lab that is removed whatever
//! happens to the test, and its layout (host addresses, the NBD URI, an
//! admin client of its MDM).

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

use pflex_mdm_client::MdmClient;
use pflex_testkit::workspace_binary;

/// Whether lab tests can run here (root, `ip`, and each of `tools`). Under
/// the README's test command (`PFLEX_REQUIRE_TOOLS`) a missing one fails
/// the test; elsewhere the test is skipped with a note.
pub fn lab_can_run(tools: &[&str]) -> bool {
    let missing = || -> Option<String> {
        // SAFETY: geteuid(2) has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Some("not root".into());
        }
        for tool in std::iter::once(&"ip").chain(tools) {
            let found = Command::new("sh")
                .args(["-c", &format!("command -v {tool}")])
                .output()
                .is_ok_and(|o| o.status.success());
            if !found {
                return Some(format!("{tool} is not installed"));
            }
        }
        None
    };
    match missing() {
        None => {
            for (package, bin) in [("mdm", "mdm"), ("sds-uring", "sds"), ("sdc-nbd", "sdc")] {
                workspace_binary(package, bin);
            }
            true
        }
        Some(why) => {
            assert!(std::env::var_os("PFLEX_REQUIRE_TOOLS").is_none(), "cannot run: {why}");
            eprintln!("skipping: {why}");
            false
        }
    }
}

/// Runs `pflex ARGS --data-dir DIR`; panics with its output if it fails.
pub fn pflex(dir: &Path, args: &[&str]) -> String {
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

/// A lab brought up with `pflex lab up ARGS`; `pflex lab down` on drop.
pub struct Lab {
    pub dir: PathBuf,
    layout: serde_json::Value,
}

impl Lab {
    pub fn up(dir: &Path, args: &[&str]) -> Lab {
        let mut all = vec!["lab", "up"];
        all.extend_from_slice(args);
        // Taken down on drop even if `up` fails halfway.
        let mut lab = Lab { dir: dir.to_path_buf(), layout: serde_json::Value::Null };
        pflex(dir, &all);
        lab.layout = serde_json::from_str(&std::fs::read_to_string(dir.join("lab.json")).unwrap())
            .expect("lab.json");
        // The lab's HTTP APIs are HTTPS with its own CA. This process trusts
        // the first CA it is given: one lab per test binary.
        let ca = dir.join("tls").join("ca");
        if ca.exists() {
            pflex_mdm_client::trust::trust_cluster_ca(&ca).expect("trusting the lab's CA");
        }
        lab
    }

    /// An HTTP client for the lab's APIs (trusting its CA).
    pub fn http(&self) -> reqwest::Client {
        pflex_mdm_client::trust::http_client_builder().build().unwrap()
    }

    /// The base URL of SDS host `host`'s control API (port 9100).
    pub fn sds_api(&self, host: &str) -> String {
        self.url(host, 9100, "")
    }

    /// The URL of `path` on port `port` of lab host `host`.
    pub fn url(&self, host: &str, port: u16, path: &str) -> String {
        let scheme = if self.layout["tls"].as_bool() == Some(true) { "https" } else { "http" };
        format!("{scheme}://{}:{port}{path}", self.address(host))
    }

    /// `pflex lab ARGS` on this lab.
    pub fn run(&self, args: &[&str]) -> String {
        let mut all = vec!["lab"];
        all.extend_from_slice(args);
        pflex(&self.dir, &all)
    }

    /// `pflex node start HOST`.
    pub fn start(&self, host: &str) {
        pflex(&self.dir, &["node", "start", host]);
    }

    /// The address of lab host `host`.
    pub fn address(&self, host: &str) -> String {
        let hosts = self.layout["hosts"].as_array().expect("hosts");
        let h = hosts.iter().find(|h| h["name"] == host).unwrap_or_else(|| panic!("no {host}"));
        h["address"].as_str().unwrap().to_string()
    }

    pub fn nbd_uri(&self) -> String {
        self.layout["nbd_uri"].as_str().unwrap().to_string()
    }

    /// An admin client of the lab's MDM.
    pub fn mdm(&self) -> MdmClient {
        let token = std::fs::read_to_string(self.dir.join("mdm/admin_token")).unwrap();
        MdmClient::new(self.layout["mdm_url"].as_str().unwrap(), Some(token.trim().to_string()))
            .unwrap()
    }

    /// The device file of SDS host `host`.
    pub fn device(&self, host: &str) -> PathBuf {
        self.dir.join(host).join("dev0.img")
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let _ = Command::new(env!("CARGO_BIN_EXE_pflex"))
            .args(["lab", "down", "--data-dir", &self.dir.display().to_string()])
            .status();
    }
}
