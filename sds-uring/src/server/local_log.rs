//! This node's own records in `sds_local.db`: verified tokens and a local
//! health log.
//!
//! The chunk store owns the database and its schema (it creates
//! `verified_tokens` and `local_health_log` too); these tables are written from one background thread with its own connection,
//! so recording never waits on the data path. Records are diagnostic: the
//! in-memory token cache is what requests are checked against, and after a
//! restart an SDC presents its token again (`NoToken` tells it to).

use std::path::Path;
use std::sync::mpsc;

use pflex_proto::token::{IoToken, SignedToken};

/// One thing to record.
enum Record {
    Token { token: IoToken, signature: [u8; pflex_proto::token::SIGNATURE_LEN], verified_at: u64 },
    Health { at: u64, level: &'static str, event: &'static str, detail: String },
}

/// Handle to the recording thread; cheap to share.
pub struct LocalLog {
    records: Option<mpsc::Sender<Record>>,
}

impl LocalLog {
    /// Writes to the tables the chunk store created in `db_path`
    /// (`sds_local.db`) from a background thread. If the database cannot be
    /// opened the log is disabled (with a warning): it must never stop the
    /// node from serving.
    pub fn open(db_path: &Path) -> LocalLog {
        let path = db_path.to_path_buf();
        let (tx, rx) = mpsc::channel::<Record>();
        let spawned = std::thread::Builder::new()
            .name("sds-local-log".into())
            .spawn(move || run_log_thread(&path, rx));
        match spawned {
            Ok(_) => LocalLog { records: Some(tx) },
            Err(e) => {
                tracing::warn!(error = %e, "local log disabled: cannot start its thread");
                LocalLog { records: None }
            }
        }
    }

    /// A log that records nothing (tests).
    pub fn disabled() -> LocalLog {
        LocalLog { records: None }
    }

    pub fn token_verified(&self, signed: &SignedToken) {
        self.send(Record::Token {
            token: signed.token.clone(),
            signature: signed.signature,
            verified_at: pflex_proto::unix_now(),
        });
    }

    /// An event worth keeping in the node's own history.
    pub fn health(&self, event: &'static str, detail: impl Into<String>) {
        self.event("info", event, detail);
    }

    /// A warning in the node's own history.
    pub fn warning(&self, event: &'static str, detail: impl Into<String>) {
        self.event("warn", event, detail);
    }

    fn event(&self, level: &'static str, event: &'static str, detail: impl Into<String>) {
        let at = pflex_proto::unix_now();
        self.send(Record::Health { at, level, event, detail: detail.into() });
    }

    fn send(&self, record: Record) {
        if let Some(tx) = &self.records {
            let _ = tx.send(record);
        }
    }
}

fn run_log_thread(path: &Path, records: mpsc::Receiver<Record>) {
    let db = match open_db(path) {
        Ok(db) => db,
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "local log disabled");
            for _ in records {}
            return;
        }
    };
    for record in records {
        let outcome = match &record {
            Record::Token { token, signature, verified_at } => db.execute(
                "INSERT OR REPLACE INTO verified_tokens
                 (token_id, volume_id, sdc_id, access_mode, mapping_gen, expires_at, signature,
                  verified_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                rusqlite::params![
                    token.token_id as i64,
                    token.volume_id as i64,
                    token.sdc_id as i64,
                    token.mode.as_str(),
                    token.mapping_gen as i64,
                    token.expires_at as i64,
                    &signature[..],
                    *verified_at as i64
                ],
            ),
            Record::Health { at, level, event, detail } => db.execute(
                "INSERT INTO local_health_log (at, level, event, detail) VALUES (?1, ?2, ?3, ?4)",
                rusqlite::params![*at as i64, level, event, detail],
            ),
        };
        if let Err(e) = outcome {
            tracing::warn!(error = %e, "cannot write to the local log");
        }
    }
}

fn open_db(path: &Path) -> rusqlite::Result<rusqlite::Connection> {
    let db = rusqlite::Connection::open(path)?;
    db.busy_timeout(std::time::Duration::from_secs(10))?;
    Ok(db)
}

#[cfg(test)]
mod tests {
    use super::*;
    use pflex_proto::token::AccessMode;

    /// The two tables as the chunk store creates them.
    const STORE_TABLES: &str = "
        CREATE TABLE verified_tokens (token_id INTEGER PRIMARY KEY, volume_id INTEGER NOT NULL,
            sdc_id INTEGER NOT NULL, access_mode TEXT NOT NULL, mapping_gen INTEGER NOT NULL,
            expires_at INTEGER NOT NULL, signature BLOB NOT NULL, verified_at INTEGER NOT NULL);
        CREATE TABLE local_health_log (id INTEGER PRIMARY KEY AUTOINCREMENT, at INTEGER NOT NULL,
            level TEXT NOT NULL, event TEXT NOT NULL, detail TEXT NOT NULL DEFAULT '');";

    #[test]
    fn records_tokens_and_health_events() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sds_local.db");
        rusqlite::Connection::open(&path).unwrap().execute_batch(STORE_TABLES).unwrap();
        let log = LocalLog::open(&path);
        let token = IoToken {
            token_id: 5,
            volume_id: 2,
            sdc_id: 3,
            mode: AccessMode::ReadWrite,
            mapping_gen: 1,
            expires_at: 99,
        };
        log.token_verified(&SignedToken {
            token,
            signature: [9; pflex_proto::token::SIGNATURE_LEN],
        });
        log.health("registered", "node 4");
        drop(log);
        let db = rusqlite::Connection::open(&path).unwrap();
        db.busy_timeout(std::time::Duration::from_secs(5)).unwrap();
        let mut found = 0;
        for _ in 0..200 {
            found = db
                .query_row("SELECT count(*) FROM local_health_log", [], |r| r.get::<_, i64>(0))
                .unwrap_or(0);
            if found == 1 {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert_eq!(found, 1);
        let mode: String = db
            .query_row("SELECT access_mode FROM verified_tokens WHERE token_id = 5", [], |r| {
                r.get(0)
            })
            .unwrap();
        assert_eq!(mode, "readWrite");
    }
}
