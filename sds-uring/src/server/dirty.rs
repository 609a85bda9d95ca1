//! The dirty-chunk log: chunks of a PG that this node holds and its other
//! copy may lack.
//!
//! A primary records a chunk here, durably and before it applies the write,
//! when it writes the chunk while its PG is degraded (the MDM took the other
//! copy out of the set), and after a write whose forward to the secondary
//! failed (the local copy may now be ahead of the secondary's). The entries
//! are what a copy that comes back is missing: the resync job the MDM hands
//! out when it takes the copy back copies exactly these chunks (PowerFlex's
//! backward rebuild, Ceph's PG log reduced to chunk granularity), and a
//! primary never serves a logged chunk while the PG has a secondary until it
//! has copied the chunk there (so a write that failed on the secondary is
//! reconciled before either copy serves it).
//!
//! Entries live in `sds_local.db` (table `dirty_chunks`) and in memory; the
//! table is written only when a chunk enters or leaves the log, never on
//! writes to a chunk that is already in it.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use rusqlite::Connection;

/// (volume id, PG index).
pub type PgKey = (u64, u64);

/// Why the log could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum DirtyLogError {
    #[error("dirty-chunk log in {path}: {source}")]
    Db { path: PathBuf, source: rusqlite::Error },
    #[error("dirty-chunk log writer stopped")]
    Stopped,
}

/// The log (see the module docs). `Send + Sync`.
pub struct DirtyLog {
    chunks: Mutex<HashMap<PgKey, BTreeSet<u64>>>,
    /// Whether any chunk is logged: the data path's check costs one atomic
    /// load while the log is empty (the usual case).
    any: AtomicBool,
    db: Arc<Mutex<Connection>>,
    path: PathBuf,
}

impl DirtyLog {
    /// Opens (creating if needed) the table in `db_path` and loads it.
    pub fn open(db_path: &Path) -> Result<DirtyLog, DirtyLogError> {
        let failed = |source| DirtyLogError::Db { path: db_path.to_path_buf(), source };
        let conn = Connection::open(db_path).map_err(failed)?;
        conn.busy_timeout(std::time::Duration::from_secs(10)).map_err(failed)?;
        conn.pragma_update(None, "synchronous", "FULL").map_err(failed)?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS dirty_chunks (
                 volume_id INTEGER NOT NULL,
                 pg_index INTEGER NOT NULL,
                 chunk_index INTEGER NOT NULL,
                 PRIMARY KEY (volume_id, pg_index, chunk_index)
             ) WITHOUT ROWID",
        )
        .map_err(failed)?;
        let mut chunks: HashMap<PgKey, BTreeSet<u64>> = HashMap::new();
        {
            let mut stmt = conn
                .prepare("SELECT volume_id, pg_index, chunk_index FROM dirty_chunks")
                .map_err(failed)?;
            let rows = stmt
                .query_map([], |r| {
                    Ok((r.get::<_, u64>(0)?, r.get::<_, u64>(1)?, r.get::<_, u64>(2)?))
                })
                .map_err(failed)?;
            for row in rows {
                let (volume, pg, chunk) = row.map_err(failed)?;
                chunks.entry((volume, pg)).or_default().insert(chunk);
            }
        }
        Ok(DirtyLog {
            any: AtomicBool::new(!chunks.is_empty()),
            chunks: Mutex::new(chunks),
            db: Arc::new(Mutex::new(conn)),
            path: db_path.to_path_buf(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<PgKey, BTreeSet<u64>>> {
        self.chunks.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether `chunk` of the PG is logged.
    pub fn contains(&self, pg: PgKey, chunk: u64) -> bool {
        self.any.load(Ordering::Acquire)
            && self.lock().get(&pg).is_some_and(|set| set.contains(&chunk))
    }

    /// Every logged chunk of the PG, ascending.
    pub fn chunks(&self, pg: PgKey) -> Vec<u64> {
        self.lock().get(&pg).map(|set| set.iter().copied().collect()).unwrap_or_default()
    }

    /// Logged chunks over all PGs.
    pub fn len(&self) -> usize {
        self.lock().values().map(BTreeSet::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Logs `chunk` of the PG; durable when this returns. A chunk already
    /// logged costs nothing.
    pub async fn mark(&self, pg: PgKey, chunk: u64) -> Result<(), DirtyLogError> {
        if self.contains(pg, chunk) {
            return Ok(());
        }
        self.write(
            "INSERT OR IGNORE INTO dirty_chunks (volume_id, pg_index, chunk_index) VALUES (?1, ?2, ?3)",
            vec![pg.0, pg.1, chunk],
        )
        .await?;
        let mut chunks = self.lock();
        chunks.entry(pg).or_default().insert(chunk);
        self.any.store(true, Ordering::Release);
        Ok(())
    }

    /// Takes `chunk` out of the log (its other copy now has it).
    pub async fn clear(&self, pg: PgKey, chunk: u64) -> Result<(), DirtyLogError> {
        if !self.contains(pg, chunk) {
            return Ok(());
        }
        {
            let mut chunks = self.lock();
            if let Some(set) = chunks.get_mut(&pg) {
                set.remove(&chunk);
                if set.is_empty() {
                    chunks.remove(&pg);
                }
            }
            self.any.store(!chunks.is_empty(), Ordering::Release);
        }
        self.write(
            "DELETE FROM dirty_chunks WHERE volume_id = ?1 AND pg_index = ?2 AND chunk_index = ?3",
            vec![pg.0, pg.1, chunk],
        )
        .await
    }

    /// Forgets a deleted volume.
    pub async fn forget_volume(&self, volume: u64) -> Result<(), DirtyLogError> {
        self.lock().retain(|(v, _), _| *v != volume);
        self.write("DELETE FROM dirty_chunks WHERE volume_id = ?1", vec![volume]).await
    }

    /// Runs one statement with `values` as its parameters, on a blocking
    /// thread.
    async fn write(&self, sql: &'static str, values: Vec<u64>) -> Result<(), DirtyLogError> {
        let db = self.db.clone();
        let path = self.path.clone();
        tokio::task::spawn_blocking(move || {
            let conn = db.lock().unwrap_or_else(|p| p.into_inner());
            conn.execute(sql, rusqlite::params_from_iter(values))
                .map(|_| ())
                .map_err(|source| DirtyLogError::Db { path, source })
        })
        .await
        .map_err(|_| DirtyLogError::Stopped)?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn entries_survive_a_reopen_and_leave_when_cleared() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sds_local.db");
        let log = DirtyLog::open(&path).unwrap();
        log.mark((1, 0), 4).await.unwrap();
        log.mark((1, 0), 8).await.unwrap();
        log.mark((1, 0), 8).await.unwrap();
        log.mark((1, 1), 5).await.unwrap();
        log.mark((2, 0), 2).await.unwrap();
        drop(log);
        let log = DirtyLog::open(&path).unwrap();
        assert_eq!(log.chunks((1, 0)), vec![4, 8]);
        assert!(log.contains((1, 1), 5));
        log.clear((1, 0), 4).await.unwrap();
        log.clear((1, 1), 5).await.unwrap();
        log.forget_volume(2).await.unwrap();
        drop(log);
        let log = DirtyLog::open(&path).unwrap();
        assert_eq!(log.chunks((1, 0)), vec![8]);
        assert!(log.chunks((1, 1)).is_empty());
        assert!(log.chunks((2, 0)).is_empty());
        assert_eq!(log.len(), 1);
    }
}
