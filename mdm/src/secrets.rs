//! The admin token and join key an MDM checks callers against, and the
//! signing-key history, kept identical on every member of a replicated MDM.
//!
//! Each starts from the member's files (`admin_token`, `--join-key-file`).
//! `pflex cluster rotate` replaces the admin token and revokes the join key
//! by committing their new state to the `admin_credentials` table (only
//! SHA-256 digests: of the new token, never the token, and of the revoked
//! join key, so that a member started later with a new join key file takes
//! that one) in the same transaction as the new signing key generation. Every member adopts that state when it
//! applies the entry (see [`Adopter`], called by the state machine after
//! each applied batch or installed snapshot) and at start, so the leader
//! elected after a rotation refuses the old admin token and signs with the
//! new key like the one that rotated.

use std::sync::{Arc, Mutex};

use rusqlite::{params, Connection, OptionalExtension};
use sha2::{Digest, Sha256};

use crate::error::MdmError;
use crate::keys::Keys;

/// SHA-256 of a secret.
pub fn digest(value: &str) -> [u8; 32] {
    Sha256::digest(value.as_bytes()).into()
}

/// Constant-time equality of two digests.
pub fn digests_equal(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The admin token and join key callers are checked against.
pub struct AdminSecrets {
    admin_token_sha256: Mutex<[u8; 32]>,
    join_key_sha256: Mutex<Option<[u8; 32]>>,
}

/// What the database says of them (rows written by rotations).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Stored {
    pub admin_token_sha256: Option<[u8; 32]>,
    /// Digests of every join key a rotation revoked.
    pub revoked_join_keys: Vec<[u8; 32]>,
}

impl AdminSecrets {
    /// The secrets of the member's files.
    pub fn new(admin_token: &str, join_key: Option<&str>) -> Self {
        Self {
            admin_token_sha256: Mutex::new(digest(admin_token)),
            join_key_sha256: Mutex::new(join_key.map(digest)),
        }
    }

    pub fn is_admin(&self, credential: &str) -> bool {
        let expected = *self.admin_token_sha256.lock().unwrap_or_else(|p| p.into_inner());
        digests_equal(&digest(credential), &expected)
    }

    pub fn join_key_matches(&self, key: &str) -> bool {
        let expected = *self.join_key_sha256.lock().unwrap_or_else(|p| p.into_inner());
        expected.is_some_and(|expected| digests_equal(&digest(key), &expected))
    }

    /// The digest of the join key in force, if there is one.
    pub fn join_key(&self) -> Option<[u8; 32]> {
        *self.join_key_sha256.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes what rotations committed over what the files said.
    pub fn adopt(&self, stored: &Stored) {
        if let Some(hash) = stored.admin_token_sha256 {
            *self.admin_token_sha256.lock().unwrap_or_else(|p| p.into_inner()) = hash;
        }
        let mut join_key = self.join_key_sha256.lock().unwrap_or_else(|p| p.into_inner());
        if join_key.is_some_and(|key| stored.revoked_join_keys.contains(&key)) {
            *join_key = None;
        }
    }
}

/// Name of the row of a revoked join key (one per key).
const REVOKED_JOIN_KEY: &str = "revoked_join_key:";

/// Records a rotation's new admin token (its digest) and the join key it
/// revoked (its digest, if one was in force), for every member.
pub fn record_rotation(
    conn: &Connection,
    now: u64,
    admin_token: &str,
    revoked_join_key: Option<[u8; 32]>,
) -> Result<(), MdmError> {
    let upsert = "INSERT INTO admin_credentials (name, sha256, changed_at) VALUES (?1, ?2, ?3)
         ON CONFLICT (name) DO UPDATE SET sha256 = excluded.sha256, changed_at = excluded.changed_at";
    conn.execute(upsert, params!["admin_token", hex::encode(digest(admin_token)), now])?;
    if let Some(key) = revoked_join_key {
        let hash = hex::encode(key);
        conn.execute(upsert, params![format!("{REVOKED_JOIN_KEY}{hash}"), hash, now])?;
    }
    Ok(())
}

/// What rotations recorded (nothing before the first).
pub fn stored(conn: &Connection) -> Result<Stored, rusqlite::Error> {
    let decode = |hash: String| -> Option<[u8; 32]> {
        hex::decode(hash).ok().and_then(|bytes| <[u8; 32]>::try_from(bytes).ok())
    };
    let admin_token_sha256 = conn
        .query_row("SELECT sha256 FROM admin_credentials WHERE name = 'admin_token'", [], |r| {
            r.get::<_, String>(0)
        })
        .optional()?
        .and_then(decode);
    let mut st = conn.prepare_cached(
        "SELECT sha256 FROM admin_credentials WHERE name LIKE 'revoked_join_key:%'",
    )?;
    let revoked_join_keys = st
        .query_map([], |r| r.get::<_, String>(0))?
        .collect::<Result<Vec<_>, _>>()?
        .into_iter()
        .filter_map(decode)
        .collect();
    Ok(Stored { admin_token_sha256, revoked_join_keys })
}

/// Brings a member's secrets and signing keys in line with its database:
/// at start, and after each batch it applies or snapshot it installs.
#[derive(Clone)]
pub struct Adopter {
    pub secrets: Arc<AdminSecrets>,
    pub keys: Arc<Keys>,
}

impl Adopter {
    pub fn adopt(&self, conn: &Connection) -> Result<(), MdmError> {
        self.secrets.adopt(&stored(conn)?);
        self.keys.adopt_history(crate::service::signing_history(conn)?);
        self.keys.adopt_cluster_id(crate::service::cluster_identity(conn)?);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_recorded_rotation_replaces_the_files_secrets() {
        let dir = tempfile::tempdir().unwrap();
        let conn = crate::db::open(&dir.path().join("powerflex.db")).unwrap();
        let secrets = AdminSecrets::new("old-admin", Some("join"));
        secrets.adopt(&stored(&conn).unwrap());
        assert!(secrets.is_admin("old-admin") && secrets.join_key_matches("join"));

        record_rotation(&conn, 7, "new-admin", secrets.join_key()).unwrap();
        secrets.adopt(&stored(&conn).unwrap());
        assert!(!secrets.is_admin("old-admin"));
        assert!(secrets.is_admin("new-admin"));
        assert!(!secrets.join_key_matches("join") && secrets.join_key().is_none());
        let raw: String = conn
            .query_row("SELECT group_concat(sha256, ' ') FROM admin_credentials", [], |r| r.get(0))
            .unwrap();
        let expected = [hex::encode(digest("new-admin")), hex::encode(digest("join"))];
        let mut in_table: Vec<&str> = raw.split(" ").collect();
        in_table.sort();
        let mut expected: Vec<&str> = expected.iter().map(String::as_str).collect();
        expected.sort();
        assert_eq!(in_table, expected, "only digests are stored");

        // A member restarted with its old files takes the rotated state; one
        // given a new join key takes that key.
        let restarted = AdminSecrets::new("old-admin", Some("join"));
        restarted.adopt(&stored(&conn).unwrap());
        assert!(!restarted.is_admin("old-admin") && !restarted.join_key_matches("join"));
        let new_key = AdminSecrets::new("old-admin", Some("join-2"));
        new_key.adopt(&stored(&conn).unwrap());
        assert!(new_key.join_key_matches("join-2"));
    }
}
