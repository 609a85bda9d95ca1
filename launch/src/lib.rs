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

/// What an SDS's or SDC's command line says, in a local cluster, a lab or a
/// test.
pub struct NodeLaunch<'a> {
    pub mdm_url: &'a str,
    /// Path of the file holding the join key.
    pub join_key: &'a str,
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
        vec![
            "--mdm".into(),
            self.mdm_url.into(),
            "--join-key-file".into(),
            self.join_key.into(),
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

/// The MDM's command line; the caller adds failure timing and token
/// lifetime if it wants other than the MDM's defaults.
pub fn mdm_args(listen: &str, mdm_dir: &Path, join_key: &str, heartbeat: &str) -> Vec<String> {
    vec![
        "--listen".into(),
        listen.into(),
        "--data-dir".into(),
        mdm_dir.display().to_string(),
        "--join-key-file".into(),
        join_key.into(),
        "--heartbeat-interval-secs".into(),
        heartbeat.into(),
    ]
}

/// The MGMT dashboard's command line.
pub fn mgmt_args(mdm_url: &str, join_key: &str, mgmt_dir: &Path, listen: &str) -> Vec<String> {
    vec![
        "--mdm".into(),
        mdm_url.into(),
        "--join-key-file".into(),
        join_key.into(),
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
            join_key: "/d/join_key",
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
