//! Many clients at once: every request is answered correctly (no 5xx, no
//! lost update), and the latency of the hot control-plane calls is printed.

mod common;

use std::time::Instant;

use common::start_mdm;
use pflex_proto::api::{HeartbeatRequest, NodeMetrics, VolumeCreate, VolumeMap};
use pflex_proto::token::AccessMode;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn parallel_requests_are_serialised_correctly() {
    let mdm = start_mdm().await;
    let admin = mdm.admin();
    let mut sds = Vec::new();
    for n in 0..3 {
        sds.push(mdm.register_sds(&format!("sds{n}"), &format!("fs{n}"), "default", 100).await);
    }
    let sdc = mdm.register_sdc("sdc1").await;

    // 40 creates in parallel, 10 of them duplicates of others' names.
    let started = Instant::now();
    let creates: Vec<_> = (0..40)
        .map(|i| {
            let admin = admin.clone();
            tokio::spawn(async move {
                let name = format!("vol{}", i % 30);
                admin
                    .volume_create(&VolumeCreate {
                        name,
                        size_bytes: 1 << 30,
                        pool: None,
                        thick: false,
                    })
                    .await
            })
        })
        .collect();
    let mut created = 0;
    for task in creates {
        match task.await.unwrap() {
            Ok(_) => created += 1,
            Err(e) => assert_eq!(e.status(), Some(409), "{e}"),
        }
    }
    let create_ms = started.elapsed().as_secs_f64() * 1000.0 / 40.0;
    assert_eq!(created, 30);
    assert_eq!(admin.volume_list().await.unwrap().len(), 30);

    // Concurrent map changes each bump the generation exactly once.
    let maps: Vec<_> = (0..30)
        .map(|i| {
            let admin = admin.clone();
            tokio::spawn(async move {
                admin
                    .volume_map(&VolumeMap {
                        volume: format!("vol{i}"),
                        sdc: "sdc1".into(),
                        access_mode: AccessMode::ReadWrite,
                    })
                    .await
            })
        })
        .collect();
    for task in maps {
        assert_eq!(task.await.unwrap().unwrap().mapping_gen, 2);
    }
    let volumes = sdc.client.sdc_mappings().await.unwrap();
    assert_eq!(volumes.len(), 30);

    // Token requests and heartbeats from many tasks at once.
    let started = Instant::now();
    let tokens: Vec<_> = volumes
        .iter()
        .flat_map(|v| std::iter::repeat_n(v.volume_id, 10))
        .map(|volume_id| {
            let client = sdc.client.clone();
            tokio::spawn(
                async move { client.request_token(volume_id, AccessMode::ReadWrite).await },
            )
        })
        .collect();
    let beats: Vec<_> = sds
        .iter()
        .flat_map(|n| std::iter::repeat_n((n.client.clone(), n.id()), 20))
        .map(|(client, node_id)| {
            tokio::spawn(async move {
                client
                    .heartbeat(&HeartbeatRequest {
                        node_id,
                        metrics: NodeMetrics::default(),
                        volumes_since: None,
                    })
                    .await
            })
        })
        .collect();
    let token_count = tokens.len();
    let mut ids = std::collections::HashSet::new();
    for task in tokens {
        let reply = task.await.unwrap().unwrap();
        assert!(ids.insert(reply.token_id), "token ids are unique");
    }
    let token_ms = started.elapsed().as_secs_f64() * 1000.0 / token_count as f64;
    for task in beats {
        assert_eq!(task.await.unwrap().unwrap().volumes.len(), 30);
    }
    let metrics = admin.metrics_text().await.unwrap();
    assert!(metrics.contains("pflex_mdm_http_responses_total{class=\"5xx\"} 0"), "{metrics}");
    assert!(metrics.contains(&format!("pflex_mdm_tokens_issued_total {token_count}")));

    // Sequential latency of the calls an SDC makes.
    let volume_id = volumes[0].volume_id;
    let rounds = 100;
    let started = Instant::now();
    for _ in 0..rounds {
        sdc.client.request_token(volume_id, AccessMode::ReadWrite).await.unwrap();
    }
    let token_seq_ms = started.elapsed().as_secs_f64() * 1000.0 / rounds as f64;
    let started = Instant::now();
    for _ in 0..rounds {
        sdc.client.placement(volume_id).await.unwrap();
    }
    let placement_ms = started.elapsed().as_secs_f64() * 1000.0 / rounds as f64;
    println!(
        "volume create {create_ms:.2} ms/op (40 parallel); token {token_ms:.2} ms/op ({token_count} parallel), \
         {token_seq_ms:.2} ms sequential; placement map {placement_ms:.2} ms sequential"
    );
}
