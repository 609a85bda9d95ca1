//! Failed devices: telling the MDM which copies this node lost.
//!
//! The chunk store fails a device when one of its IOs misses the deadline
//! (`--device-timeout-ms`) or reports that the device is gone (`EIO`,
//! `EROFS`, ...). From then on the store serves none of that device's
//! chunks (requests get `NotAvailable` and the SDC retries) and puts no new
//! chunk there. This task then names to the MDM every placement group
//! that had a chunk on the device; the MDM moves this node's copies of
//! those PGs to other nodes (the other copy becomes primary and is rebuilt
//! from), exactly as for a failed node, while the node's other devices keep
//! serving their PGs. The report is repeated until the MDM has taken it.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use pflex_proto::api::{DeviceFailure, PgRef};

use super::membership::VolumeFate;
use super::SdsNode;

/// Pause before a report the MDM did not take is sent again.
const REPORT_RETRY: Duration = Duration::from_secs(1);

/// Reports each failed device to the MDM once it has taken the report.
pub async fn device_watch(node: Arc<SdsNode>) {
    let mut failures = node.store.device_failures();
    let mut reported: HashSet<usize> = HashSet::new();
    loop {
        let mut pending = false;
        for (index, path, reason) in node.store.failed_devices() {
            if reported.contains(&index) {
                continue;
            }
            if report(&node, index, &path, &reason).await {
                reported.insert(index);
            } else {
                pending = true;
            }
        }
        if pending {
            tokio::time::sleep(REPORT_RETRY).await;
        } else if failures.changed().await.is_err() {
            return;
        }
    }
}

/// Sends one device's report; true once the MDM has taken it.
async fn report(node: &SdsNode, index: usize, path: &Path, reason: &str) -> bool {
    let Some(identity) = node.identity() else { return false };
    let Some(pgs) = lost_pgs(node, identity.node_id, index).await else { return false };
    let failure = DeviceFailure {
        path: path.display().to_string(),
        reason: reason.to_string(),
        pgs: pgs.into_iter().collect(),
    };
    match identity.mdm.device_failed(&failure).await {
        Ok(verdict) => {
            tracing::warn!(
                device = %path.display(),
                pgs = failure.pgs.len(),
                copies_replaced = verdict.copies_replaced,
                unrebuilt = verdict.unrebuilt_survivors,
                "the MDM took the failed device's copies away from this node"
            );
            node.local_log.health("device_failed", format!("{}: {reason}", path.display()));
            true
        }
        Err(e) => {
            tracing::warn!(device = %path.display(), error = %e, "cannot report a failed device");
            false
        }
    }
}

/// The PGs of which this node (`me`) holds a copy with a chunk on device
/// `index`; `None` if some volume's map cannot be had now (ask again).
async fn lost_pgs(node: &SdsNode, me: u64, index: usize) -> Option<BTreeSet<PgRef>> {
    let mut maps = HashMap::new();
    let mut pgs = BTreeSet::new();
    for (volume_id, chunk) in node.store.chunks_on_device(index) {
        if let std::collections::hash_map::Entry::Vacant(entry) = maps.entry(volume_id) {
            entry.insert(node.volume_fate(volume_id).await);
        }
        let map = match &maps[&volume_id] {
            VolumeFate::Live(map) => map,
            VolumeFate::Deleted => continue,
            VolumeFate::Unknown => return None,
        };
        let Some(pg_index) = map.pg_index_of(chunk) else { continue };
        let pg = &map.pgs[pg_index as usize];
        if pg.primary == me || pg.secondary == me || pg.absent == me || pg.joining == me {
            pgs.insert(PgRef { volume_id, pg_index });
        }
    }
    Some(pgs)
}
