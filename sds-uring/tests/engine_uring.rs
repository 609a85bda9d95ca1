//! The IO engines on their own: the uring engine opens its devices with
//! O_DIRECT, keeps many operations in flight in the ring, refuses unaligned
//! requests without losing their buffer, and gives buffers back on errors.

use std::path::PathBuf;
use std::sync::Arc;

use pflex_sds_uring::engine::uring::{UringConfig, UringEngine};
use pflex_sds_uring::engine::{
    open_engine, AlignedBuf, DeviceFile, EngineKind, IoEngine, IoRequest, IO_ALIGN,
};
use pflex_sds_uring::store::{ChunkStore, StoreConfig};

fn test_dir(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("engine-tests").join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn device_file(dir: &std::path::Path, size: u64) -> DeviceFile {
    let path = dir.join("dev0.img");
    let file = std::fs::File::create(&path).unwrap();
    file.set_len(size).unwrap();
    DeviceFile { path }
}

fn open_flags(fd: i32) -> i32 {
    // SAFETY: F_GETFL only reads the flags of a descriptor this process holds.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    assert!(flags >= 0, "fcntl failed: {}", std::io::Error::last_os_error());
    flags
}

/// The `flags:` line of /proc/self/fdinfo, an independent view of the same fact.
fn fdinfo_flags(fd: i32) -> i32 {
    let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}")).unwrap();
    let octal = info
        .lines()
        .find_map(|line| line.strip_prefix("flags:"))
        .expect("fdinfo has a flags line")
        .trim();
    i32::from_str_radix(octal, 8).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uring_store_devices_are_opened_with_o_direct() {
    let dir = test_dir("odirect");
    let store = ChunkStore::open(StoreConfig {
        data_dir: dir.clone(),
        devices: vec![(dir.join("a.img"), 2 << 20), (dir.join("b.img"), 2 << 20)],
        engine: EngineKind::Uring,
        health: Default::default(),
    })
    .unwrap();
    let fds = store.device_fds();
    assert_eq!(fds.len(), 2);
    for fd in fds {
        assert_ne!(open_flags(fd) & libc::O_DIRECT, 0, "fcntl: fd {fd} lacks O_DIRECT");
        assert_ne!(fdinfo_flags(fd) & libc::O_DIRECT, 0, "fdinfo: fd {fd} lacks O_DIRECT");
    }
    // The sync engine, by design, does not.
    drop(store);
    let store = ChunkStore::open(StoreConfig {
        data_dir: dir.clone(),
        devices: vec![(dir.join("a.img"), 2 << 20), (dir.join("b.img"), 2 << 20)],
        engine: EngineKind::Sync,
        health: Default::default(),
    })
    .unwrap();
    for fd in store.device_fds() {
        assert_eq!(open_flags(fd) & libc::O_DIRECT, 0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thirty_two_requests_are_in_flight_together() {
    let dir = test_dir("depth");
    let device = device_file(&dir, 64 << 20);
    // Real data on disk: reads of holes would complete inline, without the device.
    std::fs::write(&device.path, vec![0x5Au8; 64 << 20]).unwrap();
    std::fs::File::open(&device.path).unwrap().sync_all().unwrap();
    let engine: Arc<dyn IoEngine> =
        Arc::new(UringEngine::open(&[device], UringConfig::default()).unwrap());
    // Rounds of 32 concurrent 2 MiB reads: each takes long enough that the
    // ring thread sees the others arrive while it is still busy. A loaded
    // machine may preempt the submitting task, so a few rounds are allowed.
    for _round in 0..10 {
        // Buffers first: allocating 2 MiB each would pace the submissions.
        let buffers: Vec<_> = (0..32).map(|_| AlignedBuf::zeroed(2 << 20)).collect();
        let pending: Vec<_> = (0..32u64)
            .zip(buffers)
            .map(|(i, buf)| engine.submit(IoRequest::read(0, (i % 31) << 21, buf)))
            .collect();
        for completion in pending {
            let completion = completion.await;
            completion.result.unwrap();
            assert_eq!(completion.buf.unwrap().len(), 2 << 20);
        }
        if engine.in_flight_peak() >= 24 {
            break;
        }
    }
    let peak = engine.in_flight_peak();
    assert!(peak >= 24, "only {peak} operations were ever in flight at once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unaligned_requests_are_refused_and_keep_their_buffer() {
    let dir = test_dir("unaligned");
    let device = device_file(&dir, 1 << 20);
    let engine = open_engine(EngineKind::Uring, &[device]).unwrap();
    let refused = engine.submit(IoRequest::read(0, 512, AlignedBuf::zeroed(IO_ALIGN))).await;
    assert_eq!(refused.result.unwrap_err().kind(), std::io::ErrorKind::InvalidInput);
    assert_eq!(refused.buf.expect("buffer handed back").len(), IO_ALIGN);
    let short = engine.submit(IoRequest::write(0, 0, AlignedBuf::zeroed(100), false)).await;
    assert!(short.result.is_err());
    assert!(short.buf.is_some());
    let no_device = engine.submit(IoRequest::data_sync(3)).await;
    assert!(no_device.result.is_err());
}

async fn write_read_fsync_round_trip(kind: EngineKind) {
    let dir = test_dir(&format!("roundtrip-{kind}"));
    let device = device_file(&dir, 4 << 20);
    let engine = open_engine(kind, &[device]).unwrap();
    let mut data = AlignedBuf::zeroed(3 * IO_ALIGN);
    data.iter_mut().enumerate().for_each(|(i, b)| *b = (i * 7 % 251) as u8);
    let expected = data.to_vec();
    let written = engine.submit(IoRequest::write(0, 1 << 20, data, true)).await;
    written.result.unwrap();
    engine.submit(IoRequest::data_sync(0)).await.result.unwrap();
    let read = engine.submit(IoRequest::read(0, 1 << 20, AlignedBuf::zeroed(3 * IO_ALIGN))).await;
    read.result.unwrap();
    assert_eq!(read.buf.unwrap().to_vec(), expected);
    // Reading past the end of the device fails and still returns the buffer.
    let past = engine.submit(IoRequest::read(0, 4 << 20, AlignedBuf::zeroed(IO_ALIGN))).await;
    assert!(past.result.is_err());
    assert!(past.buf.is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_read_fsync_round_trip_uring() {
    write_read_fsync_round_trip(EngineKind::Uring).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_read_fsync_round_trip_sync() {
    write_read_fsync_round_trip(EngineKind::Sync).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_requests_complete_safely() {
    let dir = test_dir("dropped");
    let device = device_file(&dir, 16 << 20);
    let engine = open_engine(EngineKind::Uring, &[device]).unwrap();
    // Submit and immediately drop: the engine keeps each buffer until the
    // kernel is done with it, then frees it; later IO still works.
    for i in 0..64u64 {
        drop(engine.submit(IoRequest::write(
            0,
            (i % 16) << 20,
            AlignedBuf::zeroed(1 << 20),
            false,
        )));
    }
    let check = engine.submit(IoRequest::read(0, 0, AlignedBuf::zeroed(IO_ALIGN))).await;
    check.result.unwrap();
    drop(engine); // joins the device thread after in-flight work drains
}

fn patterned(len: usize, seed: u8) -> AlignedBuf {
    let mut data = AlignedBuf::zeroed(len);
    data.iter_mut().enumerate().for_each(|(i, b)| *b = (i as u8).wrapping_mul(31) ^ seed);
    data
}

#[tokio::test(flavor = "current_thread")]
async fn requests_alone_on_their_device_are_submitted_by_their_caller() {
    let dir = test_dir("inline");
    let device = device_file(&dir, 8 << 20);
    let engine = UringEngine::open(&[device], UringConfig::default()).unwrap();
    // One at a time: each finds the device idle and goes straight into the
    // shared ring from this thread.
    for i in 0..16u64 {
        let data = patterned(2 * IO_ALIGN, i as u8);
        let expected = data.to_vec();
        engine.submit(IoRequest::write(0, i << 16, data, i % 4 == 0)).await.result.unwrap();
        let read = engine.submit(IoRequest::read(0, i << 16, AlignedBuf::zeroed(2 * IO_ALIGN)));
        let read = read.await;
        read.result.unwrap();
        assert_eq!(read.buf.unwrap().to_vec(), expected, "request {i}");
    }
    assert_eq!(engine.inline_submitted(), 32, "every request was alone on the device");
    // A flush always goes to the device thread.
    engine.submit(IoRequest::data_sync(0)).await.result.unwrap();
    assert_eq!(engine.inline_submitted(), 32);
    // Several at once: the first finds the device idle, the rest queue
    // behind it on the device thread; all complete with their own data.
    let pending: Vec<_> = (0..8u64)
        .map(|i| {
            engine.submit(IoRequest::write(
                0,
                (4 << 20) + (i << 12),
                patterned(IO_ALIGN, 99 + i as u8),
                false,
            ))
        })
        .collect();
    for completion in pending {
        completion.await.result.unwrap();
    }
    let inline_now = engine.inline_submitted();
    assert!(
        (33..40).contains(&inline_now),
        "{inline_now} inline submissions for 8 concurrent writes"
    );
    for i in 0..8u64 {
        let read = engine
            .submit(IoRequest::read(0, (4 << 20) + (i << 12), AlignedBuf::zeroed(IO_ALIGN)))
            .await;
        assert_eq!(read.buf.unwrap().to_vec(), patterned(IO_ALIGN, 99 + i as u8).to_vec());
    }
}

#[test]
fn inline_requests_outlive_their_caller_their_runtime_and_the_engine() {
    let dir = test_dir("inline-lifetimes");
    let device = device_file(&dir, 8 << 20);
    let engine =
        Arc::new(UringEngine::open(std::slice::from_ref(&device), UringConfig::default()).unwrap());
    // Outside any runtime there is no reaper to answer: the device thread takes it.
    let outside = engine.submit(IoRequest::write(0, 0, patterned(IO_ALIGN, 1), false));
    let runtime = || tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime().block_on(outside).result.unwrap();
    assert_eq!(engine.inline_submitted(), 0);
    // A request whose caller stops waiting and whose runtime shuts down
    // while the kernel still works on it.
    let first = runtime();
    first.block_on(async {
        drop(engine.submit(IoRequest::write(0, 1 << 20, patterned(1 << 20, 2), false)));
    });
    drop(first);
    assert_eq!(engine.inline_submitted(), 1);
    // A later runtime gets its own reaper; the device is usable as before.
    runtime().block_on(async {
        let data = patterned(IO_ALIGN, 3);
        let expected = data.to_vec();
        engine.submit(IoRequest::write(0, 2 << 20, data, true)).await.result.unwrap();
        let read = engine.submit(IoRequest::read(0, 2 << 20, AlignedBuf::zeroed(IO_ALIGN))).await;
        assert_eq!(read.buf.unwrap().to_vec(), expected);
        // Closing the engine with a request in flight waits for the kernel.
        drop(engine.submit(IoRequest::write(0, 3 << 20, patterned(1 << 20, 4), false)));
    });
    let engine = Arc::try_unwrap(engine).ok().expect("no other owner");
    drop(engine);
    let reopened = UringEngine::open(&[device], UringConfig::default()).unwrap();
    runtime().block_on(async {
        let read = reopened.submit(IoRequest::read(0, 2 << 20, AlignedBuf::zeroed(IO_ALIGN))).await;
        assert_eq!(read.buf.unwrap().to_vec(), patterned(IO_ALIGN, 3).to_vec());
    });
}
