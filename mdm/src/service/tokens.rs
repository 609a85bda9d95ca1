//! IO capability tokens and their batched completion records.
//!
//! A token is signed from committed state (the mapping and its generation,
//! the replicated signing key) on a reader connection and answered at once;
//! its row in `io_tokens`, which only serves to attribute completion
//! records, is queued to the writer without waiting ([`record_tokens`]),
//! whose batches carry the rows of many tokens in one commit.
//! A token whose row was never written (the MDM stopped first) still works
//! on every SDS; its completion records are counted nowhere, like those of
//! a token pruned after expiry.

use pflex_proto::api::{AckResponse, NodeType, TokenAckBatch, TokenRequest, TokenResponse};
use pflex_proto::token::{AccessMode, IoToken};
use rusqlite::{params, Connection, OptionalExtension};

use crate::error::MdmError;

use super::volumes::{mapping_of, volume_row, VOLUME_COLUMNS};
use super::*;

/// A token signed on a reader connection: the answer, and the row that
/// records it.
pub struct TokenDraft {
    pub response: TokenResponse,
    pub record: TokenRecord,
}

/// The `io_tokens` row of an issued token.
#[derive(Debug, Clone)]
pub struct TokenRecord {
    token: IoToken,
    epoch: u64,
    issued_at: u64,
    signature_hex: String,
}
/// `POST /token/request` from SDC `sdc_id`: checks the mapping, signs the
/// token and derives its session keys.
pub fn draft_token(
    conn: &Connection,
    ctx: &Ctx,
    sdc_id: u64,
    request: &TokenRequest,
) -> Result<TokenDraft, MdmError> {
    if request.volume_id > i64::MAX as u64 {
        return Err(MdmError::not_found(
            "volume_not_found",
            format!("no volume {}", request.volume_id),
        ));
    }
    let row = conn
        .row(&format!("SELECT {VOLUME_COLUMNS} WHERE v.id = ?1"), [request.volume_id], volume_row)
        .optional()?
        .ok_or_else(|| {
            MdmError::not_found("volume_not_found", format!("no volume {}", request.volume_id))
        })?;
    check_mapping(conn, row.id, &row.name, sdc_id, request.mode)?;
    // Ids stay within SQLite's signed 64-bit range; 0 means none.
    let token_id = (u64::from_le_bytes(pflex_proto::random_bytes()) >> 1).max(1);
    let token = IoToken {
        token_id,
        volume_id: row.id,
        sdc_id,
        mode: request.mode,
        mapping_gen: row.mapping_gen,
        expires_at: ctx.now + ctx.settings.token_ttl_secs,
    };
    let signed = ctx.keys.sign(&token);
    // One session key per storage node of the volume's placement: a node
    // that sees this token cannot derive the key another node expects for
    // it, and the reply does not grow with the cluster. A node that joins
    // the placement later gets its key with the SDC's next token (the SDC
    // asks for one when its map names a node it has no key for).
    // One pass over the volume's PGs (a UNION of three read each row three
    // times); the set sorts and deduplicates.
    let mut sds_ids = std::collections::BTreeSet::new();
    let mut pgs = conn.prepare_cached(
        "SELECT primary_sds, secondary_sds, joining_sds FROM placement_groups WHERE volume_id = ?1",
    )?;
    let mut rows = pgs.query([row.id])?;
    while let Some(pg) = rows.next()? {
        let joining: u64 = pg.get(2)?;
        sds_ids.extend([pg.get::<_, u64>(0)?, pg.get(1)?]);
        if joining != 0 {
            sds_ids.insert(joining);
        }
    }
    let sds_ids: Vec<u64> = sds_ids.into_iter().collect();
    let response = TokenResponse {
        token_id,
        token: signed.to_hex(),
        session_keys: ctx.keys.session_keys(&signed, &sds_ids),
        expires_at: token.expires_at,
        mapping_gen: row.mapping_gen,
    };
    let record = TokenRecord {
        token,
        epoch: row.epoch,
        issued_at: ctx.now,
        signature_hex: hex::encode(signed.signature),
    };
    Ok(TokenDraft { response, record })
}

/// Writes the rows of issued tokens (on the writer, behind their answers).
/// The row of a token whose volume is gone by now is not written; an id
/// already taken (2^-63 per pair) keeps its first row. Returns the rows
/// written.
pub fn record_tokens(conn: &Connection, records: &[TokenRecord]) -> Result<usize, MdmError> {
    let mut insert = conn.prepare_cached(
        "INSERT OR IGNORE INTO io_tokens (token_id, volume_id, sdc_id, access_mode, mapping_gen,
         epoch, issued_at, expires_at, signature)
         SELECT ?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9 WHERE EXISTS (SELECT 1 FROM volumes WHERE id = ?2)",
    )?;
    let mut written = 0;
    for record in records {
        let token = &record.token;
        written += insert.execute(params![
            token.token_id,
            token.volume_id,
            token.sdc_id,
            token.mode.as_str(),
            token.mapping_gen,
            record.epoch,
            record.issued_at,
            token.expires_at,
            record.signature_hex
        ])?;
    }
    Ok(written)
}

/// Refuses a token for a volume not mapped to `sdc_id`, or for writes
/// through a read-only mapping.
fn check_mapping(
    conn: &Connection,
    volume_id: u64,
    name: &str,
    sdc_id: u64,
    mode: AccessMode,
) -> Result<(), MdmError> {
    let Some(mapped_mode) = mapping_of(conn, volume_id, sdc_id)? else {
        return Err(MdmError::Forbidden {
            code: "not_mapped",
            message: format!("volume {name:?} is not mapped to this SDC"),
        });
    };
    if mode == AccessMode::ReadWrite && mapped_mode == AccessMode::ReadOnly {
        return Err(MdmError::Forbidden {
            code: "read_only_mapping",
            message: format!("volume {name:?} is mapped read-only to this SDC"),
        });
    }
    Ok(())
}

const ACK_OPS: &[&str] = &["read", "write", "flush", "trim", "write_zeroes"];

/// `POST /token/ack`: batched completion records. Records of tokens the MDM
/// no longer knows (pruned long after expiry) are counted nowhere; the
/// reply says how many were recorded. An SDC may only ack its own tokens.
pub fn ack_tokens(
    conn: &Connection,
    ctx: &Ctx,
    caller: Caller,
    batch: &TokenAckBatch,
) -> Result<AckResponse, MdmError> {
    if batch.records.len() > MAX_ACK_RECORDS {
        return Err(MdmError::bad_request(format!(
            "{} records in one batch; at most {MAX_ACK_RECORDS}",
            batch.records.len()
        )));
    }
    for record in &batch.records {
        if !ACK_OPS.contains(&record.op.as_str()) {
            return Err(MdmError::invalid(
                "invalid_op",
                format!("op {:?} is not one of {}", record.op, ACK_OPS.join(", ")),
            ));
        }
        if record.token_id > i64::MAX as u64 || record.volume_id > i64::MAX as u64 {
            return Err(MdmError::bad_request("token_id and volume_id must be below 2^63"));
        }
    }
    let mut recorded = 0;
    for record in &batch.records {
        let owner: Option<(u64, u64)> = conn
            .query_row(
                "SELECT sdc_id, volume_id FROM io_tokens WHERE token_id = ?1",
                [record.token_id],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        let Some((sdc_id, volume_id)) = owner else { continue };
        if volume_id != record.volume_id {
            return Err(MdmError::bad_request(format!(
                "token {} is for volume {volume_id}, not {}",
                record.token_id, record.volume_id
            )));
        }
        if let Caller::Node { id, node_type: NodeType::Sdc } = caller {
            if id != sdc_id {
                return Err(MdmError::forbidden(format!(
                    "token {} belongs to another SDC",
                    record.token_id
                )));
            }
        }
        let (ops, bytes, errors) = (
            record.ops.min(i64::MAX as u64),
            record.bytes.min(i64::MAX as u64),
            record.errors.min(i64::MAX as u64),
        );
        conn.exec(
            "UPDATE io_tokens SET ops = MIN(ops + ?2, 9223372036854775807), bytes = MIN(bytes + ?3, 9223372036854775807),
             errors = MIN(errors + ?4, 9223372036854775807), last_ack_at = ?5 WHERE token_id = ?1",
            params![record.token_id, ops, bytes, errors, ctx.now],
        )?;
        conn.exec(
            "INSERT INTO volume_io_stats (volume_id, op, ops, bytes, errors) VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT (volume_id, op) DO UPDATE SET ops = MIN(ops + excluded.ops, 9223372036854775807),
             bytes = MIN(bytes + excluded.bytes, 9223372036854775807), errors = MIN(errors + excluded.errors, 9223372036854775807)",
            params![volume_id, record.op, ops, bytes, errors],
        )?;
        recorded += 1;
    }
    Ok(AckResponse { status: "recorded".to_string(), recorded })
}
