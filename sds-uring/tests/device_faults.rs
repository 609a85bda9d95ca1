//! Device health in the chunk store, with the fault-injecting engine: a
//! device that hangs or returns EIO is failed (after the IO deadline, or at
//! once), serves none of its chunks from then on, and takes no new ones,
//! while the other devices go on; a slow device within the deadline is not
//! failed; erasing a chunk leaves no byte of it on the device.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use pflex_sds_uring::engine::faults::DeviceFault;
use pflex_sds_uring::engine::EngineKind;
use pflex_sds_uring::store::{ChunkStore, DeviceHealthConfig, StoreConfig, StoreError};

/// Longest any single store call may take here before the test calls it
/// hung (a safety net: the deadline under test is far shorter).
const HUNG: Duration = Duration::from_secs(20);

fn test_dir(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("device-faults").join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Two 8 MiB devices, fault injection on, the given IO deadline.
fn open(name: &str, engine: EngineKind, deadline: Option<Duration>) -> Arc<ChunkStore> {
    let dir = test_dir(name);
    ChunkStore::open(StoreConfig {
        data_dir: dir.clone(),
        devices: vec![(dir.join("dev0.img"), 8 << 20), (dir.join("dev1.img"), 8 << 20)],
        engine,
        health: DeviceHealthConfig { io_deadline: deadline, fault_injection: true },
    })
    .unwrap()
}

async fn within<T>(what: &str, f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(HUNG, f).await.unwrap_or_else(|_| panic!("{what} hung"))
}

/// Chunk 0 on device 0 and chunk 1 on device 1 (allocation takes the
/// device with the most free slots).
async fn two_chunks(store: &ChunkStore) {
    store.write(1, 0, 0, &[0xA0; 4096], false).await.unwrap();
    store.write(1, 1, 0, &[0xA1; 4096], false).await.unwrap();
    assert_eq!(store.chunks_on_device(0), vec![(1, 0)]);
    assert_eq!(store.chunks_on_device(1), vec![(1, 1)]);
}

fn is_device_failed(result: &Result<impl Sized, StoreError>) -> bool {
    matches!(result, Err(StoreError::DeviceFailed { .. }))
}

async fn a_faulty_device_is_failed_and_isolated(engine: EngineKind, fault: DeviceFault) {
    let store = open(&format!("{engine}-{fault:?}"), engine, Some(Duration::from_millis(300)));
    two_chunks(&store).await;
    let failures = store.device_failures();
    assert!(store.fault_handle().expect("fault injection is on").set(0, fault));

    let read = within("a read from the faulty device", store.read(1, 0, 0, 4096)).await;
    assert!(is_device_failed(&read), "expected DeviceFailed, got {read:?}");
    assert!(failures.has_changed().unwrap(), "the server must be told");
    let failed = store.failed_devices();
    assert_eq!(failed.len(), 1);
    assert_eq!(failed[0].0, 0);

    // From now on the device serves nothing, without touching it (a hung
    // device would hold the caller again).
    let again = within("a second read", store.read(1, 0, 0, 4096)).await;
    assert!(is_device_failed(&again));
    let write = within("a write to the failed device", store.write(1, 0, 0, &[1; 4096], false));
    assert!(is_device_failed(&write.await));
    assert!(store.on_failed_device(1, 0));

    // The other device goes on, and takes every new chunk.
    assert_eq!(within("a read", store.read(1, 1, 0, 4096)).await.unwrap(), vec![0xA1; 4096]);
    within("a write", store.write(1, 2, 0, &[0xA2; 4096], false)).await.unwrap();
    within("a write", store.write(1, 3, 0, &[0xA3; 4096], false)).await.unwrap();
    assert_eq!(store.chunks_on_device(1), vec![(1, 1), (1, 2), (1, 3)]);
    assert_eq!(store.chunks_on_device(0), vec![(1, 0)]);
    within("a flush", store.flush()).await.expect("a flush skips the failed device");

    // Clearing the fault does not bring the device back (a restart does).
    store.fault_handle().unwrap().set(0, DeviceFault::None);
    assert!(is_device_failed(&within("a read", store.read(1, 0, 0, 4096)).await));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_device_is_failed_after_the_deadline_uring() {
    a_faulty_device_is_failed_and_isolated(EngineKind::Uring, DeviceFault::Hang).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_device_is_failed_after_the_deadline_sync() {
    a_faulty_device_is_failed_and_isolated(EngineKind::Sync, DeviceFault::Hang).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_returning_eio_is_failed_at_once() {
    a_faulty_device_is_failed_and_isolated(EngineKind::Uring, DeviceFault::Eio).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_device_within_the_deadline_is_not_failed() {
    let store = open("slow", EngineKind::Uring, Some(Duration::from_secs(2)));
    two_chunks(&store).await;
    store.fault_handle().unwrap().set(0, DeviceFault::Slow { delay_ms: 50 });
    for _ in 0..5 {
        assert_eq!(within("a slow read", store.read(1, 0, 0, 4096)).await.unwrap(), [0xA0; 4096]);
    }
    assert!(store.failed_devices().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_device_failed_means_no_room_here_not_no_space() {
    let store = open("all-failed", EngineKind::Uring, Some(Duration::from_millis(300)));
    two_chunks(&store).await;
    let faults = store.fault_handle().unwrap();
    faults.set(0, DeviceFault::Eio);
    faults.set(1, DeviceFault::Eio);
    assert!(is_device_failed(&store.read(1, 0, 0, 4096).await));
    assert!(is_device_failed(&store.read(1, 1, 0, 4096).await));
    // A new chunk has nowhere to go: the error sends the client elsewhere
    // (NotAvailable on the wire) rather than failing it with ENOSPC.
    let write = store.write(1, 9, 0, &[9; 4096], false).await;
    assert!(is_device_failed(&write), "got {write:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_erased_chunk_leaves_nothing_on_the_device() {
    let dir = test_dir("erase");
    let store = ChunkStore::open(StoreConfig {
        data_dir: dir.clone(),
        devices: vec![(dir.join("dev0.img"), 4 << 20)],
        engine: EngineKind::Uring,
        health: DeviceHealthConfig::default(),
    })
    .unwrap();
    let marker = b"pflex-erase-marker-0123456789abcdef".repeat(128);
    let block = &marker[..4096];
    store.write(7, 0, 8192, block, true).await.unwrap();
    store.write(7, 1, 0, block, true).await.unwrap();
    let contains = |path: &std::path::Path| {
        let bytes = std::fs::read(path).unwrap();
        bytes.windows(64).any(|w| w == &block[..64])
    };
    assert!(contains(&dir.join("dev0.img")), "the marker must be on the device first");
    store.erase(7, 0).await.unwrap();
    store.erase(7, 1).await.unwrap();
    assert!(store.allocated_chunks().is_empty());
    assert!(!contains(&dir.join("dev0.img")), "an erased chunk's bytes stay on the device");
    assert_eq!(store.read(7, 0, 8192, 4096).await.unwrap(), vec![0; 4096]);
}

/// An IO that completes after its deadline but within the confirmation
/// wait does not fail its device. That wait is what keeps a paused process
/// (SIGSTOP, a stalled runtime) from failing its disks: its deadline timer
/// fires as it resumes, before the completion the kernel already has is
/// delivered. Here the device answers 400 ms late against a 200 ms deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_io_done_within_the_confirmation_wait_does_not_fail_its_device() {
    let store = open("late", EngineKind::Uring, Some(Duration::from_millis(200)));
    two_chunks(&store).await;
    store.fault_handle().unwrap().set(0, DeviceFault::Slow { delay_ms: 400 });
    for _ in 0..3 {
        let read = within("a late read", store.read(1, 0, 0, 4096)).await;
        assert_eq!(read.expect("a late IO is not a device failure"), vec![0xA0; 4096]);
    }
    assert!(store.failed_devices().is_empty());
}
