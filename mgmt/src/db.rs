//! `mgmt.db`: users, sessions, alerts with their history, monitoring
//! samples and per-component poll state. Owned by the MGMT process alone.

use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use rusqlite::{params, Connection, OptionalExtension};
use sha2::{Digest, Sha256};

use crate::accounts::{self, Role};

/// Errors of the dashboard's database.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("mgmt.db: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("mgmt data dir: {0}")]
    Io(#[from] std::io::Error),
}

const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE users (id INTEGER PRIMARY KEY, username TEXT NOT NULL UNIQUE,
    salt TEXT NOT NULL, password_hash TEXT NOT NULL, created_at INTEGER NOT NULL);
CREATE TABLE sessions (token_hash TEXT PRIMARY KEY, user_id INTEGER NOT NULL REFERENCES users(id),
    created_at INTEGER NOT NULL, expires_at INTEGER NOT NULL);
CREATE TABLE alerts (id INTEGER PRIMARY KEY, key TEXT NOT NULL, severity TEXT NOT NULL,
    component TEXT NOT NULL, message TEXT NOT NULL, raised_at INTEGER NOT NULL,
    resolved_at INTEGER);
CREATE UNIQUE INDEX alerts_active ON alerts(key) WHERE resolved_at IS NULL;
CREATE TABLE alert_history (id INTEGER PRIMARY KEY, alert_id INTEGER NOT NULL REFERENCES alerts(id),
    event TEXT NOT NULL, at INTEGER NOT NULL, message TEXT NOT NULL);
CREATE TABLE monitoring_data (id INTEGER PRIMARY KEY, at INTEGER NOT NULL, kind TEXT NOT NULL,
    body TEXT NOT NULL);
CREATE TABLE component_monitor (name TEXT PRIMARY KEY, kind TEXT NOT NULL, status TEXT NOT NULL,
    last_poll INTEGER NOT NULL, detail TEXT NOT NULL);
CREATE TABLE mgmt_config (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"#,
    r#"
ALTER TABLE users ADD COLUMN role TEXT NOT NULL DEFAULT 'admin';
ALTER TABLE sessions ADD COLUMN csrf TEXT NOT NULL DEFAULT '';
ALTER TABLE sessions ADD COLUMN last_seen INTEGER NOT NULL DEFAULT 0;
DELETE FROM sessions;
"#,
];

/// Monitoring samples kept (older ones are pruned at each insert).
const MONITORING_ROWS_KEPT: i64 = 5000;
/// Dashboard sessions last at most this long.
pub const SESSION_SECS: u64 = 12 * 3600;
/// A session not used for this long ends.
pub const SESSION_IDLE_SECS: u64 = 30 * 60;

/// What a login needs to check a password (off the database lock).
#[derive(Debug, Clone)]
pub struct Credentials {
    pub user_id: i64,
    pub password_hash: String,
    pub legacy_salt: String,
}

/// A live session.
#[derive(Debug, Clone)]
pub struct Session {
    pub user_id: i64,
    pub username: String,
    pub role: Role,
    /// The token every form of this session must carry.
    pub csrf: String,
}

/// A user as listed to admins.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    pub username: String,
    pub role: Role,
}

/// One alert as shown on the dashboard.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Alert {
    pub id: i64,
    pub key: String,
    pub severity: String,
    pub component: String,
    pub message: String,
    pub raised_at: u64,
    pub resolved_at: Option<u64>,
}

pub struct MgmtDb {
    conn: Connection,
}

fn now() -> u64 {
    pflex_proto::unix_now()
}

fn hash_token(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

impl MgmtDb {
    pub fn open(path: &Path) -> Result<Self, DbError> {
        let mut conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.execute_batch("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")?;
        let version: i64 = conn
            .query_row("SELECT version FROM schema_version", [], |r| r.get(0))
            .optional()?
            .unwrap_or(0);
        for (i, m) in MIGRATIONS.iter().enumerate().skip(version as usize) {
            let tx = conn.transaction()?;
            tx.execute_batch(m)?;
            tx.execute("DELETE FROM schema_version", [])?;
            tx.execute("INSERT INTO schema_version (version) VALUES (?1)", [i as i64 + 1])?;
            tx.commit()?;
        }
        Ok(Self { conn })
    }

    /// Creates the `admin` user on first boot, its password in `password_file` (0600).
    pub fn ensure_admin(&self, password_file: &Path) -> Result<(), DbError> {
        let exists: Option<i64> = self
            .conn
            .query_row("SELECT id FROM users WHERE username = 'admin'", [], |r| r.get(0))
            .optional()?;
        if exists.is_some() {
            return Ok(());
        }
        let password = hex::encode(pflex_proto::random_bytes::<12>());
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .mode(0o600)
            .open(password_file)?;
        use std::io::Write;
        writeln!(f, "{password}")?;
        self.add_user("admin", Role::Admin, &accounts::hash_password(&password))?;
        Ok(())
    }

    /// Adds a user with an already hashed password; `false` if the name is taken.
    pub fn add_user(
        &self,
        username: &str,
        role: Role,
        password_hash: &str,
    ) -> Result<bool, DbError> {
        let added = self.conn.execute(
            "INSERT INTO users (username, salt, password_hash, created_at, role)
             VALUES (?1, '', ?2, ?3, ?4) ON CONFLICT(username) DO NOTHING",
            params![username, password_hash, now() as i64, role.as_str()],
        )?;
        Ok(added == 1)
    }

    /// Every user, by name.
    pub fn users(&self) -> Result<Vec<User>, DbError> {
        let mut st = self.conn.prepare("SELECT username, role FROM users ORDER BY username")?;
        let rows = st.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?;
        let mut users = Vec::new();
        for row in rows {
            let (username, role) = row?;
            users.push(User { username, role: Role::parse(&role).unwrap_or(Role::Monitor) });
        }
        Ok(users)
    }

    /// The stored hash of `username`, if that user exists.
    pub fn credentials(&self, username: &str) -> Result<Option<Credentials>, DbError> {
        Ok(self
            .conn
            .query_row(
                "SELECT id, password_hash, salt FROM users WHERE username = ?1",
                [username],
                |r| {
                    Ok(Credentials {
                        user_id: r.get(0)?,
                        password_hash: r.get(1)?,
                        legacy_salt: r.get(2)?,
                    })
                },
            )
            .optional()?)
    }

    /// The stored hash of a user, by id.
    pub fn credentials_of(&self, user_id: i64) -> Result<Option<Credentials>, DbError> {
        Ok(self
            .conn
            .query_row("SELECT id, password_hash, salt FROM users WHERE id = ?1", [user_id], |r| {
                Ok(Credentials {
                    user_id: r.get(0)?,
                    password_hash: r.get(1)?,
                    legacy_salt: r.get(2)?,
                })
            })
            .optional()?)
    }

    /// Replaces a user's password hash and ends all of its sessions.
    pub fn set_password_hash(&self, user_id: i64, password_hash: &str) -> Result<(), DbError> {
        self.conn.execute(
            "UPDATE users SET password_hash = ?1, salt = '' WHERE id = ?2",
            params![password_hash, user_id],
        )?;
        self.conn.execute("DELETE FROM sessions WHERE user_id = ?1", [user_id])?;
        Ok(())
    }

    /// Starts a session for a user whose password was checked; its token.
    pub fn create_session(&self, user_id: i64) -> Result<String, DbError> {
        let token = hex::encode(pflex_proto::random_bytes::<24>());
        let csrf = hex::encode(pflex_proto::random_bytes::<16>());
        let t = now() as i64;
        self.conn.execute(
            "DELETE FROM sessions WHERE expires_at < ?1 OR last_seen < ?2",
            params![t, t - SESSION_IDLE_SECS as i64],
        )?;
        self.conn.execute(
            "INSERT INTO sessions (token_hash, user_id, created_at, expires_at, csrf, last_seen)
             VALUES (?1, ?2, ?3, ?4, ?5, ?3)",
            params![hash_token(&token), user_id, t, t + SESSION_SECS as i64, csrf],
        )?;
        Ok(token)
    }

    /// The live session of `token` (not past its end, used within the idle
    /// limit), marked as used now.
    pub fn session(&self, token: &str) -> Result<Option<Session>, DbError> {
        let t = now() as i64;
        let found = self
            .conn
            .query_row(
                "SELECT u.id, u.username, u.role, s.csrf FROM sessions s JOIN users u ON u.id = s.user_id
                 WHERE s.token_hash = ?1 AND s.expires_at > ?2 AND s.last_seen > ?3",
                params![hash_token(token), t, t - SESSION_IDLE_SECS as i64],
                |r| {
                    Ok(Session {
                        user_id: r.get(0)?,
                        username: r.get(1)?,
                        role: Role::parse(&r.get::<_, String>(2)?).unwrap_or(Role::Monitor),
                        csrf: r.get(3)?,
                    })
                },
            )
            .optional()?;
        if found.is_some() {
            self.conn.execute(
                "UPDATE sessions SET last_seen = ?1 WHERE token_hash = ?2",
                params![t, hash_token(token)],
            )?;
        }
        Ok(found)
    }

    /// Moves a session's last use back by `secs` (tests of the idle limit).
    #[cfg(test)]
    pub fn age_session(&self, token: &str, secs: u64) -> Result<(), DbError> {
        self.conn.execute(
            "UPDATE sessions SET last_seen = last_seen - ?1 WHERE token_hash = ?2",
            params![secs as i64, hash_token(token)],
        )?;
        Ok(())
    }

    pub fn logout(&self, token: &str) -> Result<(), DbError> {
        self.conn.execute("DELETE FROM sessions WHERE token_hash = ?1", [hash_token(token)])?;
        Ok(())
    }

    /// Raises the alert `key` unless it is already active.
    pub fn raise(
        &self,
        key: &str,
        severity: &str,
        component: &str,
        message: &str,
    ) -> Result<bool, DbError> {
        let active: Option<i64> = self
            .conn
            .query_row("SELECT id FROM alerts WHERE key = ?1 AND resolved_at IS NULL", [key], |r| {
                r.get(0)
            })
            .optional()?;
        if active.is_some() {
            return Ok(false);
        }
        let t = now() as i64;
        self.conn.execute(
            "INSERT INTO alerts (key, severity, component, message, raised_at) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![key, severity, component, message, t],
        )?;
        let id = self.conn.last_insert_rowid();
        self.conn.execute(
            "INSERT INTO alert_history (alert_id, event, at, message) VALUES (?1, 'raised', ?2, ?3)",
            params![id, t, message],
        )?;
        tracing::warn!(alert = key, "{message}");
        Ok(true)
    }

    /// Resolves every active alert whose key is not in `still_true`.
    pub fn resolve_all_except(&self, still_true: &[String]) -> Result<u64, DbError> {
        let active = self.alerts(true)?;
        let t = now() as i64;
        let mut n = 0;
        for a in active.iter().filter(|a| !still_true.contains(&a.key)) {
            self.conn
                .execute("UPDATE alerts SET resolved_at = ?1 WHERE id = ?2", params![t, a.id])?;
            self.conn.execute(
                "INSERT INTO alert_history (alert_id, event, at, message) VALUES (?1, 'resolved', ?2, 'condition cleared')",
                params![a.id, t],
            )?;
            tracing::info!(alert = a.key, "resolved");
            n += 1;
        }
        Ok(n)
    }

    /// Active alerts, or the latest 100 of all.
    pub fn alerts(&self, active_only: bool) -> Result<Vec<Alert>, DbError> {
        let sql = if active_only {
            "SELECT id, key, severity, component, message, raised_at, resolved_at FROM alerts
             WHERE resolved_at IS NULL ORDER BY id DESC"
        } else {
            "SELECT id, key, severity, component, message, raised_at, resolved_at FROM alerts
             ORDER BY id DESC LIMIT 100"
        };
        let mut st = self.conn.prepare(sql)?;
        let rows = st.query_map([], |r| {
            Ok(Alert {
                id: r.get(0)?,
                key: r.get(1)?,
                severity: r.get(2)?,
                component: r.get(3)?,
                message: r.get(4)?,
                raised_at: r.get::<_, i64>(5)? as u64,
                resolved_at: r.get::<_, Option<i64>>(6)?.map(|v| v as u64),
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Stores one monitoring sample, pruning old ones.
    pub fn record_sample(&self, kind: &str, body: &str) -> Result<(), DbError> {
        self.conn.execute(
            "INSERT INTO monitoring_data (at, kind, body) VALUES (?1, ?2, ?3)",
            params![now() as i64, kind, body],
        )?;
        self.conn.execute(
            "DELETE FROM monitoring_data WHERE id <= (SELECT MAX(id) FROM monitoring_data) - ?1",
            [MONITORING_ROWS_KEPT],
        )?;
        Ok(())
    }

    /// Records the result of polling one component's mgmt port.
    pub fn record_component(
        &self,
        name: &str,
        kind: &str,
        status: &str,
        detail: &str,
    ) -> Result<(), DbError> {
        self.conn.execute(
            "INSERT INTO component_monitor (name, kind, status, last_poll, detail) VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT(name) DO UPDATE SET kind = ?2, status = ?3, last_poll = ?4, detail = ?5",
            params![name, kind, status, now() as i64, detail],
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alerts_raise_once_and_resolve() {
        let dir = std::env::temp_dir().join(format!("pflex-mgmt-db-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let db = MgmtDb::open(&dir.join("mgmt.db")).unwrap();
        assert!(db.raise("k1", "warning", "sds1", "stale").unwrap());
        assert!(!db.raise("k1", "warning", "sds1", "stale").unwrap(), "already active");
        assert!(db.raise("k2", "critical", "sds2", "failed").unwrap());
        assert_eq!(db.alerts(true).unwrap().len(), 2);
        assert_eq!(db.resolve_all_except(&["k2".to_string()]).unwrap(), 1);
        let active = db.alerts(true).unwrap();
        assert_eq!(active.len(), 1);
        assert_eq!(active[0].key, "k2");
        assert!(db.raise("k1", "warning", "sds1", "stale again").unwrap(), "re-raised");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn sessions_and_idle_expiry() {
        let dir = tempfile::tempdir().unwrap();
        let db = MgmtDb::open(&dir.path().join("mgmt.db")).unwrap();
        db.ensure_admin(&dir.path().join("admin_password")).unwrap();
        let pw = std::fs::read_to_string(dir.path().join("admin_password")).unwrap();
        let creds = db.credentials("admin").unwrap().expect("admin exists");
        assert!(creds.password_hash.starts_with("$argon2id$"));
        assert!(accounts::verify_password(&creds.password_hash, &creds.legacy_salt, pw.trim()));
        assert!(db.credentials("nobody").unwrap().is_none());
        let token = db.create_session(creds.user_id).unwrap();
        let session = db.session(&token).unwrap().expect("live");
        assert_eq!((session.username.as_str(), session.role), ("admin", Role::Admin));
        assert_eq!(session.csrf.len(), 32);
        assert!(db.session("forged").unwrap().is_none());
        db.age_session(&token, SESSION_IDLE_SECS + 1).unwrap();
        assert!(db.session(&token).unwrap().is_none(), "idle too long");
        let token = db.create_session(creds.user_id).unwrap();
        db.logout(&token).unwrap();
        assert!(db.session(&token).unwrap().is_none());
        let token = db.create_session(creds.user_id).unwrap();
        db.set_password_hash(creds.user_id, &accounts::hash_password("another password")).unwrap();
        assert!(db.session(&token).unwrap().is_none(), "a new password ends the sessions");
        assert!(db
            .add_user("ops", Role::Monitor, &accounts::hash_password("ops password 1"))
            .unwrap());
        assert!(!db.add_user("ops", Role::Admin, "x").unwrap(), "names are unique");
        assert_eq!(
            db.users().unwrap(),
            vec![
                User { username: "admin".into(), role: Role::Admin },
                User { username: "ops".into(), role: Role::Monitor },
            ]
        );
    }
}
