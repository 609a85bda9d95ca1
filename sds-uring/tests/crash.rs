//! Crash test: `kill -9` of an SDS after acknowledged writes, restart, and
//! every acknowledged write reads back (from both copies).

mod common;

use common::{model_crc, pattern, sealed, send_raw, start_cluster, VolumeSession};
use pflex_proto::frame::{FrameHeader, Op, Status};
use pflex_proto::token::AccessMode;
use pflex_proto::CHUNK_SIZE;
use pflex_testkit::cluster::Component;

const CHUNK: usize = CHUNK_SIZE as usize;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn acknowledged_writes_survive_kill_9_and_restart() {
    let mut cluster = start_cluster(2).await;
    let sdc = cluster.register_sdc("sdc-crash").await.client;
    let volume_id = cluster.create_mapped_volume("crashvol", 32 << 20, "sdc-crash").await;
    let s = VolumeSession::open(&sdc, volume_id, AccessMode::ReadWrite).await;
    s.auth_all().await;

    let chunks = 12u64;
    let mut models = vec![vec![0u8; CHUNK]; chunks as usize];
    for chunk in 0..chunks {
        for piece in 0..4u64 {
            let offset = (piece * 200_000 + chunk * 333) as usize;
            let data = pattern(chunk * 10 + piece, 50_000 + piece as usize * 1000);
            assert_eq!(s.write(chunk, offset as u32, &data).await, Status::Ok);
            models[chunk as usize][offset..offset + data.len()].copy_from_slice(&data);
        }
    }

    // Kill sds1 hard (it is primary of some chunks, secondary of others).
    let victim = 0;
    cluster.kill(Component::Sds(victim));
    cluster.start_again(Component::Sds(victim)).await;

    // The restarted node forgot its tokens: NoToken, then AUTH again.
    let restarted_id = {
        let node = cluster.sds(victim);
        let url = format!("http://127.0.0.1:{}/health", node.mgmt_port);
        let status: pflex_proto::api::ComponentStatus =
            reqwest::get(url).await.unwrap().json().await.unwrap();
        status.node_id.unwrap()
    };
    let chunk_on_victim = (0..chunks).find(|c| s.primary_of(*c) == restarted_id).unwrap();
    let (status, _) = s.read(chunk_on_victim, 0, 4096).await;
    assert_eq!(status, Status::NoToken);
    s.auth_all().await;

    for chunk in 0..chunks {
        let model = &models[chunk as usize];
        let (status, data) = s.read(chunk, 0, CHUNK as u32).await;
        assert_eq!(status, Status::Ok, "read chunk {chunk}");
        assert!(data == *model, "chunk {chunk} lost acknowledged writes");
        for node_id in [s.primary_of(chunk), s.secondary_of(chunk)] {
            let node = cluster.sds_by_node_id(node_id).await;
            let sum = cluster.checksum(node, volume_id, chunk).await;
            assert_eq!(sum.crc32, model_crc(model), "copy of chunk {chunk} on {}", node.name);
        }
    }

    // And it serves new writes as before.
    let data = pattern(4242, 4096);
    assert_eq!(s.write(chunk_on_victim, 0, &data).await, Status::Ok);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn writes_fail_with_replica_failed_while_the_secondary_is_down() {
    let mut cluster = start_cluster(2).await;
    let sdc = cluster.register_sdc("sdc-degraded").await.client;
    let volume_id = cluster.create_mapped_volume("degraded", 16 << 20, "sdc-degraded").await;
    let s = VolumeSession::open(&sdc, volume_id, AccessMode::ReadWrite).await;
    s.auth_all().await;
    let chunk = 0;
    let data = pattern(1, 4096);
    assert_eq!(s.write(chunk, 0, &data).await, Status::Ok);

    let secondary_id = s.secondary_of(chunk);
    let victim = cluster.sds_index(secondary_id).await;
    cluster.kill(Component::Sds(victim));
    let started = std::time::Instant::now();
    assert_eq!(s.write(chunk, 0, &pattern(2, 4096)).await, Status::ReplicaFailed);
    assert!(started.elapsed() < std::time::Duration::from_secs(15), "failure took too long");
    // The primary applied the failed write locally: until its secondary has
    // the chunk (or leaves the set) it must not serve it, or a failover
    // would show the write disappear. The SDC retries `NotAvailable`.
    let (status, _) = s.read(chunk, 0, 4096).await;
    assert_eq!(status, Status::NotAvailable, "a chunk ahead of its secondary was served");
    // Other chunks of the primary are served as before.
    let other = (1..s.map.chunk_count())
        .find(|&c| s.primary_of(c) == s.primary_of(chunk))
        .expect("another chunk on the same primary");
    let (status, _) = s.read(other, 0, 4096).await;
    assert_eq!(status, Status::Ok);
    let primary = cluster.sds_by_node_id(s.primary_of(chunk)).await;
    let metrics = cluster.metrics(primary).await;
    assert!(common::metric_sum(&metrics, "pflex_sds_replica_forward_failures_total") >= 1);

    // Once it is back, writes are acknowledged by both again.
    cluster.start_again(Component::Sds(victim)).await;
    let healed = pattern(3, CHUNK);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        match s.write(chunk, 0, &healed).await {
            Status::Ok => break,
            // `NotAvailable`: the primary holds no lease while it cannot
            // reach its secondary; an SDC retries both.
            Status::ReplicaFailed | Status::NotAvailable
                if std::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            other => panic!("write after the secondary came back: {}", other.name()),
        }
    }
    for node_id in [s.primary_of(chunk), s.secondary_of(chunk)] {
        let node = cluster.sds_by_node_id(node_id).await;
        assert_eq!(cluster.checksum(node, volume_id, chunk).await.crc32, model_crc(&healed));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_secondary_back_on_another_port_is_found_again() {
    let mut cluster = start_cluster(2).await;
    let sdc = cluster.register_sdc("sdc-moved").await.client;
    let volume_id = cluster.create_mapped_volume("moved", 16 << 20, "sdc-moved").await;
    let s = VolumeSession::open(&sdc, volume_id, AccessMode::ReadWrite).await;
    s.auth_all().await;
    let chunk = 0;
    assert_eq!(s.write(chunk, 0, &pattern(1, 4096)).await, Status::Ok);

    let victim = cluster.sds_index(s.secondary_of(chunk)).await;
    cluster.kill(Component::Sds(victim));
    cluster.move_to_new_ports(Component::Sds(victim));
    cluster.start_again(Component::Sds(victim)).await;

    // The primary's map still names the old port (the epoch did not change);
    // a failed forward makes it refetch the map and find the new one.
    let data = pattern(2, CHUNK);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        match s.write(chunk, 0, &data).await {
            Status::Ok => break,
            // `NotAvailable`: the primary holds no lease while it cannot
            // reach its secondary; an SDC retries both.
            Status::ReplicaFailed | Status::NotAvailable
                if std::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            }
            other => panic!("write after the secondary moved: {}", other.name()),
        }
    }
    for node_id in [s.primary_of(chunk), s.secondary_of(chunk)] {
        let node = cluster.sds_by_node_id(node_id).await;
        assert_eq!(cluster.checksum(node, volume_id, chunk).await.crc32, model_crc(&data));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_stops_cleanly_and_data_is_there_after_restart() {
    let mut cluster = start_cluster(2).await;
    let sdc = cluster.register_sdc("sdc-term").await.client;
    let volume_id = cluster.create_mapped_volume("term", 8 << 20, "sdc-term").await;
    let s = VolumeSession::open(&sdc, volume_id, AccessMode::ReadWrite).await;
    s.auth_all().await;
    let data = pattern(5, 300_000);
    assert_eq!(s.write(0, 4096, &data).await, Status::Ok);
    let i = cluster.sds_index(s.primary_of(0)).await;
    let status = cluster.terminate(Component::Sds(i)).await;
    assert!(status.success(), "exit status {status}");
    cluster.start_again(Component::Sds(i)).await;
    s.auth_all().await;
    let (status, read) = s.read(0, 4096, data.len() as u32).await;
    assert_eq!((status, read == data), (Status::Ok, true));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn requests_recorded_before_a_restart_are_refused_after_it() {
    let mut cluster = start_cluster(2).await;
    let sdc = cluster.register_sdc("sdc-replay").await.client;
    let volume_id = cluster.create_mapped_volume("replayvol", 16 << 20, "sdc-replay").await;
    let s = VolumeSession::open(&sdc, volume_id, AccessMode::ReadWrite).await;
    s.auth_all().await;
    let chunk = 0;
    let victim = cluster.sds_index(s.primary_of(chunk)).await;

    // Someone on the wire records an AUTH and a write to the primary.
    let token_bytes = s.token.encode();
    let auth = FrameHeader {
        op: Op::Auth as u8,
        volume_id,
        token_id: s.token.token.token_id,
        length: token_bytes.len() as u32,
        ..Default::default()
    };
    let auth_raw = sealed(auth, s.key(s.primary_of(chunk)), &token_bytes);
    let recorded = pattern(1, 4096);
    let recorded_raw =
        sealed(s.header(Op::Write, chunk, 0, 4096), s.key(s.primary_of(chunk)), &recorded);
    let addr = cluster.sds(victim).data_addr();
    assert_eq!(send_raw(addr, &recorded_raw, &recorded).await.status, Status::Ok as u16);

    let current = pattern(2, 4096);
    assert_eq!(s.write(chunk, 0, &current).await, Status::Ok);

    // The primary restarts and so forgets its replay windows. The recording
    // is played back before the real client comes back: the token is taken
    // again, the write is not.
    cluster.kill(Component::Sds(victim));
    cluster.start_again(Component::Sds(victim)).await;
    let addr = cluster.sds(victim).data_addr();
    assert_eq!(send_raw(addr, &auth_raw, &token_bytes).await.status, Status::Ok as u16);
    assert_eq!(send_raw(addr, &recorded_raw, &recorded).await.status, Status::Replay as u16);

    // The real client presents its token again and goes on.
    s.auth_all().await;
    let (status, data) = s.read(chunk, 0, 4096).await;
    assert_eq!(status, Status::Ok);
    assert!(data == current, "a write recorded before the restart was applied again");
    let next = pattern(3, 4096);
    assert_eq!(s.write(chunk, 4096, &next).await, Status::Ok);
}
