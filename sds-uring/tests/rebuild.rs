//! Rebuild against real processes: an SDS is killed, its copies move, the
//! surviving copies are copied to their new secondaries while clients keep
//! writing, and after a second failure the rebuilt copies serve every
//! acknowledged byte.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::{model_crc, pattern, start_cluster_with, FailureDetection, VolumeSession};
use pflex_mdm_client::MdmClient;
use pflex_proto::frame::{Op, Status};
use pflex_proto::token::AccessMode;
use pflex_proto::CHUNK_SIZE;
use pflex_testkit::cluster::{Cluster, Component};
use pflex_testkit::wait_for;

const CHUNK: usize = CHUNK_SIZE as usize;

/// Writes `data` at `offset` of `chunk`, opening a fresh session (new map,
/// new token) whenever the cluster is moving; returns the session used.
async fn write_through_changes(
    sdc: &MdmClient,
    volume_id: u64,
    mut session: VolumeSession,
    chunk: u64,
    offset: u32,
    data: &[u8],
) -> VolumeSession {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let header = session.header(Op::Write, chunk, offset, data.len() as u32);
        let primary_id = session.primary_of(chunk);
        let primary = session.client(primary_id);
        // A transport error means the primary is down: as retryable as a refusal;
        // so is `NotAvailable` (a primary whose secondary died holds no lease).
        let status = match primary.call(header, session.key(primary_id), data).await {
            Ok(reply) => reply.status(),
            Err(_) => Status::ReplicaFailed,
        };
        match status {
            Status::Ok => return session,
            status @ (Status::StaleEpoch
            | Status::ReplicaFailed
            | Status::NotPrimary
            | Status::NotAvailable) => {
                assert!(Instant::now() < deadline, "write kept failing: {}", status.name());
                tokio::time::sleep(Duration::from_millis(200)).await;
                session = VolumeSession::open(sdc, volume_id, AccessMode::ReadWrite).await;
                // The map may still list the dead node: authenticate where we can.
                for node in session.map.nodes.clone() {
                    session.auth(node.id).await;
                }
            }
            other => panic!("write to chunk {chunk}: {}", other.name()),
        }
    }
}

/// Every written chunk has the model's content on both of its copies.
///
/// The copies are read against one placement: the rebalancer may move a
/// PG meanwhile (and its old holder then drops the copy), so a pass counts
/// only if the map's epoch is the same after it as before; otherwise it is
/// read again.
async fn assert_copies_match(cluster: &Cluster, volume_id: u64, model: &BTreeMap<u64, Vec<u8>>) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let map = cluster.admin().placement(volume_id).await.unwrap();
        let mut mismatches = Vec::new();
        for (chunk, content) in model {
            let pg = map.pg_of(*chunk).unwrap();
            for node_id in [pg.primary, pg.secondary] {
                let node = cluster.sds_by_node_id(node_id).await;
                let sum = cluster.checksum(node, volume_id, *chunk).await;
                if sum.crc32 != model_crc(content) {
                    mismatches.push(format!(
                        "chunk {chunk} on SDS {node_id}: crc {} instead of {}",
                        sum.crc32,
                        model_crc(content)
                    ));
                }
            }
        }
        let after = cluster.admin().placement(volume_id).await.unwrap();
        if after.epoch == map.epoch {
            assert!(mismatches.is_empty(), "copies differ at epoch {}: {mismatches:?}", map.epoch);
            return;
        }
        assert!(Instant::now() < deadline, "the placement kept moving for 60 s");
    }
}

async fn wait_for_rebuilds(cluster: &Cluster, failed: u64) {
    wait_for("every rebuild job to finish", Duration::from_secs(90), || async {
        let jobs = cluster.admin().rebuild_jobs().await.unwrap();
        let ours: Vec<_> = jobs.iter().filter(|j| j.failed_sds == failed).collect();
        !ours.is_empty()
            && ours.iter().all(|j| j.state == "done" || j.state == "failed")
            && ours.iter().any(|j| j.state == "done")
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failed_sds_is_rebuilt_and_the_rebuilt_copies_serve_after_a_second_failure() {
    let detection = FailureDetection { failed_after_secs: 6, probe_on_report: false };
    let mut cluster = start_cluster_with(4, detection).await;
    let sdc = cluster.register_sdc("sdc-rebuild").await.client;
    let volume_id = cluster.create_mapped_volume("rebuilt", 128 << 20, "sdc-rebuild").await;
    let mut session = VolumeSession::open(&sdc, volume_id, AccessMode::ReadWrite).await;
    session.auth_all().await;

    // 80 chunks: full ones and 64 KiB at an offset, over every PG.
    let mut model: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
    for chunk in 0..80u64 {
        let mut content = vec![0u8; CHUNK];
        if chunk % 2 == 0 {
            content = pattern(chunk, CHUNK);
            assert_eq!(session.write(chunk, 0, &content).await, Status::Ok);
        } else {
            let data = pattern(1000 + chunk, 64 << 10);
            assert_eq!(session.write(chunk, 128 << 10, &data).await, Status::Ok);
            content[128 << 10..(128 << 10) + data.len()].copy_from_slice(&data);
        }
        model.insert(chunk, content);
    }

    // Kill the primary of chunk 0 and wait until its copies have moved.
    let first = session.primary_of(0);
    let first_index = cluster.sds_index(first).await;
    cluster.kill(Component::Sds(first_index));
    wait_for("the failed node's copies to move", Duration::from_secs(60), || async {
        let map = cluster.admin().placement(volume_id).await.unwrap();
        map.pgs.iter().all(|pg| pg.primary != first && pg.secondary != first)
    })
    .await;

    // Clients keep writing while the copies are rebuilt.
    for round in 0..3u64 {
        for chunk in (0..80u64).step_by(5) {
            let data = pattern(5000 + round * 100 + chunk, 16 << 10);
            let offset = ((chunk * 7 + round) % 60) as u32 * (16 << 10);
            session = write_through_changes(&sdc, volume_id, session, chunk, offset, &data).await;
            let content = model.get_mut(&chunk).unwrap();
            content[offset as usize..offset as usize + data.len()].copy_from_slice(&data);
        }
    }
    wait_for_rebuilds(&cluster, first).await;
    assert_copies_match(&cluster, volume_id, &model).await;
    let copied: u64 = {
        let mut total = 0;
        for i in 0..cluster.sds_nodes().len() {
            if i != first_index {
                let text = cluster.metrics(cluster.sds(i)).await;
                total += common::metric_sum(&text, "pflex_sds_rebuild_chunks_copied_total");
            }
        }
        total
    };
    assert!(copied > 0, "the rebuild copied no chunk");

    // A second node fails: the source of some rebuilt copy. The rebuilt copy
    // becomes primary and serves every acknowledged byte.
    let jobs = cluster.admin().rebuild_jobs().await.unwrap();
    let job = jobs.iter().find(|j| j.failed_sds == first && j.state == "done").unwrap();
    let second = job.source_sds;
    let second_index = cluster.sds_index(second).await;
    cluster.kill(Component::Sds(second_index));
    wait_for("the second node's copies to move", Duration::from_secs(60), || async {
        let map = cluster.admin().placement(volume_id).await.unwrap();
        map.pgs.iter().all(|pg| pg.primary != second && pg.secondary != second)
    })
    .await;
    let map = cluster.admin().placement(volume_id).await.unwrap();
    assert_eq!(map.pgs[job.pg_index as usize].primary, job.target_sds);
    let session = VolumeSession::open(&sdc, volume_id, AccessMode::ReadWrite).await;
    session.auth_all().await;
    for (chunk, content) in &model {
        let (status, data) = session.read(*chunk, 0, CHUNK as u32).await;
        assert_eq!(status, Status::Ok, "read of chunk {chunk}");
        assert!(data == *content, "chunk {chunk} differs after two failures");
    }
    wait_for_rebuilds(&cluster, second).await;
    assert_copies_match(&cluster, volume_id, &model).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_secondary_reported_unreachable_is_failed_at_once_and_rebuilt() {
    // The failure timeout is far away: only a report confirmed by the MDM's
    // own probe can fail a node during this test.
    let detection = FailureDetection { failed_after_secs: 600, probe_on_report: true };
    let mut cluster = start_cluster_with(3, detection).await;
    let sdc = cluster.register_sdc("sdc-report").await.client;
    let volume_id = cluster.create_mapped_volume("reported", 64 << 20, "sdc-report").await;
    let mut session = VolumeSession::open(&sdc, volume_id, AccessMode::ReadWrite).await;
    session.auth_all().await;
    let mut model: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
    for chunk in 0..16u64 {
        let content = pattern(7000 + chunk, CHUNK);
        assert_eq!(session.write(chunk, 0, &content).await, Status::Ok);
        model.insert(chunk, content);
    }
    let epoch = session.map.epoch;

    // A report about a node that is up changes nothing.
    let live = session.primary_of(0);
    let verdict = sdc.report_unreachable(live).await.unwrap();
    assert_eq!((verdict.reachable, verdict.status.as_str()), (Some(true), "ACTIVE"));
    assert_eq!(verdict.copies_replaced, 0);
    let again = sdc.report_unreachable(live).await.unwrap();
    assert_eq!(again.reachable, None, "a second report within a second is not probed");
    assert_eq!(cluster.admin().placement(volume_id).await.unwrap().epoch, epoch);

    // The secondary of chunk 0 dies; the write that finds it gone fails.
    // The writes retried after it keep failing, the primary keeps reporting,
    // and once the MDM's probes have failed for the grace period it moves
    // the dead node's copies and the retried write goes through.
    let victim = session.secondary_of(0);
    let victim_index = cluster.sds_index(victim).await;
    cluster.kill(Component::Sds(victim_index));
    // (It rewrites bytes already there: a failed write's outcome is undefined.)
    let same = model[&0][..4096].to_vec();
    assert_eq!(session.write(0, 0, &same).await, Status::ReplicaFailed);
    session = write_through_changes(&sdc, volume_id, session, 0, 0, &same).await;
    wait_for("the reported node's copies to move", Duration::from_secs(30), || async {
        let map = cluster.admin().placement(volume_id).await.unwrap();
        map.pgs.iter().all(|pg| pg.primary != victim && pg.secondary != victim)
    })
    .await;
    let status = cluster.admin().health_status().await.unwrap();
    let component = status.components.iter().find(|c| c.node_id == victim).unwrap();
    assert_eq!(component.status, "FAILED");

    // Writes go on under the new map; the new copies are rebuilt.
    for chunk in 0..16u64 {
        let data = pattern(8000 + chunk, 8192);
        session = write_through_changes(&sdc, volume_id, session, chunk, 4096, &data).await;
        model.get_mut(&chunk).unwrap()[4096..4096 + 8192].copy_from_slice(&data);
    }
    wait_for_rebuilds(&cluster, victim).await;
    assert_copies_match(&cluster, volume_id, &model).await;

    // The dead node comes back: it holds no copy any more, so the chunks it
    // still stores are released, and nothing else is.
    cluster.start_again(Component::Sds(victim_index)).await;
    let returned = cluster.sds(victim_index);
    wait_for("the returned node to release its stale chunks", Duration::from_secs(30), || async {
        let mut any = false;
        for chunk in model.keys() {
            any |= cluster.checksum(returned, volume_id, *chunk).await.allocated;
        }
        !any
    })
    .await;
    let text = cluster.metrics(returned).await;
    assert!(common::metric_sum(&text, "pflex_sds_chunks_reclaimed_total") >= 1);
    assert_copies_match(&cluster, volume_id, &model).await;
}
