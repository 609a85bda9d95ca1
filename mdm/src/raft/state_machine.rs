//! The replicated state machine: `powerflex.db` itself.
//!
//! Applying an entry applies its batch's changeset (see
//! [`crate::changeset`]) on a connection of its own, with triggers off, and
//! records the entry's log id (and the membership) in `raft_applied` in the
//! same transaction: after a crash the database says exactly which entries
//! it holds. A snapshot is a page copy of the database taken by a reader
//! connection of its own (SQLite's backup API, in one step: one read
//! transaction), so entries keep being applied while it is copied; the
//! snapshot's log id is read from the copy itself. A member that receives
//! one copies it over its own database with the same API, under the
//! readers' feet (they see the old state or the new one).

use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use openraft::storage::{RaftStateMachine, Snapshot, SnapshotMeta};
use openraft::{
    Entry, EntryPayload, LogId, OptionalSend, RaftSnapshotBuilder, StorageError, StorageIOError,
    StoredMembership,
};
use rusqlite::{params, Connection, OptionalExtension};

use super::{Node, NodeId, TypeConfig};

/// The state machine (cheap to clone).
#[derive(Clone)]
pub struct StateMachine {
    conn: Arc<Mutex<Connection>>,
    /// The database file (a snapshot is copied by a connection of its own).
    db_path: PathBuf,
    /// Set while a snapshot is being copied: the WAL must not be restarted
    /// meanwhile (the restart would wait for the copy's read to end, and
    /// every apply with it).
    copying: Arc<AtomicBool>,
    /// Where snapshots are kept (`snapshot.db` and its `snapshot.json`).
    dir: PathBuf,
    /// Brings the member's admin secrets and signing keys in line with what
    /// it applied (a rotation commits them; see [`crate::secrets`]).
    adopter: crate::secrets::Adopter,
}

type Membership = StoredMembership<NodeId, Node>;

fn sm_read_err(e: impl std::error::Error + 'static) -> StorageError<NodeId> {
    StorageIOError::read_state_machine(&e).into()
}

fn sm_write_err(e: impl std::error::Error + 'static) -> StorageError<NodeId> {
    StorageIOError::write_state_machine(&e).into()
}

fn snapshot_err(e: impl std::error::Error + 'static) -> StorageError<NodeId> {
    StorageIOError::write_snapshot(None, &e).into()
}

impl StateMachine {
    /// The state machine over the (migrated) database at `db_path`;
    /// snapshots go to `dir`.
    pub fn open(
        db_path: &Path,
        dir: &Path,
        adopter: crate::secrets::Adopter,
    ) -> Result<Self, crate::db::DbError> {
        let conn = crate::db::open(db_path)?;
        crate::changeset::applier_settings(&conn)?;
        Ok(Self {
            conn: Arc::new(Mutex::new(conn)),
            db_path: db_path.to_path_buf(),
            copying: Arc::default(),
            dir: dir.to_path_buf(),
            adopter,
        })
    }

    /// Adopts the secrets and keys of what was just applied; a failure is
    /// logged (the member keeps the ones it had).
    fn adopt(&self, conn: &Connection) {
        if let Err(e) = self.adopter.adopt(conn) {
            tracing::error!(error = %e, "reading the rotated admin secrets and signing keys");
        }
    }

    /// Drops the record of applied entries (the database came from a
    /// backup, into a member whose log is empty).
    pub fn forget_applied(&self) -> Result<(), rusqlite::Error> {
        self.lock().execute("DELETE FROM raft_applied", [])?;
        Ok(())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn applied(
        conn: &Connection,
    ) -> Result<(Option<LogId<NodeId>>, Membership), StorageError<NodeId>> {
        let row: Option<(Option<String>, String)> = conn
            .query_row("SELECT log_id, membership FROM raft_applied WHERE id = 1", [], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .optional()
            .map_err(sm_read_err)?;
        match row {
            None => Ok((None, Membership::default())),
            Some((log_id, membership)) => Ok((
                log_id.map(|t| serde_json::from_str(&t)).transpose().map_err(sm_read_err)?,
                serde_json::from_str(&membership).map_err(sm_read_err)?,
            )),
        }
    }

    /// Copies the database, as of one committed state, to `target` without
    /// holding the applier's connection; returns what that copy applied.
    fn copy_to(
        &self,
        target: &Path,
    ) -> Result<(Option<LogId<NodeId>>, Membership), StorageError<NodeId>> {
        struct Copying<'a>(&'a AtomicBool);
        impl Drop for Copying<'_> {
            fn drop(&mut self) {
                self.0.store(false, Ordering::Release);
            }
        }
        {
            self.copying.store(true, Ordering::Release);
            let _copying = Copying(&self.copying);
            let source = crate::db::open_reader(&self.db_path).map_err(snapshot_err)?;
            crate::db::copy_to_file(&source, target).map_err(snapshot_err)?;
        }
        let copy = Connection::open(target).map_err(snapshot_err)?;
        Self::applied(&copy)
    }

    fn snapshot_paths(&self) -> (PathBuf, PathBuf) {
        (self.dir.join("snapshot.db"), self.dir.join("snapshot.json"))
    }

    fn keep_snapshot(
        &self,
        file: &Path,
        meta: &SnapshotMeta<NodeId, Node>,
    ) -> Result<(), std::io::Error> {
        let (db, json) = self.snapshot_paths();
        let meta_tmp = json.with_extension("json.tmp");
        std::fs::write(&meta_tmp, serde_json::to_vec(meta)?)?;
        std::fs::rename(file, &db)?;
        std::fs::rename(&meta_tmp, &json)
    }
}

fn apply_entries(
    conn: &mut Connection,
    entries: &[Entry<TypeConfig>],
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let (_, mut membership) = StateMachine::applied(&tx).map_err(|e| e.to_string())?;
    let mut last = None;
    for entry in entries {
        match &entry.payload {
            EntryPayload::Blank => {}
            EntryPayload::Normal(batch) => crate::changeset::apply(&tx, &batch.changes)?,
            EntryPayload::Membership(m) => {
                membership = StoredMembership::new(Some(entry.log_id), m.clone());
            }
        }
        last = Some(entry.log_id);
    }
    tx.execute(
        "INSERT INTO raft_applied (id, log_id, membership) VALUES (1, ?1, ?2)
         ON CONFLICT (id) DO UPDATE SET log_id = excluded.log_id, membership = excluded.membership",
        params![serde_json::to_string(&last)?, serde_json::to_string(&membership)?],
    )?;
    tx.commit()?;
    Ok(())
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachine {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError<NodeId>> {
        let machine = self.clone();
        let (done, outcome) = tokio::sync::oneshot::channel();
        // A thread of its own at a lower priority: the copy takes hundreds of
        // milliseconds of CPU at 10,000 volumes, which requests, applies and
        // the leader's lease must not wait behind.
        std::thread::Builder::new()
            .name("mdm-snapshot".to_string())
            .spawn(move || {
                lower_this_threads_priority();
                let _ = done.send(machine.build_snapshot_now());
            })
            .map_err(snapshot_err)?;
        outcome.await.map_err(snapshot_err)?
    }
}

impl StateMachine {
    fn build_snapshot_now(&self) -> Result<Snapshot<TypeConfig>, StorageError<NodeId>> {
        let building = self.dir.join("snapshot-building.db");
        let started = std::time::Instant::now();
        let (last_log_id, last_membership) = self.copy_to(&building)?;
        let data = std::fs::read(&building).map_err(snapshot_err)?;
        let snapshot_id = match &last_log_id {
            Some(id) => format!("{}-{}", id.leader_id.term, id.index),
            None => "empty".to_string(),
        };
        let meta = SnapshotMeta { last_log_id, last_membership, snapshot_id };
        self.keep_snapshot(&building, &meta).map_err(snapshot_err)?;
        tracing::info!(
            snapshot = %meta.snapshot_id,
            bytes = data.len(),
            millis = started.elapsed().as_millis() as u64,
            "built an MDM snapshot"
        );
        Ok(Snapshot { meta, snapshot: Box::new(Cursor::new(data)) })
    }
}

/// Gives the calling thread (alone: on Linux a thread's nice value is its
/// own) the lowest priority but a few; a failure leaves it as it was.
fn lower_this_threads_priority() {
    // SAFETY: `gettid` has no preconditions; `setpriority` on this thread's
    // own id changes only its scheduling priority.
    let outcome = unsafe {
        let tid = libc::gettid();
        libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, 15)
    };
    if outcome != 0 {
        tracing::debug!(error = %std::io::Error::last_os_error(), "lowering the snapshot thread's priority");
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = StateMachine;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId<NodeId>>, Membership), StorageError<NodeId>> {
        Self::applied(&self.lock())
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<()>, StorageError<NodeId>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let entries: Vec<_> = entries.into_iter().collect();
        let count = entries.len();
        let Some(last) = entries.last().map(|e| e.log_id) else {
            return Ok(Vec::new());
        };
        let machine = self.clone();
        let outcome = tokio::task::spawn_blocking(move || {
            let mut conn = machine.lock();
            apply_entries(&mut conn, &entries).map_err(|e| e.to_string())?;
            machine.adopt(&conn);
            if !machine.copying.load(Ordering::Acquire) {
                crate::db::restart_wal_if_due(&conn);
            }
            Ok::<_, String>(())
        })
        .await
        .map_err(sm_write_err)?;
        if let Err(reason) = outcome {
            tracing::error!(%reason, log_id = %last, "applying committed MDM changes failed");
            return Err(StorageIOError::apply(last, openraft::AnyError::error(reason)).into());
        }
        Ok(vec![(); count])
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(
        &mut self,
    ) -> Result<Box<Cursor<Vec<u8>>>, StorageError<NodeId>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, Node>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError<NodeId>> {
        let machine = self.clone();
        let meta = meta.clone();
        tokio::task::spawn_blocking(move || {
            let received = machine.dir.join("snapshot-received.db");
            std::fs::write(&received, snapshot.into_inner()).map_err(snapshot_err)?;
            {
                let source = Connection::open(&received).map_err(snapshot_err)?;
                let mut conn = machine.lock();
                let backup =
                    rusqlite::backup::Backup::new(&source, &mut conn).map_err(snapshot_err)?;
                backup
                    .run_to_completion(1024, std::time::Duration::ZERO, None)
                    .map_err(snapshot_err)?;
                drop(backup);
                machine.adopt(&conn);
            }
            machine.keep_snapshot(&received, &meta).map_err(snapshot_err)?;
            tracing::info!(snapshot = %meta.snapshot_id, "installed an MDM snapshot from the leader");
            Ok(())
        })
        .await
        .map_err(snapshot_err)?
    }

    async fn get_current_snapshot(
        &mut self,
    ) -> Result<Option<Snapshot<TypeConfig>>, StorageError<NodeId>> {
        let (db, json) = self.snapshot_paths();
        let meta = match std::fs::read(&json) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(sm_read_err)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(sm_read_err(e)),
        };
        let data = std::fs::read(&db).map_err(sm_read_err)?;
        Ok(Some(Snapshot { meta, snapshot: Box::new(Cursor::new(data)) }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::CommittedLeaderId;

    fn machine(dir: &Path) -> StateMachine {
        let timing = crate::keys::KeyTiming {
            publish_for: std::time::Duration::from_secs(6),
            token_ttl: std::time::Duration::from_secs(600),
        };
        let adopter = crate::secrets::Adopter {
            secrets: Arc::new(crate::secrets::AdminSecrets::new("admin", None)),
            keys: Arc::new(crate::keys::Keys::new(
                pflex_proto::token::ClusterSecret::generate(),
                timing,
                Vec::new(),
            )),
        };
        StateMachine::open(&dir.join(crate::DB_FILE), dir, adopter).unwrap()
    }

    /// Entry `index` adds protection domain `pd<index>`.
    fn entry(index: u64) -> Entry<TypeConfig> {
        let scratch = crate::db::open_in_memory().unwrap();
        scratch.execute_batch("BEGIN").unwrap();
        let recorder = crate::changeset::Recorder::start(&scratch).unwrap();
        scratch
            .execute(
                "INSERT INTO protection_domains (id, name, created_at) VALUES (?1, ?2, 1)",
                params![index, format!("pd{index}")],
            )
            .unwrap();
        let changes = recorder.finish().unwrap();
        Entry {
            log_id: LogId::new(CommittedLeaderId::new(1, 1), index),
            payload: EntryPayload::Normal(super::super::Batch { changes }),
        }
    }

    #[test]
    fn a_snapshot_copied_while_entries_apply_holds_exactly_what_its_log_id_says() {
        let dir = tempfile::tempdir().unwrap();
        let machine = machine(dir.path());
        let entries: Vec<_> = (1..=3000).map(entry).collect();
        let applier = {
            let machine = machine.clone();
            std::thread::spawn(move || {
                for entry in entries {
                    apply_entries(&mut machine.lock(), std::slice::from_ref(&entry)).unwrap();
                }
            })
        };
        let copy = dir.path().join("copy.db");
        let mut checked = 0;
        while !applier.is_finished() || checked == 0 {
            let (applied, _) = machine.copy_to(&copy).unwrap();
            let applied = applied.map_or(0, |id| id.index);
            let held: u64 = Connection::open(&copy)
                .unwrap()
                .query_row("SELECT COUNT(*) FROM protection_domains", [], |r| r.get(0))
                .unwrap();
            assert_eq!(held, applied, "the copy holds {held} entries but says {applied}");
            checked += 1;
        }
        applier.join().unwrap();
        assert!(checked > 1, "only {checked} copies were taken while entries applied");
    }
}
