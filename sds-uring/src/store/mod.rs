//! The chunk store: device files split into 1 MiB slots, and the
//! `sds_local.db` chunk map from (volume, chunk index) to (device, slot).

use std::path::PathBuf;
use std::sync::Arc;

use pflex_proto::api::{ChunkChecksum, DeviceInfo};

use crate::engine::EngineKind;

/// What a store is opened with.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// Holds `sds_local.db`.
    pub data_dir: PathBuf,
    /// Device files (or block devices) and their sizes in bytes.
    pub devices: Vec<(PathBuf, u64)>,
    pub engine: EngineKind,
}

/// Why a chunk store operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    #[error("no free slot on any device")]
    NoSpace,
    #[error("range at offset {offset} of length {len} does not fit in a chunk")]
    OutOfRange { offset: u64, len: u64 },
    #[error("device I/O failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("chunk map database: {0}")]
    Db(#[from] rusqlite::Error),
    #[error("store configuration: {0}")]
    Config(String),
    #[error("the store is shut down")]
    Closed,
}

/// Stores 1 MiB chunks of volumes on local devices. `Send + Sync`; shared
/// behind an `Arc` by every task of the server.
pub struct ChunkStore {
    _private: (),
}

impl ChunkStore {
    /// Opens (creating and preallocating if needed) the devices and the chunk map.
    pub fn open(_cfg: StoreConfig) -> Result<Arc<Self>, StoreError> {
        todo!()
    }
    /// Reads `len` bytes at `offset` of a chunk; a chunk never written reads as zeroes.
    pub async fn read(
        &self,
        _vol: u64,
        _chunk: u64,
        _offset: u32,
        _len: u32,
    ) -> Result<Vec<u8>, StoreError> {
        todo!()
    }
    /// Writes `data` at `offset` of a chunk; `fua` makes the write durable before it returns.
    pub async fn write(
        &self,
        _vol: u64,
        _chunk: u64,
        _offset: u32,
        _data: &[u8],
        _fua: bool,
    ) -> Result<(), StoreError> {
        todo!()
    }
    /// Zeroes a range; the whole chunk frees its slot.
    pub async fn write_zeroes(
        &self,
        _vol: u64,
        _chunk: u64,
        _offset: u32,
        _len: u32,
        _fua: bool,
    ) -> Result<(), StoreError> {
        todo!()
    }
    /// Discards a range (reads as zeroes afterwards); the whole chunk frees its slot.
    pub async fn trim(
        &self,
        _vol: u64,
        _chunk: u64,
        _offset: u32,
        _len: u32,
    ) -> Result<(), StoreError> {
        todo!()
    }
    /// Makes every acknowledged write durable (`fdatasync` of every device).
    pub async fn flush(&self) -> Result<(), StoreError> {
        todo!()
    }
    /// CRC32 of a chunk's full 1 MiB content.
    pub async fn chunk_checksum(
        &self,
        _vol: u64,
        _chunk: u64,
    ) -> Result<ChunkChecksum, StoreError> {
        todo!()
    }
    /// (capacity, used) in bytes.
    pub fn capacity(&self) -> (u64, u64) {
        todo!()
    }
    pub fn devices(&self) -> Vec<DeviceInfo> {
        todo!()
    }
    /// Every (volume, chunk) pair that holds a slot.
    pub fn allocated_chunks(&self) -> Vec<(u64, u64)> {
        todo!()
    }
    /// Whether a chunk holds a slot (in-memory lookup; answers `Op::Allocation`).
    pub fn is_allocated(&self, _vol: u64, _chunk: u64) -> bool {
        todo!()
    }
}
