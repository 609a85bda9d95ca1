//! Malformed and invalid requests across the API: every one is a JSON 4xx,
//! never a 5xx, and the database is byte-for-byte unchanged afterwards.

mod common;

use common::{dump, raw, start_mdm};
use pflex_proto::api::{VolumeCreate, VolumeMap};
use pflex_proto::token::AccessMode;
use pflex_testkit::cluster::JOIN_KEY;

enum Who {
    Admin,
    Sds,
    Sdc,
    Nobody,
}

struct Case {
    method: &'static str,
    path: String,
    who: Who,
    content_type: Option<&'static str>,
    body: Option<String>,
    status: u16,
}

fn case(method: &'static str, path: &str, who: Who, body: &str, status: u16) -> Case {
    Case {
        method,
        path: path.to_string(),
        who,
        content_type: Some("application/json"),
        body: Some(body.to_string()),
        status,
    }
}

fn get(path: &str, who: Who, status: u16) -> Case {
    Case { method: "GET", path: path.to_string(), who, content_type: None, body: None, status }
}

#[tokio::test]
async fn malformed_requests_are_4xx_and_change_nothing() {
    let mdm = start_mdm().await;
    let admin = mdm.admin();
    let sds = mdm.register_sds("sds1", "fs1", "default", 10).await;
    mdm.register_sds("sds2", "fs2", "default", 10).await;
    let sdc = mdm.register_sdc("sdc1").await;
    mdm.register_sdc("sdc2").await;
    let vol = |name: &str| VolumeCreate {
        name: name.into(),
        size_bytes: 1 << 30,
        pool: None,
        thick: false,
    };
    let vol1 = admin.volume_create(&vol("vol1")).await.unwrap();
    let vol2 = admin.volume_create(&vol("vol2")).await.unwrap();
    admin
        .volume_map(&VolumeMap {
            volume: "vol1".into(),
            sdc: "sdc1".into(),
            access_mode: AccessMode::ReadOnly,
        })
        .await
        .unwrap();

    let big = format!(r#"{{"name":"big","size_bytes":512,"pool":"{}"}}"#, "x".repeat(5 << 20));
    let deep = format!("{}{}", "[".repeat(200), "]".repeat(200));
    let key = JOIN_KEY;
    let mut cases = vec![
        // Body syntax and types.
        case("POST", "/vol/create", Who::Admin, "{", 400),
        case("POST", "/vol/create", Who::Admin, "hello", 400),
        case("POST", "/vol/create", Who::Admin, "", 400),
        case("POST", "/vol/create", Who::Admin, "[]", 400),
        case("POST", "/vol/create", Who::Admin, "null", 400),
        case("POST", "/vol/create", Who::Admin, &deep, 400),
        case("POST", "/vol/create", Who::Admin, r#"{"name":"a","size_bytes":512} trailing"#, 400),
        case("POST", "/vol/create", Who::Admin, r#"{"name":"a","name":"b","size_bytes":512}"#, 400),
        case(
            "POST",
            "/vol/create",
            Who::Admin,
            r#"{"name":"a","size_bytes":512,"colour":"red"}"#,
            400,
        ),
        case("POST", "/vol/create", Who::Admin, r#"{"name":"a"}"#, 400),
        case("POST", "/vol/create", Who::Admin, r#"{"name":"a","size_bytes":"1G"}"#, 400),
        case(
            "POST",
            "/vol/create",
            Who::Admin,
            r#"{"name":"a","size_bytes":1048576,"thick":"yes"}"#,
            400,
        ),
        // Sizes.
        case("POST", "/vol/create", Who::Admin, r#"{"name":"a","size_bytes":-1048576}"#, 400),
        case("POST", "/vol/create", Who::Admin, r#"{"name":"a","size_bytes":0}"#, 400),
        case("POST", "/vol/create", Who::Admin, r#"{"name":"a","size_bytes":1000}"#, 400),
        case("POST", "/vol/create", Who::Admin, r#"{"name":"a","size_bytes":1.5}"#, 400),
        case(
            "POST",
            "/vol/create",
            Who::Admin,
            r#"{"name":"a","size_bytes":1125899906843136}"#,
            400,
        ),
        case(
            "POST",
            "/vol/create",
            Who::Admin,
            r#"{"name":"a","size_bytes":18446744073709551615}"#,
            400,
        ),
        case("POST", "/vol/create", Who::Admin, r#"{"name":"a","size_bytes":1e30}"#, 400),
        // Names.
        case("POST", "/vol/create", Who::Admin, r#"{"name":"","size_bytes":512}"#, 400),
        case("POST", "/vol/create", Who::Admin, r#"{"name":"a b","size_bytes":512}"#, 400),
        case("POST", "/vol/create", Who::Admin, r#"{"name":"../etc","size_bytes":512}"#, 400),
        case(
            "POST",
            "/vol/create",
            Who::Admin,
            &format!(r#"{{"name":"{}","size_bytes":512}}"#, "n".repeat(65)),
            400,
        ),
        case("POST", "/vol/create", Who::Admin, r#"{"name":"12345","size_bytes":512}"#, 400),
        case("POST", "/vol/create", Who::Admin, r#"{"name":"vÖl","size_bytes":512}"#, 400),
        case("POST", "/vol/create", Who::Admin, r#"{"name":"vol1","size_bytes":512}"#, 409),
        case(
            "POST",
            "/vol/create",
            Who::Admin,
            r#"{"name":"a","size_bytes":512,"pool":"no pool"}"#,
            400,
        ),
        case(
            "POST",
            "/vol/create",
            Who::Admin,
            r#"{"name":"a","size_bytes":512,"pool":"nopool"}"#,
            404,
        ),
        // Resize, rename, delete.
        case("POST", "/vol/vol1/resize", Who::Admin, r#"{"size_bytes":1048576}"#, 400),
        case("POST", "/vol/vol1/resize", Who::Admin, r#"{"size_bytes":0}"#, 400),
        case("POST", "/vol/vol1/resize", Who::Admin, r#"{"size_bytes":2147483648,"x":1}"#, 400),
        case("POST", "/vol/nosuch/resize", Who::Admin, r#"{"size_bytes":2147483648}"#, 404),
        case("POST", "/vol/vol1/rename", Who::Admin, r#"{"new_name":"vol2"}"#, 409),
        case("POST", "/vol/vol1/rename", Who::Admin, r#"{"new_name":"bad/name"}"#, 400),
        case("POST", "/vol/vol1/rename", Who::Admin, r#"{"name":"x"}"#, 400),
        Case {
            method: "DELETE",
            path: "/vol/vol1".into(),
            who: Who::Admin,
            content_type: None,
            body: None,
            status: 409,
        },
        Case {
            method: "DELETE",
            path: "/vol/nosuch".into(),
            who: Who::Admin,
            content_type: None,
            body: None,
            status: 404,
        },
        get("/vol/nosuch", Who::Admin, 404),
        get("/vol/%FF%FE", Who::Admin, 400),
        get("/vol/999999999999999999999999/placement", Who::Admin, 404),
        // Map and unmap.
        case("POST", "/vol/map", Who::Admin, r#"{"volume":"vol2","sdc":"nosuch"}"#, 404),
        case("POST", "/vol/map", Who::Admin, r#"{"volume":"nosuch","sdc":"sdc1"}"#, 404),
        case(
            "POST",
            "/vol/map",
            Who::Admin,
            r#"{"volume":"vol2","sdc":"sdc1","access_mode":"everything"}"#,
            400,
        ),
        case("POST", "/vol/map", Who::Admin, r#"{"volume":"vol2","sdc":"sds1"}"#, 404),
        case("POST", "/vol/unmap", Who::Admin, r#"{"volume":"vol2","sdc":"sdc1"}"#, 404),
        case("POST", "/vol/unmap", Who::Admin, r#"{"volume":"vol1"}"#, 400),
        // Tokens and acks.
        case(
            "POST",
            "/token/request",
            Who::Sdc,
            &format!(r#"{{"volume_id":{},"mode":"write"}}"#, vol1.id),
            400,
        ),
        case("POST", "/token/request", Who::Sdc, r#"{"volume_id":-1,"mode":"readOnly"}"#, 400),
        case(
            "POST",
            "/token/request",
            Who::Sdc,
            &format!(r#"{{"volume_id":{},"mode":"readWrite"}}"#, vol1.id),
            403,
        ),
        case(
            "POST",
            "/token/request",
            Who::Sdc,
            &format!(r#"{{"volume_id":{},"mode":"readOnly"}}"#, vol2.id),
            403,
        ),
        case(
            "POST",
            "/token/request",
            Who::Sdc,
            r#"{"volume_id":18446744073709551615,"mode":"readOnly"}"#,
            404,
        ),
        case(
            "POST",
            "/token/request",
            Who::Sdc,
            &format!(r#"{{"volume_id":{},"mode":"readOnly","offset":0}}"#, vol1.id),
            400,
        ),
        case(
            "POST",
            "/token/ack",
            Who::Sds,
            r#"{"records":[{"token_id":1,"volume_id":1,"op":"explode","ops":1,"bytes":1}]}"#,
            400,
        ),
        case("POST", "/token/ack", Who::Sds, r#"{"records":{}}"#, 400),
        case("POST", "/token/ack", Who::Sds, r#"{"records":[{"token_id":1}]}"#, 400),
        // Heartbeats.
        case("POST", "/health/heartbeat", Who::Sds, &format!(r#"{{"node_id":{}}}"#, sdc.id()), 403),
        case(
            "POST",
            "/health/heartbeat",
            Who::Sds,
            &format!(
                r#"{{"node_id":{},"metrics":{{"capacity_bytes":1,"used_bytes":2}}}}"#,
                sds.id()
            ),
            400,
        ),
        case(
            "POST",
            "/health/heartbeat",
            Who::Sds,
            &format!(r#"{{"node_id":{},"metrics":{{"temperature":3}}}}"#, sds.id()),
            400,
        ),
        case("POST", "/health/heartbeat", Who::Sds, r#"{"node_id":"one"}"#, 400),
        // Registration with the right key but bad content.
        case(
            "POST",
            "/discovery/register",
            Who::Nobody,
            &format!(r#"{{"join_key":"{key}","node_type":"DISK","name":"x","host":"h"}}"#),
            400,
        ),
        case(
            "POST",
            "/discovery/register",
            Who::Nobody,
            &format!(r#"{{"join_key":"{key}","node_type":"SDS","name":"x","host":"h"}}"#),
            400,
        ),
        case(
            "POST",
            "/discovery/register",
            Who::Nobody,
            &format!(r#"{{"join_key":"{key}","node_type":"SDC","name":"bad name","host":"h"}}"#),
            400,
        ),
        case(
            "POST",
            "/discovery/register",
            Who::Nobody,
            &format!(r#"{{"join_key":"{key}","node_type":"SDC","name":"c9","host":""}}"#),
            400,
        ),
        case(
            "POST",
            "/discovery/register",
            Who::Nobody,
            &format!(
                r#"{{"join_key":"{key}","node_type":"SDC","name":"c9","host":"h","data_port":70000}}"#
            ),
            400,
        ),
        case(
            "POST",
            "/discovery/register",
            Who::Nobody,
            &format!(
                r#"{{"join_key":"{key}","node_type":"SDC","name":"c9","host":"h","pool":"p"}}"#
            ),
            400,
        ),
        case(
            "POST",
            "/discovery/register",
            Who::Nobody,
            &format!(
                r#"{{"join_key":"{key}","node_type":"SDS","name":"s9","host":"h","data_port":9709,"devices":[{{"path":"/d","capacity_bytes":1,"used_bytes":5}}]}}"#
            ),
            400,
        ),
        case(
            "POST",
            "/discovery/register",
            Who::Nobody,
            &format!(
                r#"{{"join_key":"{key}","node_type":"SDS","name":"sds1","host":"h","data_port":9709,"fault_set":"fs1","pool":"default","extra":1}}"#
            ),
            400,
        ),
        case(
            "POST",
            "/discovery/register",
            Who::Nobody,
            &format!(
                r#"{{"join_key":"{key}","node_type":"SDS","name":"s9","host":"h","data_port":9709,"fault_set":"bad fs"}}"#
            ),
            400,
        ),
        // Transport-level mistakes.
        Case {
            content_type: None,
            ..case("POST", "/vol/create", Who::Admin, r#"{"name":"a","size_bytes":512}"#, 415)
        },
        Case {
            content_type: Some("text/plain"),
            ..case("POST", "/vol/create", Who::Admin, r#"{"name":"a","size_bytes":512}"#, 415)
        },
        case("POST", "/vol/create", Who::Admin, &big, 413),
        get("/no/such/endpoint", Who::Admin, 404),
        case("PUT", "/vol/list", Who::Admin, "{}", 405),
        get("/vol/create", Who::Admin, 405),
    ];
    // A refusal by role is also a 4xx without side effects.
    cases.push(case("POST", "/vol/create", Who::Sdc, r#"{"name":"a","size_bytes":512}"#, 403));
    assert!(cases.len() >= 20);

    let before = dump(&mdm);
    for case in &cases {
        let token = match case.who {
            Who::Admin => Some(mdm.admin_token().to_string()),
            Who::Sds => Some(sds.reply.credential.clone()),
            Who::Sdc => Some(sdc.reply.credential.clone()),
            Who::Nobody => None,
        };
        let url = format!("{}{}", mdm.mdm_url(), case.path);
        let (status, body) =
            raw(case.method, &url, token.as_deref(), case.content_type, case.body.as_deref()).await;
        let shown = case.body.as_deref().unwrap_or("").chars().take(120).collect::<String>();
        assert_eq!(status, case.status, "{} {} {shown}: {body}", case.method, case.path);
        assert!(
            body["error"].is_string() && body["message"].is_string(),
            "{} {}: not an ApiError: {body}",
            case.method,
            case.path
        );
    }
    assert_eq!(dump(&mdm), before, "a refused request changed the database");
    let metrics = admin.metrics_text().await.unwrap();
    assert!(metrics.contains("pflex_mdm_http_responses_total{class=\"5xx\"} 0"), "{metrics}");
    // The service is still fine.
    admin.volume_create(&vol("after")).await.unwrap();
    println!("{} malformed requests refused", cases.len());
}
