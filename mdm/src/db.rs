//! The MDM's database (`powerflex.db`) and its versioned schema.
//!
//! Migrations are an ordered list of SQL scripts; `schema_version` records
//! how many have been applied, and [`open`] applies the missing ones inside
//! one transaction, so a crash mid-upgrade leaves the previous version.
//! Only the MDM opens this file.
//!
//! Identity of every component lives in `cluster_nodes` (one id space for
//! SDS, SDC and MGMT; `(node_type, name)` is unique, so a node that
//! registers again keeps its id). Placement is compact: one row per
//! placement group (`placement_groups`), never one per chunk. Ids of nodes
//! and volumes are never reused (`AUTOINCREMENT`): an SDS may still hold
//! chunks of a deleted volume, and a new volume must not see them.

use std::path::Path;

use rusqlite::types::ValueRef;
use rusqlite::{Connection, OpenFlags};

/// Ordered schema migrations; entry `i` upgrades version `i` to `i + 1`.
const MIGRATIONS: &[&str] = &[
    // 1: the seed's model.
    r#"
    CREATE TABLE protection_domains (
        id INTEGER PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        created_at INTEGER NOT NULL
    );
    CREATE TABLE storage_pools (
        id INTEGER PRIMARY KEY,
        protection_domain_id INTEGER NOT NULL REFERENCES protection_domains(id),
        name TEXT NOT NULL UNIQUE,
        created_at INTEGER NOT NULL
    );
    CREATE TABLE fault_sets (
        id INTEGER PRIMARY KEY,
        protection_domain_id INTEGER NOT NULL REFERENCES protection_domains(id),
        name TEXT NOT NULL,
        created_at INTEGER NOT NULL,
        UNIQUE (protection_domain_id, name)
    );
    CREATE TABLE cluster_nodes (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        node_type TEXT NOT NULL CHECK (node_type IN ('SDS', 'SDC', 'MGMT')),
        name TEXT NOT NULL,
        host TEXT NOT NULL,
        control_port INTEGER NOT NULL,
        mgmt_port INTEGER NOT NULL,
        data_port INTEGER NOT NULL,
        credential_sha256 TEXT NOT NULL UNIQUE,
        registered_at INTEGER NOT NULL,
        last_seen INTEGER NOT NULL,
        UNIQUE (node_type, name)
    );
    CREATE TABLE registration_history (
        id INTEGER PRIMARY KEY,
        node_id INTEGER NOT NULL REFERENCES cluster_nodes(id),
        host TEXT NOT NULL,
        at INTEGER NOT NULL
    );
    CREATE TABLE sds_nodes (
        node_id INTEGER PRIMARY KEY REFERENCES cluster_nodes(id),
        fault_set_id INTEGER NOT NULL REFERENCES fault_sets(id),
        pool_id INTEGER NOT NULL REFERENCES storage_pools(id),
        capacity_bytes INTEGER NOT NULL,
        used_bytes INTEGER NOT NULL
    );
    CREATE TABLE sds_devices (
        id INTEGER PRIMARY KEY,
        sds_id INTEGER NOT NULL REFERENCES sds_nodes(node_id),
        path TEXT NOT NULL,
        capacity_bytes INTEGER NOT NULL,
        used_bytes INTEGER NOT NULL,
        UNIQUE (sds_id, path)
    );
    CREATE TABLE sdc_clients (
        node_id INTEGER PRIMARY KEY REFERENCES cluster_nodes(id)
    );
    CREATE TABLE volumes (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        name TEXT NOT NULL UNIQUE,
        pool_id INTEGER NOT NULL REFERENCES storage_pools(id),
        size_bytes INTEGER NOT NULL CHECK (size_bytes > 0),
        thick INTEGER NOT NULL,
        epoch INTEGER NOT NULL,
        mapping_gen INTEGER NOT NULL,
        created_at INTEGER NOT NULL
    );
    CREATE TABLE placement_groups (
        volume_id INTEGER NOT NULL REFERENCES volumes(id),
        pg_index INTEGER NOT NULL,
        primary_sds INTEGER NOT NULL REFERENCES sds_nodes(node_id),
        secondary_sds INTEGER NOT NULL REFERENCES sds_nodes(node_id),
        PRIMARY KEY (volume_id, pg_index),
        CHECK (primary_sds <> secondary_sds)
    );
    CREATE TABLE volume_mappings (
        volume_id INTEGER NOT NULL REFERENCES volumes(id),
        sdc_id INTEGER NOT NULL REFERENCES sdc_clients(node_id),
        access_mode TEXT NOT NULL CHECK (access_mode IN ('readOnly', 'readWrite')),
        mapped_at INTEGER NOT NULL,
        PRIMARY KEY (volume_id, sdc_id)
    );
    CREATE TABLE snapshots (
        id INTEGER PRIMARY KEY,
        volume_id INTEGER NOT NULL REFERENCES volumes(id),
        name TEXT NOT NULL UNIQUE,
        created_at INTEGER NOT NULL
    );
    CREATE TABLE io_tokens (
        token_id INTEGER PRIMARY KEY,
        volume_id INTEGER NOT NULL,
        sdc_id INTEGER NOT NULL,
        access_mode TEXT NOT NULL,
        mapping_gen INTEGER NOT NULL,
        epoch INTEGER NOT NULL,
        issued_at INTEGER NOT NULL,
        expires_at INTEGER NOT NULL,
        signature TEXT NOT NULL,
        ops INTEGER NOT NULL DEFAULT 0,
        bytes INTEGER NOT NULL DEFAULT 0,
        errors INTEGER NOT NULL DEFAULT 0,
        last_ack_at INTEGER
    );
    CREATE INDEX io_tokens_expiry ON io_tokens (expires_at);
    CREATE TABLE volume_io_stats (
        volume_id INTEGER NOT NULL,
        op TEXT NOT NULL,
        ops INTEGER NOT NULL,
        bytes INTEGER NOT NULL,
        errors INTEGER NOT NULL,
        PRIMARY KEY (volume_id, op)
    );
    CREATE TABLE component_health (
        node_id INTEGER PRIMARY KEY REFERENCES cluster_nodes(id),
        capacity_bytes INTEGER NOT NULL DEFAULT 0,
        used_bytes INTEGER NOT NULL DEFAULT 0,
        read_ops INTEGER NOT NULL DEFAULT 0,
        write_ops INTEGER NOT NULL DEFAULT 0,
        read_bytes INTEGER NOT NULL DEFAULT 0,
        write_bytes INTEGER NOT NULL DEFAULT 0,
        errors INTEGER NOT NULL DEFAULT 0,
        heartbeats INTEGER NOT NULL DEFAULT 0,
        updated_at INTEGER NOT NULL
    );
    CREATE TABLE heartbeat_log (
        id INTEGER PRIMARY KEY,
        node_id INTEGER NOT NULL,
        at INTEGER NOT NULL
    );
    CREATE INDEX heartbeat_log_at ON heartbeat_log (at);
    CREATE TABLE cluster_metrics (
        id INTEGER PRIMARY KEY,
        at INTEGER NOT NULL,
        capacity_bytes INTEGER NOT NULL,
        used_bytes INTEGER NOT NULL,
        provisioned_bytes INTEGER NOT NULL,
        volumes INTEGER NOT NULL,
        sds_active INTEGER NOT NULL,
        degraded_chunks INTEGER NOT NULL
    );
    CREATE TABLE rebuild_jobs (
        id INTEGER PRIMARY KEY,
        volume_id INTEGER NOT NULL,
        pg_index INTEGER NOT NULL,
        failed_sds INTEGER NOT NULL,
        source_sds INTEGER NOT NULL,
        target_sds INTEGER NOT NULL,
        state TEXT NOT NULL CHECK (state IN ('pending', 'running', 'done', 'failed')),
        created_at INTEGER NOT NULL,
        updated_at INTEGER NOT NULL
    );
    "#,
    // 2: rebuild progress; the sources look up their jobs.
    r#"
    ALTER TABLE rebuild_jobs ADD COLUMN chunks_copied INTEGER NOT NULL DEFAULT 0;
    CREATE INDEX rebuild_jobs_source ON rebuild_jobs (source_sds, state);
    "#,
    // 3: an SDS a peer could not reach, confirmed by the MDM's own probe, is
    // FAILED from `failed_at` until it is heard from again.
    r#"
    ALTER TABLE cluster_nodes ADD COLUMN failed_at INTEGER NOT NULL DEFAULT 0;
    "#,
    // 4: tombstones of deleted volumes (ids are never reused), so an SDS
    // that held copies, even one that was down at the time, learns for sure
    // that it may release them.
    r#"
    CREATE TABLE deleted_volumes (
        id INTEGER PRIMARY KEY,
        name TEXT NOT NULL,
        deleted_at INTEGER NOT NULL
    );
    "#,
    // 5: devices an SDS reported failed (until it registers again: a
    // restarted SDS tries its devices afresh).
    r#"
    ALTER TABLE sds_devices ADD COLUMN failed_reason TEXT;
    "#,
    // 6: degraded PGs (one copy out of the set, waiting to be resynced: it
    // stays in `secondary_sds`, the foreign key, and `absent_sds` names it
    // while the PG is degraded) and the kind of a copy job (a full rebuild
    // or a resync).
    r#"
    ALTER TABLE placement_groups ADD COLUMN absent_sds INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE placement_groups ADD COLUMN absent_since INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE rebuild_jobs ADD COLUMN kind TEXT NOT NULL DEFAULT 'rebuild'
        CHECK (kind IN ('rebuild', 'resync'));
    "#,
    // 7: data movement. A PG copy that moves (rebalance, drain) has its
    // receiving node in `joining_sds` until the move completes; jobs may be
    // moves and record progress; the movement policy; bytes moved per
    // second (for the rate); SDS nodes being drained or removed.
    r#"
    ALTER TABLE placement_groups ADD COLUMN joining_sds INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE sds_nodes ADD COLUMN draining INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE sds_nodes ADD COLUMN removed_at INTEGER NOT NULL DEFAULT 0;
    CREATE TABLE rebuild_jobs_v7 (
        id INTEGER PRIMARY KEY,
        volume_id INTEGER NOT NULL,
        pg_index INTEGER NOT NULL,
        failed_sds INTEGER NOT NULL,
        source_sds INTEGER NOT NULL,
        target_sds INTEGER NOT NULL,
        state TEXT NOT NULL CHECK (state IN ('pending', 'running', 'done', 'failed')),
        created_at INTEGER NOT NULL,
        updated_at INTEGER NOT NULL,
        chunks_copied INTEGER NOT NULL DEFAULT 0,
        kind TEXT NOT NULL DEFAULT 'rebuild' CHECK (kind IN ('rebuild', 'resync', 'move')),
        chunks_total INTEGER NOT NULL DEFAULT 0,
        bytes_copied INTEGER NOT NULL DEFAULT 0
    );
    INSERT INTO rebuild_jobs_v7 (id, volume_id, pg_index, failed_sds, source_sds, target_sds,
                                 state, created_at, updated_at, chunks_copied, kind)
        SELECT id, volume_id, pg_index, failed_sds, source_sds, target_sds, state, created_at,
               updated_at, chunks_copied, kind FROM rebuild_jobs;
    DROP TABLE rebuild_jobs;
    ALTER TABLE rebuild_jobs_v7 RENAME TO rebuild_jobs;
    CREATE INDEX rebuild_jobs_source ON rebuild_jobs (source_sds, state);
    CREATE TABLE movement_policy (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        mb_per_sec INTEGER NOT NULL,
        chunks_in_flight INTEGER NOT NULL,
        priority TEXT NOT NULL CHECK (priority IN ('client', 'movement'))
    );
    INSERT INTO movement_policy VALUES (1, 0, 4, 'client');
    CREATE TABLE movement_bytes (
        at INTEGER PRIMARY KEY,
        bytes INTEGER NOT NULL
    );
    "#,
    // 8: identities. One-time enrollment tokens (stored as digests), the
    // append-only audit log, and which nodes registered before credentials
    // were kept by the node (`legacy`: such a name may be claimed once more
    // by the join key or an enrollment token; an empty credential digest is
    // an admin reset, which allows the same).
    r#"
    CREATE TABLE enrollment_tokens (
        token_sha256 TEXT PRIMARY KEY,
        role TEXT NOT NULL CHECK (role IN ('SDS', 'SDC', 'MGMT')),
        name TEXT NOT NULL DEFAULT '',
        created_at INTEGER NOT NULL,
        expires_at INTEGER NOT NULL,
        used_at INTEGER NOT NULL DEFAULT 0,
        used_by INTEGER NOT NULL DEFAULT 0
    );
    ALTER TABLE cluster_nodes ADD COLUMN legacy INTEGER NOT NULL DEFAULT 0;
    UPDATE cluster_nodes SET legacy = 1;
    CREATE TABLE audit_log (
        id INTEGER PRIMARY KEY,
        at INTEGER NOT NULL,
        actor TEXT NOT NULL,
        action TEXT NOT NULL,
        target TEXT NOT NULL DEFAULT '',
        source TEXT NOT NULL DEFAULT '',
        outcome TEXT NOT NULL CHECK (outcome IN ('ok', 'refused')),
        detail TEXT NOT NULL DEFAULT ''
    );
    CREATE TRIGGER audit_log_no_update BEFORE UPDATE ON audit_log
        BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
    CREATE TRIGGER audit_log_no_delete BEFORE DELETE ON audit_log
        BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
    "#,
    // 9: token signing key generations (`pflex cluster rotate`); none
    // recorded means generation 0, the key of every earlier version.
    r#"
    CREATE TABLE signing_keys (
        generation INTEGER PRIMARY KEY,
        created_at INTEGER NOT NULL
    );
    "#,
    // 10: scale. Nothing a request or a monitor pass does may read every
    // placement group. Each PG row keeps its bytes and whether they are
    // reserved (thick); `sds_load` keeps each node's sums, maintained by
    // triggers on every change of a PG, so placing a volume reads one row
    // per node. Indexes find a node's PGs and an SDC's mappings. A change sequence numbers every
    // change of a volume's generations (and every deletion), so a heartbeat
    // reply carries only what changed since the node's cursor. Volume count
    // and provisioned bytes are kept the same way. The heartbeat log keeps
    // one row per node and minute.
    r#"
    ALTER TABLE placement_groups ADD COLUMN bytes INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE placement_groups ADD COLUMN thick INTEGER NOT NULL DEFAULT 0;
    UPDATE placement_groups SET thick = s.thick,
        bytes = (CASE WHEN placement_groups.pg_index >= s.chunks THEN 0
                 ELSE (s.chunks - placement_groups.pg_index + s.n - 1) / s.n END) * 1048576
    FROM (SELECT v.id, v.thick, (v.size_bytes + 1048575) / 1048576 AS chunks,
                 (SELECT COUNT(*) FROM placement_groups q WHERE q.volume_id = v.id) AS n
          FROM volumes v) AS s
    WHERE s.id = placement_groups.volume_id;
    CREATE INDEX placement_groups_primary ON placement_groups (primary_sds);
    CREATE INDEX placement_groups_secondary ON placement_groups (secondary_sds);
    CREATE INDEX placement_groups_joining ON placement_groups (joining_sds) WHERE joining_sds != 0;
    CREATE INDEX placement_groups_absent ON placement_groups (absent_sds) WHERE absent_sds != 0;
    CREATE INDEX volume_mappings_sdc ON volume_mappings (sdc_id);

    CREATE TABLE sds_load (
        node_id INTEGER PRIMARY KEY,
        placed INTEGER NOT NULL DEFAULT 0,
        placed_primary INTEGER NOT NULL DEFAULT 0,
        reserved INTEGER NOT NULL DEFAULT 0
    );
    INSERT INTO sds_load (node_id, placed, placed_primary, reserved)
        SELECT node, SUM(bytes), SUM(CASE WHEN is_primary THEN bytes ELSE 0 END),
               SUM(CASE WHEN thick THEN bytes ELSE 0 END)
        FROM (SELECT primary_sds AS node, bytes, thick, 1 AS is_primary FROM placement_groups
              UNION ALL SELECT secondary_sds, bytes, thick, 0 FROM placement_groups
              UNION ALL SELECT joining_sds, bytes, thick, 0 FROM placement_groups
                        WHERE joining_sds != 0)
        GROUP BY node;
    CREATE TRIGGER pg_load_insert AFTER INSERT ON placement_groups BEGIN
        INSERT OR IGNORE INTO sds_load (node_id) VALUES (NEW.primary_sds), (NEW.secondary_sds);
        INSERT OR IGNORE INTO sds_load (node_id) SELECT NEW.joining_sds WHERE NEW.joining_sds != 0;
        UPDATE sds_load SET placed = placed + NEW.bytes, placed_primary = placed_primary + NEW.bytes,
               reserved = reserved + NEW.bytes * NEW.thick WHERE node_id = NEW.primary_sds;
        UPDATE sds_load SET placed = placed + NEW.bytes, reserved = reserved + NEW.bytes * NEW.thick
               WHERE node_id = NEW.secondary_sds;
        UPDATE sds_load SET placed = placed + NEW.bytes, reserved = reserved + NEW.bytes * NEW.thick
               WHERE node_id = NEW.joining_sds AND NEW.joining_sds != 0;
    END;
    CREATE TRIGGER pg_load_delete AFTER DELETE ON placement_groups BEGIN
        UPDATE sds_load SET placed = placed - OLD.bytes, placed_primary = placed_primary - OLD.bytes,
               reserved = reserved - OLD.bytes * OLD.thick WHERE node_id = OLD.primary_sds;
        UPDATE sds_load SET placed = placed - OLD.bytes, reserved = reserved - OLD.bytes * OLD.thick
               WHERE node_id = OLD.secondary_sds;
        UPDATE sds_load SET placed = placed - OLD.bytes, reserved = reserved - OLD.bytes * OLD.thick
               WHERE node_id = OLD.joining_sds AND OLD.joining_sds != 0;
    END;
    CREATE TRIGGER pg_load_update
    AFTER UPDATE OF primary_sds, secondary_sds, joining_sds, bytes, thick ON placement_groups BEGIN
        UPDATE sds_load SET placed = placed - OLD.bytes, placed_primary = placed_primary - OLD.bytes,
               reserved = reserved - OLD.bytes * OLD.thick WHERE node_id = OLD.primary_sds;
        UPDATE sds_load SET placed = placed - OLD.bytes, reserved = reserved - OLD.bytes * OLD.thick
               WHERE node_id = OLD.secondary_sds;
        UPDATE sds_load SET placed = placed - OLD.bytes, reserved = reserved - OLD.bytes * OLD.thick
               WHERE node_id = OLD.joining_sds AND OLD.joining_sds != 0;
        INSERT OR IGNORE INTO sds_load (node_id) VALUES (NEW.primary_sds), (NEW.secondary_sds);
        INSERT OR IGNORE INTO sds_load (node_id) SELECT NEW.joining_sds WHERE NEW.joining_sds != 0;
        UPDATE sds_load SET placed = placed + NEW.bytes, placed_primary = placed_primary + NEW.bytes,
               reserved = reserved + NEW.bytes * NEW.thick WHERE node_id = NEW.primary_sds;
        UPDATE sds_load SET placed = placed + NEW.bytes, reserved = reserved + NEW.bytes * NEW.thick
               WHERE node_id = NEW.secondary_sds;
        UPDATE sds_load SET placed = placed + NEW.bytes, reserved = reserved + NEW.bytes * NEW.thick
               WHERE node_id = NEW.joining_sds AND NEW.joining_sds != 0;
    END;

    CREATE TABLE change_seq (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        value INTEGER NOT NULL
    );
    INSERT INTO change_seq VALUES (1, 0);
    ALTER TABLE volumes ADD COLUMN changed_seq INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE deleted_volumes ADD COLUMN deleted_seq INTEGER NOT NULL DEFAULT 0;
    CREATE INDEX volumes_changed ON volumes (changed_seq);
    CREATE INDEX deleted_volumes_seq ON deleted_volumes (deleted_seq);
    CREATE TRIGGER volume_created AFTER INSERT ON volumes BEGIN
        UPDATE change_seq SET value = value + 1;
        UPDATE volumes SET changed_seq = (SELECT value FROM change_seq) WHERE id = NEW.id;
    END;
    CREATE TRIGGER volume_generation_changed AFTER UPDATE OF epoch, mapping_gen ON volumes BEGIN
        UPDATE change_seq SET value = value + 1;
        UPDATE volumes SET changed_seq = (SELECT value FROM change_seq) WHERE id = NEW.id;
    END;
    CREATE TRIGGER volume_deleted AFTER INSERT ON deleted_volumes BEGIN
        UPDATE change_seq SET value = value + 1;
        UPDATE deleted_volumes SET deleted_seq = (SELECT value FROM change_seq) WHERE id = NEW.id;
    END;

    CREATE TABLE volume_totals (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        volumes INTEGER NOT NULL,
        provisioned_bytes INTEGER NOT NULL
    );
    INSERT INTO volume_totals
        SELECT 1, COUNT(*), COALESCE(SUM(size_bytes), 0) FROM volumes;
    CREATE TRIGGER volume_totals_insert AFTER INSERT ON volumes BEGIN
        UPDATE volume_totals SET volumes = volumes + 1,
               provisioned_bytes = provisioned_bytes + NEW.size_bytes;
    END;
    CREATE TRIGGER volume_totals_delete AFTER DELETE ON volumes BEGIN
        UPDATE volume_totals SET volumes = volumes - 1,
               provisioned_bytes = provisioned_bytes - OLD.size_bytes;
    END;
    CREATE TRIGGER volume_totals_resize AFTER UPDATE OF size_bytes ON volumes BEGIN
        UPDATE volume_totals SET provisioned_bytes = provisioned_bytes - OLD.size_bytes + NEW.size_bytes;
    END;

    DROP TABLE heartbeat_log;
    CREATE TABLE heartbeat_log (
        node_id INTEGER NOT NULL,
        minute INTEGER NOT NULL,
        beats INTEGER NOT NULL,
        PRIMARY KEY (node_id, minute)
    );
    CREATE INDEX heartbeat_log_minute ON heartbeat_log (minute);
    "#,
    // 11: replication (see `changeset` and `raft`). `id_high_water` mirrors
    // `sqlite_sequence`, which changesets cannot carry; `raft_applied` is
    // the last log entry a replicated MDM applied, and its membership.
    r#"
    CREATE TABLE id_high_water (name TEXT PRIMARY KEY, seq INTEGER NOT NULL);
    INSERT INTO id_high_water (name, seq) SELECT name, seq FROM sqlite_sequence;
    CREATE TRIGGER volumes_high_water AFTER INSERT ON volumes BEGIN
        INSERT INTO id_high_water (name, seq) VALUES ('volumes', NEW.id)
            ON CONFLICT (name) DO UPDATE SET seq = max(seq, excluded.seq);
    END;
    CREATE TRIGGER cluster_nodes_high_water AFTER INSERT ON cluster_nodes BEGIN
        INSERT INTO id_high_water (name, seq) VALUES ('cluster_nodes', NEW.id)
            ON CONFLICT (name) DO UPDATE SET seq = max(seq, excluded.seq);
    END;
    CREATE TABLE raft_applied (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        log_id TEXT,
        membership TEXT NOT NULL
    );
    "#,
    // 12: what `pflex cluster rotate` replaced, for every member of a
    // replicated MDM (see `secrets`): the new admin token's SHA-256, and
    // the join key revoked (sha256 NULL).
    r#"
    CREATE TABLE admin_credentials (
        name TEXT PRIMARY KEY,
        sha256 TEXT,
        changed_at INTEGER NOT NULL
    );
    "#,
    // 13: MDM members removed from a replicated MDM: their ids are never
    // taken again, as members or as senders of Raft messages.
    r#"
    CREATE TABLE retired_mdm_members (
        id INTEGER PRIMARY KEY,
        retired_at INTEGER NOT NULL
    );
    "#,
    // 14: the cluster's public id (see `keys::Keys::cluster_id`), one row
    // written when the database is created; a restored backup keeps it. And
    // the public name of the secret it was last opened with: another one
    // means a restore (see `service::record_cluster_identity`).
    r#"
    CREATE TABLE cluster_identity (
        id TEXT NOT NULL,
        secret_id TEXT NOT NULL
    );
    "#,
    // 15: `topology_seq` takes a new random value whenever a fact a
    // placement reads of an SDS changes (see `service::candidates`, which
    // keeps those facts in memory while it holds). It starts at 0 on every
    // member: the values after come in the leader's changesets, which
    // carry the old value too.
    r#"
    CREATE TABLE topology_seq (id INTEGER PRIMARY KEY CHECK (id = 1), value INTEGER NOT NULL);
    INSERT INTO topology_seq (id, value) VALUES (1, 0);
    CREATE TRIGGER topology_sds_insert AFTER INSERT ON sds_nodes BEGIN
        UPDATE topology_seq SET value = random();
    END;
    CREATE TRIGGER topology_sds_delete AFTER DELETE ON sds_nodes BEGIN
        UPDATE topology_seq SET value = random();
    END;
    CREATE TRIGGER topology_sds_update AFTER UPDATE ON sds_nodes
    WHEN OLD.node_id IS NOT NEW.node_id OR OLD.fault_set_id IS NOT NEW.fault_set_id
      OR OLD.pool_id IS NOT NEW.pool_id OR OLD.capacity_bytes IS NOT NEW.capacity_bytes
      OR OLD.used_bytes IS NOT NEW.used_bytes OR OLD.draining IS NOT NEW.draining
      OR OLD.removed_at IS NOT NEW.removed_at BEGIN
        UPDATE topology_seq SET value = random();
    END;
    CREATE TRIGGER topology_device_insert AFTER INSERT ON sds_devices BEGIN
        UPDATE topology_seq SET value = random();
    END;
    CREATE TRIGGER topology_device_delete AFTER DELETE ON sds_devices BEGIN
        UPDATE topology_seq SET value = random();
    END;
    CREATE TRIGGER topology_device_update AFTER UPDATE OF sds_id, failed_reason ON sds_devices
    WHEN OLD.sds_id IS NOT NEW.sds_id OR OLD.failed_reason IS NOT NEW.failed_reason BEGIN
        UPDATE topology_seq SET value = random();
    END;
    CREATE TRIGGER topology_fault_set_change AFTER UPDATE ON fault_sets BEGIN
        UPDATE topology_seq SET value = random();
    END;
    CREATE TRIGGER topology_fault_set_delete AFTER DELETE ON fault_sets BEGIN
        UPDATE topology_seq SET value = random();
    END;
    CREATE TRIGGER topology_node_failed AFTER UPDATE OF failed_at ON cluster_nodes
    WHEN OLD.failed_at IS NOT NEW.failed_at BEGIN
        UPDATE topology_seq SET value = random();
    END;
    CREATE TRIGGER topology_node_delete AFTER DELETE ON cluster_nodes BEGIN
        UPDATE topology_seq SET value = random();
    END;
    "#,
    // 16: the volumes an SDS's heartbeat changes name: those whose epoch or
    // mapping generation moved past the 1 they are created with (see
    // `service::nodes::volume_changes`). A partial index, so that a
    // heartbeat during bulk creates walks none of the new volumes. It
    // replaces the index of every volume by change, which nothing else reads.
    r#"
    CREATE INDEX volumes_changed_since_created ON volumes (changed_seq)
        WHERE epoch > 1 OR mapping_gen > 1;
    DROP INDEX volumes_changed;
    "#,
];

// Migration 10 computes PG bytes in SQL with 1 MiB chunks.
const _: () = assert!(pflex_proto::CHUNK_SIZE == 1048576);

/// Schema version this build writes.
pub const SCHEMA_VERSION: u32 = MIGRATIONS.len() as u32;

/// Why the database could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("database schema version {found} is newer than this MDM ({supported})")]
    TooNew { found: u32, supported: u32 },
}

/// Turns off SQLite's memory statistics, before its first connection (a
/// later call changes nothing and is harmless). With them on, every
/// allocation SQLite makes, on every connection, takes one process-wide
/// mutex: the writer and every reader thread meet there, thousands of
/// times a second under heartbeats and token requests. The MDM never reads
/// those statistics (`sqlite3_memory_used` stays 0).
pub fn disable_memory_statistics() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // SAFETY: sqlite3_config is called before the library is used on
        // any thread (the `Once` runs ahead of the first open, and main
        // calls it first thing); SQLITE_CONFIG_MEMSTATUS takes one int. If
        // SQLite was already initialised it returns SQLITE_MISUSE and
        // changes nothing.
        let code = unsafe {
            rusqlite::ffi::sqlite3_config(
                rusqlite::ffi::SQLITE_CONFIG_MEMSTATUS,
                0 as std::os::raw::c_int,
            )
        };
        if code != rusqlite::ffi::SQLITE_OK {
            tracing::debug!(code, "SQLite memory statistics stay on (already initialised)");
        }
    });
}

/// Bytes per database page of a new database. A volume create adds one
/// entry per placement group to the per-node indexes (`placement_groups`
/// by primary and by secondary), each on another node's page: some 130
/// pages written per create, whatever their size. Smaller pages make each
/// of those writes, and the checkpoint's copy of it, a quarter as large.
pub const PAGE_SIZE: i64 = 1024;

/// Opens (creating if needed) `path` and brings its schema up to date.
pub fn open(path: &Path) -> Result<Connection, DbError> {
    disable_memory_statistics();
    let mut conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_CREATE,
    )?;
    // Only a new, empty database takes it (before WAL mode is set); one
    // made before keeps its pages.
    conn.pragma_update(None, "page_size", PAGE_SIZE)?;
    configure(&conn)?;
    // Commits do not checkpoint the WAL: [`start_checkpointer`] does, on a
    // thread of its own (and the last connection to close does anyway).
    conn.pragma_update(None, "wal_autocheckpoint", 0)?;
    migrate(&mut conn)?;
    Ok(conn)
}

/// When the checkpointer works, and when it makes the WAL start over.
#[derive(Debug, Clone, Copy)]
pub struct CheckpointPolicy {
    /// How often it copies the WAL into the database (a passive checkpoint).
    pub every: std::time::Duration,
    /// WAL frames (pages) above which it also waits for readers to leave
    /// the WAL, so that the next commit writes it from its start again.
    pub restart_above_frames: i64,
}

impl Default for CheckpointPolicy {
    fn default() -> Self {
        // 4 MiB of 1 KiB pages (16 MiB in a database made with 4 KiB).
        Self { every: std::time::Duration::from_millis(500), restart_above_frames: 4096 }
    }
}

/// Largest a WAL file is left after it starts over (bytes).
const WAL_SIZE_LIMIT: i64 = 64 << 20;

/// Whether the WAL of a database should start over, by the database file's
/// name as SQLite gives it: set by that file's checkpointer, taken by the
/// connection that commits to it (see [`restart_wal_if_due`]). An MDM has
/// one database, but a process may hold several (tests do), and one
/// committer must not take the request meant for another.
static WAL_RESTARTS_DUE: std::sync::Mutex<
    std::collections::BTreeMap<String, std::sync::Arc<std::sync::atomic::AtomicBool>>,
> = std::sync::Mutex::new(std::collections::BTreeMap::new());

/// The restart request of the database `conn` is open on (made on first use).
fn wal_restart_due(conn: &Connection) -> Option<std::sync::Arc<std::sync::atomic::AtomicBool>> {
    let name = conn.path().filter(|p| !p.is_empty())?.to_string();
    let mut due = WAL_RESTARTS_DUE.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    Some(due.entry(name).or_default().clone())
}

/// Checkpoints the WAL of `path` by `policy` on a thread of its own, for as
/// long as the process runs.
///
/// SQLite's automatic checkpoint ran inside whichever commit crossed 1,000
/// pages, copying and syncing them while every request of that batch
/// waited (a tenth of the writer's time under bulk creates); so commits do
/// not checkpoint (`wal_autocheckpoint = 0`) and this thread does, with
/// passive checkpoints, which take no lock a commit or a reader needs.
///
/// But the WAL only starts over when a commit begins while every frame is
/// checkpointed and no reader is inside the WAL, and under steady
/// heartbeats, tokens and reads that moment never comes: the WAL grew by
/// gigabytes in a minute of `pflex bench mdm`, and every commit paid for
/// zeroing new file blocks. A restart checkpoint from this thread does not
/// help either: it must wait for the writer lock, which back-to-back
/// batches never leave free. So past
/// [`CheckpointPolicy::restart_above_frames`] this thread asks the
/// committing connection to make that moment itself, between two batches
/// (see [`restart_wal_if_due`]).
pub fn start_checkpointer(path: &Path, policy: CheckpointPolicy) -> Result<(), DbError> {
    let conn = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_WRITE)?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    let Some(restart_due) = wal_restart_due(&conn) else { return Ok(()) };
    std::thread::Builder::new().name("mdm-checkpoint".to_string()).spawn(move || loop {
        std::thread::sleep(policy.every);
        match conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| r.get::<_, i64>(1)) {
            Ok(frames) if frames > policy.restart_above_frames => {
                restart_due.store(true, std::sync::atomic::Ordering::Relaxed);
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "WAL checkpoint failed"),
        }
    })?;
    Ok(())
}

/// Called by the connection that commits, between two commits: when the
/// checkpointer asked for it, a restart checkpoint copies what the last
/// passive one left (little) and waits for the readers inside the WAL to
/// finish (new ones read the database file meanwhile), so the next commit
/// writes the WAL from its start again, and the file is cut back to
/// [`WAL_SIZE_LIMIT`].
pub fn restart_wal_if_due(conn: &Connection) {
    let Some(restart_due) = wal_restart_due(conn) else { return };
    if !restart_due.swap(false, std::sync::atomic::Ordering::Relaxed) {
        return;
    }
    // SQLite's own busy handler sleeps in steps of up to 100 ms (1, 2, 5,
    // 10, 15, 20, 25, ...), and the writer and every request behind it
    // sleep with it while a reader finishes a one-row read or a passive
    // checkpoint its copy: poll instead, so the restart goes ahead as soon
    // as they are done, and try again after a later batch past a limit.
    if let Err(e) = conn.busy_handler(Some(wait_for_readers)) {
        tracing::warn!(error = %e, "WAL restart: setting the busy handler failed");
        return;
    }
    let outcome = conn.query_row("PRAGMA wal_checkpoint(RESTART)", [], |r| r.get::<_, i64>(0));
    if let Err(e) = conn.busy_timeout(BUSY_TIMEOUT) {
        tracing::warn!(error = %e, "WAL restart: restoring the busy timeout failed");
    }
    match outcome {
        Ok(0) => {}
        Ok(_) => {
            tracing::debug!("the WAL could not start over yet: readers stayed in it");
            restart_due.store(true, std::sync::atomic::Ordering::Relaxed);
        }
        Err(e) => tracing::warn!(error = %e, "WAL restart checkpoint failed"),
    }
}

/// How long any connection waits for a lock another one holds.
const BUSY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// The restart's busy handler: polls every quarter millisecond, for at most
/// [`WAL_RESTART_PATIENCE`].
fn wait_for_readers(attempts: i32) -> bool {
    const POLL: std::time::Duration = std::time::Duration::from_micros(250);
    if POLL * attempts.max(0) as u32 >= WAL_RESTART_PATIENCE {
        return false;
    }
    std::thread::sleep(POLL);
    true
}

/// Longest a restart waits for the readers inside the WAL.
const WAL_RESTART_PATIENCE: std::time::Duration = std::time::Duration::from_secs(1);

/// A connection that only reads `path` (opened and migrated by [`open`]).
pub fn open_reader(path: &Path) -> Result<Connection, DbError> {
    let conn = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_WRITE)?;
    configure(&conn)?;
    conn.pragma_update(None, "query_only", "ON")?;
    Ok(conn)
}

/// A consistent copy of the database `conn` reads, as the bytes of a
/// SQLite file (`pflex mdm backup`).
pub fn copy_to_bytes(conn: &Connection) -> Result<Vec<u8>, DbError> {
    let path = std::env::temp_dir().join(format!(
        "pflex-mdm-backup-{}-{}.db",
        std::process::id(),
        unique()
    ));
    let result = copy_to_file(conn, &path).and_then(|()| Ok(std::fs::read(&path)?));
    let _ = std::fs::remove_file(&path);
    result
}

/// Copies the database `conn` reads into a new file `target`, as of one
/// committed state, while other connections go on committing: every page in
/// one backup step, which is one read transaction (in smaller steps each
/// commit elsewhere restarts the copy, and steady commits never let it end).
pub fn copy_to_file(conn: &Connection, target: &Path) -> Result<(), DbError> {
    let _ = std::fs::remove_file(target);
    let mut copy = Connection::open(target)?;
    let backup = rusqlite::backup::Backup::new(conn, &mut copy)?;
    for _ in 0..1000 {
        match backup.step(-1)? {
            rusqlite::backup::StepResult::Done => return Ok(()),
            _ => std::thread::sleep(std::time::Duration::from_millis(1)),
        }
    }
    Err(DbError::Io(std::io::Error::other("the database stayed locked for the copy")))
}

fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// An in-memory database with the current schema (unit tests).
pub fn open_in_memory() -> Result<Connection, DbError> {
    let mut conn = Connection::open_in_memory()?;
    configure(&conn)?;
    migrate(&mut conn)?;
    Ok(conn)
}

fn configure(conn: &Connection) -> Result<(), rusqlite::Error> {
    // WAL keeps readers off the writer's path; FULL makes every committed
    // request durable across power loss, which the control plane can afford.
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    // A WAL that grew in a burst is cut back when it starts over.
    conn.pragma_update(None, "journal_size_limit", WAL_SIZE_LIMIT)?;
    // Savepoints (one per request, see `writer`) journal in memory, not in a
    // temporary file written page by page.
    conn.pragma_update(None, "temp_store", "MEMORY")?;
    // Every statement the MDM runs stays prepared (see `service::Cached`).
    conn.set_prepared_statement_cache_capacity(256);
    Ok(())
}

fn migrate(conn: &mut Connection) -> Result<(), DbError> {
    let tx = conn.transaction()?;
    tx.execute_batch("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")?;
    let current: Option<u32> =
        tx.query_row("SELECT MAX(version) FROM schema_version", [], |r| r.get(0))?;
    let current = current.unwrap_or(0);
    if current > SCHEMA_VERSION {
        return Err(DbError::TooNew { found: current, supported: SCHEMA_VERSION });
    }
    for (index, script) in MIGRATIONS.iter().enumerate().skip(current as usize) {
        tx.execute_batch(script)?;
        tx.execute("INSERT INTO schema_version (version) VALUES (?1)", [index as u32 + 1])?;
    }
    tx.commit()?;
    Ok(())
}

/// Every row of every table, as text, in a stable order: lets tests prove
/// that a refused request changed nothing.
pub fn dump(conn: &Connection) -> Result<String, rusqlite::Error> {
    let mut tables: Vec<String> = conn
        .prepare("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")?
        .query_map([], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    tables.retain(|t| !t.starts_with("sqlite_"));
    let mut out = String::new();
    for table in tables {
        out.push_str(&format!("== {table}\n"));
        let mut stmt = conn.prepare(&format!("SELECT * FROM \"{table}\" ORDER BY rowid"))?;
        let columns = stmt.column_count();
        let mut rows = stmt.query([])?;
        while let Some(row) = rows.next()? {
            let cells: Vec<String> = (0..columns)
                .map(|i| match row.get_ref(i) {
                    Ok(ValueRef::Null) => "NULL".to_string(),
                    Ok(ValueRef::Integer(v)) => v.to_string(),
                    Ok(ValueRef::Real(v)) => v.to_string(),
                    Ok(ValueRef::Text(v)) => format!("{:?}", String::from_utf8_lossy(v)),
                    Ok(ValueRef::Blob(v)) => format!("x'{}'", hex::encode(v)),
                    Err(e) => format!("<{e}>"),
                })
                .collect();
            out.push_str(&cells.join("|"));
            out.push('\n');
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A new database has small pages; one made with others keeps them.
    #[test]
    fn a_new_database_has_small_pages_and_an_old_one_keeps_its_own() {
        let dir = tempfile::tempdir().unwrap();
        let page_size = |conn: &Connection| -> i64 {
            conn.query_row("PRAGMA page_size", [], |r| r.get(0)).unwrap()
        };
        let fresh = open(&dir.path().join("new.db")).unwrap();
        assert_eq!(page_size(&fresh), PAGE_SIZE);
        let old_path = dir.path().join("old.db");
        let old = Connection::open(&old_path).unwrap();
        old.execute_batch("PRAGMA page_size = 4096; CREATE TABLE t (x)").unwrap();
        drop(old);
        let reopened = open(&old_path).unwrap();
        assert_eq!(page_size(&reopened), 4096);
    }

    /// Commits reach the database file itself (not only the WAL) without a
    /// checkpoint by any commit: the checkpointer's work. Without it (SQLite's
    /// automatic checkpoint is off) the file never holds them and the WAL
    /// grows without bound.
    #[test]
    fn the_checkpointer_copies_commits_into_the_database_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("powerflex.db");
        let conn = open(&path).unwrap();
        start_checkpointer(&path, CheckpointPolicy::default()).unwrap();
        for n in 0..50 {
            conn.execute(
                "INSERT INTO protection_domains (name, created_at) VALUES (?1, 1)",
                [format!("pd{n}")],
            )
            .unwrap();
        }
        // The database file alone, copied without its WAL, as a crash right
        // now would leave it if the WAL were lost.
        let copy = dir.path().join("copy.db");
        let in_file = || -> Option<i64> {
            let _ = std::fs::remove_file(dir.path().join("copy.db-wal"));
            std::fs::copy(&path, &copy).ok()?;
            let reader = Connection::open(&copy).ok()?;
            reader.query_row("SELECT COUNT(*) FROM protection_domains", [], |r| r.get(0)).ok()
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        let mut seen = in_file();
        while seen != Some(50) && std::time::Instant::now() < deadline {
            std::thread::sleep(CheckpointPolicy::default().every / 5);
            seen = in_file();
        }
        assert_eq!(seen, Some(50), "the database file never received the commits");
    }

    /// Under reads and commits that never pause, the WAL still starts over
    /// (the committer restarts it when the checkpointer asks): it stays
    /// near the threshold instead of growing by all that was written, as it
    /// does with passive checkpoints alone (the test fails without the
    /// committer's restart: 105 MiB).
    #[test]
    fn the_wal_stays_bounded_under_steady_reads_and_commits() {
        use std::sync::atomic::{AtomicBool, Ordering};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("powerflex.db");
        let conn = open(&path).unwrap();
        conn.pragma_update(None, "synchronous", "OFF").unwrap();
        conn.execute_batch("CREATE TABLE blobs (id INTEGER PRIMARY KEY, data BLOB)").unwrap();
        let policy = CheckpointPolicy {
            every: std::time::Duration::from_millis(20),
            restart_above_frames: 256,
        };
        start_checkpointer(&path, policy).unwrap();
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let readers: Vec<_> = (0..2)
            .map(|_| {
                let (path, stop) = (path.clone(), stop.clone());
                std::thread::spawn(move || {
                    let reader = open_reader(&path).unwrap();
                    while !stop.load(Ordering::Relaxed) {
                        let _: i64 = reader
                            .query_row("SELECT COUNT(*) FROM blobs", [], |r| r.get(0))
                            .unwrap();
                    }
                })
            })
            .collect();
        // 400 commits of 256 KiB: 100 MiB through the WAL.
        for n in 0..400 {
            conn.execute("INSERT OR REPLACE INTO blobs VALUES (?1, zeroblob(262144))", [n % 8])
                .unwrap();
            restart_wal_if_due(&conn);
        }
        stop.store(true, Ordering::Relaxed);
        for reader in readers {
            reader.join().unwrap();
        }
        let wal = std::fs::metadata(dir.path().join("powerflex.db-wal")).unwrap().len();
        assert!(wal < 32 << 20, "the WAL grew to {wal} bytes");
    }

    #[test]
    fn migrations_apply_once_and_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("powerflex.db");
        let conn = open(&path).unwrap();
        conn.execute("INSERT INTO protection_domains (name, created_at) VALUES ('pd', 1)", [])
            .unwrap();
        drop(conn);
        let conn = open(&path).unwrap();
        let version: u32 =
            conn.query_row("SELECT MAX(version) FROM schema_version", [], |r| r.get(0)).unwrap();
        assert_eq!(version, SCHEMA_VERSION);
        let rows: u32 =
            conn.query_row("SELECT COUNT(*) FROM schema_version", [], |r| r.get(0)).unwrap();
        assert_eq!(rows, SCHEMA_VERSION);
        assert!(dump(&conn).unwrap().contains("\"pd\""));
    }

    #[test]
    fn refuses_newer_schema() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("powerflex.db");
        let conn = open(&path).unwrap();
        conn.execute("INSERT INTO schema_version (version) VALUES (999)", []).unwrap();
        drop(conn);
        assert!(matches!(open(&path), Err(DbError::TooNew { found: 999, .. })));
    }
}
