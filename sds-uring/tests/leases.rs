//! Leases against real processes: a primary that the MDM replaced while it
//! was cut off from the MDM (and only from the MDM) must not answer reads
//! from an SDC that still routes by the old map once its successor has
//! acknowledged a newer write.

mod common;

use std::time::{Duration, Instant};

use common::{metric_sum, pattern, start_cluster_with, FailureDetection, VolumeSession};
use pflex_proto::frame::{Op, Status};
use pflex_proto::token::AccessMode;
use pflex_testkit::cluster::{Component, NodeOverrides};
use pflex_testkit::{wait_for, TcpRelay};

const VOLUME_SIZE: u64 = 64 << 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_primary_replaced_while_cut_from_the_mdm_serves_no_stale_read() {
    // The MDM fails a silent node after 4 s; no report will come (the cut
    // node can still reach everyone but the MDM).
    let detection = FailureDetection { failed_after_secs: 4, probe_on_report: true };
    let mut cluster = start_cluster_with(2, detection).await;
    let relay = TcpRelay::start(cluster.mdm_addr()).await;
    cluster.add_sds(NodeOverrides { mdm_url: Some(relay.url()), ..NodeOverrides::default() }).await;
    let sdc = cluster.register_sdc("sdc-old-map").await.client;
    let volume_id = cluster.create_mapped_volume("vol1", VOLUME_SIZE, "sdc-old-map").await;
    let old = VolumeSession::open(&sdc, volume_id, AccessMode::ReadWrite).await;
    old.auth_all().await;
    let cut_node = cluster.node_id(Component::Sds(2)).await;
    let chunk = (0..64).find(|c| old.primary_of(*c) == cut_node).expect("sds3 is a primary");

    let x = pattern(1, 4096);
    assert_eq!(write_retrying(&old, chunk, &x).await, Status::Ok);
    let (status, data) = old.read(chunk, 0, 4096).await;
    assert_eq!((status, data == x), (Status::Ok, true));

    // Cut sds3 from the MDM only. Its heartbeats stop, the MDM fails it and
    // promotes the chunk's secondary; sds3 itself never hears of it.
    relay.cut();
    // Control: cut from the MDM only, the primary keeps serving (its lease
    // comes from its secondary, not from the MDM).
    let served_at = Instant::now();
    while served_at.elapsed() < Duration::from_secs(2) {
        let (status, data) = old.read(chunk, 0, 4096).await;
        assert_eq!((status, data == x), (Status::Ok, true), "a healthy primary stopped serving");
    }
    let old_epoch = old.map.epoch;
    wait_for("the MDM to move sds3's copies", Duration::from_secs(30), || async {
        let map = cluster.admin().placement(volume_id).await.unwrap();
        map.epoch > old_epoch && map.pg_of(chunk).unwrap().primary != cut_node
    })
    .await;

    // A newer write through the new primary is acknowledged ...
    let fresh = VolumeSession::open(&sdc, volume_id, AccessMode::ReadWrite).await;
    for node in fresh.map.nodes.clone() {
        fresh.auth(node.id).await;
    }
    let y = pattern(2, 4096);
    assert_eq!(write_retrying(&fresh, chunk, &y).await, Status::Ok);
    // ... so the old primary, asked by an SDC with the old map, must not
    // answer with the old data.
    let reply = old.call(cut_node, old.header(Op::Read, chunk, 0, 4096), &[]).await;
    let (status, data) = (reply.status(), reply.payload);
    assert!(
        status != Status::Ok || data == y,
        "stale read: the replaced primary answered {} with the data before the acknowledged write",
        status.name()
    );
    let metrics = cluster.metrics(cluster.sds(2)).await;
    let refused = metric_sum(&metrics, "pflex_sds_lease_failures_total");
    assert!(refused > 0, "the cut primary's leases were never refused:\n{metrics}");
    drop(relay);
}

/// Writes through the chunk's primary in `session`'s map, retrying the
/// refusals a failover causes (for up to 30 s).
async fn write_retrying(session: &VolumeSession, chunk: u64, data: &[u8]) -> Status {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let status = session.write(chunk, 0, data).await;
        let retry = matches!(
            status,
            Status::NotAvailable | Status::StaleEpoch | Status::ReplicaFailed | Status::Superseded
        );
        if !retry || Instant::now() > deadline {
            return status;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
