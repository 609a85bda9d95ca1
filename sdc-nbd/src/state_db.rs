//! The SDC's own SQLite files, written periodically, never on the IO path.
//!
//! - `sdc_local.db`: `active_tokens` (the token held per volume),
//!   `pending_io_operations` (requests in flight per volume at the last
//!   snapshot), `performance_metrics` (a time series of per-volume totals
//!   and latency quantiles, pruned after a day);
//! - `sdc_chunks.db`: `volume_mappings_local` (the mappings as last
//!   fetched) and `io_stats` (cumulative per-volume, per-op counters).
//!
//! Nothing reads these files back to serve IO: the MDM is the source of
//! truth for mappings and tokens. They are the SDC's local record for
//! operators and for post-mortems, as in the seed's design.

use std::path::Path;

use rusqlite::{params, Connection};

/// Why the state files could not be written.
#[derive(Debug, thiserror::Error)]
pub enum StateDbError {
    #[error("sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),
}

/// A snapshot of one volume, taken on the async side and written here.
#[derive(Debug, Clone, Default)]
pub struct VolumeSnapshot {
    pub volume_id: u64,
    pub name: String,
    pub size_bytes: u64,
    pub access_mode: String,
    pub mapping_gen: u64,
    pub epoch: u64,
    pub token_id: Option<u64>,
    pub token_expires_at: u64,
    pub in_flight: i64,
    /// `(op, ops, bytes, errors, p50_us, p99_us)`.
    pub ops: Vec<(&'static str, u64, u64, u64, u64, u64)>,
}

/// Both database files, opened once.
pub struct StateDb {
    local: Connection,
    chunks: Connection,
}

const LOCAL_SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS active_tokens (
    volume_id INTEGER PRIMARY KEY,
    token_id INTEGER NOT NULL,
    access_mode TEXT NOT NULL,
    mapping_gen INTEGER NOT NULL,
    expires_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS pending_io_operations (
    volume_id INTEGER PRIMARY KEY,
    in_flight INTEGER NOT NULL,
    recorded_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS performance_metrics (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    recorded_at INTEGER NOT NULL,
    volume_id INTEGER NOT NULL,
    op TEXT NOT NULL,
    ops INTEGER NOT NULL,
    bytes INTEGER NOT NULL,
    errors INTEGER NOT NULL,
    p50_us INTEGER NOT NULL,
    p99_us INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS performance_metrics_time ON performance_metrics (recorded_at);
";

const CHUNKS_SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS volume_mappings_local (
    volume_id INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    size_bytes INTEGER NOT NULL,
    access_mode TEXT NOT NULL,
    mapping_gen INTEGER NOT NULL,
    epoch INTEGER NOT NULL,
    updated_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS io_stats (
    volume_id INTEGER NOT NULL,
    op TEXT NOT NULL,
    ops INTEGER NOT NULL,
    bytes INTEGER NOT NULL,
    errors INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    PRIMARY KEY (volume_id, op)
);
";

/// How long performance samples are kept.
const METRICS_RETENTION_SECS: u64 = 24 * 3600;

impl StateDb {
    pub fn open(dir: &Path) -> Result<Self, StateDbError> {
        let local = Connection::open(dir.join("sdc_local.db"))?;
        let chunks = Connection::open(dir.join("sdc_chunks.db"))?;
        for c in [&local, &chunks] {
            c.pragma_update(None, "journal_mode", "WAL")?;
            c.pragma_update(None, "synchronous", "NORMAL")?;
        }
        local.execute_batch(LOCAL_SCHEMA)?;
        chunks.execute_batch(CHUNKS_SCHEMA)?;
        Ok(Self { local, chunks })
    }

    /// Writes one snapshot of every mapped volume. Volumes absent from
    /// `volumes` are no longer mapped and leave the mapping/token tables.
    pub fn record(&mut self, now: u64, volumes: &[VolumeSnapshot]) -> Result<(), StateDbError> {
        let ids: Vec<i64> = volumes.iter().map(|v| v.volume_id as i64).collect();
        let keep = |table: &str| -> String {
            let list = ids.iter().map(|i| i.to_string()).collect::<Vec<_>>().join(",");
            format!("DELETE FROM {table} WHERE volume_id NOT IN ({list})")
        };

        let tx = self.local.transaction()?;
        tx.execute(&keep("active_tokens"), [])?;
        tx.execute(&keep("pending_io_operations"), [])?;
        for v in volumes {
            if let Some(token_id) = v.token_id {
                tx.execute(
                    "INSERT INTO active_tokens (volume_id, token_id, access_mode, mapping_gen, expires_at, updated_at)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                     ON CONFLICT (volume_id) DO UPDATE SET token_id = ?2, access_mode = ?3,
                       mapping_gen = ?4, expires_at = ?5, updated_at = ?6",
                    params![v.volume_id as i64, token_id as i64, v.access_mode, v.mapping_gen as i64,
                            v.token_expires_at as i64, now as i64],
                )?;
            }
            tx.execute(
                "INSERT INTO pending_io_operations (volume_id, in_flight, recorded_at) VALUES (?1, ?2, ?3)
                 ON CONFLICT (volume_id) DO UPDATE SET in_flight = ?2, recorded_at = ?3",
                params![v.volume_id as i64, v.in_flight, now as i64],
            )?;
            for (op, ops, bytes, errors, p50, p99) in &v.ops {
                tx.execute(
                    "INSERT INTO performance_metrics (recorded_at, volume_id, op, ops, bytes, errors, p50_us, p99_us)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                    params![now as i64, v.volume_id as i64, op, *ops as i64, *bytes as i64,
                            *errors as i64, *p50 as i64, *p99 as i64],
                )?;
            }
        }
        tx.execute(
            "DELETE FROM performance_metrics WHERE recorded_at < ?1",
            params![now.saturating_sub(METRICS_RETENTION_SECS) as i64],
        )?;
        tx.commit()?;

        let tx = self.chunks.transaction()?;
        tx.execute(&keep("volume_mappings_local"), [])?;
        tx.execute(&keep("io_stats"), [])?;
        for v in volumes {
            tx.execute(
                "INSERT INTO volume_mappings_local (volume_id, name, size_bytes, access_mode, mapping_gen, epoch, updated_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
                 ON CONFLICT (volume_id) DO UPDATE SET name = ?2, size_bytes = ?3, access_mode = ?4,
                   mapping_gen = ?5, epoch = ?6, updated_at = ?7",
                params![v.volume_id as i64, v.name, v.size_bytes as i64, v.access_mode,
                        v.mapping_gen as i64, v.epoch as i64, now as i64],
            )?;
            for (op, ops, bytes, errors, _, _) in &v.ops {
                tx.execute(
                    "INSERT INTO io_stats (volume_id, op, ops, bytes, errors, updated_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                     ON CONFLICT (volume_id, op) DO UPDATE SET ops = ?3, bytes = ?4, errors = ?5, updated_at = ?6",
                    params![v.volume_id as i64, op, *ops as i64, *bytes as i64, *errors as i64, now as i64],
                )?;
            }
        }
        tx.commit()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshots_replace_and_prune() {
        let dir = tempfile::tempdir().unwrap();
        let mut db = StateDb::open(dir.path()).unwrap();
        let v = |id: u64| VolumeSnapshot {
            volume_id: id,
            name: format!("vol{id}"),
            size_bytes: 1 << 30,
            access_mode: "readWrite".into(),
            mapping_gen: 1,
            epoch: 2,
            token_id: Some(id * 10),
            token_expires_at: 99,
            in_flight: 3,
            ops: vec![("read", 5, 4096, 0, 100, 200)],
        };
        db.record(1000, &[v(1), v(2)]).unwrap();
        db.record(1005, &[v(2)]).unwrap();
        let count =
            |c: &Connection, sql: &str| -> i64 { c.query_row(sql, [], |r| r.get(0)).unwrap() };
        assert_eq!(count(&db.local, "SELECT COUNT(*) FROM active_tokens"), 1);
        assert_eq!(count(&db.local, "SELECT token_id FROM active_tokens"), 20);
        assert_eq!(count(&db.local, "SELECT COUNT(*) FROM performance_metrics"), 3);
        assert_eq!(count(&db.chunks, "SELECT COUNT(*) FROM volume_mappings_local"), 1);
        assert_eq!(count(&db.chunks, "SELECT ops FROM io_stats WHERE volume_id = 2"), 5);
        db.record(1000 + METRICS_RETENTION_SECS + 10, &[]).unwrap();
        assert_eq!(count(&db.local, "SELECT COUNT(*) FROM performance_metrics"), 0);
        assert_eq!(count(&db.chunks, "SELECT COUNT(*) FROM io_stats"), 0);
    }
}
