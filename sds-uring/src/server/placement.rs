//! Placement maps this SDS routes by, cached per volume with their epoch.
//!
//! Two sources keep the cache honest: heartbeat replies carry the current
//! epoch and mapping generation of every volume changed since the node's
//! cursor (every volume on the first one, so a change is noticed within one
//! heartbeat even for volumes with no traffic), and a request
//! routed by a newer epoch than the cached map makes the node refetch
//! before serving it. Fetching is the node's job (it owns the MDM client);
//! this type only keeps state and answers "what do we know".

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use pflex_proto::api::VolumeGeneration;
use pflex_proto::placement::PlacementMap;

/// Cached maps and last-heard generations of volumes.
#[derive(Default)]
pub struct PlacementCache {
    maps: RwLock<HashMap<u64, Arc<PlacementMap>>>,
    generations: RwLock<HashMap<u64, VolumeGeneration>>,
    fetch_locks: Mutex<HashMap<u64, Arc<tokio::sync::Mutex<()>>>>,
    /// When each volume's map was last refreshed because a peer was unreachable.
    peer_refreshes: Mutex<HashMap<u64, Instant>>,
    /// The MDM's change cursor as of the last heartbeat applied (`None`:
    /// ask for every volume).
    cursor: Mutex<Option<u64>>,
}

/// What a heartbeat reply changed in the cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    /// Volumes whose cached map is older than the MDM's (to refetch).
    pub stale: Vec<u64>,
    /// Whether maps of deleted volumes were dropped (their chunks may go).
    pub forgot_maps: bool,
}

/// What the cache says about serving a request routed with some epoch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    /// The cached map is current for this request.
    Ready(Arc<PlacementMap>),
    /// The request was routed by an older map than this SDS knows.
    Stale,
    /// No map, or one older than the request or the last heartbeat.
    Fetch,
}

impl PlacementCache {
    /// Every cached map.
    pub fn all(&self) -> Vec<Arc<PlacementMap>> {
        self.maps.read().unwrap_or_else(|p| p.into_inner()).values().cloned().collect()
    }

    pub fn cached(&self, volume_id: u64) -> Option<Arc<PlacementMap>> {
        self.maps.read().unwrap_or_else(|p| p.into_inner()).get(&volume_id).cloned()
    }

    fn generation(&self, volume_id: u64) -> Option<VolumeGeneration> {
        self.generations.read().unwrap_or_else(|p| p.into_inner()).get(&volume_id).copied()
    }

    /// The newest epoch heard of for a volume (heartbeat or map).
    pub fn known_epoch(&self, volume_id: u64) -> u64 {
        let from_map = self.cached(volume_id).map_or(0, |m| m.epoch);
        let from_heartbeat = self.generation(volume_id).map_or(0, |g| g.epoch);
        from_map.max(from_heartbeat)
    }

    /// The newest mapping generation heard of (0 if the volume is unknown).
    pub fn mapping_gen(&self, volume_id: u64) -> u64 {
        let from_map = self.cached(volume_id).map_or(0, |m| m.mapping_gen);
        let from_heartbeat = self.generation(volume_id).map_or(0, |g| g.mapping_gen);
        from_map.max(from_heartbeat)
    }

    /// Whether a request routed with `request_epoch` can be served from the cache.
    pub fn lookup(&self, volume_id: u64, request_epoch: u64) -> Lookup {
        if request_epoch < self.known_epoch(volume_id) {
            return Lookup::Stale;
        }
        match self.cached(volume_id) {
            Some(map) if map.epoch >= request_epoch && map.epoch >= self.known_epoch(volume_id) => {
                Lookup::Ready(map)
            }
            _ => Lookup::Fetch,
        }
    }

    /// Stores a fetched map unless a newer one is already cached.
    pub fn store(&self, map: PlacementMap) -> Arc<PlacementMap> {
        let mut maps = self.maps.write().unwrap_or_else(|p| p.into_inner());
        match maps.get(&map.volume_id) {
            Some(existing) if existing.epoch > map.epoch => existing.clone(),
            _ => {
                let map = Arc::new(map);
                maps.insert(map.volume_id, map.clone());
                map
            }
        }
    }

    /// Raises a volume's known mapping generation to `mapping_gen` (learnt
    /// from a token the MDM signed).
    pub fn raise_mapping_gen(&self, volume_id: u64, mapping_gen: u64) {
        let mut generations = self.generations.write().unwrap_or_else(|p| p.into_inner());
        let g = generations.entry(volume_id).or_insert(VolumeGeneration {
            volume_id,
            epoch: 0,
            mapping_gen: 0,
        });
        g.mapping_gen = g.mapping_gen.max(mapping_gen);
    }

    /// Records a heartbeat's generations: every volume's (`complete`: the
    /// volumes it does not list are forgotten) or the changed ones, with the
    /// `deleted` ones forgotten; `cursor` is what the next heartbeat sends.
    pub fn apply_heartbeat(
        &self,
        volumes: &[VolumeGeneration],
        complete: bool,
        deleted: &[u64],
        cursor: u64,
    ) -> Applied {
        {
            let mut generations = self.generations.write().unwrap_or_else(|p| p.into_inner());
            if complete {
                generations.clear();
            }
            for id in deleted {
                generations.remove(id);
            }
            generations.extend(volumes.iter().map(|g| (g.volume_id, *g)));
        }
        let mut maps = self.maps.write().unwrap_or_else(|p| p.into_inner());
        let before = maps.len();
        if complete {
            let listed: std::collections::HashSet<u64> =
                volumes.iter().map(|g| g.volume_id).collect();
            maps.retain(|id, _| listed.contains(id));
        }
        for id in deleted {
            maps.remove(id);
        }
        *self.cursor.lock().unwrap_or_else(|p| p.into_inner()) = Some(cursor);
        let stale = volumes
            .iter()
            .filter(|g| maps.get(&g.volume_id).is_some_and(|m| m.epoch < g.epoch))
            .map(|g| g.volume_id)
            .collect();
        Applied { stale, forgot_maps: maps.len() < before }
    }

    /// What the next heartbeat asks changes since.
    pub fn cursor(&self) -> Option<u64> {
        *self.cursor.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Asks for every volume with the next heartbeat (a new registration:
    /// the MDM may not be the one the cursor came from).
    pub fn reset_cursor(&self) {
        *self.cursor.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    /// The lock that makes concurrent fetches of one volume's map one fetch.
    pub fn fetch_lock(&self, volume_id: u64) -> Arc<tokio::sync::Mutex<()>> {
        self.fetch_locks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(volume_id)
            .or_default()
            .clone()
    }

    /// Whether a map refresh after an unreachable peer is due: at most one
    /// per volume per `min_interval` (the peer may have moved to another
    /// address, which does not change the epoch; a dead peer must not make
    /// every failing write call the MDM).
    pub fn peer_refresh_due(&self, volume_id: u64, min_interval: Duration) -> bool {
        let mut last = self.peer_refreshes.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        match last.get(&volume_id) {
            Some(at) if now.duration_since(*at) < min_interval => false,
            _ => {
                last.insert(volume_id, now);
                true
            }
        }
    }

    /// Number of cached maps.
    /// Drops a deleted volume's map.
    pub fn forget(&self, volume_id: u64) {
        self.maps.write().unwrap_or_else(|p| p.into_inner()).remove(&volume_id);
    }

    pub fn len(&self) -> usize {
        self.maps.read().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Forgets everything (after registering with a new cluster, whose
    /// volumes and epochs are numbered anew).
    pub fn clear(&self) {
        self.maps.write().unwrap_or_else(|p| p.into_inner()).clear();
        self.generations.write().unwrap_or_else(|p| p.into_inner()).clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(epoch: u64) -> PlacementMap {
        PlacementMap {
            volume_id: 1,
            volume_name: "v".into(),
            size_bytes: 1 << 30,
            chunk_size: 1 << 20,
            epoch,
            mapping_gen: 2,
            pgs: vec![],
            nodes: vec![],
        }
    }

    #[test]
    fn epochs_decide_between_serving_refusing_and_refetching() {
        let cache = PlacementCache::default();
        assert_eq!(cache.lookup(1, 3), Lookup::Fetch);
        cache.store(map(3));
        assert!(matches!(cache.lookup(1, 3), Lookup::Ready(_)));
        assert_eq!(cache.lookup(1, 2), Lookup::Stale);
        assert_eq!(cache.lookup(1, 4), Lookup::Fetch, "request knows a newer map");
        let stale = cache.apply_heartbeat(
            &[VolumeGeneration { volume_id: 1, epoch: 5, mapping_gen: 7 }],
            true,
            &[],
            1,
        );
        assert_eq!(stale, Applied { stale: vec![1], forgot_maps: false });
        assert_eq!(cache.lookup(1, 4), Lookup::Stale);
        assert_eq!(cache.lookup(1, 5), Lookup::Fetch, "heartbeat knows a newer map");
        assert_eq!(cache.mapping_gen(1), 7);
        cache.store(map(5));
        assert!(matches!(cache.lookup(1, 5), Lookup::Ready(_)));
        cache.store(map(4));
        assert_eq!(cache.cached(1).unwrap().epoch, 5, "an older map never replaces a newer one");
        assert!(cache.apply_heartbeat(&[], true, &[], 2).forgot_maps);
        assert!(cache.is_empty(), "volumes missing from a complete list are forgotten");
        cache.store(map(5));
        let stale = cache.apply_heartbeat(
            &[VolumeGeneration { volume_id: 1, epoch: 6, mapping_gen: 7 }],
            false,
            &[],
            3,
        );
        assert_eq!(
            stale,
            Applied { stale: vec![1], forgot_maps: false },
            "a change raises the epoch"
        );
        assert_eq!(cache.cursor(), Some(3));
        assert!(!cache.apply_heartbeat(&[], false, &[], 4).forgot_maps);
        assert!(!cache.is_empty(), "a list of changes forgets nothing it does not name");
        assert!(cache.apply_heartbeat(&[], false, &[1], 5).forgot_maps);
        assert!(cache.is_empty(), "a deleted volume is forgotten");
    }

    #[test]
    fn peer_refreshes_are_rate_limited_per_volume() {
        let cache = PlacementCache::default();
        let hour = Duration::from_secs(3600);
        assert!(cache.peer_refresh_due(1, hour));
        assert!(!cache.peer_refresh_due(1, hour));
        assert!(cache.peer_refresh_due(2, hour));
        assert!(cache.peer_refresh_due(1, Duration::ZERO));
    }
}
