//! The dashboard's HTTP side: login, the HTML overview (refreshes itself),
//! password change and user management, `/api/overview` and `/api/alerts`
//! (JSON, session required), and the unauthenticated `/health` and
//! `/metrics` every component serves.
//!
//! Browser safety: the session cookie is `HttpOnly`, `SameSite=Strict` and,
//! over HTTPS, `Secure`; every form carries a CSRF token (the session's, or
//! for the login form one bound to a cookie of its own) checked in constant
//! time; every page has a Content-Security-Policy that allows no script, no
//! framing and forms to this origin only; every value written into HTML is
//! escaped and every attribute quoted. Accounts: see [`crate::accounts`].

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::{ConnectInfo, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Form, Json, Router};
use pflex_proto::api::ComponentStatus;
use subtle::ConstantTimeEq;

use crate::accounts::{self, Role};
use crate::db::{Session, SESSION_SECS};
use crate::Shared;

type AppState = Arc<Shared>;

pub fn router(shared: AppState) -> Router {
    Router::new()
        .route("/", get(dashboard))
        .route("/login", get(login_page).post(login))
        .route("/logout", post(logout))
        .route("/password", get(password_page).post(change_password))
        .route("/users", get(users_page).post(add_user))
        .route("/api/overview", get(api_overview))
        .route("/api/alerts", get(api_alerts))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .layer(axum::middleware::map_response(security_headers))
        .with_state(shared)
}

/// The policy of every page: no script at all, styles inline only, forms
/// to this origin, never inside a frame.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; style-src 'unsafe-inline'; \
     form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

async fn security_headers(mut response: Response) -> Response {
    let headers = response.headers_mut();
    for (name, value) in [
        (header::CONTENT_SECURITY_POLICY, CONTENT_SECURITY_POLICY),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::REFERRER_POLICY, "no-referrer"),
        (header::X_FRAME_OPTIONS, "DENY"),
        (header::CACHE_CONTROL, "no-store"),
    ] {
        headers.insert(name, HeaderValue::from_static(value));
    }
    response
}

const COOKIE: &str = "pflex_session";
const LOGIN_COOKIE: &str = "pflex_login";

fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers.get_all(header::COOKIE).iter().filter_map(|v| v.to_str().ok()).find_map(|cookies| {
        cookies.split(';').find_map(|c| {
            let (k, v) = c.trim().split_once('=')?;
            (k == name).then(|| v.to_string())
        })
    })
}

/// A `Set-Cookie` value with the flags every cookie of ours carries.
fn set_cookie(state: &Shared, name: &str, value: &str, path: &str, max_age: u64) -> String {
    let secure = if state.config.tls_dir.is_some() { "; Secure" } else { "" };
    format!("{name}={value}; HttpOnly; SameSite=Strict; Path={path}; Max-Age={max_age}{secure}")
}

fn session(state: &Shared, headers: &HeaderMap) -> Option<Session> {
    let token = cookie(headers, COOKIE)?;
    state.db.lock().ok()?.session(&token).ok().flatten()
}

fn same_secret(a: &str, b: &str) -> bool {
    !a.is_empty() && bool::from(a.as_bytes().ct_eq(b.as_bytes()))
}

/// Checks a password against a stored hash on the blocking pool, a few at
/// a time (see [`accounts::HASHING_AT_ONCE`]).
async fn verify_off_thread(state: &Shared, stored: String, salt: String, password: String) -> bool {
    let Ok(_permit) = state.hashing.acquire().await else { return false };
    tokio::task::spawn_blocking(move || accounts::verify_password(&stored, &salt, &password))
        .await
        .unwrap_or(false)
}

async fn hash_off_thread(state: &Shared, password: String) -> Option<String> {
    let _permit = state.hashing.acquire().await.ok()?;
    tokio::task::spawn_blocking(move || accounts::hash_password(&password)).await.ok()
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&#39;")
}

fn gib(b: u64) -> String {
    format!("{:.1} GiB", b as f64 / (1u64 << 30) as f64)
}

const STYLE: &str = "body{font-family:sans-serif;margin:2em;color:#222}table{border-collapse:collapse;margin-bottom:1.5em}\
td,th{border:1px solid #ccc;padding:4px 10px;text-align:left}th{background:#eee}\
.ACTIVE,.HEALTHY,.ok{color:#070}.STALE,.DEGRADED,.warning{color:#b60}.FAILED,.CRITICAL,.critical{color:#c00}\
form.inline{display:inline}";

fn page(title: &str, body: &str) -> String {
    format!(
        "<!doctype html><meta charset=\"utf-8\"><title>{}</title><style>{STYLE}</style>{body}",
        esc(title)
    )
}

fn message(status: StatusCode, text: &str) -> Response {
    (status, Html(page("pflex", &format!("<p>{}</p><p><a href=\"/\">back</a></p>", esc(text)))))
        .into_response()
}

async fn login_page(State(state): State<AppState>) -> Response {
    let csrf = hex::encode(pflex_proto::random_bytes::<16>());
    let body = format!(
        "<h1>pflex</h1><form method=\"post\" action=\"/login\">\
         <input type=\"hidden\" name=\"csrf\" value=\"{csrf}\">\
         <p>User <input name=\"username\" value=\"admin\" autocomplete=\"username\"></p>\
         <p>Password <input name=\"password\" type=\"password\" autocomplete=\"current-password\"></p>\
         <button>Log in</button></form>\
         <p>The first password is in the dashboard's data dir, file <code>admin_password</code>.</p>"
    );
    (
        [(header::SET_COOKIE, set_cookie(&state, LOGIN_COOKIE, &csrf, "/login", 3600))],
        Html(page("pflex login", &body)),
    )
        .into_response()
}

#[derive(serde::Deserialize)]
struct LoginForm {
    csrf: String,
    username: String,
    password: String,
}

async fn login(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Form(form): Form<LoginForm>,
) -> Response {
    let ip = peer.ip();
    if !same_secret(&form.csrf, &cookie(&headers, LOGIN_COOKIE).unwrap_or_default()) {
        return message(StatusCode::FORBIDDEN, "The login form expired: load it again.");
    }
    if !state.limiter.allowed(ip) {
        return message(
            StatusCode::TOO_MANY_REQUESTS,
            "Too many failed logins from this address: wait a minute.",
        );
    }
    let found = match state.db.lock().map(|db| db.credentials(&form.username)) {
        Ok(Ok(found)) => found,
        _ => return StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    };
    // An unknown name costs as much as a wrong password.
    let (stored, salt) = found
        .as_ref()
        .map(|c| (c.password_hash.clone(), c.legacy_salt.clone()))
        .unwrap_or_else(|| (accounts::decoy_hash().to_string(), String::new()));
    let matches = verify_off_thread(&state, stored, salt, form.password.clone()).await;
    let Some(creds) = found.filter(|_| matches) else {
        state.limiter.failed(ip);
        return message(StatusCode::UNAUTHORIZED, "Wrong user or password.");
    };
    state.limiter.succeeded(ip);
    let rehashed = if accounts::is_legacy(&creds.password_hash) {
        hash_off_thread(&state, form.password).await
    } else {
        None
    };
    let token = state.db.lock().map_err(|_| ()).and_then(|db| {
        if let Some(hash) = &rehashed {
            db.set_password_hash(creds.user_id, hash)
                .map_err(|e| tracing::error!("rehash: {e}"))?;
        }
        db.create_session(creds.user_id).map_err(|e| tracing::error!("login: {e}"))
    });
    match token {
        Ok(t) => (
            [(header::SET_COOKIE, set_cookie(&state, COOKIE, &t, "/", SESSION_SECS))],
            Redirect::to("/"),
        )
            .into_response(),
        Err(()) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

#[derive(serde::Deserialize)]
struct CsrfForm {
    csrf: String,
}

async fn logout(
    State(state): State<AppState>,
    headers: HeaderMap,
    Form(form): Form<CsrfForm>,
) -> Response {
    let Some(s) = session(&state, &headers) else { return Redirect::to("/login").into_response() };
    if !same_secret(&form.csrf, &s.csrf) {
        return message(StatusCode::FORBIDDEN, "Stale form: reload the page.");
    }
    if let (Some(t), Ok(db)) = (cookie(&headers, COOKIE), state.db.lock()) {
        let _ = db.logout(&t);
    }
    ([(header::SET_COOKIE, set_cookie(&state, COOKIE, "", "/", 0))], Redirect::to("/login"))
        .into_response()
}

fn csrf_input(s: &Session) -> String {
    format!("<input type=\"hidden\" name=\"csrf\" value=\"{}\">", esc(&s.csrf))
}

/// The bar at the top of every signed-in page.
fn user_bar(s: &Session) -> String {
    let users = if s.role == Role::Admin { " · <a href=\"/users\">Users</a>" } else { "" };
    format!(
        "<p>Signed in as {} ({}) · <a href=\"/\">Overview</a> · <a href=\"/password\">Change password</a>{users} \
         <form class=\"inline\" method=\"post\" action=\"/logout\">{}<button>Log out</button></form></p>",
        esc(&s.username),
        s.role.as_str(),
        csrf_input(s)
    )
}

async fn password_page(State(state): State<AppState>, headers: HeaderMap) -> Response {
    let Some(s) = session(&state, &headers) else { return Redirect::to("/login").into_response() };
    let body = format!(
        "<h1>Change password</h1>{}<form method=\"post\" action=\"/password\">{}\
         <p>Current password <input name=\"current\" type=\"password\" autocomplete=\"current-password\"></p>\
         <p>New password (at least {} characters) <input name=\"new\" type=\"password\" autocomplete=\"new-password\"></p>\
         <p>Again <input name=\"confirm\" type=\"password\" autocomplete=\"new-password\"></p>\
         <button>Change</button></form>",
        user_bar(&s),
        csrf_input(&s),
        accounts::MIN_PASSWORD_LEN
    );
    Html(page("pflex password", &body)).into_response()
}

#[derive(serde::Deserialize)]
struct PasswordForm {
    csrf: String,
    current: String,
    new: String,
    confirm: String,
}

async fn change_password(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Form(form): Form<PasswordForm>,
) -> Response {
    let Some(s) = session(&state, &headers) else { return Redirect::to("/login").into_response() };
    if !same_secret(&form.csrf, &s.csrf) {
        return message(StatusCode::FORBIDDEN, "Stale form: reload the page.");
    }
    if form.new.chars().count() < accounts::MIN_PASSWORD_LEN || form.new != form.confirm {
        return message(
            StatusCode::BAD_REQUEST,
            &format!(
                "The new password must have at least {} characters, typed the same twice.",
                accounts::MIN_PASSWORD_LEN
            ),
        );
    }
    if !state.limiter.allowed(peer.ip()) {
        return message(StatusCode::TOO_MANY_REQUESTS, "Too many failed attempts: wait a minute.");
    }
    let creds = match state.db.lock().map(|db| db.credentials_of(s.user_id)) {
        Ok(Ok(Some(c))) => c,
        _ => return StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    };
    if !verify_off_thread(&state, creds.password_hash, creds.legacy_salt, form.current).await {
        state.limiter.failed(peer.ip());
        return message(StatusCode::UNAUTHORIZED, "The current password is wrong.");
    }
    let Some(hash) = hash_off_thread(&state, form.new).await else {
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    };
    match state.db.lock().map(|db| db.set_password_hash(s.user_id, &hash)) {
        // Every session of the user ended: log in again with the new password.
        Ok(Ok(())) => {
            ([(header::SET_COOKIE, set_cookie(&state, COOKIE, "", "/", 0))], Redirect::to("/login"))
                .into_response()
        }
        _ => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

async fn users_page(State(state): State<AppState>, headers: HeaderMap) -> Response {
    let Some(s) = session(&state, &headers) else { return Redirect::to("/login").into_response() };
    if s.role != Role::Admin {
        return message(StatusCode::FORBIDDEN, "Only an admin manages users.");
    }
    let users = state.db.lock().map(|db| db.users().unwrap_or_default()).unwrap_or_default();
    let mut body =
        format!("<h1>Users</h1>{}<table><tr><th>user</th><th>role</th></tr>", user_bar(&s));
    for u in &users {
        let _ = write!(body, "<tr><td>{}</td><td>{}</td></tr>", esc(&u.username), u.role.as_str());
    }
    let _ = write!(
        body,
        "</table><h2>Add a user</h2><form method=\"post\" action=\"/users\">{}\
         <p>User <input name=\"username\"></p>\
         <p>Role <select name=\"role\"><option value=\"monitor\">monitor (read only)</option>\
         <option value=\"admin\">admin</option></select></p>\
         <p>Password (at least {} characters) <input name=\"password\" type=\"password\" autocomplete=\"new-password\"></p>\
         <button>Add</button></form>",
        csrf_input(&s),
        accounts::MIN_PASSWORD_LEN
    );
    Html(page("pflex users", &body)).into_response()
}

#[derive(serde::Deserialize)]
struct AddUserForm {
    csrf: String,
    username: String,
    role: String,
    password: String,
}

/// User names: 1 to 64 of letters, digits, `.`, `_` and `-`.
pub fn valid_username(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

async fn add_user(
    State(state): State<AppState>,
    headers: HeaderMap,
    Form(form): Form<AddUserForm>,
) -> Response {
    let Some(s) = session(&state, &headers) else { return Redirect::to("/login").into_response() };
    if s.role != Role::Admin {
        return message(StatusCode::FORBIDDEN, "Only an admin manages users.");
    }
    if !same_secret(&form.csrf, &s.csrf) {
        return message(StatusCode::FORBIDDEN, "Stale form: reload the page.");
    }
    let Some(role) = Role::parse(&form.role) else {
        return message(StatusCode::BAD_REQUEST, "The role is admin or monitor.");
    };
    if !valid_username(&form.username) {
        return message(
            StatusCode::BAD_REQUEST,
            "A user name is 1 to 64 letters, digits, '.', '_' or '-'.",
        );
    }
    if form.password.chars().count() < accounts::MIN_PASSWORD_LEN {
        return message(
            StatusCode::BAD_REQUEST,
            &format!("The password must have at least {} characters.", accounts::MIN_PASSWORD_LEN),
        );
    }
    let Some(hash) = hash_off_thread(&state, form.password).await else {
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    };
    match state.db.lock().map(|db| db.add_user(&form.username, role, &hash)) {
        Ok(Ok(true)) => {
            tracing::info!(by = %s.username, user = %form.username, role = role.as_str(), "user added");
            Redirect::to("/users").into_response()
        }
        Ok(Ok(false)) => message(StatusCode::CONFLICT, "That user exists already."),
        _ => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

async fn dashboard(State(state): State<AppState>, headers: HeaderMap) -> Response {
    let Some(s) = session(&state, &headers) else { return Redirect::to("/login").into_response() };
    let overview = state.last_overview.lock().expect("overview lock").clone();
    let alerts = state.db.lock().expect("db lock").alerts(false).unwrap_or_default();
    let mut h = format!(
        "<!doctype html><meta charset=\"utf-8\"><meta http-equiv=\"refresh\" content=\"5\"><title>pflex</title>\
         <style>{STYLE}</style><h1>pflex cluster</h1>{}",
        user_bar(&s)
    );
    let Some(o) = overview else {
        h.push_str("<p>No data yet: the first poll has not finished.</p>");
        return Html(h).into_response();
    };
    if !o.mdm_reachable {
        h.push_str("<p class=\"critical\">The MDM is unreachable.</p>");
    }
    if let (Some(hs), Some(s)) = (&o.health, &o.summary) {
        let _ = write!(
            h,
            "<h2>Overall: <span class=\"{0}\">{0}</span></h2><table><tr><th>SDS</th><th>SDC</th><th>volumes</th>\
             <th>capacity</th><th>used</th><th>provisioned</th><th>degraded chunks</th><th>rebuilds</th></tr>\
             <tr><td>{1}</td><td>{2}</td><td>{3}</td><td>{4}</td><td>{5}</td><td>{6}</td><td>{7}</td><td>{8}</td></tr></table>",
            esc(&hs.overall), s.sds_count, s.sdc_count, s.volume_count, gib(s.capacity_bytes),
            gib(s.used_bytes), gib(s.provisioned_bytes), s.degraded_chunks, s.rebuild_jobs_active
        );
        h.push_str("<h2>Components</h2><table><tr><th>type</th><th>name</th><th>status</th><th>last seen</th><th>host</th></tr>");
        for c in &hs.components {
            let _ = write!(
                h,
                "<tr><td>{}</td><td>{}</td><td class=\"{2}\">{2}</td><td>{3} s ago</td><td>{4}</td></tr>",
                c.node_type.as_str(), esc(&c.name), esc(&c.status),
                o.polled_at.saturating_sub(c.last_seen), esc(&c.host)
            );
        }
        h.push_str("</table>");
    }
    if o.mdm_members.iter().any(|(_, s)| s.as_ref().is_some_and(|s| s.replicated)) {
        h.push_str("<h2>MDM cluster</h2><table><tr><th>address</th><th>id</th><th>role</th><th>term</th><th>committed</th><th>applied</th></tr>");
        for (url, status) in &o.mdm_members {
            match status {
                Some(m) => {
                    let opt = |v: Option<u64>| v.map_or("-".to_string(), |v| v.to_string());
                    let _ = write!(
                        h,
                        "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                        esc(url), m.id, esc(&m.role.to_lowercase()), m.term,
                        opt(m.committed_index), opt(m.applied_index)
                    );
                }
                None => {
                    let _ = write!(
                        h,
                        "<tr><td>{}</td><td>-</td><td class=\"critical\">unreachable</td><td>-</td><td>-</td><td>-</td></tr>",
                        esc(url)
                    );
                }
            }
        }
        h.push_str("</table>");
    }
    h.push_str("<h2>Storage servers</h2><table><tr><th>name</th><th>fault set</th><th>pool</th><th>capacity</th><th>used</th><th>status</th><th>data</th></tr>");
    for s in &o.sds {
        let status = if s.draining { format!("{} (draining)", s.status) } else { s.status.clone() };
        let _ = write!(
            h,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td class=\"{5}\">{8}</td><td>{6}:{7}</td></tr>",
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
            "<tr><td class=\"{0}\">{0}</td><td>{1}</td><td>{2}</td><td>{3}</td><td>{4}</td></tr>",
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
    if session(&state, &headers).is_none() {
        return StatusCode::UNAUTHORIZED.into_response();
    }
    Json(state.last_overview.lock().expect("overview lock").clone()).into_response()
}

async fn api_alerts(State(state): State<AppState>, headers: HeaderMap) -> Response {
    if session(&state, &headers).is_none() {
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

#[cfg(test)]
mod tests;
