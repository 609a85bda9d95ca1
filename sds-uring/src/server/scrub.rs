//! Scrub: reading every chunk this node is primary of, on both copies, and
//! making them equal.
//!
//! For each such chunk, under its ordering lock (so no client write
//! interleaves): this copy is read with its block checksums checked (a
//! corrupt block is rewritten from the secondary, as a client read would),
//! then the secondary's copy is read (it checks its own checksums); a
//! secondary copy that is corrupt or differs is overwritten with this one.
//! With two copies and no checksums, a difference could not be resolved
//! (neither copy is known good); with them, the copy that passes its
//! checksums wins, and the primary's is the one that acknowledged writes
//! went through.
//!
//! Passes are throttled (`--scrub-mb-per-sec`), run every
//! `--scrub-interval-secs`, and on demand (`POST /scrub` on the control
//! port, which `pflex cluster scrub` sends to every SDS).

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pflex_proto::CHUNK_SIZE;
use serde::Serialize;

use super::rebuild::{pull_chunk, push_chunk, rewrite_from_copy};
use super::SdsNode;
use crate::store::StoreError;

/// What one pass found.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct ScrubReport {
    /// Chunks whose two copies were read and compared.
    pub chunks_checked: u64,
    /// Chunks of this copy found corrupt and rewritten from the secondary.
    pub repaired_here: u64,
    /// Secondary copies found corrupt or different and rewritten.
    pub repaired_there: u64,
    /// Chunks that could not be checked (a copy unreachable, both bad).
    pub unchecked: u64,
    pub started_at: u64,
    pub finished_at: u64,
}

/// Scrub state of this node (`GET /scrub`).
#[derive(Debug, Clone, Default, Serialize)]
pub struct ScrubStatus {
    pub running: bool,
    /// Passes finished since the start.
    pub passes: u64,
    pub last: Option<ScrubReport>,
}

/// Runs one pass at a time.
#[derive(Default)]
pub struct Scrubber {
    status: Mutex<ScrubStatus>,
}

impl Scrubber {
    pub fn status(&self) -> ScrubStatus {
        self.status.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Starts a pass in the background unless one runs; false if one did.
    pub fn start(node: &Arc<SdsNode>) -> bool {
        {
            let mut status = node.scrubber.status.lock().unwrap_or_else(|p| p.into_inner());
            if status.running {
                return false;
            }
            status.running = true;
        }
        let node = node.clone();
        tokio::spawn(async move {
            let report = scrub_once(&node).await;
            tracing::info!(?report, "scrub pass finished");
            let mut status = node.scrubber.status.lock().unwrap_or_else(|p| p.into_inner());
            status.running = false;
            status.passes += 1;
            status.last = Some(report);
        });
        true
    }
}

/// Starts a pass every `every`.
pub async fn scrub_loop(node: Arc<SdsNode>, every: Duration) {
    loop {
        tokio::time::sleep(every).await;
        Scrubber::start(&node);
    }
}

/// One pass over every chunk this node is primary of.
pub async fn scrub_once(node: &SdsNode) -> ScrubReport {
    let mut report = ScrubReport { started_at: pflex_proto::unix_now(), ..Default::default() };
    let Some(identity) = node.identity() else { return report };
    let me = identity.node_id;
    let rate = node.config.scrub_bytes_per_sec.max(1) as f64;
    let started = Instant::now();
    let mut bytes = 0u64;
    for (vol, chunk) in node.store.allocated_chunks() {
        let Ok(map) = node.newest_placement(vol).await else { continue };
        let Some(pg) = map.pg_of(chunk).copied() else { continue };
        if pg.primary != me || pg.secondary == 0 || node.store.on_failed_device(vol, chunk) {
            continue;
        }
        {
            let _in_order = node.chunk_locks.lock(vol, chunk, 0, CHUNK_SIZE as u32).await;
            if node.placement.known_epoch(vol) != map.epoch {
                report.unchecked += 1;
                continue;
            }
            let local = match node.store.read(vol, chunk, 0, CHUNK_SIZE as u32).await {
                Ok(data) => data,
                Err(StoreError::Corrupt { .. }) => {
                    match rewrite_from_copy(node, &identity, &map, pg.secondary, chunk).await {
                        Ok(good) => {
                            report.repaired_here += 1;
                            node.metrics.scrub_repairs.fetch_add(1, Ordering::Relaxed);
                            good
                        }
                        Err(_) => {
                            report.unchecked += 1;
                            continue;
                        }
                    }
                }
                Err(_) => {
                    report.unchecked += 1;
                    continue;
                }
            };
            let same = matches!(
                pull_chunk(node, &identity, &map, pg.secondary, chunk).await,
                Ok(remote) if remote == local
            );
            if !same {
                if push_chunk(node, &identity, &map, pg.secondary, chunk).await.is_ok() {
                    report.repaired_there += 1;
                    node.metrics.scrub_repairs.fetch_add(1, Ordering::Relaxed);
                } else {
                    report.unchecked += 1;
                    continue;
                }
            }
            report.chunks_checked += 1;
            node.metrics.scrub_chunks.fetch_add(1, Ordering::Relaxed);
        }
        // Throttle: both copies were read (2 MiB) for this chunk.
        bytes += 2 * CHUNK_SIZE;
        let due = Duration::from_secs_f64(bytes as f64 / rate);
        if let Some(wait) = due.checked_sub(started.elapsed()) {
            tokio::time::sleep(wait).await;
        }
    }
    report.finished_at = pflex_proto::unix_now();
    report
}
