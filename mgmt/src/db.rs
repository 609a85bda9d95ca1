//! `mgmt.db`: users, sessions, alerts with their history, monitoring
//! samples and per-component poll state. Owned by the MGMT process alone.

use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use rusqlite::{params, Connection, OptionalExtension};
use sha2::{Digest, Sha256};

/// Errors of the dashboard's database.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("mgmt.db: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("mgmt data dir: {0}")]
    Io(#[from] std::io::Error),
}

const MIGRATIONS: &[&str] = &[r#"
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
"#];

/// Monitoring samples kept (older ones are pruned at each insert).
const MONITORING_ROWS_KEPT: i64 = 5000;
/// Dashboard sessions last this long.
pub const SESSION_SECS: u64 = 12 * 3600;

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

/// Salted, iterated SHA-256 (100 000 rounds): slows down guessing from a stolen mgmt.db.
fn hash_password(salt: &str, password: &str) -> String {
    let mut h: [u8; 32] = Sha256::digest(format!("{salt}:{password}")).into();
    for _ in 0..100_000 {
        h = Sha256::digest(h).into();
    }
    hex::encode(h)
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
        let salt = hex::encode(pflex_proto::random_bytes::<16>());
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .mode(0o600)
            .open(password_file)?;
        use std::io::Write;
        writeln!(f, "{password}")?;
        self.conn.execute(
            "INSERT INTO users (username, salt, password_hash, created_at) VALUES ('admin', ?1, ?2, ?3)",
            params![salt, hash_password(&salt, &password), now() as i64],
        )?;
        Ok(())
    }

    /// Checks a login; on success returns a new session token.
    pub fn login(&self, username: &str, password: &str) -> Result<Option<String>, DbError> {
        let row: Option<(i64, String, String)> = self
            .conn
            .query_row(
                "SELECT id, salt, password_hash FROM users WHERE username = ?1",
                [username],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .optional()?;
        let Some((user_id, salt, stored)) = row else { return Ok(None) };
        if hash_password(&salt, password) != stored {
            return Ok(None);
        }
        let token = hex::encode(pflex_proto::random_bytes::<24>());
        let t = now();
        self.conn.execute("DELETE FROM sessions WHERE expires_at < ?1", [t as i64])?;
        self.conn.execute(
            "INSERT INTO sessions (token_hash, user_id, created_at, expires_at) VALUES (?1, ?2, ?3, ?4)",
            params![hash_token(&token), user_id, t as i64, (t + SESSION_SECS) as i64],
        )?;
        Ok(Some(token))
    }

    /// The user name of a live session.
    pub fn session_user(&self, token: &str) -> Result<Option<String>, DbError> {
        Ok(self
            .conn
            .query_row(
                "SELECT u.username FROM sessions s JOIN users u ON u.id = s.user_id
                 WHERE s.token_hash = ?1 AND s.expires_at > ?2",
                params![hash_token(token), now() as i64],
                |r| r.get(0),
            )
            .optional()?)
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
    fn login_and_sessions() {
        let dir = std::env::temp_dir().join(format!("pflex-mgmt-login-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let db = MgmtDb::open(&dir.join("mgmt.db")).unwrap();
        db.ensure_admin(&dir.join("admin_password")).unwrap();
        let pw = std::fs::read_to_string(dir.join("admin_password")).unwrap();
        assert!(db.login("admin", "wrong").unwrap().is_none());
        assert!(db.login("nobody", pw.trim()).unwrap().is_none());
        let token = db.login("admin", pw.trim()).unwrap().expect("login");
        assert_eq!(db.session_user(&token).unwrap().as_deref(), Some("admin"));
        assert!(db.session_user("forged").unwrap().is_none());
        db.logout(&token).unwrap();
        assert!(db.session_user(&token).unwrap().is_none());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
