//! Membership: an SDS whose MDM comes back with empty state (it answers
//! 401 and has new keys) registers again on its own, drops the tokens signed
//! under the old keys and serves the new cluster; idle HTTP connections
//! cannot keep heartbeats or an operator out of the MDM.

mod common;

use std::time::{Duration, Instant};

use common::{model_crc, pattern, start_cluster, VolumeSession};
use pflex_proto::frame::Status;
use pflex_proto::token::AccessMode;
use pflex_proto::CHUNK_SIZE;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sds_registers_again_when_the_mdm_forgets_it() {
    let mut cluster = start_cluster(2).await;
    let sdc = cluster.register_sdc("sdc-a").await.client;
    let volume_id = cluster.create_mapped_volume("before", 16 << 20, "sdc-a").await;
    let old = VolumeSession::open(&sdc, volume_id, AccessMode::ReadWrite).await;
    old.auth_all().await;
    assert_eq!(old.write(0, 0, &pattern(1, 4096)).await, Status::Ok);

    cluster.restart_mdm_with_fresh_state().await;

    // Both SDS nodes are back in the new MDM's view within a few heartbeats.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let nodes = cluster.admin().sds_list().await.unwrap_or_default();
        if nodes.len() == 2 && nodes.iter().all(|n| n.status == "ACTIVE") {
            break;
        }
        assert!(Instant::now() < deadline, "SDS nodes did not register again: {nodes:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Tokens signed under the old secret are gone and cannot come back.
    let primary = old.primary_of(0);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let status = old.write(0, 0, &pattern(2, 4096)).await;
        if status == Status::NoToken {
            break;
        }
        assert!(Instant::now() < deadline, "old token still accepted ({})", status.name());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(old.auth(primary).await, Status::BadSignature);

    // The new cluster works end to end.
    let sdc = cluster.register_sdc("sdc-b").await.client;
    let volume_id = cluster.create_mapped_volume("after", 16 << 20, "sdc-b").await;
    let new = VolumeSession::open(&sdc, volume_id, AccessMode::ReadWrite).await;
    new.auth_all().await;
    let data = pattern(3, CHUNK_SIZE as usize);
    // The new cluster numbers its first volume 1 again, and its nodes may
    // have swapped ids: a primary that granted a lease on volume 1 under the
    // old cluster waits it out first and answers `NotAvailable`, which an
    // SDC retries (as here) until it passes. (A node that kept the old
    // cluster's map of volume 1 refused the new primary's leases for good.)
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let status = new.write(0, 0, &data).await;
        if status == Status::Ok {
            break;
        }
        assert_eq!(status, Status::NotAvailable, "only a lease wait may delay the write");
        assert!(Instant::now() < deadline, "the write stayed NotAvailable");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for node_id in [new.primary_of(0), new.secondary_of(0)] {
        let node = cluster.sds_by_node_id(node_id).await;
        assert_eq!(cluster.checksum(node, volume_id, 0).await.crc32, model_crc(&data));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_wrong_join_key_stops_the_sds_with_a_clear_error() {
    let cluster = start_cluster(0).await;
    let mut intruder = cluster.spawn_sds_with_join_key("intruder", "not-the-join-key");
    let status = intruder.wait_exit(Duration::from_secs(30)).await.expect("the SDS gives up");
    assert!(!status.success(), "exit status {status}");
    let log = cluster.log("intruder");
    assert!(log.contains("refused"), "log says why: {log}");
    assert!(cluster.admin().sds_list().await.unwrap().is_empty(), "nothing registered");
    assert!(!cluster.dir().join("intruder/credential").exists(), "no credential was handed out");
}

/// The MDM's sum of `name` in its `/metrics`.
async fn mdm_metric(cluster: &pflex_testkit::cluster::Cluster, name: &str) -> u64 {
    let url = format!("{}/metrics", cluster.mdm_url());
    let response = reqwest::Client::new().get(url).bearer_auth(cluster.admin_token()).send();
    let text = response.await.unwrap().error_for_status().unwrap().text().await.unwrap();
    text.lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

/// Up to 20000 idle connections to the MDM's HTTP port (as many as this
/// process may open), with the MDM allowed 4096 files and 512 connections:
/// heartbeats go on, an operator's call is answered, and the idle
/// connections are the ones closed to make room (`pflex_httpd`'s slots).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn idle_http_connections_cannot_keep_heartbeats_or_operators_out() {
    const MDM_CONNECTIONS: usize = 512;
    let allowed = pflex_dataplane::runtime::raise_open_files_limit().unwrap();
    let flood = 20_000.min(allowed.saturating_sub(1_000) as usize);
    assert!(flood >= 8_000, "this process may open only {allowed} files");
    // The MDM is lowered to 4096 files once running, so its connection cap
    // (which it fits within its limit at start) is set to fit them.
    let detection = common::FailureDetection { failed_after_secs: 120, probe_on_report: false };
    let flags = ["--max-connections", &MDM_CONNECTIONS.to_string()];
    let cluster = common::start_cluster_with_mdm_flags(2, detection, &flags).await;
    pflex_testkit::flood::limit_open_files(cluster.mdm_pid().expect("the MDM runs"), 4096);
    let addr: std::net::SocketAddr = format!("127.0.0.1:{}", cluster.mdm_port()).parse().unwrap();
    let idle = pflex_testkit::flood::idle_connections(addr, flood).await;
    assert_eq!(idle.len(), flood, "the MDM stopped accepting connections");
    // An operator is answered.
    let admin = cluster.admin();
    let summary = tokio::time::timeout(Duration::from_secs(10), admin.cluster_summary());
    summary.await.expect("answered in time").expect("the summary");
    // Heartbeats (two SDS, one a second) still get in.
    let before = mdm_metric(&cluster, "pflex_mdm_heartbeats_total").await;
    let deadline = Instant::now() + Duration::from_secs(15);
    while mdm_metric(&cluster, "pflex_mdm_heartbeats_total").await < before + 4 {
        assert!(Instant::now() < deadline, "heartbeats stopped reaching the MDM");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let evicted = mdm_metric(&cluster, "pflex_mdm_http_connections_evicted_total").await;
    assert!(
        evicted as usize >= flood - MDM_CONNECTIONS,
        "only {evicted} idle connections were closed"
    );
    drop(idle);
}
