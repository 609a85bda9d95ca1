//! Membership: an SDS whose MDM comes back with empty state (a new cluster:
//! it answers 401, has new keys and numbers its volumes from 1 again) never
//! serves it the old cluster's chunks; idle HTTP connections cannot keep
//! heartbeats or an operator out of the MDM.

mod common;

use std::time::{Duration, Instant};

use common::{model_crc, pattern, start_cluster, VolumeSession};
use pflex_proto::frame::Status;
use pflex_proto::token::AccessMode;
use pflex_proto::CHUNK_SIZE;
use pflex_testkit::cluster::{Cluster, Component};

/// The new MDM refuses the nodes while their stores hold the old cluster's
/// chunks, and they keep them: when their own MDM comes back, the data is
/// there. Restarted with `--erase-foreign-data` they erase it and join the
/// new cluster, whose volume 1 (the old one's number) reads zeroes where it
/// was not written, never the old volume 1's bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_sds_never_serves_one_clusters_chunks_to_another() {
    let mut cluster = start_cluster(2).await;
    let sdc = cluster.register_sdc("sdc-a").await.client;
    let (volume_id, before) = written_volume(&cluster, &sdc, "before", 1).await;

    // Both nodes hold chunk 0 of the volume: the new MDM refuses them and
    // registers nothing.
    let own_state = cluster.restart_mdm_with_fresh_state().await;
    for name in ["sds1", "sds2"] {
        wait_for_log(&cluster, name, "foreign_cluster_data", 1).await;
    }
    let nodes = cluster.admin().sds_list().await.unwrap();
    assert!(nodes.is_empty(), "the new cluster took in nodes holding another's data: {nodes:?}");

    // Their own MDM comes back: they heartbeat again, and the data is there.
    cluster.restart_mdm_on(own_state).await;
    wait_for_active_sds(&cluster, 2).await;
    let again = VolumeSession::open(&sdc, volume_id, AccessMode::ReadWrite).await;
    again.auth_all().await;
    let (status, read) = again.read(0, 0, 4096).await;
    assert_eq!(status, Status::Ok);
    assert!(read == before, "the old cluster's data did not survive the foreign MDM");

    // A new cluster once more, and the operator reuses the nodes for it.
    cluster.restart_mdm_with_fresh_state().await;
    for i in 0..2 {
        cluster.kill(Component::Sds(i));
        cluster.add_flags(Component::Sds(i), &["--erase-foreign-data", "true"]);
        cluster.start_again(Component::Sds(i)).await;
    }
    wait_for_active_sds(&cluster, 2).await;
    for name in ["sds1", "sds2"] {
        let log = cluster.log(name);
        assert!(log.contains("erased another cluster's data"), "{name} says what it did: {log}");
    }
    let sdc = cluster.register_sdc("sdc-b").await.client;
    let new_volume = cluster.create_mapped_volume("after", 16 << 20, "sdc-b").await;
    assert_eq!(new_volume, volume_id, "the new cluster numbers its volumes anew");
    let new = VolumeSession::open(&sdc, new_volume, AccessMode::ReadWrite).await;
    new.auth_all().await;
    let data = pattern(3, 4096);
    // Its nodes may have swapped ids: a primary that granted a lease on
    // volume 1 under the old cluster waits it out first and answers
    // `NotAvailable`, which an SDC retries (as here) until it passes. (A
    // node that kept the old cluster's map of volume 1 refused the new
    // primary's leases for good.)
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let status = new.write(0, 4096, &data).await;
        if status == Status::Ok {
            break;
        }
        assert_eq!(status, Status::NotAvailable, "only a lease wait may delay the write");
        assert!(Instant::now() < deadline, "the write stayed NotAvailable");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut model = vec![0u8; CHUNK_SIZE as usize];
    model[4096..8192].copy_from_slice(&data);
    let (status, read) = new.read(0, 0, 8192).await;
    assert_eq!(status, Status::Ok);
    assert!(read[..4096].iter().all(|&b| b == 0), "the new volume reads the old volume's bytes");
    assert!(read[4096..] == data[..], "the new volume lost its write");
    for node_id in [new.primary_of(0), new.secondary_of(0)] {
        let node = cluster.sds_by_node_id(node_id).await;
        assert_eq!(cluster.checksum(node, new_volume, 0).await.crc32, model_crc(&model));
    }
}

/// An MDM restored from a backup (a new data directory and secret, the
/// backed-up database) is the cluster its nodes hold chunks of: they come
/// back, and the volume reads what was written before the backup. A volume
/// created after the backup is unknown to it, but its chunks are still on
/// the nodes: a volume created after the restore never takes its number
/// (it would read them).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_restored_mdm_takes_its_nodes_back_with_their_data() {
    let mut cluster = start_cluster(2).await;
    let sdc = cluster.register_sdc("sdc-a").await.client;
    let (volume_id, data) = written_volume(&cluster, &sdc, "kept", 5).await;

    let backup = cluster.admin().mdm_backup().await.unwrap();
    let (lost_volume, _) = written_volume(&cluster, &sdc, "lost", 7).await;

    let restored = cluster.path("mdm-restored");
    std::fs::create_dir_all(&restored).unwrap();
    std::fs::write(restored.join("powerflex.db"), &backup).unwrap();
    cluster.restart_mdm_on(restored).await;
    wait_for_active_sds(&cluster, 2).await;

    // Tokens now come under the new secret; the nodes take them.
    let after = VolumeSession::open(&sdc, volume_id, AccessMode::ReadWrite).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    let read = loop {
        let mut statuses = Vec::new();
        for node in [after.primary_of(0), after.secondary_of(0)] {
            statuses.push(after.auth(node).await);
        }
        let (status, read) = after.read(0, 0, 4096).await;
        if status == Status::Ok {
            break read;
        }
        assert!(Instant::now() < deadline, "no read after the restore: {statuses:?} {status:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(read == data, "the restored cluster lost the volume's data");
    let more = pattern(6, 4096);
    assert_eq!(after.write(0, 4096, &more).await, Status::Ok);

    let new_volume = cluster.create_mapped_volume("new", 16 << 20, "sdc-a").await;
    assert_ne!(new_volume, lost_volume, "a number whose chunks the nodes hold was given again");
    let new = VolumeSession::open(&sdc, new_volume, AccessMode::ReadWrite).await;
    new.auth_all().await;
    let (status, read) = new.read(0, 0, 4096).await;
    assert_eq!(status, Status::Ok);
    assert!(read.iter().all(|&b| b == 0), "the new volume reads a lost volume's bytes");
}

/// A 16 MiB volume `name` mapped to `sdc-a`, with `pattern(seed, 4096)`
/// written at the start of chunk 0 (both nodes hold it); its id and the data.
async fn written_volume(
    cluster: &Cluster,
    sdc: &pflex_mdm_client::MdmClient,
    name: &str,
    seed: u64,
) -> (u64, Vec<u8>) {
    let volume_id = cluster.create_mapped_volume(name, 16 << 20, "sdc-a").await;
    let session = VolumeSession::open(sdc, volume_id, AccessMode::ReadWrite).await;
    session.auth_all().await;
    let data = pattern(seed, 4096);
    assert_eq!(session.write(0, 0, &data).await, Status::Ok);
    (volume_id, data)
}

/// Waits (30 s at most) until `name`'s log holds `needle` `times` times.
async fn wait_for_log(cluster: &Cluster, name: &str, needle: &str, times: usize) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while cluster.log(name).matches(needle).count() < times {
        assert!(Instant::now() < deadline, "{name} never logged {needle:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits (30 s at most) until the MDM lists `count` ACTIVE SDS nodes.
async fn wait_for_active_sds(cluster: &Cluster, count: usize) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let nodes = cluster.admin().sds_list().await.unwrap_or_default();
        if nodes.len() == count && nodes.iter().all(|n| n.status == "ACTIVE") {
            return;
        }
        assert!(Instant::now() < deadline, "SDS nodes did not come back: {nodes:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
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
