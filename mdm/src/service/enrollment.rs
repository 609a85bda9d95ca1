//! Who may register under which name: one-time enrollment tokens, the
//! node's own credential, admin resets, and the audit log of it all.
//!
//! The decision is [`admit`], a pure function of what the name's current
//! holder is and which proofs the caller brought, tested as a table.

use pflex_proto::api::{EnrollmentRequest, EnrollmentResponse, NodeType};
use rusqlite::{params, Connection, OptionalExtension};

use crate::error::MdmError;

use super::{new_credential, sha256_hex, Cached, Ctx};

/// Lifetime of an enrollment token when the request gives none.
pub const DEFAULT_ENROLLMENT_TTL_SECS: u64 = 3600;
/// Longest lifetime an enrollment token may have.
pub const MAX_ENROLLMENT_TTL_SECS: u64 = 7 * 24 * 3600;

/// The registered node of a name, as admission sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Holder {
    /// Nobody holds the name.
    None,
    /// A node holds it with a credential it keeps.
    Live,
    /// Registered before nodes kept their credential, or reset by an admin:
    /// the name may be claimed like a new one.
    Claimable,
}

/// What an enrollment token presented with a registration turned out to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EnrollmentCheck {
    Absent,
    Valid,
    /// Unknown, used, expired, or for another role or name.
    Invalid(&'static str),
}

/// The proofs a registration brought.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Proofs {
    /// The name's current credential was presented.
    pub credential_matches: bool,
    pub enrollment: EnrollmentCheck,
    pub join_key: bool,
}

/// How a registration is admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// The holder came back with its credential: it keeps it.
    SameNode,
    /// A new credential is issued (new name, or a claimable one).
    Enrolled,
}

/// Why a registration is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// No acceptable proof at all (401).
    NoProof(&'static str),
    /// The name is held by a live node and its credential was not presented (409).
    NameTaken,
}

/// The admission rule. A live name only ever goes back to the holder of its
/// credential; anything else needs a valid enrollment token or the join key.
pub fn admit(holder: Holder, proofs: Proofs) -> Result<Admission, Refusal> {
    if holder == Holder::Live {
        return if proofs.credential_matches {
            Ok(Admission::SameNode)
        } else {
            Err(Refusal::NameTaken)
        };
    }
    match proofs.enrollment {
        EnrollmentCheck::Valid => Ok(Admission::Enrolled),
        _ if proofs.join_key => Ok(Admission::Enrolled),
        EnrollmentCheck::Invalid(why) => Err(Refusal::NoProof(why)),
        EnrollmentCheck::Absent => Err(Refusal::NoProof(
            "registration needs an enrollment token (pflex sds add / pflex sdc add) or the join key",
        )),
    }
}

impl From<Refusal> for MdmError {
    fn from(refusal: Refusal) -> Self {
        match refusal {
            Refusal::NoProof(why) => MdmError::Unauthorized(why.to_string()),
            Refusal::NameTaken => MdmError::conflict(
                "name_taken",
                "this name belongs to a registered node: registering it again needs that node's \
                 credential, or an admin reset of the name (pflex sds reset NAME, pflex sdc reset NAME)",
            ),
        }
    }
}

/// The holder of `(node_type, name)`: its id and state.
pub fn holder_of(
    conn: &Connection,
    node_type: NodeType,
    name: &str,
    credential: Option<&str>,
) -> Result<(Option<u64>, Holder, bool), MdmError> {
    let row: Option<(u64, String, bool)> = conn
        .query_row(
            "SELECT id, credential_sha256, legacy FROM cluster_nodes WHERE node_type = ?1 AND name = ?2",
            params![node_type.as_str(), name],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .optional()?;
    let Some((id, digest, legacy)) = row else { return Ok((None, Holder::None, false)) };
    let matches = credential.is_some_and(|c| super::digests_equal_hex(&sha256_hex(c), &digest));
    let holder = if legacy || is_reset(&digest) { Holder::Claimable } else { Holder::Live };
    Ok((Some(id), holder, matches))
}

fn is_reset(digest: &str) -> bool {
    digest.starts_with("reset:")
}

/// Checks `token` for a registration of `role` named `name` (reads only).
pub fn check_enrollment(
    conn: &Connection,
    now: u64,
    token: Option<&str>,
    role: NodeType,
    name: &str,
) -> Result<EnrollmentCheck, MdmError> {
    let Some(token) = token.filter(|t| !t.is_empty()) else { return Ok(EnrollmentCheck::Absent) };
    let row: Option<(String, String, u64, u64)> = conn
        .query_row(
            "SELECT role, name, expires_at, used_at FROM enrollment_tokens WHERE token_sha256 = ?1",
            [sha256_hex(token)],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
        )
        .optional()?;
    let Some((token_role, token_name, expires_at, used_at)) = row else {
        return Ok(EnrollmentCheck::Invalid("unknown enrollment token"));
    };
    Ok(if used_at != 0 {
        EnrollmentCheck::Invalid("this enrollment token was used already")
    } else if now >= expires_at {
        EnrollmentCheck::Invalid("this enrollment token expired")
    } else if token_role != role.as_str() {
        EnrollmentCheck::Invalid("this enrollment token is for another role")
    } else if !token_name.is_empty() && token_name != name {
        EnrollmentCheck::Invalid("this enrollment token is for another name")
    } else {
        EnrollmentCheck::Valid
    })
}

/// Marks `token` used by `node_id` (after a successful registration).
pub fn consume_enrollment(
    conn: &Connection,
    now: u64,
    token: &str,
    node_id: u64,
) -> Result<(), MdmError> {
    conn.exec(
        "UPDATE enrollment_tokens SET used_at = ?2, used_by = ?3 WHERE token_sha256 = ?1",
        params![sha256_hex(token), now, node_id],
    )?;
    Ok(())
}

/// `POST /admin/enrollments`.
pub fn mint_enrollment(
    conn: &Connection,
    ctx: &Ctx,
    request: &EnrollmentRequest,
) -> Result<EnrollmentResponse, MdmError> {
    if let Some(name) = &request.name {
        crate::validate::name("node name", name)?;
    }
    let ttl = request.ttl_secs.unwrap_or(DEFAULT_ENROLLMENT_TTL_SECS);
    if ttl == 0 || ttl > MAX_ENROLLMENT_TTL_SECS {
        return Err(MdmError::bad_request(format!(
            "ttl_secs must be 1 to {MAX_ENROLLMENT_TTL_SECS}"
        )));
    }
    let token = new_credential();
    let expires_at = ctx.now + ttl;
    conn.exec(
        "INSERT INTO enrollment_tokens (token_sha256, role, name, created_at, expires_at)
         VALUES (?1, ?2, ?3, ?4, ?5)",
        params![
            sha256_hex(&token),
            request.role.as_str(),
            request.name.clone().unwrap_or_default(),
            ctx.now,
            expires_at
        ],
    )?;
    conn.exec("DELETE FROM enrollment_tokens WHERE expires_at < ?1", [ctx.now])?;
    let target = format!("{} {}", request.role.as_str(), request.name.as_deref().unwrap_or("*"));
    audit(conn, ctx.now, "admin", "enrollment.create", &target, "", "ok", "")?;
    Ok(EnrollmentResponse { token, role: request.role, name: request.name.clone(), expires_at })
}

/// `POST /admin/nodes/reset`: the node's credential stops working at once and
/// its name may be claimed with an enrollment token (a replaced host).
pub fn reset_node(
    conn: &Connection,
    ctx: &Ctx,
    node_type: NodeType,
    name: &str,
) -> Result<u64, MdmError> {
    let id: u64 = conn
        .query_row(
            "SELECT id FROM cluster_nodes WHERE node_type = ?1 AND name = ?2",
            params![node_type.as_str(), name],
            |r| r.get(0),
        )
        .optional()?
        .ok_or_else(|| {
            MdmError::not_found("node_not_found", format!("no {} named {name}", node_type.as_str()))
        })?;
    conn.exec("UPDATE cluster_nodes SET credential_sha256 = 'reset:' || id WHERE id = ?1", [id])?;
    let target = format!("{} {name}", node_type.as_str());
    audit(conn, ctx.now, "admin", "node.reset", &target, "", "ok", "")?;
    Ok(id)
}

/// Records a new signing key generation and revokes every unused enrollment
/// token; the new generation and how many tokens were revoked.
pub fn rotate_keys(
    conn: &Connection,
    ctx: &Ctx,
    source: &str,
    join_key_disabled: bool,
) -> Result<(u32, u64), MdmError> {
    let newest: u32 =
        conn.row("SELECT COALESCE(MAX(generation), 0) FROM signing_keys", [], |r| r.get(0))?;
    let generation = newest.max(ctx.keys.newest_generation()) + 1;
    conn.exec(
        "INSERT INTO signing_keys (generation, created_at) VALUES (?1, ?2)",
        params![generation, ctx.now],
    )?;
    let revoked = conn.exec(
        "UPDATE enrollment_tokens SET expires_at = ?1 WHERE used_at = 0 AND expires_at > ?1",
        [ctx.now],
    )? as u64;
    let detail = format!(
        "signing key generation {generation}; admin token replaced; {revoked} unused enrollment \
         tokens revoked{}",
        if join_key_disabled { "; join key disabled" } else { "" }
    );
    audit(conn, ctx.now, "admin", "cluster.rotate", "", source, "ok", &detail)?;
    Ok((generation, revoked))
}

/// The recorded signing key generations: (generation, created at), in order.
pub fn signing_history(conn: &Connection) -> Result<Vec<(u32, u64)>, MdmError> {
    let mut st =
        conn.prepare_cached("SELECT generation, created_at FROM signing_keys ORDER BY generation")?;
    let rows = st.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// The cluster id the database records, if any (see `Keys::cluster_id`).
pub fn cluster_identity(conn: &Connection) -> Result<Option<String>, MdmError> {
    Ok(conn.query_row("SELECT id FROM cluster_identity LIMIT 1", [], |r| r.get(0)).optional()?)
}

/// How far volume numbers jump when a database is opened on a new secret.
pub const RESTORE_VOLUME_GAP: i64 = 1 << 32;

/// What opening the database found of its identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Opened {
    /// A new database: it records this cluster's id and secret.
    Created,
    /// The secret it was last opened with.
    Same,
    /// Another secret: a backup restored onto a new MDM. Volumes created
    /// after the backup are unknown here while SDS nodes may hold their
    /// chunks, so volume numbers jump by [`RESTORE_VOLUME_GAP`]: a new
    /// volume never takes a number whose old chunks a node still holds.
    Restored { next_volume_id: i64 },
}

/// Records the cluster id and secret name at the database's creation, and
/// recognises a restore (see [`Opened`]). Every member of a replicated MDM
/// derives the same from the secret they share, so their databases stay
/// identical.
pub fn record_cluster_identity(
    conn: &Connection,
    cluster_id: &str,
    secret_id: &str,
) -> rusqlite::Result<Opened> {
    let recorded: Option<String> = conn
        .query_row("SELECT secret_id FROM cluster_identity LIMIT 1", [], |r| r.get(0))
        .optional()?;
    match recorded {
        None => {
            conn.execute(
                "INSERT INTO cluster_identity (id, secret_id) VALUES (?1, ?2)",
                [cluster_id, secret_id],
            )?;
            Ok(Opened::Created)
        }
        Some(recorded) if recorded == secret_id => Ok(Opened::Same),
        Some(_) => {
            let tx = conn.unchecked_transaction()?;
            let bumped = tx.execute(
                "UPDATE sqlite_sequence SET seq = seq + ?1 WHERE name = 'volumes'",
                [RESTORE_VOLUME_GAP],
            )?;
            if bumped == 0 {
                tx.execute(
                    "INSERT INTO sqlite_sequence (name, seq) VALUES ('volumes', ?1)",
                    [RESTORE_VOLUME_GAP],
                )?;
            }
            tx.execute("UPDATE cluster_identity SET secret_id = ?1", [secret_id])?;
            let next: i64 = tx.query_row(
                "SELECT seq + 1 FROM sqlite_sequence WHERE name = 'volumes'",
                [],
                |r| r.get(0),
            )?;
            tx.commit()?;
            Ok(Opened::Restored { next_volume_id: next })
        }
    }
}

/// Appends one row to the audit log.
#[allow(clippy::too_many_arguments)]
pub fn audit(
    conn: &Connection,
    now: u64,
    actor: &str,
    action: &str,
    target: &str,
    source: &str,
    outcome: &str,
    detail: &str,
) -> Result<(), MdmError> {
    conn.exec(
        "INSERT INTO audit_log (at, actor, action, target, source, outcome, detail)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        params![now, actor, action, target, source, outcome, detail],
    )?;
    Ok(())
}

/// The newest `limit` audit rows, newest first.
pub fn audit_list(conn: &Connection, limit: u64) -> Result<Vec<serde_json::Value>, MdmError> {
    let mut stmt = conn.prepare_cached(
        "SELECT id, at, actor, action, target, source, outcome, detail FROM audit_log
         ORDER BY id DESC LIMIT ?1",
    )?;
    let rows = stmt.query_map([limit.min(10_000)], |r| {
        Ok(serde_json::json!({
            "id": r.get::<_, u64>(0)?,
            "at": r.get::<_, u64>(1)?,
            "actor": r.get::<_, String>(2)?,
            "action": r.get::<_, String>(3)?,
            "target": r.get::<_, String>(4)?,
            "source": r.get::<_, String>(5)?,
            "outcome": r.get::<_, String>(6)?,
            "detail": r.get::<_, String>(7)?,
        }))
    })?;
    Ok(rows.collect::<Result<Vec<_>, _>>()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_database_opened_on_a_new_secret_is_a_restore_and_volume_numbers_jump() {
        let dir = tempfile::tempdir().unwrap();
        let conn = crate::db::open(&dir.path().join("powerflex.db")).unwrap();
        let sequence = |conn: &Connection| -> Option<i64> {
            conn.query_row("SELECT seq FROM sqlite_sequence WHERE name = 'volumes'", [], |r| {
                r.get(0)
            })
            .optional()
            .unwrap()
        };
        assert_eq!(record_cluster_identity(&conn, "c", "s1").unwrap(), Opened::Created);
        assert_eq!(record_cluster_identity(&conn, "c", "s1").unwrap(), Opened::Same);
        assert_eq!(sequence(&conn), None, "no volume yet");
        let next = RESTORE_VOLUME_GAP + 1;
        let opened = record_cluster_identity(&conn, "other", "s2").unwrap();
        assert_eq!(opened, Opened::Restored { next_volume_id: next });
        assert_eq!(cluster_identity(&conn).unwrap().as_deref(), Some("c"), "the id stays");
        assert_eq!(record_cluster_identity(&conn, "c", "s2").unwrap(), Opened::Same);
        let opened = record_cluster_identity(&conn, "c", "s3").unwrap();
        assert_eq!(opened, Opened::Restored { next_volume_id: next + RESTORE_VOLUME_GAP });
        assert_eq!(sequence(&conn), Some(2 * RESTORE_VOLUME_GAP));
    }

    const NONE: EnrollmentCheck = EnrollmentCheck::Absent;
    const VALID: EnrollmentCheck = EnrollmentCheck::Valid;
    const BAD: EnrollmentCheck = EnrollmentCheck::Invalid("bad");

    fn proofs(credential_matches: bool, enrollment: EnrollmentCheck, join_key: bool) -> Proofs {
        Proofs { credential_matches, enrollment, join_key }
    }

    #[test]
    fn admission_table() {
        use Admission::*;
        use Holder::{Claimable, Live};
        let taken = Err(Refusal::NameTaken);
        let cases: &[(Holder, Proofs, Result<Admission, Refusal>)] = &[
            // A live name: only its credential, whatever else is brought.
            (Live, proofs(true, NONE, false), Ok(SameNode)),
            (Live, proofs(false, VALID, false), taken),
            (Live, proofs(false, NONE, true), taken),
            (Live, proofs(false, VALID, true), taken),
            // A new or claimable name: a valid enrollment token or the join key.
            (Holder::None, proofs(false, VALID, false), Ok(Enrolled)),
            (Holder::None, proofs(false, NONE, true), Ok(Enrolled)),
            (Holder::None, proofs(false, BAD, true), Ok(Enrolled)),
            (Holder::None, proofs(false, BAD, false), Err(Refusal::NoProof("bad"))),
            (Claimable, proofs(false, VALID, false), Ok(Enrolled)),
            (Claimable, proofs(false, NONE, true), Ok(Enrolled)),
        ];
        for (holder, p, want) in cases {
            assert_eq!(&admit(*holder, *p), want, "{holder:?} {p:?}");
        }
        assert!(matches!(
            admit(Holder::None, proofs(false, NONE, false)),
            Err(Refusal::NoProof(_))
        ));
        assert!(matches!(admit(Claimable, proofs(true, NONE, false)), Err(Refusal::NoProof(_))));
    }
}
