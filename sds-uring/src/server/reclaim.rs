//! Releasing chunks of PGs this node no longer holds a copy of, and of
//! volumes that were deleted.
//!
//! When a node is declared FAILED its copies move elsewhere; if it comes
//! back, the chunks it still stores are stale and only take space. A
//! periodic pass releases every chunk whose PG, in the volume's newest map,
//! has this node as neither primary nor secondary.
//!
//! A deleted volume's chunks are erased (overwritten with zeroes, then
//! freed) by the same pass, once the MDM confirms the deletion: it keeps a
//! tombstone per deleted volume and never reuses a volume number, so the
//! answer is certain, also for a node that was down when the volume went.
//!
//! The decision is made again under the chunk's ordering lock, which every
//! write to the chunk on this node also takes, and only if the map is the
//! newest epoch this node has heard of. A frame that makes this node a copy
//! again (a forward or a rebuild copy under a newer map) raises that epoch
//! before it waits for the lock, so the pass then leaves the chunk alone.
//! Volumes the MDM does not answer for are left alone (nothing is released
//! on a guess).

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use pflex_proto::placement::PlacementMap;
use pflex_proto::CHUNK_SIZE;

use super::membership::VolumeFate;
use super::SdsNode;

/// First pass after a start: soon, so a node that was down when volumes
/// were deleted or its copies moved gives the space back at once.
const FIRST_PASS_AFTER: Duration = Duration::from_secs(5);

/// Runs [`reclaim_once`] shortly after the start, then every `every` and
/// whenever a heartbeat shows that a volume this node served is gone.
pub async fn reclaim_loop(node: Arc<SdsNode>, every: Duration) {
    let mut wait = FIRST_PASS_AFTER.min(every);
    loop {
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = node.reclaim_now.notified() => {}
        }
        wait = every;
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
        let map = match node.volume_fate(vol).await {
            VolumeFate::Live(map) => map,
            VolumeFate::Deleted => {
                released += erase_volume(node, vol, &chunks).await;
                continue;
            }
            VolumeFate::Unknown => continue,
        };
        for chunk in chunks {
            // A chunk on a failed device stays mapped (a hung IO may hold
            // its lock): the device serves nothing, and a restart tries it
            // afresh.
            if holds_copy(&map, chunk, me) || node.store.on_failed_device(vol, chunk) {
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

/// Erases every chunk of deleted volume `vol` held here and forgets the
/// volume's write fences; returns how many chunks went.
async fn erase_volume(node: &SdsNode, vol: u64, chunks: &[u64]) -> u64 {
    let mut erased = 0;
    for &chunk in chunks {
        if node.store.on_failed_device(vol, chunk) {
            continue;
        }
        match node.store.erase(vol, chunk).await {
            Ok(()) => {
                erased += 1;
                node.metrics.chunks_reclaimed.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => tracing::warn!(vol, chunk, error = %e, "could not erase a deleted chunk"),
        }
    }
    node.fences.forget_volume(vol);
    node.replica_fences.forget_volume(vol);
    let _ = node.dirty.forget_volume(vol).await;
    tracing::info!(vol, chunks = erased, "erased the chunks of a deleted volume");
    erased
}

/// Whether node `me` is the primary or the secondary of the chunk's PG, or
/// its absent copy (kept to be resynced when the node is taken back).
fn holds_copy(map: &PlacementMap, chunk: u64, me: u64) -> bool {
    chunk < map.chunk_count()
        && map.pg_of(chunk).is_some_and(|pg| {
            pg.primary == me || pg.secondary == me || pg.absent == me || pg.joining == me
        })
}
