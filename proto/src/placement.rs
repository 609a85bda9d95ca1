//! The compact placement map of a volume.
//!
//! A volume's chunks are spread over a fixed list of *placement groups*
//! (PGs); each PG is an ordered pair (primary SDS, secondary SDS) in two
//! different fault sets. Chunk `i` belongs to PG `i % pgs.len()`, so the map
//! is a few hundred bytes whatever the volume size, growing a volume never
//! moves existing chunks, and a rebuild changes one PG entry. Every change
//! of the map bumps `epoch`; data-plane requests carry the epoch they were
//! routed with, and an SDS refuses a request routed by an older map.

use serde::{Deserialize, Serialize};

/// Number of PGs a new volume gets (enough to spread evenly over dozens of nodes).
pub const PGS_PER_VOLUME: usize = 64;

/// Data-plane address of one SDS.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SdsEndpoint {
    pub id: u64,
    pub name: String,
    pub host: String,
    pub data_port: u16,
    pub fault_set: String,
}

/// One PG: where the two copies of its chunks live.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlacementGroup {
    pub primary: u64,
    /// 0 while the PG is degraded (one copy).
    pub secondary: u64,
    /// While degraded: the node whose copy was taken out of the set and may
    /// come back to be resynced (it keeps its chunks of the PG meanwhile);
    /// 0 otherwise.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub absent: u64,
    /// While a copy moves (rebalance or drain): the node receiving it. The
    /// primary forwards every write to it as well as to the secondary, and
    /// copies the PG's chunks to it; it is never read from and never holds
    /// a lease until the MDM makes it the secondary. 0 otherwise.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub joining: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// What the SDC (and the SDS) need to route a volume's IO.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlacementMap {
    pub volume_id: u64,
    pub volume_name: String,
    pub size_bytes: u64,
    pub chunk_size: u64,
    /// Changes whenever any PG or the size changes.
    pub epoch: u64,
    /// Changes on map/unmap (token revocation).
    pub mapping_gen: u64,
    pub pgs: Vec<PlacementGroup>,
    /// Every SDS named in `pgs`.
    pub nodes: Vec<SdsEndpoint>,
}

impl PlacementMap {
    /// The PG a chunk belongs to.
    pub fn pg_of(&self, chunk_index: u64) -> Option<&PlacementGroup> {
        self.pgs.get(self.pg_index_of(chunk_index)? as usize)
    }
    /// The index of the PG chunk `chunk_index` belongs to (`None` without PGs).
    pub fn pg_index_of(&self, chunk_index: u64) -> Option<u64> {
        (!self.pgs.is_empty()).then(|| chunk_index % self.pgs.len() as u64)
    }
    pub fn node(&self, id: u64) -> Option<&SdsEndpoint> {
        self.nodes.iter().find(|n| n.id == id)
    }
    /// Number of chunks covering the volume.
    pub fn chunk_count(&self) -> u64 {
        self.size_bytes.div_ceil(self.chunk_size.max(1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_to_pg() {
        let m = PlacementMap {
            volume_id: 1,
            volume_name: "v".into(),
            size_bytes: 10 << 20,
            chunk_size: 1 << 20,
            epoch: 1,
            mapping_gen: 1,
            pgs: vec![
                PlacementGroup { primary: 1, secondary: 2, ..PlacementGroup::default() },
                PlacementGroup { primary: 2, secondary: 3, ..PlacementGroup::default() },
            ],
            nodes: vec![],
        };
        assert_eq!(m.pg_of(0).unwrap().primary, 1);
        assert_eq!(m.pg_of(3).unwrap().primary, 2);
        assert_eq!(m.chunk_count(), 10);
    }
}
