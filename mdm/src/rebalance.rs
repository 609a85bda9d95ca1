//! Rebalance and drain policy: which PG copies to move where.
//!
//! Pure code, no database: the caller lists the nodes of one pool (with
//! capacity, bytes placed on them, fault set, and whether they are being
//! drained) and the PGs that may move now (two complete copies, nothing
//! else in flight for them), and gets back moves `(PG, from, to)`.
//!
//! A node's *fill* is placed bytes per byte of capacity. Drained nodes
//! come first: each of their copies goes to the least-filled node that is
//! not in the PG and not in the other copy's fault set. Then, while the
//! most-filled node is more than `spread_points` percentage points above
//! the least-filled one, one of its copies moves to the emptiest node that
//! can take it (fault sets allowed) if that narrows the gap; a secondary
//! copy rather than a primary when there is one (a moved primary's
//! successor waits out the lease it granted, pausing that PG's IO). Each PG moves at most once per plan; the moves
//! themselves keep both copies complete (see `CopyKind::Move`).

use std::collections::HashSet;

/// One SDS of the pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeLoad {
    pub id: u64,
    pub fault_set: String,
    pub capacity_bytes: u64,
    /// Bytes of PG copies placed on it (including copies moving onto it).
    pub placed_bytes: u64,
    /// Being drained: gives up all its copies, receives none.
    pub draining: bool,
    /// May receive copies (ACTIVE, has a healthy device).
    pub eligible: bool,
}

/// A PG that may move now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MovablePg {
    pub volume_id: u64,
    pub index: u64,
    pub primary: u64,
    pub secondary: u64,
    pub bytes: u64,
}

/// Move the copy of PG (`volume_id`, `index`) on `from` to `to`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Move {
    pub volume_id: u64,
    pub index: u64,
    pub from: u64,
    pub to: u64,
}

/// Fill in millionths of capacity (a node without capacity counts as full).
fn fill(node: &NodeLoad) -> u64 {
    if node.capacity_bytes == 0 {
        return u64::MAX / 2;
    }
    ((u128::from(node.placed_bytes) * 1_000_000) / u128::from(node.capacity_bytes)) as u64
}

/// The nodes whose PGs [`plan`] may move, or `None` when it would plan
/// nothing: no node is draining and the fill of the eligible nodes is
/// within `spread_points`. Draining nodes, then the `max_moves + 1` fullest
/// eligible ones (each move takes from the fullest node at that point), so
/// the caller reads the PGs of a few nodes, never of the whole pool.
pub fn nodes_to_examine(
    nodes: &[NodeLoad],
    max_moves: usize,
    spread_points: u64,
) -> Option<Vec<u64>> {
    let mut active: Vec<&NodeLoad> = nodes.iter().filter(|n| n.eligible && !n.draining).collect();
    active.sort_by_key(|n| (fill(n), n.id));
    let draining: Vec<u64> = nodes.iter().filter(|n| n.draining).map(|n| n.id).collect();
    let spread = match (active.first(), active.last()) {
        (Some(emptiest), Some(fullest)) => fill(fullest).saturating_sub(fill(emptiest)),
        _ => 0,
    };
    if draining.is_empty() && spread <= spread_points * 10_000 {
        return None;
    }
    let fullest = active.iter().rev().take(max_moves + 1).map(|n| n.id);
    Some(draining.iter().copied().chain(fullest).collect())
}

/// Up to `max_moves` moves: drained nodes' copies first, then balance.
pub fn plan(
    nodes: &[NodeLoad],
    pgs: &[MovablePg],
    max_moves: usize,
    spread_points: u64,
) -> Vec<Move> {
    let mut nodes: Vec<NodeLoad> = nodes.to_vec();
    let mut moves = Vec::new();
    let mut moved: HashSet<(u64, u64)> = HashSet::new();
    let fault_set = |nodes: &[NodeLoad], id: u64| {
        nodes.iter().find(|n| n.id == id).map(|n| n.fault_set.clone())
    };
    // The receiving node for a copy of `pg` now on `from`: least filled,
    // eligible, not draining, not in the PG, not in the other copy's fault
    // set.
    let receiver = |nodes: &[NodeLoad], pg: &MovablePg, from: u64| -> Option<usize> {
        let other = if pg.primary == from { pg.secondary } else { pg.primary };
        let other_set = fault_set(nodes, other)?;
        nodes
            .iter()
            .enumerate()
            .filter(|(_, n)| n.eligible && !n.draining)
            .filter(|(_, n)| n.id != pg.primary && n.id != pg.secondary)
            .filter(|(_, n)| n.fault_set != other_set)
            .min_by_key(|(_, n)| (fill(n), n.id))
            .map(|(i, _)| i)
    };
    let apply = |nodes: &mut [NodeLoad], from: u64, to: usize, bytes: u64| {
        nodes[to].placed_bytes += bytes;
        if let Some(n) = nodes.iter_mut().find(|n| n.id == from) {
            n.placed_bytes = n.placed_bytes.saturating_sub(bytes);
        }
    };

    let draining: Vec<u64> = nodes.iter().filter(|n| n.draining).map(|n| n.id).collect();
    for pg in pgs {
        if moves.len() >= max_moves {
            return moves;
        }
        let Some(&from) = draining.iter().find(|&&d| d == pg.primary || d == pg.secondary) else {
            continue;
        };
        if let Some(to) = receiver(&nodes, pg, from) {
            moves.push(Move { volume_id: pg.volume_id, index: pg.index, from, to: nodes[to].id });
            moved.insert((pg.volume_id, pg.index));
            apply(&mut nodes, from, to, pg.bytes);
        }
    }

    let threshold = spread_points * 10_000;
    while moves.len() < max_moves {
        let mut active: Vec<&NodeLoad> =
            nodes.iter().filter(|n| n.eligible && !n.draining).collect();
        active.sort_by_key(|n| (fill(n), n.id));
        let Some(full) = active.last().map(|n| (*n).clone()) else { break };
        // The emptiest receiver that can take one of the fullest node's
        // copies and narrow the gap.
        let mut chosen = None;
        for empty in active.iter().filter(|n| n.id != full.id) {
            let gap = fill(&full).saturating_sub(fill(empty));
            if gap <= threshold {
                break;
            }
            let fits = |pg: &&MovablePg| {
                if moved.contains(&(pg.volume_id, pg.index)) {
                    return false;
                }
                if pg.primary != full.id && pg.secondary != full.id {
                    return false;
                }
                if pg.primary == empty.id || pg.secondary == empty.id {
                    return false;
                }
                let other = if pg.primary == full.id { pg.secondary } else { pg.primary };
                if fault_set(&nodes, other).as_deref() == Some(empty.fault_set.as_str()) {
                    return false;
                }
                // The move must narrow the gap, not swap the two nodes' places.
                let (mut f, mut e) = (full.clone(), (*empty).clone());
                f.placed_bytes = f.placed_bytes.saturating_sub(pg.bytes);
                e.placed_bytes += pg.bytes;
                fill(&f).abs_diff(fill(&e)) < gap
            };
            // A secondary copy first: moving a primary makes the new primary
            // wait out the lease it granted (a pause of that PG's IO).
            let secondary_first = pgs.iter().filter(|pg| pg.secondary == full.id).find(&fits);
            if let Some(pg) = secondary_first.or_else(|| pgs.iter().find(&fits)) {
                chosen = Some((pg.clone(), empty.id));
                break;
            }
        }
        let Some((pg, to_id)) = chosen else { break };
        moves.push(Move { volume_id: pg.volume_id, index: pg.index, from: full.id, to: to_id });
        moved.insert((pg.volume_id, pg.index));
        let to = nodes.iter().position(|n| n.id == to_id).expect("present");
        apply(&mut nodes, full.id, to, pg.bytes);
    }
    moves
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;
    const PG: u64 = 64 << 20;

    fn node(id: u64, placed_pgs: u64) -> NodeLoad {
        NodeLoad {
            id,
            fault_set: format!("fs{id}"),
            capacity_bytes: 8 * GIB,
            placed_bytes: placed_pgs * PG,
            draining: false,
            eligible: true,
        }
    }

    /// `count` PGs spread round-robin over nodes 1..=3.
    fn three_node_pgs(count: u64) -> Vec<MovablePg> {
        (0..count)
            .map(|i| MovablePg {
                volume_id: 1,
                index: i,
                primary: 1 + i % 3,
                secondary: 1 + (i + 1) % 3,
                bytes: PG,
            })
            .collect()
    }

    fn placed_after(nodes: &[NodeLoad], pgs: &[MovablePg], moves: &[Move]) -> Vec<u64> {
        nodes
            .iter()
            .map(|n| {
                let mut placed = 0;
                for pg in pgs {
                    let mut copies = [pg.primary, pg.secondary];
                    if let Some(m) = moves.iter().find(|m| m.volume_id == 1 && m.index == pg.index)
                    {
                        for c in &mut copies {
                            if *c == m.from {
                                *c = m.to;
                            }
                        }
                    }
                    placed += copies.iter().filter(|&&c| c == n.id).count() as u64 * pg.bytes;
                }
                placed
            })
            .collect()
    }

    #[test]
    fn a_new_empty_node_gets_its_share() {
        let pgs = three_node_pgs(64);
        let nodes = vec![node(1, 43), node(2, 43), node(3, 42), node(4, 0)];
        let moves = plan(&nodes, &pgs, 1000, 2);
        assert!(moves.iter().all(|m| m.to == 4), "{moves:?}");
        let placed = placed_after(&nodes, &pgs, &moves);
        let fills: Vec<f64> = placed.iter().map(|&p| p as f64 / (8 * GIB) as f64 * 100.0).collect();
        let spread = fills.iter().cloned().fold(f64::MIN, f64::max)
            - fills.iter().cloned().fold(f64::MAX, f64::min);
        assert!(spread <= 2.0, "fills {fills:?}");
    }

    #[test]
    fn rebalance_moves_secondary_copies_when_it_can() {
        let pgs = three_node_pgs(64);
        let nodes = vec![node(1, 43), node(2, 43), node(3, 42), node(4, 0)];
        let moves = plan(&nodes, &pgs, 1000, 2);
        assert!(!moves.is_empty());
        for m in &moves {
            assert_eq!(pgs[m.index as usize].secondary, m.from, "{m:?} moves a primary");
        }
    }

    #[test]
    fn a_balanced_pool_moves_nothing() {
        let pgs = three_node_pgs(63);
        let nodes = vec![node(1, 42), node(2, 42), node(3, 42)];
        assert!(plan(&nodes, &pgs, 1000, 2).is_empty());
    }

    #[test]
    fn a_drained_node_gives_up_every_copy_and_receives_none() {
        let pgs = three_node_pgs(30);
        let mut nodes = vec![node(1, 20), node(2, 20), node(3, 20), node(4, 0)];
        nodes[0].draining = true;
        let moves = plan(&nodes, &pgs, 1000, 2);
        let from_one = moves.iter().filter(|m| m.from == 1).count();
        assert_eq!(from_one, 20, "{moves:?}");
        assert!(moves.iter().all(|m| m.to != 1));
        // Never into the fault set of the copy that stays.
        for m in &moves {
            let pg = &pgs[m.index as usize];
            let other = if pg.primary == m.from { pg.secondary } else { pg.primary };
            assert_ne!(m.to, other);
        }
    }

    #[test]
    fn fault_sets_are_respected() {
        // Node 4 shares fault set with node 2: a PG whose other copy is on
        // node 2 cannot go there.
        let pgs = vec![MovablePg { volume_id: 1, index: 0, primary: 1, secondary: 2, bytes: PG }];
        let mut nodes = vec![node(1, 10), node(2, 1), node(3, 1), node(4, 0)];
        nodes[3].fault_set = "fs2".into();
        let moves = plan(&nodes, &pgs, 10, 2);
        assert_eq!(moves, vec![Move { volume_id: 1, index: 0, from: 1, to: 3 }]);
    }

    #[test]
    fn ineligible_nodes_receive_nothing_and_max_moves_holds() {
        let pgs = three_node_pgs(64);
        let mut nodes = vec![node(1, 43), node(2, 43), node(3, 42), node(4, 0)];
        nodes[3].eligible = false;
        assert!(plan(&nodes, &pgs, 1000, 2).is_empty());
        nodes[3].eligible = true;
        assert_eq!(plan(&nodes, &pgs, 3, 2).len(), 3);
    }
}
