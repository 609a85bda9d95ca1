//! The dashboard against a real MDM: it registers, logs users in, raises an
//! alert when an SDS stops heartbeating and resolves it when the SDS is back.

use std::time::{Duration, Instant};

use pflex_testkit::cluster::{Cluster, ClusterSpec, MdmOptions, NodeOverrides, JOIN_KEY};
use serde_json::{json, Value};

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
    let mdm = MdmOptions {
        stale_after_secs: Some(2),
        failed_after_secs: Some(600),
        ..MdmOptions::default()
    };
    let mut cluster = Cluster::start(ClusterSpec { mdm, ..ClusterSpec::default() }).await;
    let mdm_url = cluster.mdm_url();
    let http =
        reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap();

    // A storage node registers (exactly as a real SDS does), heartbeats once, then goes quiet.
    let reg: Value = http
        .post(format!("{mdm_url}/discovery/register"))
        .json(&json!({
            "join_key": JOIN_KEY, "node_type": "SDS", "name": "sds-quiet",
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

    // The dashboard, once registered.
    let poll_fast = ["--poll-interval-secs", "1"].map(String::from).to_vec();
    cluster.add_mgmt(NodeOverrides { flags: poll_fast, ..NodeOverrides::default() }).await;
    let mgmt_url = cluster.mgmt_url().unwrap();
    let mgmt_dir = cluster.mgmt_dir().unwrap();

    // Logging in: a wrong password is refused, the real one gives a session cookie.
    let r = http.get(format!("{mgmt_url}/")).send().await.unwrap();
    assert!(r.status().is_redirection(), "dashboard without a session: {}", r.status());
    let r = http.get(format!("{mgmt_url}/api/alerts")).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let login = |password: String| {
        let (http, url) = (http.clone(), format!("{mgmt_url}/login"));
        async move {
            // The login form carries a token bound to a cookie of its own.
            let form = http.get(&url).send().await.unwrap();
            let cookie = form.headers()[reqwest::header::SET_COOKIE].to_str().unwrap();
            let cookie = cookie.split(';').next().unwrap().to_string();
            let page = form.text().await.unwrap();
            let at = page.find("name=\"csrf\" value=\"").expect("a csrf field") + 19;
            let csrf = page[at..at + 32].to_string();
            http.post(&url)
                .header(reqwest::header::COOKIE, cookie)
                .form(&[("csrf", csrf.as_str()), ("username", "admin"), ("password", &password)])
                .send()
                .await
                .unwrap()
        }
    };
    let r = login("not-the-password".into()).await;
    assert_eq!(r.status(), 401);
    let password = std::fs::read_to_string(mgmt_dir.join("admin_password")).unwrap();
    let r = login(password.trim().to_string()).await;
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
