//! Placement policy: which SDS pair holds each placement group (PG).
//!
//! Pure code, no database: the caller lists the candidate SDS nodes of a
//! pool (already filtered to the ones that are not FAILED) with their free
//! capacity and the bytes already placed on them, and gets back one
//! (primary, secondary) pair per PG.
//!
//! The greedy rule, per PG: take the node whose *projected fill*
//! `(placed bytes + this PG's bytes) / free bytes` is lowest, then the
//! lowest such node in a **different fault set**; of the two, the one with
//! the lower projected primary fill becomes primary. Comparing
//! placed-per-free-byte spreads PGs evenly over equal nodes and in
//! proportion to free capacity over unequal ones, and counting existing
//! volumes keeps small volumes from always landing on the same nodes.
//! Ties go to the lower node id, so placement is deterministic.

use std::cmp::Ordering;

use pflex_proto::placement::PlacementGroup;
use pflex_proto::CHUNK_SIZE;

/// One SDS that may receive copies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub id: u64,
    pub fault_set: String,
    /// Capacity not used and not reserved by thick volumes.
    pub free_bytes: u64,
    /// Bytes of PGs (both copies) already placed on this node.
    pub placed_bytes: u64,
    /// Bytes of PGs this node is already primary of.
    pub placed_primary_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlacementError {
    #[error("no SDS node is available")]
    NoNodes,
    #[error(
        "two copies need SDS nodes in two different fault sets, but the available nodes are in {found} fault set(s)"
    )]
    TooFewFaultSets { found: usize },
}

/// Number of the volume's chunks that fall in PG `pg_index` (chunk `i`
/// belongs to PG `i % pg_count`).
pub fn pg_chunk_count(volume_chunks: u64, pg_count: u64, pg_index: u64) -> u64 {
    if pg_index >= volume_chunks || pg_count == 0 {
        return 0;
    }
    (volume_chunks - pg_index).div_ceil(pg_count)
}

/// Bytes of one PG of a volume of `size_bytes` (the largest PG, rounded to
/// whole chunks), the unit the policy balances.
pub fn pg_bytes(size_bytes: u64, pg_count: u64) -> u64 {
    pg_chunk_count(size_bytes.div_ceil(CHUNK_SIZE), pg_count, 0).max(1) * CHUNK_SIZE
}

struct Load<'a> {
    candidate: &'a Candidate,
    new_bytes: u64,
    new_primary_bytes: u64,
}

impl Load<'_> {
    fn weight(&self) -> u128 {
        u128::from(self.candidate.free_bytes.max(CHUNK_SIZE))
    }
    fn fill_after(&self, add: u64) -> u128 {
        u128::from(self.candidate.placed_bytes) + u128::from(self.new_bytes) + u128::from(add)
    }
    fn primary_fill_after(&self, add: u64) -> u128 {
        u128::from(self.candidate.placed_primary_bytes)
            + u128::from(self.new_primary_bytes)
            + u128::from(add)
    }
}

/// Orders by `a_num / a_den` against `b_num / b_den` without division.
fn cmp_ratio(a_num: u128, a_den: u128, b_num: u128, b_den: u128) -> Ordering {
    // Values stay far below 2^64 * 2^64 / 2, so the products do not overflow
    // for any sizes the API accepts (≤ 1 PiB volumes).
    (a_num.saturating_mul(b_den)).cmp(&b_num.saturating_mul(a_den))
}

fn by_fill(add: u64) -> impl Fn(&&Load, &&Load) -> Ordering {
    move |a, b| {
        cmp_ratio(a.fill_after(add), a.weight(), b.fill_after(add), b.weight())
            .then(a.candidate.id.cmp(&b.candidate.id))
    }
}

fn fault_set_count(candidates: &[Candidate]) -> usize {
    let mut sets: Vec<&str> = candidates.iter().map(|c| c.fault_set.as_str()).collect();
    sets.sort_unstable();
    sets.dedup();
    sets.len()
}

/// A node's place in the queue of [`place`]: its projected fill with one
/// more PG, ties to the lower id (the order of [`by_fill`]).
struct Queued {
    fill: u128,
    weight: u128,
    id: u64,
    index: usize,
}

impl Queued {
    fn of(load: &Load, index: usize, add: u64) -> Self {
        Queued { fill: load.fill_after(add), weight: load.weight(), id: load.candidate.id, index }
    }
}

impl Ord for Queued {
    fn cmp(&self, other: &Self) -> Ordering {
        cmp_ratio(self.fill, self.weight, other.fill, other.weight).then(self.id.cmp(&other.id))
    }
}

impl PartialOrd for Queued {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for Queued {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Queued {}

/// Places `pg_count` PGs of `pg_bytes` each.
///
/// The nodes wait in a heap ordered by projected fill, so a PG costs a few
/// heap steps rather than a pass over every node of the pool (1,000 nodes
/// and 64 PGs a volume: 128,000 comparisons a create, before).
pub fn place(
    candidates: &[Candidate],
    pg_count: usize,
    pg_bytes: u64,
) -> Result<Vec<PlacementGroup>, PlacementError> {
    use std::cmp::Reverse;
    use std::collections::BinaryHeap;

    if candidates.is_empty() {
        return Err(PlacementError::NoNodes);
    }
    let found = fault_set_count(candidates);
    if found < 2 {
        return Err(PlacementError::TooFewFaultSets { found });
    }
    let mut loads: Vec<Load> = candidates
        .iter()
        .map(|candidate| Load { candidate, new_bytes: 0, new_primary_bytes: 0 })
        .collect();
    let mut queue: BinaryHeap<Reverse<Queued>> =
        loads.iter().enumerate().map(|(i, load)| Reverse(Queued::of(load, i, pg_bytes))).collect();
    let mut passed_over = Vec::new();
    let mut pgs = Vec::with_capacity(pg_count);
    for _ in 0..pg_count {
        let Reverse(first) = queue.pop().ok_or(PlacementError::NoNodes)?;
        let first_index = first.index;
        let first_fault_set = &loads[first_index].candidate.fault_set;
        // The least filled node of another fault set; the ones of the same
        // fault set passed over on the way go back in the queue unchanged.
        let second_index = loop {
            match queue.pop() {
                Some(Reverse(next))
                    if loads[next.index].candidate.fault_set == *first_fault_set =>
                {
                    passed_over.push(Reverse(next));
                }
                Some(Reverse(next)) => break Some(next.index),
                None => break None,
            }
        };
        queue.extend(passed_over.drain(..));
        let second_index = second_index.ok_or(PlacementError::TooFewFaultSets { found })?;
        let (primary, secondary) = assign(&mut loads, first_index, second_index, pg_bytes);
        queue.push(Reverse(Queued::of(&loads[primary], primary, pg_bytes)));
        queue.push(Reverse(Queued::of(&loads[secondary], secondary, pg_bytes)));
        pgs.push(PlacementGroup {
            primary: loads[primary].candidate.id,
            secondary: loads[secondary].candidate.id,
            ..PlacementGroup::default()
        });
    }
    Ok(pgs)
}

/// Gives a PG to the two nodes picked for it: the one with the lower
/// projected primary fill becomes primary (ties to the lower id). Returns
/// (primary, secondary) as indexes into `loads`.
fn assign(loads: &mut [Load], first: usize, second: usize, pg_bytes: u64) -> (usize, usize) {
    let (a, b) = (&loads[first], &loads[second]);
    let a_first = cmp_ratio(
        a.primary_fill_after(pg_bytes),
        a.weight(),
        b.primary_fill_after(pg_bytes),
        b.weight(),
    )
    .then(a.candidate.id.cmp(&b.candidate.id))
        != Ordering::Greater;
    let (primary, secondary) = if a_first { (first, second) } else { (second, first) };
    loads[primary].new_bytes += pg_bytes;
    loads[primary].new_primary_bytes += pg_bytes;
    loads[secondary].new_bytes += pg_bytes;
    (primary, secondary)
}

/// Picks the node that takes over the copy a failed node held in a PG whose
/// other copy is on `survivor`: the least filled candidate outside the
/// survivor's fault set. `None` when no such node exists.
pub fn replacement(
    candidates: &[Candidate],
    survivor: u64,
    survivor_fault_set: &str,
    pg_bytes: u64,
) -> Option<u64> {
    let loads: Vec<Load> = candidates
        .iter()
        .filter(|c| c.id != survivor && c.fault_set != survivor_fault_set)
        .map(|candidate| Load { candidate, new_bytes: 0, new_primary_bytes: 0 })
        .collect();
    loads.iter().min_by(|a, b| by_fill(pg_bytes)(a, b)).map(|load| load.candidate.id)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn node(id: u64, fault_set: &str, free_gib: u64) -> Candidate {
        Candidate {
            id,
            fault_set: fault_set.to_string(),
            free_bytes: free_gib << 30,
            placed_bytes: 0,
            placed_primary_bytes: 0,
        }
    }

    fn counts(pgs: &[PlacementGroup]) -> (HashMap<u64, usize>, HashMap<u64, usize>) {
        let mut total = HashMap::new();
        let mut primary = HashMap::new();
        for pg in pgs {
            *total.entry(pg.primary).or_default() += 1;
            *total.entry(pg.secondary).or_default() += 1;
            *primary.entry(pg.primary).or_default() += 1;
        }
        (total, primary)
    }

    #[test]
    fn one_fault_set_is_refused() {
        let nodes = vec![node(1, "a", 10), node(2, "a", 10)];
        assert_eq!(
            place(&nodes, 64, CHUNK_SIZE),
            Err(PlacementError::TooFewFaultSets { found: 1 })
        );
        assert_eq!(place(&[], 64, CHUNK_SIZE), Err(PlacementError::NoNodes));
    }

    #[test]
    fn three_equal_nodes_are_balanced() {
        let nodes = vec![node(1, "a", 10), node(2, "b", 10), node(3, "c", 10)];
        let pgs = place(&nodes, 64, CHUNK_SIZE).unwrap();
        assert_eq!(pgs.len(), 64);
        let (total, primary) = counts(&pgs);
        for id in 1..=3 {
            assert!((42..=43).contains(&total[&id]), "{total:?}");
            assert!((21..=22).contains(&primary[&id]), "{primary:?}");
        }
    }

    #[test]
    fn weighted_by_free_capacity() {
        let nodes = vec![node(1, "a", 30), node(2, "b", 10), node(3, "c", 10), node(4, "d", 10)];
        let pgs = place(&nodes, 60, CHUNK_SIZE).unwrap();
        let (total, _) = counts(&pgs);
        // Node 1 has half the free space: it should hold about half the copies.
        assert!((55..=65).contains(&total[&1]), "{total:?}");
    }

    #[test]
    fn existing_load_is_spread() {
        let mut nodes =
            vec![node(1, "a", 10), node(2, "b", 10), node(3, "c", 10), node(4, "d", 10)];
        nodes[0].placed_bytes = 200 * CHUNK_SIZE;
        let pgs = place(&nodes, 64, CHUNK_SIZE).unwrap();
        let (total, _) = counts(&pgs);
        assert!(total.get(&1).copied().unwrap_or(0) < total[&2], "{total:?}");
    }

    #[test]
    fn replacement_avoids_survivor_fault_set() {
        let nodes = vec![node(2, "b", 10), node(3, "b", 10), node(4, "c", 10)];
        assert_eq!(replacement(&nodes, 2, "b", CHUNK_SIZE), Some(4));
        assert_eq!(replacement(&nodes[..2], 2, "b", CHUNK_SIZE), None);
    }

    #[test]
    fn pg_chunk_counts_cover_the_volume() {
        for chunks in [0u64, 1, 63, 64, 65, 1000] {
            let sum: u64 = (0..64).map(|i| pg_chunk_count(chunks, 64, i)).sum();
            assert_eq!(sum, chunks);
        }
        assert_eq!(pg_bytes(1, 64), CHUNK_SIZE);
        assert_eq!(pg_bytes(65 * CHUNK_SIZE, 64), 2 * CHUNK_SIZE);
    }

    /// The rule of [`place`] as a pass over every node per PG: what the
    /// heap must agree with.
    fn place_by_scan(candidates: &[Candidate], pg_count: usize, pg_bytes: u64) -> Vec<(u64, u64)> {
        let mut loads: Vec<Load> = candidates
            .iter()
            .map(|candidate| Load { candidate, new_bytes: 0, new_primary_bytes: 0 })
            .collect();
        let mut pairs = Vec::new();
        for _ in 0..pg_count {
            let first = loads.iter().enumerate().min_by(|a, b| by_fill(pg_bytes)(&a.1, &b.1));
            let (first_index, fault_set) =
                first.map(|(i, l)| (i, l.candidate.fault_set.clone())).unwrap();
            let second_index = loads
                .iter()
                .enumerate()
                .filter(|(_, load)| load.candidate.fault_set != fault_set)
                .min_by(|a, b| by_fill(pg_bytes)(&a.1, &b.1))
                .map(|(i, _)| i)
                .unwrap();
            let (p, s) = assign(&mut loads, first_index, second_index, pg_bytes);
            pairs.push((loads[p].candidate.id, loads[s].candidate.id));
        }
        pairs
    }

    proptest::proptest! {
        #[test]
        fn the_heap_places_like_a_scan_of_every_node(
            shape in proptest::collection::vec((0u8..4, 1u64..100, 0u64..300, 0u64..100), 2..40),
            pg_count in 1usize..130,
            pg_chunks in 1u64..4,
        ) {
            let nodes: Vec<Candidate> = shape
                .iter()
                .enumerate()
                .map(|(i, (fs, free, placed, primary))| Candidate {
                    placed_bytes: placed * CHUNK_SIZE,
                    placed_primary_bytes: (*primary).min(*placed) * CHUNK_SIZE,
                    ..node(i as u64 + 1, &format!("fs{fs}"), *free)
                })
                .collect();
            proptest::prop_assume!(fault_set_count(&nodes) >= 2);
            let placed: Vec<(u64, u64)> = place(&nodes, pg_count, pg_chunks * CHUNK_SIZE)
                .unwrap()
                .iter()
                .map(|pg| (pg.primary, pg.secondary))
                .collect();
            proptest::prop_assert_eq!(placed, place_by_scan(&nodes, pg_count, pg_chunks * CHUNK_SIZE));
        }

        #[test]
        fn copies_always_in_two_fault_sets(
            shape in proptest::collection::vec((0u8..6, 1u64..100), 1..20),
            pg_count in 1usize..130,
        ) {
            let nodes: Vec<Candidate> = shape
                .iter()
                .enumerate()
                .map(|(i, (fs, free))| node(i as u64 + 1, &format!("fs{fs}"), *free))
                .collect();
            let fault_set = |id: u64| nodes.iter().find(|n| n.id == id).unwrap().fault_set.clone();
            match place(&nodes, pg_count, CHUNK_SIZE) {
                Ok(pgs) => {
                    proptest::prop_assert_eq!(pgs.len(), pg_count);
                    for pg in pgs {
                        proptest::prop_assert_ne!(fault_set(pg.primary), fault_set(pg.secondary));
                    }
                }
                Err(PlacementError::TooFewFaultSets { found }) => {
                    proptest::prop_assert!(found < 2);
                }
                Err(e) => proptest::prop_assert!(false, "{}", e),
            }
        }
    }
}
