//! Placement over real HTTP: fault-set separation on many random
//! topologies, balance, capacity and clear errors.

mod common;

use std::collections::HashMap;

use common::{dump, start_mdm, Rng};
use pflex_proto::api::VolumeCreate;
use pflex_proto::placement::{PlacementMap, PGS_PER_VOLUME};

fn create(name: &str, size_bytes: u64, pool: &str, thick: bool) -> VolumeCreate {
    VolumeCreate { name: name.into(), size_bytes, pool: Some(pool.into()), thick }
}

/// Checks a map against the registered topology: both copies of every PG
/// on different, known SDS nodes of different fault sets.
fn check_separation(map: &PlacementMap, fault_set_of: &HashMap<u64, String>) {
    assert_eq!(map.pgs.len(), PGS_PER_VOLUME);
    for (index, pg) in map.pgs.iter().enumerate() {
        let primary = &fault_set_of[&pg.primary];
        let secondary = &fault_set_of[&pg.secondary];
        assert_ne!(
            primary, secondary,
            "volume {} PG {index}: both copies in fault set {primary}",
            map.volume_name
        );
        for id in [pg.primary, pg.secondary] {
            let node = map.node(id).expect("every PG node has an endpoint");
            assert_eq!(&node.fault_set, &fault_set_of[&id]);
            assert_eq!(node.host, "127.0.0.1");
        }
    }
}

#[tokio::test]
async fn copies_never_share_a_fault_set_over_random_topologies() {
    let mdm = start_mdm().await;
    let admin = mdm.admin();
    let mut rng = Rng::new(2026);
    let mut fault_set_of: HashMap<u64, String> = HashMap::new();
    let mut volumes_checked = 0;
    // Each topology lives in its own pool of one MDM.
    for topology in 0..40 {
        let pool = format!("pool{topology}");
        let fault_sets = 2 + rng.below(5);
        let nodes = 2 + rng.below(10);
        let mut used_sets = std::collections::BTreeSet::new();
        for n in 0..nodes {
            // Make sure at least two fault sets are used.
            let fs = if n < 2 { n } else { rng.below(fault_sets) };
            used_sets.insert(fs);
            let fault_set = format!("t{topology}-fs{fs}");
            let capacity = 1 + rng.below(64);
            let node =
                mdm.register_sds(&format!("t{topology}-sds{n}"), &fault_set, &pool, capacity).await;
            fault_set_of.insert(node.id(), fault_set);
        }
        for v in 0..(1 + rng.below(4)) {
            let size = (1 + rng.below(8 << 10)) << 20;
            let volume = admin
                .volume_create(&create(&format!("t{topology}-v{v}"), size, &pool, false))
                .await
                .unwrap();
            assert_eq!(volume.pool, pool);
            let map = admin.placement(&volume.name).await.unwrap();
            assert_eq!(map.size_bytes, size);
            check_separation(&map, &fault_set_of);
            // Only nodes of this pool are used.
            assert!(map.nodes.iter().all(|n| n.name.starts_with(&format!("t{topology}-"))));
            volumes_checked += 1;
        }
    }
    assert!(volumes_checked >= 40);
}

#[tokio::test]
async fn one_fault_set_is_a_clear_error() {
    let mdm = start_mdm().await;
    mdm.register_sds("a1", "rack-a", "small", 10).await;
    mdm.register_sds("a2", "rack-a", "small", 10).await;
    let before = dump(&mdm);
    let err = mdm.admin().volume_create(&create("v", 1 << 30, "small", false)).await.unwrap_err();
    assert_eq!(err.status(), Some(409), "{err}");
    assert_eq!(err.code(), Some("insufficient_fault_sets"));
    assert!(err.to_string().contains("1 fault set"), "{err}");
    assert_eq!(dump(&mdm), before);
    // The default pool without any SDS, and an unknown pool.
    let err = mdm.admin().volume_create(&create("v", 1 << 30, "default", false)).await.unwrap_err();
    assert_eq!(err.status(), Some(409));
    let err =
        mdm.admin().volume_create(&create("v", 1 << 30, "nosuchpool", false)).await.unwrap_err();
    assert_eq!(err.status(), Some(404));
    // Adding a node in a second fault set makes it work.
    mdm.register_sds("b1", "rack-b", "small", 10).await;
    mdm.admin().volume_create(&create("v", 1 << 30, "small", false)).await.unwrap();
}

#[tokio::test]
async fn placement_is_balanced_and_weighted() {
    let mdm = start_mdm().await;
    let admin = mdm.admin();
    let mut ids = Vec::new();
    for n in 0..4 {
        ids.push(mdm.register_sds(&format!("sds{n}"), &format!("fs{n}"), "even", 100).await.id());
    }
    let mut total: HashMap<u64, usize> = HashMap::new();
    let mut primary: HashMap<u64, usize> = HashMap::new();
    for v in 0..5 {
        let volume =
            admin.volume_create(&create(&format!("v{v}"), 10 << 30, "even", false)).await.unwrap();
        let map = admin.placement(volume.id).await.unwrap();
        for pg in &map.pgs {
            *total.entry(pg.primary).or_default() += 1;
            *total.entry(pg.secondary).or_default() += 1;
            *primary.entry(pg.primary).or_default() += 1;
        }
    }
    // 5 volumes × 64 PGs × 2 copies over 4 equal nodes: 160 each.
    for id in &ids {
        assert!((158..=162).contains(&total[id]), "copies {total:?}");
        assert!((78..=82).contains(&primary[id]), "primaries {primary:?}");
    }
    // One node with three times the free space of each other takes the most.
    let big = mdm.register_sds("big", "fsbig", "weighted", 300).await.id();
    for n in 0..3 {
        mdm.register_sds(&format!("w{n}"), &format!("wfs{n}"), "weighted", 100).await;
    }
    let volume = admin.volume_create(&create("w", 64 << 30, "weighted", false)).await.unwrap();
    let map = admin.placement(volume.id).await.unwrap();
    let on_big = map.pgs.iter().filter(|pg| pg.primary == big || pg.secondary == big).count();
    assert!(on_big >= 55, "the large node holds only {on_big} of 64 PGs");
}

#[tokio::test]
async fn thick_volumes_reserve_capacity_and_fail_cleanly() {
    let mdm = start_mdm().await;
    let admin = mdm.admin();
    for n in 0..3 {
        mdm.register_sds(&format!("sds{n}"), &format!("fs{n}"), "default", 4).await;
    }
    // 12 GiB raw holds 6 GiB of two-copy data.
    let thick = admin.volume_create(&create("thick1", 4 << 30, "default", true)).await.unwrap();
    assert!(thick.thick);
    let summary = admin.cluster_summary().await.unwrap();
    assert_eq!(summary.reserved_bytes, 8 << 30);
    assert_eq!(summary.provisioned_bytes, 4 << 30);
    let before = dump(&mdm);
    let err = admin.volume_create(&create("thick2", 4 << 30, "default", true)).await.unwrap_err();
    assert_eq!(err.status(), Some(507), "{err}");
    assert_eq!(err.code(), Some("insufficient_capacity"));
    let err = admin.volume_resize("thick1", 8 << 30).await.unwrap_err();
    assert_eq!(err.status(), Some(507), "{err}");
    assert_eq!(dump(&mdm), before);
    // Thin volumes reserve nothing and may overcommit.
    admin.volume_create(&create("thin", 100 << 30, "default", false)).await.unwrap();
    assert_eq!(admin.cluster_summary().await.unwrap().reserved_bytes, 8 << 30);
}
