//! The dashboard's HTTP side: login, the HTML overview (refreshes itself),
//! `/api/overview` and `/api/alerts` (JSON, session required), and the
//! unauthenticated `/health` and `/metrics` every component serves.

use std::fmt::Write as _;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Form, Json, Router};
use pflex_proto::api::ComponentStatus;

use crate::Shared;

type AppState = Arc<Shared>;

pub fn router(shared: AppState) -> Router {
    Router::new()
        .route("/", get(dashboard))
        .route("/login", get(login_page).post(login))
        .route("/logout", post(logout))
        .route("/api/overview", get(api_overview))
        .route("/api/alerts", get(api_alerts))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .with_state(shared)
}

const COOKIE: &str = "pflex_session";

fn session_token(headers: &HeaderMap) -> Option<String> {
    let cookies = headers.get(header::COOKIE)?.to_str().ok()?;
    cookies.split(';').find_map(|c| {
        let (k, v) = c.trim().split_once('=')?;
        (k == COOKIE).then(|| v.to_string())
    })
}

fn user(state: &Shared, headers: &HeaderMap) -> Option<String> {
    let token = session_token(headers)?;
    state.db.lock().ok()?.session_user(&token).ok().flatten()
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

fn gib(b: u64) -> String {
    format!("{:.1} GiB", b as f64 / (1u64 << 30) as f64)
}

const STYLE: &str = "body{font-family:sans-serif;margin:2em;color:#222}table{border-collapse:collapse;margin-bottom:1.5em}\
td,th{border:1px solid #ccc;padding:4px 10px;text-align:left}th{background:#eee}\
.ACTIVE,.HEALTHY,.ok{color:#070}.STALE,.DEGRADED,.warning{color:#b60}.FAILED,.CRITICAL,.critical{color:#c00}";

async fn login_page() -> Html<String> {
    Html(format!(
        "<!doctype html><title>pflex login</title><style>{STYLE}</style><h1>pflex</h1>\
         <form method=post action=/login><p>User <input name=username value=admin></p>\
         <p>Password <input name=password type=password></p><button>Log in</button></form>\
         <p>The first password is in the dashboard's data dir, file <code>admin_password</code>.</p>"
    ))
}

#[derive(serde::Deserialize)]
struct LoginForm {
    username: String,
    password: String,
}

async fn login(State(state): State<AppState>, Form(form): Form<LoginForm>) -> Response {
    let token = state.db.lock().map_err(|_| ()).and_then(|db| {
        db.login(&form.username, &form.password).map_err(|e| tracing::error!("login: {e}"))
    });
    match token {
        Ok(Some(t)) => (
            [(header::SET_COOKIE, format!("{COOKIE}={t}; HttpOnly; SameSite=Strict; Path=/"))],
            Redirect::to("/"),
        )
            .into_response(),
        Ok(None) => (StatusCode::UNAUTHORIZED, Html("wrong user or password")).into_response(),
        Err(()) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

async fn logout(State(state): State<AppState>, headers: HeaderMap) -> Response {
    if let (Some(t), Ok(db)) = (session_token(&headers), state.db.lock()) {
        let _ = db.logout(&t);
    }
    Redirect::to("/login").into_response()
}

async fn dashboard(State(state): State<AppState>, headers: HeaderMap) -> Response {
    if user(&state, &headers).is_none() {
        return Redirect::to("/login").into_response();
    }
    let overview = state.last_overview.lock().expect("overview lock").clone();
    let alerts = state.db.lock().expect("db lock").alerts(false).unwrap_or_default();
    let mut h = format!(
        "<!doctype html><meta http-equiv=refresh content=5><title>pflex</title><style>{STYLE}</style>\
         <h1>pflex cluster</h1><form method=post action=/logout><button>Log out</button></form>"
    );
    let Some(o) = overview else {
        h.push_str("<p>No data yet: the first poll has not finished.</p>");
        return Html(h).into_response();
    };
    if !o.mdm_reachable {
        h.push_str("<p class=critical>The MDM is unreachable.</p>");
    }
    if let (Some(hs), Some(s)) = (&o.health, &o.summary) {
        let _ = write!(
            h,
            "<h2>Overall: <span class={0}>{0}</span></h2><table><tr><th>SDS</th><th>SDC</th><th>volumes</th>\
             <th>capacity</th><th>used</th><th>provisioned</th><th>degraded chunks</th><th>rebuilds</th></tr>\
             <tr><td>{1}</td><td>{2}</td><td>{3}</td><td>{4}</td><td>{5}</td><td>{6}</td><td>{7}</td><td>{8}</td></tr></table>",
            esc(&hs.overall), s.sds_count, s.sdc_count, s.volume_count, gib(s.capacity_bytes),
            gib(s.used_bytes), gib(s.provisioned_bytes), s.degraded_chunks, s.rebuild_jobs_active
        );
        h.push_str("<h2>Components</h2><table><tr><th>type</th><th>name</th><th>status</th><th>last seen</th><th>host</th></tr>");
        for c in &hs.components {
            let _ = write!(
                h,
                "<tr><td>{}</td><td>{}</td><td class={2}>{2}</td><td>{3} s ago</td><td>{4}</td></tr>",
                c.node_type.as_str(), esc(&c.name), esc(&c.status),
                o.polled_at.saturating_sub(c.last_seen), esc(&c.host)
            );
        }
        h.push_str("</table>");
    }
    h.push_str("<h2>Storage servers</h2><table><tr><th>name</th><th>fault set</th><th>pool</th><th>capacity</th><th>used</th><th>status</th><th>data</th></tr>");
    for s in &o.sds {
        let status = if s.draining { format!("{} (draining)", s.status) } else { s.status.clone() };
        let _ = write!(
            h,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td class={5}>{8}</td><td>{6}:{7}</td></tr>",
            esc(&s.name), esc(&s.fault_set), esc(&s.pool), gib(s.capacity_bytes), gib(s.used_bytes),
            esc(&s.status), esc(&s.host), s.data_port, esc(&status)
        );
    }
    h.push_str("</table><h2>Volumes</h2><table><tr><th>id</th><th>name</th><th>size</th><th>type</th><th>mapped to</th></tr>");
    for v in &o.volumes {
        let maps: Vec<String> = v
            .mappings
            .iter()
            .map(|m| format!("{} ({})", esc(&m.sdc_name), m.access_mode.as_str()))
            .collect();
        let _ = write!(
            h,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            v.id,
            esc(&v.name),
            gib(v.size_bytes),
            if v.thick { "thick" } else { "thin" },
            maps.join(", ")
        );
    }
    h.push_str("</table><h2>Data movement</h2>");
    if let Some(m) = &o.movement {
        let limit = if m.policy.mb_per_sec == 0 {
            "no limit".to_string()
        } else {
            format!("{} MB/s per SDS", m.policy.mb_per_sec)
        };
        let eta = m.eta_secs.map_or("-".to_string(), |s| format!("{s} s"));
        let _ = write!(
            h,
            "<table><tr><th>limit</th><th>priority</th><th>rebuild</th><th>resync</th><th>move</th>\
             <th>chunks sent</th><th>rate</th><th>ETA</th><th>draining</th></tr>\
             <tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}/{}</td><td>{:.1} MB/s</td><td>{}</td><td>{}</td></tr></table>",
            esc(&limit),
            m.policy.priority.as_str(),
            m.rebuild_jobs,
            m.resync_jobs,
            m.move_jobs,
            m.chunks_copied,
            m.chunks_total,
            m.rate_bytes_per_sec as f64 / 1e6,
            esc(&eta),
            esc(&m.draining.join(", "))
        );
    }
    h.push_str("<table><tr><th>job</th><th>kind</th><th>volume</th><th>PG</th><th>replaces SDS</th><th>copy</th><th>state</th><th>chunks</th></tr>");
    for j in &o.rebuilds {
        let _ = write!(
            h,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{} &rarr; {}</td><td>{}</td><td>{}/{}</td></tr>",
            j.job_id,
            j.kind.as_str(),
            j.volume_id,
            j.pg_index,
            j.failed_sds,
            j.source_sds,
            j.target_sds,
            esc(&j.state),
            j.chunks_copied,
            j.chunks_total.max(j.chunks_copied)
        );
    }
    h.push_str("</table><h2>Alerts</h2><table><tr><th>severity</th><th>component</th><th>message</th><th>raised</th><th>resolved</th></tr>");
    for a in &alerts {
        let _ = write!(
            h,
            "<tr><td class={0}>{0}</td><td>{1}</td><td>{2}</td><td>{3}</td><td>{4}</td></tr>",
            esc(&a.severity),
            esc(&a.component),
            esc(&a.message),
            a.raised_at,
            a.resolved_at.map(|t| t.to_string()).unwrap_or_else(|| "active".into())
        );
    }
    h.push_str("</table>");
    Html(h).into_response()
}

async fn api_overview(State(state): State<AppState>, headers: HeaderMap) -> Response {
    if user(&state, &headers).is_none() {
        return StatusCode::UNAUTHORIZED.into_response();
    }
    Json(state.last_overview.lock().expect("overview lock").clone()).into_response()
}

async fn api_alerts(State(state): State<AppState>, headers: HeaderMap) -> Response {
    if user(&state, &headers).is_none() {
        return StatusCode::UNAUTHORIZED.into_response();
    }
    let alerts = state.db.lock().expect("db lock").alerts(false).unwrap_or_default();
    Json(alerts).into_response()
}

async fn health(State(state): State<AppState>) -> Json<ComponentStatus> {
    Json(ComponentStatus {
        component: "MGMT".into(),
        name: state.config.name.clone(),
        status: "ACTIVE".into(),
        node_id: None,
        registered: state.registered.load(Ordering::Relaxed),
        uptime_secs: state.started.elapsed().as_secs(),
    })
}

async fn metrics(State(state): State<AppState>) -> Response {
    let active = state.db.lock().expect("db lock").alerts(true).unwrap_or_default();
    let reachable = state
        .last_overview
        .lock()
        .expect("overview lock")
        .as_ref()
        .map(|o| o.mdm_reachable as u8)
        .unwrap_or(0);
    let body = format!(
        "# HELP pflex_mgmt_alerts_active Alerts currently active.\n# TYPE pflex_mgmt_alerts_active gauge\n\
         pflex_mgmt_alerts_active {}\n# HELP pflex_mgmt_mdm_reachable 1 when the last poll reached the MDM.\n\
         # TYPE pflex_mgmt_mdm_reachable gauge\npflex_mgmt_mdm_reachable {reachable}\n",
        active.len()
    );
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body).into_response()
}
