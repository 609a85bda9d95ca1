//! Members removed from a replicated MDM.
//!
//! A removed member is retired for good (like an etcd member id): its id
//! is recorded in replicated state, so every member, including one that
//! joins later from a snapshot, refuses Raft messages in its name (see
//! [`crate::raft::peer_auth`]) and `pflex mdm add` never gives the id
//! again. A member certificate names its member id, so retiring the id
//! revokes the certificate.

use rusqlite::{params, Connection};

use super::{audit, Cached, Ctx};
use crate::error::MdmError;

/// Records that member `id` left the cluster (after its removal from the
/// membership was committed).
pub fn retire_mdm_member(conn: &Connection, ctx: &Ctx, id: u64) -> Result<(), MdmError> {
    conn.exec(
        "INSERT INTO retired_mdm_members (id, retired_at) VALUES (?1, ?2) ON CONFLICT (id) DO NOTHING",
        params![id, ctx.now],
    )?;
    audit(conn, ctx.now, "admin", "mdm.remove", &format!("mdm-{id}"), "", "ok", "")
}

/// Whether member `id` was removed.
pub fn mdm_member_retired(conn: &Connection, id: u64) -> Result<bool, MdmError> {
    Ok(conn.row("SELECT EXISTS (SELECT 1 FROM retired_mdm_members WHERE id = ?1)", [id], |r| {
        r.get(0)
    })?)
}

/// Refuses to add member `id` when it was removed before.
pub fn check_new_mdm_member(conn: &Connection, id: u64) -> Result<(), MdmError> {
    if mdm_member_retired(conn, id)? {
        return Err(MdmError::conflict(
            "mdm_id_retired",
            format!(
                "MDM member {id} was removed; a member id is never given again (add the new member under a new id)"
            ),
        ));
    }
    Ok(())
}
