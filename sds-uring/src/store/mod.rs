//! The chunk store: device files split into 1 MiB slots, and the
//! `sds_local.db` chunk map from (volume, chunk index) to (device, slot).
//!
//! # Layout and thin provisioning
//! Each device (see [`device`]) is a preallocated file whose slot `s` covers
//! bytes `s * 1 MiB .. (s + 1) * 1 MiB`. A chunk has no slot until its first
//! write; until then it reads as zeroes and [`ChunkStore::is_allocated`] is
//! false. A TRIM or WRITE_ZEROES of a whole chunk gives its slot back;
//! partial ones write zeroes into the range.
//!
//! # Allocation and durability
//! The first write to a chunk takes a free slot (on the device with the most
//! free slots), writes the *whole* slot — the data padded with zeroes, so a
//! reused slot never shows the previous chunk's bytes — with `RWF_DSYNC`,
//! then commits the map row (SQLite, `synchronous = FULL`), and only then
//! acknowledges. After a crash a chunk is either unmapped (the write was
//! never acknowledged) or mapped to a slot whose content is durable.
//! Later writes go straight to the slot; `fua` makes them durable
//! (`RWF_DSYNC`); [`ChunkStore::flush`] `fdatasync`s every device.
//!
//! # Concurrency
//! Every chunk has a reader/writer lock (striped over a fixed table).
//! Aligned reads and writes of an allocated chunk share it and run in
//! parallel. Exclusive holders: allocating a chunk, freeing its slot, and
//! read-modify-write — a request not aligned to 4 KiB reads the partial
//! edge blocks, merges the new bytes and writes whole blocks, and nothing
//! else may touch those blocks in between. A reader holds the shared lock
//! until its IO completes, so a slot cannot be freed and handed to another
//! chunk under it.
//!
//! Requests are `async`, and dropping one midway never corrupts the store.
//! The engine keeps every buffer until the kernel is done with it, and a
//! write keeps its chunk lock (or, for a first write, its slot reservation)
//! attached to the IO request until completion, so an abandoned write can
//! never land in a slot that meanwhile went to another chunk. A map change,
//! once queued, is finished by the map writer thread, which holds the
//! chunk's exclusive lock until the change is committed and visible
//! (module `slots`). A write dropped midway may or may not have reached the
//! device, as NBD allows.
//!
pub mod checksums;
mod db;
pub mod device;
mod slots;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use pflex_proto::api::{ChunkChecksum, DeviceInfo};
use pflex_proto::CHUNK_SIZE;

use crate::engine::faults::{FaultHandle, FaultyEngine};
use crate::engine::uring::UringConfig;
use crate::engine::{
    open_engine_with, AlignedBuf, BufferPool, DeviceFile, EngineKind, IoCompletion, IoEngine,
    IoRequest, KeepAlive, IO_ALIGN,
};
use checksums::BlockSums;
use db::{ChunkRow, MapChange, MapWriter};
use slots::{SlotLocation, SlotTable};

/// File name of the local database inside the data directory.
pub const DB_FILE_NAME: &str = "sds_local.db";

/// A chunk's reader/writer lock and its owned exclusive guard.
type ChunkLock = tokio::sync::RwLock<()>;
pub(crate) type ChunkGuard = tokio::sync::OwnedRwLockWriteGuard<()>;

/// How long an IO that missed its deadline gets to complete before its
/// device is failed (see [`ChunkStore::run_io`]).
const HANG_CONFIRMATION: Duration = Duration::from_secs(1);

/// Number of lock stripes shared by all chunks.
const LOCK_STRIPES: usize = 1024;

const CHUNK_BYTES: usize = CHUNK_SIZE as usize;
const ALIGN: u64 = IO_ALIGN as u64;

/// What a store is opened with.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// Holds `sds_local.db`.
    pub data_dir: PathBuf,
    /// Device files (or block devices) and their sizes in bytes; a missing
    /// file is created and preallocated.
    pub devices: Vec<(PathBuf, u64)>,
    pub engine: EngineKind,
    pub health: DeviceHealthConfig,
}

/// When a device counts as failed, and whether faults can be injected.
#[derive(Debug, Clone, Copy, Default)]
pub struct DeviceHealthConfig {
    /// An IO that takes longer fails its device (`None`: wait forever).
    pub io_deadline: Option<Duration>,
    /// Put the engine behind a [`FaultyEngine`] (tests and labs only).
    pub fault_injection: bool,
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
    #[error("chunk map update not committed: {0}")]
    MapUpdate(String),
    #[error("store configuration: {0}")]
    Config(String),
    #[error("the store is shut down")]
    Closed,
    #[error("device {path} has failed ({reason}); its chunks are not served")]
    DeviceFailed { path: String, reason: String },
    #[error("chunk {chunk} of volume {vol}: blocks {blocks:?} do not match their checksums")]
    Corrupt { vol: u64, chunk: u64, blocks: Vec<usize> },
}

impl SlotLocation {
    fn byte_offset(&self, offset_in_chunk: u64) -> u64 {
        u64::from(self.slot) * CHUNK_SIZE + offset_in_chunk
    }
}

struct StoreDevice {
    path: PathBuf,
    db_id: i64,
    size_bytes: u64,
    slot_count: u32,
    /// Set once, when the device misses an IO deadline or returns an error
    /// that means it is gone (`EIO`, `EROFS`, ...): why it failed.
    failed: OnceLock<String>,
    /// A checksum per 4 KiB block of every slot.
    sums: Arc<BlockSums>,
}

/// Operation counters since the store was opened (for `/metrics`).
#[derive(Debug, Default)]
pub struct StoreCounters {
    pub reads: AtomicU64,
    pub read_bytes: AtomicU64,
    pub writes: AtomicU64,
    pub write_bytes: AtomicU64,
    /// Writes that needed a read-modify-write (not 4 KiB aligned).
    pub read_modify_writes: AtomicU64,
    pub slots_allocated: AtomicU64,
    pub slots_freed: AtomicU64,
    pub flushes: AtomicU64,
    pub io_errors: AtomicU64,
    /// Reads that found blocks not matching their checksums.
    pub checksum_errors: AtomicU64,
}

/// Stores 1 MiB chunks of volumes on local devices. `Send + Sync`; shared
/// behind an `Arc` by every task of the server.
pub struct ChunkStore {
    // Drop order: the engine first (it drains in-flight IO), then the map writer.
    engine: Box<dyn IoEngine>,
    map_writer: MapWriter,
    pool: BufferPool,
    devices: Vec<StoreDevice>,
    /// Chunk → slot map and free slots, shared with the map writer thread.
    slots: Arc<SlotTable>,
    /// Chunk locks, striped; `Arc` so an exclusive guard can travel with a
    /// map change to the writer thread (see [`Self::allocate_and_write`]).
    locks: Box<[Arc<ChunkLock>]>,
    next_generation: AtomicU64,
    db_path: PathBuf,
    counters: StoreCounters,
    io_deadline: Option<Duration>,
    faults: Option<FaultHandle>,
    /// Bumped whenever a device fails; the server watches it.
    device_failures: tokio::sync::watch::Sender<u64>,
}

/// The content of a write: caller bytes, or zeroes.
#[derive(Clone, Copy)]
enum Payload<'a> {
    Data(&'a [u8]),
    Zeroes(usize),
}

impl Payload<'_> {
    fn len(&self) -> usize {
        match self {
            Payload::Data(data) => data.len(),
            Payload::Zeroes(len) => *len,
        }
    }
    fn copy_into(&self, target: &mut [u8]) {
        match self {
            Payload::Data(data) => target.copy_from_slice(data),
            Payload::Zeroes(_) => target.fill(0),
        }
    }
}

impl ChunkStore {
    /// Opens (creating and preallocating if needed) the devices and the chunk map.
    pub fn open(cfg: StoreConfig) -> Result<Arc<Self>, StoreError> {
        Self::open_with(cfg, UringConfig::default())
    }

    /// [`Self::open`] with tuning for the uring engine (ignored by the sync engine).
    pub fn open_with(cfg: StoreConfig, uring: UringConfig) -> Result<Arc<Self>, StoreError> {
        if cfg.devices.is_empty() {
            return Err(StoreError::Config("at least one device is required".into()));
        }
        std::fs::create_dir_all(&cfg.data_dir)?;
        let db_path = cfg.data_dir.join(DB_FILE_NAME);
        let conn = db::open_connection(&db_path)?;

        let mut devices = Vec::with_capacity(cfg.devices.len());
        for (path, size) in &cfg.devices {
            let provisioned = device::provision(path, *size)?;
            let path = std::fs::canonicalize(&provisioned.path)?;
            let db_id = db::upsert_device(&conn, &path.to_string_lossy(), provisioned.size_bytes)?;
            if devices.iter().any(|d: &StoreDevice| d.db_id == db_id) {
                return Err(StoreError::Config(format!("{} is listed twice", path.display())));
            }
            let sums_path = cfg.data_dir.join("sums").join(format!("{db_id}.sums"));
            let sums = Arc::new(BlockSums::open(&sums_path, provisioned.slot_count)?);
            devices.push(StoreDevice {
                path,
                db_id,
                size_bytes: provisioned.size_bytes,
                slot_count: provisioned.slot_count,
                failed: OnceLock::new(),
                sums,
            });
        }

        let known_devices = db::load_devices(&conn)?;
        let rows = db::load_chunks(&conn)?;
        let mut map = HashMap::with_capacity(rows.len());
        let mut taken: HashSet<(usize, u32)> = HashSet::with_capacity(rows.len());
        for row in &rows {
            let Some(index) = devices.iter().position(|d| d.db_id == row.device_id) else {
                let path = known_devices
                    .iter()
                    .find(|d| d.device_id == row.device_id)
                    .map_or("?".to_string(), |d| d.path.clone());
                return Err(StoreError::Config(format!(
                    "device {path} holds chunks but is not configured"
                )));
            };
            if row.slot >= devices[index].slot_count {
                return Err(StoreError::Config(format!(
                    "{} is too small for its chunk in slot {}",
                    devices[index].path.display(),
                    row.slot
                )));
            }
            if !taken.insert((index, row.slot)) {
                return Err(StoreError::Config(format!(
                    "slot {} of {} is mapped twice",
                    row.slot,
                    devices[index].path.display()
                )));
            }
            map.insert(
                (row.volume_id, row.chunk_index),
                SlotLocation { device: index, slot: row.slot, generation: row.generation },
            );
        }
        let slots = Arc::new(SlotTable::new(map, devices.iter().map(|d| d.slot_count).collect()));
        let next_generation = db::next_generation(&conn)?;

        let files: Vec<DeviceFile> =
            devices.iter().map(|d| DeviceFile { path: d.path.clone() }).collect();
        let mut engine = open_engine_with(cfg.engine, &files, uring)?;
        let mut faults = None;
        if cfg.health.fault_injection {
            let (faulty, handle) = FaultyEngine::new(engine);
            engine = Box::new(faulty);
            faults = Some(handle);
        }
        let map_writer = MapWriter::start(conn, slots.clone())?;
        tracing::info!(
            devices = devices.len(),
            chunks = slots.read_map().len(),
            engine = %cfg.engine,
            "chunk store opened"
        );
        Ok(Arc::new(Self {
            engine,
            map_writer,
            pool: BufferPool::default(),
            devices,
            slots,
            locks: (0..LOCK_STRIPES).map(|_| Arc::new(ChunkLock::new(()))).collect(),
            next_generation: AtomicU64::new(next_generation),
            db_path,
            counters: StoreCounters::default(),
            io_deadline: cfg.health.io_deadline,
            faults,
            device_failures: tokio::sync::watch::channel(0).0,
        }))
    }

    /// Reads `len` bytes at `offset` of a chunk; a chunk never written reads as zeroes.
    pub async fn read(
        &self,
        vol: u64,
        chunk: u64,
        offset: u32,
        len: u32,
    ) -> Result<Vec<u8>, StoreError> {
        check_range(offset, len as usize)?;
        let key = (vol, chunk);
        self.check_chunk_device(key)?;
        self.counters.reads.fetch_add(1, Ordering::Relaxed);
        self.counters.read_bytes.fetch_add(u64::from(len), Ordering::Relaxed);
        if len == 0 {
            return Ok(Vec::new());
        }
        let offset = u64::from(offset);
        let start = offset / ALIGN * ALIGN;
        let end = (offset + u64::from(len)).div_ceil(ALIGN) * ALIGN;
        let Some(buf) = self.read_verified(key, start, (end - start) as usize).await? else {
            return Ok(vec![0; len as usize]);
        };
        let from = (offset - start) as usize;
        Ok(buf[from..from + len as usize].to_vec())
    }

    /// Reads the aligned range `start .. start + len` of a chunk and checks
    /// every block against its checksum; `None` if the chunk has no slot
    /// (it reads as zeroes). A mismatch is checked again under the chunk's
    /// exclusive lock (a write of the same block may have been in flight)
    /// before it is `Corrupt`.
    async fn read_verified(
        &self,
        key: (u64, u64),
        start: u64,
        len: usize,
    ) -> Result<Option<AlignedBuf>, StoreError> {
        {
            let _shared = self.lock_for(key).read().await;
            let Some(location) = self.location(key) else { return Ok(None) };
            let buf = self.read_slot(location, start, len).await?;
            let sums = &self.devices[location.device].sums;
            if sums.mismatches(location.slot, (start / ALIGN) as usize, &buf).is_empty() {
                return Ok(Some(buf));
            }
        }
        let _exclusive = self.lock_for(key).write().await;
        let Some(location) = self.location(key) else { return Ok(None) };
        let buf = self.read_slot(location, start, len).await?;
        let sums = &self.devices[location.device].sums;
        let blocks = sums.mismatches(location.slot, (start / ALIGN) as usize, &buf);
        if blocks.is_empty() {
            return Ok(Some(buf));
        }
        self.counters.checksum_errors.fetch_add(1, Ordering::Relaxed);
        tracing::error!(vol = key.0, chunk = key.1, ?blocks, "blocks do not match their checksums");
        Err(StoreError::Corrupt { vol: key.0, chunk: key.1, blocks })
    }

    /// Writes `data` at `offset` of a chunk; with `fua` the data is durable
    /// when this returns. The first write to a chunk allocates its slot.
    pub async fn write(
        &self,
        vol: u64,
        chunk: u64,
        offset: u32,
        data: &[u8],
        fua: bool,
    ) -> Result<(), StoreError> {
        check_range(offset, data.len())?;
        self.counters.writes.fetch_add(1, Ordering::Relaxed);
        self.counters.write_bytes.fetch_add(data.len() as u64, Ordering::Relaxed);
        self.write_payload((vol, chunk), offset, Payload::Data(data), fua, true).await
    }

    /// Zeroes a range; the whole chunk frees its slot.
    pub async fn write_zeroes(
        &self,
        vol: u64,
        chunk: u64,
        offset: u32,
        len: u32,
        fua: bool,
    ) -> Result<(), StoreError> {
        self.discard((vol, chunk), offset, len, fua).await
    }

    /// Discards a range (it reads as zeroes afterwards); the whole chunk frees its slot.
    pub async fn trim(
        &self,
        vol: u64,
        chunk: u64,
        offset: u32,
        len: u32,
    ) -> Result<(), StoreError> {
        self.discard((vol, chunk), offset, len, false).await
    }

    /// Overwrites the chunk's slot with zeroes, durably, and then frees it:
    /// for chunks of deleted volumes, whose bytes must not outlive them on
    /// the device (a plain release leaves them there until the slot's next
    /// owner overwrites it). The chunk stays locked throughout.
    pub async fn erase(&self, vol: u64, chunk: u64) -> Result<(), StoreError> {
        let key = (vol, chunk);
        let exclusive = self.lock_for(key).clone().write_owned().await;
        let Some(location) = self.location(key) else { return Ok(()) };
        let mut buf = self.pool.take(CHUNK_BYTES);
        buf.fill(0);
        let (written, keep_alive) =
            self.write_slot(location, 0, buf, true, KeepAlive::new(exclusive)).await;
        written?;
        let exclusive = keep_alive
            .and_then(|k| k.downcast::<ChunkGuard>().ok())
            .ok_or_else(|| StoreError::MapUpdate("the chunk lock did not come back".into()))?;
        self.unmap(key, exclusive).await
    }

    /// Makes every acknowledged write durable (`fdatasync` of every device).
    pub async fn flush(&self) -> Result<(), StoreError> {
        self.counters.flushes.fetch_add(1, Ordering::Relaxed);
        let syncs = (0..self.devices.len())
            .filter(|&device| self.devices[device].failed.get().is_none())
            .map(|device| self.run_io(IoRequest::data_sync(device)));
        for outcome in futures_util::future::join_all(syncs).await {
            outcome?;
        }
        // The sums' write-back (`msync`) blocks: off the runtime's threads.
        for device in self.devices.iter().filter(|d| d.failed.get().is_none()) {
            let sums = device.sums.clone();
            tokio::task::spawn_blocking(move || sums.sync())
                .await
                .map_err(|_| StoreError::Closed)??;
        }
        Ok(())
    }

    /// CRC32 of a chunk's full 1 MiB content (zeroes when never written).
    pub async fn chunk_checksum(&self, vol: u64, chunk: u64) -> Result<ChunkChecksum, StoreError> {
        let key = (vol, chunk);
        let generation = self.location(key).map_or(0, |l| l.generation);
        let (allocated, crc32) = match self.read_verified(key, 0, CHUNK_BYTES).await? {
            None => (false, zero_chunk_crc()),
            Some(buf) => (true, crc32fast::hash(&buf)),
        };
        Ok(ChunkChecksum { volume_id: vol, chunk_index: chunk, allocated, crc32, generation })
    }

    /// (capacity, used) in bytes.
    pub fn capacity(&self) -> (u64, u64) {
        let capacity = self.devices.iter().map(|d| d.size_bytes).sum();
        let used = self.read_map().len() as u64 * CHUNK_SIZE;
        (capacity, used)
    }

    /// Every device with its capacity and the bytes its allocated slots take.
    pub fn devices(&self) -> Vec<DeviceInfo> {
        self.devices
            .iter()
            .zip(self.slots.used_per_device())
            .map(|(device, used)| DeviceInfo {
                path: device.path.to_string_lossy().into_owned(),
                capacity_bytes: device.size_bytes,
                used_bytes: u64::from(used) * CHUNK_SIZE,
            })
            .collect()
    }

    /// Failed devices: (index, path, why).
    pub fn failed_devices(&self) -> Vec<(usize, PathBuf, String)> {
        self.devices
            .iter()
            .enumerate()
            .filter_map(|(i, d)| d.failed.get().map(|why| (i, d.path.clone(), why.clone())))
            .collect()
    }

    /// Index of the device at `path` (as configured or canonical).
    pub fn device_index(&self, path: &Path) -> Option<usize> {
        let canonical = std::fs::canonicalize(path).ok();
        self.devices.iter().position(|d| d.path == path || Some(&d.path) == canonical.as_ref())
    }

    /// Every (volume, chunk) whose slot is on device `device`, sorted.
    pub fn chunks_on_device(&self, device: usize) -> Vec<(u64, u64)> {
        let mut chunks: Vec<_> = self
            .read_map()
            .iter()
            .filter(|(_, location)| location.device == device)
            .map(|(key, _)| *key)
            .collect();
        chunks.sort_unstable();
        chunks
    }

    /// Whether the chunk's slot is on a failed device.
    pub fn on_failed_device(&self, vol: u64, chunk: u64) -> bool {
        self.check_chunk_device((vol, chunk)).is_err()
    }

    /// Changes (a counter) whenever a device fails.
    pub fn device_failures(&self) -> tokio::sync::watch::Receiver<u64> {
        self.device_failures.subscribe()
    }

    /// Sets device faults, if the store was opened with fault injection.
    pub fn fault_handle(&self) -> Option<&FaultHandle> {
        self.faults.as_ref()
    }

    /// Every (volume, chunk) pair that holds a slot, sorted.
    pub fn allocated_chunks(&self) -> Vec<(u64, u64)> {
        let mut chunks: Vec<_> = self.read_map().keys().copied().collect();
        chunks.sort_unstable();
        chunks
    }

    /// Whether any chunk holds a slot.
    pub fn holds_chunks(&self) -> bool {
        !self.read_map().is_empty()
    }

    /// Whether a chunk holds a slot (in-memory lookup; answers `Op::Allocation`).
    pub fn is_allocated(&self, vol: u64, chunk: u64) -> bool {
        self.read_map().contains_key(&(vol, chunk))
    }

    /// The engine the store runs on.
    pub fn engine_kind(&self) -> EngineKind {
        self.engine.kind()
    }

    /// The IO engine itself (diagnostics, tests).
    pub fn engine(&self) -> &dyn IoEngine {
        self.engine.as_ref()
    }

    /// The descriptor each device's IO goes through (to check its open flags).
    pub fn device_fds(&self) -> Vec<std::os::fd::RawFd> {
        (0..self.devices.len()).filter_map(|d| self.engine.device_fd(d)).collect()
    }

    /// `sds_local.db`; other modules keep their own connection to it for
    /// `verified_tokens` and `local_health_log`.
    pub fn db_path(&self) -> &Path {
        &self.db_path
    }

    /// Operation counters since the store was opened.
    pub fn counters(&self) -> &StoreCounters {
        &self.counters
    }

    // ---- internals ----

    fn lock_for(&self, (vol, chunk): (u64, u64)) -> &Arc<ChunkLock> {
        let mixed =
            vol.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ chunk.wrapping_mul(0xC2B2_AE3D_27D4_EB4F);
        let index = (mixed ^ (mixed >> 29)) as usize % LOCK_STRIPES;
        &self.locks[index]
    }

    fn read_map(&self) -> std::sync::RwLockReadGuard<'_, HashMap<(u64, u64), SlotLocation>> {
        self.slots.read_map()
    }

    fn location(&self, key: (u64, u64)) -> Option<SlotLocation> {
        self.slots.location(key)
    }

    /// Reads `len` aligned bytes at aligned `offset` within the slot.
    async fn read_slot(
        &self,
        location: SlotLocation,
        offset: u64,
        len: usize,
    ) -> Result<AlignedBuf, StoreError> {
        let buf = self.pool.take(len);
        let request = IoRequest::read(location.device, location.byte_offset(offset), buf);
        let completion = self.run_io(request).await?;
        Ok(completion.buf.expect("a completed read returns its buffer"))
    }

    /// Submits `request` under the device's health rules: refused if the
    /// device has failed; the device fails if the IO misses the deadline or
    /// reports that the device is gone. An IO given up on stays with the
    /// engine (buffer and keep-alive) until the kernel is done with it.
    async fn run_io(&self, request: IoRequest) -> Result<IoCompletion, StoreError> {
        let device = request.device;
        self.check_device(device)?;
        let mut pending = self.engine.submit(request);
        let completion = match self.io_deadline {
            None => pending.await,
            Some(deadline) => match tokio::time::timeout(deadline, &mut pending).await {
                Ok(completion) => completion,
                // A second, shorter wait before the verdict: when this
                // process itself was not running (SIGSTOP, a long pause),
                // the timer fires as it resumes, before the completion the
                // kernel has long had is delivered. A hung device stays
                // silent through the confirmation too.
                Err(_) => match tokio::time::timeout(HANG_CONFIRMATION, pending).await {
                    Ok(completion) => completion,
                    Err(_) => {
                        self.counters.io_errors.fetch_add(1, Ordering::Relaxed);
                        let reason =
                            format!("an IO took longer than {:?}", deadline + HANG_CONFIRMATION);
                        return Err(self.fail_device(device, reason));
                    }
                },
            },
        };
        match &completion.result {
            Ok(()) => Ok(completion),
            Err(error) => {
                self.counters.io_errors.fetch_add(1, Ordering::Relaxed);
                if device_is_gone(error) {
                    return Err(self.fail_device(device, format!("IO error: {error}")));
                }
                let IoCompletion { result, .. } = completion;
                Err(result.expect_err("matched an error").into())
            }
        }
    }

    /// No free slot: `NoSpace`, unless a failed device took the room, in
    /// which case the chunk belongs elsewhere and the error says so (the
    /// MDM moves this node's copies; the client retries).
    fn out_of_slots(&self) -> StoreError {
        match self.devices.iter().find(|d| d.failed.get().is_some()) {
            Some(device) => StoreError::DeviceFailed {
                path: device.path.display().to_string(),
                reason: "no healthy device has a free slot".into(),
            },
            None => StoreError::NoSpace,
        }
    }

    /// `DeviceFailed` if the chunk lives on a failed device.
    fn check_chunk_device(&self, key: (u64, u64)) -> Result<(), StoreError> {
        match self.location(key) {
            Some(location) => self.check_device(location.device),
            None => Ok(()),
        }
    }

    /// `DeviceFailed` if device `device` has failed.
    fn check_device(&self, device: usize) -> Result<(), StoreError> {
        match self.devices[device].failed.get() {
            None => Ok(()),
            Some(reason) => Err(StoreError::DeviceFailed {
                path: self.devices[device].path.display().to_string(),
                reason: reason.clone(),
            }),
        }
    }

    /// Marks device `device` failed (the first reason sticks): it takes no
    /// new chunks and serves none of its own, and the server is told.
    fn fail_device(&self, device: usize, reason: String) -> StoreError {
        if self.devices[device].failed.set(reason.clone()).is_ok() {
            tracing::error!(device = %self.devices[device].path.display(), %reason, "device failed");
            self.slots.retire(device);
            self.device_failures.send_modify(|count| *count += 1);
        }
        self.check_device(device).expect_err("the device has just failed")
    }

    /// Writes an aligned buffer at aligned `offset` within the slot.
    /// `keep_alive` (the chunk's lock guard, or the slot's reservation)
    /// lives until the write has completed, even if this future is dropped
    /// first; it is handed back on completion.
    async fn write_slot(
        &self,
        location: SlotLocation,
        offset: u64,
        buf: AlignedBuf,
        fua: bool,
        keep_alive: KeepAlive,
    ) -> (Result<(), StoreError>, Option<KeepAlive>) {
        // The sums go first, under the chunk's lock (see `checksums`).
        self.devices[location.device].sums.record(location.slot, (offset / ALIGN) as usize, &buf);
        let request = IoRequest::write(location.device, location.byte_offset(offset), buf, fua)
            .keeping(keep_alive);
        match self.run_io(request).await {
            Ok(completion) => (Ok(()), completion.keep_alive),
            Err(error) => (Err(error), None),
        }
    }

    async fn discard(
        &self,
        key: (u64, u64),
        offset: u32,
        len: u32,
        fua: bool,
    ) -> Result<(), StoreError> {
        check_range(offset, len as usize)?;
        if offset == 0 && u64::from(len) == CHUNK_SIZE {
            return self.release(key).await;
        }
        self.write_payload(key, offset, Payload::Zeroes(len as usize), fua, false).await
    }

    /// Writes `payload` into the chunk. An unallocated chunk is allocated
    /// when `allocate` is set; otherwise (zeroing) it is left alone, since it
    /// reads as zeroes already.
    async fn write_payload(
        &self,
        key: (u64, u64),
        offset: u32,
        payload: Payload<'_>,
        fua: bool,
        allocate: bool,
    ) -> Result<(), StoreError> {
        let len = payload.len();
        if len == 0 {
            return Ok(());
        }
        // Not even queued behind the lock of a chunk whose device failed
        // (a hung IO may hold that lock for as long as it hangs).
        self.check_chunk_device(key)?;
        let offset = u64::from(offset);
        let aligned = offset.is_multiple_of(ALIGN) && (len as u64).is_multiple_of(ALIGN);
        let lock = self.lock_for(key);
        // Writes hold the chunk lock until the kernel is done with them
        // (the guard travels with the request): otherwise a write abandoned
        // midway could land in the slot after it was freed and given to
        // another chunk.
        if aligned {
            // Fast path: whole blocks of an allocated chunk, in parallel with other IO.
            let shared = lock.clone().read_owned().await;
            match self.location(key) {
                Some(location) => {
                    let mut buf = self.pool.take(len);
                    payload.copy_into(&mut buf);
                    let guard = KeepAlive::new(shared);
                    return self.write_slot(location, offset, buf, fua, guard).await.0;
                }
                None if !allocate => return Ok(()),
                None => {}
            }
        }
        let exclusive = lock.clone().write_owned().await;
        match self.location(key) {
            Some(location) if aligned => {
                let mut buf = self.pool.take(len);
                payload.copy_into(&mut buf);
                self.write_slot(location, offset, buf, fua, KeepAlive::new(exclusive)).await.0
            }
            Some(location) => {
                self.read_modify_write(location, offset, payload, fua, exclusive).await
            }
            None if !allocate => Ok(()),
            None => self.allocate_and_write(key, offset, payload, exclusive).await,
        }
    }

    /// Writes an unaligned range: reads the partial edge blocks, merges,
    /// writes whole blocks, all under the chunk's exclusive lock.
    async fn read_modify_write(
        &self,
        location: SlotLocation,
        offset: u64,
        payload: Payload<'_>,
        fua: bool,
        exclusive: ChunkGuard,
    ) -> Result<(), StoreError> {
        self.counters.read_modify_writes.fetch_add(1, Ordering::Relaxed);
        let end = offset + payload.len() as u64;
        let start = offset / ALIGN * ALIGN;
        let aligned_end = end.div_ceil(ALIGN) * ALIGN;
        let mut buf = self.pool.take((aligned_end - start) as usize);
        let head_partial = offset != start;
        let last_block = aligned_end - ALIGN;
        let tail_partial = end != aligned_end && !(head_partial && last_block == start);
        let head = async {
            if head_partial {
                self.read_slot(location, start, IO_ALIGN).await.map(Some)
            } else {
                Ok(None)
            }
        };
        let tail = async {
            if tail_partial {
                self.read_slot(location, last_block, IO_ALIGN).await.map(Some)
            } else {
                Ok(None)
            }
        };
        let (head, tail) = tokio::join!(head, tail);
        if let Some(block) = head? {
            buf[..IO_ALIGN].copy_from_slice(&block);
        }
        if let Some(block) = tail? {
            let at = (last_block - start) as usize;
            buf[at..at + IO_ALIGN].copy_from_slice(&block);
        }
        let from = (offset - start) as usize;
        payload.copy_into(&mut buf[from..from + payload.len()]);
        self.write_slot(location, start, buf, fua, KeepAlive::new(exclusive)).await.0
    }

    /// First write to a chunk: reserves a slot, writes all of it durably,
    /// then has the map writer commit and publish it. The caller holds the
    /// chunk's exclusive lock.
    ///
    /// If this future is dropped while the slot write is in flight, the
    /// reservation goes back to the free list only when the write has
    /// completed (it travels with the request), so no other chunk gets the
    /// slot while the kernel may still write into it. Once the map change
    /// is queued it travels with the chunk's exclusive guard: the writer
    /// thread commits and publishes it and only then releases the chunk,
    /// whether or not anyone still waits.
    async fn allocate_and_write(
        &self,
        key: (u64, u64),
        offset: u64,
        payload: Payload<'_>,
        exclusive: ChunkGuard,
    ) -> Result<(), StoreError> {
        let (device, slot) = self.slots.reserve().ok_or_else(|| self.out_of_slots())?;
        let location = SlotLocation {
            device,
            slot,
            generation: self.next_generation.fetch_add(1, Ordering::Relaxed),
        };
        let mut buf = self.pool.take(CHUNK_BYTES);
        let from = offset as usize;
        buf[..from].fill(0);
        payload.copy_into(&mut buf[from..from + payload.len()]);
        buf[from + payload.len()..].fill(0);
        let reservation = SlotReservation { slots: self.slots.clone(), device, slot, held: true };
        let (written, reservation) =
            self.write_slot(location, 0, buf, true, KeepAlive::new(reservation)).await;
        // On error, dropping the reservation frees the slot (the write is over).
        written?;
        if let Some(reservation) = reservation.and_then(|r| r.downcast::<SlotReservation>().ok()) {
            reservation.hand_over();
        }
        let row = ChunkRow {
            volume_id: key.0,
            chunk_index: key.1,
            device_id: self.devices[device].db_id,
            slot,
            generation: location.generation,
        };
        self.map_writer.apply(MapChange::Map { row, location }, exclusive).await?;
        self.counters.slots_allocated.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Frees the chunk's slot: durably unmapped first, then freed by the map
    /// writer, which holds the chunk's exclusive guard until then (so no
    /// reader of the old mapping can overlap the slot's next owner, even if
    /// this future is dropped while it waits).
    async fn release(&self, key: (u64, u64)) -> Result<(), StoreError> {
        let exclusive = self.lock_for(key).clone().write_owned().await;
        if self.location(key).is_none() {
            return Ok(());
        }
        self.unmap(key, exclusive).await
    }

    /// Has the map writer unmap the chunk and free its slot; `exclusive`,
    /// the chunk's guard, is held until that is committed.
    async fn unmap(&self, key: (u64, u64), exclusive: ChunkGuard) -> Result<(), StoreError> {
        let change = MapChange::Unmap { volume_id: key.0, chunk_index: key.1 };
        self.map_writer.apply(change, exclusive).await?;
        self.counters.slots_freed.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

/// A reserved slot not yet handed to the map writer; freed when dropped.
struct SlotReservation {
    slots: Arc<SlotTable>,
    device: usize,
    slot: u32,
    held: bool,
}

impl SlotReservation {
    /// The slot now belongs to a map change; dropping no longer frees it.
    fn hand_over(mut self) {
        self.held = false;
    }
}

impl Drop for SlotReservation {
    fn drop(&mut self) {
        if self.held {
            self.slots.unreserve(self.device, self.slot);
        }
    }
}

/// Whether an IO error means the device is gone, rather than that one
/// request was bad.
fn device_is_gone(error: &std::io::Error) -> bool {
    matches!(
        error.raw_os_error(),
        Some(libc::EIO | libc::EROFS | libc::ENODEV | libc::ENXIO | libc::EREMOTEIO)
    )
}

fn check_range(offset: u32, len: usize) -> Result<(), StoreError> {
    let end = u64::from(offset).checked_add(len as u64);
    match end {
        Some(end) if end <= CHUNK_SIZE => Ok(()),
        _ => Err(StoreError::OutOfRange { offset: u64::from(offset), len: len as u64 }),
    }
}

/// CRC32 of a chunk of zeroes (what an unallocated chunk reads as).
fn zero_chunk_crc() -> u32 {
    static CRC: OnceLock<u32> = OnceLock::new();
    *CRC.get_or_init(|| crc32fast::hash(&vec![0u8; CHUNK_BYTES]))
}
