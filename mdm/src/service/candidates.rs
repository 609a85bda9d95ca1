//! The SDS nodes a placement may use, read once and kept between requests.
//!
//! Every create (and resize, re-placement and move) needs the pool's live
//! nodes with their fault sets, room and load: a thousand rows, each looked
//! up in four tables, which was most of what a create cost the writer. The
//! durable facts of those nodes change rarely, so they are kept in memory,
//! keyed by `topology_seq`: triggers give it a new random value whenever a
//! fact the placement reads changes (an SDS, its devices, its fault set,
//! its failure). Random, not counted: a batch rolled back after a create
//! kept what it saw, and a counter would give the same value again to a
//! different change. Only the load (`sds_load`, which every create changes)
//! is read each time, in one pass. The facts are also read again at least
//! every [`MAX_AGE`], so the durable sighting they carry (`last_seen`, not
//! followed by the trigger: heartbeats write it all the time) is never
//! older than that; the live sighting in memory is laid over it per request.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rusqlite::Connection;

use super::volumes::NodeUsage;
use super::{liveness, Cached, Ctx};
use crate::error::MdmError;
use crate::placement::Candidate;

/// The longest the facts of a pool are kept without reading them again.
pub const MAX_AGE: Duration = Duration::from_secs(1);

/// The facts of a pool's candidates (`?1`: the pool). The query walks
/// `sds_nodes` and looks each node up in `cluster_nodes` (`CROSS JOIN`
/// fixes that order in SQLite). Left to itself, the planner walked
/// `cluster_nodes`, every SDC included, to save sorting by id: at 1,000 SDS
/// and 10,000 SDC that was 5.7 ms a create against 0.95 ms.
pub(super) const CANDIDATES: &str =
    "SELECT s.node_id, f.name, s.capacity_bytes, s.used_bytes, n.last_seen, n.failed_at
     FROM sds_nodes s CROSS JOIN cluster_nodes n ON n.id = s.node_id
     JOIN fault_sets f ON f.id = s.fault_set_id
     WHERE s.pool_id = ?1 AND s.draining = 0 AND s.removed_at = 0
       AND NOT (EXISTS (SELECT 1 FROM sds_devices d WHERE d.sds_id = s.node_id)
                AND NOT EXISTS (SELECT 1 FROM sds_devices d
                                WHERE d.sds_id = s.node_id AND d.failed_reason IS NULL))
     ORDER BY s.node_id";

/// What [`CANDIDATES`] reads of one node.
#[derive(Debug, Clone)]
struct NodeFacts {
    id: u64,
    fault_set: String,
    capacity: u64,
    used: u64,
    last_seen: u64,
    failed_at: u64,
}

#[derive(Debug)]
struct Kept {
    topology: i64,
    read_at: Instant,
    nodes: Arc<Vec<NodeFacts>>,
}

/// The facts of each pool, as of the topology they were read at.
#[derive(Debug, Default)]
pub struct CandidateCache {
    pools: Mutex<HashMap<u64, Kept>>,
}

impl CandidateCache {
    /// The facts of `pool_id` at `topology`, from memory when they are
    /// recent and of that topology, else read through `conn`.
    fn facts(
        &self,
        conn: &Connection,
        pool_id: u64,
        topology: i64,
    ) -> Result<Arc<Vec<NodeFacts>>, MdmError> {
        let now = Instant::now();
        {
            let pools = self.pools.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(kept) = pools.get(&pool_id) {
                if kept.topology == topology && now.duration_since(kept.read_at) < MAX_AGE {
                    return Ok(Arc::clone(&kept.nodes));
                }
            }
        }
        let nodes: Vec<NodeFacts> = conn
            .prepare_cached(CANDIDATES)?
            .query_map([pool_id], |r| {
                Ok(NodeFacts {
                    id: r.get(0)?,
                    fault_set: r.get(1)?,
                    capacity: r.get(2)?,
                    used: r.get(3)?,
                    last_seen: r.get(4)?,
                    failed_at: r.get(5)?,
                })
            })?
            .collect::<Result<_, _>>()?;
        let nodes = Arc::new(nodes);
        let kept = Kept { topology, read_at: now, nodes: Arc::clone(&nodes) };
        self.pools.lock().unwrap_or_else(|p| p.into_inner()).insert(pool_id, kept);
        Ok(nodes)
    }
}

/// SDS nodes of a pool that may receive copies (not FAILED), with their
/// fault sets and load.
pub fn candidates(conn: &Connection, ctx: &Ctx, pool_id: u64) -> Result<Vec<Candidate>, MdmError> {
    let topology: i64 = conn.row("SELECT value FROM topology_seq", [], |r| r.get(0))?;
    let facts = ctx.candidates.facts(conn, pool_id, topology)?;
    let load = load_of(conn, &facts)?;
    let mut last_seen: Vec<(u64, u64)> = facts.iter().map(|n| (n.id, n.last_seen)).collect();
    ctx.sightings.overlay(&mut last_seen, |r| (r.0, &mut r.1));
    let mut out = Vec::with_capacity(facts.len());
    for ((node, load), (_, last_seen)) in facts.iter().zip(load).zip(last_seen) {
        // (A node whose every device failed has no room: not selected above.)
        // A node failed on evidence is no candidate for a while after it comes
        // back: a node the MDM cannot reach would otherwise flap between
        // FAILED and ACTIVE, taking new copies each time.
        let failed_at = node.failed_at;
        let recently_failed =
            failed_at > 0 && ctx.now.saturating_sub(failed_at) < ctx.settings.failed_after_secs;
        if recently_failed || liveness(&ctx.settings, last_seen, failed_at, ctx.now) == "FAILED" {
            continue;
        }
        out.push(Candidate {
            id: node.id,
            fault_set: node.fault_set.clone(),
            free_bytes: node.capacity.saturating_sub(node.used).saturating_sub(load.reserved),
            placed_bytes: load.placed,
            placed_primary_bytes: load.placed_primary,
        });
    }
    Ok(out)
}

/// The load of each of `nodes` (sorted by id), in their order: one pass
/// over `sds_load` (also sorted by node id), merged.
fn load_of(conn: &Connection, nodes: &[NodeFacts]) -> Result<Vec<NodeUsage>, MdmError> {
    let mut stmt = conn.prepare_cached(
        "SELECT node_id, placed, placed_primary, reserved FROM sds_load
         WHERE node_id BETWEEN ?1 AND ?2 ORDER BY node_id",
    )?;
    let (Some(first), Some(last)) = (nodes.first(), nodes.last()) else { return Ok(Vec::new()) };
    let mut rows = stmt.query([first.id, last.id])?;
    let mut out = Vec::with_capacity(nodes.len());
    let mut row: Option<(u64, NodeUsage)> = None;
    for node in nodes {
        loop {
            if let Some((id, _)) = &row {
                if *id >= node.id {
                    break;
                }
            }
            match rows.next()? {
                Some(r) => {
                    let usage = NodeUsage {
                        placed: r.get(1)?,
                        placed_primary: r.get(2)?,
                        reserved: r.get(3)?,
                    };
                    row = Some((r.get(0)?, usage));
                }
                None => {
                    row = None;
                    break;
                }
            }
        }
        out.push(match &row {
            Some((id, usage)) if *id == node.id => *usage,
            _ => NodeUsage::default(),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::service::test_support;

    /// A create reads its candidates by walking the pool's SDS nodes,
    /// never every node of the cluster (SDCs outnumber them tenfold).
    #[test]
    fn candidates_walk_the_sds_nodes_not_every_node() {
        let conn = crate::db::open_in_memory().unwrap();
        let plan: Vec<String> = conn
            .prepare(&format!("EXPLAIN QUERY PLAN {CANDIDATES}"))
            .unwrap()
            .query_map([1], |r| r.get::<_, String>(3))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        let scans: Vec<&String> = plan.iter().filter(|step| step.starts_with("SCAN")).collect();
        assert_eq!(scans, ["SCAN s"], "{plan:#?}");
        assert!(!plan.iter().any(|step| step.contains("TEMP B-TREE")), "sorts: {plan:#?}");
    }

    /// What the cache keeps is never what a create sees after a change it
    /// reads, committed or rolled back: each kind of change is made after
    /// the facts were kept, and the next read sees it at once.
    #[test]
    fn kept_facts_follow_every_change_a_placement_reads() {
        let mut conn = crate::db::open_in_memory().unwrap();
        let keys = test_support::keys();
        let settings = test_support::settings();
        let sightings = crate::sightings::Sightings::default();
        let cache = CandidateCache::default();
        let now = pflex_proto::unix_now();
        let ctx = Ctx { settings, keys: &keys, sightings: &sightings, candidates: &cache, now };
        let tx = conn.transaction().unwrap();
        let conn: &Connection = &tx;
        let register = |i: u32| {
            let request = test_support::sds_request(i);
            super::super::register(conn, &ctx, &request, true, "test").unwrap().node_id
        };
        let ids: Vec<u64> = (0..3).map(register).collect();
        let seen = || -> Vec<(u64, u64)> {
            candidates(conn, &ctx, 1).unwrap().iter().map(|c| (c.id, c.free_bytes)).collect()
        };
        let full = 1u64 << 40;
        assert_eq!(seen(), [(ids[0], full), (ids[1], full), (ids[2], full)]);

        let step = |sql: &str, expected: &[(u64, u64)]| {
            conn.execute_batch(sql).unwrap();
            assert_eq!(seen(), expected, "after {sql}");
        };
        let (a, b, c) = (ids[0], ids[1], ids[2]);
        step(
            &format!("UPDATE sds_nodes SET used_bytes = 1024 WHERE node_id = {a}"),
            &[(a, full - 1024), (b, full), (c, full)],
        );
        step(
            &format!("UPDATE sds_nodes SET draining = 1 WHERE node_id = {b}"),
            &[(a, full - 1024), (c, full)],
        );
        step(
            &format!("UPDATE sds_nodes SET draining = 0 WHERE node_id = {b}"),
            &[(a, full - 1024), (b, full), (c, full)],
        );
        step(
            &format!("UPDATE sds_devices SET failed_reason = 'eio' WHERE sds_id = {c}"),
            &[(a, full - 1024), (b, full)],
        );
        step(&format!("UPDATE cluster_nodes SET failed_at = {now} WHERE id = {a}"), &[(b, full)]);
        // A change rolled back leaves the value it had before: the facts
        // kept while it held are not taken for the state after.
        // Nor when the same number of changes follows (a counter would
        // come back to the value the kept facts were read at).
        let used = |d: u64, bytes: u64| {
            conn.execute_batch(&format!(
                "UPDATE sds_nodes SET used_bytes = {bytes} WHERE node_id = {d}"
            ))
            .unwrap()
        };
        conn.execute_batch("SAVEPOINT s").unwrap();
        let d = register(3);
        used(d, 7);
        assert_eq!(seen(), [(b, full), (d, full - 7)]);
        conn.execute_batch("ROLLBACK TO s; RELEASE s").unwrap();
        let d = register(3);
        used(d, 9);
        assert_eq!(seen(), [(b, full), (d, full - 9)]);
        step(
            &format!("UPDATE sds_nodes SET removed_at = {now} WHERE node_id = {b}"),
            &[(d, full - 9)],
        );
    }
}
