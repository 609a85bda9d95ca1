//! Rebalance, drain and the movement API over real HTTP against the spawned
//! `mdm` binary; the test plays the SDS nodes (heartbeats, progress and
//! completion of the moves it is handed).

mod common;

use std::time::Duration;

use common::{raw, start_mdm_with, Timing};
use pflex_mdm_client::MdmClient;
use pflex_proto::api::{
    CopyKind, HeartbeatRequest, MovementPolicy, MovementPriority, NodeMetrics, RebuildComplete,
    RebuildProgress, VolumeCreate,
};
use pflex_testkit::wait_for;

/// Heartbeats `nodes` every 300 ms until dropped (so none goes STALE).
fn keep_alive(nodes: Vec<(u64, MdmClient)>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            for (id, client) in &nodes {
                let beat = HeartbeatRequest {
                    node_id: *id,
                    metrics: NodeMetrics::default(),
                    volumes_since: None,
                };
                let _ = client.heartbeat(&beat).await;
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    })
}

#[tokio::test]
async fn an_added_sds_receives_moves_that_keep_two_copies_until_swapped() {
    let mdm = start_mdm_with(Timing { heartbeat: 1, stale: 3, failed: 4 }).await;
    let admin = mdm.admin();
    let mut nodes = Vec::new();
    for n in 0..3 {
        nodes.push(mdm.register_sds(&format!("sds{n}"), &format!("fs{n}"), "default", 10).await);
    }
    let create =
        VolumeCreate { name: "vol1".into(), size_bytes: 4 << 30, pool: None, thick: false };
    let volume = admin.volume_create(&create).await.unwrap();
    nodes.push(mdm.register_sds("sds3", "fs3", "default", 10).await);
    let newcomer = nodes[3].id();
    let alive = keep_alive(nodes.iter().map(|n| (n.id(), n.client.clone())).collect());

    // The monitor starts moves onto the new node, a few at a time.
    wait_for("moves onto sds3", Duration::from_secs(30), || async {
        admin.movement_status().await.is_ok_and(|s| s.move_jobs > 0)
    })
    .await;
    let status = admin.movement_status().await.unwrap();
    assert!(status.move_jobs <= 4, "{status:?}");
    let map = admin.placement(volume.id).await.unwrap();
    let joining: Vec<usize> =
        (0..map.pgs.len()).filter(|&i| map.pgs[i].joining == newcomer).collect();
    assert_eq!(joining.len() as u64, status.move_jobs, "one joining copy per move");
    for &i in &joining {
        let pg = map.pgs[i];
        assert!(pg.primary != 0 && pg.secondary != 0, "both copies stay while {pg:?} moves");
    }
    assert!(map.nodes.iter().any(|n| n.id == newcomer), "the map addresses the joining node");

    // The source learns its move from its heartbeat reply.
    let pg_index = joining[0];
    let source = map.pgs[pg_index].primary;
    let source_client = &nodes.iter().find(|n| n.id() == source).unwrap().client;
    let beat =
        HeartbeatRequest { node_id: source, metrics: NodeMetrics::default(), volumes_since: None };
    let reply = source_client.heartbeat(&beat).await.unwrap();
    let job = *reply
        .rebuilds
        .iter()
        .find(|j| j.pg_index == pg_index as u64 && j.kind == CopyKind::Move)
        .expect("the move is handed to the PG's primary");
    assert_eq!(job.target_sds, newcomer);
    let pg = map.pgs[pg_index];
    assert!(job.replaces == pg.primary || job.replaces == pg.secondary);

    // Progress: only from the source, never more copied than there is.
    let progress = RebuildProgress {
        job_id: job.job_id,
        chunks_total: 10,
        chunks_copied: 4,
        bytes_copied: 4 << 20,
    };
    let other = nodes.iter().find(|n| n.id() != source && n.id() != newcomer).unwrap();
    let refused = other.client.rebuild_progress(&progress).await.unwrap_err();
    assert_eq!(refused.status(), Some(403), "{refused}");
    let bad = RebuildProgress { chunks_copied: 11, ..progress };
    assert_eq!(source_client.rebuild_progress(&bad).await.unwrap_err().status(), Some(400));
    let recorded = source_client.rebuild_progress(&progress).await.unwrap();
    assert_eq!((recorded.chunks_copied, recorded.chunks_total), (4, 10));
    let status = admin.movement_status().await.unwrap();
    assert!(status.chunks_total >= 10 && status.rate_bytes_per_sec > 0, "{status:?}");

    // Completion swaps the joining copy in for the one that leaves.
    let done = RebuildComplete { job_id: job.job_id, chunks_copied: 10, chunks_released: 0 };
    source_client.rebuild_complete(&done).await.unwrap();
    let after = admin.placement(volume.id).await.unwrap();
    let moved = after.pgs[pg_index];
    assert!(after.epoch > map.epoch);
    assert_eq!(moved.joining, 0);
    assert_eq!(moved.secondary, newcomer, "{pg:?} -> {moved:?}");
    let stays = if job.replaces == pg.primary { pg.secondary } else { pg.primary };
    assert_eq!(moved.primary, stays, "{pg:?} -> {moved:?}");
    // A finished job takes no more progress.
    assert_eq!(source_client.rebuild_progress(&progress).await.unwrap_err().status(), Some(409));
    alive.abort();
}

#[tokio::test]
async fn movement_policy_and_removal_refuse_bad_requests() {
    let mdm = start_mdm_with(Timing::default()).await;
    let admin = mdm.admin();
    let a = mdm.register_sds("sds-a", "fs-a", "default", 10).await;
    mdm.register_sds("sds-b", "fs-b", "default", 10).await;

    assert_eq!(admin.movement_policy().await.unwrap(), MovementPolicy::default());
    for bad in [
        MovementPolicy { chunks_in_flight: 0, ..MovementPolicy::default() },
        MovementPolicy { chunks_in_flight: 65, ..MovementPolicy::default() },
        MovementPolicy { mb_per_sec: 100_001, ..MovementPolicy::default() },
    ] {
        let e = admin.set_movement_policy(&bad).await.unwrap_err();
        assert_eq!(e.status(), Some(400), "{bad:?}: {e}");
    }
    let url = format!("{}/rebuild/policy", mdm.mdm_url());
    let (status, _) = raw(
        "PUT",
        &url,
        Some(mdm.admin_token()),
        Some("application/json"),
        Some(r#"{"mb_per_sec": 1, "chunks_in_flight": 2, "priority": "fastest"}"#),
    )
    .await;
    assert_eq!(status, 400, "an unknown priority is refused");
    let (status, _) = raw(
        "PUT",
        &url,
        Some(&a.reply.credential),
        Some("application/json"),
        Some(r#"{"mb_per_sec": 1, "chunks_in_flight": 2, "priority": "client"}"#),
    )
    .await;
    assert_eq!(status, 403, "only the admin sets the policy");
    let wanted = MovementPolicy {
        mb_per_sec: 40,
        chunks_in_flight: 8,
        priority: MovementPriority::Movement,
    };
    assert_eq!(admin.set_movement_policy(&wanted).await.unwrap(), wanted);
    // Every SDS gets it with its heartbeat reply.
    let beat =
        HeartbeatRequest { node_id: a.id(), metrics: NodeMetrics::default(), volumes_since: None };
    assert_eq!(a.client.heartbeat(&beat).await.unwrap().movement, wanted);

    // Removal: unknown names, and pools that would keep one fault set.
    assert_eq!(admin.remove_sds("nope").await.unwrap_err().status(), Some(404));
    let e = admin.remove_sds("sds-a").await.unwrap_err();
    assert_eq!((e.status(), e.code()), (Some(409), Some("too_few_fault_sets")), "{e}");
    mdm.register_sds("sds-c", "fs-c", "default", 10).await;
    let draining = admin.remove_sds("sds-a").await.unwrap();
    assert!(draining.draining);
    let listed = admin.sds_list().await.unwrap();
    assert!(listed.iter().find(|s| s.name == "sds-a").unwrap().draining);
    // A draining node receives no new copies.
    let create =
        VolumeCreate { name: "vol1".into(), size_bytes: 1 << 30, pool: None, thick: false };
    let volume = admin.volume_create(&create).await.unwrap();
    let map = admin.placement(volume.id).await.unwrap();
    assert!(map.pgs.iter().all(|pg| pg.primary != a.id() && pg.secondary != a.id()));
    assert_eq!(admin.movement_status().await.unwrap().draining, vec!["sds-a".to_string()]);
}
