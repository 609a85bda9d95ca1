//! `sds_local.db`: the durable chunk map and the SDS's other local tables.
//!
//! Tables (schema version 1, `PRAGMA user_version`):
//! - `devices(device_id, path, size_bytes, added_at)`: every device that ever
//!   held chunks, so a restart can refuse a configuration that leaves one out;
//! - `chunk_map(volume_id, chunk_index, device, slot, generation)`: which slot
//!   holds which chunk; `generation` is the store-wide allocation number given
//!   when the chunk got its slot (never reused, see `store_meta`);
//! - `store_meta(key, value)`: `next_generation`;
//! - `verified_tokens` and `local_health_log`: filled by the server (token
//!   cache across restarts, local event history). The chunk store only
//!   creates them.
//!
//! The database runs in WAL mode with `synchronous = FULL`: a committed
//! transaction survives power loss. Map updates go through one writer
//! thread that commits everything queued in one transaction (group commit),
//! so many chunks allocated at once cost one `fsync`, not one each.
//! Other components open the file read-only or through their own connection
//! (WAL allows concurrent readers and serialises writers).

use std::path::Path;
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;

use rusqlite::{params, Connection, OptionalExtension};
use tokio::sync::oneshot;

use super::slots::{SlotLocation, SlotTable};
use super::{ChunkGuard, StoreError};

const SCHEMA_VERSION: i64 = 1;

const SCHEMA_V1: &str = "
CREATE TABLE devices (
    device_id   INTEGER PRIMARY KEY,
    path        TEXT NOT NULL UNIQUE,
    size_bytes  INTEGER NOT NULL,
    added_at    INTEGER NOT NULL
);
CREATE TABLE chunk_map (
    volume_id   INTEGER NOT NULL,
    chunk_index INTEGER NOT NULL,
    device      INTEGER NOT NULL REFERENCES devices(device_id),
    slot        INTEGER NOT NULL,
    generation  INTEGER NOT NULL,
    PRIMARY KEY (volume_id, chunk_index),
    UNIQUE (device, slot)
);
CREATE TABLE store_meta (
    key   TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
INSERT INTO store_meta (key, value) VALUES ('next_generation', 1);
CREATE TABLE verified_tokens (
    token_id        INTEGER PRIMARY KEY,
    volume_id       INTEGER NOT NULL,
    sdc_id          INTEGER NOT NULL,
    access_mode     TEXT NOT NULL,
    mapping_gen     INTEGER NOT NULL,
    expires_at      INTEGER NOT NULL,
    signature       BLOB NOT NULL,
    verified_at     INTEGER NOT NULL
);
CREATE TABLE local_health_log (
    id      INTEGER PRIMARY KEY AUTOINCREMENT,
    at      INTEGER NOT NULL,
    level   TEXT NOT NULL,
    event   TEXT NOT NULL,
    detail  TEXT NOT NULL DEFAULT ''
);
";

/// One row of `chunk_map` (u64 ids are stored as their i64 bit pattern).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkRow {
    pub volume_id: u64,
    pub chunk_index: u64,
    pub device_id: i64,
    pub slot: u32,
    pub generation: u64,
}

/// A device row.
#[derive(Debug, Clone)]
pub struct DeviceRow {
    pub device_id: i64,
    pub path: String,
}

/// Opens (creating and migrating) the database at `path`.
pub fn open_connection(path: &Path) -> Result<Connection, StoreError> {
    let mut conn = Connection::open(path)?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    conn.busy_timeout(std::time::Duration::from_secs(10))?;
    migrate(&mut conn)?;
    Ok(conn)
}

fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    let version: i64 = conn.pragma_query_value(None, "user_version", |row| row.get(0))?;
    if version > SCHEMA_VERSION {
        return Err(StoreError::Config(format!(
            "sds_local.db has schema version {version}, newer than this build ({SCHEMA_VERSION})"
        )));
    }
    if version < 1 {
        let tx = conn.transaction()?;
        tx.execute_batch(SCHEMA_V1)?;
        tx.pragma_update(None, "user_version", 1)?;
        tx.commit()?;
    }
    Ok(())
}

pub fn load_devices(conn: &Connection) -> Result<Vec<DeviceRow>, StoreError> {
    let mut stmt = conn.prepare("SELECT device_id, path FROM devices")?;
    let rows =
        stmt.query_map([], |row| Ok(DeviceRow { device_id: row.get(0)?, path: row.get(1)? }))?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// Records a device (or its new size); returns its id.
pub fn upsert_device(conn: &Connection, path: &str, size_bytes: u64) -> Result<i64, StoreError> {
    let now = pflex_proto::unix_now() as i64;
    conn.execute(
        "INSERT INTO devices (path, size_bytes, added_at) VALUES (?1, ?2, ?3)
         ON CONFLICT (path) DO UPDATE SET size_bytes = excluded.size_bytes",
        params![path, size_bytes as i64, now],
    )?;
    Ok(conn.query_row("SELECT device_id FROM devices WHERE path = ?1", [path], |r| r.get(0))?)
}

pub fn load_chunks(conn: &Connection) -> Result<Vec<ChunkRow>, StoreError> {
    let mut stmt =
        conn.prepare("SELECT volume_id, chunk_index, device, slot, generation FROM chunk_map")?;
    let rows = stmt.query_map([], |row| {
        Ok(ChunkRow {
            volume_id: row.get::<_, i64>(0)? as u64,
            chunk_index: row.get::<_, i64>(1)? as u64,
            device_id: row.get(2)?,
            slot: row.get(3)?,
            generation: row.get::<_, i64>(4)? as u64,
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

pub fn next_generation(conn: &Connection) -> Result<u64, StoreError> {
    let stored: Option<i64> = conn
        .query_row("SELECT value FROM store_meta WHERE key = 'next_generation'", [], |r| r.get(0))
        .optional()?;
    let highest: Option<i64> =
        conn.query_row("SELECT MAX(generation) FROM chunk_map", [], |r| r.get(0))?;
    Ok((stored.unwrap_or(1) as u64).max(highest.map_or(0, |h| h as u64 + 1)).max(1))
}

/// A change to the chunk map.
#[derive(Debug, Clone, Copy)]
pub enum MapChange {
    /// The chunk now lives in this (reserved) slot; `row` is its database form.
    Map { row: ChunkRow, location: SlotLocation },
    /// The chunk no longer holds a slot.
    Unmap { volume_id: u64, chunk_index: u64 },
}

struct MapJob {
    change: MapChange,
    reply: oneshot::Sender<Result<(), String>>,
    /// The chunk's exclusive lock, released only once the change is
    /// committed and published (or failed and undone).
    chunk_guard: ChunkGuard,
}

/// The chunk map's writer thread (group commit). After each commit it
/// publishes the changes in the [`SlotTable`]; after a failed one it gives
/// the reserved slots back. Either way the outcome does not depend on the
/// requester still waiting.
pub struct MapWriter {
    queue: Option<mpsc::Sender<MapJob>>,
    thread: Option<JoinHandle<()>>,
}

impl MapWriter {
    pub fn start(conn: Connection, slots: Arc<SlotTable>) -> std::io::Result<Self> {
        let (queue, jobs) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("sds-chunk-map".into())
            .spawn(move || write_loop(conn, jobs, &slots))?;
        Ok(Self { queue: Some(queue), thread: Some(thread) })
    }

    /// Applies `change` durably; returns once it is committed and published.
    /// A `Map` change owns its reserved slot from this call on, and the
    /// chunk stays locked by `chunk_guard` until the writer is done with it.
    pub async fn apply(
        &self,
        change: MapChange,
        chunk_guard: ChunkGuard,
    ) -> Result<(), StoreError> {
        let (reply, committed) = oneshot::channel();
        let queue = self.queue.as_ref().ok_or(StoreError::Closed)?;
        queue.send(MapJob { change, reply, chunk_guard }).map_err(|_| StoreError::Closed)?;
        committed.await.map_err(|_| StoreError::Closed)?.map_err(StoreError::MapUpdate)
    }
}

impl Drop for MapWriter {
    fn drop(&mut self) {
        drop(self.queue.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn write_loop(mut conn: Connection, jobs: mpsc::Receiver<MapJob>, slots: &SlotTable) {
    while let Ok(first) = jobs.recv() {
        let mut batch = vec![first];
        batch.extend(jobs.try_iter());
        match commit_batch(&mut conn, &batch) {
            Ok(()) => {
                for job in batch {
                    match job.change {
                        MapChange::Map { row, location } => {
                            slots.publish((row.volume_id, row.chunk_index), location)
                        }
                        MapChange::Unmap { volume_id, chunk_index } => {
                            slots.remove((volume_id, chunk_index))
                        }
                    }
                    drop(job.chunk_guard);
                    let _ = job.reply.send(Ok(()));
                }
            }
            Err(error) => {
                tracing::error!(%error, changes = batch.len(), "chunk map commit failed");
                let message = error.to_string();
                for job in batch {
                    if let MapChange::Map { location, .. } = job.change {
                        slots.unreserve(location.device, location.slot);
                    }
                    drop(job.chunk_guard);
                    let _ = job.reply.send(Err(message.clone()));
                }
            }
        }
    }
}

fn commit_batch(conn: &mut Connection, batch: &[MapJob]) -> rusqlite::Result<()> {
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    {
        let mut map = tx.prepare_cached(
            "INSERT INTO chunk_map (volume_id, chunk_index, device, slot, generation)
             VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT (volume_id, chunk_index) DO UPDATE SET
                device = excluded.device, slot = excluded.slot, generation = excluded.generation",
        )?;
        let mut unmap =
            tx.prepare_cached("DELETE FROM chunk_map WHERE volume_id = ?1 AND chunk_index = ?2")?;
        let mut generation = tx.prepare_cached(
            "UPDATE store_meta SET value = MAX(value, ?1) WHERE key = 'next_generation'",
        )?;
        for job in batch {
            match job.change {
                MapChange::Map { row, .. } => {
                    map.execute(params![
                        row.volume_id as i64,
                        row.chunk_index as i64,
                        row.device_id,
                        row.slot,
                        row.generation as i64
                    ])?;
                    generation.execute([row.generation as i64 + 1])?;
                }
                MapChange::Unmap { volume_id, chunk_index } => {
                    unmap.execute([volume_id as i64, chunk_index as i64])?;
                }
            }
        }
    }
    tx.commit()
}
