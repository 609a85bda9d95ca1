//! The in-memory chunk map and free-slot lists.
//!
//! Readers look chunks up here without touching SQLite. Only the chunk map
//! writer thread (see `db`) changes which chunk holds which slot, and only
//! after the change is committed, so memory never runs ahead of the
//! database — even when the request that asked for the change is
//! cancelled while it waits. Callers take free slots out themselves (a
//! reservation); the writer either publishes a reserved slot in the map or,
//! if the commit fails, puts it back.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, RwLock, RwLockReadGuard};

/// Where a chunk lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlotLocation {
    /// Index into the store's device list (and the engine's).
    pub device: usize,
    pub slot: u32,
    /// Store-wide allocation number given when the chunk got this slot.
    pub generation: u64,
}

pub type ChunkKey = (u64, u64);

/// Chunk → slot map and per-device free lists.
pub struct SlotTable {
    map: RwLock<HashMap<ChunkKey, SlotLocation>>,
    /// Free slots per device; the lowest is last (taken first).
    free: Mutex<Vec<Vec<u32>>>,
    slot_counts: Vec<u32>,
    /// Devices that take no new chunks (failed).
    retired: Vec<AtomicBool>,
}

impl SlotTable {
    /// A table holding `map`; every slot of a device (of `slot_counts[i]`
    /// slots) that no chunk uses is free.
    pub fn new(map: HashMap<ChunkKey, SlotLocation>, slot_counts: Vec<u32>) -> Self {
        let mut used: Vec<Vec<bool>> =
            slot_counts.iter().map(|&count| vec![false; count as usize]).collect();
        for location in map.values() {
            used[location.device][location.slot as usize] = true;
        }
        let free = used
            .iter()
            .map(|taken| {
                (0..taken.len() as u32).rev().filter(|&slot| !taken[slot as usize]).collect()
            })
            .collect();
        let retired = slot_counts.iter().map(|_| AtomicBool::new(false)).collect();
        Self { map: RwLock::new(map), free: Mutex::new(free), slot_counts, retired }
    }

    pub fn read_map(&self) -> RwLockReadGuard<'_, HashMap<ChunkKey, SlotLocation>> {
        self.map.read().unwrap_or_else(|e| e.into_inner())
    }

    pub fn location(&self, key: ChunkKey) -> Option<SlotLocation> {
        self.read_map().get(&key).copied()
    }

    /// Reserves a free slot on the device with the most free slots, among
    /// those not retired.
    pub fn reserve(&self) -> Option<(usize, u32)> {
        let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
        let (device, slots) = free
            .iter_mut()
            .enumerate()
            .filter(|(index, _)| !self.retired[*index].load(Ordering::Relaxed))
            .max_by_key(|(index, slots)| (slots.len(), std::cmp::Reverse(*index)))
            .filter(|(_, slots)| !slots.is_empty())?;
        Some((device, slots.pop().expect("the chosen device has a free slot")))
    }

    /// Device `device` takes no new chunks from now on.
    pub fn retire(&self, device: usize) {
        if let Some(flag) = self.retired.get(device) {
            flag.store(true, Ordering::Relaxed);
        }
    }

    /// Gives back a reserved slot that was never published.
    pub fn unreserve(&self, device: usize, slot: u32) {
        self.free.lock().unwrap_or_else(|e| e.into_inner())[device].push(slot);
    }

    /// Publishes a committed mapping; a slot the chunk held before becomes free.
    pub fn publish(&self, key: ChunkKey, location: SlotLocation) {
        let previous = self.map.write().unwrap_or_else(|e| e.into_inner()).insert(key, location);
        if let Some(old) = previous.filter(|old| old != &location) {
            self.unreserve(old.device, old.slot);
        }
    }

    /// Removes a committed unmapping; the chunk's slot becomes free.
    pub fn remove(&self, key: ChunkKey) {
        let previous = self.map.write().unwrap_or_else(|e| e.into_inner()).remove(&key);
        if let Some(old) = previous {
            self.unreserve(old.device, old.slot);
        }
    }

    /// Slots in use (mapped or reserved) per device.
    pub fn used_per_device(&self) -> Vec<u32> {
        let free = self.free.lock().unwrap_or_else(|e| e.into_inner());
        self.slot_counts
            .iter()
            .zip(free.iter())
            .map(|(count, free)| count - free.len() as u32)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(device: usize, slot: u32) -> SlotLocation {
        SlotLocation { device, slot, generation: 1 }
    }

    #[test]
    fn free_lists_follow_the_map() {
        let mut map = HashMap::new();
        map.insert((1, 0), at(0, 0));
        let table = SlotTable::new(map, vec![2, 2]);
        assert_eq!(table.used_per_device(), vec![1, 0]);
        // The emptier device is chosen, lowest slot first.
        assert_eq!(table.reserve(), Some((1, 0)));
        assert_eq!(table.reserve(), Some((0, 1)));
        assert_eq!(table.reserve(), Some((1, 1)));
        assert_eq!(table.reserve(), None);
        table.unreserve(1, 1);
        table.publish((1, 1), at(1, 0));
        table.publish((1, 1), at(0, 1)); // moved: slot (1, 0) is free again
        assert_eq!(table.used_per_device(), vec![2, 0]);
        table.remove((1, 0));
        assert_eq!(table.location((1, 0)), None);
        assert_eq!(table.used_per_device(), vec![1, 0]);
        assert_eq!(table.location((1, 1)), Some(at(0, 1)));
    }
}
