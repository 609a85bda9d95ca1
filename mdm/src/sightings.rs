//! When each component was last heard from: kept in memory by the MDM that
//! serves the API, written to the database only now and then.
//!
//! A heartbeat that changes nothing durable (the node was not declared
//! failed, its capacity did not move, its durable sighting is recent) is
//! answered on a reader connection and recorded here, not committed.
//! Committing every heartbeat, and on a replicated MDM sending each through
//! the Raft log, made the heartbeats of a large cluster most of what the MDM
//! did. Every liveness judgement on this MDM takes the later of the durable
//! sighting (`cluster_nodes.last_seen`) and this one.
//!
//! The durable sighting is refreshed at least every [`persist_every`]
//! seconds (each node at its own age, [`persist_after`]), so an MDM that restarts, or a member that becomes leader, and so
//! starts with no sightings of its own, never judges a live node by one
//! older than that; both also wait a full failure timeout before acting on
//! silence. Beat counts (`component_health.heartbeats`, `heartbeat_log`)
//! are added when the sighting is written; the counts of a leader that
//! stops leading before writing them are lost, its sightings are not
//! needed.

use std::collections::HashMap;
use std::sync::RwLock;

use crate::service::Settings;

/// Sightings kept in memory, per node id.
#[derive(Debug, Default)]
pub struct Sightings {
    seen: RwLock<HashMap<u64, Sighting>>,
}

#[derive(Debug, Clone, Copy, Default)]
struct Sighting {
    /// Unix seconds of the last heartbeat.
    at: u64,
    /// Heartbeats answered since the sighting was last written.
    unwritten_beats: u64,
}

impl Sightings {
    fn with<T>(&self, f: impl FnOnce(&mut HashMap<u64, Sighting>) -> T) -> T {
        f(&mut self.seen.write().unwrap_or_else(|p| p.into_inner()))
    }

    /// When `node` was last heard from: the later of its durable sighting
    /// and the one kept here.
    pub fn last_seen(&self, node: u64, durable: u64) -> u64 {
        let seen = self.seen.read().unwrap_or_else(|p| p.into_inner());
        seen.get(&node).map_or(durable, |s| s.at.max(durable))
    }

    /// [`Sightings::last_seen`] for many rows under one lock: `field` gives
    /// a row's node id and its durable sighting, which is raised in place.
    pub fn overlay<R>(&self, rows: &mut [R], field: impl Fn(&mut R) -> (u64, &mut u64)) {
        let seen = self.seen.read().unwrap_or_else(|p| p.into_inner());
        for row in rows {
            let (node, last_seen) = field(row);
            if let Some(sighting) = seen.get(&node) {
                *last_seen = (*last_seen).max(sighting.at);
            }
        }
    }

    /// A heartbeat answered without writing.
    pub fn record(&self, node: u64, now: u64) {
        self.with(|seen| {
            let sighting = seen.entry(node).or_default();
            sighting.at = sighting.at.max(now);
            sighting.unwritten_beats += 1;
        });
    }

    /// A heartbeat being written: returns the beats answered since the last
    /// write (to be added to the counts) and starts counting again.
    pub fn take_unwritten(&self, node: u64, now: u64) -> u64 {
        self.with(|seen| {
            let sighting = seen.entry(node).or_default();
            sighting.at = sighting.at.max(now);
            std::mem::take(&mut sighting.unwritten_beats)
        })
    }
}

/// Longest age of a durable sighting of a node that keeps beating: at most
/// half the time after which a silent node is STALE (so a restarted MDM does
/// not show a live node STALE), a quarter of the failure timeout, and 30 s.
pub fn persist_every(settings: &Settings) -> u64 {
    (settings.stale_after_secs / 2).min(settings.failed_after_secs / 4).clamp(1, 30)
}

/// The age at which `node`'s durable sighting is refreshed: between half
/// of [`persist_every`] and all of it, by node id, so nodes registered in
/// the same second (a cluster's start, an MDM's restart) do not all write
/// in the same heartbeat round ever after.
pub fn persist_after(settings: &Settings, node: u64) -> u64 {
    let every = persist_every(settings);
    every - node % (every / 2 + 1)
}

/// What the database holds about a node that heartbeats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DurableSighting {
    pub last_seen: u64,
    /// When it was declared failed (0: never).
    pub failed_at: u64,
    /// Its capacity and use as an SDS (0 for other components).
    pub capacity_bytes: u64,
    pub used_bytes: u64,
}

/// What a heartbeat reports that may have to be written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reported {
    pub is_sds: bool,
    pub capacity_bytes: u64,
    pub used_bytes: u64,
}

/// Whether a heartbeat must be committed rather than only recorded here:
/// the node was declared failed and this is the first word from it, its
/// durable sighting is `persist_every` old, or (an SDS) its capacity
/// changed or its use moved by 1% of it or more (placement reads both).
pub fn must_write(
    durable: &DurableSighting,
    reported: &Reported,
    now: u64,
    persist_every: u64,
) -> bool {
    let declared_failed = durable.failed_at > 0 && durable.failed_at >= durable.last_seen;
    let old = now.saturating_sub(durable.last_seen) >= persist_every;
    let space_moved = reported.is_sds
        && reported.capacity_bytes > 0
        && (reported.capacity_bytes != durable.capacity_bytes
            || reported.used_bytes.abs_diff(durable.used_bytes)
                >= (reported.capacity_bytes / 100).max(1));
    declared_failed || old || space_moved
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_000_000;
    const GIB: u64 = 1 << 30;

    fn durable(last_seen: u64, failed_at: u64) -> DurableSighting {
        DurableSighting { last_seen, failed_at, capacity_bytes: 100 * GIB, used_bytes: 10 * GIB }
    }

    fn sds(capacity_bytes: u64, used_bytes: u64) -> Reported {
        Reported { is_sds: true, capacity_bytes, used_bytes }
    }

    const SDC: Reported = Reported { is_sds: false, capacity_bytes: 0, used_bytes: 0 };

    #[test]
    fn what_is_written_table() {
        let cases: &[(&str, DurableSighting, Reported, bool)] = &[
            ("recent, nothing moved", durable(NOW - 5, 0), sds(100 * GIB, 10 * GIB), false),
            ("recent SDC", durable(NOW - 29, 0), SDC, false),
            ("durable sighting 30 s old", durable(NOW - 30, 0), SDC, true),
            ("declared failed, first word", durable(NOW - 3, NOW - 1), SDC, true),
            ("declared failed then heard (written)", durable(NOW - 1, NOW - 3), SDC, false),
            ("failed in the same second", durable(NOW - 1, NOW - 1), SDC, true),
            ("capacity changed", durable(NOW - 1, 0), sds(120 * GIB, 10 * GIB), true),
            ("use moved under 1%", durable(NOW - 1, 0), sds(100 * GIB, 10 * GIB + GIB / 2), false),
            ("use moved 1%", durable(NOW - 1, 0), sds(100 * GIB, 11 * GIB), true),
            ("use shrank 1%", durable(NOW - 1, 0), sds(100 * GIB, 9 * GIB), true),
            ("no capacity reported", durable(NOW - 1, 0), sds(0, 0), false),
            ("clock behind the sighting", durable(NOW + 5, 0), SDC, false),
        ];
        for (what, durable, reported, expected) in cases {
            assert_eq!(must_write(durable, reported, NOW, 30), *expected, "{what}");
        }
    }

    #[test]
    fn the_later_sighting_counts() {
        let sightings = Sightings::default();
        assert_eq!(sightings.last_seen(7, 100), 100, "none kept: the durable one");
        sightings.record(7, 150);
        sightings.record(7, 140);
        assert_eq!(sightings.last_seen(7, 100), 150);
        assert_eq!(sightings.last_seen(7, 200), 200, "a later durable one wins");
        assert_eq!(sightings.take_unwritten(7, 160), 2);
        assert_eq!(sightings.take_unwritten(7, 160), 0);
        assert_eq!(sightings.last_seen(7, 0), 160);
        let mut rows = [(7, 100), (7, 300), (8, 100)];
        sightings.overlay(&mut rows, |r| (r.0, &mut r.1));
        assert_eq!(rows, [(7, 160), (7, 300), (8, 100)]);
    }

    #[test]
    fn persisted_often_enough_for_the_thresholds() {
        let settings = |stale_after_secs, failed_after_secs| Settings {
            heartbeat_interval_secs: 2,
            stale_after_secs,
            failed_after_secs,
            token_ttl_secs: 600,
            probe_on_report: false,
            unreachable_grace_secs: 2,
            resync_window_secs: 0,
        };
        assert_eq!(persist_every(&settings(30, 120)), 15);
        assert_eq!(persist_every(&settings(1800, 3600)), 30);
        assert_eq!(persist_every(&settings(3, 6)), 1);
        assert_eq!(persist_every(&settings(1, 2)), 1);
        let spread: std::collections::BTreeSet<u64> =
            (0..1000).map(|node| persist_after(&settings(1800, 3600), node)).collect();
        assert_eq!(spread, (15..=30).collect(), "spread over the second half");
        assert!((0..100).all(|node| persist_after(&settings(3, 6), node) == 1));
    }
}
