//! How copy jobs (rebuild, resync, move) share this node with client IO.
//!
//! The MDM's [`MovementPolicy`] arrives with every heartbeat reply. Every
//! chunk a job sends first takes its turn from a node-wide pacer (so all of
//! this node's jobs together stay under the MB/s limit), and with
//! [`MovementPriority::Client`] only one chunk is in flight while clients
//! are doing IO here (client IO seen within [`CLIENT_ACTIVE_WINDOW`]).
//!
//! Moves also need to know whether a write's forward to the PG's joining
//! copy failed: that copy then lacks an acknowledged write, and the move
//! must start over ([`MovementState::break_move`]).

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use pflex_proto::api::{MovementPolicy, MovementPriority};

use super::dirty::PgKey;

/// Client IO this recent counts as "clients are busy".
pub const CLIENT_ACTIVE_WINDOW: Duration = Duration::from_millis(50);

/// Longest burst the pacer lets through at once after an idle spell.
const PACER_BURST: Duration = Duration::from_millis(50);

pub struct MovementState {
    policy: Mutex<MovementPolicy>,
    /// When the pacer's next byte may leave.
    next_send: Mutex<Instant>,
    /// Held by a chunk copy while clients are busy (priority `client`).
    narrow: tokio::sync::Mutex<()>,
    started: Instant,
    /// Milliseconds after `started` of the last client request.
    last_client_io_ms: AtomicU64,
    /// PGs whose joining copy missed a forwarded write.
    broken_moves: Mutex<HashSet<PgKey>>,
}

impl Default for MovementState {
    fn default() -> Self {
        let now = Instant::now();
        MovementState {
            policy: Mutex::new(MovementPolicy::default()),
            next_send: Mutex::new(now),
            narrow: tokio::sync::Mutex::new(()),
            started: now,
            last_client_io_ms: AtomicU64::new(0),
            broken_moves: Mutex::new(HashSet::new()),
        }
    }
}

impl MovementState {
    pub fn set_policy(&self, policy: MovementPolicy) {
        *self.policy.lock().unwrap_or_else(|p| p.into_inner()) = policy;
    }

    pub fn policy(&self) -> MovementPolicy {
        *self.policy.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Called for every client request (one relaxed store).
    pub fn client_io(&self) {
        let ms = self.started.elapsed().as_millis() as u64 + 1;
        self.last_client_io_ms.store(ms, Ordering::Relaxed);
    }

    fn clients_busy(&self) -> bool {
        let last = self.last_client_io_ms.load(Ordering::Relaxed);
        last != 0
            && (self.started.elapsed().as_millis() as u64).saturating_sub(last)
                < CLIENT_ACTIVE_WINDOW.as_millis() as u64
    }

    /// Waits for this chunk's turn: the pacer's slot for `bytes`, and with
    /// priority `client` while clients are busy, the single narrow lane
    /// (held by the returned guard until the chunk is sent).
    pub async fn admit(&self, bytes: u64) -> Option<tokio::sync::MutexGuard<'_, ()>> {
        let policy = self.policy();
        let lane = if policy.priority == MovementPriority::Client && self.clients_busy() {
            Some(self.narrow.lock().await)
        } else {
            None
        };
        if let Some(wait) = self.reserve(policy.mb_per_sec, bytes, Instant::now()) {
            tokio::time::sleep(wait).await;
        }
        lane
    }

    /// Takes `bytes` from the pacer at `mb_per_sec` (0: no limit); how long
    /// to wait before sending them.
    fn reserve(&self, mb_per_sec: u64, bytes: u64, now: Instant) -> Option<Duration> {
        if mb_per_sec == 0 {
            return None;
        }
        let cost = Duration::from_nanos(bytes.saturating_mul(1_000) / mb_per_sec);
        let mut next = self.next_send.lock().unwrap_or_else(|p| p.into_inner());
        let start = (*next).max(now.checked_sub(PACER_BURST).unwrap_or(now));
        *next = start + cost;
        start.checked_duration_since(now)
    }

    /// A forward to `pg`'s joining copy failed: its move must start over.
    pub fn break_move(&self, pg: PgKey) {
        self.broken_moves.lock().unwrap_or_else(|p| p.into_inner()).insert(pg);
    }

    /// Whether a forward to `pg`'s joining copy failed since [`Self::start_move`].
    pub fn move_broken(&self, pg: PgKey) -> bool {
        self.broken_moves.lock().unwrap_or_else(|p| p.into_inner()).contains(&pg)
    }

    /// A move of `pg` (re)starts from scratch.
    pub fn start_move(&self, pg: PgKey) {
        self.broken_moves.lock().unwrap_or_else(|p| p.into_inner()).remove(&pg);
    }

    /// Chunks one job keeps in flight.
    pub fn width(&self) -> usize {
        self.policy().chunks_in_flight.clamp(1, 64) as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pacer_spreads_bytes_at_the_limit() {
        let state = MovementState::default();
        let t0 = Instant::now() + Duration::from_secs(1);
        // 100 MB/s: 1 MiB costs 10.49 ms. The first ~50 ms pass as a burst.
        let waits: Vec<Duration> =
            (0..20).map(|_| state.reserve(100, 1 << 20, t0).unwrap_or(Duration::ZERO)).collect();
        let last = *waits.last().unwrap();
        let expected = Duration::from_nanos(20 * (1u64 << 20) * 1_000 / 100);
        assert!(last + PACER_BURST + Duration::from_millis(11) >= expected, "{waits:?}");
        assert!(last + PACER_BURST <= expected, "{waits:?}");
        assert_eq!(state.reserve(0, 1 << 30, t0), None, "0 is no limit");
    }

    #[test]
    fn client_priority_narrows_only_while_clients_are_busy() {
        let state = MovementState::default();
        assert!(!state.clients_busy());
        state.client_io();
        assert!(state.clients_busy());
    }

    #[test]
    fn a_broken_move_stays_broken_until_restarted() {
        let state = MovementState::default();
        state.break_move((1, 2));
        assert!(state.move_broken((1, 2)));
        assert!(!state.move_broken((1, 3)));
        state.start_move((1, 2));
        assert!(!state.move_broken((1, 2)));
    }
}
