//! The dashboard's accounts through its real router (every request as the
//! HTTP server hands it over, with the peer address): CSRF, rate limit,
//! roles, password change, cookie flags and the security headers.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::{header, Request, StatusCode};
use clap::Parser;
use tower::ServiceExt;

use super::*;
use crate::{db, Config};

struct Dashboard {
    _dir: tempfile::TempDir,
    shared: Arc<Shared>,
    admin_password: String,
}

fn dashboard(tls: bool) -> Dashboard {
    let dir = tempfile::tempdir().unwrap();
    let mut args = vec!["mgmt".to_string(), "--data-dir".into(), dir.path().display().to_string()];
    if tls {
        args.extend(["--tls-dir".into(), "/nonexistent".into()]);
    }
    let config = Config::parse_from(args);
    let db = db::MgmtDb::open(&dir.path().join("mgmt.db")).unwrap();
    db.ensure_admin(&dir.path().join("admin_password")).unwrap();
    let admin_password =
        std::fs::read_to_string(dir.path().join("admin_password")).unwrap().trim().to_string();
    let shared = Arc::new(Shared {
        db: std::sync::Mutex::new(db),
        config,
        started: std::time::Instant::now(),
        last_overview: std::sync::Mutex::new(None),
        registered: std::sync::atomic::AtomicBool::new(false),
        limiter: accounts::LoginLimiter::default(),
        hashing: tokio::sync::Semaphore::new(accounts::HASHING_AT_ONCE),
    });
    Dashboard { _dir: dir, shared, admin_password }
}

struct Reply {
    status: StatusCode,
    headers: axum::http::HeaderMap,
    body: String,
}

impl Reply {
    fn set_cookie(&self, name: &str) -> Option<String> {
        self.headers
            .get_all(header::SET_COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .find(|v| v.starts_with(&format!("{name}=")))
            .map(str::to_string)
    }
    fn cookie_value(&self, name: &str) -> Option<String> {
        let c = self.set_cookie(name)?;
        Some(c.split(';').next()?.split_once('=')?.1.to_string())
    }
    /// The value of the hidden `csrf` input of the page.
    fn csrf(&self) -> String {
        let at = self.body.find("name=\"csrf\" value=\"").expect("a csrf input") + 19;
        self.body[at..at + 32].to_string()
    }
}

impl Dashboard {
    async fn send(&self, from: [u8; 4], request: Request<Body>) -> Reply {
        let mut request = request;
        request.extensions_mut().insert(ConnectInfo(SocketAddr::from((from, 40000))));
        let response = router(self.shared.clone()).oneshot(request).await.unwrap();
        let status = response.status();
        let headers = response.headers().clone();
        let bytes = axum::body::to_bytes(response.into_body(), 1 << 20).await.unwrap();
        Reply { status, headers, body: String::from_utf8_lossy(&bytes).into_owned() }
    }

    async fn get(&self, path: &str, cookie: Option<&str>) -> Reply {
        let mut r = Request::get(path);
        if let Some(c) = cookie {
            r = r.header(header::COOKIE, c);
        }
        self.send([10, 0, 0, 1], r.body(Body::empty()).unwrap()).await
    }

    async fn post(&self, from: [u8; 4], path: &str, cookie: &str, form: &[(&str, &str)]) -> Reply {
        let body =
            form.iter().map(|(k, v)| format!("{k}={}", urlencode(v))).collect::<Vec<_>>().join("&");
        let r = Request::post(path)
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .header(header::COOKIE, cookie)
            .body(Body::from(body))
            .unwrap();
        self.send(from, r).await
    }

    /// Logs in from `from`; the session cookie ("name=value") or the reply.
    async fn login(&self, from: [u8; 4], user: &str, password: &str) -> Result<String, Reply> {
        let form = self.get("/login", None).await;
        let login_cookie = format!("{LOGIN_COOKIE}={}", form.cookie_value(LOGIN_COOKIE).unwrap());
        let reply = self
            .post(
                from,
                "/login",
                &login_cookie,
                &[("csrf", &form.csrf()), ("username", user), ("password", password)],
            )
            .await;
        match reply.cookie_value(COOKIE) {
            Some(v) if reply.status == StatusCode::SEE_OTHER => Ok(format!("{COOKIE}={v}")),
            _ => Err(reply),
        }
    }
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[tokio::test]
async fn login_needs_its_form_token_and_sets_safe_cookies() {
    let d = dashboard(true);
    let page = d.get("/login", None).await;
    let csp = page.headers.get(header::CONTENT_SECURITY_POLICY).unwrap().to_str().unwrap();
    assert!(csp.contains("default-src 'none'") && csp.contains("frame-ancestors 'none'"), "{csp}");
    // A login posted from another site carries no matching form token.
    let forged = d
        .post(
            [10, 0, 0, 1],
            "/login",
            "",
            &[("csrf", &page.csrf()), ("username", "admin"), ("password", &d.admin_password)],
        )
        .await;
    assert_eq!(forged.status, StatusCode::FORBIDDEN);
    let session = d.login([10, 0, 0, 1], "admin", &d.admin_password).await.ok().expect("login");
    let form = d.get("/login", None).await;
    let login_cookie = format!("{LOGIN_COOKIE}={}", form.cookie_value(LOGIN_COOKIE).unwrap());
    let reply = d
        .post(
            [10, 0, 0, 1],
            "/login",
            &login_cookie,
            &[("csrf", &form.csrf()), ("username", "admin"), ("password", &d.admin_password)],
        )
        .await;
    let flags = reply.set_cookie(COOKIE).unwrap();
    for flag in ["HttpOnly", "SameSite=Strict", "Secure", "Path=/"] {
        assert!(flags.contains(flag), "{flag} missing: {flags}");
    }
    let home = d.get("/", Some(&session)).await;
    assert_eq!(home.status, StatusCode::OK);
    assert!(home.headers.contains_key(header::CONTENT_SECURITY_POLICY));
    assert!(home.body.contains("Signed in as admin (admin)"), "{}", home.body);
}

#[tokio::test]
async fn failed_logins_are_limited_per_address() {
    let d = dashboard(false);
    let attacker = [192, 0, 2, 7];
    for _ in 0..accounts::LoginLimiter::MAX_FAILURES {
        let reply = d.login(attacker, "admin", "not the password").await.unwrap_err();
        assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
    }
    // Now even the right password is refused from that address...
    let reply = d.login(attacker, "admin", &d.admin_password).await.unwrap_err();
    assert_eq!(reply.status, StatusCode::TOO_MANY_REQUESTS);
    // ...while the admin, elsewhere, still logs in.
    assert!(d.login([10, 0, 0, 2], "admin", &d.admin_password).await.is_ok());
}

#[tokio::test]
async fn forms_need_the_session_token_and_roles_hold() {
    let d = dashboard(false);
    let admin = d.login([10, 0, 0, 1], "admin", &d.admin_password).await.ok().unwrap();
    let users = d.get("/users", Some(&admin)).await;
    assert_eq!(users.status, StatusCode::OK);
    let csrf = users.csrf();
    let add = [("username", "ops"), ("role", "monitor"), ("password", "monitor password 1")];
    // Without the session's token (a cross-site form): refused, nothing added.
    let mut forged: Vec<(&str, &str)> = vec![("csrf", "0123456789abcdef0123456789abcdef")];
    forged.extend(add);
    assert_eq!(
        d.post([10, 0, 0, 1], "/users", &admin, &forged).await.status,
        StatusCode::FORBIDDEN
    );
    assert!(d.login([10, 0, 0, 3], "ops", "monitor password 1").await.is_err());
    let mut with: Vec<(&str, &str)> = vec![("csrf", &csrf)];
    with.extend(add);
    assert_eq!(d.post([10, 0, 0, 1], "/users", &admin, &with).await.status, StatusCode::SEE_OTHER);
    // A monitor sees the overview but manages nobody.
    let ops = d.login([10, 0, 0, 3], "ops", "monitor password 1").await.ok().unwrap();
    assert_eq!(d.get("/", Some(&ops)).await.status, StatusCode::OK);
    assert_eq!(d.get("/users", Some(&ops)).await.status, StatusCode::FORBIDDEN);
    let ops_csrf = d.get("/password", Some(&ops)).await.csrf();
    let mut again: Vec<(&str, &str)> = vec![("csrf", &ops_csrf)];
    again.extend([("username", "ops2"), ("role", "admin"), ("password", "another password 2")]);
    assert_eq!(d.post([10, 0, 0, 3], "/users", &ops, &again).await.status, StatusCode::FORBIDDEN);

    // Changing a password needs the current one, ends the sessions, and the
    // new one works where the old one no longer does.
    let csrf = d.get("/password", Some(&ops)).await.csrf();
    let change = |current: &'static str| {
        [
            ("csrf", csrf.clone()),
            ("current", current.to_string()),
            ("new", "a brand new password".into()),
            ("confirm", "a brand new password".into()),
        ]
    };
    let wrong = change("not it");
    let wrong: Vec<(&str, &str)> = wrong.iter().map(|(k, v)| (*k, v.as_str())).collect();
    assert_eq!(
        d.post([10, 0, 0, 3], "/password", &ops, &wrong).await.status,
        StatusCode::UNAUTHORIZED
    );
    let right = change("monitor password 1");
    let right: Vec<(&str, &str)> = right.iter().map(|(k, v)| (*k, v.as_str())).collect();
    assert_eq!(
        d.post([10, 0, 0, 3], "/password", &ops, &right).await.status,
        StatusCode::SEE_OTHER
    );
    assert_eq!(d.get("/", Some(&ops)).await.status, StatusCode::SEE_OTHER, "session ended");
    assert!(d.login([10, 0, 0, 4], "ops", "monitor password 1").await.is_err());
    assert!(d.login([10, 0, 0, 4], "ops", "a brand new password").await.is_ok());
}

#[test]
fn user_names() {
    assert!(valid_username("ops-1.team_a"));
    assert!(!valid_username(""));
    assert!(!valid_username("a b"));
    assert!(!valid_username("<script>"));
    assert!(!valid_username(&"x".repeat(65)));
}
