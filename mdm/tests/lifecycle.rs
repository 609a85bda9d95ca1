//! Volume lifecycle, generations, IO tokens, health and restart, over real
//! HTTP against the spawned `mdm` binary.

mod common;

use std::time::Duration;

use common::{dump, start_mdm, start_mdm_with, Timing};
use pflex_proto::api::{
    HeartbeatRequest, NodeMetrics, TokenAck, TokenAckBatch, VolumeCreate, VolumeMap, VolumeUnmap,
};
use pflex_proto::token::{AccessMode, SessionKey, SignedToken, TokenError};
use pflex_testkit::cluster::Component;
use pflex_testkit::wait_for;

fn create(name: &str, size_bytes: u64) -> VolumeCreate {
    VolumeCreate { name: name.into(), size_bytes, pool: None, thick: false }
}

fn map(volume: &str, sdc: &str, access_mode: AccessMode) -> VolumeMap {
    VolumeMap { volume: volume.into(), sdc: sdc.into(), access_mode }
}

fn unmap(volume: &str, sdc: &str) -> VolumeUnmap {
    VolumeUnmap { volume: volume.into(), sdc: sdc.into() }
}

#[tokio::test]
async fn epoch_and_mapping_generation() {
    let mdm = start_mdm().await;
    let admin = mdm.admin();
    let mut storage = Vec::new();
    for n in 0..3 {
        storage.push(mdm.register_sds(&format!("sds{n}"), &format!("fs{n}"), "default", 10).await);
    }
    let sds = &storage[0];
    let sdc = mdm.register_sdc("sdc1").await;
    let volume = admin.volume_create(&create("vol1", 1 << 30)).await.unwrap();
    assert_eq!((volume.epoch, volume.mapping_gen), (1, 1));
    let map_before = admin.placement("vol1").await.unwrap();

    // Resize: epoch changes, PGs stay (growing never moves chunks).
    let grown = admin.volume_resize("vol1", 2 << 30).await.unwrap();
    assert_eq!(grown.size_bytes, 2 << 30);
    assert!(grown.epoch > volume.epoch);
    assert_eq!(grown.mapping_gen, volume.mapping_gen);
    let map_after = admin.placement(volume.id).await.unwrap();
    assert_eq!(map_after.epoch, grown.epoch);
    assert_eq!(map_after.pgs, map_before.pgs);
    // Same size: nothing changes; shrinking is refused.
    assert_eq!(admin.volume_resize("vol1", 2 << 30).await.unwrap().epoch, grown.epoch);
    let err = admin.volume_resize("vol1", 1 << 30).await.unwrap_err();
    assert_eq!((err.status(), err.code()), (Some(400), Some("shrink_not_supported")));

    // Map / unmap: mapping generation changes, epoch does not.
    let mapped = admin.volume_map(&map("vol1", "sdc1", AccessMode::ReadWrite)).await.unwrap();
    assert_eq!(mapped.mapping_gen, grown.mapping_gen + 1);
    assert_eq!(mapped.epoch, grown.epoch);
    assert_eq!(mapped.mappings.len(), 1);
    assert_eq!(mapped.mappings[0].sdc_name, "sdc1");
    // Mapping again the same way is a no-op.
    let again =
        admin.volume_map(&map("vol1", &sdc.id().to_string(), AccessMode::ReadWrite)).await.unwrap();
    assert_eq!(again.mapping_gen, mapped.mapping_gen);
    let mappings = sdc.client.sdc_mappings().await.unwrap();
    assert_eq!(mappings.len(), 1);
    assert_eq!(mappings[0].mapping_gen, mapped.mapping_gen);
    assert_eq!(mappings[0].size_bytes, 2 << 30);
    // The SDC may now read the map.
    assert_eq!(sdc.client.placement("vol1").await.unwrap().mapping_gen, mapped.mapping_gen);

    // Deleting a mapped volume is refused.
    let err = admin.volume_delete("vol1").await.unwrap_err();
    assert_eq!((err.status(), err.code()), (Some(409), Some("volume_mapped")));

    let unmapped = admin.volume_unmap(&unmap("vol1", "sdc1")).await.unwrap();
    assert_eq!(unmapped.mapping_gen, mapped.mapping_gen + 1);
    assert!(unmapped.mappings.is_empty());
    let err = admin.volume_unmap(&unmap("vol1", "sdc1")).await.unwrap_err();
    assert_eq!(err.status(), Some(404));
    assert!(sdc.client.sdc_mappings().await.unwrap().is_empty());

    // An SDS heartbeat carries every volume's generations, then only what
    // changed since its cursor; an SDC's only the volumes mapped to it.
    let beat = |node: &pflex_testkit::cluster::RegisteredNode, since: Option<u64>| {
        let client = node.client.clone();
        let request = HeartbeatRequest {
            node_id: node.id(),
            metrics: NodeMetrics::default(),
            volumes_since: since,
        };
        async move { client.heartbeat(&request).await.unwrap() }
    };
    let full = beat(sds, None).await;
    assert!(full.volumes_complete);
    assert_eq!(full.volumes.len(), 1);
    assert_eq!(
        (full.volumes[0].epoch, full.volumes[0].mapping_gen),
        (unmapped.epoch, unmapped.mapping_gen)
    );
    let quiet = beat(sds, Some(full.volumes_cursor)).await;
    assert!(
        !quiet.volumes_complete && quiet.volumes.is_empty() && quiet.deleted_volumes.is_empty()
    );
    assert_eq!(quiet.volumes_cursor, full.volumes_cursor);
    assert!(beat(&sdc, None).await.volumes.is_empty(), "vol1 is no longer mapped to sdc1");

    // Rename keeps id and generations; delete works once unmapped.
    let renamed = admin.volume_rename("vol1", "vol2").await.unwrap();
    assert_eq!(
        (renamed.id, renamed.epoch, renamed.mapping_gen),
        (volume.id, unmapped.epoch, unmapped.mapping_gen)
    );
    assert_eq!(admin.volume_show("vol1").await.unwrap_err().status(), Some(404));
    admin.volume_create(&create("other", 1 << 20)).await.unwrap();
    let err = admin.volume_rename("vol2", "other").await.unwrap_err();
    assert_eq!((err.status(), err.code()), (Some(409), Some("volume_exists")));
    let deleted = admin.volume_delete(volume.id).await.unwrap();
    assert_eq!(deleted.name, "vol2");
    let changes = beat(sds, Some(full.volumes_cursor)).await;
    assert_eq!(changes.deleted_volumes, vec![volume.id]);
    // "other" is new and unchanged (nobody mapped it): nothing to learn.
    assert!(changes.volumes.is_empty(), "a new volume listed: {:?}", changes.volumes);
    admin.volume_map(&map("other", "sdc1", AccessMode::ReadWrite)).await.unwrap();
    let changes = beat(sds, Some(changes.volumes_cursor)).await;
    let other = admin.volume_show("other").await.unwrap();
    assert_eq!(
        changes.volumes.iter().map(|g| (g.volume_id, g.mapping_gen)).collect::<Vec<_>>(),
        [(other.id, other.mapping_gen)],
        "once mapped, it is listed"
    );
    admin.volume_unmap(&unmap("other", "sdc1")).await.unwrap();
    assert_eq!(admin.volume_list().await.unwrap().len(), 1);
    assert_eq!(admin.placement(volume.id).await.unwrap_err().status(), Some(404));
    // Ids are never reused.
    let next = admin.volume_create(&create("vol3", 1 << 20)).await.unwrap();
    assert!(next.id > volume.id + 1);
}

#[tokio::test]
async fn tokens_verify_with_the_cluster_secret_and_follow_mappings() {
    let mdm = start_mdm().await;
    let admin = mdm.admin();
    let sds = mdm.register_sds("sds1", "fs1", "default", 10).await;
    mdm.register_sds("sds2", "fs2", "default", 10).await;
    let sdc = mdm.register_sdc("sdc1").await;
    let stranger = mdm.register_sdc("sdc2").await;
    let volume = admin.volume_create(&create("vol1", 1 << 30)).await.unwrap();
    admin.volume_map(&map("vol1", "sdc1", AccessMode::ReadWrite)).await.unwrap();

    let reply = sdc.client.request_token(volume.id, AccessMode::ReadWrite).await.unwrap();
    let secret = mdm.cluster_secret();
    let public = secret.token_signer().public_key();
    let signed = SignedToken::from_hex(&reply.token).unwrap();
    public.verify(&signed).expect("token verifies with the MDM's public key");
    let sds_keys = sds.reply.sds_keys.as_ref().expect("an SDS gets its keys");
    assert_eq!(sds_keys.token_public_keys, vec![public.to_hex()]);
    assert_eq!(signed.token.volume_id, volume.id);
    assert_eq!(signed.token.sdc_id, sdc.id());
    assert_eq!(signed.token.mode, AccessMode::ReadWrite);
    assert_eq!(signed.token.token_id, reply.token_id);
    assert_eq!(signed.token.expires_at, reply.expires_at);
    let now = pflex_proto::unix_now();
    // The default lifetime: an hour, so IO outlives an MDM outage (renewed at a third).
    assert!(reply.expires_at > now + 3590 && reply.expires_at <= now + 3601);
    // One session key per SDS, each the one that SDS derives from its own node key.
    assert_eq!(reply.session_keys.len(), 2);
    let at_sds1 = reply.session_keys.iter().find(|k| k.sds_id == sds.id()).unwrap();
    let node_key = pflex_proto::token::NodeKey::from_hex(&sds_keys.node_key).unwrap();
    assert_eq!(SessionKey::from_hex(&at_sds1.key).unwrap(), node_key.session_key(&signed));
    assert!(reply.session_keys.iter().all(|k| k.sds_id == sds.id() || k.key != at_sds1.key));
    let current_gen = admin.volume_show("vol1").await.unwrap().mapping_gen;
    assert_eq!(reply.mapping_gen, current_gen);
    signed.token.check_scope(now, volume.id, true, current_gen).unwrap();

    // An SDC not mapped to the volume is refused, and so is an unknown volume.
    let err = stranger.client.request_token(volume.id, AccessMode::ReadOnly).await.unwrap_err();
    assert_eq!((err.status(), err.code()), (Some(403), Some("not_mapped")));
    let err = sdc.client.request_token(volume.id + 100, AccessMode::ReadOnly).await.unwrap_err();
    assert_eq!(err.status(), Some(404));

    // Completion records are accepted in batches (from SDS and SDC).
    let ack = |token_id, op: &str| TokenAck {
        token_id,
        volume_id: volume.id,
        op: op.into(),
        ops: 3,
        bytes: 12288,
        errors: 0,
    };
    let recorded = sds
        .client
        .ack_tokens(&TokenAckBatch {
            records: vec![
                ack(reply.token_id, "write"),
                ack(reply.token_id, "read"),
                ack(12345, "read"),
            ],
        })
        .await
        .unwrap();
    assert_eq!(recorded.recorded, 2, "the unknown token is not counted");
    sdc.client
        .ack_tokens(&TokenAckBatch { records: vec![ack(reply.token_id, "flush")] })
        .await
        .unwrap();
    let err = stranger
        .client
        .ack_tokens(&TokenAckBatch { records: vec![ack(reply.token_id, "read")] })
        .await
        .unwrap_err();
    assert_eq!(err.status(), Some(403), "an SDC acks only its own tokens");
    assert!(dump(&mdm).contains("\"write\"|3|12288|0"));

    // Read-only mapping: read tokens yes, write tokens no.
    admin.volume_map(&map("vol1", "sdc2", AccessMode::ReadOnly)).await.unwrap();
    let read = stranger.client.request_token(volume.id, AccessMode::ReadOnly).await.unwrap();
    let read_signed = SignedToken::from_hex(&read.token).unwrap();
    public.verify(&read_signed).unwrap();
    assert_eq!(
        read_signed.token.check_scope(now, volume.id, true, read.mapping_gen),
        Err(TokenError::ReadOnly)
    );
    let err = stranger.client.request_token(volume.id, AccessMode::ReadWrite).await.unwrap_err();
    assert_eq!((err.status(), err.code()), (Some(403), Some("read_only_mapping")));

    // Unmapping revokes: older tokens fail the generation check; no new ones.
    let after = admin.volume_unmap(&unmap("vol1", "sdc1")).await.unwrap();
    assert_eq!(
        signed.token.check_scope(now, volume.id, false, after.mapping_gen),
        Err(TokenError::Revoked)
    );
    let err = sdc.client.request_token(volume.id, AccessMode::ReadOnly).await.unwrap_err();
    assert_eq!(err.status(), Some(403));
    assert_eq!(sdc.client.placement(volume.id).await.unwrap_err().status(), Some(403));
}

#[tokio::test]
async fn restart_keeps_all_state() {
    let mut mdm = start_mdm().await;
    let admin = mdm.admin();
    let sds = mdm.register_sds("sds1", "fs1", "default", 10).await;
    mdm.register_sds("sds2", "fs2", "default", 10).await;
    let sdc = mdm.register_sdc("sdc1").await;
    admin.volume_create(&create("vol1", 1 << 30)).await.unwrap();
    admin
        .volume_create(&VolumeCreate {
            name: "thick".into(),
            size_bytes: 1 << 30,
            pool: None,
            thick: true,
        })
        .await
        .unwrap();
    admin.volume_map(&map("vol1", "sdc1", AccessMode::ReadOnly)).await.unwrap();
    admin.volume_resize("vol1", 3 << 30).await.unwrap();
    let volumes = admin.volume_list().await.unwrap();
    let placement = admin.placement("vol1").await.unwrap();
    let secret = mdm.cluster_secret().to_hex();
    let token = mdm.admin_token().to_string();
    let rows = dump(&mdm);

    mdm.restart(Component::Mdm).await;

    assert_eq!(mdm.admin_token(), token, "admin token kept");
    assert_eq!(mdm.cluster_secret().to_hex(), secret, "cluster secret kept");
    let admin = mdm.admin();
    assert_eq!(admin.volume_list().await.unwrap(), volumes);
    assert_eq!(admin.placement("vol1").await.unwrap(), placement);
    assert_eq!(dump(&mdm), rows);
    // Component credentials survive too.
    assert_eq!(sdc.client.sdc_mappings().await.unwrap().len(), 1);
    sds.client
        .heartbeat(&HeartbeatRequest {
            node_id: sds.id(),
            metrics: NodeMetrics::default(),
            volumes_since: None,
        })
        .await
        .unwrap();
    let again = mdm.register_sds_again(&sds, "sds1", "fs1", 10).await;
    assert_eq!(again.id(), sds.id());
}

#[tokio::test]
async fn health_states_and_replacement_of_a_failed_sds() {
    let mdm = start_mdm_with(Timing { heartbeat: 1, stale: 2, failed: 4 }).await;
    let admin = mdm.admin();
    let mut nodes = Vec::new();
    for n in 0..4 {
        nodes.push(mdm.register_sds(&format!("sds{n}"), &format!("fs{n}"), "default", 10).await);
    }
    let sdc = mdm.register_sdc("sdc1").await;
    let volume = admin.volume_create(&create("vol1", 1 << 30)).await.unwrap();
    admin.volume_map(&map("vol1", "sdc1", AccessMode::ReadWrite)).await.unwrap();
    let before = admin.placement(volume.id).await.unwrap();
    let victim = nodes[0].id();
    assert!(before.pgs.iter().any(|pg| pg.primary == victim || pg.secondary == victim));
    let status = admin.health_status().await.unwrap();
    assert_eq!(status.overall, "HEALTHY");
    assert!(status.components.iter().all(|c| c.status == "ACTIVE"));

    // Everyone but sds0 keeps heartbeating.
    let beating = std::sync::Arc::new(std::sync::Mutex::new(
        nodes[1..]
            .iter()
            .map(|n| (n.client.clone(), n.id()))
            .chain([(sdc.client.clone(), sdc.id())])
            .collect::<Vec<_>>(),
    ));
    let heartbeats = heartbeat_while(beating);
    let status_of = |status: &pflex_proto::api::HealthStatus, id: u64| {
        status.components.iter().find(|c| c.node_id == id).unwrap().status.clone()
    };
    wait_for("sds0 STALE", Duration::from_secs(10), || async {
        let s = admin.health_status().await.unwrap();
        status_of(&s, victim) == "STALE" && s.overall == "DEGRADED"
    })
    .await;
    assert!(admin.cluster_summary().await.unwrap().degraded_chunks > 0);
    // Once FAILED, its copies move to live nodes outside each survivor's
    // fault set, and the epoch changes; the mapping generation does not.
    wait_for("re-placement", Duration::from_secs(15), || async {
        let map = admin.placement(volume.id).await.unwrap();
        map.epoch > before.epoch
            && map.pgs.iter().all(|pg| pg.primary != victim && pg.secondary != victim)
    })
    .await;
    let after = admin.placement(volume.id).await.unwrap();
    assert_eq!(after.mapping_gen, before.mapping_gen);
    for (old, new) in before.pgs.iter().zip(&after.pgs) {
        let fs = |id: u64| after.node(id).unwrap().fault_set.clone();
        assert_ne!(fs(new.primary), fs(new.secondary));
        if old.primary == victim || old.secondary == victim {
            let survivor = if old.primary == victim { old.secondary } else { old.primary };
            assert_eq!(new.primary, survivor, "the surviving copy becomes primary");
        } else {
            assert_eq!(old, new, "untouched PGs stay");
        }
    }
    let summary = admin.cluster_summary().await.unwrap();
    assert!(summary.rebuild_jobs_active > 0);
    let status = admin.health_status().await.unwrap();
    assert_eq!(status_of(&status, victim), "FAILED");
    assert_eq!(status.overall, "DEGRADED");
    let metrics = admin.metrics_text().await.unwrap();
    assert!(metrics.contains("pflex_mdm_copies_replaced_total"), "{metrics}");
    assert!(!metrics.contains("pflex_mdm_copies_replaced_total 0\n"));
    // New volumes avoid the failed node.
    let fresh = admin.volume_create(&create("vol2", 1 << 30)).await.unwrap();
    let fresh_map = admin.placement(fresh.id).await.unwrap();
    assert!(fresh_map.nodes.iter().all(|n| n.id != victim));
    heartbeats.abort();
}

#[tokio::test]
async fn a_silent_dashboard_does_not_degrade_the_cluster() {
    let mdm = start_mdm_with(Timing { heartbeat: 1, stale: 2, failed: 4 }).await;
    let a = mdm.register_sds("sds-a", "fs-a", "default", 10).await;
    let b = mdm.register_sds("sds-b", "fs-b", "default", 10).await;
    let mgmt = mdm.register_mgmt("mgmt").await;
    let beating = [(a.client.clone(), a.id()), (b.client.clone(), b.id())];
    let heartbeats = tokio::spawn(async move {
        loop {
            for (client, id) in &beating {
                let request = HeartbeatRequest {
                    node_id: *id,
                    metrics: NodeMetrics::default(),
                    volumes_since: None,
                };
                let _ = client.heartbeat(&request).await;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    let admin = mdm.admin();
    wait_for("the dashboard to go quiet", Duration::from_secs(10), || async {
        let status = admin.health_status().await.unwrap();
        let dashboard = status.components.iter().find(|c| c.node_id == mgmt.id()).unwrap();
        dashboard.status != "ACTIVE"
    })
    .await;
    assert_eq!(admin.health_status().await.unwrap().overall, "HEALTHY");
    heartbeats.abort();
}

/// Heartbeats for the nodes in `beating` every 300 ms; the set can change.
fn heartbeat_while(
    beating: std::sync::Arc<std::sync::Mutex<Vec<(pflex_mdm_client::MdmClient, u64)>>>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            let nodes = beating.lock().unwrap().clone();
            for (client, id) in &nodes {
                let _ = client
                    .heartbeat(&HeartbeatRequest {
                        node_id: *id,
                        metrics: NodeMetrics {
                            capacity_bytes: 10 << 30,
                            used_bytes: 1 << 20,
                            ..Default::default()
                        },
                        volumes_since: None,
                    })
                    .await;
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    })
}

#[tokio::test]
async fn rebuild_jobs_go_to_their_source_and_an_unrebuilt_copy_is_never_promoted() {
    let mdm = start_mdm_with(Timing { heartbeat: 1, stale: 2, failed: 4 }).await;
    let admin = mdm.admin();
    let mut nodes = Vec::new();
    for n in 0..4 {
        nodes.push(mdm.register_sds(&format!("sds{n}"), &format!("fs{n}"), "default", 10).await);
    }
    let volume = admin.volume_create(&create("vol1", 1 << 30)).await.unwrap();
    let victim = nodes[0].id();
    let beating = std::sync::Arc::new(std::sync::Mutex::new(
        nodes[1..].iter().map(|n| (n.client.clone(), n.id())).collect::<Vec<_>>(),
    ));
    let heartbeats = heartbeat_while(beating.clone());
    wait_for("re-placement", Duration::from_secs(20), || async {
        let map = admin.placement(volume.id).await.unwrap();
        map.pgs.iter().all(|pg| pg.primary != victim && pg.secondary != victim)
    })
    .await;
    let map = admin.placement(volume.id).await.unwrap();
    let jobs = admin.rebuild_jobs().await.unwrap();
    assert!(!jobs.is_empty());
    for job in &jobs {
        assert_eq!(job.failed_sds, victim);
        let pg = &map.pgs[job.pg_index as usize];
        assert_eq!((pg.primary, pg.secondary), (job.source_sds, job.target_sds));
    }

    // Each source hears of its own jobs, and only of those.
    let node = |id: u64| nodes.iter().find(|n| n.id() == id).unwrap();
    let heartbeat = |id: u64| {
        let client = node(id).client.clone();
        async move {
            client
                .heartbeat(&HeartbeatRequest {
                    node_id: id,
                    metrics: NodeMetrics::default(),
                    volumes_since: None,
                })
                .await
                .unwrap()
        }
    };
    let source = jobs[0].source_sds;
    let assigned = heartbeat(source).await.rebuilds;
    let mut expected: Vec<u64> =
        jobs.iter().filter(|j| j.source_sds == source).map(|j| j.job_id).collect();
    expected.sort();
    assert_eq!(assigned.iter().map(|a| a.job_id).collect::<Vec<_>>(), expected);
    for a in &assigned {
        assert_eq!(a.epoch, map.epoch);
        assert_eq!(map.pgs[a.pg_index as usize].secondary, a.target_sds);
    }
    assert!(assigned.len() >= 2, "the test needs two jobs with one source: {assigned:?}");

    // Only the source may complete a job, and only once.
    let (finished, unfinished) = (assigned[0], assigned[1]);
    let done = |job_id: u64| pflex_proto::api::RebuildComplete {
        job_id,
        chunks_copied: 3,
        chunks_released: 0,
    };
    let err = node(finished.target_sds).client.rebuild_complete(&done(finished.job_id)).await;
    assert_eq!(err.unwrap_err().status(), Some(403));
    assert_eq!(
        admin.rebuild_complete(&done(finished.job_id)).await.unwrap_err().status(),
        Some(403)
    );
    for a in &assigned[..] {
        if a.job_id != unfinished.job_id {
            node(source).client.rebuild_complete(&done(a.job_id)).await.unwrap();
        }
    }
    let again = node(source).client.rebuild_complete(&done(finished.job_id)).await;
    assert_eq!(again.unwrap_err().status(), Some(409));
    let job = admin.rebuild_jobs().await.unwrap();
    let job = job.iter().find(|j| j.job_id == finished.job_id).unwrap();
    assert_eq!((job.state.as_str(), job.chunks_copied), ("done", 3));

    // The source fails. A rebuilt copy takes over; the copy still being
    // rebuilt does not, and the data it holds counts as unavailable.
    beating.lock().unwrap().retain(|(_, id)| *id != source);
    wait_for("the source's PGs to move", Duration::from_secs(20), || async {
        let map = admin.placement(volume.id).await.unwrap();
        map.pgs[finished.pg_index as usize].primary == finished.target_sds
    })
    .await;
    let map = admin.placement(volume.id).await.unwrap();
    let stuck = &map.pgs[unfinished.pg_index as usize];
    assert_eq!((stuck.primary, stuck.secondary), (source, unfinished.target_sds));
    let status = admin.health_status().await.unwrap();
    assert_eq!(status.overall, "CRITICAL");

    // The source comes back, finishes its copy, and the data is whole again.
    beating.lock().unwrap().push((node(source).client.clone(), source));
    let reassigned = heartbeat(source).await.rebuilds;
    assert!(reassigned.iter().any(|a| a.job_id == unfinished.job_id), "{reassigned:?}");
    node(source).client.rebuild_complete(&done(unfinished.job_id)).await.unwrap();
    wait_for("no longer critical", Duration::from_secs(10), || async {
        admin.health_status().await.unwrap().overall != "CRITICAL"
    })
    .await;
    heartbeats.abort();
}

/// A heartbeat that changes nothing durable is kept in memory, not
/// written, and still counts: the node stays ACTIVE on it, while the
/// durable sighting is refreshed only every few seconds (with the beats
/// counted meanwhile).
#[tokio::test]
async fn heartbeats_count_in_memory_and_are_written_now_and_then() {
    // STALE after 8 s: durable sightings are refreshed at least every 4 s.
    let mdm = start_mdm_with(Timing { heartbeat: 1, stale: 8, failed: 40 }).await;
    let admin = mdm.admin();
    let sdc = mdm.register_sdc("sdc1").await;
    let durable = || -> (u64, u64) {
        let conn = rusqlite::Connection::open_with_flags(
            mdm.mdm_dir().join("powerflex.db"),
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
        )
        .unwrap();
        conn.query_row(
            "SELECT n.last_seen, h.heartbeats FROM cluster_nodes n
             JOIN component_health h ON h.node_id = n.id WHERE n.id = ?1",
            [sdc.id()],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap()
    };
    let (registered_at, _) = durable();
    // About seven seconds of beats, four a second.
    const BEATS: u64 = 28;
    let mut cursor = None;
    let mut durable_seen = std::collections::BTreeSet::from([registered_at]);
    for _ in 0..BEATS {
        let reply = sdc
            .client
            .heartbeat(&HeartbeatRequest {
                node_id: sdc.id(),
                metrics: NodeMetrics::default(),
                volumes_since: cursor,
            })
            .await
            .unwrap();
        cursor = Some(reply.volumes_cursor);
        durable_seen.insert(durable().0);
        let listed = admin.sdc_list().await.unwrap();
        assert_eq!(listed[0].status, "ACTIVE");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let (last_seen, written_beats) = durable();
    assert!(last_seen > registered_at, "the durable sighting was refreshed");
    // Refreshed every 2 to 4 s (by node id): at most four times in seven
    // seconds and a bit, where writing every beat changes it every second.
    assert!(
        durable_seen.len() <= 5,
        "the durable sighting changed {} times in {BEATS} beats: {durable_seen:?}",
        durable_seen.len() - 1
    );
    assert!(written_beats >= 2, "beats answered unwritten are counted when written");
    let listed = admin.sdc_list().await.unwrap();
    assert!(listed[0].last_seen >= last_seen, "the list shows the latest sighting");
}
