//! What a test asks of its cluster: the MDM's flags, how many nodes of
//! each kind, and the flags added to a node's command line.

/// The MDM's flags beyond the ones every cluster passes; `None` leaves the
/// MDM's own default.
#[derive(Debug, Clone)]
pub struct MdmOptions {
    pub heartbeat_interval_secs: u64,
    pub stale_after_secs: Option<u64>,
    pub failed_after_secs: Option<u64>,
    /// Whether a report of a node being unreachable, confirmed by the MDM's
    /// own probe, fails the node at once.
    pub probe_on_report: Option<bool>,
    pub unreachable_grace_secs: Option<u64>,
    pub token_ttl_secs: Option<u64>,
    /// Any other `--flag value` pairs (a flag set above takes the value
    /// given here).
    pub flags: Vec<String>,
}

impl Default for MdmOptions {
    /// One-second heartbeats; everything else as the MDM defaults it.
    fn default() -> Self {
        MdmOptions {
            heartbeat_interval_secs: 1,
            stale_after_secs: None,
            failed_after_secs: None,
            probe_on_report: None,
            unreachable_grace_secs: None,
            token_ttl_secs: None,
            flags: Vec::new(),
        }
    }
}

impl MdmOptions {
    pub(super) fn flags(&self) -> Vec<String> {
        let optional = [
            ("--stale-after-secs", self.stale_after_secs.map(|s| s.to_string())),
            ("--failed-after-secs", self.failed_after_secs.map(|s| s.to_string())),
            ("--probe-on-report", self.probe_on_report.map(|p| p.to_string())),
            ("--unreachable-grace-secs", self.unreachable_grace_secs.map(|s| s.to_string())),
            ("--token-ttl-secs", self.token_ttl_secs.map(|s| s.to_string())),
        ];
        let typed = optional
            .into_iter()
            .filter_map(|(flag, value)| Some([flag.to_string(), value?]))
            .flatten()
            .collect();
        with_flags(typed, &self.flags)
    }
}

/// What [`super::Cluster::start`] starts.
#[derive(Debug, Clone)]
pub struct ClusterSpec {
    pub mdm: MdmOptions,
    /// SDS nodes `sds1`..: each in its own fault set (`fs1`..), with one
    /// device file, on the IO engine `PFLEX_TEST_IO_ENGINE` names (default
    /// `uring`).
    pub sds_count: usize,
    pub sds_device_size: String,
    /// `--flag value` pairs for every SDS (a flag already on its command
    /// line takes the new value).
    pub sds_flags: Vec<String>,
    /// SDCs `sdc1`..
    pub sdc_count: usize,
    /// Whether to start the MGMT dashboard.
    pub mgmt: bool,
    /// Heartbeat interval of the SDS nodes and SDCs.
    pub heartbeat_interval_secs: u64,
}

impl Default for ClusterSpec {
    /// An MDM alone.
    fn default() -> Self {
        ClusterSpec {
            mdm: MdmOptions::default(),
            sds_count: 0,
            sds_device_size: "128M".into(),
            sds_flags: Vec::new(),
            sdc_count: 0,
            mgmt: false,
            heartbeat_interval_secs: 1,
        }
    }
}

/// How one node added later differs from the spec.
#[derive(Debug, Clone, Default)]
pub struct NodeOverrides {
    /// The MDM as this node reaches it (say through a [`crate::TcpRelay`],
    /// to cut that link alone); default the MDM itself.
    pub mdm_url: Option<String>,
    /// `--flag value` pairs (a flag already on the line takes the new value).
    pub flags: Vec<String>,
}

/// `base` with the `--flag value` pairs of `extra`: a flag already in
/// `base` takes the new value, others are appended.
pub(super) fn with_flags(mut base: Vec<String>, extra: &[String]) -> Vec<String> {
    let pairs = extra.chunks_exact(2);
    assert!(pairs.remainder().is_empty(), "flags come in `--flag value` pairs: {extra:?}");
    for pair in pairs {
        match base.iter().position(|a| *a == pair[0]) {
            Some(at) => base[at + 1].clone_from(&pair[1]),
            None => base.extend_from_slice(pair),
        }
    }
    base
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn added_flags_replace_or_extend() {
        let base = strings(&["--a", "1", "--b", "2"]);
        let merged = with_flags(base, &strings(&["--b", "3", "--c", "4"]));
        assert_eq!(merged, strings(&["--a", "1", "--b", "3", "--c", "4"]));
    }

    #[test]
    fn unset_mdm_options_leave_the_flags_out() {
        let options = MdmOptions { failed_after_secs: Some(6), ..MdmOptions::default() };
        assert_eq!(options.flags(), strings(&["--failed-after-secs", "6"]));
    }

    #[test]
    fn other_mdm_flags_follow_the_typed_ones() {
        let options = MdmOptions {
            token_ttl_secs: Some(60),
            flags: strings(&["--token-ttl-secs", "5", "--resync-window-secs", "9"]),
            ..MdmOptions::default()
        };
        let expected = ["--token-ttl-secs", "5", "--resync-window-secs", "9"];
        assert_eq!(options.flags(), strings(&expected));
    }
}
