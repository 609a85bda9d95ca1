//! Write fencing: a late copy of a write never lands after a newer write
//! of the same SDC to the same blocks.
//!
//! A write can sit on this node after its sender stopped waiting for it: it
//! was read from a connection that then reset, and it waits for a permit, a
//! map fetch or the chunk's ordering lock. Its SDC has meanwhile sent it
//! again as a new request (a fresh sequence number), got the acknowledgment,
//! and the NBD client may have written the same blocks again. Were the old
//! copy applied now, it would overwrite acknowledged data with older data.
//!
//! Every request carries a sequence number that grows for as long as its
//! SDC runs and across its token renewals (the SDC starts it at its wall
//! clock in nanoseconds and carries it over to each new token), so for one
//! SDC a higher number means "sent later". Under the chunk's ordering lock
//! the primary keeps, per (SDC, volume, chunk) and per 4 KiB block, the
//! highest sequence number applied; a write whose number is below that of
//! any block it covers is refused as `Superseded` and touches nothing. This
//! is the reqid rule of Ceph's PG log, reduced to what two copies ordered by
//! one primary need: a retry or a newer write wins, the late original loses.
//!
//! The rule can also refuse a write that is not late: two overlapping writes
//! of one SDC in flight at once may reach the lock in the other order. NBD
//! does not order overlapping writes that are in flight together, and the
//! SDC sends the refused one again with a fresh number, so that costs one
//! round trip and nothing else.

use std::collections::HashMap;
use std::sync::Mutex;

/// Blocks tracked per chunk: the ordering granule.
pub const FENCE_GRANULE: u64 = 4096;

/// (SDC id, volume id, chunk index).
pub type FenceKey = (u64, u64, u64);

/// The newest applied sequence number per SDC, chunk and 4 KiB block.
#[derive(Default)]
pub struct WriteFences {
    newest: Mutex<HashMap<FenceKey, Vec<u64>>>,
}

impl WriteFences {
    /// Called under the chunk's ordering lock, before the write is applied:
    /// true (and the range now carries `seq`) if no block of
    /// `offset .. offset + len` saw a higher number from the same SDC.
    pub fn admit(&self, key: FenceKey, offset: u32, len: u32, seq: u64) -> bool {
        let start = (u64::from(offset) / FENCE_GRANULE) as usize;
        let end = (u64::from(offset) + u64::from(len).max(1)).div_ceil(FENCE_GRANULE) as usize;
        let mut newest = self.newest.lock().unwrap_or_else(|p| p.into_inner());
        let blocks = newest.entry(key).or_default();
        if blocks.len() < end {
            blocks.resize(end, 0);
        }
        if blocks[start..end].iter().any(|&applied| applied > seq) {
            return false;
        }
        blocks[start..end].fill(seq);
        true
    }

    /// Forgets a volume (deleted or no longer on this node).
    pub fn forget_volume(&self, volume_id: u64) {
        self.newest.lock().unwrap_or_else(|p| p.into_inner()).retain(|k, _| k.1 != volume_id);
    }

    /// Chunks with fencing state, for `/metrics`.
    pub fn len(&self) -> usize {
        self.newest.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_late_write_loses_to_a_newer_overlapping_one() {
        // (sdc, offset, len, seq, admitted), applied in this order.
        let k = 4096u32;
        let table: &[(u64, u32, u32, u64, bool)] = &[
            (1, 0, k, 10, true),        // original
            (1, 0, k, 12, true),        // its retry
            (1, 0, k, 13, true),        // a newer write
            (1, 0, k, 10, false),       // the original, late: dropped
            (1, 0, 2 * k, 11, false),   // overlaps a newer block
            (1, k, k, 11, true),        // disjoint block: not ordered
            (1, 100, 10, 12, false),    // inside block 0 (seq 13)
            (2, 0, k, 5, true),         // another SDC is not fenced by SDC 1
            (1, 0, 256 * k, 14, true),  // the whole chunk, newer than all
            (1, 255 * k, k, 13, false), // the last block now carries 14
            (1, 255 * k + 5, 1, 15, true),
        ];
        let fences = WriteFences::default();
        for (i, &(sdc, offset, len, seq, want)) in table.iter().enumerate() {
            assert_eq!(fences.admit((sdc, 7, 0), offset, len, seq), want, "row {i}");
        }
    }

    #[test]
    fn chunks_and_volumes_are_separate() {
        let fences = WriteFences::default();
        assert!(fences.admit((1, 7, 0), 0, 4096, 10));
        assert!(fences.admit((1, 7, 1), 0, 4096, 9));
        assert!(fences.admit((1, 8, 0), 0, 4096, 9));
        fences.forget_volume(7);
        assert!(fences.admit((1, 7, 0), 0, 4096, 9));
        assert_eq!(fences.len(), 2);
    }
}
