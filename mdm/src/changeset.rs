//! What a batch of requests changed, as a SQLite changeset, and how a
//! replica applies it.
//!
//! A replicated MDM does not ship requests to its peers: the leader runs a
//! batch as usual, records the net effect on every table with SQLite's
//! session extension, rolls the transaction back and proposes the changeset
//! to the Raft log; every member (the leader too) then applies committed
//! changesets in log order. Replicas cannot diverge through clocks, random
//! credentials or in-memory state of the leader: they receive rows, not
//! decisions. Rows written by triggers are part of the changeset, so the
//! applying connection runs with triggers disabled (they would apply the
//! same effect twice).
//!
//! `sqlite_sequence` (the `AUTOINCREMENT` high-water marks) has no primary
//! key and so is not recorded; the `id_high_water` table mirrors it through
//! triggers and [`apply`] raises `sqlite_sequence` to it, so an id the
//! leader used once (even for a row created and deleted in one batch) is
//! never given again by the next leader.
//!
//! rusqlite does not wrap the session API without generating bindings at
//! build time (which needs libclang); the few functions used are declared
//! here. The bundled SQLite is built with `SQLITE_ENABLE_SESSION` (see
//! `.cargo/config.toml`).

use std::os::raw::{c_char, c_int, c_void};

use rusqlite::{ffi, Connection};

/// Why a changeset could not be recorded or applied.
#[derive(Debug, thiserror::Error)]
pub enum ChangesetError {
    #[error("sqlite session: {what} failed with code {code}")]
    Session { what: &'static str, code: c_int },
    #[error("a changeset does not apply cleanly (conflict kind {kind} on {table}): the replica has diverged")]
    Conflict { table: String, kind: c_int },
    #[error("applying a changeset failed with code {code}")]
    Apply { code: c_int },
    #[error("a changeset of {0} bytes is too large")]
    TooLarge(usize),
    #[error("sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),
}

#[allow(non_camel_case_types)]
enum sqlite3_session {}
#[allow(non_camel_case_types)]
enum sqlite3_changeset_iter {}

extern "C" {
    fn sqlite3session_create(
        db: *mut ffi::sqlite3,
        db_name: *const c_char,
        session: *mut *mut sqlite3_session,
    ) -> c_int;
    fn sqlite3session_attach(session: *mut sqlite3_session, table: *const c_char) -> c_int;
    fn sqlite3session_changeset(
        session: *mut sqlite3_session,
        size: *mut c_int,
        changeset: *mut *mut c_void,
    ) -> c_int;
    fn sqlite3session_delete(session: *mut sqlite3_session);
    fn sqlite3changeset_apply(
        db: *mut ffi::sqlite3,
        size: c_int,
        changeset: *mut c_void,
        filter: Option<unsafe extern "C" fn(*mut c_void, *const c_char) -> c_int>,
        conflict: Option<
            unsafe extern "C" fn(*mut c_void, c_int, *mut sqlite3_changeset_iter) -> c_int,
        >,
        context: *mut c_void,
    ) -> c_int;
    fn sqlite3changeset_op(
        iter: *mut sqlite3_changeset_iter,
        table: *mut *const c_char,
        columns: *mut c_int,
        op: *mut c_int,
        indirect: *mut c_int,
    ) -> c_int;
}

/// `SQLITE_CHANGESET_ABORT`: stop at the first conflict, undo the apply.
const CHANGESET_ABORT: c_int = 2;

/// Records every change made through one connection until [`finish`].
///
/// [`finish`]: Recorder::finish
pub struct Recorder<'conn> {
    session: *mut sqlite3_session,
    _conn: std::marker::PhantomData<&'conn Connection>,
}

impl<'conn> Recorder<'conn> {
    /// Starts recording changes to every table of `main` made through `conn`.
    pub fn start(conn: &'conn Connection) -> Result<Self, ChangesetError> {
        let mut session = std::ptr::null_mut();
        // SAFETY: `conn.handle()` is a live connection for 'conn, which the
        // recorder borrows; "main" is a NUL-terminated string; on success
        // `session` is a valid session we own and delete in `Drop`.
        let code = unsafe { sqlite3session_create(conn.handle(), c"main".as_ptr(), &mut session) };
        if code != ffi::SQLITE_OK {
            return Err(ChangesetError::Session { what: "create", code });
        }
        let recorder = Self { session, _conn: std::marker::PhantomData };
        // SAFETY: `session` is valid (created above); a null table name
        // attaches every table.
        let code = unsafe { sqlite3session_attach(recorder.session, std::ptr::null()) };
        if code != ffi::SQLITE_OK {
            return Err(ChangesetError::Session { what: "attach", code });
        }
        Ok(recorder)
    }

    /// The net changes since [`Recorder::start`] (rows changed and changed
    /// back, or inserted and deleted, are left out); empty when nothing changed.
    pub fn finish(self) -> Result<Vec<u8>, ChangesetError> {
        let mut size: c_int = 0;
        let mut buffer: *mut c_void = std::ptr::null_mut();
        // SAFETY: `self.session` is valid; SQLite allocates `buffer` (or
        // leaves it null when empty) and we free it with `sqlite3_free`.
        let code = unsafe { sqlite3session_changeset(self.session, &mut size, &mut buffer) };
        if code != ffi::SQLITE_OK {
            return Err(ChangesetError::Session { what: "changeset", code });
        }
        let bytes = if buffer.is_null() || size <= 0 {
            Vec::new()
        } else {
            // SAFETY: SQLite returned `size` readable bytes at `buffer`.
            unsafe { std::slice::from_raw_parts(buffer as *const u8, size as usize) }.to_vec()
        };
        // SAFETY: `buffer` came from SQLite's allocator (null is allowed).
        unsafe { ffi::sqlite3_free(buffer) };
        Ok(bytes)
    }
}

impl Drop for Recorder<'_> {
    fn drop(&mut self) {
        // SAFETY: the session was created in `start` and is deleted once.
        unsafe { sqlite3session_delete(self.session) };
    }
}

/// The first conflict met while applying.
#[derive(Default)]
struct ConflictSeen {
    table: String,
    kind: c_int,
}

unsafe extern "C" fn on_conflict(
    context: *mut c_void,
    kind: c_int,
    iter: *mut sqlite3_changeset_iter,
) -> c_int {
    // SAFETY: `context` is the `ConflictSeen` passed by `apply`, alive for
    // the whole call of `sqlite3changeset_apply`.
    let seen = unsafe { &mut *(context as *mut ConflictSeen) };
    let mut table: *const c_char = std::ptr::null();
    let (mut columns, mut op, mut indirect) = (0, 0, 0);
    // SAFETY: `iter` is the iterator SQLite passes to this callback.
    let code =
        unsafe { sqlite3changeset_op(iter, &mut table, &mut columns, &mut op, &mut indirect) };
    if code == ffi::SQLITE_OK && !table.is_null() {
        // SAFETY: SQLite returns a NUL-terminated table name valid for the
        // duration of the callback; we copy it.
        seen.table = unsafe { std::ffi::CStr::from_ptr(table) }.to_string_lossy().into_owned();
    }
    seen.kind = kind;
    CHANGESET_ABORT
}

/// Applies `changes` through `conn`, which must have triggers disabled (see
/// [`applier_settings`]) and be inside a transaction; a conflict means this
/// replica differs from the leader and is an error, never skipped.
pub fn apply(conn: &Connection, changes: &[u8]) -> Result<(), ChangesetError> {
    if !changes.is_empty() {
        let size =
            c_int::try_from(changes.len()).map_err(|_| ChangesetError::TooLarge(changes.len()))?;
        let mut seen = ConflictSeen::default();
        // SAFETY: `conn.handle()` is live; SQLite only reads `size` bytes of
        // the changeset (the pointer is `*mut` in its signature only); the
        // context outlives the call.
        let code = unsafe {
            sqlite3changeset_apply(
                conn.handle(),
                size,
                changes.as_ptr() as *mut c_void,
                None,
                Some(on_conflict),
                &mut seen as *mut ConflictSeen as *mut c_void,
            )
        };
        if seen.kind != 0 {
            return Err(ChangesetError::Conflict { table: seen.table, kind: seen.kind });
        }
        if code != ffi::SQLITE_OK {
            return Err(ChangesetError::Apply { code });
        }
    }
    conn.execute_batch(
        "UPDATE sqlite_sequence SET seq = h.seq FROM id_high_water h
         WHERE h.name = sqlite_sequence.name AND h.seq > sqlite_sequence.seq;
         INSERT INTO sqlite_sequence (name, seq)
         SELECT name, seq FROM id_high_water h
         WHERE NOT EXISTS (SELECT 1 FROM sqlite_sequence s WHERE s.name = h.name);",
    )?;
    Ok(())
}

/// Settings of the connection that applies changesets: triggers off (their
/// effects are in the changeset already).
pub fn applier_settings(conn: &Connection) -> Result<(), rusqlite::Error> {
    conn.set_db_config(rusqlite::config::DbConfig::SQLITE_DBCONFIG_ENABLE_TRIGGER, false)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn replica() -> Connection {
        let conn = crate::db::open_in_memory().unwrap();
        applier_settings(&conn).unwrap();
        conn
    }

    fn count(conn: &Connection, sql: &str) -> i64 {
        conn.query_row(sql, [], |r| r.get(0)).unwrap()
    }

    #[test]
    fn a_replica_that_applies_the_changeset_equals_the_leader() {
        let leader = crate::db::open_in_memory().unwrap();
        leader
            .execute_batch(
                "INSERT INTO protection_domains VALUES (1, 'pd', 0);
                 INSERT INTO storage_pools VALUES (1, 1, 'pool', 0);",
            )
            .unwrap();
        let follower = replica();
        follower.execute_batch("BEGIN").unwrap();
        // The setup itself as the first changeset.
        let setup = {
            let fresh = crate::db::open_in_memory().unwrap();
            fresh.execute_batch("BEGIN").unwrap();
            let recorder = Recorder::start(&fresh).unwrap();
            fresh
                .execute_batch(
                    "INSERT INTO protection_domains VALUES (1, 'pd', 0);
                     INSERT INTO storage_pools VALUES (1, 1, 'pool', 0);",
                )
                .unwrap();
            recorder.finish().unwrap()
        };
        apply(&follower, &setup).unwrap();
        follower.execute_batch("COMMIT").unwrap();

        // A batch: one request kept, one rolled back, one volume created and
        // deleted; triggers keep volume_totals and change_seq.
        leader.execute_batch("BEGIN").unwrap();
        let recorder = Recorder::start(&leader).unwrap();
        leader
            .execute_batch(
                "SAVEPOINT r;
                 INSERT INTO volumes (name, pool_id, size_bytes, thick, epoch, mapping_gen, created_at)
                    VALUES ('a', 1, 1048576, 0, 1, 1, 0);
                 RELEASE r;
                 SAVEPOINT r;
                 INSERT INTO volumes (name, pool_id, size_bytes, thick, epoch, mapping_gen, created_at)
                    VALUES ('b', 1, 1048576, 0, 1, 1, 0);
                 ROLLBACK TO r; RELEASE r;
                 INSERT INTO volumes (name, pool_id, size_bytes, thick, epoch, mapping_gen, created_at)
                    VALUES ('c', 1, 1048576, 0, 1, 1, 0);
                 DELETE FROM volumes WHERE name = 'c';",
            )
            .unwrap();
        let changes = recorder.finish().unwrap();
        assert!(!changes.is_empty());
        leader.execute_batch("COMMIT").unwrap();

        follower.execute_batch("BEGIN").unwrap();
        apply(&follower, &changes).unwrap();
        follower.execute_batch("COMMIT").unwrap();
        for sql in [
            "SELECT COUNT(*) FROM volumes",
            "SELECT volumes FROM volume_totals",
            "SELECT provisioned_bytes FROM volume_totals",
            "SELECT value FROM change_seq",
            "SELECT seq FROM sqlite_sequence WHERE name = 'volumes'",
        ] {
            assert_eq!(count(&leader, sql), count(&follower, sql), "{sql}");
        }
        assert_eq!(count(&follower, "SELECT seq FROM sqlite_sequence WHERE name = 'volumes'"), 2);

        // Applying it twice conflicts: a diverged replica is an error.
        follower.execute_batch("BEGIN").unwrap();
        let again = apply(&follower, &changes);
        assert!(matches!(again, Err(ChangesetError::Conflict { .. })), "{again:?}");
        follower.execute_batch("ROLLBACK").unwrap();
    }
}
