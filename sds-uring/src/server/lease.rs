//! Leases between the copies of a placement group: a primary serves a PG
//! only while its secondary vouches for it, and a copy that was promoted
//! serves only after every lease it granted for that PG has run out.
//!
//! Without leases a primary that the MDM replaced while it was cut off
//! (from the MDM only) would go on answering reads from SDCs that still hold
//! the old map, after its successor had acknowledged newer writes. As in
//! Ceph, where read leases live between the OSDs of a PG and not with the
//! monitors, the lease here is granted by the PG's other copy, so a primary
//! that can reach its secondaries keeps serving while the MDM is down:
//!
//! - The primary asks each of its secondaries for a lease on a volume under
//!   its current epoch (`Op::Lease`), every [`LeaseConfig::renew_every`], and
//!   counts the lease from the moment it *sent* the request:
//!   valid until `sent + length - drift`.
//! - A secondary grants only under the newest epoch it knows (else
//!   `StaleEpoch`), and records, per PG it is secondary of under that map,
//!   `granted + length`, counted on its own clock from the later moment it
//!   *received* the request. So the grantor's view of expiry is never
//!   earlier than the holder's, with no clock shared between hosts: only
//!   clock rates matter, and `drift` covers them.
//! - A node that becomes primary of a PG serves it only from
//!   `granted + length + drift` on. The copy that is promoted when a
//!   primary fails is its secondary, the only node that could have vouched
//!   for the old primary: once it knows the new map it refuses to renew the
//!   old one, and waits out what it granted before serving.
//! - A primary that hands its role over in a move (not a failure) tells
//!   the promoted copy once it knows the new map (`Op::LeaseRelease`): it
//!   refuses requests routed by older maps from then on, so the promoted
//!   copy need not wait out what it granted.
//! - A node that restarts has forgotten what it granted, except for one
//!   number it keeps on disk: a wall-clock time before which a lease it
//!   granted may still run (the *horizon*, written and synced before a grant
//!   that would pass it is answered, pushed `1.5 × length` ahead so that
//!   happens at most every half lease). Restarted, it serves as a primary only
//!   from the horizon plus the drift margin on; a node that never granted,
//!   or was down longer than that, serves at once.
//!
//! A PG with no distinct secondary (one copy left) needs no lease: any
//! successor must first be rebuilt from this copy.
//!
//! Decisions here are pure functions of the recorded instants; the node
//! sends the requests (see `dataplane`).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Lease timing. See `docs/ARCHITECTURE.md` ("Leases") for how these relate
/// to the failure timeout and the longest stall.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseConfig {
    /// How long a granted lease lasts.
    pub length: Duration,
    /// Margin for clock-rate differences between holder and grantor.
    pub drift: Duration,
    /// How often a primary renews its leases.
    pub renew_every: Duration,
}

impl Default for LeaseConfig {
    fn default() -> Self {
        LeaseConfig {
            length: Duration::from_millis(3000),
            drift: Duration::from_millis(300),
            renew_every: Duration::from_millis(750),
        }
    }
}

/// Leases this node holds (as a primary) and has granted (as a secondary).
pub struct Leases {
    config: LeaseConfig,
    /// Before this, a lease granted before the last restart may still run.
    restart_not_before: Instant,
    horizon: Mutex<Horizon>,
    /// (volume, secondary node) -> (epoch, valid until).
    held: Mutex<HashMap<(u64, u64), (u64, Instant)>>,
    /// (volume, PG index) -> the grantor's expiry of the newest lease granted.
    granted: Mutex<HashMap<(u64, usize), Instant>>,
}

/// The on-disk horizon (see the module doc).
struct Horizon {
    /// `None` in unit tests: nothing kept.
    path: Option<std::path::PathBuf>,
    /// Unix ms before which a granted lease may still run.
    until_ms: u64,
}

impl Horizon {
    /// Whether a lease of `length` granted now ends before the horizon on
    /// disk (always, when nothing is kept).
    fn covers(&self, length: Duration) -> bool {
        self.path.is_none() || unix_ms() + length.as_millis() as u64 <= self.until_ms
    }
}

/// Writes the horizon and syncs it (on a blocking thread: see
/// [`Leases::keep_horizon`]).
fn write_horizon(path: &std::path::Path, until_ms: u64) -> std::io::Result<()> {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new().create(true).write(true).truncate(false).open(path)?;
    f.write_all(format!("{until_ms:020}\n").as_bytes())?;
    f.sync_data()
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// What a primary may do with a PG right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrimaryLease {
    /// Serve.
    Valid,
    /// A lease granted for this PG (or before a restart) may still be held
    /// by another node: wait this long first.
    WaitOut(Duration),
    /// Ask the secondary for a lease first.
    Renew,
}

impl Leases {
    /// Leases whose horizon is kept in the file `horizon` (see the module
    /// doc). An unreadable file counts as a grant just before the start.
    pub fn open(config: LeaseConfig, horizon: std::path::PathBuf) -> Self {
        let now = Instant::now();
        let now_ms = unix_ms();
        let persisted = match std::fs::read_to_string(&horizon) {
            Ok(text) => {
                text.trim().parse::<u64>().unwrap_or(now_ms + config.length.as_millis() as u64)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
            Err(_) => now_ms + config.length.as_millis() as u64,
        };
        let wait = Duration::from_millis(persisted.saturating_sub(now_ms));
        let restart_not_before = if wait.is_zero() { now } else { now + wait + config.drift };
        let mut leases = Self::new_at(config, restart_not_before);
        leases.horizon = Mutex::new(Horizon { path: Some(horizon), until_ms: persisted });
        leases
    }

    fn new_at(config: LeaseConfig, restart_not_before: Instant) -> Self {
        Leases {
            config,
            restart_not_before,
            horizon: Mutex::new(Horizon { path: None, until_ms: 0 }),
            held: Mutex::new(HashMap::new()),
            granted: Mutex::new(HashMap::new()),
        }
    }

    pub fn config(&self) -> LeaseConfig {
        self.config
    }

    /// Whether leases granted before the last restart may still run (this
    /// node does not serve as a primary yet).
    pub fn restart_wait_pending(&self) -> bool {
        Instant::now() < self.restart_not_before
    }

    /// Whether this node, primary of PG `pg` of `volume` under `epoch`
    /// with secondary `secondary` (`None`: no other copy), may serve it at
    /// `now`.
    pub fn check_primary(
        &self,
        volume: u64,
        pg: usize,
        epoch: u64,
        secondary: Option<u64>,
        now: Instant,
    ) -> PrimaryLease {
        let c = self.config;
        let mut not_before = self.restart_not_before;
        if let Some(&granted) =
            self.granted.lock().unwrap_or_else(|p| p.into_inner()).get(&(volume, pg))
        {
            not_before = not_before.max(granted + c.drift);
        }
        if now < not_before {
            return PrimaryLease::WaitOut(not_before - now);
        }
        let Some(secondary) = secondary else { return PrimaryLease::Valid };
        match self.held.lock().unwrap_or_else(|p| p.into_inner()).get(&(volume, secondary)) {
            Some(&(held_epoch, until)) if held_epoch == epoch && now < until => PrimaryLease::Valid,
            _ => PrimaryLease::Renew,
        }
    }

    /// The secondary granted a lease requested at `sent` under `epoch`.
    pub fn record_held(&self, volume: u64, secondary: u64, epoch: u64, sent: Instant) {
        let until = sent + self.config.length.saturating_sub(self.config.drift);
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        let entry = held.entry((volume, secondary)).or_insert((epoch, until));
        if epoch > entry.0 || (epoch == entry.0 && until > entry.1) {
            *entry = (epoch, until);
        }
    }

    /// The secondary refused a renewal under `epoch` (it knows a newer map,
    /// or a newer mapping generation): stop serving under what this node
    /// held from it, unless that was already a lease of a newer epoch.
    pub fn drop_held(&self, volume: u64, secondary: u64, epoch: u64) {
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        if held.get(&(volume, secondary)).is_some_and(|&(e, _)| e <= epoch) {
            held.remove(&(volume, secondary));
        }
    }

    /// Before a grant of `length`: moves the on-disk horizon `1.5 × length`
    /// ahead if the lease would pass it, writing and syncing it on a blocking
    /// thread (never on the network thread). False if it cannot be written:
    /// then no lease may be granted.
    pub async fn keep_horizon(&self, length: Duration) -> bool {
        let (path, next) = {
            let h = self.horizon.lock().unwrap_or_else(|p| p.into_inner());
            if h.covers(length) {
                return true;
            }
            let next = unix_ms() + length.as_millis() as u64 * 3 / 2;
            (h.path.clone().expect("covers() is true without a path"), next)
        };
        let shown = path.display().to_string();
        match tokio::task::spawn_blocking(move || write_horizon(&path, next)).await {
            Ok(Ok(())) => {
                let mut h = self.horizon.lock().unwrap_or_else(|p| p.into_inner());
                h.until_ms = h.until_ms.max(next);
                true
            }
            outcome => {
                tracing::warn!(path = %shown, ?outcome, "cannot keep the lease horizon: granting no lease");
                false
            }
        }
    }

    /// As a secondary: grants the sender a lease on `pgs` of `volume`,
    /// received at `now`, for the longer of this node's lease and `asked`
    /// (the holder's), once [`Leases::keep_horizon`] covered that length.
    /// `still_current` is checked under the same lock that
    /// [`Leases::check_primary`] takes, so a grant under a map this node has
    /// just replaced is refused (false) rather than recorded after this node
    /// began serving as primary under the new one.
    pub fn grant(
        &self,
        volume: u64,
        pgs: &[usize],
        asked: Duration,
        now: Instant,
        still_current: impl FnOnce() -> bool,
    ) -> bool {
        let length = self.config.length.max(asked);
        let expires = now + length;
        let mut granted = self.granted.lock().unwrap_or_else(|p| p.into_inner());
        if !still_current() {
            return false;
        }
        if !self.horizon.lock().unwrap_or_else(|p| p.into_inner()).covers(length) {
            return false; // the caller did not keep the horizon first
        }
        for &pg in pgs {
            let e = granted.entry((volume, pg)).or_insert(expires);
            *e = (*e).max(expires);
        }
        true
    }

    /// The primary this node granted leases for PG `pg` of `volume` handed
    /// that role to this node and serves the PG no more (it knows the map
    /// that moved it): what was granted need not be waited out. Only ever
    /// one node holds such a lease: a copy that stays secondary keeps its
    /// primary through every change of the PG.
    pub fn release(&self, volume: u64, pg: usize) {
        self.granted.lock().unwrap_or_else(|p| p.into_inner()).remove(&(volume, pg));
    }

    /// Forgets a volume this node no longer has.
    pub fn forget_volume(&self, volume: u64) {
        self.held.lock().unwrap_or_else(|p| p.into_inner()).retain(|k, _| k.0 != volume);
        self.granted.lock().unwrap_or_else(|p| p.into_inner()).retain(|k, _| k.0 != volume);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn config() -> LeaseConfig {
        LeaseConfig { length: 3000 * MS, drift: 300 * MS, renew_every: 750 * MS }
    }

    #[tokio::test]
    async fn a_released_grant_is_not_waited_out() {
        let dir = tempfile::tempdir().unwrap();
        let leases = Leases::open(config(), dir.path().join("lease_horizon"));
        assert!(leases.keep_horizon(3000 * MS).await);
        let now = Instant::now();
        assert!(leases.grant(1, &[0, 1], Duration::ZERO, now, || true));
        // Promoted to primary of PG 0: it waits out what it granted ...
        assert!(matches!(leases.check_primary(1, 0, 6, None, now), PrimaryLease::WaitOut(_)));
        // ... unless the old primary released it; PG 1's grant still holds.
        leases.release(1, 0);
        assert_eq!(leases.check_primary(1, 0, 6, None, now), PrimaryLease::Valid);
        assert!(matches!(leases.check_primary(1, 1, 6, None, now), PrimaryLease::WaitOut(_)));
    }

    #[tokio::test]
    async fn a_restarted_node_waits_out_the_horizon_it_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lease_horizon");
        // Never granted: serves at once.
        let fresh = Leases::open(config(), path.clone());
        assert_eq!(fresh.check_primary(1, 0, 5, None, Instant::now()), PrimaryLease::Valid);
        // A grant without the horizon kept first is refused.
        assert!(!fresh.grant(1, &[0], Duration::ZERO, Instant::now(), || true));
        // Keeping it moves it 1.5 x length ahead, on disk.
        assert!(fresh.keep_horizon(3000 * MS).await);
        assert!(fresh.grant(1, &[0], Duration::ZERO, Instant::now(), || true));
        let kept: u64 = std::fs::read_to_string(&path).unwrap().trim().parse().unwrap();
        assert!(kept >= unix_ms() + 4000, "horizon {kept}");
        // Restarted now: waits until the horizon plus the drift margin.
        let restarted = Leases::open(config(), path.clone());
        assert!(restarted.restart_wait_pending());
        match restarted.check_primary(1, 1, 5, None, Instant::now()) {
            PrimaryLease::WaitOut(w) => assert!(w > 4000 * MS && w <= 4800 * MS, "{w:?}"),
            other => panic!("{other:?}"),
        }
        // A horizon in the past: no wait.
        std::fs::write(&path, "1\n").unwrap();
        let later = Leases::open(config(), path.clone());
        assert_eq!(later.check_primary(1, 0, 5, None, Instant::now()), PrimaryLease::Valid);
        // An unreadable one: the full wait, to be safe.
        std::fs::write(&path, "garbage").unwrap();
        let unsure = Leases::open(config(), path);
        assert!(matches!(
            unsure.check_primary(1, 0, 5, None, Instant::now()),
            PrimaryLease::WaitOut(_)
        ));
    }

    #[test]
    fn a_primary_serves_only_under_a_lease_of_its_current_epoch() {
        let t0 = Instant::now();
        let leases = Leases::new_at(config(), t0 + 3300 * MS);
        let t = t0 + 10_000 * MS;
        assert_eq!(leases.check_primary(1, 0, 5, Some(2), t), PrimaryLease::Renew);
        leases.record_held(1, 2, 5, t);
        // (time, epoch, expected)
        let table = [
            (t, 5, PrimaryLease::Valid),
            (t + 2699 * MS, 5, PrimaryLease::Valid),
            (t + 2700 * MS, 5, PrimaryLease::Renew), // sent + length - drift
            (t, 6, PrimaryLease::Renew),             // a newer map: ask again
        ];
        for (i, (now, epoch, want)) in table.into_iter().enumerate() {
            assert_eq!(leases.check_primary(1, 0, epoch, Some(2), now), want, "row {i}");
        }
        // Another secondary, another volume: no lease.
        assert_eq!(leases.check_primary(1, 0, 5, Some(3), t), PrimaryLease::Renew);
        assert_eq!(leases.check_primary(2, 0, 5, Some(2), t), PrimaryLease::Renew);
        leases.drop_held(1, 2, 4); // a refusal under an older epoch: kept
        assert_eq!(leases.check_primary(1, 0, 5, Some(2), t), PrimaryLease::Valid);
        leases.drop_held(1, 2, 5);
        assert_eq!(leases.check_primary(1, 0, 5, Some(2), t), PrimaryLease::Renew);
    }

    #[test]
    fn a_promoted_copy_waits_out_the_lease_it_granted_the_old_primary() {
        let t0 = Instant::now();
        let leases = Leases::new_at(config(), t0 + 3300 * MS);
        let t = t0 + 10_000 * MS;
        // As secondary of PGs 0 and 2, it vouched for the old primary at t.
        assert!(leases.grant(1, &[0, 2], Duration::ZERO, t, || true));
        // A grant under a map this node has just replaced is not recorded.
        assert!(!leases.grant(1, &[1], Duration::ZERO, t, || false));
        // Promoted at t + 1 s: it may serve PG 0 only at t + length + drift.
        let promoted = t + 1000 * MS;
        assert_eq!(leases.check_primary(1, 0, 6, None, promoted), PrimaryLease::WaitOut(2300 * MS));
        assert_eq!(leases.check_primary(1, 0, 6, None, t + 3300 * MS), PrimaryLease::Valid);
        // PG 1 was never vouched for here: no wait.
        assert_eq!(leases.check_primary(1, 1, 6, None, promoted), PrimaryLease::Valid);
    }

    #[test]
    fn a_holder_with_a_longer_lease_is_waited_out_in_full() {
        let t0 = Instant::now();
        let leases = Leases::new_at(config(), t0 + 3300 * MS);
        let t = t0 + 10_000 * MS;
        // The holder runs with 5 s leases, this node with 3 s.
        assert!(leases.grant(1, &[0], 5000 * MS, t, || true));
        assert_eq!(leases.check_primary(1, 0, 6, None, t), PrimaryLease::WaitOut(5300 * MS));
    }
}
