//! Connection slots: a cap on the connections a listener serves at once
//! that a flood of idle connections cannot use to lock real clients out.
//!
//! When every slot is taken, a new connection takes the slot of one that is
//! told to close: first the oldest of those that never sent anything (an
//! attacker's idle sockets, a port scan), then the one idle longest. A
//! client that has sent a frame keeps its connection while strangers come
//! and go, and a new client, a heartbeat or a probe always gets in. The
//! choice is [`Slots::victim`], a pure function.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::sync::oneshot;

/// A capped set of connection slots (cheap to clone).
#[derive(Clone)]
pub struct Slots {
    inner: Arc<Mutex<Table>>,
    evicted: Arc<AtomicU64>,
}

struct Table {
    cap: usize,
    next_id: u64,
    /// id → (last activity, whether it ever was active, how to tell it to close).
    live: BTreeMap<u64, (Instant, bool, Option<oneshot::Sender<()>>)>,
}

/// What eviction knows of one connection.
#[derive(Debug, Clone, Copy)]
pub struct Idle {
    pub id: u64,
    /// Admitted at, or last active at.
    pub since: Instant,
    /// Whether it ever was active (sent a frame, finished a handshake).
    pub used: bool,
}

/// One admitted connection; frees its slot when dropped.
pub struct Slot {
    id: u64,
    inner: Arc<Mutex<Table>>,
    /// Resolves when the connection must close to make room.
    pub evicted: oneshot::Receiver<()>,
}

impl Slots {
    pub fn new(cap: usize) -> Self {
        Slots {
            inner: Arc::new(Mutex::new(Table {
                cap: cap.max(1),
                next_id: 0,
                live: BTreeMap::new(),
            })),
            evicted: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Admits a connection, evicting the longest idle one if every slot is taken.
    pub fn admit(&self) -> Slot {
        let (tx, rx) = oneshot::channel();
        let mut table = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        while table.live.len() >= table.cap {
            let idle: Vec<Idle> = table
                .live
                .iter()
                .map(|(id, (at, used, _))| Idle { id: *id, since: *at, used: *used })
                .collect();
            let Some(victim) = Self::victim(&idle) else { break };
            if let Some((_, _, Some(tell))) = table.live.remove(&victim) {
                let _ = tell.send(());
            }
            self.evicted.fetch_add(1, Ordering::Relaxed);
        }
        let id = table.next_id;
        table.next_id += 1;
        table.live.insert(id, (Instant::now(), false, Some(tx)));
        Slot { id, inner: self.inner.clone(), evicted: rx }
    }

    /// The connection to evict: the oldest that never was active, else the
    /// one idle longest (the oldest id on a tie).
    pub fn victim(connections: &[Idle]) -> Option<u64> {
        connections.iter().min_by_key(|c| (c.used, c.since, c.id)).map(|c| c.id)
    }

    /// Connections served now.
    pub fn in_use(&self) -> usize {
        self.inner.lock().unwrap_or_else(|p| p.into_inner()).live.len()
    }

    /// Connections closed so far to make room for new ones.
    pub fn evictions(&self) -> u64 {
        self.evicted.load(Ordering::Relaxed)
    }
}

/// A cloneable handle that records a slot's activity (for code that cannot
/// hold the [`Slot`] itself, such as a per-request service).
#[derive(Clone)]
pub struct SlotActivity {
    id: u64,
    inner: Arc<Mutex<Table>>,
}

impl SlotActivity {
    /// Records activity (a frame or request read, a finished handshake).
    pub fn touch(&self) {
        touch(&self.inner, self.id);
    }
}

/// Marks connection `id` active now.
fn touch(inner: &Mutex<Table>, id: u64) {
    let mut table = inner.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(entry) = table.live.get_mut(&id) {
        entry.0 = Instant::now();
        entry.1 = true;
    }
}

impl Slot {
    /// Records activity (a frame read, a finished handshake).
    pub fn touch(&self) {
        touch(&self.inner, self.id);
    }

    /// A handle that records this slot's activity.
    pub fn handle(&self) -> SlotActivity {
        SlotActivity { id: self.id, inner: self.inner.clone() }
    }

    /// Whether this connection was told to close.
    pub fn is_evicted(&mut self) -> bool {
        !matches!(self.evicted.try_recv(), Err(oneshot::error::TryRecvError::Empty))
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut table = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        table.live.remove(&self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn strangers_go_first_then_the_longest_idle() {
        let t0 = Instant::now();
        let c = |id, ms, used| Idle { id, since: t0 + Duration::from_millis(ms), used };
        assert_eq!(Slots::victim(&[]), None);
        assert_eq!(Slots::victim(&[c(1, 5, true), c(2, 1, true), c(3, 9, true)]), Some(2));
        assert_eq!(Slots::victim(&[c(4, 1, true), c(2, 1, true)]), Some(2), "oldest id on a tie");
        // Never-used connections go first, even if newer than an idle client.
        assert_eq!(Slots::victim(&[c(1, 1, true), c(2, 8, false), c(3, 5, false)]), Some(3));
    }

    #[tokio::test]
    async fn a_full_table_evicts_a_stranger_and_keeps_the_client() {
        let slots = Slots::new(2);
        let mut busy = slots.admit();
        busy.touch();
        tokio::time::sleep(Duration::from_millis(5)).await;
        let mut idle = slots.admit();
        let mut newcomer = slots.admit();
        assert!(idle.is_evicted(), "the connection that never sent anything makes room");
        assert!(!busy.is_evicted() && !newcomer.is_evicted());
        assert_eq!((slots.in_use(), slots.evictions()), (2, 1));
        drop(busy);
        assert_eq!(slots.in_use(), 1);
        drop(idle);
        assert_eq!(slots.in_use(), 1, "an evicted slot was freed already");
    }
}
