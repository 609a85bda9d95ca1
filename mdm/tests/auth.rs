//! Registration by join key, credentials, and roles, over real HTTP.

mod common;

use common::{dump, raw, start_mdm};
use pflex_proto::api::{NodeType, RegisterRequest};
use pflex_testkit::cluster::JOIN_KEY;

/// Every endpoint with a body that would be valid, to prove the refusal is
/// about the credential and nothing else.
const ENDPOINTS: &[(&str, &str, Option<&str>)] = &[
    ("POST", "/health/heartbeat", Some(r#"{"node_id":1}"#)),
    ("GET", "/health/status", None),
    ("POST", "/token/request", Some(r#"{"volume_id":1,"mode":"readWrite"}"#)),
    ("POST", "/token/ack", Some(r#"{"records":[]}"#)),
    ("POST", "/vol/create", Some(r#"{"name":"v","size_bytes":1048576}"#)),
    ("GET", "/vol/list", None),
    ("GET", "/vol/v1", None),
    ("POST", "/vol/v1/resize", Some(r#"{"size_bytes":2097152}"#)),
    ("POST", "/vol/v1/rename", Some(r#"{"new_name":"v9"}"#)),
    ("DELETE", "/vol/v1", None),
    ("GET", "/vol/v1/placement", None),
    ("POST", "/vol/map", Some(r#"{"volume":"v1","sdc":"sdc1"}"#)),
    ("POST", "/vol/unmap", Some(r#"{"volume":"v1","sdc":"sdc1"}"#)),
    ("GET", "/sdc/mappings", None),
    ("GET", "/sds/list", None),
    ("GET", "/sdc/list", None),
    ("GET", "/cluster/summary", None),
    ("GET", "/metrics", None),
];

fn sds_request(key: &str, name: &str) -> RegisterRequest {
    RegisterRequest {
        join_key: key.into(),
        enrollment_token: None,
        credential: None,
        node_type: NodeType::Sds,
        name: name.into(),
        host: "127.0.0.1".into(),
        control_port: 9101,
        mgmt_port: 9201,
        data_port: 9701,
        fault_set: None,
        pool: None,
        devices: vec![],
        data_cluster_id: None,
    }
}

#[tokio::test]
async fn bad_or_missing_join_key_is_401_and_writes_nothing() {
    let mdm = start_mdm().await;
    let before = dump(&mdm);
    let err = mdm.anonymous().register(&sds_request("wrong-key", "sds1")).await.unwrap_err();
    assert_eq!(err.status(), Some(401), "{err}");
    assert_eq!(err.code(), Some("unauthorized"));
    let err = mdm.anonymous().register(&sds_request("", "sds1")).await.unwrap_err();
    assert_eq!(err.status(), Some(401));
    let url = format!("{}/discovery/register", mdm.mdm_url());
    let (status, body) = raw(
        "POST",
        &url,
        None,
        Some("application/json"),
        Some(r#"{"node_type":"SDS","name":"sds1","host":"127.0.0.1","data_port":9701}"#),
    )
    .await;
    assert_eq!(status, 401, "{body}");
    // A correct key prefix is not the key.
    let (status, _) = raw(
        "POST",
        &url,
        None,
        Some("application/json"),
        Some(&format!(
            r#"{{"join_key":"{}","node_type":"SDC","name":"c","host":"h"}}"#,
            &JOIN_KEY[..10]
        )),
    )
    .await;
    assert_eq!(status, 401);
    assert_eq!(dump(&mdm), before, "a refused registration wrote to the database");
}

#[tokio::test]
async fn no_or_unknown_credential_is_401_on_every_endpoint() {
    let mdm = start_mdm().await;
    mdm.register_sds("sds1", "fs1", "default", 10).await;
    mdm.register_sds("sds2", "fs2", "default", 10).await;
    mdm.register_sdc("sdc1").await;
    mdm.admin()
        .volume_create(&pflex_proto::api::VolumeCreate {
            name: "v1".into(),
            size_bytes: 1 << 20,
            pool: None,
            thick: false,
        })
        .await
        .unwrap();
    let before = dump(&mdm);
    for (method, path, body) in ENDPOINTS {
        let url = format!("{}{path}", mdm.mdm_url());
        let content_type = body.map(|_| "application/json");
        let (status, reply) = raw(method, &url, None, content_type, *body).await;
        assert_eq!(status, 401, "{method} {path} without credential: {reply}");
        assert_eq!(reply["error"], "unauthorized", "{method} {path}: {reply}");
        for bad in ["not-a-credential", &"0".repeat(64)] {
            let (status, _) = raw(method, &url, Some(bad), content_type, *body).await;
            assert_eq!(status, 401, "{method} {path} with unknown credential");
        }
    }
    // Basic auth or a bare token is not a bearer credential.
    let url = format!("{}/vol/list", mdm.mdm_url());
    let client = reqwest::Client::new();
    for header in [format!("Basic {}", mdm.admin_token()), mdm.admin_token().to_string()] {
        let status =
            client.get(&url).header("authorization", header).send().await.unwrap().status();
        assert_eq!(status.as_u16(), 401);
    }
    assert_eq!(dump(&mdm), before);
    // The admin token works everywhere it should.
    assert_eq!(mdm.admin().volume_list().await.unwrap().len(), 1);
}

#[tokio::test]
async fn roles_are_enforced() {
    let mdm = start_mdm().await;
    let sds = mdm.register_sds("sds1", "fs1", "default", 10).await;
    mdm.register_sds("sds2", "fs2", "default", 10).await;
    let sdc = mdm.register_sdc("sdc1").await;
    let mgmt = mdm.register_mgmt("mgmt").await;
    let create = pflex_proto::api::VolumeCreate {
        name: "v1".into(),
        size_bytes: 1 << 30,
        pool: None,
        thick: false,
    };
    for node in [&sds, &sdc, &mgmt] {
        let err = node.client.volume_create(&create).await.unwrap_err();
        assert_eq!(err.status(), Some(403), "{err}");
        let err = node.client.volume_delete("v1").await.unwrap_err();
        assert_eq!(err.status(), Some(403), "{err}");
    }
    let volume = mdm.admin().volume_create(&create).await.unwrap();
    // MGMT reads everything, changes nothing.
    assert_eq!(mgmt.client.volume_list().await.unwrap().len(), 1);
    assert_eq!(mgmt.client.sds_list().await.unwrap().len(), 2);
    assert_eq!(mgmt.client.sdc_list().await.unwrap().len(), 1);
    mgmt.client.cluster_summary().await.unwrap();
    mgmt.client.health_status().await.unwrap();
    mgmt.client.volume_show("v1").await.unwrap();
    let err = mgmt.client.volume_resize("v1", 2 << 30).await.unwrap_err();
    assert_eq!(err.status(), Some(403));
    // SDS and SDC cannot list the cluster.
    for node in [&sds, &sdc] {
        assert_eq!(node.client.sds_list().await.unwrap_err().status(), Some(403));
        assert_eq!(node.client.volume_list().await.unwrap_err().status(), Some(403));
        node.client.health_status().await.unwrap();
        node.client.metrics_text().await.unwrap();
    }
    // Only SDCs ask for tokens and mappings.
    let err = sds
        .client
        .request_token(volume.id, pflex_proto::token::AccessMode::ReadOnly)
        .await
        .unwrap_err();
    assert_eq!(err.status(), Some(403));
    assert_eq!(mdm.admin().sdc_mappings().await.unwrap_err().status(), Some(403));
    // SDS reads any placement; an SDC only that of its mapped volumes.
    sds.client.placement(volume.id).await.unwrap();
    assert_eq!(sdc.client.placement(volume.id).await.unwrap_err().status(), Some(403));
    // A node heartbeats only as itself; the admin token does not heartbeat.
    let beat = |node_id| pflex_proto::api::HeartbeatRequest {
        node_id,
        metrics: Default::default(),
        volumes_since: None,
    };
    sds.client.heartbeat(&beat(sds.id())).await.unwrap();
    assert_eq!(sds.client.heartbeat(&beat(sdc.id())).await.unwrap_err().status(), Some(403));
    assert_eq!(mdm.admin().heartbeat(&beat(sds.id())).await.unwrap_err().status(), Some(403));
}

#[tokio::test]
async fn only_sds_gets_keys_never_the_secret_and_credentials_are_stored_hashed() {
    let mdm = start_mdm().await;
    let sds = mdm.register_sds("sds1", "fs1", "default", 10).await;
    let sdc = mdm.register_sdc("sdc1").await;
    let mgmt = mdm.register_mgmt("mgmt1").await;
    let secret = mdm.cluster_secret();
    let keys = sds.reply.sds_keys.as_ref().expect("an SDS gets its keys");
    assert_eq!(keys.node_key, secret.node_key(sds.id()).to_hex());
    let sent = serde_json::to_string(&sds.reply).unwrap();
    assert!(!sent.contains(&secret.to_hex()), "the cluster secret left the MDM");
    assert_eq!(sdc.reply.sds_keys, None);
    assert_eq!(mgmt.reply.sds_keys, None);
    let rows = dump(&mdm);
    for node in [&sds, &sdc, &mgmt] {
        assert!(!rows.contains(&node.reply.credential), "plain credential in the database");
        assert!(rows.contains(&pflex_mdm::service::sha256_hex(&node.reply.credential)));
    }
    assert!(!rows.contains(&secret.to_hex()));
    assert!(!rows.contains(mdm.admin_token()));
    use std::os::unix::fs::PermissionsExt;
    for file in ["cluster_secret", "admin_token"] {
        let mode = std::fs::metadata(mdm.mdm_dir().join(file)).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "{file}");
    }
}

#[tokio::test]
async fn registering_again_with_the_credential_keeps_the_id_and_the_credential() {
    let mdm = start_mdm().await;
    let first = mdm.register_sds("sds1", "fs1", "default", 10).await;
    let mut again = sds_request("", "sds1");
    again.fault_set = Some("fs1".into());
    again.devices = vec![pflex_proto::api::DeviceInfo {
        path: "/dev/fake/sds1".into(),
        capacity_bytes: 20 << 30,
        used_bytes: 0,
    }];
    again.credential = Some(first.reply.credential.clone());
    let second = mdm.register(again).await;
    assert_eq!(first.id(), second.id());
    assert_eq!(first.reply.credential, second.reply.credential);
    first.client.health_status().await.unwrap();
    let list = mdm.admin().sds_list().await.unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].capacity_bytes, 20 << 30);
    // Same name, other type: another node.
    let sdc = mdm.register_sdc("sds1").await;
    assert_ne!(sdc.id(), first.id());
}

fn request(node_type: NodeType, name: &str) -> RegisterRequest {
    let mut r = sds_request("", name);
    r.node_type = node_type;
    if node_type != NodeType::Sds {
        r.data_port = 0;
    }
    r
}

async fn mint(mdm: &pflex_testkit::cluster::Cluster, role: NodeType, name: Option<&str>) -> String {
    let request = pflex_proto::api::EnrollmentRequest {
        role,
        name: name.map(str::to_string),
        ttl_secs: None,
    };
    mdm.admin().create_enrollment(&request).await.unwrap().token
}

#[tokio::test]
async fn enrollment_tokens_are_one_time_and_role_scoped() {
    let mdm = start_mdm().await;
    // A client's enrollment token cannot register a storage node.
    let client_token = mint(&mdm, NodeType::Sdc, None).await;
    let before = dump(&mdm);
    let mut as_sds = request(NodeType::Sds, "sds9");
    as_sds.enrollment_token = Some(client_token.clone());
    let err = mdm.anonymous().register(&as_sds).await.unwrap_err();
    assert_eq!(err.status(), Some(401), "{err}");
    assert!(err.to_string().contains("another role"), "{err}");
    // Nothing but the audit row was written.
    assert_eq!(dump(&mdm), before);

    // ... nor can a client's credential, new name or existing one.
    let mut as_sdc = request(NodeType::Sdc, "sdc9");
    as_sdc.enrollment_token = Some(client_token.clone());
    let sdc = mdm.anonymous().register(&as_sdc).await.unwrap();
    assert!(sdc.sds_keys.is_none());
    let sds = mdm.register_sds("sds1", "fs1", "default", 10).await;
    for name in ["sds9", "sds1"] {
        let mut r = request(NodeType::Sds, name);
        r.credential = Some(sdc.credential.clone());
        let err = mdm.anonymous().register(&r).await.unwrap_err();
        assert!(matches!(err.status(), Some(401 | 409)), "{name}: {err}");
    }
    // A token is used once.
    let mut again = request(NodeType::Sdc, "sdc10");
    again.enrollment_token = Some(client_token);
    let err = mdm.anonymous().register(&again).await.unwrap_err();
    assert!(err.to_string().contains("used already"), "{err}");
    // A token bound to a name registers only that name.
    let bound = mint(&mdm, NodeType::Sds, Some("sds2")).await;
    let mut other = request(NodeType::Sds, "sds3");
    other.enrollment_token = Some(bound.clone());
    assert_eq!(mdm.anonymous().register(&other).await.unwrap_err().status(), Some(401));
    let mut right = request(NodeType::Sds, "sds2");
    right.enrollment_token = Some(bound);
    let sds2 = mdm.anonymous().register(&right).await.unwrap();
    assert!(sds2.sds_keys.is_some());
    // The audit log has the enrollments and the refusals, and refuses edits.
    let audit = mdm.admin().audit().await.unwrap();
    let text = serde_json::to_string(&audit).unwrap();
    assert!(text.contains("enrollment.create") && text.contains("node.enroll"), "{text}");
    assert!(text.contains("refused") && text.contains("another role"), "{text}");
    assert!(text.contains("127.0.0.1"), "the source address is recorded: {text}");
    let conn = rusqlite::Connection::open(mdm.mdm_dir().join("powerflex.db")).unwrap();
    assert!(conn.execute("DELETE FROM audit_log", []).is_err(), "the audit log is append-only");
    assert!(conn.execute("UPDATE audit_log SET outcome = 'ok'", []).is_err());
    let _ = sds;
}

#[tokio::test]
async fn a_live_name_is_never_taken_over() {
    let mdm = start_mdm().await;
    let sds2 = mdm.register_sds("sds2", "fs2", "default", 10).await;
    // Neither the join key nor a fresh enrollment token for that very name
    // takes it: the holder's address and credential stay.
    let mut with_key = request(NodeType::Sds, "sds2");
    with_key.join_key = pflex_testkit::cluster::JOIN_KEY.into();
    with_key.host = "10.9.9.9".into();
    let err = mdm.anonymous().register(&with_key).await.unwrap_err();
    assert_eq!(err.status(), Some(409), "{err}");
    let mut with_token = with_key.clone();
    with_token.join_key = String::new();
    with_token.enrollment_token = Some(mint(&mdm, NodeType::Sds, Some("sds2")).await);
    assert_eq!(mdm.anonymous().register(&with_token).await.unwrap_err().status(), Some(409));
    let list = mdm.admin().sds_list().await.unwrap();
    assert_eq!(list.iter().find(|s| s.name == "sds2").unwrap().host, "127.0.0.1");
    let beat = pflex_proto::api::HeartbeatRequest {
        node_id: sds2.id(),
        metrics: Default::default(),
        volumes_since: None,
    };
    sds2.client.heartbeat(&beat).await.expect("the holder's credential still works");

    // The holder itself comes back with its credential and keeps it.
    let mut holder = request(NodeType::Sds, "sds2");
    holder.credential = Some(sds2.reply.credential.clone());
    let back = mdm.anonymous().register(&holder).await.unwrap();
    assert_eq!((back.node_id, &back.credential), (sds2.id(), &sds2.reply.credential));

    // After an admin reset the old credential is dead and a token claims the name.
    mdm.admin().reset_node(NodeType::Sds, "sds2").await.unwrap();
    assert_eq!(sds2.client.heartbeat(&beat).await.unwrap_err().status(), Some(401));
    with_token.enrollment_token = Some(mint(&mdm, NodeType::Sds, Some("sds2")).await);
    let replaced = mdm.anonymous().register(&with_token).await.unwrap();
    assert_eq!(replaced.node_id, sds2.id());
    assert_ne!(replaced.credential, sds2.reply.credential);
}

/// `pflex cluster rotate`: the old admin token stops working and the new
/// one is where the old one was; unused enrollment tokens and the join key
/// no longer register anything; an SDS is sent the new token public key
/// beside the old one with its next heartbeat, before the MDM signs with
/// it; and the rotation is in the audit log.
#[tokio::test]
async fn rotation_replaces_the_admin_token_and_revokes_enrollment_material() {
    let mdm = start_mdm().await;
    let sds = mdm.register_sds("sds1", "fs1", "default", 10).await;
    let keys_before = sds.reply.sds_keys.as_ref().unwrap().token_public_keys.clone();
    assert_eq!(keys_before.len(), 1);
    let unused = mint(&mdm, NodeType::Sds, None).await;
    let old_admin = mdm.admin();

    let rotated = old_admin.cluster_rotate().await.unwrap();
    assert_eq!(rotated.signing_generation, 1);
    assert_eq!(rotated.enrollment_tokens_revoked, 1);
    assert!(rotated.join_key_disabled);

    // The old admin token is refused at once; the new one is in the file.
    let err = old_admin.sds_list().await.unwrap_err();
    assert_eq!(err.status(), Some(401), "{err}");
    let new_token = std::fs::read_to_string(mdm.mdm_dir().join("admin_token")).unwrap();
    assert_eq!(new_token.trim(), rotated.admin_token, "the answer carries the new token");
    let new_admin = mdm.anonymous().with_credential(new_token.trim());
    assert_eq!(new_admin.sds_list().await.unwrap().len(), 1);

    // Enrollment material from before no longer registers anything.
    let mut with_token = request(NodeType::Sds, "sds7");
    with_token.enrollment_token = Some(unused);
    assert_eq!(mdm.anonymous().register(&with_token).await.unwrap_err().status(), Some(401));
    let with_join_key = sds_request(JOIN_KEY, "sds8");
    assert_eq!(mdm.anonymous().register(&with_join_key).await.unwrap_err().status(), Some(401));

    // The next heartbeat lists the old key and the new one.
    let keys = pflex_testkit::cluster::heartbeat_token_keys(&sds.client, sds.id()).await;
    assert_eq!(keys.len(), 2, "{keys:?}");
    assert_eq!(keys[0], keys_before[0], "the old key is still accepted");

    let audit = serde_json::to_string(&new_admin.audit().await.unwrap()).unwrap();
    assert!(audit.contains("cluster.rotate"), "{audit}");
}

/// An SDS whose store holds chunks of another cluster (another secret) is
/// refused with 409 and nothing is written; one of this cluster, or with
/// no data, registers.
#[tokio::test]
async fn a_node_holding_another_clusters_data_is_refused() {
    let mdm = start_mdm().await;
    let first = mdm.anonymous().register(&sds_request(JOIN_KEY, "sds1")).await.unwrap();
    assert_eq!(first.cluster_id.len(), 32, "{}", first.cluster_id);
    let before = dump(&mdm);
    let mut foreign = sds_request(JOIN_KEY, "sds2");
    foreign.data_cluster_id = Some("0".repeat(32));
    let err = mdm.anonymous().register(&foreign).await.unwrap_err();
    assert_eq!((err.status(), err.code()), (Some(409), Some("foreign_cluster_data")), "{err}");
    assert!(err.to_string().contains("--erase-foreign-data"), "says what to do: {err}");
    assert_eq!(dump(&mdm), before, "a refused registration wrote to the database");
    foreign.data_cluster_id = Some(first.cluster_id.clone());
    let second = mdm.anonymous().register(&foreign).await.unwrap();
    assert_eq!(second.cluster_id, first.cluster_id);
}
