//! The command lines that start pflex components.
//!
//! `pflex up`, `pflex lab` and the integration-test cluster
//! (`pflex_testkit::cluster`) start the same binaries; building their
//! argument lists in one place keeps a test from running a component with
//! flags no real deployment uses (or missing one every deployment passes).
//! Each builder returns the flags every caller passes; a caller appends its
//! own (device size, fault set, IO engine, failure timing, ...).
//!
//! No dependencies and no IO: only strings.

use std::path::Path;

/// How a component proves itself when it first registers.
#[derive(Clone, Copy, Debug)]
pub enum Enroll<'a> {
    /// A one-time enrollment token in this file (what `pflex up` and `pflex
    /// lab` use: one per node, minted with the admin token).
    TokenFile(&'a str),
    /// The cluster's join key in this file (test clusters).
    JoinKeyFile(&'a str),
}

impl Enroll<'_> {
    fn args(self) -> [String; 2] {
        match self {
            Enroll::TokenFile(path) => ["--enrollment-token-file".into(), path.into()],
            Enroll::JoinKeyFile(path) => ["--join-key-file".into(), path.into()],
        }
    }
}

/// What an SDS's or SDC's command line says, in a local cluster, a lab or a
/// test.
pub struct NodeLaunch<'a> {
    pub mdm_url: &'a str,
    /// How it enrolls.
    pub enroll: Enroll<'a>,
    pub name: &'a str,
    /// Listen and advertised address.
    pub host: &'a str,
    pub dir: &'a Path,
    /// Seconds between heartbeats.
    pub heartbeat: &'a str,
    /// SDS: control, mgmt, data. SDC: control, mgmt, NBD.
    pub ports: [u16; 3],
}

impl NodeLaunch<'_> {
    fn common(&self) -> Vec<String> {
        let [flag, path] = self.enroll.args();
        vec![
            "--mdm".into(),
            self.mdm_url.into(),
            flag,
            path,
            "--name".into(),
            self.name.into(),
            "--host".into(),
            self.host.into(),
            "--data-dir".into(),
            self.dir.display().to_string(),
            "--control-port".into(),
            self.ports[0].to_string(),
            "--mgmt-port".into(),
            self.ports[1].to_string(),
            "--heartbeat-interval-secs".into(),
            self.heartbeat.into(),
        ]
    }
}

/// An SDS's command line (one device, `dev0.img` in its dir); the caller
/// adds size, fault set and engine.
pub fn sds_args(launch: &NodeLaunch) -> Vec<String> {
    let mut args = launch.common();
    args.extend([
        "--data-port".into(),
        launch.ports[2].to_string(),
        "--device".into(),
        launch.dir.join("dev0.img").display().to_string(),
    ]);
    args
}

/// An SDC's command line.
pub fn sdc_args(launch: &NodeLaunch) -> Vec<String> {
    let mut args = launch.common();
    args.extend(["--nbd-listen".into(), format!("{}:{}", launch.host, launch.ports[2])]);
    args
}

/// The MDM's command line (with a join key file only where the cluster uses
/// one); the caller adds failure timing and token lifetime if it wants other
/// than the MDM's defaults.
pub fn mdm_args(
    listen: &str,
    mdm_dir: &Path,
    join_key: Option<&str>,
    heartbeat: &str,
) -> Vec<String> {
    let mut args = vec![
        "--listen".into(),
        listen.into(),
        "--data-dir".into(),
        mdm_dir.display().to_string(),
        "--heartbeat-interval-secs".into(),
        heartbeat.into(),
    ];
    if let Some(path) = join_key {
        args.extend(["--join-key-file".into(), path.into()]);
    }
    args
}

/// The flags that make member `n` (from 0) of a replicated MDM of
/// `urls.len()` members (each its API's base URL, in member order) start
/// with the others as peers; none for a single MDM.
pub fn mdm_member_args(n: usize, urls: &[String]) -> Vec<String> {
    if urls.len() < 2 {
        return Vec::new();
    }
    let peers =
        urls.iter().enumerate().map(|(i, url)| format!("{}={url}", i + 1)).collect::<Vec<_>>();
    vec!["--mdm-id".into(), (n + 1).to_string(), "--mdm-peers".into(), peers.join(",")]
}

/// The MGMT dashboard's command line.
pub fn mgmt_args(mdm_url: &str, enroll: Enroll, mgmt_dir: &Path, listen: &str) -> Vec<String> {
    let [flag, path] = enroll.args();
    vec![
        "--mdm".into(),
        mdm_url.into(),
        flag,
        path,
        "--data-dir".into(),
        mgmt_dir.display().to_string(),
        "--listen".into(),
        listen.into(),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn launch(dir: &Path) -> NodeLaunch<'_> {
        NodeLaunch {
            mdm_url: "http://10.0.0.1:8001",
            enroll: Enroll::JoinKeyFile("/d/join_key"),
            name: "n1",
            host: "10.0.0.2",
            dir,
            heartbeat: "2",
            ports: [1, 2, 3],
        }
    }

    /// The value that follows `flag`.
    fn value<'a>(args: &'a [String], flag: &str) -> Option<&'a str> {
        let at = args.iter().position(|a| a == flag)?;
        args.get(at + 1).map(String::as_str)
    }

    #[test]
    fn an_sds_gets_its_ports_device_and_mdm() {
        let args = sds_args(&launch(Path::new("/d/sds1")));
        assert_eq!(value(&args, "--mdm"), Some("http://10.0.0.1:8001"));
        assert_eq!(value(&args, "--control-port"), Some("1"));
        assert_eq!(value(&args, "--mgmt-port"), Some("2"));
        assert_eq!(value(&args, "--data-port"), Some("3"));
        assert_eq!(value(&args, "--device"), Some("/d/sds1/dev0.img"));
        assert_eq!(value(&args, "--heartbeat-interval-secs"), Some("2"));
    }

    #[test]
    fn an_sdc_serves_nbd_on_its_host() {
        let args = sdc_args(&launch(Path::new("/d/sdc1")));
        assert_eq!(value(&args, "--nbd-listen"), Some("10.0.0.2:3"));
        assert_eq!(value(&args, "--data-port"), None);
    }
}
