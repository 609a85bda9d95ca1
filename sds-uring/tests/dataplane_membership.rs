//! Membership: an SDS whose MDM comes back with empty state (it answers
//! 401 and has a new cluster secret) registers again on its own, drops the
//! tokens signed under the old secret and serves the new cluster.

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
    assert_eq!(new.write(0, 0, &data).await, Status::Ok);
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
