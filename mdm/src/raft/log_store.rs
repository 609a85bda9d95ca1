//! The Raft log of one MDM, in its own SQLite file (`raft-log.db`).
//!
//! One row per entry (JSON, as openraft serialises it), plus the vote, the
//! last committed and the last purged log ids. `synchronous = FULL`: an
//! entry is on disk before openraft is told it is, which is what lets a
//! majority's acknowledgement mean "committed".

use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::path::Path;
use std::sync::{Arc, Mutex};

use openraft::storage::{LogFlushed, LogState, RaftLogReader, RaftLogStorage};
use openraft::{Entry, LogId, OptionalSend, StorageError, StorageIOError, Vote};
use rusqlite::{params, Connection, OptionalExtension};

use super::{NodeId, TypeConfig};

/// The log store (cheap to clone: every clone shares the connection).
#[derive(Clone)]
pub struct LogStore {
    conn: Arc<Mutex<Connection>>,
}

fn read_err(e: impl std::error::Error + 'static) -> StorageError<NodeId> {
    StorageIOError::read_logs(&e).into()
}

fn write_err(e: impl std::error::Error + 'static) -> StorageError<NodeId> {
    StorageIOError::write_logs(&e).into()
}

impl LogStore {
    /// Opens (creating) the log at `path`.
    pub fn open(path: &Path) -> Result<Self, rusqlite::Error> {
        let conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS entries (idx INTEGER PRIMARY KEY, entry TEXT NOT NULL);
             CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);",
        )?;
        Ok(Self { conn: Arc::new(Mutex::new(conn)) })
    }

    /// Whether this log has never held anything (no vote, no entry, nothing
    /// purged): a member that has not taken part in any cluster yet.
    pub fn is_pristine(&self) -> Result<bool, rusqlite::Error> {
        self.lock().query_row(
            "SELECT NOT EXISTS (SELECT 1 FROM entries) AND NOT EXISTS (SELECT 1 FROM meta)",
            [],
            |r| r.get(0),
        )
    }

    /// Runs `work` (which writes, and so waits for an fsync) on the blocking
    /// pool rather than on the async worker that called.
    async fn write<T: Send + 'static>(
        &self,
        work: impl FnOnce(&Connection) -> Result<T, StorageError<NodeId>> + Send + 'static,
    ) -> Result<T, StorageError<NodeId>> {
        let store = self.clone();
        tokio::task::spawn_blocking(move || work(&store.lock())).await.map_err(write_err)?
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn meta<T: serde::de::DeserializeOwned>(
        conn: &Connection,
        key: &str,
    ) -> Result<Option<T>, StorageError<NodeId>> {
        let text: Option<String> = conn
            .query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
            .optional()
            .map_err(read_err)?;
        text.map(|t| serde_json::from_str(&t).map_err(read_err)).transpose()
    }

    fn set_meta(
        conn: &Connection,
        key: &str,
        value: &impl serde::Serialize,
    ) -> Result<(), StorageError<NodeId>> {
        let text = serde_json::to_string(value).map_err(write_err)?;
        conn.execute(
            "INSERT INTO meta (key, value) VALUES (?1, ?2)
             ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            params![key, text],
        )
        .map_err(write_err)?;
        Ok(())
    }

    fn last_entry_id(conn: &Connection) -> Result<Option<LogId<NodeId>>, StorageError<NodeId>> {
        let text: Option<String> = conn
            .query_row("SELECT entry FROM entries ORDER BY idx DESC LIMIT 1", [], |r| r.get(0))
            .optional()
            .map_err(read_err)?;
        text.map(|t| {
            serde_json::from_str::<Entry<TypeConfig>>(&t).map(|e| e.log_id).map_err(read_err)
        })
        .transpose()
    }
}

fn bounds(range: &impl RangeBounds<u64>) -> (i64, i64) {
    let start = match range.start_bound() {
        Bound::Included(&i) => i as i64,
        Bound::Excluded(&i) => i as i64 + 1,
        Bound::Unbounded => 0,
    };
    let end = match range.end_bound() {
        Bound::Included(&i) => i as i64,
        Bound::Excluded(&i) => i as i64 - 1,
        Bound::Unbounded => i64::MAX,
    };
    (start, end)
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<TypeConfig>>, StorageError<NodeId>> {
        let (start, end) = bounds(&range);
        let conn = self.lock();
        let mut statement = conn
            .prepare_cached("SELECT entry FROM entries WHERE idx >= ?1 AND idx <= ?2 ORDER BY idx")
            .map_err(read_err)?;
        let rows = statement
            .query_map(params![start, end], |r| r.get::<_, String>(0))
            .map_err(read_err)?;
        rows.map(|row| {
            let text = row.map_err(read_err)?;
            serde_json::from_str(&text).map_err(read_err)
        })
        .collect()
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError<NodeId>> {
        let conn = self.lock();
        let last_purged_log_id: Option<LogId<NodeId>> = Self::meta(&conn, "purged")?;
        let last_log_id = Self::last_entry_id(&conn)?.or(last_purged_log_id);
        Ok(LogState { last_purged_log_id, last_log_id })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), StorageError<NodeId>> {
        let vote = *vote;
        self.write(move |conn| Self::set_meta(conn, "vote", &vote)).await
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, StorageError<NodeId>> {
        Self::meta(&self.lock(), "vote")
    }

    async fn save_committed(
        &mut self,
        committed: Option<LogId<NodeId>>,
    ) -> Result<(), StorageError<NodeId>> {
        self.write(move |conn| Self::set_meta(conn, "committed", &committed)).await
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<NodeId>>, StorageError<NodeId>> {
        Ok(Self::meta::<Option<LogId<NodeId>>>(&self.lock(), "committed")?.flatten())
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError<NodeId>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let rows = entries
            .into_iter()
            .map(|entry| Ok((entry.log_id.index as i64, serde_json::to_string(&entry)?)))
            .collect::<Result<Vec<_>, serde_json::Error>>()
            .map_err(write_err)?;
        let store = self.clone();
        let written = tokio::task::spawn_blocking(move || -> Result<(), rusqlite::Error> {
            let mut conn = store.lock();
            let tx = conn.transaction()?;
            {
                let mut insert = tx.prepare_cached(
                    "INSERT INTO entries (idx, entry) VALUES (?1, ?2)
                     ON CONFLICT (idx) DO UPDATE SET entry = excluded.entry",
                )?;
                for (index, text) in &rows {
                    insert.execute(params![index, text])?;
                }
            }
            tx.commit()
        })
        .await
        .map_err(write_err)?;
        match written {
            Ok(()) => {
                callback.log_io_completed(Ok(()));
                Ok(())
            }
            Err(e) => {
                callback.log_io_completed(Err(std::io::Error::other(e.to_string())));
                Err(write_err(e))
            }
        }
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError<NodeId>> {
        self.write(move |conn| {
            conn.execute("DELETE FROM entries WHERE idx >= ?1", [log_id.index as i64])
                .map_err(write_err)?;
            Ok(())
        })
        .await
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError<NodeId>> {
        self.write(move |conn| {
            Self::set_meta(conn, "purged", &log_id)?;
            conn.execute("DELETE FROM entries WHERE idx <= ?1", [log_id.index as i64])
                .map_err(write_err)?;
            Ok(())
        })
        .await
    }
}
