//! What the service's unit tests share: settings, keys and the registration
//! of a test SDS.

use std::time::Duration;

use pflex_proto::api::{DeviceInfo, NodeType, RegisterRequest};
use pflex_proto::token::ClusterSecret;

use crate::keys::{KeyTiming, Keys};

use super::Settings;

/// The settings the unit tests run with.
pub fn settings() -> Settings {
    Settings {
        heartbeat_interval_secs: 2,
        stale_after_secs: 60,
        failed_after_secs: 120,
        token_ttl_secs: 600,
        probe_on_report: false,
        unreachable_grace_secs: 5,
        resync_window_secs: 120,
    }
}

/// Keys from a fresh cluster secret.
pub fn keys() -> Keys {
    let timing =
        KeyTiming { publish_for: Duration::from_secs(6), token_ttl: Duration::from_secs(600) };
    Keys::new(ClusterSecret::generate(), timing, Vec::new())
}

/// The registration of SDS `sds{i}`, alone in fault set `fs{i}`, with one
/// empty 1 TiB device.
pub fn sds_request(i: u32) -> RegisterRequest {
    RegisterRequest {
        join_key: "k".into(),
        enrollment_token: None,
        credential: None,
        node_type: NodeType::Sds,
        name: format!("sds{i}"),
        host: "127.0.0.1".into(),
        control_port: 1,
        mgmt_port: 1,
        data_port: 1,
        fault_set: Some(format!("fs{i}")),
        pool: None,
        devices: vec![DeviceInfo { path: "/d".into(), capacity_bytes: 1 << 40, used_bytes: 0 }],
        data_cluster_id: None,
    }
}
