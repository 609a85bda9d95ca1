//! Batched IO acknowledgements to the MDM (`POST /token/ack`).
//!
//! Served client requests are summed per (token, volume, op) in memory and
//! sent periodically, off the IO path. A batch the MDM did not take is
//! merged back and retried with the next one; the table is bounded so an
//! unreachable MDM cannot grow it without limit (the oldest sums are the
//! ones dropped, and only accounting is lost, never data).

use std::collections::HashMap;
use std::sync::Mutex;

use pflex_proto::api::TokenAck;

/// Most distinct (token, volume, op) sums kept while the MDM is away.
const MAX_PENDING: usize = 65_536;

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Sums {
    ops: u64,
    bytes: u64,
    errors: u64,
}

type AckKey = (u64, u64, &'static str);

/// Accumulates acknowledgements between sends.
#[derive(Default)]
pub struct AckBatcher {
    pending: Mutex<HashMap<AckKey, Sums>>,
}

impl AckBatcher {
    /// Records one request of `op` (an op name) under `token_id`.
    pub fn record(&self, token_id: u64, volume_id: u64, op: &'static str, bytes: u64, ok: bool) {
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        if pending.len() >= MAX_PENDING && !pending.contains_key(&(token_id, volume_id, op)) {
            return;
        }
        let sums = pending.entry((token_id, volume_id, op)).or_default();
        sums.ops += 1;
        if ok {
            sums.bytes += bytes;
        } else {
            sums.errors += 1;
        }
    }

    /// Takes everything accumulated so far as one batch.
    pub fn take(&self) -> Vec<TokenAck> {
        let drained = std::mem::take(&mut *self.pending.lock().unwrap_or_else(|p| p.into_inner()));
        drained
            .into_iter()
            .map(|((token_id, volume_id, op), s)| TokenAck {
                token_id,
                volume_id,
                op: op.to_string(),
                ops: s.ops,
                bytes: s.bytes,
                errors: s.errors,
            })
            .collect()
    }

    /// Puts back a batch that could not be sent.
    pub fn restore(&self, batch: Vec<TokenAck>) {
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        for ack in batch {
            let Some(op) = static_op_name(&ack.op) else { continue };
            let key = (ack.token_id, ack.volume_id, op);
            if pending.len() >= MAX_PENDING && !pending.contains_key(&key) {
                continue;
            }
            let sums = pending.entry(key).or_default();
            sums.ops += ack.ops;
            sums.bytes += ack.bytes;
            sums.errors += ack.errors;
        }
    }
}

fn static_op_name(name: &str) -> Option<&'static str> {
    ["read", "write", "flush", "trim", "write_zeroes"].into_iter().find(|n| *n == name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_per_token_and_op_and_restores_failed_batches() {
        let acks = AckBatcher::default();
        acks.record(1, 9, "write", 4096, true);
        acks.record(1, 9, "write", 4096, true);
        acks.record(1, 9, "write", 4096, false);
        acks.record(2, 9, "read", 512, true);
        let mut batch = acks.take();
        batch.sort_by_key(|a| a.token_id);
        assert_eq!(batch.len(), 2);
        assert_eq!((batch[0].ops, batch[0].bytes, batch[0].errors), (3, 8192, 1));
        assert!(acks.take().is_empty());
        acks.restore(batch);
        acks.record(2, 9, "read", 512, true);
        let mut again = acks.take();
        again.sort_by_key(|a| a.token_id);
        assert_eq!((again[1].ops, again[1].bytes), (2, 1024));
    }
}
