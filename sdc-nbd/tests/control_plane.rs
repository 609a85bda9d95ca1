//! The SDC's routing state follows the control plane without breaking IO:
//! short-lived tokens are renewed, unmapping revokes, and a failed SDS's
//! chunks are served again once the MDM moves them. Also checks the SDC's
//! own state files and HTTP ports.

mod common;

use std::time::{Duration, Instant};

use common::{cmd, pseudo_random, rw, NbdClient, Options, MIB};
use pflex_proto::api::VolumeUnmap;
use pflex_proto::token::AccessMode;
use pflex_testkit::cluster::{Cluster, Component, NodeOverrides};

async fn volumes_json(cluster: &Cluster) -> Vec<serde_json::Value> {
    cluster.sdc_volumes(0).await.expect("GET /volumes")
}

async fn token_id(cluster: &Cluster, volume: &str) -> u64 {
    volumes_json(cluster)
        .await
        .iter()
        .find(|v| v["name"] == volume)
        .and_then(|v| v["token_id"].as_u64())
        .expect("token id")
}

#[tokio::test]
async fn short_lived_tokens_are_renewed_while_io_goes_on() {
    let options = Options { token_ttl_secs: 3, ..Options::default() };
    let cluster = common::start_with(&[rw("vol1", 64 * MIB)], options).await;
    let first_token = token_id(&cluster, "vol1").await;
    let mut c = NbdClient::open(cluster.sdc(0).data_port, "vol1");
    let started = Instant::now();
    let mut round = 0u64;
    // Three token lifetimes of continuous IO, every request must succeed.
    while started.elapsed() < Duration::from_secs(9) {
        let offset = (round * 3 * MIB + 4095) % (60 * MIB);
        let data = pseudo_random(round + 1, 10_000);
        c.request(cmd::WRITE, offset, data.len() as u32, &data)
            .unwrap_or_else(|e| panic!("write failed with {e} in round {round}"));
        let back = c.request(cmd::READ, offset, data.len() as u32, &[]).unwrap();
        assert!(back == data, "round {round}: read back differs");
        round += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    c.request(cmd::FLUSH, 0, 0, &[]).unwrap();
    assert_ne!(token_id(&cluster, "vol1").await, first_token, "the token was never renewed");
    let metrics = cluster.get_text(cluster.sdc(0).mgmt_port, "/metrics").await.unwrap();
    let renewals: u64 = metrics
        .lines()
        .filter_map(|l| l.strip_prefix("pflex_sdc_token_refreshes_total{"))
        .filter_map(|l| l.split_whitespace().last()?.parse::<u64>().ok())
        .sum();
    assert!(renewals >= 2, "expected at least two renewals, metrics say {renewals}");
    assert!(cluster.check_replicas("vol1", 0..64).await > 0);
}

#[tokio::test]
async fn unmapping_a_volume_revokes_it_and_removes_the_export() {
    let cluster = common::start(&[rw("vol1", 64 * MIB), rw("vol2", 64 * MIB)]).await;
    let mut c1 = NbdClient::open(cluster.sdc(0).data_port, "vol1");
    let mut c2 = NbdClient::open(cluster.sdc(0).data_port, "vol2");
    c2.request(cmd::WRITE, 0, 4096, &[7u8; 4096]).unwrap();
    let admin = cluster.admin();
    admin
        .volume_unmap(&VolumeUnmap { volume: "vol2".into(), sdc: "sdc1".into() })
        .await
        .expect("unmap");
    // Within a few heartbeats the export is gone and its IO is refused.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let gone = !volumes_json(&cluster).await.iter().any(|v| v["name"] == "vol2");
        if gone {
            break;
        }
        assert!(Instant::now() < deadline, "vol2 still listed after unmap");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let err = c2.request(cmd::READ, 0, 4096, &[]).expect_err("IO on an unmapped volume");
    assert_eq!(err, 5, "expected EIO");
    let list = common::run_ok(
        "nbdinfo",
        &["--list", "--json", &format!("nbd://127.0.0.1:{}", cluster.sdc(0).data_port)],
        Duration::from_secs(60),
    );
    assert!(list.contains("vol1") && !list.contains("vol2"), "{list}");
    // The other volume is untouched.
    c1.request(cmd::WRITE, 0, 4096, &[1u8; 4096]).unwrap();
    assert_eq!(c1.request(cmd::READ, 0, 4096, &[]).unwrap(), vec![1u8; 4096]);
}

#[tokio::test]
async fn io_resumes_after_an_sds_fails_and_the_mdm_moves_its_chunks() {
    // Only the failure timeout fails the node here.
    let options = Options { failed_after_secs: 6, probe_on_report: false, ..Options::default() };
    io_resumes_after_sds1_is_killed(options).await;
}

#[tokio::test]
async fn io_resumes_within_the_retry_budget_when_clients_report_a_dead_sds() {
    // The failure timeout (120 s) is far beyond the SDC's retry budget (30 s):
    // IO resumes only because the SDC and the SDS report sds1 unreachable and
    // the MDM, finding it down too, moves its copies at once.
    io_resumes_after_sds1_is_killed(Options::default()).await;
}

async fn io_resumes_after_sds1_is_killed(options: Options) {
    let mut cluster = common::start_with(&[rw("vol1", 32 * MIB)], options).await;
    let mut c = NbdClient::open(cluster.sdc(0).data_port, "vol1");
    let before = pseudo_random(1, 16 * MIB as usize);
    for (i, block) in before.chunks(MIB as usize).enumerate() {
        c.request(cmd::WRITE, i as u64 * MIB, MIB as u32, block).unwrap();
    }
    let epoch_before = volumes_json(&cluster).await[0]["epoch"].as_u64().unwrap();
    cluster.kill(Component::Sds(0));
    // Every chunk is read and rewritten: pieces whose primary was sds1 wait
    // (retrying) until the MDM promotes the surviving copy.
    for (i, block) in before.chunks(MIB as usize).enumerate() {
        let back = c.request(cmd::READ, i as u64 * MIB, MIB as u32, &[]).unwrap_or_else(|e| {
            panic!("read of chunk {i} failed with {e}\n{}", cluster.log_tails())
        });
        assert!(back == block, "chunk {i} differs after the SDS failure");
    }
    let after = pseudo_random(2, 16 * MIB as usize);
    for (i, block) in after.chunks(MIB as usize).enumerate() {
        c.request(cmd::WRITE, i as u64 * MIB, MIB as u32, block).unwrap_or_else(|e| {
            panic!("write of chunk {i} failed with {e}\n{}", cluster.log_tails())
        });
    }
    c.request(cmd::FLUSH, 0, 0, &[]).unwrap();
    for (i, block) in after.chunks(MIB as usize).enumerate() {
        let back = c.request(cmd::READ, i as u64 * MIB, MIB as u32, &[]).unwrap();
        assert!(back == block, "chunk {i} differs after rewriting");
    }
    let epoch_after = volumes_json(&cluster).await[0]["epoch"].as_u64().unwrap();
    assert!(epoch_after > epoch_before, "the SDC did not pick up the new placement");
    let metrics = cluster.get_text(cluster.sdc(0).mgmt_port, "/metrics").await.unwrap();
    let retries: u64 = metrics
        .lines()
        .filter_map(|l| l.strip_prefix("pflex_sdc_dataplane_retries_total{"))
        .filter_map(|l| l.split_whitespace().last()?.parse::<u64>().ok())
        .sum();
    assert!(retries > 0, "no request was ever retried, so the failure was not exercised");
}

#[tokio::test]
async fn state_files_and_http_ports_describe_the_sdc() {
    let cluster = common::start(&[rw("vol1", 64 * MIB)]).await;
    let mut c = NbdClient::open(cluster.sdc(0).data_port, "vol1");
    c.request(cmd::WRITE, 0, 4096, &[3u8; 4096]).unwrap();
    let health: pflex_proto::api::ComponentStatus =
        cluster.get_json(cluster.sdc(0).mgmt_port, "/health").await.unwrap();
    assert_eq!(health.component, "sdc");
    assert!(health.registered && health.node_id.is_some());
    let v = &volumes_json(&cluster).await[0];
    assert_eq!(v["nbd_uri"], cluster.nbd_uri("vol1"));
    assert!(v["placement_groups"].as_u64().unwrap() > 0);
    let metrics = cluster.get_text(cluster.sdc(0).mgmt_port, "/metrics").await.unwrap();
    assert!(metrics.contains("pflex_sdc_nbd_requests_total{op=\"write\"} 1"), "{metrics}");
    // The periodic writer fills both SQLite files within a few seconds.
    let local = cluster.path("sdc1/sdc_local.db");
    let chunks = cluster.path("sdc1/sdc_chunks.db");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let tokens = rusqlite::Connection::open(&local)
            .and_then(|db| {
                db.query_row("SELECT COUNT(*) FROM active_tokens", [], |r| r.get::<_, i64>(0))
            })
            .unwrap_or(0);
        let writes = rusqlite::Connection::open(&chunks)
            .and_then(|db| {
                db.query_row("SELECT ops FROM io_stats WHERE op = 'write'", [], |r| {
                    r.get::<_, i64>(0)
                })
            })
            .unwrap_or(0);
        if tokens == 1 && writes == 1 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "state files not written (tokens {tokens}, writes {writes})"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn a_volume_mapped_to_two_sdcs_reads_back_each_others_writes() {
    let mut cluster = common::start(&[rw("shared", 64 * MIB)]).await;
    let other = cluster.add_sdc("sdc2", NodeOverrides::default()).await;
    cluster.map_volume("shared", "sdc2", AccessMode::ReadWrite).await;
    cluster.wait_served(other, &["shared"]).await;
    let other_port = cluster.sdc(other).data_port;
    let mut a = NbdClient::open(cluster.sdc(0).data_port, "shared");
    let mut b = NbdClient::open(other_port, "shared");
    // Interleaved writes through both SDCs, each read back through the
    // other: any cached data on either side would show up as stale.
    for round in 0..20u64 {
        let offset = round * 300_001 % (60 * MIB);
        let first = pseudo_random(round * 2 + 1, 70_000);
        a.request(cmd::WRITE, offset, first.len() as u32, &first).unwrap();
        assert!(
            b.request(cmd::READ, offset, first.len() as u32, &[]).unwrap() == first,
            "round {round}: sdc2 read stale data"
        );
        let second = pseudo_random(round * 2 + 2, 70_000);
        b.request(cmd::WRITE, offset, second.len() as u32, &second).unwrap();
        assert!(
            a.request(cmd::READ, offset, second.len() as u32, &[]).unwrap() == second,
            "round {round}: sdc1 read stale data"
        );
    }
    a.request(cmd::FLUSH, 0, 0, &[]).unwrap();
    assert!(cluster.check_replicas("shared", 0..64).await > 0);
}
