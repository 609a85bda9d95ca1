//! Releasing chunks of PGs this node no longer holds a copy of.
//!
//! When a node is declared FAILED its copies move elsewhere; if it comes
//! back, the chunks it still stores are stale and only take space. A
//! periodic pass releases every chunk whose PG, in the volume's newest map,
//! has this node as neither primary nor secondary.
//!
//! The decision is made again under the chunk's ordering lock, which every
//! write to the chunk on this node also takes, and only if the map is the
//! newest epoch this node has heard of. A frame that makes this node a copy
//! again (a forward or a rebuild copy under a newer map) raises that epoch
//! before it waits for the lock, so the pass then leaves the chunk alone.
//! Volumes the MDM does not know are left alone too (their ids may be
//! reused; nothing is released on a guess).

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use pflex_proto::placement::PlacementMap;
use pflex_proto::CHUNK_SIZE;

use super::SdsNode;

/// Runs [`reclaim_once`] every `every`, the first time after one interval.
pub async fn reclaim_loop(node: Arc<SdsNode>, every: Duration) {
    loop {
        tokio::time::sleep(every).await;
        let released = reclaim_once(&node).await;
        if released > 0 {
            tracing::info!(chunks = released, "released chunks of PGs that moved to other nodes");
        }
    }
}

/// One pass; returns how many chunks it released.
pub async fn reclaim_once(node: &SdsNode) -> u64 {
    let Some(identity) = node.identity() else { return 0 };
    let me = identity.node_id;
    let mut by_volume: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
    for (vol, chunk) in node.store.allocated_chunks() {
        by_volume.entry(vol).or_default().push(chunk);
    }
    let mut released = 0;
    for (vol, chunks) in by_volume {
        let Ok(map) = node.newest_placement(vol).await else { continue };
        for chunk in chunks {
            if holds_copy(&map, chunk, me) {
                continue;
            }
            let _in_order = node.chunk_locks.lock(vol, chunk, 0, CHUNK_SIZE as u32).await;
            let newest = node.placement.cached(vol);
            let still_stale = newest.as_ref().is_some_and(|map| {
                map.epoch == node.placement.known_epoch(vol) && !holds_copy(map, chunk, me)
            });
            if !still_stale {
                continue;
            }
            match node.store.trim(vol, chunk, 0, CHUNK_SIZE as u32).await {
                Ok(()) => {
                    released += 1;
                    node.metrics.chunks_reclaimed.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => tracing::warn!(vol, chunk, error = %e, "could not release a stale chunk"),
            }
        }
    }
    released
}

/// Whether node `me` is the primary or the secondary of the chunk's PG.
fn holds_copy(map: &PlacementMap, chunk: u64, me: u64) -> bool {
    chunk < map.chunk_count()
        && map.pg_of(chunk).is_some_and(|pg| pg.primary == me || pg.secondary == me)
}
