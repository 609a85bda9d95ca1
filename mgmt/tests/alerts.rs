//! The dashboard against a real MDM: it registers, logs users in, raises an
//! alert when an SDS stops heartbeating and resolves it when the SDS is back.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use pflex_testkit::{free_port, spawn_logged, workspace_binary, ProcessGuard};
use serde_json::{json, Value};

fn mdm_binary() -> PathBuf {
    workspace_binary("mdm", "mdm")
}

fn spawn(program: &Path, args: &[String], log: &Path) -> ProcessGuard {
    let name = program.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    spawn_logged(&name, program, args, log)
}

/// Polls `probe` every 200 ms for at most 30 s.
async fn eventually<F, Fut>(what: &str, mut probe: F) -> Value
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<Value>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = probe().await {
            return v;
        }
        assert!(start.elapsed() < Duration::from_secs(30), "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn stale_alert(alerts: &Value, name: &str) -> Option<Value> {
    alerts
        .as_array()?
        .iter()
        .find(|a| {
            let key = a["key"].as_str().unwrap_or("");
            key.contains(name) && key.contains("STALE")
        })
        .cloned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_sds_raises_an_alert_that_resolves_when_it_heartbeats_again() {
    let dir = tempfile::tempdir().unwrap();
    let join_key_file = dir.path().join("join_key");
    std::fs::write(&join_key_file, "test-join-key\n").unwrap();
    let (mdm_port, mgmt_port) = (free_port(), free_port());
    let mdm_url = format!("http://127.0.0.1:{mdm_port}");
    let mgmt_url = format!("http://127.0.0.1:{mgmt_port}");
    let mdm_dir = dir.path().join("mdm");
    let _mdm = spawn(
        &mdm_binary(),
        &[
            "--listen".into(),
            format!("127.0.0.1:{mdm_port}"),
            "--data-dir".into(),
            mdm_dir.display().to_string(),
            "--join-key-file".into(),
            join_key_file.display().to_string(),
            "--heartbeat-interval-secs".into(),
            "1".into(),
            "--stale-after-secs".into(),
            "2".into(),
            "--failed-after-secs".into(),
            "600".into(),
        ],
        &dir.path().join("mdm.log"),
    );
    let http =
        reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap();
    let admin = eventually("the MDM", || {
        let (http, url, token_file) =
            (http.clone(), format!("{mdm_url}/health/status"), mdm_dir.join("admin_token"));
        async move {
            let token = std::fs::read_to_string(token_file).ok()?.trim().to_string();
            let ok = http.get(url).bearer_auth(&token).send().await.ok()?.status().is_success();
            ok.then_some(Value::String(token))
        }
    })
    .await;
    assert!(admin.is_string());

    // A storage node registers (exactly as a real SDS does), heartbeats once, then goes quiet.
    let reg: Value = http
        .post(format!("{mdm_url}/discovery/register"))
        .json(&json!({
            "join_key": "test-join-key", "node_type": "SDS", "name": "sds-quiet",
            "host": "127.0.0.1", "control_port": 1, "mgmt_port": 1, "data_port": 1,
            "devices": [{"path": "/dev/null", "capacity_bytes": 1u64 << 30}]
        }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let (node_id, credential) =
        (reg["node_id"].as_u64().unwrap(), reg["credential"].as_str().unwrap().to_string());
    let heartbeat = || {
        let (http, url, credential) =
            (http.clone(), format!("{mdm_url}/health/heartbeat"), credential.clone());
        async move {
            let r = http
                .post(url)
                .bearer_auth(credential)
                .json(&json!({"node_id": node_id}))
                .send()
                .await
                .unwrap();
            assert!(r.status().is_success(), "heartbeat refused: {}", r.status());
        }
    };
    heartbeat().await;

    let mgmt_dir = dir.path().join("mgmt");
    let _mgmt = spawn(
        &PathBuf::from(env!("CARGO_BIN_EXE_mgmt")),
        &[
            "--listen".into(),
            format!("127.0.0.1:{mgmt_port}"),
            "--mdm".into(),
            mdm_url.clone(),
            "--join-key-file".into(),
            join_key_file.display().to_string(),
            "--data-dir".into(),
            mgmt_dir.display().to_string(),
            "--poll-interval-secs".into(),
            "1".into(),
        ],
        &dir.path().join("mgmt.log"),
    );
    eventually("the dashboard to register", || {
        let (http, url) = (http.clone(), format!("{mgmt_url}/health"));
        async move {
            let v: Value = http.get(url).send().await.ok()?.json().await.ok()?;
            (v["registered"] == true).then_some(v)
        }
    })
    .await;

    // Logging in: a wrong password is refused, the real one gives a session cookie.
    let r = http.get(format!("{mgmt_url}/")).send().await.unwrap();
    assert!(r.status().is_redirection(), "dashboard without a session: {}", r.status());
    let r = http.get(format!("{mgmt_url}/api/alerts")).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let r = http
        .post(format!("{mgmt_url}/login"))
        .form(&[("username", "admin"), ("password", "not-the-password")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let password = std::fs::read_to_string(mgmt_dir.join("admin_password")).unwrap();
    let r = http
        .post(format!("{mgmt_url}/login"))
        .form(&[("username", "admin"), ("password", password.trim())])
        .send()
        .await
        .unwrap();
    assert!(r.status().is_redirection(), "login: {}", r.status());
    let cookie = r.headers()[reqwest::header::SET_COOKIE].to_str().unwrap();
    let cookie = cookie.split(';').next().unwrap().to_string();

    // The quiet SDS goes STALE at the MDM: the dashboard raises an alert.
    let alerts = || {
        let (http, url, cookie) = (http.clone(), format!("{mgmt_url}/api/alerts"), cookie.clone());
        async move {
            let r = http.get(url).header(reqwest::header::COOKIE, cookie).send().await.ok()?;
            r.json::<Value>().await.ok()
        }
    };
    let raised = eventually("a STALE alert", || async {
        let all = alerts().await?;
        stale_alert(&all, "sds-quiet").filter(|a| a["resolved_at"].is_null())
    })
    .await;
    assert_eq!(raised["severity"], "warning");
    assert_eq!(raised["component"], "sds-quiet");
    let page = http
        .get(format!("{mgmt_url}/"))
        .header(reqwest::header::COOKIE, cookie.clone())
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(page.contains("sds-quiet") && page.contains("STALE"), "dashboard: {page}");

    // It heartbeats again: the alert resolves by itself, and is not raised twice meanwhile.
    let resolved = eventually("the alert to resolve", || async {
        heartbeat().await;
        let all = alerts().await?;
        stale_alert(&all, "sds-quiet").filter(|a| !a["resolved_at"].is_null())
    })
    .await;
    assert_eq!(resolved["id"], raised["id"], "the same alert resolved");
    let all = alerts().await.unwrap();
    let stale_count = all
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["key"].as_str().unwrap_or("").contains("sds-quiet:STALE"))
        .count();
    assert_eq!(stale_count, 1, "raised once while the condition held: {all}");
}
