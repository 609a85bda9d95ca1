//! Fencing by MDM term: a node never acts on an answer from a deposed MDM
//! leader.
//!
//! Every heartbeat answer of a replicated MDM carries the Raft term of the
//! leader that gave it. A leader cut off from its peers stops answering
//! within its lease, but an answer already on the wire (or from a leader
//! that has not yet noticed) can still arrive after a newer leader's: the
//! node keeps the highest term it has heard and ignores anything older, so
//! placement, rebuild jobs and keys only ever move forward in the log's
//! order. Term 0 is a single, unreplicated MDM.

use std::sync::atomic::{AtomicU64, Ordering};

/// The highest MDM term a node has heard.
#[derive(Debug, Default)]
pub struct TermFence {
    highest: AtomicU64,
}

impl TermFence {
    /// Whether an answer given in `term` may be acted on; records `term`
    /// when it is the highest yet.
    pub fn admit(&self, term: u64) -> bool {
        let before = self.highest.fetch_max(term, Ordering::AcqRel);
        term >= before
    }

    /// The highest term heard so far.
    pub fn highest(&self) -> u64 {
        self.highest.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_from_an_older_term_are_refused() {
        // (term of the answer, admitted, highest after)
        let steps = [
            (0, true, 0),
            (2, true, 2),
            (2, true, 2),
            (1, false, 2),
            (5, true, 5),
            (3, false, 5),
            (0, false, 5),
        ];
        let fence = TermFence::default();
        for (term, admitted, highest) in steps {
            assert_eq!(fence.admit(term), admitted, "term {term}");
            assert_eq!(fence.highest(), highest, "after term {term}");
        }
    }
}
