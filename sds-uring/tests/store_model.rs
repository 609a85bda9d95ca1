//! The chunk store against an in-memory model, on both IO engines: random
//! aligned and unaligned writes, reads, TRIM and WRITE_ZEROES over a volume
//! of several chunks (so requests cross chunk and slot boundaries), slot
//! reuse, persistence across reopen, and concurrent read-modify-writes.

use std::path::PathBuf;
use std::sync::Arc;

use pflex_proto::CHUNK_SIZE;
use pflex_sds_uring::engine::EngineKind;
use pflex_sds_uring::store::{ChunkStore, StoreConfig, StoreError};

const CHUNK: u64 = CHUNK_SIZE;

/// A fresh directory on the target filesystem (ext4 here; O_DIRECT needs a
/// real filesystem, tmpfs refuses it).
fn test_dir(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("store-tests").join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn config(dir: &std::path::Path, engine: EngineKind, device_sizes: &[u64]) -> StoreConfig {
    StoreConfig {
        data_dir: dir.to_path_buf(),
        devices: device_sizes
            .iter()
            .enumerate()
            .map(|(i, &size)| (dir.join(format!("dev{i}.img")), size))
            .collect(),
        engine,
        health: Default::default(),
    }
}

/// Deterministic xorshift generator, so a failure replays.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Splits a volume byte range into (chunk, offset in chunk, length) pieces.
fn split(offset: u64, len: u64) -> Vec<(u64, u32, u32)> {
    let mut pieces = Vec::new();
    let mut at = offset;
    let end = offset + len;
    while at < end {
        let chunk = at / CHUNK;
        let within = at % CHUNK;
        let take = (CHUNK - within).min(end - at);
        pieces.push((chunk, within as u32, take as u32));
        at += take;
    }
    pieces
}

async fn volume_write(store: &ChunkStore, vol: u64, offset: u64, data: &[u8], fua: bool) {
    let mut consumed = 0usize;
    for (chunk, within, len) in split(offset, data.len() as u64) {
        let piece = &data[consumed..consumed + len as usize];
        store.write(vol, chunk, within, piece, fua).await.unwrap();
        consumed += len as usize;
    }
}

async fn volume_read(store: &ChunkStore, vol: u64, offset: u64, len: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(len as usize);
    for (chunk, within, piece) in split(offset, len) {
        out.extend(store.read(vol, chunk, within, piece).await.unwrap());
    }
    out
}

fn random_range(rng: &mut Rng, volume_bytes: u64) -> (u64, u64) {
    let aligned = rng.below(2) == 0;
    let (offset, len) = if aligned {
        let blocks = volume_bytes / 4096;
        let offset = rng.below(blocks) * 4096;
        let len = (1 + rng.below(96)) * 4096;
        (offset, len)
    } else {
        let offset = rng.below(volume_bytes);
        let longest = if rng.below(4) == 0 { 400_000 } else { 9000 };
        let len = 1 + rng.below(longest);
        (offset, len)
    };
    (offset, len.min(volume_bytes - offset))
}

async fn check_whole_volume(store: &ChunkStore, vol: u64, model: &[u8]) {
    let got = volume_read(store, vol, 0, model.len() as u64).await;
    if let Some(at) = got.iter().zip(model).position(|(a, b)| a != b) {
        panic!("volume {vol} differs from the model at byte {at}");
    }
}

async fn random_ops_against_model(engine: EngineKind) {
    let dir = test_dir(&format!("model-{engine}"));
    // Two devices of 4 slots each; the volumes use up to 7 chunks, so slots
    // are freed and reused as whole-chunk trims come and go.
    let cfg = config(&dir, engine, &[4 * CHUNK, 4 * CHUNK + 12345]);
    let store = ChunkStore::open(cfg.clone()).unwrap();
    assert_eq!(store.engine_kind(), engine);
    assert_eq!(store.capacity(), (8 * CHUNK, 0));

    const VOL: u64 = 7;
    let volume_bytes = 7 * CHUNK;
    let mut model = vec![0u8; volume_bytes as usize];
    let mut rng = Rng(0x5EED_0000 + engine as u64);

    for step in 0..400 {
        let (offset, len) = random_range(&mut rng, volume_bytes);
        let range = offset as usize..(offset + len) as usize;
        match rng.below(10) {
            0..=4 => {
                let data: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
                volume_write(&store, VOL, offset, &data, rng.below(8) == 0).await;
                model[range].copy_from_slice(&data);
            }
            5..=6 => {
                let got = volume_read(&store, VOL, offset, len).await;
                assert!(got == model[range.clone()], "step {step}: read {range:?} differs");
            }
            7 => {
                for (chunk, within, piece) in split(offset, len) {
                    store.trim(VOL, chunk, within, piece).await.unwrap();
                }
                model[range].fill(0);
            }
            8 => {
                for (chunk, within, piece) in split(offset, len) {
                    store.write_zeroes(VOL, chunk, within, piece, false).await.unwrap();
                }
                model[range].fill(0);
            }
            _ => {
                // Whole-chunk discard frees the slot.
                let chunk = rng.below(7);
                store.trim(VOL, chunk, 0, CHUNK as u32).await.unwrap();
                model[(chunk * CHUNK) as usize..((chunk + 1) * CHUNK) as usize].fill(0);
                assert!(!store.is_allocated(VOL, chunk));
            }
        }
    }
    check_whole_volume(&store, VOL, &model).await;

    // The store's accounting agrees with its map.
    let allocated = store.allocated_chunks();
    assert!(allocated.iter().all(|&(vol, chunk)| vol == VOL && chunk < 7));
    let used: u64 = store.devices().iter().map(|d| d.used_bytes).sum();
    assert_eq!(used, allocated.len() as u64 * CHUNK);
    assert_eq!(store.capacity().1, used);

    // Checksums match the model, allocated or not.
    for chunk in 0..7u64 {
        let sum = store.chunk_checksum(VOL, chunk).await.unwrap();
        let expected =
            crc32fast::hash(&model[(chunk * CHUNK) as usize..((chunk + 1) * CHUNK) as usize]);
        assert_eq!(sum.crc32, expected, "checksum of chunk {chunk}");
        assert_eq!(sum.allocated, store.is_allocated(VOL, chunk));
    }

    store.flush().await.unwrap();
    drop(store);

    // Reopen: the map and the data persisted.
    let store = ChunkStore::open(cfg).unwrap();
    assert_eq!(store.allocated_chunks(), allocated);
    check_whole_volume(&store, VOL, &model).await;
    // Another volume is independent and reads as zeroes.
    assert_eq!(volume_read(&store, VOL + 1, 0, 3 * CHUNK).await, vec![0; 3 * CHUNK as usize]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_ops_match_the_model_uring() {
    random_ops_against_model(EngineKind::Uring).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_ops_match_the_model_sync() {
    random_ops_against_model(EngineKind::Sync).await;
}

async fn slots_are_reused_and_never_leak(engine: EngineKind) {
    let dir = test_dir(&format!("reuse-{engine}"));
    let store = ChunkStore::open(config(&dir, engine, &[2 * CHUNK])).unwrap();
    let full = vec![0xEEu8; CHUNK as usize];
    store.write(1, 0, 0, &full, false).await.unwrap();
    store.write(1, 1, 0, &full, false).await.unwrap();
    let third = store.write(1, 2, 0, b"x", false).await;
    assert!(matches!(third, Err(StoreError::NoSpace)), "got {third:?}");
    assert!(!store.is_allocated(1, 2));

    // Freeing chunk 0 makes room; the reused slot must not show chunk 0's bytes.
    store.write_zeroes(1, 0, 0, CHUNK as u32, false).await.unwrap();
    assert!(!store.is_allocated(1, 0));
    store.write(2, 5, 100, b"hello", false).await.unwrap();
    let chunk = store.read(2, 5, 0, CHUNK as u32).await.unwrap();
    assert_eq!(&chunk[100..105], b"hello");
    assert!(chunk[..100].iter().chain(&chunk[105..]).all(|&b| b == 0), "stale bytes leaked");
    assert_eq!(store.read(1, 0, 0, 4096).await.unwrap(), vec![0; 4096]);

    // Zeroing or trimming an unallocated chunk does not allocate it.
    store.trim(3, 0, 0, 4096).await.unwrap();
    store.write_zeroes(3, 0, 4096, 100, true).await.unwrap();
    assert!(!store.is_allocated(3, 0));
    assert_eq!(store.allocated_chunks(), vec![(1, 1), (2, 5)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slots_are_reused_and_never_leak_uring() {
    slots_are_reused_and_never_leak(EngineKind::Uring).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slots_are_reused_and_never_leak_sync() {
    slots_are_reused_and_never_leak(EngineKind::Sync).await;
}

/// 64 tasks write disjoint, unaligned 700-byte pieces into the same 4 KiB
/// blocks at once; read-modify-write under the chunk lock must keep every piece.
async fn concurrent_unaligned_writes_keep_every_byte(engine: EngineKind) {
    let dir = test_dir(&format!("rmw-{engine}"));
    let store = ChunkStore::open(config(&dir, engine, &[4 * CHUNK])).unwrap();
    store.write(9, 0, 0, &[1u8; 8192], false).await.unwrap();
    let mut tasks = Vec::new();
    for i in 0..64u32 {
        let store: Arc<ChunkStore> = store.clone();
        tasks.push(tokio::spawn(async move {
            let piece = vec![i as u8 + 10; 700];
            store.write(9, 0, 100 + i * 700, &piece, false).await.unwrap();
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let got = store.read(9, 0, 0, 100 + 64 * 700 + 100).await.unwrap();
    assert!(got[..100].iter().all(|&b| b == 1));
    for i in 0..64usize {
        let piece = &got[100 + i * 700..100 + (i + 1) * 700];
        assert!(piece.iter().all(|&b| b == i as u8 + 10), "piece {i} lost");
    }
    assert!(got[100 + 64 * 700..].iter().all(|&b| b == 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_unaligned_writes_keep_every_byte_uring() {
    concurrent_unaligned_writes_keep_every_byte(EngineKind::Uring).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_unaligned_writes_keep_every_byte_sync() {
    concurrent_unaligned_writes_keep_every_byte(EngineKind::Sync).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_range_requests_are_refused() {
    let dir = test_dir("range");
    let store = ChunkStore::open(config(&dir, EngineKind::Uring, &[CHUNK])).unwrap();
    let too_far = store.write(1, 0, CHUNK as u32 - 10, &[0u8; 11], false).await;
    assert!(matches!(too_far, Err(StoreError::OutOfRange { .. })), "got {too_far:?}");
    let read = store.read(1, 0, u32::MAX, 2).await;
    assert!(matches!(read, Err(StoreError::OutOfRange { .. })), "got {read:?}");
    assert!(!store.is_allocated(1, 0), "a refused write allocated nothing");
    // Empty requests are fine and do nothing.
    store.write(1, 0, 0, &[], false).await.unwrap();
    assert_eq!(store.read(1, 0, 5, 0).await.unwrap(), Vec::<u8>::new());
    assert!(!store.is_allocated(1, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_holding_chunks_cannot_be_left_out() {
    let dir = test_dir("missing-device");
    let cfg = config(&dir, EngineKind::Sync, &[2 * CHUNK, 2 * CHUNK]);
    let store = ChunkStore::open(cfg.clone()).unwrap();
    for chunk in 0..4 {
        store.write(1, chunk, 0, b"data", false).await.unwrap();
    }
    drop(store);
    let mut fewer = cfg.clone();
    fewer.devices.truncate(1);
    let refused = ChunkStore::open(fewer);
    assert!(matches!(refused, Err(StoreError::Config(_))), "opened without a device in use");
    // The full configuration still opens, with everything in place.
    let store = ChunkStore::open(cfg).unwrap();
    assert_eq!(store.allocated_chunks().len(), 4);
    assert_eq!(&store.read(1, 3, 0, 4).await.unwrap(), b"data");
}

/// Requests aborted at random points (first writes, trims, read-modify-writes)
/// leave the store consistent: every block of every chunk holds zeroes or
/// bytes written to that very chunk, and the map survives a reopen.
async fn aborted_requests_leave_the_store_consistent(engine: EngineKind) {
    let dir = test_dir(&format!("abort-{engine}"));
    let cfg = config(&dir, engine, &[6 * CHUNK, 6 * CHUNK]);
    let store = ChunkStore::open(cfg.clone()).unwrap();
    /// Every byte written to a chunk is that chunk's own value, so bytes of
    /// another chunk showing through a reused slot are caught.
    fn value(chunk: u64) -> u8 {
        (chunk * 37 % 250) as u8 + 1
    }
    let mut rng = Rng(0xAB0_7ED + engine as u64);
    for _round in 0..30 {
        let mut tasks = Vec::new();
        for writer in 0..24u64 {
            let store = store.clone();
            let chunk = rng.below(10);
            let kind = rng.below(4);
            let within = (rng.below(120) * 8192) as u32;
            tasks.push(tokio::spawn(async move {
                let data = vec![value(chunk); 8192 - (writer as usize % 2) * 1000];
                match kind {
                    0 => store.trim(3, chunk, 0, CHUNK as u32).await,
                    // Unaligned: read-modify-write.
                    1 => store.write(3, chunk, within + 100, &data, false).await,
                    _ => store.write(3, chunk, within, &data, kind == 3).await,
                }
            }));
        }
        for (i, task) in tasks.iter().enumerate() {
            if i % 2 == 0 {
                for _ in 0..rng.below(3) {
                    tokio::task::yield_now().await;
                }
                task.abort();
            }
        }
        for task in tasks {
            match task.await {
                Ok(result) => result.unwrap(),
                Err(error) => assert!(error.is_cancelled()),
            }
        }
    }
    let check = |store: Arc<ChunkStore>| async move {
        for chunk in 0..10u64 {
            let content = store.read(3, chunk, 0, CHUNK as u32).await.unwrap();
            if let Some(at) = content.iter().position(|&b| b != 0 && b != value(chunk)) {
                panic!("chunk {chunk} holds a foreign byte at {at}");
            }
        }
    };
    check(store.clone()).await;
    let allocated = store.allocated_chunks();
    // Slots reserved by abandoned first writes come back once those writes
    // complete, without a restart.
    let used = || store.devices().iter().map(|d| d.used_bytes).sum::<u64>();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while used() != allocated.len() as u64 * CHUNK && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert_eq!(used(), allocated.len() as u64 * CHUNK, "reserved slots were not given back");
    drop(store);
    let store = ChunkStore::open(cfg).unwrap();
    assert_eq!(store.allocated_chunks(), allocated);
    let used_on_devices: u64 = store.devices().iter().map(|d| d.used_bytes).sum();
    assert_eq!(used_on_devices, allocated.len() as u64 * CHUNK, "slots leaked across restart");
    check(store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aborted_requests_leave_the_store_consistent_uring() {
    aborted_requests_leave_the_store_consistent(EngineKind::Uring).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aborted_requests_leave_the_store_consistent_sync() {
    aborted_requests_leave_the_store_consistent(EngineKind::Sync).await;
}

/// A chunk's generation is the allocation number of its slot: new on every
/// (re)allocation, never reused, kept across restarts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generations_grow_with_every_allocation_and_persist() {
    let dir = test_dir("generation");
    let cfg = config(&dir, EngineKind::Uring, &[4 * CHUNK]);
    let store = ChunkStore::open(cfg.clone()).unwrap();
    let unwritten = store.chunk_checksum(5, 0).await.unwrap();
    assert!(!unwritten.allocated);
    assert_eq!(unwritten.generation, 0);
    assert_eq!(unwritten.crc32, crc32fast::hash(&vec![0u8; CHUNK as usize]));

    store.write(5, 0, 0, b"first", false).await.unwrap();
    let first = store.chunk_checksum(5, 0).await.unwrap();
    store.write(5, 0, 4096, b"again", true).await.unwrap();
    assert_eq!(store.chunk_checksum(5, 0).await.unwrap().generation, first.generation);
    store.trim(5, 0, 0, CHUNK as u32).await.unwrap();
    store.write(5, 0, 0, b"second", false).await.unwrap();
    let second = store.chunk_checksum(5, 0).await.unwrap();
    assert!(second.generation > first.generation);
    store.flush().await.unwrap();
    drop(store);

    let store = ChunkStore::open(cfg.clone()).unwrap();
    assert_eq!(store.chunk_checksum(5, 0).await.unwrap(), second);
    // Freed before a restart: no row remembers its generation any more.
    store.trim(5, 0, 0, CHUNK as u32).await.unwrap();
    drop(store);
    let store = ChunkStore::open(cfg).unwrap();
    store.write(5, 0, 0, b"third", false).await.unwrap();
    let third = store.chunk_checksum(5, 0).await.unwrap();
    assert!(third.generation > second.generation, "a generation was reused after restart");
    let mut expected = vec![0u8; CHUNK as usize];
    expected[..5].copy_from_slice(b"third");
    assert_eq!(third.crc32, crc32fast::hash(&expected));
}
