//! Block checksums at rest: a CRC32 per 4 KiB block of every slot, so a
//! block that changed on the device behind the store's back (a flipped bit,
//! a misdirected write, someone writing the device file) is caught when it
//! is read, instead of being served.
//!
//! Each device has a sidecar file in the data directory (`sums/<device
//! id>.sums`, 4 bytes per block: 1 KiB per 1 MiB slot, 1/1024 of the
//! device), mapped into memory shared, so recording and checking a sum is a
//! memory access. 0 means "no sum recorded" (a block never written through
//! a store that kept sums); a recorded sum is never 0 (see [`stored`]).
//!
//! Ordering, kept by the chunk store: a write's sums are recorded before its
//! data is submitted, under the chunk's lock, so once the data is on the
//! device its sums are too (an abandoned write still completes in the
//! engine, and then matches). A reader that finds a mismatch may have raced
//! with a write of the same block (aligned reads and writes share the lock),
//! so the store checks again under the chunk's exclusive lock before it
//! calls the block corrupt. The map is written back to its file with the
//! device on every flush (`msync`), so a flushed write's sums are durable
//! with it; after a crash an unflushed write may leave a block whose sum
//! does not match, which reads as corrupt and is repaired from the other
//! copy, like any other.

use std::fs::OpenOptions;
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};

/// Bytes one sum covers.
pub const BLOCK: usize = 4096;
/// Blocks per 1 MiB slot.
pub const BLOCKS_PER_SLOT: usize = (pflex_proto::CHUNK_SIZE as usize) / BLOCK;

/// The sum of `block` as recorded: its CRC32, never 0 (0 is "none").
pub fn stored(block: &[u8]) -> u32 {
    crc32fast::hash(block).max(1)
}

/// One device's sums, mapped from its sidecar file.
pub struct BlockSums {
    ptr: *mut AtomicU32,
    len: usize,
}

// SAFETY: the mapping is only accessed through `AtomicU32`s, which may be
// shared between threads; it lives until `drop` unmaps it.
unsafe impl Send for BlockSums {}
// SAFETY: as above: every access is an atomic load or store.
unsafe impl Sync for BlockSums {}

impl BlockSums {
    /// Opens (creating or growing) `path` for `slots` slots and maps it.
    pub fn open(path: &Path, slots: u32) -> io::Result<BlockSums> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let len = slots as usize * BLOCKS_PER_SLOT;
        let bytes = (len * 4).max(4);
        let file =
            OpenOptions::new().read(true).write(true).create(true).truncate(false).open(path)?;
        if file.metadata()?.len() < bytes as u64 {
            file.set_len(bytes as u64)?;
        }
        // SAFETY: a shared read-write mapping of `bytes` bytes of a file we
        // just sized to at least that; the result is checked below.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(BlockSums { ptr: ptr.cast(), len })
    }

    fn sums(&self) -> &[AtomicU32] {
        // SAFETY: `ptr` maps `len` u32s (page-aligned, so aligned for
        // `AtomicU32`) for as long as `self` lives.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    fn index(slot: u32, block: usize) -> usize {
        slot as usize * BLOCKS_PER_SLOT + block
    }

    /// The recorded sum of `block` of `slot` (0: none).
    pub fn get(&self, slot: u32, block: usize) -> u32 {
        self.sums()[Self::index(slot, block)].load(Ordering::Acquire)
    }

    /// Records the sums of consecutive whole blocks of `data` starting at
    /// `first_block` of `slot`.
    pub fn record(&self, slot: u32, first_block: usize, data: &[u8]) {
        let sums = self.sums();
        for (i, block) in data.chunks(BLOCK).enumerate() {
            sums[Self::index(slot, first_block + i)].store(stored(block), Ordering::Release);
        }
    }

    /// The blocks of `data` (consecutive whole blocks from `first_block` of
    /// `slot`) whose recorded sum is set and differs; block numbers within
    /// the slot.
    pub fn mismatches(&self, slot: u32, first_block: usize, data: &[u8]) -> Vec<usize> {
        data.chunks(BLOCK)
            .enumerate()
            .filter(|(i, block)| {
                let recorded = self.get(slot, first_block + i);
                recorded != 0 && recorded != stored(block)
            })
            .map(|(i, _)| first_block + i)
            .collect()
    }

    /// Writes the map back to its file (on flush).
    pub fn sync(&self) -> io::Result<()> {
        // SAFETY: msync of exactly the range mapped in `open`.
        let rc = unsafe { libc::msync(self.ptr.cast(), (self.len * 4).max(4), libc::MS_SYNC) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

impl Drop for BlockSums {
    fn drop(&mut self) {
        // SAFETY: unmaps the mapping made in `open`, which nothing uses any
        // more (`&self` borrows have ended).
        unsafe {
            libc::munmap(self.ptr.cast(), (self.len * 4).max(4));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_are_recorded_checked_and_kept_in_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sums/1.sums");
        let data: Vec<u8> = (0..3 * BLOCK).map(|i| (i % 251) as u8).collect();
        {
            let sums = BlockSums::open(&path, 4).unwrap();
            assert_eq!(sums.get(2, 5), 0);
            sums.record(2, 5, &data);
            assert!(sums.mismatches(2, 5, &data).is_empty());
            sums.sync().unwrap();
        }
        let sums = BlockSums::open(&path, 4).unwrap();
        assert_eq!(sums.get(2, 6), stored(&data[BLOCK..2 * BLOCK]));
        let mut bad = data.clone();
        bad[BLOCK + 17] ^= 0x40;
        assert_eq!(sums.mismatches(2, 5, &bad), vec![6]);
        // Blocks without a recorded sum are not judged.
        assert!(sums.mismatches(3, 0, &bad).is_empty());
    }
}
